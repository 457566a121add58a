"""Experiment config: typed, frozen dataclasses; ``configs/NAME.py`` files return one from ``get_config()``.

:class:`ExperimentConfig` = the model (``model``: a :class:`~calico_jax.models.calico.CalicoConfig` -- architecture,
ablations, ``preprocess``, per-tower remat) + how to train it: the recipe (``recipe``: the loss and the trainable
patterns), task, data, optimizer, checkpoints, mesh, steps. Command-line overrides are dotted paths into it
(``--config.optim.learning_rate=1e-4``, ``--config.model.cem.enabled=false``,
``--config.recipe.loss.pixel_loss=focal``, ``--config.mesh={"data":2,"fsdp":-1}``); each value is parsed with the
type of the field it replaces, so a typo in a key or an unparsable value fails before anything runs. The loss and
the trainable patterns were ``model.loss`` / ``model.trainable`` before: an override of the old path is an error
naming the new one (:data:`MOVED`), and a config.json written then loads with them in ``recipe``. The resolved
config is written to ``WORKDIR/config.json`` (atomically). A subclass may narrow ``model`` to another model's
config (the tests' toy).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import sys
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from calico_jax.checkpoints.training import CheckpointConfig
from calico_jax.core.config import Config, ConfigError, optional_inner
from calico_jax.core.fs import write_atomic
from calico_jax.models.calico import CalicoConfig
from calico_jax.train.losses import LossConfig

C = typing.TypeVar("C", bound=Config)
DTYPES = ("float32", "bfloat16", "float16")   # compute / frozen-storage dtypes
# Paper recipe (the frozen/trained marks of the paper's figures, docs/paper_map.md): LoRA + CEM + CAMs (+ their
# queries) + SAM mask decoder.
PAPER_TRAINABLE = (r"llm/.*/lora_(a|b)", r"cem/.*", r"cam_.*", r"sam/mask_decoder/.*")
# Fields that moved out of the model config: old dotted path -> new one (an override of the old path is an error).
MOVED = {"model.loss": "recipe.loss", "model.trainable": "recipe.trainable"}
PAIR_FIELDS = ("image_counts", "per_task")   # SyntheticConfig fields for the pair builder, not the images


@dataclasses.dataclass(frozen=True)
class SyntheticConfig(Config):
    """A synthetic part dataset (:func:`calico_jax.data.synthetic.make_split`), built when ``data.pairs`` is empty."""
    num_images: int = 24
    seed: int = -1                        # image seed; -1 = the experiment seed (held-out set: seed + 1)
    max_objects: int = 3
    object_scale: tuple[float, float] = (0.16, 0.3)
    clutter: bool = True
    class_colors: bool = False
    image_counts: tuple[int, ...] = (2,)  # images per sample: pairs are drawn for each N, in one pairs file
    per_task: tuple[int, ...] = ()        # samples per task for each N in image_counts (0 = one per anchor
                                          # view, the pair builder's default); () = 0 for every N

    def generator_options(self) -> dict:
        """:func:`calico_jax.data.synthetic.generate`'s keyword arguments (the image fields: all but the count, the
        seed and the pair options)."""
        return {k: getattr(self, k) for k in self.to_dict() if k not in ("num_images", "seed") + PAIR_FIELDS}

    def pair_options(self) -> dict:
        """:func:`calico_jax.data.synthetic.make_split`'s pair keywords (``image_counts``, ``per_task``)."""
        return {k: getattr(self, k) for k in PAIR_FIELDS}

    def check(self, where: str, max_images: int) -> None:
        """A clear error naming the field (``where`` = its dotted path) for pair options that cannot work."""
        counts = self.image_counts
        if not counts or any(n < 2 for n in counts) or len(set(counts)) != len(counts):
            raise ConfigError(f"{where}.image_counts must be distinct image counts >= 2, got {list(counts)}")
        if max(counts) > max_images:
            raise ConfigError(f"{where}.image_counts has N = {max(counts)} but data.max_images (the image slots "
                              f"per sample) is {max_images}: set --config.data.max_images={max(counts)} or more")
        if self.per_task and (len(self.per_task) != len(counts) or min(self.per_task) < 0):
            raise ConfigError(f"{where}.per_task must be empty or one count >= 0 per image count "
                              f"{list(counts)}, got {list(self.per_task)}")


