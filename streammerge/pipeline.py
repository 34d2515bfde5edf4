"""The run: one loop over the layers, reading, measuring, merging and writing one layer at a time."""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from . import __version__
from .arch import GLOBAL_TENSORS, ArchSpec
from .calibration import DEFAULT_TEXT, HiddenStates, sample_windows
from .checkpoint import INDEX_NAME, CheckpointReader, save_json, save_shard, sha256_file
from .cluster import cluster_experts
from .errors import CheckpointError, InputError, Interrupted
from .journal import PROVENANCE, Journal
from .merge import member_weights, merge_tensors, router_rows
from .model import Model
from .runner import LayerRunner
from .statistics import ExpertStatistics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    ratio: float | None = None
    experts: int | None = None
    calib: Path = DEFAULT_TEXT
    samples: int = 32
    seqlen: int = 512
    batch: int = 4
    linkage: str = "average"
    metric: str = "euclidean"
    merge: str = "freq"
    router: str = "dominant"
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    restart: bool = False


def target_experts(num_experts: int, ratio: float | None, experts: int | None) -> int:
    """K = E - round(E * ratio) (the REAP convention), or K given directly."""
    if (ratio is None) == (experts is None):
        raise InputError("give exactly one of --ratio (fraction of experts removed) or --experts (experts kept)")
    if experts is not None:
        if not 1 <= experts <= num_experts:
            raise InputError(f"--experts {experts} is outside 1..{num_experts}: the model has {num_experts} experts per layer")
        return experts
    if not 0 < ratio < 1:
        raise InputError(f"--ratio {ratio} must be strictly between 0 and 1 (the fraction of experts removed, e.g. 0.5)")
    k = num_experts - round(num_experts * ratio)
    if k < 1:
        raise InputError(f"--ratio {ratio} would leave no expert of {num_experts}: use a smaller ratio")
    return k


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda was asked for but no CUDA device is visible: use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, weights_dtype: torch.dtype) -> torch.dtype:
    """`auto` computes in float32 on CPU (bf16 matmuls are slow on most CPUs), in the weights' dtype on GPU."""
    if name == "auto":
        return torch.float32 if device.type == "cpu" else weights_dtype
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


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
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device, self.model.weights_dtype)
        self.tokens = sample_windows(self.model.tokenizer(), options.calib, options.samples, options.seqlen, options.seed)
        self.chunks = [range(start, min(start + options.batch, options.samples))
                       for start in range(0, options.samples, options.batch)]
        self.total_shards = self.num_layers + 1
        self.journal = Journal(self.out_dir)
        self.runner = LayerRunner(self.spec, self.config, self.device, self.dtype)

    def signature_fields(self) -> dict:
        options = {k: str(v) for k, v in asdict(self.options).items() if k not in ("restart", "calib", "ratio", "experts")}
        return {
            "input": self.model.fingerprint,
            "experts_kept": self.k,
            **options,
            "device": self.device.type,
            "calibration_tokens": hashlib.sha256(self.tokens.numpy().tobytes()).hexdigest(),
            "versions": self.model.versions(),
        }

    def output_files(self) -> list[str]:
        copied = [p.name for p in self.model.extra_files()]
        shards = [shard_name(i, self.total_shards) for i in range(self.total_shards)]
        return [*shards, *copied, INDEX_NAME, "config.json", PROVENANCE, "README.md", "streammerge.log"]

    def hidden(self, layer: int) -> HiddenStates:
        return HiddenStates(self.journal.work_dir, layer, len(self.chunks))

    def embed(self) -> None:
        """Layer 0's inputs: the embedding lookup of the calibration tokens."""
        table = self.model.reader.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
        store = self.hidden(0)
        for c, rows in enumerate(self.chunks):
            ids = self.tokens[rows.start:rows.stop]
            store.write(c, torch.nn.functional.embedding(ids, table).to(self.dtype))

    def process(self, layer: int) -> dict:
        names = self.model.layer_names(layer)
        tensors = self.model.reader.read(names)
        module = self.runner.build(layer, tensors)
        source, target = self.hidden(layer), self.hidden(layer + 1)
        record = {"layer": layer, "shard": shard_name(layer, self.total_shards)}
        if layer in self.moe_layers:
            stats = self.measure(layer, module, source, target)
            out, summary = self.compress(layer, tensors, stats)
            record.update(summary)
        else:
            for c in range(len(self.chunks)):
                target.write(c, self.runner.forward(module, layer, source.read(c, self.device)))
            out = dict(tensors)
        del module
        path = self.out_dir / record["shard"]
        save_shard(path, out)
        record["bytes"] = path.stat().st_size
        record["sha256"] = sha256_file(path)
        record["tensors"] = sorted(out)
        record["tensor_bytes"] = sum(t.numel() * t.element_size() for t in out.values())
        return record

    @torch.no_grad()
    def measure(self, layer: int, module, source: HiddenStates, target: HiddenStates) -> ExpertStatistics:
        """One pass over the chunks: the layer's outputs for the next layer, and the expert statistics."""
        stats = ExpertStatistics(self.num_experts, self.config.hidden_size)

        def observe(expert, x, y, top_k_index, top_k_weights):
            if expert == 0:
                stats.add_routing(top_k_index)
            stats.add_expert(expert, y, top_k_index, top_k_weights)

        module.mlp.experts.observer = observe
        for c in tqdm(range(len(self.chunks)), desc=f"layer {layer} statistics", leave=False, disable=None):
            target.write(c, self.runner.forward(module, layer, source.read(c, self.device)))
        module.mlp.experts.observer = None
        return stats

    def compress(self, layer: int, tensors: dict, stats: ExpertStatistics) -> tuple[dict, dict]:
        """The layer's output tensors, under the input's names, with K merged experts."""
        opts = self.options
        clusters = cluster_experts(stats.mean_output.numpy(), self.k, opts.linkage, opts.metric)
        frequencies = stats.frequencies
        spec = self.spec
        routed = {spec.router_name(layer)} | {n for e in range(self.num_experts) for n in spec.expert_names(layer, e)}
        out = {name: t for name, t in tensors.items() if name not in routed}
        out[spec.router_name(layer)] = router_rows(tensors[spec.router_name(layer)], clusters, frequencies, opts.router)
        for k, members in enumerate(clusters):
            weights = member_weights(members, frequencies, opts.merge)
            for projection in spec.projections:
                sources = [tensors[spec.expert_name(layer, e, projection)] for e in members]
                out[spec.expert_name(layer, k, projection)] = merge_tensors(sources, weights)
        summary = {
            "clusters": clusters,
            "frequencies": [round(f, 6) for f in frequencies.tolist()],
            "tokens": stats.tokens,
        }
        return out, summary

    def finalize(self, records: list[dict], started: float) -> dict:
        """Write the non-layer shard, copies, provenance and card, then the index and config last."""
        reader = self.model.reader
        globals_shard = shard_name(self.num_layers, self.total_shards)
        global_names = [n for n in GLOBAL_TENSORS if n in reader.weight_map]
        save_shard(self.out_dir / globals_shard, reader.read(global_names))
        for path in self.model.extra_files():
            shutil.copyfile(path, self.out_dir / path.name)
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
            "options": {k: str(v) for k, v in asdict(self.options).items() if k != "restart"},
            "signature": fields["signature"],
            "fields": fields["fields"],
            "files": fields["files"],
            "layers": [{k: r[k] for k in ("layer", "clusters", "frequencies") if k in r} for r in records],
        }
        save_json(self.out_dir / PROVENANCE, provenance)
        (self.out_dir / "README.md").write_text(self.model_card(provenance))
        save_json(self.out_dir / INDEX_NAME, {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))})
        save_json(self.out_dir / "config.json", self.model.reduced_config_dict(self.k))
        self.journal.close()
        return self.summary(started)

    def model_card(self, provenance: dict) -> str:
        o = self.options
        return (
            f"# {self.model.name}, {self.num_experts}→{self.k} experts (streammerge)\n\n"
            f"This checkpoint is **{self.model.name}** ({self.spec.family}) with the routed experts of every MoE layer "
            f"merged from {self.num_experts} to {self.k} by "
            f"[streammerge](https://pypi.org/project/streammerge/) {__version__}, without retraining: HC-SMoE "
            f"({o.linkage}-linkage clustering of the experts' mean outputs, {o.metric} distance), `{o.merge}` weight "
            f"averaging inside each cluster, router row `{o.router}`. Calibration: {o.samples} × {o.seqlen} tokens "
            f"from `{Path(o.calib).name}`, seed {o.seed}. Everything outside the routed experts is unchanged.\n\n"
            f"It loads with plain `AutoModelForCausalLM.from_pretrained`. Per-layer clusters and usage frequencies "
            f"are in `{PROVENANCE}`. Quality is not guaranteed: measure it on your task "
            f"(`streammerge eval`).\n"
        )

    def summary(self, started: float) -> dict:
        before = self.model.reader
        after = CheckpointReader(self.out_dir)
        return {
            "experts": f"{self.num_experts} -> {self.k} per MoE layer ({len(self.moe_layers)} layers)",
            "parameters": (before.num_parameters(), after.num_parameters()),
            "bytes": (before.nbytes(before.names()), after.nbytes(after.names())),
            "seconds": round(time.monotonic() - started, 1),
            "peak_weight_bytes": before.peak_live_bytes,
        }


