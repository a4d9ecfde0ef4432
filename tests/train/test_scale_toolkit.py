"""The scale toolkit (LoRA, gradient checkpointing, Muon, validation, tracking, profiling): the
pieces against independent references in-process, then real Ray Train + DeepSpeed runs on the
local cluster."""

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from dimoe.config.loader import load_config
from dimoe.config.model import ModelConfig
from dimoe.config.train import LoraSpec, TrainConfig
from dimoe.model.build import build_model, load_checkpoint
from dimoe.train.engine import MuonWithAdamW, optimizer_groups
from dimoe.train.launcher import STAGE_ORDER, run_stage
from dimoe.train.lora import apply_lora
from tests.train.blends import write_blends

pytestmark = pytest.mark.timeout(900)


def _loss(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(ids).logits.float()
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten())


def test_gradient_checkpointing_recomputes_the_layers_and_gives_the_same_gradients(tiny_spec, tokenizer):
    model = build_model(tiny_spec, tokenizer, seed=0).train()
    ids = torch.randint(5, tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    calls = []
    # transformers checkpoints `forward`, inside the hooks: a sub-module sees the recompute
    model.layers[0].self_attn.register_forward_hook(lambda *_: calls.append(1))
    _loss(model, ids).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable()
    calls.clear()
    _loss(model, ids).backward()
    assert len(calls) == 2  # the forward, and its recompute in the backward
    checkpointed = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert plain.keys() == checkpointed.keys() and len(plain) > 20
    for name, grad in plain.items():
        torch.testing.assert_close(checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_muon_orthogonalises_each_expert_like_torch_muon_on_its_matrix(tiny_spec, tokenizer):
    """One step of `MuonWithAdamW` on a fused expert weight [E, out, in] equals torch.optim.Muon
    stepping each expert's matrix alone; AdamW groups step like torch.optim.AdamW."""
    model = build_model(tiny_spec, tokenizer, seed=0).train()
    cfg = TrainConfig(stage="s", optimizer={"name": "muon", "muon_lr": 0.05, "weight_decay": 0.01})
    groups = optimizer_groups(model, cfg)
    assert {g["name"] for g in groups} >= {"backbone_muon", "backbone", "router"}
    experts = model.layers[0].mlp.experts.gate_up_proj
    embed = model.embed_tokens.weight
    assert experts.use_muon and not embed.use_muon and not model.layers[0].mlp.gate.weight.use_muon
    experts_before, embed_before = experts.detach().clone(), embed.detach().clone()
    _loss(model, torch.randint(5, 300, (2, 16))).backward()
    grads = experts.grad.clone(), embed.grad.clone()
    MuonWithAdamW(groups, cfg).step()

    for e in range(experts.shape[0]):
        matrix = torch.nn.Parameter(experts_before[e].clone())
        matrix.grad = grads[0][e].clone()
        torch.optim.Muon([matrix], lr=0.05, weight_decay=0.01, momentum=0.95).step()
        torch.testing.assert_close(experts[e].detach(), matrix.detach(), msg=f"expert {e}")
    reference = torch.nn.Parameter(embed_before.clone())
    reference.grad = grads[1]
    backbone_lr = cfg.group("backbone").lr
    torch.optim.AdamW([reference], lr=backbone_lr, betas=cfg.optimizer.betas, weight_decay=0.01).step()
    torch.testing.assert_close(embed.detach(), reference.detach())


def test_lora_targets_the_decoder_layers_only_and_rejects_unknown_names(tiny_spec, tokenizer):
    model = apply_lora(build_model(tiny_spec, tokenizer, seed=0), LoraSpec(target_modules=["q_proj"]))
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert adapted == {
        f"base_model.model.layers.{i}.self_attn.q_proj" for i in range(tiny_spec.num_hidden_layers)
    }
    with pytest.raises(ValueError, match="unknown .*'qkv'.*choose from"):
        LoraSpec(target_modules=["qkv"])


# -- on the local Ray cluster ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def blend_root(tokenizer, tmp_path_factory):
    """The shared tiny blends, with an `origin` per row (as `build-stage-blends` writes) so the
    held-out split takes whole source rows."""
    root = tmp_path_factory.mktemp("toolkit")
    image_tokens = load_config("configs/model/tiny.yaml", ModelConfig).vision.num_image_tokens
    write_blends(root / "data", tokenizer, image_tokens)
    for stage in STAGE_ORDER:
        path = root / "data" / "blends" / stage / "part-0.parquet"
        table = pq.read_table(path)
        pq.write_table(table.append_column("origin", pa.array([f"row-{i}" for i in range(len(table))])), path)
    tokenizer.save_pretrained(root / "tokenizer")
    return root


def _stage(root: Path, out: str, *overrides: str) -> TrainConfig:
    common = [f"data.data_dir={root / 'data'}", f"tokenizer={root / 'tokenizer'}", f"output_dir={root / out}",
              "batch_size=4", "data.response_length=8", "log_every=1"]  # fmt: skip
    return load_config("configs/train/tiny/stage0_naive.yaml", TrainConfig, [*common, *overrides])


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_lora_under_zero2_trains_only_adapters_and_exports_base_plus_ba(ray_cluster, blend_root, tiny_spec):
    """2 workers, ZeRO-2, LoRA on q/v and the experts with gradient checkpointing; vision, projector
    and router frozen. The merged `final/` equals the initial weights + (alpha / r)·B·A from peft's
    adapter file on every adapted matrix, and the initial weights everywhere else."""
    lora = "lora={r: 4, alpha: 8, target_modules: [q_proj, v_proj, experts.gate_up_proj]}"
    frozen = [f"groups.{g}.train=false" for g in ("vision", "projector", "router")]
    cfg = _stage(blend_root, "lora", lora, "gradient_checkpointing=true", "max_steps=3",
                 "groups.backbone.lr=1e-2", "tracking.backend=wandb", *frozen)  # fmt: skip
    result = run_stage(cfg, progress=False)
    if not os.environ.get("WANDB_API_KEY"):  # W&B offline: a run folder with its log and the stage's logs
        (run,) = (blend_root / "lora" / "wandb").glob("offline-run-*")
        assert next(run.glob("run-*.wandb")).stat().st_size > 0
        assert (run / "files" / "logs" / "train_metrics.jsonl").is_file()
    tokenizer = load_checkpoint(result.final_dir)[1]
    initial = build_model(load_config(cfg.model, ModelConfig), tokenizer, seed=cfg.seed).state_dict()
    merged = load_checkpoint(result.final_dir)[0].state_dict()
    adapter_dir = result.final_dir.parent / "adapter"
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 4
    adapter = load_file(adapter_dir / "adapter_model.safetensors")
    changed = {name for name in initial if not torch.equal(initial[name], merged[name])}
    for layer in range(tiny_spec.num_hidden_layers):
        for proj in ("q_proj", "v_proj"):
            name = f"layers.{layer}.self_attn.{proj}"
            a = adapter[f"base_model.model.{name}.lora_A.weight"]
            b = adapter[f"base_model.model.{name}.lora_B.weight"]
            assert b.abs().max() > 0  # B starts at zero: it trained
            torch.testing.assert_close(merged[f"{name}.weight"], initial[f"{name}.weight"] + 2.0 * b @ a)
        # peft's file layout for a fused [E, out, in] weight: A [r·E, in], B [out, r·E], expert-major in A
        name = f"layers.{layer}.mlp.experts"
        a = adapter[f"base_model.model.{name}.lora_A.weight"].reshape(-1, 4, tiny_spec.hidden_size)
        b = adapter[f"base_model.model.{name}.lora_B.weight"]
        b = b.reshape(b.shape[0], 4, -1).permute(2, 0, 1)
        torch.testing.assert_close(
            merged[f"{name}.gate_up_proj"], initial[f"{name}.gate_up_proj"] + 2.0 * b @ a
        )
    adapted = ("self_attn.q_proj.weight", "self_attn.v_proj.weight", "mlp.experts.gate_up_proj")
    expected = {f"layers.{i}.{m}" for i in range(tiny_spec.num_hidden_layers) for m in adapted}
    assert changed == expected


@pytest.fixture(scope="module")
def validated_run(ray_cluster, blend_root):
    """DeepSpeed's Muon under ZeRO-2 on 2 workers, validating every 2 of 8 steps, keeping 2
    checkpoints, tracked in MLflow, with a profiler trace."""
    cfg = _stage(blend_root, "muon", "optimizer.name=muon", "optimizer.muon_lr=0.02", "max_steps=8",
                 "validation.every_steps=2", "validation.fraction=0.25", "validation.decode_rows=4",
                 "checkpoint.keep=2", "tracking.backend=mlflow", "profile.trace_steps=2",
                 "profile.trace_start=1", "groups.backbone.lr=2e-3")  # fmt: skip
    return run_stage(cfg, progress=False)


def test_muon_with_validation_tracking_and_profiling_on_two_zero2_workers(validated_run, blend_root):
    """The held-out loss (fixed t grid and masks) falls; the kept checkpoints are the two of lowest
    held-out loss; MLflow's run folder holds the metrics; a profiler trace is written; the logs
    carry norms and peak memory."""
    result = validated_run
    logs = _records(result.log_dir / "train_metrics.jsonl")
    validated = {r["step"]: r["val_loss"] for r in logs if "val_loss" in r}
    assert list(validated) == [2, 4, 6, 8] and validated[8] < validated[2]
    assert all(0 <= r["val_exact_match"] <= 1 for r in logs if "val_loss" in r)
    assert any("backbone_muon" in name for name in logs[0]["lr"])
    assert logs[0]["weight_norm"]["backbone"] > 0 and set(logs[0]["activation_rms"]) >= {"embed", "layer_0"}
    assert logs[0]["peak_memory_mb"] > 0
    kept = sorted(
        json.loads(p.read_text())["step"]
        for p in result.checkpoint_dir.glob("checkpoint_*/trainer_state.json")
    )
    assert kept == sorted(sorted(validated, key=validated.get)[:2])
    # each rank's state under its own name (one shared name made two concurrent copies interleave),
    # both written at the same step
    for state in result.checkpoint_dir.glob("checkpoint_*/trainer_state.json"):
        rank1 = json.loads((state.parent / "trainer_state_rank1.json").read_text())
        assert rank1["step"] == json.loads(state.read_text())["step"]
    runs = [p for p in (blend_root / "muon" / "mlruns").glob("*/*") if (p / "metrics").is_dir()]
    assert len(runs) == 1 and (runs[0] / "metrics" / "val_loss").is_file()
    assert (runs[0] / "artifacts" / "logs" / "train_metrics.jsonl").is_file()
    loss_values = (runs[0] / "metrics" / "loss").read_text().splitlines()
    assert len(loss_values) == len(logs)
    trace = json.loads((result.final_dir.parent / "profile" / "trace_rank0.json").read_text())
    assert any(event.get("name", "").startswith("aten::") for event in trace["traceEvents"])


def test_torch_muon_as_client_optimizer_under_zero0_lowers_the_heldout_loss(ray_cluster, blend_root):
    cfg = _stage(blend_root, "muon0", "optimizer.name=muon", "deepspeed.zero_stage=0", "max_steps=6",
                 "validation.every_steps=1", "validation.fraction=0.25", "scaling.num_workers=1",
                 "groups.backbone.lr=2e-3")  # fmt: skip
    result = run_stage(cfg, progress=False)
    losses = [r["val_loss"] for r in _records(result.log_dir / "train_metrics.jsonl")]
    assert len(losses) == 6 and losses[-1] < losses[0]


def test_merge_checkpoints_writes_the_mean_of_the_top_k_by_heldout_loss(validated_run, tmp_path):
    from dimoe.errors import UserError
    from dimoe.train.merge import merge_top_k

    stage = validated_run.final_dir.parent
    logs = _records(validated_run.log_dir / "train_metrics.jsonl")
    best = sorted((r["val_loss"], r["step"]) for r in logs if "val_loss" in r)[:2]
    merged = merge_top_k(stage, 2, "val_loss", out=tmp_path / "merged")
    assert [c["step"] for c in merged["checkpoints"]] == [step for _, step in best]
    # DeepSpeed's own module states of the two checkpoints (fp32 training: the master weights)
    states = [
        torch.load(Path(c["path"]) / "ds" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
        for c in merged["checkpoints"]
    ]
    weights = load_checkpoint(tmp_path / "merged")[0].state_dict()
    assert not torch.equal(states[0]["lm_head.weight"], states[1]["lm_head.weight"])
    for name, value in weights.items():
        torch.testing.assert_close(value, (states[0][name] + states[1][name]) / 2, msg=name)
    with pytest.raises(UserError, match="has 2 checkpoint"):
        merge_top_k(stage, 3, "val_loss", out=tmp_path / "too_many")
