"""AR → diffusion: a local HF causal LM (Llama, Mistral, Qwen2, Qwen3 through transformers' layout)
as a DiMoE backbone, dense or upcycled to MoE (the MiniMind → LLaDA2.0 route of
docs/design.md §4). Nothing is downloaded: the directory holds config.json, *.safetensors and the
tokenizer.

The names already match DiMoE's once `model.` is stripped (q/k/v/o, Qwen3's q_norm/k_norm, the
two RMSNorms, gate/up/down), and so does the computation: rotate-half RoPE over the whole head,
RMSNorm in float32, SwiGLU. Dense keeps every layer's MLP as a dense SwiGLU; upcycled copies it
into each of E experts (sparse upcycling, Komatsuzaki et al. 2022, arXiv:2212.05055) behind a
router of small random weights with renormalised top-k gates: the gates then sum to 1 over
identical experts, so the converted model computes exactly the original function, and training
breaks the symmetry. With `attention: causal` it reproduces the causal LM's logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dimoe.config.model import ModelConfig, VisionConfig
from dimoe.model.importers import ImportErrorDetail, _read_safetensors, _refuse, copy_backbone, read_hf_config

CAUSAL_LM_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def causal_lm_spec(cfg: dict[str, Any], base: ModelConfig, experts: int = 0, top_k: int = 2) -> ModelConfig:
    """The DiMoE architecture of a causal LM's config.json: dense (`experts` 0) or with `experts`
    upcycled experts of which `top_k` are active; other fields (attention, vision) from `base`."""
    model_type = cfg.get("model_type")
    if model_type not in CAUSAL_LM_TYPES:
        raise ImportErrorDetail(
            f"model_type {model_type!r} is not a supported causal LM ({', '.join(CAUSAL_LM_TYPES)})"
        )
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    context = cfg.get("max_position_embeddings", 0)
    _refuse({**cfg, "rope_type": rope.get("rope_type", rope.get("type"))}, {
        "hidden_act": lambda v: v == "silu",
        "mlp_bias": lambda v: not v,
        # Llama's attention_bias puts a bias on o_proj too, which DiMoE's attention has not
        "attention_bias": lambda v: not v or model_type == "qwen2",
        "use_sliding_window": lambda v: not v,
        # Mistral attends within a window whenever one is set; DiMoE attends to every position
        "sliding_window": lambda v: model_type != "mistral" or v is None or v >= context,
        "rope_type": lambda v: v in (None, "default"),
    })  # fmt: skip
    layers, inter = cfg["num_hidden_layers"], cfg["intermediate_size"]
    if experts and not 0 < top_k <= experts:
        raise ImportErrorDetail(f"--top-k {top_k} must be between 1 and --experts {experts}")
    return base.model_copy(
        update={
            "vocab_size": cfg["vocab_size"],
            "hidden_size": cfg["hidden_size"],
            "num_hidden_layers": layers,
            "num_attention_heads": cfg["num_attention_heads"],
            "num_key_value_heads": cfg.get("num_key_value_heads"),
            "head_dim": cfg.get("head_dim"),
            "qk_norm": model_type == "qwen3",
            "attention_bias": model_type == "qwen2",  # Qwen2 has q/k/v biases whatever its config says
            "rope_theta": float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            "partial_rotary_factor": 1.0,
            "max_position_embeddings": cfg.get("max_position_embeddings", base.max_position_embeddings),
            "rms_norm_eps": cfg.get("rms_norm_eps", 1e-6),
            "dense_layers": [] if experts else list(range(layers)),
            "dense_intermediate_size": 0 if experts else inter,
            "num_experts": experts or base.num_experts,
            "num_experts_per_tok": top_k if experts else min(base.num_experts_per_tok, base.num_experts),
            "moe_intermediate_size": inter,
            "norm_topk_prob": True,
            "shared_expert_intermediate_size": 0,
            "router_expert_bias": False,
        }
    )


def map_causal_lm_names(
    source: dict[str, torch.Tensor], config: Any, router_noise: float, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Causal-LM names → DiMoE names; in MoE layers the MLP copied into every expert, and the
    router's weights drawn from N(0, router_noise²)."""
    mapped = {name.removeprefix("model."): tensor for name, tensor in source.items()}
    if "lm_head.weight" not in mapped:  # tie_word_embeddings
        mapped["lm_head.weight"] = mapped["embed_tokens.weight"]
    generator = torch.Generator().manual_seed(seed)
    for i in range(config.num_hidden_layers):
        if i in config.dense_layers:
            continue
        mlp = f"layers.{i}.mlp"
        gate_up = torch.cat([mapped.pop(f"{mlp}.gate_proj.weight"), mapped.pop(f"{mlp}.up_proj.weight")])
        down = mapped.pop(f"{mlp}.down_proj.weight")
        mapped[f"{mlp}.experts.gate_up_proj"] = gate_up.expand(config.num_experts, *gate_up.shape).clone()
        mapped[f"{mlp}.experts.down_proj"] = down.expand(config.num_experts, *down.shape).clone()
        router = torch.randn(config.num_experts, config.hidden_size, generator=generator) * router_noise
        mapped[f"{mlp}.gate.weight"] = router.to(gate_up.dtype)
    return mapped


