"""Config schemas of the data pipeline: `NormalizeConfig` (raw → normalized Parquet),
`BlendConfig` (normalized Parquet → seeded per-stage training mixtures) and `WebDatasetConfig`
(a blend → WebDataset tar shards)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from dimoe.config.base import StrictModel

# The four source stages of the curriculum (DESIGN §1): one directory of normalized Parquet each.
STAGES = ("stage1_projector", "stage2_llm", "stage3_vision", "stage4_joint")
Split = Literal["train", "val", "test"]
SPLITS: tuple[str, ...] = ("train", "val", "test")


class NormalizeConfig(StrictModel):
    """How `dimoe data normalize` turns raw JSON/JSONL + images into normalized Parquet."""

    # Input files: `*.json` (a JSON array of records, or one record) and `*.jsonl` directly in the
    # input directory. A file belongs to the stage its name starts with, unless `stage_of` says otherwise.
    stages: list[str] = Field(default_factory=lambda: list(STAGES), min_length=1)
    stage_of: dict[str, str] = Field(
        default_factory=dict, description="file name → stage, overrides the prefix"
    )
    # Split of records without a `split` field whose file name has no `_train`/`_val`/`_test` suffix.
    default_split: Split = "train"

    num_image_tokens: int = Field(4, ge=1, description="copies of <image> one image expands to")
    max_seq_len: int = Field(256, ge=8, description="longer samples are rejected (reason too_long)")
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_image_bytes: int = Field(32 * 2**20, ge=1)

    # Execution: actors that parse + tokenize (None = one per CPU of the cluster), rows per map batch,
    # rows per input block (the unit of parallelism) and the minimum rows per output Parquet file.
    num_actors: int | None = Field(None, ge=1)
    batch_size: int = Field(256, ge=1)
    rows_per_block: int = Field(1000, ge=1)
    rows_per_file: int = Field(100_000, ge=1)
    progress: bool = True


class BlendSpec(StrictModel):
    """One training mixture: rows per source stage = round(weight share × size)."""

    sources: dict[str, Annotated[float, Field(gt=0)]] = Field(min_length=1)
    size: int = Field(gt=0)
    replace: bool = False
    seed: int = 0
    max_seq_len: int | None = Field(None, ge=1)
    split: Split = "train"


class BlendConfig(StrictModel):
    """`dimoe data build-stage-blends`: which mixtures to build from which normalized data."""

    data_dir: str = "artifacts/data/v1"
    out_dir: str | None = Field(None, description="defaults to <data_dir>/blends")
    rows_per_file: int = Field(100_000, ge=1)
    progress: bool = True
    blends: dict[str, BlendSpec] = Field(min_length=1)


class WebDatasetConfig(StrictModel):
    """`dimoe data build-wds`: one blend written as WebDataset tar shards."""

    source: str = "artifacts/data/v1/blends/stage2_full"  # a blend directory of Parquet files
    # None: <data_dir>/webdataset/<blend> beside the source's `blends/`, where `data.format:
    # webdataset` training reads it.
    output_dir: str | None = None
    shard_size: int = Field(1000, ge=1)  # samples per shard
    include_image: bool = True  # False: the JSON members only (for text consumers)
