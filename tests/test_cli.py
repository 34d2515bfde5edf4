"""Bad input: a one-line error naming the problem and the fix, a non-zero exit, nothing touched."""

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import default_sigint, tree_hash
from streammerge.cli import main

FAST = ["--samples", "2", "--seqlen", "16", "--device", "cpu"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_refused(result, *phrases):
    assert result.exit_code not in (0, None), result.output
    message = result.output.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message


@pytest.fixture
def mixtral_copy(tiny_models, tmp_path):
    return shutil.copytree(tiny_models("mixtral"), tmp_path / "model")


def test_missing_model_dir(tmp_path):
    assert_refused(invoke("run", tmp_path / "nope", tmp_path / "out", "--ratio", "0.5"), "does not exist")


def test_no_safetensors(mixtral_copy, tmp_path):
    for path in mixtral_copy.glob("model*.safetensors*"):
        path.unlink()
    assert_refused(invoke("run", mixtral_copy, tmp_path / "out", "--ratio", "0.5"), "no safetensors")


def _edit_config(model_dir, **changes):
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_unknown_model_type(mixtral_copy, tmp_path):
    _edit_config(mixtral_copy, model_type="mixtral_next")
    assert_refused(invoke("run", mixtral_copy, tmp_path / "out", "--ratio", "0.5"), "mixtral_next", "supported")


def test_dense_model(mixtral_copy, tmp_path):
    config = json.loads((mixtral_copy / "config.json").read_text())
    del config["num_local_experts"]
    config["model_type"] = "llama"
    (mixtral_copy / "config.json").write_text(json.dumps(config))
    assert_refused(invoke("run", mixtral_copy, tmp_path / "out", "--ratio", "0.5"), "dense")


@pytest.mark.parametrize("args, phrase", [
    (["--ratio", "0"], "between 0 and 1"),
    (["--ratio", "1"], "between 0 and 1"),
    (["--ratio", "-0.2"], "between 0 and 1"),
    (["--experts", "9"], "outside 1..8"),
    (["--experts", "0"], "at least 1"),
    (["--experts", "8"], "nothing would be removed"),
    (["--ratio", "0.05"], "removes no expert"),
    ([], "exactly one of --ratio"),
])
def test_bad_expert_target(tiny_models, tmp_path, args, phrase):
    model_dir = tiny_models("mixtral")
    result = invoke("run", model_dir, tmp_path / "out", *args, *FAST)
    assert_refused(result, phrase)
    assert result.exit_code == 2
    assert not (tmp_path / "out").exists()


def test_foreign_out_dir(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = tree_hash(out)
    assert_refused(invoke("run", tiny_models("mixtral"), out, "--ratio", "0.5", *FAST), "not empty")
    assert tree_hash(out) == before


def imported_modules(*args):
    """Top-level modules a `python -m streammerge ARGS` process imports, with its exit code."""
    process = subprocess.run([sys.executable, "-X", "importtime", "-m", "streammerge", *map(str, args)],
                             capture_output=True, text=True)
    lines = [line for line in process.stderr.splitlines() if line.startswith("import time:")]
    return {line.split("|")[-1].strip().split(".")[0] for line in lines}, process.returncode


@pytest.mark.parametrize("args, code", [
    (["--help"], 0),
    (["run", "--help"], 0),
    (["run"], 2),  # a missing argument
    (["run", "in", "out", "--method", "bogus"], 2),
    (["run", "in", "out", "--ratio", "1.5"], 2),
    (["plan", "in", "--ratio", "0.5", "--experts", "4"], 2),
])
def test_help_and_argument_errors_do_not_import_torch(args, code):
    modules, returncode = imported_modules(*args)
    assert returncode == code
    assert "click" in modules and not modules & {"torch", "transformers"}, sorted(modules)


def test_ctrl_c_during_startup_imports_prints_one_line(tmp_path):
    """A real SIGINT while `import torch` runs inside a command."""
    (tmp_path / "config.json").write_text("{}")
    interrupt_at_torch = (
        "import os, signal, sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch':\n"
        "            os.kill(os.getpid(), signal.SIGINT)\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from streammerge.cli import main\n"
        "main()\n"
    )
    process = subprocess.run([sys.executable, "-c", interrupt_at_torch, "plan", str(tmp_path), "--ratio", "0.5"],
                             capture_output=True, text=True, preexec_fn=default_sigint)
    assert process.returncode == 130, process.stderr
    assert process.stderr.strip() == "error: interrupted before anything was saved: re-run the same command to start again"


@pytest.mark.parametrize("command", ["run", "plan", "eval", "inspect"])
def test_a_file_given_as_the_model_directory_says_what_to_pass(tiny_models, tmp_path, command):
    config = tiny_models("mixtral") / "config.json"
    extra = {"run": [tmp_path / "out", "--ratio", "0.5"], "plan": ["--ratio", "0.5"], "eval": ["--text", config],
             "inspect": []}[command]
    assert_refused(invoke(command, config, *extra), "is a file", f"the directory holding it, {config.parent}")
    assert not (tmp_path / "out").exists()


def test_a_hub_id_is_pointed_to_a_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert_refused(invoke("plan", "mistralai/Mixtral-8x7B-v0.1", "--ratio", "0.5"),
                   "does not exist", "hf download mistralai/Mixtral-8x7B-v0.1 --local-dir")


def test_calibration_directory_is_refused(tiny_models, tmp_path):
    assert_refused(invoke("run", tiny_models("mixtral"), tmp_path / "out", "--ratio", "0.5", "--calib", tmp_path, *FAST),
                   f"{tmp_path} is a directory")


def test_fewer_experts_than_top_k_is_said_in_the_summary_and_the_card(tiny_models, tmp_path):
    result = invoke("run", tiny_models("mixtral"), tmp_path / "out", "--experts", "1", *FAST)
    assert result.exit_code == 0, result.output
    assert "top-k       2 -> 1" in result.output
    assert "routed to 1 expert instead of 2 (`num_experts_per_tok` lowered)" in (tmp_path / "out" / "README.md").read_text()
