"""Per-example metrics of the published VLM and math benchmarks.

Every function scores one example and returns a float in [0, 1] (or a parsed value for the
extraction helpers); averaging over a dataset is the task's job (see `dimoe.eval.tasks`).
Each docstring names the evaluation the rule reproduces.
"""

from __future__ import annotations

import itertools
import math
import re
import string
from collections import Counter
from collections.abc import Sequence

# --------------------------------------------------------------------------------------------
# VQAv2 / TextVQA: answer normalisation and the 10-human-answer accuracy
# --------------------------------------------------------------------------------------------

_VQA_PUNCTUATION = (
    ";",
    "/",
    "[",
    "]",
    '"',
    "{",
    "}",
    "(",
    ")",
    "=",
    "+",
    "\\",
    "_",
    "-",
    ">",
    "<",
    "@",
    "`",
    ",",
    "?",
    "!",
)
_DIGIT_BETWEEN_COMMA = re.compile(r"\d,\d")
# A period that does not start a decimal fraction. The official regex, `(?!<=\d)(\.)(?!\d)`, has a
# malformed look-behind and so in effect strips every period not followed by a digit ("1." -> "1").
_NON_DECIMAL_PERIOD = re.compile(r"\.(?!\d)")
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
# Contractions the VQA evaluation restores when written without (some of) their apostrophes.
# "I'd", "I'm", ... are left out: the official table keys them with a capital I but looks words up
# after lower-casing, so they never fire. "we're" is left out because "were" is an ordinary word.
_CONTRACTIONS = (
    "ain't",
    "aren't",
    "can't",
    "could've",
    "couldn't",
    "couldn't've",
    "didn't",
    "doesn't",
    "don't",
    "hadn't",
    "hadn't've",
    "hasn't",
    "haven't",
    "he'd",
    "he'd've",
    "he's",
    "how'd",
    "how'll",
    "how's",
    "isn't",
    "it'd",
    "it'd've",
    "it'll",
    "let's",
    "ma'am",
    "mightn't",
    "mightn't've",
    "might've",
    "mustn't",
    "must've",
    "needn't",
    "not've",
    "o'clock",
    "oughtn't",
    "'ow's'at",
    "shan't",
    "she'd",
    "she'd've",
    "she's",
    "should've",
    "shouldn't",
    "shouldn't've",
    "somebody'd",
    "somebody'd've",
    "somebody'll",
    "somebody's",
    "someone'd",
    "someone'd've",
    "someone'll",
    "someone's",
    "something'd",
    "something'd've",
    "something'll",
    "that's",
    "there'd",
    "there'd've",
    "there're",
    "there's",
    "they'd",
    "they'd've",
    "they'll",
    "they're",
    "they've",
    "'twas",
    "wasn't",
    "we'd",
    "we'd've",
    "we've",
    "weren't",
    "what'll",
    "what're",
    "what's",
    "what've",
    "when's",
    "where'd",
    "where's",
    "where've",
    "who'd",
    "who'd've",
    "who'll",
    "who's",
    "who've",
    "why'll",
    "why're",
    "why's",
    "won't",
    "would've",
    "wouldn't",
    "wouldn't've",
    "y'all",
    "y'all'll",
    "y'all'd've",
    "you'd",
    "you'd've",
    "you'll",
    "you're",
    "you've",
)


def _apostrophe_variants(word: str) -> list[str]:
    """Every spelling of `word` with any subset of its apostrophes dropped ("don't" -> "dont")."""
    pieces = word.split("'")
    variants = []
    for keep in itertools.product((True, False), repeat=len(pieces) - 1):
        joined = pieces[0]
        for kept, piece in zip(keep, pieces[1:], strict=True):
            joined += ("'" if kept else "") + piece
        variants.append(joined)
    return variants


_CONTRACTION_TABLE = {variant: word for word in _CONTRACTIONS for variant in _apostrophe_variants(word)}


