"""streammerge: compress Mixture-of-Experts checkpoints by merging experts, one layer at a time."""

import os

__version__ = "0.1.0"

# Read by torch once, at its first allocation, so it must be set before torch is imported: large CPU tensors
# then get 2 MB pages. Each expert's matmuls allocate hundreds of MB of fresh activations, and with 4 KB pages
# two Mixtral layers took 4.3 million page faults instead of 0.38 million (README "Performance").
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
