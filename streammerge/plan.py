"""`streammerge plan`: what a run will cost, from config.json and safetensors headers alone (no weights read).

Everything is derived from a tensor table {on-disk name: (dtype, shape)}: the checkpoint's headers, or, for a
directory holding only config.json, the shapes transformers' own layer classes give for that config.
`estimate` is a pure function of that table, so it can be unit-tested and compared with measured peaks.

Notation: c = bytes per element of the compute dtype, N = batch × seqlen tokens of one chunk, T = samples × seqlen
calibration tokens, H = hidden size, E = routed experts, K = experts kept, I = one expert's intermediate size,
S = SAMPLED_TOKENS_PER_CHUNK.

Device peak. A layer's non-expert weights stay on the device while the routed experts go through it one at a
time (runner.ExpertStream), each once over every chunk, so only the "routing" term grows with E, by
O(E·(H + N + S·chunks·H)), never by expert weights:
  non-expert weights  the largest layer's attention, norms and shared experts (a dense layer: all of it), × c
  one expert          the largest routed expert's gate, up and down projections, × c
  uploads             on CUDA, two experts' parts in the weights' dtype w: the next expert uploads while this
                      one computes (runner.Uploader)
  hidden states       the chunk's input and the layer's output, 2·N·H·c
  routed tokens       every chunk's MoE inputs, T·H·c, and its top-k routing with the index lists made from it,
                      T·k·24 (routed.RoutedTokens); in pinned host memory instead when the device lacks the
                      room (`placement`)
  routed outputs      every chunk's routed output, summed expert by expert, T·H·c
  scored block        the MoE block's input and output on the last chunk, kept to score the compressed
                      candidates, 2·N·H·c
  working set         the larger of two stages that never overlap:
                      attention: normed input, q, k and v (GQA expanded to every head) and the attention output,
                      N·(H + 4·heads·head_dim)·c; sdpa never materializes the scores, eager (the family's own
                      choice, gpt-oss) adds batch·heads·seqlen² scores in c plus their float32 softmax;
                      experts: one expert call's gate/up output [N, 2I], the activation [N, I] and its
                      product with up [N, I], 4·N·I·c (checked against a traced run in tests/test_plan.py); its
                      output and the routed rows' copies after it, N·H·(1 + 2k/E)·c, are smaller in every
                      family. Sub-batching an expert call over fewer tokens shrinks it (`placement`);
                      output fit (--fit lsq), after the statistics: on F = min(FIT_TOKENS, T/2, the fitted
                      chunks' tokens) routed top-k' times among K experts, the kept experts' down-projection inputs and
                      the residual with its float64 copy, 4·F·(k'·(I + 1) + 2H); the joint system of side
                      S = min(F, K·(I + 1)) and its factor, the solutions of two ridges and, in input space, the
                      stacked inputs, 8·(2·S² + 2·S·H + F·S) (streammerge.fit), beside the experts' working set
                      of its forward
  routing             the router, E·H·c; its logits and probabilities in float32, N·E·8; and every expert's
                      output on the S sampled tokens of every chunk, E·S·chunks·H·c
  CUDA context        CUDA_CONTEXT_BYTES (driver, kernels, allocator slack), on CUDA only
Host peak (RSS):
  baseline            HOST_BASELINE_BYTES: interpreter, torch and transformers imported
  reading             one expert's memory-mapped pages in the weights' dtype w, while it is copied to the device;
                      a layer's pages leave RSS as soon as they are used (checkpoint.release_pages). On CPU they
                      are gone before that expert runs, so they count in the working set's maximum instead
  pinned staging      on CUDA, the uploads' two pinned host copies of an expert, in w, allocated once
  saving              the previous layer's shard is written meanwhile, one tensor at a time: a merged expert
                      projection, or for fused layouts the K kept experts stacked, in w (one expert: I·3H·w)
  hidden states       one chunk read from disk and one chunk written, 2·N·H·c
  scored outputs      every expert's output on the scored tokens (about SCORED_TOKENS of the last chunk's N, every
                      ⌊N / SCORED_TOKENS⌋-th), E·rows·H·c, from which pruned candidates are scored without
                      running experts again; with the fit also their down-projection inputs, E·rows·I·c
  statistics          E×H float64 output sums, the E×E token distances, and the S sampled MoE inputs of every
                      chunk in float32 (for router fitting)
  fit                 --fit lsq: the MoE block's inputs and outputs on the F fitted tokens, 2·F·H·c, and the
                      outputs and down-projection inputs of the k experts each was routed to, F·k·(I + H)·c (not
                      llama4's); the chosen candidate's K fitted down projections, K·I·H·w, and while one is made,
                      its float32 copy and change, 2·I·H·4
  on CPU also every device term but the CUDA context: there the device is the host.
Disk: the output checkpoint, plus three layers' sets of hidden states, T·H·c each (the input set of layer l is
removed when l is committed, which happens in the background while layer l+1 writes the set for l+2), plus
DISK_MARGIN of both for headers, journal and log.
Work per layer: the statistics pass applies every 2-D weight to every token (attention, router, shared experts and
all E experts on all T tokens: 2·T·numel FLOPs; the layer's output is summed from those same expert outputs), plus
the attention scores QKᵀ and AV over full seqlen² windows, 4·T·seqlen·heads·head_dim (kernels that skip the causal
half do less); the layer then runs again without its experts for its outputs (`Run.measure`), which adds the
non-expert matrices and the scores once more. --propagate merged adds a pass of the compressed layer with only the
routed top-k experts per token. --fit lsq adds, per candidate (three with --method auto), the compressed block's
experts on the F fitted and the scored tokens where the statistics pass did not already run them (a kept expert
on the fitted tokens the model routed to it, about K/E of those the compressed router sends it), the joint
system (the K experts' t x t Grams, t = F·k'/K, or the stacked inputs' Gram), its factorization and solve for
each ridge of RIDGES, and the changes (streammerge.fit).
Scoring candidates on one chunk is left out. Bytes read: the layer's tensors and its input hidden states; written:
its output shard and the next layer's hidden states.
Time: the whole run's FLOPs at the rate of square matmuls in the compute dtype, timed on this machine's device
for MATMUL_SECONDS; none when the planned device is not here. Disk and element-wise work come on top.
"""

