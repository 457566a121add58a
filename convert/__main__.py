"""``python -m convert FAMILY --src SRC --out OUT [--verify] [--dtype ...] [--config ARCH] [--base DIR] [--overwrite]``
``python -m convert calico-assemble --blip2 A --dinov2 B --llm C --out OUT`` (convert/assemble.py) and
``python -m convert inspect SRC [--family F]`` (convert/inspect.py).

User errors (missing/unexpected keys, shape mismatches, truncated or corrupt files, an existing OUT)
print one message on stderr and exit 2; a failed ``--verify`` exits 1. Either way nothing is left at OUT.
"""
from __future__ import annotations

import argparse
import inspect
import shutil
import sys
import time
from pathlib import Path

from calico_jax.checkpoints.torch_files import CheckpointError, open_checkpoint
from calico_jax.core import fs
from calico_jax.core.config import ConfigError
from convert import families


class VerifyFailed(Exception):
    pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    epilog = "families:\n" + "\n".join(f"  {name:<12} {families.HELP[name]}" for name in sorted(families.FAMILIES))
    epilog += ("\n\nsubcommand:\n  calico-assemble  one CALICO checkpoint from converted parts "
               "(python -m convert calico-assemble --help)\n  inspect          the key tree of a checkpoint and "
               "the family rules it matches (python -m convert inspect --help)")
    p = argparse.ArgumentParser(prog="python -m convert", epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Convert a PyTorch checkpoint into a calico_jax checkpoint "
                                            "(orbax params + config.json).")
    p.add_argument("family", choices=sorted(families.FAMILIES), help="checkpoint family / naming")
    p.add_argument("--src", required=True, help="save_pretrained directory or a single checkpoint file")
    p.add_argument("--out", required=True, help="output directory (orbax params + config.json)")
    p.add_argument("--verify", action="store_true", help="compare against the PyTorch reference (fp32)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="stored param dtype")
    p.add_argument("--config", default=None,
                   help="architecture: a JSON file of the original constructor arguments, or a preset name")
    p.add_argument("--base", default=None, help="converted base model directory (families that need one: peft-lora)")
    p.add_argument("--parts", nargs="+", default=None, metavar="DIR",
                   help="converted part directories for towers the checkpoint omits (families that take them: calico)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--tol", type=float, default=None, help="--verify tolerance on max_rel_err (default 1e-5)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    import jax  # after argparse: --help stays fast (the families, the models and the converter import JAX)
    import ml_dtypes
    import numpy as np

    from calico_jax.checkpoints import converted as pretrained
    from convert import verify
    from convert.mapping import build_params

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CheckpointError(f"{out} already exists (pass --overwrite to replace it)")
    family = families.get(args.family)
    t0 = time.time()
    ckpt = open_checkpoint(args.src)
    if args.base is not None and "base" not in inspect.signature(family.plan).parameters:
        raise CheckpointError(f"--base is not used by {args.family}")
    if args.parts is not None and "parts" not in inspect.signature(family.plan).parameters:
        raise CheckpointError(f"--parts is not used by {args.family}")
    extra = {name: value for name, value in (("base", args.base), ("parts", args.parts)) if value is not None}
    try:
        plan = family.plan(ckpt, args.config, **extra)
    except CheckpointError:
        raise
    except (TypeError, ValueError, KeyError) as e:   # a config field of the wrong type or missing (ConfigError)
        raise CheckpointError(f"{args.src}: its config (config.json or --config) does not describe a "
                              f"{args.family} model: {type(e).__name__}: {e}") from None
    # Families build their config from the checkpoint's own fields; the typed round trip names a field
    # of the wrong type (hidden_size "x") before any module is built from it.
    type(plan.config).from_dict(plan.config.to_dict(), where=f"{args.src} (config of {plan.model})")
    params = build_params(ckpt, plan, np.float32)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"{args.family}: {len(plan.tensors)} tensors -> {plan.model} ({n:,} parameters) in {time.time() - t0:.1f}s")
    for reason, count in sorted(plan.skipped.items()):
        print(f"  skipped {count} key(s): {reason}")
    for note in plan.notes:
        print(f"  note: {note}")
    with fs.atomic_directory(out, overwrite=args.overwrite) as tmp:
        if args.verify:
            comparisons = verify.run(family, ckpt, plan, params)
            if not verify.report(comparisons, args.tol if args.tol is not None else verify.DEFAULT_TOL):
                raise VerifyFailed()
        stored = params if args.dtype == "float32" else jax.tree.map(
            lambda x: x.astype(ml_dtypes.bfloat16) if np.issubdtype(x.dtype, np.floating) else x, params)
        source = {"family": args.family, "src": str(Path(args.src).absolute())}
        pretrained.write(tmp, plan.model, plan.config, stored, dtype=args.dtype, source=source)
        for f in plan.files:
            (tmp / "tokenizer").mkdir(exist_ok=True)
            if Path(f).is_dir():    # e.g. the Q-Former's tokenizer inside an exported CALICO tokenizer/
                shutil.copytree(f, tmp / "tokenizer" / Path(f).name)
            else:
                shutil.copy2(f, tmp / "tokenizer" / Path(f).name)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # A subcommand's module (the CALICO model, every family's rules) is imported only when it runs: --help stays fast.
    if argv[:1] == ["calico-assemble"]:  # a subcommand with its own arguments (convert/assemble.py)
        from convert.assemble import main as assemble_main
        return assemble_main(argv[1:])
    if argv[:1] == ["inspect"]:          # key tree of any checkpoint, no tensor read (convert/inspect.py)
        from convert.inspect import main as inspect_main
        return inspect_main(argv[1:])
    args = parse_args(argv)
    try:
        return run(args)
    except VerifyFailed:
        print(f"error: --verify failed; nothing written to {args.out}", file=sys.stderr)
        return 1
    except (CheckpointError, ConfigError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
