"""Ray Train + DeepSpeed on a real local cluster: 2 CPU workers, ZeRO-2, the chained curriculum
with an injected worker failure, frozen groups, logs and exports."""

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

from dimoe.config.loader import ConfigError, load_config
from dimoe.config.model import ModelConfig
from dimoe.config.train import TrainConfig
from dimoe.model.build import build_model, load_checkpoint
from dimoe.model.processor import ImageProcessor
from dimoe.train.batch import collate
from dimoe.train.launcher import STAGE_ORDER, load_curriculum, run_curriculum, run_stage
from dimoe.train.telemetry import LOG_FILES
from tests.train.blends import write_blends

# The chained-curriculum fixture (about 6 min on an idle 2-core machine) counts towards the first
# test's timeout.
pytestmark = pytest.mark.timeout(1500)


@pytest.fixture(scope="module")
def curriculum(ray_cluster, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tok_dir = root / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    image_tokens = load_config("configs/model/tiny.yaml", ModelConfig).vision.num_image_tokens
    write_blends(root / "data", tokenizer, image_tokens)
    common = [
        f"data.data_dir={root / 'data'}",
        f"tokenizer={tok_dir}",
        f"output_dir={root / 'out'}",
        "log_every=1",
        "batch_size=4",
        "data.response_length=8",
        "checkpoint.every_steps=3",
        # the profile's 5e-4 and 10-step warm-up are tuned for hundreds of steps; a clear drop
        # within 8 needs a higher rate from the first step
        *(f"groups.{group}.lr=2e-3" for group in ("backbone", "router", "projector")),
        "schedule.warmup_steps=1",
    ]
    configs = load_curriculum("configs/train/tiny", common)
    # 8 steps = one pass over a worker's 32 rows (one length group of 8 batches of 4), so stages 1
    # and 2 see both the text-only and the image batches that length grouping makes.
    steps = {"stage0_naive": 8, "stage1_align": 8, "stage2_full": 8, "stage3_lownfe": 2}
    configs = [c.model_copy(update={"max_steps": steps[c.stage]}) for c in configs]
    # Worker 0 raises once at step 5 of stage0: the run must resume from the step-3 checkpoint.
    configs[0] = configs[0].model_copy(update={"inject_failure_at_step": 5})
    results = run_curriculum(configs)
    return root / "out", results


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_chain_produces_four_loadable_checkpoints(curriculum):
    out, results = curriculum
    assert [r.stage for r in results] == list(STAGE_ORDER)
    for result in results:
        model = AutoModel.from_pretrained(result.final_dir)
        assert model(torch.tensor([[5, 6, 7]])).logits.shape[-1] == model.config.vocab_size
        assert (result.final_dir / "tokenizer.json").is_file()


def answer_loss(model, rows: dict) -> float:
    """Cross-entropy of every response token with the whole response masked (t = 1), so the figure
    has none of the per-step sampling noise of the logged training loss (one t per row, 4 rows)."""
    c = model.config
    batch = collate(
        rows, pad_id=c.pad_token_id, eos_id=c.eos_token_id, image_id=c.image_token_id,
        response_length=8, processor=ImageProcessor(c.image_size),
    )  # fmt: skip
    ids = batch.input_ids.clone()
    ids[batch.response_mask] = c.mask_token_id
    mask, pixels = batch.attention_mask.long(), batch.pixel_values
    with torch.no_grad():
        logits = model(ids, mask, pixels, prefix_mask=batch.prefix_mask).logits
    return F.cross_entropy(logits[batch.response_mask], batch.input_ids[batch.response_mask]).item()


def test_loss_goes_down_with_two_zero2_workers(curriculum, tokenizer):
    out, _ = curriculum
    rows = pq.read_table(out.parent / "data/blends/stage0_naive").to_pydict()
    seed = load_config("configs/train/tiny/stage0_naive.yaml", TrainConfig).seed
    untrained = build_model(load_config("configs/model/tiny.yaml", ModelConfig), tokenizer, seed=seed).eval()
    trained = load_checkpoint(out / "stage0_naive/final")[0].eval()
    assert answer_loss(trained, rows) < 0.8 * answer_loss(untrained, rows)


def test_injected_failure_resumes_from_last_checkpoint(curriculum):
    out, _ = curriculum
    assert (out / "stage0_naive/.injected_failure").read_text() == "5"
    steps = [r["step"] for r in read_jsonl(out / "stage0_naive/logs/train_metrics.jsonl")]
    # Steps 1–5 ran, the failure hit before step 6, the retry restarted after checkpoint 3.
    assert steps == [1, 2, 3, 4, 5, 4, 5, 6, 7, 8]


def test_align_stage_changes_only_the_projector(curriculum):
    out, _ = curriculum
    before = AutoModel.from_pretrained(out / "stage0_naive/final").state_dict()
    after = AutoModel.from_pretrained(out / "stage1_align/final").state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("vision.projector.") for k in changed)


