"""Block diffusion (LLaDA2.0, BD3-LM's construction): the mask of the noisy + clean layout against
a hand-written one, the one-forward loss against a per-block reference, the WSD block schedule."""

import pytest
import torch

from dimoe.config.train import TrainConfig
from dimoe.data.chat import Message, encode_chat
from dimoe.diffusion import masked_diffusion_loss, single_view
from dimoe.model.build import build_model
from dimoe.train.batch import collate
from dimoe.train.objective import _forward_views, block_layout
from dimoe.train.schedule import block_size_at, final_block_size


def test_block_layout_mask_is_the_bd3lm_mask():
    """2 prompt tokens, a response of 4 in blocks of 2: P P N0 N0 N1 N1 C0 C0 C1 C1."""
    ids = torch.arange(6)[None]
    real, prefix = torch.ones(1, 6, dtype=torch.bool), torch.tensor([[1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    _, _, positions, mask = block_layout(ids, ids[:, 2:], real, prefix, block_size=2)
    P, N0, N1, C0, C1 = [0, 1], [2, 3], [4, 5], [6, 7], [8, 9]
    sees = {"P": P, "N0": P + N0, "N1": P + N1 + C0, "C0": P + C0, "C1": P + C0 + C1}
    expected = torch.zeros(10, 10, dtype=torch.bool)
    for rows, name in ((P, "P"), (N0, "N0"), (N1, "N1"), (C0, "C0"), (C1, "C1")):
        for row in rows:
            expected[row, sees[name]] = True
    assert torch.equal(mask[0, 0], expected)
    assert positions[0].tolist() == [0, 1, 2, 3, 4, 5, 2, 3, 4, 5]  # the clean copy shares positions


@pytest.fixture
def block_model(tiny_spec, tokenizer):
    spec = tiny_spec.model_copy(update={"attention": "block", "block_size": 4, "vision": None})
    return build_model(spec, tokenizer, seed=0).eval()


def text_batch(tokenizer, response_length: int = 12):
    questions = ["Name colour number 1.", "Count the red squares please."]
    encoded = [
        encode_chat(tokenizer, [Message("user", q), Message("assistant", "red green")]) for q in questions
    ]
    rows = {"input_ids": [e.input_ids for e in encoded], "prompt_length": [e.prompt_length for e in encoded]}
    return collate(rows, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                   image_id=tokenizer.convert_tokens_to_ids("<image>"), response_length=response_length,
                   processor=None)  # fmt: skip


def test_one_forward_block_diffusion_equals_denoising_each_block_given_the_clean_earlier_ones(
    block_model, tokenizer
):
    batch = text_batch(tokenizer)
    generator = torch.Generator().manual_seed(0)
    mask_id = block_model.config.mask_token_id
    noised = single_view(batch.input_ids, batch.response_mask, torch.tensor([0.5, 0.7]), mask_id, generator)
    with torch.no_grad():
        logits = _forward_views(block_model, batch, noised, None, block_size=4).logits
    length, response = batch.input_ids.shape[1], 12
    reference = torch.empty_like(logits)
    reference[:, : length - response] = logits[:, : length - response]  # prompt logits are not scored
    for block in range(3):
        start = length - response + 4 * block
        ids = noised.noisy_ids.clone()
        ids[:, length - response : start] = batch.input_ids[
            :, length - response : start
        ]  # clean earlier blocks
        with torch.no_grad():  # the model's own `block` mask on one sequence
            out = block_model(ids, batch.attention_mask.long(), prefix_mask=batch.prefix_mask).logits
        reference[:, start : start + 4] = out[:, start : start + 4]
        torch.testing.assert_close(
            logits[:, start : start + 4], out[:, start : start + 4], rtol=1e-5, atol=1e-5
        )
    args = (batch.input_ids, noised.masked, noised.p)
    one, per_block = masked_diffusion_loss(logits, *args), masked_diffusion_loss(reference, *args)
    torch.testing.assert_close(one.value, per_block.value)
    # without the clean copy (plain masked diffusion over the response) the logits differ
    with torch.no_grad():
        plain = _forward_views(block_model, batch, noised, None, block_size=None).logits
    assert not torch.allclose(plain[:, -8:], logits[:, -8:], atol=1e-3)


def test_wsd_block_schedule_warms_up_holds_full_sequence_then_decays():
    cfg = TrainConfig(stage="s", max_steps=100, diffusion={"block_schedule": {}})
    sizes = [block_size_at(step, cfg) for step in range(100)]
    assert sizes[:30] == [32] * 8 + [64] * 7 + [128] * 8 + [256] * 7
    assert sizes[30:80] == [None] * 50  # stable: the whole response
    assert sizes[80:] == [256] * 5 + [128] * 5 + [64] * 5 + [32] * 5
    assert final_block_size(cfg) == 32
    assert block_size_at(7, TrainConfig(stage="s", diffusion={"block_size": 16})) == 16
    with pytest.raises(ValueError, match="sum to 1"):
        TrainConfig(stage="s", diffusion={"block_schedule": {"phase_ratios": [0.5, 0.5, 0.5]}})
    with pytest.raises(ValueError, match="decay phase needs a share"):
        TrainConfig(stage="s", diffusion={"block_schedule": {"phase_ratios": [0.5, 0.5, 0.0]}})


def test_full_sequence_steps_of_a_block_model_use_the_prefix_mask(block_model, tokenizer):
    """The stable phase of WSD (no block size) on a `block` model is masked diffusion over the whole
    response: the logits of the same weights under the `prefix` mask, not of its own blocks."""
    from dimoe.train.schedule import WHOLE_RESPONSE, model_block_size

    batch = text_batch(tokenizer)
    mask_id = block_model.config.mask_token_id
    noised = single_view(batch.input_ids, batch.response_mask, torch.tensor([0.5, 0.7]), mask_id,
                         torch.Generator().manual_seed(0))  # fmt: skip
    assert model_block_size(None, "block") == WHOLE_RESPONSE and model_block_size(None, "prefix") is None
    with torch.no_grad():
        whole = _forward_views(block_model, batch, noised, None, block_size=WHOLE_RESPONSE).logits
        own_blocks = _forward_views(block_model, batch, noised, None, block_size=None).logits
        block_model.config.attention = "prefix"
        try:
            prefix = _forward_views(block_model, batch, noised, None, block_size=None).logits
        finally:
            block_model.config.attention = "block"
    torch.testing.assert_close(whole, prefix)
    assert not torch.allclose(own_blocks[:, -8:], prefix[:, -8:], atol=1e-3)


def test_a_dense_model_trains_without_router_terms(tiny_spec, tokenizer):
    from dimoe.train.objective import ar_training_step, training_step

    spec = tiny_spec.model_copy(
        update={"vision": None, "dense_layers": [0, 1, 2, 3], "dense_intermediate_size": 64}
    )
    model = build_model(spec, tokenizer, seed=0).train()
    batch = text_batch(tokenizer)
    cfg = TrainConfig(stage="s")
    generator = torch.Generator().manual_seed(0)
    mask_id = model.config.mask_token_id
    out = training_step(
        model, cfg, batch, generator, None, mask_token_id=mask_id, encode_images=model.encode_images
    )
    out.loss.backward()
    assert out.metrics["loss_bal"] == out.metrics["loss_z"] == 0.0 and out.metrics["loss"] > 0
    ar = ar_training_step(model, cfg, batch, encode_images=model.encode_images)
    assert ar.metrics["loss_ar"] > 0 and ar.metrics["loss_bal"] == 0.0
