"""The decoding strategies on toy logits functions and on a small fixed model."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dimoe.data.chat import Message, encode_chat
from dimoe.diffusion.decoding import (
    filter_logits,
    final_state,
    llada_decode,
    num_transfer_tokens,
    stop_at_eos,
    threshold_decode,
    threshold_reveal_count,
)

MASK, EOS, VOCAB = 2, 1, 16


def toy_logits(seed: int = 0, scale: float = 3.0):
    """A deterministic logits_fn: a fixed random table per position (mask and EOS never win), and
    a record of every call's tokens and rows."""
    table = torch.randn(64, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale
    table[:, [MASK, EOS]] = -1e4
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def logits_fn(tokens: torch.Tensor, rows: torch.Tensor, window: slice) -> torch.Tensor:
        calls.append((tokens.clone(), rows.clone()))
        return table[window].expand(tokens.shape[0], -1, -1) + rows[:, None, None] * 0.37

    return logits_fn, calls


def no_prompt(batch: int) -> torch.Tensor:
    return torch.empty(batch, 0, dtype=torch.long)


def revealed_per_call(calls, final_tokens: torch.Tensor, start: int = 0) -> list[list[int]]:
    """Tokens each call's step revealed, per row (from the masks of consecutive calls)."""
    masked = [(tokens[:, start:] == MASK).sum(dim=1).tolist() for tokens, _ in calls]
    masked.append((final_tokens == MASK).sum(dim=1).tolist())
    return [
        [a - b for a, b in zip(before, after, strict=True)]
        for before, after in zip(masked, masked[1:], strict=False)
    ]


def test_num_transfer_tokens_is_base_plus_remainder_first():
    counts = num_transfer_tokens(torch.tensor([10, 7, 3]), 4)
    assert counts.tolist() == [[3, 3, 2, 2], [2, 2, 2, 1], [1, 1, 1, 0]]


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_llada_reveals_exactly_the_scheduled_counts(remasking):
    logits_fn, calls = toy_logits()
    prompt = torch.tensor([[5, 6, 7], [0, 8, 9]])  # the second row left-padded (pad id 0)
    state = final_state(
        llada_decode(
            logits_fn,
            prompt,
            mask_id=MASK,
            steps=6,
            gen_length=14,
            block_length=7,
            remasking=remasking,
            temperature=0.5,
            generator=torch.Generator().manual_seed(0),
        )
    )
    # 7 masked tokens per block over 3 steps: 3, 2, 2 (LLaDA's get_num_transfer_tokens).
    assert revealed_per_call(calls, state.tokens, start=3) == [[3, 3], [2, 2], [2, 2]] * 2
    assert not (state.tokens == MASK).any()
    assert state.nfe.tolist() == [6, 6] and state.steps_used == 6
    # Block 0 is filled before block 1 starts.
    after_block_0 = calls[3][0][:, 3:]
    assert not (after_block_0[:, :7] == MASK).any() and (after_block_0[:, 7:] == MASK).all()


def test_llada_cfg_runs_the_unconditional_batch_and_counts_two_forwards():
    logits_fn, calls = toy_logits()
    prompt = torch.tensor([[5, 6, 7]])
    state = final_state(
        llada_decode(logits_fn, prompt, mask_id=MASK, steps=4, gen_length=8, block_length=8, cfg_scale=1.0)
    )
    tokens, rows = calls[0]
    assert rows.tolist() == [0, 0] and (tokens[1, :3] == MASK).all() and tokens[0, :3].tolist() == [5, 6, 7]
    assert state.nfe.tolist() == [8]


def reference_llada(
    model, prompt, steps, gen_length, block_length, temperature, cfg_scale, remasking, mask_id
):
    """A plain transcription of LLaDA's reference generate() (batch of one, global RNG,
    `model(x).logits`, torch.topk per row), kept independent of dimoe's implementation."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, : prompt.shape[1]] = prompt.clone()
    prompt_index = x != mask_id
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        start = prompt.shape[1] + num_block * block_length
        block_mask_index = x[:, start : start + block_length] == mask_id
        mask_num = block_mask_index.sum(dim=1, keepdim=True)
        base, remainder = mask_num // steps, mask_num % steps
        num_transfer = torch.zeros(1, steps, dtype=torch.int64) + base
        for i in range(1):
            num_transfer[i, : remainder[i]] += 1
        for i in range(steps):
            mask_index = x == mask_id
            if cfg_scale > 0.0:
                un_x = x.clone()
                un_x[prompt_index] = mask_id
                logits, un_logits = torch.chunk(model(torch.cat([x, un_x], dim=0)).logits, 2, dim=0)
                logits = un_logits + (cfg_scale + 1) * (logits - un_logits)
            else:
                logits = model(x).logits
            if temperature == 0:
                noisy = logits
            else:
                logits64 = logits.to(torch.float64)
                noise = torch.rand_like(logits64, dtype=torch.float64)
                noisy = logits64.exp() / (-torch.log(noise)) ** temperature
            x0 = torch.argmax(noisy, dim=-1)
            if remasking == "low_confidence":
                p = F.softmax(logits.to(torch.float64), dim=-1)
                x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            else:
                x0_p = torch.rand((x0.shape[0], x0.shape[1]))
            x0_p[:, prompt.shape[1] + (num_block + 1) * block_length :] = -np.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -np.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            for j in range(confidence.shape[0]):
                _, select_index = torch.topk(confidence[j], k=int(num_transfer[j, i]))
                transfer_index[j, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x


@pytest.mark.parametrize(
    ("temperature", "cfg_scale", "remasking"),
    [(0.0, 0.0, "low_confidence"), (0.8, 0.0, "random"), (0.5, 1.5, "low_confidence"), (0.0, 0.0, "random")],
)
@torch.no_grad()
def test_llada_matches_a_plain_reference_loop(full_model, tokenizer, temperature, cfg_scale, remasking):
    ids = encode_chat(tokenizer, [Message("user", "What is 3 plus 4?")], add_generation_prompt=True).input_ids
    prompt = torch.tensor([ids])
    schedule = {"steps": 8, "gen_length": 16, "block_length": 8}
    torch.manual_seed(123)
    expected = reference_llada(
        full_model,
        prompt,
        **schedule,
        temperature=temperature,
        cfg_scale=cfg_scale,
        remasking=remasking,
        mask_id=full_model.config.mask_token_id,
    )
    state = final_state(
        llada_decode(
            # The LM head of the current block only: the same tokens as LLaDA's whole-sequence logits.
            lambda x, rows, window: full_model(x, logits_positions=window).logits,
            prompt,
            mask_id=full_model.config.mask_token_id,
            temperature=temperature,
            cfg_scale=cfg_scale,
            remasking=remasking,
            generator=torch.Generator().manual_seed(123),
            **schedule,
        )
    )
    assert torch.equal(state.tokens, expected[:, prompt.shape[1] :])


def test_threshold_above_one_reveals_one_token_per_step():
    logits_fn, calls = toy_logits()
    state = final_state(
        threshold_decode(
            logits_fn,
            no_prompt(2),
            mask_id=MASK,
            eos_id=EOS,
            steps=8,
            gen_length=8,
            block_length=4,
            threshold=1.5,
        )
    )
    assert revealed_per_call(calls, state.tokens) == [[1, 1]] * 8
    assert state.nfe.tolist() == [8, 8] and not (state.tokens == MASK).any()


def test_threshold_above_one_follows_llada_low_confidence_schedule():
    logits_fn, calls = toy_logits()
    state = final_state(
        threshold_decode(
            logits_fn,
            no_prompt(1),
            mask_id=MASK,
            eos_id=EOS,
            steps=4,
            gen_length=12,
            block_length=6,
            threshold=2.0,
        )
    )
    assert revealed_per_call(calls, state.tokens) == [[3]] * 4
    llada_fn, _ = toy_logits()
    llada = final_state(
        llada_decode(
            llada_fn,
            torch.empty(1, 0, dtype=torch.long),
            mask_id=MASK,
            steps=4,
            gen_length=12,
            block_length=6,
        )
    )
    assert torch.equal(state.tokens, llada.tokens)


def test_threshold_reveal_count_finishes_the_block_within_budget():
    confidence = torch.tensor([[0.95, 0.91, 0.2, 0.1, -torch.inf], [0.3, 0.2, 0.1, -torch.inf, -torch.inf]])
    masked = torch.tensor([4, 3])
    assert threshold_reveal_count(confidence, masked, 0.9, steps_left=4).tolist() == [2, 1]
    assert threshold_reveal_count(confidence, masked, 0.9, steps_left=2).tolist() == [2, 2]
    assert threshold_reveal_count(confidence, masked, 0.9, steps_left=1).tolist() == [4, 3]


def test_threshold_never_exceeds_the_step_budget_and_reveals_confident_tokens_together():
    logits_fn, calls = toy_logits(scale=4.0)
    state = final_state(
        threshold_decode(
            logits_fn,
            no_prompt(3),
            mask_id=MASK,
            eos_id=EOS,
            steps=8,
            gen_length=16,
            block_length=8,
            threshold=0.7,
        )
    )
    assert not (state.tokens == MASK).any()
    assert state.steps_used <= 8 and (state.nfe <= 8).all()
    assert max(max(step) for step in revealed_per_call(calls, state.tokens)) > 2  # parallel reveals happen
    assert state.nfe.sum() < 3 * 8  # ... and save forwards


def eos_logits_fn(calls):
    """Row 0: a confident answer of three 5s then confident EOS. Row 1: the same, but the answer
    is unsure (one token per step). Row 2: never EOS, unsure everywhere."""

    def logits_fn(tokens, rows, window):
        calls.append(rows.clone())
        logits = torch.zeros(len(rows), tokens.shape[1], VOCAB)
        for i, row in enumerate(rows.tolist()):
            if row == 2:
                logits[i, :, 6] = 1.0
                continue
            logits[i, :3, 5] = 10.0 if row == 0 else 1.0
            logits[i, 3:, EOS] = 10.0
        return logits[:, window]

    return logits_fn


def test_early_stop_fills_eos_and_saves_forwards():
    calls: list[torch.Tensor] = []
    states = list(
        threshold_decode(
            eos_logits_fn(calls),
            no_prompt(3),
            mask_id=MASK,
            eos_id=EOS,
            steps=16,
            gen_length=16,
            block_length=8,
            threshold=0.9,
        )
    )
    final = states[-1]
    assert final.tokens[0].tolist() == [5, 5, 5] + [EOS] * 13
    assert final.tokens[1].tolist() == [5, 5, 5] + [EOS] * 13
    assert (final.tokens[2] == 6).all()
    # Row 0 is done after one step. Row 1 reveals its confident EOS run at step 1 but is done only
    # once its three unsure tokens before it are decided (one per step). Row 2 runs its whole
    # budget of 16 steps. Finished rows leave the batch.
    assert final.nfe.tolist() == [1, 4, 16]
    assert [c.tolist() for c in calls[:5]] == [[0, 1, 2], [1, 2], [1, 2], [1, 2], [2]]
    assert states[0].finished.tolist() == [True, True, False]


def test_stop_at_eos_waits_for_the_positions_before_the_eos():
    tokens = torch.tensor([[5, MASK, EOS, MASK], [5, 6, EOS, MASK], [5, 6, 7, MASK]])
    done = stop_at_eos(tokens, EOS, MASK)
    assert done.tolist() == [False, True, False]
    assert tokens.tolist() == [[5, MASK, EOS, MASK], [5, 6, EOS, EOS], [5, 6, 7, MASK]]


def test_strategies_ask_for_the_current_block_only():
    """The window a strategy reads is its current block, in the whole sequence's positions."""
    windows: list[slice] = []

    def logits_fn(tokens, rows, window):
        windows.append(window)
        return torch.zeros(len(rows), window.stop - window.start, VOCAB)

    prompt = torch.tensor([[5, 6, 7]])
    final_state(llada_decode(logits_fn, prompt, mask_id=MASK, steps=4, gen_length=8, block_length=4))
    assert windows == [slice(3, 7)] * 2 + [slice(7, 11)] * 2
    windows.clear()
    final_state(
        threshold_decode(
            logits_fn, prompt, mask_id=MASK, eos_id=EOS, steps=4, gen_length=8, block_length=4, threshold=2.0
        )
    )
    assert windows == [slice(3, 7)] * 2 + [slice(7, 11)] * 2


def test_filter_logits_keeps_the_top_k_and_the_top_p_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    keep = lambda out: torch.isfinite(out)[0].tolist()  # noqa: E731
    assert keep(filter_logits(logits, top_k=2)) == [True, True, False, False]
    # 0.5 < 0.6: the nucleus needs the second token; 0.8 reaches 0.8: not the third.
    assert keep(filter_logits(logits, top_p=0.6)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.8)) == [True, True, False, False]
    assert keep(filter_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert keep(filter_logits(logits, top_p=0.1)) == [True, False, False, False]  # the top one always stays
    assert keep(filter_logits(logits)) == [True] * 4


def test_sampled_tokens_stay_within_top_k():
    logits_fn, _ = toy_logits(scale=0.5)  # flat: sampling would otherwise spread over the vocabulary
    allowed = (
        logits_fn(torch.zeros(1, 8, dtype=torch.long), torch.tensor([0]), slice(0, 8)).topk(2).indices[0]
    )
    for seed in range(5):
        state = final_state(
            threshold_decode(
                logits_fn,
                no_prompt(1),
                mask_id=MASK,
                eos_id=EOS,
                steps=8,
                gen_length=8,
                block_length=8,
                threshold=2.0,
                temperature=1.0,
                top_k=2,
                generator=torch.Generator().manual_seed(seed),
            )  # fmt: skip
        )
        assert all(int(t) in allowed[i].tolist() for i, t in enumerate(state.tokens[0]))


def test_per_row_generators_make_a_rows_sample_independent_of_its_batch():
    logits_fn, _ = toy_logits(scale=0.5)

    def run(seeds: list[int]) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(s) for s in seeds]
        decoder = threshold_decode(logits_fn, no_prompt(len(seeds)), mask_id=MASK, eos_id=EOS, steps=8,
                                   gen_length=8, block_length=4, threshold=0.9, temperature=1.0,
                                   generator=generators)  # fmt: skip
        return final_state(decoder).tokens

    # The toy logits add 0.37 × row index, so the seeded row comes first in both batches.
    alone, together = run([11]), run([11, 12, 13])
    assert torch.equal(together[0], alone[0]) and not torch.equal(together[1], together[2])


