"""One decoder layer at a time: transformers' own layer class, filled from checkpoint tensors."""

from __future__ import annotations

import copy
import itertools
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM

from .arch import ArchSpec
from .checkpoint import Deferred, materialize, release_pages
from .errors import CheckpointError
from .routed import RoutedTokens


def split_layer(spec: ArchSpec, config, layer: int, tensors: dict[str, torch.Tensor]):
    """One layer's on-disk tensors as (state dict of the in-memory layer without routed experts,
    list of each routed expert's parts: its projections, or its slices of the fused tensors).

    The experts stay apart so they can go to the device one at a time (`ExpertStream`).
    """
    prefix = spec.layer_prefix(layer)
    tensors = dict(tensors)
    experts = []
    if spec.is_moe_layer(config, layer):
        count = spec.num_experts(config)
        names = spec.expert_tensor_names(layer, count)
        missing = [n for n in names if n not in tensors]
        if missing:
            raise CheckpointError(
                f"layer {layer} lacks expert tensor {missing[0]} that the config's "
                f"{spec.experts_key}={count} requires: the checkpoint is incomplete"
            )
        for name in spec.fused_names(layer) if spec.fused else ():
            tensors[name] = materialize(tensors[name])  # sliced per expert below
            if tensors[name].dim() == 0 or tensors[name].shape[0] != count:
                raise CheckpointError(
                    f"{name} holds {tensors[name].shape[0] if tensors[name].dim() else 0} experts, the config's "
                    f"{spec.experts_key}={count}: the checkpoint and config.json disagree"
                )
        experts = [spec.expert_parts(tensors, layer, e) for e in range(count)]
        for name in names:
            del tensors[name]
    state = {name[len(prefix):]: t for name, t in tensors.items()}
    renames = {f"{spec.moe_prefix}.{disk}": f"{spec.moe_attr}.{memory}" for disk, memory in spec.renames}
    moved = {}
    for key, t in state.items():
        if key in renames:
            key = renames[key]
        elif key.startswith(spec.moe_prefix + ".") and spec.moe_prefix != spec.moe_attr:
            key = spec.moe_attr + key[len(spec.moe_prefix):]
        moved[key] = t
    return moved, experts


def runtime_config(config, attn_implementation: str = "sdpa"):
    """A copy of the config ready for standalone layers.

    `_attn_implementation` must be set explicitly: left as None, the mask helpers return no mask while
    the attention falls back to eager, which then runs silently non-causal.
    """
    config = copy.deepcopy(config)
    config._attn_implementation = attn_implementation
    config._experts_implementation = "eager"
    config.use_cache = False
    return config


def _set_count(config, key: str, value: int) -> None:
    current = getattr(config, key)
    setattr(config, key, [value] * len(current) if isinstance(current, (list, tuple)) else value)


def reduced_config(spec: ArchSpec, config, num_experts: int):
    """The config of the compressed layer: `num_experts` routed experts and top-k capped to that."""
    config = copy.deepcopy(config)
    top_k = spec.top_k(config)
    _set_count(config, spec.experts_key, num_experts)
    _set_count(config, spec.top_k_key, min(top_k, num_experts))
    return config


