"""The DeepSpeed engine of a stage: parameter groups (frozen groups left out), the DeepSpeed
config, and the optimizer — AdamW, or Muon for the hidden matrices with AdamW for the rest.

Muon (Jordan et al. 2024; Liu et al. 2025, arXiv:2502.16982) replaces a matrix's update by the
orthogonalised momentum (Newton–Schulz), so it needs each whole matrix. Which optimizer runs:

- ZeRO-0: `MuonWithAdamW`, a client optimizer built on torch's own Muon (`torch.optim._muon.muon`,
  the functional form of `torch.optim.Muon`) and `torch.optim.AdamW`.
- ZeRO-1/2/3: torch's Muon cannot be the client optimizer there, because ZeRO hands the client
  optimizer flat 1-D fp32 partitions that cut across matrices, so no rank holds a whole matrix to
  orthogonalise. DeepSpeed's own Muon (`optimizer.type: Muon`, `deepspeed.runtime.zero.muon`)
  orthogonalises each matrix's gradient before it is partitioned, so that one runs instead,
  with the same split of parameters between Muon and AdamW.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from dimoe.config.train import GROUPS, TrainConfig
from dimoe.train.schedule import lr_multiplier


def uses_muon(group: str, name: str, param: torch.nn.Parameter) -> bool:
    """Muon takes the backbone's hidden weight matrices (attention, experts, dense and shared MLPs,
    LoRA factors); embeddings, LM head, norms, the router and the vision side stay on AdamW."""
    return group == "backbone" and param.ndim >= 2 and "embed_tokens" not in name and "lm_head" not in name


def optimizer_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """One optimizer group per trained parameter group (under Muon, the backbone's matrices form a
    group of their own at `muon_lr`). Frozen groups get requires_grad=False and are left out of
    the optimizer entirely (no state); under LoRA only the adapters of the backbone train."""
    from dimoe.train.lora import is_lora_parameter

    muon = cfg.optimizer.name == "muon"
    groups = []
    for name, members in _parameter_groups(model).items():
        spec = cfg.group(name)
        for param_name, param in members:
            adapter_only = cfg.lora is not None and name == "backbone"
            param.requires_grad_(spec.train and (not adapter_only or is_lora_parameter(param_name)))
            param.use_muon = muon and uses_muon(name, param_name, param)
        trained = [p for _, p in members if p.requires_grad]
        for use_muon in (True, False) if muon else (False,):
            params = [p for p in trained if p.use_muon is use_muon]
            if params:
                lr = cfg.optimizer.muon_lr if use_muon else spec.lr
                groups.append({"params": params, "lr": lr, "name": f"{name}_muon" if use_muon else name})
    return groups


def _parameter_groups(model: torch.nn.Module) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """The model's named groups, through a peft wrapper if there is one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.parameter_groups()


def deepspeed_config(cfg: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config of a stage, with `deepspeed.extra` merged over it (dicts key by key).
    Muon under ZeRO-0 is a client optimizer, so the config then names none."""
    base_lr = max((cfg.group(g).lr for g in GROUPS if cfg.group(g).train), default=1e-4)
    opt = cfg.optimizer
    adam = {"lr": base_lr, "betas": list(opt.betas), "eps": opt.eps, "weight_decay": opt.weight_decay}
    # DeepSpeed's fused Adam needs CUDA; torch's AdamW runs everywhere.
    adam["torch_adam"] = not cfg.scaling.use_gpu
    ds: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": cfg.deepspeed.bf16},
        "optimizer": {"type": "AdamW", "params": adam},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if opt.name == "muon" and cfg.deepspeed.zero_stage == 0:
        del ds["optimizer"]
    elif opt.name == "muon":
        muon = {"momentum": opt.muon_momentum, "muon_lr": opt.muon_lr, "adam_lr": base_lr}
        ds["optimizer"] = {"type": "Muon", "params": {**adam, **muon}}
    for key, value in cfg.deepspeed.extra.items():
        ds[key] = {**ds[key], **value} if isinstance(value, dict) and isinstance(ds.get(key), dict) else value
    return ds


def build_engine(cfg: TrainConfig, model: torch.nn.Module) -> Any:
    """The DeepSpeed engine: per-group learning rates, each scaled by the stage's LR schedule."""
    import deepspeed  # imported in the worker: importing it on the driver can fail on some installs

    groups = optimizer_groups(model, cfg)
    client = None
    if cfg.optimizer.name == "muon" and cfg.deepspeed.zero_stage == 0:
        client = MuonWithAdamW(groups, cfg)
    with _keep_muon_tags(model):
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=None if client else groups,
            optimizer=client,
            config=deepspeed_config(cfg),
            lr_scheduler=lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_multiplier(s, cfg)),
        )
    return engine


