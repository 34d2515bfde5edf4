"""Kill a run at random instants, resume it, and get the uninterrupted run's bytes."""

import hashlib
import json
import random
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from conftest import tree_hash
from streammerge.cli import main
from tiny_models import make_model

ARGS = ["--ratio", "0.5", "--samples", "16", "--seqlen", "64", "--batch", "2", "--device", "cpu"]


def command(model_dir, out_dir, *extra):
    return [sys.executable, "-m", "streammerge", "run", str(model_dir), str(out_dir), *ARGS, *extra]


def result_hashes(out_dir):
    names = [p.name for p in out_dir.iterdir() if p.suffix == ".safetensors"] + ["model.safetensors.index.json", "config.json"]
    return {name: hashlib.sha256((out_dir / name).read_bytes()).hexdigest() for name in sorted(names)}


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory):
    """Six layers: enough steps for a dozen kills."""
    return make_model("mixtral", tmp_path_factory.mktemp("deep"), layers=6)


@pytest.fixture(scope="module")
def uninterrupted(deep_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("clean") / "out"
    subprocess.run(command(deep_model, out), check=True, capture_output=True)
    return result_hashes(out)


def wait_for_new_files(process, out_dir, count, seen):
    """Return once `count` files not seen before appeared in out_dir (or the process ended).

    Waiting on files written, not on wall time, puts every signal inside the layer work, whatever
    the start-up time.
    """
    target = len(seen) + count
    while process.poll() is None and len(seen) < target:
        if out_dir.exists():
            seen.update(str(p) for p in out_dir.rglob("*") if p.is_file())
        time.sleep(0.002)


def test_sigkill_at_random_instants_then_resume_is_byte_identical(deep_model, uninterrupted, tmp_path):
    expected = uninterrupted
    input_hash = tree_hash(deep_model)
    out = tmp_path / "out"
    rng = random.Random(1234)
    seen: set[str] = set()
    kills = 0
    for _ in range(12):
        process = subprocess.Popen(command(deep_model, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_new_files(process, out, rng.randint(1, 4), seen)
        time.sleep(rng.uniform(0, 0.03))  # into or past the next write
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
        assert not (out / "config.json").exists(), "a killed run's output must not look complete"
    assert kills >= 10
    subprocess.run(command(deep_model, out), check=True, capture_output=True)
    assert result_hashes(out) == expected
    assert not (out / ".streammerge").exists()
    assert tree_hash(deep_model) == input_hash


def test_ctrl_c_stops_at_a_safe_point_and_says_how_to_resume(deep_model, uninterrupted, tmp_path):
    expected = uninterrupted
    out = tmp_path / "out"
    process = subprocess.Popen(command(deep_model, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_new_files(process, out, 20, set())
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate()
    assert process.returncode == 130, stderr
    assert "re-run the same command to resume" in stderr.strip().splitlines()[-1]
    subprocess.run(command(deep_model, out), check=True, capture_output=True)
    assert result_hashes(out) == expected


def test_a_different_run_is_refused_then_restarted(tiny_models, tmp_path):
    model_dir = tiny_models("mixtral")
    out = tmp_path / "out"
    runner = CliRunner()
    small = ["--samples", "2", "--seqlen", "16", "--device", "cpu"]
    assert runner.invoke(main, ["run", str(model_dir), str(out), "--ratio", "0.5", *small]).exit_code == 0
    (out / "notes.txt").write_text("kept")
    refused = runner.invoke(main, ["run", str(model_dir), str(out), "--ratio", "0.25", *small])
    assert refused.exit_code != 0
    assert "experts_kept: 4 -> 6" in refused.output and "--restart" in refused.output
    again = runner.invoke(main, ["run", str(model_dir), str(out), "--ratio", "0.25", *small, "--restart"])
    assert again.exit_code == 0, again.output
    assert json.loads((out / "streammerge.json").read_text())["experts_after"] == 6
    assert (out / "notes.txt").read_text() == "kept"
