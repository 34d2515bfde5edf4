"""Re-solving a compressed MoE block's down projections so that it reproduces the original block (pure math).

Minimize over the kept experts' down projections W_1..W_K

    sum_x || y(x) - sum_{k in topk'(x)} g'_k(x) W_k h_k(x) ||^2  +  sum_k lam_k || W_k - W_k0 ||^2

where y is the original block's output, topk' and g' the compressed router's choice and weights, h_k the kept
expert's down-projection input and W_k0 its current weights; lam_k = rho x the mean diagonal of expert k's Gram.
Experts that share tokens under top-k are coupled, and must be solved together (solving each alone against the
others' unchanged outputs gains almost nothing). Written with Phi [N, sum I] (token x's row holds g'_k(x) h_k(x)
in the block of each expert k it reaches), the stacked changes w and Lam the lam_k on their blocks, the minimizer
of ||r - Phi w||^2 + w^T Lam w, r = y - (the block with the W_k0), is

    w = (Phi^T Phi + Lam)^-1 Phi^T r            (sum I unknowns: K*I = 57,344 for Mixtral at K = 4)
      = Lam^-1 Phi^T (Phi Lam^-1 Phi^T + I)^-1 r (N unknowns: the fitted tokens, FIT_TOKENS at most)

and `JointSystem` solves whichever is smaller, exactly: the second is built expert by expert from each one's own
T x T Gram A_k A_k^T, so the joint solution never needs a (K*I)^2 matrix, and it costs one N x N factorization
per ridge. The systems are solved in float64: with a weak ridge they are too ill-conditioned for float32.

How strongly to pull towards the current weights is chosen per layer on held-out tokens (`fit_on_held_out`): with
fewer routed tokens than inputs (Mixtral: ~4k per expert against I = 14,336) a weak ridge fits the calibration
tokens and not the model. Each ridge's held-out error comes in closed form from the held-out tokens' own down-
projection inputs B: their change of output is B D^T, so no change is formed and no expert runs to choose it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RIDGE = 1e-3  # rho of `fit_down_projections`
RIDGES = (10.0, 1.0, 1e-1, 1e-2, 1e-3)  # tried on held-out tokens (fit_on_held_out)


@dataclass
class Routed:
    """One expert's calibration rows: `rows` [T] indices into the residual, `inputs` A [T, I] its
    down-projection inputs already multiplied by the token's router weight (a column of those weights last when
    the projection has a bias)."""

    rows: torch.Tensor
    inputs: torch.Tensor


class JointSystem:
    """The fit's normal equations for experts routed on `tokens` rows, solved in token space (N x N) when there
    are fewer rows than inputs in all, else in input space; `solve` takes any right-hand side r [N, H] and rho."""

    def __init__(self, experts: list[Routed], tokens: int):
        self.experts = experts
        self.scales = [(e.inputs.square().sum().double() / e.inputs.shape[1]).clamp(min=torch.finfo(torch.float32).tiny)
                       for e in experts]  # mean Gram diagonals; an expert whose inputs are all 0 keeps its weights
        self.sizes = [e.inputs.shape[1] for e in experts]
        self.token_space = tokens < sum(self.sizes)
        device = experts[0].inputs.device
        if self.token_space:  # sum_k S_k A_k A_k^T S_k^T / m_k: the Grams, scattered to the rows they share
            self.matrix = torch.zeros(tokens, tokens, dtype=torch.float64, device=device)
            for e, scale in zip(experts, self.scales):
                self.matrix[e.rows[:, None], e.rows[None, :]] += (e.inputs @ e.inputs.T).double() / scale
        else:
            self.phi = torch.zeros(tokens, sum(self.sizes), dtype=torch.float64, device=device)
            start = 0
            for e, size in zip(experts, self.sizes):
                self.phi[e.rows, start:start + size] = e.inputs.double()
                start += size
            self.matrix = self.phi.T @ self.phi
            self.penalty = torch.cat([scale.expand(size) for scale, size in zip(self.scales, self.sizes)])

    def right_side(self, residual: torch.Tensor) -> torch.Tensor:
        """What `solve` takes for the residual r [N, H]: r itself, or Phi^T r."""
        return residual.double() if self.token_space else self.phi.T @ residual.double()

    def solve(self, right_side: torch.Tensor, ridge: float) -> torch.Tensor | None:
        """(sum_k S_k A_k A_k^T S_k^T / m_k + rho)^-1, or (Phi^T Phi + rho Lam)^-1, applied to `right_side`: for
        `right_side(r)` the solution beta [N, H] (then D_k^T = A_k^T beta_k / m_k) or w [sum I, H]. None when
        the system cannot be factored (inputs that are not finite)."""
        system = self.matrix.clone()
        system.diagonal().add_(ridge if self.token_space else ridge * self.penalty)
        factor, info = torch.linalg.cholesky_ex(system)
        if info.item():
            return None
        return torch.cholesky_solve(right_side, factor)

    def changes(self, solution: torch.Tensor) -> "Changes":
        """What forms the experts' changes from a solution, without the system."""
        return Changes(self.experts, self.scales, self.sizes, self.token_space, solution)

    def fitted_output(self, residual: torch.Tensor, solution: torch.Tensor, ridge: float) -> torch.Tensor:
        """Phi w [N, H], the change of the block's output on the fitted rows (in token space r - rho beta)."""
        if self.token_space:
            return residual.double() - ridge * solution
        return self.phi @ solution

    def held_out(self, held_out: list[Routed], rows: int) -> torch.Tensor:
        """The matrix [rows, side] that maps a solution to the change of output on held-out tokens
        (`held_out[k]` expert k's rows and inputs B_k there), the same for every ridge: B_k A_k^T / m_k at
        expert k's rows of the solution, or B_k at its block."""
        operator = torch.zeros(rows, self.matrix.shape[0], dtype=torch.float64, device=self.matrix.device)
        start = 0
        for e, h, scale, size in zip(self.experts, held_out, self.scales, self.sizes):
            if self.token_space:
                operator[h.rows[:, None], e.rows[None, :]] += (h.inputs @ e.inputs.T).double() / scale
            else:
                operator[h.rows, start:start + size] = h.inputs.double()
                start += size
        return operator


