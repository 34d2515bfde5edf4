"""End-to-end `run` on tiny models of each family, checked against the in-memory reference."""

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import replace
from pathlib import Path
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from reference import hcsmoe
from resident import cached_bytes, mapped_rss
from streammerge import pipeline
from streammerge.arch import ARCHITECTURES
from streammerge.calibration import sample_windows
from streammerge.checkpoint import CheckpointReader
from streammerge.cli import main
from streammerge.compress import LayerCompression
from streammerge.options import DEFAULT_TEXT
from streammerge.pipeline import Run, RunOptions, run
from streammerge.runner import ExpertStream, reduced_config
from test_make_synthetic import make_synthetic, shrunken_config

EXAMPLES = Path(__file__).parent.parent / "streammerge" / "examples"
# unfitted: the reference is the paper's HC-SMoE
OPTIONS = dict(samples=6, seqlen=32, batch=4, ratio=0.5, device="cpu", method="hcsmoe", feature="mean-output", fit="none")


@pytest.fixture(scope="session")
def compressed(compressed_once):
    return lambda family: compressed_once(family, **OPTIONS)


def _tensors(directory):
    reader = CheckpointReader(directory)
    return reader, reader.read(reader.names())


def test_matches_in_memory_reference(tiny_models, compressed, family):
    model_dir, out = tiny_models(family), compressed(family)
    spec = ARCHITECTURES[family]
    tokens = sample_windows(AutoTokenizer.from_pretrained(model_dir), DEFAULT_TEXT, OPTIONS["samples"],
                            OPTIONS["seqlen"], seed=0)
    provenance = json.loads((out / "streammerge.json").read_text())
    k = provenance["experts_after"]
    reference = hcsmoe(model_dir, tokens, k)
    _, merged = _tensors(out)
    assert [layer["layer"] for layer in provenance["layers"] if "groups" in layer] == sorted(reference)
    for layer in provenance["layers"]:
        expected = reference[layer["layer"]]
        assert sorted(layer["groups"]) == sorted(expected["clusters"])
        frequencies = expected["counts"].double() / expected["counts"].sum()
        assert np.allclose(layer["frequencies"], frequencies.numpy(), atol=1e-6)
        reference_merged = dict(zip(map(tuple, expected["clusters"]), expected["merged"]))
        for new_index, members in enumerate(layer["groups"]):
            for projection, ref in zip(spec.projections, reference_merged[tuple(members)]):
                got = merged[spec.expert_name(layer["layer"], new_index, projection)]

                assert torch.allclose(got, ref, atol=1e-6), (layer["layer"], new_index, projection)


def test_streamed_statistics_equal_reference(tiny_models, family, tmp_path):
    model_dir = tiny_models(family)
    state = Run(model_dir, tmp_path / "out", RunOptions(**OPTIONS))
    state.journal.open(state.signature_fields(), state.output_files(), state.num_layers, restart=False)
    state.embed()
    layer = min(state.moe_layers)
    module = state.runner.build(layer, state.model.reader.read(state.model.layer_names(layer)))
    stats, _ = state.measure(layer, module, state.hidden(layer), state.hidden(layer + 1))
    reference = hcsmoe(model_dir, state.tokens, state.k)[layer]
    assert torch.equal(stats.counts, reference["counts"])
    assert np.allclose(stats.mean_output.numpy(), reference["mean_outputs"], atol=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])  # softmax top-k; with a shared expert
