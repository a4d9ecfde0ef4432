"""The ablation grid on a real local Ray cluster: trials train (TorchTrainer inside Tune), evaluate
at two presets and report the A–F diagnostics; a failing variant becomes an error row; a re-run
resumes instead of training again; the results feed the paper's ablation table."""

import csv
import json
from pathlib import Path

import pytest
from PIL import Image

from dimoe.config.loader import ConfigError, load_config
from dimoe.config.model import ModelConfig
from dimoe.config.tune import TuneConfig
from dimoe.eval.paper import export_paper_tables
from dimoe.tune import run_grid
from dimoe.tune.ablations import RESULT_COLUMNS, experiment_dir, mean_std, seed_summary, validate_grid
from tests.train.blends import COLOURS, write_blends

QUESTION_TYPES = ("colour", "shape", "count", "position")
# The grid fixture trains and evaluates three trials (3.5 min on an idle 2-core machine); its time
# counts towards the first test's timeout.
pytestmark = pytest.mark.timeout(1500)


def write_eval_data(root: Path) -> Path:
    """Demo-format test rows (flat colour images) for every VQA question type."""
    (root / "raw" / "images").mkdir(parents=True)
    rows = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        Image.new("RGB", (32, 32), rgb).save(root / "raw" / "images" / f"{name}.png")
        for kind in QUESTION_TYPES:
            rows.append({
                "id": f"{kind}_{i}", "image": f"raw/images/{name}.png",
                "question": "What colour is the image?", "answer": name, "question_type": kind,
            })  # fmt: skip
    (root / "eval").mkdir()
    (root / "eval" / "vqa_test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def grid_config(ray_cluster, tokenizer, tmp_path_factory) -> TuneConfig:
    root = tmp_path_factory.mktemp("tune")
    tokenizer.save_pretrained(root / "tokenizer")
    image_tokens = load_config("configs/model/tiny.yaml", ModelConfig).vision.num_image_tokens
    write_blends(root / "data", tokenizer, image_tokens)
    write_eval_data(root / "demo")
    budgets = [
        "requires_init=false", "init_from=null", f"tokenizer={root / 'tokenizer'}",
        f"data.data_dir={root / 'data'}", "max_steps=4", "log_every=2", "batch_size=4",
        "data.response_length=4", "checkpoint.every_steps=4",
        "validation.every_steps=4", "validation.fraction=0.3",  # holds out 1 of the 4 distinct rows
        # A quarter CPU per worker: two trials (4 workers) leave the session cluster's other CPUs to
        # the Ray Data tasks that stream the blends, even beside what earlier tests' actors hold.
        "scaling.cpus_per_worker=0.25",
    ]  # fmt: skip
    cfg = load_config(
        "configs/tune/ablations.yaml",
        TuneConfig,
        [f"storage_path={root / 'tune'}", "seeds=[0]", "eval.decode.gen_length=32",
         "eval.decode.block_length=32", f"eval.set=[data_root={root / 'demo'}]", "eval.batch_size=16",
         "tracking.backend=mlflow"],
    )  # fmt: skip
    variants = {
        **{name: cfg.variants[name] for name in ("naive", "full")},
        # Fails inside its trial (no such blend): must become an error row, not end the grid.
        "broken": cfg.variants["full"].model_copy(update={"set": ["data.blend=no_such_blend"]}),
    }
    return cfg.model_copy(
        update={"base_set": budgets, "variants": variants, "groups": {}, "run": list(variants)}
    )


@pytest.fixture(scope="module")
def grid(grid_config):
    return run_grid(grid_config)


def test_every_trial_reports_accuracy_nfe_and_diagnostics(grid, grid_config):
    rows = {row["variant"]: row for row in grid["rows"]}
    assert set(rows) == {"naive", "full", "broken"}
    for name in ("naive", "full"):
        row = rows[name]
        assert row["status"] == "ok" and row["train_steps"] == 4
        assert 0.0 <= row["accuracy_best"] <= 1.0 and 0.0 <= row["accuracy_fast"] <= 1.0
        assert 1.0 <= row["nfe_fast"] <= 8.0 and 1.0 <= row["nfe_best"] <= 32.0  # the presets' step budgets
        logs = experiment_dir(grid_config) / "trials" / f"{name}-s0" / "train" / "stage2_full" / "logs"
        logged = [json.loads(line) for line in (logs / "train_metrics.jsonl").read_text().splitlines()]
        assert row["heldout_loss"] == [r for r in logged if "val_loss" in r][-1]["val_loss"] > 0
        for key in (
            "A_routing_js",
            "C_nmi_modality",
            "E_vision_grad_ratio",
            "F_expert_grad_cv",
        ):
            assert row[key] is not None and row[key] >= 0.0, key
    # Complementary views supervise every answer token once per pair; the single view does not.
    assert rows["full"]["D_zero_supervision"] == 0.0
    # Only a two-view run measures view consistency: the single-view naive run has no B.
    assert rows["full"]["B_topk_jaccard"] > 0.0 and rows["naive"]["B_topk_jaccard"] is None


def test_each_trial_is_an_mlflow_run_with_its_config_and_results(grid, grid_config):
    runs = [p for p in (experiment_dir(grid_config) / "mlruns").glob("*/*") if (p / "params").is_dir()]
    scored = [p for p in runs if (p / "metrics" / "accuracy_best").is_file()]
    assert len(scored) == 2  # naive and full; the broken trial reports no result
    assert sorted((p / "params" / "variant").read_text() for p in scored) == ["full", "naive"]


def test_failed_trial_is_a_row_with_its_error(grid):
    broken = next(row for row in grid["rows"] if row["variant"] == "broken")
    assert broken["status"] == "error" and "no_such_blend" in broken["error"]


def test_results_table_and_paper_ablation_table(grid, grid_config, tmp_path):
    with open(grid["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["naive", "full", "broken"]
    assert list(rows[0]) == list(RESULT_COLUMNS)
    md = Path(grid["markdown"]).read_text()
    assert "| naive | 0 | ok |" in md and "broken (seed 0): " in md
    trial_eval = Path(grid_config.storage_path) / grid_config.name / "trials" / "full-s0" / "eval"
    paths = export_paper_tables(trial_eval, tmp_path / "paper", tune_results=grid["csv"])
    ablation = paths["ablation_md"].read_text()
    assert "| full |" in ablation and "| naive |" in ablation and "Held-out loss" in ablation


def test_rerun_resumes_the_grid_without_training_again(grid, grid_config):
    trial = Path(grid_config.storage_path) / grid_config.name / "trials" / "full-s0"
    final = trial / "train" / "stage2_full" / "final" / "model.safetensors"
    before = final.stat().st_mtime_ns
    again = run_grid(grid_config)
    assert final.stat().st_mtime_ns == before
    ok = {r["variant"]: r for r in again["rows"] if r["status"] == "ok"}
    first = {r["variant"]: r for r in grid["rows"] if r["status"] == "ok"}
    assert ok["full"]["accuracy_best"] == first["full"]["accuracy_best"]


def test_changed_grid_is_refused_and_typos_fail_before_any_trial(grid_config):
    changed = grid_config.model_copy(update={"seeds": [0, 1]})
    with pytest.raises(ConfigError, match="different definition"):
        run_grid(changed)
    typo = grid_config.variants["naive"].model_copy(update={"set": ["losses.lambda_typo=1"]})
    bad = grid_config.model_copy(update={"variants": {"naive": typo}, "run": ["naive"], "name": "typo"})
    with pytest.raises(ConfigError, match="variant 'naive'.*lambda_typo"):
        run_grid(bad)
    with pytest.raises(ValueError, match="unknown variant or group 'nope'"):
        grid_config.selected(["nope"])


def test_every_shipped_variant_resolves_to_valid_stage_configs():
    """Typos in configs/tune/ablations.yaml (any group, the resolution ablation included) fail here."""
    cfg = load_config("configs/tune/ablations.yaml", TuneConfig)
    every = cfg.selected(list(cfg.groups))
    assert {"res_384", "res_768"} <= set(every)
    validate_grid(cfg, every)


def test_seed_summary_gives_mean_and_sample_std_per_variant():
    rows = [
        {"variant": "full", "seed": 0, "status": "ok", "accuracy_best": 0.8, "D_zero_supervision": 0.0},
        {"variant": "full", "seed": 1, "status": "ok", "accuracy_best": 0.9, "D_zero_supervision": 0.0},
        {"variant": "full", "seed": 2, "status": "error"},
        {"variant": "naive", "seed": 0, "status": "ok", "accuracy_best": 0.5},
    ]
    lines = seed_summary(rows)
    full = next(line for line in lines if line.startswith("| full |"))
    # mean 0.85, sample std sqrt(((0.05)^2 * 2) / 1) = 0.0707; the failed seed is left out
    assert full.startswith("| full | 2 | 0.850 ± 0.071 |") and "| 0.000 ± 0.000 |" in full
    assert lines[-1].startswith("| naive | 1 | 0.500 | – |")
    assert mean_std([None, float("nan")]) == "–"
