"""The Ray Train worker loop: DeepSpeed engine, Ray Data shard, DMAR + EBCMC objective,
checkpoints reported through `ray.train.report`, resume from the latest one, HF export at the end.

Every worker runs `train_loop_per_worker`, which reads as the run goes:

    Trainer(cfg)       setup: model, DeepSpeed engine (ZeRO from the config), routing prior, inputs
    trainer.resume()   the latest checkpoint Ray Train hands back after a failure or a re-run
    trainer.train()    per batch: inject_failure_if_due → train_step (forward + objective, backward,
                       optimizer) → StepLog.write (rank 0) → save_checkpoint
    trainer.export()   the final weights in HF format

Checkpoint layout (under `<output_dir>/<stage>/checkpoints/`, managed by Ray Train): DeepSpeed's
own files under the tag `ds`, and `trainer_state.json` (rank 0; `trainer_state_rank<r>.json` for
rank r) with the step, the reported metrics and that rank's routing-prior EMA.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dimoe.config.train import TrainConfig
from dimoe.diffusion.ppots import Proposal
from dimoe.io import append_jsonl, read_json, write_json
from dimoe.telemetry import profiling
from dimoe.telemetry.tracking import Tracker
from dimoe.train.batch import TrainBatch, collate, length_grouped
from dimoe.train.engine import build_engine
from dimoe.train.objective import StepOutput, ar_training_step, estimate_proposal, training_step
from dimoe.train.schedule import block_size_at, final_block_size, model_block_size
from dimoe.train.telemetry import JsonlLogger, RoutingGauges, gradient_stats
from dimoe.train.validation import DATASET as VALIDATION_DATASET
from dimoe.train.validation import Validator

STATE_FILE = "trainer_state.json"
DS_TAG = "ds"

# Not `print`: Ray Train replaces `print` in its workers with a copy to the worker's stdout plus a
# record for the root logger, whose console handler writes it to stderr, so every printed line
# reached the driver twice. A log record is written once (and also lands in Ray Train's app log).
log = logging.getLogger(__name__)


def rank_state_file(rank: int) -> str:
    """The trainer-state file of one rank. Ray Train merges every rank's checkpoint folder into one,
    so ranks must not share a file name (two concurrent copies of one name interleave); rank 0 keeps
    the plain name, whose metrics are the ones Ray reported and `merge-checkpoints` ranks by."""
    return STATE_FILE if rank == 0 else f"trainer_state_rank{rank}.json"


class NonFiniteLossError(RuntimeError):
    """A NaN/Inf loss: the run stops instead of corrupting the checkpoints."""


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """The Ray Train entry point (`TorchTrainer(train_loop_per_worker, train_loop_config=...)`)."""
    trainer = Trainer(TrainConfig.model_validate(config))
    trainer.resume()
    trainer.train()
    trainer.export()


# -- setup ---------------------------------------------------------------------------------------
def load_initial_model(cfg: TrainConfig) -> tuple[torch.nn.Module, Any]:
    """The model (in train mode) and tokenizer this stage starts from: `init_from` or a fresh init."""
    from dimoe.config.loader import load_config
    from dimoe.config.model import ModelConfig
    from dimoe.data.tokenizer import load_tokenizer
    from dimoe.model.build import build_model, load_checkpoint
    from dimoe.model.importers import set_image_size

    if cfg.init_from:
        model, tokenizer = load_checkpoint(cfg.init_from)
        if cfg.vision_image_size is not None:
            set_image_size(model, cfg.vision_image_size)
        return model.train(), tokenizer
    tokenizer = load_tokenizer(cfg.tokenizer)
    return build_model(load_config(cfg.model, ModelConfig), tokenizer, seed=cfg.seed).train(), tokenizer


def prepare_model(model: torch.nn.Module, cfg: TrainConfig) -> torch.nn.Module:
    """Gradient checkpointing per decoder layer and LoRA adapters, as the config asks."""
    from dimoe.train.lora import apply_lora

    if cfg.gradient_checkpointing:
        # activation_checkpointing_enable is transformers' newer name (gradient_… is deprecated)
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable()
    return apply_lora(model, cfg.lora) if cfg.lora is not None else model


class Trainer:
    """One worker's share of a stage; the methods appear in the order the run calls them."""

    def __init__(self, cfg: TrainConfig) -> None:
        import ray.train

        from dimoe.diffusion import RouterPriorEMA
        from dimoe.model.processor import ImageProcessor

        context = ray.train.get_context()
        self.cfg = cfg
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.stage_dir = Path(cfg.output_dir) / cfg.stage
        torch.manual_seed(cfg.seed)
        model, self.tokenizer = load_initial_model(cfg)
        self.engine = build_engine(cfg, prepare_model(model, cfg))
        # The DiMoE-VL model itself (under LoRA, inside peft's wrapper: its layers carry the adapters).
        self.base = model
        hf = self.model_config = model.config
        self.prior = RouterPriorEMA(hf.num_moe_layers, hf.num_experts, cfg.losses.prior_momentum)
        self.processor = ImageProcessor(hf.image_size) if hf.vision_config else None
        self.dtype = torch.bfloat16 if cfg.deepspeed.bf16 else torch.float32
        # A text-only batch still runs the tower on this image (with weight 0): see `training_step`.
        self.blank_image = None
        if self.processor is not None:
            size = (1, 3, hf.image_size, hf.image_size)
            self.blank_image = torch.zeros(size, dtype=self.dtype, device=self.engine.device)
        self.shard = ray.train.get_dataset_shard("train")
        self.step = self.last_checkpoint_step = 0
        self.proposal: Proposal | None = None  # P-POTS's sampler of t (timesteps.kind ppots)
        self.validator = None
        if cfg.validation.every_steps:
            self.validator = Validator(cfg, ray.train.get_dataset_shard(VALIDATION_DATASET), self.to_batch)
        self.setup_profiling()

    def setup_profiling(self) -> None:
        """NVTX ranges, the profiler trace and CUDA memory history (docs/design.md §8); and the
        tracker on rank 0 (docs/design.md §8)."""
        spec = self.cfg.profile
        self.nvtx = profiling.nvtx_enabled(spec.nvtx)
        if self.nvtx:
            profiling.add_router_ranges(self.base)
        self.trace = profiling.StepTrace(
            self.stage_dir / "profile", self.rank, spec.trace_start, spec.trace_steps
        )
        profiling.start_memory_history(spec.cuda_memory_snapshot)
        self.tracker = None
        if self.rank == 0:
            params = self.cfg.model_dump(mode="json")
            self.tracker = Tracker(self.cfg.tracking, Path(self.cfg.output_dir), self.cfg.stage, params)

    # -- resume ----------------------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the checkpoint Ray Train hands back (after a worker failure, or when the
        same command runs again: the run's storage path is fixed), if there is one."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return
        with checkpoint.as_directory() as directory:
            self.engine.load_checkpoint(directory, tag=DS_TAG)
            # each rank's own routing prior; rank 0's when the checkpoint has no file for this rank
            # (the run resumes on more workers than it had, or the checkpoint predates per-rank files)
            own = Path(directory) / rank_state_file(self.rank)
            state = read_json(own if own.is_file() else Path(directory) / STATE_FILE)
        self.step = self.last_checkpoint_step = state["step"]
        self.prior.load_state_dict({k: torch.tensor(v) for k, v in state["prior"].items()})
        if self.rank == 0:
            log.info("[%s] resumed from step %d", self.cfg.stage, self.step)

    # -- the loop --------------------------------------------------------------------------------
    def train(self) -> None:
        """Step until `max_steps`; checkpoint every `checkpoint.every_steps` and at the end, or with
        validation on, at every validation (each checkpoint then carries its own held-out loss)."""
        cfg = self.cfg
        # Seeded with the resume step, so a resumed run does not replay the masks it already drew.
        self.generator = torch.Generator().manual_seed(cfg.seed * 1000 + self.rank * 7919 + self.step)
        step_log = StepLog(cfg, self.stage_dir / "logs", self.tracker) if self.rank == 0 else None
        metrics: dict[str, float] = {}
        for rows in self.batches():
            self.inject_failure_if_due()
            self.refresh_proposal_if_due(rows)
            validate = self.validator is not None and self.validator.due(self.step)
            log_step = (self.step + 1) % cfg.log_every == 0 or self.step + 1 == cfg.max_steps or validate
            with profiling.activation_norms(
                self.base, log_step and cfg.profile.norms and step_log is not None
            ) as norms:
                out, grads = self.train_step(rows, log_step)
            self.trace.step(self.step)
            metrics = out.metrics
            if validate:
                metrics.update(self.validation_scores())
            if step_log is not None:
                step_log.count_tokens(metrics["tokens"] * self.world)
                if log_step:
                    step_log.write(self.step, out, grads, self.engine, self.health(norms))
            checkpoint_due = validate if self.validator else self.step % cfg.checkpoint.every_steps == 0
            if checkpoint_due and self.step < cfg.max_steps:
                self.save_checkpoint(metrics)
        if self.validator is not None and "val_loss" not in metrics:  # a resume past the last step
            metrics.update(self.validation_scores())
        self.trace.finish()
        self.save_checkpoint(metrics)

    def validation_scores(self) -> dict[str, float]:
        with profiling.nvtx_range("validation", self.nvtx):
            return self.validator.scores(
                self.engine.module, mask_token_id=self.model_config.mask_token_id,
                eos_token_id=self.tokenizer.eos_token_id,
            )  # fmt: skip

    def health(self, activation_rms: dict[str, float]) -> dict[str, Any]:
        """Activation RMS and weight norms per layer group (rank 0, log steps), and peak memory.
        Weight norms are left out under ZeRO-3, where a rank holds only a partition of each."""
        out: dict[str, Any] = {"peak_memory_mb": profiling.peak_memory_mb()}
        if self.cfg.profile.norms:
            out["activation_rms"] = activation_rms
            if self.cfg.deepspeed.zero_stage < 3:
                out["weight_norm"] = profiling.weight_norms(self.base)
        return out

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        """This worker's rows, one batch at a time, pass after pass over its shard until `max_steps`.
        Each pass is shuffled and length-grouped with seeds of its starting step (reproducible
        after a resume)."""
        cfg = self.cfg
        while self.step < cfg.max_steps:
            groups = self.shard.iter_batches(
                batch_size=cfg.batch_size * cfg.data.group_by_length,
                batch_format="numpy",
                drop_last=False,  # length_grouped drops only the last partial batch
                local_shuffle_buffer_size=cfg.data.shuffle_buffer or None,
                local_shuffle_seed=cfg.seed + self.step if cfg.data.shuffle_buffer else None,
            )
            # Rows within a length band are shuffled per rank; the order of the batches is the same
            # on every rank (see length_grouped).
            row_rng = np.random.default_rng([cfg.seed, self.rank, self.step])
            order_rng = np.random.default_rng([cfg.seed, self.step])
            for rows in length_grouped(groups, cfg.batch_size, row_rng, cfg.data.length_bucket, order_rng):
                if self.step >= cfg.max_steps:
                    return
                yield rows

    def inject_failure_if_due(self) -> None:
        """Testing fault tolerance: rank 0 raises once at `inject_failure_at_step`; the marker file
        keeps the retry, which resumes from an earlier checkpoint, from raising again."""
        if self.cfg.inject_failure_at_step != self.step or self.rank != 0:
            return
        marker = self.stage_dir / ".injected_failure"
        if not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(self.step))
            raise RuntimeError(f"injected worker failure at step {self.step} (testing fault tolerance)")

    def refresh_proposal_if_due(self, rows: dict[str, np.ndarray]) -> None:
        """P-POTS: estimate the proposal of t from the current model at the first step (of this
        run or of a resume) and every `ppots.every_steps`. Every rank estimates (a forward under
        ZeRO-3 is collective), then all take rank 0's, so the ranks sample t alike."""
        spec = self.cfg.diffusion.timesteps
        every = spec.ppots.every_steps
        due = self.proposal is None or (every > 0 and self.step % every == 0)
        if spec.kind != "ppots" or not due:
            return
        proposal, estimate = estimate_proposal(
            self.engine, self.cfg, self.to_batch(rows), self.generator,
            mask_token_id=self.model_config.mask_token_id, encode_images=self.base.encode_images,
            block_size=model_block_size(block_size_at(self.step, self.cfg), self.model_config.attention),
        )  # fmt: skip
        cdf = proposal.cdf.to(self.engine.device)
        if self.world > 1:
            torch.distributed.broadcast(cdf, src=0)
        self.proposal = Proposal(proposal.nodes, cdf.cpu(), proposal.max_is_weight)
        if self.rank == 0:
            record = {"step": self.step, **estimate, "clamped_fraction": self.proposal.clamped_fraction()}
            append_jsonl(self.stage_dir / "logs" / "ppots.jsonl", record)

    def train_step(self, rows: dict[str, np.ndarray], log_step: bool) -> tuple[StepOutput, dict | None]:
        """Forward and objective, backward, optimizer step (DeepSpeed clips, reduces the gradients
        across workers and steps the LR schedule). Returns the step's output and, at a log step,
        the gradient norms by component."""
        from deepspeed.utils import safe_get_full_grad

        with profiling.nvtx_range("forward", self.nvtx):
            out = self.objective_step(rows, log_step)
        self.check_finite(out.metrics["loss"])
        with profiling.nvtx_range("backward", self.nvtx):
            self.engine.backward(out.loss)
        # Between backward and step, which clears the gradients; on every rank (ZeRO-3 gathers).
        grads = gradient_stats(self.base, safe_get_full_grad) if log_step else None
        with profiling.nvtx_range("optimizer", self.nvtx):
            self.engine.step()
        self.step += 1
        return out, grads

    def objective_step(self, rows: dict[str, np.ndarray], log_step: bool) -> StepOutput:
        """The forward and loss of `cfg.objective`."""
        if self.cfg.objective == "ar":
            return ar_training_step(
                self.engine, self.cfg, self.to_batch(rows), encode_images=self.base.encode_images,
                blank_image=self.blank_image,
            )  # fmt: skip
        return training_step(
            self.engine,
            self.cfg,
            self.to_batch(rows),
            self.generator,
            self.prior,
            mask_token_id=self.model_config.mask_token_id,
            encode_images=self.base.encode_images,
            collect_routing=log_step and self.rank == 0,
            blank_image=self.blank_image,
            proposal=self.proposal,
            block_size=model_block_size(block_size_at(self.step, self.cfg), self.model_config.attention),
        )

    def to_batch(self, rows: dict[str, np.ndarray]) -> TrainBatch:
        batch = collate(
            rows,
            pad_id=self.tokenizer.pad_token_id,
            eos_id=self.tokenizer.eos_token_id,
            image_id=self.model_config.image_token_id,
            response_length=self.cfg.data.response_length,
            processor=self.processor,
            image_tokens=self.model_config.num_image_tokens,
            length_quantum=self.cfg.data.length_quantum,
            pack_length=self.cfg.data.pack_length,
        ).to(self.engine.device)
        batch.pixel_values = batch.pixel_values.to(self.dtype)
        return batch

    def check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            raise NonFiniteLossError(
                f"{self.cfg.stage}: non-finite loss ({loss}) at step {self.step + 1}; last good checkpoint "
                f"is step {self.last_checkpoint_step} under {self.stage_dir / 'checkpoints'}. "
                "Lower the learning rate or check the data, then re-run the same command to resume."
            )

    # -- checkpoint and export -------------------------------------------------------------------
    def save_checkpoint(self, metrics: dict[str, float]) -> None:
        """Every rank writes its DeepSpeed shard into a temporary directory that Ray Train copies
        into the run's storage; `metrics` (with the step) become the report's metrics."""
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            self.engine.save_checkpoint(tmp, tag=DS_TAG)
            prior = {k: v.tolist() for k, v in self.prior.state_dict().items()}
            # the reported metrics too: `dimoe tools merge-checkpoints` ranks the kept checkpoints by them
            state = {"step": self.step, "prior": prior, "metrics": metrics}
            write_json(Path(tmp) / rank_state_file(self.rank), state, indent=None)
            if self.world > 1:
                torch.distributed.barrier()
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report({**metrics, "step": self.step}, checkpoint=checkpoint)
        self.last_checkpoint_step = self.step

    def export(self) -> None:
        """HF-format export (config.json, model.safetensors, tokenizer) of the final weights; under
        LoRA also peft's adapter folder, and `final/` holds the merged weights. Then the tracker
        gets the logs and the resolved config, and a CUDA memory snapshot is dumped if asked."""
        import deepspeed

        from dimoe.model.build import save_checkpoint
        from dimoe.train.lora import export_lora

        if final_block_size(self.cfg) is not None:  # the model decodes with the block size it ends on
            self.base.config.block_size = final_block_size(self.cfg)
        params = list(self.engine.module.parameters())
        # Under ZeRO-3 the weights are partitioned: gather them on every rank, save on rank 0.
        zero3 = self.cfg.deepspeed.zero_stage == 3
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
            if self.rank == 0 and self.cfg.lora is not None:
                export_lora(self.engine.module, self.tokenizer, self.stage_dir)
            elif self.rank == 0:
                save_checkpoint(self.base, self.tokenizer, self.stage_dir / "final")
        snapshot = self.stage_dir / "profile" / f"cuda_memory_rank{self.rank}.pickle"
        profiling.dump_memory_snapshot(snapshot, self.cfg.profile.cuda_memory_snapshot)
        if self.tracker is not None:
            self.tracker.log_artifacts(self.stage_dir / "logs")
            self.tracker.log_artifacts(self.stage_dir / "train_config.json")
            self.tracker.finish()


