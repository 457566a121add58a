"""Reading PyTorch checkpoints lazily and safely.

SRC is a ``save_pretrained`` directory (config.json + safetensors or .bin, sharded or not) or one
checkpoint file. Safetensors files are memory-mapped and read tensor by tensor, so converting a
7B checkpoint never holds two copies of it. Pickled files (.bin/.pth/.pt) are opened only with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers.
"""
from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np


class CheckpointError(Exception):
    """A user-facing conversion error: printed as one message, no traceback."""


SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_DTYPE_NAMES = {np.dtype(v): k for k, v in SAFETENSORS_DTYPES.items()}
SAFETENSORS_SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


class _SafetensorsFile:
    """One .safetensors file: header parsed and validated up front, tensors memory-mapped on demand."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8 or n > 100 * 2**20:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(header claims {n} bytes, file has {size})")
            try:
                header = json.loads(f.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
        self.offset = 8 + n
        header.pop("__metadata__", None)
        self.entries: dict[str, tuple[Any, tuple[int, ...], int, int]] = {}
        for key, e in header.items():
            try:
                dtype = SAFETENSORS_DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                begin, end = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{path}: corrupt header entry for tensor {key!r}: {e}") from None
            if self.offset + end > size:
                raise CheckpointError(
                    f"{path}: truncated file: tensor {key!r} needs bytes up to {self.offset + end}, "
                    f"the file has {size}")
            if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
                raise CheckpointError(f"{path}: corrupt header: tensor {key!r} byte range does not match "
                                      f"shape {shape} of {e['dtype']}")
            self.entries[key] = (dtype, shape, begin, end)
        self._mm: np.memmap | None = None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][1]

    def dtype(self, key: str) -> str:
        return _DTYPE_NAMES[np.dtype(self.entries[key][0])]

    def get(self, key: str) -> np.ndarray:
        dtype, shape, begin, end = self.entries[key]
        if self._mm is None:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mm[self.offset + begin:self.offset + end].view(dtype).reshape(shape)


def _torch_load(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"{path}: reading pickled checkpoints needs torch "
                              "(pip install 'calico-jax[torch]'), or convert it to safetensors") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises many types for corrupt/truncated/unsafe files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint (truncated, corrupt or not weights-only): "
                              f"{msg}") from None
    # LAVIS / original-repo files wrap the state dict: {"model": {...}} or {"state_dict": {...}}.
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a state dict, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: no tensors found in checkpoint")
    return tensors


class _TorchFile:
    def __init__(self, path: Path):
        self.path = path
        self.entries = _torch_load(path)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key].shape)

    def dtype(self, key: str) -> str:
        return str(self.entries[key].dtype).removeprefix("torch.")

    def get(self, key: str) -> np.ndarray:
        import torch
        t = self.entries[key]
        return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def _open_file(path: Path):
    if path.suffix == SAFETENSORS_SUFFIX:
        return _SafetensorsFile(path)
    if path.suffix in PICKLE_SUFFIXES:
        return _TorchFile(path)
    raise CheckpointError(f"{path}: unknown checkpoint type (expected .safetensors, {', '.join(PICKLE_SUFFIXES)})")


class Checkpoint:
    """A lazy key -> tensor view over one or several checkpoint files, plus the HF config if present."""

    def __init__(self, path: Path, files: Iterable[Path], config: dict[str, Any] | None):
        self.path = path
        self.config = config
        self._where: dict[str, Any] = {}
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{f}: checkpoint file listed in the index is missing")
            opened = _open_file(f)
            for key in opened.entries:
                if key in self._where:
                    raise CheckpointError(f"{f}: tensor {key!r} also appears in {self._where[key].path}")
                self._where[key] = opened

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def dtype(self, key: str) -> str:
        """The stored dtype's name (safetensors ``F32``/``BF16``/...; ``float32``/``bfloat16`` for pickles)."""
        return self._where[key].dtype(key)

    @property
    def files(self) -> list[Path]:
        return sorted({f.path for f in self._where.values()})

    def get(self, key: str) -> np.ndarray:
        """The tensor as a numpy array (bf16 stays bf16 via ml_dtypes for safetensors)."""
        try:
            return np.asarray(self._where[key].get(key))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{self._where[key].path}: cannot read tensor {key!r}: {e}") from None


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: corrupt index file ({e})") from None
    return [index.parent / name for name in sorted(set(weight_map.values()))]


def open_checkpoint(src: str | Path) -> Checkpoint:
    """Opens SRC: a directory (config.json + weights, sharded or not) or a single checkpoint file."""
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src}: no such file or directory")
    if src.is_file():
        return Checkpoint(src, [src], None)
    config = None
    if (src / "config.json").is_file():
        try:
            config = json.loads((src / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{src / 'config.json'}: invalid JSON ({e})") from None
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index_name).is_file():
            return Checkpoint(src, _index_files(src / index_name), config)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (src / name).is_file():
            return Checkpoint(src, [src / name], config)
    candidates = sorted(p for p in src.iterdir() if p.suffix in (SAFETENSORS_SUFFIX, *PICKLE_SUFFIXES))
    if len(candidates) == 1:
        return Checkpoint(src, candidates, config)
    raise CheckpointError(f"{src}: no checkpoint found (expected model.safetensors, an index file or "
                          f"pytorch_model.bin; found {[p.name for p in candidates] or 'no weight files'})")


def load_json_arg(arg: str, presets: dict[str, dict[str, Any]], what: str) -> dict[str, Any]:
    """``--config`` value: a preset name or a JSON file path."""
    if arg in presets:
        return presets[arg]
    path = Path(arg)
    if not path.is_file():
        raise CheckpointError(f"--config {arg!r}: neither a preset ({', '.join(sorted(presets))}) "
                              f"nor an existing JSON file of {what}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object of {what}")
    return data


def hf_config(ckpt: Checkpoint, config_arg: str | None, what: str) -> dict[str, Any]:
    """The HF config of a checkpoint: ``--config`` (a config.json path) if given, else the config.json
    next to the weights; ``what`` names the expected config class in the error message."""
    if config_arg is not None:
        return load_json_arg(config_arg, {}, what)
    if ckpt.config is None:
        raise CheckpointError(f"{ckpt.path}: no config.json next to the weights; pass --config CONFIG.json ({what})")
    if not isinstance(ckpt.config, dict):
        raise CheckpointError(f"{ckpt.path}: config.json holds a {type(ckpt.config).__name__}, "
                              f"not a JSON object ({what})")
    return ckpt.config


Loader = Callable[[Checkpoint], np.ndarray]
