"""Import pretrained parts from local HF directories (nothing is downloaded):

- a LLaDA-MoE backbone (its published modeling code's names and computation: per-expert
  `experts.{j}.{gate,up,down}_proj` or the fused layout of transformers ≥ 5, dense layers from
  `moe_layer_freq`, the router's `expert_bias`, partial rotary, an optional shared expert; OLMoE
  checkpoints too) or a dense LLaDA-8B backbone (OLMo names, `model.transformer.blocks.N.*`) into
  the DiMoE backbone;
- a SigLIP vision encoder (`SiglipVisionModel` or full `SiglipModel` directory) into the tower.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import SiglipVisionConfig, SiglipVisionModel

from dimoe.config.model import ModelConfig, VisionConfig, image_token_count
from dimoe.errors import UserError
from dimoe.io import read_json
from dimoe.model.hf_quiet import quiet_transformers
from dimoe.model.modeling import DiMoEVLModel
from dimoe.model.vision import VisionTower


class ImportErrorDetail(UserError):
    """A pretrained directory whose weights do not fit; the message lists what is wrong."""


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a local HF model directory")
    return read_json(path)


def backbone_spec_from_llada(directory: str | Path, base: ModelConfig) -> ModelConfig:
    """The architecture of a LLaDA-MoE (or OLMoE) or dense LLaDA checkpoint, as a DiMoE spec; the
    attention mask and the vision part are kept from `base`."""
    cfg = read_hf_config(directory)
    update = _dense_llada_spec(cfg, base) if _is_dense_llada(cfg) else _llada_moe_spec(cfg)
    return base.model_copy(update=update)


def _is_dense_llada(cfg: dict[str, Any]) -> bool:
    """Dense LLaDA-8B keeps OLMo's config names (`d_model`, `n_layers`); LLaDA-MoE the HF ones."""
    return "d_model" in cfg and "n_layers" in cfg


def _refuse(directory_config: dict[str, Any], unsupported: dict[str, Any]) -> None:
    """One error naming every config value whose computation DiMoE does not reproduce."""
    found = [f"{key}={directory_config[key]!r}" for key, ok in unsupported.items() if key in directory_config
             and not ok(directory_config[key])]  # fmt: skip
    if found:
        raise ImportErrorDetail(
            f"the backbone's config has settings DiMoE cannot reproduce: {', '.join(found)}"
        )


def _llada_moe_spec(cfg: dict[str, Any]) -> dict[str, Any]:
    """LLaDA-MoE's published `LLaDAMoESparseMoeBlock` never renormalises the top-k gates (it sets
    `norm_topk_prob = False` whatever the config says), adds `expert_bias` to the probabilities
    before top-k when enabled, and builds a dense MLP where `moe_layer_freq[i] == 0`. OLMoE
    checkpoints (`model_type: olmoe`) do honour `norm_topk_prob`."""
    _refuse(cfg, {
        "moe_router_score_function": lambda v: v in (None, "softmax"),
        "clip_qkv": lambda v: v is None,
        "attention_bias": lambda v: not v,
        "hidden_act": lambda v: v == "silu",
    })  # fmt: skip
    layers = cfg["num_hidden_layers"]
    frequency = cfg.get("moe_layer_freq") or [1] * layers
    dense = [i for i, kind in enumerate(frequency) if kind == 0]
    rotary = cfg.get("partial_rotary_factor")
    rope = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    return {
        "vocab_size": cfg["vocab_size"],
        "hidden_size": cfg["hidden_size"],
        "num_hidden_layers": layers,
        "num_attention_heads": cfg["num_attention_heads"],
        "num_key_value_heads": cfg.get("num_key_value_heads"),
        "head_dim": cfg.get("head_dim"),
        "num_experts": cfg.get("num_experts") or cfg["num_local_experts"],
        "num_experts_per_tok": cfg["num_experts_per_tok"],
        "moe_intermediate_size": (
            cfg.get("expert_intermediate_size")
            or cfg.get("moe_intermediate_size")
            or cfg["intermediate_size"]
        ),
        "shared_expert_intermediate_size": max(cfg.get("shared_expert_intermediate_size") or 0, 0),
        "norm_topk_prob": bool(cfg.get("norm_topk_prob")) if cfg.get("model_type") == "olmoe" else False,
        "router_expert_bias": bool(cfg.get("moe_router_enable_expert_bias")),
        "dense_layers": dense,
        "dense_intermediate_size": (cfg.get("dense_intermediate_size") or cfg.get("intermediate_size") or 0)
        if dense
        else 0,
        "qk_norm": bool(cfg.get("qk_layernorm", cfg.get("qk_norm", True))),
        "partial_rotary_factor": 1.0 if rotary in (None, -1) else float(rotary),
        "rope_theta": float(rope),
        "max_position_embeddings": cfg.get("max_position_embeddings", 4096),
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-5),
    }


