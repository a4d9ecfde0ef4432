"""Stage blends: exact sizes, ratios, train split only, seeded determinism down to the bytes."""

import pyarrow.parquet as pq
import pytest

from dimoe.config.data import BlendConfig
from dimoe.config.loader import ConfigError
from dimoe.data.blend import REPORT_FILE, apportion, build_stage_blends

MIX = {"sources": {"stage1_projector": 1, "stage2_llm": 2, "stage3_vision": 1}, "size": 60, "seed": 7}
# More rows than the train split holds (36 joint, 72 VQA): needs replacement; short samples only.
RESAMPLED = {
    "sources": {"stage4_joint": 0.25, "stage3_vision": 0.75},
    "size": 200,
    "replace": True,
    "seed": 1,
    "max_seq_len": 72,  # about half of the joint chats are longer
}


@pytest.fixture(scope="module")
def blends(normalized):
    data_dir, _ = normalized
    config = BlendConfig(
        data_dir=str(data_dir),
        progress=False,
        rows_per_file=50,
        blends={"mix": MIX, "mix_again": MIX, "mix_seed8": {**MIX, "seed": 8}, "resampled": RESAMPLED},
    )
    return data_dir / "blends", build_stage_blends(config)


def read_blend(root, name):
    return pq.read_table(sorted((root / name).glob("*.parquet")))


def test_sizes_ratios_and_report(blends):
    root, report = blends
    assert (root / REPORT_FILE).is_file()
    for name in ("mix", "resampled"):
        entry = report["blends"][name]
        table = read_blend(root, name)
        assert table.num_rows == entry["rows"] == entry["size"]
        assert set(table["split"].to_pylist()) == {"train"}
        stages = table["stage"].to_pylist()
        for stage, stats in entry["sources"].items():
            assert abs(stages.count(stage) / table.num_rows - stats["target_ratio"]) <= 0.02, (name, stage)
            assert stats["rows"] == stages.count(stage)
            assert stats["realised_ratio"] == pytest.approx(stats["target_ratio"], abs=0.02)
    assert (read_blend(root, "mix")["stage"].to_pylist().count("stage2_llm")) == 30


def test_files_are_cut_by_row_count(blends):
    root, report = blends
    files = sorted((root / "resampled").glob("*.parquet"))
    assert [pq.ParquetFile(f).metadata.num_rows for f in files] == [50, 50, 50, 50]
    assert report["blends"]["resampled"]["files"] == [f.name for f in files]


def test_replacement_and_max_seq_len(blends):
    root, report = blends
    table = read_blend(root, "resampled")
    assert max(table["seq_len"].to_pylist()) <= 72
    joint = report["blends"]["resampled"]["sources"]["stage4_joint"]
    assert 0 < joint["eligible_rows"] < 36  # 36 train joint chats, the longer ones excluded
    origins = table["origin"].to_pylist()
    assert len(set(origins)) < len(origins)  # drawn with replacement
    assert sum(s["unique_rows"] for s in report["blends"]["resampled"]["sources"].values()) == len(
        set(origins)
    )
    assert len(set(read_blend(root, "mix")["origin"].to_pylist())) == MIX["size"]  # without replacement


def test_same_seed_same_bytes_other_seed_other_order(blends):
    root, _ = blends
    same = [
        [p.read_bytes() for p in sorted((root / name).glob("*.parquet"))] for name in ("mix", "mix_again")
    ]
    assert same[0] == same[1]
    mix, other = read_blend(root, "mix"), read_blend(root, "mix_seed8")
    assert mix["origin"].to_pylist() != other["origin"].to_pylist()
    assert mix["stage"].to_pylist().count("stage3_vision") == other["stage"].to_pylist().count(
        "stage3_vision"
    )


def test_sources_are_mixed_not_concatenated(blends):
    root, _ = blends
    stages = read_blend(root, "mix")["stage"].to_pylist()
    runs = 1 + sum(a != b for a, b in zip(stages, stages[1:], strict=False))
    assert runs > 10


def test_config_errors_name_the_problem(normalized):
    data_dir, _ = normalized
    unknown = BlendConfig(data_dir=str(data_dir), blends={"b": {"sources": {"stage5_video": 1}, "size": 5}})
    with pytest.raises(ConfigError, match="unknown source stage 'stage5_video'"):
        build_stage_blends(unknown)
    too_big = BlendConfig(data_dir=str(data_dir), blends={"b": {"sources": {"stage4_joint": 1}, "size": 500}})
    with pytest.raises(ConfigError, match="replace: true"):
        build_stage_blends(too_big)


def test_apportion_is_exact():
    assert apportion({"a": 1, "b": 1, "c": 1}, 10) == {"a": 4, "b": 3, "c": 3}
    assert apportion({"a": 0.1, "b": 0.3, "c": 0.35, "d": 0.25}, 5000) == {
        "a": 500,
        "b": 1500,
        "c": 1750,
        "d": 1250,
    }
    assert sum(apportion({"a": 1, "b": 2, "c": 4}, 11).values()) == 11


def test_webdataset_export_is_deterministic_and_complete(blends, tmp_path):
    import json
    import tarfile

    from dimoe.data.wds import export_webdataset

    root, _ = blends
    first = export_webdataset(root / "mix", tmp_path / "a", samples_per_shard=25)
    export_webdataset(root / "mix", tmp_path / "b", samples_per_shard=25)
    assert first["samples"] == 60 and first["shards"] == [
        "shard-000000.tar",
        "shard-000001.tar",
        "shard-000002.tar",
    ]
    for shard in first["shards"]:
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()
    table = read_blend(root, "mix")
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        names = tar.getnames()
        sample = json.loads(tar.extractfile("000000000.json").read())
    assert (
        sample["origin"] == table["origin"][0].as_py()
        and sample["input_ids"] == table["input_ids"][0].as_py()
    )
    with_image = sum(v is not None for v in table["image"].to_pylist()[:25])
    assert len(names) == 25 + with_image and sum(n.endswith(".png") for n in names) == with_image
