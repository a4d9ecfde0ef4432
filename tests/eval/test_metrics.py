"""Hand-computed cases for every evaluation metric, plus GSM8K parsing on the real test split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dimoe.eval import metrics
from dimoe.eval.scoring import score_predictions
from dimoe.eval.tasks import get_task

GSM8K_TEST = Path(__file__).parents[2].parent / "shared/datasets/gsm8k/test.jsonl"


# ---------------------------------------------------------------- VQA accuracy


@pytest.mark.parametrize(
    ("n_matching", "expected"),
    [
        # Leaving out a matching answer leaves n-1 matches in the 9-answer subset, else n.
        (0, 0.0),
        (1, (1 * min(0 / 3, 1) + 9 * min(1 / 3, 1)) / 10),  # 0.3
        (2, (2 * min(1 / 3, 1) + 8 * min(2 / 3, 1)) / 10),  # 0.6, not min(2/3, 1) = 0.667
        (3, (3 * min(2 / 3, 1) + 7 * min(3 / 3, 1)) / 10),  # 0.9, not 1.0
        (4, 1.0),
        (10, 1.0),
    ],
)
def test_vqa_accuracy_averages_the_ten_leave_one_out_subsets(n_matching: int, expected: float) -> None:
    answers = ["cat"] * n_matching + ["dog"] * (10 - n_matching)
    assert metrics.vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_vqa_accuracy_two_of_ten_is_point_six() -> None:
    score = metrics.vqa_accuracy("yes", ["yes", "yes"] + ["no"] * 8)
    assert score == pytest.approx(0.6)
    assert score != pytest.approx(2 / 3)


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("Two", "2"),
        ("none", "0"),
        ("The dog.", "dog"),
        ("an apple", "apple"),
        ("isnt", "isn't"),
        ("couldnt've", "couldn't've"),
        ("Yes!", "yes"),
        ("1,000", "1000"),  # a digit-grouping comma deletes punctuation instead of spacing it
        ("3.5", "3.5"),  # a decimal point survives
        ("10.", "10"),
        ("black-and-white", "black and white"),  # no space around: replaced by a space
        ("left - right", "left right"),  # touching a space: deleted
        ("  red\tcar\n", "red car"),
        ("it's", "it's"),
    ],
)
def test_vqa_answer_normalisation(text: str, normalised: str) -> None:
    assert metrics.normalize_vqa_answer(text) == normalised


def test_vqa_accuracy_normalises_prediction_and_answers() -> None:
    assert metrics.vqa_accuracy("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert metrics.vqa_accuracy("the red one", ["red 1"] * 10) == 1.0


def test_vqa_accuracy_single_answer_is_exact_match_and_empty_is_an_error() -> None:
    assert metrics.vqa_accuracy("A cat", ["cat"]) == 1.0
    assert metrics.vqa_accuracy("dog", ["cat"]) == 0.0
    with pytest.raises(ValueError, match="at least one gold answer"):
        metrics.vqa_accuracy("cat", [])


# ---------------------------------------------------------------- exact match and token F1


def test_exact_match_normalises_case_punctuation_articles_whitespace() -> None:
    assert metrics.normalize_text("  The  Red, circle. ") == "red circle"
    assert metrics.exact_match("The red circle.", "red  circle") == 1.0
    assert metrics.exact_match("reds", "red") == 0.0
    assert metrics.exact_match("Blue", ["red", "blue"]) == 1.0


def test_token_f1() -> None:
    # "a red square" -> ["red", "square"]; overlap 1: P = 1/2, R = 1/2.
    assert metrics.token_f1("red circle", "a red square") == pytest.approx(0.5)
    # overlap 2 ("red", "circle"): P = 2/3, R = 1, F1 = 2 * (2/3) / (5/3) = 0.8.
    assert metrics.token_f1("red red circle", "red circle") == pytest.approx(0.8)
    assert metrics.token_f1("green", "red circle") == 0.0
    assert metrics.token_f1("", "") == 1.0
    assert metrics.token_f1("the", "red") == 0.0


# ---------------------------------------------------------------- multiple choice

OPTIONS = ["cat", "dog", "mouse", "eel"]


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("The answer is (B)", "B"),
        ("The answer is B.", "B"),
        ("Answer: C", "C"),
        ("answer: c.", "C"),
        ("B.", "B"),
        ("b", "B"),
        ("(D)", "D"),
        ("C) mouse", "C"),
        ("A. cat, because it purrs", "A"),
        ("B. It is not (A).", "B"),  # the leading letter wins over a quoted one
        ("I would pick (d) here", "D"),
        ("The answer is a dog", "B"),  # "a" is an article here; the option text decides
        ("It is a mouse.", "C"),
        ("Neither, really.", None),
        ("cat or dog", None),  # two options named: undecided
        ("The answer is (F)", None),  # not one of the four letters
    ],
)
def test_extract_choice_from_free_text(text: str, letter: str | None) -> None:
    assert metrics.extract_choice(text, OPTIONS) == letter


def test_extract_choice_prefers_the_longer_option_text() -> None:
    assert metrics.extract_choice("It is dark red", ["red", "dark red", "blue"]) == "B"
    assert metrics.extract_choice("It is red", ["red", "dark red", "blue"]) == "A"


def test_extract_choice_without_options_accepts_any_letter() -> None:
    assert metrics.extract_choice("Answer: (G)") == "G"
    assert metrics.extract_choice("no letter here") is None


def test_multiple_choice_accuracy() -> None:
    assert metrics.multiple_choice_accuracy("The answer is (B)", "B", OPTIONS) == 1.0
    assert metrics.multiple_choice_accuracy("The answer is (B)", " b ", OPTIONS) == 1.0
    assert metrics.multiple_choice_accuracy("mouse", "B", OPTIONS) == 0.0
    assert metrics.option_letters(4) == "ABCD"
    with pytest.raises(ValueError, match="1-26 options"):
        metrics.option_letters(0)


# ---------------------------------------------------------------- MME


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Yes", "yes"),
        ("yes, there is a dog", "yes"),
        ("No.", "no"),
        (" NO", "no"),
        ("Maybe", None),
        ("Yesterday", None),
        ("", None),
    ],
)
def test_parse_yes_no(text: str, parsed: str | None) -> None:
    assert metrics.parse_yes_no(text) == parsed


def test_mme_accuracy_plus_needs_both_questions_of_an_image() -> None:
    images = ["a", "a", "b", "b", "c", "c"]
    correct = [True, True, True, False, False, False]
    scores = metrics.mme_scores(images, correct)
    assert scores["accuracy"] == pytest.approx(3 / 6)
    assert scores["accuracy_plus"] == pytest.approx(1 / 3)  # only image "a"
    assert scores["score"] == pytest.approx(100 * (0.5 + 1 / 3))


# ---------------------------------------------------------------- ChartQA relaxed accuracy


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("105", "100", 1.0),  # exactly 5 %: inclusive
        ("95", "100", 1.0),
        ("1.05", "1", 1.0),  # exactly 5 % although 1.05 - 1 is 0.0500000000000000444 in floats
        ("105.01", "100", 0.0),  # just over
        ("94.99", "100", 0.0),
        ("45%", "45", 1.0),
        ("0.45", "45%", 1.0),
        ("1,050", "1000", 1.0),
        ("1,051", "1000", 0.0),
        ("0.0", "0", 1.0),
        ("0.01", "0", 0.0),
        ("Yes", "yes", 1.0),
        ("apple", "apples", 0.0),
        ("12 apples", "12", 0.0),  # not a number: needs an exact match
    ],
)
def test_relaxed_accuracy(prediction: str, gold: str, expected: float) -> None:
    assert metrics.relaxed_accuracy(prediction, gold) == expected


def test_relaxed_accuracy_takes_the_best_gold() -> None:
    assert metrics.relaxed_accuracy("2019", ["2018", "2019"]) == 1.0


# ---------------------------------------------------------------- ANLS


def test_levenshtein() -> None:
    assert metrics.levenshtein("kitten", "sitting") == 3
    assert metrics.levenshtein("", "abc") == 3
    assert metrics.levenshtein("abc", "abc") == 0


@pytest.mark.parametrize(
    ("prediction", "gold", "expected"),
    [
        ("abcd", "abcd", 1.0),
        ("abcd", "abce", 0.75),  # NL = 1/4
        ("abc", "abd", 2 / 3),  # NL = 1/3 < 0.5
        ("ab", "ac", 0.0),  # NL = 0.5 is at the threshold: scored 0
        ("  Hello   World ", "hello world", 1.0),  # lower-cased, whitespace collapsed
        ("", "", 1.0),  # two empty strings are identical
        ("", "x", 0.0),
        ("x", "", 0.0),
        ("abce", ["xyz", "abcd"], 0.75),  # max over gold answers
    ],
)
def test_anls(prediction: str, gold: str | list[str], expected: float) -> None:
    assert metrics.anls(prediction, gold) == pytest.approx(expected)


def test_anls_needs_a_gold_answer() -> None:
    with pytest.raises(ValueError, match="at least one gold answer"):
        metrics.anls("x", [])


# ---------------------------------------------------------------- GSM8K


def test_parse_gsm8k_gold() -> None:
    assert metrics.parse_gsm8k_gold("5 + 13 = <<5+13=18>>18\n#### 18") == 18
    assert metrics.parse_gsm8k_gold("...\n#### 1,450,000") == 1_450_000
    assert metrics.parse_gsm8k_gold("...\n#### -10") == -10
    with pytest.raises(ValueError, match="no '#### <number>' line"):
        metrics.parse_gsm8k_gold("The answer is 18")
    with pytest.raises(ValueError, match="not a number"):
        metrics.parse_gsm8k_gold("#### eighteen")


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("She makes $1,234.50 per week.", 1234.5),
        ("The answer is 18.", 18),
        ("18 dollars", 18),
        ("It takes 3 bolts, so 2 + 1 = 3 bolts in total", 3),
        ("16-3-4=9 eggs", 9),  # a minus between numbers is subtraction, not a sign
        ("The temperature is -3 degrees", -3),
        ("It costs -$5", -5),
        ("Total: 12.0", 12),
        ("#### 70,000", 70000),
        ("no digits at all", None),
    ],
)
def test_extract_final_number(text: str, number: float | None) -> None:
    assert metrics.extract_final_number(text) == number


def test_gsm8k_accuracy_compares_numerically() -> None:
    assert metrics.gsm8k_accuracy("So she earns $18.00.", "#### 18") == 1.0
    assert metrics.gsm8k_accuracy("So she earns 17 dollars", "#### 18") == 0.0
    assert metrics.gsm8k_accuracy("I don't know", "#### 18") == 0.0


@pytest.fixture(scope="module")
def gsm8k_rows() -> list[dict]:
    if not GSM8K_TEST.is_file():
        pytest.skip(f"GSM8K reference split not found at {GSM8K_TEST} (only present in the dev workspace)")
    return [json.loads(line) for line in GSM8K_TEST.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_every_real_gsm8k_gold_parses_to_a_number(gsm8k_rows: list[dict]) -> None:
    assert len(gsm8k_rows) == 1319
    for row in gsm8k_rows:
        assert isinstance(metrics.parse_gsm8k_gold(row["answer"]), float)


def test_real_gsm8k_gold_text_scored_against_itself_is_perfect(gsm8k_rows: list[dict]) -> None:
    rows = get_task("gsm8k").load(GSM8K_TEST)
    predictions = [{"id": row["id"], "prediction": row["answer"]} for row in rows]
    per_row, summary = score_predictions("gsm8k", predictions, rows)
    assert summary["n"] == 1319
    assert summary["score"] == 1.0
    assert all(result["score"] == 1.0 for result in per_row)
