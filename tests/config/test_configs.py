"""Every YAML under configs/ validates; errors name the key path and the file."""

from pathlib import Path

import pytest

from dimoe.config.loader import ConfigError, apply_overrides, load_config
from dimoe.config.model import ModelConfig
from dimoe.config.registry import schema_for

ROOT = Path(__file__).resolve().parents[2]
# Files starting with "_" are partial overlays merged through `base:`, not configs of their own.
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if not p.name.startswith("_"))


def test_there_are_configs():
    assert any(p.parent.name == "model" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT)) for p in CONFIGS])
def test_every_config_validates(path):
    load_config(path, schema_for(path))


def test_unknown_key_names_path_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hidden_size: 64\nvision:\n  image_sise: 32\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad, ModelConfig)
    assert "vision.image_sise" in str(err.value) and str(bad) in str(err.value)


def test_wrong_type_names_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_experts: many\n")
    with pytest.raises(ConfigError, match="`num_experts`"):
        load_config(bad, ModelConfig)


def test_base_inheritance_deep_merges_and_set_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("hidden_size: 64\nvision:\n  image_size: 32\n  patch_size: 4\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nnum_experts: 4\nvision:\n  patch_size: 8\n")
    cfg = load_config(tmp_path / "child.yaml", ModelConfig, ["attention=full", "vision.hidden_size=32"])
    assert (cfg.hidden_size, cfg.num_experts, cfg.attention) == (64, 4, "full")
    assert (cfg.vision.image_size, cfg.vision.patch_size, cfg.vision.hidden_size) == (32, 8, 32)


def test_set_values_are_typed_by_the_schema():
    cfg = load_config(None, ModelConfig, ["rope_theta=5e4", "vision=null"])
    assert cfg.rope_theta == 50000.0 and cfg.vision is None
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        apply_overrides({}, ["novalue"])


def test_base_cycle_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml", ModelConfig)
