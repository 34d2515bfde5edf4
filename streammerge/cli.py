"""Command line: `streammerge run | eval | inspect | plan`.

torch and transformers are imported inside the commands, so `--help` and argument errors answer at once.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from . import __version__
from .errors import Interrupted, StreamMergeError
from .options import (DEFAULT_TEXT, DTYPES, FEATURES, FITS, LINKAGES, MERGES, METHODS, METRICS, PROPAGATIONS, ROUTERS,
                      RunOptions, check_target)
from .units import human_bytes

log = logging.getLogger("streammerge")


def _fail(message: str, exit_code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(exit_code)


class Commands(click.Group):
    """Every command's errors, and Ctrl-C at any moment (imports included), end in one line and an exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except StreamMergeError as error:
            _fail(str(error), error.exit_code)
        except KeyboardInterrupt as interrupt:
            # A plain KeyboardInterrupt comes before any work was saved (imports, checks, calibration, reading).
            _fail(str(interrupt) if isinstance(interrupt, Interrupted)
                  else "interrupted before anything was saved: re-run the same command to start again",
                  Interrupted.exit_code)


@click.group(cls=Commands)
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """Compress Mixture-of-Experts checkpoints by merging experts, one layer at a time."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")
    for noisy in ("transformers", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def run_options(command):
    """Options shared by `run` and `plan`."""
    options = [
        click.option("--ratio", type=float, help="Fraction of routed experts removed per layer (0.5 halves them)."),
        click.option("--experts", type=int, help="Routed experts kept per layer (instead of --ratio)."),
        click.option("--calib", type=click.Path(path_type=Path), default=DEFAULT_TEXT, show_default="bundled text",
                     help="Calibration text: plain text, or JSONL with a 'text' field."),
        click.option("--samples", type=int, default=32, show_default=True, help="Calibration windows."),
        click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per window."),
        click.option("--batch", type=int, default=4, show_default=True,
                     help="Windows per chunk: one chunk of hidden states is in memory at a time."),
        click.option("--method", type=click.Choice(METHODS), default="auto", show_default=True,
                     help="hcsmoe: merge clustered experts; prune-freq / prune-reap: drop the least used / least "
                          "salient; auto: per layer, whichever has the lowest MoE-block error on held-aside tokens."),
        click.option("--feature", type=click.Choice(FEATURES), default="token-distance", show_default=True,
                     help="What clustering compares: each expert's mean output (HC-SMoE), or the mean distance "
                          "between two experts' outputs token by token."),
        click.option("--linkage", type=click.Choice(LINKAGES), default="average", show_default=True),
        click.option("--metric", type=click.Choice(METRICS), default="euclidean", show_default=True,
                     help="Distance between expert features."),
        click.option("--merge", type=click.Choice(MERGES), default="freq", show_default=True,
                     help="freq: usage-frequency-weighted average (HC-SMoE); avg: plain average."),
        click.option("--router", type=click.Choice(ROUTERS), default="dominant", show_default=True,
                     help="Router row of a merged expert: most-used member's, frequency-weighted mean, least-squares "
                          "fit of the members' log-sum-exp, or fitted to the original router's group mass (KL)."),
        click.option("--propagate", type=click.Choice(PROPAGATIONS), default="original", show_default=True,
                     help="Next layer's calibration inputs: the original layer's outputs or the compressed one's."),
        click.option("--fit", type=click.Choice(FITS), default=RunOptions.fit, show_default=True,
                     help="lsq: re-solve the kept experts' down projections by least squares so that each compressed "
                          "MoE block reproduces the original's output; none: keep them as chosen."),
        click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:N."),
        click.option("--dtype", type=click.Choice(DTYPES), default="auto",
                     show_default=True, help="Compute dtype; auto: float32 on CPU, the weights' dtype on GPU."),
        click.option("--seed", type=int, default=0, show_default=True, help="Picks the calibration windows."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("out_dir", type=click.Path(path_type=Path))
@run_options
@click.option("--eval-text", type=click.Path(path_type=Path),
              help="Held-out text: report perplexity of the input and the output on it.")
@click.option("--restart", is_flag=True, help="Discard an unfinished or different run in OUT_DIR (only files streammerge made).")
def run(model_dir: Path, out_dir: Path, **kwargs) -> None:
    """Merge the experts of MODEL_DIR into a smaller checkpoint in OUT_DIR (resumes an interrupted run)."""
    check_target(kwargs["ratio"], kwargs["experts"])  # before the seconds of importing torch
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .pipeline import run as run_pipeline

    with logging_redirect_tqdm():
        summary = run_pipeline(model_dir, out_dir, RunOptions(**kwargs))
    params, size = summary["parameters"], summary["bytes"]
    click.echo(
        f"done: {out_dir}\n"
        f"  experts     {summary['experts']}\n"
        + (f"  top-k       {summary['top_k'][0]} -> {summary['top_k'][1]} (experts per token, lowered: fewer experts "
           f"are kept than each token was routed to)\n" if summary["top_k"][0] != summary["top_k"][1] else "")
        + f"  parameters  {params[0]:,} -> {params[1]:,} ({params[1] / params[0]:.1%})\n"
        f"  size        {human_bytes(size[0])} -> {human_bytes(size[1])}\n"
        f"  time        {summary['seconds']} s"
    )
    unfitted, errors = summary["unfitted_block_errors"], summary["block_errors"]
    if unfitted:
        click.echo(f"  block error {' '.join(f'{e:.3f}' for e in unfitted.values())} before the fit "
                   f"(relative MoE output error per MoE layer, mean {sum(unfitted.values()) / len(unfitted):.3f})")
        click.echo(f"              {' '.join(f'{e:.3f}' for e in errors.values())} after "
                   f"(mean {sum(errors.values()) / len(errors):.3f})")
    elif errors:
        click.echo(f"  block error {' '.join(f'{e:.3f}' for e in errors.values())} "
                   f"(relative MoE output error per MoE layer, mean {sum(errors.values()) / len(errors):.3f})")
    if summary["perplexity"]:
        ppl = summary["perplexity"]
        click.echo(f"  perplexity  {ppl['before']:.3f} -> {ppl['after']:.3f} on {ppl['text']} "
                   f"({ppl['after'] / ppl['before']:.3f}x)")


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--text", type=click.Path(path_type=Path), required=True,
              help="Held-out text: plain text, or JSONL with a 'text' field.")
@click.option("--tokens", type=int, default=16384, show_default=True, help="Tokens evaluated, from the start of the text.")
@click.option("--seqlen", type=int, default=512, show_default=True, help="Tokens per window.")
@click.option("--batch", type=int, default=4, show_default=True,
              help="Windows per chunk: one chunk of hidden states is in memory at a time.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, cuda, cuda:N.")
@click.option("--dtype", type=click.Choice(DTYPES), default="auto",
              show_default=True, help="Compute dtype; auto: float32 on CPU, the weights' dtype on GPU.")
def eval(model_dir: Path, text: Path, **kwargs) -> None:
    """Perplexity of MODEL_DIR on held-out text, streamed one layer at a time."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .evaluate import perplexity

    with logging_redirect_tqdm():
        result = perplexity(model_dir, text, **kwargs)
    click.echo(
        f"perplexity {result['perplexity']:.2f} over {result['tokens']:,} predicted tokens "
        f"({result['windows']} windows of {kwargs['seqlen']})"
    )


