"""The training objective on a real tiny model and real collated rows (no Ray needed)."""

import io

import pytest
import torch
from PIL import Image

from dimoe.config.train import TrainConfig
from dimoe.diffusion import RouterPriorEMA, per_row_diffusion_loss
from dimoe.model.processor import ImageProcessor
from dimoe.train.batch import collate
from dimoe.train.objective import estimate_proposal, make_views, training_step


def png(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def rows(tiny_model):
    c = tiny_model.config
    img = [c.image_token_id] * c.num_image_tokens
    return {
        "input_ids": [
            [5] + img + [20, 21, 6, 30, 31, 1],
            [5, 22, 23, 24, 6, 40, 1],
            [5] + img + [25, 6, 50, 1],
        ],
        "prompt_length": [1 + len(img) + 3, 5, 1 + len(img) + 2],
        "image": [png("red"), None, png("blue")],
    }


def make_batch(tiny_model, rows, response_length=8):
    c = tiny_model.config
    return collate(
        rows,
        pad_id=c.pad_token_id,
        eos_id=c.eos_token_id,
        image_id=c.image_token_id,
        response_length=response_length,
        processor=ImageProcessor(c.image_size),
    )


def test_collate_left_pads_and_eos_fills_the_response(tiny_model, rows):
    batch = make_batch(tiny_model, rows)
    eos = tiny_model.config.eos_token_id
    width = max(rows["prompt_length"])
    assert batch.input_ids.shape == (3, width + 8)  # longest prompt + response_length
    assert batch.pixel_values.shape == (2, 3, 32, 32)  # only rows with images
    assert batch.response_mask.sum(1).tolist() == [8, 8, 8]
    assert batch.input_ids[1, -8:].tolist() == [40, 1] + [eos] * 6
    # Row 1 (5 prompt + 8 response tokens) is left-padded to the width.
    assert not batch.attention_mask[1, : width - 5].any() and batch.attention_mask[1, width - 5 :].all()
    assert (batch.prompt_text_mask & batch.image_mask).sum() == 0


def test_a_long_answer_does_not_pad_its_batch_mates_answers(tiny_model, rows):
    """EOS padding is per row: a 12-token answer beside 1-token answers widens the batch, but
    the short rows keep exactly `response_length` supervised tokens, so their answer's share of
    the per-answer-length loss does not shrink with their batch mates."""
    long_rows = {k: list(v) for k, v in rows.items()}
    long_rows["input_ids"][0] = long_rows["input_ids"][0][: long_rows["prompt_length"][0]] + [30] * 11 + [1]
    batch = make_batch(tiny_model, long_rows, response_length=4)
    eos, pad = tiny_model.config.eos_token_id, tiny_model.config.pad_token_id
    width = max(rows["prompt_length"])
    assert batch.input_ids.shape == (3, width + 12)
    assert batch.response_mask.sum(1).tolist() == [12, 4, 4]
    # Every response starts at the same column; a short row's columns after its window are padding.
    assert batch.input_ids[1, width:].tolist() == [40, 1, eos, eos] + [pad] * 8
    end = width + 4
    assert not batch.attention_mask[1, end:].any() and batch.attention_mask[1, width - 5 : end].all()
    assert batch.modality[2, end:].tolist() == [-1] * 8


@pytest.mark.parametrize("views", ["complementary", "independent", "mirror", "single"])
def test_every_stage_objective_is_finite_and_backpropagates(tiny_model, rows, views):
    cfg = TrainConfig(
        stage="t",
        diffusion={"views": views},
        losses={"lambda_prior": 0.1, "lambda_cons": 0.1 if views != "single" else 0, "lambda_cap": 0.1},
    )
    batch = make_batch(tiny_model, rows)
    prior = RouterPriorEMA(tiny_model.config.num_hidden_layers, tiny_model.config.num_experts)
    out = training_step(
        tiny_model.train(),
        cfg,
        batch,
        torch.Generator().manual_seed(0),
        prior,
        mask_token_id=tiny_model.config.mask_token_id,
        encode_images=tiny_model.encode_images,
        collect_routing=True,
    )
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert tiny_model.vision.projector[0].weight.grad.abs().sum() > 0
    assert tiny_model.layers[0].mlp.gate.weight.grad.abs().sum() > 0
    layers = tiny_model.config.num_hidden_layers
    assert len(out.routing["expert_load"]) == layers and len(out.routing["expert_load"][0]) == 4
    if views == "complementary":
        assert out.metrics["zero_supervision_samples"] == 0  # every answer token supervised once per pair
        assert out.routing["topk_overlap"] is not None and "loss_cons" in out.metrics


def test_vision_tower_runs_once_per_pair(tiny_model, rows):
    calls = []

    def encode(pixels):
        calls.append(pixels.shape[0])
        return tiny_model.encode_images(pixels)

    cfg = TrainConfig(stage="t", diffusion={"views": "complementary"})
    training_step(
        tiny_model,
        cfg,
        make_batch(tiny_model, rows),
        torch.Generator().manual_seed(0),
        None,
        mask_token_id=tiny_model.config.mask_token_id,
        encode_images=encode,
    )
    assert calls == [2]  # two images, one tower call, shared by both views


def test_naive_balance_is_global(tiny_model, rows):
    cfg = TrainConfig(stage="t", diffusion={"views": "single"}, losses={"stratified_balance": False})
    out = training_step(
        tiny_model,
        cfg,
        make_batch(tiny_model, rows),
        torch.Generator().manual_seed(0),
        None,
        mask_token_id=tiny_model.config.mask_token_id,
        encode_images=tiny_model.encode_images,
    )
    assert out.metrics["loss_bal"] >= 1.0 - 1e-3  # Switch loss is ≥ 1 (= 1 at perfect balance) up to noise


def test_schedule_spans_optimizer_steps_when_accumulating():
    """DeepSpeed steps the scheduler once per `grad_accum` micro-batches: with max_steps=100 and
    grad_accum=2 the cosine must reach its floor at optimizer step 50, not stop half-way."""
    from dimoe.train.schedule import lr_multiplier

    cfg = TrainConfig(
        stage="s",
        max_steps=100,
        grad_accum=2,
        schedule={"kind": "cosine", "warmup_steps": 0, "min_lr_ratio": 0.1},
    )
    assert lr_multiplier(0, cfg) == pytest.approx(1.0)
    assert lr_multiplier(25, cfg) == pytest.approx(0.55)  # half-way through 50 optimizer steps
    assert lr_multiplier(50, cfg) == pytest.approx(0.1)


def test_length_grouping_serves_every_row_once_in_batches_of_similar_length():
    import numpy as np

    from dimoe.train.batch import length_grouped

    rng = np.random.default_rng(0)
    lengths = rng.permutation([5] * 24 + [60] * 8)  # VQA-like rows with a quarter of descriptions
    group = {
        "input_ids": np.array([np.arange(n) for n in lengths], dtype=object),
        "row": np.arange(len(lengths)),
    }
    batches = list(length_grouped([group], 8, np.random.default_rng(1), bucket=32))
    assert [len(b["row"]) for b in batches] == [8, 8, 8, 8]
    assert sorted(np.concatenate([b["row"] for b in batches]).tolist()) == list(range(32))
    widths = sorted(max(len(ids) for ids in b["input_ids"]) for b in batches)
    assert widths == [5, 5, 5, 60]  # ungrouped, nearly every batch of 8 would hold a 60-token row
    reordered = length_grouped([group], 8, np.random.default_rng(2), bucket=32)
    assert [b["row"][0] for b in batches] != [b["row"][0] for b in reordered]  # batch order is shuffled


def test_ranks_with_a_shared_order_take_batches_of_the_same_length_band_at_each_step():
    """Data-parallel ranks wait for each other at every all-reduce: the k-th batch of each rank
    must be as wide as the others' k-th, though the ranks hold different rows."""
    import numpy as np

    from dimoe.train.batch import length_grouped

    def shard(seed: int) -> dict[str, np.ndarray]:
        lengths = np.random.default_rng(seed).permutation([5] * 24 + [60] * 8)
        return {"input_ids": np.array([np.arange(n) for n in lengths], dtype=object)}

    def widths(rank: int, order_seed: int) -> list[int]:
        rows, order = np.random.default_rng([rank]), np.random.default_rng([order_seed])
        batches = length_grouped([shard(rank)], 8, rows, bucket=32, order_rng=order)
        return [max(len(ids) for ids in b["input_ids"]) for b in batches]

    assert widths(0, order_seed=7) == widths(1, order_seed=7)
    assert 60 in widths(0, order_seed=7)
    # each rank ordering its batches on its own (the old per-rank seed) puts them out of step
    assert any(widths(0, order_seed=s) != widths(1, order_seed=s + 1) for s in range(4))


def test_length_grouping_mixes_row_kinds_of_nearly_equal_length():
    """The demo's four VQA question types are 26, 27, 28 and 30 tokens long: sorted by exact length,
    every batch held one type, and the tiny model stayed at the per-type majority answer."""
    import numpy as np

    from dimoe.train.batch import length_grouped

    kinds = np.random.default_rng(0).permutation(np.repeat(np.arange(4), 8))
    group = {
        "input_ids": np.array([np.arange(n) for n in np.array([26, 27, 28, 30])[kinds]], dtype=object),
        "kind": kinds,
    }

    def kinds_per_batch(bucket: int) -> list[int]:
        batches = length_grouped([group], 8, np.random.default_rng(1), bucket=bucket)
        return [len(set(b["kind"].tolist())) for b in batches]

    assert kinds_per_batch(bucket=1) == [1, 1, 1, 1]  # exact length: one kind per batch
    assert min(kinds_per_batch(bucket=32)) >= 2  # one 32-token band: the kinds share batches


def test_a_text_only_batch_still_reaches_the_vision_parameters_with_zero_gradient(tiny_model, rows):
    """Data-parallel ranks reduce gradients in lockstep: a rank whose batch has no image must still
    give the vision tower a gradient (zero), or ZeRO's bucket sizes differ between ranks."""
    text_only = {k: [v[1]] * 2 for k, v in rows.items()}
    batch = make_batch(tiny_model, text_only)
    assert batch.pixel_values.numel() == 0
    cfg = TrainConfig(stage="t", diffusion={"views": "complementary"})
    size = tiny_model.config.image_size
    grads = {}
    for blank in (None, torch.zeros(1, 3, size, size)):
        tiny_model.zero_grad(set_to_none=True)
        out = training_step(
            tiny_model.train(), cfg, batch, torch.Generator().manual_seed(0), None,
            mask_token_id=tiny_model.config.mask_token_id, encode_images=tiny_model.encode_images,
            blank_image=blank,
        )  # fmt: skip
        out.loss.backward()
        grads[blank is not None] = (out.loss.item(), tiny_model.vision.projector[0].weight.grad)
    assert grads[False][1] is None
    assert grads[True][1] is not None and grads[True][1].abs().sum() == 0
    assert grads[True][0] == grads[False][0]  # the blank image adds nothing to the loss


def test_eos_padding_weight_scales_only_the_padding_after_each_answer(tiny_model, rows):
    """`eos_padding_weight` marks the EOS tokens after an answer's own EOS; at 0 their predictions
    get no gradient while the answer and its own EOS keep theirs, and at 1 the loss is LLaDA's."""
    batch = make_batch(tiny_model, rows)
    assert batch.eos_padding_mask.sum(1).tolist() == [5, 6, 6]  # 8 minus the answer with its EOS
    assert not (batch.eos_padding_mask & ~batch.response_mask).any()
    model = tiny_model.train()
    results = {}
    logits: list[torch.Tensor] = []

    def keep_logits(_module, _inputs, out):
        out.retain_grad()
        logits.append(out)

    for weight in (1.0, 0.0):
        all_masked = {"kind": "band", "t_min": 0.99}
        cfg = TrainConfig(
            stage="t",
            diffusion={"views": "single", "timesteps": all_masked, "eos_padding_weight": weight},
            losses={"lambda_bal": 0, "lambda_z": 0},
        )
        logits.clear()
        hook = model.lm_head.register_forward_hook(keep_logits)
        model.zero_grad(set_to_none=True)
        out = training_step(
            model, cfg, batch, torch.Generator().manual_seed(0), None,
            mask_token_id=tiny_model.config.mask_token_id, encode_images=tiny_model.encode_images,
        )  # fmt: skip
        out.loss.backward()
        hook.remove()
        results[weight] = (out.loss.item(), logits[0].grad.abs().sum(-1))
    grad = results[0.0][1]
    assert (grad[batch.eos_padding_mask] == 0).all()
    answer = batch.response_mask & ~batch.eos_padding_mask
    assert (grad[answer] > 0).all()
    assert (results[1.0][1][batch.eos_padding_mask] > 0).all()
    assert results[0.0][0] != pytest.approx(results[1.0][0])


def test_collate_resizes_image_runs_to_the_models_count(tiny_model, rows):
    """Rows normalized for 4 image tokens, a tower trained at a resolution that needs 9: each
    image row gets 9 image tokens, its prompt 5 more tokens, and nothing else changes."""
    c = tiny_model.config
    batch = collate(rows, pad_id=c.pad_token_id, eos_id=c.eos_token_id, image_id=c.image_token_id,
                    response_length=8, processor=ImageProcessor(c.image_size), image_tokens=9)  # fmt: skip
    assert batch.image_mask.sum(1).tolist() == [9, 0, 9]
    assert batch.prefix_mask.sum(1).tolist() == [
        p + 5 if i != 1 else p for i, p in enumerate(rows["prompt_length"])
    ]
    before = make_batch(tiny_model, rows)
    assert torch.equal(batch.input_ids[:, -8:], before.input_ids[:, -8:])  # the responses
    text = [ids[mask].tolist() for ids, mask in zip(batch.input_ids, batch.prompt_text_mask, strict=True)]
    assert text == [
        ids[mask].tolist() for ids, mask in zip(before.input_ids, before.prompt_text_mask, strict=True)
    ]


def test_vision_image_size_trains_init_from_at_another_resolution(checkpoint):
    from dimoe.train.loop import load_initial_model

    cfg = TrainConfig(stage="stage2_full", init_from=str(checkpoint), vision_image_size=64)
    model, _ = load_initial_model(cfg)
    assert model.training and model.config.vision_config["image_size"] == 64
    assert model.config.num_image_tokens == 16  # 8×8 patches of 8 px, pooled 2×2


def test_ppots_on_a_fixed_model_matches_uniform_t_in_expectation_with_less_variance(tiny_model, rows):
    """The proposal estimated from the model's own per-row losses; the importance-weighted loss
    of t ~ q then estimates the uniform-t loss of the same (frozen) model."""
    cfg = TrainConfig(stage="t", diffusion={"views": "single", "timesteps": {"kind": "ppots"}})
    batch, generator = make_batch(tiny_model, rows), torch.Generator().manual_seed(0)
    model, mask_id = tiny_model.eval(), tiny_model.config.mask_token_id
    proposal, estimate = estimate_proposal(
        model, cfg, batch, generator, mask_token_id=mask_id, encode_images=tiny_model.encode_images
    )
    assert len(estimate["t"]) == cfg.diffusion.timesteps.ppots.grid_size and proposal.clamped_fraction() == 0
    many = batch.repeat(200)
    features = tiny_model.encode_images(many.pixel_values)

    @torch.no_grad()
    def losses(t: torch.Tensor) -> torch.Tensor:
        noised = make_views(cfg, many, mask_id, generator, t=t)
        out = model(many.input_ids, many.attention_mask.long(), prefix_mask=many.prefix_mask,
                    image_features=features)  # fmt: skip
        return per_row_diffusion_loss(
            out.logits, many.input_ids, noised.masked, noised.p, noised.answer_lengths
        )

    rows_n = many.input_ids.shape[0]
    plain = torch.cat([losses(torch.rand(rows_n, generator=generator)) for _ in range(3)]).double()
    draws = [proposal.sample(rows_n, generator) for _ in range(3)]
    weighted = torch.cat([proposal.weights(t) * losses(t) for t in draws]).double()
    standard_error = (plain.var() / len(plain) + weighted.var() / len(weighted)).sqrt()
    # The variance claim needs a non-flat m(t), which a random model does not have: see
    # tests/diffusion/test_ppots_mirror.py.
    assert abs(plain.mean() - weighted.mean()) < 4 * standard_error


def test_ppots_training_step_weights_rows_by_the_proposal(tiny_model, rows):
    cfg = TrainConfig(stage="t", diffusion={"views": "mirror", "timesteps": {"kind": "ppots"}})
    batch = make_batch(tiny_model, rows)
    kwargs = {"mask_token_id": tiny_model.config.mask_token_id, "encode_images": tiny_model.encode_images}
    prior = RouterPriorEMA(tiny_model.config.num_hidden_layers, tiny_model.config.num_experts)
    with pytest.raises(ValueError, match="needs the fitted proposal"):
        training_step(tiny_model, cfg, batch, torch.Generator().manual_seed(0), prior, **kwargs)
    proposal, _ = estimate_proposal(tiny_model, cfg, batch, torch.Generator().manual_seed(0), **kwargs)
    out = training_step(
        tiny_model.train(), cfg, batch, torch.Generator().manual_seed(1), prior, proposal=proposal, **kwargs
    )
    assert torch.isfinite(out.loss)
    out.loss.backward()


def test_heldout_loss_scores_every_recipe_by_one_rule(tiny_model, rows):
    """Ablation variants differ in prompt ratio, loss weighting and EOS padding weight; their
    held-out losses must score the same tokens the same way, so equal weights give equal values."""
    from dimoe.train.objective import heldout_loss

    batch = make_batch(tiny_model, rows)
    recipes = [
        TrainConfig(stage="s"),
        TrainConfig(stage="s", diffusion={"include_prompt_ratio": 0.2, "loss_weight": "uniform",
                                          "loss_norm": "token", "eos_padding_weight": 0.3}),
    ]  # fmt: skip
    args = {"mask_token_id": tiny_model.config.mask_token_id, "encode_images": tiny_model.encode_images}
    losses = [heldout_loss(tiny_model, cfg, batch, **args) for cfg in recipes]
    assert losses[0] == losses[1] > 0
    # the training loss of the second recipe does differ: the rule is the held-out loss's own
    generator = torch.Generator().manual_seed(0)
    t = torch.full((batch.input_ids.shape[0],), 0.5)
    views = [
        make_views(cfg, batch, tiny_model.config.mask_token_id, generator, t=t, views="single")
        for cfg in recipes
    ]
    assert not torch.equal(views[0].masked, views[1].masked)