def convert_causal_lm(
    directory: str | Path,
    out: str | Path,
    base: ModelConfig,
    *,
    experts: int = 0,
    top_k: int = 2,
    router_noise: float = 0.02,
    vision_from: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """`dimoe model convert-ar`: the causal LM in `directory` as a DiMoE checkpoint at `out`
    (text-only unless `vision_from` gives a SigLIP tower), with its tokenizer adapted."""
    from dimoe.data.tokenizer import ADDED_TOKENS_ATTR, load_tokenizer
    from dimoe.model.build import build_model, save_checkpoint

    directory = Path(directory)
    if read_hf_config(directory).get("model_type") == "dimoe_vl":
        return _remask_dimoe(directory, Path(out), base, experts)
    tokenizer = load_tokenizer(directory)
    vision = (base.vision or VisionConfig()) if vision_from else None
    spec = causal_lm_spec(read_hf_config(directory), base, experts, top_k).model_copy(
        update={"vision": vision}
    )
    model = build_model(spec, tokenizer, vision_from=vision_from, seed=seed)
    source = map_causal_lm_names(_read_safetensors(directory), model.config, router_noise, seed)
    added = tokenizer.convert_tokens_to_ids(getattr(tokenizer, ADDED_TOKENS_ATTR, []))
    report = copy_backbone(model, source, directory, added)
    save_checkpoint(model, tokenizer, out)
    return {
        "out": str(out),
        "from": str(directory),
        "layout": f"{experts} experts, top-{top_k}" if experts else "dense",
        "attention": spec.attention,
        "loaded": len(report["loaded"]),
        "ignored": report["ignored"],
        "added_tokens": len(added),
    }


def _remask_dimoe(directory: Path, out: Path, base: ModelConfig, experts: int) -> dict[str, Any]:
    """A DiMoE checkpoint trained with `objective: ar` (its `causal` mask) given `base`'s mask and
    block size: the AR-pretrained model of the route, ready for diffusion training."""
    from dimoe.model.build import load_checkpoint, save_checkpoint

    model, tokenizer = load_checkpoint(directory)
    if model.config.attention != "causal" or experts:
        raise ImportErrorDetail(
            f"{directory} is a DiMoE checkpoint with {model.config.attention!r} attention: convert-ar takes "
            "one trained with objective: ar (causal), and upcycles only a transformers causal LM (--experts)"
        )
    model.config.attention, model.config.block_size = base.attention, base.block_size
    save_checkpoint(model, tokenizer, out)
    return {"out": str(out), "from": str(directory), "layout": "as trained", "attention": base.attention}
