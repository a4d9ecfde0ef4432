"""Prompt files, prediction files, the infer config, and the one-call CLI entries."""

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from dimoe.config.infer import InferConfig
from dimoe.config.loader import ConfigError, load_config
from dimoe.errors import UserError
from dimoe.infer.benchmark import run_benchmark
from dimoe.infer.engine import run_generate
from dimoe.infer.inputs import read_prompts

ROOT = Path(__file__).resolve().parents[2]
SMALL_RUN = {"steps": 4, "gen_length": 16, "block_length": 8, "batch_size": 2}


def png_bytes(colour=(0, 128, 255)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(png_bytes())
    image_part = {"type": "image_url", "image_url": {"url": data_url(png_bytes((9, 9, 9)))}}
    return write_jsonl(
        tmp_path / "prompts.jsonl",
        [
            {"id": "a", "prompt": "What colour is the square?", "image": "images/a.png"},
            {"id": 7, "prompt": "What is 3 plus 4?"},
            {"id": "c", "prompt": "Describe the image.", "image": data_url(png_bytes())},
            {
                "id": "d",
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "Which shape?"}, image_part]}
                ],
            },
        ],
    )


def test_read_prompts_loads_paths_data_urls_and_messages(prompts_file):
    requests = read_prompts(prompts_file)
    assert [r.id for r in requests] == ["a", "7", "c", "d"]
    assert requests[0].image == png_bytes() and requests[1].image is None
    assert isinstance(requests[2].image, bytes) and isinstance(requests[3].image, bytes)
    assert requests[3].prompt_text == "Which shape?\n<image>"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"id": "b", "image": "x.png"}, r"prompts.jsonl:2 \(id 'b'\): missing `prompt`"),
        (
            {"id": "b", "prompt": "Hi", "image": "broken.png"},
            r"prompts.jsonl:2 \(id 'b'\): unreadable image: not a readable",
        ),
        (
            {"id": "b", "prompt": "Hi", "image": "nowhere.png"},
            r"prompts.jsonl:2 \(id 'b'\): unreadable image: image file not found",
        ),
        (
            {"id": "b", "prompt": "Hi", "image": "data:image/png;base64,%%%"},
            r"\(id 'b'\): unreadable image: .*not valid base64",
        ),
        ({"prompt": "Hi"}, r"prompts.jsonl:2: missing `id`"),
        ({"id": "a", "prompt": "again"}, r"prompts.jsonl:2: id 'a' already used on line 1"),
        (
            {"id": "b", "messages": [{"role": "robot", "content": "x"}]},
            r"\(id 'b'\): bad `messages`: .*unknown role",
        ),
        ("{not json", r"prompts.jsonl:2: not valid JSON"),
    ],
)
def test_bad_rows_are_one_clear_error(tmp_path, row, message):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"id": "a", "prompt": "fine"}, row])
    with pytest.raises(UserError, match=message):  # InputError, or JsonFileError for a broken line
        read_prompts(path)


def test_missing_prompts_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompts file not found"):
        read_prompts(tmp_path / "nope.jsonl")


def test_run_generate_writes_predictions(checkpoint, prompts_file, tmp_path):
    out = tmp_path / "out" / "preds.jsonl"
    summary = run_generate(
        checkpoint, prompts_file, out, "fast", {**SMALL_RUN, "strategy": None}, progress=False
    )
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "7", "c", "d"]
    assert all(
        set(r) == {"id", "prompt", "output", "prompt_ids", "output_ids", "nfe", "latency_s"} for r in rows
    )
    assert rows[1]["prompt"] == "What is 3 plus 4?" and all(0 < r["nfe"] <= 4 for r in rows)
    assert summary["requests"] == 4 and summary["settings"]["steps"] == 4 and summary["preset"] == "fast"


def test_run_generate_with_a_missing_checkpoint(tmp_path, prompts_file):
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: .*nope has no config.json"):
        run_generate(tmp_path / "nope", prompts_file, tmp_path / "preds.jsonl", "mid", {}, progress=False)


def test_run_generate_rejects_a_bad_preset_before_loading(tmp_path, prompts_file):
    with pytest.raises(ConfigError, match=r"unknown preset 'slow' \(valid: fast, mid, best\)"):
        run_generate(tmp_path / "nope", prompts_file, tmp_path / "preds.jsonl", "slow", {}, progress=False)


def test_run_benchmark_reports_both_strategies(checkpoint, prompts_file, tmp_path):
    report = run_benchmark(
        checkpoint,
        prompts_file,
        "fast",
        "threshold",
        out=tmp_path / "bench.json",
        overrides=SMALL_RUN,
        progress=False,
    )
    for name in ("threshold", "llada"):
        figures = report[name]
        assert figures["settings"]["strategy"] == name and figures["requests"] == 4
        assert figures["latency_p50_s"] <= figures["latency_p95_s"]
        assert figures["nfe_x_active_params_b"] == pytest.approx(
            figures["mean_nfe"] * figures["active_params_b"]
        )
    assert report["llada"]["mean_nfe"] == 4
    assert report["ratios"]["nfe"] == pytest.approx(report["threshold"]["mean_nfe"] / 4)
    assert json.loads((tmp_path / "bench.json").read_text())["strategy"] == "threshold"


def test_default_yaml_matches_the_schema_defaults():
    assert load_config(ROOT / "configs/infer/default.yaml", InferConfig) == InferConfig()
    assert [InferConfig().preset(name).steps for name in ("fast", "mid", "best")] == [8, 16, 32]


@pytest.mark.parametrize(
    ("preset", "gen_length", "block_length", "steps"),
    [
        ("fast", 64, 32, 8),
        ("fast", 16, 16, 8),
        ("fast", 4, 4, 4),
        ("fast", 100, 100, 8),
        ("fast", 128, 32, 8),
        ("best", 8, 8, 8),  # a 32-step budget on 8 tokens: one token per step
        ("best", 48, 48, 32),
        ("mid", 96, 32, 18),  # 16 steps rounded up to a whole number per block (3 blocks)
    ],
)
def test_a_given_gen_length_fits_the_presets_schedule(preset, gen_length, block_length, steps):
    settings = InferConfig().resolve(preset, {"gen_length": gen_length})
    assert (settings.gen_length, settings.block_length, settings.steps) == (gen_length, block_length, steps)


def test_explicit_schedule_fields_are_never_fitted():
    config = InferConfig()
    assert config.resolve("best", {"gen_length": 8, "block_length": 4}).steps == 8
    assert config.resolve("fast", {"gen_length": 64, "steps": 16}).steps == 16
    with pytest.raises(ConfigError, match=r"steps=32 exceeds gen_length=8"):
        config.resolve("best", {"gen_length": 8, "steps": 32})
    with pytest.raises(ConfigError, match=r"gen_length=48 must be a multiple of block_length=32"):
        config.resolve("fast", {"gen_length": 48, "block_length": 32})


def test_overrides_and_set_reach_every_field():
    config = load_config(None, InferConfig, ["presets.mid.threshold=0.75", "batch_size=3"])
    settings = config.resolve("mid", {"strategy": "llada", "temperature": 0.5, "steps": None})
    assert (settings.threshold, settings.strategy, settings.steps) == (0.75, "llada", 16)
    assert settings.temperature == 0.5
    assert config.batch_size == 3
    with pytest.raises(ConfigError, match=r"unknown key `stepz`"):
        config.resolve("mid", {"stepz": 4})
    with pytest.raises(ConfigError, match=r"unknown strategy 'beam' \(valid: threshold, llada\)"):
        load_config(None, InferConfig, ["presets.fast.strategy=beam"])