def _vqa_strip_punctuation(text: str) -> str:
    """VQA evaluation punctuation rule: a mark touching a space (or any mark, when the text holds a
    digit-grouping comma like "1,000") is deleted; otherwise it is replaced by a space."""
    delete_all = _DIGIT_BETWEEN_COMMA.search(text) is not None
    out = text
    for mark in _VQA_PUNCTUATION:
        touches_space = f"{mark} " in text or f" {mark}" in text
        out = out.replace(mark, "" if (touches_space or delete_all) else " ")
    return _NON_DECIMAL_PERIOD.sub("", out)


def _vqa_digits_articles_contractions(text: str) -> str:
    """VQA evaluation word rule: lower-case, number words -> digits, drop articles, restore
    contractions, collapse whitespace."""
    words = [_NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    words = [_CONTRACTION_TABLE.get(word, word) for word in words if word not in _ARTICLES]
    return " ".join(words)


def normalize_vqa_answer(text: str) -> str:
    """Normalise an answer as the VQA challenge evaluation (EvalAI answer processor) does."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _vqa_digits_articles_contractions(_vqa_strip_punctuation(text))


def vqa_accuracy(prediction: str, gold_answers: Sequence[str]) -> float:
    """VQA challenge accuracy: mean over the leave-one-out subsets of the human answers (10 subsets
    of 9 for VQAv2/TextVQA) of min(#subset answers equal to the prediction / 3, 1).

    Prediction and answers are both normalised with `normalize_vqa_answer` (the official script
    only does so when the humans disagree; on the released, already-normalised annotations the
    result is the same, and on user data it avoids "two" != "2"). A single gold answer has no
    leave-one-out subset, so it is scored as a normalised exact match.
    """
    if not gold_answers:
        raise ValueError("vqa_accuracy needs at least one gold answer, got none")
    pred = normalize_vqa_answer(prediction)
    golds = [normalize_vqa_answer(answer) for answer in gold_answers]
    if len(golds) == 1:
        return float(pred == golds[0])
    matches = sum(gold == pred for gold in golds)
    # Leaving out a matching answer removes one match from the subset; leaving out another does not.
    per_subset = [min((matches - (gold == pred)) / 3.0, 1.0) for gold in golds]
    return sum(per_subset) / len(per_subset)


# --------------------------------------------------------------------------------------------
# Exact match (GQA, demo tasks) and token F1
# --------------------------------------------------------------------------------------------

_PUNCTUATION_TABLE = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """SQuAD-style normalisation used by GQA-style exact match: lower-case, drop punctuation and
    the articles a/an/the, collapse whitespace."""
    words = text.lower().translate(_PUNCTUATION_TABLE).split()
    return " ".join(word for word in words if word not in _ARTICLES)


def _as_list(gold: str | Sequence[str]) -> list[str]:
    return [gold] if isinstance(gold, str) else list(gold)


def exact_match(prediction: str, gold: str | Sequence[str]) -> float:
    """Normalised exact match (GQA accuracy): 1.0 when the prediction equals any gold answer after
    `normalize_text`."""
    pred = normalize_text(prediction)
    return float(any(pred == normalize_text(answer) for answer in _as_list(gold)))


def token_f1(prediction: str, gold: str | Sequence[str]) -> float:
    """SQuAD token-level F1 on normalised text, max over gold answers (two empty texts score 1)."""
    pred_tokens = normalize_text(prediction).split()
    return max(_token_f1(pred_tokens, normalize_text(answer).split()) for answer in _as_list(gold))


def _token_f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    overlap = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred_tokens), overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


# --------------------------------------------------------------------------------------------
# Multiple choice (ScienceQA, MMBench, MMMU)
# --------------------------------------------------------------------------------------------

_LETTERS = string.ascii_uppercase
# "answer is X" / "Answer: (x)". A bare lower-case letter counts only when nothing but punctuation
# follows it, so "the answer is a dog" does not read as option A.
_STATED_ANSWER = re.compile(
    r"(?i:\banswer\b)\s*(?:(?i:is)\s*)?[:\-]?\s*(?:\(([A-Za-z])\)|([A-Z])(?![\w'])|([a-z])\W*$)"
)
_PARENTHESISED_LETTER = re.compile(r"\(([A-Za-z])\)")
_LONE_LETTER = re.compile(r"^\s*\(?([A-Za-z])\)?\s*[.:)]?\s*$")
_LEADING_LETTER = re.compile(r"^\s*\(?([A-Za-z])[.:)]\s")


def option_letters(n_options: int) -> str:
    """The letters A, B, ... labelling `n_options` options."""
    if not 0 < n_options <= len(_LETTERS):
        raise ValueError(f"a multiple-choice question needs 1-{len(_LETTERS)} options, got {n_options}")
    return _LETTERS[:n_options]


def extract_choice(text: str, options: Sequence[str] | None = None) -> str | None:
    """Option letter chosen by a free-text answer, in the spirit of the MMBench / MMMU / ScienceQA
    answer extractors: "The answer is (B)", "Answer: C", "(B) cat", "B.", "b"; failing a letter, the
    one option whose text the answer contains. Returns None when no single option is identified.
    """
    valid = option_letters(len(options)) if options else _LETTERS
    # Strongest signal first: a letter the text opens with beats one quoted later ("B. Not (A)").
    for pattern in (_STATED_ANSWER, _LONE_LETTER, _LEADING_LETTER, _PARENTHESISED_LETTER):
        for match in pattern.finditer(text):
            letter = next(group for group in match.groups() if group).upper()
            if letter in valid:
                return letter
    return _choice_by_option_text(text, options) if options else None


def _choice_by_option_text(text: str, options: Sequence[str]) -> str | None:
    """The option whose normalised text appears as whole words in the answer; an option contained
    in another matching option ("red" in "dark red") yields to the longer one."""
    padded = f" {normalize_text(text)} "
    found = {i: normalize_text(option) for i, option in enumerate(options)}
    found = {i: option for i, option in found.items() if option and f" {option} " in padded}
    maximal = [
        i
        for i, option in found.items()
        if not any(option != other and f" {option} " in f" {other} " for other in found.values())
    ]
    return _LETTERS[maximal[0]] if len(maximal) == 1 else None


def multiple_choice_accuracy(
    prediction: str, gold_letter: str, options: Sequence[str] | None = None
) -> float:
    """1.0 when the option letter extracted from `prediction` is the gold letter."""
    return float(extract_choice(prediction, options) == gold_letter.strip().upper())


# --------------------------------------------------------------------------------------------
# MME yes/no
# --------------------------------------------------------------------------------------------

_FIRST_WORD = re.compile(r"[a-z]+")


def parse_yes_no(text: str) -> str | None:
    """ "yes" / "no" read off the start of an answer, as the MME evaluation tool does (it looks only
    at the first few characters); None when the answer starts with neither."""
    match = _FIRST_WORD.search(text.lower())
    word = match.group(0) if match else ""
    return word if word in ("yes", "no") else None


def mme_scores(image_ids: Sequence[str], correct: Sequence[bool]) -> dict[str, float]:
    """MME accuracy (per question) and accuracy+ (per image: every question of the image correct;
    MME asks two per image), as fractions; MME's published sub-task score is 100 * (acc + acc+)."""
    if len(image_ids) != len(correct):
        raise ValueError(f"mme_scores got {len(image_ids)} image ids but {len(correct)} results")
    if not correct:
        return {"accuracy": 0.0, "accuracy_plus": 0.0, "score": 0.0}
    per_image: dict[str, bool] = {}
    for image_id, ok in zip(image_ids, correct, strict=True):
        per_image[image_id] = per_image.get(image_id, True) and bool(ok)
    accuracy = sum(map(bool, correct)) / len(correct)
    accuracy_plus = sum(per_image.values()) / len(per_image)
    return {"accuracy": accuracy, "accuracy_plus": accuracy_plus, "score": 100 * (accuracy + accuracy_plus)}


# --------------------------------------------------------------------------------------------
# ChartQA relaxed accuracy
# --------------------------------------------------------------------------------------------

_PLAIN_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)")
# 0.05 itself is not exactly representable: 1.05 vs 1.0 computes a change of 0.0500000000000000444.
_TOLERANCE_SLACK = 1e-9


def _chartqa_numbers(text: str) -> list[float]:
    """Values a ChartQA answer may denote. "1,234" is 1234; "45%" may mean 45 (the chart's unit,
    how ChartQA writes most golds) or 0.45 (how the Pix2Struct reference reads it)."""
    body = text.strip().replace(",", "")
    percent = body.endswith("%")
    body = body.removesuffix("%").strip()
    if not _PLAIN_NUMBER.fullmatch(body):
        return []
    value = float(body)
    return [value, value / 100] if percent else [value]


def relaxed_accuracy(prediction: str, gold: str | Sequence[str], tolerance: float = 0.05) -> float:
    """ChartQA relaxed accuracy (Masry et al. 2022; Pix2Struct reference code): a numeric answer is
    right within `tolerance` relative change of the gold, inclusive; other answers need a
    case-insensitive exact match. Max over gold answers."""
    return max(_relaxed_one(prediction, answer, tolerance) for answer in _as_list(gold))


def _relaxed_one(prediction: str, gold: str, tolerance: float) -> float:
    pred_values, gold_values = _chartqa_numbers(prediction), _chartqa_numbers(gold)
    if pred_values and gold_values:
        return float(
            any(
                abs(p - g) <= (tolerance + _TOLERANCE_SLACK) * abs(g)
                for p in pred_values
                for g in gold_values
            )
        )
    return float(prediction.strip().lower() == gold.strip().lower())


# --------------------------------------------------------------------------------------------
# ANLS (DocVQA, InfographicVQA)
# --------------------------------------------------------------------------------------------


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def _anls_text(text: str) -> str:
    # The DocVQA evaluation compares lower-cased answers with whitespace collapsed.
    return " ".join(text.lower().split())


def anls(prediction: str, gold: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity for one question (ST-VQA / DocVQA evaluation):
    max over gold answers of 1 - NL, where NL = edit distance / length of the longer string, and
    0 when NL >= `threshold`. Two empty strings are identical (1.0); an empty prediction against a
    non-empty answer scores 0."""
    answers = _as_list(gold)
    if not answers:
        raise ValueError("anls needs at least one gold answer, got none")
    pred = _anls_text(prediction)
    return max(_similarity(pred, _anls_text(answer), threshold) for answer in answers)


def _similarity(pred: str, gold: str, threshold: float) -> float:
    longest = max(len(pred), len(gold))
    if longest == 0:
        return 1.0
    distance = levenshtein(pred, gold) / longest
    return 1.0 - distance if distance < threshold else 0.0


# --------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------

# Optional sign (not a minus glued to a preceding word or number, which is subtraction), optional
# "$", digits with optional thousands commas, optional decimals. A sentence's final period is left
# out because a decimal point must be followed by a digit.
_NUMBER_IN_TEXT = re.compile(r"(?:(?<![\w.])-)?(?:\$\s?)?[0-9]+(?:,[0-9]{3})*(?:\.[0-9]+)?")


def _to_float(number_text: str) -> float:
    return float(number_text.replace("$", "").replace(",", "").replace(" ", ""))


def parse_gsm8k_gold(answer: str) -> float:
    """GSM8K gold value: the number after the final "#### " of the reference solution (Cobbe et al.
    2021), thousands commas removed."""
    _, marker, tail = answer.rpartition("#### ")
    if not marker:
        raise ValueError(f"GSM8K gold answer has no '#### <number>' line: {answer[-80:]!r}")
    try:
        return _to_float(tail.strip())
    except ValueError:
        raise ValueError(f"GSM8K gold answer after '#### ' is not a number: {tail.strip()!r}") from None


def extract_final_number(text: str) -> float | None:
    """The last number in a free-text solution ("... so she makes $1,234.50 per week." -> 1234.5),
    tolerant of "$", thousands commas, units after the number and a trailing period."""
    matches = _NUMBER_IN_TEXT.findall(text)
    return _to_float(matches[-1]) if matches else None


def gsm8k_accuracy(prediction: str, gold_answer: str) -> float:
    """GSM8K accuracy: the final number of the prediction equals the gold number numerically."""
    predicted = extract_final_number(prediction)
    if predicted is None:
        return 0.0
    return float(math.isclose(predicted, parse_gsm8k_gold(gold_answer), rel_tol=1e-9, abs_tol=1e-9))
