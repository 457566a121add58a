"""Training workdir -> a self-contained inference checkpoint.

    python -m calico_jax.export --workdir runs/demo --out runs/demo/model [--overwrite]

The output is a :mod:`calico_jax.pretrained` directory (``config.json`` + ``params/``, model ``calico``) with the
full parameter tree (the newest training checkpoint's trainable weights over the frozen ones, rebuilt from the
base checkpoint or seed they came from: :func:`calico_jax.checkpoints.restore_workdir`) and ``tokenizer/``. The
model config in ``config.json`` carries the pre-processing the model was trained with (``preprocess``).
Written atomically: on any error nothing is left at ``--out``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

from calico_jax import checkpoints, pretrained
from calico_jax.config import ConfigError


def save(out: str | Path, config: Any, params: Any, tok_dir: Path, source: dict | None = None,
         overwrite: bool = False) -> Path:
    """Writes the inference checkpoint (params, config, tokenizer/) atomically."""
    if not Path(tok_dir).is_dir():
        raise FileNotFoundError(f"tokenizer directory {tok_dir} is missing")
    with checkpoints.atomic_directory(out, overwrite=overwrite) as tmp:
        pretrained.write(tmp, "calico", config, params, source=source)
        shutil.copytree(tok_dir, tmp / "tokenizer")
    return Path(out)


def export(workdir: str | Path, out: str | Path, overwrite: bool = False) -> Path:
    run = checkpoints.restore_workdir(workdir)
    return save(out, run.config, run.params, run.tokenizer_dir,
                {"workdir": str(Path(workdir).absolute()), "step": run.step}, overwrite)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calico_jax.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="training workdir (config.json, checkpoints/)")
    ap.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    try:
        out = export(args.workdir, args.out, args.overwrite)
    except (FileNotFoundError, ValueError, FileExistsError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
