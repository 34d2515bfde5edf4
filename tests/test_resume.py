"""Kill a run at random instants, resume it, and get the uninterrupted run's bytes."""

import hashlib
import json
import logging
import os
import random
import signal
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import default_sigint, edit_tensor, stop_at_layer_1_by_a_full_disk, tree_hash
from streammerge.cli import main
from streammerge.errors import CheckpointError, Interrupted, ResumeMismatchError
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
        try:  # a directory may be renamed away mid-scan (the work directory is built aside)
            seen.update(str(p) for p in out_dir.rglob("*") if p.is_file())
        except FileNotFoundError:
            pass
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


KILL_AT = Path(__file__).parent / "kill_at.py"
QUICK = ["--ratio", "0.5", "--samples", "2", "--seqlen", "16", "--batch", "1", "--device", "cpu"]


def run_args(model_dir, out_dir, *extra):
    return ["run", str(model_dir), str(out_dir), *QUICK, *extra]


def in_children(*scenarios):
    """Exit codes of tests/kill_at.py's scenarios, each run in a child killed at an exact instant."""
    result = subprocess.run([sys.executable, KILL_AT, json.dumps(scenarios)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def only_the_output(out_dir):
    """Nothing but the output's files: no work directory, lock or staged file left behind."""
    return sorted(p.name for p in out_dir.iterdir())


@pytest.fixture(params=[False, pytest.param(True, marks=pytest.mark.slow)], ids=["some", "every"])
def every_instant(request):
    return request.param


@pytest.fixture(scope="module")
def traced(tiny_models, tmp_path_factory):
    """An uninterrupted quick run's changes to the file system, in order, and its result; and that run's state
    when killed just before finalizing, with the changes its resumption makes (the finalize and cleanup)."""
    directory = tmp_path_factory.mktemp("traced")
    model_dir = tiny_models("mixtral")
    codes = in_children({"args": run_args(model_dir, directory / "out"), "trace": str(directory / "trace")})
    assert codes == [0]
    changes = (directory / "trace").read_text().splitlines()
    first_finalize = next(i for i, c in enumerate(changes, 1) if c.startswith("replace") and c.endswith(
        max(c.split()[-1] for c in changes if "/model-" in c)))  # the last shard: the non-layer tensors
    before_finalize = directory / "before-finalize"
    assert in_children({"args": run_args(model_dir, before_finalize), "after": first_finalize - 1},
                       {"copy": [str(before_finalize), str(directory / "resumed")]},
                       {"args": run_args(model_dir, directory / "resumed"), "trace": str(directory / "resumed-trace")}
                       ) == [-9, 0, 0]
    assert result_hashes(directory / "resumed") == result_hashes(directory / "out")
    return {"startup": changes[:next(i for i, c in enumerate(changes) if "/hidden" in c)],
            "finalize": (directory / "resumed-trace").read_text().splitlines(), "before_finalize": before_finalize,
            "out": directory / "out", "expected": result_hashes(directory / "out"),
            "names": only_the_output(directory / "out")}


def kill_and_resume(model_dir, tmp_path, traced, changes, instants, start=None):
    """For each of these instants, kill a run (fresh, or resuming a copy of `start`) right after its n-th change
    to the file system, resume it, and get the uninterrupted run's bytes and files."""
    outs = [tmp_path / f"out-{i}" for i in instants]
    scenarios = []
    for instant, out in zip(instants, outs):
        if start is not None:
            shutil.copytree(start, out)
        scenarios += [{"args": run_args(model_dir, out), "after": instant}, {"args": run_args(model_dir, out)}]
    codes = in_children(*scenarios)
    for instant, out, killed, resumed in zip(instants, outs, codes[::2], codes[1::2]):
        where = f"killed after change {instant}: {changes[instant - 1]}"
        assert (killed, resumed) == (-9, 0), where
        assert result_hashes(out) == traced["expected"], where
        assert only_the_output(out) == traced["names"], where


def test_sigkill_in_the_first_moments_then_resume_is_byte_identical(tiny_models, traced, tmp_path, every_instant):
    """Killed while out_dir and the work directory are made (a kill between the work directory and its manifest
    left out_dir refused as foreign, with or without --restart): not stuck, and resumable."""
    changes = traced["startup"]
    instants = [i for i, c in enumerate(changes, 1) if every_instant or "/.streammerge" in c]
    kill_and_resume(tiny_models("mixtral"), tmp_path, traced, changes, instants)


def test_sigkill_during_finalize_and_cleanup_then_resume_is_byte_identical(tiny_models, traced, tmp_path):
    """Killed after each change of the finalize (shards, copies, card, index, config.json) and of the work
    directory's removal after it: resumable, never stuck or wrong."""
    changes = traced["finalize"]
    instants = range(1, len(changes) + 1)
    kill_and_resume(tiny_models("mixtral"), tmp_path, traced, changes, instants, start=traced["before_finalize"])


@pytest.fixture
def stopped(tiny_models, tmp_path, monkeypatch):
    """A copy of the tiny model, and a run of it stopped by a full disk after its first layer: (model, out, options)."""
    model_dir = shutil.copytree(tiny_models("mixtral"), tmp_path / "model")
    out, options = tmp_path / "out", RunOptions(ratio=0.5, samples=4, seqlen=16, batch=2, device="cpu")
    stop_at_layer_1_by_a_full_disk(monkeypatch, model_dir, out, options)
    assert (out / ".streammerge" / "layers" / "layer-00000.json").exists()
    return model_dir, out, options


def test_resume_refuses_an_input_changed_since(stopped):
    model_dir, out, options = stopped
    name = "model.layers.2.block_sparse_moe.experts.0.w1.weight"
    edit_tensor(model_dir, name, lambda t: t * 1.5)  # another fine-tune: same files, sizes and metadata
    shard = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"][name]
    with pytest.raises(ResumeMismatchError, match=rf"input_shards\.{shard}: .*--restart"):
        run(model_dir, out, options)


def test_resume_refuses_a_finished_shard_changed_since(stopped):
    model_dir, out, options = stopped
    shard = "model-00001-of-00004.safetensors"
    edit_tensor(out, "model.layers.0.block_sparse_moe.experts.0.w1.weight", lambda t: t * 1.5, shard=shard)
    with pytest.raises(CheckpointError, match=rf"{shard} of finished layer 0 changed since it was written: .*--restart"):
        run(model_dir, out, options)


def test_resume_refuses_other_source_code(stopped, monkeypatch):
    """The version number stays the same between commits; the source's hash does not."""
    model_dir, out, options = stopped
    monkeypatch.setattr("streammerge.pipeline.source_digest", lambda: "edited")
    with pytest.raises(ResumeMismatchError, match=r"source: .* -> 'edited'"):
        run(model_dir, out, options)


def test_a_second_run_into_the_same_out_dir_is_refused(tiny_models, tmp_path):
    """While a run is under way (held still inside its work), another into the same out_dir stops at once."""
    model_dir, out, trace = tiny_models("mixtral"), tmp_path / "out", tmp_path / "trace"
    first = subprocess.Popen([sys.executable, KILL_AT, json.dumps([
        {"args": run_args(model_dir, out), "after": 12, "pause": True, "trace": str(trace)}])],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    paused = Path(f"{trace}.paused")
    try:
        while not paused.exists() or not paused.read_text():
            assert first.poll() is None, "the first run ended before its pause"
            time.sleep(0.05)
        # The paused run's main thread goes on to log its layer's result, so the log may grow meanwhile.
        before = tree_hash(out, ignore={"streammerge.log"})
        second = CliRunner().invoke(main, run_args(model_dir, out))
        assert second.exit_code not in (0, None), second.output
        assert second.output.strip() == (f"error: another streammerge run (pid {paused.read_text()}) is writing {out}: "
                                         f"wait for it to end, or choose another out_dir")
        assert tree_hash(out, ignore={"streammerge.log"}) == before
    finally:
        if paused.exists():
            os.kill(int(paused.read_text()), signal.SIGKILL)
        first.wait()
    assert CliRunner().invoke(main, run_args(model_dir, out)).exit_code == 0


def test_sigkill_during_restart_never_leaves_a_partial_output_that_looks_complete(tiny_models, traced, tmp_path):
    """`--restart` over a complete output, killed while it deletes the old files: config.json goes first, and
    the same command then finishes the job."""
    model_dir = tiny_models("mixtral")
    other, expected = ["--ratio", "0.25"], tmp_path / "expected"
    instants = [7, 12]
    codes = in_children({"args": run_args(model_dir, expected, *other)},
                        *[{"copy": [str(traced["out"]), str(tmp_path / f"out-{i}")]} for i in instants],
                        *[{"args": run_args(model_dir, tmp_path / f"out-{i}", *other, "--restart"), "after": i}
                          for i in instants])
    assert codes == [0] + [0] * len(instants) + [-9] * len(instants)
    for instant in instants:
        out = tmp_path / f"out-{instant}"
        if (out / "config.json").exists():
            index = json.loads((out / "model.safetensors.index.json").read_text())
            assert all((out / shard).exists() for shard in set(index["weight_map"].values())), instant
    resumed = in_children(*[{"args": run_args(model_dir, tmp_path / f"out-{i}", *other, "--restart")} for i in instants])
    assert resumed == [0] * len(instants)
    for instant in instants:
        assert result_hashes(tmp_path / f"out-{instant}") == result_hashes(expected), instant