@main.command()
@click.argument("directory", type=click.Path(path_type=Path))
def inspect(directory: Path) -> None:
    """Show the MoE structure of a model or output directory, and whether a run there is complete."""
    from .journal import Journal
    from .model import Model, check_directory

    check_directory(directory, "DIRECTORY")
    journal = Journal(directory)
    status = journal.status()
    try:
        model = Model.open(directory, check_tensors=False)
    except StreamMergeError:
        if status != "in_progress":
            raise
        model = None
    if model is not None:
        spec, config, reader = model.spec, model.config, model.reader
        moe = spec.moe_layers(config)
        click.echo(
            f"{directory}: {spec.family} ({config.model_type})\n"
            f"  layers      {config.num_hidden_layers} ({len(moe)} MoE)\n"
            f"  experts     {spec.num_experts(config)} routed per MoE layer, top-{spec.top_k(config)}; "
            f"shared: {spec.shared_expert}\n"
            f"  parameters  {reader.num_parameters():,}\n"
            f"  size        {human_bytes(reader.nbytes(reader.names()))}"
        )
    if status == "in_progress":
        manifest = journal.manifest()
        done = len(journal.finished(manifest["num_layers"], prune=False))
        click.echo(f"  run         in progress: {done} of {manifest['num_layers']} layers done "
                   f"(re-run the same `streammerge run` command to resume)")
    elif status == "complete":
        try:
            Model.open(directory).reader.read([])
            click.echo("  run         complete (streammerge output)")
        except StreamMergeError as error:
            click.echo(f"  run         damaged: {error}")
            sys.exit(1)


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@run_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON.")
def plan(model_dir: Path, as_json: bool, **kwargs) -> None:
    """Estimate what `run` on MODEL_DIR needs (memory, disk, work) from config.json and headers alone.

    MODEL_DIR may hold only config.json; no weights are read and no device is touched, so e.g. `--device cuda`
    plans for a GPU from any machine.
    """
    import json

    check_target(kwargs["ratio"], kwargs["experts"])  # before the seconds of importing torch
    from .plan import describe, plan_model

    result = plan_model(model_dir, RunOptions(**kwargs))
    click.echo(json.dumps(result.as_dict(), indent=2) if as_json else describe(result))
