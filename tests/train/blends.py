"""Tiny training data shared by the Ray training, Tune and dashboard tests: the colour of a flat
image, and one text task, written as stage-blend Parquet files."""

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from dimoe.data.chat import Message, encode_chat
from dimoe.data.tokenizer import IMAGE
from dimoe.train.launcher import STAGE_ORDER

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 230, 30)}


def png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buf, format="PNG")
    return buf.getvalue()


def write_blends(root: Path, tokenizer, num_image_tokens: int) -> Path:
    """A tiny task: the colour of a flat image, and one text task, as blend Parquet files."""
    rows = []
    for i in range(64):
        name = list(COLOURS)[i % 4]
        if i % 2:
            msgs = [Message("user", f"{IMAGE}\nWhat colour is the image?"), Message("assistant", name)]
            enc, image = encode_chat(tokenizer, msgs, num_image_tokens=num_image_tokens), png(COLOURS[name])
        else:
            msgs = [Message("user", f"Name colour number {i % 4}."), Message("assistant", name)]
            enc, image = encode_chat(tokenizer, msgs), None
        rows.append(
            {
                "input_ids": enc.input_ids,
                "prompt_length": enc.prompt_length,
                "image": image,
                "answer_length": enc.answer_length,
            }
        )
    table = pa.Table.from_pylist(rows)
    for blend in STAGE_ORDER:
        (root / "blends" / blend).mkdir(parents=True)
        pq.write_table(table, root / "blends" / blend / "part-0.parquet")
    return root
