"""HF `PretrainedConfig` of DiMoE-VL (`model_type: dimoe_vl`)."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from dimoe.config.model import ModelConfig, image_token_count


class DiMoEConfig(PretrainedConfig):
    model_type = "dimoe_vl"

    def __init__(
        self,
        vocab_size: int = 2048,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int | None = None,
        head_dim: int | None = None,
        num_experts: int = 8,
        num_experts_per_tok: int = 2,
        moe_intermediate_size: int = 128,
        shared_expert_intermediate_size: int = 0,
        norm_topk_prob: bool = True,
        qk_norm: bool = True,
        rope_theta: float = 10000.0,
        max_position_embeddings: int = 512,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        attention: str = "prefix",
        vision_config: dict[str, Any] | None = None,
        vision_feature_layer: int = -1,
        vision_pool_2x2: bool = True,
        mask_token_id: int = 2,
        image_token_id: int = 3,
        pad_token_id: int = 0,
        eos_token_id: int = 1,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads or num_attention_heads
        self.head_dim = head_dim or hidden_size // num_attention_heads
        self.num_experts = num_experts
        self.num_experts_per_tok = num_experts_per_tok
        self.moe_intermediate_size = moe_intermediate_size
        self.shared_expert_intermediate_size = shared_expert_intermediate_size
        self.norm_topk_prob = norm_topk_prob
        self.qk_norm = qk_norm
        self.rope_theta = rope_theta
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        if attention not in ("full", "prefix"):
            raise ValueError(f"attention must be 'full' or 'prefix', got {attention!r}")
        self.attention = attention
        self.vision_config = vision_config
        self.vision_feature_layer = vision_feature_layer
        self.vision_pool_2x2 = vision_pool_2x2
        self.mask_token_id = mask_token_id
        self.image_token_id = image_token_id
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(pad_token_id=pad_token_id, eos_token_id=eos_token_id, **kwargs)

    @property
    def num_image_tokens(self) -> int:
        if not self.vision_config:
            return 0
        vision = self.vision_config
        return image_token_count(vision["image_size"], vision["patch_size"], self.vision_pool_2x2)

    @property
    def image_size(self) -> int:
        return self.vision_config["image_size"] if self.vision_config else 0


def hf_config_from_spec(spec: ModelConfig, token_ids: dict[str, int], vocab_size: int) -> DiMoEConfig:
    """Build the HF config from a validated YAML spec and the tokenizer's special ids."""
    vision = {**spec.vision.siglip_shape(), "vision_use_head": False} if spec.vision is not None else None
    return DiMoEConfig(
        vocab_size=spec.vocab_size or vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        num_experts=spec.num_experts,
        num_experts_per_tok=spec.num_experts_per_tok,
        moe_intermediate_size=spec.moe_intermediate_size,
        shared_expert_intermediate_size=spec.shared_expert_intermediate_size,
        norm_topk_prob=spec.norm_topk_prob,
        qk_norm=spec.qk_norm,
        rope_theta=spec.rope_theta,
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.rms_norm_eps,
        initializer_range=spec.initializer_range,
        attention=spec.attention,
        vision_config=vision,
        vision_feature_layer=spec.vision.feature_layer if spec.vision else -1,
        vision_pool_2x2=spec.vision.pool_2x2 if spec.vision else True,
        **token_ids,
    )
