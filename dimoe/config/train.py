"""Schema of `configs/train/*.yaml`: one curriculum stage (docs/design.md §4)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from dimoe.config.base import StrictModel

GROUPS = ("vision", "projector", "backbone", "router")
# What LoRA can adapt in the backbone: its nn.Linear layers, and the fused expert weights.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
                "experts.gate_up_proj", "experts.down_proj")  # fmt: skip


class GroupSpec(StrictModel):
    train: bool = True
    lr: float = Field(1e-4, ge=0)


class OptimizerSpec(StrictModel):
    """AdamW for every group, or Muon (docs/design.md §4): Muon for the backbone's hidden weight
    matrices (attention, experts, dense and shared MLPs), AdamW with these settings for the rest."""

    name: Literal["adamw", "muon"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    eps: float = 1e-8
    muon_lr: float = Field(0.02, gt=0)  # Muon's step size (its update is orthogonalised, not Adam-scaled)
    muon_momentum: float = Field(0.95, ge=0, lt=1)


class ScheduleSpec(StrictModel):
    kind: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    decay_fraction: float = Field(0.2, gt=0, le=1)  # WSD: the last fraction of steps decays


class PPOTSSpec(StrictModel):
    """P-POTS (`timesteps.kind: ppots`, dimoe/diffusion/ppots.py): how the proposal of t is
    estimated from the current model and fitted."""

    grid_size: int = Field(12, ge=2)  # t points of the estimate, evenly spaced over the band
    num_rows: int = Field(8, ge=1)  # training rows of the estimate (the first batch's, at most)
    num_masks: int = Field(4, ge=1)  # masks per row and t point
    p_model: Literal["smoothed", "beta"] = "smoothed"
    smoothing: int = Field(1, ge=0)  # `smoothed`: ± grid neighbours averaged
    uniform_mix: float = Field(0.05, gt=0, le=1)  # share of U[t_min, t_max]: weights <= 1 / this
    max_is_weight: float = Field(10.0, gt=0)
    every_steps: int = Field(0, ge=0)  # re-estimate every N steps (0: once, at the start)


class TimestepSpec(StrictModel):
    kind: Literal["uniform", "band", "stratified", "logit_normal", "ppots"] = "stratified"
    t_min: float = Field(0.0, ge=0, le=1)
    t_max: float = Field(1.0, ge=0, le=1)
    mean: float = 0.0
    std: float = Field(1.0, gt=0)
    ppots: PPOTSSpec = Field(default_factory=PPOTSSpec)


class BlockScheduleSpec(StrictModel):
    """LLaDA2.0's warmup–stable–decay over block sizes (`diffusion.block_schedule`): block diffusion
    with growing blocks, then full-sequence masked diffusion, then shrinking blocks to the last
    size, which the exported model decodes with. Each phase's sizes share its steps equally."""

    warmup_sizes: list[int] = Field(default_factory=lambda: [32, 64, 128, 256])
    decay_sizes: list[int] = Field(default_factory=lambda: [256, 128, 64, 32])
    phase_ratios: tuple[float, float, float] = (0.3, 0.5, 0.2)

    @model_validator(mode="after")
    def _valid(self) -> BlockScheduleSpec:
        if abs(sum(self.phase_ratios) - 1) > 1e-6 or min(self.phase_ratios) < 0:
            raise ValueError(f"block_schedule.phase_ratios {self.phase_ratios} must be >= 0 and sum to 1")
        if not self.decay_sizes or min(self.warmup_sizes + self.decay_sizes) < 1:
            raise ValueError("block_schedule: decay_sizes must be non-empty and every size >= 1")
        if self.phase_ratios[2] <= 0 or (self.phase_ratios[0] > 0 and not self.warmup_sizes):
            raise ValueError(
                "block_schedule: the decay phase needs a share of the steps (it sets the block size the "
                "model ends on), and a warmup share needs warmup_sizes"
            )
        return self


class DiffusionSpec(StrictModel):
    # Block diffusion (a model with `attention: block`): one block size, or the WSD schedule of
    # sizes (which wins); None for both: masked diffusion over the whole response.
    block_size: int | None = Field(None, gt=0)
    block_schedule: BlockScheduleSpec | None = None
    timesteps: TimestepSpec = Field(default_factory=TimestepSpec)
    num_t_buckets: int = Field(4, ge=1)
    # complementary: t and 1 - t, exact complement masks (EBCMC); independent: t and 1 - t, independent
    # masks; mirror: both at t, masks from reflected uniforms (MIRROR); single: one view
    views: Literal["complementary", "independent", "mirror", "single"] = "complementary"
    loss_weight: Literal["elbo", "uniform"] = "elbo"
    loss_norm: Literal["token", "sequence", "batch"] = "sequence"
    include_prompt_ratio: float = Field(0.0, ge=0, le=1)
    mask_eps: float = Field(1e-3, gt=0, lt=1)
    # Loss weight of the EOS tokens that pad an answer past its own EOS. 1.0 is LLaDA's SFT recipe
    # (padding EOS are ordinary supervised tokens). A one-word answer padded to 32 is then 31/32
    # trivially predictable padding: from scratch that padding signal delays the image-conditioned
    # answer by hundreds of steps, so the tiny profile lowers it. The answer's own EOS keeps weight 1.
    eos_padding_weight: float = Field(1.0, ge=0, le=1)


