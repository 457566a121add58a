"""N-scaling (the paper's open question 2): cost and accuracy of CALICO as the images per sample grow, N = 2..5.

    python -m bench.nscale --out bench/results/nscale.json [--ns 2 3 4 5] [--per_task 16] [--demo runs/demo/model]
    python -m bench --only nscale          # the same, as one row of the suite (the per-N table in its note)

Cost -- the tiny CALICO (``CalicoConfig.tiny()`` sized to a tiny tokenizer, random init): the pair builder
draws N-image samples from a small synthetic part set; each sample's generation prompt (our ``llava_v1`` prompt
with one ``<image>`` per image) is spliced as the predictor does. Reported per N: **prefill tokens** (mean over
the set: text tokens + N x the model's image tokens), the XLA-counted **FLOPs** of one sample's forward before
decoding (EVA + Q-Former, DINOv2 + CEM and the LLM prefill with its CAMs for all N images, SAM image embeddings
of every image) at the set's longest prompt, and its median **latency** at batch 1 (jit, after warm-up).

Accuracy -- a demo model (``make demo`` writes ``runs/demo/model``, trained on pairs; ``--demo`` / ``--heldout`` point
at another, e.g. the mixed-N one of ``configs/demo_mixed.py``): held-out N-image
pairs drawn (pair seed 1, as the demo's own held-out set; ``--per_task`` samples per task) from the demo's
held-out images (``runs/demo/data/heldout``), scored by ``python -m calico_jax.evaluate`` (``calico``
protocol); the mean over tasks of each metric per N. Skipped with a note when the demo model is absent.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from bench.timing import Result, alternate, compile_with_flops
from calico_jax.checkpoints import converted as pretrained
from calico_jax.core.tokens import IMAGE_TOKEN_INDEX, SEG_TOKEN
from calico_jax.data import pairs, synthetic
from calico_jax.data.coco_parts import load_part_dataset
from calico_jax.data.pairs import PairBuilder, PairConfig
from calico_jax.data.processors import load_image
from calico_jax.data.tokenize import SampleTokenizer, build_tiny_tokenizer
from calico_jax.inference import evaluate
from calico_jax.inference.generate import left_align
from calico_jax.inference.predictor import Predictor
from calico_jax.models.calico import Calico, CalicoConfig
from calico_jax.models.inputs import CalicoInputs

NS = (2, 3, 4, 5)
DEMO = Path("runs/demo/model")
HELDOUT = Path("runs/demo/data/heldout")


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens"))
def _forward(params, inputs, *, module, max_new_tokens):
    """What a sample costs before its first decoded token: prefill (towers, CEM, LLM + CAMs) + SAM embeddings."""
    apply = functools.partial(module.apply, {"params": params})
    out = apply(inputs, max_new_tokens=max_new_tokens, method="prefill")
    return out.logits, apply(inputs.sam_pixel_values, method="sam_embeddings")


def tiny_prompts(ns=NS, per_task: int = 4, work: Path | None = None) -> dict:
    """The cost part's data, no model: a small synthetic set, its N-image samples per N (pair builder), a tiny
    tokenizer, the tiny config sized to it, and per N each sample's prompt ids and spliced prefill length."""
    work = Path(work or tempfile.mkdtemp(prefix="nscale_"))
    ann = synthetic.generate(work / "syn", 24, seed=0, progress=False, max_objects=1, clutter=False)
    ds = load_part_dataset(ann)
    sets = {n: PairBuilder([(ds, work / "syn" / "images")], PairConfig(num_images=n, per_task=per_task,
                                                                       check_images="none"), seed=0).build()
            for n in ns}
    texts = [s["prompt"] + " " + s["answer"] for d in sets.values() for s in d["samples"]]
    tok = build_tiny_tokenizer(work / "tok", texts, vocab_size=400)
    cfg = CalicoConfig.tiny().for_tokenizer(len(tok), tok.convert_tokens_to_ids(SEG_TOKEN))
    prompter = SampleTokenizer(tok, max_len=1 << 20)   # the predictor's prompt format (llava_v1, im_start/end)
    prompts, spliced = {}, {}
    for n in ns:
        if not sets[n]["samples"]:
            raise RuntimeError(f"no {n}-image samples could be drawn from the synthetic set")
        prompts[n] = [prompter.prompt_ids(s["prompt"]) for s in sets[n]["samples"]]
        spliced[n] = [len(p) - n + n * cfg.num_image_tokens for p in prompts[n]]   # each slot -> its image tokens
    return {"work": work, "sets": sets, "tokenizer": tok, "config": cfg, "prompts": prompts, "spliced": spliced}


