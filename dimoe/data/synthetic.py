"""Built-in demo data: coloured shapes on a 32×32 canvas, small enough for the tiny model to learn
on a CPU in minutes and real enough to exercise every part of the data pipeline.

A scene holds 1–3 shapes (circle/square/triangle in red/green/blue/yellow), each in a different
quadrant of the image (top left, top right, bottom left, bottom right): a 2×2 grid lines up with the
4×4 grid of image tokens the tiny vision tower produces, so positions stay learnable. Every
answer is a deterministic function of the scene (shapes are listed in quadrant order), so exact
match is a meaningful metric and the majority-answer baseline is well defined.

`synthesize(out_dir, seed, size, extra_test_scenes=0)` writes::

    out_dir/raw/stage1_projector.json   captions, LLaVA JSON array
    out_dir/raw/stage2_llm.jsonl        text-only instructions, ShareGPT JSONL (some with a system turn)
    out_dir/raw/stage3_vision.json      short-answer VQA, LLaVA JSON array
    out_dir/raw/stage4_joint.jsonl      multi-turn image chats, OpenAI messages JSONL
    out_dir/raw/images/<split>/<scene>.png
    out_dir/eval/vqa_test.jsonl, out_dir/eval/describe_test.jsonl
    out_dir/tokenizer/                  the demo BPE tokenizer, trained on all generated text
    out_dir/synth_summary.json

Each record carries its `split`; scenes (and so images) are never shared between splits.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from PIL import Image, ImageDraw

from dimoe.data.tokenizer import IMAGE, train_tokenizer
from dimoe.errors import UserError
from dimoe.io import atomic_output_dir, write_json, write_jsonl

IMAGE_SIZE = 32
CELL = IMAGE_SIZE // 2
COLOURS = {"red": (220, 50, 47), "green": (60, 180, 75), "blue": (50, 100, 230), "yellow": (240, 210, 40)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")  # also the canonical listing order
NUMBERS = ("zero", "one", "two", "three", "four")
SPLIT_FRACTIONS = {"train": 0.9, "val": 0.05, "test": 0.05}
QUESTION_TYPES = ("colour", "shape", "count", "position")
DESCRIBE_PROMPT = "Describe every shape in the image."
CAPTION_PROMPTS = (
    "Write a short caption for the image.",
    "What is in this picture?",
    "Give a brief description of the image.",
    "Caption this image.",
)
SYSTEM_PROMPT = "You are a careful assistant. Answer briefly and exactly."
WORDS = ("apple", "pear", "plum", "fig", "lime", "cat", "dog", "owl", "fox", "bee", "oak", "elm")
DEFAULT_VOCAB_SIZE = 2000
SUMMARY_FILE = "synth_summary.json"


class SynthSummary(TypedDict):
    out_dir: str
    seed: int
    size: int
    scenes_by_split: dict[str, int]
    records: dict[str, dict[str, int]]
    eval: dict[str, int]
    baselines: dict[str, dict[str, Any]]
    tokenizer: dict[str, Any]


@dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    quadrant: int  # index into POSITIONS
    size: int  # bounding box side in pixels
    dx: int  # jitter inside the quadrant, so equal layouts still give different images
    dy: int

    @property
    def position(self) -> str:
        return POSITIONS[self.quadrant]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}"


@dataclass(frozen=True)
class Scene:
    id: str
    split: str
    shapes: tuple[Shape, ...]  # sorted by quadrant

    @property
    def image_path(self) -> str:
        """Relative to `out_dir/raw` (the datasets root of the raw records)."""
        return f"images/{self.split}/{self.id}.png"


@dataclass(frozen=True)
class QA:
    question_type: str
    question: str
    answer: str


# ---------------------------------------------------------------- scenes and their text


def sample_scenes(rng: random.Random, size: int) -> list[Scene]:
    """`size` distinct scenes split train/val/test; duplicates are redrawn so no image repeats."""
    if size < len(SPLIT_FRACTIONS):
        raise UserError(
            f"size={size} is too small: need at least one scene per split ({len(SPLIT_FRACTIONS)})"
        )
    counts = {s: max(1, round(f * size)) for s, f in SPLIT_FRACTIONS.items() if s != "train"}
    counts["train"] = size - sum(counts.values())
    splits = [s for s in ("train", "val", "test") for _ in range(counts[s])]
    seen: set[tuple[Shape, ...]] = set()
    return [_new_scene(rng, seen, index, split) for index, split in enumerate(splits)]


def _new_scene(rng: random.Random, seen: set[tuple[Shape, ...]], index: int, split: str) -> Scene:
    """A scene unlike every scene in `seen` (which it joins), so no image repeats across splits."""
    shapes = _random_shapes(rng)
    while shapes in seen:
        shapes = _random_shapes(rng)
    seen.add(shapes)
    return Scene(f"scene_{index:05d}", split, shapes)


def _random_shapes(rng: random.Random) -> tuple[Shape, ...]:
    quadrants = sorted(rng.sample(range(len(POSITIONS)), rng.randint(1, 3)))
    shapes = []
    for q in quadrants:
        size = rng.randint(13, 15)
        room = CELL - size  # jitter only within the quadrant: a shape never spills into a neighbour
        low, high = -(room // 2), room - room // 2
        shapes.append(
            Shape(
                rng.choice(list(COLOURS)),
                rng.choice(SHAPES),
                q,
                size,
                rng.randint(low, high),
                rng.randint(low, high),
            )
        )
    return tuple(shapes)


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x0 = (shape.quadrant % 2) * CELL + (CELL - shape.size) // 2 + shape.dx
        y0 = (shape.quadrant // 2) * CELL + (CELL - shape.size) // 2 + shape.dy
        x1, y1 = x0 + shape.size - 1, y0 + shape.size - 1
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif shape.kind == "square":
            draw.rectangle((x0 + 1, y0 + 1, x1 - 1, y1 - 1), fill=fill)  # same visual weight as the circle
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)
    return image


def caption(scene: Scene) -> str:
    names = [f"a {s.name}" for s in scene.shapes]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return listed[0].upper() + listed[1:] + "."


def describe(scene: Scene) -> str:
    """The long answer (20–60 tokens): count, one sentence per shape in quadrant order, empty corners."""
    n, empty = len(scene.shapes), len(POSITIONS) - len(scene.shapes)
    parts = [f"There {'is' if n == 1 else 'are'} {NUMBERS[n]} shape{'s' * (n != 1)} on a black background."]
    parts += [f"In the {s.position} there is a {s.name}." for s in scene.shapes]
    parts.append(
        "The other corner is empty." if empty == 1 else f"The other {NUMBERS[empty]} corners are empty."
    )
    return " ".join(parts)


def vqa_candidates(scene: Scene) -> dict[str, list[QA]]:
    """Every short-answer question the scene answers unambiguously, by question type."""
    colours = Counter(s.colour for s in scene.shapes)
    names = Counter(s.name for s in scene.shapes)
    return {
        "colour": [
            QA("colour", f"What colour is the shape in the {s.position}?", s.colour) for s in scene.shapes
        ],
        "shape": [QA("shape", f"What shape is in the {s.position}?", s.kind) for s in scene.shapes],
        "count": [QA("count", "How many shapes are there?", NUMBERS[len(scene.shapes)])]
        + [QA("count", f"How many {c} shapes are there?", NUMBERS[colours[c]]) for c in COLOURS],
        "position": [
            QA("position", f"Where is the {s.name}?", s.position) for s in scene.shapes if names[s.name] == 1
        ],
    }


def text_task(rng: random.Random) -> tuple[str, str]:
    """One text-only instruction with a multi-token answer."""
    kind = rng.choice(("add", "subtract", "sort", "reverse", "max"))
    if kind in ("add", "subtract"):
        a, b = rng.randint(10, 99), rng.randint(1, 99)
        if kind == "subtract":
            a, b = max(a, b), min(a, b)
        op, value = ("+", a + b) if kind == "add" else ("-", a - b)
        return f"What is {a} {op} {b}?", f"{a} {op} {b} = {value}"
    if kind == "reverse":
        words = rng.sample(WORDS, rng.randint(3, 5))
        return f"Reverse this list: {', '.join(words)}.", ", ".join(reversed(words))
    numbers = rng.sample(range(1, 100), rng.randint(3, 6))
    listed = ", ".join(map(str, numbers))
    if kind == "sort":
        return f"Sort these numbers from smallest to largest: {listed}.", ", ".join(map(str, sorted(numbers)))
    return f"Which number is the largest: {listed}?", str(max(numbers))


# ---------------------------------------------------------------- raw records in three formats


def llava_record(record_id: str, scene: Scene, question: str, answer: str) -> dict[str, Any]:
    return {
        "id": record_id,
        "image": scene.image_path,
        "split": scene.split,
        "conversations": [
            {"from": "human", "value": f"{IMAGE}\n{question}"},
            {"from": "gpt", "value": answer},
        ],
    }


def openai_record(record_id: str, scene: Scene, turns: list[tuple[str, str]]) -> dict[str, Any]:
    """Multi-turn image chat; the image is attached to the first user turn."""
    messages: list[dict[str, Any]] = []
    for i, (question, answer) in enumerate(turns):
        content: list[dict[str, Any]] = [{"type": "text", "text": question}]
        if i == 0:
            content.insert(0, {"type": "image_url", "image_url": {"url": scene.image_path}})
        messages += [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]
    return {"id": record_id, "split": scene.split, "messages": messages}


def sharegpt_record(
    record_id: str, split: str, turns: list[tuple[str, str]], system: str | None
) -> dict[str, Any]:
    conversations = [{"from": "system", "value": system}] if system else []
    for question, answer in turns:
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"id": record_id, "split": split, "conversations": conversations}


def joint_turns(rng: random.Random, scene: Scene) -> list[tuple[str, str]]:
    """Describe alone, a question then describe, or describe then a question (last turn is the target)."""
    description = (DESCRIBE_PROMPT, describe(scene))
    qa = _pick_qa(rng, scene)
    return rng.choice(
        [[description], [(qa.question, qa.answer), description], [description, (qa.question, qa.answer)]]
    )


def _pick_qa(rng: random.Random, scene: Scene, question_type: str | None = None) -> QA:
    candidates = vqa_candidates(scene)
    question_type = question_type or rng.choice([t for t in QUESTION_TYPES if candidates[t]])
    return rng.choice(candidates[question_type])


# ---------------------------------------------------------------- the whole demo set


# Raw file of each source stage, in formats the normalizer reads (LLaVA JSON, ShareGPT/OpenAI JSONL).
RAW_FILES = {
    "stage1_projector": "stage1_projector.json",
    "stage2_llm": "stage2_llm.jsonl",
    "stage3_vision": "stage3_vision.json",
    "stage4_joint": "stage4_joint.jsonl",
}


def _training_records(rng: random.Random, scenes: list[Scene]) -> dict[str, list[dict[str, Any]]]:
    """The raw records of each source stage (the draws from `rng` happen in a fixed order, so the
    data set is a function of the seed)."""
    captions = [llava_record(f"cap_{s.id}", s, rng.choice(CAPTION_PROMPTS), caption(s)) for s in scenes]
    vqa = []
    for s in scenes:  # one question of every type the scene answers
        for question_type in [t for t, c in vqa_candidates(s).items() if c]:
            qa = _pick_qa(rng, s, question_type)
            vqa.append(llava_record(f"vqa_{s.id}_{question_type}", s, qa.question, qa.answer))
    joint = [openai_record(f"joint_{s.id}", s, joint_turns(rng, s)) for s in scenes]
    text = [
        sharegpt_record(
            f"text_{i:05d}",
            scene.split,  # borrow the scene split sequence so text rows follow the same 90/5/5 split
            [text_task(rng) for _ in range(rng.choice((1, 1, 1, 2)))],
            SYSTEM_PROMPT if rng.random() < 0.3 else None,
        )
        for i, scene in enumerate(scenes)
    ]
    return {"stage1_projector": captions, "stage2_llm": text, "stage3_vision": vqa, "stage4_joint": joint}


def _eval_records(rng: random.Random, scenes: list[Scene]) -> dict[str, list[dict[str, Any]]]:
    """The test split's VQA questions (one per answerable type) and describe prompts."""
    test = [s for s in scenes if s.split == "test"]
    vqa_test = [
        _eval_row(s, _pick_qa(rng, s, t)) for s in test for t in QUESTION_TYPES if vqa_candidates(s)[t]
    ]
    describe_test = [_eval_row(s, QA("describe", DESCRIBE_PROMPT, describe(s))) for s in test]
    return {"vqa_test": vqa_test, "describe_test": describe_test}


