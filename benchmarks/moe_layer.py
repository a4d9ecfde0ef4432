"""Forward+backward time of DiMoE's MoE layer versus `transformers`' OLMoE sparse MoE block
loaded with the same weights (outputs checked equal first), at the tiny size and at
64 experts / top-8. Prints one table with the ratio side by side.

    python benchmarks/moe_layer.py [--tokens 2048] [--repeats 10]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

from dimoe.model.moe import MoEBlock

SIZES = {
    "tiny (d128 E8 k2)": dict(hidden=128, ffn=128, experts=8, top_k=2),
    "64 experts / top-8 (d512)": dict(hidden=512, ffn=256, experts=64, top_k=8),
}


def make_pair(hidden: int, ffn: int, experts: int, top_k: int, impl: str) -> tuple[MoEBlock, torch.nn.Module]:
    torch.manual_seed(0)
    ours = MoEBlock(hidden, ffn, experts, top_k, normalize_topk=False)
    for p in ours.parameters():
        torch.nn.init.normal_(p, std=0.02)
    config = OlmoeConfig(
        hidden_size=hidden,
        intermediate_size=ffn,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=False,
    )
    config._experts_implementation = impl
    theirs = OlmoeSparseMoeBlock(config)
    with torch.no_grad():
        theirs.gate.weight.copy_(ours.gate.weight)
        theirs.experts.gate_up_proj.copy_(ours.experts.gate_up_proj)
        theirs.experts.down_proj.copy_(ours.experts.down_proj)
    return ours, theirs


def time_fwd_bwd(fn, x: torch.Tensor, repeats: int) -> float:
    for _ in range(2):  # warm-up
        fn(x).pow(2).mean().backward()
    start = time.perf_counter()
    for _ in range(repeats):
        fn(x).pow(2).mean().backward()
    return (time.perf_counter() - start) / repeats * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument(
        "--impl", default="eager", help="OLMoE experts implementation (eager, batched_mm, ...)"
    )
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.tokens} tokens, "
        f"OLMoE experts implementation: {args.impl}"
    )
    print(f"{'size':<28}{'DiMoE ms':>10}{'OLMoE ms':>10}{'OLMoE/DiMoE':>13}{'max |diff|':>12}")
    for name, size in SIZES.items():
        ours, theirs = make_pair(**size, impl=args.impl)
        x = torch.randn(1, args.tokens, size["hidden"], requires_grad=True)
        with torch.no_grad():
            diff = (ours(x)[0] - theirs(x)).abs().max().item()
        assert diff < 1e-5, f"outputs differ by {diff}: the comparison would be meaningless"
        t_ours = time_fwd_bwd(lambda v, block=ours: block(v)[0], x, args.repeats)
        t_theirs = time_fwd_bwd(theirs, x, args.repeats)
        print(f"{name:<28}{t_ours:>10.2f}{t_theirs:>10.2f}{t_theirs / t_ours:>12.2f}x{diff:>12.1e}")


if __name__ == "__main__":
    main()