class LossSpec(StrictModel):
    lambda_bal: float = Field(0.01, ge=0)
    stratified_balance: bool = True  # False: one global Switch balance loss (the naive baseline)
    lambda_z: float = Field(1e-3, ge=0)
    lambda_prior: float = Field(0.0, ge=0)
    prior_momentum: float = Field(0.99, ge=0, lt=1)
    lambda_cons: float = Field(0.0, ge=0)
    lambda_cap: float = Field(0.0, ge=0)


class DataSpec(StrictModel):
    data_dir: str = "artifacts/data/v1"
    blend: str = "stage2_full"
    # parquet: <data_dir>/blends/<blend>/*.parquet; webdataset: the shards `dimoe data build-wds`
    # wrote to <data_dir>/webdataset/<blend>/ (with their images).
    format: Literal["parquet", "webdataset"] = "parquet"
    response_length: int = Field(
        32, ge=1
    )  # each row's answer is EOS-padded to this (LLaDA SFT), so decoding learns to stop
    shuffle_buffer: int = Field(256, ge=0)
    # Rows are drawn `group_by_length` batches at a time, sorted by length and cut into batches
    # served in random order, so short VQA rows are not padded to a long description (1: off).
    group_by_length: int = Field(1, ge=1)
    # The sort is by `length_bucket`-token band, in random order within a band: sorted by exact
    # length, rows of one template (each VQA question type has its own length) fill whole batches,
    # and a from-scratch model then never learns the types side by side.
    length_bucket: int = Field(32, ge=1)
    # Quantized effective length: a batch is left-padded to a multiple of this many tokens, so a run
    # sees few distinct shapes (compiled kernels, CUDA graphs; 1: off)
    length_quantum: int = Field(1, ge=1)
    # Plain-text documents (no prompt, no image) of a batch are packed into rows of up to this many
    # tokens, each document attending only to itself with its own positions (0: off). A packed row
    # is one sample of the loss (one t, one `sequence` normaliser), as in LLaDA's pretraining
    pack_length: int = Field(0, ge=0)


class DeepSpeedSpec(StrictModel):
    zero_stage: int = Field(2, ge=0, le=3)
    bf16: bool = False
    extra: dict[str, Any] = Field(default_factory=dict)  # merged into the generated DeepSpeed config


class ScalingSpec(StrictModel):
    num_workers: int = Field(2, ge=0)  # 0 = run the loop in-process (fast unit tests)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)


class CheckpointSpec(StrictModel):
    every_steps: int = Field(50, ge=1)
    keep: int = Field(2, ge=1)  # with validation on: the `keep` of lowest held-out loss, else the latest


class LoraSpec(StrictModel):
    """LoRA adapters through peft (docs/design.md §4). `target_modules` names nn.Linear layers
    (q_proj, k_proj, v_proj, o_proj; gate_proj, up_proj, down_proj of dense and shared MLPs) and
    the fused expert weights `experts.gate_up_proj` / `experts.down_proj` (peft's
    target_parameters, one rank-r pair per expert)."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)  # peft refuses dropout on the fused expert weights
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    @model_validator(mode="after")
    def _known_targets(self) -> LoraSpec:
        unknown = sorted(set(self.target_modules) - set(LORA_TARGETS))
        if unknown or not self.target_modules:
            raise ValueError(
                f"lora.target_modules: unknown {unknown or 'empty list'}; "
                f"choose from {', '.join(LORA_TARGETS)}"
            )
        return self


class ValidationSpec(StrictModel):
    """Held-out loss during training (docs/design.md §4): `fraction` of the blend's rows, chosen by
    a hash of each row's `origin`, never train; every `every_steps` the loss on (at most
    `max_rows` of) them at a fixed t grid with fixed masks."""

    every_steps: int = Field(0, ge=0)  # 0: off
    fraction: float = Field(0.05, gt=0, lt=1)
    max_rows: int = Field(64, ge=1)
    t_grid: list[float] = Field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    decode_rows: int = Field(0, ge=0)  # > 0: also exact match of a quick greedy decode on these rows
    decode_steps: int = Field(8, ge=1)


class TrackingSpec(StrictModel):
    """Experiment tracking through Ray's MLflow / W&B integrations (docs/design.md §8)."""

    backend: Literal["none", "mlflow", "wandb"] = "none"
    # mlflow: a tracking URI (server or file:); default a file store at <output_dir>/mlruns
    tracking_uri: str | None = None
    experiment: str = "dimoe"
    project: str = "dimoe"  # wandb; offline mode when WANDB_API_KEY is not set


