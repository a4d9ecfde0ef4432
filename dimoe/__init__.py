"""DiMoE-VL: masked-diffusion vision-language model with a Mixture-of-Experts backbone.

`import dimoe` is light (no torch, transformers or ray): the CLI, config tools, Ray Data actors and
Ray workers import it without paying seconds for the model stack. The `transformers` Auto classes
learn `model_type: dimoe_vl` when the model code is imported (any `dimoe.model` module), which is
what `AutoModel.from_pretrained(dir)` and `dimoe.model.build.load_checkpoint` need.
"""

__version__ = "0.1.0"
