"""Tiny random checkpoints in the published LLaDA-MoE and dense LLaDA-8B layouts (config.json keys
and safetensors names of their modeling code), and an independent reference forward of each,
written from the published code's equations: one token at a time through the router and experts,
attention over every position (both models are bidirectional and ignore any mask)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file


def _random(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g) * 0.5


def write_llada_moe(
    path: Path,
    *,
    vocab: int = 300,
    hidden: int = 64,
    layers: int = 3,
    heads: int = 4,
    experts: int = 4,
    top_k: int = 2,
    ffn: int = 32,
    dense_layers: tuple[int, ...] = (),
    dense_ffn: int = 48,
    expert_bias: bool = False,
    partial_rotary: float = 1.0,
    shared_ffn: int | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """A LLaDA-MoE checkpoint (`LLaDAMoEModelLM`, model_type `llada`). `norm_topk_prob` is written
    True on purpose: the published block ignores it and never renormalises."""
    path.mkdir(parents=True)
    config = {
        "architectures": ["LLaDAMoEModelLM"], "model_type": "llada", "vocab_size": vocab,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "num_experts": experts, "num_experts_per_tok": top_k,
        "expert_intermediate_size": ffn, "dense_intermediate_size": dense_ffn,
        "shared_expert_intermediate_size": shared_ffn, "moe_layer_freq": [int(i not in dense_layers)
        for i in range(layers)], "moe_router_enable_expert_bias": expert_bias,
        "moe_router_score_function": "softmax", "routed_scaling_factor": 1, "norm_topk_prob": True,
        "qk_layernorm": True, "partial_rotary_factor": partial_rotary, "rope_theta": 50000.0,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 256, "hidden_act": "silu", "attention_bias": False,
        "clip_qkv": None, "tie_word_embeddings": False, "pad_token_id": 1, "eos_token_id": 1,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    rand, hd = _random(0), hidden // heads
    w = {"model.embed_tokens.weight": rand(vocab, hidden), "model.norm.weight": 1 + rand(hidden) / 4,
         "lm_head.weight": rand(vocab, hidden)}  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}"
        for proj in "qkvo":
            w[f"{p}.self_attn.{proj}_proj.weight"] = rand(hidden, hidden) / hidden**0.5
        for name in ("self_attn.q_norm", "self_attn.k_norm"):
            w[f"{p}.{name}.weight"] = 1 + rand(hd) / 4
        for name in ("input_layernorm", "post_attention_layernorm"):
            w[f"{p}.{name}.weight"] = 1 + rand(hidden) / 4
        if i in dense_layers:
            w.update(_swiglu_weights(rand, f"{p}.mlp", hidden, dense_ffn))
            continue
        w[f"{p}.mlp.gate.weight"] = rand(experts, hidden)
        if expert_bias:
            w[f"{p}.mlp.expert_bias"] = rand(experts) / 4
        for j in range(experts):
            w.update(_swiglu_weights(rand, f"{p}.mlp.experts.{j}", hidden, ffn))
        if shared_ffn:
            w.update(_swiglu_weights(rand, f"{p}.shared_expert", hidden, shared_ffn))
    save_file(w, str(path / "model.safetensors"))
    return config, w


def write_llada_dense(path: Path, *, vocab: int = 300, hidden: int = 64, layers: int = 2, heads: int = 4,
                      ffn: int = 96, tied: bool = False) -> tuple[dict, dict[str, torch.Tensor]]:  # fmt: skip
    """A dense LLaDA-8B checkpoint (`LLaDAModelLM`, OLMo config names and weight names)."""
    path.mkdir(parents=True)
    config = {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "d_model": hidden, "n_heads": heads,
        "n_kv_heads": heads, "n_layers": layers, "mlp_hidden_size": ffn, "mlp_ratio": 4,
        "vocab_size": vocab - 4, "embedding_size": vocab, "block_type": "llama", "activation_type": "silu",
        "layer_norm_type": "rms", "rms_norm_eps": 1e-5, "include_bias": False, "include_qkv_bias": False,
        "attention_layer_norm": False, "input_emb_norm": False, "scale_logits": False, "alibi": False,
        "rope": True, "rope_theta": 500000.0, "weight_tying": tied, "max_sequence_length": 256,
        "mask_token_id": vocab - 5, "eos_token_id": 1, "pad_token_id": 1,
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    rand, t = _random(1), "model.transformer"
    w = {f"{t}.wte.weight": rand(vocab, hidden), f"{t}.ln_f.weight": 1 + rand(hidden) / 4}
    if not tied:
        w[f"{t}.ff_out.weight"] = rand(vocab, hidden)
    for i in range(layers):
        b = f"{t}.blocks.{i}"
        square, up, down = (hidden, hidden), (ffn, hidden), (hidden, ffn)
        shapes = {"q_proj": square, "k_proj": square, "v_proj": square, "attn_out": square,
                  "ff_proj": up, "up_proj": up, "ff_out": down}  # fmt: skip
        for name, shape in shapes.items():
            w[f"{b}.{name}.weight"] = rand(*shape) / shape[1] ** 0.5
        w[f"{b}.attn_norm.weight"] = 1 + rand(hidden) / 4
        w[f"{b}.ff_norm.weight"] = 1 + rand(hidden) / 4
    save_file(w, str(path / "model.safetensors"))
    return config, w


def _swiglu_weights(rand, prefix: str, hidden: int, ffn: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.gate_proj.weight": rand(ffn, hidden) / hidden**0.5,
            f"{prefix}.up_proj.weight": rand(ffn, hidden) / hidden**0.5,
            f"{prefix}.down_proj.weight": rand(hidden, ffn) / ffn**0.5}  # fmt: skip


# -- the reference forward ------------------------------------------------------------------------------
def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _rope(x: torch.Tensor, theta: float, fraction: float) -> torch.Tensor:
    """x [heads, L, hd]: rotate-half RoPE on the leading hd·fraction dims, the rest passed through."""
    dims = int(x.shape[-1] * fraction)
    inv_freq = 1.0 / theta ** (torch.arange(0, dims, 2).float() / dims)
    angles = torch.arange(x.shape[1]).float()[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rot, rest = x[..., :dims], x[..., dims:]
    half = torch.cat([-rot[..., dims // 2 :], rot[..., : dims // 2]], -1)
    return torch.cat([rot * cos + half * sin, rest], -1)


def _attention(h, wq, wk, wv, wo, heads, theta, fraction, q_norm=None, k_norm=None):
    length, hd = h.shape[0], h.shape[1] // heads
    q, k, v = ((h @ wt.T).view(length, heads, hd).transpose(0, 1) for wt in (wq, wk, wv))
    if q_norm is not None:  # per head, before RoPE
        q, k = _rms(q, q_norm), _rms(k, k_norm)
    q, k = _rope(q, theta, fraction), _rope(k, theta, fraction)
    scores = (q @ k.transpose(1, 2)) / hd**0.5  # no mask: bidirectional
    return (scores.softmax(-1) @ v).transpose(0, 1).reshape(length, -1) @ wo.T


def _swiglu(x, w, prefix):
    return (F.silu(x @ w[f"{prefix}.gate_proj.weight"].T) * (x @ w[f"{prefix}.up_proj.weight"].T)) @ w[
        f"{prefix}.down_proj.weight"
    ].T


def _moe_token(x, w, p, config):
    """One token through LLaDA-MoE's router: fp32 softmax, + expert_bias, top-k, no renormalisation."""
    scores = (x @ w[f"{p}.mlp.gate.weight"].T).softmax(-1)
    if f"{p}.mlp.expert_bias" in w:
        scores = scores + w[f"{p}.mlp.expert_bias"]
    gates, chosen = scores.topk(config["num_experts_per_tok"])
    return sum(g * _swiglu(x, w, f"{p}.mlp.experts.{int(j)}") for g, j in zip(gates, chosen, strict=True))


