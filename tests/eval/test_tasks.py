"""Task registry, loaders of the users' local formats, prompts, scoring and the eval suite config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from dimoe.eval import tasks
from dimoe.eval.scoring import score_predictions, write_scores
from dimoe.eval.tasks import IMAGE_PLACEHOLDER, Task, get_task, list_tasks, register_task
from tests.eval.rows import vqa_row

CONFIG = Path(__file__).parents[2] / "configs/eval/default.yaml"
DEMO_TASKS = ["demo_vqa_colour", "demo_vqa_shape", "demo_vqa_count", "demo_vqa_position", "demo_describe"]
BENCHMARKS = [
    "vqav2",
    "textvqa",
    "gqa",
    "scienceqa",
    "mmbench",
    "mmmu",
    "mme",
    "chartqa",
    "docvqa",
    "infovqa",
    "gsm8k",
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------- registry


def test_registry_lists_every_task() -> None:
    assert set(DEMO_TASKS + BENCHMARKS) <= set(list_tasks())
    assert list_tasks() == sorted(list_tasks())
    assert all(get_task(name).name == name for name in list_tasks())


def test_unknown_task_names_it_and_lists_the_known_ones() -> None:
    with pytest.raises(ValueError) as error:
        get_task("vqa3")
    assert "'vqa3'" in str(error.value)
    assert all(name in str(error.value) for name in list_tasks())


def test_register_task_adds_a_task_and_refuses_a_taken_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tasks, "_REGISTRY", dict(tasks._REGISTRY))

    @register_task("my_task")
    class MyTask(Task):
        def score(self, row: dict[str, Any], prediction: str) -> float:
            return float(prediction == row["answer"])

    assert "my_task" in list_tasks()
    assert get_task("my_task").score({"answer": "x"}, "x") == 1.0
    with pytest.raises(ValueError, match="already registered"):
        register_task("vqav2")(MyTask)


# ---------------------------------------------------------------- demo tasks


@pytest.fixture
def demo_data(tmp_path: Path) -> Path:
    data = tmp_path / "DATA"
    rows = [
        vqa_row("c0", "images/0.png", "What colour is the shape?", "red", "colour"),
        vqa_row("c1", "images/1.png", "What colour is the shape?", "blue", "colour"),
        vqa_row("s0", "images/0.png", "What shape is it?", "circle", "shape"),
        vqa_row("n0", "images/2.png", "How many shapes?", "3", "count"),
        vqa_row("p0", "images/3.png", "Where is the square?", "top left", "position"),
    ]
    write_jsonl(data / "eval/vqa_test.jsonl", rows)
    write_jsonl(
        data / "eval/describe_test.jsonl",
        [
            {
                "id": "d0",
                "image": "images/0.png",
                "question": "Describe the image.",
                "answer": "a red circle",
                "question_type": "describe",
            },
            {
                "id": "d1",
                "image": "images/1.png",
                "question": "Describe the image.",
                "answer": "a blue square",
                "question_type": "describe",
            },
        ],
    )
    return data


@pytest.mark.parametrize(
    ("name", "ids"),
    [
        ("demo_vqa_colour", ["c0", "c1"]),
        ("demo_vqa_shape", ["s0"]),
        ("demo_vqa_count", ["n0"]),
        ("demo_vqa_position", ["p0"]),
    ],
)
def test_demo_vqa_tasks_filter_by_question_type(demo_data: Path, name: str, ids: list[str]) -> None:
    rows = get_task(name).load(demo_data / "eval/vqa_test.jsonl")
    assert [row["id"] for row in rows] == ids


def test_demo_rows_resolve_images_against_data_and_prompt_with_the_image(demo_data: Path) -> None:
    task = get_task("demo_vqa_colour")
    row = task.load(demo_data / "eval/vqa_test.jsonl")[0]
    assert row["image"] == str(demo_data / "images/0.png")
    prompt = task.build_prompt(row)
    assert prompt["image"] == row["image"]
    assert prompt["prompt"].startswith(f"{IMAGE_PLACEHOLDER}\nWhat colour is the shape?")
    assert task.score(row, task.postprocess("  Red.\n")) == 1.0
    assert task.score(row, "blue") == 0.0


def test_demo_task_without_rows_of_its_type_names_the_types_found(demo_data: Path) -> None:
    with pytest.raises(ValueError, match=r"question_type 'colour'.*found: describe"):
        get_task("demo_vqa_colour").load(demo_data / "eval/describe_test.jsonl")


def test_demo_describe_scores_token_f1_and_reports_exact_match(demo_data: Path) -> None:
    rows = get_task("demo_describe").load(demo_data / "eval/describe_test.jsonl")
    predictions = [{"id": "d0", "prediction": "A red circle."}, {"id": "d1", "prediction": "a red square"}]
    per_row, summary = score_predictions("demo_describe", predictions, rows)
    # d1: "red square" vs "blue square": overlap 1, P = R = 1/2.
    assert [r["score"] for r in per_row] == pytest.approx([1.0, 0.5])
    assert [r["exact_match"] for r in per_row] == [1.0, 0.0]
    assert get_task("demo_describe").metric == "token_f1"
    assert summary == {
        "task": "demo_describe",
        "n": 2,
        "score": pytest.approx(0.75),
        "exact_match": 0.5,
        "n_gold_without_prediction": 0,
    }


# ---------------------------------------------------------------- benchmark loaders


def test_vqav2_jsonl_with_annotation_objects(tmp_path: Path) -> None:
    answers = [{"answer": "2", "answer_id": i} for i in range(2)] + [
        {"answer": "3", "answer_id": i} for i in range(2, 10)
    ]
    path = write_jsonl(
        tmp_path / "vqav2.jsonl",
        [{"question_id": 7, "image": "img/7.jpg", "question": "How many?", "answers": answers}],
    )
    task = get_task("vqav2")
    [row] = task.load(path)
    assert row == {
        "id": "7",
        "question": "How many?",
        "image": str(tmp_path / "img/7.jpg"),
        "answers": ["2"] * 2 + ["3"] * 8,
    }
    assert task.score(row, task.postprocess("two")) == pytest.approx(0.6)


def test_textvqa_official_json(tmp_path: Path) -> None:
    data = {
        "dataset_name": "textvqa",
        "data": [{"question_id": 1, "image_id": "abc", "question": "Brand?", "answers": ["nokia"] * 10}],
    }
    path = write_json(tmp_path / "textvqa.json", data)
    [row] = get_task("textvqa").load(path, image_root=tmp_path / "imgs")
    assert row["image"] == str(tmp_path / "imgs/abc.jpg")
    assert get_task("textvqa").score(row, "Nokia") == 1.0


def test_gqa_official_question_mapping(tmp_path: Path) -> None:
    data = {"201": {"imageId": "n1", "question": "Is it red?", "answer": "yes", "fullAnswer": "Yes, it is."}}
    [row] = get_task("gqa").load(write_json(tmp_path / "gqa.json", data))
    assert row == {"id": "201", "question": "Is it red?", "image": str(tmp_path / "n1.jpg"), "answer": "yes"}
    assert get_task("gqa").score(row, "Yes.") == 1.0


def test_scienceqa_index_answer_hint_and_text_only_rows(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "sqa.jsonl",
        [
            {
                "pid": "9",
                "question": "Which is a mammal?",
                "choices": ["shark", "whale"],
                "answer": 1,
                "hint": "Mammals breathe air.",
                "image": None,
            },
        ],
    )
    task = get_task("scienceqa")
    [row] = task.load(path)
    assert row["answer"] == "B" and "image" not in row
    prompt = task.build_prompt(row)
    assert "image" not in prompt and IMAGE_PLACEHOLDER not in prompt["prompt"]
    assert prompt["prompt"] == (
        f"Mammals breathe air.\nWhich is a mammal?\nA. shark\nB. whale\n{tasks.CHOICE_INSTRUCTION}"
    )
    assert task.score(row, "The answer is (B).") == 1.0
    assert task.details(row, "whale") == {"choice": "B"}


def test_mmbench_option_columns(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mmb.jsonl",
        [
            {
                "index": 3,
                "question": "Colour?",
                "A": "red",
                "B": "blue",
                "C": "green",
                "D": None,
                "answer": "C",
                "image": "3.png",
            }
        ],
    )
    [row] = get_task("mmbench").load(path)
    assert row["id"] == "3"
    assert row["choices"] == ["red", "blue", "green"]
    assert get_task("mmbench").build_prompt(row)["prompt"].startswith(f"{IMAGE_PLACEHOLDER}\nColour?\nA. red")


def test_mmmu_stringified_options_and_text_answer(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mmmu.jsonl",
        [
            {
                "id": "validation_Art_1",
                "question": "Which style?",
                "options": "['Baroque', 'Cubism']",
                "answer": "Cubism",
            }
        ],
    )
    [row] = get_task("mmmu").load(path)
    assert row["choices"] == ["Baroque", "Cubism"] and row["answer"] == "B"


def test_mme_pairs_accuracy_plus_and_category_scores(tmp_path: Path) -> None:
    records = [
        {"question_id": "count/1.png", "question": "Two dogs?", "answer": "Yes", "category": "count"},
        {"question_id": "count/1.png", "question": "Three dogs?", "answer": "No", "category": "count"},
        {"question_id": "count/2.png", "question": "A cat?", "answer": "Yes", "category": "count"},
        {"question_id": "count/2.png", "question": "A dog?", "answer": "No", "category": "count"},
        {"question_id": "color/3.png", "question": "Red?", "answer": "Yes", "category": "color"},
        {"question_id": "color/3.png", "question": "Blue?", "answer": "No", "category": "color"},
    ]
    task = get_task("mme")
    rows = task.load(write_jsonl(tmp_path / "mme.jsonl", records))
    assert rows[0]["id"] == "count/1.png#0" and rows[0]["image"] == str(tmp_path / "count/1.png")
    texts = ["Yes, there are.", "No", "Yes", "Yes", "yes", "no"]
    predictions = [{"id": row["id"], "prediction": text} for row, text in zip(rows, texts, strict=True)]
    per_row, summary = score_predictions("mme", predictions, rows)
    assert per_row[0]["prediction"] == "yes"
    assert summary["accuracy"] == pytest.approx(5 / 6)
    assert summary["accuracy_plus"] == pytest.approx(2 / 3)  # count/2.png has one wrong answer
    assert summary["categories"]["count"] == pytest.approx(
        {"accuracy": 3 / 4, "accuracy_plus": 1 / 2, "score": 125.0}
    )
    assert summary["mme_score"] == pytest.approx(125.0 + 200.0)


def test_chartqa_official_list(tmp_path: Path) -> None:
    records = [
        {"imgname": "a.png", "query": "Peak value?", "label": "40"},
        {"imgname": "b.png", "query": "Which year?", "label": "2019"},
    ]
    path = write_json(tmp_path / "test_human.json", records)
    task = get_task("chartqa")
    rows = task.load(path)
    assert [row["id"] for row in rows] == ["0", "1"]
    assert task.score(rows[0], "41.9") == 1.0 and task.score(rows[0], "42.1") == 0.0


def test_docvqa_official_json(tmp_path: Path) -> None:
    data = {
        "data": [
            {
                "questionId": 5,
                "question": "Date?",
                "image": "documents/x.png",
                "answers": ["1 May 2020", "May 1, 2020"],
            }
        ]
    }
    task = get_task("docvqa")
    [row] = task.load(write_json(tmp_path / "val_v1.0.json", data))
    assert row["id"] == "5" and row["image"] == str(tmp_path / "documents/x.png")
    assert task.score(row, "1 may 2020") == 1.0
    assert task.score(row, "1 May 2021") == pytest.approx(1 - 1 / 10)


def test_gsm8k_rows_are_text_only(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "gsm8k.jsonl", [{"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}])
    task = get_task("gsm8k")
    [row] = task.load(path)
    assert "image" not in task.build_prompt(row)
    assert task.score(row, task.postprocess("So the answer is $2.")) == 1.0
    assert task.details(row, "2 apples") == {"extracted": 2.0}


def test_postprocess_is_idempotent() -> None:
    for name in list_tasks():
        task = get_task(name)
        for text in ("  Yes, it is.\n", "The answer is (B).", "No", "$1,234.50"):
            once = task.postprocess(text)
            assert task.postprocess(once) == once


# ---------------------------------------------------------------- loader errors


def test_missing_field_names_file_record_and_field(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "vqa.jsonl", [{"id": "q1", "image": "a.png", "question": "Q?"}])
    with pytest.raises(ValueError, match=r"vqa\.jsonl: record 1 \(id 'q1'\).*missing field 'answers'"):
        get_task("vqav2").load(path)


def test_bad_json_line_and_bad_gold_are_named(tmp_path: Path) -> None:
    path = tmp_path / "gsm8k.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n{not json\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"gsm8k\.jsonl:2: not valid JSON"):
        get_task("gsm8k").load(path)
    write_jsonl(path, [{"question": "q", "answer": "it is 1"}])
    with pytest.raises(ValueError, match="no '#### <number>' line"):
        get_task("gsm8k").load(path)


def test_missing_file_duplicate_ids_and_bad_answers(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="eval data file not found"):
        get_task("gqa").load(tmp_path / "absent.json")
    row = {"id": "x", "image": "a.png", "question": "Q?", "answer": "a", "question_type": "colour"}
    with pytest.raises(ValueError, match="id 'x' appears more than once"):
        get_task("demo_vqa_colour").load(write_jsonl(tmp_path / "eval/dup.jsonl", [row, row]))
    bad_mc = {"question": "Q?", "choices": ["a", "b"], "answer": "E"}
    with pytest.raises(ValueError, match="answer 'E' is neither an option letter"):
        get_task("scienceqa").load(write_jsonl(tmp_path / "mc.jsonl", [bad_mc]))
    bad_mme = {"question_id": "a.png", "question": "Q?", "answer": "Maybe"}
    with pytest.raises(ValueError, match="not yes/no"):
        get_task("mme").load(write_jsonl(tmp_path / "mme.jsonl", [bad_mme]))


# ---------------------------------------------------------------- scoring


def test_prediction_rows_may_carry_their_own_gold_fields() -> None:
    predictions = [
        {"id": 1, "prediction": "red", "answer": "Red"},
        {"id": 2, "prediction": "blue", "answer": "green"},
    ]
    per_row, summary = score_predictions("gqa", predictions)
    assert per_row == [
        {"id": "1", "prediction": "red", "score": 1.0},
        {"id": "2", "prediction": "blue", "score": 0.0},
    ]
    assert summary == {"task": "gqa", "n": 2, "score": 0.5}


def test_ground_truth_wins_and_unscored_gold_rows_are_counted() -> None:
    gold = [{"id": "1", "answer": "red"}, {"id": "2", "answer": "blue"}]
    per_row, summary = score_predictions("gqa", [{"id": "1", "prediction": "red", "answer": "blue"}], gold)
    assert per_row[0]["score"] == 1.0
    assert summary["n"] == 1 and summary["n_gold_without_prediction"] == 1


def test_scoring_problems_come_in_one_error_naming_ids_and_fields() -> None:
    gold = [{"id": "1", "answers": ["a"] * 10}]
    predictions = [
        {"id": "1", "prediction": "a"},
        {"id": "9", "prediction": "b"},
        {"prediction": "c"},
        {"id": "1", "prediction": "a"},
    ]
    with pytest.raises(ValueError) as error:
        score_predictions("vqav2", predictions, gold)
    message = str(error.value)
    assert "3 problem(s)" in message
    assert "id '9': not in the ground-truth rows" in message
    assert "prediction row 3: missing field 'id'" in message
    assert "id '1': appears more than once" in message
    with pytest.raises(ValueError, match="id '1': missing field 'answers'"):
        score_predictions("vqav2", [{"id": "1", "prediction": "a"}])
    with pytest.raises(ValueError, match="id '1': missing field 'prediction'"):
        score_predictions("vqav2", [{"id": "1"}], gold)


def test_write_scores(tmp_path: Path) -> None:
    per_row, summary = score_predictions("gqa", [{"id": "1", "prediction": "red", "answer": "red"}])
    out = write_scores(tmp_path / "run/gqa", per_row, summary)
    lines = (out / "results.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == per_row
    assert json.loads((out / "summary.json").read_text(encoding="utf-8")) == summary


# ---------------------------------------------------------------- suite config


def test_default_eval_config_names_registered_tasks_with_paths() -> None:
    config = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    assert set(config) == {"data_root", "suites", "tasks"}
    assert config["suites"]["demo"] == DEMO_TASKS
    assert set(config["suites"]["all"]) == set(config["tasks"]) == set(list_tasks())
    for suite in config["suites"].values():
        assert set(suite) <= set(config["tasks"])
    for name, settings in config["tasks"].items():
        assert "path" in settings and set(settings) <= {"path", "max_samples", "gen_length"}, name
        assert settings["path"].endswith((".jsonl", ".json")), name