from __future__ import annotations

import math
import shutil
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path

import psutil
import torch

from .arch import LAYER_PREFIX, ArchSpec
from .compress import FIT_TOKENS, SCORED_TOKENS, fitted_chunks
from .device import resolve_dtype
from .errors import InputError, InsufficientResourcesError
from .fit import RIDGES
from .model import WEIGHT_SUFFIXES, Model, open_config
from .options import RunOptions, check_options, target_experts
from .routed import Placement
from .statistics import SAMPLED_TOKENS_PER_CHUNK
from .units import human_bytes, human_flops, human_seconds

HOST_BASELINE_BYTES = 500_000_000
CUDA_CONTEXT_BYTES = 500_000_000
DISK_MARGIN = 0.05
FLOAT32_BYTES = 4
FLOAT64_BYTES = 8
EXPERT_ACTIVATIONS = 4  # gate/up output (2·I), the activation (I) and its product with up (I), per token
ROUTING_BYTES_PER_CHOICE = 24  # top-k index (int64) and weight (float32); its index list row (int64) and gate
MATMUL_SECONDS = 0.25

TensorTable = dict[str, tuple[torch.dtype, tuple[int, ...]]]


@dataclass(frozen=True)
class Work:
    flops: int
    bytes_read: int
    bytes_written: int

    def __add__(self, other: "Work") -> "Work":
        return Work(self.flops + other.flops, self.bytes_read + other.bytes_read,
                    self.bytes_written + other.bytes_written)