def test_scores_from_known_outputs_equal_running_the_experts(tiny_models, family, tmp_path):
    """Candidates are scored with the kept experts' outputs from the statistics pass instead of running them
    again; that must give what running the compressed block gives."""
    state = Run(tiny_models(family), tmp_path / "out", RunOptions(**{**OPTIONS, "method": "auto"}))
    state.journal.open(state.signature_fields(), state.output_files(), state.num_layers, restart=False)
    state.embed()
    layer = min(state.moe_layers)
    tensors = state.model.reader.read(state.model.layer_names(layer))
    stats, held = state.measure(layer, state.runner.build(layer, tensors), state.hidden(layer), state.hidden(layer + 1))
    compression = LayerCompression(state.runner, layer, tensors, stats, held, state.k, state.options)
    plans = compression.candidates()
    assert any(len(g) > 1 for g in plans["hcsmoe"]) and all(len(g) == 1 for g in plans["prune-freq"])
    for method, groups in plans.items():
        out = compression.layer_tensors(groups, compression.expert_parts(groups))
        block = state.spec.moe_block(state.runner.build(layer, out, reduced_config(state.spec, state.config, state.k)))
        scored = held.scored
        got = block(scored.x.unsqueeze(0))
        got = (got[0] if isinstance(got, tuple) else got).reshape(scored.y.shape)
        ran = ((got - scored.y).double().norm() / scored.y.double().norm()).item()
        assert compression.block_error(out, groups, known=True) == pytest.approx(ran, rel=1e-5), method


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_the_fit_from_known_rows_equals_running_the_experts(tiny_models, family, tmp_path):
    """The fit takes a kept expert's outputs and down-projection inputs on the fitted rows the model routed to it
    from the statistics pass, and runs it only on the rows the compressed router adds; that must fit as running
    it on all of them does. Three chunks of 1024 tokens: the fitted rows of two are stitched together, and the
    512 scored rows are every other row of the last."""
    options = RunOptions(**{**OPTIONS, "method": "auto", "fit": "lsq", "samples": 24, "batch": 8, "seqlen": 128})
    state = Run(tiny_models(family), tmp_path / "out", options)
    state.journal.open(state.signature_fields(), state.output_files(), state.num_layers, restart=False)
    state.embed()
    layer = min(state.moe_layers)
    tensors = state.model.reader.read(state.model.layer_names(layer))
    stats, held = state.measure(layer, state.runner.build(layer, tensors), state.hidden(layer), state.hidden(layer + 1))
    assert len(held.fitted.known) == state.num_experts
    for known in [*held.scored.known.values(), *held.fitted.known.values()]:  # none keeps a chunk's activations
        for kept in (known.outputs, known.down_inputs):
            assert kept.untyped_storage().nbytes() == kept.numel() * kept.element_size()
    unknown = replace(held, fitted=replace(held.fitted, known={}), scored=replace(held.scored, known={}))
    known, ran = (LayerCompression(state.runner, layer, tensors, stats, h, state.k, options) for h in (held, unknown))
    for method, groups in known.candidates().items():
        parts = known.expert_parts(groups)
        out = known.layer_tensors(groups, parts)
        (fitted, unfitted, error), (want, want_unfitted, want_error) = known.fit(out, parts, groups), ran.fit(out, parts, groups)
        assert (unfitted, error) == pytest.approx((want_unfitted, want_error), rel=1e-5), method
        for i in range(len(want.experts)):
            change, want_change = fitted.changes.form(i), want.changes.form(i)
            assert (change - want_change).norm() <= 1e-4 * want_change.norm(), method


