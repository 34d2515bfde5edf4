"""The run: one loop over the layers, reading, measuring, merging and writing one layer at a time."""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from huggingface_hub import ModelCardData
from tqdm import tqdm

from . import __version__
from .arch import ArchSpec
from .calibration import HiddenStates, sample_windows
from .checkpoint import (INDEX_NAME, CheckpointReader, Deferred, atomic_write, drop_cached, io_thread, materialize,
                         publish, read_shard, release_pages, sampled_digest, save_json, save_shard, save_text,
                         stage_shard, staged_path)
from .cluster import cluster_experts, prune_experts
from .errors import CheckpointError, DeviceMemoryError, InputError, Interrupted
from .journal import PROVENANCE, Journal, refuse_inside_input, source_digest
from .merge import member_weights, merge_tensors, router_rows, router_vector
from .model import Model
from .options import RunOptions, check_options, target_experts
from .routed import Placement, RoutedTokens
from .runner import LayerRunner, reduced_config
from .statistics import ExpertStatistics

log = logging.getLogger(__name__)
METHOD_NAMES = {"hcsmoe": "HC-SMoE expert merging", "prune-freq": "pruning by usage frequency",
                "prune-reap": "REAP pruning"}
SAMPLED_TOKENS_PER_CHUNK = 64
SCORED_TOKENS = 512  # of the last chunk, on which compressed MoE blocks are scored
_libc = ctypes.CDLL(None)
_malloc_trim = getattr(_libc, "malloc_trim", None)  # glibc only
_mallopt = getattr(_libc, "mallopt", None)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
REUSED_BLOCK_BYTES = 1 << 30


def _reuse_freed_blocks() -> None:
    """Let glibc keep freed blocks of up to 1 GB for reuse instead of unmapping them. Each expert's forward
    allocates the same few hundred MB of activations; above glibc's 32 MB limit each would be a fresh mapping,
    paid for with page faults and, while the streamed model fills the page cache, reclaim inside them, which
    made the element-wise work around the matmuls slow (README "Performance"). The blocks go back to the
    system once a layer's statistics are done (`_return_freed_heap`)."""
    if _mallopt is not None:
        _mallopt(M_MMAP_THRESHOLD, REUSED_BLOCK_BYTES)
        _mallopt(M_TRIM_THRESHOLD, REUSED_BLOCK_BYTES)


def _return_freed_heap() -> None:
    """Hand the heap's free pages back to the system. glibc keeps freed blocks for reuse (see
    `_reuse_freed_blocks`), which pays while the same activations repeat, expert after expert; the steps
    after them allocate other sizes, and without this the peak RSS crept up with depth (by 7% over 8
    Mixtral layers in tools/bench.py)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is visible: use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, weights_dtype: torch.dtype) -> torch.dtype:
    """`auto` computes in float32 on CPU (bf16 matmuls are slow on most CPUs), in the weights' dtype on GPU, but
    bfloat16 weights in float32 on a GPU without bfloat16 (before Ampere), where float16 could overflow."""
    if name == "auto":
        if device.type == "cpu" or (weights_dtype == torch.bfloat16 and not bf16_capable(device)):
            return torch.float32
        return weights_dtype
    if name == "bfloat16" and not bf16_capable(device):
        raise InputError(f"--dtype bfloat16: {torch.cuda.get_device_name(device)} has no bfloat16 support: use "
                         f"--dtype float32 or auto")
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def bf16_capable(device: torch.device) -> bool:
    """bfloat16 matmuls run natively (CPU, CUDA from compute capability 8.0). A device that is not there (a plan
    made on another machine) is taken to have it."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return True
    return torch.cuda.get_device_capability(device) >= (8, 0)


def device_fields(device: torch.device) -> dict:
    """What the result depends on beyond the options and versions: on CUDA the GPU model, the CUDA and cuBLAS
    versions (kernels, hence bits, differ between them) and deterministic mode (`deterministic`)."""
    if device.type != "cuda":
        return {"device": device.type}
    return {"device": device.type, "gpu": torch.cuda.get_device_name(device),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(device))),
            "cuda": torch.version.cuda, "cublas": cublas_version(device),
            "deterministic": torch.are_deterministic_algorithms_enabled()}