def _dense_llada_spec(cfg: dict[str, Any], base: ModelConfig) -> dict[str, Any]:
    """Dense LLaDA-8B (`block_type: llama`): every layer a dense SwiGLU (`ff_proj` the gate,
    `up_proj` the linear branch), no QK-norm, full RoPE; the MoE fields of `base` stay unused."""
    _refuse(cfg, {
        "block_type": lambda v: v == "llama",
        "activation_type": lambda v: v == "silu",
        "layer_norm_type": lambda v: v == "rms",
        "include_bias": lambda v: not v,
        "include_qkv_bias": lambda v: not v,
        "attention_layer_norm": lambda v: not v,
        "input_emb_norm": lambda v: not v,
        "scale_logits": lambda v: not v,
        "alibi": lambda v: not v,
        "rope": lambda v: bool(v),
    })  # fmt: skip
    hidden, layers = cfg["d_model"], cfg["n_layers"]
    return {
        "vocab_size": cfg.get("embedding_size") or cfg["vocab_size"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": cfg["n_heads"],
        "num_key_value_heads": cfg.get("n_kv_heads") or cfg["n_heads"],
        "head_dim": None,
        "dense_layers": list(range(layers)),
        "dense_intermediate_size": cfg.get("mlp_hidden_size") or cfg["mlp_ratio"] * hidden,
        "shared_expert_intermediate_size": 0,
        "router_expert_bias": False,
        "qk_norm": False,
        "partial_rotary_factor": 1.0,
        "rope_theta": float(cfg.get("rope_theta", 10000.0)),
        "max_position_embeddings": cfg.get("max_sequence_length", base.max_position_embeddings),
        "rms_norm_eps": cfg.get("rms_norm_eps", 1e-5),
    }


def vision_spec_from_siglip(directory: str | Path, base: VisionConfig) -> VisionConfig:
    """The shape of a local SigLIP vision encoder, as a DiMoE vision spec. The image size stays the
    spec's (the tower's position embeddings are interpolated to it, `import_siglip_vision`); the
    other fields not of the tower's shape are kept from `base` too."""
    cfg = SiglipVisionConfig.from_pretrained(str(directory))
    shape = {name: getattr(cfg, name) for name in base.siglip_shape() if name != "image_size"}
    if base.image_size % cfg.patch_size:
        raise ImportErrorDetail(
            f"image_size {base.image_size} is not a multiple of the SigLIP at {directory}'s patch size "
            f"{cfg.patch_size}; pick a multiple (e.g. {base.image_size // cfg.patch_size * cfg.patch_size})"
        )
    return base.model_copy(update={**shape, "pretrained_dir": str(directory)})


def interpolate_position_embedding(weight: torch.Tensor, grid: int) -> torch.Tensor:
    """SigLIP's [g·g, width] patch position embeddings resampled to a `grid`×`grid` patch grid,
    bicubically, as `SiglipVisionEmbeddings.interpolate_pos_encoding` does at run time: done once
    here, the tower's weights match its configured image size and no forward needs the flag."""
    old = int(weight.shape[0] ** 0.5)
    if old == grid:
        return weight
    square = weight.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    resized = F.interpolate(square, size=(grid, grid), mode="bicubic", align_corners=False)
    return resized.permute(0, 2, 3, 1).reshape(grid * grid, -1).to(weight.dtype)


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {directory}")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


# Dense LLaDA (OLMo layout) → DiMoE module names, of the whole model and of block N's modules.
_DENSE_TOP_NAMES = {"wte": "embed_tokens", "ln_f": "norm", "ff_out": "lm_head"}
_DENSE_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ff_norm": "post_attention_layernorm",
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "attn_out": "self_attn.o_proj",
    "ff_proj": "mlp.gate_proj",  # SiLU is applied to ff_proj: it is the gate
    "up_proj": "mlp.up_proj",
    "ff_out": "mlp.down_proj",
}


