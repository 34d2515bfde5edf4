"""Tiny models built from real config.json files: sizes shrunk, every other field kept."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, PreTrainedTokenizerFast

CONFIGS = Path(__file__).parent / "configs"
TEXT = Path(__file__).parent.parent / "streammerge" / "data" / "calibration.txt"
FAMILIES = {
    "mixtral": "mistralai__Mixtral-8x7B-v0.1",
    "qwen2_moe": "Qwen__Qwen1.5-MoE-A2.7B",
    "qwen3_moe": "Qwen__Qwen3-30B-A3B",
    "olmoe": "allenai__OLMoE-1B-7B-0924",
}
# Families checked by tests/test_families.py (routing other than softmax top-k, fused layouts, hybrids):
# model_type -> (real config in tests/configs/, or None for transformers' defaults; overrides that shrink it
# while keeping its routing fields consistent).
_MLA = dict(num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
MORE_FAMILIES = {
    "deepseek_v2": ("deepseek-ai__DeepSeek-V2-Lite", dict(n_routed_experts=16, **_MLA)),
    "deepseek_v3": ("deepseek-ai__DeepSeek-V3",  # 8 groups, top-4 groups, top-8: kept with 32 experts
                    dict(n_routed_experts=32, first_k_dense_replace=1, **{**_MLA, "q_lora_rank": 48})),
    "glm4_moe": ("zai-org__GLM-4.5-Air", dict(n_routed_experts=16)),
    "glm4_moe_lite": (None, dict(n_routed_experts=16, mlp_layer_types=["dense", "sparse", "sparse"],
                                 **{**_MLA, "v_head_dim": 32, "q_lora_rank": 48})),
    "dots1": (None, dict(n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=1, first_k_dense_replace=1)),
    "qwen3_next": (None, dict(num_experts=16, num_experts_per_tok=4, shared_expert_intermediate_size=48,
                              layer_types=["linear_attention", "full_attention", "linear_attention"],
                              linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                              linear_num_value_heads=4)),
    # use_mtp: transformers has no MTP layers, and generate() would look for them
    "qwen3_5_moe_text": (None, dict(num_experts=16, num_experts_per_tok=4, shared_expert_intermediate_size=48,
                                    layer_types=["linear_attention", "full_attention", "linear_attention"],
                                    linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                                    linear_num_value_heads=4)),
    "qwen3_5_moe": (None, dict(num_experts=16, num_experts_per_tok=4, shared_expert_intermediate_size=48,
                               layer_types=["linear_attention", "full_attention", "linear_attention"],
                               linear_key_head_dim=16, linear_value_head_dim=16, linear_num_key_heads=2,
                               linear_num_value_heads=4)),
    "llama4": (None, {}),
    "minimax_m2": ("MiniMaxAI__MiniMax-M2", dict(num_local_experts=16, intermediate_size=32, use_mtp=False)),
    "minimax": (None, dict(num_local_experts=8, layer_types=["linear_attention", "full_attention", "linear_attention"])),
    "phimoe": (None, dict(num_local_experts=8, rope_scaling=None)),
    "hunyuan_v1_moe": (None, dict(num_experts=8, moe_topk=2)),
    "ernie4_5_moe": (None, dict(moe_num_experts=8, moe_k=2, moe_layer_start_index=1, moe_intermediate_size=32)),
    "flex_olmo": (None, dict(num_experts=8, num_experts_per_tok=2)),
    "lfm2_moe": (None, dict(num_experts=8, num_experts_per_tok=2, num_dense_layers=1,
                            layer_types=["conv", "full_attention", "conv"])),
    "jamba": (None, dict(num_experts=8, num_experts_per_tok=2, attn_layer_period=2, attn_layer_offset=1,
                         expert_layer_period=1, expert_layer_offset=0, mamba_d_state=8, mamba_expand=2)),
    "granitemoe": ("ibm-granite__granite-3.0-3b-a800m-instruct", dict(num_local_experts=16, num_experts_per_tok=4,
                                                                      intermediate_size=32)),
    "granitemoeshared": (None, dict(num_local_experts=8, num_experts_per_tok=2, intermediate_size=32,
                                    shared_intermediate_size=48, embedding_multiplier=12.0)),
    "gpt_oss": ("openai__gpt-oss-20b", dict(num_local_experts=16, intermediate_size=32,
                                            layer_types=["sliding_attention", "full_attention", "sliding_attention"])),
    "llama4_text": (None, dict(num_local_experts=8, num_experts_per_tok=1, intermediate_size=32, intermediate_size_mlp=96,
                               moe_layers=[1, 2], attention_chunk_size=8, no_rope_layers=[1, 1, 0],
                               layer_types=["chunked_attention", "chunked_attention", "full_attention"])),
}
SHRUNK = {
    "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 48, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 16, "max_window_layers": 2,
}


ROUTERS = ("router.weight", "gate.wg.weight", "feed_forward.gate.weight", "router.layer.weight")
ROUTER_VECTORS = ("e_score_correction_bias", "router.bias", "expert_bias")


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


# Vision-language families: the text model's config is shrunk as above, the vision tower is tiny.
VISION = {"qwen3_5_moe": dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=32, out_hidden_size=64),
          "llama4": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         projector_input_dim=32, projector_output_dim=64, vision_output_dim=32, image_size=32,
                         patch_size=16)}


def tiny_config(family: str, layers: int = 3, vocab_size: int = 384, **overrides):
    if family in VISION:
        text = tiny_config(f"{family}_text", layers, vocab_size, **overrides).to_dict()
        text.update(MORE_FAMILIES[family][1])
        return AutoConfig.for_model(family, text_config=text, vision_config=VISION[family],
                                    tie_word_embeddings=False)
    if family in MORE_FAMILIES:
        name, shrink = MORE_FAMILIES[family]
        if name is None:
            raw = AutoConfig.for_model(family).to_dict()
            for derived in ("layer_types", "mlp_layer_types", "transformers_version", "architectures"):
                raw.pop(derived, None)  # per-layer lists sized for the default depth: rebuilt by the class
            raw.update({k: v for k, v in SHRUNK.items() if k in raw or k in ("num_attention_heads", "hidden_size")})
        else:
            raw = json.loads((CONFIGS / f"{name}.json").read_text())
            raw.update({k: v for k, v in SHRUNK.items() if k in raw})
        raw.pop("quantization_config", None)  # tiny models are float32
        raw.pop("auto_map", None)
        raw.update(shrink)
    else:
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
    model_class = AutoModelForImageTextToText if family in VISION else AutoModelForCausalLM
    model = model_class.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # spread the routers so experts are chosen unevenly, as in trained models
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
        if family in MORE_FAMILIES:
            for name, p in [*model.named_parameters(), *model.named_buffers()]:
                if name.endswith(ROUTERS):
                    p.normal_(0, 0.5)
                elif name.endswith(ROUTER_VECTORS):  # nonzero, so slicing them is checked
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    model.save_pretrained(out_dir, max_shard_size=shard_size)
    return out_dir


def fp8_blocks(weight, block=(128, 128)):
    """DeepSeek-V3's format: e4m3 weights and one float32 scale per block (amax / 448)."""
    rows, columns = weight.shape
    padded = torch.zeros(-(-rows // block[0]) * block[0], -(-columns // block[1]) * block[1])
    padded[:rows, :columns] = weight.float()
    blocks = padded.view(padded.shape[0] // block[0], block[0], padded.shape[1] // block[1], block[1])
    scale = (blocks.abs().amax(dim=(1, 3)) / 448).clamp(min=1e-12)
    expanded = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :columns]
    return (weight.float() / expanded).to(torch.float8_e4m3fn), scale