def test_logs_have_the_documented_fields(curriculum):
    out, _ = curriculum
    logs = out / "stage2_full/logs"
    assert sorted(p.stem for p in logs.glob("*.jsonl")) == sorted(LOG_FILES)
    metrics = read_jsonl(logs / "train_metrics.jsonl")[-1]
    for field in (
        "loss",
        "loss_diffusion",
        "loss_bal",
        "loss_z",
        "loss_prior",
        "loss_cons",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "supervised_token_fraction",
        "zero_supervision_samples",
    ):
        assert field in metrics, field
    assert metrics["zero_supervision_samples"] == 0  # complementary views supervise every answer
    routing = read_jsonl(logs / "routing_stats.jsonl")[-1]
    assert len(routing["expert_load"]) == 4 and len(routing["expert_load"][0]) == routing["num_buckets"]
    assert len(routing["topk_overlap"]) == 4 and set(routing["modality_usage"][0]) == {
        "image",
        "prompt",
        "response",
    }
    records = read_jsonl(logs / "gradient_stats.jsonl")
    grads = records[-1]
    assert len(grads["experts"]) == 4 and len(grads["experts"][0]) == 8
    # Length grouping puts the short text rows into batches of their own (the tower then only sees
    # the weight-0 blank image), so not every step has a vision gradient; the image steps must.
    assert max(r["vision"] for r in records) > 0
    align = read_jsonl(out / "stage1_align/logs/gradient_stats.jsonl")
    assert all(r["vision"] == 0 and r["backbone"] == 0 for r in align)  # frozen groups
    assert max(r["projector"] for r in align) > 0


def test_rerun_of_a_finished_chain_skips_every_stage(curriculum, capsys):
    out, results = curriculum
    configs = load_curriculum("configs/train/tiny", [f"output_dir={out}", "tokenizer=x"])
    again = run_curriculum(configs)
    assert [r.final_dir for r in again] == [r.final_dir for r in results]
    assert capsys.readouterr().out.count("skipped") == 4


@pytest.mark.parametrize(
    "override,match",
    [
        (["data.blend=nope"], "unknown blend 'nope'"),
        (["init_from=/does/not/exist"], "not a checkpoint directory"),
    ],
)
def test_bad_config_fails_before_workers_start(tmp_path, override, match):
    (tmp_path / "blends" / "stage1_align").mkdir(parents=True)
    cfg = load_config(
        "configs/train/tiny/stage1_align.yaml", TrainConfig, [f"data.data_dir={tmp_path}", *override]
    )
    with pytest.raises(ConfigError, match=match):
        run_stage(cfg)


