"""The run: one loop over the layers, reading, measuring, merging and writing one layer at a time."""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import shutil
import threading
import time
from collections import Counter
from concurrent.futures import Future
from functools import partial
from pathlib import Path

import torch
from huggingface_hub import ModelCardData
from tqdm import tqdm

from . import __version__
from .arch import ArchSpec
from .calibration import HiddenStates, sample_windows
from .checkpoint import (INDEX_NAME, CheckpointReader, atomic_write, drop_cached, io_thread, materialize, publish,
                         read_shard, sampled_digest, save_json, save_shard, save_text, stage_shard, staged_path)
from .compress import Held, HeldTokens, LayerCompression, fit_rows, fitted_chunks, scored_rows
from .device import deterministic, device_fields, out_of_memory, resolve_device, resolve_dtype
from .errors import CheckpointError, InputError, Interrupted
from .evaluate import perplexity
from .journal import PROVENANCE, Journal, refuse_inside_input, source_digest
from .model import Model
from .options import RunOptions, check_options, target_experts
from .routed import Placement, RoutedTokens
from .runner import KnownRows, LayerRunner, reduced_config
from .plan import estimate, planned_device, preflight
from .statistics import ExpertStatistics, sampled_rows

log = logging.getLogger(__name__)
METHOD_NAMES = {"hcsmoe": "HC-SMoE expert merging", "prune-freq": "pruning by usage frequency",
                "prune-reap": "REAP pruning"}
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
            # the fitted rows of all chunks run as one input, each expert call on at most a chunk's rows, as planned
            max_rows = min(self.placement.max_rows or math.inf, len(self.chunks[0]) * self.options.seqlen)
            best, errors = LayerCompression(self.runner, layer, tensors, stats, held, self.k, self.options,
                                            max_rows).best()
            tensors = best.tensors
            record.update({
                "method": best.method,
                "groups": best.groups,
                "error": round(best.error, 6),
                "errors": {m: round(e, 6) for m, e in errors.items()},
                "frequencies": [round(f, 6) for f in stats.frequencies.tolist()],
                "tokens": stats.tokens,
            })
            if self.options.fit != "none":
                record.update({"unfitted_error": round(best.unfitted_error, 6), "fitted": best.fitted is not None})
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
        if "unfitted_error" in record:
            error = (f"{record['unfitted_error']:.4f} -> {record['error']:.4f} fitted" if record["fitted"] else
                     f"{record['error']:.4f} (the fit did not lower it and was dropped)")
        else:
            error = f"{record['error']:.4f}"
        log.info("layer %d: %s, %d -> %d experts, block error %s, groups %s", record["layer"], record["method"],
                 self.num_experts, self.k, error, record["groups"])

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
        tokens it was not made from. With `--fit lsq` step 3 also keeps the MoE block's inputs and outputs on
        the fitted rows of every other chunk (`compress.fitted_chunks`), which the fit learns from, and step 2
        each expert's outputs and down-projection inputs on the fitted rows routed to it: a candidate that
        keeps the expert then runs it only on the rows the compressed router adds.
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
        fitting = self.options.fit != "none"
        fit_chunks = fitted_chunks(len(self.chunks)) if fitting else range(0)
        learned = fit_rows(sum(len(self.chunks[c]) for c in fit_chunks) * self.options.seqlen, self.tokens.numel())
        # llama4's experts take scaled inputs in the block, not the statistics' unscaled ones
        stream.keep_down_inputs = fitting and not self.spec.scaled_input_experts
        picked = self.fitted_routing(tokens, fit_chunks, learned) if stream.keep_down_inputs else {}
        sampled = [[] for _ in self.chunks]  # per chunk, each expert's outputs on its sampled rows
        scored_known, fitted_known = [], {}
        fitted_pieces = [[] for _ in range(self.num_experts)]  # on the device until the expert's last chunk

        def observe(expert, c, chunk, y, h):
            if c == 0:
                self.overlap(layer)
            if c in picked:
                positions, rows = picked[c][expert]
                fitted_pieces[expert].append((positions, y[rows], h[rows]))
            if c == scored:  # the expert's last chunk: what is kept of its work moves to the host, one wait each
                rows = scored_rows(y)
                # a copy: on the host a view would keep the expert's whole output and activations alive
                scored_known.append((y[rows].to("cpu", copy=True), None if h is None else h[rows].to("cpu", copy=True)))
                if picked:
                    positions, outputs, inputs = zip(*fitted_pieces[expert])
                    fitted_pieces[expert] = None
                    fitted_known[expert] = (torch.cat(positions), torch.cat(outputs).cpu(), torch.cat(inputs).cpu())
            if c in counted:
                stats.add_expert(expert, y, chunk)
                sampled[c].append(y[sampled_rows(y)].clone())  # a strided view would keep all of y alive

        combined = stream.sweep(tokens, observe)
        stream.keep_down_inputs = False
        for c in counted:
            x = tokens.chunks[c].x
            stats.add_sample(x[sampled_rows(x)].to(self.device), torch.stack(sampled[c]))
        del sampled, tokens
        block, fitted = {}, []
        moe = self.spec.moe_block(module)
        hooks = [moe.register_forward_pre_hook(lambda _, args: block.update(x=args[0])),
                 moe.register_forward_hook(lambda _, args, out: block.update(y=out[0] if isinstance(out, tuple) else out))]
        hidden = self.config.hidden_size
        propagating = self.options.propagate == "original"
        # "merged" propagation needs the original outputs only where they are scored or fitted
        replayed = range(len(self.chunks)) if propagating else sorted({scored, *fit_chunks})
        stream.replay = iter(combined[c] for c in replayed)
        try:
            for c in tqdm(replayed, desc=f"layer {layer} outputs", leave=False, disable=None):
                out = self.runner.forward(module, layer, source.read(c, self.device))
                if propagating:
                    self.write_hidden(target, c, out)
                if c in fit_chunks:
                    fitted.append(tuple(block[k].reshape(-1, hidden)[learned].to("cpu", copy=True) for k in "xy"))
        finally:
            stream.replay = None
            for hook in hooks:
                hook.remove()
        x, y = (block[k].reshape(-1, hidden) for k in "xy")
        x, y = x[scored_rows(x)].to("cpu", copy=True), y[scored_rows(y)].to("cpu", copy=True)
        scored_tokens = HeldTokens(x, y, {e: KnownRows.on(len(x), torch.arange(len(x)), *known)
                                          for e, known in enumerate(scored_known)})
        fitted_tokens = None
        if fitting:
            x, y = (torch.cat(part) for part in zip(*fitted))
            fitted_tokens = HeldTokens(x, y, {e: KnownRows.on(len(x), *known) for e, known in fitted_known.items()})
        return stats.to_host(), Held(scored_tokens, fitted_tokens)

    def fitted_routing(self, tokens: RoutedTokens, fit_chunks: range, learned: slice) -> dict:
        """For each fitted chunk and expert: which of the fitted rows the model routes to the expert (their
        positions among all the fitted rows, on the host) and where they are in the chunk (on the device), so
        the sweep keeps the expert's work there without waiting for the device."""
        picked, start = {}, 0
        for c in fit_chunks:
            chunk = tokens.chunks[c]
            rows = torch.cat(chunk.rows).cpu().split(chunk.counts.tolist())
            picked[c] = []
            for expert_rows in rows:
                kept = expert_rows[expert_rows % learned.step == 0]
                picked[c].append((start + kept // learned.step, kept.to(self.device)))
            start += -(-len(chunk.x) // learned.step)
        return picked

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
            "layers": [{k: r[k] for k in ("layer", "method", "groups", "unfitted_error", "fitted", "error", "errors",
                                          "frequencies") if k in r}
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
        layers = [layer for layer in provenance["layers"] if "fitted" in layer]
        fitted = (f"In {sum(layer['fitted'] for layer in layers)} of {len(layers)} MoE layers the kept experts' down "
                  f"projections were then re-solved by least squares (`--fit lsq`), so that the compressed MoE block "
                  f"reproduces the original block's output on the calibration tokens; in the others the fit did not "
                  f"lower the error on held-aside tokens and was dropped. " if layers else "")
        return (
            f"---\n{metadata.to_yaml()}\n---\n\n"
            f"# {self.model.name}, {self.num_experts}→{self.k} experts (streammerge)\n\n"
            f"This checkpoint is **{self.model.name}** ({self.spec.family}) with the routed experts of every MoE layer "
            f"reduced from {self.num_experts} to {self.k} by streammerge {__version__}, without retraining: {methods} "
            f"(`--method {o.method}`; merging settings: `--feature {o.feature} --linkage {o.linkage} --merge {o.merge} "
            f"--router {o.router}`). {top_k}{fitted}Calibration: {o.samples} × {o.seqlen} tokens from `{Path(o.calib).name}`, "
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
            "unfitted_block_errors": {r["layer"]: r["unfitted_error"] for r in provenance["layers"]
                                      if "unfitted_error" in r},
            "perplexity": provenance.get("perplexity"),
        }


def run(model_dir: Path, out_dir: Path, options: RunOptions) -> dict:
    started = time.monotonic()

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
    result = {}
    for name, directory in (("before", model_dir), ("after", out_dir)):
        log.info("perplexity of the %s model on %s", "input" if name == "before" else "output", options.eval_text)
        result[name] = round(perplexity(directory, options.eval_text, device=options.device, dtype=options.dtype)["perplexity"], 4)
    provenance = json.loads((out_dir / PROVENANCE).read_text())
    provenance["perplexity"] = {"text": Path(options.eval_text).name, **result}
    save_json(out_dir / PROVENANCE, provenance)


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
