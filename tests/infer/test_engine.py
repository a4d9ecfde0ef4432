"""The generation engine: prefix cache, batch invariance, early stop, streaming, request errors."""

from dataclasses import replace

import pytest
import torch
from PIL import Image

from dimoe.config.loader import ConfigError
from dimoe.infer.engine import GenerationEngine, ModelLogits, partial_stop_length
from dimoe.infer.inputs import Request


def test_prefix_cache_gives_the_logits_of_the_full_sequence(engine, requests_mixed):
    settings = engine.settings()
    batch = engine.collate([engine.encode(i, r, settings) for i, r in enumerate(requests_mixed)])
    gen_length = 12
    cached = ModelLogits(engine.model, batch, gen_length, cache="prefix")
    uncached = ModelLogits(engine.model, batch, gen_length, cache="none")
    response = torch.randint(
        10, 200, (len(requests_mixed), gen_length), generator=torch.Generator().manual_seed(0)
    )
    response[:, ::3] = engine.model.config.mask_token_id
    tokens = torch.cat([batch.input_ids, response], dim=1)
    prompt_length = batch.input_ids.shape[1]
    for rows, window in (
        (torch.arange(4), slice(prompt_length, prompt_length + gen_length)),
        (torch.tensor([1, 2]), slice(prompt_length + 4, prompt_length + 8)),
        (torch.tensor([3]), slice(prompt_length + 8, prompt_length + 12)),
    ):
        with torch.no_grad():
            expected = uncached(tokens[rows], rows, window)
            got = cached(tokens[rows], rows, window)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def _outputs(results):
    return [(r.id, r.output_ids, r.nfe) for r in results]


def test_engine_outputs_are_identical_with_and_without_cache(engine, requests_mixed):
    with_cache = engine.generate(requests_mixed)
    without = engine.generate(requests_mixed, cache="none")
    assert _outputs(with_cache) == _outputs(without)
    assert any(r.nfe < engine.settings().steps for r in with_cache)  # parallel reveals happened


@pytest.mark.parametrize("cache", ["prefix", "block"])
@pytest.mark.parametrize("strategy", ["threshold", "llada"])
def test_outputs_do_not_depend_on_the_rest_of_the_batch(engine, requests_mixed, strategy, cache):
    together = engine.generate(requests_mixed, strategy=strategy, cache=cache, batch_size=4)
    alone = [engine.generate([r], strategy=strategy, cache=cache)[0] for r in requests_mixed]
    reordered = engine.generate(requests_mixed[::-1], strategy=strategy, cache=cache, batch_size=3)[::-1]
    assert _outputs(together) == _outputs(alone) == _outputs(reordered)


def test_results_hold_prompt_output_and_accounting(engine, tokenizer, requests_mixed):
    results = engine.generate(requests_mixed, strategy="llada")
    assert [r.id for r in results] == [r.id for r in requests_mixed]
    image = results[2]
    assert image.prompt_ids.count(engine.model.config.image_token_id) == engine.model.config.num_image_tokens
    for result in results:
        assert result.nfe == engine.settings().steps and result.latency_s > 0
        assert tokenizer.eos_token_id not in result.output_ids and len(result.output_ids) <= 32
        assert result.output == tokenizer.decode(result.output_ids, skip_special_tokens=True)


@pytest.fixture
def eos_biased(engine):
    """The engine's model with every position's logits pushed towards EOS."""
    eos = engine.model.config.eos_token_id

    def push_eos(module, inputs, output):
        output[..., eos] += 100.0
        return output

    handle = engine.model.lm_head.register_forward_hook(push_eos)
    yield engine
    handle.remove()


def test_early_stop_ends_with_eos_and_saves_forwards(eos_biased, requests_mixed):
    threshold = eos_biased.generate(requests_mixed, strategy="threshold")
    llada = eos_biased.generate(requests_mixed, strategy="llada")
    assert all(r.output_ids == [] and r.output == "" for r in threshold + llada)
    assert [r.nfe for r in threshold] == [1] * 4
    assert [r.nfe for r in llada] == [eos_biased.settings().steps] * 4


