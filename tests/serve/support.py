"""Constants and helpers shared by the serving tests."""

import base64
import io
from typing import Any

from PIL import Image

from dimoe.infer.engine import GenerationEngine
from dimoe.infer.inputs import Request, Result

API_KEY = "test-key-123"
MODEL = "dimoe-vl-test"
LIMITS = {"max_tokens": 64, "max_image_bytes": 64 * 2**10, "max_request_bytes": 512 * 2**10}


def png_bytes(size: int = 32, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def direct(engine: GenerationEngine, request: Request, **overrides: Any) -> Result:
    """What the engine decodes for `request` with preset fast and max_tokens 16, which the server
    turns into one 16-token block in fast's 8 steps."""
    return engine.generate([request], preset="fast", gen_length=16, block_length=16, steps=8, **overrides)[0]
