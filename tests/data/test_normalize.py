"""normalize on a real local Ray cluster: round trip across formats, hostile input, bookkeeping."""

import json

import pyarrow.parquet as pq
import pytest

from dimoe.config.data import STAGES, NormalizeConfig
from dimoe.config.loader import ConfigError
from dimoe.data.normalize import NORMALIZED_SCHEMA, REJECT_SCHEMA, NormalizeError, normalize
from dimoe.data.tokenizer import IMAGE, load_tokenizer
from dimoe.io import OutputDirError

from .conftest import BROKEN_ARRAY, HOSTILE_LINES, MAX_SEQ_LEN, SYNTH_SIZE


def test_layout_schema_and_counts(normalized, synth_dir):
    out, summary = normalized
    assert json.loads((out / "normalize_summary.json").read_text()) == summary
    for stage in STAGES:
        table = pq.read_table(out / stage)
        assert table.schema.equals(NORMALIZED_SCHEMA, check_metadata=False), stage
        assert (table["seq_len"].to_numpy() <= MAX_SEQ_LEN).all()
    assert pq.read_table(out / "rejects").schema.equals(REJECT_SCHEMA, check_metadata=False)
    synth = json.loads((synth_dir / "synth_summary.json").read_text())["records"]
    for stage, by_split in synth.items():  # every synthetic record is clean
        stats = summary["sources"][stage]
        assert (
            stats["written"] == stats["read"] == sum(by_split.values())
            and stats["written_by_split"] == by_split
        )
    for source, stats in summary["sources"].items():
        assert (
            stats["read"]
            == stats["written"] + stats["rejected"]
            == stats["written"] + sum(stats["rejected_by_reason"].values())
        ), source
    totals = summary["totals"]
    assert totals["read"] == totals["written"] + totals["rejected"]
    assert summary["written_by_stage"]["stage1_projector"] == SYNTH_SIZE
    assert sum(summary["sources"]["stage4_joint"]["answer_length_hist"].values()) == SYNTH_SIZE


def test_rows_are_tokenized_with_the_chat_template(normalized, synth_dir):
    out, _ = normalized
    tokenizer = load_tokenizer(synth_dir / "tokenizer")
    image_id = tokenizer.convert_tokens_to_ids(IMAGE)
    rows = pq.read_table(out / "stage3_vision").to_pylist()
    row = next(r for r in rows if r["source"] == "stage3_vision")
    assert row["image"][:8] == b"\x89PNG\r\n\x1a\n" and (row["image_width"], row["image_height"]) == (32, 32)
    ids = row["input_ids"]
    assert ids.count(image_id) == row["num_image_tokens"] == 4
    assert row["seq_len"] == len(ids) == row["prompt_length"] + row["answer_length"]
    assert ids[-1] == tokenizer.eos_token_id
    answer = json.loads(row["messages"])[-1]["content"]
    assert tokenizer.decode(ids[row["prompt_length"] : -1]) == answer
    text = next(r for r in pq.read_table(out / "stage2_llm").to_pylist() if r["source"] == "stage2_llm")
    assert text["image"] is None and text["num_image_tokens"] == 0 and image_id not in text["input_ids"]


def test_same_conversation_in_three_formats_gives_the_same_row(normalized):
    out, _ = normalized
    rows = [
        r
        for r in pq.read_table(out / "stage3_vision").to_pylist()
        if r["source"].startswith("stage3_vision_rt_")
    ]
    assert sorted(r["source"] for r in rows) == [
        "stage3_vision_rt_llava",
        "stage3_vision_rt_openai",
        "stage3_vision_rt_sharegpt",
    ]
    content = [{k: v for k, v in r.items() if k not in ("origin", "source")} for r in rows]
    assert content[0] == content[1] == content[2]
    assert content[0]["id"] == "rt" and content[0]["split"] == "test" and content[0]["image"] is not None


def test_hostile_corpus_every_bad_record_rejected_with_its_reason(normalized):
    out, summary = normalized
    rejects = {r["origin"]: r for r in pq.read_table(out / "rejects").to_pylist()}
    expected = {
        f"stage4_joint_hostile.jsonl:{i}": reason for i, (_, reason) in enumerate(HOSTILE_LINES, 1) if reason
    }
    expected["stage2_llm_broken.json"] = "bad_json"
    assert {origin: r["reason"] for origin, r in rejects.items()} == expected
    assert all(r["detail"] for r in rejects.values())
    assert rejects["stage2_llm_broken.json"]["raw"] == BROKEN_ARRAY.decode()
    assert "\\xff" in rejects[next(o for o, r in expected.items() if r == "not_utf8")]["raw"]
    hostile = summary["sources"]["stage4_joint_hostile"]
    good = sum(reason is None for _, reason in HOSTILE_LINES)
    assert (hostile["read"], hostile["written"]) == (len(HOSTILE_LINES), good)  # blank lines are not records
    data_url_row = next(
        r for r in pq.read_table(out / "stage4_joint").to_pylist() if r["id"] == "data_url_ok"
    )
    assert data_url_row["split"] == "val" and (data_url_row["image_width"], data_url_row["image_height"]) == (
        8,
        8,
    )


def test_input_mistakes_fail_early_with_a_clear_message(raw_dir, synth_dir, tmp_path):
    stray = tmp_path / "in"
    stray.mkdir()
    (stray / "captions.jsonl").write_text("{}\n")
    with pytest.raises(NormalizeError, match="captions.jsonl.*stage_of"):
        normalize(stray, tmp_path / "out", synth_dir / "tokenizer")
    with pytest.raises(ConfigError, match="unknown stages"):
        normalize(
            stray,
            tmp_path / "out",
            synth_dir / "tokenizer",
            config=NormalizeConfig(stage_of={"captions.jsonl": "stage9"}),
        )
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        normalize(raw_dir, tmp_path / "out", tmp_path / "no_tokenizer")


def test_refuses_to_replace_a_foreign_directory(ray_cluster, raw_dir, synth_dir, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    with pytest.raises(OutputDirError, match="refusing to replace"):
        normalize(raw_dir, precious, synth_dir / "tokenizer")
    assert (precious / "thesis.tex").read_text() == "do not delete"
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]  # no temporary directory left behind


def test_a_plain_text_corpus_becomes_prompt_free_rows(ray_cluster, synth_dir, tmp_path):
    """`{"text": …}` records (a pretraining corpus): the whole text is the response, closed by EOS;
    an empty text or an image on a text record is rejected with its reason."""
    raw = tmp_path / "raw"
    raw.mkdir()
    texts = ["the red square is left of the blue circle", "three green triangles"]
    lines = [json.dumps({"id": f"t{i}", "text": t}) for i, t in enumerate(texts)]
    lines += [json.dumps({"text": "  "}), json.dumps({"text": "x", "image": "a.png"})]
    (raw / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    config = NormalizeConfig(stage_of={"corpus.jsonl": "stage2_llm"}, progress=False)
    normalize(raw, tmp_path / "out", synth_dir / "tokenizer", config=config)
    tokenizer = load_tokenizer(synth_dir / "tokenizer")
    rows = sorted(pq.read_table(tmp_path / "out" / "stage2_llm").to_pylist(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == ["t0", "t1"]
    for row, text in zip(rows, texts, strict=True):
        assert row["prompt_length"] == 0 and row["image"] is None
        assert row["input_ids"] == [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    reasons = sorted(pq.read_table(tmp_path / "out" / "rejects").column("reason").to_pylist())
    assert reasons == ["empty_text", "text_with_image"]
