"""``python -m bench --suite cpu|gpu [--only NAME ...] --out bench/results/NAME.json``.

Measures the machine's fp32 matmul peak and memory read bandwidth, then each item side by side
(JAX jit after warm-up vs the PyTorch reference eager under ``inference_mode``, same thread count,
alternating runs, medians with min-max). Writes the JSON records and a markdown table next to them.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import platform
import sys
import time
from pathlib import Path

# name -> module that defines it (each module has ITEMS: name -> fn(ctx) -> Result)
ITEM_MODULES = {
    "eva_vit": "bench.vision", "qformer": "bench.vision", "dinov2": "bench.vision",
    "sam_image_encoder": "bench.vision", "sam_mask_decoder": "bench.vision",
    "llama_prefill": "bench.llm", "llama_decode": "bench.llm", "llama_generate": "bench.llm", "train_step": "bench.llm",
    "data_pipeline": "bench.data", "calico_tiny_inference": "bench.vision",
}


@dataclasses.dataclass
class Context:
    peak_gflops: float
    bandwidth_gbs: float
    repeats: int
    budget_s: float


def markdown(results: list[dict], machine: dict) -> str:
    lines = [f"Machine: {machine['cpu']} · {machine['threads']} threads · jax {machine['jax']} · "
             f"torch {machine['torch']} · fp32 matmul peak {machine['peak_gflops_torch']:.0f} GFLOP/s (torch), "
             f"{machine['peak_gflops_jax']:.0f} (jax) · read bandwidth {machine['bandwidth_gbs']:.1f} GB/s",
             "", "| item | JAX ms (min–max) | PyTorch ms (min–max) | speed-up | GFLOP/s | of limit | compile s |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        jr = f"{r['jax_ms']:.1f} ({r['jax_range_ms'][0]:.1f}–{r['jax_range_ms'][1]:.1f})"
        tr = (f"{r['torch_ms']:.1f} ({r['torch_range_ms'][0]:.1f}–{r['torch_range_ms'][1]:.1f})"
              if r["torch_ms"] is not None else "—")
        ratio = f"{r['ratio']:.2f}×" if r["ratio"] is not None else "—"
        lim = f"{100 * r['limit_fraction']:.0f} % {'peak' if r['limit'] == 'compute' else 'bw floor'}"
        lines.append(f"| `{r['name']}` | {jr} | {tr} | {ratio} | {r['gflops']:.0f} | {lim} | {r['compile_s']:.1f} |")
    notes = [f"- `{r['name']}`: {r['note']}" for r in results if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--only", nargs="*", default=None, help=f"items: {', '.join(ITEM_MODULES)}")
    p.add_argument("--out", default="bench/results/cpu.json")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget_s", type=float, default=60.0, help="per-item time budget for the timed rounds")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(ITEM_MODULES))
    if unknown:
        p.error(f"unknown item(s) {unknown}; known: {sorted(ITEM_MODULES)}")

    import jax
    import torch
    from tqdm.auto import tqdm

    from bench import timing

    jax.config.update("jax_default_matmul_precision", "highest" if args.suite == "cpu" else "default")
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    peak = timing.matmul_peak()
    bw = timing.read_bandwidth()
    # The machine limit is the faster framework's GEMM rate.
    ctx = Context(peak_gflops=max(peak.values()), bandwidth_gbs=bw, repeats=args.repeats, budget_s=args.budget_s)
    machine = {"cpu": platform.processor() or platform.machine(), "threads": threads, "jax": jax.__version__,
               "torch": torch.__version__, "device": str(jax.devices()[0]), "peak_gflops_torch": peak["torch"],
               "peak_gflops_jax": peak["jax"], "bandwidth_gbs": bw, "date": time.strftime("%Y-%m-%d")}
    results = []
    names = args.only or list(ITEM_MODULES)
    for name in tqdm(names, desc="bench", unit="item"):
        fn = importlib.import_module(ITEM_MODULES[name]).ITEMS[name]
        with torch.inference_mode():
            res = fn(ctx)
        results.append(dataclasses.asdict(res))
        tqdm.write(f"{name}: jax {res.jax_ms:.1f} ms, torch "
                   f"{res.torch_ms if res.torch_ms is None else round(res.torch_ms, 1)} ms")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "items": results}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results, machine))
    print(markdown(results, machine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
