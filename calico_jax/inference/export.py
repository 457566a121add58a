"""Training workdir -> a self-contained inference checkpoint, or PyTorch files in the first author's naming.

    python -m calico_jax.export --workdir runs/demo --out runs/demo/model [--overwrite]
    python -m calico_jax.export --format torch (--workdir RUN | --ckpt MODEL) --out DIR [--full] [--overwrite]

``--format torch`` (:mod:`calico_jax.checkpoints.torch_export`): safetensors shards of the trainable modules in the
author's
names (``--full``: every tower), a PEFT adapter directory ``DIR/adapter`` for the LoRA factors and a config.json
that ``python -m convert calico --src DIR`` reads back.

The output is a :mod:`calico_jax.checkpoints.converted` directory (``config.json`` + ``params/``, model ``calico``)
with the
full parameter tree (the newest training checkpoint's trainable weights over the frozen ones, rebuilt from the
base checkpoint or seed they came from: :func:`calico_jax.checkpoints.workdir.restore_workdir`) and ``tokenizer/``. The
model config in ``config.json`` carries the pre-processing the model was trained with (``preprocess``).
Written atomically: on any error nothing is left at ``--out``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from calico_jax.core import fs
from calico_jax.core.config import ConfigError


def save(out: str | Path, config: Any, params: Any, tok_dir: Path, source: dict | None = None,
         overwrite: bool = False) -> Path:
    """Writes the inference checkpoint (params, config, tokenizer/) atomically."""
    from calico_jax.checkpoints import converted as pretrained  # here, not at the top: --help stays fast

    if not Path(tok_dir).is_dir():
        raise FileNotFoundError(f"tokenizer directory {tok_dir} is missing")
    with fs.atomic_directory(out, overwrite=overwrite) as tmp:
        pretrained.write(tmp, "calico", config, params, source=source)
        shutil.copytree(tok_dir, tmp / "tokenizer")
    return Path(out)


def export(workdir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    from calico_jax.checkpoints import workdir as checkpoints

    run = checkpoints.restore_workdir(workdir)
    experiment = json.loads((Path(workdir) / "config.json").read_text())
    source = {"workdir": str(Path(workdir).absolute()), "step": run.step,
              "trained_max_images": (experiment.get("data") or {}).get("max_images")}
    return save(out, run.config, run.params, run.tokenizer_dir, source, overwrite)


def export_torch(out: str | Path, *, workdir: str | Path | None = None, ckpt: str | Path | None = None,
                 full: bool = False, overwrite: bool = False) -> Path:
    from calico_jax.checkpoints import converted as pretrained
    from calico_jax.checkpoints import torch_export
    from calico_jax.checkpoints import workdir as checkpoints

    if workdir is not None:
        run = checkpoints.restore_workdir(workdir)
        config, params, tok = run.config, run.params, run.tokenizer_dir
    else:
        meta = pretrained.read_meta(ckpt)
        if meta["model"] != "calico":
            raise ValueError(f"--ckpt {ckpt}: a {meta['model']!r} checkpoint, expected 'calico'")
        _, params, config = pretrained.load(ckpt)
        tok = Path(ckpt) / "tokenizer"
    return torch_export.save(out, config, params, full=full, tokenizer_dir=tok, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calico_jax.export", description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--workdir", help="training workdir (config.json, checkpoints/)")
    src.add_argument("--ckpt", help="a converted or exported calico checkpoint (--format torch only)")
    ap.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--format", choices=("calico", "torch"), default="calico",
                    help="calico: our checkpoint (default); torch: the author's PyTorch naming + a PEFT adapter")
    ap.add_argument("--full", action="store_true", help="--format torch: also the frozen towers")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        if args.format == "torch":
            out = export_torch(args.out, workdir=args.workdir, ckpt=args.ckpt, full=args.full,
                               overwrite=args.overwrite)
        elif args.workdir is None:
            raise ValueError("--ckpt needs --format torch (a calico checkpoint is already exported)")
        else:
            out = export(args.workdir, args.out, args.overwrite)
    except (FileNotFoundError, ValueError, FileExistsError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
