"""Batched generation: requests → chat-encoded, left-padded batches → a decoding strategy → text.

    engine = GenerationEngine.from_checkpoint("artifacts/train/stage3_lownfe/final")
    results = engine.generate([Request("q1", prompt="What colour is the square?")], preset="fast")

`generate(model, batch, settings)` is the model-level entry: it wires the model into the
model-agnostic strategies of `dimoe.diffusion.decoding` (docs/design.md §5):
- images are encoded once per batch, not once per step;
- every step computes the LM head for the current block only, the positions the strategy reads;
- `cache: prefix` with a model trained with the `prefix` mask: the prompt's keys and values are
  computed once per request (`return_prefix_cache`) and every step runs the model on the
  response only; that is exact because prefix tokens never attend to the response;
- `cache: block` (Fast-dLLM's DualCache): a block's first step runs the whole sequence and keeps
  every position's keys and values, its other steps run the block alone (`ModelLogits.block`);
- NFE counts denoising forwards (each once per batch row it includes), a block-only forward as
  one like any other; the one-off prefix pass is, like the vision tower, per-request setup and
  is not counted.

A request's output does not depend on the rest of its batch: padding is on the left, masked out of
attention and skipped by the positions (cumsum of the attention mask), and every per-row decision
of the strategies looks at that row only. (With temperature > 0 the noise is drawn for the whole
batch, so sampled outputs are reproducible per batch, not per request.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from rich.progress import Progress, TimeElapsedColumn
from transformers import PreTrainedTokenizerBase

from dimoe.config.infer import DecodeSettings, InferConfig
from dimoe.config.loader import load_config
from dimoe.data.chat import encode_chat
from dimoe.diffusion.decoding import (
    DecodeState,
    Generators,
    StopFn,
    final_state,
    llada_decode,
    threshold_decode,
)
from dimoe.errors import UserError
from dimoe.infer.inputs import (
    Request,
    Result,
    TokenLogprob,
    read_prompts,
    request_conversation,
    write_predictions,
)
from dimoe.model.build import load_checkpoint
from dimoe.model.modeling import BlockCache, DiMoEVLModel, PrefixCache
from dimoe.model.processor import ImageProcessor
from dimoe.telemetry.profiling import nvtx_enabled, nvtx_range


@dataclass
class PromptBatch:
    """Prompts ready for the model: left-padded ids, their real-token mask, and the pixels of the
    rows that hold image tokens (in row order)."""

    input_ids: torch.Tensor  # Long[B, Lp]
    attention_mask: torch.Tensor  # Long[B, Lp]
    pixel_values: torch.Tensor | None = None  # [n, 3, S, S]


@dataclass
class GenerationResult:
    output_ids: torch.Tensor  # Long[B, G], EOS after a finished row's end
    nfe: torch.Tensor  # Long[B]
    steps_used: int  # batched forward passes


class ModelLogits:
    """The `logits_fn` of one batch (dimoe.diffusion.decoding): logits of a window of whole
    sequences (prompt + response) of some of its rows, computed according to `cache`:

    - `none`: a forward of the whole sequences;
    - `prefix`: a forward of the responses beside the prompts' keys/values, computed once (exact;
      `prefix`-mask models only, and calls whose prompts are the batch's: a CFG call, whose
      unconditional half masks the prompt, runs as `none`);
    - `block`: Fast-dLLM's DualCache: a block's first step runs as `prefix` (or `none`) and keeps
      every position's keys/values, its other steps run the block alone beside them (`block`).
    """

    def __init__(self, model: DiMoEVLModel, batch: PromptBatch, gen_length: int, cache: str) -> None:
        self.model = model
        self.prompt = batch.input_ids
        self.cache = cache
        self.nvtx = nvtx_enabled()
        prompt_real = batch.attention_mask.bool()
        has_image = (batch.input_ids == model.config.image_token_id).any(dim=1)
        self.features = model.encode_images(batch.pixel_values) if bool(has_image.any()) else None
        # Row r's image features are self.features[self.feature_row[r]].
        self.feature_row = has_image.long().cumsum(0) - 1
        response = torch.ones(len(prompt_real), gen_length, dtype=torch.bool, device=prompt_real.device)
        self.attention_mask = torch.cat([prompt_real, response], dim=1)
        self.prefix_mask = torch.cat([prompt_real, ~response], dim=1)
        self.prefix = None
        # A `block` model's committed blocks are cached exactly, whatever cache is asked (not `none`).
        self.exact_blocks = cache != "none" and model.config.attention == "block"
        if cache != "none" and model.config.attention in ("prefix", "block"):
            everyone = torch.arange(len(self.prompt), device=self.prompt.device)
            self.prefix = model(
                self.prompt,
                attention_mask=prompt_real,
                prefix_mask=prompt_real,
                image_features=self._features(self.prompt, everyone),
                return_prefix_cache=True,
            ).prefix_cache
        self._prefix_rows: tuple[torch.Tensor, PrefixCache] | None = None
        self._block: tuple[torch.Tensor, BlockCache] | None = None
        self._committed: tuple[torch.Tensor, PrefixCache] | None = None  # rows, prompt + committed blocks

    def __call__(self, tokens: torch.Tensor, rows: torch.Tensor, window: slice) -> torch.Tensor:
        with nvtx_range("decode_step", self.nvtx):  # one denoising forward (DIMOE_NVTX=1, CUDA)
            if self.exact_blocks and torch.equal(tokens[:, : self.prompt.shape[1]], self.prompt[rows]):
                return self.exact_block(tokens, rows, window)
            if self.model.config.attention == "block":  # CFG's prompt-masked half: no cache is exact
                return self.forward(tokens, rows, window)[0]
            if self.cache == "block":
                return self.block(tokens, rows, window)
            return self.forward(tokens, rows, window)[0]

    def _features(self, tokens: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """Features of the rows of `tokens` that hold image tokens (none when CFG masked them)."""
        with_image = (tokens == self.model.config.image_token_id).any(dim=1)
        if not bool(with_image.any()):
            return None
        return self.features[self.feature_row[rows[with_image]]]

    def forward(
        self, tokens: torch.Tensor, rows: torch.Tensor, window: slice, keep_cache: bool = False
    ) -> tuple[torch.Tensor, PrefixCache | None]:
        """Logits of `window` of whole sequences, from the prefix cache when it holds their
        prompts, and with `keep_cache` the keys/values of every position."""
        length = self.prompt.shape[1]
        if self.prefix is None or not torch.equal(tokens[:, :length], self.prompt[rows]):
            out = self.model(
                tokens,
                attention_mask=self.attention_mask[rows],
                prefix_mask=self.prefix_mask[rows],
                image_features=self._features(tokens, rows),
                logits_positions=window,
                return_prefix_cache=keep_cache,
            )
            return out.logits, out.prefix_cache
        prefix = self._prefix_of(rows)
        in_response = slice(window.start - length, window.stop - length)
        out = self.model(
            tokens[:, length:],
            prefix_cache=prefix,
            logits_positions=in_response,
            return_prefix_cache=keep_cache,
        )
        return out.logits, prefix.extend(out.prefix_cache) if keep_cache else None

    def block(self, tokens: torch.Tensor, rows: torch.Tensor, window: slice) -> torch.Tensor:
        """Logits of `window` by Fast-dLLM's DualCache (Wu et al. 2025, arXiv:2505.22618):
        the first call of a block (a new window start, or a row the cache does not hold) runs
        the whole sequences (`forward`) and keeps every position's keys/values; the block's
        later calls run the window's tokens alone against them. Only the window's tokens change
        within a block, so the reused keys/values are those of the prompt, the committed blocks
        and the still-masked later blocks as they were at the block's first step: approximate,
        except where they cannot depend on the window's tokens (the prompt of a `prefix`-mask
        model; every position of a one-layer model)."""
        cache = self._block_cache(rows, window.start)
        if cache is None:
            logits, sequence = self.forward(tokens, rows, window, keep_cache=True)
            self._block = (rows, BlockCache(sequence, window.start))
            return logits
        return self.model(tokens[:, window], block_cache=cache).logits

    def exact_block(self, tokens: torch.Tensor, rows: torch.Tensor, window: slice) -> torch.Tensor:
        """Logits of `window`, one block of a `block`-attention model, from its tokens alone beside
        the keys/values of the prompt and the committed blocks before it. Those never see a later
        block, so their cache is exact, as an AR model's; it grows by one forward of each block
        once the block is committed (the first call of the next block)."""
        cached_rows, cache = self._committed or (rows, self._prefix_of(rows))
        # A strategy drops rows that are finished or done with the block, and brings the latter back
        # at the next block: the stored cache keeps every row it had, each call takes its own rows.
        if not torch.equal(cached_rows, rows):
            cache = cache.select(torch.searchsorted(cached_rows, rows))
        size = self.model.config.block_size
        if cache.attention_mask.shape[1] < window.start:
            for start in range(cache.attention_mask.shape[1], window.start, size):
                committed = tokens[:, start : min(start + size, window.start)]
                out = self.model(committed, prefix_cache=cache, return_prefix_cache=True)
                cache = cache.extend(out.prefix_cache)
            self._committed = (rows, cache)  # the rows of a block's first call: all that go on
        return self.model(tokens[:, window], prefix_cache=cache).logits

    def _block_cache(self, rows: torch.Tensor, start: int) -> BlockCache | None:
        """The block cache of `rows` for the block at `start`, or None when it must be refreshed."""
        if self._block is None or self._block[1].start != start:
            return None
        cached_rows, cache = self._block
        if torch.equal(rows, cached_rows):
            return cache
        # A strategy drops rows that are finished or done with the block; the rest keep theirs.
        index = torch.searchsorted(cached_rows, rows).clamp(max=len(cached_rows) - 1)
        if not torch.equal(cached_rows[index], rows):
            return None
        self._block = (rows, cache.select(index))
        return self._block[1]

    def _prefix_of(self, rows: torch.Tensor) -> PrefixCache:
        # Rows change only when one finishes; reuse the gathered cache until then.
        if self._prefix_rows is None or not torch.equal(self._prefix_rows[0], rows):
            self._prefix_rows = (rows, self.prefix.select(rows))
        return self._prefix_rows[1]


def check_context(prompt_length: int, gen_length: int, context: int) -> None:
    """The prompt and the response must fit the model's positions."""
    total = prompt_length + gen_length
    if total > context:
        raise UserError(
            f"prompt of {prompt_length} tokens + gen_length {gen_length} = {total} tokens "
            f"exceeds the model's context of {context} (max_position_embeddings); "
            "shorten the prompt or lower gen_length"
        )