class ProfileSpec(StrictModel):
    """Profiling and health (docs/design.md §8); NVTX and CUDA memory are no-ops on CPU."""

    nvtx: bool = False  # or DIMOE_NVTX=1
    trace_steps: int = Field(0, ge=0)  # a torch.profiler trace of this many steps (0: none)
    trace_start: int = Field(2, ge=0)  # after this many steps (warm-up)
    cuda_memory_snapshot: bool = False  # record CUDA allocations and dump a snapshot at the end
    norms: bool = True  # activation and weight norms per layer group at log steps


class TrainConfig(StrictModel):
    stage: str
    output_dir: str = "artifacts/train"
    model: str | None = "configs/model/tiny.yaml"  # model config for a fresh init (with `tokenizer`)
    tokenizer: str | None = None
    init_from: str | None = None  # checkpoint dir (HF format) of the previous stage or pretrained parts
    # Train init_from's vision tower at this image size (position embeddings interpolated, the
    # image-token count following; rows normalized for another count are resized in the batch):
    # the resolution ablation (configs/tune/ablations.yaml, res_384 / res_768).
    vision_image_size: int | None = Field(None, gt=0)
    requires_init: bool = False  # stages that continue a previous stage refuse to start from scratch
    groups: dict[str, GroupSpec] = Field(default_factory=lambda: {g: GroupSpec() for g in GROUPS})
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    max_steps: int = Field(100, ge=1)
    batch_size: int = Field(8, ge=1)  # samples per worker per micro-step (each gives 1 or 2 views)
    grad_accum: int = Field(1, ge=1)
    grad_clip: float = Field(1.0, ge=0)
    # diffusion: masked diffusion (docs/design.md §4); ar: next-token loss, for a `causal` model
    objective: Literal["diffusion", "ar"] = "diffusion"
    diffusion: DiffusionSpec = Field(default_factory=DiffusionSpec)
    losses: LossSpec = Field(default_factory=LossSpec)
    data: DataSpec = Field(default_factory=DataSpec)
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    lora: LoraSpec | None = None  # LoRA on the backbone (its base weights frozen); None: full training
    gradient_checkpointing: bool = False  # recompute each decoder layer's activations in the backward
    validation: ValidationSpec = Field(default_factory=ValidationSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    profile: ProfileSpec = Field(default_factory=ProfileSpec)
    max_failures: int = Field(1, ge=0)
    log_every: int = Field(10, ge=1)
    seed: int = 0
    inject_failure_at_step: int | None = None  # testing fault tolerance: worker 0 raises once at this step

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        unknown = set(self.groups) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown parameter group(s) {sorted(unknown)}; groups are {', '.join(GROUPS)}")
        if not any(g.train for g in self.groups.values()):
            raise ValueError(
                "every parameter group is frozen: set groups.<name>.train: true for at least one"
            )
        t = self.diffusion.timesteps
        if t.t_min >= t.t_max:
            raise ValueError(f"diffusion.timesteps: t_min {t.t_min} must be below t_max {t.t_max}")
        if self.objective == "ar" and self.validation.decode_rows:
            raise ValueError(
                "validation.decode_rows scores a diffusion decode; an `objective: ar` run has none"
            )
        if self.diffusion.views == "single" and self.losses.lambda_cons > 0:
            raise ValueError(
                "losses.lambda_cons needs two views: set diffusion.views to complementary, independent "
                "or mirror"
            )
        return self

    def group(self, name: str) -> GroupSpec:
        return self.groups.get(name, GroupSpec())


class TextTowerSpec(StrictModel):
    """The SigLIP text tower that pretraining pairs with the vision tower (discarded afterwards)."""

    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(2, gt=0)
    max_length: int = Field(64, gt=0)  # captions are padded/truncated to this many tokens


class VisionPretrainConfig(StrictModel):
    """Schema of `configs/vision_pretrain/*.yaml`: SigLIP pretraining of a small vision tower."""

    model: str = "configs/model/tiny.yaml"  # the vision tower's architecture comes from its `vision:`
    tokenizer: str = "artifacts/data/demo/tokenizer"
    data_dir: str = "artifacts/data/v1"
    source: str = "stage1_projector"  # normalized source whose train-split (image, response) pairs are used
    out_dir: str = "artifacts/models/tiny-siglip"
    text: TextTowerSpec = Field(default_factory=TextTowerSpec)
    steps: int = Field(400, ge=1)
    batch_size: int = Field(64, ge=2)  # the sigmoid loss needs negatives: every other pair in the batch
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(20, ge=0)
    log_every: int = Field(50, ge=1)
    seed: int = 0
