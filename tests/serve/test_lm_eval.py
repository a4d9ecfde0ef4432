"""lm-eval, the harness people point at OpenAI-compatible servers, as a real client of
`dimoe infer serve`: its `local-chat-completions` and `local-completions` models run the
repository's offline GSM8K task (dimoe/eval/lm_eval_tasks/dimoe_gsm8k.yaml) through the CLI, and
every request is answered with what the engine decodes in-process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dimoe.eval import metrics
from dimoe.infer.inputs import Request
from tests.serve.support import API_KEY, MODEL

pytest.importorskip("lm_eval", reason="lm-eval is a test extra: pip install -e '.[dev]'")

ROOT = Path(__file__).parents[2]
TASKS = ROOT / "dimoe/eval/lm_eval_tasks"
GSM8K = ROOT.parent / "shared/datasets/gsm8k/test.jsonl"
LIMIT = 6
MAX_QUESTION_CHARS = 160
MAX_GEN_TOKS = 64  # the task's generation_kwargs.max_gen_toks


def gsm8k_rows() -> list[str]:
    """The first short GSM8K test questions (the fixture model's 400-token vocabulary spends many
    tokens per word, and its context is 512), or rows in GSM8K's format where the shared copy is
    absent."""
    if GSM8K.is_file():
        lines = GSM8K.read_text(encoding="utf-8").splitlines()
        return [line for line in lines if len(json.loads(line)["question"]) <= MAX_QUESTION_CHARS][:LIMIT]
    return [
        json.dumps(
            {"question": f"Tom has {a} apples and buys {b} more. How many?", "answer": f"#### {a + b}"}
        )
        for a, b in zip(range(3, 3 + LIMIT), range(5, 5 + LIMIT), strict=True)
    ]


def lm_eval(server, workdir: Path, model: str, model_args: str, *flags: str) -> tuple[dict, list[dict]]:
    """Run the lm_eval CLI in `workdir` (which holds benchmarks/gsm8k/test.jsonl) offline; return
    its results file and its logged samples."""
    data = workdir / "benchmarks/gsm8k/test.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("\n".join(gsm8k_rows()) + "\n", encoding="utf-8")
    env = {**os.environ, "OPENAI_API_KEY": API_KEY, "HF_HOME": str(workdir / "hf")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [
        str(Path(sys.executable).parent / "lm_eval"), "run",
        "--model", model, "--model_args", f"model={MODEL},base_url={server.http_url}{model_args}",
        "--include_path", str(TASKS), "--tasks", "dimoe_gsm8k", "--limit", str(LIMIT),
        "--output_path", "results", "--log_samples", *flags,
    ]  # fmt: skip
    run = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"lm_eval failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    results = sorted((workdir / "results").rglob("results_*.json"))
    samples = sorted((workdir / "results").rglob("samples_dimoe_gsm8k_*.jsonl"))
    assert len(results) == 1 and len(samples) == 1, list((workdir / "results").rglob("*"))
    lines = samples[0].read_text(encoding="utf-8").splitlines()
    return json.loads(results[0].read_text(encoding="utf-8")), [json.loads(line) for line in lines]


def check_run(results: dict, samples: list[dict], expected: list[str]) -> None:
    """Every question sent once and answered with the engine's text; the score is the task's."""
    assert results["n-samples"]["dimoe_gsm8k"]["effective"] == LIMIT == len(samples)
    answers = [sample["resps"][0][0] for sample in samples]
    assert answers == expected
    golds = [sample["target"] for sample in samples]
    # The score recomputed with DiMoE's own GSM8K metric, on the same last-number rule.
    recomputed = sum(metrics.gsm8k_accuracy(a, f"#### {g}") for a, g in zip(answers, golds, strict=True))
    assert results["results"]["dimoe_gsm8k"]["exact_match,last-number"] == pytest.approx(recomputed / LIMIT)


def engine_answers(engine, samples: list[dict], chat: bool) -> list[str]:
    """What the engine decodes in-process for each logged prompt: the server's default preset
    fitted to max_gen_toks, the output cut before the task's stop string."""
    requests = []
    for sample in samples:
        prompt = sample["arguments"]["gen_args_0"]["arg_0"]
        prompt = prompt[0] if isinstance(prompt, list) else prompt  # chat prompts are logged in a list
        if chat:
            messages = json.loads(prompt)
            requests.append(Request("x", messages=messages, stop=("Question:",)))
        else:
            requests.append(Request("x", prompt=prompt, chat_template=False, stop=("Question:",)))
    return [result.output for result in engine.generate(requests, gen_length=MAX_GEN_TOKS)]


@pytest.mark.slow
def test_lm_eval_local_chat_completions_scores_gsm8k(server, engine, tmp_path):
    results, samples = lm_eval(
        server, tmp_path, "local-chat-completions",
        "/v1/chat/completions,num_concurrent=3,max_retries=1,tokenized_requests=False",
        "--apply_chat_template",
    )  # fmt: skip
    check_run(results, samples, engine_answers(engine, samples, chat=True))


@pytest.mark.slow
def test_lm_eval_local_completions_sends_prompt_batches(server, engine, tmp_path):
    """batch_size 3: each request carries a list of prompts, answered choice by choice."""
    results, samples = lm_eval(
        server, tmp_path, "local-completions",
        "/v1/completions,tokenizer_backend=None,tokenized_requests=False,max_retries=1",
        "--batch_size", "3",
    )  # fmt: skip
    check_run(results, samples, engine_answers(engine, samples, chat=False))
