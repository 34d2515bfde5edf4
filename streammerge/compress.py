"""One MoE layer's compression: candidate groups -> tensors -> output fit -> score. No file IO: the layer's tensors
come in (mapped), the chosen compressed tensors go out; transformers' layers run through a `LayerRunner`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch

from .arch import ArchSpec
from .checkpoint import Deferred, materialize, release_pages
from .cluster import cluster_experts, prune_experts
from .fit import Changes, Routed, fit_on_held_out
from .merge import member_weights, merge_tensors, router_rows, router_vector
from .runner import KnownRows, LayerRunner, reduced_config
from .statistics import ExpertStatistics

SCORED_TOKENS = 512  # of the last chunk, on which compressed MoE blocks are scored
FIT_TOKENS = 8192  # at most, evenly spaced over the fitted chunks: the fit keeps the kept experts' inputs on them


def scored_rows(x: torch.Tensor) -> slice:
    """About SCORED_TOKENS evenly spaced rows of a chunk's [N, H] MoE inputs: scoring stays cheap."""
    return slice(None, None, max(1, x.shape[0] // SCORED_TOKENS))


def fit_rows(fitted: int, calibration: int) -> slice:
    """The rows of each fitted chunk the fit learns from, when the fitted chunks hold `fitted` of the
    `calibration` tokens: at most FIT_TOKENS, and at most half the calibration tokens, which bounds the fit's
    expert work per candidate to k'/(2E) of the statistics' (Mixtral: 1/8)."""
    return slice(None, None, -(-fitted // min(FIT_TOKENS, max(1, calibration // 2))))


def fitted_chunks(chunks: int) -> range:
    """The chunks the fit learns from: all but the last, which scores the fit, unless there is only one."""
    return range(max(1, chunks - 1))


@dataclass
class HeldTokens:
    """MoE block inputs x [N, H] and the original block's outputs y [N, H] on the host, with what the statistics
    pass computed there: by original expert, its outputs (and with the fit its down-projection inputs) on the
    rows it ran on (`KnownRows`)."""

    x: torch.Tensor
    y: torch.Tensor
    known: dict[int, KnownRows]


@dataclass
class Held:
    """What a layer's candidates are scored on (every expert known on every row) and, with the fit, fitted on
    (each expert known on the rows the model routes to it)."""

    scored: HeldTokens
    fitted: HeldTokens | None


@dataclass
class Candidate:
    method: str
    groups: list[list[int]]
    tensors: dict  # unfitted until `best` applies the fit of the candidate it chose
    error: float  # relative MoE-block output error on the scored tokens, after the fit where it was kept
    unfitted_error: float
    fitted: tuple[list[dict], "Fitted"] | None = None  # the parts and their fit


@dataclass
class Fitted:
    """A candidate's fit: which of its experts changed, their changes (formed when applied), the down
    projection's layout."""

    experts: list[int]
    changes: Changes
    transposed: bool
    biased: bool


class LayerCompression:
    """The compressed candidates of one MoE layer, from its tensors, statistics and held tokens."""

    def __init__(self, runner: LayerRunner, layer: int, tensors: dict, stats: ExpertStatistics, held: Held, k: int,
                 options, max_rows: int | None = None):
        self.runner = runner
        self.spec: ArchSpec = runner.spec
        self.config = runner.config
        self.layer = layer
        self.tensors = tensors
        self.stats = stats
        self.held = held
        self.k = k
        self.options = options
        self.max_rows = max_rows
        self.num_experts = self.spec.num_experts(self.config)

    def best(self) -> tuple[Candidate, dict[str, float]]:
        """The candidate with the lowest block error, and every candidate's error. Candidates are built (and
        fitted) one at a time, keeping only the best so far. A fitted candidate's error is the fit's own, in the
        compute dtype; the chosen one's is then measured as written, in the weights' dtype, and its fit dropped
        if that is no better than no fit."""
        best, errors, made = None, {}, {}
        for method, groups in self.candidates().items():
            if str(groups) in made:  # pruning by frequency and by REAP often keep the same experts
                errors[method] = errors[made[str(groups)]]
                continue
            made[str(groups)] = method
            candidate = self.compress(method, groups)
            errors[method] = candidate.error
            if best is None or candidate.error < best.error:
                best = candidate
        if best.fitted is not None:  # formed for the chosen candidate only
            tensors = self.layer_tensors(best.groups, self.apply(*best.fitted))
            written = self.block_error(tensors, best.groups, known=False)
            best = (replace(best, tensors=tensors, error=written) if written < best.unfitted_error else
                    replace(best, error=best.unfitted_error, fitted=None))
        return best, errors

    def candidates(self) -> dict[str, list[list[int]]]:
        opts, stats = self.options, self.stats
        wanted = ("hcsmoe", "prune-freq", "prune-reap") if opts.method == "auto" else (opts.method,)
        ranges = self.spec.group_ranges(self.config)  # group-limited routing: experts never leave their group
        k = self.k // len(ranges)
        groups = {}
        for method in wanted:
            groups[method] = []
            for members in ranges:
                ix = torch.tensor(list(members))
                if method == "prune-freq":
                    local = prune_experts(stats.counts[ix], k)
                elif method == "prune-reap":
                    local = prune_experts(stats.reap[ix], k)
                elif opts.feature == "token-distance":
                    local = cluster_experts(k, opts.linkage, distances=stats.token_distance[ix][:, ix].numpy())
                else:
                    local = cluster_experts(k, opts.linkage, opts.metric, features=stats.mean_output[ix].numpy())
                groups[method] += [[members[e] for e in group] for group in local]
        return groups

    def compress(self, method: str, groups: list[list[int]]) -> Candidate:
        """A candidate's tensors and error, fitted with `--fit lsq` where the fit lowers the error on the scored
        tokens, which it did not learn from when there are several chunks: an expert with fewer routed tokens
        than inputs can fit its calibration tokens too closely."""
        parts = self.expert_parts(groups)
        tensors = self.layer_tensors(groups, parts)
        if self.options.fit == "none":
            error = self.block_error(tensors, groups, known=True)
            return Candidate(method, groups, tensors, error, error)
        fitted, error, fitted_error = self.fit(tensors, parts, groups)
        if fitted is None:
            return Candidate(method, groups, tensors, error, error)
        return Candidate(method, groups, tensors, fitted_error, error, fitted=(parts, fitted))

    def expert_parts(self, groups: list[list[int]]) -> list[dict]:
        """Each group's expert: a kept expert's mapped parts, or its members' merge, computed when used."""
        merged = []
        for members in groups:
            weights = member_weights(members, self.stats.frequencies, self.options.merge)
            parts = [self.spec.expert_parts(self.tensors, self.layer, e) for e in members]
            merged.append({p: parts[0][p] if len(parts) == 1 else Deferred(
                tuple(parts[0][p].shape), parts[0][p].dtype, partial(_merge_mapped, [x[p] for x in parts], weights))
                for p in parts[0]})
        return merged

    def layer_tensors(self, groups: list[list[int]], parts: list[dict]) -> dict:
        spec, opts, stats, layer = self.spec, self.options, self.stats, self.layer
        routed = spec.routed_names(layer, self.num_experts)
        out = {name: t for name, t in self.tensors.items() if name not in routed}
        router = materialize(self.tensors[spec.router_name(layer)])
        out[spec.router_name(layer)] = router_rows(router, groups, stats.frequencies, opts.router,
                                                   stats.router_inputs if opts.router in ("lsefit", "kl") else None)
        for name, dim in spec.router_vector_names(layer):  # e_score_correction_bias, router.bias, ...
            out[name] = router_vector(materialize(self.tensors[name]), groups, stats.frequencies, opts.router, dim)
        out.update(spec.expert_tensors(layer, parts))
        return out

    def block(self, tensors: dict):
        """The compressed layer's MoE block, built from `tensors`."""
        module = self.runner.build(self.layer, tensors, reduced_config(self.spec, self.config, self.k))
        block = self.spec.moe_block(module)
        block.experts.max_rows = self.max_rows
        return block

    def forward(self, block, x: torch.Tensor) -> torch.Tensor:
        """The block's output [N, H] on the host rows `x` [N, H], on the device."""
        out = block(x.to(self.runner.device).unsqueeze(0))
        return (out[0] if isinstance(out, tuple) else out).reshape(x.shape)

    @torch.no_grad()
    def fit(self, tensors: dict, parts: list[dict], groups: list[list[int]]) -> tuple["Fitted | None", float, float]:
        """(each routed expert's down projection (and its bias) re-solved so that the compressed block reproduces
        the original block's output on the fitted rows (`streammerge.fit`), with the ridge that does best on the
        scored tokens, to `apply`; or None when no ridge does better there than no fit; the block error on the
        scored tokens before the fit, and after it). Which tokens reach an expert, their router weights and the
        down projection's inputs are those of the compressed block's own forward; shared experts and everything
        else in the block stay as they are, so their outputs cancel."""
        block = self.block(tensors)
        block_layout = block.experts.down_layout()
        kept = _kept(groups)
        fitted_experts, fitted_residual = self.routed(block, self.held.fitted, kept, block_layout[1])
        scored_experts, scored_residual = self.routed(block, self.held.scored, kept, block_layout[1])
        del block
        scale = self.held.scored.y.double().norm().item()
        reached = [k for k in range(len(parts)) if fitted_experts[k]]  # an expert no fitted token reaches stays
        fitted = [fitted_experts[k] for k in reached]
        scored = [scored_experts[k] or Routed(f.rows[:0], f.inputs[:0]) for k, f in zip(reached, fitted)]
        changes, norm = fit_on_held_out(fitted, fitted_residual, scored, scored_residual)
        error = scored_residual.double().norm().item() / scale
        if changes is None:
            return None, error, error
        return Fitted(reached, changes, *block_layout), error, norm / scale

    def apply(self, parts: list[dict], fitted: "Fitted") -> list[dict]:
        """`parts` with the fitted experts' down projections (and biases) changed."""
        down, bias = self.spec.down_parts()
        out = [dict(p) for p in parts]
        for i, k in enumerate(fitted.experts):
            change = fitted.changes.form(i).to("cpu")
            size = change.shape[1] - fitted.biased
            weights = materialize(out[k][down])
            summed = weights.to(torch.float32, copy=True).add_(change[:, :size].T if fitted.transposed else change[:, :size])
            out[k][down] = summed.to(weights.dtype)
            release_pages(weights)
            del summed
            if fitted.biased:
                before = materialize(out[k][bias])
                out[k][bias] = (before.float() + change[:, size].view(before.shape)).to(before.dtype)
        return out

    def routed(self, block, tokens: HeldTokens, kept: dict[int, int], biased: bool):
        """The block run on held `tokens`, the kept experts' known rows taken from there: per expert (none
        where no token reaches it) its rows and its gated down-projection inputs, with a constant input for the
        bias; and the residual y - the block's output, in float32 on the device."""
        stream = block.experts
        stream.known = {k: tokens.known[e] for k, e in kept.items() if e in tokens.known}
        stream.fit_calls = []
        got = self.forward(block, tokens.x)
        residual = tokens.y.to(got.device).float() - got.float()
        routed = [None] * len(stream.experts)
        for call in stream.fit_calls:
            a = call.inputs.float()
            if biased:  # the bias is a weight on a constant input
                a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
            if call.gate is not None:
                a = a * call.gate.float()
            routed[call.expert] = Routed(call.rows, a)
        stream.fit_calls, stream.known = None, {}
        return routed, residual

    @torch.no_grad()
    def block_error(self, tensors: dict, groups: list[list[int]], known: bool) -> float:
        """Relative error ||y' - y|| / ||y|| of the compressed MoE block's output on the scored tokens. With
        `known`, a kept original expert's outputs there are taken from the statistics pass, so only merged
        experts run."""
        held = self.held.scored
        block = self.block(tensors)
        if known:
            block.experts.known = {k: held.known[e] for k, e in _kept(groups).items()}
        got = self.forward(block, held.x).to("cpu")
        return ((got - held.y).double().norm() / held.y.double().norm()).item()


def _kept(groups: list[list[int]]) -> dict[int, int]:
    """The compressed experts that are original ones, unmerged: new index -> original index."""
    return {k: g[0] for k, g in enumerate(groups) if len(g) == 1}


MERGE_SLAB = 1 << 24  # elements of each member whose mapped pages are resident at once while merging


def _merge_mapped(tensors: list, weights: torch.Tensor) -> torch.Tensor:
    """Merge members that are memory-mapped or `Deferred` (FP8) slab by slab, releasing each slab's pages once
    merged: a group of m members then holds m slabs of pages, not m whole projections."""
    tensors = [materialize(t) for t in tensors]
    if len(tensors) == 1:
        return tensors[0]
    flat = [t.reshape(-1) for t in tensors]
    merged = torch.empty(flat[0].shape, dtype=flat[0].dtype)
    for start in range(0, len(merged), MERGE_SLAB):
        slabs = [f[start:start + MERGE_SLAB] for f in flat]
        merged[start:start + MERGE_SLAB] = merge_tensors(slabs, weights)
        for slab in slabs:
            release_pages(slab)
    return merged.view(tensors[0].shape)
