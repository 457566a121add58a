"""Markdown table of the AOT plans in a directory (``train.py --compile_only --target ... --plan_json``):

    python -m bench.aot_summary bench/results/aot [--compact]

One row per JSON file (name order): target, program, mesh, remat, micro-batch, memory per device vs the chip's,
fits, step TFLOPs, estimated step time and MFU (roofline estimates), the collectives per step, compile seconds.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

GIB = 1024 ** 3
SHORT = {"all-gather": "AG", "reduce-scatter": "RS", "all-reduce": "AR", "all-to-all": "A2A",
         "collective-permute": "CP"}


def _remat(r: dict) -> str:
    full = sorted(t for t, p in (r.get("remat") or {}).items() if p != "none")
    return ",".join(full) if full else "none"


def _collectives(r: dict) -> str:
    parts = [f"{SHORT[op]} {c['count']}x {c['bytes'] / GIB:.2f} GiB"
             for op, c in (r.get("collectives_per_step") or {}).items() if c["count"]]
    return "; ".join(parts) or "-"


def row(name: str, r: dict) -> str:
    mesh = r.get("mesh", {})
    m = f"{mesh.get('data', 1)}x{mesh.get('fsdp', 1)}x{mesh.get('tensor', 1)}"
    est = r.get("estimate") or {}
    step = f"{est['step_s']:.2f} ({est['bound']})" if est else "-"
    mfu = f"{100 * est['mfu']:.0f} %" if est else "-"
    mem = f"{r['per_device_memory_gb']:.2f} / {r['memory_per_device_gb']:.2f}"
    micro = r.get("micro_batch_per_device", "-")
    tflops = f"{r['step_tflops']:.0f}" if r.get("step_tflops") else "-"
    return (f"| {name} | {r['target']} | {r.get('program', 'train')} | {m} | {_remat(r)} | {micro} | {mem} | "
            f"{'yes' if r['fits'] else '**no**'} | {tflops} | {step} | {mfu} | {_collectives(r)} | "
            f"{r['compile_s']:.0f} |")


def table(directory: Path) -> str:
    head = ("| plan | target | program | mesh d x f x t | remat | micro-batch/dev | GiB/dev (plan / chip) | fits | "
            "step TFLOP | est. step s | est. MFU | collectives per step (count, GiB/dev) | compile s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    plans = [(p.stem, json.loads(p.read_text())) for p in sorted(directory.glob("*.json"))]
    rows = [row(name, r) for name, r in plans if isinstance(r, dict) and "target" in r]   # plans, not other JSON
    return "\n".join([head, *rows]) + "\n"


def compact(directory: Path) -> str:
    """The README's table: target, setting, memory, fits, estimate."""
    head = ("| plan | target | program, mesh d x f x t, remat, micro-batch/dev | GiB/dev (plan / chip) | fits | "
            "est. step s | est. MFU |\n|---|---|---|---|---|---|---|")
    out = [head]
    for p in sorted(directory.glob("*.json")):
        r = json.loads(p.read_text())
        if not isinstance(r, dict) or "target" not in r:
            continue
        mesh, est = r.get("mesh", {}), r.get("estimate") or {}
        setting = (f"{r.get('program', 'train')}, {mesh.get('data', 1)}x{mesh.get('fsdp', 1)}x{mesh.get('tensor', 1)}"
                   f", {_remat(r)}" + (f", {r['micro_batch_per_device']}" if "micro_batch_per_device" in r else ""))
        mem = f"{r['per_device_memory_gb']:.2f} / {r['memory_per_device_gb']:.2f}"
        tail = f"{est['step_s']:.2f} ({est['bound']}) | {100 * est['mfu']:.0f} %" if est else "- | -"
        out.append(f"| {p.stem} | {r['target']} | {setting} | {mem} | {'yes' if r['fits'] else '**no**'} | {tail} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--compact"]
    d = Path(args[0] if args else "bench/results/aot")
    sys.stdout.write(compact(d) if "--compact" in sys.argv else table(d))
