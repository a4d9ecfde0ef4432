"""The built-in configs ship inside the package: `configs/...` paths resolve from any directory."""

from pathlib import Path

import pytest

from dimoe.config.loader import ConfigError, load_config, packaged_configs, resolve_config_path
from dimoe.config.model import ModelConfig
from dimoe.config.registry import kind_of, schema_for
from dimoe.config.serve import load_serve_config
from dimoe.config.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def test_the_repository_configs_are_the_packaged_ones():
    # `configs` is a link into the package, so there is one copy to edit and to ship.
    assert (ROOT / "configs").is_symlink()
    assert (ROOT / "configs").resolve() == packaged_configs().resolve() == (ROOT / "dimoe" / "configs")


def test_configs_paths_resolve_to_the_packaged_copy_outside_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = resolve_config_path("configs/train/tiny/stage2_full.yaml")
    assert path == packaged_configs() / "train" / "tiny" / "stage2_full.yaml"
    # `base:` inheritance inside the packaged copy (../stage2_full.yaml, _profile.yaml) still works
    cfg = load_config("configs/train/tiny/stage2_full.yaml", TrainConfig)
    assert cfg.stage == "stage2_full" and cfg.model == "configs/model/tiny.yaml"
    assert load_config(cfg.model, ModelConfig).vision is not None  # a config naming another one
    assert kind_of("configs/train/tiny/stage2_full.yaml") == "train"
    assert schema_for("configs/model/tiny.yaml") is ModelConfig
    assert resolve_config_path("configs/train/tiny") == packaged_configs() / "train" / "tiny"  # a folder
    serve = load_serve_config("configs/serve/default.yaml")  # its infer_config is a configs/ path too
    assert resolve_config_path(serve.infer_config).is_file()


def test_a_file_under_the_working_directory_wins(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs" / "model").mkdir(parents=True)
    (tmp_path / "configs" / "model" / "tiny.yaml").write_text("hidden_size: 48\n")
    assert resolve_config_path("configs/model/tiny.yaml") == Path("configs/model/tiny.yaml")
    assert load_config("configs/model/tiny.yaml", ModelConfig).hidden_size == 48


def test_a_missing_config_names_both_places(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config("configs/model/huge.yaml", ModelConfig)
    message = str(err.value)
    assert str(tmp_path) in message and str(packaged_configs() / "model" / "huge.yaml") in message
    # only `configs/...` paths fall back to the package
    with pytest.raises(ConfigError, match="config not found"):
        resolve_config_path("model/tiny.yaml")
    with pytest.raises(ConfigError, match="folder"):
        load_config("configs/model", ModelConfig)
