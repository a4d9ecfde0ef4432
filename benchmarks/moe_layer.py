"""Speed of DiMoE's MoE layer (grouped-GEMM and per-expert-loop dispatch) versus every experts
implementation of `transformers`' OLMoE sparse MoE block (eager, batched_mm, grouped_mm, ...),
all sharing the same weights, forward+backward and forward only, at the tiny profile's size, at
64 experts / top-8 (d512), and at the paper's layer (configs/model/llada_moe_7b_siglip.yaml).

Before timing, each implementation's output and input gradient are compared with DiMoE grouped's;
the max abs difference is printed beside its time. Runs alternate their order each repeat; the
median (and the fastest repeat) is reported, and the load average before and after, since the
machine is shared.

    python benchmarks/moe_layer.py [--repeats 7] [--threads 2] [--sizes tiny,e64,paper] [--budget-s 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import OlmoeConfig
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

from dimoe.model.moe import MoEBlock

Run = Callable[[torch.Tensor], torch.Tensor]
Step = Callable[[Run, torch.Tensor, list[torch.nn.Parameter]], float]


@dataclass(frozen=True)
class Size:
    label: str
    hidden: int
    ffn: int
    experts: int
    top_k: int
    tokens: int


SIZES = {
    "tiny": Size("tiny (d128 E8 k2 F128)", 128, 128, 8, 2, 2048),
    "e64": Size("64 experts / top-8 (d512 F256)", 512, 256, 64, 8, 2048),
    # The paper's layer holds 1.6 GB of fp32 expert weights: fewer tokens keep a run short.
    "paper": Size("paper layer (d2048 E64 k8 F1024)", 2048, 1024, 64, 8, 512),
}


def build(size: Size) -> tuple[MoEBlock, OlmoeSparseMoeBlock]:
    """DiMoE's block and OLMoE's sharing one set of parameters: the comparison is on the same
    weights, and the paper size's 1.6 GB of experts is held once, not once per implementation."""
    torch.manual_seed(0)
    ours = MoEBlock(size.hidden, size.ffn, size.experts, size.top_k, normalize_topk=False)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02)
    config = OlmoeConfig(
        hidden_size=size.hidden,
        intermediate_size=size.ffn,
        num_experts=size.experts,
        num_experts_per_tok=size.top_k,
        norm_topk_prob=False,
    )
    theirs = OlmoeSparseMoeBlock(config)
    theirs.gate.weight = ours.gate.weight
    theirs.experts.gate_up_proj = ours.experts.gate_up_proj
    theirs.experts.down_proj = ours.experts.down_proj
    return ours, theirs


def runs_of(ours: MoEBlock, theirs: OlmoeSparseMoeBlock) -> dict[str, Run]:
    """One callable per implementation. The implementation is chosen at call time because both
    blocks read it on every forward (`Experts.dispatch`, `config._experts_implementation`)."""

    def dimoe(dispatch: str) -> Run:
        def run(x: torch.Tensor) -> torch.Tensor:
            ours.experts.dispatch = dispatch
            return ours(x)[0]

        return run

    def olmoe(implementation: str) -> Run:
        def run(x: torch.Tensor) -> torch.Tensor:
            theirs.experts.config._experts_implementation = implementation
            return theirs(x)

        return run

    runs = {"DiMoE grouped": dimoe("grouped"), "DiMoE loop": dimoe("loop")}
    for implementation in ["eager", *ALL_EXPERTS_FUNCTIONS]:
        runs[f"OLMoE {implementation}"] = olmoe(implementation)
    return runs


def unavailable(name: str, run: Run, size: Size, max_gathered_gb: float) -> str | None:
    """Why `name` cannot run here, or None. batched_mm gathers one copy of the expert weights per
    (token, expert) pair; CUDA-only kernels (deepgemm, sonicmoe) fail on a few tokens."""
    if name == "OLMoE batched_mm":
        gathered = size.tokens * size.top_k * 3 * size.hidden * size.ffn * 4 / 2**30
        if gathered > max_gathered_gb:
            return f"gathers {gathered:,.0f} GB of weights (> --max-gathered-gb {max_gathered_gb:g})"
    try:
        with torch.no_grad():
            run(torch.randn(1, 4, size.hidden))
    except Exception as error:  # whatever the failure, the implementation does not run here
        return f"{type(error).__name__}: {str(error).splitlines()[0][:70]}"
    return None


