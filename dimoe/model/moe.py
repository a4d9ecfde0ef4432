"""Mixture-of-Experts FFN: softmax top-k router, SwiGLU experts, optional shared expert.

Dispatch is sort-based: the N·k (token, expert) assignments are sorted by expert once, so each
expert runs exactly once on a contiguous slice of tokens and the results are scattered back with
one `index_add_`. There is no per-token Python loop and no dense E× compute.

Expert weights are stored fused, as in `transformers`' OLMoE: `gate_up_proj` [E, 2F, D] and
`down_proj` [E, D, F], which keeps checkpoints interchangeable with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class RouterOutput:
    logits: torch.Tensor  # [N, E] pre-softmax, for the z-loss
    probs: torch.Tensor  # [N, E] float32 softmax, for balance/prior/consistency losses
    topk_index: torch.Tensor  # [N, k] chosen experts
    topk_weight: torch.Tensor  # [N, k] gates applied to the expert outputs


class TopKRouter(nn.Module):
    def __init__(self, hidden_size: int, num_experts: int, top_k: int, normalize: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k = top_k
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = F.linear(x, self.weight)
        # Softmax in float32: bf16 probabilities are too coarse for balance statistics.
        probs = logits.float().softmax(dim=-1)
        weight, index = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            weight = weight / weight.sum(dim=-1, keepdim=True)
        return RouterOutput(logits, probs, index, weight.to(x.dtype))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    """E SwiGLU experts with fused weights."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [N, D], index/weight [N, k] → Σ_j weight[:, j] · expert_{index[:, j]}(x) as [N, D]."""
        top_k = index.shape[1]
        flat_expert = index.reshape(-1)
        order = flat_expert.argsort(stable=True)
        token_of = order // top_k  # source token of each sorted assignment
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        sorted_x = x[token_of]
        outputs = []
        for expert, chunk in enumerate(sorted_x.split(counts)):
            if chunk.shape[0] == 0:
                continue
            gate, up = F.linear(chunk, self.gate_up_proj[expert]).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, self.down_proj[expert]))
        sorted_y = torch.cat(outputs) * weight.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add_(0, token_of, sorted_y.to(x.dtype))


class MoEBlock(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        normalize_topk: bool,
        shared_intermediate_size: int = 0,
    ) -> None:
        super().__init__()
        self.gate = TopKRouter(hidden_size, num_experts, top_k, normalize_topk)
        self.experts = Experts(hidden_size, intermediate_size, num_experts)
        self.shared_expert = (
            SwiGLU(hidden_size, shared_intermediate_size) if shared_intermediate_size else None
        )

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, RouterOutput]:
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        route = self.gate(x)
        out = self.experts(x, route.topk_index, route.topk_weight)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        return out.reshape(shape), route
