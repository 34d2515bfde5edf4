"""The output fit on real transformers layers: the down projection's input is what each family's own experts
compute, a block that lost nothing stays as it is, and the streamed solve equals the joint one."""

from functools import partial

import pytest
import torch

from streammerge import compress as compress_module
from streammerge.checkpoint import materialize
from streammerge.compress import Held, HeldTokens, LayerCompression
from streammerge.fit import Routed, fit_down_projections, fit_on_held_out
from streammerge.model import Model
from streammerge.options import RunOptions
from streammerge.runner import LayerRunner
from streammerge.statistics import ExpertStatistics
from test_fit import joint

# per-expert tensors; a shared expert; fused [E, H, I]; biased, interleaved and clamped [E, I, H]; scaled inputs
KINDS = ["mixtral", "qwen2_moe", "granitemoe", "gpt_oss", "llama4"]


def layer_of(tiny_models, family):
    model = Model.open(tiny_models(family))
    layer = model.spec.moe_layers(model.config)[0]
    runner = LayerRunner(model.spec, model.config, torch.device("cpu"), torch.float32)
    return model, layer, runner, model.read(model.layer_names(layer))


def block_output(block, x):
    out = block(x.unsqueeze(0))
    return (out[0] if isinstance(out, tuple) else out).reshape(x.shape)


@pytest.mark.parametrize("family", KINDS)
def test_the_recorded_down_projection_input_reproduces_the_expert(tiny_models, family):
    """Whatever the family computes before the down projection (interleaved, clamped or scaled activations),
    the recorded input times the on-disk down projection is the expert's output, as transformers computes it."""
    model, layer, runner, tensors = layer_of(tiny_models, family)
    spec = model.spec
    stream = spec.moe_block(runner.build(layer, tensors)).experts
    x = torch.randn(12, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stream.fit_calls = []
        got = stream.output(1, x)
        stream.record(1, torch.arange(12), None)
        # transformers' own experts class, holding expert 1 now
        want = stream.one(x) if spec.scaled_input_experts else stream.one(
            x, torch.zeros(12, 1, dtype=torch.long), torch.ones(12, 1))
    (call,) = stream.fit_calls
    transposed, biased = stream.down_layout()
    down, bias = spec.down_parts()
    parts = spec.expert_parts(tensors, layer, 1)
    weights = materialize(parts[down]).float()
    rebuilt = call.inputs @ (weights if transposed else weights.T)
    assert biased == (bias is not None)
    if biased:
        rebuilt = rebuilt + materialize(parts[bias]).float()
    assert torch.allclose(got, rebuilt, atol=1e-5)
    assert torch.allclose(got, want, atol=1e-5)


def compression(model, layer, runner, tensors, x, k):
    with torch.no_grad():
        y = block_output(model.spec.moe_block(runner.build(layer, tensors)), x)
    stats = ExpertStatistics(model.spec.num_experts(model.config), model.config.hidden_size, torch.device("cpu"))
    held = Held(HeldTokens(x, y, {}), HeldTokens(x, y, {}))
    return LayerCompression(runner, layer, tensors, stats.to_host(), held, k, RunOptions(ratio=0.5)), y


@pytest.mark.parametrize("family", KINDS)
def test_a_block_that_kept_every_expert_is_unchanged(tiny_models, family):
    """Nothing removed: the recorded routing and inputs reproduce the block, and the fit changes nothing."""
    model, layer, runner, tensors = layer_of(tiny_models, family)
    experts = model.spec.num_experts(model.config)
    x = torch.randn(256, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    compress, y = compression(model, layer, runner, tensors, x, experts)
    groups = [[e] for e in range(experts)]
    parts = compress.expert_parts(groups)
    block = compress.block(compress.layer_tensors(groups, parts))
    with torch.no_grad():
        routed, residual = compress.routed(block, compress.held.fitted, {}, block.experts.down_layout()[1])
    assert residual.norm() / y.norm() < 1e-5
    down, _ = model.spec.down_parts()
    changes = fit_down_projections([r for r in routed if r is not None], residual)
    for change, expert in zip(changes, [p for p, r in zip(parts, routed) if r is not None]):
        assert change.norm() / materialize(expert[down]).norm() < 1e-5
    assert compress.fit(compress.layer_tensors(groups, parts), parts, groups)[0] is None  # it cannot lower the error


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])  # per-expert [H, I]; fused, biased [I, H]
def test_the_streamed_fit_equals_the_joint_solve(tiny_models, family, monkeypatch):
    monkeypatch.setattr(compress_module, "fit_on_held_out", partial(fit_on_held_out, ridges=(1e-3,)))
    model, layer, runner, tensors = layer_of(tiny_models, family)
    spec = model.spec
    experts = spec.num_experts(model.config)
    x = torch.randn(512, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    compress, y = compression(model, layer, runner, tensors, x, experts // 2)
    groups = [[e] for e in range(0, experts, 2)]
    parts = compress.expert_parts(groups)
    unfitted = compress.layer_tensors(groups, parts)
    fitted = compress.apply(parts, compress.fit(unfitted, parts, groups)[0])

    block = compress.block(unfitted)  # the joint system, from the compressed block's own routing
    block.experts.fit_calls = []
    with torch.no_grad():
        residual = (y - block_output(block, x)).double()
    transposed, biased = block.experts.down_layout()
    calls = sorted(block.experts.fit_calls, key=lambda call: call.expert)
    assert [c.expert for c in calls] == list(range(len(groups)))
    inputs = [torch.cat([c.inputs, torch.ones_like(c.inputs[:, :1])], 1) if biased else c.inputs for c in calls]
    changes = joint([Routed(c.rows, (a * c.gate).double()) for c, a in zip(calls, inputs)], residual, 1e-3)
    down, bias = spec.down_parts()
    for change, before, after in zip(changes, parts, fitted):
        size = change.shape[1] - biased
        step = change[:, :size].T if transposed else change[:, :size]
        want = materialize(before[down]).double() + step
        assert (after[down].double() - want).norm() / want.norm() < 1e-3
        if biased:
            want = materialize(before[bias]).double() + change[:, size]
            assert (after[bias].double() - want).norm() / want.norm() < 1e-3
