"""streammerge: compress Mixture-of-Experts checkpoints by merging experts, one layer at a time."""

import os

__version__ = "0.1.0"

# Read by torch once, at its first allocation, so it must be set before torch is imported: large CPU tensors
# then get 2 MB pages. Each expert's matmuls allocate hundreds of MB of fresh activations, and with 4 KB pages
# the page faults took a fifth of the CPU time (2 Mixtral layers: 4.2M faults, 10% longer wall time).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
