"""Memory and speed benchmark at real layer sizes (a benchmark, not a test; takes minutes and ~40 GB of disk).

    python tools/bench.py [--config tests/configs/mistralai__Mixtral-8x7B-v0.1.json] [--layers 2 8]
                          [--samples 4] [--seqlen 256] [--batch 2] [--dtype float32] [--work DIR] [--readme]

Writes synthetic checkpoints (tools/make_synthetic.py) with the config's real layer dimensions and the given
layer counts, runs `streammerge run` on each in a child process, and prints in one run:
  (a) peak RSS with the fewest and the most layers, and their ratio (flat memory in depth);
  (b) peak RSS / (one layer's bytes + one calibration chunk + interpreter baseline), the baseline measured here
      as the peak RSS of a process that imports streammerge and exits;
  (c) wall time / floor of the larger model's `--fit none` run, floor = bytes read and written at this disk's
      measured rates + the statistics' FLOPs (every expert on every calibration token) at this CPU's rate for an
      expert's matmuls (fused gate-up, then down), measured just before and just after that run and averaged (a shared machine's rate drifts by
      tens of percent within minutes). The read rate is that of the larger run's own input, read again after
      the run with the page cache dropped: a file written just before reads back several times faster, from
      the host's cache (it is shown beside it), which the run's input does not;
  (d) the default run's (`--fit lsq`) wall time against the `--fit none` run's;
  (e) `streammerge plan`'s host-memory estimate against the measured peak RSS.
With --readme the table replaces the "Performance" section's table in README.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
# streammerge first: its allocator setting (streammerge/__init__.py) must precede torch, so that the matmul rate
# is measured as the runs compute.
from streammerge.checkpoint import drop_cached
import torch

from readme import write_section

ROOT = Path(__file__).resolve().parent.parent
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
RATE_SECONDS = 30


def child(command: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of a child process."""
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - started
    if status:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read().decode()[-3000:]}")
    return wall, usage.ru_maxrss * 1024


