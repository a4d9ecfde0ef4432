"""Decoding strategies of masked diffusion (docs/design.md §5), written over a `logits_fn`.

A strategy starts from a response of G mask tokens and reveals tokens over a fixed budget of
steps, semi-autoregressively: the response is split into G / block_length blocks decoded left to
right, steps / num_blocks steps each. Strategies know nothing of the model: they call

    logits_fn(tokens [b, L], rows [b], window) -> logits [b, window length, V]

where row i of `tokens` is the whole sequence (prompt + response) of row `rows[i]` of the batch
being decoded (so the caller can pick that row's attention mask, image features or cache), and
`window` is the slice of positions whose logits the step reads: the current block. Asking for the
block only lets the caller skip the LM head elsewhere and answer from a cache (the exact prefix
cache, or Fast-dLLM's block cache, which it refreshes when the window moves to the next block).

Both are generators that yield a `DecodeState` after each committed block (for streaming);
`final_state` drains one. Sampling (temperature > 0) may be restricted to the top-k tokens or the
top-p nucleus of each position, and may draw every row's noise from the row's own generator, so a
request's sample does not depend on the rest of its batch. Each state also records the probability
every token had under the model at the step it was revealed (and, on request, the most likely
alternatives at that step): a diffusion model's analogue of an autoregressive token logprob.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

LogitsFn = Callable[[torch.Tensor, torch.Tensor, slice], torch.Tensor]
# One generator for the whole batch, or one per batch row.
Generators = torch.Generator | Sequence[torch.Generator] | None
# Rows whose decided text has reached a stop sequence, from the response tokens [B, G].
StopFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class DecodeState:
    """The response after a committed block."""

    tokens: torch.Tensor  # Long[B, G], the mask id where still undecided
    nfe: torch.Tensor  # Long[B], forward passes that included the row (a CFG step counts 2)
    steps_used: int  # batched forward passes so far
    block: int  # index of the block just committed
    finished: torch.Tensor  # Bool[B], rows whose tokens are final
    reveals: RevealRecord | None = None  # each token's probability when it was revealed


class RevealRecord:
    """Per response position, the probability of the token revealed there under the step's
    logits (NaN while undecided), and with `top` > 0 the `top` most likely tokens at that step."""

    def __init__(self, batch: int, gen_length: int, top: int, device: torch.device) -> None:
        self.probability = torch.full((batch, gen_length), torch.nan, dtype=torch.float64, device=device)
        self.top_ids = torch.zeros(batch, gen_length, top, dtype=torch.long, device=device)
        self.top_probability = torch.zeros(batch, gen_length, top, dtype=torch.float64, device=device)

    def update(
        self, rows: torch.Tensor, columns: slice, revealed: torch.Tensor, probability: torch.Tensor,
        logits: torch.Tensor,
    ) -> None:  # fmt: skip
        """Record the `revealed` [b, W] positions of response `columns` of batch `rows`."""
        block = self.probability[rows, columns]
        self.probability[rows, columns] = torch.where(revealed, probability, block)
        top = self.top_ids.shape[-1]
        if top:
            values, ids = F.softmax(logits.to(torch.float64), dim=-1).topk(top, dim=-1)
            keep = revealed.unsqueeze(-1)
            self.top_ids[rows, columns] = torch.where(keep, ids, self.top_ids[rows, columns])
            self.top_probability[rows, columns] = torch.where(
                keep, values, self.top_probability[rows, columns]
            )


def final_state(states: Iterator[DecodeState]) -> DecodeState:
    """The last state of a decoder (the finished generation)."""
    *_, last = states
    return last


def check_schedule(steps: int, gen_length: int, block_length: int) -> tuple[int, int]:
    """(num_blocks, steps_per_block) of LLaDA's semi-autoregressive schedule."""
    if gen_length % block_length:
        raise ValueError(f"gen_length={gen_length} must be a multiple of block_length={block_length}")
    num_blocks = gen_length // block_length
    if steps % num_blocks:
        raise ValueError(f"steps={steps} must be a multiple of the number of blocks ({num_blocks})")
    return num_blocks, steps // num_blocks


