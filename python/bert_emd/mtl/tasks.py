"""Compatibility re-export of the multi-task configuration: the dataclasses live in
:mod:`bert_emd.mtl.config`, the field checks in :mod:`bert_emd.mtl.checks`, the YAML loading in
:mod:`bert_emd.mtl.yaml_config`."""

from __future__ import annotations

from . import config, yaml_config
from .checks import ConfigError
from .config import *  # noqa: F403
from .yaml_config import *  # noqa: F403

__all__ = ["ConfigError", *config.__all__, *yaml_config.__all__]
