"""Schema of `configs/model/*.yaml`: the DiMoE-VL architecture (docs/design.md §3)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dimoe.config.base import StrictModel


def image_token_count(image_size: int, patch_size: int, pool_2x2: bool) -> int:
    """SigLIP's patch convolution floors the grid; 2×2 pooling rounds up (27×27 → 14×14)."""
    grid = image_size // patch_size
    return ((grid + 1) // 2) ** 2 if pool_2x2 else grid**2


class VisionConfig(StrictModel):
    """SigLIP vision tower + 2-layer GELU projector."""

    image_size: int = Field(32, gt=0)
    patch_size: int = Field(4, gt=0)
    hidden_size: int = Field(64, gt=0)
    intermediate_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(2, gt=0)
    num_attention_heads: int = Field(2, gt=0)
    feature_layer: int = -1  # index into SigLIP's hidden states (-1 = last, -2 = LLaVA's choice)
    pool_2x2: bool = True  # average-pool the patch grid 2×2: 4× fewer image tokens
    pretrained_dir: str | None = None  # local SigLIP directory; None = random init from the fields above

    @property
    def num_image_tokens(self) -> int:
        return image_token_count(self.image_size, self.patch_size, self.pool_2x2)

    def siglip_shape(self) -> dict[str, int]:
        """The tower's shape as `SiglipVisionConfig` fields."""
        return {
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
        }


class ModelConfig(StrictModel):
    """Backbone in the LLaDA-MoE / OLMoE layout, bidirectional, plus the vision tower."""

    name: str = "dimoe-vl"
    vocab_size: int | None = Field(None, gt=0)  # None = taken from the tokenizer
    hidden_size: int = Field(128, gt=0)
    num_hidden_layers: int = Field(4, gt=0)
    num_attention_heads: int = Field(4, gt=0)
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    num_experts: int = Field(8, gt=0)
    num_experts_per_tok: int = Field(2, gt=0)
    moe_intermediate_size: int = Field(128, gt=0)
    shared_expert_intermediate_size: int = Field(0, ge=0)  # 0 = no shared expert
    norm_topk_prob: bool = True
    # A learned-offline bias added to the router's probabilities before top-k, which also enters the
    # gates (LLaDA-MoE's `moe_router_enable_expert_bias`); a buffer, not trained by the optimizer.
    router_expert_bias: bool = False
    # Layers whose FFN is one dense SwiGLU of `dense_intermediate_size` instead of the MoE block
    # (LLaDA-MoE's `moe_layer_freq` zeros; every layer for a dense LLaDA-8B backbone).
    dense_layers: list[int] = Field(default_factory=list)
    dense_intermediate_size: int = Field(0, ge=0)
    # Expert dispatch (dimoe/model/moe.py): auto = one grouped GEMM per projection where
    # torch._grouped_mm runs, else the per-expert loop; grouped / loop force one. Same outputs.
    moe_dispatch: Literal["auto", "grouped", "loop"] = "auto"
    qk_norm: bool = True
    attention_bias: bool = False  # biases on the q/k/v projections (Qwen2's layout)
    rope_theta: float = 10000.0
    partial_rotary_factor: float = Field(1.0, gt=0.0, le=1.0)  # RoPE on the leading fraction of head dims
    max_position_embeddings: int = Field(512, gt=0)
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    # full / prefix: the diffusion masks (docs/design.md §3); causal: an AR model's (objective: ar,
    # and a converted causal LM before its diffusion training); block: LLaDA2.0's block diffusion,
    # the response cut into blocks of `block_size`, each seeing the prompt, earlier blocks and itself
    attention: Literal["full", "prefix", "causal", "block"] = "prefix"
    block_size: int = Field(32, gt=0)
    vision: VisionConfig | None = Field(default_factory=VisionConfig)  # None = text-only model

    @model_validator(mode="after")
    def _shapes_fit(self) -> ModelConfig:
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_experts={self.num_experts}"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be divisible by num_attention_heads (or set head_dim)")
        kv = self.num_key_value_heads or self.num_attention_heads
        if self.num_attention_heads % kv:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        outside = [i for i in self.dense_layers if not 0 <= i < self.num_hidden_layers]
        if outside:
            raise ValueError(
                f"dense_layers {outside} are not layers of a {self.num_hidden_layers}-layer model"
            )
        if self.dense_layers and not self.dense_intermediate_size:
            raise ValueError("dense_layers need dense_intermediate_size > 0")
        return self
