"""The CALICO-7B inference plans as one table: ``python -m bench.predict_plans [--tokens 32]``.

Reads the plans ``train.py --config configs/calico_7b.py --compile_only --program predict --target T --plan_json``
wrote into ``bench/results/aot/predict_*.json`` (the predictor's own program, bf16 weights, one row per data
device) and prints memory per device, whether it fits, compile time and an **estimate** of samples/s. The plan's
roofline covers the prefill and one decode step (XLA counts a while loop's body once); an answer of ``--tokens``
tokens adds ``tokens - 1`` more decode steps, each at least one read of this device's weights from HBM:

    seconds per call = plan estimate + (tokens - 1) * weight bytes per device / HBM bandwidth
    samples/s        = rows / seconds per call

A lower bound on time (perfect overlap, no launch overhead), so the rate is an upper bound: an estimate, not a
measurement.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from calico_jax.parallel.chips import chip_for

PLANS = ("predict_v5e_2x2_tensor4", "predict_v5e_2x4_data2_tensor4", "predict_v5p_2x2x1_data4", "predict_h100_1",
         "predict_h100_8_data8")


def row(plan: dict, tokens: int) -> dict:
    m = plan["mesh"]
    chip = chip_for(plan["device_kind"])
    weights_per_device = plan["weights_gb_total"] / m["tensor"] / max(1, m["fsdp"])
    call_s = plan["estimate"]["step_s"] + (tokens - 1) * weights_per_device / chip.hbm_gbps
    return {"target": plan["target"], "mesh": f"{m['data']}x{m['fsdp']}x{m['tensor']}", "rows": plan["rows"],
            "gib": plan["peak_gb"], "chip_gib": plan["memory_per_device_gb"], "fits": plan["fits"],
            "compile_s": plan["compile_s"], "call_s": call_s, "samples_per_s": plan["rows"] / call_s}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.predict_plans", description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=32, help="answer length assumed by the estimate")
    ap.add_argument("--dir", default="bench/results/aot")
    args = ap.parse_args(argv)
    print("| target | mesh d x f x t | samples per call | GiB/device (plan / chip) | fits | compile s | "
          f"est. s per call ({args.tokens} tokens) | est. samples/s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in PLANS:
        path = Path(args.dir) / f"{name}.json"
        if not path.is_file():
            print(f"| {name}: no plan at {path} | | | | | | | |")
            continue
        r = row(json.loads(path.read_text()), args.tokens)
        print(f"| {r['target']} | {r['mesh']} | {r['rows']} | {r['gib']:.2f} / {r['chip_gib']:.2f} | "
              f"{'yes' if r['fits'] else '**no**'} | {r['compile_s']:.0f} | {r['call_s']:.3f} | "
              f"{r['samples_per_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