@dataclass(frozen=True)
class Plan:
    family: str
    model_type: str
    layers: int
    moe_layers: int
    experts_before: int
    experts_after: int
    top_k_before: int
    top_k_after: int
    parameters_before: int
    parameters_after: int
    input_bytes: int
    output_bytes: int
    weights_dtype: str
    compute_dtype: str
    device: str
    samples: int
    seqlen: int
    batch: int
    device_memory: dict[str, int]  # component -> bytes, as in the module docstring
    host_memory: dict[str, int]
    disk: dict[str, int]
    largest_layer: Work
    whole_run: Work
    expert_bytes_per_token: int = 0  # of the experts' working set: what sub-batching an expert call saves
    chunk_tokens: int = 0
    fit_bound: bool = False  # the output fit's stage is the working set's largest
    source: str = "checkpoint headers"
    matmul_rate: float | None = None  # FLOP/s timed on this machine's planned device, if it has one

    @property
    def compute_seconds(self) -> float | None:
        return self.whole_run.flops / self.matmul_rate if self.matmul_rate else None

    @property
    def device_peak(self) -> int:
        return sum(self.device_memory.values())

    @property
    def host_peak(self) -> int:
        return sum(self.host_memory.values())

    @property
    def disk_needed(self) -> int:
        return sum(self.disk.values())

    def as_dict(self) -> dict:
        return {**asdict(self), "device_peak": self.device_peak, "host_peak": self.host_peak,
                "disk_needed": self.disk_needed, "compute_seconds": self.compute_seconds}


def _bytes(entry: tuple[torch.dtype, tuple[int, ...]]) -> int:
    return entry[0].itemsize * math.prod(entry[1])


def _numel(tensors: TensorTable, names) -> int:
    return sum(math.prod(tensors[n][1]) for n in names)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _by_layer(tensors: TensorTable, stem: str = LAYER_PREFIX.split("{")[0]) -> dict[int, list[str]]:
    layers: dict[int, list[str]] = defaultdict(list)
    for name in tensors:
        if name.startswith(stem):
            layers[int(name[len(stem):].split(".")[0])].append(name)
    return layers


def compressed_tensors(spec: ArchSpec, config, tensors: TensorTable, k: int) -> TensorTable:
    """The output's tensor table: in every MoE layer, experts 0..K-1 and a router of K rows."""
    experts = spec.num_experts(config)
    out = dict(tensors)
    for layer in spec.moe_layers(config):
        routed = spec.routed_names(layer, experts)
        for name in routed:
            del out[name]
        out.update(spec.compressed_table(layer, {n: tensors[n] for n in routed}, experts, k))
    return out


