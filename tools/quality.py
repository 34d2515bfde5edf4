"""Quality matrix: method × feature × router × propagation × output fit × ratio on the example MoEs, into README.md.

    python tools/quality.py              # runs everything, rewrites the "Quality" table in README.md
    python tools/quality.py --no-readme  # prints the table only

Every cell is the held-out perplexity of the compressed model divided by the original's, on
streammerge/data/heldout.txt, with the calibration defaults of `streammerge run`.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
from itertools import product
from pathlib import Path

import click

from readme import write_section
from streammerge.evaluate import perplexity
from streammerge.options import DEFAULT_TEXT, FEATURES, PROPAGATIONS, ROUTERS, RunOptions
from streammerge.pipeline import run

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "streammerge" / "examples"
HELDOUT = DEFAULT_TEXT.parent / "heldout.txt"
DEFAULT = dict(method=RunOptions.method, feature=RunOptions.feature, router=RunOptions.router,
               propagate=RunOptions.propagate, fit=RunOptions.fit)


def settings() -> list[dict]:
    """The settings worth comparing. Unfitted (`--fit none`): features and routers are compared with the paper's
    propagation (original); propagation is then compared on the settings where it can matter. For pruning the
    feature and router do not matter. Fitted (`--fit lsq`): every method, then `auto` with the compressed
    layers' outputs propagated (each layer fitted on the inputs the fitted layers before it give, as GPTQ does)
    and with router rows fitted too (`--router kl`)."""
    merging = [dict(method="hcsmoe", feature=f, router=r, propagate="original") for f, r in product(FEATURES, ROUTERS)]
    merging.append(dict(method="hcsmoe", feature="mean-output", router="kl", propagate="merged"))
    pruning = [dict(method=m, propagate=p) for m, p in product(("prune-freq", "prune-reap"), PROPAGATIONS)]
    automatic = [dict(method="auto", feature="mean-output", router=r, propagate=p)
                 for r, p in product(("dominant", "kl"), PROPAGATIONS)]
    unfitted = [dict(s, fit="none") for s in merging + pruning + automatic]
    fitted = [dict(method="hcsmoe", feature=f, router="dominant", propagate="original") for f in FEATURES]
    fitted += [dict(method=m, propagate="original") for m in ("prune-freq", "prune-reap")]
    fitted += [dict(method="auto", feature="token-distance", router=r, propagate=p)
               for r, p in (("dominant", "original"), ("dominant", "merged"), ("kl", "original"))]
    return unfitted + [dict(s, fit="lsq") for s in fitted]


def label(setting: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in setting.items())


def measure(model: Path, ratios: list[float], work: Path) -> tuple[float, dict]:
    base = perplexity(model, HELDOUT, device="cpu")["perplexity"]
    results = {}
    fitted_first = sorted(settings(), key=lambda s: s["fit"] == "none")  # the new rows show early in the log
    for setting, ratio in product(fitted_first, ratios):
        out = work / f"{model.name}-{len(results)}"
        run(model, out, RunOptions(ratio=ratio, device="cpu", **setting))
        ppl = perplexity(out, HELDOUT, device="cpu")["perplexity"]
        layers = json.loads((out / "streammerge.json").read_text())["layers"]
        chosen = sorted({layer["method"] for layer in layers})
        results[(label(setting), ratio)] = (ppl / base, chosen)
        logging.info("%s ratio %s: ppl %.3f (x%.3f) %s", label(setting), ratio, ppl, ppl / base, chosen)
    return base, results


def table(measured: dict, ratios: list[float]) -> str:
    models = list(measured)
    head = "| setting | " + " | ".join(f"{m} r={r}" for m in models for r in ratios) + " |"
    rows = [head, "|" + "---|" * (1 + len(models) * len(ratios))]
    best = {(m, r): min(v[0] for (s, rr), v in measured[m][1].items() if rr == r) for m in models for r in ratios}
    for setting in settings():
        cells = []
        for m, r in product(models, ratios):
            value, chosen = measured[m][1][(label(setting), r)]
            text = f"×{value:.3f}" + (f" ({'+'.join(chosen)})" if setting["method"] == "auto" else "")
            if setting == DEFAULT:
                text += " ← default"
            cells.append(f"**{text}**" if value == best[(m, r)] else text)
        rows.append(f"| {label(setting)} | " + " | ".join(cells) + " |")
    bases = ", ".join(f"{m} {measured[m][0]:.2f}" for m in models)
    return "\n".join(rows) + f"\n\nOriginal held-out perplexity: {bases}. Bold: best in its column.\n"


@click.command()
@click.option("--model", "models", multiple=True, default=("upcycled", "scratch"), show_default=True,
              help="Example names under streammerge/examples.")
@click.option("--ratio", "ratios", multiple=True, type=float, default=(0.25, 0.5), show_default=True)
@click.option("--readme/--no-readme", default=True, help="Rewrite the Quality table in README.md.")
def main(models, ratios, readme):
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("streammerge").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="streammerge-quality-") as work:
        measured = {m: measure(EXAMPLES / m, list(ratios), Path(work)) for m in models}
    command = "python tools/quality.py " + " ".join(sys.argv[1:])
    text = f"Made by `{command.strip()}`.\n\n{table(measured, list(ratios))}"
    print(text)
    if readme:
        write_section("quality", text)


if __name__ == "__main__":
    main()
