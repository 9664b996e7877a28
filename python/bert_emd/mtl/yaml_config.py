"""Multi-task YAML files: :func:`load_config` (a whole run, :class:`~bert_emd.mtl.config.MTLConfig`),
:func:`load_tasks` (its task list) and :func:`config_from_dict` (an already parsed mapping). Every
error is a :class:`~bert_emd.mtl.checks.ConfigError` naming the file and the field."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import MissingFileError
from .checks import ConfigError, build_dataclass
from .config import DistillOptions, MechanismConfig, ModelOptions, MTLConfig, SamplerOptions, TaskSpec, TrainingOptions

__all__ = ["config_from_dict", "load_config", "load_tasks"]


def _resolve(path: str | None, base: Path) -> str | None:
    if path is None:
        return None
    p = Path(os.path.expandvars(os.path.expanduser(str(path))))
    return str(p if p.is_absolute() else (base / p))


def config_from_dict(raw: Mapping[str, Any], *, source: str = "<config>", base_dir: Path | None = None) -> MTLConfig:
    """Build an :class:`MTLConfig` from a parsed mapping (the YAML file's content).

    Relative paths (data files, ``data_dir``, teachers, encoder) are resolved against
    ``base_dir`` (the YAML file's folder). Every error is a :class:`ConfigError` starting with
    ``source`` and naming the field.
    """
    base = base_dir or Path.cwd()
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping with a 'tasks' list, got {type(raw).__name__}")
    known = ("tasks", "model", "mechanisms", "sampler", "training", "distillation")
    unknown = [k for k in raw if k not in known]
    if unknown:
        raise ConfigError(f"{source}: unknown section {unknown[0]!r}; known sections: {', '.join(known)}")
    if "tasks" not in raw:
        raise ConfigError(f"{source}: missing 'tasks': a list of task mappings is required")
    tasks_raw = raw["tasks"]
    if not isinstance(tasks_raw, Sequence) or isinstance(tasks_raw, (str, bytes)) or not tasks_raw:
        raise ConfigError(f"{source}: tasks: a non-empty list of task mappings is required, got {tasks_raw!r}")
    try:
        tasks = []
        for i, t in enumerate(tasks_raw):
            where = f"{source}: tasks[{i}]"
            spec = TaskSpec.from_dict(t, where)
            d = spec.data
            d.train, d.validation, d.test = (_resolve(x, base) for x in (d.train, d.validation, d.test))
            d.data_dir = _resolve(d.data_dir, base)
            spec.teacher = _resolve(spec.teacher, base)
            tasks.append(spec)
        names = [t.name for t in tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"{source}: tasks: duplicate task name(s) {dup}; names must be unique")
        model = _wrap(lambda: build_dataclass(ModelOptions, _section(raw, "model"), "model"), source)
        model.encoder = _resolve(model.encoder, base)
        model.tokenizer = _resolve(model.tokenizer, base)
        mech = _wrap(lambda: MechanismConfig.from_value(raw.get("mechanisms"), "mechanisms"), source)
        sampler = _wrap(lambda: build_dataclass(SamplerOptions, _section(raw, "sampler"), "sampler"), source)
        training = _wrap(lambda: build_dataclass(TrainingOptions, _section(raw, "training"), "training"), source)
        training.output_dir = _resolve(training.output_dir, base) or training.output_dir
        dist_raw = raw.get("distillation")
        if dist_raw is None or dist_raw is False:
            distill = DistillOptions()
        else:
            if dist_raw is not True and not isinstance(dist_raw, Mapping):
                raise ConfigError(
                    f"{source}: distillation: a mapping of distillation fields (or true / false) is required, "
                    f"got {type(dist_raw).__name__} {dist_raw!r}"
                )
            dist_raw = {} if dist_raw is True else dict(dist_raw)
            dist_raw.setdefault("enabled", True)
            distill = _wrap(lambda: build_dataclass(DistillOptions, dist_raw, "distillation"), source)
            distill.teacher = _resolve(distill.teacher, base)
    except ConfigError:
        raise
    cfg = MTLConfig(tasks, model, mech, sampler, training, distill, source=source)
    _cross_check(cfg, source)
    if not distill.enabled:
        # a `distillation:` section with `enabled: false` is kept (a switch to flip), but say what it drops
        default = DistillOptions()
        ignored = [f.name for f in fields(DistillOptions)
                   if f.name != "enabled" and getattr(distill, f.name) != getattr(default, f.name)]
        if ignored:
            warnings.warn(f"{source}: distillation.enabled is false: ignoring {', '.join(ignored)}", UserWarning,
                          stacklevel=2)
    return cfg


def _section(raw: Mapping[str, Any], name: str) -> Any:
    """A section's mapping; an absent or empty (``model:``) section is ``{}``. Anything else goes to
    _build as is (which names the section if it is not a mapping)."""
    value = raw.get(name)
    return {} if value is None else value


def _wrap(fn: Any, source: str) -> Any:
    try:
        return fn()
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None


def _cross_check(cfg: MTLConfig, source: str) -> None:
    m = cfg.mechanisms
    if m.hierarchy_mode == "emd" and m.hierarchy and not cfg.distillation.enabled:
        raise ConfigError(
            f"{source}: mechanisms.hierarchy.mode: 'emd' reads the EMD layer weights of multi-task "
            "distillation; enable the 'distillation' section or use mode 'learned'"
        )
    if m.adversarial and len(cfg.tasks) < 2:
        raise ConfigError(f"{source}: mechanisms.adversarial: the task discriminator needs at least 2 tasks")
    if any(t.tap_layer is not None for t in cfg.tasks) and not m.hierarchy:
        raise ConfigError(
            f"{source}: tasks[{[t.tap_layer is not None for t in cfg.tasks].index(True)}].tap_layer is set but "
            "the 'hierarchy' mechanism is off; add it to mechanisms"
        )
    if cfg.distillation.enabled and cfg.distillation.teacher is None:
        missing = [i for i, t in enumerate(cfg.tasks) if t.teacher is None]
        if missing:
            raise ConfigError(
                f"{source}: tasks[{missing[0]}] ({cfg.tasks[missing[0]].name!r}).teacher: distillation needs a "
                "teacher per task, or one multi-task teacher in distillation.teacher"
            )


def load_config(path: str | os.PathLike) -> MTLConfig:
    """Read a multi-task YAML configuration (see ``examples/mtl_tasks.yaml``).

    Raises:
        MissingFileError: ``path`` does not exist (a ``FileNotFoundError``).
        ConfigError: invalid YAML or an invalid field; the message names the file, the line (YAML
            syntax errors) or the field (``tasks[1] ('news').num_labels: ...``).
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise MissingFileError(f"multi-task config {p} not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{p}:{where}: invalid YAML: {problem}") from None
    if raw is None:
        raise ConfigError(f"{p}: empty file; a mapping with a 'tasks' list is required")
    if isinstance(raw, Sequence) and not isinstance(raw, (str, bytes)):
        raw = {"tasks": raw}  # a bare list of tasks
    return config_from_dict(raw, source=str(p), base_dir=p.resolve().parent)


def load_tasks(path: str | os.PathLike) -> list[TaskSpec]:
    """Only the task list of a YAML file (a full config, or a bare list of task mappings)."""
    return load_config(path).tasks
