"""Import pretrained parts from local HF directories (nothing is downloaded):

- a LLaDA-MoE backbone (OLMoE-style names, per-expert `experts.{j}.{gate,up,down}_proj` or the
  fused `experts.gate_up_proj`/`down_proj` of transformers ≥ 5) into the DiMoE backbone;
- a SigLIP vision encoder (`SiglipVisionModel` or full `SiglipModel` directory) into the tower.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import SiglipVisionConfig, SiglipVisionModel

from dimoe.config.model import ModelConfig, VisionConfig
from dimoe.errors import UserError
from dimoe.io import read_json
from dimoe.model.hf_quiet import quiet_transformers
from dimoe.model.modeling import DiMoEVLModel


class ImportErrorDetail(UserError):
    """A pretrained directory whose weights do not fit; the message lists what is wrong."""


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a local HF model directory")
    return read_json(path)


def backbone_spec_from_llada(directory: str | Path, base: ModelConfig) -> ModelConfig:
    """The architecture of a LLaDA-MoE checkpoint, as a DiMoE spec (vision part kept from `base`)."""
    cfg = read_hf_config(directory)
    expert_size = (
        cfg.get("expert_intermediate_size") or cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    )
    shared = cfg.get("shared_expert_intermediate_size") or 0
    return base.model_copy(
        update={
            "vocab_size": cfg["vocab_size"],
            "hidden_size": cfg["hidden_size"],
            "num_hidden_layers": cfg["num_hidden_layers"],
            "num_attention_heads": cfg["num_attention_heads"],
            "num_key_value_heads": cfg.get("num_key_value_heads"),
            "head_dim": cfg.get("head_dim"),
            "num_experts": cfg.get("num_experts") or cfg["num_local_experts"],
            "num_experts_per_tok": cfg["num_experts_per_tok"],
            "moe_intermediate_size": expert_size,
            "shared_expert_intermediate_size": max(shared, 0),
            "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
            "qk_norm": bool(cfg.get("qk_layernorm", cfg.get("qk_norm", True))),
            "rope_theta": float(
                cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))
            ),
            "max_position_embeddings": cfg.get("max_position_embeddings", base.max_position_embeddings),
            "rms_norm_eps": cfg.get("rms_norm_eps", base.rms_norm_eps),
        }
    )


def vision_spec_from_siglip(directory: str | Path, base: VisionConfig) -> VisionConfig:
    """The shape of a local SigLIP vision encoder, as a DiMoE vision spec (the other fields kept
    from `base`)."""
    cfg = SiglipVisionConfig.from_pretrained(str(directory))
    shape = {name: getattr(cfg, name) for name in base.siglip_shape()}
    return base.model_copy(update={**shape, "pretrained_dir": str(directory)})


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


def _map_llada_names(
    source: dict[str, torch.Tensor], num_layers: int, num_experts: int
) -> dict[str, torch.Tensor]:
    """LLaDA-MoE/OLMoE names → DiMoE names, stacking per-expert weights into the fused layout."""
    strip = {k.removeprefix("model."): v for k, v in source.items()}
    mapped = {k: v for k, v in strip.items() if ".mlp.experts." not in k}
    for i in range(num_layers):
        prefix = f"layers.{i}.mlp.experts"
        if f"{prefix}.gate_up_proj" in strip:
            mapped[f"{prefix}.gate_up_proj"] = strip[f"{prefix}.gate_up_proj"]
            mapped[f"{prefix}.down_proj"] = strip[f"{prefix}.down_proj"]
            continue
        try:
            gate_up = [
                torch.cat([strip[f"{prefix}.{j}.gate_proj.weight"], strip[f"{prefix}.{j}.up_proj.weight"]])
                for j in range(num_experts)
            ]
            down = [strip[f"{prefix}.{j}.down_proj.weight"] for j in range(num_experts)]
        except KeyError as exc:
            raise ImportErrorDetail(f"backbone checkpoint lacks expert weight {exc.args[0]!r}") from None
        mapped[f"{prefix}.gate_up_proj"] = torch.stack(gate_up)
        mapped[f"{prefix}.down_proj"] = torch.stack(down)
    return mapped


@torch.no_grad()
def import_llada_backbone(model: DiMoEVLModel, directory: str | Path) -> dict[str, list[str]]:
    """Copy LLaDA-MoE weights into `model`'s backbone. Rows of the embedding/LM head beyond the
    checkpoint's vocabulary (tokens DiMoE-VL added, such as `<image>`) keep their fresh init, set
    to the mean embedding so they start in-distribution."""
    directory = Path(directory)
    cfg = model.config
    source = _map_llada_names(_read_safetensors(directory), cfg.num_hidden_layers, cfg.num_experts)
    target = {k: v for k, v in model.state_dict().items() if not k.startswith("vision.")}
    problems, loaded = [], []
    for name, tensor in source.items():
        if name not in target:
            continue
        dest = target[name]
        if name in ("embed_tokens.weight", "lm_head.weight") and tensor.shape[0] <= dest.shape[0]:
            dest[: tensor.shape[0]] = tensor.to(dest.dtype)
            dest[tensor.shape[0] :] = tensor.float().mean(0).to(dest.dtype)
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
    result = model.vision.encoder.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise ImportErrorDetail(f"SigLIP at {directory} lacks {result.missing_keys[:10]}")
    return len(state)
