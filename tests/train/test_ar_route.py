"""The MiniMind → LLaDA2.0 route on the local Ray cluster, tiny: AR pretraining of a causal DiMoE
model on a plain-text blend → its mask turned to `block` → WSD block-diffusion training validated
on held-out rows → top-k merge → both decoding styles. Both training stages pack their documents
(`data.pack_length`)."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from dimoe.cli import app
from dimoe.config.loader import ConfigError, load_config, resolve_config_path
from dimoe.config.train import TrainConfig
from dimoe.data.chat import encode_plain_text
from dimoe.model.build import load_checkpoint
from dimoe.train.launcher import run_stage
from dimoe.train.merge import merge_top_k

pytestmark = pytest.mark.timeout(900)
COLOURS = ["red", "green", "blue", "yellow"]


@pytest.fixture(scope="module")
def text_data(tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("route")
    texts = [f"the {COLOURS[i % 4]} square is left of the {COLOURS[(i + 1) % 4]} circle" for i in range(64)]
    rows = [{"input_ids": encode_plain_text(tokenizer, t).input_ids, "prompt_length": 0, "image": None,
             "origin": f"text-{i}"} for i, t in enumerate(texts)]  # fmt: skip
    schema = pa.schema([("input_ids", pa.list_(pa.int64())), ("prompt_length", pa.int64()),
                        ("image", pa.binary()), ("origin", pa.string())])  # fmt: skip
    (root / "data" / "blends" / "text").mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pylist(rows, schema=schema), root / "data" / "blends" / "text" / "part-0.parquet"
    )
    tokenizer.save_pretrained(root / "tokenizer")
    tiny = resolve_config_path("configs/model/tiny.yaml").resolve()
    (root / "model.yaml").write_text(f"base: {tiny}\nattention: causal\nvision: null\n")
    return root


def _stage(root, name, *overrides):
    common = [f"data.data_dir={root / 'data'}", "data.blend=text", f"output_dir={root / 'runs'}",
              "batch_size=4", "data.response_length=16", "log_every=1", "validation.fraction=0.25",
              "groups.backbone.lr=2e-3", "groups.router.lr=2e-3", f"stage={name}"]  # fmt: skip
    return load_config("configs/train/tiny/stage0_naive.yaml", TrainConfig, [*common, *overrides])


def _records(result):
    return [json.loads(line) for line in (result.log_dir / "train_metrics.jsonl").read_text().splitlines()]


def test_ar_pretraining_then_block_diffusion_then_merge_and_both_styles(ray_cluster, text_data):
    root = text_data
    ar_stage = _stage(root, "ar", f"model={root / 'model.yaml'}", f"tokenizer={root / 'tokenizer'}",
                      "objective=ar", "max_steps=6", "validation.every_steps=3",
                      "data.pack_length=48")  # fmt: skip
    ar = run_stage(ar_stage, progress=False)
    ar_losses = [r["val_loss"] for r in _records(ar) if "val_loss" in r]
    assert len(ar_losses) == 2 and ar_losses[1] < ar_losses[0]
    assert "loss_ar" in _records(ar)[0]
    # each worker's 4 documents (about 12 tokens each) are packed into fewer rows of up to 48 tokens
    assert all(r["samples"] < 4 for r in _records(ar) if "samples" in r)

    with pytest.raises(ConfigError, match="needs a model with attention: block"):
        run_stage(
            _stage(root, "refused", f"init_from={ar.final_dir}", "diffusion.block_size=4"), progress=False
        )
    converted = root / "converted"
    convert = ["model", "convert-ar", "--from", str(ar.final_dir), "--out", str(converted),
               "--attention", "block", "--set", "block_size=8"]  # fmt: skip
    out = CliRunner().invoke(app, convert)
    assert out.exit_code == 0, out.output

    schedule = (
        "diffusion.block_schedule={warmup_sizes: [4], decay_sizes: [8, 4], phase_ratios: [0.25, 0.25, 0.5]}"
    )
    wsd = _stage(root, "wsd", f"init_from={converted}", schedule, "max_steps=8", "validation.every_steps=2",
                 "checkpoint.keep=3", "data.pack_length=48")  # fmt: skip
    diffusion = run_stage(wsd, progress=False)
    final = load_checkpoint(diffusion.final_dir)[0].config
    assert final.attention == "block" and final.block_size == 4  # the block size the schedule ends on
    assert len([r for r in _records(diffusion) if "val_loss" in r]) == 4

    merged = merge_top_k(diffusion.final_dir.parent, 2)
    assert len(merged["checkpoints"]) == 2
    compare = ["infer", "compare-styles", "--checkpoint", merged["out"], "--prompt", "the red",
               "--gen-length", "16", "--block-length", "4"]  # fmt: skip
    styles = CliRunner().invoke(app, compare)
    assert styles.exit_code == 0, styles.output
    report = json.loads(styles.stdout[styles.stdout.index("{") :])
    assert report["llada-1.0"]["mean_nfe"] == 16 and report["llada-2.0"]["mean_nfe"] <= 16