def load_layer(spec: ArchSpec, config, layer: int, tensors: dict[str, torch.Tensor],
               device: torch.device | None = None, dtype: torch.dtype | None = None,
               expert_buffers: dict | None = None, kept_fp32: tuple[str, ...] = (),
               uploader: "Uploader | None" = None) -> nn.Module:
    """transformers' layer built on meta and filled strictly from `tensors`.

    Routed experts are replaced by an `ExpertStream` over their (CPU, memory-mapped) tensors, computing in
    `expert_buffers` (see `ExpertStream`). Without a device the tensors may be meta too: that checks every
    name and shape of a layer without reading a byte of weights. Tensors matching a pattern of `kept_fp32`
    (`fp32_patterns`) stay float32 whatever `dtype`, as in transformers' own model.
    """
    with torch.device("meta"), _default_dtype(dtype):
        module = spec.layer_class_for(config, layer)(config, layer)
    state, experts = split_layer(spec, config, layer, tensors)
    if experts:
        block = spec.moe_block(module)
        buffers = {} if expert_buffers is None else expert_buffers
        block.experts = stream = ExpertStream(type(block.experts), spec, config, experts, device, dtype, buffers,
                                              uploader)
        if spec.scaled_input_experts:  # the stream needs the block's input and the router's scores
            block.register_forward_pre_hook(lambda _, args: stream.__dict__.update(block_input=args[0]))
            block.router.register_forward_hook(lambda _, args, out: stream.__dict__.update(scores=out[0]))
    if device is not None:
        declared = {n: t.dtype for n, t in [*module.named_parameters(), *module.named_buffers()]}
        state = {k: to_device(materialize(t), device, _dtype_of(k, declared.get(k, dtype), dtype, kept_fp32))
                 for k, t in state.items()}
    try:
        module.load_state_dict(state, strict=True, assign=True)
        if device is None and experts:
            spec.moe_block(module).experts.check(layer)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(
            f"layer {layer} tensors do not match the config ({detail[:300]}): the checkpoint and config.json disagree"
        ) from exc
    if device is not None:
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        assert not left, f"layer {layer} still has meta tensors {left}"
    return module.eval()


def fp32_patterns(model: nn.Module, dtype: torch.dtype) -> tuple[str, ...]:
    """What transformers keeps in float32 when it loads `model` in `dtype`: its `_keep_in_fp32_modules_strict`
    (routers, e_score_correction_bias) in float16 and bfloat16, its `_keep_in_fp32_modules` in float16."""
    if hasattr(model, "_get_dtype_plan"):
        return tuple(model._get_dtype_plan(dtype))
    strict = model._keep_in_fp32_modules_strict if dtype in (torch.float16, torch.bfloat16) else None
    loose = model._keep_in_fp32_modules if dtype == torch.float16 else None
    return (*(strict or ()), *(loose or ()))


def _dtype_of(name: str, declared: torch.dtype, dtype: torch.dtype, kept_fp32: tuple[str, ...]) -> torch.dtype:
    """A layer tensor's dtype as transformers loads it in `dtype`: what the layer class declares explicitly
    (hunyuan's router), float32 where the model's dtype plan says so, else `dtype`."""
    if declared != dtype and declared.is_floating_point:
        return declared
    return torch.float32 if _matches(name, kept_fp32) else dtype


@contextmanager
def _default_dtype(dtype: torch.dtype | None):
    """Build under the compute dtype as transformers builds under the model's, so that a tensor a class creates
    with an explicit other dtype shows it."""
    previous = torch.get_default_dtype()
    if dtype is not None and dtype.is_floating_point:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    """transformers' matching of its dtype plan: each pattern a regular expression searched in the name, `*`
    standing for anything."""
    return any(re.search(p.replace("*", ".*"), name) for p in patterns)


