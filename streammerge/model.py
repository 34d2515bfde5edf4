"""The input model: config, architecture entry, lazy weights and tokenizer, validated up front."""

from __future__ import annotations

import hashlib
import json
import logging
from functools import cached_property, partial
from pathlib import Path

import safetensors
import torch
import transformers
from transformers import AutoConfig, AutoTokenizer

from . import __version__
from .arch import FP8_SCALE_SUFFIX, ArchSpec, dequantize_fp8, fp8_block_size, spec_for
from .checkpoint import INDEX_NAME, CheckpointReader, Deferred, release_pages
from .errors import CheckpointError, InputError, UnsupportedArchitectureError
from .runner import load_layer

log = logging.getLogger(__name__)
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")
NOT_COPIED = {"config.json", "README.md", ".gitattributes", INDEX_NAME, "streammerge.json", "streammerge.log"}


def check_directory(path: Path, argument: str = "MODEL_DIR") -> None:
    """A model directory given on the command line must be a local directory: say what it is otherwise."""
    if path.is_file():
        holder = f"the directory holding it, {path.parent}" if path.name == "config.json" else "its directory"
        raise InputError(f"{argument} {path} is a file, not a directory: pass {holder} (the model directory with "
                         f"config.json and the weights)")
    if not path.exists():
        hub_id = not path.is_absolute() and len(path.parts) == 2 and not str(path).startswith(".")
        raise InputError(
            f"model directory {path} does not exist: pass the directory holding config.json and the weights"
            + (f" (streammerge reads local directories only; for a Hub model, `hf download {path} --local-dir DIR` "
               f"first)" if hub_id else "")
        )


def open_config(model_dir: Path) -> tuple[dict, object, ArchSpec]:
    """config.json of a model directory as (raw dict, config object, architecture entry), or the error that
    names what is wrong: no directory, no or broken config.json, an unknown or dense architecture."""
    check_directory(model_dir)
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise InputError(f"{model_dir} has no config.json: pass a Hugging Face model directory")
    try:
        raw_config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise InputError(f"{config_path} is not valid JSON ({exc}): re-download it") from exc
    spec = spec_for(raw_config)
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    if spec.text_config:  # a VLM: the layers are the text model's
        config = getattr(config, spec.text_config)
    if not spec.moe_layers(config):
        raise UnsupportedArchitectureError(
            f"this {spec.family} config has no MoE layer: it is a dense model, nothing to merge"
        )
    return raw_config, config, spec


def _dequantized(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], dtype: torch.dtype):
    out = dequantize_fp8(weight, scale_inv, block, dtype)
    release_pages(weight)
    return out


