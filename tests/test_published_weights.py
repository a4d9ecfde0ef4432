"""Starting from published weights (README "Starting from published weights"): a tokenizer in the
style of LLaDA-MoE-Instruct's (its special tokens, a mask token in the vocabulary but not declared,
no `<image>`, its own Jinja chat template with `<role>` markers) and a LLaDA-MoE checkpoint in the
published layout, carried through `model init --backbone-from` → `data normalize` →
`build-stage-blends` → a training step on Ray Train → `infer generate` → a served chat completion."""

from __future__ import annotations

import json

import openai
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from ray import serve
from safetensors.torch import load_file
from transformers import AutoTokenizer
from typer.testing import CliRunner

from dimoe.cli import app
from dimoe.data.synthetic import synthesize
from dimoe.infer.engine import GenerationEngine
from dimoe.infer.inputs import Request
from dimoe.io import free_ports, read_jsonl, write_jsonl
from dimoe.model.build import load_checkpoint
from dimoe.serving.server import start_server_background
from tests.model.upstream import write_llada_moe
from tests.published_tokenizer import LING_TEMPLATE, ling_style_tokenizer

PADDING_ROWS = 6  # published vocabularies are padded beyond the tokenizer (157184 rows, fewer tokens)


def invoke(*argv: str) -> dict:
    result = CliRunner().invoke(app, [str(a) for a in argv])
    assert result.exit_code == 0, result.output
    return json.loads(result.output[result.output.index("{") :])


@pytest.fixture(scope="module")
def published(ray_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    synthesize(root / "synth", seed=0, size=40)
    corpus = [
        line for path in (root / "synth" / "raw").glob("*.json*") for line in path.read_text().splitlines()
    ]
    original = ling_style_tokenizer(corpus, root / "tokenizer")
    write_llada_moe(root / "llada-moe", vocab=len(original) + PADDING_ROWS, hidden=64, layers=2, experts=4)
    return root, original


@pytest.fixture(scope="module")
def initialised(published):
    root, original = published
    out = root / "dimoe-vl"
    invoke("model", "init", "--config", "configs/model/tiny.yaml", "--tokenizer", root / "tokenizer",
           "--backbone-from", root / "llada-moe", "--out", out)  # fmt: skip
    return out


def test_model_init_adds_only_what_the_tokenizer_lacks(published, initialised):
    root, original = published
    adapted = AutoTokenizer.from_pretrained(initialised)
    added = adapted.convert_ids_to_tokens(list(range(len(original), len(adapted))))
    assert added == ["<image>"]  # the mask and pad tokens existed; the template is kept
    assert adapted.mask_token == "<|mask|>" and adapted.mask_token_id == original.convert_tokens_to_ids(
        "<|mask|>"
    )
    assert adapted.chat_template == LING_TEMPLATE
    config = json.loads((initialised / "config.json").read_text())
    assert (
        config["mask_token_id"] == adapted.mask_token_id and config["eos_token_id"] == original.eos_token_id
    )
    # <image> falls in the checkpoint's padding rows: it starts at the mean of the checkpoint's rows.
    model, _ = load_checkpoint(initialised)
    embedding = model.embed_tokens.weight
    image_id = adapted.convert_tokens_to_ids("<image>")
    assert image_id < len(original) + PADDING_ROWS
    source = load_file(root / "llada-moe" / "model.safetensors")["model.embed_tokens.weight"]
    torch.testing.assert_close(embedding[image_id], source.mean(0))
    torch.testing.assert_close(embedding[: len(original)], source[: len(original)])


@pytest.fixture(scope="module")
def normalized(published, initialised):
    root, _ = published
    out = root / "v1"
    invoke(
        "data", "normalize", "--in", root / "synth" / "raw", "--out", out, "--tokenizer", root / "tokenizer"
    )
    return out


def test_normalized_rows_use_the_tokenizers_own_template(published, initialised, normalized):
    tokenizer = AutoTokenizer.from_pretrained(initialised)
    row = pq.read_table(sorted((normalized / "stage3_vision").rglob("*.parquet"))[0]).to_pylist()[0]
    prompt = tokenizer.decode(row["input_ids"][: row["prompt_length"]])
    response = tokenizer.decode(row["input_ids"][row["prompt_length"] :])
    assert prompt.startswith("<role>HUMAN</role><image>") and prompt.endswith("<role>ASSISTANT</role>")
    assert response.endswith("<|role_end|><|endoftext|>")
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert row["input_ids"].count(image_id) == 4  # the tiny tower's 2×2 patches


@pytest.fixture(scope="module")
def trained(published, initialised, normalized):
    root, _ = published
    blends = root / "blends.yaml"
    blends.write_text(yaml.safe_dump({
        "data_dir": str(normalized), "progress": False,
        "blends": {"stage0_naive": {"sources": {"stage3_vision": 1, "stage2_llm": 1}, "size": 64,
                                    "replace": True, "seed": 0}},
    }))  # fmt: skip
    invoke("data", "build-stage-blends", "--config", blends)
    invoke("train", "run", "--config", "configs/train/tiny/stage0_naive.yaml",
           "--set", f"init_from={initialised}", "--set", f"data.data_dir={normalized}",
           "--set", f"output_dir={root / 'train'}", "--set", "max_steps=2", "--set", "scaling.num_workers=1",
           "--set", "batch_size=4", "--set", "checkpoint.every_steps=2")  # fmt: skip
    return root / "train" / "stage0_naive" / "final"


def test_training_step_infer_and_serve_keep_the_published_format(published, trained, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    question = "How many shapes are there?"
    image = next((published[0] / "synth" / "raw" / "images" / "test").glob("*.png"))
    (tmp_path / "scene.png").write_bytes(image.read_bytes())
    write_jsonl(prompts, [{"id": "q", "prompt": question, "image": "scene.png"}])  # relative to the file
    preds = tmp_path / "preds.jsonl"
    invoke("infer", "generate", "--checkpoint", trained, "--input", prompts, "--out", preds,
           "--preset", "fast", "--gen-length", "16")  # fmt: skip
    (row,) = read_jsonl(preds)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    prompt = tokenizer.decode(row["prompt_ids"])
    assert prompt.startswith("<role>HUMAN</role><image>") and prompt.endswith(
        f"{question}<|role_end|><role>ASSISTANT</role>"
    )

    # Serve's ports are cluster-wide: an application left running by an earlier test module (the
    # serving tests' package fixture lives to the end of the session) would keep its own.
    serve.shutdown()
    http_port, grpc_port = free_ports(2)
    server = start_server_background(trained, http_port=http_port, grpc_port=grpc_port, model_name="ling")
    try:
        client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="x", max_retries=0, timeout=120)
        reply = client.chat.completions.create(
            model="ling",
            messages=[{"role": "user", "content": question}],
            max_tokens=16,
            extra_body={"preset": "fast"},
        )
    finally:
        server.stop()
    engine = GenerationEngine.from_checkpoint(trained)
    expected = engine.generate(
        [Request("x", prompt=question)], "fast", gen_length=16, block_length=16, steps=8
    )[0]
    assert reply.choices[0].message.content == expected.output
    assert reply.usage.prompt_tokens == len(expected.prompt_ids)
