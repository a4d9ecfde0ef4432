"""Evaluation task registry: how each benchmark's local file is read, prompted and scored.

A task turns the records of a user's local data file into canonical rows (always with `id`, the
task's `gold_fields` and, for image tasks, an `image` path), builds the model prompt of a row,
cleans the model's text, scores one prediction and aggregates per-row results:

    task = get_task("vqav2")
    rows = task.load("data/vqav2_val.jsonl")
    prompt = task.build_prompt(rows[0])            # {"prompt": "<image>\\n...", "image": "/abs/path.jpg"}
    score = task.score(rows[0], task.postprocess(model_text))

New tasks register with `@register_task("name")` on a `Task` subclass.
"""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from dimoe.errors import UserError
from dimoe.eval import metrics
from dimoe.io import read_json, read_jsonl

IMAGE_PLACEHOLDER = "<image>"
# The instruction LLaVA-1.5 evaluates short-answer VQA benchmarks with.
SHORT_ANSWER_INSTRUCTION = "Answer the question using a single word or phrase."
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."

Row = dict[str, Any]


class RowError(UserError):
    """A data record that cannot become a task row; `Task.load` adds the file and record number."""


# --------------------------------------------------------------------------------------------
# Reading local files
# --------------------------------------------------------------------------------------------


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records of a `.jsonl` file (one object a line) or a `.json` file holding a list, a
    `{"data": [...]}` wrapper (TextVQA, DocVQA) or an `{id: record}` mapping (GQA, ScienceQA; the
    key becomes the record's `id` when it has none)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"eval data file not found: {path} (check the task's `path` in the eval config)"
        )
    if path.suffix == ".jsonl":
        return read_jsonl(path)
    if path.suffix == ".json":
        return _records_of_json(read_json(path), path)
    raise UserError(f"{path}: unsupported eval data format {path.suffix!r}; use .jsonl or .json")


def _records_of_json(data: Any, path: Path) -> list[dict[str, Any]]:
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    elif isinstance(data, dict) and data and all(isinstance(value, dict) for value in data.values()):
        data = [{"id": key, **value} for key, value in data.items()]
    if not isinstance(data, list) or not all(isinstance(record, dict) for record in data):
        raise UserError(
            f'{path}: expected a list of objects, a {{"data": [...]}} wrapper or an {{id: object}} mapping'
        )
    return data


# --------------------------------------------------------------------------------------------
# Field helpers shared by the parsers
# --------------------------------------------------------------------------------------------


def _field(record: dict[str, Any], *names: str) -> Any:
    """The first of `names` present (and not null) in the record; the names are alternative
    spellings used by different releases of a benchmark."""
    for name in names:
        if record.get(name) is not None:
            return record[name]
    raise RowError(f"missing field {' / '.join(repr(name) for name in names)}")


def _text(record: dict[str, Any], *names: str) -> str:
    value = _field(record, *names)
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise RowError(f"field {names[0]!r} must be text, got {type(value).__name__}")
    return str(value)


def _record_id(record: dict[str, Any], index: int) -> str:
    """The record's own id under any usual name, else its position in the file."""
    for name in ("id", "question_id", "questionId", "qid", "pid", "index"):
        if record.get(name) is not None:
            return str(record[name])
    return str(index)


def _resolve(image: str, image_root: Path) -> str:
    path = Path(image)
    return str(path if path.is_absolute() else image_root / path)


def _answer_texts(value: Any) -> list[str]:
    """Gold answers given as one string, a list of strings or the VQA annotation form
    `[{"answer": ..., "answer_id": ...}, ...]`."""
    items = value if isinstance(value, list) else [value]
    answers = [item["answer"] if isinstance(item, dict) and "answer" in item else item for item in items]
    if not answers or not all(isinstance(answer, str | int | float) for answer in answers):
        raise RowError('answers must be a non-empty list of strings (or of {"answer": ...} objects)')
    return [str(answer) for answer in answers]


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


# --------------------------------------------------------------------------------------------
# The task base class and the registry
# --------------------------------------------------------------------------------------------


