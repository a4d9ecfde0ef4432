"""Build, save and load DiMoE-VL checkpoints (HF-format directory with the tokenizer inside)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel, GenerationConfig, PreTrainedTokenizerBase

from dimoe.config.infer import InferConfig
from dimoe.config.loader import load_config
from dimoe.config.model import ModelConfig
from dimoe.data.tokenizer import ADDED_TOKENS_ATTR, load_tokenizer, special_token_ids
from dimoe.errors import UserError
from dimoe.model.config import DiMoEConfig, hf_config_from_spec
from dimoe.model.hf_quiet import quiet_transformers
from dimoe.model.importers import (
    backbone_spec_from_llada,
    import_llada_backbone,
    import_siglip_vision,
    vision_spec_from_siglip,
)
from dimoe.model.modeling import DiMoEVLModel
from dimoe.model.processor import DiMoEProcessor, siglip_processor


def build_model(
    spec: ModelConfig,
    tokenizer: PreTrainedTokenizerBase,
    *,
    backbone_from: str | Path | None = None,
    vision_from: str | Path | None = None,
    seed: int = 0,
) -> DiMoEVLModel:
    """A DiMoE-VL model: random init from `spec`, or assembled from pretrained parts whose
    architecture then overrides the spec's backbone / vision fields."""
    if backbone_from is not None:
        spec = backbone_spec_from_llada(backbone_from, spec)
    vision_from = vision_from or (spec.vision.pretrained_dir if spec.vision else None)
    if vision_from is not None:
        if spec.vision is None:
            raise ValueError("--vision-from given but the model config has `vision: null`")
        spec = spec.model_copy(update={"vision": vision_spec_from_siglip(vision_from, spec.vision)})
    vocab = max(len(tokenizer), spec.vocab_size or 0)
    config = hf_config_from_spec(
        spec.model_copy(update={"vocab_size": vocab}), special_token_ids(tokenizer), vocab
    )
    torch.manual_seed(seed)
    model = DiMoEVLModel(config)
    if backbone_from is not None:
        added = tokenizer.convert_tokens_to_ids(getattr(tokenizer, ADDED_TOKENS_ATTR, []))
        import_llada_backbone(model, backbone_from, added)
    if vision_from is not None:
        import_siglip_vision(model, vision_from)
    return model


def save_checkpoint(model: DiMoEVLModel, tokenizer: PreTrainedTokenizerBase, out_dir: str | Path) -> Path:
    """An HF directory that loads anywhere: weights and config.json with `auto_map` and the
    modeling code beside them, the tokenizer (with its chat template), the processor
    (`processor_config.json`, `preprocessor_config.json`) and `generation_config.json`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with quiet_transformers():
        model.save_pretrained(str(out), safe_serialization=True)
        tokenizer.save_pretrained(str(out))
        if model.config.vision_config:
            image_processor = siglip_processor(model.config.image_size)
            image_processor.save_pretrained(str(out))
            processor = DiMoEProcessor(image_processor, tokenizer, model.config.num_image_tokens)
            processor.save_pretrained(str(out))
    generation_config(model.config).save_pretrained(str(out))
    return out


SAMPLING_FIELDS = ("temperature", "top_k", "top_p")  # HF refuses them without do_sample


def generation_config(config: DiMoEConfig) -> GenerationConfig:
    """The default decoding preset of configs/infer/default.yaml, in HF's generation_config.json
    (the diffusion fields are extra keys; `max_new_tokens` is the generation length)."""
    infer = load_config("configs/infer/default.yaml", InferConfig)
    preset = infer.resolve(None)
    greedy = preset.temperature == 0
    return GenerationConfig(
        max_new_tokens=preset.gen_length,
        do_sample=not greedy,
        mask_token_id=config.mask_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        preset=infer.default_preset,
        **preset.model_dump(exclude={"seed", *(SAMPLING_FIELDS if greedy else ())}),
    )


def load_checkpoint(
    path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[DiMoEVLModel, PreTrainedTokenizerBase]:
    """Load a checkpoint directory (model + tokenizer) in eval mode."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"checkpoint not found: {path} has no config.json (expected an HF-format directory written by "
            "`dimoe model init` or `dimoe train run`)"
        )
    with quiet_transformers():  # no progress bar per load (eval and Serve replicas load often)
        model, info = AutoModel.from_pretrained(
            str(path), dtype=dtype or torch.float32, output_loading_info=True
        )
    if not isinstance(model, DiMoEVLModel):
        raise UserError(f"{path} holds a {type(model).__name__}, not a DiMoE-VL model (model_type dimoe_vl)")
    damaged = {kind: sorted(info[kind])[:5] for kind in ("missing_keys", "mismatched_keys") if info[kind]}
    if damaged:
        raise UserError(f"{path}: the weights do not match config.json: {damaged}")
    return model.to(device).eval(), load_tokenizer(path)
