"""Re-solving a compressed MoE block's down projections so that it reproduces the original block (pure math).

Minimize over the kept experts' down projections W_1..W_K

    sum_x || y(x) - sum_{k in topk'(x)} g'_k(x) W_k h_k(x) ||^2  +  lam_k sum_k || W_k - W_k0 ||^2

where y is the original block's output, topk' and g' the compressed router's choice and weights, h_k the kept
expert's down-projection input and W_k0 its current weights. The experts are coupled through the tokens they
share, and the joint system ((K*I)^2) does not fit in memory at real scale, so this solves it by block
Gauss-Seidel: each expert in turn re-solved against the residual of the others' CURRENT outputs, with its own
system, factored once (only the right-hand sides change between sweeps). Each system is solved in whichever space
is smaller: token space (T x T, Woodbury) when the expert has fewer routed tokens T than inputs I, else I x I. In
token space a sweep never touches the inputs: an expert's change is A^T u with (A A^T + lam) u = t, its outputs'
change A A^T u = t - lam u, so a sweep costs two triangular solves (2 T^2 H) per expert, and A^T u is formed once
at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RIDGE = 1e-3  # lam_k = RIDGE x the mean diagonal of expert k's Gram
SWEEPS = 32  # at most; tests/test_compress.py: within 1e-3 of the joint solve on a tiny model (16: 5e-3, 8: 4e-2)
SETTLED = 1e-5  # a sweep that moves the outputs by less than this (relative) ends the sweeps


@dataclass
class Routed:
    """One expert's calibration rows: `rows` [T] indices into the residual, `inputs` A [T, I] its
    down-projection inputs already multiplied by the token's router weight (a column of those weights last when
    the projection has a bias)."""

    rows: torch.Tensor
    inputs: torch.Tensor


class RidgeSolver:
    """argmin_D ||t - A D^T||^2 + lam ||D||^2 for one expert's A [T, I] and any t [T, H], factored once."""

    def __init__(self, inputs: torch.Tensor, ridge: float = RIDGE):
        a = inputs
        self.inputs = a
        self.ridge = (ridge * a.square().sum() / a.shape[1]).clamp(min=torch.finfo(a.dtype).tiny)
        self.token_space = a.shape[0] < a.shape[1]
        gram = a @ a.T if self.token_space else a.T @ a
        gram.diagonal().add_(self.ridge)
        self.factor = torch.linalg.cholesky(gram)

    def solve(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the solution in this solver's space: u [T, H] with D^T = A^T u, or D^T [I, H]; A D^T [T, H])."""
        if self.token_space:  # D^T = A^T u with (A A^T + lam) u = t, so A D^T = A A^T u = t - lam u
            u = torch.cholesky_solve(target, self.factor)
            return u, target - self.ridge * u
        change = torch.cholesky_solve(self.inputs.T @ target, self.factor)
        return change, self.inputs @ change

    def change(self, solution: torch.Tensor) -> torch.Tensor:
        """D [H, I] from `solve`'s solution."""
        return (self.inputs.T @ solution).T if self.token_space else solution.T


def fit_down_projections(experts: list[Routed], residual: torch.Tensor, sweeps: int = SWEEPS,
                         ridge: float = RIDGE) -> list[torch.Tensor]:
    """Each expert's change of down projection D_k [H, I] (its weights become W_k0 + D_k; with a bias, its
    last column is the bias's change), from `residual` [N, H] = y - (the block's output with the W_k0).
    `residual` is updated in place to the fitted block's residual."""
    solvers = [RidgeSolver(e.inputs, ridge) for e in experts]
    solutions = [None] * len(experts)  # every sweep sets them all
    outputs = [torch.zeros(len(e.rows), residual.shape[1], dtype=residual.dtype, device=residual.device)
               for e in experts]  # A_k D_k^T: each expert's current change of output on its rows
    for _ in range(sweeps):
        moved = torch.zeros((), dtype=residual.dtype, device=residual.device)
        for k, (expert, solver) in enumerate(zip(experts, solvers)):
            solutions[k], output = solver.solve(residual[expert.rows] + outputs[k])
            step = outputs[k] - output
            residual.index_add_(0, expert.rows, step)
            moved += step.square().sum()
            outputs[k] = output
        if moved <= SETTLED ** 2 * sum(o.square().sum() for o in outputs):  # one host sync per sweep
            break
    return [solver.change(solution) for solver, solution in zip(solvers, solutions)]
