"""HF `PreTrainedConfig` of DiMoE-VL (`model_type: dimoe_vl`).

The architecture fields are declared once, in the YAML schema `dimoe.config.model.ModelConfig`
(docs/design.md §3): this config takes their names, defaults and validation from it, and adds only
what a checkpoint needs beyond the schema (vocabulary size, special token ids, the SigLIP tower
shape as the dict `vision_config`, the number of image tokens).

Every saved checkpoint ships a copy of this file with the modeling code (`auto_map`,
`trust_remote_code`). Loaded that way, without the `dimoe` package, the schema is unavailable and
the fields come as stored in config.json, which holds every one of them.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

try:  # the library: fields named, defaulted and validated by the YAML schema
    from dimoe.config.model import ModelConfig, VisionConfig, image_token_count
except ImportError:  # a checkpoint's copy of this file, loaded by transformers without dimoe
    ModelConfig = VisionConfig = image_token_count = None

# Schema fields that are not config.json keys: `name` only labels the YAML file, and the vision
# tower is stored as `vision_config` + `vision_feature_layer` + `vision_pool_2x2`.
SCHEMA_ONLY_FIELDS = frozenset({"name", "vision"})
BACKBONE_FIELDS = (
    tuple(name for name in ModelConfig.model_fields if name not in SCHEMA_ONLY_FIELDS) if ModelConfig else ()
)


class DiMoEConfig(PreTrainedConfig):
    """Keyword arguments named like `ModelConfig` fields (`hidden_size`, `num_experts`, `attention`,
    …) default to and are validated by that schema; a bad value raises pydantic's
    `ValidationError` (a `ValueError`)."""

    model_type = "dimoe_vl"

    def __init__(
        self,
        *,
        vocab_size: int = 2048,  # the schema leaves it to the tokenizer; a bare config needs a number
        vision_config: dict[str, Any] | None = None,  # `SiglipVisionConfig` kwargs; None = text-only
        vision_feature_layer: int | None = None,  # None: the schema's default
        vision_pool_2x2: bool | None = None,  # None: the schema's default
        num_image_tokens: int | None = None,  # None: computed from vision_config
        mask_token_id: int = 2,
        image_token_id: int = 3,
        pad_token_id: int = 0,
        eos_token_id: int = 1,
        tie_word_embeddings: bool = False,  # the LM head is trained separately from the embedding
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        if ModelConfig is not None:
            self._set_backbone(kwargs)
            defaults = VisionConfig()
            vision_feature_layer = (
                defaults.feature_layer if vision_feature_layer is None else vision_feature_layer
            )
            vision_pool_2x2 = defaults.pool_2x2 if vision_pool_2x2 is None else vision_pool_2x2
            if num_image_tokens is None:
                shape = vision_config or {}
                num_image_tokens = (
                    image_token_count(shape["image_size"], shape["patch_size"], vision_pool_2x2)
                    if shape
                    else 0
                )
        self.vision_config = vision_config
        self.vision_feature_layer = vision_feature_layer
        self.vision_pool_2x2 = vision_pool_2x2
        self.num_image_tokens = num_image_tokens
        self.mask_token_id = mask_token_id
        self.image_token_id = image_token_id
        super().__init__(
            pad_token_id=pad_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    def _set_backbone(self, kwargs: dict[str, Any]) -> None:
        """Take the backbone fields out of `kwargs`, validated and defaulted by the schema."""
        given = {name: kwargs.pop(name) for name in BACKBONE_FIELDS if name in kwargs}
        spec = ModelConfig.model_validate({**given, "vocab_size": self.vocab_size, "vision": None})
        for name in BACKBONE_FIELDS:
            setattr(self, name, getattr(spec, name))
        # Stored resolved, so a checkpoint's shapes never depend on these defaulting rules.
        self.num_key_value_heads = spec.num_key_value_heads or spec.num_attention_heads
        self.head_dim = spec.head_dim or spec.hidden_size // spec.num_attention_heads

    @property
    def num_moe_layers(self) -> int:
        return self.num_hidden_layers - len(self.dense_layers)

    @property
    def image_size(self) -> int:
        return self.vision_config["image_size"] if self.vision_config else 0


def hf_config_from_spec(spec: ModelConfig, token_ids: dict[str, int], vocab_size: int) -> DiMoEConfig:
    """Build the HF config from a validated YAML spec and the tokenizer's special ids; `vocab_size`
    is used when the spec leaves it unset."""
    backbone = {**spec.model_dump(include=set(BACKBONE_FIELDS)), "vocab_size": spec.vocab_size or vocab_size}
    vision = spec.vision
    if vision is None:
        return DiMoEConfig(**backbone, **token_ids)
    return DiMoEConfig(
        **backbone,
        # SigLIP's pooling head is unused: the projector reads a hidden layer instead.
        vision_config={**vision.siglip_shape(), "vision_use_head": False},
        vision_feature_layer=vision.feature_layer,
        vision_pool_2x2=vision.pool_2x2,
        **token_ids,
    )
