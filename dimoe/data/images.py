"""Image references → verified encoded bytes, shared by data preparation, inference and serving.

A reference is either a path relative to a datasets root or a ``data:image/...;base64,`` URL.
Absolute paths, ``..`` escapes (symlinks included) and remote URLs are refused: records come from
untrusted dumps and requests, and must not read arbitrary files or reach the network.
Images are checked in three steps, cheapest first: the byte size, the size the header declares
(before any pixel is decoded, so a decompression bomb costs nothing) and a full decode.
The original encoded bytes are kept (no re-encoding), so normalized data stays bit-exact.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

from PIL import Image

from dimoe.errors import UserError

# Decoders Pillow may try; the rest of its many formats is attack surface we do not need.
ALLOWED_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_BYTES = 32 * 2**20


class ImageError(UserError):
    """An image that cannot be used; ``reason`` is a short code for reject tables and HTTP errors."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_image_bytes(
    ref: str,
    root: str | Path | None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> tuple[bytes, int, int]:
    """Resolve `ref` (relative path under `root`, or a base64 data URL), verify it decodes,
    and return ``(encoded_bytes, width, height)``."""
    data = read_image_ref(ref, root, max_bytes=max_bytes)
    width, height = verify_image(data, max_pixels=max_pixels)
    return data, width, height


def read_image_ref(ref: str, root: str | Path | None, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The encoded bytes behind `ref`, without decoding them."""
    if ref.startswith("data:"):
        return _decode_data_url(ref, max_bytes)
    if "://" in ref:
        raise ImageError(
            "unsupported_image_ref",
            f"image {ref[:80]!r}: remote URLs are not fetched; download the file under the datasets root "
            "or send it as a data: URL",
        )
    if root is None:
        raise ImageError(
            "unsupported_image_ref", f"image path {ref!r} given but no datasets root to resolve it in"
        )
    path = resolve_under_root(ref, root)
    if not path.is_file():
        raise ImageError("missing_image", f"image file not found: {ref!r} (looked for {path})")
    size = path.stat().st_size
    if size > max_bytes:
        raise ImageError(
            "image_too_large", f"image {ref!r} is {size} bytes, more than the limit of {max_bytes}"
        )
    return path.read_bytes()


def resolve_under_root(ref: str, root: str | Path) -> Path:
    """`root/ref` resolved, refusing absolute references and anything that lands outside `root`."""
    if PurePosixPath(ref).is_absolute() or PureWindowsPath(ref).is_absolute():
        raise ImageError(
            "image_outside_root", f"image path {ref!r} is absolute; use a path relative to the datasets root"
        )
    base = Path(root).resolve()
    path = (base / ref).resolve()  # resolves `..` and symlinks, so both kinds of escape are caught
    if not path.is_relative_to(base):
        raise ImageError("image_outside_root", f"image path {ref!r} points outside the datasets root {base}")
    return path


def verify_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Check that `data` is a complete image of an allowed format within `max_pixels`; return its size."""
    with _open_checked(data, max_pixels) as image:
        size = image.size
        image.verify()  # checksums and structure; the image object is unusable afterwards
    with _open_checked(data, max_pixels) as image:
        image.load()  # a full decode catches truncated pixel data that verify() lets through
    return size


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, mode: str = "RGB") -> Image.Image:
    """Decode encoded image bytes into a loaded PIL image converted to `mode`."""
    with _open_checked(data, max_pixels) as image:
        image.load()
        return image.convert(mode)


@contextmanager
def _open_checked(data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """Open `data` lazily (header only), refuse oversized images, map decoder errors to ImageError."""
    try:
        with warnings.catch_warnings():
            # Pillow only warns between its bomb threshold and twice that; treat it as the error it is.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as image:
                width, height = image.size
                if width * height > max_pixels:
                    raise ImageError(
                        "image_too_large",
                        f"image declares {width}x{height} = {width * height} pixels, "
                        f"more than the limit of {max_pixels}",
                    )
                yield image
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError("image_too_large", f"image too large to decode safely: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageError(
            "bad_image", f"not a readable {'/'.join(ALLOWED_FORMATS)} image: {type(exc).__name__}: {exc}"
        ) from None


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64") or not header[len("data:") :].startswith("image/"):
        raise ImageError(
            "bad_image_ref", f"data URL {url[:40]!r}…: expected data:image/<type>;base64,<payload>"
        )
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageError("image_too_large", f"data URL image is larger than the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(payload, validate=True)
    except binascii.Error as exc:
        raise ImageError("bad_image_ref", f"data URL payload is not valid base64: {exc}") from None