def test_stop_ends_a_row_early_and_fills_it_with_eos():
    logits_fn, _ = toy_logits()

    def decode(stop=None):
        decoder = threshold_decode(logits_fn, no_prompt(2), mask_id=MASK, eos_id=EOS, steps=16,
                                   gen_length=16, block_length=4, threshold=0.9, stop=stop)  # fmt: skip
        return final_state(decoder)

    free = decode()
    target = int(free.tokens[0, 2])

    def stop(tokens: torch.Tensor) -> torch.Tensor:  # row 0 stops once position 2 holds its token
        return (tokens[:, 2] == target) & torch.tensor([True, False])

    stopped = decode(stop)
    assert stopped.finished.all() and torch.equal(stopped.tokens[1], free.tokens[1])
    assert stopped.nfe[0] < free.nfe[0] and (stopped.tokens[0, 4:] == EOS).all()


def test_reveal_record_holds_each_tokens_probability_when_revealed():
    logits_fn, _ = toy_logits()
    decoder = threshold_decode(logits_fn, no_prompt(2), mask_id=MASK, eos_id=EOS, steps=8, gen_length=8,
                               block_length=8, threshold=0.5, top_logprobs=2)  # fmt: skip
    state = final_state(decoder)
    logits = logits_fn(state.tokens, torch.arange(2), slice(0, 8))  # the toy logits do not depend on x
    probs = F.softmax(logits.double(), dim=-1)
    expected = probs.gather(-1, state.tokens.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(state.reveals.probability, expected)
    assert torch.equal(state.reveals.top_ids, probs.topk(2).indices)
