"""Raw JSON/JSONL conversations + images → normalized, tokenized Parquet per source stage (Ray Data).

Pipeline: the driver splits input files into raw records (bytes + origin), so that a broken line
becomes a reject instead of failing a Ray read task; Ray Data then runs parse → validate →
resolve/verify image → tokenize in a pool of actors (each loads the tokenizer once) and the
result is written as Parquet, one directory per source stage plus `rejects/`:

    out_dir/stage1_projector/*.parquet … out_dir/stage4_joint/*.parquet, out_dir/rejects/*.parquet
    out_dir/normalize_summary.json

Every raw record yields exactly one output row, normalized or rejected with a reason, and the
summary checks that read = written + rejected for every source. The output directory is built
under a temporary name and renamed into place, so readers never see half a dataset.

Memory: the driver holds the raw record text (not the images) while it hands it to Ray; the
processed rows are materialized once in the object store (which spills to disk) and then
written per stage, so the actors run only once.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
from ray.data import ActorPoolStrategy, DataContext, Dataset
from ray.data.expressions import col

from dimoe.config.data import SPLITS, NormalizeConfig
from dimoe.config.loader import ConfigError
from dimoe.data.chat import ChatFormatError, encode_chat, encode_plain_text
from dimoe.data.formats import RecordFormatError, parse_record_text
from dimoe.data.images import ImageError, load_image_bytes
from dimoe.data.tokenizer import load_tokenizer
from dimoe.errors import UserError
from dimoe.io import atomic_output_dir, ensure_ray, write_json

SUMMARY_FILE = "normalize_summary.json"
REJECTS_DIR = "rejects"
# Rejected raw text is kept for debugging, cut at this length so that one broken multi-GB
# JSON array cannot blow up the rejects table.
MAX_REJECT_RAW_CHARS = 65_536

NORMALIZED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("origin", pa.string()),  # "<file>:<line>" or "<file>[<index>]": unique, points at the raw record
        ("source", pa.string()),
        ("stage", pa.string()),
        ("split", pa.string()),
        ("messages", pa.string()),  # JSON [{"role", "content"}], the image as the <image> placeholder
        ("image", pa.binary()),  # original encoded bytes, null for text-only samples
        ("image_width", pa.int32()),
        ("image_height", pa.int32()),
        ("input_ids", pa.list_(pa.int32())),
        ("prompt_length", pa.int32()),
        ("answer_length", pa.int32()),
        ("num_image_tokens", pa.int32()),
        ("seq_len", pa.int32()),
    ]
)
REJECT_SCHEMA = pa.schema(
    [
        ("origin", pa.string()),
        ("source", pa.string()),
        ("stage", pa.string()),
        ("reason", pa.string()),  # short code, e.g. bad_json, missing_image, too_long
        ("detail", pa.string()),  # the human-readable message
        ("raw", pa.string()),
    ]
)
# What the actors emit: both kinds of row in one table, `reason` null for normalized rows.
_COMBINED_SCHEMA = pa.schema(
    list(NORMALIZED_SCHEMA) + [f for f in REJECT_SCHEMA if f.name not in NORMALIZED_SCHEMA.names]
)
_SPLIT_SUFFIX = re.compile(r"[._-](train|val|test)$")


class NormalizeError(UserError):
    """Inputs that cannot be normalized as given (missing directory, unassignable file, …)."""


# ---------------------------------------------------------------- Ray Data helpers


@contextmanager
def data_context(progress: bool) -> Iterator[DataContext]:
    """Ordered execution (reproducible row order) for the datasets created inside the block, and
    Ray Data's progress reporting only when `progress` is on: off, its bars and its INFO lines
    (execution plans, periodic progress logged when stdout is not a terminal) are silenced, so a
    caller that shows its own progress is not interleaved with them. Warnings still show. The
    previous global settings are restored afterwards."""
    ctx = DataContext.get_current()
    logger = logging.getLogger("ray.data")
    saved = ctx.enable_progress_bars, ctx.execution_options.preserve_order, logger.level
    ctx.enable_progress_bars, ctx.execution_options.preserve_order = progress, True
    if not progress:
        logger.setLevel(logging.WARNING)
    try:
        yield ctx
    finally:
        ctx.enable_progress_bars, ctx.execution_options.preserve_order, level = saved
        logger.setLevel(level)


def write_parquet(ds: Dataset, path: Path, rows_per_file: int) -> None:
    """Write `ds` as Parquet under `path` (created even when `ds` is empty). File names carry a
    random write id but sort in block order, so reading the sorted files gives the dataset order."""
    path.mkdir(parents=True, exist_ok=True)
    ds.write_parquet(str(path), min_rows_per_file=rows_per_file)


# ---------------------------------------------------------------- reading raw records


@dataclass(frozen=True)
class InputFile:
    path: Path
    source: str  # the file name without extension
    stage: str
    split_hint: str | None  # from a `_train`/`_val`/`_test` name suffix


def discover_inputs(in_dir: Path, config: NormalizeConfig) -> list[InputFile]:
    """The `*.json` / `*.jsonl` files of `in_dir` with their stage, in name order."""
    if not in_dir.is_dir():
        raise NormalizeError(f"input directory not found: {in_dir}")
    paths = sorted(p for p in in_dir.iterdir() if p.is_file() and p.suffix in (".json", ".jsonl"))
    if not paths:
        raise NormalizeError(f"no *.json or *.jsonl files in {in_dir}")
    unknown_files = sorted(set(config.stage_of) - {p.name for p in paths})
    if unknown_files:
        raise ConfigError(f"stage_of names files that are not in {in_dir}: {unknown_files}")
    bad_stages = sorted(set(config.stage_of.values()) - set(config.stages))
    if bad_stages:
        raise ConfigError(
            f"stage_of maps files to unknown stages {bad_stages}; known stages: {config.stages}"
        )
    return [_input_file(p, config) for p in paths]


def _input_file(path: Path, config: NormalizeConfig) -> InputFile:
    source = path.stem
    stage = config.stage_of.get(path.name) or next(
        (s for s in config.stages if source == s or re.match(rf"{re.escape(s)}[._-]", source)), None
    )
    if stage is None:
        raise NormalizeError(
            f"input file {path.name}: its name starts with none of the stages {config.stages}; "
            f"rename it (e.g. {config.stages[0]}_{path.name}) or map it with stage_of"
        )
    match = _SPLIT_SUFFIX.search(source)
    return InputFile(path, source, stage, match.group(1) if match else None)


def read_raw_records(files: list[InputFile]) -> list[dict[str, Any]]:
    """Split every file into raw records: one per non-blank JSONL line, one per element of a
    `.json` array. A `.json` file that is not a valid array stays one record (the actors
    then reject it or, for a single JSON object, parse it)."""
    rows = []
    for file in files:
        data = file.path.read_bytes()
        for origin, raw in _split_records(file.path.name, data):
            rows.append(
                {
                    "origin": origin,
                    "source": file.source,
                    "stage": file.stage,
                    "split_hint": file.split_hint,
                    "raw": raw,
                }
            )
    return rows


def _split_records(name: str, data: bytes) -> Iterator[tuple[str, bytes]]:
    if name.endswith(".jsonl"):
        for number, line in enumerate(data.split(b"\n"), start=1):
            if line.strip():
                yield f"{name}:{number}", line.rstrip(b"\r")
        return
    try:
        records = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        records = None
    if isinstance(records, list):
        for index, record in enumerate(records):
            yield f"{name}[{index}]", json.dumps(record, ensure_ascii=False).encode("utf-8")
    else:
        yield f"{name}", data


# ---------------------------------------------------------------- the per-record work


class RecordNormalizer:
    """Ray Data class UDF: raw record batch → normalized-or-rejected rows (`_COMBINED_SCHEMA`).

    Usable without Ray too: `RecordNormalizer(...).normalize_row(row)`.
    """

    def __init__(self, tokenizer_dir: str, datasets_root: str, config: NormalizeConfig) -> None:
        self.tokenizer = load_tokenizer(tokenizer_dir)
        self.datasets_root = datasets_root
        self.config = config

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(
            [self.normalize_row(row) for row in batch.to_pylist()], schema=_COMBINED_SCHEMA
        )

    def normalize_row(self, row: dict[str, Any]) -> dict[str, Any]:
        base = {"origin": row["origin"], "source": row["source"], "stage": row["stage"]}
        try:
            return {**base, **self._normalize(row)}
        except (RecordFormatError, ImageError) as exc:
            reason, detail = exc.reason, str(exc)
        except ChatFormatError as exc:  # the schema is valid; the <image> placeholder use is not
            reason, detail = "image_placeholder", str(exc)
        raw = row["raw"].decode("utf-8", errors="backslashreplace")[:MAX_REJECT_RAW_CHARS]
        return {**base, "reason": reason, "detail": detail, "raw": raw}

    def _normalize(self, row: dict[str, Any]) -> dict[str, Any]:
        try:
            text = row["raw"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RecordFormatError("not_utf8", f"record is not valid UTF-8: {exc}") from None
        conversation = parse_record_text(text)
        split = conversation.split or row["split_hint"] or self.config.default_split
        if split not in SPLITS:
            raise RecordFormatError("bad_split", f"split {split!r} is not one of {list(SPLITS)}")
        image, width, height = None, None, None
        if conversation.image is not None:
            image, width, height = load_image_bytes(
                conversation.image,
                self.datasets_root,
                max_pixels=self.config.max_image_pixels,
                max_bytes=self.config.max_image_bytes,
            )
        if conversation.format == "text":
            encoded = encode_plain_text(self.tokenizer, conversation.messages[0].content)
        else:
            image_tokens = self.config.num_image_tokens if image is not None else 0
            encoded = encode_chat(self.tokenizer, list(conversation.messages), num_image_tokens=image_tokens)
        if len(encoded.input_ids) > self.config.max_seq_len:
            raise RecordFormatError(
                "too_long",
                f"{len(encoded.input_ids)} tokens > max_seq_len={self.config.max_seq_len}; "
                "shorten the sample or raise max_seq_len",
            )
        return {
            "id": conversation.record_id or row["origin"],
            "split": split,
            "messages": conversation.messages_json(),
            "image": image,
            "image_width": width,
            "image_height": height,
            "input_ids": encoded.input_ids,
            "prompt_length": encoded.prompt_length,
            "answer_length": encoded.answer_length,
            "num_image_tokens": encoded.num_image_tokens,
            "seq_len": len(encoded.input_ids),
        }


# ---------------------------------------------------------------- the job


def normalize(
    in_dir: str | Path,
    out_dir: str | Path,
    tokenizer_dir: str | Path,
    datasets_root: str | Path | None = None,
    config: NormalizeConfig | None = None,
) -> dict[str, Any]:
    """Normalize every raw file of `in_dir` into `out_dir` (layout in the module docstring).

    Image paths resolve under `datasets_root` (default: `in_dir`). Returns the summary that is
    also written to `out_dir/normalize_summary.json`.
    """
    config = config or NormalizeConfig()
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    root = Path(datasets_root) if datasets_root is not None else in_dir
    load_tokenizer(tokenizer_dir)  # fail here, with a clear message, rather than in every actor
    marks = [time.perf_counter()]

    def lap() -> float:
        """Seconds since the previous lap (for the summary's `timings_s`)."""
        marks.append(time.perf_counter())
        return round(marks[-1] - marks[-2], 3)

    files = discover_inputs(in_dir, config)
    raw_rows = read_raw_records(files)
    if not raw_rows:
        raise NormalizeError(f"the input files in {in_dir} hold no records")
    read_counts = Counter(row["source"] for row in raw_rows)
    timings = {"read": lap()}
    ensure_ray()
    num_blocks = math.ceil(len(raw_rows) / config.rows_per_block)
    num_actors = min(num_blocks, config.num_actors or max(1, int(ray.cluster_resources().get("CPU", 1))))
    with data_context(config.progress), atomic_output_dir(out_dir, SUMMARY_FILE) as tmp:
        processed = _process(raw_rows, num_blocks, num_actors, str(tokenizer_dir), str(root), config)
        del raw_rows  # processed; free the driver's copy before the writes
        timings["process"] = lap()  # includes starting the actors (imports, tokenizer load)
        # Built-in expressions, not Python UDFs: the write tasks then need no import of this package.
        for stage in config.stages:
            rows = processed.filter(expr=col("reason").is_null() & (col("stage") == stage))
            write_parquet(rows.select_columns(NORMALIZED_SCHEMA.names), tmp / stage, config.rows_per_file)
        rejects = processed.filter(expr=col("reason").is_not_null()).select_columns(REJECT_SCHEMA.names)
        write_parquet(rejects, tmp / REJECTS_DIR, config.rows_per_file)
        timings["write"] = lap()
        summary = _summarize(processed, read_counts, files)
        timings["summarize"] = lap()
        seconds = round(marks[-1] - marks[0], 3)
        summary.update(
            in_dir=str(in_dir),
            out_dir=str(out_dir),
            tokenizer_dir=str(tokenizer_dir),
            datasets_root=str(root),
            config=config.model_dump(mode="json"),
            num_actors=num_actors,
            seconds=seconds,
            timings_s=timings,
            rows_per_second=round(summary["totals"]["read"] / max(seconds, 1e-9), 1),
        )
        write_json(tmp / SUMMARY_FILE, summary)
    return summary


def _process(
    raw_rows: list[dict[str, Any]], num_blocks: int, num_actors: int, tokenizer_dir: str, datasets_root: str,
    config: NormalizeConfig,
) -> Dataset:  # fmt: skip
    """Parse → validate → image → tokenize every raw record in a pool of `RecordNormalizer` actors
    (each loads the tokenizer once), materialized so the per-stage writes do not run them again."""
    return (
        ray.data.from_items(raw_rows, override_num_blocks=num_blocks)
        .map_batches(
            RecordNormalizer,
            fn_constructor_kwargs={
                "tokenizer_dir": tokenizer_dir,
                "datasets_root": datasets_root,
                "config": config,
            },
            compute=ActorPoolStrategy(size=num_actors),
            batch_size=config.batch_size,
            batch_format="pyarrow",
            num_cpus=1,
        )
        .materialize()
    )


def _summarize(processed: Dataset, read_counts: Counter, files: list[InputFile]) -> dict[str, Any]:
    """Counts per source, token totals and answer-length histograms; checks read = written + rejected."""
    columns = ["source", "split", "reason", "seq_len", "answer_length", "num_image_tokens"]
    table = processed.select_columns(columns).to_pandas()
    ok = table[table["reason"].isna()]
    rejected = table[table["reason"].notna()]
    stage_of = {f.source: f.stage for f in files}
    sources = {}
    for source in sorted(read_counts):
        good, bad = ok[ok["source"] == source], rejected[rejected["source"] == source]
        if len(good) + len(bad) != read_counts[source]:
            raise RuntimeError(
                f"source {source}: read {read_counts[source]} records but wrote {len(good)} and rejected "
                f"{len(bad)}; rows were lost or duplicated (a bug in the pipeline)"
            )
        sources[source] = {
            "stage": stage_of[source],
            "read": read_counts[source],
            "written": len(good),
            "rejected": len(bad),
            "rejected_by_reason": _counts(bad["reason"]),
            "written_by_split": _counts(good["split"]),
            "tokens": int(good["seq_len"].sum()),
            "answer_tokens": int(good["answer_length"].sum()),
            "image_tokens": int(good["num_image_tokens"].sum()),
            "answer_length_hist": _counts(good["answer_length"].astype(int)),
        }
    totals = {key: sum(s[key] for s in sources.values()) for key in ("read", "written", "rejected", "tokens")}
    totals["rejected_by_reason"] = _counts(rejected["reason"])
    by_stage: Counter = Counter()
    for stats in sources.values():
        by_stage[stats["stage"]] += stats["written"]
    return {"totals": totals, "written_by_stage": dict(sorted(by_stage.items())), "sources": sources}


def _counts(values: Any) -> dict[str, int]:
    """Value → count, in value order (numeric values sort numerically), with string keys for JSON."""
    return {str(k): int(v) for k, v in sorted(Counter(values).items())}