def _map_dense_llada_names(source: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    mapped = {}
    for name, tensor in source.items():
        match = re.fullmatch(r"model\.transformer\.(?:blocks\.(\d+)\.)?(\w+)\.weight", name)
        table = _DENSE_TOP_NAMES if match is None or match[1] is None else _DENSE_BLOCK_NAMES
        if match is None or match[2] not in table:
            mapped[name] = tensor  # reported as ignored
        elif match[1] is None:
            mapped[f"{table[match[2]]}.weight"] = tensor
        else:
            mapped[f"layers.{match[1]}.{table[match[2]]}.weight"] = tensor
    if tied:  # `weight_tying`: the LM head is the input embedding
        mapped["lm_head.weight"] = mapped["embed_tokens.weight"]
    return mapped


def _map_llada_moe_names(source: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """LLaDA-MoE/OLMoE names → DiMoE names: per-expert weights stacked into the fused layout, the
    router's `expert_bias` and the layer-level `shared_expert` moved into the MoE block."""
    strip = {k.removeprefix("model."): v for k, v in source.items()}
    mapped = {}
    for name, tensor in strip.items():
        if ".mlp.experts." in name:
            continue
        name = re.sub(r"^(layers\.\d+)\.mlp\.expert_bias$", r"\1.mlp.gate.expert_bias", name)
        mapped[re.sub(r"^(layers\.\d+)\.shared_expert\.", r"\1.mlp.shared_expert.", name)] = tensor
    for i in range(config.num_hidden_layers):
        if i in config.dense_layers:
            continue
        prefix = f"layers.{i}.mlp.experts"
        if f"{prefix}.gate_up_proj" in strip:
            mapped[f"{prefix}.gate_up_proj"] = strip[f"{prefix}.gate_up_proj"]
            mapped[f"{prefix}.down_proj"] = strip[f"{prefix}.down_proj"]
            continue
        try:
            gate_up = [
                torch.cat([strip[f"{prefix}.{j}.gate_proj.weight"], strip[f"{prefix}.{j}.up_proj.weight"]])
                for j in range(config.num_experts)
            ]
            down = [strip[f"{prefix}.{j}.down_proj.weight"] for j in range(config.num_experts)]
        except KeyError as exc:
            raise ImportErrorDetail(f"backbone checkpoint lacks expert weight {exc.args[0]!r}") from None
        mapped[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        mapped[f"{prefix}.down_proj"] = torch.stack(down)
    return mapped


@torch.no_grad()
def import_llada_backbone(
    model: DiMoEVLModel, directory: str | Path, new_token_ids: Sequence[int] = ()
) -> dict[str, list[str]]:
    """Copy LLaDA-MoE or dense LLaDA weights into `model`'s backbone (`copy_backbone`)."""
    directory = Path(directory)
    source = _read_safetensors(directory)
    if _is_dense_llada(read_hf_config(directory)):
        source = _map_dense_llada_names(source, bool(read_hf_config(directory).get("weight_tying")))
    else:
        source = _map_llada_moe_names(source, model.config)
    return copy_backbone(model, source, directory, new_token_ids)


@torch.no_grad()
def copy_backbone(
    model: DiMoEVLModel, source: dict[str, torch.Tensor], directory: Path, new_token_ids: Sequence[int] = ()
) -> dict[str, list[str]]:
    """Copy `source` (DiMoE names) into `model`'s backbone; every backbone weight must be there.
    The embedding/LM-head rows of tokens the checkpoint lacks (DiMoE-VL's `<image>` and any token
    the tokenizer's adaptation added, `new_token_ids`, which may fall in the checkpoint's padding
    rows) start at the mean of its rows, so they start in-distribution."""
    target = {k: v for k, v in model.state_dict().items() if not k.startswith("vision.")}
    problems, loaded = [], []
    for name, tensor in source.items():
        if name not in target:
            continue
        dest = target[name]
        if name in ("embed_tokens.weight", "lm_head.weight") and tensor.shape[0] <= dest.shape[0]:
            mean = tensor.float().mean(0).to(dest.dtype)
            dest[: tensor.shape[0]] = tensor.to(dest.dtype)
            dest[tensor.shape[0] :] = mean
            dest[list(new_token_ids)] = mean
        elif tensor.shape != dest.shape:
            problems.append(f"{name}: checkpoint {tuple(tensor.shape)} vs model {tuple(dest.shape)}")
            continue
        else:
            dest.copy_(tensor.to(dest.dtype))
        loaded.append(name)
    missing = sorted(set(target) - set(loaded))
    if problems or missing:
        detail = problems + [f"missing in checkpoint: {m}" for m in missing[:20]]
        raise ImportErrorDetail(f"cannot import backbone from {directory}:\n  " + "\n  ".join(detail))
    return {"loaded": loaded, "ignored": sorted(set(source) - set(target))}


@torch.no_grad()
def set_image_size(model: DiMoEVLModel, image_size: int) -> None:
    """Rebuild `model`'s tower for `image_size` pixels: the same weights with the position
    embeddings interpolated to the new patch grid; the config's image size and image-token count
    follow."""
    if model.vision is None:
        raise UserError("vision_image_size is set but the model has no vision tower")
    shape = dict(model.config.vision_config)
    if image_size % shape["patch_size"]:
        raise UserError(
            f"vision_image_size {image_size} is not a multiple of the patch size {shape['patch_size']}"
        )
    state = model.vision.state_dict()
    key = next(k for k in state if k.endswith("embeddings.position_embedding.weight"))
    state[key] = interpolate_position_embedding(state[key], image_size // shape["patch_size"])
    shape["image_size"] = image_size
    config = model.config
    tower = VisionTower(shape, config.hidden_size, config.vision_feature_layer, config.vision_pool_2x2)
    tower.load_state_dict(state)
    model.vision = tower.to(device=model.device, dtype=model.dtype)
    config.vision_config = shape
    config.num_image_tokens = image_token_count(image_size, shape["patch_size"], config.vision_pool_2x2)


@torch.no_grad()
def import_siglip_vision(model: DiMoEVLModel, directory: str | Path) -> int:
    """Copy a local SigLIP vision encoder into the tower; returns the number of tensors copied."""
    if model.vision is None:
        raise ImportErrorDetail("the model has no vision tower to import SigLIP weights into")
    with quiet_transformers():  # a full SiglipModel's text half is expected to go unused
        encoder, info = SiglipVisionModel.from_pretrained(str(directory), output_loading_info=True)
    # The pooling head is not part of the tower (vision_use_head=False); key names may or may not
    # carry the `vision_model.` prefix depending on how the checkpoint was saved.
    missing = [k for k in info["missing_keys"] if not k.removeprefix("vision_model.").startswith("head.")]
    if missing:
        raise ImportErrorDetail(f"SigLIP at {directory} lacks {sorted(missing)[:10]}")
    state = {k: v for k, v in encoder.state_dict().items() if not k.startswith("vision_model.head.")}
    key = next(k for k in state if k.endswith("embeddings.position_embedding.weight"))
    vision = model.config.vision_config
    state[key] = interpolate_position_embedding(state[key], vision["image_size"] // vision["patch_size"])
    result = model.vision.encoder.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ImportErrorDetail(f"SigLIP at {directory} lacks {result.missing_keys[:10]}")
    return len(state)
