"""Tiny models built from real config.json files: sizes shrunk, every other field kept."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CONFIGS = Path(__file__).parent / "configs"
TEXT = Path(__file__).parent.parent / "streammerge" / "data" / "calibration.txt"
FAMILIES = {
    "mixtral": "mistralai__Mixtral-8x7B-v0.1",
    "qwen2_moe": "Qwen__Qwen1.5-MoE-A2.7B",
    "qwen3_moe": "Qwen__Qwen3-30B-A3B",
    "olmoe": "allenai__OLMoE-1B-7B-0924",
}
SHRUNK = {
    "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "max_window_layers": 2,
}


def make_tokenizer(out_dir: Path, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([TEXT.read_text()[:100_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)
    return fast


def tiny_config(family: str, layers: int = 3, vocab_size: int = 384, **overrides):
    raw = json.loads((CONFIGS / f"{FAMILIES[family]}.json").read_text())
    raw.update({k: v for k, v in SHRUNK.items() if k in raw})
    raw.update(num_hidden_layers=layers, vocab_size=vocab_size, **overrides)
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if token in raw:
            raw[token] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}[token]
    model_type = raw.pop("model_type")
    return AutoConfig.for_model(model_type, **raw)


def make_model(family: str, out_dir: Path, seed: int = 0, shard_size: str = "150KB", **overrides) -> Path:
    """Save a random tiny model of `family` (float32, several shards) with a tokenizer into `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = make_tokenizer(out_dir)
    config = tiny_config(family, vocab_size=len(tokenizer), **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # spread the routers so experts are chosen unevenly, as in trained models
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    model.save_pretrained(out_dir, max_shard_size=shard_size)
    return out_dir
