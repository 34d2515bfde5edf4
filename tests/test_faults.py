"""Damaged input and failing disks: a clear error, a non-zero exit, nothing lost or half-written."""

import errno
import hashlib
import json
import os
import shutil
import struct
import subprocess
import time
from dataclasses import replace

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

import streammerge.checkpoint
from conftest import edit_tensor, stop_at_layer_1_by_a_full_disk, tree_hash
from streammerge.checkpoint import INDEX_NAME
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


def run_cli(*args):
    return CliRunner().invoke(main, ["run", *map(str, args)])


def one_line_error(result, *phrases):
    message = result.output.strip()
    assert result.exit_code not in (0, None), message
    assert message.startswith("error: ") and "\n" not in message, message
    for phrase in phrases:
        assert phrase in message, message
    return message


@pytest.fixture
def tmpfs(tmp_path):
    """mount(path, size, *options): a real tmpfs at path, unmounted after the test; skips unless root."""
    mounted = []

    def mount(path, size, *options):
        if os.geteuid() != 0:
            pytest.skip("mounting a tmpfs needs root")
        path.mkdir(exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f"cannot mount a tmpfs in this sandbox: {result.stderr.strip()}")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill_disk(directory):
    """Write a file until the file system is full."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


@pytest.mark.parametrize("option", ["--samples", "--seqlen", "--batch"])
def test_a_count_option_of_zero_is_refused_before_anything(model, tmp_path, option):
    refused(model, tmp_path / "out", f"{option} 0 must be at least 1", args=[*SMALL, option, "0"])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, phrase", [
    (bytes(range(256)) * 4, "not UTF-8 text"), ('{"text": 5}\n', "string 'text' field"), (None, "is a directory")])
def test_unusable_calibration_file(model, tmp_path, content, phrase):
    calib = tmp_path / "calib.jsonl"
    if content is None:
        calib.mkdir()
    elif isinstance(content, bytes):
        calib.write_bytes(content)
    else:
        calib.write_text(content)
    refused(model, tmp_path / "out", phrase, args=[*SMALL, "--calib", calib])


def test_out_dir_that_is_a_file(model, tmp_path):
    (tmp_path / "out").write_text("mine")
    refused(model, tmp_path / "out", "is a file")
    assert (tmp_path / "out").read_text() == "mine"


def test_out_dir_on_a_read_only_mount(model, tmp_path, tmpfs):
    mount = tmpfs(tmp_path / "mnt", "1m", "ro")
    for out in (mount, mount / "out"):
        refused(model, out, "cannot write to out_dir", "Read-only file system")


def test_out_dir_is_never_the_model_dir_nor_inside_it(model, tmp_path):
    """An earlier output used as input: `--restart` into itself deleted it (and the message had suggested it)."""
    earlier = tmp_path / "out1"
    run(model, earlier, RunOptions(ratio=0.5, samples=2, seqlen=16, device="cpu"))
    (tmp_path / "link").symlink_to(earlier)
    before = tree_hash(earlier)
    for out in (earlier, tmp_path / "link", earlier / "sub", tmp_path / "link" / "sub", earlier / ".." / "out1"):
        message = one_line_error(run_cli(earlier, out, *SMALL, "--restart"), "streammerge only reads")
        assert "--restart" not in message
        assert tree_hash(earlier) == before
    assert not (earlier / "sub").exists()


def test_out_dir_holding_only_system_files_counts_as_empty(model, tmp_path):
    out = tmp_path / "out"
    (out / "lost+found").mkdir(parents=True)
    (out / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    result = run_cli(model, out, *SMALL)
    assert result.exit_code == 0, result.output
    assert (out / "config.json").is_file() and (out / ".DS_Store").read_bytes() == b"\0\0\0\1Bud1"


def test_safetensors_header_entry_without_data_offsets(model, tmp_path):
    shard = shards(model)[0]
    data = shard.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + length])
    del header[next(name for name in header if name != "__metadata__")]["data_offsets"]
    shard.write_bytes(data[:8] + json.dumps(header).encode().ljust(length) + data[8 + length:])
    refused(model, tmp_path / "out", shard.name, "truncated or corrupt", "data_offsets")


def test_pickle_shard_listed_in_the_index(model, tmp_path):
    index_path = model / INDEX_NAME
    index = json.loads(index_path.read_text())
    shard = shards(model)[0]
    torch.save(load_file(shard), model / "pytorch_model-00001.bin")
    shard.unlink()
    index["weight_map"] = {k: "pytorch_model-00001.bin" if v == shard.name else v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    refused(model, tmp_path / "out", "pytorch_model-00001.bin", "pickle", "never unpickles")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_an_expert_is_refused_naming_the_tensor(model, tmp_path, value):
    name = "model.layers.1.block_sparse_moe.experts.3.w2.weight"

    def damage(tensor):
        tensor[0, 0] = value
        return tensor

    edit_tensor(model, name, damage)
    refused(model, tmp_path / "out", name, "NaN or Inf", args=[*SMALL, "--method", "prune-freq"])
    assert not (tmp_path / "out" / "streammerge.json").exists()


@pytest.mark.parametrize("step", ["tokenizer", "card"])
def test_disk_full_while_copying_the_tokenizer_or_writing_the_card(model, tmp_path, tmpfs, monkeypatch, step):
    mount = tmpfs(tmp_path / "mnt", "16m")
    if step == "tokenizer":
        real_copy = shutil.copyfile

        def copy_to_a_full_disk(source, target, **kwargs):
            fill_disk(mount)
            return real_copy(source, target, **kwargs)

        monkeypatch.setattr(shutil, "copyfile", copy_to_a_full_disk)
    else:
        real_card = Run.model_card

        def card_on_a_full_disk(self, provenance):
            fill_disk(mount)
            return real_card(self, provenance)

        monkeypatch.setattr(Run, "model_card", card_on_a_full_disk)
    out = mount / "out"
    result = run_cli(model, out, *SMALL)
    one_line_error(result, "disk full while writing", "re-run the same command to resume")
    assert result.exit_code == 3
    assert not (out / "config.json").exists() and not list(out.glob(".*.tmp"))
    monkeypatch.undo()
    (mount / "filler").unlink()
    result = run_cli(model, out, *SMALL)
    assert result.exit_code == 0, result.output


def test_disk_check_counts_what_a_stopped_run_left(model, tmp_path, monkeypatch):
    """On a disk just as large as the plan needs, a run stopped by a full disk resumes, and --restart runs: the
    files already there (hidden states too) are reused or deleted first, so they count as free."""
    from collections import namedtuple

    from streammerge.plan import plan_model

    options = RunOptions(ratio=0.5, samples=4, seqlen=16, batch=2, device="cpu")
    out = tmp_path / "out"
    capacity = plan_model(model, options).disk_needed + 4096  # a page for the lock file
    usage = namedtuple("usage", "total used free")

    def disk_usage(path):
        used = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.exists() else 0
        return usage(capacity, used, capacity - used)

    monkeypatch.setattr("streammerge.plan.shutil.disk_usage", disk_usage)
    stop_at_layer_1_by_a_full_disk(monkeypatch, model, out, options)
    assert list((out / ".streammerge" / "hidden").iterdir())
    run(model, out, options)
    run(model, out, replace(options, restart=True))