def to_device(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Host to device. For CUDA the bytes go through pinned memory with a non-blocking copy, so the transfer
    runs at full PCIe speed and queues behind the compute already on the stream instead of stalling the host.
    A mapped source that was copied leaves resident memory."""
    if device.type == "cuda":
        out = tensor.pin_memory().to(device=device, non_blocking=True).to(dtype)
    else:
        out = tensor.to(device=device, dtype=dtype)
    if out.data_ptr() != tensor.data_ptr():
        release_pages(tensor)
    return out


class Uploader:
    """Experts' parts to a CUDA device through two preallocated pinned staging sets on a copy stream, so that
    one expert's upload overlaps the compute of the one before it.

    `upload` fills a slot's pinned buffers on the host (waiting only for that slot's previous copy, two experts
    back) and queues their copy to the slot's device buffers on the copy stream; `take` makes the compute
    stream wait for it without stopping the host; `release` marks the slot's device buffers free once the
    compute stream has converted them.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.staging: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]  # (pinned, device) per piece
        self.uploaded: list[torch.cuda.Event | None] = [None, None]
        self.used: list[torch.cuda.Event | None] = [None, None]

    def upload(self, slot: int, tensors: list[torch.Tensor]) -> None:
        if self.uploaded[slot] is not None:
            self.uploaded[slot].synchronize()  # the copy stream only: the compute keeps running
        buffers = self.staging[slot]
        if [(p.shape, p.dtype) for p, _ in buffers] != [(t.shape, t.dtype) for t in tensors]:
            buffers[:] = [(torch.empty(t.shape, dtype=t.dtype, pin_memory=True),
                           torch.empty(t.shape, dtype=t.dtype, device=self.device)) for t in tensors]
        for (pinned, _), tensor in zip(buffers, tensors):
            pinned.copy_(tensor)
            release_pages(tensor)
        with torch.cuda.stream(self.stream):
            if self.used[slot] is not None:
                self.stream.wait_event(self.used[slot])
            for pinned, on_device in buffers:
                on_device.copy_(pinned, non_blocking=True)
            self.uploaded[slot] = self.stream.record_event()

    def take(self, slot: int) -> list[torch.Tensor]:
        torch.cuda.current_stream(self.device).wait_event(self.uploaded[slot])
        return [on_device for _, on_device in self.staging[slot]]

    def release(self, slot: int) -> None:
        self.used[slot] = torch.cuda.current_stream(self.device).record_event()


def _sources(tensor) -> list[torch.Tensor]:
    """What a `Deferred` tensor is computed from, when the device can compute it (block-FP8 weights)."""
    return list(tensor.sources) if isinstance(tensor, Deferred) and tensor.compute is not None else []


_STREAM_SERIALS = itertools.count()


