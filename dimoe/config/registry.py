"""Which schema validates which config file: by the folder under `configs/` (and, in folders
holding several kinds, by file name), for the repository's configs and the packaged ones alike."""

from __future__ import annotations

import importlib
from pathlib import Path

from pydantic import BaseModel

from dimoe.config.loader import ConfigError, resolve_config_path

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
    "webdataset": "dimoe.config.data:WebDatasetConfig",
}
_BY_FILE = {"stage_blends.yaml": "blends", "normalize.yaml": "normalize", "webdataset.yaml": "webdataset"}


def schema_class(kind: str) -> type[BaseModel]:
    """The schema of a config kind (a key of SCHEMAS); ConfigError for an unknown kind."""
    if kind not in SCHEMAS:
        raise ConfigError(f"unknown config kind {kind!r}; known kinds: {', '.join(sorted(SCHEMAS))}")
    module, name = SCHEMAS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def kind_of(path: str | Path) -> str:
    """The kind of config at `path` (looked up like `load_config` does: a `configs/...` path may
    name a packaged config); ConfigError if there is no such file."""
    path = Path(path)
    if path.name in _BY_FILE:
        return _BY_FILE[path.name]
    for parent in resolve_config_path(path).resolve().parents:
        if parent.name in SCHEMAS:
            return parent.name
    raise ConfigError(
        f"cannot tell which schema validates {path}: it is not under configs/<kind>/; "
        f"pass --kind ({', '.join(sorted(SCHEMAS))})"
    )


def schema_for(path: str | Path, kind: str | None = None) -> type[BaseModel]:
    """The schema validating `path`: that of `kind` when given, else the one its folder implies."""
    return schema_class(kind or kind_of(path))
