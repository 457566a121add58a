"""Input pipeline at MixedParts scale: the JSON path vs a packed directory (``calico_jax.data.pack``).

    nice -n 10 python -m bench.data_scale --samples 2400000 --images 2000 --json_samples 10000 \\
        --workdir /tmp/data_scale --out bench/results/data_scale.json

1. A synthetic part set (:mod:`calico_jax.data.synthetic`) upscaled to 640x480 (image bilinear, masks nearest,
   re-encoded), ``--images`` distinct images; the pair builder makes a base pairs file from it.
2. Large pairs files repeat the base samples under new ids (streamed out, so any size fits in memory):
   ``--samples`` for the packed path, ``--json_samples`` for the JSON path; the large one is packed by
   :func:`calico_jax.data.pack.pack` (time and size reported).
3. For each (input, workers in ``--workers``; ``--rounds`` times, alternating) a fresh child process opens the
   input, builds the pipeline (``--shapes 7b``: SAM 1024, DINOv2 256 crop 224; ``tiny``: SAM 128, no DINOv2; batch 2,
   the tiny tokenizer), times the first batch, then samples/s over ``--batches`` batches; a thread samples the PSS
   of the child and all its descendants (``/proc/PID/smaps_rollup``) every 50 ms and keeps the peak.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

W, H = 640, 480


# ----------------------------------------------------------------------------------------- memory
def _children(pid: int) -> list[int]:
    out = []
    for t in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (t / "children").read_text().split()]
        except OSError:
            pass
    return out


def tree_pss_bytes(pid: int) -> int:
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
        except OSError:
            continue
        todo += _children(p)
    return total


class PeakPss(threading.Thread):
    def __init__(self, pid: int, every: float = 0.05):
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.stop = pid, every, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            self.peak = max(self.peak, tree_pss_bytes(self.pid))
            self.stop.wait(self.every)


# ------------------------------------------------------------------------------------------ data
def make_images(root: Path, n: int, seed: int = 0) -> Path:
    """Synthetic set upscaled to 640x480; returns the annotation file."""
    from calico_jax.data import synthetic
    from calico_jax.data.rle import decode, encode
    ann = root / "syn640" / "annotations.json"
    if ann.is_file():
        return ann
    path = synthetic.generate(root / "syn", n, seed=seed, progress=True)
    data = json.loads(path.read_text())
    out = root / "syn640"
    (out / "images").mkdir(parents=True, exist_ok=True)
    for im in tqdm(data["images"], desc="upscale"):
        Image.open(root / "syn" / "images" / im["file_name"]).convert("RGB").resize((W, H), Image.BILINEAR) \
            .save(out / "images" / im["file_name"], quality=90)
        im["height"], im["width"] = H, W
    for a in tqdm(data["annotations"], desc="masks"):
        m = Image.fromarray(decode(a["segmentation"]).astype(np.uint8) * 255).resize((W, H), Image.NEAREST)
        m = np.asarray(m) > 127
        a["segmentation"], a["area"] = encode(m), int(m.sum())
        ys, xs = np.nonzero(m)
        a["bbox"] = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1),
                     float(ys.max() - ys.min() + 1)] if len(xs) else [0.0, 0.0, 0.0, 0.0]
    ann.write_text(json.dumps(data, separators=(",", ":")))
    return ann


def repeat_pairs(base: dict, n: int, out: Path) -> Path:
    """A pairs file of ``n`` samples: the base samples cycled under new ids, streamed out."""
    if out.is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    head = {k: v for k, v in base.items() if k not in ("samples", "counts", "report")}
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(head, separators=(",", ":"))[:-1] + ',"samples":[')
        for i in tqdm(range(n), desc=f"write {out.name}", mininterval=2):
            s = dict(base["samples"][i % len(base["samples"])], id=f"s{i:08d}")
            f.write(("," if i else "") + json.dumps(s, separators=(",", ":")))
        f.write('],"counts":{},"report":{"counts":{},"records":[]}}')
    tmp.replace(out)
    return out


# ----------------------------------------------------------------------------------------- child
def child(a) -> int:
    """One measurement in this (fresh) process; prints one JSON line."""
    from calico_jax.core.preprocess import Preprocess
    from calico_jax.data.pairs_io import read_pairs
    from calico_jax.data.pipeline import Pipeline, PipelineConfig, measure_throughput
    from calico_jax.data.tokenize import load_tokenizer
    tok = load_tokenizer(a.tokenizer)
    sampler = PeakPss(os.getpid())
    sampler.start()
    base = tree_pss_bytes(os.getpid())
    pre = Preprocess(sam_size=1024, mask_size=1024, dinov2_size=256, dinov2_crop=224) if a.shapes == "7b" else \
        Preprocess(sam_size=128, mask_size=128, dinov2_size=0, dinov2_crop=0)   # tiny: the reading cost shows
    cfg = PipelineConfig(batch_size=2, worker_count=a.workers, preprocess=pre, max_tokens=512, num_epochs=None,
                         num_threads=2, prefetch_buffer_size=2)
    t0 = time.perf_counter()
    pipe = Pipeline(read_pairs(a.measure), tok, cfg, 0, 1)
    it = iter(pipe.dataset())
    next(it)
    first = time.perf_counter() - t0
    r = measure_throughput(it, a.batches, warmup=a.warmup)
    it.close()
    sampler.stop.set()
    sampler.join()
    print(json.dumps({"first_batch_s": first, "samples_per_s": r["samples_per_s"], "batches": r["batches"],
                      "peak_pss_gb": sampler.peak / 1e9, "pss_after_imports_gb": base / 1e9,
                      "samples": len(pipe.pairs)}))
    return 0


def measure(a, path: Path, workers: int, tok: Path) -> dict:
    cmd = [sys.executable, "-m", "bench.data_scale", "--measure", str(path), "--workers_one", str(workers),
           "--tokenizer", str(tok), "--batches", str(a.batches), "--shapes", a.shapes, "--warmup", str(a.warmup)]
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.data_scale", description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=2_400_000)
    ap.add_argument("--images", type=int, default=2000, help="distinct 640x480 images (samples reuse them)")
    ap.add_argument("--json_samples", type=int, default=10_000)
    ap.add_argument("--workers", default="0,2")
    ap.add_argument("--batches", type=int, default=10)
    ap.add_argument("--shapes", choices=("7b", "tiny"), default="7b",
                    help="7b: SAM 1024 + DINOv2 224 input shapes; tiny: SAM 128, no DINOv2")
    ap.add_argument("--warmup", type=int, default=1, help="batches after the first one before timing")
    ap.add_argument("--rounds", type=int, default=1, help="measurements per (input, workers), alternating")
    ap.add_argument("--workdir", default="/tmp/calico_data_scale")
    ap.add_argument("--out", default="bench/results/data_scale.json")
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)      # child mode
    ap.add_argument("--workers_one", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.measure:
        a.workers = a.workers_one
        return child(a)
    from calico_jax.data import pack, pairs
    from calico_jax.data.tokenize import build_tiny_tokenizer
    root = Path(a.workdir)
    root.mkdir(parents=True, exist_ok=True)
    res = {"host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_start": os.getloadavg()}, "config": vars(a)}
    t = time.perf_counter()
    ann = make_images(root, a.images)
    res["images_s"] = time.perf_counter() - t
    base_path = root / "base.json"
    if not base_path.is_file():
        assert pairs.main(["--coco", str(ann), "--images", str(ann.parent / "images"), "--out", str(base_path),
                           "--seed", "0", "--check_images", "none"]) == 0
    base = json.loads(base_path.read_text())
    res["base"] = {"samples": len(base["samples"]), "images": len(base["images"]), "masks": len(base["masks"])}
    tok = root / "tok"
    if not tok.is_dir():
        build_tiny_tokenizer(tok, [s["prompt"] + " " + s["answer"] for s in base["samples"][:2000]], vocab_size=400)
    small = repeat_pairs(base, a.json_samples, root / f"pairs_{a.json_samples}.json")
    big = repeat_pairs(base, a.samples, root / f"pairs_{a.samples}.json")
    del base
    packed = root / f"packed_{a.samples}"
    if not packed.is_dir():
        t = time.perf_counter()
        index = pack.pack(big, packed, progress=True)
        res["pack_s"] = time.perf_counter() - t
    else:
        index = json.loads((packed / "index.json").read_text())
    res["pack"] = {"json_bytes": big.stat().st_size, "packed_bytes": dir_size(packed), "total": index["total"],
                   "mask_bytes": index["mask_bytes"], "shards": len(index["shards"])}
    workers = [int(w) for w in a.workers.split(",")]
    res["runs"] = []
    for rnd in range(a.rounds):
        for w in workers:
            for name, path in ((f"json {a.json_samples}", small), (f"packed {a.samples}", packed)):
                r = {"input": name, "workers": w, "round": rnd, "shapes": a.shapes, **measure(a, path, w, tok)}
                print(json.dumps(r), flush=True)
                res["runs"].append(r)
    res["host"]["load_end"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
