"""Which schema validates which config file: by the folder under `configs/` (and, in folders
holding several kinds, by file name)."""

from __future__ import annotations

import importlib
from pathlib import Path

from pydantic import BaseModel

# kind → "module:Class"; imported lazily so `dimoe config show` stays light.
SCHEMAS: dict[str, str] = {
    "model": "dimoe.config.model:ModelConfig",
    "normalize": "dimoe.config.data:NormalizeConfig",
    "blends": "dimoe.config.data:BlendConfig",
    "train": "dimoe.config.train:TrainConfig",
    "infer": "dimoe.config.infer:InferConfig",
    "eval": "dimoe.config.eval:EvalConfig",
    "serve": "dimoe.config.serve:ServeConfig",
    "tune": "dimoe.config.tune:TuneConfig",
    "vision_pretrain": "dimoe.config.train:VisionPretrainConfig",
}
_BY_FILE = {"stage_blends.yaml": "blends", "normalize.yaml": "normalize"}


def schema_class(kind: str) -> type[BaseModel]:
    if kind not in SCHEMAS:
        raise ValueError(f"unknown config kind {kind!r}; known kinds: {', '.join(sorted(SCHEMAS))}")
    module, name = SCHEMAS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def kind_of(path: Path) -> str:
    path = Path(path)
    if path.name in _BY_FILE:
        return _BY_FILE[path.name]
    for parent in path.resolve().parents:
        if parent.name in SCHEMAS:
            return parent.name
    raise ValueError(
        f"cannot tell which schema validates {path}: it is not under configs/<kind>/; "
        f"pass --kind ({', '.join(sorted(SCHEMAS))})"
    )


def schema_for(path: Path, kind: str | None = None) -> type[BaseModel]:
    return schema_class(kind or kind_of(path))
