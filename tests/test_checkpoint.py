"""Checkpoint IO: the streaming shard writer, atomic writes and releasing mapped pages."""

import torch
from safetensors.torch import load_file, save_file

from resident import mapped_rss
from streammerge.checkpoint import Deferred, read_shard, release_pages, save_shard


def test_streaming_writer_matches_safetensors_byte_for_byte(tmp_path):
    tensors = {
        "model.layers.0.mlp.gate.weight": torch.randn(8, 16),
        "model.layers.0.input_layernorm.weight": torch.randn(16).to(torch.bfloat16),
        "positions": torch.arange(7),
        "empty": torch.zeros(0, 3),
        "scalar": torch.tensor(1.5, dtype=torch.float16),
    }
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    deferred = dict(tensors)
    weight = deferred.pop("model.layers.0.mlp.gate.weight")
    deferred["model.layers.0.mlp.gate.weight"] = Deferred(tuple(weight.shape), weight.dtype, lambda: weight.clone())
    save_shard(tmp_path / "streamed.safetensors", deferred)
    assert (tmp_path / "streamed.safetensors").read_bytes() == (tmp_path / "reference.safetensors").read_bytes()
    loaded = load_file(tmp_path / "streamed.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_atomic_write_leaves_no_partial_file(tmp_path):
    def failing():
        raise RuntimeError("computation failed mid-write")

    target = tmp_path / "shard.safetensors"
    try:
        save_shard(target, {"a": torch.ones(4), "b": Deferred((4,), torch.float32, failing)})
    except RuntimeError:
        pass
    assert not target.exists() and not list(tmp_path.iterdir())


def test_released_pages_leave_the_process_and_fault_back_unchanged(tmp_path):
    path = tmp_path / "big.safetensors"
    original = {"a": torch.randn(1024, 1024), "b": torch.randn(1024, 1024)}
    save_file(original, path)
    mapped = read_shard(path)
    assert all(torch.equal(mapped[k], v) for k, v in original.items())  # touches every page
    before = mapped_rss(tmp_path)
    release_pages(mapped["a"])
    assert before - mapped_rss(tmp_path) >= (4 << 20) - 8192  # a's whole pages; b's stay
    assert mapped_rss(tmp_path) >= (4 << 20) - 8192
    assert torch.equal(mapped["a"], original["a"])


def test_release_leaves_memory_that_is_not_a_mapped_shard_alone():
    tensor = torch.randn(1024, 1024)
    copy = tensor.clone()
    release_pages(tensor)
    assert torch.equal(tensor, copy)
