"""Problem D: the closed-form no-supervision probability against Monte-Carlo draws of the real
forward process, and the `diag supervision` command."""

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from dimoe.config.train import TimestepSpec
from dimoe.diag.logs import DiagError
from dimoe.diag.supervision import (
    diag_supervision,
    expected_zero_supervision,
    no_supervision_probability,
    read_answer_lengths,
)
from dimoe.diffusion.forward import complementary_views, independent_views, mirror_views, single_view
from dimoe.diffusion.timesteps import sample_timesteps

LENGTHS = [1, 1, 2, 3, 5, 8, 20]
SAMPLERS = [
    TimestepSpec(kind="uniform"),
    TimestepSpec(kind="band", t_min=0.6, t_max=1.0),
    TimestepSpec(kind="stratified", t_min=0.0, t_max=1.0),
    TimestepSpec(kind="logit_normal", mean=-0.5, std=1.2),
]


def monte_carlo(sampler: TimestepSpec, views: str, samples: int = 60_000, eps: float = 1e-3) -> float:
    """Fraction of samples with no masked token: t from the sampler, each of the L eligible tokens
    masked with p(t) by the training code's own view functions."""
    generator = torch.Generator().manual_seed(0)
    lengths = torch.tensor(LENGTHS).repeat(samples // len(LENGTHS))
    ids = torch.zeros(len(lengths), max(LENGTHS), dtype=torch.long)
    eligible = torch.arange(max(LENGTHS))[None, :] < lengths[:, None]
    t = sample_timesteps(
        sampler.kind,
        len(lengths),
        generator,
        num_buckets=4,
        t_min=sampler.t_min,
        t_max=sampler.t_max,
        mean=sampler.mean,
        std=sampler.std,
    )
    if views == "single":
        noised = single_view(ids, eligible, t, 9, generator, eps=eps)
    elif views == "independent":
        noised = independent_views(ids, eligible, t, 1 - t, 9, generator, eps=eps)
    elif views == "mirror":
        noised = mirror_views(ids, eligible, t, 9, generator, eps=eps)
    else:
        noised = complementary_views(ids, eligible, t, 9, generator, eps=eps)
    supervised = noised.masked.view(noised.num_views, len(lengths), -1).any(dim=2).any(dim=0)
    return float((~supervised).float().mean())


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda spec: spec.kind)
@pytest.mark.parametrize("views", ["single", "independent", "mirror", "complementary"])
def test_closed_form_matches_monte_carlo(sampler: TimestepSpec, views: str) -> None:
    expected = expected_zero_supervision(np.array(LENGTHS), sampler, views)
    assert expected == pytest.approx(monte_carlo(sampler, views), abs=0.01)
    if views == "complementary":
        assert expected == 0.0


def test_uniform_single_view_has_the_exact_antiderivative() -> None:
    # E_t[((1 - eps)(1 - t))^L] for t ~ U[0, 1] is (1 - eps)^L / (L + 1), also for long answers.
    lengths = np.array([0, 1, 2, 10, 100, 2000])
    exact = (1 - 1e-3) ** lengths / (lengths + 1)
    computed = no_supervision_probability(lengths, TimestepSpec(kind="uniform"), "single")
    np.testing.assert_allclose(computed, exact, rtol=1e-9)


def test_diag_supervision_reads_a_blend_and_a_train_log(tmp_path: Path) -> None:
    blend = tmp_path / "blends/stage2_full"
    blend.mkdir(parents=True)
    pq.write_table(pa.table({"answer_length": pa.array([1, 2, 3, 30], pa.int32())}), blend / "part-0.parquet")
    (blend / "_blend.json").write_text("{}")  # the blend's metadata file is not data
    logs = tmp_path / "run/logs"
    logs.mkdir(parents=True)
    records = [
        {"step": 5, "zero_supervision_samples": 3.0, "samples": 16.0},
        {"step": 10, "zero_supervision_samples": 1.0, "samples": 16.0},
    ]
    (logs / "train_metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = diag_supervision(
        blend,
        tmp_path / "out",
        TimestepSpec(kind="stratified"),
        views="complementary",
        train_log=tmp_path / "run",
    )
    assert summary["samples"] == 4
    assert summary["headline"]["D_zero_supervision"] == 0.0
    expected_single = np.mean([(0.999**n) / (n + 1) for n in (1, 2, 3, 30)])
    assert summary["expected"]["single_view"] == pytest.approx(expected_single, rel=1e-6)
    assert summary["observed"]["fraction"] == pytest.approx(4 / 32)
    assert summary["observed"]["run"] == "run"
    stored = json.loads((tmp_path / "out/summary.json").read_text())
    assert stored["expected"] == summary["expected"]
    assert [Path(p).name for p in summary["plots"]] == [
        "no_supervision_vs_length.png",
        "no_supervision_over_steps.png",
    ]
    assert all(Path(p).stat().st_size > 1000 for p in summary["plots"])


def test_answer_lengths_from_jsonl_and_clear_errors(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"answer_length": 4}\n{"answer_length": 7}\n')
    assert read_answer_lengths(manifest).tolist() == [4, 7]
    manifest.write_text('{"answer_length": 4}\n{"length": 7}\n')
    with pytest.raises(ValueError, match="manifest.jsonl:2: needs an integer `answer_length`"):
        read_answer_lengths(manifest)
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        read_answer_lengths(tmp_path / "nope")


def test_diag_supervision_compare_without_train_log_and_bad_options(tmp_path: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text('{"answer_length": 2}\n{"answer_length": 5}\n')
    logs = tmp_path / "naive/logs"
    logs.mkdir(parents=True)
    (logs / "train_metrics.jsonl").write_text('{"step": 1, "zero_supervision_samples": 2, "samples": 8}\n')
    summary = diag_supervision(manifest, tmp_path / "out", "band", compare=tmp_path / "naive")
    assert summary["observed"]["this"] is None
    assert summary["observed"]["other"]["run"] == "naive"
    assert summary["observed"]["other"]["fraction"] == pytest.approx(0.25)
    assert "D_zero_supervision_observed" not in summary["headline"]
    assert [Path(p).name for p in summary["plots"]] == [
        "no_supervision_vs_length.png",
        "no_supervision_over_steps.png",
    ]
    with pytest.raises(DiagError, match="unknown views 'two'"):
        diag_supervision(manifest, tmp_path / "out", views="two")
    with pytest.raises(DiagError, match="unknown t sampler 'beta'.*logit_normal"):
        diag_supervision(manifest, tmp_path / "out", "beta")
