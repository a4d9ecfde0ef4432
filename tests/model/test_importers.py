"""Importers read tiny random checkpoints written in the LLaDA-MoE and SigLIP formats."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

from dimoe.errors import UserError
from dimoe.model.build import build_model, load_checkpoint, save_checkpoint
from dimoe.model.importers import ImportErrorDetail, set_image_size
from tests.model.upstream import llada_dense_logits, llada_moe_logits, write_llada_dense, write_llada_moe


def write_siglip(path):
    config = SiglipVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
    )
    torch.manual_seed(1)
    model = SiglipVisionModel(config)
    model.save_pretrained(str(path))
    return model


def test_llada_backbone_and_siglip_import(tiny_spec, tokenizer, tmp_path):
    _, weights = write_llada_moe(tmp_path / "llada", vocab=len(tokenizer) - 2, layers=2)
    siglip = write_siglip(tmp_path / "siglip").eval()
    model = build_model(
        tiny_spec, tokenizer, backbone_from=tmp_path / "llada", vision_from=tmp_path / "siglip"
    )
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_experts, c.moe_intermediate_size) == (64, 2, 4, 32)
    assert c.rope_theta == 50000.0 and c.norm_topk_prob is False
    layer = model.layers[1]
    expert2 = layer.mlp.experts.gate_up_proj[2]
    torch.testing.assert_close(expert2[:32], weights["model.layers.1.mlp.experts.2.gate_proj.weight"])
    torch.testing.assert_close(expert2[32:], weights["model.layers.1.mlp.experts.2.up_proj.weight"])
    torch.testing.assert_close(
        layer.self_attn.q_norm.weight, weights["model.layers.1.self_attn.q_norm.weight"]
    )
    # Tokens the checkpoint lacks get the mean embedding instead of noise.
    emb = model.embed_tokens.weight
    torch.testing.assert_close(emb[: emb.shape[0] - 2], weights["model.embed_tokens.weight"])
    torch.testing.assert_close(emb[-1], weights["model.embed_tokens.weight"].mean(0))
    # The tower computes exactly what the SigLIP checkpoint computes.
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ours = model.vision.encoder(pixel_values=pixels).last_hidden_state
        theirs = siglip(pixel_values=pixels).last_hidden_state
    torch.testing.assert_close(ours, theirs)
    assert c.num_image_tokens == 16  # the checkpoint's 4×4 patches; pooling is the spec's (tiny: none)


def test_backbone_shape_mismatch_is_reported(tiny_spec, tokenizer, tmp_path):
    write_llada_moe(tmp_path / "llada", vocab=len(tokenizer))
    bad = tmp_path / "llada" / "config.json"
    cfg = json.loads(bad.read_text())
    cfg["expert_intermediate_size"] = 16  # lies about the expert width
    bad.write_text(json.dumps(cfg))
    with pytest.raises(ImportErrorDetail, match="gate_up_proj: checkpoint"):
        build_model(tiny_spec, tokenizer, backbone_from=tmp_path / "llada")


def test_siglip_missing_a_vision_weight_is_reported(tiny_spec, tokenizer, tmp_path):
    """transformers' own load report is silenced, so the importer must name missing tower weights."""
    write_siglip(tmp_path / "siglip")
    weights = load_file(str(tmp_path / "siglip" / "model.safetensors"))
    dropped = "post_layernorm.weight"
    del weights[dropped]
    save_file(weights, str(tmp_path / "siglip" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ImportErrorDetail, match=dropped):
        build_model(tiny_spec, tokenizer, vision_from=tmp_path / "siglip")


LLADA_MOE_VARIANTS = {
    "all-moe": {},
    "dense-layer+expert-bias+partial-rotary+shared": {
        "dense_layers": (1,), "expert_bias": True, "partial_rotary": 0.5, "shared_ffn": 24,
    },
}  # fmt: skip


def imported_logits(spec, tokenizer, directory, ids):
    model = build_model(
        spec.model_copy(update={"attention": "full", "vision": None}), tokenizer, backbone_from=directory
    )
    with torch.no_grad():
        return model, model(ids[None]).logits[0]


@pytest.mark.parametrize("variant", LLADA_MOE_VARIANTS, ids=list(LLADA_MOE_VARIANTS))
def test_llada_moe_import_computes_what_the_published_code_computes(tiny_spec, tokenizer, tmp_path, variant):
    config, weights = write_llada_moe(
        tmp_path / "llada", vocab=len(tokenizer) - 2, **LLADA_MOE_VARIANTS[variant]
    )
    ids = torch.randint(10, len(tokenizer) - 2, (24,), generator=torch.Generator().manual_seed(3))
    model, logits = imported_logits(tiny_spec, tokenizer, tmp_path / "llada", ids)
    c = model.config
    assert c.norm_topk_prob is False  # the config's True is ignored, as by LLaDAMoESparseMoeBlock
    assert c.dense_layers == list(LLADA_MOE_VARIANTS[variant].get("dense_layers", ()))
    reference = llada_moe_logits(config, weights, ids)
    torch.testing.assert_close(logits[:, : reference.shape[1]], reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tied", [False, True])
def test_dense_llada_import_computes_what_the_published_code_computes(tiny_spec, tokenizer, tmp_path, tied):
    config, weights = write_llada_dense(tmp_path / "llada8b", vocab=len(tokenizer) - 2, tied=tied)
    ids = torch.randint(10, len(tokenizer) - 2, (24,), generator=torch.Generator().manual_seed(4))
    model, logits = imported_logits(tiny_spec, tokenizer, tmp_path / "llada8b", ids)
    assert model.config.dense_layers == [0, 1] and model.config.qk_norm is False
    reference = llada_dense_logits(config, weights, ids)
    torch.testing.assert_close(logits[:, : reference.shape[1]], reference, rtol=1e-4, atol=1e-4)


def test_settings_the_import_cannot_reproduce_are_named(tiny_spec, tokenizer, tmp_path):
    config, _ = write_llada_moe(tmp_path / "llada", vocab=len(tokenizer))
    config.update(moe_router_score_function="sigmoid", clip_qkv=8.0)
    (tmp_path / "llada" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ImportErrorDetail, match=r"moe_router_score_function='sigmoid', clip_qkv=8.0"):
        build_model(tiny_spec, tokenizer, backbone_from=tmp_path / "llada")


@pytest.mark.parametrize("image_size", [24, 48])
def test_siglip_at_another_resolution_matches_its_own_position_interpolation(
    tiny_spec, tokenizer, tmp_path, image_size
):
    """The checkpoint is 32 px in 8 px patches (4×4); the spec asks for 24 or 48 px. The imported
    tower computes what transformers' SigLIP computes at that size with `interpolate_pos_encoding`."""
    siglip = write_siglip(tmp_path / "siglip").eval()
    vision = tiny_spec.vision.model_copy(update={"image_size": image_size, "pool_2x2": False})
    model = build_model(
        tiny_spec.model_copy(update={"vision": vision}), tokenizer, vision_from=tmp_path / "siglip"
    )
    assert model.config.vision_config["image_size"] == image_size
    assert model.config.num_image_tokens == (image_size // 8) ** 2
    pixels = torch.randn(2, 3, image_size, image_size)
    with torch.no_grad():
        ours = model.vision.encoder(pixel_values=pixels).last_hidden_state
        theirs = siglip(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_image_size_off_the_patch_grid_is_refused(tiny_spec, tokenizer, tmp_path):
    write_siglip(tmp_path / "siglip")
    vision = tiny_spec.vision.model_copy(update={"image_size": 30})
    with pytest.raises(ImportErrorDetail, match="not a multiple of .* patch size 8"):
        build_model(
            tiny_spec.model_copy(update={"vision": vision}), tokenizer, vision_from=tmp_path / "siglip"
        )


def test_set_image_size_keeps_the_tower_and_interpolates_its_positions(checkpoint, tmp_path):
    """The resolution ablation's `vision_image_size`: the checkpoint's 32 px tower (8 px patches,
    2×2 pooling: 4 image tokens) trained at 64 px computes what SigLIP computes at 64 px with
    `interpolate_pos_encoding`, and saves as a 64 px checkpoint with 16 image tokens."""
    model, tokenizer = load_checkpoint(checkpoint)
    original = copy.deepcopy(model.vision.encoder)
    set_image_size(model, 64)
    assert model.config.num_image_tokens == 16 and model.config.vision_config["image_size"] == 64
    pixels = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.vision.encoder(pixel_values=pixels).last_hidden_state
        theirs = original(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    reloaded, _ = load_checkpoint(save_checkpoint(model, tokenizer, tmp_path / "at64"))
    assert reloaded.config.num_image_tokens == 16
    assert json.loads((tmp_path / "at64" / "preprocessor_config.json").read_text())["size"]["height"] == 64
    with pytest.raises(UserError, match="not a multiple of the patch size 8"):
        set_image_size(model, 60)
