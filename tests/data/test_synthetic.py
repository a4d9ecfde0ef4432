"""The built-in demo set: deterministic, splits disjoint, answers derived from the scene."""

import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np

from dimoe.data.formats import parse_record
from dimoe.data.synthetic import CELL, DESCRIBE_PROMPT, POSITIONS, Scene, render, sample_scenes, synthesize
from dimoe.data.tokenizer import load_tokenizer

from .conftest import SYNTH_SIZE


def file_digests(root):
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "synth_summary.json"  # the summary records its own path
    }


def records(raw):
    for path in sorted(raw.glob("stage*")):
        text = path.read_text()
        yield from json.loads(text) if path.suffix == ".json" else map(json.loads, text.splitlines())


def test_same_seed_same_bytes_other_seed_differs(synth_dir, tmp_path):
    again = synthesize(tmp_path / "again", seed=0, size=SYNTH_SIZE)
    assert file_digests(tmp_path / "again") == file_digests(synth_dir)
    first = json.loads((synth_dir / "synth_summary.json").read_text())
    assert {k: v for k, v in again.items() if k not in ("out_dir", "tokenizer")} == {
        k: v for k, v in first.items() if k not in ("out_dir", "tokenizer")
    }
    synthesize(tmp_path / "other", seed=1, size=SYNTH_SIZE)
    assert (tmp_path / "other/raw/stage3_vision.json").read_bytes() != (
        synth_dir / "raw/stage3_vision.json"
    ).read_bytes()


def test_splits_share_no_image_and_records_follow_their_scene(synth_dir):
    raw = synth_dir / "raw"
    digests = {
        split: {hashlib.sha256(p.read_bytes()).hexdigest() for p in (raw / "images" / split).glob("*.png")}
        for split in ("train", "val", "test")
    }
    assert sum(map(len, digests.values())) == SYNTH_SIZE
    assert not (
        digests["train"] & digests["val"]
        or digests["train"] & digests["test"]
        or digests["val"] & digests["test"]
    )
    seen_formats = set()
    for record in records(raw):
        conversation = parse_record(record)  # every generated record is valid in its format
        seen_formats.add(conversation.format)
        if conversation.image is not None:
            assert (
                conversation.image.startswith(f"images/{record['split']}/")
                and (raw / conversation.image).is_file()
            )
    assert seen_formats == {"llava", "sharegpt", "openai"}


def test_eval_files_and_baselines(synth_dir):
    summary = json.loads((synth_dir / "synth_summary.json").read_text())
    vqa = [json.loads(line) for line in (synth_dir / "eval/vqa_test.jsonl").read_text().splitlines()]
    describe = [
        json.loads(line) for line in (synth_dir / "eval/describe_test.jsonl").read_text().splitlines()
    ]
    assert len(describe) == summary["scenes_by_split"]["test"] and len(vqa) == summary["eval"]["vqa_test"]
    for row in vqa + describe:
        assert set(row) == {"id", "image", "question", "answer", "question_type"}
        assert row["image"].startswith("raw/images/test/") and (synth_dir / row["image"]).is_file()
    assert {r["question_type"] for r in vqa} <= {"colour", "shape", "count", "position"}
    assert all(r["question"] == DESCRIBE_PROMPT and r["question_type"] == "describe" for r in describe)
    assert {r["answer"] for r in vqa if r["question_type"] == "position"} <= set(POSITIONS)
    for question_type, baseline in summary["baselines"].items():
        assert 0.0 <= baseline["accuracy"] <= 1.0 and baseline["test_rows"] > 0, question_type
    tokenizer = load_tokenizer(synth_dir / "tokenizer")
    lengths = [len(tokenizer.encode(r["answer"], add_special_tokens=False)) for r in describe]
    assert 20 <= min(lengths) and max(lengths) <= 60


def test_every_shape_stays_inside_its_quadrant():
    """Positions are only learnable if a shape never spills into a neighbouring quadrant's tokens."""
    for scene in sample_scenes(random.Random(0), 400):
        for shape in scene.shapes:
            pixels = np.asarray(render(Scene("one", "train", (shape,)))).any(axis=2)
            rows, cols = np.nonzero(pixels)
            top, left = (shape.quadrant // 2) * CELL, (shape.quadrant % 2) * CELL
            assert top <= rows.min() and rows.max() < top + CELL, shape
            assert left <= cols.min() and cols.max() < left + CELL, shape


def test_readme_demo_images_exist_in_the_set_its_synth_command_makes():
    """The README's prompt and OpenAI examples name demo test images; they must be ones that
    `dimoe data synth --size N` (as the README runs it) writes, or the examples fail as written."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    size = int(re.search(r"dimoe data synth .*--size (\d+)", readme).group(1))
    named = set(re.findall(r"artifacts/data/demo/raw/(images/test/scene_\d+\.png)", readme))
    written = {s.image_path for s in sample_scenes(random.Random(0), size) if s.split == "test"}
    assert named and named <= written, named - written


def test_extra_test_scenes_add_eval_rows_and_leave_the_training_data_unchanged(synth_dir, tmp_path):
    more = tmp_path / "more"
    summary = synthesize(more, seed=0, size=SYNTH_SIZE, extra_test_scenes=7)
    before, after = file_digests(synth_dir), file_digests(more)
    # every file of the plain run is byte-identical: records, images, tokenizer; eval files grow
    changed = {name for name in before if before[name] != after[name]}
    assert changed == {"eval/vqa_test.jsonl", "eval/describe_test.jsonl"}
    new_images = set(after) - set(before)
    assert len(new_images) == 7 and all(name.startswith("raw/images/test/") for name in new_images)
    for name in changed:
        old_rows = (synth_dir / name).read_text().splitlines()
        new_rows = (more / name).read_text().splitlines()
        assert new_rows[: len(old_rows)] == old_rows  # the usual rows first, unchanged
        assert {json.loads(r)["image"] for r in new_rows[len(old_rows) :]} == new_images
    digests = [
        hashlib.sha256((more / n).read_bytes()).hexdigest() for n in after if n.startswith("raw/images/")
    ]
    assert len(set(digests)) == len(digests)  # no extra scene repeats an image of any split
    plain = json.loads((synth_dir / "synth_summary.json").read_text())
    assert summary["scenes_by_split"]["test"] == plain["scenes_by_split"]["test"] + 7