class Task:
    """One benchmark. Subclasses implement `parse_row` and `score`; the rest has defaults.

    `gold_fields` names the row fields `score` reads, so scoring can check prediction rows.
    `extra_metrics` names numeric fields of `details` that `aggregate` averages next to `score`.
    """

    name: str = ""
    metric: str = "exact_match"  # what `score` computes, as tables label it
    gold_fields: tuple[str, ...] = ("answer",)
    extra_metrics: tuple[str, ...] = ()

    def load(self, path: str | Path, image_root: str | Path | None = None) -> list[Row]:
        """Canonical rows of a local data file; relative image paths resolve against `image_root`
        (default: `default_image_root(path)`). Images are not opened here."""
        path = Path(path)
        root = Path(image_root) if image_root is not None else self.default_image_root(path)
        rows = [
            self._parse_located(record, index, path, root) for index, record in enumerate(read_records(path))
        ]
        rows = self.select(rows, path)
        _check_unique_ids(rows, path)
        return rows

    def _parse_located(self, record: dict[str, Any], index: int, path: Path, root: Path) -> Row:
        try:
            return self.parse_row(record, index, root)
        except RowError as error:
            raise UserError(
                f"{path}: record {index + 1} (id {_record_id(record, index)!r}) is not a valid "
                f"{self.name} row: {error}"
            ) from None

    def default_image_root(self, path: Path) -> Path:
        """Directory relative image paths start from: the data file's own directory."""
        return path.parent

    def parse_row(self, record: dict[str, Any], index: int, image_root: Path) -> Row:
        """One file record -> one canonical row; raises `RowError` naming a bad or missing field."""
        raise NotImplementedError

    def select(self, rows: list[Row], path: Path) -> list[Row]:
        """Rows of the file this task evaluates (all of them unless a task filters)."""
        return rows

    def build_prompt(self, row: Row) -> dict[str, str]:
        """`{"prompt": text}` plus `"image"` when the row has one; short-answer VQA style."""
        return _with_image(row, f"{row['question']}\n{SHORT_ANSWER_INSTRUCTION}")

    def postprocess(self, text: str) -> str:
        """Model text -> the prediction that is scored and stored. Idempotent."""
        return text.strip()

    def score(self, row: Row, prediction: str) -> float:
        """Score in [0, 1] of one postprocessed prediction against the row's gold fields."""
        raise NotImplementedError

    def details(self, row: Row, prediction: str) -> dict[str, Any]:
        """Extra per-row fields stored next to the score (what was extracted, per-row extras)."""
        return {}

    def aggregate(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        """Dataset-level summary of per-row results (`score` plus `details` fields)."""
        summary: dict[str, Any] = {"n": len(results), "score": _mean(r["score"] for r in results)}
        for key in self.extra_metrics:
            summary[key] = _mean(r[key] for r in results)
        return summary


def _with_image(row: Row, text: str) -> dict[str, str]:
    if row.get("image"):
        return {"prompt": f"{IMAGE_PLACEHOLDER}\n{text}", "image": row["image"]}
    return {"prompt": text}


def _check_unique_ids(rows: list[Row], path: Path) -> None:
    seen: set[str] = set()
    for row in rows:
        if row["id"] in seen:
            raise UserError(f"{path}: id {row['id']!r} appears more than once; ids must be unique")
        seen.add(row["id"])


_REGISTRY: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator registering a task under `name` (stackable: one class, several names)."""

    def decorator(cls: type[Task]) -> type[Task]:
        if name in _REGISTRY:
            raise ValueError(f"eval task {name!r} is already registered (by {_REGISTRY[name].__name__})")
        _REGISTRY[name] = cls
        return cls

    return decorator


def get_task(name: str) -> Task:
    """A fresh instance of the task registered as `name`."""
    if name not in _REGISTRY:
        raise UserError(f"unknown eval task {name!r}; known tasks: {', '.join(list_tasks())}")
    task = _REGISTRY[name]()
    task.name = name
    return task


def list_tasks() -> list[str]:
    """Names of all registered tasks, sorted."""
    return sorted(_REGISTRY)


# --------------------------------------------------------------------------------------------
# Published benchmarks
# --------------------------------------------------------------------------------------------


@register_task("vqav2")
class VQATask(Task):
    metric = "vqa_accuracy"
    """VQAv2: `question`, `image`, `answers` (the 10 human answers, as strings or VQA annotation
    objects); VQA accuracy."""

    gold_fields = ("answers",)

    def parse_row(self, record: dict[str, Any], index: int, image_root: Path) -> Row:
        return {
            "id": _record_id(record, index),
            "question": _text(record, "question"),
            "image": _resolve(self.image_of(record), image_root),
            "answers": _answer_texts(_field(record, "answers", "answer")),
        }

    def image_of(self, record: dict[str, Any]) -> str:
        """The record's image path (before resolving against the image root)."""
        return _text(record, "image", "image_path")

    def score(self, row: Row, prediction: str) -> float:
        return metrics.vqa_accuracy(prediction, row["answers"])


@register_task("textvqa")
class TextVQATask(VQATask):
    """TextVQA: as VQAv2; the official json names images by `image_id` (`<image_id>.jpg`)."""

    def image_of(self, record: dict[str, Any]) -> str:
        return record.get("image") or f"{_text(record, 'image_id', 'image')}.jpg"


@register_task("gqa")
class GQATask(Task):
    """GQA: `question`, `answer`, image from `image` or the official `imageId` (`<imageId>.jpg`);
    normalised exact match."""

    def parse_row(self, record: dict[str, Any], index: int, image_root: Path) -> Row:
        image = record.get("image") or f"{_text(record, 'imageId', 'image')}.jpg"
        return {
            "id": _record_id(record, index),
            "question": _text(record, "question"),
            "image": _resolve(image, image_root),
            "answer": _text(record, "answer"),
        }

    def score(self, row: Row, prediction: str) -> float:
        return metrics.exact_match(prediction, row["answer"])


@register_task("scienceqa")
@register_task("mmbench")
@register_task("mmmu")
class MultipleChoiceTask(Task):
    metric = "accuracy"
    """ScienceQA / MMBench / MMMU multiple choice: `question`, options as `choices` / `options`
    (a list, a letter -> text mapping, MMMU's stringified list, or MMBench's `A`, `B`, ... columns),
    `answer` as letter, 0-based index or option text; optional `hint` / `context` and `image`.
    Accuracy of the option letter extracted from the free-text answer."""

    gold_fields = ("choices", "answer")

    def parse_row(self, record: dict[str, Any], index: int, image_root: Path) -> Row:
        choices = _choices(record)
        row: Row = {
            "id": _record_id(record, index),
            "question": _text(record, "question"),
            "choices": choices,
            "answer": _gold_letter(_field(record, "answer"), choices),
        }
        hint = record.get("hint") or record.get("context")
        if isinstance(hint, str) and hint.strip():
            row["hint"] = hint.strip()
        if record.get("image"):
            row["image"] = _resolve(_text(record, "image"), image_root)
        return row

    def build_prompt(self, row: Row) -> dict[str, str]:
        letters = metrics.option_letters(len(row["choices"]))
        lines = [row["hint"]] if row.get("hint") else []
        lines.append(row["question"])
        lines += [f"{letter}. {choice}" for letter, choice in zip(letters, row["choices"], strict=True)]
        lines.append(CHOICE_INSTRUCTION)
        return _with_image(row, "\n".join(lines))

    def score(self, row: Row, prediction: str) -> float:
        return metrics.multiple_choice_accuracy(prediction, row["answer"], row["choices"])

    def details(self, row: Row, prediction: str) -> dict[str, Any]:
        return {"choice": metrics.extract_choice(prediction, row["choices"])}


def _choices(record: dict[str, Any]) -> list[str]:
    if record.get("choices") is None and record.get("options") is None and "A" in record:
        return _lettered_columns(record)
    options = _field(record, "choices", "options")
    if isinstance(options, str):
        # MMMU ships its options as the text of a Python list; literal_eval never runs code.
        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError):
            raise RowError(f"options {options[:60]!r} is not a list") from None
    if isinstance(options, dict):
        options = [options[letter] for letter in sorted(options)]
    if not isinstance(options, list) or not options:
        raise RowError("choices/options must be a non-empty list of option texts")
    metrics.option_letters(len(options))
    return [str(option) for option in options]


