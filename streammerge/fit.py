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

How strongly to pull towards the current weights is chosen per layer on held-out tokens (`fit_on_held_out`): with
fewer routed tokens than inputs (Mixtral at 32 x 512 calibration tokens: ~4k per expert against I = 14,336) a weak
ridge fits the calibration tokens and not the model. Each candidate ridge's held-out error comes in closed form
from the held-out tokens' own down-projection inputs B: their change of output is B D^T, in token space
(B A^T) u, so no change is formed and no expert runs until one ridge is chosen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RIDGE = 1e-3  # lam_k = RIDGE x the mean diagonal of expert k's Gram
RIDGES = (10.0, 1.0, 1e-1, 1e-2, 1e-3)  # tried on held-out tokens, strongest first (fit_on_held_out)
SWEEPS = 32  # at most; tests/test_compress.py: within 1e-3 of the joint solve on a tiny model (16: 5e-3, 8: 4e-2)
SETTLED = 1e-3  # a sweep that moves the outputs by less than this (relative) ends the sweeps; 1e-5 took 1.5x the
# sweeps for the same held-out perplexity on the scratch example (x1.11163 vs x1.11165)


@dataclass
class Routed:
    """One expert's calibration rows: `rows` [T] indices into the residual, `inputs` A [T, I] its
    down-projection inputs already multiplied by the token's router weight (a column of those weights last when
    the projection has a bias)."""

    rows: torch.Tensor
    inputs: torch.Tensor


class RidgeSolver:
    """argmin_D ||t - A D^T||^2 + lam ||D||^2 for one expert's A [T, I] and any t [T, H], factored once."""

    def __init__(self, inputs: torch.Tensor, ridge: float = RIDGE, gram: torch.Tensor | None = None):
        a = inputs
        self.inputs = a
        self.ridge = (ridge * a.square().sum() / a.shape[1]).clamp(min=torch.finfo(a.dtype).tiny)
        self.token_space = a.shape[0] < a.shape[1]
        gram = gram_of(a) if gram is None else gram.clone()
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
        return change_of(self.inputs, solution)

    def output(self, solution: torch.Tensor) -> torch.Tensor:
        """A D^T [T, H] for a solution in this solver's space (in token space (A A^T + lam) u - lam u)."""
        if self.token_space:
            return self.factor @ (self.factor.T @ solution) - self.ridge * solution
        return self.inputs @ solution


def change_of(inputs: torch.Tensor, solution: torch.Tensor) -> torch.Tensor:
    """D [H, I] from a solution of an expert with down-projection inputs A [T, I]: u [T, H] in token space
    (fewer rows than columns, D^T = A^T u), else D^T itself."""
    return (inputs.T @ solution).T if inputs.shape[0] < inputs.shape[1] else solution.T


def gram_of(a: torch.Tensor) -> torch.Tensor:
    """A A^T in token space (fewer rows than columns), else A^T A."""
    return a @ a.T if a.shape[0] < a.shape[1] else a.T @ a


def fit_down_projections(experts: list[Routed], residual: torch.Tensor, sweeps: int = SWEEPS,
                         ridge: float = RIDGE, settled: float = SETTLED) -> list[torch.Tensor]:
    """Each expert's change of down projection D_k [H, I] (its weights become W_k0 + D_k; with a bias, its
    last column is the bias's change), from `residual` [N, H] = y - (the block's output with the W_k0).
    `residual` is updated in place to the fitted block's residual."""
    solvers, solutions = _sweep([RidgeSolver(e.inputs, ridge) for e in experts], experts, residual, sweeps,
                                settled=settled)
    return [solver.change(solution) for solver, solution in zip(solvers, solutions)]


def fit_on_held_out(experts: list[Routed], residual: torch.Tensor, held_out: list[Routed],
                    held_residual: torch.Tensor, ridges: tuple[float, ...] = RIDGES
                    ) -> tuple[list[torch.Tensor] | None, float]:
    """The changes (as `fit_down_projections`) with the ridge of `ridges` that leaves the least residual on the
    held-out tokens, and that residual's norm; None and the unchanged norm when no ridge lowers it. `held_out[k]`
    holds expert k's rows and down-projection inputs (gated, as `experts[k]`) on those tokens, `held_residual`
    [M, H] their y - (the block's output with the W_k0)."""
    grams = [gram_of(e.inputs) for e in experts]
    cross = [h.inputs @ e.inputs.T if e.inputs.shape[0] < e.inputs.shape[1] else None
             for e, h in zip(experts, held_out)]  # B A^T, for token-space solutions
    best, best_norm, solutions = None, held_residual.norm().item(), None
    for ridge in ridges:
        solvers = [RidgeSolver(e.inputs, ridge, gram) for e, gram in zip(experts, grams)]
        _, solutions = _sweep(solvers, experts, residual.clone(), SWEEPS, solutions)  # from the last ridge's
        del solvers  # only the solutions are kept: the factors of two ridges would double the peak
        left = held_residual.clone()
        for h, b, solution in zip(held_out, cross, solutions):
            left.index_add_(0, h.rows, -(b @ solution if b is not None else h.inputs @ solution))
        norm = left.norm().item()
        if norm < best_norm:
            best, best_norm = solutions, norm
    if best is None:
        return None, best_norm
    return [change_of(e.inputs, solution) for e, solution in zip(experts, best)], best_norm


def _sweep(solvers: list[RidgeSolver], experts: list[Routed], residual: torch.Tensor, sweeps: int,
           start: list[torch.Tensor] | None = None, settled: float = SETTLED):
    """Block Gauss-Seidel from the solutions `start` (zero changes without): (the solvers, each one's solution);
    `residual` ends as the fitted block's."""
    if start is None:
        solutions = [None] * len(experts)  # every sweep sets them all
        outputs = [torch.zeros(len(e.rows), residual.shape[1], dtype=residual.dtype, device=residual.device)
                   for e in experts]  # A_k D_k^T: each expert's current change of output on its rows
    else:
        solutions, outputs = list(start), [solver.output(u) for solver, u in zip(solvers, start)]
        for expert, output in zip(experts, outputs):
            residual.index_add_(0, expert.rows, -output)
    for _ in range(sweeps):
        moved = torch.zeros((), dtype=residual.dtype, device=residual.device)
        for k, (expert, solver) in enumerate(zip(experts, solvers)):
            solutions[k], output = solver.solve(residual[expert.rows] + outputs[k])
            step = outputs[k] - output
            residual.index_add_(0, expert.rows, step)
            moved += step.square().sum()
            outputs[k] = output
        if moved <= settled ** 2 * sum(o.square().sum() for o in outputs):  # one host sync per sweep
            break
    return solvers, solutions
