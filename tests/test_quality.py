"""The default `run` is within 2% of the best setting of README's Quality table, on both trained examples."""

from pathlib import Path

import pytest

from streammerge.evaluate import perplexity
from streammerge.pipeline import RunOptions, run

EXAMPLES = Path(__file__).parent.parent / "streammerge" / "examples"
HELDOUT = Path(__file__).parent.parent / "streammerge" / "data" / "heldout.txt"
# The best setting at ratio 0.5 in README's table (tools/quality.py) for each example.
BEST = {"upcycled": dict(method="prune-freq"), "scratch": dict(method="auto", feature="mean-output")}


@pytest.mark.slow
@pytest.mark.parametrize("example", sorted(BEST))
def test_default_is_within_two_percent_of_the_best_setting(example, tmp_path):
    def compressed_perplexity(name, **setting):
        run(EXAMPLES / example, tmp_path / name, RunOptions(ratio=0.5, device="cpu", **setting))
        return perplexity(tmp_path / name, HELDOUT, device="cpu")["perplexity"]

    assert compressed_perplexity("default") <= 1.02 * compressed_perplexity("best", **BEST[example])
