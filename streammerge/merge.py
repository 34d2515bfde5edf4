"""Merging a layer's expert weights and router rows, cluster by cluster (pure math, no IO)."""

from __future__ import annotations

import torch

MERGES = ("freq", "avg")
ROUTERS = ("dominant",)


def member_weights(members: list[int], frequencies: torch.Tensor, merge: str) -> torch.Tensor:
    """Averaging weights of a cluster's members: usage frequency (HC-SMoE `freq`) or uniform."""
    if merge == "avg":
        return torch.full((len(members),), 1.0 / len(members), dtype=torch.float64)
    freq = frequencies[members].double()
    if freq.sum() == 0:  # no member was ever selected: nothing to weight by
        return torch.full((len(members),), 1.0 / len(members), dtype=torch.float64)
    return freq / freq.sum()


def merge_tensors(tensors: list[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Weighted element-wise average in float32, returned in the inputs' dtype."""
    merged = torch.zeros(tensors[0].shape, dtype=torch.float32)
    for tensor, weight in zip(tensors, weights.tolist()):
        merged += tensor.float() * weight
    return merged.to(tensors[0].dtype)


def router_rows(router: torch.Tensor, clusters: list[list[int]], frequencies: torch.Tensor,
                method: str = "dominant") -> torch.Tensor:
    """One router row per cluster; `dominant` takes the most-used member's row."""
    rows = [router[max(members, key=lambda e: (frequencies[e].item(), -e))] for members in clusters]
    return torch.stack(rows).contiguous()