@dataclasses.dataclass(frozen=True)
class DataConfig(Config):
    """Where the training data comes from and the batch shapes that are not the model's (the image sizes are
    ``model.preprocess``, the [SEG] slots ``model.seg.max_seg``)."""
    pairs: str = ""                       # pairs file or packed directory (python -m calico_jax.data.pack);
                                          # "" = a synthetic set under WORKDIR/data
    eval_pairs: str = ""                  # held-out pairs (eval_every); "" = with synthetic training data
                                          # a synthetic held-out set (seed + 1) under WORKDIR/data/eval, else none
    eval_batches: int = 2                 # batches (of batch_size / grad_accum rows) per periodic evaluation
    tokenizer: str = ""                   # tokenizer dir; "" = a tiny one trained on the pairs
    synthetic: SyntheticConfig = SyntheticConfig()                        # WORKDIR/data/train (without pairs)
    synthetic_heldout: SyntheticConfig = SyntheticConfig(num_images=8)    # WORKDIR/data/heldout
    max_images: int = 2                   # N: image slots per sample
    max_tokens: int = 128                 # T: prompt + answer tokens per sample
    hflip: float = 0.5
    color_jitter: float = 0.2
    worker_count: int = 0
    strict: bool = False                  # a bad record stops training (else it is skipped and counted)

    def __post_init__(self):
        if not self.pairs:   # the synthetic sets are built only without data.pairs
            for name in ("synthetic", "synthetic_heldout"):
                getattr(self, name).check(f"data.{name}", self.max_images)


@dataclasses.dataclass(frozen=True)
class OptimConfig(Config):
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    decay: str = "cosine"                 # "cosine" | "linear" | "constant"
    end_lr_ratio: float = 0.0             # final lr = learning_rate * end_lr_ratio
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.0
    clip_norm: float = 1.0                # global-norm clipping; <= 0 disables
    grad_accum: int = 1                   # micro-batches per step (batch_size must divide)

    def __post_init__(self):
        if self.decay not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optim.decay must be cosine, linear or constant, got {self.decay!r}")
        if self.grad_accum < 1:
            raise ConfigError(f"optim.grad_accum must be >= 1, got {self.grad_accum}")


@dataclasses.dataclass(frozen=True)
class RecipeConfig(Config):
    """What training optimises and which weights it updates; the model itself (``ExperimentConfig.model``) reads
    neither."""
    loss: LossConfig = LossConfig()                       # training objective (CE + pixel + Dice weights, BCE/focal)
    trainable: tuple[str, ...] = PAPER_TRAINABLE          # param path regexes (full match on "a/b/c")

    def active_trainable(self, model: CalicoConfig) -> tuple[str, ...]:
        """``trainable`` without the patterns of modules an ablation of ``model`` switched off (``cem/`` without a
        CEM, ``cam_`` without CAM layers), so ``--config.model.cem.enabled=false`` trains as is; any other pattern
        that selects nothing stays an error (a typo)."""
        off = (("cem/",) if not model.cem.enabled else ()) + (("cam_",) if not model.cam.layers else ())
        return tuple(p for p in self.trainable if not p.startswith(off))


