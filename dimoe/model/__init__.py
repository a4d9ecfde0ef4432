"""DiMoE-VL model: MoE backbone, vision tower, HF integration, parameter accounting.

Python imports this package before any `dimoe.model.*` module, so registering the `transformers`
Auto classes here means `AutoModel.from_pretrained(dir)` resolves `model_type: dimoe_vl` wherever
the model code is loaded, while `import dimoe` itself stays free of torch and transformers.
"""

from transformers import AutoConfig, AutoModel

from dimoe.model.config import DiMoEConfig, hf_config_from_spec
from dimoe.model.modeling import DiMoEOutput, DiMoEVLModel, PrefixCache
from dimoe.model.processor import DiMoEProcessor

# exist_ok: a reloaded module (importlib.reload, notebooks) registers its fresh classes again.
AutoConfig.register(DiMoEConfig.model_type, DiMoEConfig, exist_ok=True)
AutoModel.register(DiMoEConfig, DiMoEVLModel, exist_ok=True)
# Saving then writes `auto_map` and copies each class's module with the modules it imports
# relatively: checkpoints load with `trust_remote_code=True` where dimoe is not installed.
DiMoEConfig.register_for_auto_class()
DiMoEVLModel.register_for_auto_class("AutoModel")
DiMoEProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "DiMoEConfig",
    "DiMoEOutput",
    "DiMoEProcessor",
    "DiMoEVLModel",
    "PrefixCache",
    "hf_config_from_spec",
]
