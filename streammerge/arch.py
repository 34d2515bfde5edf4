"""Architecture table: on-disk names, config keys and routing of each supported MoE family.

One entry per `model_type`, no fallback: a checkpoint whose family is not here is refused, because
guessing a "similar" layout silently produces a broken model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from .errors import UnsupportedArchitectureError

LAYER_PREFIX = "model.layers.{layer}."
GLOBAL_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def _every_layer(config, layer: int) -> bool:
    return True


def _qwen_sparse_step(config, layer: int) -> bool:
    # Mirrors Qwen2MoeDecoderLayer/Qwen3MoeDecoderLayer.__init__.
    return (
        layer not in (config.mlp_only_layers or [])
        and config.num_experts > 0
        and (layer + 1) % config.decoder_sparse_step == 0
    )


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    family: str
    modeling_module: str  # transformers module holding the layer and rotary classes
    layer_class: str
    rotary_class: str
    experts_key: str  # config key of the routed expert count
    top_k_key: str
    moe_prefix: str  # on-disk name of the MoE block inside a layer
    router: str  # on-disk router weight, relative to moe_prefix
    projections: tuple[str, str, str]  # on-disk names of an expert's gate, up and down projections
    routing: str  # the router's formula, as transformers computes it
    shared_expert: str  # what is kept untouched beside the routed experts
    is_moe_layer: Callable = _every_layer

    def classes(self):
        module = importlib.import_module(self.modeling_module)
        return getattr(module, self.layer_class), getattr(module, self.rotary_class)

    def layer_prefix(self, layer: int) -> str:
        return LAYER_PREFIX.format(layer=layer)

    def router_name(self, layer: int) -> str:
        return f"{self.layer_prefix(layer)}{self.moe_prefix}.{self.router}"

    def expert_name(self, layer: int, expert: int, projection: str) -> str:
        return f"{self.layer_prefix(layer)}{self.moe_prefix}.experts.{expert}.{projection}.weight"

    def expert_names(self, layer: int, expert: int) -> list[str]:
        return [self.expert_name(layer, expert, p) for p in self.projections]

    def num_experts(self, config) -> int:
        return int(getattr(config, self.experts_key))

    def top_k(self, config) -> int:
        return int(getattr(config, self.top_k_key))

    def moe_layers(self, config) -> list[int]:
        return [i for i in range(config.num_hidden_layers) if self.is_moe_layer(config, i)]


_SOFTMAX_TOPK = "softmax over all experts (fp32), top-k"
_SWIGLU = ("gate_proj", "up_proj", "down_proj")

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.model_type: spec
    for spec in (
        ArchSpec(
            model_type="mixtral",
            family="Mixtral",
            modeling_module="transformers.models.mixtral.modeling_mixtral",
            layer_class="MixtralDecoderLayer",
            rotary_class="MixtralRotaryEmbedding",
            experts_key="num_local_experts",
            top_k_key="num_experts_per_tok",
            moe_prefix="block_sparse_moe",
            router="gate.weight",
            projections=("w1", "w3", "w2"),
            routing=f"{_SOFTMAX_TOPK}, always renormalized",
            shared_expert="none",
        ),
        ArchSpec(
            model_type="qwen2_moe",
            family="Qwen2-MoE (Qwen1.5-MoE)",
            modeling_module="transformers.models.qwen2_moe.modeling_qwen2_moe",
            layer_class="Qwen2MoeDecoderLayer",
            rotary_class="Qwen2MoeRotaryEmbedding",
            experts_key="num_experts",
            top_k_key="num_experts_per_tok",
            moe_prefix="mlp",
            router="gate.weight",
            projections=_SWIGLU,
            routing=f"{_SOFTMAX_TOPK}, renormalized iff norm_topk_prob",
            shared_expert="shared_expert and its sigmoid shared_expert_gate",
            is_moe_layer=_qwen_sparse_step,
        ),
        ArchSpec(
            model_type="qwen3_moe",
            family="Qwen3-MoE",
            modeling_module="transformers.models.qwen3_moe.modeling_qwen3_moe",
            layer_class="Qwen3MoeDecoderLayer",
            rotary_class="Qwen3MoeRotaryEmbedding",
            experts_key="num_experts",
            top_k_key="num_experts_per_tok",
            moe_prefix="mlp",
            router="gate.weight",
            projections=_SWIGLU,
            routing=f"{_SOFTMAX_TOPK}, renormalized iff norm_topk_prob",
            shared_expert="none",
            is_moe_layer=_qwen_sparse_step,
        ),
        ArchSpec(
            model_type="olmoe",
            family="OLMoE",
            modeling_module="transformers.models.olmoe.modeling_olmoe",
            layer_class="OlmoeDecoderLayer",
            rotary_class="OlmoeRotaryEmbedding",
            experts_key="num_experts",
            top_k_key="num_experts_per_tok",
            moe_prefix="mlp",
            router="gate.weight",
            projections=_SWIGLU,
            routing=f"{_SOFTMAX_TOPK}, renormalized iff norm_topk_prob",
            shared_expert="none",
        ),
    )
}

_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def spec_for(raw_config: dict) -> ArchSpec:
    """The table entry for a config.json dict, or a one-line error naming what is wrong."""
    model_type = raw_config.get("model_type")
    spec = ARCHITECTURES.get(model_type)
    if spec is not None:
        return spec
    supported = ", ".join(sorted(ARCHITECTURES))
    if not any(raw_config.get(key) for key in _EXPERT_COUNT_KEYS):
        raise UnsupportedArchitectureError(
            f"model_type '{model_type}' is a dense (non-MoE) model: streammerge only compresses "
            f"Mixture-of-Experts checkpoints ({supported})"
        )
    raise UnsupportedArchitectureError(
        f"unsupported model_type '{model_type}': supported families are {supported}; "
        f"add an entry to streammerge/arch.py to support it"
    )
