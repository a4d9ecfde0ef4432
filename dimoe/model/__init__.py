"""DiMoE-VL model: MoE backbone, vision tower, HF integration, parameter accounting.

Python imports this package before any `dimoe.model.*` module, so registering the `transformers`
Auto classes here means `AutoModel.from_pretrained(dir)` resolves `model_type: dimoe_vl` wherever
the model code is loaded, while `import dimoe` itself stays free of torch and transformers.
"""

from transformers import AutoConfig, AutoModel

from dimoe.model.config import DiMoEConfig, hf_config_from_spec
from dimoe.model.modeling import DiMoEOutput, DiMoEVLModel, PrefixCache

# exist_ok: a reloaded module (importlib.reload, notebooks) registers its fresh classes again.
AutoConfig.register(DiMoEConfig.model_type, DiMoEConfig, exist_ok=True)
AutoModel.register(DiMoEConfig, DiMoEVLModel, exist_ok=True)

__all__ = [
    "DiMoEConfig",
    "DiMoEOutput",
    "DiMoEVLModel",
    "PrefixCache",
    "hf_config_from_spec",
]
