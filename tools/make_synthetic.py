"""Write a synthetic checkpoint with a real config's layer sizes but only N layers, for benchmarks at real scale.

    python tools/make_synthetic.py CONFIG_JSON OUT_DIR --layers N [--experts E] [--seed S] [--max-shard-size 2GB]

The weights are random bfloat16 (std 0.02; routers wider so routing is uneven, norms 1, biases 0), under the
Hub's on-disk names as save_pretrained writes them: streammerge.plan.config_tensors builds each layer with
transformers' own class and splits the experts by the names in streammerge/arch.py, so the reader agrees.

Memory: safetensors has no streaming writer, so tensors are grouped into shards of at most --max-shard-size
(a larger single tensor gets a shard of its own) and each shard's tensors are generated just before that shard is
written, then dropped: the peak is about one shard on top of the interpreter. The Hub shards at about 5 GB; the
default 2 GB keeps the peak low. Generation order does not depend on the shard size, so a seed gives the same
tensors whatever the sharding.

Tokenizer: a byte-level BPE of at most TOKENIZER_VOCAB tokens trained on streammerge/data/calibration.txt.
vocab_size stays the config's, so the embedding and lm_head keep their real size and token ids use only their
first rows; the config's bos/eos/pad ids are pointed at the tokenizer's special tokens.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, PreTrainedTokenizerFast
from transformers.utils.hub import convert_file_size_to_int

from streammerge.arch import ArchSpec, spec_for
from streammerge.checkpoint import INDEX_NAME, SINGLE_NAME, save_json, save_shard
from streammerge.errors import StreamMergeError
from streammerge.options import DEFAULT_TEXT
from streammerge.pipeline import shard_name
from streammerge.plan import TensorTable, config_tensors

log = logging.getLogger("make_synthetic")

WEIGHT_STD = 0.02
ROUTER_LOGIT_STD = 2.0  # router logits of std ~2 on unit-RMS inputs: uneven like a trained router, not one-hot
TOKENIZER_VOCAB = 4096
SPECIAL_TOKENS = {"pad_token_id": "<pad>", "bos_token_id": "<s>", "eos_token_id": "</s>"}
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet and the special tokens


def synthetic_config(raw: dict, spec: ArchSpec, layers: int, experts: int | None) -> dict:
    """The source config.json with N layers (and E experts), edited in place so the Hub's keys stay."""
    raw = dict(raw, num_hidden_layers=layers)
    if "layer_types" in raw:
        raw["layer_types"] = raw["layer_types"][:layers]
    if experts is not None:
        raw[spec.experts_key] = experts
        raw[spec.top_k_key] = min(raw[spec.top_k_key], experts)
    raw["dtype" if "dtype" in raw else "torch_dtype"] = "bfloat16"
    return raw


def train_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS.values()),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([DEFAULT_TEXT.read_text(encoding="utf-8")], trainer)
    pad, bos, eos = SPECIAL_TOKENS.values()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=pad, bos_token=bos, eos_token=eos)


def shard_groups(tensors: TensorTable, max_bytes: int) -> list[list[str]]:
    """Tensor names in table order, cut into groups of at most `max_bytes` (an oversized tensor stands alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name, (dtype, shape) in tensors.items():
        nbytes = dtype.itemsize * math.prod(shape)
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def random_tensor(name: str, shape: tuple[int, ...], routers: set[str], hidden: int,
                  generator: torch.Generator) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=torch.bfloat16)
    if len(shape) == 1:  # norms start at 1 and biases at 0, as transformers initializes them
        return tensor.fill_(1.0 if name.endswith("norm.weight") else 0.0)
    std = ROUTER_LOGIT_STD / math.sqrt(hidden) if name in routers else WEIGHT_STD
    return tensor.normal_(0.0, std, generator=generator)


def make_synthetic(config_path: Path, out_dir: Path, layers: int, experts: int | None = None, seed: int = 0,
                   max_shard_size: str = "2GB") -> None:
    if layers < 1 or (experts is not None and experts < 1):
        raise SystemExit("error: --layers and --experts must be at least 1")
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise SystemExit(f"error: {out_dir} is not empty: pass a new directory")
    raw = json.loads(Path(config_path).read_text())
    spec = spec_for(raw)
    raw = synthetic_config(raw, spec, layers, experts)
    if raw["vocab_size"] < MIN_VOCAB:
        raise SystemExit(f"error: vocab_size {raw['vocab_size']} is below the {MIN_VOCAB} a byte-level tokenizer needs")
    tokenizer = train_tokenizer(min(TOKENIZER_VOCAB, raw["vocab_size"]))
    for key, token in SPECIAL_TOKENS.items():
        if key in raw:
            raw[key] = tokenizer.convert_tokens_to_ids(token)
    config = AutoConfig.for_model(**raw)
    moe_layers = spec.moe_layers(config)
    if not moe_layers:
        raise SystemExit(f"error: none of the first {layers} layers of this config is an MoE layer: use more layers")

    tensors = config_tensors(spec, config, torch.bfloat16)
    routers = {spec.router_name(layer) for layer in moe_layers}
    groups = shard_groups(tensors, convert_file_size_to_int(max_shard_size))
    generator = torch.Generator().manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for index, names in enumerate(groups):
        file = SINGLE_NAME if len(groups) == 1 else shard_name(index, len(groups))
        shard = {name: random_tensor(name, tensors[name][1], routers, config.hidden_size, generator) for name in names}
        save_shard(out_dir / file, shard)
        del shard  # before the next comprehension runs, or two shards would be alive at once
        weight_map.update(dict.fromkeys(names, file))
        log.info("wrote %s (%d tensors)", file, len(names))
    if len(groups) > 1:
        total = sum(dtype.itemsize * math.prod(shape) for dtype, shape in tensors.values())
        save_json(out_dir / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    tokenizer.save_pretrained(out_dir)
    save_json(out_dir / "config.json", raw)
    log.info("%s: %s with %d layers, %d experts, %d shards", out_dir, spec.family, layers,
             spec.num_experts(config), len(groups))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path, help="a Hugging Face config.json of a supported MoE family")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--layers", type=int, required=True, help="decoder layers written")
    parser.add_argument("--experts", type=int, help="routed experts per MoE layer (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-size", default="2GB", help="e.g. 2GB, 500MB: also bounds peak memory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        make_synthetic(args.config, args.out_dir, args.layers, args.experts, args.seed, args.max_shard_size)
    except StreamMergeError as error:
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    main()
