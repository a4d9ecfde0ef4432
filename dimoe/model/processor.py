"""Image preprocessing for the SigLIP tower (resize, rescale, normalise) via `transformers`, and the
`AutoProcessor` of a checkpoint.

Every saved checkpoint ships a copy of this file (`auto_map`, `trust_remote_code`), so it imports
only torch, transformers and pillow.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature
from transformers.processing_utils import ProcessorMixin

try:  # the PIL backend needs no torchvision; newer transformers name it explicitly
    from transformers import SiglipImageProcessorPil as SiglipProcessor
except ImportError:  # pragma: no cover - older transformers
    from transformers import SiglipImageProcessor as SiglipProcessor


def siglip_processor(image_size: int) -> SiglipProcessor:
    return SiglipProcessor(size={"height": image_size, "width": image_size})


class ImageProcessor:
    def __init__(self, image_size: int) -> None:
        self.image_size = image_size
        self._processor = siglip_processor(image_size)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """PIL images → pixel values [n, 3, S, S]; an empty list gives [0, 3, S, S]."""
        if not images:
            return torch.zeros(0, 3, self.image_size, self.image_size)
        rgb = [im.convert("RGB") for im in images]
        return self._processor(images=rgb, return_tensors="pt")["pixel_values"]


class DiMoEProcessor(ProcessorMixin):
    """SigLIP preprocessing and the tokenizer, with every `image_token` of the text expanded to the
    model's `num_image_tokens` copies, where the model writes the image's features:

        processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        inputs = processor(images=[image], text=text)   # input_ids, attention_mask, pixel_values
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int = 0,
        image_token: str = "<image>",
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.num_image_tokens = num_image_tokens
        self.image_token = image_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(  # type: ignore[override]
        self,
        images: Any = None,
        text: str | list[str] | None = None,
        return_tensors: str = "pt",
        **kwargs: Any,
    ) -> BatchFeature:
        """Rendered text (chat template applied, special tokens included) → left-padded ids; images
        → `pixel_values`, one per `image_token` in the text."""
        data: dict[str, Any] = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            expanded = [t.replace(self.image_token, self.image_token * self.num_image_tokens) for t in texts]
            data.update(self.tokenizer(expanded, add_special_tokens=False, padding=True, **kwargs))
        if images is not None:
            images = images if isinstance(images, list | tuple) else [images]
            data.update(self.image_processor(images=[im.convert("RGB") for im in images]))
        return BatchFeature(data, tensor_type=return_tensors)
