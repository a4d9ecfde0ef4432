"""LoRA on the backbone through peft (Hu et al. 2021, arXiv:2106.09685): W' = W + (alpha / r)·B·A,
with A [r, in] and B [out, r] trained and W frozen.

The backbone's nn.Linear layers take peft's `lora.Linear`; the fused expert weights [E, out, in]
take peft's `target_parameters` (`lora.ParamWrapper`: one rank-r pair per expert). Targets are
matched inside the decoder layers only, so the SigLIP tower's own q/k/v projections are never
adapted: the vision side is frozen or fully trained by its group, as without LoRA. The run writes
peft's adapter folder (adapter_config.json, adapter_model.safetensors) and the merged weights as
an ordinary checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dimoe.config.loader import ConfigError
from dimoe.config.train import LoraSpec

EXPERT_TARGETS = ("experts.gate_up_proj", "experts.down_proj")
ADAPTER_DIR = "adapter"


def is_lora_parameter(name: str) -> bool:
    """Whether a parameter (by its name in the peft-wrapped model) belongs to a LoRA adapter."""
    return ".lora_A." in name or ".lora_B." in name


def apply_lora(model: torch.nn.Module, spec: LoraSpec) -> Any:
    """`model` wrapped by peft with adapters on `spec.target_modules` of its decoder layers."""
    from peft import LoraConfig, get_peft_model

    linear = [t for t in spec.target_modules if t not in EXPERT_TARGETS]
    experts = [t for t in spec.target_modules if t in EXPERT_TARGETS]
    if experts and spec.dropout > 0:
        raise ConfigError(
            f"lora.dropout {spec.dropout}: peft's LoRA on the fused expert weights ({', '.join(experts)}) "
            "has no dropout; set lora.dropout: 0 or drop those targets"
        )
    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        # A regex is matched against the whole module name: decoder layers only, not the vision tower.
        target_modules=rf"layers\.\d+\.(.*\.)?({'|'.join(linear)})" if linear else [],
        target_parameters=experts or None,
    )
    return get_peft_model(model, config)


def export_lora(model: Any, tokenizer: Any, stage_dir: Path) -> Path:
    """peft's adapter folder at `<stage>/adapter`, then the merged weights at `<stage>/final` (a
    checkpoint like any other). Merging writes into the base weights, so this ends the run."""
    from dimoe.model.build import save_checkpoint

    model.save_pretrained(stage_dir / ADAPTER_DIR)
    merged = model.merge_and_unload()
    return save_checkpoint(merged, tokenizer, stage_dir / "final")
