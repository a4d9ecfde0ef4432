"""The sort-based MoE dispatch, grouped GEMM and per-expert loop, against a dense reference (every
expert on every token, masked by the routing), against each other, and against transformers' OLMoE
block loaded with the same weights: outputs and gradients w.r.t. the input and every parameter."""

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from transformers import OlmoeConfig
from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

from dimoe.model import moe
from dimoe.model.moe import Experts, MoEBlock, grouped_mm_available, sort_by_expert

DISPATCHES = ["grouped", "loop"]
# (hidden, intermediate, experts, top_k): the tiny profile's shape, many experts with few tokens
# each, top-1, and a hidden/intermediate size off the kernel's 16-byte alignment (padded).
SIZES = [(32, 48, 8, 2), (32, 48, 16, 4), (32, 48, 4, 1), (64, 32, 64, 8), (30, 45, 8, 2)]


def dense_experts(
    experts: Experts, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Every expert on every token, weighted by its gate (zero where the router did not choose it)."""
    gates = torch.zeros(x.shape[0], experts.num_experts, dtype=x.dtype).scatter(1, index, weight)
    out = torch.zeros_like(x)
    for e in range(experts.num_experts):
        gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        out = out + gates[:, e : e + 1] * F.linear(F.silu(gate) * up, experts.down_proj[e])
    return out


def dense_reference(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    route = block.gate(x)
    out = dense_experts(block.experts, x, route.topk_index, route.topk_weight)
    if block.shared_expert is not None:
        out = out + block.shared_expert(x)
    return out


def make_block(
    shared: int, normalize: bool, experts: int = 8, top_k: int = 2, hidden: int = 32, ffn: int = 48, **kw
) -> MoEBlock:
    torch.manual_seed(0)
    block = MoEBlock(hidden, ffn, experts, top_k, normalize, shared, **kw)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return block


def output_and_grads(run: Callable[[], torch.Tensor], leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """`run()`'s output, then the gradients of a fixed random projection of it w.r.t. `leaves`
    (a projection, not a sum, so that every output element gets a different gradient)."""
    for leaf in leaves:
        leaf.grad = None
    out = run()
    probe = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=out.dtype)
    (out * probe).sum().backward()
    return [out.detach()] + [leaf.grad.clone() for leaf in leaves]


def assert_all_close(
    got: list[torch.Tensor], want: list[torch.Tensor], atol: float = 1e-5, rtol: float = 1e-4
) -> None:
    """`atol` is relative to each tensor's largest element: a gradient summed over many tokens in
    another order differs by rounding at the scale of its large entries, not of its small ones."""
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        scale = w.abs().max().clamp(min=1).item()
        torch.testing.assert_close(g, w, atol=atol * scale, rtol=rtol, msg=lambda m, i=i: f"tensor {i}: {m}")


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("shared", [0, 24])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("hidden,ffn,experts,top_k", SIZES)
def test_dispatch_equals_dense_reference(dispatch, shared, normalize, hidden, ffn, experts, top_k):
    block = make_block(shared, normalize, experts, top_k, hidden, ffn, dispatch=dispatch)
    x = torch.randn(3, 37, hidden, requires_grad=True)
    leaves = [x, *block.parameters()]
    got = output_and_grads(lambda: block(x)[0], leaves)
    want = output_and_grads(lambda: dense_reference(block, x.reshape(-1, hidden)).reshape(x.shape), leaves)
    assert_all_close(got, want)
    route = block(x)[1]
    assert route.topk_index.shape == (3 * 37, top_k)
    if normalize:
        torch.testing.assert_close(route.topk_weight.sum(-1), torch.ones(3 * 37))


ROUTINGS = {
    # Only experts 1, 4 and 6 of 8 chosen: idle ones first (0), last (7) and in runs between.
    "idle experts": lambda n: torch.stack([torch.tensor([1, 4, 6])[torch.randperm(3)[:2]] for _ in range(n)]),
    "all tokens to one expert": lambda n: torch.full((n, 1), 5),
    "all tokens to the last two experts": lambda n: torch.tensor([[7, 6]]).repeat(n, 1),
}


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("routing", ROUTINGS)
def test_experts_with_uneven_routing_equal_dense_reference(dispatch, routing):
    torch.manual_seed(0)
    experts = Experts(32, 48, 8, dispatch)
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(40, 32, requires_grad=True)
    index = ROUTINGS[routing](40)
    weight = torch.rand(index.shape, requires_grad=True)
    leaves = [x, weight, experts.gate_up_proj, experts.down_proj]
    got = output_and_grads(lambda: experts(x, index, weight), leaves)
    want = output_and_grads(lambda: dense_experts(experts, x, index, weight), leaves)
    assert_all_close(got, want)
    idle = torch.ones(8, dtype=torch.bool).index_fill(0, index.unique(), False)
    assert got[3][idle].abs().sum() == 0 and got[4][idle].abs().sum() == 0  # idle experts: no gradient


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}-threads")
def intra_op_threads(request, monkeypatch):
    """Intra-op threads for one test, with experts split over them at any size."""
    monkeypatch.setattr(moe, "_MIN_SHARDED_WORK", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


@pytest.mark.parametrize("routing", ROUTINGS)
def test_grouped_experts_run_side_by_side_on_threads(routing, intra_op_threads):
    """With several intra-op threads the experts are cut into runs computed on separate threads
    (including runs whose experts receive nothing): the same values and gradients as the dense
    reference, and the caller's thread count is back after forward and backward."""
    torch.manual_seed(0)
    experts = Experts(32, 48, 8, "grouped")
    for p in experts.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(40, 32, requires_grad=True)
    index = ROUTINGS[routing](40)
    weight = torch.rand(index.shape, requires_grad=True)
    shards = moe._expert_shards(sort_by_expert(index, 8)[1], 32, 48)
    # a collapsed router (one expert holds every row) keeps the whole GEMM on all threads
    split = intra_op_threads > 1 and routing != "all tokens to one expert"
    assert (len(shards) > 1) == split and len(shards) <= intra_op_threads
    leaves = [x, weight, experts.gate_up_proj, experts.down_proj]
    got = output_and_grads(lambda: experts(x, index, weight), leaves)
    want = output_and_grads(lambda: dense_experts(experts, x, index, weight), leaves)
    assert_all_close(got, want)
    assert torch.get_num_threads() == intra_op_threads


@pytest.mark.parametrize(
    "ends,threads,runs",
    [
        ([1, 2, 3, 4, 5, 6], 3, [(0, 2), (2, 4), (4, 6)]),  # equal rows: equal runs
        ([2, 3, 3, 6, 6], 2, [(0, 2), (2, 5)]),  # the expert reaching half the rows ends run 1
        ([0, 0, 9], 2, [(0, 3)]),  # one expert holds everything: one run
        ([0, 0, 0], 2, [(0, 3)]),  # no rows at all: nothing to share out
        ([4, 8], 3, [(0, 1), (1, 2)]),  # fewer experts than threads
        ([1, 10, 11], 2, [(0, 3)]),  # the best cut leaves 10 of 11 rows on one thread: unsplit
        ([5, 9, 12], 1, [(0, 3)]),  # one thread: the whole grouped GEMM, unsplit
    ],
)
def test_expert_shards_cover_every_expert_once(ends, threads, runs, monkeypatch):
    monkeypatch.setattr(moe, "_MIN_SHARDED_WORK", 0)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        shards = moe._expert_shards(torch.tensor(ends, dtype=torch.int32), 2, 4)
    finally:
        torch.set_num_threads(before)
    assert [(s.experts.start, s.experts.stop) for s in shards] == runs
    for s in shards[1:]:
        first_row = ends[s.experts.start - 1]
        assert (s.rows.start, s.rows.stop) == (first_row, ends[s.experts.stop - 1])
        assert s.offs.tolist() == [end - first_row for end in ends[s.experts]]


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_no_tokens(dispatch):
    block = make_block(0, True, dispatch=dispatch)
    x = torch.randn(1, 0, 32, requires_grad=True)
    out, route = block(x)
    out.sum().backward()
    assert out.shape == x.shape and route.topk_index.shape == (0, 2)
    assert block.experts.gate_up_proj.grad.abs().sum() == 0 and block.experts.down_proj.grad.abs().sum() == 0


def test_sort_by_expert_offsets():
    index = torch.tensor([[3, 0], [3, 1], [0, 3]])
    order, offs = sort_by_expert(index, 5)
    assert offs.dtype == torch.int32 and offs.tolist() == [2, 3, 3, 6, 6]
    assert index.reshape(-1)[order].tolist() == [0, 0, 1, 3, 3, 3]
    assert order.tolist() == [1, 4, 3, 0, 2, 5]  # stable: ties keep the token order


@pytest.mark.parametrize("block_bytes", [1 << 20, 4 * 96 * 10])  # one block; blocks of ~10 rows
@pytest.mark.parametrize("hidden,ffn,experts,top_k", SIZES)
def test_grouped_inference_in_blocks_equals_dense_reference(
    monkeypatch, block_bytes, hidden, ffn, experts, top_k, intra_op_threads
):
    """Without autograd the grouped path runs block by block: same outputs as the dense reference."""
    monkeypatch.setattr(moe, "_INFERENCE_BLOCK_BYTES", block_bytes)
    block = make_block(24, True, experts, top_k, hidden, ffn)
    x = torch.randn(3, 37, hidden)
    with torch.no_grad():
        got = block(x)[0]
        want = dense_reference(block, x.reshape(-1, hidden)).reshape(x.shape)
    assert_all_close([got], [want])
    # the same GEMM per expert as the autograd path: bit-identical to a training-mode forward
    assert torch.equal(got, block(x.clone().requires_grad_())[0].detach())


def test_experts_split_over_threads_only_from_min_sharded_work(monkeypatch):
    offs = torch.tensor([5, 9, 12], dtype=torch.int32)  # 12 rows
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(moe, "_MIN_SHARDED_WORK", 12 * 2 * 4)
        assert len(moe._expert_shards(offs, 2, 4)) == 2
        monkeypatch.setattr(moe, "_MIN_SHARDED_WORK", 12 * 2 * 4 + 1)
        assert len(moe._expert_shards(offs, 2, 4)) == 1
    finally:
        torch.set_num_threads(before)


def test_row_blocks_keep_experts_whole():
    assert moe._row_blocks([2, 3, 3, 6, 6], max_rows=2) == [(0, 1, 0, 2), (1, 4, 2, 6)]
    assert moe._row_blocks([0, 5, 5], max_rows=100) == [(0, 3, 0, 5)]
    assert moe._row_blocks([0, 0], max_rows=1) == []


@pytest.mark.parametrize("dtype,tol", [(torch.float32, {}), (torch.bfloat16, {"atol": 2e-2, "rtol": 2e-2})])
def test_grouped_equals_loop(dtype, tol):
    runs = []
    for dispatch in DISPATCHES:
        block = make_block(24, False, experts=16, top_k=4, hidden=64, ffn=64, dispatch=dispatch).to(dtype)
        x = torch.randn(2, 50, 64, generator=torch.Generator().manual_seed(1), dtype=dtype)
        x.requires_grad_()
        route = block(x)[1]
        runs.append((output_and_grads(lambda b=block, v=x: b(v)[0], [x, *block.parameters()]), route))
    (grouped, route_grouped), (loop, route_loop) = runs
    assert_all_close(grouped, loop, **tol)
    for field in ("logits", "probs", "topk_index", "topk_weight"):  # the losses see the same routing
        assert torch.equal(getattr(route_grouped, field), getattr(route_loop, field))


def test_grouped_handles_broadcast_gradient_and_frozen_experts():
    """`out.sum()` hands back an expanded gradient; frozen experts (stage 1) skip their GEMMs."""
    grads = {}
    for dispatch in DISPATCHES:
        block = make_block(0, True, dispatch=dispatch)
        block.experts.requires_grad_(False)
        x = torch.randn(4, 9, 32, generator=torch.Generator().manual_seed(2), requires_grad=True)
        block(x)[0].sum().backward()
        assert block.experts.gate_up_proj.grad is None and block.experts.down_proj.grad is None
        grads[dispatch] = (x.grad, block.gate.weight.grad)
    assert_all_close(list(grads["grouped"]), list(grads["loop"]))


def test_grouped_runs_under_autocast():
    """`torch._grouped_mm` does not autocast: the grouped path computes in the weights' dtype."""
    outs = {}
    for dispatch in DISPATCHES:
        block = make_block(0, True, dispatch=dispatch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outs[dispatch] = block(torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3)))[0]
    assert outs["grouped"].dtype == outs["loop"].dtype == torch.float32
    assert_all_close([outs["grouped"]], [outs["loop"]], atol=3e-2, rtol=3e-2)


