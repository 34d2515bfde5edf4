"""Checkpoint IO: the streaming shard writer, atomic writes, releasing mapped pages and evicting cached ones."""

import os

import torch
from safetensors.torch import load_file, save_file

from resident import cached_bytes, mapped_rss
from streammerge.checkpoint import CheckpointReader, Deferred, drop_cached, read_shard, release_pages, save_shard


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


def test_prefetch_brings_the_tensors_into_the_page_cache(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": torch.randn(1024, 1024), "b": torch.randn(1024, 1024)}, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    drop_cached(path)
    reader = CheckpointReader(tmp_path)
    reader.prefetch(["b"]).result()
    _, begin, end = reader.ranges["b"]
    assert cached_bytes(path, begin, end - begin) >= end - begin  # whole pages


def test_evicted_tensors_leave_the_page_cache_and_their_neighbours_stay(tmp_path):
    path = tmp_path / "model.safetensors"
    original = {"a": torch.randn(1024, 1024), "b": torch.randn(1024, 1024)}
    save_file(original, path)
    with open(path, "rb") as f:
        os.fsync(f.fileno())  # dirty pages are never evicted, only clean ones
    reader = CheckpointReader(tmp_path)
    reader.prefetch(["a", "b"]).result()
    ranges = {name: reader.ranges[name][1:] for name in original}
    assert all(cached_bytes(path, begin, end - begin) >= end - begin for begin, end in ranges.values())
    reader.evict(["a"])
    begin, end = ranges["a"]
    assert cached_bytes(path, begin, end - begin) <= 2 * 4096  # pages shared with the header or b may stay
    begin, end = ranges["b"]
    assert cached_bytes(path, begin, end - begin) >= end - begin
    assert all(torch.equal(t, original[n]) for n, t in reader.read(["a", "b"]).items())  # read back from disk
    drop_cached(path)
    assert cached_bytes(path) == 0


def test_release_leaves_memory_that_is_not_a_mapped_shard_alone():
    tensor = torch.randn(1024, 1024)
    copy = tensor.clone()
    release_pages(tensor)
    assert torch.equal(tensor, copy)


def test_a_header_length_that_starts_like_a_pickle_is_still_safetensors(tmp_path):
    """The first byte of a safetensors file is the low byte of its header's length; 0x80 is also how a pickle
    starts, and taking it for one refused real checkpoints."""
    tensors = {"model.embed_tokens.weight": torch.randn(4, 8)}
    for pad in range(64):
        save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt", "pad": "x" * pad})
        if (tmp_path / "model.safetensors").read_bytes()[0] == 0x80:
            break
    assert (tmp_path / "model.safetensors").read_bytes()[0] == 0x80
    assert torch.equal(CheckpointReader(tmp_path).read(list(tensors))["model.embed_tokens.weight"],
                       tensors["model.embed_tokens.weight"])
