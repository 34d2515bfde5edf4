"""One MoE layer's calibration tokens as its experts see them: each chunk's MoE inputs and routing, kept so the
routed experts can stream over every chunk once (runner.ExpertStream.sweep) instead of once per chunk."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Placement:
    """Where a run keeps a layer's routed tokens, and at most how many tokens one expert call takes
    (`plan.placement`)."""

    tokens_on_device: bool = True
    max_rows: int | None = None


@dataclass
class RoutedChunk:
    """One chunk: the MoE block's inputs x [N, H] and the model's top-k routing [N, k], and per expert the rows
    routed to it (ascending) with their routing weights, index lists made once per chunk."""

    x: torch.Tensor
    top_k_index: torch.Tensor
    top_k_weights: torch.Tensor
    rows: list[torch.Tensor]
    gates: list[torch.Tensor]
    counts: torch.Tensor  # on the host: tokens routed to each expert

    def to(self, device: torch.device) -> "RoutedChunk":
        move = lambda t: t.to(device, non_blocking=True)  # noqa: E731 (pinned host memory: asynchronous)
        return RoutedChunk(move(self.x), move(self.top_k_index), move(self.top_k_weights),
                           [move(r) for r in self.rows], [move(g) for g in self.gates], self.counts)


class RoutedTokens:
    """Every chunk of one layer, kept on the compute device, or in pinned host memory when the plan finds it
    would not fit there (`on_device=False`; each expert then copies each chunk in, asynchronously)."""

    def __init__(self, num_experts: int, device: torch.device, on_device: bool = True):
        self.num_experts = num_experts
        self.device = device
        self.on_device = on_device or device.type == "cpu"
        self.chunks: list[RoutedChunk] = []

    def add(self, x: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> None:
        """A chunk's MoE inputs and routing. One stable sort groups the (token, slot) pairs by expert; the
        group sizes are this chunk's only trip to the host, so the experts' loop needs none."""
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)  # per expert, its tokens in ascending order
        counts = torch.bincount(flat, minlength=self.num_experts).cpu().tolist()
        rows, gates = self._keep(order // k), self._keep(top_k_weights.reshape(-1)[order])
        self.chunks.append(RoutedChunk(self._keep(x), self._keep(top_k_index), self._keep(top_k_weights),
                                       list(rows.split(counts)), list(gates.split(counts)), torch.tensor(counts)))

    def _keep(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.on_device:
            return tensor.contiguous()
        return tensor.to("cpu").pin_memory()

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, chunk: int) -> RoutedChunk:
        """Chunk `chunk` on the compute device."""
        found = self.chunks[chunk]
        return found if self.on_device else found.to(self.device)