class StepLog:
    """Rank 0's record of a log step: the three JSON-lines logs that `dimoe diag` reads, the Ray
    gauges, and one line for a person. Throughput covers the window since the previous log step."""

    def __init__(self, cfg: TrainConfig, log_dir: Path, tracker: Tracker | None = None) -> None:
        self.cfg = cfg
        self.tracker = tracker
        self.files = JsonlLogger(log_dir)
        self.gauges = RoutingGauges(cfg.stage)
        self.window_start, self.window_tokens = time.perf_counter(), 0.0

    def count_tokens(self, tokens: float) -> None:
        self.window_tokens += tokens

    def write(
        self, step: int, out: StepOutput, grads: dict[str, Any] | None, engine: Any, health: dict[str, Any]
    ) -> None:
        metrics = out.metrics
        elapsed = time.perf_counter() - self.window_start
        record = {
            "step": step,
            **metrics,
            "lr": {g["name"]: g["lr"] for g in engine.optimizer.param_groups if "name" in g},
            "grad_norm": float(engine.get_global_grad_norm() or 0.0),
            "tokens_per_s": self.window_tokens / max(elapsed, 1e-9),
            "supervised_token_fraction": metrics["masked_tokens"] / max(metrics["eligible_tokens"], 1),
            **health,
        }
        self.files.write("train_metrics", record)
        if self.tracker is not None:
            self.tracker.log_metrics(record, step=step)
        routing = {"step": step, "num_buckets": self.cfg.diffusion.num_t_buckets, **out.routing}
        self.files.write("routing_stats", routing)
        self.files.write("gradient_stats", {"step": step, **grads})
        self.gauges.publish(metrics, out.routing)
        log.info(
            "[%s] step %d/%d loss %.4f (%.0f tok/s)",
            self.cfg.stage, step, self.cfg.max_steps, metrics["loss"], record["tokens_per_s"],
        )  # fmt: skip
        self.window_start, self.window_tokens = time.perf_counter(), 0.0