def run(model_dir: Path, out_dir: Path, options: RunOptions) -> dict:
    started = time.monotonic()
    state = Run(model_dir, out_dir, options)
    status = state.journal.open(state.signature_fields(), state.output_files(), state.num_layers, options.restart)
    if status == "complete":
        log.info("%s already holds this run's complete output; nothing to do", out_dir)
        return state.summary(started)
    handler = logging.FileHandler(state.out_dir / "streammerge.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.getLogger("streammerge").addHandler(handler)
    try:
        return _loop(state, started)
    finally:
        logging.getLogger("streammerge").removeHandler(handler)
        handler.close()


def _loop(state: Run, started: float) -> dict:
    records = state.journal.finished(state.num_layers)
    first = len(records)
    if first:
        log.info("resuming after layer %d of %d", first - 1, state.num_layers)
    if first == 0 or not state.hidden(first).complete():
        if first:
            raise CheckpointError(f"the work directory lost the hidden states of layer {first}: re-run with --restart")
        state.embed()
    layer = first
    try:
        for layer in tqdm(range(first, state.num_layers), desc="layers", initial=first,
                          total=state.num_layers, disable=None):
            record = state.process(layer)
            state.journal.commit(record)
            state.hidden(layer).remove()
            records.append(record)
            if "clusters" in record:
                log.info("layer %d: %d -> %d experts, clusters %s", layer, state.num_experts, state.k, record["clusters"])
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted during layer {layer}; finished layers are saved: re-run the same command to resume"
        ) from None
    return state.finalize(records, started)
