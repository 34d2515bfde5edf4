"""Checkpoint IO: the streaming shard writer and atomic writes."""

import torch
from safetensors.torch import load_file, save_file

from streammerge.checkpoint import Deferred, save_shard


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
