"""DiMoE-VL model: MoE backbone, vision tower, HF integration, parameter accounting."""

from dimoe.model.config import DiMoEConfig, hf_config_from_spec
from dimoe.model.modeling import DiMoEOutput, DiMoEVLModel, PrefixCache


def register_auto_classes() -> None:
    """Make `AutoConfig`/`AutoModel` resolve `model_type: dimoe_vl` to these classes."""
    from transformers import AutoConfig, AutoModel

    try:
        AutoConfig.register(DiMoEConfig.model_type, DiMoEConfig)
        AutoModel.register(DiMoEConfig, DiMoEVLModel)
    except ValueError:  # already registered (re-import in the same process)
        pass


__all__ = [
    "DiMoEConfig",
    "DiMoEOutput",
    "DiMoEVLModel",
    "PrefixCache",
    "hf_config_from_spec",
    "register_auto_classes",
]
