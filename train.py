"""Training entry point.

    python train.py --config configs/tiny.py [--config.key=value ...] --workdir DIR
    python train.py --config configs/calico_7b.py --compile_only --devices 8 [--platform cpu]
    python train.py --config configs/calico_7b.py --compile_only --target v5p:2x2x1 [--plan_json FILE] [--search]
    python train.py --config configs/calico_7b.py --dry_run     # params + forward TFLOPs, no weights

Rerunning the same command in the same workdir resumes from the newest checkpoint. SIGTERM
(preemption) writes a final checkpoint and exits.

Exit status: 0 done (or preempted after its final checkpoint), 2 bad input (config, checkpoint, a peer that never
reached a barrier), 3 a non-finite loss, 4 a checkpoint write failed (the previous ones stay readable), 69 in a
multi-process job: this process's collective lost a peer that died (the peer's status tells why), 1 anything else.

Several processes: every process runs the same command with ``--multihost`` (``jax.distributed.initialize()``
reads the TPU / SLURM / Open MPI environment, or ``--coordinator_address/--num_processes/--process_id`` and the
``JAX_COORDINATOR_ADDRESS``-style variables say it: :mod:`calico_jax.parallel.distributed`); each process loads its own
block of every global batch, and checkpoints may go to a bucket (``--config.checkpoint.directory=gs://…``):

    # N processes on this machine (tests, one process per GPU): sets the variables, implies --multihost
    python -m calico_jax.launch --local 2 --devices-per-process 4 -- train.py --config configs/tiny.py --workdir W

    # TPU pod slice (all workers)
    gcloud compute tpus tpu-vm ssh $TPU --zone $ZONE --worker=all --command \
      "cd calico_jax && .venv/bin/python train.py --config configs/calico_7b.py --multihost \
       --workdir /tmp/run1 --config.checkpoint.directory=gs://$BUCKET/run1/checkpoints"
    # multi-node GPU (SLURM, one process per node owning its 8 GPUs)
    srun --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 .venv/bin/python train.py \
      --config configs/calico_7b.py --multihost --workdir /shared/run1
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

from calico_jax.core.platform import quiet_cli

if __name__ == "__main__":   # before anything imports JAX: no accelerator plugin probing on a CPU-only machine
    quiet_cli()
from calico_jax.core.config import ConfigError, split_overrides  # noqa: E402
from calico_jax.parallel import distributed  # noqa: E402
from calico_jax.plans.targets import aot_environment  # noqa: E402


def main(argv=None, on_step=None) -> int:
    """``on_step(step)``: called after every training step (tests inject faults with it)."""
    overrides, rest = split_overrides(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="train.py", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", required=True, help="configs/NAME.py")
    ap.add_argument("--workdir", help="checkpoints, metrics.jsonl, config.json")
    ap.add_argument("--compile_only", action="store_true", help="AOT-compile the train step and print its memory plan")
    ap.add_argument("--dry_run", action="store_true",
                    help="print params_total/params_trainable/trainable_fraction/forward_tflops (no weights)")
    ap.add_argument("--devices", type=int, default=0, help="with --compile_only: simulated device count")
    ap.add_argument("--platform", default=None, help="with --compile_only/--dry_run: jax platform (default cpu)")
    distributed.add_arguments(ap)
    ap.add_argument("--target", default="", help="with --compile_only: cpu:N, a TPU topology (v5p:2x2x1, v5e:2x4, "
                    "v4:2x2x1, v5e:2x2,slices=2; extra tpu-aot) or a GPU node (h100:8, h200:8, a100-80g:8, "
                    "a100-40g:8; extra gpu-aot)")
    ap.add_argument("--program", default="train", choices=("train", "predict"),
                    help="with --compile_only: the train step, or the predict program (prefill + decode, 1 sample)")
    ap.add_argument("--plan_json", default="", help="with --compile_only: also write the plan as JSON here")
    ap.add_argument("--memory_gb", type=float, default=0.0, help="with --compile_only: memory per device "
                    "(default: the target chip's)")
    ap.add_argument("--search", action="store_true", help="with --compile_only --target: try a small grid of "
                    "meshes / remat / micro-batches, print the setting that fits with the best estimate")
    ap.add_argument("--plan_cache", default="", help="with --search: cache dir (default ~/.cache/calico_jax/plans)")
    args = ap.parse_args(rest)
    try:
        spec = distributed.spec_from(args)
    except distributed.DistributedError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    if args.compile_only or args.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", args.platform or "cpu")
        aot_environment()
        if args.target.startswith("cpu:"):
            args.devices = int(args.target[4:] or 0)
        if args.devices:
            import jax
            jax.config.update("jax_num_cpu_devices", args.devices)
    import jax
    if spec is not None:
        try:
            distributed.initialize(spec)
        except distributed.DistributedError as e:
            print(f"train.py: {e}", file=sys.stderr)
            return 2
    from calico_jax.train.config import load  # after argparse: --help stays fast (models import JAX)
    try:
        cfg = load(args.config, overrides)
        # after argparse: --help stays fast; and config files may register their task: look after loading
        from calico_jax.train.tasks import REGISTRY
        if cfg.task not in REGISTRY:
            raise ConfigError(f"--config.task: task {cfg.task!r} unknown; known: {sorted(REGISTRY)}")
    except ConfigError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        from calico_jax.plans.dryrun import dry_run  # after argparse: --help stays fast
        dry_run(cfg)
        return 0
    if args.compile_only:
        from calico_jax.plans.cli import run_plan  # after argparse: --help stays fast
        return run_plan(cfg, args)
    if not args.workdir:
        ap.error("--workdir is required (unless --compile_only)")
    # after argparse: --help stays fast (the loop and checkpointer import optax, orbax and the data pipeline)
    from calico_jax.checkpoints.training import CheckpointWriteError
    from calico_jax.core.platform import enable_compile_cache
    from calico_jax.train.loop import NonFiniteError, train
    enable_compile_cache()   # a resumed run (after a preemption, say) does not compile its programs again
    try:
        out = train(cfg, args.workdir, on_step=on_step)
    except ConfigError as e:       # found when the run is built (an unknown task, a config the data contradicts)
        print(f"train.py: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"train.py: stopped: {e}", file=sys.stderr)
        return 3
    except CheckpointWriteError as e:   # disk full, a failed writer: the previous checkpoints stay readable
        print(f"train.py: stopped: {e}", file=sys.stderr)
        return distributed.leave(4)
    except distributed.DistributedError as e:   # a peer never reached a barrier
        print(f"train.py: stopped: {e}", file=sys.stderr)
        return distributed.leave(2)
    except Exception as e:
        if jax.process_count() == 1:
            raise
        if distributed.lost_peer(e):   # a casualty of a peer's death: one line, and the launcher names the peer
            first = str(e).strip().splitlines()[0]   # lost_peer matched its text: never empty
            print(f"train.py: process {jax.process_index()} stopped: it lost a peer process ({first})",
                  file=sys.stderr)
            return distributed.leave(distributed.PEER_LOST)
        traceback.print_exc()   # then exit now: jax's shutdown would wait minutes for the peers
        return distributed.leave(1)
    print(f"done: step {out['step']}" + (" (preempted: final checkpoint written)" if out["preempted"] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
