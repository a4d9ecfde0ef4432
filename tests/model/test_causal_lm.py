"""AR → diffusion: tiny random transformers causal LMs (Llama, Qwen2 with its q/k/v biases, Qwen3
with its QK-norm) converted into DiMoE backbones, dense and upcycled to MoE, give the original's
logits under the causal mask."""

import json

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from typer.testing import CliRunner

from dimoe.cli import app
from dimoe.config.loader import load_config
from dimoe.config.model import ModelConfig
from dimoe.model.build import load_checkpoint
from dimoe.model.causal_lm import convert_causal_lm
from dimoe.model.importers import ImportErrorDetail

FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
            "qwen3": (Qwen3Config, Qwen3ForCausalLM)}  # fmt: skip


def causal_lm(family: str, tokenizer, directory, **extra):
    """A tiny random causal LM with the project tokenizer, saved as transformers writes it; norms
    and biases perturbed so a mapping that drops them shows."""
    config_class, model_class = FAMILIES[family]
    torch.manual_seed(0)
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
        tie_word_embeddings=family == "llama", **extra,
    )  # fmt: skip
    model = model_class(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bias" in name or "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


@pytest.mark.parametrize("experts", [0, 4])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_converted_causal_lm_gives_the_original_logits_under_the_causal_mask(
    family, experts, tokenizer, tmp_path
):
    original = causal_lm(family, tokenizer, tmp_path / "ar")
    base = load_config("configs/model/tiny.yaml", ModelConfig).model_copy(update={"attention": "causal"})
    report = convert_causal_lm(tmp_path / "ar", tmp_path / "dimoe", base, experts=experts, top_k=2)
    assert report["ignored"] == []
    converted = load_checkpoint(tmp_path / "dimoe")[0]
    assert converted.vision is None and converted.config.num_moe_layers == (2 if experts else 0)
    ids = torch.randint(0, len(tokenizer), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = original(ids).logits, converted(ids).logits
    # transformers loads the tokenizer as the family's class, which may add a special token of its
    # own: that row is new (it starts at the mean embedding), the checkpoint's rows must match
    vocab = expected.shape[-1]
    torch.testing.assert_close(got[..., :vocab], expected, rtol=1e-4, atol=1e-5)
    # bidirectional attention changes every position but the last: the mask is what makes them equal
    full = load_checkpoint(tmp_path / "dimoe")[0]
    full.config.attention = "full"
    with torch.no_grad():
        assert not torch.allclose(full(ids).logits[:, :-1, :vocab], expected[:, :-1], atol=1e-3)


def test_convert_ar_command_writes_an_upcycled_checkpoint(tokenizer, tmp_path):
    causal_lm("llama", tokenizer, tmp_path / "ar")
    result = CliRunner().invoke(
        app,
        ["model", "convert-ar", "--from", str(tmp_path / "ar"), "--out", str(tmp_path / "moe"),
         "--experts", "4", "--top-k", "2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["layout"] == "4 experts, top-2"
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    assert config["attention"] == "full" and config["num_experts"] == 4 and config["dense_layers"] == []


def test_a_mistral_sliding_window_shorter_than_the_context_is_refused(tokenizer, tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    FAMILIES["mistral"] = (MistralConfig, MistralForCausalLM)
    try:
        causal_lm("mistral", tokenizer, tmp_path / "ar", sliding_window=16)
    finally:
        del FAMILIES["mistral"]
    base = load_config("configs/model/tiny.yaml", ModelConfig)
    with pytest.raises(ImportErrorDetail, match="sliding_window=16"):
        convert_causal_lm(tmp_path / "ar", tmp_path / "dimoe", base)


def test_unsupported_rope_scaling_is_refused_by_name(tokenizer, tmp_path):
    scaling = {"rope_type": "linear", "factor": 2.0}
    causal_lm("llama", tokenizer, tmp_path / "ar", rope_scaling=scaling)
    base = load_config("configs/model/tiny.yaml", ModelConfig)
    with pytest.raises(ImportErrorDetail, match="rope_type='linear'"):
        convert_causal_lm(tmp_path / "ar", tmp_path / "dimoe", base)
