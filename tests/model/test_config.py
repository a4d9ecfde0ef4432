"""The HF config takes its architecture fields from the YAML schema, and checkpoints keep their keys."""

import json

import pytest
from pydantic import ValidationError
from transformers import AutoConfig

from dimoe.model.config import BACKBONE_FIELDS, DiMoEConfig, hf_config_from_spec

IDS = {"mask_token_id": 5, "image_token_id": 6, "pad_token_id": 0, "eos_token_id": 1}

# Keys added after the first checkpoints were written: a config.json without them loads with
# these values, the architecture every earlier checkpoint has.
ADDED_KEYS = {
    "dense_intermediate_size": 0,
    "dense_layers": [],
    "moe_dispatch": "auto",
    "partial_rotary_factor": 1.0,
    "router_expert_bias": False,
    "attention_bias": False,
    "block_size": 32,
}
# config.json of configs/model/tiny.yaml (minus `transformers_version`): a new key or value here
# changes every checkpoint on disk.
TINY_CONFIG_JSON = {
    **ADDED_KEYS,
    "num_image_tokens": 4,
    "attention": "prefix",
    "eos_token_id": 1,
    "head_dim": 32,
    "hidden_size": 128,
    "image_token_id": 6,
    "initializer_range": 0.02,
    "mask_token_id": 5,
    "max_position_embeddings": 512,
    "model_type": "dimoe_vl",
    "moe_intermediate_size": 128,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 4,
    "num_key_value_heads": 4,
    "pad_token_id": 0,
    "qk_norm": True,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "shared_expert_intermediate_size": 0,
    "tie_word_embeddings": False,
    "vision_config": {
        "hidden_size": 64,
        "image_size": 32,
        "intermediate_size": 128,
        "num_attention_heads": 2,
        "num_hidden_layers": 2,
        "patch_size": 16,
        "vision_use_head": False,
    },
    "vision_feature_layer": -1,
    "vision_pool_2x2": False,
    "vocab_size": 400,
}


def test_tiny_spec_writes_the_same_config_json_and_reads_it_back(tiny_spec, tmp_path):
    hf_config_from_spec(tiny_spec, IDS, 400).save_pretrained(tmp_path)
    for loaded in (DiMoEConfig.from_pretrained(tmp_path), AutoConfig.from_pretrained(tmp_path)):
        assert type(loaded) is DiMoEConfig
        saved = loaded.to_diff_dict()
        saved.pop("transformers_version")
        # Saved through the model, auto_map also names AutoModel (tests/model/test_checkpoint_files.py).
        assert saved.pop("auto_map") == {"AutoConfig": "config.DiMoEConfig"}
        assert saved == TINY_CONFIG_JSON


def test_config_json_of_earlier_checkpoints_still_loads(tmp_path):
    earlier = {k: v for k, v in TINY_CONFIG_JSON.items() if k not in ADDED_KEYS and k != "num_image_tokens"}
    (tmp_path / "config.json").write_text(json.dumps(earlier))
    loaded = DiMoEConfig.from_pretrained(tmp_path)
    assert {k: getattr(loaded, k) for k in ADDED_KEYS} == ADDED_KEYS
    assert loaded.num_image_tokens == 4  # 32-pixel images in 16-pixel patches, computed as before


def test_config_takes_every_backbone_field_from_the_spec(tiny_spec):
    update = {"num_key_value_heads": 2, "head_dim": 16, "rope_theta": 5e5, "attention": "full"}
    spec = tiny_spec.model_copy(update=update)
    config = hf_config_from_spec(spec, IDS, 400)
    expected = {**spec.model_dump(include=set(BACKBONE_FIELDS)), "vocab_size": 400}
    assert {name: getattr(config, name) for name in BACKBONE_FIELDS} == expected


def test_text_only_spec_has_no_vision_config(tiny_spec):
    config = hf_config_from_spec(tiny_spec.model_copy(update={"vision": None}), IDS, 400)
    assert config.vision_config is None and config.num_image_tokens == 0


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"attention": "sliding"}, "'full', 'prefix', 'causal' or 'block'"),
        ({"num_experts_per_tok": 9}, "exceeds num_experts"),
        ({"hidden_size": 0}, "greater than 0"),
    ],
)
def test_config_validates_through_the_schema(bad, message):
    with pytest.raises(ValidationError, match=message):
        DiMoEConfig(**bad)
