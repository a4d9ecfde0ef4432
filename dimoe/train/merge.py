"""Top-k checkpoint merge (LLaDA2.0's post-training step): the element-wise mean of the weights of
the K checkpoints of a run that score best on a reported metric (held-out loss by default),
written as an ordinary checkpoint.

A run's checkpoints are the ones Ray Train kept under `<stage>/checkpoints/checkpoint_*/`: each
holds DeepSpeed's files under the tag `ds` and `trainer_state.json` with the step and the metrics
reported with it. Under ZeRO-1/2/3 the weights are read as DeepSpeed's fp32 master copy
(`zero_to_fp32`), under ZeRO-0 from the module's own state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from dimoe.errors import UserError
from dimoe.io import read_json, write_json

MERGE_FILE = "merge.json"


def ranked_checkpoints(stage_dir: Path, metric: str, mode: str = "min") -> list[tuple[float, Path, int]]:
    """(metric value, folder, step) of every kept checkpoint of the stage that reported `metric`,
    best first."""
    from dimoe.train.loop import DS_TAG, STATE_FILE

    found = []
    for state_file in sorted((stage_dir / "checkpoints").glob(f"checkpoint_*/{STATE_FILE}")):
        state = read_json(state_file)
        value = state.get("metrics", {}).get(metric)
        if value is not None and (state_file.parent / DS_TAG).is_dir():
            found.append((float(value), state_file.parent, int(state["step"])))
    return sorted(found, key=lambda item: item[0], reverse=mode == "max")


def checkpoint_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of one Ray Train checkpoint of the trainer."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dimoe.train.loop import DS_TAG

    if any((checkpoint / DS_TAG).glob("*zero_pp_rank_*optim_states.pt")):
        return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=DS_TAG)
    states = torch.load(
        checkpoint / DS_TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
    )
    return {name: tensor.float() for name, tensor in states["module"].items()}


def merge_top_k(
    stage_dir: Path, top_k: int, metric: str = "val_loss", mode: str = "min", out: Path | None = None
) -> dict[str, Any]:
    """Average the weights of the `top_k` best checkpoints of `stage_dir` by `metric` into a
    checkpoint at `out` (default `<stage>/merged`), with the stage's final model's config and
    tokenizer; `merge.json` beside it names the checkpoints used."""
    from dimoe.model.build import load_checkpoint, save_checkpoint

    stage_dir, out = Path(stage_dir), Path(out) if out else Path(stage_dir) / "merged"
    ranked = ranked_checkpoints(stage_dir, metric, mode)
    if top_k < 1 or len(ranked) < top_k:
        raise UserError(
            f"--top-k {top_k}: {stage_dir} has {len(ranked)} checkpoint(s) that reported {metric!r}; train "
            f"with validation on (validation.every_steps) and checkpoint.keep >= {top_k}, or lower --top-k"
        )
    if not (stage_dir / "final" / "config.json").is_file():
        raise UserError(
            f"{stage_dir / 'final'} is missing: the merge takes the model's config and tokenizer from it"
        )
    chosen = ranked[:top_k]
    total: dict[str, torch.Tensor] = {}
    for _, folder, _ in chosen:  # a running sum: one checkpoint's weights in memory at a time
        for name, tensor in checkpoint_weights(folder).items():
            total[name] = total[name] + tensor if name in total else tensor.double()
    if any(name.startswith("base_model.model.") for name in total):
        raise UserError(
            f"{stage_dir} is a LoRA run: its checkpoints hold adapters; merging them is not supported"
        )
    mean = {name: tensor / top_k for name, tensor in total.items()}
    model, tokenizer = load_checkpoint(stage_dir / "final")
    dtype = next(model.parameters()).dtype
    model.load_state_dict({name: value.to(dtype) for name, value in mean.items()}, strict=True)
    save_checkpoint(model, tokenizer, out)
    record = {
        "metric": metric,
        "mode": mode,
        "checkpoints": [{"path": str(folder), "step": step, metric: value} for value, folder, step in chosen],
    }
    write_json(out / MERGE_FILE, record)
    return {"out": str(out), **record}
