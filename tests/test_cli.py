"""Bad input: a one-line error naming the problem and the fix, a non-zero exit, nothing touched."""

import json
import shutil

import pytest
from click.testing import CliRunner

from conftest import tree_hash
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
    (["--experts", "0"], "outside 1..8"),
    ([], "exactly one of --ratio"),
])
def test_bad_expert_target(tiny_models, tmp_path, args, phrase):
    model_dir = tiny_models("mixtral")
    assert_refused(invoke("run", model_dir, tmp_path / "out", *args, *FAST), phrase)
    assert not (tmp_path / "out").exists()


def test_foreign_out_dir(tiny_models, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = tree_hash(out)
    assert_refused(invoke("run", tiny_models("mixtral"), out, "--ratio", "0.5", *FAST), "not empty")
    assert tree_hash(out) == before
