"""Damaged input and failing disks: a clear error, a non-zero exit, nothing lost or half-written."""

import errno
import hashlib
import json
import shutil
import time

import pytest
from click.testing import CliRunner

import streammerge.checkpoint
from conftest import tree_hash
from streammerge.cli import main
from streammerge.errors import InsufficientResourcesError
from streammerge.pipeline import Run, RunOptions, run
from streammerge.runner import ExpertStream

SMALL = ["--ratio", "0.5", "--samples", "2", "--seqlen", "16", "--device", "cpu"]


@pytest.fixture
def model(tiny_models, tmp_path):
    return shutil.copytree(tiny_models("mixtral"), tmp_path / "model")


def refused(model_dir, out_dir, *phrases, args=SMALL):
    before = tree_hash(model_dir)
    result = CliRunner().invoke(main, ["run", str(model_dir), str(out_dir), *map(str, args)])
    message = result.output.strip()
    assert result.exit_code not in (0, None), message
    assert message.startswith("error: ") and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message
    assert tree_hash(model_dir) == before
    assert not out_dir.exists() or not (out_dir / "config.json").exists()


def shards(model_dir):
    return sorted(model_dir.glob("model-*.safetensors"))


def test_truncated_shard(model, tmp_path):
    shard = shards(model)[3]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    refused(model, tmp_path / "out", shard.name, "truncated or corrupt", "re-download")


def test_corrupt_shard_header(model, tmp_path):
    shard = shards(model)[0]
    shard.write_bytes(b"\xff" * 64 + shard.read_bytes()[64:])
    refused(model, tmp_path / "out", shard.name, "truncated or corrupt")


def test_index_names_a_missing_shard(model, tmp_path):
    shards(model)[-1].unlink()
    refused(model, tmp_path / "out", "missing", "re-download")


def test_shapes_disagree_with_config(model, tmp_path):
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] *= 2
    (model / "config.json").write_text(json.dumps(config))
    refused(model, tmp_path / "out", "do not match the config")


def test_no_tokenizer(model, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    refused(model, tmp_path / "out", "tokenizer")


def test_pickle_only_checkpoint_is_refused_with_a_hint(model, tmp_path):
    for shard in shards(model):
        shard.unlink()
    (model / "model.safetensors.index.json").unlink()
    (model / "pytorch_model.bin").write_bytes(b"not unpickled")
    refused(model, tmp_path / "out", "never unpickles", "save_pretrained")


def test_remote_code_is_never_trusted(model, tmp_path):
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="my_moe", auto_map={"AutoModelForCausalLM": "modeling_my_moe.MyMoe"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_my_moe.py").write_text("raise SystemExit('remote code ran')\n")
    refused(model, tmp_path / "out", "unsupported model_type 'my_moe'")


@pytest.mark.parametrize("text, phrase", [("", "empty"), ("short", "windows")])
def test_calibration_empty_or_too_short(model, tmp_path, text, phrase):
    calib = tmp_path / "calib.txt"
    calib.write_text(text)
    refused(model, tmp_path / "out", phrase, args=[*SMALL, "--calib", calib])


def test_calibration_jsonl_without_text_field(model, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"content": "no text field"}\n')
    refused(model, tmp_path / "out", "'text' field", args=[*SMALL, "--calib", calib])


def test_disk_full_during_a_write_loses_nothing(tiny_models, tmp_path, monkeypatch):
    model_dir = tiny_models("mixtral")
    options = RunOptions(ratio=0.5, samples=4, seqlen=16, batch=2, device="cpu")
    run(model_dir, tmp_path / "clean", options)
    real_materialize = streammerge.checkpoint.materialize
    calls = {"n": 0}

    def fill_disk_midway(tensor):  # called per tensor while a file is being written
        calls["n"] += 1
        if calls["n"] == 40:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_materialize(tensor)

    monkeypatch.setattr(streammerge.checkpoint, "materialize", fill_disk_midway)
    out = tmp_path / "out"
    with pytest.raises(InsufficientResourcesError, match="disk full while writing .*re-run the same command"):
        run(model_dir, out, options)
    assert not list(out.rglob("*.tmp")) and not (out / "config.json").exists()
    monkeypatch.setattr(streammerge.checkpoint, "materialize", real_materialize)
    run(model_dir, out, options)

    def digest(directory):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(directory.glob("*")) if p.suffix == ".safetensors" or p.name.endswith("json")
                and p.name != "streammerge.json"}

    assert digest(out) == digest(tmp_path / "clean")


def test_a_failed_background_save_stops_the_run_at_the_next_expert(tiny_models, tmp_path, monkeypatch):
    """Layer 0's shard is saved while layer 1 computes. When that save fails, the run stops within an expert or
    two of layer 1, not after the whole layer (many minutes on a real model) as it did."""
    model_dir = tiny_models("mixtral")
    experts = json.loads((model_dir / "config.json").read_text())["num_local_experts"]
    layer, ran = [None], []
    real_process, real_output = Run.process, ExpertStream.every_token

    def process(self, index):
        layer[0] = index
        return real_process(self, index)

    def slow_output(self, x):
        time.sleep(0.05)  # time for the failing save to fail while layer 1 computes
        ran.append(layer[0])
        return real_output(self, x)

    def full_disk(path, tensors):
        raise InsufficientResourcesError(f"disk full while writing {path}: free space and re-run")

    monkeypatch.setattr(Run, "process", process)
    monkeypatch.setattr(ExpertStream, "every_token", slow_output)
    monkeypatch.setattr(Run, "stage", staticmethod(full_disk))
    with pytest.raises(InsufficientResourcesError, match="disk full while writing"):
        run(model_dir, tmp_path / "out", RunOptions(ratio=0.5, samples=4, seqlen=16, batch=2, device="cpu"))
    assert 0 < ran.count(1) < experts  # layer 1 has two chunks of every expert to run


def test_preflight_refuses_a_too_small_disk_before_any_work(tiny_models, tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("streammerge.plan.shutil.disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    with pytest.raises(InsufficientResourcesError, match=r"not enough disk .* needs [0-9.]+ [KMG]?B more .* free"):
        run(tiny_models("mixtral"), out, RunOptions(ratio=0.5, samples=2, seqlen=16, device="cpu"))
    assert not out.exists()


def test_preflight_refuses_too_little_ram(tiny_models, tmp_path, monkeypatch):
    from collections import namedtuple

    memory = namedtuple("memory", "available")
    monkeypatch.setattr("streammerge.plan.psutil.virtual_memory", lambda: memory(1000))
    with pytest.raises(InsufficientResourcesError, match=r"not enough RAM: .* lower --batch"):
        run(tiny_models("mixtral"), tmp_path / "out", RunOptions(ratio=0.5, samples=2, seqlen=16, device="cpu"))
