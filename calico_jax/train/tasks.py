"""Tasks by name (``ExperimentConfig.task``), the way :data:`calico_jax.models.REGISTRY` names models.

:data:`REGISTRY` maps a name to a :class:`~calico_jax.train.task.Task` subclass; :func:`register` adds one (tests
register a small stand-in this way).
"""
from __future__ import annotations

from pathlib import Path

from calico_jax.core.config import ConfigError
from calico_jax.train.calico_task import CalicoTask
from calico_jax.train.task import Task

REGISTRY: dict[str, type[Task]] = {"calico": CalicoTask}


def register(name: str, cls: type[Task]) -> type[Task]:
    REGISTRY[name] = cls
    return cls


def build(cfg, workdir: Path | None = None, plan_only: bool = False) -> Task:
    """The task ``cfg.task`` names. ``plan_only``: no data or tokenizer (AOT planning, dry run)."""
    if cfg.task not in REGISTRY:
        raise ConfigError(f"task {cfg.task!r} unknown; known: {sorted(REGISTRY)}")
    return REGISTRY[cfg.task](cfg, workdir, plan_only)