@torch.no_grad()
def iter_generate(
    model: DiMoEVLModel,
    batch: PromptBatch,
    settings: DecodeSettings,
    *,
    seeds: Sequence[int] | None = None,
    stop: StopFn | None = None,
    top_logprobs: int = 0,
) -> Iterator[DecodeState]:
    """Decode `batch` with `settings`, yielding the state after each committed block. `seeds`: one
    per row, each row's noise then comes from its own generator (default: one generator for the
    batch, seeded with `settings.seed`); `stop` ends rows early (threshold strategy);
    `top_logprobs`: alternatives recorded per revealed token."""
    config = model.config
    check_context(batch.input_ids.shape[1], settings.gen_length, config.max_position_embeddings)
    if config.attention == "block" and settings.block_length != config.block_size:
        # a block model decodes its own blocks: the one it was trained to denoise given the earlier ones
        if settings.gen_length % config.block_size or settings.steps % (
            settings.gen_length // config.block_size
        ):
            raise UserError(
                f"this model decodes blocks of its block_size {config.block_size}: gen_length "
                f"({settings.gen_length}) must be a multiple of it and steps ({settings.steps}) a multiple "
                "of the number of blocks"
            )
        settings = settings.model_copy(update={"block_length": config.block_size})
    device = batch.input_ids.device
    if seeds is None:
        generator: Generators = torch.Generator(device=device).manual_seed(settings.seed)
    else:
        generator = [torch.Generator(device=device).manual_seed(seed) for seed in seeds]
    logits = ModelLogits(model, batch, settings.gen_length, settings.cache)
    shared = {
        "mask_id": config.mask_token_id,
        "steps": settings.steps,
        "gen_length": settings.gen_length,
        "block_length": settings.block_length,
        "temperature": settings.temperature,
        "top_k": settings.top_k,
        "top_p": settings.top_p,
        "generator": generator,
        "top_logprobs": top_logprobs,
    }
    if settings.strategy == "llada":
        yield from llada_decode(
            logits, batch.input_ids, cfg_scale=settings.cfg_scale, remasking=settings.remasking, **shared
        )
    else:
        yield from threshold_decode(
            logits, batch.input_ids, eos_id=config.eos_token_id, threshold=settings.threshold, stop=stop,
            cfg_scale=settings.cfg_scale, cap_start_ratio=settings.cap_start_ratio,
            cap_end_ratio=settings.cap_end_ratio, max_decode_per_step=settings.max_decode_per_step, **shared,
        )  # fmt: skip