def estimate(spec: ArchSpec, config, tensors: TensorTable, options: RunOptions, device: str,
             attention: str | None = None) -> Plan:
    """The plan of `streammerge run` with `options` on a checkpoint with these tensors, computing on `device`
    ("cuda" or "cpu"); `attention` is the layer's attention implementation, by default the family's own
    (the runner's)."""
    attention = attention or spec.attn_implementation
    experts = spec.num_experts(config)
    k = target_experts(experts, options.ratio, options.experts)
    spec.check_experts_kept(config, k)  # group-limited routing, as run refuses it
    moe_layers = set(spec.moe_layers(config))
    weights_dtype = tensors[spec.embed_name][0]
    compute = resolve_dtype(options.dtype, torch.device(device), weights_dtype)
    c = compute.itemsize
    hidden = config.hidden_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    tokens = options.samples * options.seqlen
    chunk = min(options.batch, options.samples) * options.seqlen
    hidden_set = tokens * hidden * c

    output = compressed_tensors(spec, config, tensors, k)
    stem = spec.layer_prefix(0)[:-2]  # "model.layers." (VLMs: "model.language_model.layers.")
    output_names = _by_layer(output, stem)
    top_k_after = min(spec.top_k(config), k)
    scores_flops = 4 * tokens * options.seqlen * heads * head_dim
    chunks = math.ceil(options.samples / options.batch)
    fitted_tokens = sum(min(options.batch, options.samples - c * options.batch) for c in fitted_chunks(chunks))
    fit_tokens = min(FIT_TOKENS, tokens // 2, fitted_tokens * options.seqlen) if options.fit != "none" else 0
    expert_tokens = math.ceil(fit_tokens * top_k_after / k)  # one kept expert's, on average
    candidates = 3 if options.method == "auto" else 1
    non_expert = one_expert = intermediate = router = 0
    largest = total = Work(0, 0, 0)
    for layer, names in _by_layer(tensors, stem).items():
        routed = set()
        if layer in moe_layers:
            routed = spec.routed_names(layer, experts)
            expert_numel, expert_intermediate = spec.expert_size(tensors, layer, hidden)
            one_expert = max(one_expert, expert_numel)
            intermediate = max(intermediate, expert_intermediate)
            router = max(router, _numel(tensors, [spec.router_name(layer)]))
        non_expert_numel = _numel(tensors, [n for n in names if n not in routed])
        non_expert = max(non_expert, non_expert_numel)
        matrices = _numel(tensors, [n for n in names if len(tensors[n][1]) == 2])
        flops = 2 * tokens * matrices + scores_flops
        if layer in moe_layers:  # the second run for the outputs, with the experts' sums replayed
            flops += 2 * tokens * _numel(tensors, [n for n in names if n not in routed and len(tensors[n][1]) == 2])
            flops += scores_flops
        if layer in moe_layers and options.propagate == "merged":
            routed_matrices = matrices - (experts - top_k_after) * expert_numel
            flops += 2 * tokens * routed_matrices + scores_flops
        if layer in moe_layers and fit_tokens:
            unknowns = k * (expert_intermediate + 1)
            system = min(fit_tokens, unknowns)  # token space (F x F) or input space (K·I x K·I)
            build = (k * 2 * expert_tokens ** 2 * expert_intermediate if fit_tokens < unknowns
                     else 2 * fit_tokens * unknowns ** 2)
            # the experts where the statistics pass did not already run them: on about K/E of a kept expert's
            # fitted rows the model routed it itself
            flops += candidates * (2 * (fit_tokens * (experts - k) // experts + SCORED_TOKENS) * top_k_after
                                   * expert_numel
                                   + build + len(RIDGES) * (system ** 3 // 3 + 2 * system ** 2 * hidden)
                                   + k * 2 * expert_tokens * expert_intermediate * hidden)  # the changes
        work = Work(flops=flops,
                    bytes_read=sum(_bytes(tensors[n]) for n in names) + hidden_set,
                    bytes_written=sum(_bytes(output[n]) for n in output_names[layer]) + hidden_set)
        largest = max(largest, work, key=lambda w: (w.flops, w.bytes_read))
        total += work
    global_bytes = sum(_bytes(tensors[n]) for n in spec.global_tensors if n in tensors)
    total += Work(0, global_bytes + _bytes(tensors[spec.embed_name]), global_bytes + hidden_set)

    attention_set = chunk * (hidden + 4 * heads * head_dim) * c
    if attention == "eager":
        attention_set += min(options.batch, options.samples) * heads * options.seqlen ** 2 * (c + FLOAT32_BYTES)
    top_k = spec.top_k(config)
    experts_set = chunk * EXPERT_ACTIVATIONS * intermediate * c
    system = min(fit_tokens, k * (intermediate + 1))
    fit_set = (experts_set + FLOAT32_BYTES * fit_tokens * (top_k_after * (intermediate + 1) + 2 * hidden)
               + FLOAT64_BYTES * (2 * system ** 2 + 2 * system * hidden + fit_tokens * system))
    device_memory = {
        "non-expert weights": non_expert * c,
        "one expert": one_expert * c,
        "hidden states": 2 * chunk * hidden * c,
        "routed tokens": tokens * hidden * c + tokens * top_k * ROUTING_BYTES_PER_CHOICE,
        "routed outputs": tokens * hidden * c,
        "scored block": 2 * chunk * hidden * c,
        "working set": max(attention_set, experts_set, fit_set if fit_tokens else 0),
        "routing": router * c + chunk * experts * 2 * FLOAT32_BYTES
        + experts * SAMPLED_TOKENS_PER_CHUNK * chunks * hidden * c,
    }
    host_memory = {
        "baseline": HOST_BASELINE_BYTES,
        "saving": one_expert * weights_dtype.itemsize * (k if spec.fused else 1),
        "hidden states": 2 * chunk * hidden * c,
        "scored outputs": experts * math.ceil(chunk / max(1, chunk // SCORED_TOKENS)) * c
        * (hidden + (intermediate if fit_tokens else 0)),
        "statistics": (experts * hidden + experts * experts) * FLOAT64_BYTES
        + chunks * SAMPLED_TOKENS_PER_CHUNK * hidden * FLOAT32_BYTES,
    }
    if fit_tokens:  # the fitted rows' block inputs and outputs, and their routed experts' outputs and down-
        # projection inputs; the chosen candidate's fitted projections, and while one is made, its float32 copy
        # and change
        # llama4 keeps none: its block scales the experts' inputs, the statistics pass does not
        known = 0 if spec.scaled_input_experts else fit_tokens * top_k * (intermediate + hidden) * c
        host_memory["fit"] = (2 * fit_tokens * hidden * c + known
                              + k * intermediate * hidden * weights_dtype.itemsize
                              + 2 * intermediate * hidden * FLOAT32_BYTES)
    reading = one_expert * weights_dtype.itemsize
    if device == "cpu":
        device_memory["working set"] = max(device_memory["working set"], reading)
        host_memory.update({f"device: {name}": n for name, n in device_memory.items()})
    else:
        host_memory["reading"] = reading
        host_memory["pinned staging"] = 2 * reading
        device_memory["uploads"] = 2 * reading
        device_memory["CUDA context"] = CUDA_CONTEXT_BYTES
    output_bytes = sum(_bytes(entry) for entry in output.values())
    disk = {"output": output_bytes, "hidden states": 3 * hidden_set,
            "margin": round(DISK_MARGIN * (output_bytes + 3 * hidden_set))}
    return Plan(
        family=spec.family, model_type=spec.model_type,
        layers=config.num_hidden_layers, moe_layers=len(moe_layers),
        experts_before=experts, experts_after=k,
        top_k_before=spec.top_k(config), top_k_after=top_k_after,
        parameters_before=sum(math.prod(shape) for _, shape in tensors.values()),
        parameters_after=sum(math.prod(shape) for _, shape in output.values()),
        input_bytes=sum(_bytes(entry) for entry in tensors.values()), output_bytes=output_bytes,
        weights_dtype=_dtype_name(weights_dtype), compute_dtype=_dtype_name(compute), device=device,
        samples=options.samples, seqlen=options.seqlen, batch=options.batch,
        device_memory=device_memory, host_memory=host_memory, disk=disk,
        largest_layer=largest, whole_run=total,
        expert_bytes_per_token=EXPERT_ACTIVATIONS * intermediate * c, chunk_tokens=chunk,
        fit_bound=bool(fit_tokens) and fit_set > max(attention_set, experts_set),
    )


def config_tensors(spec: ArchSpec, config, dtype: torch.dtype) -> TensorTable:
    """On-disk names and shapes of a `config` checkpoint as save_pretrained writes it, without any weights.

    Each layer is built on the meta device from transformers' own class; its in-memory state, with the experts
    fused into gate_up_proj [E, 2I, H] and down_proj [E, H, I], is split back into the on-disk names
    (ArchSpec.on_disk_table: per-expert, or fused for granitemoe/gpt-oss), which runner.split_layer reads.
    """
    hidden, vocab = config.hidden_size, config.vocab_size
    shapes = {spec.embed_name: (vocab, hidden)}
    for layer in range(config.num_hidden_layers):
        with torch.device("meta"):
            module = spec.layer_class_for(config, layer)(config, layer)
        memory = {key: (dtype, tuple(t.shape)) for key, t in module.state_dict().items()}
        shapes.update({name: shape for name, (_, shape) in spec.on_disk_table(layer, memory).items()})
    embed, norm, head = spec.global_tensors[:3]
    norms = [n for n in spec.global_tensors if n not in (embed, head)]
    if any(n.endswith("norm.weight") for n in spec.extra_globals):  # jamba, lfm2: their own final norm's name
        norms.remove(norm)
    shapes.update({name: (hidden,) for name in norms})  # lm_head below
    if not getattr(config, "tie_word_embeddings", False):
        shapes[spec.lm_head] = (vocab, hidden)
    return {name: (dtype, shape) for name, shape in shapes.items()}


def planned_device(name: str) -> str:
    """The device type a run with `--device name` computes on. Unlike the run, CUDA need not be present here,
    so a plan for a GPU machine can be made anywhere."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(name).type
    except RuntimeError as exc:
        raise InputError(f"--device {name} is not a device: use auto, cpu, cuda or cuda:N") from exc


def config_dtype(raw_config: dict) -> torch.dtype:
    """The weights' dtype a bare config declares (`torch_dtype`, `dtype` in transformers 5), bfloat16 otherwise."""
    name = raw_config.get("torch_dtype") or raw_config.get("dtype")
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.bfloat16


def _config_only(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and not any(
        p.name.endswith(WEIGHT_SUFFIXES) for p in model_dir.iterdir())


@cache
def matmul_rate(device: str, dtype: torch.dtype) -> float | None:
    """FLOP/s of square matmuls in `dtype` on this machine's `device`, or None when it has no such device."""
    if device == "cuda" and not torch.cuda.is_available():
        return None
    n = 4096 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty_like(a)
    torch.matmul(a, a, out=out)  # warm-up: kernel choice, thread pool
    if device == "cuda":
        torch.cuda.synchronize()
    repeats, started = 0, time.perf_counter()
    while repeats < 3 or time.perf_counter() - started < MATMUL_SECONDS:
        torch.matmul(a, a, out=out)
        repeats += 1
        if device == "cuda":
            torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - started)


def plan_model(model_dir: Path, options: RunOptions) -> Plan:
    """The plan for MODEL_DIR: from its safetensors headers, or from config.json alone when it has no weights,
    with the compute time at the matmul rate of this machine's planned device."""
    check_options(options)
    model_dir = Path(model_dir)
    device = planned_device(options.device)
    if not _config_only(model_dir):
        model = Model.open(model_dir)
        plan = estimate(model.spec, model.config, model.tensor_table, options, device)  # FP8 read dequantized
    else:
        raw_config, config, spec = open_config(model_dir)
        dtype = config_dtype(raw_config)
        plan = replace(estimate(spec, config, config_tensors(spec, config, dtype), options, device),
                       source=f"config.json alone (no weights: shapes from the config, {_dtype_name(dtype)} assumed)")
    return replace(plan, matmul_rate=matmul_rate(device, getattr(torch, plan.compute_dtype)))


def _parts(components: dict[str, int]) -> str:
    return ", ".join(f"{name} {human_bytes(n)}" for name, n in components.items())


def describe(plan: Plan) -> str:
    """The plan as the CLI prints it."""
    dense = plan.layers - plan.moe_layers
    return "\n".join([
        f"{plan.family} ({plan.model_type}), from {plan.source}",
        f"  layers        {plan.layers} ({plan.moe_layers} MoE, {dense} dense)",
        f"  experts       {plan.experts_before} -> {plan.experts_after} per MoE layer, "
        f"top-k {plan.top_k_before} -> {plan.top_k_after}",
        f"  parameters    {plan.parameters_before:,} -> {plan.parameters_after:,} "
        f"({plan.parameters_after / plan.parameters_before:.1%})",
        f"  size          {human_bytes(plan.input_bytes)} -> {human_bytes(plan.output_bytes)} ({plan.weights_dtype} weights)",
        f"  calibration   {plan.samples} x {plan.seqlen} tokens in chunks of {plan.batch} windows; "
        f"compute on {plan.device} in {plan.compute_dtype}",
        f"  device peak   {human_bytes(plan.device_peak)}: {_parts(plan.device_memory)}"
        + (" (host RAM: within the host peak)" if plan.device == "cpu" else ""),
        f"  host peak     {human_bytes(plan.host_peak)}: {_parts(plan.host_memory)}",
        f"  disk          {human_bytes(plan.disk_needed)}: {_parts(plan.disk)}",
        f"  largest layer {human_flops(plan.largest_layer.flops)}, read {human_bytes(plan.largest_layer.bytes_read)}, "
        f"write {human_bytes(plan.largest_layer.bytes_written)}",
        f"  whole run     {human_flops(plan.whole_run.flops)}, read {human_bytes(plan.whole_run.bytes_read)}, "
        f"write {human_bytes(plan.whole_run.bytes_written)}",
        f"  time          {_time(plan)}",
    ])


def _time(plan: Plan) -> str:
    if plan.compute_seconds is None:
        return f"no estimate: this machine has no {plan.device} device to time matmuls on (plan on the machine that runs it)"
    return (f"at least {human_seconds(plan.compute_seconds)}: the whole run's FLOPs at {plan.matmul_rate / 1e9:,.0f} "
            f"GFLOP/s, the {plan.compute_dtype} matmul rate timed here on {plan.device}; reading and writing add to it")


MIN_EXPERT_ROWS = 256  # tokens per expert call below which the matmuls would waste the device


def placement(plan: Plan, free: int) -> Placement | None:
    """The placement that fits `free` device bytes: all of the plan; else the routed tokens in pinned host memory
    (each expert then copies each chunk in); else also expert calls sub-batched; None when even that fails."""
    if free >= plan.device_peak:
        return Placement()
    peak = plan.device_peak - plan.device_memory["routed tokens"]
    experts_set = plan.chunk_tokens * plan.expert_bytes_per_token
    if free >= peak:
        return Placement(tokens_on_device=False)
    if plan.device_memory["working set"] > experts_set:  # attention is the larger stage: sub-batching cannot help
        return None
    rows = (free - (peak - experts_set)) // plan.expert_bytes_per_token
    return Placement(False, rows) if rows >= MIN_EXPERT_ROWS else None


def preflight(plan: Plan, out_dir: Path, reused: int, device: torch.device | None = None) -> Placement:
    """Refuse to start when disk, RAM or device memory is short, with the numbers, before any heavy work; the
    placement that fits the memory free on `device` (the one the user named, e.g. cuda:1).

    `reused`: bytes of the files an earlier run left in out_dir (its shards, hidden states and copies), which
    a resume builds on and --restart deletes first; they count as free.
    """
    out_dir = Path(out_dir)
    existing = next(p for p in (out_dir, *out_dir.resolve().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    needed = plan.disk_needed - reused
    if free < needed:
        raise InsufficientResourcesError(
            f"not enough disk on {existing}: the run needs {human_bytes(needed)} more ({_parts(plan.disk)}), {human_bytes(free)} "
            f"free: free space or choose an out_dir on another disk"
        )
    available = psutil.virtual_memory().available
    if available < plan.host_peak:
        raise InsufficientResourcesError(
            f"not enough RAM: the run needs about {human_bytes(plan.host_peak)} ({_parts(plan.host_memory)}), "
            f"{human_bytes(available)} available: close other programs, or lower --batch or --seqlen"
        )
    if plan.device != "cuda":
        return Placement()
    free_device, _ = torch.cuda.mem_get_info(device)
    fits = placement(plan, free_device)
    if fits is None:
        raise InsufficientResourcesError(
            f"not enough GPU memory on {device}: the run needs about {human_bytes(plan.device_peak)} "
            f"({_parts(plan.device_memory)}), {human_bytes(free_device)} free: lower --batch or --seqlen"
            f"{', or --samples or --fit none (the output fit sets the working set)' if plan.fit_bound else ''}, "
            f"or use --device cpu"
        )
    return fits