def test_output_loads_strictly_and_generates(compressed, family):
    out = compressed(family)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    spec = ARCHITECTURES[family]
    k = json.loads((out / "streammerge.json").read_text())["experts_after"]
    assert spec.num_experts(model.config) == k
    assert model.config.num_experts_per_tok <= k
    for layer in spec.moe_layers(model.config):
        assert model.model.layers[layer].mlp.gate.weight.shape[0] == k
    tokenizer = AutoTokenizer.from_pretrained(out)
    generated = model.generate(**tokenizer("The module", return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > 2


def test_provenance_keeps_option_types_and_the_card_has_hub_metadata(compressed):
    out = compressed("mixtral")
    options = json.loads((out / "streammerge.json").read_text())["options"]
    assert options["samples"] == OPTIONS["samples"] and options["ratio"] == 0.5 and options["experts"] is None
    assert options["calib"] == str(DEFAULT_TEXT) and options["eval_text"] is None
    card = (out / "README.md").read_text()
    _, front_matter, body = card.split("---\n", 2)
    metadata = yaml.safe_load(front_matter)
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "text-generation"
    assert {"streammerge", "moe", "mixtral"} <= set(metadata["tags"]) and metadata["base_model"]
    assert ModelCard.load(out / "README.md").data.to_dict() == metadata  # as the Hub's own tooling reads it
    assert body.lstrip().startswith("# ")


def test_non_expert_tensors_are_byte_identical(tiny_models, compressed, family):
    spec = ARCHITECTURES[family]
    _, source = _tensors(tiny_models(family))
    _, merged = _tensors(compressed(family))
    routed = {n for n in source if ".experts." in n or n.endswith(f"{spec.moe_prefix}.{spec.router}")}
    kept = [n for n in source if n not in routed]
    assert kept and set(kept) <= set(merged)
    for name in kept:
        assert source[name].dtype == merged[name].dtype
        assert source[name].numpy().tobytes() == merged[name].numpy().tobytes(), name


def test_the_fit_changes_only_the_down_projections_it_was_kept_for(tmp_path):
    """With the experts chosen by the statistics alone (prune-freq), `--fit lsq` and `--fit none` write the
    same bytes everywhere but in the kept experts' down projections of the layers whose fit was kept; `--fit none`
    is then the unfitted method checked against the reference above, and records no fit. On a trained example,
    where the fit pays."""
    options = dict(samples=8, seqlen=128, batch=2, ratio=0.5, device="cpu", method="prune-freq")
    fitted_dir, plain_dir = tmp_path / "lsq", tmp_path / "none"
    for fit, out in (("lsq", fitted_dir), ("none", plain_dir)):
        run(EXAMPLES / "scratch", out, RunOptions(**options, fit=fit))
    (_, fitted), (_, plain) = _tensors(fitted_dir), _tensors(plain_dir)
    layers = {r["layer"]: r for r in json.loads((fitted_dir / "streammerge.json").read_text())["layers"]}
    assert all("fitted" not in r for r in json.loads((plain_dir / "streammerge.json").read_text())["layers"])
    assert any(r["fitted"] and r["error"] < r["unfitted_error"] for r in layers.values())
    assert fitted.keys() == plain.keys()
    for name in plain:
        down = re.search(r"layers\.(\d+)\..*experts\.\d+\.w2\.", name)
        if down and layers[int(down.group(1))]["fitted"]:
            assert not torch.equal(fitted[name], plain[name]), name
        else:
            assert fitted[name].view(torch.uint8).equal(plain[name].view(torch.uint8)), name


def _synthetic_mixtral(tmp_path):
    """Four bf16 Mixtral layers of 12.6 MB (experts of 1.6 MB): large next to a page and a header."""
    config = shrunken_config("mixtral", tmp_path)
    config.write_text(json.dumps({**json.loads(config.read_text()), "hidden_size": 256, "intermediate_size": 1024}))
    model_dir = tmp_path / "model"
    make_synthetic.make_synthetic(config, model_dir, layers=4)
    return model_dir


def test_at_most_one_expert_of_weights_is_resident(tmp_path):
    """The real thing: the resident pages of the input's memory maps, sampled from /proc/self/smaps while a
    run computes, stay at about one expert (the one computing; a tensor being saved beside it), far
    below one layer, though a layer's tensors are mapped and the previous layer is saved meanwhile."""
    model_dir = _synthetic_mixtral(tmp_path)
    reader = CheckpointReader(model_dir)
    layer = reader.nbytes([n for n in reader.names() if n.startswith("model.layers.1.")])
    expert = reader.nbytes([n for n in reader.names() if n.startswith("model.layers.1.block_sparse_moe.experts.0.")])
    peak, done = [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], mapped_rss(model_dir))
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        run(model_dir, tmp_path / "out", RunOptions(ratio=0.5, samples=4, seqlen=64, batch=2, device="cpu"))
    finally:
        done.set()
        sampler.join()
    assert 0 < peak[0] <= layer / 2
    assert peak[0] <= 3 * expert, (peak[0], expert)


@pytest.mark.skipif(pipeline._mallopt is None, reason="glibc's allocator only")
@pytest.mark.slow  # in the full default suite it read 640 faults, alone 0: open, see CHANGELOG
def test_freed_activation_blocks_are_reused_without_page_faults():
    """Every expert allocates the same few hundred MB of activations. Reused, they cost no page fault;
    freshly mapped, one per page (and reclaim while the streamed model fills the page cache). Checked in a fresh
    process: what earlier tests left in this one's heap changes where glibc places the block."""
    check = """
import resource, torch
from streammerge import pipeline
pipeline._reuse_freed_blocks()
torch.set_num_threads(1)  # the fill, and so its faults, in this thread
activation = 256 << 20
torch.ones(activation, dtype=torch.uint8)  # allocated, touched, freed
before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
torch.ones(activation, dtype=torch.uint8)
print(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
"""
    faults = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True).stdout
    assert int(faults.split()[-1]) < 16


