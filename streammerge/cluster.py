"""Grouping experts: agglomerative clustering into exactly K groups, or pruning to K (pure math, no IO)."""

from __future__ import annotations

import numpy as np
import torch
from scipy.cluster.hierarchy import cut_tree, linkage as scipy_linkage
from scipy.spatial.distance import squareform

from .errors import InputError


def cluster_experts(k: int, linkage: str = "average", metric: str = "euclidean",
                    features: np.ndarray | None = None, distances: np.ndarray | None = None) -> list[list[int]]:
    """Partition experts into `k` groups, ordered by their smallest member, from `features` [E, D]
    (compared with `metric`) or from a precomputed symmetric `distances` [E, E] matrix.

    `complete` is the standard farthest-point linkage (the official HC-SMoE code's variant merges the
    farthest pair instead, which is not complete linkage).
    """
    if linkage == "ward" and (metric != "euclidean" or distances is not None):
        raise InputError("ward linkage needs euclidean distances between feature vectors: use --metric euclidean "
                         "and --feature mean-output, or another --linkage")
    experts = len(features) if features is not None else len(distances)
    if k >= experts:
        return [[e] for e in range(experts)]
    if k == 1:
        return [list(range(experts))]
    if distances is not None:
        tree = scipy_linkage(squareform(np.asarray(distances, dtype=np.float64), checks=False), method=linkage)
    else:
        tree = scipy_linkage(np.asarray(features, dtype=np.float64), method=linkage, metric=metric)
    labels = cut_tree(tree, n_clusters=k).ravel()
    groups: dict[int, list[int]] = {}
    for expert, label in enumerate(labels):
        groups.setdefault(int(label), []).append(expert)
    return sorted(groups.values(), key=lambda members: members[0])


def prune_experts(scores: torch.Tensor, k: int) -> list[list[int]]:
    """Keep the `k` highest-scoring experts (ties to the lower index), in their original order."""
    order = sorted(range(len(scores)), key=lambda e: (-float(scores[e]), e))
    return [[e] for e in sorted(order[:k])]
