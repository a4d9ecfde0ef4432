"""Score prediction rows of a task and write the results.

Prediction rows carry `id` and `prediction` (the model's text). Their gold fields (the task's
`gold_fields`) either travel with them or come from the ground-truth rows (`Task.load` output),
matched by `id`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dimoe.errors import UserError
from dimoe.eval.tasks import Row, Task, get_task
from dimoe.io import write_json, write_jsonl

# How many problems one error message lists before summarising the rest as a count.
_MAX_LISTED_PROBLEMS = 5


def score_predictions(
    task_name: str, pred_rows: Sequence[Row], gt_rows: Sequence[Row] | None = None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-row results (`id`, postprocessed `prediction`, `score`, task details) and the task's
    summary (`task`, `n`, `score`, task-specific fields) of one task's predictions.

    Every problem (a row without `id` or `prediction`, a duplicate id, an id absent from the
    ground truth, a missing gold field) is reported together in one ValueError naming ids and fields.
    """
    task = get_task(task_name)
    rows = _merge(task, pred_rows, gt_rows)
    per_row = [_score_row(task, row) for row in rows]
    summary = {"task": task_name, **task.aggregate(per_row)}
    if gt_rows is not None:
        # Reported rather than raised: scoring a partial run (max_samples) is legitimate.
        summary["n_gold_without_prediction"] = len(gt_rows) - len(rows)
    return per_row, summary


def _merge(task: Task, pred_rows: Sequence[Row], gt_rows: Sequence[Row] | None) -> list[Row]:
    gold_by_id = _index_by_id(gt_rows) if gt_rows is not None else None
    problems: list[str] = []
    seen: set[str] = set()
    merged = []
    for position, pred in enumerate(pred_rows):
        row = _merge_one(task, position, pred, gold_by_id, seen, problems)
        if row is not None:
            merged.append(row)
    if problems:
        raise UserError(_problem_message(task.name, problems))
    return merged


def _merge_one(
    task: Task,
    position: int,
    pred: Row,
    gold_by_id: dict[str, Row] | None,
    seen: set[str],
    problems: list[str],
) -> Row | None:
    """The prediction with its gold fields, or None after recording why that is impossible."""
    if pred.get("id") is None:
        problems.append(f"prediction row {position + 1}: missing field 'id'")
        return None
    row_id = str(pred["id"])
    if row_id in seen:
        problems.append(f"id {row_id!r}: appears more than once in the predictions")
        return None
    seen.add(row_id)
    if gold_by_id is not None and row_id not in gold_by_id:
        problems.append(f"id {row_id!r}: not in the ground-truth rows")
        return None
    # Ground truth wins over same-named fields of the prediction row.
    row = {**pred, **gold_by_id[row_id]} if gold_by_id is not None else dict(pred)
    row["id"] = row_id
    missing = [field for field in ("prediction", *task.gold_fields) if row.get(field) is None]
    for field in missing:
        problems.append(f"id {row_id!r}: missing field {field!r}")
    return None if missing else row


def _index_by_id(gt_rows: Sequence[Row]) -> dict[str, Row]:
    by_id: dict[str, Row] = {}
    for position, row in enumerate(gt_rows):
        if row.get("id") is None:
            raise UserError(f"ground-truth row {position + 1} has no 'id'; load it with Task.load")
        if str(row["id"]) in by_id:
            raise UserError(f"ground-truth id {row['id']!r} appears more than once; ids must be unique")
        by_id[str(row["id"])] = {key: value for key, value in row.items() if key != "prediction"}
    return by_id


def _problem_message(task_name: str, problems: list[str]) -> str:
    listed = "\n  ".join(problems[:_MAX_LISTED_PROBLEMS])
    more = len(problems) - _MAX_LISTED_PROBLEMS
    tail = f"\n  ... and {more} more" if more > 0 else ""
    return (
        f"cannot score {task_name} predictions ({len(problems)} problem(s)); each row needs 'id', "
        f"'prediction' and the gold fields, directly or through ground-truth rows with the same id:"
        f"\n  {listed}{tail}"
    )


def _score_row(task: Task, row: Row) -> dict[str, Any]:
    prediction = task.postprocess(str(row["prediction"]))
    return {
        "id": row["id"],
        "prediction": prediction,
        "score": task.score(row, prediction),
        **task.details(row, prediction),
    }


def write_scores(out_dir: str | Path, per_row: Sequence[dict[str, Any]], summary: dict[str, Any]) -> Path:
    """Write `results.jsonl` (one result a line) and `summary.json` into `out_dir` (created if
    needed); returns `out_dir`."""
    out_dir = Path(out_dir)
    write_jsonl(out_dir / "results.jsonl", per_row)
    write_json(out_dir / "summary.json", summary)
    return out_dir