def synthesize(
    out_dir: str | Path,
    seed: int = 0,
    size: int = 2000,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    extra_test_scenes: int = 0,
) -> SynthSummary:
    """Write the demo data set for `size` scenes (deterministic in `seed`); see the module docstring.

    `extra_test_scenes` more test scenes are drawn after everything else, so they add evaluation
    rows (after the usual ones, which stay as they were) and leave every training record, image
    and the tokenizer byte for byte as without them: a larger test set measures the same training.
    """
    final_dir = Path(out_dir)
    # Built aside and swapped in: a rerun never mixes old and new files.
    with atomic_output_dir(final_dir, SUMMARY_FILE) as out_dir:
        rng = random.Random(seed)
        scenes = sample_scenes(rng, size)
        raw = out_dir / "raw"
        for split in SPLIT_FRACTIONS:
            (raw / "images" / split).mkdir(parents=True, exist_ok=True)
        records = _training_records(rng, scenes)
        for stage, name in RAW_FILES.items():
            (write_jsonl if name.endswith(".jsonl") else write_json)(raw / name, records[stage])
        evals = _eval_records(rng, scenes)
        # Drawn after every other draw, so their number cannot change the training data.
        seen = {scene.shapes for scene in scenes}
        extra = [_new_scene(rng, seen, len(scenes) + i, "test") for i in range(extra_test_scenes)]
        more = _eval_records(rng, extra)
        evals = {name: rows + more[name] for name, rows in evals.items()}
        scenes += extra
        for scene in scenes:
            render(scene).save(raw / scene.image_path, format="PNG")
        for name, rows in evals.items():
            write_jsonl(out_dir / "eval" / f"{name}.jsonl", rows)
        joint = records["stage4_joint"]
        corpus = list(_texts(records["stage1_projector"], records["stage3_vision"], records["stage2_llm"]))
        corpus += [m for r in joint for m in _openai_texts(r)]
        tokenizer = train_tokenizer(corpus, vocab_size, out_dir / "tokenizer")
        summary: SynthSummary = {
            "out_dir": str(final_dir),
            "seed": seed,
            "size": size,
            "scenes_by_split": dict(Counter(s.split for s in scenes)),
            "records": {stage: dict(Counter(r["split"] for r in rows)) for stage, rows in records.items()},
            "eval": {name: len(rows) for name, rows in evals.items()},
            "baselines": majority_baselines(
                [s for s in scenes if s.split == "train"], evals["vqa_test"] + evals["describe_test"]
            ),
            "tokenizer": {"dir": str(final_dir / "tokenizer"), "vocab_size": len(tokenizer)},
        }
        write_json(out_dir / SUMMARY_FILE, summary)
    return summary