def tiny_cost(ns=NS, per_task: int = 4, repeats: int = 5, work: Path | None = None) -> list[dict]:
    """Per N: prefill tokens (mean), forward FLOPs, median latency ms (batch 1) of the tiny CALICO."""
    import jax.numpy as jnp

    d = tiny_prompts(ns, per_task, work)
    tok, cfg, root = d["tokenizer"], d["config"], d["work"] / "syn" / "images"
    module = Calico(cfg)
    params = pretrained.init_params(module)
    pred = Predictor(module, params, tok)
    rows = []
    for n in ns:
        data, spliced = d["sets"][n], d["spliced"][n]
        longest = max(d["prompts"][n], key=len)
        ids, mask = left_align(np.asarray([longest]), None, tok.pad_token_id, 1)
        ims = [load_image(root / data["images"][i]["file"]) for i in data["samples"][0]["images"]]
        px = pred.image_fields(ims)   # the contract's image fields of this sample
        args = (params, CalicoInputs(input_ids=jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(mask),
                                     **{k: None if v is None else jnp.asarray(v[None]) for k, v in px.items()}))
        assert int((ids == IMAGE_TOKEN_INDEX).sum()) == n
        compiled, flops, compile_s = compile_with_flops(_forward, *args, module=module, max_new_tokens=32)
        stats = alternate({"jax": lambda c=compiled, a=args: jax.block_until_ready(c(*a))}, repeats=repeats)["jax"]
        rows.append({"N": n, "samples": len(spliced), "prefill_tokens": statistics.mean(spliced),
                     "prefill_tokens_max": max(spliced), "image_tokens": n * cfg.num_image_tokens,
                     "forward_gflop": flops / 1e9, "latency_ms": stats.median_ms,
                     "latency_range_ms": [stats.min_ms, stats.max_ms], "compile_s": compile_s})
    return rows


def demo_metrics(ns=NS, per_task: int = 16, demo: Path = DEMO, heldout: Path = HELDOUT,
                 work: Path | None = None) -> tuple[list[dict], str]:
    """Per N: the demo model's mean AP50 / mIoU / Recall / SS / S-IoU on held-out N-image pairs (or a note)."""
    if not (Path(demo) / "config.json").is_file():
        return [], f"no demo model at {demo} (run `make demo`)"
    if not (Path(heldout) / "annotations.json").is_file():
        return [], f"no held-out set at {heldout}"
    work = Path(work or tempfile.mkdtemp(prefix="nscale_demo_"))
    rows = []
    for n in ns:
        p, r = work / f"pairs_n{n}.json", work / f"report_n{n}.json"
        args = ["--coco", str(Path(heldout) / "annotations.json"), "--images", str(Path(heldout) / "images"),
                "--num_images", str(n), "--seed", "1", "--check_images", "none", "--out", str(p)]
        if pairs.main(args + (["--per_task", str(per_task)] if per_task else [])) != 0:
            raise RuntimeError(f"pairs for N={n} failed")
        t = time.perf_counter()
        if evaluate.main(["--ckpt", str(demo), "--pairs", str(p), "--out", str(r), "--batch_size", "8",
                          "--no_progress"]) != 0:
            raise RuntimeError(f"evaluate for N={n} failed")
        rep = json.loads(r.read_text())
        rows.append({"N": n, "samples": rep["num_samples"], "per_task_samples": rep["per_task_samples"],
                     **{k: rep["mean"][k] for k in ("AP50", "mIoU", "Recall", "SS", "S-IoU")},
                     "truncated": rep["generation"]["truncated"], "evaluate_s": time.perf_counter() - t})
    return rows, ""


