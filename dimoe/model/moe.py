"""Mixture-of-Experts FFN: softmax top-k router, SwiGLU experts, optional shared expert.

Dispatch is sort-based (docs/design.md §3): the N·k (token, expert) assignments are sorted by
expert once, each expert runs exactly once on its contiguous slice, and the gate-weighted results
are added back per token with one `index_add_`. There is no per-token Python loop and no dense E×
compute. Two implementations of the expert step give the same results:

- `grouped`: every expert in one grouped GEMM per projection (`torch._grouped_mm`: a CUTLASS
  kernel for bf16 on sm90+ GPUs, a per-expert loop in C++ elsewhere, CPU included), inside one
  autograd function whose backward is written out (`_GroupedExperts`). On a multi-core CPU a
  large layer runs its experts as one contiguous run per thread, side by side (`_expert_shards`).
  Without autograd (decoding), the CPU runs each run on cache-sized blocks of experts
  (`_grouped_inference`).
- `loop`: one `F.linear` per expert from Python, differentiated by autograd; any dtype and device.

`auto` (the default) takes `grouped` wherever the kernel runs: fp32/bf16/fp16 weights on CPU or
CUDA. Expert weights are stored fused, as in `transformers`' OLMoE: `gate_up_proj` [E, 2F, D] and
`down_proj` [E, D, F], which keeps checkpoints interchangeable with it.
"""

from __future__ import annotations

import bisect
import concurrent.futures
import functools
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar, get_args

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import FunctionCtx, once_differentiable