def fresh_file_rates(work: Path, size: int = 1 << 30) -> tuple[float, float]:
    """Sequential write rate (with fsync) of a new file in bytes/s, and the rate at which it reads back with the
    page cache dropped (for comparison only: the host still caches it)."""
    path = work / "disk-rate.bin"
    block = os.urandom(1 << 24)
    started = time.monotonic()
    with open(path, "wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write = size / (time.monotonic() - started)
    fresh_read = read_rate([path])
    path.unlink()
    return write, fresh_read


def read_rate(paths: list[Path]) -> float:
    """Sequential read rate in bytes/s of the files, with their pages dropped from the page cache first."""
    for path in paths:
        drop_cached(path)
    total, started = 0, time.monotonic()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while block := f.read(1 << 24):
                total += len(block)
    return total / (time.monotonic() - started)


def matmul_rate(tokens: int, hidden: int, inter: int, dtype: torch.dtype) -> float:
    """FLOP/s of an expert's two matmuls in the compute dtype, in the shapes transformers stores them: the
    fused gate and up projection [2·inter, hidden], then the down projection [hidden, inter]. The down
    projection's shape runs a few percent slower than the gate-up's on this CPU, so a rate taken on one
    projection alone would understate the floor. Only the matmuls are timed: their outputs are allocated
    once, and nothing else of the expert (the activation) runs. Timed over RATE_SECONDS: over 10 s, the two
    measurements around one run differed by up to a third."""
    x, h = torch.randn(tokens, hidden, dtype=dtype), torch.randn(tokens, inter, dtype=dtype)
    gate_up, down = torch.randn(2 * inter, hidden, dtype=dtype), torch.randn(hidden, inter, dtype=dtype)
    gate_up_out, down_out = torch.empty(tokens, 2 * inter, dtype=dtype), torch.empty(tokens, hidden, dtype=dtype)

    def expert():
        torch.mm(x, gate_up.t(), out=gate_up_out)
        torch.mm(h, down.t(), out=down_out)

    expert()
    repeats, started = 0, time.monotonic()
    while time.monotonic() - started < RATE_SECONDS:
        expert()
        repeats += 1
    return repeats * 2 * 3 * tokens * hidden * inter / (time.monotonic() - started)


def synthesize(config: Path, layers: int, work: Path) -> None:
    model = work / f"model-{layers}"
    if not (model / "config.json").exists():
        subprocess.run([sys.executable, str(ROOT / "tools" / "make_synthetic.py"), str(config), str(model),
                        "--layers", str(layers)], check=True)


def measure(layers: int, options: list[str], work: Path) -> dict:
    model, out = work / f"model-{layers}", work / f"out-{layers}"
    # --fit none is the wall-time floor's run; the default (--fit lsq) runs as users run it
    plan = json.loads(subprocess.run([sys.executable, "-m", "streammerge", "plan", str(model), *options, "--json"],
                                     check=True, capture_output=True, text=True).stdout)
    shards = list(model.glob("*.safetensors"))
    for shard in shards:
        drop_cached(shard)
    subprocess.run(["rm", "-rf", str(out)], check=True)
    wall, rss = child([sys.executable, "-m", "streammerge", "run", str(model), str(out), *options])
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    return dict(layers=layers, wall=wall, rss=rss, plan=plan, read=sum(p.stat().st_size for p in shards),
                written=written, shards=shards)


@click.command()
@click.option("--config", type=click.Path(exists=True, path_type=Path),
              default=ROOT / "tests" / "configs" / "mistralai__Mixtral-8x7B-v0.1.json", show_default=True)
@click.option("--layers", nargs=2, type=int, default=(2, 8), show_default=True)
@click.option("--samples", type=int, default=4, show_default=True)
@click.option("--seqlen", type=int, default=256, show_default=True)
@click.option("--batch", type=int, default=2, show_default=True)
@click.option("--dtype", type=click.Choice(sorted(DTYPES)), default="float32", show_default=True)
@click.option("--work", type=click.Path(path_type=Path), help="Where checkpoints go (kept for reruns).")
@click.option("--readme", is_flag=True, help="Write the table into README.md.")
def main(config, layers, samples, seqlen, batch, dtype, work, readme):
    work = Path(work or tempfile.mkdtemp(prefix="streammerge-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    options = ["--ratio", "0.5", "--samples", str(samples), "--seqlen", str(seqlen), "--batch", str(batch),
               "--device", "cpu", "--dtype", dtype]
    _, baseline = child([sys.executable, "-c", "import streammerge.cli, streammerge.pipeline, streammerge.plan"])
    raw = json.loads(config.read_text())
    hidden, inter = raw["hidden_size"], raw.get("moe_intermediate_size") or raw["intermediate_size"]
    experts = raw.get("num_local_experts") or raw.get("num_experts")
    for n in layers:
        synthesize(config, n, work)
    small = measure(layers[0], options, work)
    written_rate, fresh_read_rate = fresh_file_rates(work)
    rates = [matmul_rate(batch * seqlen, hidden, inter, DTYPES[dtype])]
    unfitted = measure(layers[1], [*options, "--fit", "none"], work)
    rates.append(matmul_rate(batch * seqlen, hidden, inter, DTYPES[dtype]))
    large = measure(layers[1], options, work)
    rate = sum(rates) / 2
    input_read_rate = read_rate(large["shards"])

    tokens = samples * seqlen
    stats_flops = large["layers"] * experts * tokens * 2 * 3 * hidden * inter
    matmuls = stats_flops / rate
    floor = unfitted["read"] / input_read_rate + unfitted["written"] / written_rate + matmuls
    fresh_floor = unfitted["read"] / fresh_read_rate + unfitted["written"] / written_rate + matmuls
    layer_bytes = large["read"] / large["layers"]  # embeddings are small next to a Mixtral-size layer
    chunk = batch * seqlen * hidden * DTYPES[dtype].itemsize
    bound = layer_bytes + chunk + baseline
    gb = 1e9
    rows = [
        ("peak RSS, %d layers" % small["layers"], f"{small['rss'] / gb:.2f} GB", ""),
        ("peak RSS, %d layers" % large["layers"], f"{large['rss'] / gb:.2f} GB",
         f"ratio {large['rss'] / small['rss']:.3f} (target ≤ 1.05)"),
        ("one layer + one chunk + baseline", f"{bound / gb:.2f} GB",
         f"{layer_bytes / gb:.2f} + {chunk / gb:.3f} + {baseline / gb:.2f}; peak RSS / this = "
         f"{large['rss'] / bound:.3f} (target ≤ 1.3)"),
        ("wall time, %d layers, --fit none" % unfitted["layers"], f"{unfitted['wall']:.1f} s",
         f"floor {floor:.1f} s; wall / floor = {unfitted['wall'] / floor:.3f} (target ≤ 1.2); against the matmuls "
         f"alone ({matmuls:.1f} s) {unfitted['wall'] / matmuls:.3f}, against the floor with the fresh file's read "
         f"rate ({fresh_floor:.1f} s) {unfitted['wall'] / fresh_floor:.3f}"),
        ("wall time, %d layers, --fit lsq (default)" % large["layers"], f"{large['wall']:.1f} s",
         f"/ --fit none = {large['wall'] / unfitted['wall']:.3f} (target ≤ 1.5); peak RSS with --fit none "
         f"{unfitted['rss'] / gb:.2f} GB"),
        ("floor parts", "", f"read {large['read'] / gb:.1f} GB at {input_read_rate / 1e6:.0f} MB/s (the input "
         f"read again cold; a file just written reads at {fresh_read_rate / 1e6:.0f} MB/s), write "
         f"{large['written'] / gb:.1f} GB at {written_rate / 1e6:.0f} MB/s, {stats_flops / 1e12:.1f} TFLOP at "
         f"{rate / 1e9:.0f} GFLOP/s ({dtype}; {rates[0] / 1e9:.0f} before, {rates[1] / 1e9:.0f} after)"),
        ("plan host peak vs measured", f"{large['plan']['host_peak'] / gb:.2f} GB",
         f"plan / measured = {large['plan']['host_peak'] / large['rss']:.3f} (target 0.8–1.2)"),
    ]
    command = "python tools/bench.py " + " ".join(sys.argv[1:])
    text = (f"Made by `{command.strip()}` on this machine ({os.cpu_count()} cores), "
            f"{tokens} calibration tokens, {raw.get('model_type')} layer sizes.\n\n"
            "| measure | value | notes |\n|---|---|---|\n" + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows) + "\n")
    print(text)
    if readme:
        write_section("performance", text)


if __name__ == "__main__":
    main()