def _f(x, nd=1) -> str:
    return "—" if x is None else f"{x:.{nd}f}"


def markdown(cost: list[dict], demo: list[dict], note: str = "") -> str:
    by_n = {r["N"]: r for r in demo}
    lines = ["| N | prefill tokens (mean) | forward GFLOP | latency ms/sample, min / median | demo samples | AP50 "
             "| mIoU | Recall | SS | S-IoU |", "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cost:
        d = by_n.get(c["N"], {})
        lo = c["latency_range_ms"][0]   # on a shared host the minimum is the steadier estimate
        lines.append(f"| {c['N']} | {c['prefill_tokens']:.1f} | {c['forward_gflop']:.3f} | {lo:.1f} / "
                     f"{c['latency_ms']:.1f} | {d.get('samples', '—')} | " +
                     " | ".join(_f(d.get(k)) for k in ("AP50", "mIoU", "Recall", "SS", "S-IoU")) + " |")
    return "\n".join(lines + ([f"\n{note}"] if note else [])) + "\n"


def run(ns=NS, per_task: int = 16, repeats: int = 5, demo: Path = DEMO, heldout: Path = HELDOUT,
        with_demo: bool = True) -> dict:
    cost = tiny_cost(ns, repeats=repeats)
    rows, note = demo_metrics(ns, per_task, demo, heldout) if with_demo else ([], "demo metrics not requested")
    return {"ns": list(ns), "per_task": per_task, "tiny_cost": cost, "demo_metrics": rows, "demo_note": note}


def nscale(ctx):
    """The suite row: latency at the smallest N, the whole per-N table in the note."""
    out = run(repeats=max(ctx.repeats, 20))   # a tiny forward takes milliseconds: more rounds, same budget
    c0 = out["tiny_cost"][0]
    note = "; ".join(f"N={c['N']}: {c['prefill_tokens']:.0f} tok, {c['forward_gflop']:.3f} GFLOP, "
                     f"{c['latency_ms']:.1f} ms" for c in out["tiny_cost"])
    note += "; demo " + (", ".join(f"N={d['N']}: mIoU {d['mIoU']:.1f} SS {d['SS']:.1f}" for d in out["demo_metrics"])
                         or out["demo_note"])
    gflops = c0["forward_gflop"] / (c0["latency_ms"] * 1e-3)
    return Result(name="nscale", jax_ms=c0["latency_ms"], torch_ms=None, ratio=None, gflops=gflops,
                  limit_fraction=gflops / ctx.peak_gflops, compile_s=sum(c["compile_s"] for c in out["tiny_cost"]),
                  flops=c0["forward_gflop"] * 1e9, jax_range_ms=tuple(c0["latency_range_ms"]),
                  note="tiny CALICO per sample vs N (no PyTorch counterpart): " + note)


ITEMS = {"nscale": nscale}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.nscale", description=__doc__.splitlines()[0])
    ap.add_argument("--ns", type=int, nargs="+", default=list(NS))
    ap.add_argument("--per_task", type=int, default=16, help="demo held-out samples per task and N (0 = all)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--demo", default=str(DEMO))
    ap.add_argument("--heldout", default=str(HELDOUT))
    ap.add_argument("--no_demo", action="store_true", help="cost only")
    ap.add_argument("--out", default="bench/results/nscale.json")
    a = ap.parse_args(argv)
    if any(n < 2 or n > 9 for n in a.ns):
        ap.error("--ns: every N must be in 2..9 (pairs have >= 2 images)")
    t = time.perf_counter()
    out = run(tuple(a.ns), a.per_task, a.repeats, Path(a.demo), Path(a.heldout), not a.no_demo)
    out["total_s"] = time.perf_counter() - t
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    table = markdown(out["tiny_cost"], out["demo_metrics"], out["demo_note"])
    path.with_suffix(".md").write_text(table)
    print(table)
    print(f"wrote {path} ({out['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