def _lettered_columns(record: dict[str, Any]) -> list[str]:
    """MMBench TSV rows exported as JSON: options in columns A, B, C, ... (missing ones empty/null)."""
    choices = []
    for letter in metrics.option_letters(26):
        value = record.get(letter)
        if value is None or (isinstance(value, str) and not value.strip()) or value != value:  # NaN
            break
        choices.append(str(value))
    return choices


def _gold_letter(answer: Any, choices: list[str]) -> str:
    letters = metrics.option_letters(len(choices))
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(choices):
        return letters[answer]
    text = str(answer).strip()
    if len(text) == 1 and text.upper() in letters:
        return text.upper()
    if text in choices:
        return letters[choices.index(text)]
    raise RowError(f"answer {answer!r} is neither an option letter ({letters}), an index nor an option text")


@register_task("mme")
class MMETask(Task):
    metric = "accuracy"
    """MME: yes/no questions, two per image. `question_id` (the image, shared by its two questions),
    `question`, `answer` (Yes/No), optional `category` and `image` (default: `question_id`).
    Per-row accuracy; `aggregate` adds accuracy+ and MME's 100 * (acc + acc+) per category."""

    gold_fields = ("answer", "image_id")

    def parse_row(self, record: dict[str, Any], index: int, image_root: Path) -> Row:
        image_id = _text(record, "question_id", "image_id")
        answer = metrics.parse_yes_no(_text(record, "answer"))
        if answer is None:
            raise RowError(f"answer {record['answer']!r} is not yes/no")
        row: Row = {
            "id": str(record.get("id") or f"{image_id}#{index}"),
            "image_id": image_id,
            "question": _text(record, "question"),
            "answer": answer,
            "image": _resolve(str(record.get("image") or image_id), image_root),
        }
        if record.get("category"):
            row["category"] = str(record["category"])
        return row

    def postprocess(self, text: str) -> str:
        return metrics.parse_yes_no(text) or text.strip()

    def score(self, row: Row, prediction: str) -> float:
        return float(metrics.parse_yes_no(prediction) == metrics.parse_yes_no(row["answer"]))

    def details(self, row: Row, prediction: str) -> dict[str, Any]:
        return {"image_id": row["image_id"], "category": row.get("category", "all")}

    def aggregate(self, results: list[dict[str, Any]]) -> dict[str, Any]:
        categories: dict[str, list[dict[str, Any]]] = {}
        for result in results:
            categories.setdefault(result["category"], []).append(result)
        per_category = {name: _mme_group(group) for name, group in sorted(categories.items())}
        overall = _mme_group(results)
        return {
            "n": len(results),
            "score": overall["accuracy"],
            "accuracy": overall["accuracy"],
            "accuracy_plus": overall["accuracy_plus"],
            "mme_score": sum(group["score"] for group in per_category.values()),
            "categories": per_category,
        }