def majority_baselines(train: list[Scene], test_rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per question type: the most frequent answer over every train-scene question of that type, and
    the exact-match accuracy of always giving it on the test rows."""
    answers: dict[str, Counter] = {t: Counter() for t in (*QUESTION_TYPES, "describe")}
    for scene in train:
        for question_type, qas in vqa_candidates(scene).items():
            answers[question_type].update(qa.answer for qa in qas)
        answers["describe"][describe(scene)] += 1
    baselines = {}
    for question_type, counter in answers.items():
        rows = [r for r in test_rows if r["question_type"] == question_type]
        if not counter or not rows:
            continue
        majority = counter.most_common(1)[0][0]
        accuracy = sum(r["answer"] == majority for r in rows) / len(rows)
        baselines[question_type] = {
            "answer": majority,
            "accuracy": round(accuracy, 4),
            "test_rows": len(rows),
        }
    return baselines


def _eval_row(scene: Scene, qa: QA) -> dict[str, Any]:
    return {
        "id": f"{qa.question_type}_{scene.id}",
        "image": f"raw/{scene.image_path}",
        "question": qa.question,
        "answer": qa.answer,
        "question_type": qa.question_type,
    }


def _texts(*record_lists: list[dict[str, Any]]) -> Iterable[str]:
    for records in record_lists:
        for record in records:
            for turn in record["conversations"]:
                yield turn["value"].replace(IMAGE, "").strip()


def _openai_texts(record: dict[str, Any]) -> Iterable[str]:
    for message in record["messages"]:
        content = message["content"]
        yield from (
            [p["text"] for p in content if p["type"] == "text"] if isinstance(content, list) else [content]
        )
