"""Vision tower: SigLIP (from `transformers`) → chosen hidden layer → optional 2×2 pooling →
2-layer GELU MLP projector into the backbone width."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel


class VisionTower(nn.Module):
    def __init__(
        self, vision_config: dict[str, Any], hidden_size: int, feature_layer: int, pool_2x2: bool
    ) -> None:
        super().__init__()
        self.encoder = SiglipVisionModel(SiglipVisionConfig(**vision_config))
        self.feature_layer = feature_layer
        self.pool_2x2 = pool_2x2
        width = vision_config["hidden_size"]
        self.projector = nn.Sequential(
            nn.Linear(width, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, H, W] (SigLIP-normalised) → image tokens [B, N, hidden]."""
        out = self.encoder(pixel_values=pixel_values, output_hidden_states=True)
        features = out.hidden_states[self.feature_layer]  # [B, P, width]
        if self.pool_2x2:
            b, patches, width = features.shape
            grid = int(patches**0.5)
            features = features.transpose(1, 2).reshape(b, width, grid, grid)
            features = F.avg_pool2d(features, 2, ceil_mode=True).flatten(2).transpose(1, 2)
        return self.projector(features)