@torch.no_grad()
def generate(model: DiMoEVLModel, batch: PromptBatch, settings: DecodeSettings) -> GenerationResult:
    """Decode `batch` with `settings` (the strategy, schedule and sampling of docs/design.md §5)."""
    state = final_state(iter_generate(model, batch, settings))
    return GenerationResult(state.tokens, state.nfe, state.steps_used)


@dataclass
class StreamChunk:
    """The committed text of request `index` after a block; the last chunk of a request has
    `done` and its `result`."""

    index: int  # position of the request in the list given to the engine
    id: str
    block: int
    text: str
    done: bool
    result: Result | None = None


def partial_stop_length(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of `text` that begins one of `stops` without completing it:
    what a stream holds back until the next block tells whether the stop string follows (as
    OpenAI-compatible servers do, so that streamed text is always a prefix of the final text)."""
    return max(
        (k for stop in stops for k in range(min(len(stop) - 1, len(text)), 0, -1) if text.endswith(stop[:k])),
        default=0,
    )


@dataclass
class EncodedRequest:
    """A request chat-encoded for decoding; `index` is its position in the engine call."""

    index: int
    request: Request
    prompt_ids: list[int]
    image: Image.Image | None


class GenerationEngine:
    """Chat-encodes requests, batches them and decodes them with a named preset."""

    def __init__(
        self, model: DiMoEVLModel, tokenizer: PreTrainedTokenizerBase, config: InferConfig | None = None
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or InferConfig()
        self.processor = ImageProcessor(model.config.image_size) if model.vision is not None else None

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, config: InferConfig | None = None, device: str = "cpu"
    ) -> GenerationEngine:
        model, tokenizer = load_checkpoint(path, device=device)
        return cls(model, tokenizer, config)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def settings(self, preset: str | None = None, **overrides: Any) -> DecodeSettings:
        """The preset's settings with `overrides` (None values ignored); ConfigError if invalid."""
        return self.config.resolve(preset, overrides)

    def generate(
        self,
        requests: list[Request],
        preset: str | None = None,
        batch_size: int | None = None,
        **overrides: Any,
    ) -> list[Result]:
        """Decode every request; results in request order."""
        return collect_results(self, requests, False, preset=preset, batch_size=batch_size, **overrides)

    def generate_stream(
        self,
        requests: list[Request],
        preset: str | None = None,
        batch_size: int | None = None,
        **overrides: Any,
    ) -> Iterator[StreamChunk]:
        """Decode in batches of `batch_size` (default: the config's), yielding each request's
        committed text after every block. Every request is validated before any decoding."""
        settings = self.settings(preset, **overrides)
        encoded = [self.encode(i, request, settings) for i, request in enumerate(requests)]
        size = batch_size or self.config.batch_size
        for start in range(0, len(encoded), size):
            yield from self._decode_batch(encoded[start : start + size], settings)

    def encode(self, index: int, request: Request, settings: DecodeSettings) -> EncodedRequest:
        """Chat-encode one request; ValueError naming the request if it cannot be decoded."""
        config = self.model.config
        try:
            messages, image = request_conversation(request)
            if image is not None and self.processor is None:
                raise UserError("the request has an image but the model has no vision tower")
            num_image_tokens = config.num_image_tokens if image is not None else 0
            if not request.chat_template:  # a completions prompt, continued as written
                prompt_ids = self.tokenizer(request.prompt_text, add_special_tokens=True)["input_ids"]
            else:
                prompt_ids = encode_chat(
                    self.tokenizer, messages, num_image_tokens=num_image_tokens, add_generation_prompt=True
                ).input_ids
            if config.mask_token_id in prompt_ids:
                raise UserError("the prompt contains the reserved mask token")
            check_context(len(prompt_ids), settings.gen_length, config.max_position_embeddings)
        except ValueError as exc:
            raise UserError(f"request {request.id!r}: {exc}") from None
        return EncodedRequest(index, request, prompt_ids, image)

    def collate(self, items: list[EncodedRequest]) -> PromptBatch:
        """Left-pad the prompts of `items` into one batch, with the pixels of their images."""
        width = max(len(item.prompt_ids) for item in items)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(it.prompt_ids)) + it.prompt_ids for it in items])
        attention_mask = torch.tensor(
            [[0] * (width - len(it.prompt_ids)) + [1] * len(it.prompt_ids) for it in items]
        )
        images = [item.image for item in items if item.image is not None]
        pixels = self.processor(images).to(self.device) if images else None
        return PromptBatch(input_ids.to(self.device), attention_mask.to(self.device), pixels)

    def _decode_batch(self, items: list[EncodedRequest], settings: DecodeSettings) -> Iterator[StreamChunk]:
        """Every request's seed draws its own noise, so its text does not depend on its batch."""
        start = time.perf_counter()
        done = [False] * len(items)
        requests = [item.request for item in items]
        states = iter_generate(
            self.model, self.collate(items), settings,
            seeds=[settings.seed if r.seed is None else r.seed for r in requests],
            stop=self._stop_fn([r.stop for r in requests]) if any(r.stop for r in requests) else None,
            top_logprobs=max((r.top_logprobs or 0 for r in requests), default=0),
        )  # fmt: skip
        for state in states:
            now = time.perf_counter()
            committed = state.tokens[:, : (state.block + 1) * settings.block_length].tolist()
            for row, item in enumerate(items):
                if done[row]:
                    continue
                output_ids, text, stopped = self._output(committed[row], item.request.stop)
                done[row] = bool(state.finished[row])
                if not done[row]:  # a stop string may begin here and end in a later block
                    text = text[: len(text) - partial_stop_length(text, item.request.stop)]
                result = None
                if done[row]:
                    finish = "stop" if stopped or len(output_ids) < settings.gen_length else "length"
                    logprobs = self._logprobs(state, row, output_ids, item.request)
                    nfe = int(state.nfe[row])
                    result = Result(item.request.id, text, item.prompt_ids, output_ids, nfe, now - start)
                    result.finish_reason, result.logprobs = finish, logprobs
                yield StreamChunk(item.index, item.request.id, state.block, text, done[row], result)

    def _output(self, ids: list[int], stop: Sequence[str]) -> tuple[list[int], str, bool]:
        """The tokens before the first EOS, their text cut before the first stop sequence, and
        whether a stop sequence cut it."""
        eos = self.model.config.eos_token_id
        ids = ids[: ids.index(eos)] if eos in ids else ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((text.index(s) for s in stop if s in text), default=None)
        return ids, text if cut is None else text[:cut], cut is not None

    def _stop_fn(self, stops: list[tuple[str, ...]]) -> StopFn:
        """Rows whose decided text (the tokens before the first mask) holds one of their stops."""
        mask = self.model.config.mask_token_id

        def stopped(tokens: torch.Tensor) -> torch.Tensor:
            hit = torch.zeros(len(stops), dtype=torch.bool, device=tokens.device)
            for row, stop in enumerate(stops):
                if stop:
                    ids = tokens[row].tolist()
                    decided = self.tokenizer.decode(ids[: ids.index(mask)] if mask in ids else ids)
                    hit[row] = any(s in decided for s in stop)
            return hit

        return stopped

    def _logprobs(
        self, state: DecodeState, row: int, output_ids: list[int], request: Request
    ) -> list[TokenLogprob] | None:
        """Each output token's log-probability at the step it was revealed, with the request's
        number of alternatives from that step."""
        if request.top_logprobs is None or state.reveals is None:
            return None
        reveals, k, decode = state.reveals, request.top_logprobs, self.tokenizer.decode
        return [
            TokenLogprob(decode([token]), math.log(float(reveals.probability[row, i])),
                         [(decode([int(t)]), math.log(float(p))) for t, p in
                          zip(reveals.top_ids[row, i, :k], reveals.top_probability[row, i, :k], strict=True)])
            for i, token in enumerate(output_ids)
        ]  # fmt: skip


