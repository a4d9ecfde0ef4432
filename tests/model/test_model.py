"""Masks, padding, images, HF save/load and parameter accounting of the whole model."""

import pytest
import torch
from transformers import AutoModel

from dimoe.config.loader import load_config
from dimoe.config.model import ModelConfig
from dimoe.model.build import build_model, load_checkpoint, save_checkpoint
from dimoe.model.config import hf_config_from_spec
from dimoe.model.modeling import DiMoEVLModel
from dimoe.model.params import count_parameters

PREFIX = 24  # a BOS, the image tokens, then prompt tokens


def image_slots(model) -> slice:
    return slice(1, 1 + model.config.num_image_tokens)


def batch(model, response_seed: int = 0, length: int = 40):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 300, (2, length), generator=g)
    ids[:, image_slots(model)] = model.config.image_token_id
    ids[:, PREFIX:] = torch.randint(
        10, 300, (2, length - PREFIX), generator=torch.Generator().manual_seed(response_seed)
    )
    prefix_mask = (torch.arange(length) < PREFIX)[None].expand(2, -1)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    return ids, prefix_mask, pixels


def logits(model, ids, prefix_mask, pixels, attention_mask=None):
    with torch.no_grad():
        return model(ids, attention_mask, pixels, prefix_mask=prefix_mask).logits


def test_prefix_mask_isolates_prefix_from_response(tiny_model):
    a = logits(tiny_model, *batch(tiny_model, response_seed=1))
    b = logits(tiny_model, *batch(tiny_model, response_seed=2))
    torch.testing.assert_close(a[:, :PREFIX], b[:, :PREFIX], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, PREFIX:], b[:, PREFIX:])


def test_full_mask_lets_response_change_prefix(tiny_model):
    tiny_model.config.attention = "full"
    a = logits(tiny_model, *batch(tiny_model, response_seed=1))
    b = logits(tiny_model, *batch(tiny_model, response_seed=2))
    assert (a[:, :PREFIX] - b[:, :PREFIX]).abs().max() > 1e-4


@pytest.mark.parametrize("attention", ["full", "prefix"])
def test_padding_never_affects_real_positions(tiny_model, attention):
    tiny_model.config.attention = attention
    ids, prefix_mask, pixels = batch(tiny_model)
    pad = tiny_model.config.pad_token_id
    ref = logits(tiny_model, ids, prefix_mask, pixels)
    for pad_token in (pad, 123):  # what is in the padded slots must not matter
        padded = torch.cat([torch.full((2, 5), pad_token), ids], dim=1)
        mask = torch.cat([torch.zeros(2, 5, dtype=torch.long), torch.ones_like(ids)], dim=1)
        pmask = torch.cat([torch.zeros(2, 5, dtype=torch.bool), prefix_mask], dim=1)
        out = logits(tiny_model, padded, pmask, pixels, attention_mask=mask)
        torch.testing.assert_close(out[:, 5:], ref, atol=1e-5, rtol=1e-5)


def test_image_features_reach_image_and_text_positions(tiny_model):
    ids, prefix_mask, pixels = batch(tiny_model)
    a = logits(tiny_model, ids, prefix_mask, pixels)
    b = logits(tiny_model, ids, prefix_mask, pixels + 1.0)
    assert (a[:, PREFIX:] - b[:, PREFIX:]).abs().max() > 1e-4
    # Images for only the rows that hold image tokens are accepted, in batch order.
    only_row1 = ids.clone()
    only_row1[0, image_slots(tiny_model)] = 50
    both = logits(tiny_model, only_row1, prefix_mask, pixels)
    one = logits(tiny_model, only_row1, prefix_mask, pixels[1:])
    torch.testing.assert_close(both, one)


def test_wrong_image_token_count_is_a_clear_error(tiny_model):
    ids, prefix_mask, pixels = batch(tiny_model)
    ids[0, 1] = 50
    with pytest.raises(ValueError, match=f"exactly {tiny_model.config.num_image_tokens} image tokens"):
        logits(tiny_model, ids, prefix_mask, pixels)
    ids2, *_ = batch(tiny_model)
    with pytest.raises(ValueError, match="neither pixel_values nor image_features"):
        logits(tiny_model, ids2, prefix_mask, None)


def test_prefix_cache_matches_full_forward(tiny_model):
    ids, prefix_mask, pixels = batch(tiny_model)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in row 0
    ref = logits(tiny_model, ids, prefix_mask, pixels, attention_mask=mask)
    with torch.no_grad():
        cache = tiny_model(ids[:, :PREFIX], mask[:, :PREFIX], pixels, return_prefix_cache=True).prefix_cache
        out = tiny_model(ids[:, PREFIX:], mask[:, PREFIX:], prefix_cache=cache).logits
    torch.testing.assert_close(out, ref[:, PREFIX:], atol=1e-5, rtol=1e-5)


