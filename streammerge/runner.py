"""One decoder layer at a time: transformers' own layer class, filled from checkpoint tensors."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .arch import ArchSpec
from .checkpoint import materialize
from .errors import CheckpointError


def split_layer(spec: ArchSpec, config, layer: int, tensors: dict[str, torch.Tensor]):
    """One layer's on-disk tensors as (state dict of the in-memory layer without routed experts,
    list of each routed expert's (gate, up, down) weights).

    The experts stay apart so they can go to the device one at a time (`ExpertStream`).
    """
    prefix = spec.layer_prefix(layer)
    state = {name[len(prefix):]: t for name, t in tensors.items()}
    experts = []
    if spec.is_moe_layer(config, layer):
        for e in range(spec.num_experts(config)):
            try:
                experts.append(tuple(state.pop(f"{spec.moe_prefix}.experts.{e}.{p}.weight") for p in spec.projections))
            except KeyError as exc:
                raise CheckpointError(
                    f"layer {layer} lacks expert tensor {prefix}{exc.args[0]} that the config's "
                    f"{spec.experts_key}={spec.num_experts(config)} requires: the checkpoint is incomplete"
                ) from exc
    if spec.moe_prefix != "mlp":
        state = {("mlp." + k[len(spec.moe_prefix) + 1:] if k.startswith(spec.moe_prefix + ".") else k): t
                 for k, t in state.items()}
    return state, experts


def runtime_config(config, attn_implementation: str = "sdpa"):
    """A copy of the config ready for standalone layers.

    `_attn_implementation` must be set explicitly: left as None, the mask helpers return no mask while
    the attention falls back to eager, which then runs silently non-causal.
    """
    config = copy.deepcopy(config)
    config._attn_implementation = attn_implementation
    config._experts_implementation = "eager"
    config.use_cache = False
    return config


def reduced_config(spec: ArchSpec, config, num_experts: int):
    """The config of the compressed layer: `num_experts` routed experts and top-k capped to that."""
    config = copy.deepcopy(config)
    setattr(config, spec.experts_key, num_experts)
    setattr(config, spec.top_k_key, min(spec.top_k(config), num_experts))
    return config


def load_layer(spec: ArchSpec, config, layer: int, tensors: dict[str, torch.Tensor],
               device: torch.device | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """transformers' layer built on meta and filled strictly from `tensors`.

    Routed experts are replaced by an `ExpertStream` over their (CPU, memory-mapped) tensors. Without a
    device the tensors may be meta too: that checks every name and shape of a layer without reading a
    byte of weights.
    """
    with torch.device("meta"):
        module = spec.classes()[0](config, layer)
    state, experts = split_layer(spec, config, layer, tensors)
    if experts:
        module.mlp.experts = ExpertStream(type(module.mlp.experts), spec, config, experts, device, dtype)
    if device is not None:
        state = {k: t.to(device=device, dtype=dtype) for k, t in state.items()}
    try:
        module.load_state_dict(state, strict=True, assign=True)
        if device is None and experts:
            module.mlp.experts.check(layer)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(
            f"layer {layer} tensors do not match the config ({detail[:300]}): the checkpoint and config.json disagree"
        ) from exc
    if device is not None:
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        assert not left, f"layer {layer} still has meta tensors {left}"
    return module.eval()


class ExpertStream(nn.Module):
    """Stands in for transformers' experts module, with one expert on the device at a time.

    Each expert runs on every token through a one-expert instance of transformers' own experts class
    (so its math is the model's), and the routed combination is returned as the layer expects. Every
    expert's output on all tokens is what the statistics need anyway, so `observer(expert, x, y,
    top_k_index, top_k_weights)` sees each one and nothing is computed twice.
    """

    def __init__(self, experts_class, spec: ArchSpec, config, experts: list[tuple], device, dtype):
        super().__init__()
        with torch.device("meta"):
            one = experts_class(reduced_config(spec, config, 1))
        # Not a registered submodule: its weights are whichever expert ran last, not part of the layer.
        object.__setattr__(self, "one", one)
        self.experts = experts
        self.device = device
        self.dtype = dtype
        self.observer = None

    def check(self, layer: int) -> None:
        for gate, up, down in self.experts:
            self.one.load_state_dict(self._state(gate, up, down), strict=True, assign=True)

    @staticmethod
    def _state(gate, up, down) -> dict:
        return {"gate_up_proj": torch.cat([gate, up])[None], "down_proj": down[None]}

    def output(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """Expert `expert` applied to every row of `x` [N, H]."""
        weights = (materialize(t) for t in self.experts[expert])
        state = {k: t.to(device=self.device, dtype=self.dtype) for k, t in self._state(*weights).items()}
        self.one.load_state_dict(state, strict=True, assign=True)
        index = torch.zeros((x.shape[0], 1), device=x.device, dtype=torch.long)
        weight = torch.ones((x.shape[0], 1), device=x.device, dtype=x.dtype)
        return self.one(x, index, weight)

    def forward(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Observed: every expert on every token (the statistics need them all). Otherwise only the
        tokens routed to each expert, as inference does."""
        combined = torch.zeros_like(x)
        for expert in range(len(self.experts)):
            chosen = top_k_index == expert
            if self.observer is None:
                rows = chosen.any(-1).nonzero().squeeze(-1)
                if rows.numel():
                    gate = (top_k_weights[rows] * chosen[rows]).sum(-1, keepdim=True)
                    combined.index_add_(0, rows, (self.output(expert, x[rows]) * gate).to(combined.dtype))
                continue
            y = self.output(expert, x)
            self.observer(expert, x, y, top_k_index, top_k_weights)
            gate = (top_k_weights * chosen).sum(-1, keepdim=True)
            combined += (y * gate).to(combined.dtype)
        return combined


class LayerRunner:
    """Builds layers on the meta device, fills them from tensors and runs them on `device`."""

    def __init__(self, spec: ArchSpec, config, device: torch.device, dtype: torch.dtype):
        self.spec = spec
        self.config = runtime_config(config)
        self.device = device
        self.dtype = dtype
        rotary_class = spec.classes()[1]
        self.rotary = rotary_class(config=self.config).to(device)
        self._context: dict[tuple[int, int], dict] = {}

    def build(self, layer: int, tensors: dict[str, torch.Tensor], config=None) -> nn.Module:
        config = self.config if config is None else runtime_config(config)
        return load_layer(self.spec, config, layer, tensors, self.device, self.dtype)

    def context(self, batch: int, seqlen: int, layer: int) -> dict:
        """Rotary embeddings, positions and the layer type's causal mask, built once per shape."""
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            layer_type = layer_types[layer]
        else:  # families without layer_types pick by the config's window, as their model classes do
            layer_type = "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"
        key = (batch, seqlen, layer_type)
        if key not in self._context:
            embeds = torch.zeros(batch, seqlen, self.config.hidden_size, device=self.device, dtype=self.dtype)
            positions = torch.arange(seqlen, device=self.device).unsqueeze(0).expand(batch, -1)
            mask_args = dict(config=self.config, inputs_embeds=embeds, attention_mask=None,
                             past_key_values=None, position_ids=positions)
            if layer_type == "sliding_attention":
                mask = create_sliding_window_causal_mask(**mask_args)
            else:
                mask = create_causal_mask(**mask_args)
            self._context[key] = dict(
                position_embeddings=self.rotary(embeds, positions),
                attention_mask=mask,
                position_ids=positions,
            )
        return self._context[key]

    @torch.no_grad()
    def forward(self, module: nn.Module, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        return module(hidden, **self.context(hidden.shape[0], hidden.shape[1], layer))