def uniform(
    shape: tuple[int, ...], generator: Generators, device: torch.device, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """U(0, 1) noise of `shape` (rows first); with one generator per row, row i is drawn from
    generator i alone."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(shape, dtype=dtype, generator=generator, device=device)
    return torch.stack([torch.rand(shape[1:], dtype=dtype, generator=g, device=device) for g in generator])


def rows_of(generator: Generators, rows: torch.Tensor) -> Generators:
    """The generators of a subset of rows (a shared generator stays shared)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return [generator[i] for i in rows.tolist()]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Logits outside each position's `top_k` most likely tokens, or outside the smallest set of
    most likely tokens whose probability reaches `top_p` (nucleus sampling, Holtzman et al. 2020),
    set to -inf. The most likely token always stays, so greedy decoding is unchanged."""
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = F.softmax(ordered.to(torch.float64), dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before a token already reaches p
        logits = logits.masked_fill(outside.scatter(-1, order, outside), -torch.inf)
    return logits


def add_gumbel_noise(logits: torch.Tensor, temperature: float, generator: Generators) -> torch.Tensor:
    """Scores whose argmax samples softmax(logits / temperature) by the Gumbel-max trick:
    exp(l) / (-log u)^T with u ~ U(0, 1) is a monotone transform of l / T + Gumbel noise.

    In float64: low-precision Gumbel-max lowers generation quality of masked diffusion models
    (Zheng et al. 2024, arXiv:2409.02908), which is why LLaDA samples in float64. At temperature 0
    the logits are returned unchanged (greedy), drawing no noise."""
    if temperature == 0:
        return logits
    logits = logits.to(torch.float64)
    noise = uniform(tuple(logits.shape), generator, logits.device)
    return logits.exp() / (-torch.log(noise)) ** temperature


def predict(
    logits: torch.Tensor, temperature: float, generator: Generators, top_k: int = 0, top_p: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The predicted clean tokens x0 [b, L] (greedy, or Gumbel-sampled from the top-k / top-p
    tokens) and their probability under the model, p(x0) [b, L] in float64: LLaDA's
    low-confidence score."""
    x0 = add_gumbel_noise(filter_logits(logits, top_k, top_p), temperature, generator).argmax(dim=-1)
    return x0, probability_of(logits, x0)


def probability_of(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """p(tokens) [b, L] under softmax(logits), in float64."""
    probs = F.softmax(logits.to(torch.float64), dim=-1)
    return probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def num_transfer_tokens(masked_count: torch.Tensor, steps: int) -> torch.Tensor:
    """Tokens to reveal at each of `steps` steps, Long[B, steps]: LLaDA's linear schedule
    (Nie et al. 2025, arXiv:2502.09992, Eq. 8) reveals the same expected number per step, so
    each step gets masked // steps and the first masked % steps steps one more."""
    base = (masked_count // steps).unsqueeze(1)
    remainder = (masked_count % steps).unsqueeze(1)
    step_index = torch.arange(steps, device=masked_count.device).unsqueeze(0)
    return base + (step_index < remainder).long()


def top_k_per_row(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Bool [b, L]: the k[i] highest scores of each row i (ties broken by position)."""
    order = scores.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return rank < k.unsqueeze(1)


def guided_logits(
    logits_fn: LogitsFn,
    x: torch.Tensor,
    rows: torch.Tensor,
    window: slice,
    prompt_index: torch.Tensor,
    mask_id: int,
    cfg_scale: float,
) -> torch.Tensor:
    """Logits of `window` of `x`; with cfg_scale > 0, classifier-free guidance as in LLaDA (Nie et
    al. 2025): the unconditional pass masks every prompt token, and the two are combined as
    un + (cfg + 1)(cond − un). Both passes run as one batch."""
    if cfg_scale <= 0:
        return logits_fn(x, rows, window)
    unconditional = x.masked_fill(prompt_index, mask_id)
    conditional, unconditional = logits_fn(
        torch.cat([x, unconditional]), torch.cat([rows, rows]), window
    ).chunk(2)
    return unconditional + (cfg_scale + 1) * (conditional - unconditional)


def llada_scores(
    logits: torch.Tensor,
    length: int,
    window: slice,
    remasking: str,
    temperature: float,
    generator: Generators,
    top_k: int = 0,
    top_p: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and the remasking score [b, W] of the `window` positions of a sequence of `length`:
    p(x0) (low_confidence) or U(0, 1) (random). LLaDA's reference sampler draws its Gumbel noise
    and random scores for every position of the sequence; drawing the same and keeping the window's
    keeps a seeded run identical to it, though only the window's logits were computed."""
    if temperature > 0:
        # Zero logits outside the window only give the noise its whole-sequence shape.
        padded = F.pad(filter_logits(logits, top_k, top_p), (0, 0, window.start, length - window.stop))
        x0 = add_gumbel_noise(padded, temperature, generator)[:, window].argmax(dim=-1)
    else:
        x0 = logits.argmax(dim=-1)
    if remasking == "random":
        score = uniform((logits.shape[0], length), generator, logits.device, torch.float32)
        return x0, score[:, window]
    return x0, probability_of(logits, x0)


@torch.no_grad()
def llada_decode(
    logits_fn: LogitsFn,
    prompt: torch.Tensor,
    *,
    mask_id: int,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    generator: Generators = None,
    top_k: int = 0,
    top_p: float = 1.0,
    top_logprobs: int = 0,
) -> Iterator[DecodeState]:
    """The published LLaDA sampler (Nie et al. 2025, arXiv:2502.09992, Appendix A: Alg. 4
    "random remasking" and Alg. 5 "low-confidence remasking", semi-autoregressive blocks).

    prompt: Long[B, Lp], left-padded (padding is neither mask nor prompt content to the sampler;
    the caller's attention mask hides it). Every step of block k:
      1. logits of block k given the whole sequence; with cfg_scale > 0 also given the sequence
         with every prompt token replaced by the mask (unconditional), combined as
         un + (cfg + 1)(cond - un);
      2. x0 = argmax of the Gumbel-noised logits (temperature), for every position of block k;
      3. score each masked position of block k: p(x0) (low_confidence) or U(0, 1) (random);
      4. reveal the num_transfer_tokens[step] best-scoring masked positions with their x0.
    LLaDA scores the whole sequence with -inf after block k; every position before it is
    decided, so reading block k alone decides the same tokens. No early stop: the whole G is
    filled (a caller cuts the output at EOS or a stop sequence). Every step is one forward (two
    with CFG), whatever cache the `logits_fn` uses.
    """
    if remasking not in ("low_confidence", "random"):
        raise ValueError(f"unknown remasking {remasking!r} (valid: low_confidence, random)")
    num_blocks, steps_per_block = check_schedule(steps, gen_length, block_length)
    batch, prompt_length = prompt.shape
    x = torch.full((batch, prompt_length + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt_length] = prompt
    prompt_index = x != mask_id
    rows = torch.arange(batch, device=prompt.device)
    forwards_per_step = 2 if cfg_scale > 0 else 1
    reveals = RevealRecord(batch, gen_length, top_logprobs, prompt.device)
    for block in range(num_blocks):
        window = slice(prompt_length + block * block_length, prompt_length + (block + 1) * block_length)
        schedule = num_transfer_tokens((x[:, window] == mask_id).sum(dim=1), steps_per_block)
        for step in range(steps_per_block):
            logits = guided_logits(logits_fn, x, rows, window, prompt_index, mask_id, cfg_scale)
            x0, score = llada_scores(
                logits, x.shape[1], window, remasking, temperature, generator, top_k, top_p
            )
            current = x[:, window]
            confidence = score.masked_fill(current != mask_id, -torch.inf)
            revealed = top_k_per_row(confidence, schedule[:, step])
            x[:, window] = torch.where(revealed, x0, current)
            columns = slice(window.start - prompt_length, window.stop - prompt_length)
            # Low-confidence remasking scores by p(x0) already: no second softmax over the vocabulary.
            probability = score if remasking == "low_confidence" else probability_of(logits, x0)
            reveals.update(rows, columns, revealed, probability, logits)
        yield DecodeState(
            tokens=x[:, prompt_length:].clone(),
            nfe=torch.full((batch,), (block + 1) * steps_per_block * forwards_per_step, device=x.device),
            steps_used=(block + 1) * steps_per_block,
            block=block,
            finished=torch.full((batch,), block == num_blocks - 1, device=x.device),
            reveals=reveals,
        )


def threshold_reveal_count(
    confidence: torch.Tensor, masked_count: torch.Tensor, threshold: float, steps_left: int, cap: int = 0
) -> torch.Tensor:
    """Tokens to reveal this step, Long[b]: every masked token of the block whose confidence is
    >= threshold, and at least ceil(masked / steps_left). The floor is what finishes the block
    within its step budget: revealing >= ceil(m / r) tokens at each of the r remaining steps
    empties the block at the last one. It is also >= 1 while anything is masked, and when no
    token is confident it equals LLaDA's schedule, so threshold decoding never reveals fewer
    tokens per step than `llada` with low-confidence remasking. `cap` > 0 bounds the confident
    tokens revealed at once (LLaDA2.0's per-step cap), never below that floor."""
    confident = (confidence >= threshold).sum(dim=1)
    if cap > 0:
        confident = confident.clamp(max=cap)
    floor = (masked_count + steps_left - 1) // steps_left
    return torch.maximum(confident, floor)


def reveal_cap(
    step: int, steps: int, block_length: int, start_ratio: float, end_ratio: float, most: int
) -> int:
    """LLaDA2.0's cap on the tokens one step reveals: a fraction of the block that ramps linearly
    from `start_ratio` at the block's first step to `end_ratio` at its last (1.0 and 1.0: none),
    and at most `most` tokens (0: no limit). 0 means no cap."""
    ratio = start_ratio + (end_ratio - start_ratio) * step / max(steps - 1, 1)
    cap = block_length if ratio >= 1.0 else max(1, math.ceil(ratio * block_length))
    cap = min(cap, most) if most > 0 else cap
    return 0 if cap >= block_length else cap


def stop_at_eos(tokens: torch.Tensor, eos_id: int, mask_id: int) -> torch.Tensor:
    """Bool[B]: rows that are finished, i.e. hold a decided EOS with every position before it
    decided. Nothing after that EOS can change the output (it is cut there), so those positions
    are filled with EOS in place and the row needs no further forward pass."""
    is_eos = tokens == eos_id
    length = tokens.shape[1]
    first_eos = torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1), length)
    column = torch.arange(length, device=tokens.device).unsqueeze(0)
    undecided_before = ((tokens == mask_id) & (column < first_eos.unsqueeze(1))).any(dim=1)
    done = is_eos.any(dim=1) & ~undecided_before
    tokens.masked_fill_(done.unsqueeze(1) & (column > first_eos.unsqueeze(1)), eos_id)
    return done


def _stopped(
    stop: StopFn, tokens: torch.Tensor, finished: torch.Tensor, eos_id: int, mask_id: int
) -> torch.Tensor:
    """Rows (not yet finished) whose decided text holds a stop sequence; like a row stopped at
    EOS, their undecided positions are filled with EOS (the caller cuts the output at the stop)."""
    hit = stop(tokens) & ~finished
    if bool(hit.any()):
        tokens[hit] = tokens[hit].masked_fill(tokens[hit] == mask_id, eos_id)
    return hit


@torch.no_grad()
def threshold_decode(
    logits_fn: LogitsFn,
    prompt: torch.Tensor,
    *,
    mask_id: int,
    eos_id: int,
    steps: int,
    gen_length: int,
    block_length: int,
    threshold: float,
    temperature: float = 0.0,
    generator: Generators = None,
    top_k: int = 0,
    top_p: float = 1.0,
    top_logprobs: int = 0,
    stop: StopFn | None = None,
    cfg_scale: float = 0.0,
    cap_start_ratio: float = 1.0,
    cap_end_ratio: float = 1.0,
    max_decode_per_step: int = 0,
) -> Iterator[DecodeState]:
    """Confidence-threshold parallel decoding (Fast-dLLM, Wu et al. 2025, arXiv:2505.22618) within
    LLaDA's block schedule and step budget, with early stop at EOS.

    prompt: Long[B, Lp], left-padded as for `llada_decode`. Every step of block k, for the rows
    still decoding block k:
      1. x0, p(x0) from the logits of block k (greedy or Gumbel-sampled, as `llada`);
      2. reveal every masked position of block k with p(x0) >= threshold, at least
         ceil(masked in block / steps left in the block's budget) of them (the most confident),
         see `threshold_reveal_count`; so no block takes more than steps / num_blocks steps and
         the whole generation never more than `steps`;
      3. a row is finished once it holds an EOS with everything before it decided (`stop_at_eos`),
         or once `stop` finds a stop sequence in its decided text: its remaining positions become
         EOS and it leaves the batch.
    A row whose block is complete waits for the others without a forward pass, so NFE is counted
    per row: each forward counts once for every row it includes (twice with CFG).
    LLaDA2.0's controls: classifier-free guidance (`cfg_scale`, as in `llada`), a per-step cap on
    the confident tokens revealed ramping from `cap_start_ratio` to `cap_end_ratio` of the block,
    and at most `max_decode_per_step` (`reveal_cap`); `top_k` keeps the candidates of each position.
    """
    num_blocks, steps_per_block = check_schedule(steps, gen_length, block_length)
    batch, prompt_length = prompt.shape
    x = torch.full((batch, prompt_length + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :prompt_length] = prompt
    tokens = x[:, prompt_length:]  # a view: the response
    nfe = torch.zeros(batch, dtype=torch.long, device=prompt.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=prompt.device)
    reveals = RevealRecord(batch, gen_length, top_logprobs, prompt.device)
    prompt_index = x != mask_id
    steps_used = 0
    for block in range(num_blocks):
        window = slice(prompt_length + block * block_length, prompt_length + (block + 1) * block_length)
        columns = slice(window.start - prompt_length, window.stop - prompt_length)
        for step in range(steps_per_block):
            rows = (~finished & (x[:, window] == mask_id).any(dim=1)).nonzero().squeeze(1)
            if rows.numel() == 0:
                break
            current = x[rows, window]
            logits = guided_logits(logits_fn, x[rows], rows, window, prompt_index[rows], mask_id, cfg_scale)
            x0, probability = predict(logits, temperature, rows_of(generator, rows), top_k, top_p)
            nfe[rows] += 2 if cfg_scale > 0 else 1
            steps_used += 1
            masked = current == mask_id
            confidence = probability.masked_fill(~masked, -torch.inf)
            cap = reveal_cap(
                step, steps_per_block, block_length, cap_start_ratio, cap_end_ratio, max_decode_per_step
            )
            count = threshold_reveal_count(
                confidence, masked.sum(dim=1), threshold, steps_per_block - step, cap
            )
            revealed = top_k_per_row(confidence, count)
            x[rows, window] = torch.where(revealed, x0, current)
            reveals.update(rows, columns, revealed, probability, logits)
            finished |= stop_at_eos(tokens, eos_id, mask_id)
            if stop is not None:
                finished |= _stopped(stop, tokens, finished, eos_id, mask_id)
        last = block == num_blocks - 1
        yield DecodeState(tokens.clone(), nfe.clone(), steps_used, block, finished | last, reveals)
        if bool(finished.all()):
            return