def test_dispatch_selection():
    assert grouped_mm_available(torch.empty(2, 4, 4))  # fp32 on CPU: the installed torch has the kernel
    assert make_block(0, True).experts.uses_grouped_mm()
    assert not make_block(0, True, dispatch="loop").experts.uses_grouped_mm()
    wide = make_block(0, True).double()  # float64: no grouped kernel, so auto falls back to the loop
    assert not wide.experts.uses_grouped_mm()
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    torch.testing.assert_close(wide(x)[0], dense_reference(wide, x.reshape(-1, 32)).reshape(x.shape))
    with pytest.raises(ValueError, match="dispatch='loop'"):
        make_block(0, True, dispatch="grouped").double()(x)
    with pytest.raises(ValueError, match="expected one of auto, grouped, loop"):
        make_block(0, True, dispatch="dense")


def olmoe_with_weights_of(block: MoEBlock, implementation: str) -> OlmoeSparseMoeBlock:
    """transformers' OLMoE sparse block sharing `block`'s parameter values (same fused layout)."""
    experts = block.experts
    _, ffn2, hidden = experts.gate_up_proj.shape
    config = OlmoeConfig(
        hidden_size=hidden,
        intermediate_size=ffn2 // 2,
        num_experts=experts.num_experts,
        num_experts_per_tok=block.gate.top_k,
        norm_topk_prob=block.gate.normalize,
    )
    config._experts_implementation = implementation
    theirs = OlmoeSparseMoeBlock(config)
    with torch.no_grad():
        theirs.gate.weight.copy_(block.gate.weight)
        theirs.experts.gate_up_proj.copy_(experts.gate_up_proj)
        theirs.experts.down_proj.copy_(experts.down_proj)
    return theirs


