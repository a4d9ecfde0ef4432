"""Vision tower: SigLIP (from `transformers`) → chosen hidden layer → optional 2×2 pooling →
2-layer GELU MLP projector into the backbone width → optional learned position per image token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import SiglipVisionConfig, SiglipVisionModel

from .config import DiMoEConfig


class VisionTower(nn.Module):
    """The tower of `config` (`vision_config`, `vision_feature_layer`, `vision_pool_2x2`,
    `vision_position_embedding`, `num_image_tokens`)."""

    def __init__(self, config: DiMoEConfig) -> None:
        super().__init__()
        self.encoder = SiglipVisionModel(SiglipVisionConfig(**config.vision_config))
        self.feature_layer = config.vision_feature_layer
        self.pool_2x2 = config.vision_pool_2x2
        width, hidden = config.vision_config["hidden_size"], config.hidden_size
        self.projector = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        # [N, hidden], row-major over the token grid; the model's `_init_weights` draws it
        self.position = (
            nn.Parameter(torch.empty(config.num_image_tokens, hidden))
            if config.vision_position_embedding
            else None
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
        tokens = self.projector(features)
        return tokens if self.position is None else tokens + self.position