def test_stream_yields_committed_blocks_then_the_result(engine, requests_mixed):
    chunks = list(engine.generate_stream(requests_mixed[:2], strategy="llada"))
    final = engine.generate(requests_mixed[:2], strategy="llada")
    for index in range(2):
        own = [c for c in chunks if c.index == index]
        assert [c.block for c in own] == [0, 1] and [c.done for c in own] == [False, True]
        assert final[index].output.startswith(own[0].text) and own[-1].text == final[index].output
        assert _outputs([own[-1].result]) == _outputs([final[index]])


@pytest.mark.parametrize(
    ("text", "stops", "held"),
    [("The answer is", ("is 7",), 2), ("abc", ("bcd", "c"), 2), ("abc", ("x",), 0), ("ab", ("abcd",), 2)],
)
def test_partial_stop_length(text, stops, held):
    assert partial_stop_length(text, stops) == held


def test_stream_never_sends_the_start_of_a_stop_string_that_ends_in_a_later_block(engine):
    """A stop string across a block boundary: the first block's chunk holds its beginning back,
    so every streamed text is a prefix of the final, cut, text."""
    request = Request("x", prompt="There is a red circle")
    first_block, whole = [c.text for c in engine.generate_stream([request], strategy="llada")]
    assert whole.startswith(first_block) and len(whole) > len(first_block) > 0
    # The shortest stop string that straddles the boundary and occurs nowhere earlier (the random
    # model repeats itself).
    edge = len(first_block)
    stop, start = next(
        (whole[edge - before : edge + after], edge - before)
        for after in range(1, len(whole) - edge + 1)
        for before in range(1, edge + 1)
        if whole.index(whole[edge - before : edge + after]) == edge - before
    )
    chunks = list(engine.generate_stream([replace(request, stop=(stop,))], strategy="llada"))
    final = chunks[-1].result.output
    assert final == whole[:start] and chunks[-1].result.finish_reason == "stop"
    assert all(final.startswith(chunk.text) for chunk in chunks)


def test_prompt_longer_than_the_context_is_a_clear_error(engine):
    long = Request("too-long", prompt="There is a red circle at the left of the image. " * 80)
    with pytest.raises(
        ValueError,
        match=r"request 'too-long': prompt of \d+ tokens \+ gen_length 32 = \d+ tokens "
        r"exceeds the model's context of 512",
    ):
        engine.generate([Request("fine", prompt="Hi"), long])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "turbo"}, r"unknown preset 'turbo' \(valid: fast\)"),
        ({"strategy": "greedy"}, r"unknown strategy 'greedy' \(valid: threshold, llada\)"),
        ({"steps": 7}, r"steps=7 must be a multiple of the number of blocks"),
        ({"remasking": "random"}, r"threshold strategy .* needs remasking=low_confidence"),
        ({"cache": "disk"}, r"unknown cache 'disk' \(valid: none, prefix, block\)"),
    ],
)
def test_bad_settings_are_one_clear_error(engine, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        engine.generate([Request("a", prompt="Hi")], **kwargs)


def test_bad_requests_name_the_request(engine, full_model, tokenizer):
    with pytest.raises(ValueError, match=r"request 'x': give exactly one of `prompt` and `messages`"):
        engine.generate([Request("x")])
    with pytest.raises(ValueError, match=r"request 'bad-image': not a readable"):
        engine.generate([Request("bad-image", prompt="Hi", image=b"not an image")])
    with pytest.raises(ValueError, match=r"request 'roles': .*must end with a user turn"):
        engine.generate(
            [
                Request(
                    "roles",
                    messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                )
            ]
        )
    text_only = GenerationEngine(full_model, tokenizer, engine.config)
    with pytest.raises(ValueError, match=r"request 'img': .*no vision tower"):
        text_only.generate([Request("img", prompt="Hi", image=Image.new("RGB", (8, 8)))])
