"""Merging a layer's expert weights and router rows, group by group (pure math, no IO).

A layer's plan is a list of groups of original experts; each group becomes one expert of the output.
Merging gives groups that cover every expert; pruning gives singletons of the kept experts.
"""

from __future__ import annotations

import torch


def member_weights(members: list[int], frequencies: torch.Tensor, merge: str) -> torch.Tensor:
    """Averaging weights of a group's members: usage frequency (HC-SMoE `freq`) or uniform."""
    freq = frequencies[members].double()
    if merge == "avg" or freq.sum() == 0:  # a group no token ever chose has nothing to weight by
        return torch.full((len(members),), 1.0 / len(members), dtype=torch.float64)
    return freq / freq.sum()


MERGE_BLOCK = 1 << 18  # elements: a float32 block of 1 MB stays in cache while every member is added


def merge_tensors(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Weighted element-wise average in float32, returned in the inputs' dtype.

    Block by block, so the float32 sums never exist for the whole tensor and each block is summed while in
    cache (3x faster than whole-tensor passes on a Mixtral expert), with the same values.
    """
    if len(tensors) == 1:
        return tensors[0]
    flat, weights = [t.reshape(-1) for t in tensors], weights.tolist()
    merged = torch.empty(flat[0].shape, dtype=tensors[0].dtype)
    for start in range(0, len(merged), MERGE_BLOCK):
        block = slice(start, start + MERGE_BLOCK)
        total = flat[0][block].to(torch.float32, copy=True).mul_(weights[0])
        for tensor, weight in zip(flat[1:], weights[1:]):
            total.add_(tensor[block], alpha=weight)  # promotes in place: no float32 copy of the member
        merged[block] = total
    return merged.view(tensors[0].shape)


def group_mass(logits: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """Each group's share of the router's softmax mass [N, K], renormalized over the kept experts."""
    probs = torch.softmax(logits.double(), dim=-1)
    mass = torch.stack([probs[:, g].sum(-1) for g in groups], dim=-1)
    return mass / mass.sum(-1, keepdim=True)


def router_rows(router: torch.Tensor, groups: list[list[int]], frequencies: torch.Tensor,
                method: str, inputs: torch.Tensor | None = None, ridge: float = 1e-3) -> torch.Tensor:
    """One router row per group; a singleton keeps its own row whatever the method.

    - `dominant`: the most-used member's row;
    - `freqavg`: the frequency-weighted mean of the members' rows;
    - `lsefit`: least squares on calibration router inputs `inputs` [N, H] of the log-sum-exp of the
      members' logits (the log of the group's softmax mass, up to a per-token constant that the softmax
      ignores), ridge-pulled towards `freqavg` because N may be below H;
    - `kl`: starts from `lsefit` and minimizes KL(group mass of the original router || softmax of the
      new router) on `inputs`, so the reduced router reproduces how the original splits its mass.
    The routers in the table have no bias, so none is fitted.
    """
    rows = []
    for members in groups:
        if len(members) == 1 or method == "dominant":
            rows.append(router[max(members, key=lambda e: (frequencies[e].item(), -e))].float())
        else:
            rows.append((router[members].float() * member_weights(members, frequencies, "freq")[:, None].float()).sum(0))
    rows = torch.stack(rows)
    if method in ("lsefit", "kl") and any(len(g) > 1 for g in groups):
        rows = _fit(router.float(), groups, rows, inputs.float(), method, ridge)
    return rows.to(router.dtype).contiguous()


def router_vector(vector: torch.Tensor, groups: list[list[int]], frequencies: torch.Tensor, method: str,
                  dim: int = 0) -> torch.Tensor:
    """One entry per group of a per-expert router vector (`e_score_correction_bias`, `router.bias`,
    `expert_bias`, ERNIE's [1, E] statics along dim 1), sliced or merged along the expert axis `dim` as the
    router rows are: a singleton keeps its own entry, `dominant` the most-used member's, other methods the
    frequency-weighted mean of the members'."""
    moved = vector.movedim(dim, 0)
    entries = []
    for members in groups:
        if len(members) == 1 or method == "dominant":
            entries.append(moved[max(members, key=lambda e: (frequencies[e].item(), -e))].float())
        else:
            weights = member_weights(members, frequencies, "freq").float()
            entries.append((moved[members].float() * weights.view(-1, *([1] * (moved.dim() - 1)))).sum(0))
    return torch.stack(entries).to(vector.dtype).movedim(0, dim).contiguous()


def _fit(router, groups, start, x, method, ridge):
    logits = x @ router.T
    gram = x.T @ x / len(x)
    scale = ridge * gram.diagonal().mean()
    system = gram + scale * torch.eye(gram.shape[0])
    rows = start.clone()
    for k, members in enumerate(groups):
        if len(members) > 1:
            target = torch.logsumexp(logits[:, members], dim=-1)
            rows[k] = torch.linalg.solve(system, x.T @ target / len(x) + scale * start[k])
    if method == "lsefit":
        return rows
    mass = group_mass(logits, groups).float()
    rows = rows.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([rows], max_iter=200, line_search_fn="strong_wolfe")

    def loss_fn():
        optimizer.zero_grad()
        log_q = torch.log_softmax(x @ rows.T, dim=-1)
        loss = -(mass * log_q).sum(-1).mean() + scale * ((rows - start) ** 2).sum() / 2
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(loss_fn)
    return rows.detach()
