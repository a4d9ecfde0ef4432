"""Parameter accounting: total and active (per-token) parameters.

Active parameters are those a token's forward pass multiplies through in the backbone: attention,
norms, router, the top-k routed experts (k/E of the routed-expert weights), the shared expert,
the dense FFN of dense layers and the LM head. The input embedding is a lookup, not compute, so it
is not active. The vision tower and projector run once per image, not once per denoising step, so
they are reported separately and kept out of "active": NFE × active parameters then measures
decoding compute.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from dimoe.model.modeling import DiMoEVLModel
from dimoe.model.moe import MoEBlock


@dataclass(frozen=True)
class ParamReport:
    total: int  # every parameter, vision included
    backbone_total: int
    backbone_active: int
    vision: int  # SigLIP tower + projector

    @property
    def active_b(self) -> float:
        return self.backbone_active / 1e9

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "active_b": self.active_b}


def count_parameters(model: DiMoEVLModel) -> ParamReport:
    """Works on a model on the `meta` device too (paper-scale configs)."""
    config = model.config
    vision = sum(p.numel() for p in model.vision.parameters()) if model.vision is not None else 0
    total = sum(p.numel() for p in model.parameters())
    backbone_total = total - vision
    routed = sum(
        layer.mlp.experts.gate_up_proj.numel() + layer.mlp.experts.down_proj.numel()
        for layer in model.layers
        if isinstance(layer.mlp, MoEBlock)
    )
    idle_routed = routed * (config.num_experts - config.num_experts_per_tok) // config.num_experts
    active = backbone_total - idle_routed - model.embed_tokens.weight.numel()
    return ParamReport(total, backbone_total, active, vision)
