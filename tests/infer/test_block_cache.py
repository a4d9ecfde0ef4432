"""A `block`-attention model decodes with its committed blocks' keys/values cached exactly: the
same tokens and NFE as decoding without any cache, for both strategies."""

import pytest
import torch

from dimoe.config.infer import DecodeSettings
from dimoe.data.chat import Message, encode_chat
from dimoe.infer.engine import PromptBatch, generate
from dimoe.model.build import build_model


@pytest.fixture(scope="module")
def block_model(tiny_spec, tokenizer):
    spec = tiny_spec.model_copy(update={"attention": "block", "block_size": 4, "vision": None})
    return build_model(spec, tokenizer, seed=3).eval()


def prompts(tokenizer) -> PromptBatch:
    texts = ["Name colour number 1.", "What is two plus two, in words?"]
    encoded = [
        encode_chat(tokenizer, [Message("user", t)], add_generation_prompt=True).input_ids for t in texts
    ]
    width = max(map(len, encoded))
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded])
    return PromptBatch(
        ids, (torch.arange(width) >= width - torch.tensor([len(e) for e in encoded])[:, None]).long()
    )


@pytest.mark.parametrize("strategy", ["llada", "threshold"])
def test_exact_block_cache_decodes_as_without_cache(block_model, tokenizer, strategy):
    lengths = []
    hook = block_model.embed_tokens.register_forward_pre_hook(
        lambda _m, args: lengths.append(args[0].shape[1])
    )
    results = {}
    for cache in ("none", "prefix"):
        lengths.clear()
        settings = DecodeSettings(
            strategy=strategy, steps=12, gen_length=12, block_length=12, threshold=0.3, cache=cache
        )  # block_length becomes the model's 4
        results[cache] = (generate(block_model, prompts(tokenizer), settings), list(lengths))
    hook.remove()
    (plain, plain_lengths), (cached, cached_lengths) = results["none"], results["prefix"]
    assert torch.equal(plain.output_ids, cached.output_ids) and torch.equal(plain.nfe, cached.nfe)
    width = prompts(tokenizer).input_ids.shape[1]
    assert set(plain_lengths) == {width + 12}  # every uncached forward runs prompt + response
    assert set(cached_lengths) == {width, 4}  # the prompt once, then one block at a time


def test_compare_styles_prints_both_styles_of_one_checkpoint(block_model, tokenizer, tmp_path):
    import json

    from typer.testing import CliRunner

    from dimoe.cli import app
    from dimoe.model.build import save_checkpoint

    save_checkpoint(block_model, tokenizer, tmp_path / "ckpt")
    result = CliRunner().invoke(
        app, ["infer", "compare-styles", "--checkpoint", str(tmp_path / "ckpt"), "--prompt", "Name colour 1.",
              "--prompt", "Count the squares.", "--gen-length", "16", "--block-length", "4"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{") :])
    one, two = report["llada-1.0"], report["llada-2.0"]
    assert report["attention"] == "block" and len(one["outputs"]) == len(two["outputs"]) == 2
    assert one["mean_nfe"] == 16  # one token per step
    assert 4 <= two["mean_nfe"] <= 16 and two["tokens_per_forward"] >= one["tokens_per_forward"]


def test_exact_block_cache_serves_rows_that_leave_a_block_early_and_come_back(block_model, tokenizer):
    """Threshold decoding drops a row whose block is done and brings it back at the next block:
    every call must match the uncached logits of its own rows."""
    from dimoe.infer.engine import ModelLogits

    batch = prompts(tokenizer)
    width, mask = batch.input_ids.shape[1], block_model.config.mask_token_id
    tokens = torch.full((2, width + 12), mask)
    tokens[:, :width] = batch.input_ids
    tokens[:, width : width + 4] = torch.randint(10, 300, (2, 4), generator=torch.Generator().manual_seed(0))
    cached, plain = ModelLogits(block_model, batch, 12, "prefix"), ModelLogits(block_model, batch, 12, "none")
    both, second = torch.tensor([0, 1]), torch.tensor([1])
    calls = [(both, slice(width, width + 4)), (second, slice(width, width + 4)),
             (both, slice(width + 4, width + 8)), (second, slice(width + 8, width + 12))]  # fmt: skip
    with torch.no_grad():
        for rows, window in calls:
            torch.testing.assert_close(cached(tokens[rows], rows, window), plain(tokens[rows], rows, window))
