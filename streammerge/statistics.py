"""Per-layer expert statistics, accumulated chunk by chunk over the calibration tokens."""

from __future__ import annotations

import torch


class ExpertStatistics:
    """Running sums for one MoE layer; float64 so that chunking does not change the result measurably.

    - `mean_output`: every expert's output averaged over all tokens, routed or not (the HC-SMoE feature);
    - `counts`: how often each expert is among the model's top-k (usage frequency);
    - `reap`: REAP saliency, the mean over tokens routed to an expert of its renormalized router weight
      times the norm of its output;
    - `token_distance`: the mean over sampled tokens of the distance between two experts' outputs on the
      same token, which the mean output can hide (two experts can agree on average and differ per token);
    - `router_inputs`: the sampled tokens' MoE inputs, for fitting a reduced router.
    """

    def __init__(self, num_experts: int, hidden_size: int):
        self.tokens = 0
        self.sampled = 0
        self.distance_sum = torch.zeros(num_experts, num_experts, dtype=torch.float64)
        self.inputs: list[torch.Tensor] = []
        self.output_sum = torch.zeros(num_experts, hidden_size, dtype=torch.float64)
        self.counts = torch.zeros(num_experts, dtype=torch.int64)
        self.reap_sum = torch.zeros(num_experts, dtype=torch.float64)

    def add_routing(self, top_k_index: torch.Tensor) -> None:
        self.tokens += top_k_index.shape[0]
        self.counts += torch.bincount(top_k_index.flatten().cpu(), minlength=len(self.counts))

    def add_expert(self, expert: int, output: torch.Tensor, top_k_index: torch.Tensor,
                   top_k_weights: torch.Tensor) -> None:
        self.output_sum[expert] += output.sum(0, dtype=torch.float64).cpu()
        chosen = top_k_index == expert
        routed = chosen.any(-1)
        weights = top_k_weights.double()
        gate = (weights * chosen).sum(-1) / weights.sum(-1)
        self.reap_sum[expert] += (gate[routed] * output[routed].double().norm(dim=-1)).sum().cpu()

    def add_sample(self, x: torch.Tensor, outputs: torch.Tensor) -> None:
        """`x` [n, H]: sampled MoE inputs; `outputs` [E, n, H]: every expert's output on them."""
        self.sampled += x.shape[0]
        self.inputs.append(x.float().cpu())
        self.distance_sum += torch.cdist(outputs.transpose(0, 1).double(), outputs.transpose(0, 1).double()).sum(0).cpu()

    @property
    def token_distance(self) -> torch.Tensor:
        return self.distance_sum / max(self.sampled, 1)

    @property
    def router_inputs(self) -> torch.Tensor:
        return torch.cat(self.inputs)

    @property
    def mean_output(self) -> torch.Tensor:
        return (self.output_sum / self.tokens).float()

    @property
    def frequencies(self) -> torch.Tensor:
        return self.counts.double() / self.counts.sum().clamp(min=1)

    @property
    def reap(self) -> torch.Tensor:
        return self.reap_sum / self.counts.double().clamp(min=1)