class Model:
    def __init__(self, model_dir: Path, raw_config: dict, config, spec: ArchSpec, reader: CheckpointReader):
        self.dir = model_dir
        self.raw_config = raw_config
        self.config = config
        self.spec = spec
        self.reader = reader
        self.fp8_block = fp8_block_size(raw_config)  # block-FP8 weights are dequantized as they are read

    @classmethod
    def open(cls, model_dir: Path, check_tensors: bool = True) -> "Model":
        model_dir = Path(model_dir)
        raw_config, config, spec = open_config(model_dir)
        model = cls(model_dir, raw_config, config, spec, CheckpointReader(model_dir))
        if check_tensors:
            model.check_tensors()
        return model

    @property
    def name(self) -> str:
        return self.raw_config.get("_name_or_path") or self.dir.resolve().name

    @property
    def weights_dtype(self) -> torch.dtype:
        return self.reader.info[self.spec.embed_name][0]

    def layer_names(self, layer: int) -> list[str]:
        prefix = self.spec.layer_prefix(layer)
        return [n for n in self.reader.weight_map if n.startswith(prefix) and not self._is_scale(n)]

    @property
    def tensor_table(self) -> dict:
        """name -> (dtype, shape) of the tensors as read: block-FP8 weights in the unquantized dtype, no scales."""
        if self.fp8_block is None:
            return self.reader.info
        return {n: ((self.weights_dtype, shape) if n + FP8_SCALE_SUFFIX in self.reader.info else (dtype, shape))
                for n, (dtype, shape) in self.reader.info.items() if not self._is_scale(n)}

    def _is_scale(self, name: str) -> bool:
        return (self.fp8_block is not None and name.endswith(FP8_SCALE_SUFFIX)
                and name[:-len(FP8_SCALE_SUFFIX)] in self.reader.weight_map)

    def read(self, names: list[str]) -> dict:
        """`reader.read`, with block-FP8 weights dequantized to the checkpoint's unquantized dtype when used
        (`Deferred`): dequantizing a whole layer up front would cost the layer twice over in RAM."""
        if self.fp8_block is None:
            return self.reader.read(names)
        scales = [n + FP8_SCALE_SUFFIX for n in names if n + FP8_SCALE_SUFFIX in self.reader.weight_map]
        tensors = self.reader.read([*names, *scales])
        for scale in scales:
            name = scale[:-len(FP8_SCALE_SUFFIX)]
            weight = tensors[name]
            scale_inv = tensors.pop(scale)
            tensors[name] = Deferred(
                tuple(weight.shape), self.weights_dtype,
                partial(_dequantized, weight, scale_inv, self.fp8_block, self.weights_dtype),
                sources=(weight, scale_inv),
                compute=partial(dequantize_fp8, block=self.fp8_block, dtype=self.weights_dtype))
        return tensors

    def check_tensors(self) -> None:
        """Every checkpoint tensor must belong to the architecture, with the config's shapes (no weights read)."""
        layered = {n for layer in range(self.config.num_hidden_layers) for n in self.layer_names(layer)}
        dropped = [n for n in self.reader.weight_map if n not in layered and self.spec.dropped(self.config, n)]
        if dropped:
            log.warning("leaving out %d tensors transformers ignores on load (multi-token prediction, e.g. %s); the "
                        "output's config says so", len(dropped), dropped[0])
        for name in self.reader.weight_map:
            if (name not in layered and name not in self.spec.global_tensors and name not in dropped
                    and not self.spec.is_passthrough(name) and not self._is_scale(name)):
                raise CheckpointError(
                    f"unknown tensor {name}: it is not part of a {self.spec.family} checkpoint with "
                    f"{self.config.num_hidden_layers} layers; the checkpoint and config.json disagree"
                )
        embed, norm, head = self.spec.global_tensors[:3]
        if embed not in self.reader.info:
            raise CheckpointError(f"the checkpoint has no {embed}: it is incomplete")
        expected = {embed: (self.config.vocab_size, self.config.hidden_size),
                    head: (self.config.vocab_size, self.config.hidden_size),
                    norm: (self.config.hidden_size,)}
        for name, shape in expected.items():
            if name in self.reader.info and self.reader.info[name][1] != shape:
                raise CheckpointError(
                    f"{name} has shape {list(self.reader.info[name][1])}, the config implies {list(shape)}: "
                    f"the checkpoint and config.json disagree"
                )
        for layer in range(self.config.num_hidden_layers):
            meta = {n: torch.empty(self.reader.info[n][1], dtype=self.reader.info[n][0], device="meta")
                    for n in self.layer_names(layer)}
            load_layer(self.spec, self.config, layer, meta)

    def tokenizer(self):
        try:
            return AutoTokenizer.from_pretrained(self.dir, trust_remote_code=False)
        except (OSError, ValueError, TypeError) as exc:
            raise InputError(
                f"no usable tokenizer in {self.dir} ({str(exc).splitlines()[0][:120]}): copy the base model's "
                f"tokenizer files (tokenizer.json, tokenizer_config.json) into it"
            ) from exc

    def extra_files(self) -> list[Path]:
        """Tokenizer, generation config, chat template and the like: copied to the output unchanged."""
        return sorted(
            p for p in self.dir.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name not in NOT_COPIED
            and not p.name.endswith(WEIGHT_SUFFIXES)
        )

    @cached_property
    def fingerprint(self) -> str:
        """Hash of config.json and every tensor's name, dtype, shape and shard, and the shard sizes."""
        digest = hashlib.sha256((self.dir / "config.json").read_bytes())
        for name in sorted(self.reader.info):
            dtype, shape = self.reader.info[name]
            digest.update(f"{name}|{dtype}|{shape}|{self.reader.weight_map[name]}".encode())
        for shard in sorted(set(self.reader.weight_map.values())):
            digest.update(f"{shard}|{(self.dir / shard).stat().st_size}".encode())
        return digest.hexdigest()

    @staticmethod
    def versions() -> dict:
        return {"streammerge": __version__, "torch": torch.__version__,
                "transformers": transformers.__version__, "safetensors": safetensors.__version__}

    def reduced_config_dict(self, num_experts: int) -> dict:
        """The source config.json with the expert count and top-k edited in place.

        Editing the dict, not re-serializing a config object, keeps the Hub's keys: e.g. Qwen3MoeConfig
        would write `num_local_experts` where the Hub has `num_experts`.
        """
        top = raw = dict(self.raw_config)
        if self.spec.text_config:  # a VLM: the counts live in the text model's config
            raw = top[self.spec.text_config] = dict(top[self.spec.text_config])
        attribute_map = getattr(type(self.config), "attribute_map", {})
        for attribute, value in ((self.spec.experts_key, num_experts),
                                 (self.spec.top_k_key, min(self.spec.top_k(self.config), num_experts))):
            canonical = attribute_map.get(attribute, attribute)
            keys = [k for k in raw if attribute_map.get(k, k) == canonical] or [attribute]
            for key in keys:
                raw[key] = [value] * len(raw[key]) if isinstance(raw.get(key), list) else value
        for key, value in self.spec.dropped_config:  # e.g. the MTP layers left out: num_nextn_predict_layers = 0
            if key in raw:
                raw[key] = value
        if self.fp8_block is not None:  # the output holds the dequantized weights
            top.pop("quantization_config", None)
        return top
