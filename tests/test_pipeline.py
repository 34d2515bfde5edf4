"""End-to-end `run` on tiny models of each family, checked against the in-memory reference."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from reference import hcsmoe
from streammerge.arch import ARCHITECTURES
from streammerge.calibration import DEFAULT_TEXT, sample_windows
from streammerge.checkpoint import CheckpointReader
from streammerge.pipeline import Run, RunOptions, run

OPTIONS = dict(samples=6, seqlen=32, batch=4, ratio=0.5, device="cpu", method="hcsmoe", feature="mean-output")


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


def test_at_most_one_layer_of_weights_is_held(tiny_models, tmp_path):
    model_dir = tiny_models("mixtral")
    summary = run(model_dir, tmp_path / "out", RunOptions(**OPTIONS))
    reader = CheckpointReader(model_dir)
    layers = [[n for n in reader.names() if n.startswith(f"model.layers.{i}.")] for i in range(3)]
    globals_ = [n for n in reader.names() if not n.startswith("model.layers.")]
    bound = max(max(reader.nbytes(names) for names in layers), reader.nbytes(globals_))
    assert 0 < summary["peak_weight_bytes"] <= bound
