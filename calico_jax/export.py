"""Training workdir -> a self-contained inference checkpoint.

    python -m calico_jax.export --workdir runs/demo --out runs/demo/model [--overwrite]

The output is a :mod:`calico_jax.pretrained` directory (``config.json`` + ``params/``, model ``calico``) with the
full parameter tree (the newest training checkpoint's trainable weights over the frozen ones, rebuilt from the
base checkpoint or seed they came from), ``tokenizer/`` and ``inference.json`` (the pre-processing sizes the
model was trained with). Written atomically: on any error nothing is left at ``--out``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any


def from_workdir(workdir: str | Path) -> tuple[Any, Any, Path, Any]:
    """-> (Calico module, full params, tokenizer dir, InferenceConfig) from a training workdir."""
    import jax

    from calico_jax.train import loop, state as state_lib, tasks
    from calico_jax.train.checkpoint import Checkpointer
    from calico_jax.train.config import ExperimentConfig
    from calico_jax.train.sharding import make_mesh

    workdir = Path(workdir)
    cfg_path = workdir / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{workdir} is not a training workdir: {cfg_path} is missing")
    cfg = ExperimentConfig.from_dict(json.loads(cfg_path.read_text()), where=str(cfg_path))
    if cfg.model.task != "calico":
        raise ValueError(f"{cfg_path}: model.task is {cfg.model.task!r}, not 'calico'")
    task = tasks.build(cfg, workdir)
    # One device: inference programs are not sharded; batch 1 keeps the trainer's divisibility check trivial.
    cfg1 = cfg.replace(batch_size=cfg.optim.grad_accum, mesh={"data": 1, "fsdp": 1, "tensor": 1}, num_devices=1)
    tr = loop.build(cfg1, task, make_mesh(cfg1.mesh, jax.devices()[:1]))
    ckpt = Checkpointer(cfg.checkpoint.directory or workdir / "checkpoints", cfg.checkpoint)
    try:
        with tr.context():
            restored = ckpt.restore_latest(tr.abstract_state, None)
    finally:
        ckpt.close()
    if restored is None:
        raise FileNotFoundError(f"{workdir}: no restorable training checkpoint under {ckpt.directory}")
    state, meta = restored
    (_, frozen), _ = loop.load_frozen(tr, meta.get("frozen_source"))
    params = state_lib.combine(state["params"], frozen)
    return (task.module, params, *inference_setup(cfg, workdir))


def inference_setup(cfg: Any, workdir: str | Path) -> tuple[Path, Any]:
    """(tokenizer dir, InferenceConfig) of a training run: the pipeline's processor sizes."""
    from calico_jax.infer import InferenceConfig

    d = cfg.data
    icfg = InferenceConfig(blip_size=d.blip_size, dinov2_size=d.dinov2_size, dinov2_crop=d.dinov2_size,
                           sam_size=d.sam_size)
    return (Path(d.tokenizer) if d.tokenizer else Path(workdir) / "data" / "tokenizer"), icfg


def save(out: str | Path, module: Any, params: Any, tok_dir: Path, icfg: Any, source: dict | None = None,
         overwrite: bool = False) -> Path:
    """Writes the inference checkpoint (params, config, tokenizer/, inference.json) atomically."""
    from calico_jax import pretrained
    from calico_jax.infer import INFERENCE_FILE

    if not Path(tok_dir).is_dir():
        raise FileNotFoundError(f"tokenizer directory {tok_dir} is missing")
    with pretrained.atomic_directory(out, overwrite=overwrite) as tmp:
        pretrained.write(tmp, "calico", module.config, params, source=source)
        shutil.copytree(tok_dir, tmp / "tokenizer")
        (tmp / INFERENCE_FILE).write_text(json.dumps(icfg.to_dict(), indent=2) + "\n")
    return Path(out)


def export(workdir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    module, params, tok_dir, icfg = from_workdir(workdir)
    return save(out, module, params, tok_dir, icfg, {"workdir": str(Path(workdir).absolute())}, overwrite)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calico_jax.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="training workdir (config.json, checkpoints/)")
    ap.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = export(args.workdir, args.out, args.overwrite)
    except (FileNotFoundError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
