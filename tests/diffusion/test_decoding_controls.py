"""LLaDA2.0's decoding controls in `threshold_decode`: the ramped per-step reveal cap, the
absolute cap, and classifier-free guidance."""

import math

import torch

from dimoe.diffusion.decoding import reveal_cap, threshold_decode

MASK, EOS, VOCAB = 0, 1, 16


def test_reveal_cap_ramps_linearly_over_the_block_and_respects_the_absolute_cap():
    caps = [reveal_cap(step, 8, 32, 0.08, 0.5, 0) for step in range(8)]
    expected = [math.ceil((0.08 + 0.42 * step / 7) * 32) for step in range(8)]
    assert caps == expected and caps[0] == 3 and caps[-1] == 16
    assert [reveal_cap(step, 8, 32, 0.08, 0.5, 4) for step in range(8)] == [min(c, 4) for c in expected]
    assert reveal_cap(3, 8, 32, 1.0, 1.0, 0) == 0  # no cap


class ConfidentModel:
    """Every position is confidently token 5 + its column: threshold decoding would reveal a whole
    block in one step. Records the tokens of each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, rows, window):
        self.calls.append(x.clone())
        logits = torch.full((x.shape[0], window.stop - window.start, VOCAB), -10.0)
        columns = torch.arange(window.stop - window.start)
        logits[:, columns, 5 + columns % 8] = 10.0
        return logits


def decode(model, **controls):
    prompt = torch.tensor([[7, 8, 9], [7, 8, 10]])
    return list(threshold_decode(model, prompt, mask_id=MASK, eos_id=EOS, steps=8, gen_length=16,
                                 block_length=8, threshold=0.5, **controls))[-1]  # fmt: skip


def test_the_cap_bounds_the_tokens_revealed_per_step():
    free = ConfidentModel()
    assert decode(free).nfe.tolist() == [2, 2]  # one step per block without a cap
    capped = ConfidentModel()
    state = decode(capped, cap_start_ratio=0.25, cap_end_ratio=0.25)  # 2 of the block of 8 per step
    assert state.nfe.tolist() == [8, 8] and state.tokens.ne(MASK).all()  # 4 steps a block
    masked = [int((x[:, 3:] == MASK).sum()) for x in capped.calls]
    assert [a - b for a, b in zip(masked, masked[1:], strict=False)] == [4, 4, 4, 4, 4, 4, 4]  # 2 per row
    absolute = ConfidentModel()
    assert decode(absolute, max_decode_per_step=4).nfe.tolist() == [4, 4]


def test_cfg_runs_a_prompt_masked_pass_beside_each_step_and_counts_it():
    model = ConfidentModel()
    state = decode(model, cfg_scale=1.5)
    assert state.nfe.tolist() == [4, 4]  # 2 steps, 2 forwards each
    batch = model.calls[0]
    assert batch.shape[0] == 4 and torch.equal(batch[2:, :3], torch.zeros(2, 3, dtype=torch.long))
    assert torch.equal(batch[:2, :3], torch.tensor([[7, 8, 9], [7, 8, 10]]))
