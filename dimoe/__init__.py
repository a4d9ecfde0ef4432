"""DiMoE-VL: masked-diffusion vision-language model with a Mixture-of-Experts backbone.

Importing the package registers the model with the `transformers` Auto classes
(`model_type: dimoe_vl`), so `AutoModel.from_pretrained(dir)` works on any saved checkpoint.
"""

__version__ = "0.1.0"

from dimoe.model import register_auto_classes as _register

_register()