def test_save_and_automodel_load_give_identical_logits(tiny_model, tokenizer, tmp_path):
    ids, prefix_mask, pixels = batch(tiny_model)
    save_checkpoint(tiny_model, tokenizer, tmp_path / "ckpt")
    loaded = AutoModel.from_pretrained(tmp_path / "ckpt")
    assert isinstance(loaded, DiMoEVLModel)
    out = loaded(ids, pixel_values=pixels, prefix_mask=prefix_mask)
    assert torch.equal(out.logits, logits(tiny_model, ids, prefix_mask, pixels))
    model, tok = load_checkpoint(tmp_path / "ckpt")
    assert tok.mask_token == tokenizer.mask_token and len(tok) == len(tokenizer)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope")


def test_paper_preset_parameter_counts():
    spec = load_config("configs/model/llada_moe_7b_siglip.yaml", ModelConfig)
    ids = {"pad_token_id": 0, "eos_token_id": 1, "mask_token_id": 2, "image_token_id": 3}
    with torch.device("meta"):
        model = DiMoEVLModel(hf_config_from_spec(spec, ids, 157184))
    report = count_parameters(model)
    assert 7.0e9 < report.backbone_total < 7.6e9  # LLaDA-MoE-7B-A1B
    assert 1.3e9 < report.backbone_active < 1.5e9  # "A1B": ~1.4B active
    assert 0.38e9 < report.vision < 0.45e9  # SigLIP-so400m + projector
    assert model.config.num_image_tokens == 196  # 27×27 patches pooled 2×2


def test_active_parameters_hand_count(tiny_model):
    c = tiny_model.config
    report = count_parameters(tiny_model)
    expert = 3 * c.hidden_size * c.moe_intermediate_size
    idle = c.num_hidden_layers * (c.num_experts - c.num_experts_per_tok) * expert
    assert report.backbone_total - report.backbone_active == idle + c.vocab_size * c.hidden_size


def test_parameter_groups_partition_the_model(tiny_model):
    groups = tiny_model.parameter_groups()
    names = [n for members in groups.values() for n, _ in members]
    assert sorted(names) == sorted(n for n, _ in tiny_model.named_parameters())
    assert all(".mlp.gate." in n for n, _ in groups["router"]) and groups["projector"] and groups["vision"]


def test_build_requires_vision_section_for_vision_weights(tiny_spec, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="vision: null"):
        build_model(tiny_spec.model_copy(update={"vision": None}), tokenizer, vision_from=tmp_path)


def test_a_checkpoint_missing_a_weight_fails_loading(checkpoint, tmp_path):
    """transformers' load report is silenced in load_checkpoint, so a damaged checkpoint must raise."""
    import shutil

    from safetensors.torch import load_file, save_file

    from dimoe.errors import UserError
    from dimoe.model.build import load_checkpoint

    damaged = shutil.copytree(checkpoint, tmp_path / "damaged")
    weights = load_file(str(damaged / "model.safetensors"))
    dropped = next(name for name in weights if name.endswith("q_proj.weight"))
    del weights[dropped]
    save_file(weights, str(damaged / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UserError, match="missing_keys"):
        load_checkpoint(damaged)
    load_checkpoint(checkpoint)  # the intact one loads


def test_moe_dispatch_field_switches_the_expert_path_with_equal_results(tiny_spec, tokenizer):
    """`moe_dispatch` reaches every layer's experts and is saved in config.json; the loop
    fallback and the grouped GEMM give the same logits and weight gradients."""
    results = {}
    for dispatch in ("loop", "grouped"):
        model = build_model(tiny_spec.model_copy(update={"moe_dispatch": dispatch}), tokenizer, seed=0)
        assert {layer.mlp.experts.dispatch for layer in model.layers} == {dispatch}
        ids, prefix_mask, pixels = batch(model)
        out = model(ids, None, pixels, prefix_mask=prefix_mask).logits
        out.square().mean().backward()
        results[dispatch] = (out.detach(), model.layers[0].mlp.experts.down_proj.grad)
    assert model.config.to_dict()["moe_dispatch"] == "grouped"
    torch.testing.assert_close(results["grouped"][0], results["loop"][0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results["grouped"][1], results["loop"][1], rtol=1e-4, atol=1e-6)