def cublas_version(device: torch.device) -> str:
    """The version of the cuBLAS torch loaded, as cublasLt reports it (torch has no API for it)."""
    torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)  # loads cuBLAS
    with open("/proc/self/maps") as maps:
        paths = {line.split()[-1] for line in maps if "libcublasLt" in line}
    for path in sorted(paths):
        version = ctypes.CDLL(path).cublasLtGetVersion
        version.restype = ctypes.c_size_t
        return str(version())
    return "unknown"


def deterministic(device: torch.device) -> None:
    """Deterministic kernels on CUDA (index_add_ without atomics, fixed cuBLAS workspaces), so that a resumed run
    on the same hardware gives the same bytes. cuBLAS reads its setting when CUDA starts, hence before it."""
    if device.type == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


def sampled_rows(x: torch.Tensor) -> slice:
    """About SAMPLED_TOKENS_PER_CHUNK evenly spaced rows of a chunk, on which experts are compared token by token."""
    return slice(None, None, max(1, x.shape[0] // SAMPLED_TOKENS_PER_CHUNK))


def scored_rows(x: torch.Tensor) -> slice:
    """About SCORED_TOKENS evenly spaced rows of a chunk's [N, H] MoE inputs: scoring stays cheap."""
    return slice(None, None, max(1, x.shape[0] // SCORED_TOKENS))


@dataclass
class Held:
    """The scored tokens of a layer, on the host: MoE block inputs x, outputs y and every expert's outputs."""

    x: torch.Tensor
    y: torch.Tensor
    outputs: list[torch.Tensor]


class Run:
    """State shared by the steps of one `streammerge run`."""

    def __init__(self, model_dir: Path, out_dir: Path, options: RunOptions):
        self.options = options
        self.out_dir = Path(out_dir)
        self.model = Model.open(model_dir)
        self.spec: ArchSpec = self.model.spec
        self.config = self.model.config
        self.num_layers = self.config.num_hidden_layers
        self.moe_layers = set(self.spec.moe_layers(self.config))
        self.num_experts = self.spec.num_experts(self.config)
        self.k = target_experts(self.num_experts, options.ratio, options.experts)
        self.spec.check_experts_kept(self.config, self.k)
        self.top_k = (self.spec.top_k(self.config), min(self.spec.top_k(self.config), self.k))
        if self.top_k[0] != self.top_k[1]:
            log.warning("keeping %d of %d experts, fewer than the %d each token is routed to: the output's %s is %d",
                        self.k, self.num_experts, self.top_k[0], self.spec.top_k_key, self.top_k[1])
        if options.router in ("lsefit", "kl") and not self.spec.softmax_router:
            raise InputError(f"--router {options.router} fits a softmax router; {self.spec.family} routes by "
                             f"{self.spec.routing}: use --router dominant or freqavg")
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device, self.model.weights_dtype)
        self.tokens = sample_windows(self.model.tokenizer(), options.calib, options.samples, options.seqlen, options.seed)
        self.chunks = [range(start, min(start + options.batch, options.samples))
                       for start in range(0, options.samples, options.batch)]
        self.total_shards = self.num_layers + 1
        self.journal = Journal(self.out_dir)
        self.runner = LayerRunner(self.spec, self.config, self.device, self.dtype)
        self.writer = io_thread("writer")
        self.saver = io_thread("saver")
        self.overlapping = threading.Event()  # this layer's overlap() started (see there)
        self.saving: Future | None = None  # the previous layer's save, running beside this layer
        self.hidden_writes: list[Future] = []
        self.placement = Placement()  # where a layer's MoE inputs wait for the experts; tokens per expert call

    def signature_fields(self) -> dict:
        ignored = ("restart", "calib", "ratio", "experts", "eval_text")
        options = {k: v for k, v in self.options.as_json().items() if k not in ignored}
        return {
            "input": self.model.fingerprint,
            "input_shards": {shard: sampled_digest(self.model.dir / shard)
                             for shard in sorted(set(self.model.reader.weight_map.values()))},
            "experts_kept": self.k,
            **options,
            **device_fields(self.device),
            "calibration_tokens": hashlib.sha256(self.tokens.numpy().tobytes()).hexdigest(),
            "versions": self.model.versions(),
            "source": source_digest(),
        }

    def output_files(self) -> list[str]:
        copied = [p.name for p in self.model.extra_files()]
        shards = [shard_name(i, self.total_shards) for i in range(self.total_shards)]
        return [*shards, *copied, INDEX_NAME, "config.json", PROVENANCE, "README.md", "streammerge.log"]

    def hidden(self, layer: int) -> HiddenStates:
        return HiddenStates(self.journal.work_dir, layer, len(self.chunks))

    def embed(self) -> None:
        """Layer 0's inputs: the embedding lookup of the calibration tokens."""
        table = self.model.reader.read([self.spec.embed_name])[self.spec.embed_name]
        store = self.hidden(0)
        for c, rows in enumerate(self.chunks):
            ids = self.tokens[rows.start:rows.stop]
            store.write(c, self.runner.embed(ids, table).to(self.dtype))

    def write_hidden(self, store: HiddenStates, chunk: int, hidden: torch.Tensor) -> None:
        """Queue a chunk for the writer thread, so the disk write overlaps the next chunk's compute.
        At most two chunks wait, so host memory stays at a few chunks, not the calibration set."""
        while len(self.hidden_writes) >= 2:
            self.hidden_writes.pop(0).result()
        self.hidden_writes.append(self.writer.submit(store.write, chunk, hidden.to("cpu")))

    def flush_hidden(self) -> None:
        for write in self.hidden_writes:
            write.result()
        self.hidden_writes.clear()

    def overlap(self, layer: int) -> None:
        """Start the disk work that overlaps layer `layer`'s compute: saving the previous layer, reading the
        next. Called when the layer's experts start, not before its attention: on a CPU the background
        threads take cores from the compute, and the short attention ops suffer far more from that than the
        long expert matmuls. Called again before each expert, it stops the run as soon as that save has
        failed (a full disk), not after the whole layer's compute."""
        if self.saving is not None and self.saving.done() and self.saving.exception() is not None:
            raise self.saving.exception()
        if self.overlapping.is_set():
            return
        self.overlapping.set()
        if layer + 1 < self.num_layers:
            self.model.reader.prefetch(self.model.layer_names(layer + 1))

    def process(self, layer: int) -> Future:
        """Measure and choose layer `layer`'s output; returns the future of its saving (staging, fsync, then
        the journal record), which runs beside the next layer's compute."""
        _return_freed_heap()
        tensors = self.model.read(self.model.layer_names(layer))  # block-FP8 weights dequantized
        module = self.runner.build(layer, tensors)
        source, target = self.hidden(layer), self.hidden(layer + 1)
        record = {"layer": layer, "shard": shard_name(layer, self.total_shards)}
        path = self.out_dir / record["shard"]
        if layer in self.moe_layers:
            stats, held = self.measure(layer, module, source, target)
            del module
            self.check_finite(layer, tensors, stats)
            _return_freed_heap()  # the experts' activation blocks: merging and scoring allocate other sizes
            plans = self.candidates(stats)
            outputs = {method: self.layer_tensors(layer, tensors, groups, stats) for method, groups in plans.items()}
            errors = {m: self.block_error(layer, outputs[m], plans[m], held) for m in plans}
            method = min(errors, key=errors.get)
            tensors = outputs[method]
            del outputs
            record.update({
                "method": method,
                "groups": plans[method],
                "error": round(errors[method], 6),
                "errors": {m: round(e, 6) for m, e in errors.items()},
                "frequencies": [round(f, 6) for f in stats.frequencies.tolist()],
                "tokens": stats.tokens,
            })
            self.log_result(record)
            if self.options.propagate == "merged":  # the next layer's inputs come from the written layer
                record.update(self.stage(path, tensors))
                tensors = None
                written = read_shard(staged_path(path))
                self.propagate(layer, self.runner.build(layer, written, reduced_config(self.spec, self.config, self.k)))
        else:
            self.overlap(layer)
            self.propagate(layer, module)
        self.flush_hidden()  # the record may only be committed once the next layer's inputs are durable
        self.overlapping = threading.Event()  # set by the next layer's overlap(), or when the loop ends
        self.saving = self.saver.submit(self.save, path, tensors, record, self.overlapping)
        return self.saving

    def log_result(self, record: dict) -> None:
        log.info("layer %d: %s, %d -> %d experts, block error %.4f, groups %s", record["layer"], record["method"],
                 self.num_experts, self.k, record["error"], record["groups"])

    @staticmethod
    def stage(path: Path, tensors: dict) -> dict:
        stage_shard(path, tensors)
        return {"bytes": staged_path(path).stat().st_size, "tensors": sorted(tensors),
                "tensor_bytes": sum(t.dtype.itemsize * math.prod(t.shape) for t in tensors.values())}

    def save(self, path: Path, tensors: dict | None, record: dict, start: threading.Event) -> dict:
        """Stage (unless staged), publish and journal a layer's shard once `start` is set; the layer's input
        hidden states go."""
        start.wait()
        if tensors is not None:
            record.update(self.stage(path, tensors))
        publish(path)
        record["sample"] = sampled_digest(path)  # verified on resume
        # Neither the shard nor the layer's input is read again: their cached pages go before the next
        # layer's prefetch needs the room.
        drop_cached(path)
        self.model.reader.evict(self.model.layer_names(record["layer"]))
        self.journal.commit(record)
        self.hidden(record["layer"]).remove()
        return record

    def propagate(self, layer: int, module) -> None:
        source, target = self.hidden(layer), self.hidden(layer + 1)
        for c in range(len(self.chunks)):
            self.write_hidden(target, c, self.runner.forward(module, layer, source.read(c, self.device)))

    @torch.no_grad()
    def measure(self, layer: int, module, source: HiddenStates, target: HiddenStates):
        """The layer's outputs for the next layer, the expert statistics, and the MoE block's inputs and outputs
        on the last chunk, against which compressed blocks are scored, expert-major: each expert crosses to the
        device once per layer, not once per chunk.

        1. The layer runs on every chunk with its experts taped (`ExpertStream.tape`): the MoE inputs and the
           routing are kept (`RoutedTokens`), on the device when the plan finds room.
        2. Each expert is loaded once and runs on every chunk (`ExpertStream.sweep`), adding to the statistics
           on the device and to each chunk's routed output.
        3. The layer runs again on each chunk with those outputs replayed, for the next layer's inputs. Running
           attention and router twice costs little next to the experts (3-4% of the layer's FLOPs at
           Mixtral-8x7B's sizes, `streammerge plan`), and it needs nothing of a family but its own layer.

        With `--method auto` the last chunk is held aside from the statistics, so the choice is judged on
        tokens it was not made from.
        """
        stream = self.spec.moe_block(module).experts
        stats = ExpertStatistics(self.num_experts, self.config.hidden_size, self.device)
        scored = len(self.chunks) - 1
        counted = range(scored if self.options.method == "auto" and len(self.chunks) > 1 else len(self.chunks))
        tokens = RoutedTokens(self.num_experts, self.device, self.placement.tokens_on_device)
        stream.tape, stream.max_rows = tokens, self.placement.max_rows
        try:
            for c in tqdm(range(len(self.chunks)), desc=f"layer {layer} routing", leave=False, disable=None):
                self.runner.forward(module, layer, source.read(c, self.device))
        finally:
            stream.tape = None
        for c in counted:
            stats.add_routing(tokens.chunks[c])  # where they are kept: only counts and sizes are read
        sampled: list[list[torch.Tensor]] = [[] for _ in self.chunks]
        outputs = []

        def observe(expert, c, chunk, y):
            if c == 0:
                self.overlap(layer)
            if c == scored:
                outputs.append(y[scored_rows(y)].clone())
            if c in counted:
                stats.add_expert(expert, y, chunk)
                sampled[c].append(y[sampled_rows(y)].clone())  # a strided view would keep all of y alive

        combined = stream.sweep(tokens, observe)
        for c in counted:
            x = tokens.chunks[c].x
            stats.add_sample(x[sampled_rows(x)].to(self.device), torch.stack(sampled[c]))
        del sampled, tokens
        block = {}
        moe = self.spec.moe_block(module)
        hooks = [moe.register_forward_pre_hook(lambda _, args: block.update(x=args[0])),
                 moe.register_forward_hook(lambda _, args, out: block.update(y=out[0] if isinstance(out, tuple) else out))]
        propagating = self.options.propagate == "original"
        replayed = range(len(self.chunks)) if propagating else [scored]  # "merged": only the scored block's output
        stream.replay = iter(combined[c] for c in replayed)
        try:
            for c in tqdm(replayed, desc=f"layer {layer} outputs", leave=False, disable=None):
                out = self.runner.forward(module, layer, source.read(c, self.device))
                if propagating:
                    self.write_hidden(target, c, out)
        finally:
            stream.replay = None
            for hook in hooks:
                hook.remove()
        hidden = self.config.hidden_size
        x, y = (block[k].reshape(-1, hidden) for k in "xy")
        held = Held(x[scored_rows(x)].to("cpu", copy=True), y[scored_rows(y)].to("cpu", copy=True),
                    [o.to("cpu") for o in outputs])
        return stats.to_host(), held

    def check_finite(self, layer: int, tensors: dict, stats: ExpertStatistics) -> None:
        """Refuse NaN or Inf, which would merge into every expert it touches and score as a NaN error. Every
        expert's weights reach the statistics, so only when those are not finite are the weights scanned,
        for the tensor to name."""
        if torch.isfinite(stats.output_sum).all() and torch.isfinite(stats.distance_sum).all():
            return
        for name, tensor in tensors.items():
            tensor = materialize(tensor)
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise CheckpointError(f"{name} holds NaN or Inf values: the checkpoint is damaged; re-download it")
        raise InputError(f"the MoE outputs of layer {layer} are NaN or Inf although its weights are finite: an earlier "
                         f"layer's weights hold NaN or Inf, or --dtype {self.options.dtype} overflows; try --dtype float32")

    def candidates(self, stats: ExpertStatistics) -> dict[str, list[list[int]]]:
        opts = self.options
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

    def layer_tensors(self, layer: int, tensors: dict, groups: list[list[int]], stats: ExpertStatistics) -> dict:
        spec, opts = self.spec, self.options
        routed = spec.routed_names(layer, self.num_experts)
        out = {name: t for name, t in tensors.items() if name not in routed}
        router = materialize(tensors[spec.router_name(layer)])
        out[spec.router_name(layer)] = router_rows(router, groups, stats.frequencies, opts.router,
                                                   stats.router_inputs if opts.router in ("lsefit", "kl") else None)
        for name, dim in spec.router_vector_names(layer):  # e_score_correction_bias, router.bias, ...
            out[name] = router_vector(materialize(tensors[name]), groups, stats.frequencies, opts.router, dim)
        merged = []
        for members in groups:
            weights = member_weights(members, stats.frequencies, opts.merge)
            parts = [spec.expert_parts(tensors, layer, e) for e in members]
            merged.append({p: parts[0][p] if len(parts) == 1 else Deferred(
                tuple(parts[0][p].shape), parts[0][p].dtype, partial(_merge_mapped, [x[p] for x in parts], weights))
                for p in parts[0]})
        out.update(spec.expert_tensors(layer, merged))
        return out

    @torch.no_grad()
    def block_error(self, layer: int, out: dict, groups: list[list[int]], held: Held) -> float:
        """Relative error ||y' - y|| / ||y|| of the compressed MoE block's output on the scored tokens.
        A kept original expert's outputs there are known from the statistics pass, so only merged
        experts run."""
        module = self.runner.build(layer, out, reduced_config(self.spec, self.config, self.k))
        block = self.spec.moe_block(module)
        block.experts.known = {k: held.outputs[g[0]] for k, g in enumerate(groups) if len(g) == 1}
        got = block(held.x.to(self.device).unsqueeze(0))
        got = (got[0] if isinstance(got, tuple) else got).reshape(held.y.shape).to("cpu")
        return ((got - held.y).double().norm() / held.y.double().norm()).item()

    def finalize(self, records: list[dict]) -> None:
        """Write the non-layer shard, copies, provenance and card, then the index and config last."""
        reader = self.model.reader
        globals_shard = shard_name(self.num_layers, self.total_shards)
        global_names = [n for n in reader.weight_map if n in self.spec.global_tensors or self.spec.is_passthrough(n)]
        save_shard(self.out_dir / globals_shard, reader.read(global_names))
        for path in self.model.extra_files():
            atomic_write(self.out_dir / path.name, partial(shutil.copyfile, path))
        weight_map = {name: globals_shard for name in global_names}
        for record in records:
            weight_map.update({name: record["shard"] for name in record["tensors"]})
        total_size = reader.nbytes(global_names) + sum(r["tensor_bytes"] for r in records)
        fields = self.journal.manifest()
        provenance = {
            "streammerge_version": __version__,
            "base_model": self.model.name,
            "family": self.spec.family,
            "experts_before": self.num_experts,
            "experts_after": self.k,
            "options": {k: v for k, v in self.options.as_json().items() if k != "restart"},
            "signature": fields["signature"],
            "fields": fields["fields"],
            "files": fields["files"],
            "layers": [{k: r[k] for k in ("layer", "method", "groups", "error", "errors", "frequencies") if k in r}
                       for r in records],
        }
        save_json(self.out_dir / PROVENANCE, provenance)
        save_text(self.out_dir / "README.md", self.model_card(provenance))
        save_json(self.out_dir / INDEX_NAME, {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})
        save_json(self.out_dir / "config.json", self.model.reduced_config_dict(self.k))
        self.journal.close()

    def model_card(self, provenance: dict) -> str:
        """README.md: the Hub's YAML front matter, then what was done and how to check it."""
        o = self.options
        chosen = Counter(layer["method"] for layer in provenance["layers"] if "method" in layer)
        methods = ", ".join(f"{METHOD_NAMES[m]} in {n} layer{'s' if n > 1 else ''}" for m, n in sorted(chosen.items()))
        metadata = ModelCardData(base_model=self.model.name, library_name="transformers",
                                 tags=["streammerge", "moe", self.spec.model_type], pipeline_tag="text-generation")
        top_k = (f"Each token is now routed to {self.top_k[1]} expert{'s' if self.top_k[1] > 1 else ''} instead of "
                 f"{self.top_k[0]} (`{self.spec.top_k_key}` lowered), as each MoE layer keeps only {self.k}. "
                 if self.top_k[0] != self.top_k[1] else "")
        return (
            f"---\n{metadata.to_yaml()}\n---\n\n"
            f"# {self.model.name}, {self.num_experts}→{self.k} experts (streammerge)\n\n"
            f"This checkpoint is **{self.model.name}** ({self.spec.family}) with the routed experts of every MoE layer "
            f"reduced from {self.num_experts} to {self.k} by streammerge {__version__}, without retraining: {methods} "
            f"(`--method {o.method}`; merging settings: `--feature {o.feature} --linkage {o.linkage} --merge {o.merge} "
            f"--router {o.router}`). {top_k}Calibration: {o.samples} × {o.seqlen} tokens from `{Path(o.calib).name}`, "
            f"seed {o.seed}. Everything outside the routed experts and their router rows is unchanged.\n\n"
            f"It loads with plain `AutoModelForCausalLM.from_pretrained`. Per-layer groups, usage frequencies and the "
            f"relative error of each compressed MoE block are in `{PROVENANCE}`. Quality is not guaranteed: measure "
            f"it on your task (`streammerge eval`).\n"
        )

    def summary(self, started: float) -> dict:
        before = self.model.reader
        after = CheckpointReader(self.out_dir)
        provenance = json.loads((self.out_dir / PROVENANCE).read_text())
        return {
            "experts": f"{self.num_experts} -> {self.k} per MoE layer ({len(self.moe_layers)} layers)",
            "top_k": self.top_k,
            "parameters": (before.num_parameters(), after.num_parameters()),
            "bytes": (before.nbytes(before.names()), after.nbytes(after.names())),
            "seconds": round(time.monotonic() - started, 1),
            "block_errors": {r["layer"]: r["error"] for r in provenance["layers"] if "error" in r},
            "perplexity": provenance.get("perplexity"),
        }


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


def run(model_dir: Path, out_dir: Path, options: RunOptions) -> dict:
    started = time.monotonic()
    from .plan import estimate, planned_device, preflight  # plan imports this module

    check_options(options)
    refuse_inside_input(model_dir, out_dir)
    _reuse_freed_blocks()
    deterministic(resolve_device(options.device))
    state = Run(model_dir, out_dir, options)
    with state.journal.locked():
        fields = state.signature_fields()
        if state.journal.check(fields, options.restart) == "complete" and not options.restart:
            state.journal.close()  # what a kill during the last cleanup left
            log.info("%s already holds this run's complete output; nothing to do", out_dir)
            return state.summary(started)
        plan = estimate(state.spec, state.config, state.model.tensor_table, options, planned_device(options.device))
        state.placement = preflight(plan, state.out_dir, state.journal.footprint(), state.device)
        state.journal.open(fields, state.output_files(), state.num_layers, options.restart)
        handler = logging.FileHandler(state.out_dir / "streammerge.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("streammerge").addHandler(handler)
        try:
            _loop(state)
            if options.eval_text is not None:
                try:
                    record_perplexity(Path(model_dir), state.out_dir, options)
                except KeyboardInterrupt:
                    raise Interrupted(f"interrupted while measuring perplexity; the output in {out_dir} is complete: "
                                      f"`streammerge eval {out_dir} --text {options.eval_text}` measures it") from None
            return state.summary(started)
        finally:
            logging.getLogger("streammerge").removeHandler(handler)
            handler.close()


def record_perplexity(model_dir: Path, out_dir: Path, options: RunOptions) -> None:
    """Perplexity of the input and the output on `--eval-text`, added to the provenance."""
    from .evaluate import perplexity  # evaluate imports this module

    result = {}
    for name, directory in (("before", model_dir), ("after", out_dir)):
        log.info("perplexity of the %s model on %s", "input" if name == "before" else "output", options.eval_text)
        result[name] = round(perplexity(directory, options.eval_text, device=options.device, dtype=options.dtype)["perplexity"], 4)
    provenance = json.loads((out_dir / PROVENANCE).read_text())
    provenance["perplexity"] = {"text": Path(options.eval_text).name, **result}
    save_json(out_dir / PROVENANCE, provenance)


def out_of_memory(exc: torch.OutOfMemoryError, where: str, then: str) -> DeviceMemoryError:
    """The one-line error for a device out of memory: what it tried and which options lower the need."""
    detail = " ".join(str(exc).split(". ")[:2]).split("\n")[0].rstrip(".")
    return DeviceMemoryError(f"out of GPU memory in {where} ({detail}): lower --batch or --seqlen {then}")


def _loop(state: Run) -> None:
    records = state.journal.finished(state.num_layers)
    first = len(records)
    if first:
        log.info("resuming after layer %d of %d", first - 1, state.num_layers)
        for record in records:
            if "groups" in record:
                state.log_result(record)
    if first < state.num_layers:  # the first layer's reads overlap the embedding; later ones, the layer before
        state.model.reader.prefetch(state.model.layer_names(first))
    if first == 0:
        state.embed()
    elif first < state.num_layers and not state.hidden(first).complete():
        raise CheckpointError(f"the work directory lost the hidden states of layer {first}: re-run with --restart")
    layer = first
    saved: Future | None = None
    try:
        for layer in tqdm(range(first, state.num_layers), desc="layers", initial=first,
                          total=state.num_layers, disable=None):
            saving = state.process(layer)
            if saved is not None:  # the previous layer was saved while this one computed
                records.append(saved.result())
            saved = saving
        state.overlap(state.num_layers)  # nothing left to overlap with
        if saved is not None:
            records.append(saved.result())
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted during layer {layer}; finished layers are saved: re-run the same command to resume"
        ) from None
    except torch.OutOfMemoryError as exc:
        raise out_of_memory(exc, f"layer {layer}", "and re-run with --restart, or free GPU memory and re-run the "
                            "same command to resume after the finished layers") from None
    finally:  # no write may still be under way when the error is reported
        state.overlapping.set()
        state.writer.shutdown(wait=True)
        state.saver.shutdown(wait=True)
    try:
        state.finalize(records)
    except KeyboardInterrupt:
        raise Interrupted("interrupted while writing the final files; every layer is saved: re-run the same command "
                          "to finish") from None
