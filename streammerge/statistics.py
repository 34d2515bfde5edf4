"""Per-layer expert statistics, accumulated expert by expert and chunk by chunk over the calibration tokens."""

from __future__ import annotations

import torch

from .routed import RoutedChunk

SAMPLED_TOKENS_PER_CHUNK = 64


def sampled_rows(x: torch.Tensor) -> slice:
    """About SAMPLED_TOKENS_PER_CHUNK evenly spaced rows of a chunk, on which experts are compared token by token."""
    return slice(None, None, max(1, x.shape[0] // SAMPLED_TOKENS_PER_CHUNK))

class ExpertStatistics:
    """Running sums for one MoE layer; float64 so that chunking does not change the result measurably.

    - `mean_output`: every expert's output averaged over all tokens, routed or not (the HC-SMoE feature);
    - `counts`: how often each expert is among the model's top-k (usage frequency);
    - `reap`: REAP saliency, the mean over tokens routed to an expert of its renormalized router weight
      times the norm of its output;
    - `token_distance`: the mean over sampled tokens of the distance between two experts' outputs on the
      same token, which the mean output can hide (two experts can agree on average and differ per token);
    - `router_inputs`: the sampled tokens' MoE inputs, for fitting a reduced router.

    The sums live on `device` while the layer's experts run, so that adding to them never waits for the device;
    `to_host` brings them back once the layer is done.
    """

    def __init__(self, num_experts: int, hidden_size: int, device: torch.device | str = "cpu"):
        self.tokens = 0
        self.sampled = 0
        self.distance_sum = torch.zeros(num_experts, num_experts, dtype=torch.float64, device=device)
        self.inputs: list[torch.Tensor] = []
        self.output_sum = torch.zeros(num_experts, hidden_size, dtype=torch.float64, device=device)
        self.counts = torch.zeros(num_experts, dtype=torch.int64)
        self.reap_sum = torch.zeros(num_experts, dtype=torch.float64, device=device)

    def add_routing(self, chunk: RoutedChunk) -> None:
        self.tokens += chunk.top_k_index.shape[0]
        self.counts += chunk.counts

    def add_expert(self, expert: int, output: torch.Tensor, chunk: RoutedChunk) -> None:
        """Expert `expert`'s `output` on every token of `chunk`."""
        self.output_sum[expert] += output.sum(0, dtype=torch.float64)
        rows = chunk.rows[expert]
        gate = chunk.gates[expert].double() / chunk.top_k_weights[rows].double().sum(-1)
        self.reap_sum[expert] += (gate * output[rows].double().norm(dim=-1)).sum()

    def add_sample(self, x: torch.Tensor, outputs: torch.Tensor) -> None:
        """`x` [n, H]: sampled MoE inputs; `outputs` [E, n, H]: every expert's output on them."""
        self.sampled += x.shape[0]
        self.inputs.append(x.float())
        self.distance_sum += torch.cdist(outputs.transpose(0, 1).double(), outputs.transpose(0, 1).double()).sum(0)

    def to_host(self) -> "ExpertStatistics":
        self.distance_sum, self.output_sum, self.reap_sum = (
            t.cpu() for t in (self.distance_sum, self.output_sum, self.reap_sum))
        self.inputs = [torch.cat(self.inputs).cpu()] if self.inputs else []
        return self

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
