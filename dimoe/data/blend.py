"""Seeded weighted mixtures of normalized source stages → one Parquet training blend per curriculum stage.

The sampling happens on the driver, by index, with numpy: each source stage's eligible rows
(requested split, optional `max_seq_len`) are sorted by `origin` (a stable key that does not
depend on how the Parquet files were cut), `round(weight share × size)` of them are drawn with
or without replacement, and a seeded permutation gives every pick its position in the blend.
Ray Data then does the heavy part in one pass for all blends: read the full rows, keep the picked
ones (repeating rows drawn more than once), sort by position, and write each blend in files of
exactly `rows_per_file` rows (the last one shorter). The same config therefore gives the same
rows in the same order, in byte-identical files.

    <data_dir>/blends/<name>/*.parquet + _blend.json     <data_dir>/blends/stage_blend_report.json
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from dimoe.config.data import BlendConfig, BlendSpec
from dimoe.config.loader import ConfigError
from dimoe.data.normalize import data_context, write_parquet
from dimoe.io import atomic_output_dir, ensure_ray, write_json

REPORT_FILE = "stage_blend_report.json"
BLEND_META_FILE = "_blend.json"  # leading underscore: Parquet readers skip it
_INDEX_COLUMNS = ["origin", "split", "seq_len", "answer_length"]
_BLEND, _POSITION = "_blend", "_position"


def apportion(weights: dict[str, float], size: int) -> dict[str, int]:
    """Rows per source: round(weight share × size), adjusted by largest remainder so they sum to `size`."""
    total = sum(weights.values())
    exact = {name: w / total * size for name, w in weights.items()}
    counts = {name: math.floor(x) for name, x in exact.items()}
    by_remainder = sorted(exact, key=lambda name: (counts[name] - exact[name], name))
    for name in by_remainder[: size - sum(counts.values())]:
        counts[name] += 1
    return counts


def load_index(stage_dir: Path) -> pa.Table:
    """The small columns of one normalized stage, sorted by `origin` so indices are stable."""
    table = pq.read_table(stage_dir, columns=_INDEX_COLUMNS)
    return table.sort_by("origin")


def eligible_rows(index: pa.Table, spec: BlendSpec) -> pa.Table:
    """The index rows a blend may draw from: its split, within its `max_seq_len`."""
    keep = pc.equal(index["split"], spec.split)
    if spec.max_seq_len is not None:
        keep = pc.and_(keep, pc.less_equal(index["seq_len"], spec.max_seq_len))
    return index.filter(keep)


def plan_blend(name: str, spec: BlendSpec, indexes: dict[str, pa.Table]) -> dict[str, pa.Table]:
    """Per source stage, the picked rows of the (sorted) index with their position in the blend."""
    counts = apportion(spec.sources, spec.size)
    rng = np.random.default_rng(spec.seed)
    picks: dict[str, pa.Table] = {}
    for stage in sorted(counts):
        eligible = eligible_rows(indexes[stage], spec)
        if counts[stage] > eligible.num_rows and not spec.replace:
            raise ConfigError(
                f"blend {name!r}: needs {counts[stage]} rows of {stage} but only {eligible.num_rows} "
                f"are eligible (split={spec.split}, max_seq_len={spec.max_seq_len}); "
                "set replace: true or lower size/weight"
            )
        if counts[stage] and not eligible.num_rows:
            raise ConfigError(
                f"blend {name!r}: {stage} has no eligible rows "
                f"(split={spec.split}, max_seq_len={spec.max_seq_len})"
            )
        chosen = rng.choice(eligible.num_rows, size=counts[stage], replace=spec.replace)
        picks[stage] = eligible.take(pa.array(chosen, pa.int64()))
    positions = rng.permutation(spec.size)
    start = 0
    for stage, table in picks.items():
        end = start + table.num_rows
        picks[stage] = table.append_column(_POSITION, pa.array(positions[start:end], pa.int64()))
        start = end
    return picks


def row_picker(plan: pa.Table) -> Callable[[pa.Table], pa.Table]:
    """A batch UDF keeping the rows `plan` names, once per plan entry (a row drawn twice appears
    twice), with the plan's `_blend` and `_position` columns appended.

    It is a closure on purpose: cloudpickle ships closures by value, so Ray workers run it with
    pyarrow alone instead of importing this package (whose `__init__` loads torch and the model).
    """
    origin, blend, position = plan["origin"], plan[_BLEND], plan[_POSITION]

    def pick(batch: pa.Table) -> pa.Table:
        where = pc.index_in(origin, value_set=batch["origin"])
        found = pc.is_valid(where)
        rows = batch.take(pc.filter(where, found))
        return rows.append_column(_BLEND, pc.filter(blend, found)).append_column(
            _POSITION, pc.filter(position, found)
        )

    return pick


def build_stage_blends(config: BlendConfig) -> dict[str, Any]:
    """Build every blend of `config` in one Ray Data pass; returns (and writes) the blend report."""
    data_dir = Path(config.data_dir)
    out_root = Path(config.out_dir) if config.out_dir else data_dir / "blends"
    _check_stages(config, data_dir)
    stages = sorted({stage for spec in config.blends.values() for stage in spec.sources})
    indexes = {stage: load_index(data_dir / stage) for stage in stages}
    # Every blend is planned before anything is written, so one infeasible blend fails the run early.
    plans = {name: plan_blend(name, spec, indexes) for name, spec in config.blends.items()}
    plan_table, cuts = _merge_plans(plans, config)
    ensure_ray()
    out_root.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "data_dir": str(data_dir),
        "out_dir": str(out_root),
        "config": config.model_dump(mode="json"),
        "blends": {},
    }
    with data_context(config.progress):
        picked_rows = (
            ray.data.read_parquet([str(data_dir / stage) for stage in stages])
            .map_batches(row_picker(plan_table), batch_format="pyarrow")
            .sort(_POSITION, boundaries=cuts)
            .materialize()
        )
        for number, (name, plan) in enumerate(plans.items()):
            spec = config.blends[name]
            blend = (
                picked_rows.filter(expr=col(_BLEND) == number)
                .drop_columns([_BLEND, _POSITION])
                # the sort blocks already have the file cuts; this makes them exact even if Ray
                # splits an oversized block
                .repartition(target_num_rows_per_block=config.rows_per_file, strict=True)
            )
            entry = _blend_report(spec, plan, indexes)
            with atomic_output_dir(out_root / name, BLEND_META_FILE) as tmp:
                write_parquet(blend, tmp, config.rows_per_file)
                entry["files"] = sorted(p.name for p in tmp.glob("*.parquet"))
                written = sum(pq.ParquetFile(tmp / f).metadata.num_rows for f in entry["files"])
                if written != spec.size:
                    raise RuntimeError(f"blend {name!r}: wrote {written} rows, planned {spec.size} (a bug)")
                write_json(tmp / BLEND_META_FILE, entry)
            report["blends"][name] = entry
    report_path = out_root / REPORT_FILE
    write_json(report_path.with_suffix(".tmp"), report)
    report_path.with_suffix(".tmp").replace(report_path)
    return report


def _merge_plans(plans: dict[str, dict[str, pa.Table]], config: BlendConfig) -> tuple[pa.Table, list[int]]:
    """One plan table for all blends (origin, blend number, position global across blends), so a
    single read, pick and sort serves every blend and each blend is a contiguous sorted run; and
    the sort boundaries: every blend start and every `rows_per_file` rows within a blend.

    With explicit boundaries the sort needs no sampling and its blocks, hence the files, are the
    same on every run. The final cut at the total keeps the list non-empty (empty means "sample").
    """
    sizes = [config.blends[name].size for name in plans]
    offsets = np.cumsum([0] + sizes)
    table = pa.concat_tables(
        pa.table(
            {
                "origin": picked["origin"],
                _BLEND: pa.array(np.full(picked.num_rows, number), pa.int32()),
                _POSITION: pc.add(picked[_POSITION], int(offsets[number])),
            }
        )
        for number, plan in enumerate(plans.values())
        for picked in plan.values()
    )
    cuts = {
        int(start + k)
        for start, size in zip(offsets, sizes, strict=False)
        for k in range(0, size, config.rows_per_file)
    }
    return table, sorted((cuts | {int(offsets[-1])}) - {0})


def _check_stages(config: BlendConfig, data_dir: Path) -> None:
    """Every source stage named by a blend must have normalized Parquet under `data_dir`."""
    if not data_dir.is_dir():
        raise ConfigError(f"data_dir {data_dir} not found; run `dimoe data normalize --out {data_dir}` first")
    for name, spec in config.blends.items():
        for stage in spec.sources:
            if not any((data_dir / stage).glob("*.parquet")):
                known = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and any(p.glob("*.parquet")))
                raise ConfigError(
                    f"blend {name!r}: unknown source stage {stage!r}: no normalized Parquet in "
                    f"{data_dir / stage} (stages with data: {known or 'none, run `dimoe data normalize`'})"
                )


def _blend_report(spec: BlendSpec, plan: dict[str, pa.Table], indexes: dict[str, pa.Table]) -> dict[str, Any]:
    total_weight = sum(spec.sources.values())
    sources = {}
    for stage, picked in plan.items():
        answer = np.asarray(picked["answer_length"], dtype=np.int64)
        sources[stage] = {
            "weight": spec.sources[stage],
            "target_ratio": round(spec.sources[stage] / total_weight, 6),
            "rows": picked.num_rows,
            "realised_ratio": round(picked.num_rows / spec.size, 6),
            "unique_rows": len(pc.unique(picked["origin"])),
            "eligible_rows": eligible_rows(indexes[stage], spec).num_rows,
            "tokens": int(pc.sum(picked["seq_len"]).as_py() or 0),
            "answer_length": _stats(answer),
        }
    return {
        **spec.model_dump(mode="json"),
        "rows": spec.size,
        "tokens": sum(s["tokens"] for s in sources.values()),
        "sources": sources,
    }


def _stats(values: np.ndarray) -> dict[str, float]:
    if not len(values):
        return {}
    return {
        "mean": round(float(values.mean()), 3),
        "min": int(values.min()),
        "p50": float(np.percentile(values, 50)),
        "p90": float(np.percentile(values, 90)),
        "max": int(values.max()),
    }
