"""The Ray Train worker loop: DeepSpeed engine, Ray Data shard, DMAR + EBCMC objective,
checkpoints reported through `ray.train.report`, resume from the latest one, HF export at the end.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dimoe.config.train import GROUPS, TrainConfig
from dimoe.train.schedule import lr_multiplier

STATE_FILE = "trainer_state.json"
DS_TAG = "ds"


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss: the run stops instead of corrupting the checkpoints."""


def load_initial_model(cfg: TrainConfig):
    """The model and tokenizer this stage starts from: `init_from` or a fresh init."""
    from dimoe.config.loader import load_config
    from dimoe.config.model import ModelConfig
    from dimoe.data.tokenizer import load_tokenizer
    from dimoe.model.build import build_model, load_checkpoint

    if cfg.init_from:
        model, tokenizer = load_checkpoint(cfg.init_from)
        return model.train(), tokenizer
    tokenizer = load_tokenizer(cfg.tokenizer)
    return build_model(load_config(cfg.model, ModelConfig), tokenizer, seed=cfg.seed).train(), tokenizer


def optimizer_groups(model, cfg: TrainConfig) -> list[dict[str, Any]]:
    """One optimizer group per trained parameter group; frozen groups get requires_grad=False and
    are left out of the optimizer entirely (no Adam state)."""
    groups = []
    for name, members in model.parameter_groups().items():
        spec = cfg.group(name)
        for _, param in members:
            param.requires_grad_(spec.train)
        if spec.train and members:
            groups.append({"params": [p for _, p in members], "lr": spec.lr, "name": name})
    return groups


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    base_lr = max((cfg.group(g).lr for g in GROUPS if cfg.group(g).train), default=1e-4)
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.deepspeed.bf16},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": base_lr,
                "betas": list(cfg.optimizer.betas),
                "eps": cfg.optimizer.eps,
                "weight_decay": cfg.optimizer.weight_decay,
                # DeepSpeed's fused Adam needs CUDA; torch's AdamW runs everywhere.
                "torch_adam": not cfg.scaling.use_gpu,
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    for key, value in cfg.deepspeed.extra.items():
        ds[key] = {**ds[key], **value} if isinstance(value, dict) and isinstance(ds.get(key), dict) else value
    return ds


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import deepspeed  # imported in the worker: importing it on the driver can fail on some installs
    import ray.train
    from deepspeed.utils import safe_get_full_grad

    from dimoe.diffusion import RouterPriorEMA
    from dimoe.model.processor import ImageProcessor
    from dimoe.train.batch import collate, length_grouped
    from dimoe.train.objective import training_step
    from dimoe.train.telemetry import JsonlLogger, RoutingGauges, gradient_stats

    cfg = TrainConfig.model_validate(config)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    stage_dir = Path(cfg.output_dir) / cfg.stage
    torch.manual_seed(cfg.seed)

    model, tokenizer = load_initial_model(cfg)
    groups = optimizer_groups(model, cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        config=deepspeed_config(cfg),
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_multiplier(s, cfg)),
    )
    config_hf = engine.module.config
    prior = RouterPriorEMA(config_hf.num_hidden_layers, config_hf.num_experts, cfg.losses.prior_momentum)

    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            engine.load_checkpoint(directory, tag=DS_TAG)
            state = json.loads((Path(directory) / STATE_FILE).read_text())
        step = state["step"]
        prior.load_state_dict({k: torch.tensor(v) for k, v in state["prior"].items()})
        print(f"[rank {rank}] resumed {cfg.stage} from step {step}")

    logger = JsonlLogger(stage_dir / "logs") if rank == 0 else None
    gauges = RoutingGauges(cfg.stage) if rank == 0 else None
    processor = ImageProcessor(config_hf.image_size) if config_hf.vision_config else None
    dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
    blank_image = (
        torch.zeros(1, 3, config_hf.image_size, config_hf.image_size, dtype=dtype, device=engine.device)
        if processor is not None
        else None
    )
    generator = torch.Generator().manual_seed(cfg.seed * 1000 + rank * 7919 + step)
    shard = ray.train.get_dataset_shard("train")
    device = engine.device
    last_checkpoint_step = step

    def save(metrics: dict[str, float]) -> None:
        nonlocal last_checkpoint_step
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=DS_TAG)
            state = {"step": step, "prior": {k: v.tolist() for k, v in prior.state_dict().items()}}
            (Path(tmp) / STATE_FILE).write_text(json.dumps(state))
            torch.distributed.barrier() if world > 1 else None
            ray.train.report({**metrics, "step": step}, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        last_checkpoint_step = step

    window_start, window_tokens = time.perf_counter(), 0.0
    metrics: dict[str, float] = {}
    while step < cfg.max_steps:
        groups = shard.iter_batches(
            batch_size=cfg.batch_size * cfg.data.group_by_length,
            batch_format="numpy",
            drop_last=False,  # length_grouped drops only the last partial batch
            local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
            local_shuffle_seed=cfg.seed + step if cfg.data.shuffle_buffer else None,
        )
        order_rng = np.random.default_rng([cfg.seed, rank, step])  # batch order of this pass
        for rows in length_grouped(groups, cfg.batch_size, order_rng, cfg.data.length_bucket):
            if step >= cfg.max_steps:
                break
            if cfg.inject_failure_at_step == step and rank == 0:
                marker = stage_dir / ".injected_failure"
                if not marker.exists():
                    marker.parent.mkdir(parents=True, exist_ok=True)
                    marker.write_text(str(step))
                    raise RuntimeError(f"injected worker failure at step {step} (testing fault tolerance)")
            batch = collate(
                rows,
                pad_id=tokenizer.pad_token_id,
                eos_id=tokenizer.eos_token_id,
                image_id=config_hf.image_token_id,
                response_length=cfg.data.response_length,
                processor=processor,
            ).to(device)
            batch.pixel_values = batch.pixel_values.to(dtype)
            logging = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.max_steps
            out = training_step(
                engine,
                cfg,
                batch,
                generator,
                prior,
                mask_token_id=config_hf.mask_token_id,
                encode_images=engine.module.encode_images,
                collect_routing=logging and rank == 0,
                blank_image=blank_image,
            )
            if not math.isfinite(out.metrics["loss"]):
                raise NonFiniteLossError(
                    f"{cfg.stage}: non-finite loss ({out.metrics['loss']}) at step {step + 1}; "
                    f"last good checkpoint is step {last_checkpoint_step} under {stage_dir / 'checkpoints'}. "
                    "Lower the learning rate or check the data, then re-run the same command to resume."
                )
            engine.backward(out.loss)
            grads = gradient_stats(engine.module, safe_get_full_grad) if logging else None
            engine.step()
            step += 1
            window_tokens += out.metrics["tokens"] * world
            metrics = out.metrics
            if logging and logger is not None:
                elapsed = time.perf_counter() - window_start
                lrs = {g["name"]: g["lr"] for g in engine.optimizer.param_groups if "name" in g}
                record = {
                    "step": step,
                    **metrics,
                    "lr": lrs,
                    "grad_norm": float(engine.get_global_grad_norm() or 0.0),
                    "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                    "supervised_token_fraction": metrics["masked_tokens"]
                    / max(metrics["eligible_tokens"], 1),
                }
                logger.write("train_metrics", record)
                logger.write(
                    "routing_stats", {"step": step, "num_buckets": cfg.diffusion.num_t_buckets, **out.routing}
                )
                logger.write("gradient_stats", {"step": step, **grads})
                gauges.publish(metrics, out.routing)
                print(
                    f"[{cfg.stage}] step {step}/{cfg.max_steps} loss {metrics['loss']:.4f} "
                    f"({record['tokens_per_s']:.0f} tok/s)",
                    flush=True,
                )
                window_start, window_tokens = time.perf_counter(), 0.0
            if step % cfg.checkpoint.every_steps == 0 and step < cfg.max_steps:
                save(metrics)
    save(metrics)
    export_final(engine, tokenizer, stage_dir / "final", rank, cfg.deepspeed.zero_stage)


def export_final(engine, tokenizer, out_dir: Path, rank: int, zero_stage: int) -> None:
    """HF-format export (config.json, model.safetensors, tokenizer) of the final weights."""
    import deepspeed

    from dimoe.model.build import save_checkpoint

    params = list(engine.module.parameters())
    # Under ZeRO-3 the weights are partitioned: gather them on every rank, save on rank 0.
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero_stage == 3):
        if rank == 0:
            save_checkpoint(engine.module, tokenizer, out_dir)