@dataclass
class Changes:
    """A solution and what it takes to form each expert's change from it: kept while the fit's candidate may be
    chosen, formed (`form`) once it is."""

    experts: list[Routed]
    scales: list[torch.Tensor]
    sizes: list[int]
    token_space: bool
    solution: torch.Tensor

    def form(self, k: int) -> torch.Tensor:
        """Expert k's D_k [H, I_k], in its inputs' dtype: one at a time, each as large as a down projection."""
        e = self.experts[k]
        if self.token_space:  # D_k^T = A_k^T beta_k / m_k, the largest product: not in float64
            return (e.inputs.T @ (self.solution[e.rows] / self.scales[k]).to(e.inputs.dtype)).T
        return self.solution.split(self.sizes)[k].T.to(e.inputs.dtype)


def fit_down_projections(experts: list[Routed], residual: torch.Tensor, ridge: float = RIDGE) -> list[torch.Tensor]:
    """Each expert's change of down projection D_k [H, I] (its weights become W_k0 + D_k; with a bias, its
    last column is the bias's change), from `residual` [N, H] = y - (the block's output with the W_k0).
    `residual` is updated in place to the fitted block's residual."""
    system = JointSystem(experts, residual.shape[0])
    solution = system.solve(system.right_side(residual), ridge)
    residual -= system.fitted_output(residual, solution, ridge).to(residual.dtype)
    changes = system.changes(solution)
    return [changes.form(k) for k in range(len(experts))]


def fit_on_held_out(experts: list[Routed], residual: torch.Tensor, held_out: list[Routed],
                    held_residual: torch.Tensor, ridges: tuple[float, ...] = RIDGES) -> tuple[Changes | None, float]:
    """The changes (as `fit_down_projections`, to be formed) with the ridge of `ridges` that leaves the least
    residual on the held-out tokens, and that residual's norm; None and the unchanged norm when no ridge lowers
    it. `held_out[k]` holds expert k's rows and down-projection inputs (gated, as `experts[k]`) on those tokens,
    `held_residual` [M, H] their y - (the block's output with the W_k0).

    Each ridge's held-out change is L S^-1 R (`JointSystem.held_out` L [M, side], the system S, R its right
    side [side, H]), solved with whichever of L^T and R has fewer columns: the M held-out tokens are fewer than
    the H outputs in every real model, so only the chosen ridge's solution is solved for in full."""
    system = JointSystem(experts, residual.shape[0])
    right_side = system.right_side(residual)
    operator = system.held_out(held_out, len(held_residual))
    target = held_residual.double()
    chosen, best_norm = None, target.norm().item()
    for ridge in ridges:
        if len(operator) < right_side.shape[1]:
            mapped = system.solve(operator.T, ridge)
            change = None if mapped is None else mapped.T @ right_side
        else:
            solution = system.solve(right_side, ridge)
            change = None if solution is None else operator @ solution
        if change is None:
            continue
        norm = (target - change).norm().item()
        if norm < best_norm:
            chosen, best_norm = ridge, norm
    if chosen is None:
        return None, best_norm
    return system.changes(system.solve(right_side, chosen)), best_norm