@torch.no_grad()
def llada_moe_logits(config: dict, w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """[L] ids → [L, vocab] logits as LLaDAMoEModelLM computes them."""
    x = w["model.embed_tokens.weight"][ids]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        h = _rms(x, w[f"{p}.input_layernorm.weight"])
        projections = (w[f"{p}.self_attn.{n}_proj.weight"] for n in "qkvo")
        norms = (w[f"{p}.self_attn.q_norm.weight"], w[f"{p}.self_attn.k_norm.weight"])
        heads, rope = config["num_attention_heads"], (config["rope_theta"], config["partial_rotary_factor"])
        x = x + _attention(h, *projections, heads, *rope, *norms)
        h = _rms(x, w[f"{p}.post_attention_layernorm.weight"])
        if config["moe_layer_freq"][i] == 0:
            ffn = _swiglu(h, w, f"{p}.mlp")
        else:
            ffn = torch.stack([_moe_token(token, w, p, config) for token in h])
            if config["shared_expert_intermediate_size"]:  # MoE layers only, ungated
                ffn = ffn + _swiglu(h, w, f"{p}.shared_expert")
        x = x + ffn
    return _rms(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


@torch.no_grad()
def llada_dense_logits(config: dict, w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """[L] ids → [L, vocab] logits as LLaDAModelLM (llama blocks) computes them."""
    t = "model.transformer"
    x = w[f"{t}.wte.weight"][ids]
    for i in range(config["n_layers"]):
        b = f"{t}.blocks.{i}"
        h = _rms(x, w[f"{b}.attn_norm.weight"])
        weights = (w[f"{b}.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj", "attn_out"))
        x = x + _attention(h, *weights, config["n_heads"], config["rope_theta"], 1.0)
        h = _rms(x, w[f"{b}.ff_norm.weight"])
        x = (
            x
            + (F.silu(h @ w[f"{b}.ff_proj.weight"].T) * (h @ w[f"{b}.up_proj.weight"].T))
            @ w[f"{b}.ff_out.weight"].T
        )
    head = w[f"{t}.wte.weight"] if config["weight_tying"] else w[f"{t}.ff_out.weight"]
    return _rms(x, w[f"{t}.ln_f.weight"]) @ head.T
