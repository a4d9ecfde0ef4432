"""YAML config loading: `base:` inheritance (deep merge), `--set a.b.c=value` overrides, and
pydantic validation whose errors name the key path and the file.

A config file may start with `base: other.yaml` (a path relative to the file, or a list of such
paths); the base is loaded first and the file's keys are merged over it, mappings recursively,
everything else replaced.

The built-in configs ship inside the package (`dimoe/configs/`; the repository's `configs/` links
to it), so a `configs/...` path that does not exist under the working directory resolves to the
packaged copy: the defaults work from any directory and from an installed wheel.
"""

from __future__ import annotations

from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from dimoe.errors import UserError

M = TypeVar("M", bound=BaseModel)


class ConfigError(UserError):
    """A config that cannot be used; the message names the file and the key path."""


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


CONFIGS_DIR = "configs"


def packaged_configs() -> Path:
    """The built-in configs shipped as package data (what the repository's `configs/` links to)."""
    # A wheel installs package data as plain files, so the resource is a real directory.
    return Path(str(resources.files("dimoe") / CONFIGS_DIR))


def resolve_config_path(path: str | Path) -> Path:
    """The config file or folder `path` names: `path` itself when it exists (absolute, or relative
    to the working directory); otherwise, for a relative `configs/...` path, the same file or folder
    among the packaged configs (`configs/train/tiny` -> <dimoe>/configs/train/tiny). ConfigError,
    naming every place looked in, when there is none."""
    path = Path(path).expanduser()
    if path.exists():
        return path
    if path.is_absolute() or path.parts[:1] != (CONFIGS_DIR,):
        raise ConfigError(f"config not found: {path.absolute()}")
    packaged = packaged_configs().joinpath(*path.parts[1:])
    if packaged.exists():
        return packaged
    raise ConfigError(
        f"config not found: {path} exists neither under the working directory ({Path.cwd()}) "
        f"nor among the configs packaged with dimoe ({packaged})"
    )


def read_yaml_tree(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read `path` and everything it inherits through `base:` into one mapping."""
    path = resolve_config_path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: `base:` cycle through {' -> '.join(str(p) for p in _seen)}")
    if not path.is_file():
        raise ConfigError(f"{path} is a folder; expected a config file")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    bases = data.pop("base", None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, read_yaml_tree(path.parent / base, (*_seen, path)))
    return deep_merge(merged, data)


def apply_overrides(data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML scalars/lists so that pydantic
    types them against the schema (`lr=3e-4`, `views=single`, `layers=[0,1]`)."""
    data = dict(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set train.lr=1e-4")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item!r}: empty component in key path {key!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node[parts[-1]] = value
    return data


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "<root>"
        if err["type"] == "extra_forbidden":
            lines.append(f"{source}: unknown key `{path}` (check the spelling; see the schema)")
        elif err["type"] == "missing":
            lines.append(f"{source}: missing required key `{path}`")
        else:
            lines.append(f"{source}: `{path}`: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def validate(data: dict[str, Any], schema: type[M], source: str) -> M:
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(path: str | Path | None, schema: type[M], overrides: Iterable[str] = ()) -> M:
    """Load `path` (or the schema's defaults when None; see `resolve_config_path` for where a
    relative path is looked up), apply overrides, validate."""
    data = read_yaml_tree(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return validate(data, schema, str(path) if path is not None else f"<{schema.__name__} defaults>")


def dump_config(config: BaseModel) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
