"""Data-pipeline fixtures: a small synthetic set, a hostile corpus next to it, one normalize run.

Everything normalize-related shares a single run over one input directory (synthetic files +
the three-format round trip + hostile files), because each run starts tokenizer actors.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import pytest
from PIL import Image

from dimoe.config.data import NormalizeConfig
from dimoe.data.synthetic import synthesize

SYNTH_SIZE = 40
MAX_SEQ_LEN = 128
ROUND_TRIP_IMAGE = "images/train/scene_00000.png"
ROUND_TRIP_TURNS = [
    ("What colour is the shape in the top left?", "red"),
    ("Describe every shape in the image.", "There is one red circle."),
]


def png_bytes(size: tuple[int, int] = (8, 8), colour: tuple[int, int, int] = (255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares `width`×`height` (a decompression bomb if anyone decoded it)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def round_trip_records() -> dict[str, dict]:
    """One conversation with an image, written in each of the three raw formats."""
    (q1, a1), (q2, a2) = ROUND_TRIP_TURNS
    llava = {
        "id": "rt",
        "split": "test",
        "image": ROUND_TRIP_IMAGE,
        "conversations": [
            {"from": "human", "value": f"<image>\n{q1}"},
            {"from": "gpt", "value": a1},
            {"from": "human", "value": q2},
            {"from": "gpt", "value": a2},
        ],
    }
    sharegpt = {
        "id": "rt",
        "split": "test",
        "images": [ROUND_TRIP_IMAGE],
        "conversations": [
            {"from": "user", "value": f"<image>\n{q1}"},
            {"from": "assistant", "value": a1},
            {"from": "user", "value": q2},
            {"from": "assistant", "value": a2},
        ],
    }
    openai = {
        "id": "rt",
        "split": "test",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": ROUND_TRIP_IMAGE}},
                    {"type": "text", "text": q1},
                ],
            },
            {"role": "assistant", "content": a1},
            {"role": "user", "content": [{"type": "text", "text": q2}]},
            {"role": "assistant", "content": [{"type": "text", "text": a2}]},
        ],
    }
    return {"llava": llava, "sharegpt": sharegpt, "openai": openai}


def _chat(question: str, answer: str, **extra) -> dict:
    return {
        "conversations": [{"from": "human", "value": question}, {"from": "gpt", "value": answer}],
        "split": "train",
        **extra,
    }


# Line of stage4_joint_hostile.jsonl → the reject reason it must produce (None: a good row).
HOSTILE_LINES: list[tuple[bytes, str | None]] = [
    (b'{"id": "cut", "messages": [', "bad_json"),
    (json.dumps(_chat("<image>\nWhat?", "x", image="hostile/nope.png")).encode(), "missing_image"),
    (json.dumps(_chat("<image>\nWhat?", "x", image="../outside.png")).encode(), "image_outside_root"),
    (json.dumps(_chat("<image>\nWhat?", "x", image="/etc/hostname")).encode(), "image_outside_root"),
    (json.dumps(_chat("<image>\nWhat?", "x", image="hostile/truncated.png")).encode(), "bad_image"),
    (json.dumps(_chat("<image>\nWhat?", "x", image="hostile/huge.png")).encode(), "image_too_large"),
    (json.dumps(_chat("<image>\nWhat?", "x", image="hostile/not_an_image.png")).encode(), "bad_image"),
    (json.dumps(_chat("<image>\nWhat?", "x", image="data:image/png;base64,@@@")).encode(), "bad_image_ref"),
    (
        json.dumps(_chat("<image>\nWhat?", "x", image="https://example.com/a.png")).encode(),
        "unsupported_image_ref",
    ),
    (json.dumps({"id": "empty", "conversations": []}).encode(), "empty_conversation"),
    (
        json.dumps(
            {"conversations": [{"from": "bot", "value": "hi"}, {"from": "gpt", "value": "x"}]}
        ).encode(),
        "unknown_role",
    ),
    (json.dumps({"messages": [{"role": "tool", "content": "x"}]}).encode(), "unknown_role"),
    (
        json.dumps(
            {
                "conversations": [
                    {"from": "human", "value": "a"},
                    {"from": "human", "value": "b"},
                    {"from": "gpt", "value": "c"},
                ]
            }
        ).encode(),
        "bad_roles",
    ),
    (json.dumps({"conversations": [{"from": "human", "value": "anyone?"}]}).encode(), "no_response"),
    (json.dumps(_chat("Say a lot.", " ".join(["word"] * 400))).encode(), "too_long"),
    (b'{"id": "latin1 \xe9\xff", "conversations": []}', "not_utf8"),
    (b"[1, 2, 3]", "not_an_object"),
    (json.dumps({"hello": "world"}).encode(), "unknown_format"),
    (json.dumps(_chat("<image>\nWhat is this?", "a shape")).encode(), "image_placeholder"),
    (json.dumps(_chat("What?", "x", split="holdout")).encode(), "bad_split"),
    (
        json.dumps(
            {
                "id": "data_url_ok",
                "split": "val",
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {
                                    "url": "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
                                },
                            },
                            {"type": "text", "text": "What colour is it?"},
                        ],
                    },
                    {"role": "assistant", "content": "red"},
                ],
            }
        ).encode(),
        None,
    ),
]
BROKEN_ARRAY = b'[{"id": "a", "conversations": ['  # a .json array that is not valid JSON at all


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synthesize(out, seed=0, size=SYNTH_SIZE)
    return out


@pytest.fixture(scope="session")
def raw_dir(synth_dir, tmp_path_factory) -> Path:
    """The synthetic raw files plus the round-trip and hostile files, under one datasets root."""
    base = tmp_path_factory.mktemp("corpus")
    raw = base / "raw"
    shutil.copytree(synth_dir / "raw", raw)
    (base / "outside.png").write_bytes(png_bytes())  # exists, but outside the datasets root
    hostile = raw / "hostile"
    hostile.mkdir()
    good = png_bytes((32, 32))
    (hostile / "truncated.png").write_bytes(good[: len(good) // 2])
    (hostile / "huge.png").write_bytes(png_header_only(100_000, 100_000))
    (hostile / "not_an_image.png").write_bytes(b"GIF89a but not really")
    records = round_trip_records()
    (raw / "stage3_vision_rt_llava.json").write_text(json.dumps([records["llava"]]))
    (raw / "stage3_vision_rt_sharegpt.jsonl").write_text(json.dumps(records["sharegpt"]) + "\n")
    (raw / "stage3_vision_rt_openai.jsonl").write_text(json.dumps(records["openai"]) + "\n")
    (raw / "stage4_joint_hostile.jsonl").write_bytes(b"\n".join(line for line, _ in HOSTILE_LINES) + b"\n\n")
    (raw / "stage2_llm_broken.json").write_bytes(BROKEN_ARRAY)
    return raw


@pytest.fixture(scope="session")
def normalized(ray_cluster, raw_dir, synth_dir, tmp_path_factory) -> tuple[Path, dict]:
    """(out_dir, summary) of one normalize run over `raw_dir`."""
    from dimoe.data.normalize import normalize

    out = tmp_path_factory.mktemp("normalized") / "v1"
    config = NormalizeConfig(max_seq_len=MAX_SEQ_LEN, progress=False)
    summary = normalize(raw_dir, out, synth_dir / "tokenizer", config=config)
    return out, summary
