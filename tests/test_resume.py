"""Kill a run at random instants, resume it, and get the uninterrupted run's bytes."""

import hashlib
import json
import logging
import random
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from conftest import default_sigint, tree_hash
from streammerge.cli import main
from streammerge.errors import Interrupted
from streammerge.journal import WORK_DIR
from streammerge.pipeline import Run, RunOptions, run
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
    process = subprocess.Popen(command(deep_model, out), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_sigint)
    first_record = out / WORK_DIR / "layers" / "layer-00000.json"
    while process.poll() is None and not first_record.exists():  # layer 0 is done: the interrupt lands later
        time.sleep(0.002)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: interrupted during layer ")
    assert "re-run the same command to resume" in stderr.strip().splitlines()[-1]
    resumed = subprocess.run(command(deep_model, out), check=True, capture_output=True, text=True)
    assert result_hashes(out) == expected
    assert "resuming after layer" in resumed.stderr
    log = (out / "streammerge.log").read_text()
    for layer in range(6):  # the finished layers' lines come again from the journal on resume
        assert f"layer {layer}: " in resumed.stderr and f"INFO layer {layer}: " in log.split("resuming after")[-1]


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


SMALL = RunOptions(ratio=0.5, samples=2, seqlen=16, device="cpu")


def interrupt_at(monkeypatch, method):
    def pressed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(Run, method, pressed)


@pytest.mark.parametrize("method, message", [
    ("measure", "interrupted during layer 0; finished layers are saved: re-run the same command to resume"),
    ("model_card", "interrupted while writing the final files; every layer is saved: re-run the same command to finish"),
])
def test_ctrl_c_through_the_library_stays_a_keyboard_interrupt(tiny_models, tmp_path, monkeypatch, method, message):
    """A caller's `except Exception` must not swallow Ctrl-C; the message still says how to go on."""
    out = tmp_path / "out"
    interrupt_at(monkeypatch, method)
    with pytest.raises(KeyboardInterrupt) as interrupt:
        try:
            run(tiny_models("mixtral"), out, SMALL)
        except Exception:  # noqa: BLE001 - what a careless caller does
            pytest.fail("Ctrl-C was caught as an Exception")
    assert isinstance(interrupt.value, Interrupted) and str(interrupt.value) == message
    monkeypatch.undo()
    run(tiny_models("mixtral"), out, SMALL)
    assert (out / "config.json").is_file() and not (out / ".streammerge").exists()


def test_a_layer_result_is_logged_when_chosen_not_after_the_next_layer(tiny_models, tmp_path, monkeypatch, caplog):
    process = Run.process

    def announced(self, layer):
        logging.getLogger("streammerge").info("processing %d", layer)
        return process(self, layer)

    monkeypatch.setattr(Run, "process", announced)
    with caplog.at_level(logging.INFO, logger="streammerge"):
        run(tiny_models("mixtral"), tmp_path / "out", SMALL)
    events = [m.split(":")[0] for m in caplog.messages if m.startswith(("processing", "layer "))]
    assert events == ["processing 0", "layer 0", "processing 1", "layer 1", "processing 2", "layer 2"], events
