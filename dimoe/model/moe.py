"""Mixture-of-Experts FFN: softmax top-k router, SwiGLU experts, optional shared expert.

Dispatch is sort-based (docs/design.md §3): the N·k (token, expert) assignments are sorted by
expert once, each expert runs exactly once on its contiguous slice, and the gate-weighted results
are added back per token with one `index_add_`. There is no per-token Python loop and no dense E×
compute. Two implementations of the expert step give the same results:

- `grouped`: every expert in one grouped GEMM per projection (`torch._grouped_mm`: a CUTLASS
  kernel for bf16 on sm90+ GPUs, a per-expert loop in C++ elsewhere, CPU included), inside one
  autograd function whose backward is written out (`_GroupedExperts`). Without autograd
  (decoding), the CPU runs it on cache-sized blocks of experts (`_grouped_inference`).
- `loop`: one `F.linear` per expert from Python, differentiated by autograd; any dtype and device.

`auto` (the default) takes `grouped` wherever the kernel runs: fp32/bf16/fp16 weights on CPU or
CUDA. Expert weights are stored fused, as in `transformers`' OLMoE: `gate_up_proj` [E, 2F, D] and
`down_proj` [E, D, F], which keeps checkpoints interchangeable with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

Dispatch = Literal["auto", "grouped", "loop"]
DISPATCHES: tuple[str, ...] = get_args(Dispatch)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Without autograd, the CPU runs the experts in blocks of whole experts holding about this many
# bytes of their widest intermediate, which stay in cache and in memory the allocator reuses,
# where whole [N·k, 2F] tensors go through DRAM and fresh pages (measured on 1 core: forward
# 4-22% faster than one block at the benchmark's sizes; 0.5 to 4 MB blocks within about 3%).
_INFERENCE_BLOCK_BYTES = 1 << 20


@dataclass
class RouterOutput:
    logits: torch.Tensor  # [N, E] pre-softmax, for the z-loss
    probs: torch.Tensor  # [N, E] float32 softmax, for balance/prior/consistency losses
    topk_index: torch.Tensor  # [N, k] chosen experts
    topk_weight: torch.Tensor  # [N, k] gates applied to the expert outputs


class TopKRouter(nn.Module):
    """Softmax over experts, top-k. With `expert_bias`, the bias is added to the probabilities
    before top-k and the biased values are the gates (LLaDA-MoE's router); `probs` stays the
    plain softmax, which the routing losses and telemetry read."""

    def __init__(
        self, hidden_size: int, num_experts: int, top_k: int, normalize: bool, expert_bias: bool = False
    ) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.register_buffer("expert_bias", torch.zeros(num_experts) if expert_bias else None)
        self.top_k = top_k
        self.normalize = normalize

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = F.linear(x, self.weight)
        # Softmax in float32: bf16 probabilities are too coarse for balance statistics.
        probs = logits.float().softmax(dim=-1)
        scores = probs if self.expert_bias is None else probs + self.expert_bias.float()
        weight, index = scores.topk(self.top_k, dim=-1)
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


def grouped_mm_available(weight: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs on these expert weights: it takes fp32, bf16 and fp16, on
    CPU and CUDA only, and off the CPU it checks that every operand starts on a 16-byte boundary
    (a parameter viewed into a flat optimizer buffer may not)."""
    if not hasattr(torch, "_grouped_mm") or weight.dtype not in _GROUPED_MM_DTYPES:
        return False
    if weight.device.type == "cpu":
        return True
    return weight.device.type == "cuda" and weight.data_ptr() % 16 == 0


def sort_by_expert(index: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order the flattened [N·k] assignments by expert (stable, so the per-token sums always add in
    the same order), and the int32 end offset of each expert's slice, which is `torch._grouped_mm`'s
    `offs`. `searchsorted` gives the offsets without a device→host sync."""
    experts_sorted, order = index.reshape(-1).sort(stable=True)
    bounds = torch.arange(num_experts, device=index.device, dtype=experts_sorted.dtype)
    return order, torch.searchsorted(experts_sorted, bounds, right=True, out_int32=True)


def _swiglu(gate_up: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) · up [· scale per row] of a fused [S, 2F] projection, as one new [S, F] tensor."""
    gate, up = gate_up.chunk(2, dim=-1)
    act = F.silu(gate).mul_(up)
    return act if scale is None else act.mul_(scale)


def _scaled_swiglu_backward(
    gate_up: torch.Tensor, scale: torch.Tensor, grad_act: torch.Tensor, need_scale: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of `_swiglu(gate_up, scale)` w.r.t. `gate_up`, as one [S, 2F] tensor (the operand
    the next grouped GEMMs need, so no concatenation), and w.r.t. the [S, 1] `scale`."""
    gate, up = gate_up.chunk(2, dim=-1)
    grad = torch.empty_like(gate_up)
    grad_gate, grad_up = grad.chunk(2, dim=-1)
    torch.ops.aten.silu.out(gate, out=grad_up)
    grad_up.mul_(grad_act)  # grad_act · silu(gate): shared by the scale's and up's gradients
    grad_scale = torch.einsum("sf,sf->s", grad_up, up)[:, None] if need_scale else None
    grad_up.mul_(scale)
    torch.mul(grad_act, up, out=grad_gate).mul_(scale)
    torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
    return grad, grad_scale


def _pad_for_grouped_mm(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`torch._grouped_mm` needs every row stride to be a multiple of 16 bytes. Pad the hidden size
    D and the intermediate size F with zeros up to that: a zero feature adds exactly nothing, and
    `F.pad`'s backward drops the padding's gradient. Sizes already aligned (all real ones) cost
    nothing."""
    step = 16 // x.element_size()
    experts, hidden, ffn = down.shape
    pad_d, pad_f = -hidden % step, -ffn % step
    if not (pad_d or pad_f):
        return x, gate_up, down
    gate_up = F.pad(gate_up.reshape(experts, 2, ffn, hidden), (0, pad_d, 0, pad_f))
    gate_up = gate_up.reshape(experts, 2 * (ffn + pad_f), hidden + pad_d)
    return F.pad(x, (0, pad_d)), gate_up, F.pad(down, (0, pad_f, 0, pad_d))


def _expert_rows(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gates_sorted: torch.Tensor,
    token: torch.Tensor,
    offs: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both grouped GEMMs over assignment rows sorted by expert (row i: token `token[i]`, gate
    `gates_sorted[i]`): the gathered inputs, the fused gate/up projection, the gate-scaled SwiGLU
    activation, and the gate-weighted expert outputs [S, D] ready to add to their tokens."""
    x_sorted = x.index_select(0, token)
    gate_up_out = torch._grouped_mm(x_sorted, gate_up.transpose(1, 2), offs=offs)
    act = _swiglu(gate_up_out, gates_sorted)
    return x_sorted, gate_up_out, act, torch._grouped_mm(act, down.transpose(1, 2), offs=offs)


def _row_blocks(ends: list[int], max_rows: int) -> list[tuple[int, int, int, int]]:
    """Consecutive experts grouped into blocks of at least `max_rows` assignment rows (the last may
    have fewer; an expert is never split, experts without rows at the end are left out), as
    (first expert, end expert, first row, end row)."""
    blocks, first_expert, first_row = [], 0, 0
    for expert, end in enumerate(ends):
        if end - first_row >= max_rows or (expert == len(ends) - 1 and end > first_row):
            blocks.append((first_expert, expert + 1, first_row, end))
            first_expert, first_row = expert + 1, end
    return blocks


def _grouped_inference(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    gates: torch.Tensor,
    order: torch.Tensor,
    offs: torch.Tensor,
) -> torch.Tensor:
    """`_GroupedExperts`' forward when nothing needs a gradient: nothing is kept, so the CPU goes
    block by block (`_INFERENCE_BLOCK_BYTES`). Other devices take one block, since splitting needs
    the offsets on the host (a sync) and a GPU wants large GEMMs."""
    token = order // gates.shape[1]
    gates_sorted = gates.reshape(-1)[order, None]
    if x.device.type == "cpu":
        width = max(gate_up.shape[1], down.shape[1]) * x.element_size()
        blocks = _row_blocks(offs.tolist(), max(1, _INFERENCE_BLOCK_BYTES // width))
    else:
        blocks = [(0, len(offs), 0, len(order))]
    out = torch.zeros_like(x)
    for first_expert, end_expert, first, end in blocks:
        experts, rows = slice(first_expert, end_expert), slice(first, end)
        *_, y = _expert_rows(
            x, gate_up[experts], down[experts], gates_sorted[rows], token[rows], offs[experts] - first
        )
        out.index_add_(0, token[rows], y)
    return out


class _GroupedExperts(torch.autograd.Function):
    """Σ_j gates[:, j] · expert_{index[:, j]}(x) with two grouped GEMMs over the expert-sorted rows.

    Each row's gate scales the activation (F wide) before the down projection rather than its
    output (D wide), so the down GEMM's output is the final term, added to its token with no further
    pass. The backward is written out because autograd through the same ops would keep silu(gate),
    silu(gate)·up and the scaled activation until the backward, where this keeps the latter only
    (measured: 44% less saved activation memory at 64 experts / top-8), and would spend a pass and a
    new tensor on each of their gradients, where `_scaled_swiglu_backward` writes both halves of
    the [S, 2F] gradient in place. The GEMMs of frozen inputs are skipped, as autograd would.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        x: torch.Tensor,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        gates: torch.Tensor,
        order: torch.Tensor,
        offs: torch.Tensor,
    ) -> torch.Tensor:
        token = order // gates.shape[1]
        gates_sorted = gates.reshape(-1)[order, None]
        x_sorted, gate_up_out, act, y = _expert_rows(x, gate_up, down, gates_sorted, token, offs)
        ctx.save_for_backward(x_sorted, gate_up_out, act, gate_up, down, gates_sorted, order, offs)
        ctx.top_k = gates.shape[1]
        return torch.zeros_like(x).index_add_(0, token, y)

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_sorted, gate_up_out, act, gate_up, down, gates_sorted, order, offs = ctx.saved_tensors
        need_x, need_gate_up, need_down, need_gates = ctx.needs_input_grad[:4]
        token = order // ctx.top_k
        grad_y = grad_out.index_select(0, token)
        grad_down = torch._grouped_mm(grad_y.T, act, offs=offs) if need_down else None
        grad_act = torch._grouped_mm(grad_y, down, offs=offs)
        grad_gate_up_out, grad_gates_sorted = _scaled_swiglu_backward(
            gate_up_out, gates_sorted, grad_act, need_gates
        )
        grad_gates = None
        if need_gates:
            grad_gates = torch.empty_like(gates_sorted).index_copy_(0, order, grad_gates_sorted)
            grad_gates = grad_gates.view(-1, ctx.top_k)
        grad_gate_up = torch._grouped_mm(grad_gate_up_out.T, x_sorted, offs=offs) if need_gate_up else None
        grad_x = None
        if need_x:
            grad_x_sorted = torch._grouped_mm(grad_gate_up_out, gate_up, offs=offs)
            grad_x = grad_out.new_zeros(grad_out.shape).index_add_(0, token, grad_x_sorted)
        return grad_x, grad_gate_up, grad_down, grad_gates, None, None


class Experts(nn.Module):
    """E SwiGLU experts with fused weights; `dispatch` picks the implementation (module doc)."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, num_experts: int, dispatch: Dispatch = "auto"
    ) -> None:
        super().__init__()
        if dispatch not in DISPATCHES:
            raise ValueError(f"dispatch={dispatch!r}: expected one of {', '.join(DISPATCHES)}")
        self.num_experts = num_experts
        self.dispatch = dispatch
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """x [N, D], index/weight [N, k] → Σ_j weight[:, j] · expert_{index[:, j]}(x) as [N, D]."""
        order, offs = sort_by_expert(index, self.num_experts)
        if self.uses_grouped_mm():
            return self._grouped(x, weight, order, offs)
        return self._loop(x, weight, order, offs)

    def uses_grouped_mm(self) -> bool:
        """Whether `forward` takes the grouped path: `grouped`, or `auto` where the kernel runs."""
        if self.dispatch == "loop":
            return False
        available = grouped_mm_available(self.gate_up_proj)
        if self.dispatch == "grouped" and not available:
            raise ValueError(
                "dispatch='grouped' needs torch._grouped_mm with fp32/bf16/fp16 weights on CPU or CUDA (here "
                f"{self.gate_up_proj.dtype} on {self.gate_up_proj.device}); use dispatch='loop' or 'auto'"
            )
        return available

    def _grouped(
        self, x: torch.Tensor, weight: torch.Tensor, order: torch.Tensor, offs: torch.Tensor
    ) -> torch.Tensor:
        # `torch._grouped_mm` neither autocasts nor mixes dtypes: compute in the weights' dtype.
        dtype = self.gate_up_proj.dtype
        inputs = (*_pad_for_grouped_mm(x.to(dtype), self.gate_up_proj, self.down_proj), weight.to(dtype))
        if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
            out = _GroupedExperts.apply(*inputs, order, offs)
        else:
            out = _grouped_inference(*inputs, order, offs)
        return out[:, : x.shape[1]].to(x.dtype)

    def _loop(
        self, x: torch.Tensor, weight: torch.Tensor, order: torch.Tensor, offs: torch.Tensor
    ) -> torch.Tensor:
        token_of = order // weight.shape[1]  # source token of each sorted assignment
        counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()
        # unbind, not indexing: indexing's backward writes each expert's gradient into a zeroed
        # copy of the whole [E, ...] tensor (E dense copies per step); unbind's stacks them once.
        gate_up, down = self.gate_up_proj.unbind(0), self.down_proj.unbind(0)
        outputs = [
            F.linear(_swiglu(F.linear(chunk, gate_up[expert])), down[expert])
            for expert, chunk in enumerate(x[token_of].split(counts))
        ]
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
        dispatch: Dispatch = "auto",
        expert_bias: bool = False,
    ) -> None:
        super().__init__()
        self.gate = TopKRouter(hidden_size, num_experts, top_k, normalize_topk, expert_bias)
        self.experts = Experts(hidden_size, intermediate_size, num_experts, dispatch)
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