@contextlib.contextmanager
def _keep_muon_tags(model: torch.nn.Module) -> Iterator[None]:
    """DeepSpeed's Muon tags every ≥2-D parameter outside embeddings and LM head as a Muon one
    (`deepspeed.set_optimizer_flags`), router and vision included; put `uses_muon`'s tags back
    right after it, before the optimizer reads them."""
    import deepspeed

    tags = {id(p): getattr(p, "use_muon", False) for p in model.parameters()}
    original = deepspeed.set_optimizer_flags

    def flags_then_ours(config_class: Any, module: torch.nn.Module) -> None:
        original(config_class, module)
        for p in module.parameters():
            p.use_muon = tags.get(id(p), False)

    deepspeed.set_optimizer_flags = flags_then_ours
    try:
        yield
    finally:
        deepspeed.set_optimizer_flags = original


class MuonWithAdamW(torch.optim.Optimizer):
    """torch's Muon on the groups `optimizer_groups` marked Muon, torch's AdamW on the others, as
    one optimizer (DeepSpeed and the LR schedule see one list of groups). A fused expert weight
    [E, out, in] is E matrices: each expert's update is orthogonalised on its own."""

    def __init__(self, groups: list[dict[str, Any]], cfg: TrainConfig) -> None:
        opt = cfg.optimizer
        for group in groups:
            group["use_muon"] = group["params"][0].use_muon
            group.setdefault("weight_decay", opt.weight_decay)
        super().__init__(groups, {"momentum": opt.muon_momentum})
        adam_groups = [g for g in self.param_groups if not g["use_muon"]]
        self.adamw = torch.optim.AdamW(adam_groups, betas=opt.betas, eps=opt.eps) if adam_groups else None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, DEFAULT_NS_STEPS, muon

        for group in self.param_groups:
            if not group["use_muon"]:
                continue
            params, grads, buffers = [], [], []
            for p in (p for p in group["params"] if p.grad is not None):
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buffer = self.state[p]["momentum_buffer"]
                params += p.unbind(0) if p.ndim == 3 else [p]  # views: updates land in `p`
                grads += p.grad.unbind(0) if p.ndim == 3 else [p.grad]
                buffers += buffer.unbind(0) if p.ndim == 3 else [buffer]
            muon(
                params, grads, buffers, lr=group["lr"], weight_decay=group["weight_decay"],
                momentum=group["momentum"], nesterov=True, ns_coefficients=(DEFAULT_A, DEFAULT_B, DEFAULT_C),
                ns_steps=DEFAULT_NS_STEPS, eps=1e-7, adjust_lr_fn="original", has_complex=False,
            )  # fmt: skip
        if self.adamw is not None:
            self.adamw.step()

    def state_dict(self) -> dict[str, Any]:
        return {"muon": super().state_dict(), "adamw": self.adamw.state_dict() if self.adamw else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict["muon"])
        if self.adamw is not None:
            self.adamw.load_state_dict(state_dict["adamw"])
            # Both loads rebuild their group dicts: share the AdamW ones again, so the LR schedule
            # (which writes this optimizer's groups) reaches AdamW.
            self.adamw.param_groups = [g for g in self.param_groups if not g["use_muon"]]
