"""Agglomerative clustering of experts into exactly K groups (pure math, no IO)."""

from __future__ import annotations

import numpy as np
from scipy.cluster.hierarchy import cut_tree, linkage as scipy_linkage

from .errors import InputError

LINKAGES = ("average", "single", "complete", "ward")
METRICS = ("euclidean", "cosine")


def cluster_experts(features: np.ndarray, k: int, linkage: str = "average",
                    metric: str = "euclidean") -> list[list[int]]:
    """Partition the rows of `features` [E, D] into `k` clusters, ordered by their smallest member.

    `complete` is the standard farthest-point linkage (the official HC-SMoE code's variant merges the
    farthest pair instead, which is not complete linkage).
    """
    if linkage == "ward" and metric != "euclidean":
        raise InputError("ward linkage needs --metric euclidean")
    features = np.asarray(features, dtype=np.float64)
    experts = features.shape[0]
    if k >= experts:
        return [[e] for e in range(experts)]
    if k == 1:
        return [list(range(experts))]
    tree = scipy_linkage(features, method=linkage, metric=metric)
    labels = cut_tree(tree, n_clusters=k).ravel()
    clusters: dict[int, list[int]] = {}
    for expert, label in enumerate(labels):
        clusters.setdefault(int(label), []).append(expert)
    return sorted(clusters.values(), key=lambda members: members[0])
