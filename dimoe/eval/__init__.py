"""Evaluation: benchmark task registry, per-example metrics and prediction scoring."""

from dimoe.eval.scoring import score_predictions, write_scores
from dimoe.eval.tasks import Task, get_task, list_tasks, read_records, register_task

__all__ = [
    "Task",
    "get_task",
    "list_tasks",
    "read_records",
    "register_task",
    "score_predictions",
    "write_scores",
]
