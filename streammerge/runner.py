"""One decoder layer at a time: transformers' own layer class, filled from checkpoint tensors."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from .arch import ArchSpec
from .errors import CheckpointError


def module_state(spec: ArchSpec, config, layer: int, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Translate one layer's on-disk tensors to the state dict of transformers' in-memory layer.

    On disk each expert has its own gate/up/down matrices; in memory they are stacked into
    `experts.gate_up_proj [E, 2I, H]` (gate rows first) and `experts.down_proj [E, H, I]`.
    """
    prefix = spec.layer_prefix(layer)
    state = {name[len(prefix):]: t for name, t in tensors.items()}
    if spec.is_moe_layer(config, layer):
        gate, up, down = spec.projections
        moe = spec.moe_prefix
        experts = range(spec.num_experts(config))
        try:
            gates = [state.pop(f"{moe}.experts.{e}.{gate}.weight") for e in experts]
            ups = [state.pop(f"{moe}.experts.{e}.{up}.weight") for e in experts]
            downs = [state.pop(f"{moe}.experts.{e}.{down}.weight") for e in experts]
        except KeyError as exc:
            raise CheckpointError(
                f"layer {layer} lacks expert tensor {prefix}{exc.args[0]} that the config's "
                f"{spec.experts_key}={spec.num_experts(config)} requires: the checkpoint is incomplete"
            ) from exc
        state["mlp.experts.gate_up_proj"] = torch.cat([torch.stack(gates), torch.stack(ups)], dim=1)
        state["mlp.experts.down_proj"] = torch.stack(downs)
    if spec.moe_prefix != "mlp":
        state = {("mlp." + k[len(spec.moe_prefix) + 1:] if k.startswith(spec.moe_prefix + ".") else k): t
                 for k, t in state.items()}
    return state


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

    Without a device the tensors may be meta too: that checks every name and shape of a layer
    without reading a byte of weights.
    """
    with torch.device("meta"):
        module = spec.classes()[0](config, layer)
    state = module_state(spec, config, layer, tensors)
    if device is not None:
        state = {k: t.to(device=device, dtype=dtype) for k, t in state.items()}
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise CheckpointError(
            f"layer {layer} tensors do not match the config ({detail[:300]}): the checkpoint and config.json disagree"
        ) from exc
    if device is not None:
        left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
        assert not left, f"layer {layer} still has meta tensors {left}"
    return module.eval()


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


@torch.no_grad()
def expert_output(experts: nn.Module, expert: int, x: torch.Tensor) -> torch.Tensor:
    """Expert `expert` applied to every token of `x` [N, H], through transformers' own experts module."""
    index = torch.full((x.shape[0], 1), expert, device=x.device, dtype=torch.long)
    weight = torch.ones((x.shape[0], 1), device=x.device, dtype=x.dtype)
    return experts(x, index, weight)
