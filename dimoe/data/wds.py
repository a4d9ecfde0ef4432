"""A blend as WebDataset tar shards (stdlib `tarfile`): `dimoe data build-wds`, and the reader
with which `data.format: webdataset` training ingests them through Ray Data.

Each sample is a group of tar members sharing a key (the zero-padded row number in the blend):
``<key>.json`` holds every column except the image, ``<key>.<ext>`` the original image bytes
(``png``, ``jpg``, …) when the row has one (and `include_image`). Members are written in blend
order with fixed owner, mode and mtime, so the same blend gives byte-identical shards.
`index.json` beside the shards counts the samples, so a trainer can size its batches without
reading the shards; `ray.data.read_webdataset(dir)` reads the shards as they are.
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

from dimoe.config.data import WebDatasetConfig
from dimoe.data.images import ALLOWED_FORMATS
from dimoe.data.normalize import NormalizeError
from dimoe.errors import UserError
from dimoe.io import read_json, write_json

_EXTENSIONS = {"JPEG": "jpg"}  # otherwise the lower-case Pillow format name
IMAGE_EXTENSIONS = tuple(_EXTENSIONS.get(name, name.lower()) for name in ALLOWED_FORMATS)
INDEX_FILE = "index.json"


def default_output_dir(blend_dir: str | Path) -> Path:
    """<data_dir>/webdataset/<blend> for a blend at <data_dir>/blends/<blend>."""
    blend_dir = Path(blend_dir)
    return blend_dir.parent.parent / "webdataset" / blend_dir.name


def build_webdataset(config: WebDatasetConfig) -> dict[str, Any]:
    """`dimoe data build-wds`: the blend `config.source` as shards in `config.output_dir`."""
    out_dir = config.output_dir or default_output_dir(config.source)
    return export_webdataset(config.source, out_dir, config.shard_size, config.include_image)


def export_webdataset(
    blend_dir: str | Path, out_dir: str | Path, samples_per_shard: int = 1000, include_image: bool = True
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
                _add_sample(tar, f"{samples:09d}", row, include_image)
                samples += 1
    index = {
        "blend_dir": str(blend_dir),
        "samples": samples,
        "shards": shards,
        "include_image": include_image,
    }
    write_json(out_dir / INDEX_FILE, index)
    return {**index, "out_dir": str(out_dir)}


def count_samples(shard_dir: str | Path) -> int:
    """Samples in a shard directory, from its index."""
    index = Path(shard_dir) / INDEX_FILE
    if not index.is_file():
        raise UserError(f"{shard_dir} has no {INDEX_FILE}: write the shards with `dimoe data build-wds`")
    return int(read_json(index)["samples"])


def training_row(sample: dict[str, Any]) -> dict[str, Any]:
    """A sample as `ray.data.read_webdataset(dir, decoder=None)` yields it (member bytes by
    extension) → the columns training reads from a Parquet blend."""
    row = json.loads(sample["json"])
    images = [sample.get(ext) for ext in IMAGE_EXTENSIONS]
    image = next((data for data in images if isinstance(data, bytes)), None)
    return {"input_ids": row["input_ids"], "prompt_length": row["prompt_length"], "image": image}


def _iter_rows(files: list[Path]) -> Iterator[dict[str, Any]]:
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            yield from batch.to_pylist()


def _add_sample(tar: tarfile.TarFile, key: str, row: dict[str, Any], include_image: bool) -> None:
    image = row.pop("image", None)
    _add_member(tar, f"{key}.json", json.dumps(row, ensure_ascii=False).encode("utf-8"))
    if image is not None and include_image:
        with Image.open(io.BytesIO(image)) as opened:  # header only: the format names the extension
            extension = _EXTENSIONS.get(opened.format, opened.format.lower())
        _add_member(tar, f"{key}.{extension}", image)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))
