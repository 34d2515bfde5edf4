"""The least-squares fit of down projections against a joint solve written out in full."""

import torch

from streammerge.fit import RidgeSolver, Routed, fit_down_projections, fit_on_held_out


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
    changes = fit_down_projections(routed, residual, sweeps=200, ridge=1e-12, settled=1e-9)
    for got, want in zip(changes, truth):
        assert torch.allclose(got, want, atol=1e-5)
    assert residual.norm() < 1e-5 * target


def test_gauss_seidel_sweeps_reach_the_joint_solution():
    routed, g = routed_block()
    target = torch.randn(600, 16, generator=g, dtype=torch.float64)
    want = joint(routed, target, 1e-3)
    residual = target.clone()
    got = fit_down_projections(routed, residual)
    error = torch.cat(got, 1) - torch.cat(want, 1)
    assert error.norm() / torch.cat(want, 1).norm() < 1e-3
    assert torch.allclose(residual, target - predict(routed, got, 600, 16))


def test_underdetermined_experts_reach_the_joint_outputs():
    """More inputs than tokens (Mixtral's I = 14,336 against a few thousand routed tokens): token space. The
    weights converge slowly there (the experts can trade their shares of shared tokens), the outputs do not."""
    routed, g = routed_block(inputs=400)
    assert all(len(e.rows) < 400 for e in routed)
    target = torch.randn(600, 16, generator=g, dtype=torch.float64)
    want = predict(routed, joint(routed, target, 1e-3), 600, 16)
    got = predict(routed, fit_down_projections(routed, target.clone()), 600, 16)
    assert (got - want).norm() / target.norm() < 2e-3


def test_token_space_and_input_space_agree():
    g = torch.Generator().manual_seed(2)
    target = torch.randn(40, 8, generator=g, dtype=torch.float64)
    few = torch.randn(40, 64, generator=g, dtype=torch.float64)  # fewer tokens than inputs: token space
    many = torch.randn(40, 16, generator=g, dtype=torch.float64)
    for a in (few, many):
        solver = RidgeSolver(a)
        assert solver.token_space == (a.shape[0] < a.shape[1])
        want = torch.linalg.solve(a.T @ a + solver.ridge * torch.eye(a.shape[1], dtype=a.dtype), a.T @ target).T
        solution, output = solver.solve(target)
        assert torch.allclose(solver.change(solution), want, atol=1e-10)
        assert torch.allclose(output, a @ want.T, atol=1e-10)


def test_the_ridge_is_chosen_on_held_out_tokens():
    """Fewer tokens than inputs (~75 against 80) and a noisy target: the weakest ridge fits the noise and does
    worse on held-out tokens than no fit at all; a stronger one is chosen. Nothing to gain on them: no fit."""
    routed, g = routed_block(tokens=600, inputs=80)
    truth = [torch.randn(16, 80, generator=g, dtype=torch.float64) for _ in routed]
    fitted = [Routed(e.rows[e.rows < 150], e.inputs[e.rows < 150]) for e in routed]
    held = [Routed(e.rows[e.rows >= 150] - 150, e.inputs[e.rows >= 150]) for e in routed]
    target = predict(routed, truth, 600, 16) + torch.randn(600, 16, generator=g, dtype=torch.float64)
    unfitted = target[150:].norm().item()
    assert fit_on_held_out(fitted, target[:150].clone(), held, target[150:], ridges=(1e-3,)) == (None, unfitted)
    changes, norm = fit_on_held_out(fitted, target[:150].clone(), held, target[150:])
    assert changes is not None and norm < 0.8 * unfitted
    assert fit_on_held_out(fitted, target[:150].clone(), held, torch.zeros(450, 16, dtype=torch.float64)) == (None, 0.0)
