"""The sort-based MoE dispatch against a dense reference (every expert on every token)."""

import pytest
import torch
import torch.nn.functional as F

from dimoe.model.moe import MoEBlock


def dense_reference(block: MoEBlock, x: torch.Tensor) -> torch.Tensor:
    """Run every expert on every token and weight by the top-k gates (zero for the others)."""
    route = block.gate(x)
    gates = torch.zeros_like(route.probs).scatter(1, route.topk_index, route.topk_weight.float())
    out = torch.zeros_like(x)
    experts = block.experts
    for e in range(experts.num_experts):
        gate, up = F.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        out = out + gates[:, e : e + 1] * F.linear(F.silu(gate) * up, experts.down_proj[e])
    if block.shared_expert is not None:
        out = out + block.shared_expert(x)
    return out


def make_block(shared: int, normalize: bool, experts: int = 8, top_k: int = 2) -> MoEBlock:
    torch.manual_seed(0)
    block = MoEBlock(32, 48, experts, top_k, normalize, shared)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    return block


@pytest.mark.parametrize("shared", [0, 24])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("experts,top_k", [(8, 2), (16, 4), (4, 1)])
def test_dispatch_equals_dense_reference(shared, normalize, experts, top_k):
    block = make_block(shared, normalize, experts, top_k)
    x = torch.randn(3, 37, 32)
    out, route = block(x)
    ref = dense_reference(block, x.reshape(-1, 32)).reshape(x.shape)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert route.topk_index.shape == (3 * 37, top_k)
    if normalize:
        torch.testing.assert_close(route.topk_weight.sum(-1), torch.ones(3 * 37))


def test_shared_expert_changes_output():
    x = torch.randn(2, 5, 32)
    without = make_block(0, True)(x)[0]
    with_shared = make_block(24, True)(x)[0]
    assert not torch.allclose(without, with_shared)


def test_gradients_reach_router_and_experts():
    block = make_block(24, True)
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