class ExpertStream(nn.Module):
    """Stands in for transformers' experts module, with one expert on the device at a time.

    Three uses. At inference (eval, scoring candidates) each expert runs on the tokens routed to it, through a
    one-expert instance of transformers' own experts class, so its math is the model's. For the statistics
    (`sweep`) the layer runs first with `tape` set: the experts' inputs and routing of every chunk are kept
    and zeros returned; then each expert is loaded once and runs on every token of every chunk, which the
    statistics need anyway, summing the routed output; the layer then runs again with those outputs in
    `replay`, returned chunk by chunk instead of computing anything.

    The one expert's weights live in buffers of the compute dtype, which each expert's parts are copied (and
    converted) into, and the parts' mapped pages are released right after. The buffers come from `buffers`
    (keyed by name and shape), which the caller keeps across layers: allocated once per run, not per layer,
    since fresh memory costs a page fault per page on first touch (half a second per Mixtral layer). On CUDA
    the parts come through `uploader`, the next expert's while this one computes.

    When `fit_calls` is a list, an inference forward appends to it each expert's `RoutedCall`: what the output
    fit (`streammerge.fit`) learns from, taken from the very computation the block does.

    `known` maps experts to what the statistics pass already computed on some rows of this module's input
    (`KnownRows`): those rows are taken from there and only the others run (scoring a pruned layer costs no
    expert computation, and fitting it little). `max_rows` caps the tokens of one expert call, when the device
    cannot hold a whole chunk's activations.
    """

    def __init__(self, experts_class, spec: ArchSpec, config, experts: list[dict], device, dtype, buffers: dict,
                 uploader: Uploader | None = None):
        super().__init__()
        with torch.device("meta"):
            one = experts_class(reduced_config(spec, config, 1))
        # Not a registered submodule: its weights are whichever expert ran last, not part of the layer.
        object.__setattr__(self, "one", one)
        self.spec = spec
        self.top_k = spec.top_k(config)
        self.experts = experts
        self.device = device
        self.dtype = dtype
        self.buffers = buffers
        self.uploader = uploader
        # which stream's expert the shared buffers hold: id(self) could be a freed stream's, reused
        self.serial = next(_STREAM_SERIALS)
        self.uploading: dict[int, int] = {}  # slot -> expert
        self.state: dict[str, torch.Tensor] | None = None
        self.known: dict[int, KnownRows] = {}
        self.tape: RoutedTokens | None = None
        self.replay = None  # an iterator over the chunks' routed outputs
        self.max_rows: int | None = None
        self.fit_calls: list[RoutedCall] | None = None
        self.down_inputs: list[torch.Tensor] = []
        self.keep_down_inputs = False

    def _fill(self, state: dict[str, torch.Tensor], expert: int, copy) -> None:
        covered = set()
        for name, rows, tensor in self.spec.expert_pieces(self.experts[expert]):
            target = state[name][0][rows] if name in state else None
            if target is None or target.shape != tensor.shape:  # load_layer reports it with the layer
                raise RuntimeError(f"expert {expert}'s {name} has shape {tuple(tensor.shape)}, the config implies "
                                   f"{None if target is None else tuple(target.shape)}")
            copy(target, tensor)
            covered.add(name)
        if covered != set(state):
            raise RuntimeError(f"expert {expert} lacks {sorted(set(state) - covered)}")

    def check(self, layer: int) -> None:
        """Every expert's parts against the config's shapes, without reading a byte."""
        state = {name: torch.empty_like(t, device="meta") for name, t in self.one.state_dict().items()}
        for expert in range(len(self.experts)):
            self._fill(state, expert, lambda target, tensor: None)

    def prefetch(self, expert: int) -> None:
        """Start the expert's upload (CUDA); `_load` then waits for it on the device only."""
        if self.uploader is not None and self.uploading.get(expert % 2) != expert:
            uploads = []
            for _, _, tensor in self.spec.expert_pieces(self.experts[expert]):
                # FP8: its bytes and scales go, and the device dequantizes; merged experts are made here
                uploads += _sources(tensor) or [materialize(tensor)]
            self.uploader.upload(expert % 2, uploads)
            self.uploading[expert % 2] = expert

    def _load(self, expert: int) -> None:
        if self.state is None:
            self.state = {name: self._buffer(name, t.shape) for name, t in self.one.state_dict().items()}
            self.one.load_state_dict(self.state, strict=True, assign=True)
        if self.uploader is None:
            def copy(target, tensor):
                tensor = materialize(tensor)  # merged experts are Deferred
                target.copy_(tensor)
                release_pages(tensor)

            self._fill(self.state, expert, copy)
        else:
            self.prefetch(expert)
            uploaded = iter(self.uploader.take(expert % 2))

            def copy(target, tensor):
                if _sources(tensor):
                    target.copy_(tensor.compute(*(next(uploaded) for _ in tensor.sources)))
                else:
                    target.copy_(next(uploaded))

            self._fill(self.state, expert, copy)
            self.uploader.release(expert % 2)
            del self.uploading[expert % 2]
        self.buffers["loaded"] = (self.serial, expert)

    def _buffer(self, name: str, shape: torch.Size) -> torch.Tensor:
        key = (name, tuple(shape))
        if key not in self.buffers:
            self.buffers[key] = torch.empty(shape, device=self.device, dtype=self.dtype)
        return self.buffers[key]

    def every_token(self, x: torch.Tensor) -> torch.Tensor:
        """The loaded expert on every row of `x` [N, H], in sub-batches of `max_rows`."""
        if self.max_rows is None or x.shape[0] <= self.max_rows:
            return self._every_token(x)
        out = torch.empty_like(x)
        for start in range(0, x.shape[0], self.max_rows):
            out[start:start + self.max_rows] = self._every_token(x[start:start + self.max_rows])
        return out

    def _every_token(self, x: torch.Tensor) -> torch.Tensor:
        """The operations transformers' eager experts forward applies to the rows routed to an expert, on all
        rows, following the layout its experts class declares (`use_experts_implementation`: transposed or
        not, biases, the class's own `_apply_gate`). The eager forward would find the routed rows with
        `nonzero` and `where`, each a host sync; with every row routed with weight 1, its gathering, scaling
        and `index_add_` change no bit. llama4's class, without that declaration, is written out the same way."""
        one = self.one
        if self.spec.scaled_input_experts:  # Llama4TextExperts: gate-up [H, 2I], gate first; down [I, H]
            gate, up = (x @ one.gate_up_proj[0]).chunk(2, dim=-1)
            return self._down(up * one.act_fn(gate), one.down_proj[0], None, transposed=True)
        transposed, biased = self.down_layout()
        up = "gate_up_proj" if one.has_gate else "up_proj"
        weight = getattr(one, up)[0]
        h = x @ weight if transposed else F.linear(x, weight)
        h = h if not biased else h + getattr(one, f"{up}_bias")[0]
        h = one._apply_gate(h) if one.has_gate else one.act_fn(h)
        out = self._down(h, one.down_proj[0], one.down_proj_bias[0] if biased else None, transposed)
        return one.post_expert_norm(out) if getattr(one, "has_post_expert_norm", False) else out

    def _down(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
        """The down projection; its input is kept while `fit_calls` records (`RoutedCall`) or `sweep` is asked
        for it."""
        if self.fit_calls is not None or self.keep_down_inputs:
            self.down_inputs.append(h)
        out = h @ weight if transposed else F.linear(h, weight)
        return out if bias is None else out + bias

    def down_layout(self) -> tuple[bool, bool]:
        """(whether the down projection's weight is [I, H] rather than [H, I], whether it has a bias)."""
        if self.spec.scaled_input_experts:
            return True, False
        return getattr(self.one, "is_transposed", False), getattr(self.one, "has_bias", False)

    def record(self, expert: int, rows: torch.Tensor, gate: torch.Tensor | None) -> None:
        """After expert `expert` ran on `rows` of the block's input with router weights `gate`: what it was."""
        if self.fit_calls is not None:
            self.fit_calls.append(RoutedCall(expert, rows, gate, torch.cat(self.down_inputs)))
            self.down_inputs.clear()

    def output(self, expert: int, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Expert `expert` applied to every row of `x` [N, H] (which are the input's `rows`, if given)."""
        known = self.known.get(expert) if rows is not None else None
        recording = self.fit_calls is not None
        if known is None or (recording and known.down_inputs is None):
            return self._computed(expert, x)
        at = known.position[rows.cpu()]  # kept on the host: only the rows asked for move
        hit = at >= 0
        found, missed = (mask.nonzero().squeeze(-1).to(x.device) for mask in (hit, ~hit))

        def gathered(source: torch.Tensor) -> torch.Tensor:  # the known rows; the others are filled below
            rows_out = source.new_empty(len(at), source.shape[-1], device=x.device)
            rows_out[found] = source[at[hit]].to(x.device)
            return rows_out

        out = gathered(known.outputs)
        inputs = gathered(known.down_inputs) if recording else None
        if len(missed):
            out[missed] = self._computed(expert, x[missed])
            if recording:
                inputs[missed] = torch.cat(self.down_inputs)
                self.down_inputs.clear()
        if recording:
            self.down_inputs.append(inputs)
        return out

    def _computed(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        if self.buffers.get("loaded") != (self.serial, expert):  # the buffers are shared by the layers' streams
            self._load(expert)
        return self.every_token(x)

    def sweep(self, tokens: RoutedTokens, observe) -> list[torch.Tensor]:
        """Each expert loaded once and run on every chunk of `tokens`; `observe(expert, c, chunk, output,
        down_inputs)` sees each output on every token of chunk number `c`, and with `keep_down_inputs` its down
        projection's inputs there. Returns each chunk's routed output, summed in expert order over the
        routed rows only (an unrouted token's output, inf in float16, is never multiplied by its 0 gate).

        Nothing here waits for the device: the index lists come with the chunks, and the next expert's upload
        is queued after this one's compute, so the host copies it while the device computes."""
        combined = [torch.zeros_like(tokens[c].x) for c in range(len(tokens))]
        self.prefetch(0)
        for expert in range(len(self.experts)):
            self._load(expert)
            for c in range(len(tokens)):
                chunk = tokens[c]
                y = self.every_token(chunk.x)
                observe(expert, c, chunk, y, torch.cat(self.down_inputs) if self.keep_down_inputs else None)
                self.down_inputs.clear()
                rows, gate = chunk.rows[expert], chunk.gates[expert].unsqueeze(-1)
                if self.spec.scaled_input_experts:  # llama4 scales the chosen tokens' inputs, not the outputs
                    routed = self.every_token(chunk.x[rows] * gate.to(chunk.x.dtype))
                else:
                    routed = y[rows] * gate
                combined[c].index_add_(0, rows, routed.to(combined[c].dtype))
            if expert + 1 < len(self.experts):
                self.prefetch(expert + 1)
        return combined

    def forward_scaled(self, routed_in: torch.Tensor) -> torch.Tensor:
        """llama4: `routed_in` [E·N, H] holds every token once per expert, scaled by that expert's score (0 when
        not chosen, and an expert maps 0 to 0). Only the chosen rows run. Taped, the block's unscaled input
        and the router's top-k with its scores are kept; replayed, the sum comes back in the first expert's
        rows, which the block sums over the experts."""
        count = len(self.experts)
        routed = routed_in.view(count, -1, routed_in.shape[-1])
        out = torch.zeros_like(routed)
        scores = self.scores  # [N, E]: sigmoid of the top-k logits, 0 elsewhere
        if self.tape is not None:
            top_k_weights, top_k_index = scores.topk(self.top_k, dim=-1)
            self.tape.add(self.block_input.reshape(-1, routed_in.shape[-1]), top_k_index, top_k_weights)
        elif self.replay is not None:
            out[0] = next(self.replay)
        else:
            for expert in range(count):
                rows = (scores[:, expert] > 0).nonzero().squeeze(-1)
                if rows.numel():
                    out[expert, rows] = self.output(expert, routed[expert, rows]).to(out.dtype)
                    self.record(expert, rows, None)  # the score is inside the input
        return out.view(-1, routed_in.shape[-1])

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None) -> torch.Tensor:
        """Taped: kept, zeros returned; replayed: the next chunk's routed output; otherwise only the tokens
        routed to each expert run, as inference does."""
        if self.spec.scaled_input_experts:
            return self.forward_scaled(x)
        if self.tape is not None:
            self.tape.add(x, top_k_index, top_k_weights)
            return torch.zeros_like(x)
        if self.replay is not None:
            return next(self.replay)
        combined = torch.zeros_like(x)
        for expert in range(len(self.experts)):
            chosen = top_k_index == expert
            rows = chosen.any(-1).nonzero().squeeze(-1)
            if rows.numel():
                gate = (top_k_weights[rows] * chosen[rows]).sum(-1, keepdim=True)
                combined.index_add_(0, rows, (self.output(expert, x[rows], rows) * gate).to(combined.dtype))
                self.record(expert, rows, gate)
        return combined


@dataclass
class KnownRows:
    """An expert's outputs [n, H] and, for the fit, its down projection's inputs [n, I] on n rows of a block's
    input, computed by the statistics pass; `position` [N] maps each of the input's rows to its index there,
    -1 where the expert did not run on it."""

    position: torch.Tensor
    outputs: torch.Tensor
    down_inputs: torch.Tensor | None

    @classmethod
    def on(cls, count: int, rows: torch.Tensor, outputs: torch.Tensor, down_inputs: torch.Tensor | None):
        """Known on `rows` (host indices) of a `count`-row input."""
        position = torch.full((count,), -1, dtype=torch.long)
        position[rows] = torch.arange(len(rows))
        return cls(position, outputs, down_inputs)


@dataclass
class RoutedCall:
    """One expert's part of a block's inference forward: its `rows` of the block's input, their router weights
    `gate` [T, 1] (None where the router scales the input instead: llama4) and its down projection's input
    `inputs` [T, I]."""

    expert: int
    rows: torch.Tensor
    gate: torch.Tensor | None
    inputs: torch.Tensor


class _Recorder(nn.Module):
    """Stands in for decoder layer `index` in a meta copy of the model: records what the model passes it."""

    def __init__(self, index: int, original: nn.Module, calls: dict):
        super().__init__()
        self.index = index
        self.calls = calls
        for name, value in vars(original).items():  # attention_type, layer_type, ... that model loops read
            if not name.startswith("_") and isinstance(value, (str, int, float, bool, type(None))):
                setattr(self, name, value)

    def forward(self, hidden_states, *args, **kwargs):
        self.calls[self.index] = (args, kwargs)
        return hidden_states


class LayerRunner:
    """Builds layers on the meta device, fills them from tensors and runs them on `device`.

    Each layer's arguments (rotary embeddings, the causal, sliding, chunked or linear-attention mask of its
    type, positions) are those transformers' own model passes it: the whole model is built on meta with
    recording stand-ins for its layers and run once per input shape, so hybrid families need no code here.
    """

    def __init__(self, spec: ArchSpec, config, device: torch.device, dtype: torch.dtype):
        self.spec = spec
        self.config = runtime_config(config, spec.attn_implementation)
        self.device = device
        self.dtype = dtype
        self._context: dict[tuple[int, int], dict] = {}
        self._base = None
        self._expert_buffers: dict = {}  # shared by every layer this runner builds
        self.uploader = Uploader(device) if device.type == "cuda" else None

    def build(self, layer: int, tensors: dict[str, torch.Tensor], config=None) -> nn.Module:
        config = self.config if config is None else runtime_config(config, self.spec.attn_implementation)
        self._meta_model()
        return load_layer(self.spec, config, layer, tensors, self.device, self.dtype, self._expert_buffers,
                          self._kept_fp32, self.uploader)

    def embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Layer 0's input: the embedding lookup, scaled where the family scales it (granite)."""
        hidden = torch.nn.functional.embedding(ids, table)
        if self.spec.embedding_multiplier_key:
            hidden = hidden * getattr(self.config, self.spec.embedding_multiplier_key)
        return hidden

    def _meta_model(self) -> nn.Module:
        if self._base is None:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(self.config)
            base = model.model
            calls: dict = {}
            for name, child in list(base.named_children()):
                if name == "layers":
                    setattr(base, name, nn.ModuleList(_Recorder(i, l, calls) for i, l in enumerate(child)))
                elif "Rotary" in type(child).__name__:  # computed buffers: rebuilt for real
                    setattr(base, name, type(child)(config=self.config).to(self.device))
                elif name != "embed_tokens" and any(True for _ in child.parameters()):
                    self._norm = (name, child)
                    setattr(base, name, nn.Identity())  # the final norm: never reached by the layers
            base.calls = calls
            self._kept_fp32 = fp32_patterns(model, self.dtype)
            self._base = base
        return self._base

    def final_norm(self, reader) -> nn.Module:
        """The model's own final norm (RMSNorm, LayerNorm with bias, ...; `norm`, `final_layernorm` or
        `embedding_norm`), filled from the checkpoint."""
        self._meta_model()
        name, norm = self._norm
        prefix = f"{self.spec.prefix}{name}."
        names = [n for n in reader.weight_map if n.startswith(prefix)]
        if not names:
            raise CheckpointError(f"the checkpoint has no {prefix}weight (the final norm): it is incomplete")
        state = {n[len(prefix):]: t.to(device=self.device, dtype=self.dtype) for n, t in reader.read(names).items()}
        norm.load_state_dict(state, strict=True, assign=True)
        return norm.eval()

    @property
    def logits_scale(self) -> float:
        """What the family multiplies its logits by (granite divides them by logits_scaling)."""
        key = self.spec.logits_scaling_key
        return 1.0 / getattr(self.config, key) if key else 1.0

    @torch.no_grad()
    def context(self, batch: int, seqlen: int, layer: int) -> tuple[tuple, dict]:
        """The positional and keyword arguments the model passes layer `layer` for this input shape."""
        key = (batch, seqlen)
        if key not in self._context:
            base = self._meta_model()
            base.calls.clear()
            embeds = torch.zeros(batch, seqlen, self.config.hidden_size, device=self.device, dtype=self.dtype)
            base(inputs_embeds=embeds, use_cache=False)
            self._context[key] = dict(base.calls)
        return self._context[key][layer]

    @torch.no_grad()
    def forward(self, module: nn.Module, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        args, kwargs = self.context(hidden.shape[0], hidden.shape[1], layer)
        out = module(hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out
