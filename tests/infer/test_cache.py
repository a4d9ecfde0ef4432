"""Decoding caches (docs/design.md §5): logits of the current block only, the exact prefix cache,
and Fast-dLLM's block cache — exact where nothing it reuses can change, close elsewhere — with its
NFE accounting.

The block cache is exact in three cases: (1) a one-layer model, whatever its attention and
schedule: layer-0 keys/values depend only on each position's own token, and only the current
block's tokens change within a block; (2) one step per block: every step is a block's first,
which runs the whole sequence; (3) a single block (block_length = gen_length) of a `prefix`-mask
model: the only positions outside the block are the prompt's, which never attend to the response.
Otherwise (two layers, several steps per block) the reused keys/values are stale."""

import pytest
import torch

from dimoe.config.infer import InferConfig
from dimoe.infer.engine import GenerationEngine
from dimoe.model.modeling import BlockCache

from .conftest import make_model

SCHEDULE = {"gen_length": 32, "block_length": 8, "steps": 16, "threshold": 0.6}


def outputs(results):
    return [(r.id, r.output_ids, r.nfe) for r in results]


def engine_of(model, tokenizer) -> GenerationEngine:
    config = InferConfig.model_validate({"presets": {"p": SCHEDULE}, "default_preset": "p"})
    return GenerationEngine(model, tokenizer, config)


@pytest.fixture(scope="module")
def one_layer(small_spec, tokenizer):
    spec = small_spec.model_copy(update={"num_hidden_layers": 1})
    return {
        attention: make_model(spec, tokenizer, attention, vision=True) for attention in ("prefix", "full")
    }


def sequences(model, length: int = 40, prompt: int = 16):
    """Token ids with row 0 left-padded, its real-token mask and a prefix mask of `prompt` tokens."""
    ids = torch.randint(10, 300, (2, length), generator=torch.Generator().manual_seed(0))
    real = torch.ones_like(ids, dtype=torch.bool)
    real[0, :3] = False
    return ids, real, real & (torch.arange(length) < prompt)


@torch.no_grad()
def block_forward_error(model, block: slice) -> float:
    """Max |logits| error on `block` of a block-cache forward after the block's tokens changed,
    relative to the largest logit of the exact forward."""
    ids, real, prefix = sequences(model)
    cache = model(ids, real, prefix_mask=prefix, return_prefix_cache=True).prefix_cache
    changed = ids.clone()
    changed[:, block] = torch.randint(
        10, 300, changed[:, block].shape, generator=torch.Generator().manual_seed(1)
    )
    exact = model(changed, real, prefix_mask=prefix).logits[:, block]
    cached = model(changed[:, block], block_cache=BlockCache(cache, block.start)).logits
    return float((cached - exact).abs().max() / exact.abs().max())


@pytest.mark.parametrize("name", ["prefix_model", "full_model"])
@torch.no_grad()
def test_logits_of_some_positions_equal_the_full_logits_exactly(request, name):
    model = request.getfixturevalue(name)
    ids, real, prefix = sequences(model)
    full = model(ids, real, prefix_mask=prefix).logits
    for window in (slice(16, 24), slice(30, 40), slice(0, 40)):
        part = model(ids, real, prefix_mask=prefix, logits_positions=window).logits
        assert torch.equal(part, full[:, window])


@pytest.mark.parametrize("attention", ["prefix", "full"])
def test_block_cache_forward_is_exact_for_one_layer(one_layer, attention):
    assert block_forward_error(one_layer[attention], slice(24, 32)) < 1e-6


@pytest.mark.parametrize("name", ["prefix_model", "full_model"])
def test_block_cache_forward_is_close_for_two_layers(request, name):
    # Layer 1's reused keys of the other positions were computed from the block's old tokens.
    assert 1e-4 < block_forward_error(request.getfixturevalue(name), slice(24, 32)) < 0.5