def _mme_group(results: list[dict[str, Any]]) -> dict[str, float]:
    return metrics.mme_scores([r["image_id"] for r in results], [r["score"] == 1.0 for r in results])


@register_task("chartqa")
class ChartQATask(Task):
    metric = "relaxed_accuracy"
    """ChartQA: `query` / `question`, `label` / `answer`, image from `imgname` / `image`;
    relaxed accuracy (5 % numeric tolerance)."""

    def parse_row(self, record: dict[str, Any], index: int, image_root: Path) -> Row:
        return {
            "id": _record_id(record, index),
            "question": _text(record, "query", "question"),
            "image": _resolve(_text(record, "image", "imgname"), image_root),
            "answer": _text(record, "label", "answer"),
        }

    def score(self, row: Row, prediction: str) -> float:
        return metrics.relaxed_accuracy(prediction, row["answer"])


@register_task("docvqa")
@register_task("infovqa")
class DocumentVQATask(Task):
    metric = "anls"
    """DocVQA / InfographicVQA: `question`, `answers` (list), image from `image` /
    `image_local_name`; ANLS."""

    gold_fields = ("answers",)

    def parse_row(self, record: dict[str, Any], index: int, image_root: Path) -> Row:
        return {
            "id": _record_id(record, index),
            "question": _text(record, "question"),
            "image": _resolve(_text(record, "image", "image_local_name"), image_root),
            "answers": _answer_texts(_field(record, "answers", "answer")),
        }

    def score(self, row: Row, prediction: str) -> float:
        return metrics.anls(prediction, row["answers"])


