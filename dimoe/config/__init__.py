"""Typed configs: pydantic schemas (unknown keys are errors) and the YAML loader."""

from dimoe.config.loader import ConfigError, load_config

__all__ = ["ConfigError", "load_config"]