@pytest.mark.parametrize("strategy", ["threshold", "llada"])
@pytest.mark.parametrize(
    ("case", "overrides"),
    [
        ("one layer", {}),
        ("one step per block", {"steps": 4}),
        ("one block of a prefix model", {"block_length": 32}),
    ],
)
def test_block_cache_decodes_as_without_cache_where_it_is_exact(
    one_layer, prefix_model, full_model, tokenizer, requests_mixed, strategy, case, overrides
):
    models = {
        "one layer": [one_layer["prefix"], one_layer["full"]],
        "one step per block": [prefix_model, full_model],
        "one block of a prefix model": [prefix_model],
    }[case]
    for model in models:
        engine = engine_of(model, tokenizer)
        requests = requests_mixed if model.vision is not None else requests_mixed[:2] + requests_mixed[3:]
        block = engine.generate(requests, strategy=strategy, cache="block", **overrides)
        none = engine.generate(requests, strategy=strategy, cache="none", **overrides)
        assert outputs(block) == outputs(none)


@pytest.mark.parametrize("cfg_scale", [0.0, 1.0])
def test_prefix_cache_decodes_llada_as_without_cache(engine, requests_mixed, cfg_scale):
    """With CFG the unconditional rows (prompt masked) run whole; the conditional ones too, as
    both halves are one batch."""
    prefix = engine.generate(requests_mixed, strategy="llada", cache="prefix", cfg_scale=cfg_scale)
    none = engine.generate(requests_mixed, strategy="llada", cache="none", cfg_scale=cfg_scale)
    assert outputs(prefix) == outputs(none)


@pytest.mark.parametrize("strategy", ["threshold", "llada"])
def test_block_cache_output_differs_only_slightly_on_a_random_model(
    full_model, tokenizer, requests_mixed, strategy
):
    engine = engine_of(full_model, tokenizer)
    requests = requests_mixed[:2] + requests_mixed[3:]
    block = engine.generate(requests, strategy=strategy, cache="block")
    none = engine.generate(requests, strategy=strategy, cache="none")
    agree = [
        sum(a == b for a, b in zip(x.output_ids, y.output_ids, strict=False)) / max(len(y.output_ids), 1)
        for x, y in zip(block, none, strict=True)
    ]
    assert sum(agree) / len(agree) > 0.6  # measured 0.8-0.9; no claim on quality
    if strategy == "llada":
        assert [r.nfe for r in block] == [SCHEDULE["steps"]] * len(requests)


def record_forwards(model) -> tuple[list[tuple[str, int, int]], object]:
    """A hook recording each forward as (kind, rows, tokens): `setup` (the prompt's cache),
    `whole` (a step over whole sequences or responses) or `block` (a block-cache step)."""
    calls: list[tuple[str, int, int]] = []

    def hook(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        if kwargs.get("block_cache") is not None:
            kind = "block"
        elif kwargs.get("logits_positions") is None:
            kind = "setup"
        else:
            kind = "whole"
        calls.append((kind, ids.shape[0], ids.shape[1]))

    return calls, model.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize(("strategy", "cfg_scale"), [("llada", 0.0), ("llada", 1.0), ("threshold", 0.0)])
def test_block_cache_counts_each_forward_once_per_row(engine, requests_mixed, strategy, cfg_scale):
    calls, handle = record_forwards(engine.model)
    try:
        results = engine.generate(requests_mixed, strategy=strategy, cache="block", cfg_scale=cfg_scale)
    finally:
        handle.remove()
    settings = engine.settings()
    steps = [(kind, rows) for kind, rows, _ in calls if kind != "setup"]
    # Every block starts with one forward over whole sequences (responses beside the prompt's
    # cache) and runs its other steps on the block alone.
    assert [kind for kind, _ in steps[:2]] == ["whole", "block"]
    assert all(length == settings.block_length for kind, _, length in calls if kind == "block")
    assert sum(kind == "whole" for kind, _ in steps) <= settings.num_blocks
    # NFE counts each forward once per row it includes (a CFG step includes a row twice).
    assert sum(rows for _, rows in steps) == sum(r.nfe for r in results)
    forwards_per_row = 2 if cfg_scale > 0 else 1
    if strategy == "llada":
        assert sum(kind == "whole" for kind, _ in steps) == settings.num_blocks
        assert [r.nfe for r in results] == [forwards_per_row * settings.steps] * len(requests_mixed)
    else:
        assert any(r.nfe < settings.steps for r in results)
