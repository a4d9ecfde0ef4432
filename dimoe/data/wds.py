"""Export a blend as WebDataset tar shards (stdlib `tarfile`), for loaders outside Ray Data.

Each sample is a group of tar members sharing a key (the zero-padded row number in the blend):
``<key>.json`` holds every column except the image, ``<key>.<ext>`` the original image bytes
(``png``, ``jpg``, …) when the row has one. Members are written in blend order with fixed
owner, mode and mtime, so the same blend gives byte-identical shards.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image

from dimoe.data.normalize import NormalizeError
from dimoe.errors import UserError

_EXTENSIONS = {"JPEG": "jpg"}  # otherwise the lower-case Pillow format name


def export_webdataset(
    blend_dir: str | Path, out_dir: str | Path, samples_per_shard: int = 1000
) -> dict[str, Any]:
    """Write `blend_dir/*.parquet` as `out_dir/shard-000000.tar`, …; returns shard names and counts."""
    blend_dir, out_dir = Path(blend_dir), Path(out_dir)
    files = sorted(blend_dir.glob("*.parquet"))
    if not files:
        raise NormalizeError(f"no Parquet files in {blend_dir}; build the blend first")
    if samples_per_shard < 1:
        raise UserError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = _iter_rows(files)
    shards: list[str] = []
    samples = 0
    while chunk := list(islice(rows, samples_per_shard)):
        shards.append(f"shard-{len(shards):06d}.tar")
        with tarfile.open(out_dir / shards[-1], "w", format=tarfile.USTAR_FORMAT) as tar:
            for row in chunk:
                _add_sample(tar, f"{samples:09d}", row)
                samples += 1
    return {"blend_dir": str(blend_dir), "out_dir": str(out_dir), "samples": samples, "shards": shards}


def _iter_rows(files: list[Path]) -> Iterator[dict[str, Any]]:
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()


def _add_sample(tar: tarfile.TarFile, key: str, row: dict[str, Any]) -> None:
    image = row.pop("image", None)
    _add_member(tar, f"{key}.json", json.dumps(row, ensure_ascii=False).encode("utf-8"))
    if image is not None:
        with Image.open(io.BytesIO(image)) as opened:  # header only: the format names the extension
            extension = _EXTENSIONS.get(opened.format, opened.format.lower())
        _add_member(tar, f"{key}.{extension}", image)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))
