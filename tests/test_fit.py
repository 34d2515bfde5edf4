"""The least-squares fit of down projections against a joint solve written out in full."""

import pytest
import torch

from streammerge.fit import RIDGES, Routed, fit_down_projections, fit_on_held_out


def routed_block(tokens=600, experts=4, top_k=2, inputs=24, hidden=16, seed=0):
    """Experts sharing tokens under top-k of random logits, with gated random down-projection inputs."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=g, dtype=torch.float64)
    weights, index = torch.softmax(logits, -1).topk(top_k, -1)
    routed = []
    for e in range(experts):
        rows = (index == e).any(-1).nonzero().squeeze(-1)
        gate = (weights * (index == e)).sum(-1)[rows]
        routed.append(Routed(rows, torch.randn(len(rows), inputs, generator=g, dtype=torch.float64) * gate[:, None]))
    return routed, torch.Generator().manual_seed(seed + 1)


def predict(routed, changes, tokens, hidden):
    out = torch.zeros(tokens, hidden, dtype=torch.float64)
    for expert, change in zip(routed, changes):
        out.index_add_(0, expert.rows, expert.inputs @ change.T)
    return out


def joint(routed, target, ridge):
    """The whole system at once: [N, sum I] inputs, each block with its own ridge."""
    sizes = [e.inputs.shape[1] for e in routed]
    a = torch.zeros(len(target), sum(sizes), dtype=torch.float64)
    penalty = []
    start = 0
    for expert, size in zip(routed, sizes):
        a[expert.rows, start:start + size] = expert.inputs
        penalty += [ridge * expert.inputs.square().sum() / size] * size
        start += size
    solution = torch.linalg.solve(a.T @ a + torch.diag(torch.stack(penalty)), a.T @ target).T
    return list(solution.split(sizes, dim=1))


def test_a_representable_target_is_recovered():
    routed, g = routed_block(tokens=200, inputs=8)
    truth = [torch.randn(16, 8, generator=g, dtype=torch.float64) for _ in routed]
    residual = predict(routed, truth, 200, 16)
    target = residual.norm()
    changes = fit_down_projections(routed, residual, ridge=1e-12)
    for got, want in zip(changes, truth):
        assert torch.allclose(got, want, atol=1e-5)
    assert residual.norm() < 1e-5 * target


@pytest.mark.parametrize("inputs", [24, 400])  # 4 x 24 inputs < 600 tokens: input space; 4 x 400: token space
def test_the_fit_is_the_joint_solution(inputs):
    """In either space, the solution of the joint system written out in full, and the residual it leaves."""
    routed, g = routed_block(inputs=inputs)
    target = torch.randn(600, 16, generator=g, dtype=torch.float64)
    want = joint(routed, target, 1e-3)
    residual = target.clone()
    got = fit_down_projections(routed, residual)
    error = torch.cat(got, 1).double() - torch.cat(want, 1)
    assert error.norm() / torch.cat(want, 1).norm() < 1e-5
    assert torch.allclose(residual, target - predict(routed, want, 600, 16), atol=1e-8)


def test_the_ridge_is_chosen_on_held_out_tokens():
    """Fewer tokens than inputs (~75 against 80) and a noisy target: of the ridges, the one that does best on the
    held-out tokens is kept, and the strongest does far worse there. Nothing to gain on them: no fit."""
    routed, g = routed_block(tokens=600, inputs=80)
    truth = [torch.randn(16, 80, generator=g, dtype=torch.float64) for _ in routed]
    fitted = [Routed(e.rows[e.rows < 150], e.inputs[e.rows < 150]) for e in routed]
    held = [Routed(e.rows[e.rows >= 150] - 150, e.inputs[e.rows >= 150]) for e in routed]
    target = predict(routed, truth, 600, 16) + torch.randn(600, 16, generator=g, dtype=torch.float64)
    alone = {ridge: fit_on_held_out(fitted, target[:150].clone(), held, target[150:], ridges=(ridge,))[1]
             for ridge in RIDGES}
    changes, norm = fit_on_held_out(fitted, target[:150].clone(), held, target[150:])
    assert changes is not None and norm == min(alone.values()) < 0.85 * alone[max(RIDGES)]
    assert fit_on_held_out(fitted, target[:150].clone(), held, torch.zeros(450, 16, dtype=torch.float64)) == (None, 0.0)


@pytest.mark.parametrize("inputs", [24, 80])  # input space, token space
@pytest.mark.parametrize("held_rows", [8, 450])  # fewer held-out tokens than outputs (16), and more
def test_the_held_out_error_is_that_of_the_formed_changes(inputs, held_rows):
    """However a ridge's held-out change is evaluated, it is that of the changes the ridge forms."""
    routed, g = routed_block(tokens=150 + held_rows, inputs=inputs)
    fitted = [Routed(e.rows[e.rows < 150], e.inputs[e.rows < 150]) for e in routed]
    held = [Routed(e.rows[e.rows >= 150] - 150, e.inputs[e.rows >= 150]) for e in routed]
    target = torch.randn(150 + held_rows, 16, generator=g, dtype=torch.float64)
    for ridge in RIDGES:
        changes = fit_down_projections(fitted, target[:150].clone(), ridge)
        want = (target[150:] - predict(held, changes, held_rows, 16)).norm().item()
        got, norm = fit_on_held_out(fitted, target[:150].clone(), held, target[150:], ridges=(ridge,))
        if got is None:
            assert want >= norm == target[150:].norm().item()
        else:
            assert norm == pytest.approx(want, rel=1e-9)
            for k, change in enumerate(changes):
                assert torch.allclose(got.form(k), change, atol=1e-9)