def test_missing_init_from_and_zero_stage_4_are_rejected(tmp_path):
    (tmp_path / "blends" / "stage1_align").mkdir(parents=True)
    cfg = load_config("configs/train/tiny/stage1_align.yaml", TrainConfig, [f"data.data_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="needs `init_from`"):
        run_stage(cfg)
    with pytest.raises(ConfigError, match="deepspeed.zero_stage"):
        load_config("configs/train/tiny/stage2_full.yaml", TrainConfig, ["deepspeed.zero_stage=4"])


def test_a_blend_too_small_for_one_batch_per_worker_is_rejected(tmp_path, tokenizer):
    """Otherwise every pass over a worker's shard yields no batch and the stage never ends."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    blend = tmp_path / "blends" / "stage0_naive"
    blend.mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": [[5, 6, 7]] * 20, "prompt_length": [2] * 20}), blend / "a.parquet")
    tok_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    common = [f"data.data_dir={tmp_path}", f"tokenizer={tok_dir}"]
    cfg = load_config("configs/train/tiny/stage0_naive.yaml", TrainConfig, [*common, "batch_size=16"])
    with pytest.raises(ConfigError, match="20 rows, 10 per worker for 2 workers, fewer than batch_size=16"):
        run_stage(cfg)


def test_a_stage_trains_from_webdataset_shards_as_from_parquet(ray_cluster, tokenizer, tmp_path):
    """`dimoe data build-wds` shards feed the same rows as the Parquet blend, and a stage trains on
    them (`data.format: webdataset`) on Ray Train."""
    from typer.testing import CliRunner

    from dimoe.cli import app
    from dimoe.train.launcher import read_blend

    image_tokens = load_config("configs/model/tiny.yaml", ModelConfig).vision.num_image_tokens
    write_blends(tmp_path / "data", tokenizer, image_tokens)
    blend = tmp_path / "data" / "blends" / "stage0_naive"
    built = CliRunner().invoke(
        app, ["data", "build-wds", "--set", f"source={blend}", "--set", "shard_size=20"]
    )
    assert built.exit_code == 0, built.output
    shards = tmp_path / "data" / "webdataset" / "stage0_naive"
    assert sorted(p.name for p in shards.glob("*.tar")) == [f"shard-00000{i}.tar" for i in range(4)]

    tok_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    common = [f"data.data_dir={tmp_path / 'data'}", f"tokenizer={tok_dir}", f"output_dir={tmp_path / 'out'}",
              "batch_size=4", "max_steps=2", "scaling.num_workers=1", "data.response_length=8"]  # fmt: skip
    as_parquet = load_config("configs/train/tiny/stage0_naive.yaml", TrainConfig, common)
    as_shards = as_parquet.model_copy(
        update={"data": as_parquet.data.model_copy(update={"format": "webdataset"})}
    )
    rows = [sorted(read_blend(cfg).take_all(), key=repr) for cfg in (as_shards, as_parquet)]
    assert rows[0] == rows[1] and sum(row["image"] is not None for row in rows[0]) == 32
    result = run_stage(as_shards, progress=False)
    assert (result.final_dir / "model.safetensors").is_file() and result.metrics["step"] == 2


def test_ppots_and_mirror_train_on_two_workers_and_the_same_seed_repeats_the_losses(
    ray_cluster, tokenizer, tmp_path
):
    """`timesteps.kind: ppots` with `views: mirror` on Ray Train: the proposal is estimated, shared
    by the ranks and logged; and two runs with the same seed log the same losses step by step."""
    image_tokens = load_config("configs/model/tiny.yaml", ModelConfig).vision.num_image_tokens
    write_blends(tmp_path / "data", tokenizer, image_tokens)
    tok_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    common = [f"data.data_dir={tmp_path / 'data'}", f"tokenizer={tok_dir}", "batch_size=4", "max_steps=3",
              "log_every=1", "data.response_length=8", "diffusion.views=mirror",
              "diffusion.timesteps.kind=ppots", "diffusion.timesteps.ppots.every_steps=2",
              "diffusion.timesteps.ppots.grid_size=4"]  # fmt: skip
    losses = []
    for run in ("a", "b"):
        overrides = [*common, f"output_dir={tmp_path / run}"]
        run_stage(load_config("configs/train/tiny/stage0_naive.yaml", TrainConfig, overrides), progress=False)
        logs = tmp_path / run / "stage0_naive/logs"
        losses.append([r["loss"] for r in read_jsonl(logs / "train_metrics.jsonl")])
        estimates = read_jsonl(logs / "ppots.jsonl")
        assert [e["step"] for e in estimates] == [0, 2]  # at the start, then every 2 steps
        assert len(estimates[0]["w"]) == 4 and all(w > 0 for w in estimates[0]["w"])
    assert len(losses[0]) == 3 and all(math.isfinite(loss) for loss in losses[0])
    assert losses[0] == losses[1]