def run_generate(
    checkpoint: str | Path,
    input_path: str | Path,
    out_path: str | Path,
    preset: str | None = None,
    overrides: dict[str, Any] | None = None,
    progress: bool = True,
    *,
    config_path: str | Path | None = None,
    set_overrides: Sequence[str] = (),
    device: str = "cpu",
) -> dict[str, Any]:
    """`dimoe infer generate`: decode every row of a prompts file into `preds.jsonl`.

    overrides: decoding fields (strategy, steps, gen_length, ...) and `batch_size`; None values are
    ignored. config_path / set_overrides: the infer config (default: the schema's defaults, which are
    configs/infer/default.yaml) and its `--set` overrides. Returns a summary of the run."""
    config = load_config(config_path, InferConfig, set_overrides)
    fields = dict(overrides or {})
    batch_size = fields.pop("batch_size", None)
    settings = config.resolve(preset, fields)  # fail on a bad preset before loading anything
    requests = read_prompts(input_path)
    engine = GenerationEngine.from_checkpoint(checkpoint, config, device=device)
    started = time.perf_counter()
    results = collect_results(engine, requests, progress, preset=preset, batch_size=batch_size, **fields)
    elapsed = time.perf_counter() - started
    out = write_predictions(out_path, requests, results)
    tokens = sum(len(r.output_ids) for r in results)
    return {
        "out": str(out),
        "requests": len(results),
        "preset": preset or config.default_preset,
        "settings": settings.model_dump(),
        "mean_nfe": sum(r.nfe for r in results) / max(len(results), 1),
        "generated_tokens": tokens,
        "elapsed_s": elapsed,
        "tokens_per_s": tokens / elapsed if elapsed > 0 else 0.0,
    }


def collect_results(
    engine: GenerationEngine, requests: list[Request], progress: bool, **generate_args: Any
) -> list[Result]:
    """`engine.generate` with a rich progress bar advancing as requests finish."""
    results: dict[int, Result] = {}
    with Progress(*Progress.get_default_columns(), TimeElapsedColumn(), disable=not progress) as bar:
        task = bar.add_task("decoding", total=len(requests))
        for chunk in engine.generate_stream(requests, **generate_args):
            if chunk.done:
                results[chunk.index] = chunk.result
                bar.advance(task)
    return [results[i] for i in range(len(requests))]
