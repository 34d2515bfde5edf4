"""The options of `run` and `plan`, their allowed values and the checks that need no model.

Nothing here imports torch or transformers: the command line builds its help, parses its arguments and
reports argument errors from this module alone, without waiting seconds for those imports.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import InputError

DEFAULT_TEXT = Path(__file__).parent / "data" / "calibration.txt"
METHODS = ("hcsmoe", "prune-freq", "prune-reap", "auto")
FEATURES = ("mean-output", "token-distance")
LINKAGES = ("average", "single", "complete", "ward")
METRICS = ("euclidean", "cosine")
MERGES = ("freq", "avg")
ROUTERS = ("dominant", "freqavg", "lsefit", "kl")
PROPAGATIONS = ("original", "merged")
FITS = ("lsq", "none")
DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class RunOptions:
    ratio: float | None = None
    experts: int | None = None
    calib: Path = DEFAULT_TEXT
    samples: int = 32
    seqlen: int = 512
    batch: int = 4
    method: str = "auto"  # defaults chosen by tools/quality.py, see README "Quality"
    feature: str = "token-distance"
    linkage: str = "average"
    metric: str = "euclidean"
    merge: str = "freq"
    router: str = "dominant"
    propagate: str = "original"
    fit: str = "lsq"  # README "Quality": it wins every column
    eval_text: Path | None = None
    device: str = "auto"
    dtype: str = "auto"
    seed: int = 0
    restart: bool = False

    def as_json(self) -> dict:
        """The options as JSON values: numbers stay numbers, None is null, paths are strings."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def check_text_file(path: Path, option: str = "--calib") -> None:
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{option} {path} is a directory: pass a text or JSONL file")
    if not path.is_file():
        raise InputError(f"calibration file {path} does not exist: pass an existing text or JSONL file to {option}")


def check_options(options: RunOptions) -> None:
    """Refuse option values no run can use, before any state is built."""
    for name in ("samples", "seqlen", "batch"):
        value = getattr(options, name)
        if value < 1:
            raise InputError(f"--{name} {value} must be at least 1")
    check_text_file(options.calib)
    if options.eval_text is not None:
        check_text_file(options.eval_text, "--eval-text")


def check_target(ratio: float | None, experts: int | None) -> None:
    """What can be refused of --ratio / --experts before the model is read."""
    if (ratio is None) == (experts is None):
        raise InputError("give exactly one of --ratio (fraction of experts removed) or --experts (experts kept)")
    if ratio is not None and not 0 < ratio < 1:
        raise InputError(f"--ratio {ratio} must be strictly between 0 and 1 (the fraction of experts removed, e.g. 0.5)")
    if experts is not None and experts < 1:
        raise InputError(f"--experts {experts} must be at least 1 (the routed experts kept per layer)")


def target_experts(num_experts: int, ratio: float | None, experts: int | None) -> int:
    """K = E - round(E * ratio) (the REAP convention), or K given directly; K = E removes nothing and is refused."""
    check_target(ratio, experts)
    if experts is not None:
        if experts > num_experts:
            raise InputError(f"--experts {experts} is outside 1..{num_experts}: the model has {num_experts} experts per layer")
        if experts == num_experts:
            raise InputError(f"--experts {experts} keeps all {num_experts} experts, so nothing would be removed: "
                             f"pass fewer, e.g. --experts {num_experts // 2}")
        return experts
    k = num_experts - round(num_experts * ratio)
    if k < 1:
        raise InputError(f"--ratio {ratio} would leave no expert of {num_experts}: use a smaller ratio")
    if k == num_experts:
        raise InputError(f"--ratio {ratio} removes no expert of {num_experts} (it rounds to 0): use a larger ratio, "
                         f"e.g. {1 / num_experts:.4g} removes one")
    return k
