"""Profiling and health (docs/design.md §8): NVTX ranges for Nsight Systems, a `torch.profiler`
trace of a few steps, CUDA memory snapshots, and activation / weight norms per layer group.

NVTX and the CUDA memory helpers act only on a CUDA device and are no-ops elsewhere, so the same
config runs on a laptop; the profiler trace and the norms work everywhere.
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

NVTX_ENV = "DIMOE_NVTX"


def nvtx_enabled(configured: bool = False) -> bool:
    """NVTX ranges are emitted when configured or DIMOE_NVTX=1, and only with CUDA."""
    return (configured or os.environ.get(NVTX_ENV) == "1") and torch.cuda.is_available()


@contextlib.contextmanager
def nvtx_range(name: str, enabled: bool) -> Iterator[None]:
    """One named NVTX range around the block (a no-op unless `enabled`)."""
    if not enabled:
        yield
        return
    torch.cuda.nvtx.range_push(name)
    try:
        yield
    finally:
        torch.cuda.nvtx.range_pop()


def add_router_ranges(model: torch.nn.Module) -> None:
    """An NVTX range `router` around every router's forward (module hooks: the model is untouched)."""
    from dimoe.model.moe import TopKRouter

    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.register_forward_pre_hook(lambda *_: torch.cuda.nvtx.range_push("router"))
            module.register_forward_hook(lambda *_: torch.cuda.nvtx.range_pop())


class StepTrace:
    """A `torch.profiler` trace (Chrome / Perfetto JSON) of steps [start, start + steps) of this
    rank, written to `<out_dir>/trace_rank<r>.json`. `step()` after each training step."""

    def __init__(self, out_dir: Path, rank: int, start: int, steps: int) -> None:
        self.path = out_dir / f"trace_rank{rank}.json"
        self.start, self.stop = start, start + steps
        self.profiler: Any = None
        self.done = steps == 0

    def step(self, step: int) -> None:
        """Called with the number of steps done so far."""
        from torch.profiler import ProfilerActivity, profile

        if self.done:
            return
        if self.profiler is None and step >= self.start:
            activities = [ProfilerActivity.CPU] + (
                [ProfilerActivity.CUDA] if torch.cuda.is_available() else []
            )
            self.profiler = profile(activities=activities, record_shapes=True, profile_memory=True)
            self.profiler.__enter__()
        elif self.profiler is not None and step >= self.stop:
            self.finish()

    def finish(self) -> None:
        if self.profiler is None or self.done:
            return
        self.profiler.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(self.path))
        self.done = True


def start_memory_history(enabled: bool) -> None:
    """Record CUDA allocations with their stacks (for `dump_memory_snapshot`); a no-op on CPU."""
    if enabled and torch.cuda.is_available():
        torch.cuda.memory._record_memory_history(max_entries=100_000)


def dump_memory_snapshot(path: Path, enabled: bool) -> None:
    """A CUDA memory snapshot (open it at pytorch.org/memory_viz); a no-op on CPU."""
    if enabled and torch.cuda.is_available():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))


def peak_memory_mb() -> float:
    """The device's peak allocated memory on CUDA, else the process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


@torch.no_grad()
def weight_norms(model: torch.nn.Module) -> dict[str, float]:
    """L2 norm of the weights of each parameter group (vision, projector, router, backbone)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {
        group: float(torch.stack([p.detach().float().norm() for _, p in members]).norm())
        for group, members in base.parameter_groups().items()
        if members
    }


@contextlib.contextmanager
def activation_norms(model: torch.nn.Module, enabled: bool) -> Iterator[dict[str, float]]:
    """Within the block, the RMS of the output of the embedding, of each decoder layer and of the
    vision projector, by name, from the forward that runs in it (the last one, if several)."""
    norms: dict[str, float] = {}
    if not enabled:
        yield norms
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    watched = {"embed": base.embed_tokens, **{f"layer_{i}": layer for i, layer in enumerate(base.layers)}}
    if base.vision is not None:
        watched["projector"] = base.vision.projector

    def record(name: str) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            norms[name] = float(hidden.detach().float().pow(2).mean().sqrt())

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in watched.items()]
    try:
        yield norms
    finally:
        for handle in handles:
            handle.remove()