@register_task("gsm8k")
class GSM8KTask(Task):
    metric = "accuracy"
    """GSM8K (text only): `question`, `answer` (the reference solution ending in `#### <number>`);
    accuracy of the final number of the model's solution."""

    def parse_row(self, record: dict[str, Any], index: int, image_root: Path) -> Row:
        answer = _text(record, "answer")
        try:
            metrics.parse_gsm8k_gold(answer)
        except ValueError as error:
            raise RowError(str(error)) from None
        return {"id": _record_id(record, index), "question": _text(record, "question"), "answer": answer}

    def build_prompt(self, row: Row) -> dict[str, str]:
        return {
            "prompt": f"Question: {row['question']}\nSolve it step by step, then give the final "
            "answer as a number after '#### '."
        }

    def score(self, row: Row, prediction: str) -> float:
        return metrics.gsm8k_accuracy(prediction, row["answer"])

    def details(self, row: Row, prediction: str) -> dict[str, Any]:
        return {"extracted": metrics.extract_final_number(prediction)}


# --------------------------------------------------------------------------------------------
# Demo tasks on the synthetic data set
# --------------------------------------------------------------------------------------------


class DemoTask(Task):
    """Rows of the synthetic generator's `DATA/eval/*.jsonl` files of one `question_type`:
    `id`, `image` (relative to DATA), `question`, `answer`; normalised exact match."""

    question_type: str = ""

    def default_image_root(self, path: Path) -> Path:
        # The generator writes DATA/eval/<file>.jsonl with image paths relative to DATA.
        return path.parent.parent

    def parse_row(self, record: dict[str, Any], index: int, image_root: Path) -> Row:
        return {
            "id": _record_id(record, index),
            "question": _text(record, "question"),
            "image": _resolve(_text(record, "image"), image_root),
            "answer": _text(record, "answer"),
            "question_type": _text(record, "question_type"),
        }

    def select(self, rows: list[Row], path: Path) -> list[Row]:
        selected = [row for row in rows if row["question_type"] == self.question_type]
        if not selected:
            found = sorted({row["question_type"] for row in rows})
            raise UserError(
                f"{path}: no rows with question_type {self.question_type!r} for task "
                f"{self.name} (found: {', '.join(found) or 'no rows'})"
            )
        return selected

    def build_prompt(self, row: Row) -> dict[str, str]:
        # The demo model is trained on the bare questions: no short-answer instruction.
        return _with_image(row, row["question"])

    def score(self, row: Row, prediction: str) -> float:
        return metrics.exact_match(prediction, row["answer"])


@register_task("demo_vqa_colour")
class DemoColourTask(DemoTask):
    question_type = "colour"


@register_task("demo_vqa_shape")
class DemoShapeTask(DemoTask):
    question_type = "shape"


@register_task("demo_vqa_count")
class DemoCountTask(DemoTask):
    question_type = "count"


@register_task("demo_vqa_position")
class DemoPositionTask(DemoTask):
    question_type = "position"


@register_task("demo_describe")
class DemoDescribeTask(DemoTask):
    """Synthetic image descriptions: token-level F1 (a description is seldom word for word), plus
    exact match as `exact_match`."""

    question_type = "describe"
    metric = "token_f1"
    extra_metrics = ("exact_match",)

    def score(self, row: Row, prediction: str) -> float:
        return metrics.token_f1(prediction, row["answer"])

    def details(self, row: Row, prediction: str) -> dict[str, Any]:
        return {"exact_match": metrics.exact_match(prediction, row["answer"])}