def test_finished_layers_leave_the_page_cache(tmp_path):
    """Once a layer is saved, its input (touched twice: prefetched, then computed on) and its written shard
    are evicted from the page cache, so on a model larger than the cache they cannot push out the
    prefetched next layer, which the kernel would otherwise drop first as the least used."""
    model_dir = _synthetic_mixtral(tmp_path)
    os.sync()  # only clean pages can be evicted: the input was just written
    reader = CheckpointReader(model_dir)
    out = tmp_path / "out"
    run(model_dir, out, RunOptions(ratio=0.5, samples=4, seqlen=64, batch=2, device="cpu"))
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    for layer in range(4):
        names = [n for n in reader.names() if n.startswith(f"model.layers.{layer}.")]
        ranges = [reader.ranges[name] for name in names]
        cached = sum(cached_bytes(model_dir / shard, begin, end - begin) for shard, begin, end in ranges)
        # A few pages stay mapped, hence cached: those shared with a neighbour, and those a page fault on a
        # neighbour mapped around itself (the kernel's fault-around) after they had been released.
        assert cached <= reader.nbytes(names) / 20, (layer, cached)
        shard = out / weight_map[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert cached_bytes(shard) <= shard.stat().st_size / 20, layer  # the summary reads the headers back




@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])  # per-expert tensors; fused (and group-limited)
def test_each_expert_is_read_once_per_layer_whatever_the_chunks(tiny_models, tmp_path, monkeypatch, family):
    """Four chunks, and still each expert's tensors are read from the checkpoint, converted (and on CUDA
    uploaded) once per MoE layer for the statistics, not once per chunk."""
    loads, measuring = Counter(), []
    real_measure, real_fill = Run.measure, ExpertStream._fill

    def measure(self, layer, *args):
        measuring.append(layer)
        try:
            return real_measure(self, layer, *args)
        finally:
            measuring.clear()

    def fill(self, state, expert, copy):
        if measuring and not state[next(iter(state))].is_meta:
            loads[measuring[0], expert] += 1
        return real_fill(self, state, expert, copy)

    monkeypatch.setattr(Run, "measure", measure)
    monkeypatch.setattr(ExpertStream, "_fill", fill)
    options = RunOptions(**{**OPTIONS, "samples": 4, "seqlen": 16, "batch": 1})
    state = Run(tiny_models(family), tmp_path / "out", options)
    run(tiny_models(family), tmp_path / "out", options)
    assert len(state.chunks) == 4
    assert loads == Counter({(layer, e): 1 for layer in state.moe_layers for e in range(state.num_experts)})


def _hashes(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.safetensors"))}


def test_device_out_of_memory_is_one_line_exit_2_and_the_run_resumes(tiny_models, tmp_path, monkeypatch):
    model_dir = tiny_models("mixtral")
    args = ["run", str(model_dir), str(tmp_path / "out"), "--ratio", "0.5", "--samples", "4", "--seqlen", "16",
            "--batch", "2", "--device", "cpu"]
    real, real_measure = ExpertStream.every_token, Run.measure
    layers = []

    def measure(self, layer, *args):
        layers.append(layer)
        return real_measure(self, layer, *args)

    def short_of_memory(self, x):
        if layers[-1] == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                                         "capacity of 23.64 GiB of which 1.20 GiB is free.\nDetails follow")
        return real(self, x)

    monkeypatch.setattr(Run, "measure", measure)
    monkeypatch.setattr(ExpertStream, "every_token", short_of_memory)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.output.splitlines() == [
        "error: out of GPU memory in layer 1 (CUDA out of memory Tried to allocate 2.00 GiB): lower --batch or "
        "--seqlen and re-run with --restart, or free GPU memory and re-run the same command to resume after the "
        "finished layers"]
    monkeypatch.setattr(ExpertStream, "every_token", real)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert layers[-2:] == [1, 2]  # resumed after layer 0
    clean = CliRunner().invoke(main, [*args[:2], str(tmp_path / "clean"), *args[3:]])
    assert clean.exit_code == 0 and _hashes(tmp_path / "out") == _hashes(tmp_path / "clean")


def test_a_resume_on_other_hardware_is_refused_with_the_differences(tiny_models, tmp_path, monkeypatch):
    """GPU kernels (hence bits) differ between GPU models and CUDA/cuBLAS versions: the signature holds them."""
    from streammerge.errors import ResumeMismatchError

    gpu = {"device": "cuda", "gpu": "NVIDIA GeForce RTX 4090", "capability": "8.9", "cuda": "13.0",
           "cublas": "130100", "deterministic": True}
    monkeypatch.setattr(pipeline, "device_fields", lambda device: dict(gpu))
    state = Run(tiny_models("mixtral"), tmp_path / "out", RunOptions(**OPTIONS))
    state.journal.open(state.signature_fields(), state.output_files(), state.num_layers, restart=False)
    gpu.update(gpu="NVIDIA RTX A6000", capability="8.6")
    with pytest.raises(ResumeMismatchError, match=r"capability: '8.9' -> '8.6'; gpu: 'NVIDIA GeForce RTX 4090' -> "
                                                  r"'NVIDIA RTX A6000'\)"):
        state.journal.open(state.signature_fields(), state.output_files(), state.num_layers, restart=False)