@pytest.mark.parametrize("dispatch", DISPATCHES)
@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
@pytest.mark.parametrize("normalize", [True, False])
def test_equals_transformers_olmoe(dispatch, implementation, normalize):
    block = make_block(0, normalize, experts=16, top_k=4, hidden=64, ffn=32, dispatch=dispatch)
    theirs = olmoe_with_weights_of(block, implementation)
    x = torch.randn(2, 30, 64, requires_grad=True)
    ours_params = [block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj]
    their_params = [theirs.gate.weight, theirs.experts.gate_up_proj, theirs.experts.down_proj]
    got = output_and_grads(lambda: block(x)[0], [x, *ours_params])
    want = output_and_grads(lambda: theirs(x), [x, *their_params])
    assert_all_close(got, want)


def test_shared_expert_changes_output():
    x = torch.randn(2, 5, 32)
    without = make_block(0, True)(x)[0]
    with_shared = make_block(24, True)(x)[0]
    assert not torch.allclose(without, with_shared)


@pytest.mark.parametrize("dispatch", DISPATCHES)
def test_gradients_reach_router_and_experts(dispatch):
    block = make_block(24, True, dispatch=dispatch)
    out, route = block(torch.randn(2, 9, 32))
    # A balance-style term on the router probabilities plus the output: both paths get gradient.
    (out.pow(2).mean() + route.probs.pow(2).mean()).backward()
    assert block.gate.weight.grad.abs().sum() > 0
    used = route.topk_index.unique()
    assert block.experts.gate_up_proj.grad[used].abs().sum() > 0
    unused = torch.tensor([e for e in range(8) if e not in used.tolist()], dtype=torch.long)
    if len(unused):  # experts no token chose get exactly no gradient: nothing dense was computed
        assert block.experts.gate_up_proj.grad[unused].abs().sum() == 0
    assert block.shared_expert.up_proj.weight.grad.abs().sum() > 0
