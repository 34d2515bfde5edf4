"""streammerge: compress Mixture-of-Experts checkpoints by merging experts, one layer at a time."""

__version__ = "0.1.0"
