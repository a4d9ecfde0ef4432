"""Importers read tiny random checkpoints written in the LLaDA-MoE and SigLIP formats."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import SiglipVisionConfig, SiglipVisionModel

from dimoe.model.build import build_model
from dimoe.model.importers import ImportErrorDetail


def write_llada_moe(path, *, vocab=300, hidden=64, layers=2, heads=4, experts=4, top_k=2, ffn=32):
    """A random checkpoint with LLaDA-MoE names: per-expert linears, per-head q/k norms."""
    path.mkdir()
    config = {
        "model_type": "lladamoe",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "expert_intermediate_size": ffn,
        "shared_expert_intermediate_size": 0,
        "qk_layernorm": True,
        "norm_topk_prob": False,
        "rope_theta": 50000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 256,
    }
    (path / "config.json").write_text(json.dumps(config))
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    hd = hidden // heads
    weights = {
        "model.embed_tokens.weight": rand(vocab, hidden),
        "model.norm.weight": rand(hidden),
        "lm_head.weight": rand(vocab, hidden),
    }
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj in "qkvo":
            weights[f"{p}.self_attn.{proj}_proj.weight"] = rand(hidden, hidden)
        weights[f"{p}.self_attn.q_norm.weight"] = rand(hd)
        weights[f"{p}.self_attn.k_norm.weight"] = rand(hd)
        weights[f"{p}.input_layernorm.weight"] = rand(hidden)
        weights[f"{p}.post_attention_layernorm.weight"] = rand(hidden)
        weights[f"{p}.mlp.gate.weight"] = rand(experts, hidden)
        for j in range(experts):
            weights[f"{p}.mlp.experts.{j}.gate_proj.weight"] = rand(ffn, hidden)
            weights[f"{p}.mlp.experts.{j}.up_proj.weight"] = rand(ffn, hidden)
            weights[f"{p}.mlp.experts.{j}.down_proj.weight"] = rand(hidden, ffn)
    save_file(weights, str(path / "model.safetensors"))
    return weights


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
    weights = write_llada_moe(tmp_path / "llada", vocab=len(tokenizer) - 2)
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
