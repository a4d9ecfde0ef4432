"""SigLIP pretraining of the tiny tower: it learns to tell held-out images apart by their captions,
and what it saves is imported by `model init --vision-from` weight for weight."""

import io
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import SiglipModel

from dimoe.config.loader import load_config
from dimoe.config.train import VisionPretrainConfig
from dimoe.data import synthetic
from dimoe.data.chat import Message, encode_chat
from dimoe.data.tokenizer import IMAGE
from dimoe.model.build import build_model
from dimoe.train.vision_pretrain import SUMMARY_FILE, pretrain_vision


def png(scene) -> bytes:
    buf = io.BytesIO()
    synthetic.render(scene).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def caption_source(tmp_path_factory, tokenizer):
    """A normalized caption source: scene images and their captions, train and val splits."""
    root = tmp_path_factory.mktemp("data")
    scenes = synthetic.sample_scenes(random.Random(0), 400)
    rows = []
    for scene in scenes:
        prompt = Message("user", f"{IMAGE}\nCaption this image.")
        messages = [prompt, Message("assistant", synthetic.caption(scene))]
        enc = encode_chat(tokenizer, messages, num_image_tokens=16)
        split = "val" if scene.split != "train" else "train"
        row = {"input_ids": enc.input_ids, "prompt_length": enc.prompt_length, "split": split}
        rows.append({**row, "image": png(scene)})
    (root / "captions").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), root / "captions" / "part-0.parquet")
    (root / "tok").mkdir()
    tokenizer.save_pretrained(str(root / "tok"))
    return root


def config(root, out, **update) -> VisionPretrainConfig:
    overrides = [f"data_dir={root}", "source=captions", f"tokenizer={root / 'tok'}", f"out_dir={out}",
                 "batch_size=32", "log_every=1000"] + [f"{k}={v}" for k, v in update.items()]  # fmt: skip
    return load_config("configs/vision_pretrain/tiny.yaml", VisionPretrainConfig, overrides)


def test_pretraining_learns_to_match_held_out_images_to_their_captions(caption_source, tmp_path):
    summary = pretrain_vision(config(caption_source, tmp_path / "siglip", steps=150), progress=False)
    retrieval = summary["val_retrieval_top1"]
    assert summary["pairs"] == {"train": 360, "val": 40}
    assert summary["loss"]["last"] < 0.5 * summary["loss"]["first"]
    assert retrieval["before"] < 3 * retrieval["chance"]
    assert retrieval["after"] > 6 * retrieval["chance"], retrieval
    # a re-run finds the finished directory and does not train again
    again = pretrain_vision(config(caption_source, tmp_path / "siglip", steps=150), progress=False)
    assert again == summary and (tmp_path / "siglip" / SUMMARY_FILE).is_file()


def test_model_init_imports_the_pretrained_tower_weight_for_weight(
    caption_source, tmp_path, tiny_spec, tokenizer
):
    pretrain_vision(config(caption_source, tmp_path / "siglip", steps=2), progress=False)
    siglip = SiglipModel.from_pretrained(str(tmp_path / "siglip"))
    model = build_model(tiny_spec, tokenizer, vision_from=tmp_path / "siglip")
    source = {k: v for k, v in siglip.vision_model.state_dict().items() if not k.startswith("head.")}
    target = model.vision.encoder.state_dict()
    assert source.keys() == target.keys()
    assert all(torch.equal(source[k], target[k]) for k in source)


def test_a_missing_source_names_the_folder(caption_source, tmp_path):
    with pytest.raises(FileNotFoundError, match="nosuch.*dimoe data normalize"):
        pretrain_vision(config(caption_source, tmp_path / "x", source="nosuch"), progress=False)
