"""``python -m bench --suite cpu [--only NAME ...] --out bench/results/NAME.json``; ``python -m bench --suite gpu
[--tiny]``: one accelerator's train step, MFU, memory and predict throughput (:mod:`bench.gpu`).

Measures both frameworks' fp32 GEMM peak and memory read bandwidth, then each item side by side (JAX jit
after warm-up vs the PyTorch reference eager under ``inference_mode``, same thread count, alternating runs,
medians with min-max), then the limits again. Each item reports the raw ratio (PyTorch ms / JAX ms) and the
*normalised* ratio (each framework's fraction of its own limit, divided): hosts differ in which framework's
GEMM they favour, so only the latter is a claim about this project. Warns when the two limits differ by more
than 15 % or drift by more than 10 % during the run. Writes the JSON records and a markdown table next to them.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
import time
from pathlib import Path

from bench import timing

# name -> module that defines it (each module has ITEMS: name -> fn(ctx) -> Result)
ITEM_MODULES = {
    "eva_vit": "bench.vision", "qformer": "bench.vision", "dinov2": "bench.vision",
    "sam_image_encoder": "bench.vision", "sam_mask_decoder": "bench.vision",
    "llama_prefill": "bench.llm", "llama_decode": "bench.llm", "llama_generate": "bench.llm", "train_step": "bench.llm",
    "data_pipeline": "bench.data", "calico_tiny_inference": "bench.vision",
    "nscale": "bench.nscale",   # cost and demo accuracy vs images per sample (N = 2..5)
}


@dataclasses.dataclass
class Context:
    peak_gflops: float
    bandwidth_gbs: float
    repeats: int
    budget_s: float


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.0f} %"


def markdown(results: list[dict], machine: dict) -> str:
    """Headline table (normalised ratios and fractions of each framework's own limit), then the raw one."""
    lim = machine["limits_before"]
    after = machine.get("limits_after") or lim
    pk, bw = lim["peak_gflops"], lim["bandwidth_gbs"]
    lines = [f"Machine: {machine['cpu']} · {machine['threads']} threads · jax {machine['jax']} · "
             f"torch {machine['torch']} · fp32 GEMM peak jax {pk['jax']:.0f} / torch {pk['torch']:.0f} GFLOP/s "
             f"(after the items: {after['peak_gflops']['jax']:.0f} / {after['peak_gflops']['torch']:.0f}) · "
             f"read bandwidth jax {bw['jax']:.1f} / torch {bw['torch']:.1f} GB/s "
             f"(after: {after['bandwidth_gbs']['jax']:.1f} / {after['bandwidth_gbs']['torch']:.1f})", ""]
    lines += [f"> warning: {w}" for w in machine.get("warnings", [])]
    lines += ["", "| item | normalised speed-up | JAX: of own limit | PyTorch: of own limit | raw speed-up |",
              "|---|---|---|---|---|"]
    for r in results:
        norm = "—" if r.get("normalised_ratio") is None else f"**{r['normalised_ratio']:.2f}×**"
        norm += "".join(f" ({k.removeprefix('torch_')} {v:.2f}×)" for k, v in (r.get("alt_normalised") or {}).items())
        unit = " bw" if r.get("limit") == "bandwidth" else ""
        raw = "—" if r.get("ratio") is None else f"{r['ratio']:.2f}×"
        lines.append(f"| `{r['name']}` | {norm} | {_pct(r.get('jax_fraction'))}{unit} | "
                     f"{_pct(r.get('torch_fraction'))}{unit} | {raw} |")
    lines += ["", "| item | JAX ms (min–max) | PyTorch ms (min–max) | GFLOP/s (JAX) | compile s |",
              "|---|---|---|---|---|"]
    for r in results:
        jr = f"{r['jax_ms']:.1f} ({r['jax_range_ms'][0]:.1f}–{r['jax_range_ms'][1]:.1f})"
        tr = (f"{r['torch_ms']:.1f} ({r['torch_range_ms'][0]:.1f}–{r['torch_range_ms'][1]:.1f})"
              if r["torch_ms"] is not None else "—")
        lines.append(f"| `{r['name']}` | {jr} | {tr} | {r['gflops']:.0f} | {r['compile_s']:.1f} |")
    notes = [f"- `{r['name']}`: {r['note']}" for r in results if r.get("note")]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


README_BEGIN, README_END = "<!-- bench:cpu:begin -->", "<!-- bench:cpu:end -->"


def readme_block_check(path: Path) -> str | None:
    """Why ``path`` cannot take the tables (missing file or markers), or None."""
    if not path.is_file():
        return f"{path}: no such file"
    text = path.read_text()
    counts = (text.count(README_BEGIN), text.count(README_END))
    if counts != (1, 1) or text.index(README_BEGIN) > text.index(README_END):
        return f"{path}: needs one {README_BEGIN} line followed by one {README_END} line"
    return None


def update_readme(path: Path, tables: str) -> None:
    """Replaces what lies between the markers with ``tables`` (the rest of the file is kept)."""
    text = path.read_text()
    head, rest = text.split(README_BEGIN)
    _, tail = rest.split(README_END)
    path.write_text(f"{head}{README_BEGIN}\n{tables}{README_END}{tail}")


def measure_limits() -> dict:
    return {"peak_gflops": timing.matmul_peak(), "bandwidth_gbs": timing.read_bandwidth()}


def cpu_name() -> str:
    """The CPU model (/proc/cpuinfo where there is one), as the demo records it."""
    from calico_jax.demo import host_record  # after argparse: --help stays fast (calico_jax imports jax)
    return host_record()["cpu"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: side by side with PyTorch, per item; gpu: CALICO training and predict on one device")
    p.add_argument("--tiny", action="store_true", help="--suite gpu at the tiny model's size (runs on a CPU)")
    p.add_argument("--only", nargs="*", default=None, help=f"items: {', '.join(ITEM_MODULES)}")
    p.add_argument("--out", default="bench/results/cpu.json")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget_s", type=float, default=60.0, help="per-item time budget for the timed rounds")
    p.add_argument("--readme", default=None,
                   help="file whose block between the bench:cpu markers gets the new tables (default: "
                        "docs/benchmarks.md after a full CPU run written to the default --out; '' for none)")
    args = p.parse_args(argv)
    if args.suite == "gpu":
        from bench import gpu  # after argparse: --help stays fast
        out = None if args.out == p.get_default("out") else args.out
        print(gpu.run(args.tiny, out or (None if args.tiny else "bench/results/gpu.json")))
        return 0
    if args.tiny:
        p.error("--tiny belongs to --suite gpu")
    unknown = sorted(set(args.only or ()) - set(ITEM_MODULES))
    if unknown:
        p.error(f"unknown item(s) {unknown}; known: {sorted(ITEM_MODULES)}")
    readme = args.readme
    if readme is None and args.only is None and args.suite == "cpu" and args.out == p.get_default("out"):
        readme = "docs/benchmarks.md"
    if readme and (problem := readme_block_check(Path(readme))):
        p.error(f"--readme {problem}")   # before any timing: nothing is written

    import jax
    import torch
    from tqdm.auto import tqdm

    jax.config.update("jax_default_matmul_precision", "highest")
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    before = measure_limits()
    # Items report JAX against JAX's own limits; normalise() adds PyTorch's against its own.
    ctx = Context(peak_gflops=before["peak_gflops"]["jax"], bandwidth_gbs=before["bandwidth_gbs"]["jax"],
                  repeats=args.repeats, budget_s=args.budget_s)
    machine = {"cpu": cpu_name(), "threads": threads, "jax": jax.__version__,
               "torch": torch.__version__, "device": str(jax.devices()[0]), "limits_before": before,
               "date": time.strftime("%Y-%m-%d")}
    results = []
    names = args.only or list(ITEM_MODULES)
    for name in tqdm(names, desc="bench", unit="item"):
        fn = importlib.import_module(ITEM_MODULES[name]).ITEMS[name]
        with torch.inference_mode():
            res = fn(ctx)
        results.append(timing.normalise(dataclasses.asdict(res), before))
        tqdm.write(f"{name}: jax {res.jax_ms:.1f} ms, torch "
                   f"{res.torch_ms if res.torch_ms is None else round(res.torch_ms, 1)} ms")
    machine["limits_after"] = measure_limits()
    machine["warnings"] = timing.limits_check(before, machine["limits_after"])
    for w in machine["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "items": results}, indent=2) + "\n")
    tables = markdown(results, machine)
    out.with_suffix(".md").write_text(tables)
    if readme:
        update_readme(Path(readme), tables)
        print(f"bench: tables written to {out.with_suffix('.md')} and {readme}", file=sys.stderr)
    print(tables)
    return 0


if __name__ == "__main__":
    sys.exit(main())