_T = TypeVar("_T")
Dispatch = Literal["auto", "grouped", "loop"]
DISPATCHES: tuple[str, ...] = get_args(Dispatch)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Without autograd, the CPU runs the experts in blocks of whole experts holding about this many
# bytes of their widest intermediate, which stay in cache and in memory the allocator reuses,
# where whole [N·k, 2F] tensors go through DRAM and fresh pages (measured on 1 core: forward
# 4-22% faster than one block at the benchmark's sizes; 0.5 to 4 MB blocks within about 3%).
_INFERENCE_BLOCK_BYTES = 1 << 20
# Assignment rows × hidden × intermediate size from which the CPU runs experts on separate threads
# (`_expert_shards`): 8,192 rows at d256 / F256, 4,096 at d512 / F256.
_MIN_SHARDED_WORK = 1 << 29
# The largest run may hold at most this multiple of an even share of the rows, else one run.
_MAX_SHARD_IMBALANCE = 1.5


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
    """`_GroupedExperts`' forward when nothing needs a gradient: nothing is kept, so on the CPU each
    shard of experts goes block by block (`_INFERENCE_BLOCK_BYTES`). Other devices take one block,
    since splitting needs the offsets on the host (a sync) and a GPU wants large GEMMs. Each expert
    sees the same GEMM as in `_GroupedExperts`, so both give bit-identical outputs."""
    token = order // gates.shape[1]
    gates_sorted = gates.reshape(-1)[order, None]
    shards = _expert_shards(offs, *down.shape[1:])
    max_rows = max(1, _INFERENCE_BLOCK_BYTES // (max(gate_up.shape[1], down.shape[1]) * x.element_size()))

    def shard_forward(i: int) -> torch.Tensor:
        # Each run adds its blocks into its own output as it goes, so each block's rows are freed
        # before the next; the runs' outputs are then summed as in `_GroupedExperts`.
        s, out = shards[i], torch.zeros_like(x)
        on_cpu = x.device.type == "cpu"
        blocks = _row_blocks(s.offs.tolist(), max_rows) if on_cpu else [(0, len(s.offs), 0, len(order))]
        for first_expert, end_expert, first, end in blocks:
            experts = slice(s.experts.start + first_expert, s.experts.start + end_expert)
            rows = slice(s.rows.start + first, s.rows.start + end)
            block_offs = s.offs[first_expert:end_expert] - first
            *_, y = _expert_rows(
                x, gate_up[experts], down[experts], gates_sorted[rows], token[rows], block_offs
            )
            out.index_add_(0, token[rows], y)
        return out

    return _sum_in_order(_run_shards(shard_forward, len(shards), x.device.type))


def _sum_in_order(outputs: list[torch.Tensor]) -> torch.Tensor:
    """The runs' [N, D] outputs added in run order, in place into the first. Both the autograd and
    the no-grad path build each run's output in the same row order and sum them this way, so they
    agree bit for bit."""
    out, *others = outputs
    for other in others:
        out += other
    return out


@dataclass(frozen=True)
class _Shard:
    """A contiguous run of experts and their assignment rows, with the run's own `offs`."""

    experts: slice
    rows: slice
    offs: torch.Tensor


def _expert_shards(offs: torch.Tensor, hidden: int, ffn: int) -> list[_Shard]:
    """The experts cut into one contiguous run per intra-op thread, each with about the same number
    of rows; every expert belongs to exactly one run.

    Why: on the CPU `torch._grouped_mm` runs its experts one after another and splits each GEMM over
    the threads, and GEMMs of a few hundred rows leave the threads waiting on each other. Experts
    run side by side, each GEMM on one thread, instead: measured on 2 cores, forward+backward 10-25%
    faster at 64 experts / top-8 (d512, 2,048 tokens), 15% at the paper's layer and 12% at d256 /
    16 experts. Below about `_MIN_SHARDED_WORK` (assignment rows × hidden × intermediate) it was
    20-30% slower (the tiny profile, d256 / 8 experts): one run there. A GPU runs all groups in one
    kernel already: one run, which also keeps the offsets on the device (no sync)."""
    threads = torch.get_num_threads()
    whole = [_Shard(slice(0, len(offs)), slice(0, None), offs)]
    if offs.device.type != "cpu" or threads == 1:
        return whole
    ends = offs.tolist()
    if not ends[-1] or ends[-1] * hidden * ffn < _MIN_SHARDED_WORK:
        return whole
    # Cut after the first expert whose rows reach i/threads of the total; the cut never passes
    # the last expert, since i/threads < 1.
    targets = (ends[-1] * i / threads for i in range(1, threads))
    cuts = sorted({0, len(ends)} | {bisect.bisect_left(ends, target) + 1 for target in targets})
    shards = []
    for first, end in itertools.pairwise(cuts):
        start = ends[first - 1] if first else 0
        shards.append(_Shard(slice(first, end), slice(start, ends[end - 1]), offs[first:end] - start))
    # Experts are never split: when one holds most rows (a collapsed router) its run would go on
    # one thread while the others idle, slower than the whole GEMM on all of them.
    largest = max(s.rows.stop - s.rows.start for s in shards)
    return whole if largest * threads > _MAX_SHARD_IMBALANCE * ends[-1] else shards


@functools.cache
def _shard_pool(workers: int) -> concurrent.futures.ThreadPoolExecutor:
    return concurrent.futures.ThreadPoolExecutor(
        workers, "dimoe-experts", initializer=torch.set_num_threads, initargs=(1,)
    )


def _run_shards(work: Callable[[int], _T], count: int, device_type: str) -> list[_T]:
    """`work(i)` for every shard i, the first on the calling thread and the others on a shared pool.

    Each shard runs on one intra-op thread: the caller drops to one for the call (and restores its
    count after), and the pool's threads are set to one when they start; two threads per shard
    would oversubscribe the cores (measured: 5-8% slower). Grad mode is thread-local, so the
    caller's is applied in every thread; autocast is off, since the expert step computes in the
    weights' dtype on purpose (`Experts._grouped`)."""
    grad_enabled = torch.is_grad_enabled()

    def run(i: int) -> _T:
        with torch.set_grad_enabled(grad_enabled), torch.autocast(device_type, enabled=False):
            return work(i)

    if count == 1:
        return [run(0)]
    pool = _shard_pool(count - 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        futures = [pool.submit(run, i) for i in range(1, count)]
        try:
            first = run(0)
        finally:  # no run outlives the call, even when the caller's own run raised
            concurrent.futures.wait(futures)
        return [first, *(future.result() for future in futures)]
    finally:
        torch.set_num_threads(threads)


# A forked child has none of the parent's pool threads: it starts its own pool.
os.register_at_fork(after_in_child=_shard_pool.cache_clear)


def _weight_grad(
    a: torch.Tensor, b: torch.Tensor, shard: _Shard, out: torch.Tensor | None
) -> torch.Tensor | None:
    """Each expert's Σ over its rows of aᵀb, [E, a cols, b cols]: one grouped GEMM when a single
    shard holds every expert (returned), else this shard's experts written into their slices of
    `out`, which a grouped GEMM per shard would leave to a copy of the whole gradient."""
    if out is None:
        return torch._grouped_mm(a.T, b, offs=shard.offs)
    start = 0
    for expert, end in enumerate(shard.offs.tolist(), start=shard.experts.start):
        torch.mm(a[start:end].T, b[start:end], out=out[expert])
        start = end
    return None


class _GroupedExperts(torch.autograd.Function):
    """Σ_j gates[:, j] · expert_{index[:, j]}(x) with two grouped GEMMs over the expert-sorted rows,
    run per shard of experts (`_expert_shards`).

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
        shards = _expert_shards(offs, *down.shape[1:])

        def shard_forward(i: int) -> tuple[torch.Tensor, ...]:
            s = shards[i]
            *kept, y = _expert_rows(
                x, gate_up[s.experts], down[s.experts], gates_sorted[s.rows], token[s.rows], s.offs
            )
            return *kept, torch.zeros_like(x).index_add_(0, token[s.rows], y)

        parts = _run_shards(shard_forward, len(shards), x.device.type)
        out = _sum_in_order([run_out for *_, run_out in parts])
        kept = [tensor for x_sorted, gate_up_out, act, _ in parts for tensor in (x_sorted, gate_up_out, act)]
        ctx.save_for_backward(gate_up, down, gates_sorted, order, *kept)
        ctx.shards, ctx.top_k = shards, gates.shape[1]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        gate_up, down, gates_sorted, order, *kept = ctx.saved_tensors
        need_x, need_gate_up, need_down, need_gates = ctx.needs_input_grad[:4]
        token, shards = order // ctx.top_k, ctx.shards
        sharded = len(shards) > 1
        grad_gate_up = torch.empty_like(gate_up) if need_gate_up and sharded else None
        grad_down = torch.empty_like(down) if need_down and sharded else None

        def shard_backward(i: int) -> tuple[torch.Tensor | None, ...]:
            s, (x_sorted, gate_up_out, act) = shards[i], kept[3 * i : 3 * i + 3]
            grad_y = grad_out.index_select(0, token[s.rows])
            down_part = _weight_grad(grad_y, act, s, grad_down) if need_down else None
            grad_act = torch._grouped_mm(grad_y, down[s.experts], offs=s.offs)
            grad_gate_up_out, grad_scale = _scaled_swiglu_backward(
                gate_up_out, gates_sorted[s.rows], grad_act, need_gates
            )
            gate_up_part = _weight_grad(grad_gate_up_out, x_sorted, s, grad_gate_up) if need_gate_up else None
            grad_x_sorted = (
                torch._grouped_mm(grad_gate_up_out, gate_up[s.experts], offs=s.offs) if need_x else None
            )
            return grad_x_sorted, grad_scale, gate_up_part, down_part

        parts = _run_shards(shard_backward, len(shards), grad_out.device.type)
        if not sharded:
            grad_gate_up, grad_down = parts[0][2], parts[0][3]
        grad_x = None
        if need_x:
            grad_x = grad_out.new_zeros(grad_out.shape)
            for shard, (grad_x_sorted, *_) in zip(shards, parts, strict=True):
                grad_x.index_add_(0, token[shard.rows], grad_x_sorted)
        grad_gates = None
        if need_gates:
            grad_gates_sorted = torch.cat([grad_scale for _, grad_scale, *_ in parts])
            grad_gates = torch.empty_like(gates_sorted).index_copy_(0, order, grad_gates_sorted)
            grad_gates = grad_gates.view(-1, ctx.top_k)
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
