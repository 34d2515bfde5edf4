"""Architecture table: on-disk names, config keys and routing of each supported MoE family.

One entry per `model_type`, no fallback: a checkpoint whose family is not here is refused, because
guessing a "similar" layout silently produces a broken model.

Two on-disk layouts of the routed experts exist: one tensor per expert and projection
(`experts.{e}.gate_proj.weight`, the Hub's classic format), and fused 3-D tensors with the experts along
dimension 0 (granitemoe, gpt-oss, llama4). Either way an expert is a small dict of "parts" (its projections,
or its slice of every fused tensor), which is what gets merged; the output keeps the input's layout.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import Callable

import torch

from .checkpoint import materialize
from .errors import InputError, UnsupportedArchitectureError

LAYER_PREFIX = "model.layers.{layer}."
GLOBAL_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


def _every_layer(config, layer: int) -> bool:
    return True


def _qwen_sparse_step(config, layer: int) -> bool:
    # Mirrors Qwen2MoeDecoderLayer/Qwen3MoeDecoderLayer.__init__.
    return (
        layer not in (getattr(config, "mlp_only_layers", None) or [])
        and config.num_experts > 0
        and (layer + 1) % config.decoder_sparse_step == 0
    )


def _after_dense(config, layer: int) -> bool:
    # DeepseekV2/V3DecoderLayer, Glm4MoeDecoderLayer, Dots1DecoderLayer: the first layers are dense.
    return layer >= config.first_k_dense_replace


def _sparse_layer_types(config, layer: int) -> bool:
    # Glm4MoeLiteDecoderLayer.
    return config.mlp_layer_types[layer] == "sparse"


def _ernie_interval(config, layer: int) -> bool:
    # Ernie4_5_MoeDecoderLayer.
    return ((layer + 1) % config.moe_layer_interval == 0
            and config.moe_layer_start_index <= layer <= config.moe_layer_end_index)


def _after_num_dense(config, layer: int) -> bool:
    # Lfm2MoeDecoderLayer.
    return layer >= config.num_dense_layers


def _jamba_expert_layer(config, layer: int) -> bool:
    # JambaAttentionDecoderLayer/JambaMambaDecoderLayer: a sparse block where layers_num_experts > 1.
    return config.layers_num_experts[layer] > 1


def _listed_moe_layers(config, layer: int) -> bool:
    # Llama4TextDecoderLayer.
    return layer in config.moe_layers


def _keep_all(config, name: str) -> bool:
    return False


def _layers_after_the_last(config, name: str) -> bool:
    # Multi-token-prediction layers stored as model.layers.{L..}, which transformers ignores on load
    # (DeepSeek-V3's model.layers.61, GLM-4.5's 46/92, ...).
    match = re.match(r"model\.layers\.(\d+)\.", name)
    return bool(match) and int(match.group(1)) >= config.num_hidden_layers


def _mtp_prefix(config, name: str) -> bool:
    return name.startswith("mtp.")  # Qwen3-Next, Qwen3.5


def _mtp_anywhere(config, name: str) -> bool:
    return "mtp" in name  # ERNIE 4.5, as transformers' _keys_to_ignore_on_load_unexpected


def _no_groups(config) -> tuple[int, int]:
    return 1, 1


def _deepseek_v3_groups(config) -> tuple[int, int]:
    # Group score = sum of the top-2 corrected scores in each of n_group contiguous groups: every group needs
    # two experts, and an expert must stay in its group or routing changes silently.
    return int(config.n_group or 1), 2


def _deepseek_v2_groups(config) -> tuple[int, int]:
    # Group score = the max score in the group, only with topk_method "group_limited_greedy".
    if getattr(config, "topk_method", "greedy") == "group_limited_greedy":
        return int(config.n_group or 1), 1
    return 1, 1


def _scalar(config, key: str) -> int:
    value = getattr(config, key)
    if isinstance(value, (list, tuple)):  # hunyuan allows per-layer lists
        if len(set(value)) != 1:
            raise UnsupportedArchitectureError(
                f"config {key}={list(value)} varies by layer: streammerge keeps one expert count for every layer"
            )
        value = value[0]
    return int(value)


@dataclass(frozen=True)
class ArchSpec:
    model_type: str
    family: str
    modeling_module: str  # transformers module holding the layer classes
    layer_class: str
    experts_key: str  # config key of the routed expert count
    top_k_key: str
    moe_prefix: str  # on-disk name of the MoE block inside a layer
    router: str  # on-disk router weight, relative to moe_prefix
    projections: tuple[str, ...]  # on-disk names of an expert's gate, up and down projections (per-expert layout)
    routing: str  # the router's formula, as transformers computes it
    shared_expert: str  # what is kept untouched beside the routed experts
    is_moe_layer: Callable = _every_layer
    rotary_class: str = ""  # kept for reference; the runner takes the rotary module from the model itself
    moe_attr: str = "mlp"  # the MoE block's attribute in transformers' layer
    renames: tuple[tuple[str, str], ...] = ()  # on-disk -> in-memory names inside the MoE block
    router_vectors: tuple[tuple[str, int], ...] = ()  # per-expert vectors beside the router, with their expert dim
    fused: tuple[tuple[str, str], ...] = ()  # fused layout: (on-disk tensor, experts-module parameter)
    extra_globals: tuple[str, ...] = ()  # non-layer tensors beside GLOBAL_TENSORS
    attn_implementation: str = "sdpa"
    expert_groups: Callable = _no_groups  # config -> (groups experts must stay in, minimum kept per group)
    layer_type_classes: tuple[tuple[str, str], ...] = ()  # hybrids with a class per layer type (jamba)
    layer_type_key: str = ""
    softmax_router: bool = True  # routing is a softmax over plain router logits (what lsefit/kl fit)
    embedding_multiplier_key: str = ""  # config key scaling the embeddings before layer 0 (granite)
    logits_scaling_key: str = ""  # config key dividing the logits (granite)
    prefix: str = "model."  # the text model's on-disk prefix (VLM checkpoints: model.language_model.)
    lm_head: str = "lm_head.weight"
    text_config: str = ""  # VLM configs: the attribute holding the text model's config
    passthrough: tuple[str, ...] = ()  # name prefixes copied unchanged (a VLM's vision tower)
    dropped: Callable = _keep_all  # (config, name) -> tensors transformers ignores (MTP), left out of the output
    dropped_config: tuple[tuple[str, object], ...] = ()  # config edits saying they are gone (when the key exists)
    scaled_input_experts: bool = False  # llama4: experts get every token pre-scaled by its score, no routing args

    # --- classes -----------------------------------------------------------------------------------
    def module(self):
        return importlib.import_module(self.modeling_module)

    def layer_class_for(self, config, layer: int):
        name = self.layer_class
        if self.layer_type_classes:
            name = dict(self.layer_type_classes)[getattr(config, self.layer_type_key)[layer]]
        return getattr(self.module(), name)

    def classes(self):
        module = self.module()
        return getattr(module, self.layer_class), getattr(module, self.rotary_class, None)

    def moe_block(self, layer_module):
        return getattr(layer_module, self.moe_attr)

    @property
    def embed_name(self) -> str:
        return f"{self.prefix}embed_tokens.weight"

    @property
    def global_tensors(self) -> tuple[str, ...]:
        return (self.embed_name, f"{self.prefix}norm.weight", self.lm_head) + self.extra_globals

    def is_passthrough(self, name: str) -> bool:
        return name.startswith(self.passthrough) if self.passthrough else False

    # --- names ---------------------------------------------------------------------------------------
    def layer_prefix(self, layer: int) -> str:
        return f"{self.prefix}layers.{layer}."

    def router_name(self, layer: int) -> str:
        return f"{self.layer_prefix(layer)}{self.moe_prefix}.{self.router}"

    def router_vector_names(self, layer: int) -> list[tuple[str, int]]:
        return [(f"{self.layer_prefix(layer)}{self.moe_prefix}.{name}", dim) for name, dim in self.router_vectors]

    def expert_name(self, layer: int, expert: int, projection: str) -> str:
        return f"{self.layer_prefix(layer)}{self.moe_prefix}.experts.{expert}.{projection}.weight"

    def expert_names(self, layer: int, expert: int) -> list[str]:
        """The per-expert layout's tensors of one expert (fused layouts: the fused tensors holding it)."""
        if self.fused:
            return self.fused_names(layer)
        return [self.expert_name(layer, expert, p) for p in self.projections]

    def fused_names(self, layer: int) -> list[str]:
        return [f"{self.layer_prefix(layer)}{self.moe_prefix}.{name}" for name, _ in self.fused]

    def expert_tensor_names(self, layer: int, num_experts: int) -> list[str]:
        """Every on-disk tensor of the routed experts of a layer."""
        if self.fused:
            return self.fused_names(layer)
        return [n for e in range(num_experts) for n in self.expert_names(layer, e)]

    def routed_names(self, layer: int, num_experts: int) -> set[str]:
        """Everything that changes with the expert count: router, per-expert router vectors, experts."""
        return ({self.router_name(layer)} | {n for n, _ in self.router_vector_names(layer)}
                | set(self.expert_tensor_names(layer, num_experts)))

    # --- experts as parts ---------------------------------------------------------------------------
    def expert_parts(self, tensors: dict, layer: int, expert: int) -> dict[str, torch.Tensor]:
        """Expert `expert`'s tensors: its projections, or its slice of each fused tensor."""
        if self.fused:
            return {name: tensors[full][expert] for name, full in zip([n for n, _ in self.fused], self.fused_names(layer))}
        return {p: tensors[self.expert_name(layer, expert, p)] for p in self.projections}

    def expert_tensors(self, layer: int, experts: list[dict]) -> dict[str, torch.Tensor]:
        """On-disk tensors of a layer whose experts are `experts` (a list of parts), in the input's layout."""
        if self.fused:
            return {full: torch.stack([materialize(parts[name]) for parts in experts]).contiguous()
                    for (name, _), full in zip(self.fused, self.fused_names(layer))}
        return {self.expert_name(layer, k, p): parts[p] for k, parts in enumerate(experts) for p in self.projections}

    def down_parts(self) -> tuple[str, str | None]:
        """The keys of an expert's down projection in its parts, and of that projection's bias (None without)."""
        if self.fused:
            disk = {memory: name for name, memory in self.fused}
            return disk["down_proj"], disk.get("down_proj_bias")
        return self.projections[2], None

    def expert_pieces(self, parts: dict) -> list[tuple[str, slice, torch.Tensor]]:
        """Where one expert's parts go in the one-expert state of transformers' experts module (v5 fused
        names): (state name, its rows, tensor). Gate and up share `gate_up_proj`, gate first."""
        if self.fused:
            return [(memory, slice(None), parts[disk]) for disk, memory in self.fused]
        gate, up, down = (parts[p] for p in self.projections)
        return [("gate_up_proj", slice(0, gate.shape[0]), gate), ("gate_up_proj", slice(gate.shape[0], None), up),
                ("down_proj", slice(None), down)]

    # --- tensor tables (name -> (dtype, shape)), for plans made without reading weights --------------------
    def on_disk_table(self, layer: int, memory: dict) -> dict:
        """A layer's on-disk table from its in-memory one (transformers' layer state, experts fused as in v5)."""
        experts = f"{self.moe_attr}.experts."
        back = {f"{self.moe_attr}.{m}": f"{self.moe_prefix}.{d}" for d, m in self.renames}
        back.update({experts + m: f"{self.moe_prefix}.{d}" for d, m in self.fused})
        out = {}
        for key, entry in memory.items():
            if key.startswith(experts) and not self.fused:
                continue
            if key in back:
                key = back[key]
            elif key.startswith(self.moe_attr + "."):
                key = self.moe_prefix + key[len(self.moe_attr):]
            out[self.layer_prefix(layer) + key] = entry
        if experts + "gate_up_proj" in memory and not self.fused:
            dtype, (count, rows, columns) = memory[experts + "gate_up_proj"]
            _, down = memory[experts + "down_proj"]
            gate, up, down_name = self.projections
            for e in range(count):
                out[self.expert_name(layer, e, gate)] = (dtype, (rows // 2, columns))
                out[self.expert_name(layer, e, up)] = (dtype, (rows // 2, columns))
                out[self.expert_name(layer, e, down_name)] = (dtype, tuple(down[1:]))
        return out

    def compressed_table(self, layer: int, table: dict, num_experts: int, k: int) -> dict:
        """A MoE layer's on-disk table with `k` experts: experts 0..k-1, k router rows, vectors and fused tensors."""
        out = {n: entry for n, entry in table.items() if n not in self.routed_names(layer, num_experts)}
        dtype, shape = table[self.router_name(layer)]
        out[self.router_name(layer)] = (dtype, (k, *shape[1:]))
        for name, dim in self.router_vector_names(layer):
            dtype, shape = table[name]
            out[name] = (dtype, tuple(k if d == dim else n for d, n in enumerate(shape)))
        if self.fused:
            for name in self.fused_names(layer):
                dtype, shape = table[name]
                out[name] = (dtype, (k, *shape[1:]))
        else:
            out.update({n: table[n] for e in range(k) for n in self.expert_names(layer, e)})
        return out

    def expert_size(self, table: dict, layer: int, hidden_size: int) -> tuple[int, int]:
        """(elements of one routed expert, its intermediate size) from a layer's on-disk table."""
        def numel(shape):
            result = 1
            for n in shape:
                result *= n
            return result
        if self.fused:
            total = sum(numel(table[n][1][1:]) for n in self.fused_names(layer))
            down = table[self.fused_names(layer)[[m for _, m in self.fused].index("down_proj")]][1][1:]
            return total, down[0] if down[1] == hidden_size else down[1]  # [I, H] (gpt-oss, llama4) or [H, I]
        names = self.expert_names(layer, 0)
        return sum(numel(table[n][1]) for n in names), table[names[0]][1][0]

    # --- config ---------------------------------------------------------------------------------------
    def num_experts(self, config) -> int:
        return _scalar(config, self.experts_key)

    def top_k(self, config) -> int:
        return _scalar(config, self.top_k_key)

    def moe_layers(self, config) -> list[int]:
        return [i for i in range(config.num_hidden_layers) if self.is_moe_layer(config, i)]

    def check_experts_kept(self, config, k: int) -> None:
        """Refuse expert counts the router cannot work with (group-limited routing)."""
        groups, minimum = self.expert_groups(config)
        if groups <= 1:
            return
        num = self.num_experts(config)
        valid = [g * groups for g in range(minimum, num // groups + 1)]
        if k % groups or k // groups < minimum:
            raise InputError(
                f"{self.family} routes within {groups} expert groups: the experts kept must be a multiple of "
                f"{groups} with at least {minimum} per group; {k} is not (valid: {', '.join(map(str, valid))})"
            )
        selectable = int(getattr(config, "topk_group", groups) or groups) * (k // groups)
        if self.top_k(config) > selectable:
            raise InputError(
                f"keeping {k} experts leaves {selectable} selectable per token (topk_group × {k // groups}), fewer than "
                f"the model's top-{self.top_k(config)}: keep more experts"
            )

    def group_ranges(self, config) -> list[range]:
        groups, _ = self.expert_groups(config)
        size = self.num_experts(config) // groups
        return [range(g * size, (g + 1) * size) for g in range(groups)]


_SOFTMAX_TOPK = "softmax over all experts (fp32), top-k"
_SWIGLU = ("gate_proj", "up_proj", "down_proj")
_W = ("w1", "w3", "w2")
_SIGMOID_GROUPED = ("sigmoid (fp32) + e_score_correction_bias for the choice, group-limited top-k "
                    "(n_group groups scored by their top-2 sum, topk_group kept); weights without the bias, "
                    "renormalized iff norm_topk_prob, × routed_scaling_factor")
# DeepSeek-V3's MoE as GLM-4.5 and dots1 reuse it: sigmoid scores with a correction bias, group-limited routing,
# an MTP layer stored after the last layer.
_DEEPSEEK_V3_STYLE = dict(
    experts_key="n_routed_experts", top_k_key="num_experts_per_tok",
    moe_prefix="mlp", router="gate.weight", projections=_SWIGLU, routing=_SIGMOID_GROUPED,
    router_vectors=(("gate.e_score_correction_bias", 0),), expert_groups=_deepseek_v3_groups, softmax_router=False,
    dropped=_layers_after_the_last, dropped_config=(("num_nextn_predict_layers", 0),),
)


def _transformers(name: str) -> str:
    return f"transformers.models.{name}.modeling_{name}"


# Text-only and vision-language checkpoints of one family share everything but names and what is left alone.
_QWEN3_5_MOE = dict(
    modeling_module=_transformers("qwen3_5_moe"),
    layer_class="Qwen3_5MoeDecoderLayer", rotary_class="Qwen3_5MoeTextRotaryEmbedding",
    experts_key="num_experts", top_k_key="num_experts_per_tok",
    moe_prefix="mlp", router="gate.weight", projections=_SWIGLU,
    routing=f"{_SOFTMAX_TOPK}, renormalized; hybrid linear (gated DeltaNet) and full attention",
    dropped=_mtp_prefix, dropped_config=(("mtp_num_hidden_layers", 0),),
)
_LLAMA4 = dict(
    modeling_module=_transformers("llama4"),
    layer_class="Llama4TextDecoderLayer", rotary_class="Llama4TextRotaryEmbedding",
    experts_key="num_local_experts", top_k_key="num_experts_per_tok",
    moe_prefix="feed_forward", moe_attr="feed_forward", router="router.weight", projections=(),
    routing=("top-k of the router logits; each chosen expert's INPUT is scaled by the sigmoid of its logit; "
             "chunked and full attention"),
    is_moe_layer=_listed_moe_layers,
    fused=(("experts.gate_up_proj", "gate_up_proj"), ("experts.down_proj", "down_proj")),
    softmax_router=False, scaled_input_experts=True,
)

_SPECS = (
    ArchSpec(
        model_type="mixtral", family="Mixtral", modeling_module=_transformers("mixtral"),
        layer_class="MixtralDecoderLayer", rotary_class="MixtralRotaryEmbedding",
        experts_key="num_local_experts", top_k_key="num_experts_per_tok",
        moe_prefix="block_sparse_moe", router="gate.weight", projections=_W,
        routing=f"{_SOFTMAX_TOPK}, always renormalized", shared_expert="none",
    ),
    ArchSpec(
        model_type="qwen2_moe", family="Qwen2-MoE (Qwen1.5-MoE)", modeling_module=_transformers("qwen2_moe"),
        layer_class="Qwen2MoeDecoderLayer", rotary_class="Qwen2MoeRotaryEmbedding",
        experts_key="num_experts", top_k_key="num_experts_per_tok",
        moe_prefix="mlp", router="gate.weight", projections=_SWIGLU,
        routing=f"{_SOFTMAX_TOPK}, renormalized iff norm_topk_prob",
        shared_expert="shared_expert and its sigmoid shared_expert_gate", is_moe_layer=_qwen_sparse_step,
    ),
    ArchSpec(
        model_type="qwen3_moe", family="Qwen3-MoE", modeling_module=_transformers("qwen3_moe"),
        layer_class="Qwen3MoeDecoderLayer", rotary_class="Qwen3MoeRotaryEmbedding",
        experts_key="num_experts", top_k_key="num_experts_per_tok",
        moe_prefix="mlp", router="gate.weight", projections=_SWIGLU,
        routing=f"{_SOFTMAX_TOPK}, renormalized iff norm_topk_prob", shared_expert="none",
        is_moe_layer=_qwen_sparse_step,
    ),
    ArchSpec(
        model_type="olmoe", family="OLMoE", modeling_module=_transformers("olmoe"),
        layer_class="OlmoeDecoderLayer", rotary_class="OlmoeRotaryEmbedding",
        experts_key="num_experts", top_k_key="num_experts_per_tok",
        moe_prefix="mlp", router="gate.weight", projections=_SWIGLU,
        routing=f"{_SOFTMAX_TOPK}, renormalized iff norm_topk_prob", shared_expert="none",
    ),
    ArchSpec(
        model_type="deepseek_v2", family="DeepSeek-V2", modeling_module=_transformers("deepseek_v2"),
        layer_class="DeepseekV2DecoderLayer", rotary_class="DeepseekV2RotaryEmbedding",
        experts_key="n_routed_experts", top_k_key="num_experts_per_tok",
        moe_prefix="mlp", router="gate.weight", projections=_SWIGLU,
        routing=(f"{_SOFTMAX_TOPK} (topk_method greedy) or group-limited (groups scored by their max), "
                 "× routed_scaling_factor, never renormalized"),
        shared_expert="shared_experts (n_shared_experts); the first first_k_dense_replace layers are dense",
        is_moe_layer=_after_dense, expert_groups=_deepseek_v2_groups, softmax_router=False,
        dropped=_layers_after_the_last, dropped_config=(("num_nextn_predict_layers", 0),),
    ),
    ArchSpec(
        model_type="deepseek_v3", family="DeepSeek-V3 / R1", modeling_module=_transformers("deepseek_v3"),
        layer_class="DeepseekV3DecoderLayer", rotary_class="DeepseekV3RotaryEmbedding",
        **_DEEPSEEK_V3_STYLE,
        shared_expert="shared_experts (ungated); the first first_k_dense_replace layers are dense",
        is_moe_layer=_after_dense,
    ),
    ArchSpec(
        model_type="glm4_moe", family="GLM-4.5 (GLM-4-MoE)", modeling_module=_transformers("glm4_moe"),
        layer_class="Glm4MoeDecoderLayer", rotary_class="Glm4MoeRotaryEmbedding",
        **_DEEPSEEK_V3_STYLE,
        shared_expert="shared_experts (ungated); the first first_k_dense_replace layers are dense",
        is_moe_layer=_after_dense,
    ),
    ArchSpec(
        model_type="glm4_moe_lite", family="GLM-4-MoE-Lite", modeling_module=_transformers("glm4_moe_lite"),
        layer_class="Glm4MoeLiteDecoderLayer", rotary_class="Glm4MoeLiteRotaryEmbedding",
        **_DEEPSEEK_V3_STYLE,
        shared_expert="shared_experts (ungated); layers marked dense in mlp_layer_types",
        is_moe_layer=_sparse_layer_types,
    ),
    ArchSpec(
        model_type="dots1", family="dots.llm1", modeling_module=_transformers("dots1"),
        layer_class="Dots1DecoderLayer", rotary_class="Dots1RotaryEmbedding",
        **_DEEPSEEK_V3_STYLE,
        shared_expert="shared_experts (ungated); the first first_k_dense_replace layers are dense",
        is_moe_layer=_after_dense,
    ),
    ArchSpec(
        model_type="qwen3_next", family="Qwen3-Next", modeling_module=_transformers("qwen3_next"),
        layer_class="Qwen3NextDecoderLayer", rotary_class="Qwen3NextRotaryEmbedding",
        experts_key="num_experts", top_k_key="num_experts_per_tok",
        moe_prefix="mlp", router="gate.weight", projections=_SWIGLU,
        routing=f"{_SOFTMAX_TOPK}, renormalized iff norm_topk_prob; hybrid linear (gated DeltaNet) and full attention",
        shared_expert="shared_expert and its sigmoid shared_expert_gate; linear-attention layers",
        is_moe_layer=_qwen_sparse_step,
        dropped=_mtp_prefix, dropped_config=(("mtp_num_hidden_layers", 0),),
    ),
    ArchSpec(
        model_type="qwen3_5_moe_text", family="Qwen3.5-MoE (text-only checkpoints)", **_QWEN3_5_MOE,
        shared_expert="shared_expert and its sigmoid shared_expert_gate; linear-attention layers",
    ),
    ArchSpec(
        model_type="qwen3_5_moe", family="Qwen3.5-MoE (vision-language checkpoints)", **_QWEN3_5_MOE,
        shared_expert="shared_expert and its sigmoid shared_expert_gate; linear-attention layers; the vision tower",
        prefix="model.language_model.", text_config="text_config", passthrough=("model.visual.",),
    ),
    ArchSpec(
        model_type="minimax_m2", family="MiniMax-M2", modeling_module=_transformers("minimax_m2"),
        layer_class="MiniMaxM2DecoderLayer", rotary_class="MiniMaxM2RotaryEmbedding",
        experts_key="num_local_experts", top_k_key="num_experts_per_tok",
        moe_prefix="block_sparse_moe", router="gate.weight", projections=_W,
        routing="sigmoid (fp32) + e_score_correction_bias for the choice, top-k; weights without the bias, renormalized",
        shared_expert="none", router_vectors=(("e_score_correction_bias", 0),), softmax_router=False,
    ),
    ArchSpec(
        model_type="minimax", family="MiniMax (MiniMax-Text-01)", modeling_module=_transformers("minimax"),
        layer_class="MiniMaxDecoderLayer", rotary_class="MiniMaxRotaryEmbedding",
        experts_key="num_local_experts", top_k_key="num_experts_per_tok",
        moe_prefix="block_sparse_moe", router="gate.weight", projections=_W,
        routing=f"{_SOFTMAX_TOPK}, always renormalized; hybrid lightning (linear) and full attention",
        shared_expert="none",
    ),
    ArchSpec(
        model_type="phimoe", family="Phi-3.5-MoE (PhiMoE)", modeling_module=_transformers("phimoe"),
        layer_class="PhimoeDecoderLayer", rotary_class="PhimoeRotaryEmbedding",
        experts_key="num_local_experts", top_k_key="num_experts_per_tok",
        moe_prefix="block_sparse_moe", router="gate.weight", projections=_W,
        routing="sparsemixer: top-2 with threshold masking (router_jitter_noise), as transformers' PhimoeRouter",
        shared_expert="none", renames=(("gate.weight", "router.weight"),), extra_globals=("model.norm.bias",),
        softmax_router=False,
    ),
    ArchSpec(
        model_type="hunyuan_v1_moe", family="Hunyuan-MoE", modeling_module=_transformers("hunyuan_v1_moe"),
        layer_class="HunYuanMoEV1DecoderLayer", rotary_class="HunYuanMoEV1RotaryEmbedding",
        experts_key="num_experts", top_k_key="moe_topk",
        moe_prefix="mlp", router="gate.wg.weight", projections=_SWIGLU,
        routing=f"{_SOFTMAX_TOPK}, always renormalized", shared_expert="shared_mlp",
    ),
    ArchSpec(
        model_type="ernie4_5_moe", family="ERNIE 4.5 MoE", modeling_module=_transformers("ernie4_5_moe"),
        layer_class="Ernie4_5_MoeDecoderLayer", rotary_class="Ernie4_5_MoeRotaryEmbedding",
        experts_key="moe_num_experts", top_k_key="moe_k",
        moe_prefix="mlp", router="gate.weight", projections=_SWIGLU,
        routing=(f"{_SOFTMAX_TOPK} of the probabilities + moe_statics.e_score_correction_bias [1,E]; weights without "
                 "the bias, renormalized (clamped by moe_norm_min)"),
        shared_expert="shared_experts; layers outside moe_layer_start_index..end_index / moe_layer_interval are dense",
        is_moe_layer=_ernie_interval, router_vectors=(("moe_statics.e_score_correction_bias", 1),),
        renames=(("moe_statics.e_score_correction_bias", "gate.moe_statics.e_score_correction_bias"),),
        dropped=_mtp_anywhere, dropped_config=(("num_nextn_predict_layers", 0),),
    ),
    ArchSpec(
        model_type="flex_olmo", family="FlexOlmo", modeling_module=_transformers("flex_olmo"),
        layer_class="FlexOlmoDecoderLayer", rotary_class="FlexOlmoRotaryEmbedding",
        experts_key="num_experts", top_k_key="num_experts_per_tok",
        moe_prefix="mlp", router="gate.weight", projections=_SWIGLU,
        routing=f"{_SOFTMAX_TOPK}, renormalized iff norm_topk_prob", shared_expert="none",
    ),
    ArchSpec(
        model_type="lfm2_moe", family="LFM2-MoE", modeling_module=_transformers("lfm2_moe"),
        layer_class="Lfm2MoeDecoderLayer", rotary_class="Lfm2MoeRotaryEmbedding",
        experts_key="num_experts", top_k_key="num_experts_per_tok",
        moe_prefix="feed_forward", moe_attr="feed_forward", router="gate.weight", projections=_W,
        routing=("sigmoid (fp32) + expert_bias for the choice, top-k; weights without the bias, renormalized iff "
                 "norm_topk_prob, × routed_scaling_factor; hybrid short convolutions and attention"),
        shared_expert="none; the first num_dense_layers layers are dense; convolution layers",
        is_moe_layer=_after_num_dense, router_vectors=(("expert_bias", 0),),
        extra_globals=("model.embedding_norm.weight",), softmax_router=False,
    ),
    ArchSpec(
        model_type="jamba", family="Jamba", modeling_module=_transformers("jamba"),
        layer_class="JambaAttentionDecoderLayer",
        layer_type_classes=(("attention", "JambaAttentionDecoderLayer"), ("mamba", "JambaMambaDecoderLayer")),
        layer_type_key="layers_block_type",
        experts_key="num_experts", top_k_key="num_experts_per_tok",
        moe_prefix="feed_forward", moe_attr="feed_forward", router="router.weight", projections=_SWIGLU,
        routing=f"{_SOFTMAX_TOPK}, never renormalized; hybrid Mamba and attention",
        shared_expert="none; layers off expert_layer_period/offset are dense; Mamba layers",
        is_moe_layer=_jamba_expert_layer, extra_globals=("model.final_layernorm.weight",),
    ),
    ArchSpec(
        model_type="granitemoe", family="GraniteMoE (Granite 3.x MoE)", modeling_module=_transformers("granitemoe"),
        layer_class="GraniteMoeDecoderLayer", rotary_class="GraniteMoeRotaryEmbedding",
        experts_key="num_local_experts", top_k_key="num_experts_per_tok",
        moe_prefix="block_sparse_moe", moe_attr="block_sparse_moe", router="router.layer.weight", projections=(),
        routing="top-k of the router logits, softmax over the k (= softmax top-k renormalized)",
        shared_expert="none", renames=(("router.layer.weight", "router.weight"),),
        fused=(("input_linear.weight", "gate_up_proj"), ("output_linear.weight", "down_proj")),
        embedding_multiplier_key="embedding_multiplier", logits_scaling_key="logits_scaling",
    ),
    ArchSpec(
        model_type="granitemoeshared", family="GraniteMoE-shared", modeling_module=_transformers("granitemoeshared"),
        layer_class="GraniteMoeSharedDecoderLayer", rotary_class="GraniteMoeSharedRotaryEmbedding",
        experts_key="num_local_experts", top_k_key="num_experts_per_tok",
        moe_prefix="block_sparse_moe", moe_attr="block_sparse_moe", router="router.layer.weight", projections=(),
        routing="top-k of the router logits, softmax over the k (= softmax top-k renormalized)",
        shared_expert="shared_mlp", renames=(("router.layer.weight", "router.weight"),),
        fused=(("input_linear.weight", "gate_up_proj"), ("output_linear.weight", "down_proj")),
        embedding_multiplier_key="embedding_multiplier", logits_scaling_key="logits_scaling",
    ),
    ArchSpec(
        model_type="gpt_oss", family="gpt-oss", modeling_module=_transformers("gpt_oss"),
        layer_class="GptOssDecoderLayer", rotary_class="GptOssRotaryEmbedding",
        experts_key="num_local_experts", top_k_key="num_experts_per_tok",
        moe_prefix="mlp", router="router.weight", projections=(),
        routing=("router logits with router.bias, top-k, softmax over the k; experts with biases, interleaved "
                 "gate/up columns and a clamped SwiGLU; attention sinks (eager attention)"),
        shared_expert="none", router_vectors=(("router.bias", 0),), softmax_router=False,
        fused=(("experts.gate_up_proj", "gate_up_proj"), ("experts.gate_up_proj_bias", "gate_up_proj_bias"),
               ("experts.down_proj", "down_proj"), ("experts.down_proj_bias", "down_proj_bias")),
        attn_implementation="eager",
    ),
    ArchSpec(
        model_type="llama4_text", family="Llama 4 (text-only checkpoints)", **_LLAMA4,
        shared_expert="shared_expert; layers not in moe_layers are dense",
    ),
    ArchSpec(
        model_type="llama4", family="Llama 4 (vision-language checkpoints)", **_LLAMA4,
        shared_expert="shared_expert; layers not in moe_layers are dense; the vision tower and projector",
        prefix="language_model.model.", lm_head="language_model.lm_head.weight", text_config="text_config",
        passthrough=("vision_model.", "multi_modal_projector."),
    ),
)

ARCHITECTURES: dict[str, ArchSpec] = {spec.model_type: spec for spec in _SPECS}

_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# MoE families that a table entry cannot support, with the reason, so nobody attempts one.
IMPOSSIBLE = {
    "jetmoe": "its attention (mixture of attention heads) and MLP experts share num_local_experts, so a standard "
              "JetMoE config cannot hold fewer MLP experts alone",
}


FP8_SCALE_SUFFIX = "_scale_inv"


def fp8_block_size(raw_config: dict) -> tuple[int, int] | None:
    """The [rows, columns] blocks of a block-quantized FP8 checkpoint (DeepSeek-V3's native format: e4m3 weights,
    one float32 `weight_scale_inv` per block), None for anything else."""
    quantization = raw_config.get("quantization_config")
    if isinstance(quantization, dict) and quantization.get("quant_method") == "fp8" and quantization.get("weight_block_size"):
        rows, columns = quantization["weight_block_size"]
        return int(rows), int(columns)
    return None


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
    """weight × its block's scale, as DeepSeek's and transformers' FP8 dequantization compute it, one row of
    blocks at a time so the float32 temporaries stay small."""
    rows, columns = weight.shape
    out = torch.empty((rows, columns), dtype=dtype, device=weight.device)
    for index, start in enumerate(range(0, rows, block[0])):
        scale = scale_inv[index].float().repeat_interleave(block[1])[:columns]
        out[start:start + block[0]] = (weight[start:start + block[0]].float() * scale).to(dtype)
    return out


def check_quantization(raw_config: dict) -> None:
    """Block-FP8 checkpoints are dequantized on read; other quantized ones (MXFP4 blocks, GPTQ, ...) cannot be
    averaged as stored and are refused."""
    quantization = raw_config.get("quantization_config")
    if not quantization or fp8_block_size(raw_config):
        return
    method = quantization.get("quant_method", "unknown") if isinstance(quantization, dict) else "unknown"
    raise UnsupportedArchitectureError(
        f"this checkpoint is quantized ({method}"
        + (f", {quantization.get('weight_block_size')} blocks" if isinstance(quantization, dict) and quantization.get("weight_block_size") else "")
        + "): streammerge merges unquantized weights only; dequantize it to bf16 first (e.g. load it with "
        "transformers and save_pretrained in bfloat16, or use the model's bf16 release) and pass that directory"
    )


def spec_for(raw_config: dict) -> ArchSpec:
    """The table entry for a config.json dict, or a one-line error naming what is wrong."""
    model_type = raw_config.get("model_type")
    spec = ARCHITECTURES.get(model_type)
    if spec is not None:
        check_quantization(raw_config)
        return spec
    supported = ", ".join(sorted(ARCHITECTURES))
    if model_type in IMPOSSIBLE:
        raise UnsupportedArchitectureError(
            f"model_type '{model_type}' cannot be compressed by removing experts: {IMPOSSIBLE[model_type]}"
        )
    if not any(raw_config.get(key) for key in _EXPERT_COUNT_KEYS):
        raise UnsupportedArchitectureError(
            f"model_type '{model_type}' is a dense (non-MoE) model: streammerge only compresses "
            f"Mixture-of-Experts checkpoints ({supported})"
        )
    raise UnsupportedArchitectureError(
        f"unsupported model_type '{model_type}': supported families are {supported}; "
        f"add an entry to streammerge/arch.py to support it"
    )


def families_table() -> str:
    """The README's list of supported families, rendered from ARCHITECTURES (the one source of truth)."""
    rows = ["| Family | model_type | Routing | Kept untouched |", "|---|---|---|---|"]
    for spec in ARCHITECTURES.values():
        layout = " Experts fused on disk (kept fused)." if spec.fused else ""
        rows.append(f"| {spec.family} | `{spec.model_type}` | {spec.routing}.{layout} | {spec.shared_expert} |")
    return "\n".join(rows) + "\n"
