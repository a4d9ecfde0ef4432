"""Image preprocessing for the SigLIP tower (resize, rescale, normalise) via `transformers`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

try:  # the PIL backend needs no torchvision; newer transformers name it explicitly
    from transformers import SiglipImageProcessorPil as _SiglipProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import SiglipImageProcessor as _SiglipProcessor


class ImageProcessor:
    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self._processor = _SiglipProcessor(size={"height": image_size, "width": image_size})

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images → pixel values [n, 3, S, S]; an empty list gives [0, 3, S, S]."""
        if not images:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        rgb = [im.convert("RGB") for im in images]
        return self._processor(images=rgb, return_tensors="pt")["pixel_values"]