@dataclasses.dataclass(frozen=True)
class ExperimentConfig(Config):
    """One training run. ``model`` is the whole model (architecture, ablation switches, pre-processing, per-tower
    ``remat``); everything else says how to train it, ``recipe`` the loss and the trainable patterns."""
    name: str = "experiment"
    task: str = "calico"                  # calico_jax.train.tasks.REGISTRY
    model: CalicoConfig = CalicoConfig()
    recipe: RecipeConfig = RecipeConfig()
    base_checkpoint: str = ""             # converted base (``python -m convert`` output); "" = random init
    dtype: str = "float32"                # compute dtype of the model
    frozen_dtype: str = "float32"         # storage dtype of the frozen weights (bfloat16 halves them)
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    total_steps: int = 100
    checkpoint_every: int = 50
    log_every: int = 1
    eval_every: int = 0                   # 0 = no periodic evaluation hook
    seed: int = 0
    batch_size: int = 8                   # global
    mesh: dict = dataclasses.field(default_factory=lambda: {"data": -1, "fsdp": 1, "tensor": 1})
    num_devices: int = -1                 # use the first N devices (-1 = all)
    skip_nonfinite: bool = True           # NaN/Inf loss or grads: skip the update (else stop at once)
    max_consecutive_nonfinite: int = 5
    progress: bool = True
    peak_tflops: float = 0.0              # per device, for MFU; 0 = from the device-kind table

    def __post_init__(self):
        for name in ("dtype", "frozen_dtype"):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name} must be one of {sorted(DTYPES)}, got {getattr(self, name)!r}")
        if self.batch_size % self.optim.grad_accum:
            raise ConfigError(f"batch_size {self.batch_size} is not divisible by optim.grad_accum "
                              f"{self.optim.grad_accum}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str | None = None) -> ExperimentConfig:
        """:meth:`Config.from_dict`; a config.json written before the recipe moved out of the model (``model.loss``,
        ``model.trainable``; see :data:`MOVED`) loads with them as ``recipe.loss`` / ``recipe.trainable``
        (a ``recipe`` section it also has wins). A model section that has such a field itself (the toy) keeps it."""
        moved = {old.split(".")[1]: new.split(".")[1] for old, new in MOVED.items() if not _has_path(cls, old)}
        model, recipe = data.get("model"), data.get("recipe") or {}
        if isinstance(model, Mapping) and isinstance(recipe, Mapping) and moved.keys() & model.keys():
            legacy = {moved[k]: model[k] for k in moved.keys() & model.keys()}
            data = {**data, "model": {k: v for k, v in model.items() if k not in moved},
                    "recipe": {**legacy, **recipe}}
        return super().from_dict(data, where)


# ------------------------------------------------------------------------------------ overrides
def _has_path(cls: type, dotted: str) -> bool:
    """``dotted`` names a field of the config class ``cls`` (through its sections)."""
    for name in dotted.split("."):
        is_config = isinstance(cls, type) and issubclass(cls, Config)
        if not is_config or name not in {f.name for f in dataclasses.fields(cls)}:
            return False
        cls = optional_inner(typing.get_type_hints(cls)[name])
    return True


def _check_moved(cls: type, dotted: str, text: str) -> None:
    """An override of a path that moved (:data:`MOVED`) -- itself, below it, or its section given as a JSON object
    holding it -- fails with one line naming the new path."""
    for old, new in MOVED.items():
        if _has_path(cls, old):
            continue
        if dotted == old or dotted.startswith(old + "."):
            raise ConfigError(f"--config.{dotted}: moved to --config.{new}{dotted[len(old):]} (the loss and the "
                              "trainable patterns are the training recipe, not part of the model config)")
        section, _, key = old.rpartition(".")
        if dotted == section:
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and key in value:
                raise ConfigError(f"--config.{dotted}: {key!r} moved to --config.{new} (the loss and the "
                                  "trainable patterns are the training recipe, not part of the model config)")


def _parse(tp: Any, text: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if tp in (int, float):
            return tp(text)
        if tp is str:
            return text
        if tp is dict or origin is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError(text)
            return value
        if isinstance(tp, type) and issubclass(tp, Config):   # a whole section as JSON
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ConfigError(f"--config.{where}: {tp.__name__} is a section: give a JSON object, got {text!r}")
            return tp.from_dict(value, where=f"--config.{where}")
        if origin is tuple:
            inner = (typing.get_args(tp) or (str,))[0]
            if text.startswith("["):
                return tuple(json.loads(text))
            return tuple(_parse(inner, t.strip(), where) for t in text.split(",") if t.strip())
    except (ValueError, json.JSONDecodeError):
        raise ConfigError(f"--config.{where}: cannot parse {text!r} as {tp}") from None
    return json.loads(text)


def _set(cls: type, data: dict, dotted: str, text: str, where: str) -> None:
    """Sets ``data`` (the JSON form of a ``cls`` config) at ``dotted`` from the string ``text``."""
    head, _, rest = dotted.partition(".")
    names = {f.name for f in dataclasses.fields(cls)}
    if head not in names:
        raise ConfigError(f"--config.{where}: {cls.__name__} has no field {head!r}; known: {sorted(names)}")
    tp = optional_inner(typing.get_type_hints(cls)[head])
    is_section = isinstance(tp, type) and issubclass(tp, Config)
    if rest and isinstance(data[head], dict) and not is_section:
        try:
            data[head] = {**data[head], rest: json.loads(text)}      # --config.mesh.fsdp=2
        except json.JSONDecodeError:
            raise ConfigError(f"--config.{where}: cannot parse {text!r} as JSON") from None
    elif rest:
        if not is_section:
            raise ConfigError(f"--config.{where}: {head!r} is not a config section")
        if data[head] is None:
            raise ConfigError(f"--config.{where}: {head!r} is off (None); set the whole section as JSON first")
        _set(tp, data[head], rest, text, where)
    else:
        value = _parse(tp, text, where)
        data[head] = value.to_dict() if isinstance(value, Config) else value


def apply_overrides(cfg: C, overrides: Sequence[tuple[str, str]]) -> C:
    """All dotted overrides at once, validated together (``batch_size`` and ``optim.grad_accum`` may
    change in the same command)."""
    data = cfg.to_dict()
    for dotted, text in overrides:
        _check_moved(type(cfg), dotted, text)
        _set(type(cfg), data, dotted, text, dotted)
    return type(cfg).from_dict(data)


def load_module(path: str | os.PathLike):
    """Executes a config file. One in a package directory (``configs/__init__.py`` exists) is imported as
    ``<dir>.<name>`` with the directory's parent on ``sys.path``, so presets can build on each other
    (``from configs import common``); any other file runs on its own."""
    path = Path(path).absolute()
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if (path.parent / "__init__.py").is_file():
        root = str(path.parent.parent)
        if root not in sys.path:
            sys.path.insert(0, root)
        return importlib.import_module(f"{path.parent.name}.{path.stem}")
    spec = importlib.util.spec_from_file_location(f"_calico_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path: str | os.PathLike, overrides: Sequence[tuple[str, str]] = ()) -> ExperimentConfig:
    """Runs ``get_config()`` of a config file and applies the dotted overrides in order."""
    module = load_module(path)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config()")
    cfg = module.get_config()
    if not isinstance(cfg, ExperimentConfig):   # a subclass (another model section) is fine
        raise ConfigError(f"{path}: get_config() returned {type(cfg).__name__}, not ExperimentConfig")
    return apply_overrides(cfg, overrides)


def save(cfg: ExperimentConfig, workdir: str | os.PathLike) -> Path:
    path = Path(workdir) / "config.json"
    write_atomic(path, json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n")
    return path