def fwd_bwd(run: Run, x: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    """One timed forward+backward; gradients start empty, as after `zero_grad(set_to_none=True)`."""
    x.grad = None
    for p in params:
        p.grad = None
    start = time.perf_counter()
    run(x).pow(2).mean().backward()
    return time.perf_counter() - start


def fwd(run: Run, x: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    """One timed forward without autograd, as in decoding."""
    start = time.perf_counter()
    with torch.no_grad():
        run(x)
    return time.perf_counter() - start


def check(runs: dict[str, Run], x: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
    """Max abs difference of each implementation's output and input gradient from DiMoE grouped's,
    asserted small so that no speed is reported for a wrong result; and the seconds this first
    forward+backward took (it doubles as the first warm-up)."""
    reference: tuple[torch.Tensor, torch.Tensor] | None = None
    diffs, seconds = {}, {}
    for name, run in runs.items():
        x.grad = None
        start = time.perf_counter()
        out = run(x)
        out.pow(2).mean().backward()
        seconds[name] = time.perf_counter() - start
        got = (out.detach(), x.grad.clone())
        reference = reference or got
        diffs[name] = max((a - b).abs().max().item() for a, b in zip(got, reference, strict=True))
        scale = reference[0].abs().max().item()
        assert diffs[name] <= 1e-4 * scale, f"{name} differs by {diffs[name]:.2e}: timing it is meaningless"
    out_scale, grad_scale = (t.abs().max().item() for t in reference)
    print(f"{'':<34}(scale of the differences: max |output| {out_scale:.1e}, max |∂x| {grad_scale:.1e})")
    return diffs, seconds


def time_all(
    runs: dict[str, Run], step: Step, x: torch.Tensor, params: list, repeats: int, slow: set
) -> dict[str, list[float]]:
    """Seconds of each repeat per implementation. The order alternates each repeat, so that neither
    a warm cache nor a background job's burst favours whichever implementation runs first. The
    `slow` ones (eager at the paper size needs tens of seconds) are timed once, without warm-up."""
    names = list(runs)
    for name in names:  # warm-up: allocator, MKL buffers, lazily built kernels
        if name not in slow:
            step(runs[name], x, params)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            if repeat == 0 or name not in slow:
                samples[name].append(step(runs[name], x, params))
    return samples


def report(
    size: Size, mode: str, samples: dict[str, list[float]], diffs: dict[str, float], slow: set
) -> None:
    """One row per implementation: median and fastest repeat (the fastest is the one a load burst
    spared), the median relative to DiMoE grouped's, and the quality figure."""
    times = {name: statistics.median(values) for name, values in samples.items()}
    ours = times["DiMoE grouped"]
    for name, seconds in times.items():
        label = f"{name} (1 run)" if name in slow else name
        row = f"{size.label:<34}{mode:<9}{label:<26}{seconds * 1e3:>11,.1f}{min(samples[name]) * 1e3:>10,.1f}"
        print(f"{row}{seconds / ours:>12.2f}{diffs[name]:>12.1e}")
    olmoe = {name: s for name, s in times.items() if name.startswith("OLMoE")}
    if olmoe:
        fastest = min(olmoe, key=olmoe.get)
        speedup = olmoe[fastest] / ours
        print(f"{'':<34}{mode:<9}DiMoE grouped is {speedup:.2f}x as fast as the fastest OLMoE, {fastest}")


def bench_size(size: Size, args: argparse.Namespace) -> None:
    ours, theirs = build(size)
    runs = runs_of(ours, theirs)
    for name in list(runs):
        reason = unavailable(name, runs[name], size, args.max_gathered_gb)
        if reason:
            print(f"{size.label:<34}{'':<9}{name:<26}  skipped: {reason}")
            del runs[name]
    params = list(ours.parameters())
    x = torch.randn(1, size.tokens, size.hidden, requires_grad=True)  # OLMoE's block takes [B, T, D]
    diffs, check_seconds = check(runs, x)
    slow = {name for name, seconds in check_seconds.items() if seconds > args.budget_s}
    for mode, step in (("fwd+bwd", fwd_bwd), ("fwd", fwd)):
        report(size, mode, time_all(runs, step, x, params, args.repeats, slow), diffs, slow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", default=",".join(SIZES), help=f"comma-separated, of {', '.join(SIZES)}")
    parser.add_argument("--max-gathered-gb", type=float, default=4.0, help="memory limit for batched_mm")
    parser.add_argument("--budget-s", type=float, default=20.0, help="slower implementations are timed once")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} repeats")
    print(f"load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    header = f"{'size':<34}{'mode':<9}{'implementation':<26}{'median ms':>11}{'min ms':>10}"
    print(f"{header}{'time/DiMoE':>12}{'max |diff|':>12}")
    for key in args.sizes.split(","):
        bench_size(SIZES[key], args)
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
