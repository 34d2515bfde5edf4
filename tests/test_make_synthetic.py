"""tools/make_synthetic.py on shrunken real configs: a checkpoint the reader validates and `run` compresses."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from streammerge.checkpoint import INDEX_NAME, CheckpointReader
from streammerge.model import Model
from streammerge.pipeline import RunOptions, run
from tiny_models import CONFIGS, FAMILIES, SHRUNK

TOOL = Path(__file__).parent.parent / "tools" / "make_synthetic.py"
_spec = importlib.util.spec_from_file_location("make_synthetic", TOOL)
make_synthetic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_synthetic)


def shrunken_config(family: str, directory: Path) -> Path:
    """The family's real config.json with small widths (every other field kept)."""
    raw = json.loads((CONFIGS / f"{FAMILIES[family]}.json").read_text())
    raw.update({k: v for k, v in SHRUNK.items() if k in raw}, vocab_size=512)
    path = directory / f"{family}.json"
    path.write_text(json.dumps(raw))
    return path


def test_command_line_writes_a_checkpoint_run_accepts(tmp_path):
    out = tmp_path / "synthetic"
    subprocess.run([sys.executable, str(TOOL), str(shrunken_config("mixtral", tmp_path)), str(out),
                    "--layers", "2", "--seed", "1"], check=True, capture_output=True)
    model = Model.open(out)
    assert model.config.num_hidden_layers == 2 and model.config.hidden_size == 64
    assert model.weights_dtype == torch.bfloat16
    assert model.reader.info["model.layers.1.block_sparse_moe.experts.7.w2.weight"] == (torch.bfloat16, (64, 96))
    assert model.tokenizer().eos_token_id == model.config.eos_token_id
    summary = run(out, tmp_path / "out", RunOptions(ratio=0.5, samples=4, seqlen=16, device="cpu"))
    assert summary["parameters"][1] < summary["parameters"][0]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family(family, tmp_path):
    out = tmp_path / "synthetic"
    make_synthetic.make_synthetic(shrunken_config(family, tmp_path), out, layers=2, experts=6)
    model = Model.open(out)
    assert model.spec.num_experts(model.config) == 6
    assert json.loads((out / "config.json").read_text())["model_type"] == family
    run(out, tmp_path / "out", RunOptions(ratio=0.5, samples=2, seqlen=16, device="cpu"))
    compressed = Model.open(tmp_path / "out")
    assert compressed.spec.num_experts(compressed.config) == 3


def test_sharding_bounds_shards_and_keeps_the_weights(tmp_path):
    config = shrunken_config("qwen2_moe", tmp_path)
    make_synthetic.make_synthetic(config, tmp_path / "one", layers=2, seed=3)
    make_synthetic.make_synthetic(config, tmp_path / "many", layers=2, seed=3, max_shard_size="60KB")
    one, many = CheckpointReader(tmp_path / "one"), CheckpointReader(tmp_path / "many")
    assert not (tmp_path / "one" / INDEX_NAME).exists() and (tmp_path / "many" / INDEX_NAME).is_file()
    shards = set(many.weight_map.values())
    assert len(shards) > 3
    for shard in shards:
        names = [n for n, s in many.weight_map.items() if s == shard]
        assert len(names) == 1 or many.nbytes(names) <= 60_000, shard
    first, second = one.read(one.names()), many.read(many.names())
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_weights_look_initialized(tmp_path):
    make_synthetic.make_synthetic(shrunken_config("mixtral", tmp_path), tmp_path / "out", layers=1)
    reader = CheckpointReader(tmp_path / "out")
    tensors = reader.read(reader.names())
    assert torch.equal(tensors["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    expert = tensors["model.layers.0.block_sparse_moe.experts.0.w1.weight"].float()
    router = tensors["model.layers.0.block_sparse_moe.gate.weight"].float()
    assert abs(expert.std().item() - 0.02) < 0.002
    assert router.std().item() > 5 * expert.std().item()


def test_refuses_a_non_empty_directory_and_an_unsupported_family(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("keep me")
    with pytest.raises(SystemExit, match="not empty"):
        make_synthetic.make_synthetic(shrunken_config("mixtral", tmp_path), tmp_path / "busy", layers=1)
    dbrx = tmp_path / "dbrx.json"  # deepseek_v3 was the example here until it became supported
    dbrx.write_text(json.dumps({"model_type": "dbrx", "ffn_config": {"moe_num_experts": 16}, "num_experts": 16}))
    with pytest.raises(SystemExit, match="unsupported model_type"):
        make_synthetic.main([str(dbrx), str(tmp_path / "ds"), "--layers", "1"])
