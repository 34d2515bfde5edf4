"""Every method and router writes a strictly loadable checkpoint; keeping all experts changes nothing."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from streammerge.options import METHODS, ROUTERS, RunOptions
from streammerge import pipeline, plan
from streammerge.pipeline import run

SMALL = dict(samples=4, seqlen=32, batch=2, device="cpu")


def load_strictly(directory):
    model, info = AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


# Pruning keeps the original router rows whatever --router says, so one router suffices there.
COMBINATIONS = [(m, r) for m in METHODS for r in ROUTERS if not m.startswith("prune") or r == "dominant"]


@pytest.mark.parametrize("method, router", COMBINATIONS)
def test_every_method_and_router_loads_strictly(tiny_models, tmp_path, method, router):
    out = tmp_path / "out"
    run(tiny_models("qwen2_moe"), out, RunOptions(ratio=0.5, method=method, router=router, **SMALL))
    model = load_strictly(out)
    provenance = json.loads((out / "streammerge.json").read_text())
    assert all(layer["method"] in METHODS for layer in provenance["layers"])
    assert model.model.layers[0].mlp.gate.weight.shape[0] == 30
    assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


@pytest.mark.parametrize("method", METHODS)
def test_keeping_every_expert_reproduces_the_original_logits(tiny_models, tmp_path, monkeypatch, method):
    """Users are refused K = E (nothing removed); the pipeline underneath must still be the identity for it."""
    for module in (pipeline, plan):
        monkeypatch.setattr(module, "target_experts", lambda num_experts, ratio, experts: experts)
    model_dir = tiny_models("mixtral")
    out = tmp_path / "out"
    run(model_dir, out, RunOptions(experts=8, method=method, router="kl", propagate="merged", **SMALL))
    tokens = torch.randint(3, 300, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = load_strictly(model_dir)(tokens).logits
        got = load_strictly(out)(tokens).logits
    assert torch.equal(got, expected)


def test_token_distance_feature_and_merged_propagation(tiny_models, tmp_path):
    out = tmp_path / "out"
    run(tiny_models("olmoe"), out, RunOptions(ratio=0.25, method="hcsmoe", feature="token-distance", propagate="merged", **SMALL))
    load_strictly(out)
    layers = json.loads((out / "streammerge.json").read_text())["layers"]
    assert all(len(layer["groups"]) == 48 for layer in layers)
    assert sorted(e for g in layers[0]["groups"] for e in g) == list(range(64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merging_in_blocks_equals_one_float32_pass_and_leaves_members_alone(dtype):
    from streammerge.merge import MERGE_BLOCK, merge_tensors

    members = [torch.randn(3, MERGE_BLOCK + 5).to(dtype) for _ in range(3)]  # blocks cross rows; a ragged end
    before = [m.clone() for m in members]
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    expected = torch.zeros(members[0].shape)
    for member, weight in zip(members, weights.tolist()):
        expected.add_(member, alpha=weight)
    expected = expected.to(dtype)
    assert torch.equal(merge_tensors(members, weights), expected)
    assert all(torch.equal(m, b) for m, b in zip(members, before))  # the members are read-only memory maps


def test_merging_mapped_members_in_slabs_equals_one_merge(monkeypatch):
    from streammerge import compress
    from streammerge.merge import merge_tensors

    monkeypatch.setattr(compress, "MERGE_SLAB", 7)  # slabs cross rows; a ragged last slab
    members = [torch.randn(5, 9).to(torch.bfloat16) for _ in range(3)]
    weights = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert torch.equal(compress._merge_mapped(members, weights), merge_tensors(members, weights))
