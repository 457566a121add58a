"""Shared presets the config files build on (by setting values, big_vision style).

* :func:`paper_optim` -- the optimizer recipe of GLaMM/CALICO (AdamW β (0.9, 0.95), weight decay 0, clip 1.0;
  warm-up then decay) with the values each file changes;
* :func:`experiment` -- an :class:`ExperimentConfig` on one data-parallel mesh, for a model config.

Model presets are :class:`~calico_jax.models.calico.CalicoConfig` itself (the 7B defaults) and
:meth:`CalicoConfig.tiny`; see ``docs/paper_map.md`` for what each switch means and where its default comes from.
"""
from calico_jax.models.calico import CalicoConfig
from calico_jax.train.config import CheckpointConfig, DataConfig, ExperimentConfig, OptimConfig


def paper_optim(**changes) -> OptimConfig:
    return OptimConfig(b1=0.9, b2=0.95, weight_decay=0.0, clip_norm=1.0).replace(**changes)


def experiment(name: str, model: CalicoConfig, **changes) -> ExperimentConfig:
    base = ExperimentConfig(name=name, task="calico", model=model, data=DataConfig(), optim=paper_optim(),
                            checkpoint=CheckpointConfig(max_to_keep=3), seed=0,
                            mesh={"data": -1, "fsdp": 1, "tensor": 1})
    return base.replace(**changes)
