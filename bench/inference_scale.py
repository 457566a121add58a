"""Inference at scale on this host: the predictor's throughput on 1 device and on a mesh of 8 simulated CPU devices.

    python -m bench.inference_scale --out bench/results/inference_scale.md [--samples 32] [--batch_size 8]

The tiny CALICO (``CalicoConfig.tiny()`` sized to a tiny tokenizer, random init, non-zero CAMs; or ``--ckpt DIR``,
e.g. ``runs/demo/model``) answers ``--samples`` two-image questions (random 64 x 48 / 48 x 64 images) at
``--batch_size``; each configuration runs in its own process (``XLA_FLAGS=--xla_force_host_platform_device_count=8``
for the meshes): one device, ``{"data": 8}``, ``{"data": 4, "tensor": 2}``. Reported per configuration: the first
batch (compilation + run), then samples/s over the remaining batches (median of ``--repeats`` passes over them),
and whether every answer and every mask pixel equals the one-device run's.

The 8 simulated devices share this host's cores, so the mesh rows measure the cost of sharding (more, smaller
programs, collectives inside one process) and that the outputs do not change -- not a speed-up.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = (("1 device", None, 1), ("8 devices, data 8", '{"data": 8}', 8),
           ("8 devices, data 4 x tensor 2", '{"data": 4, "tensor": 2}', 8))


def _model(root: Path) -> Path:
    """A random-init tiny CALICO with its tokenizer, exported as the predictor loads it."""
    from calico_jax.checkpoints import converted as pretrained
    from calico_jax.core.tokens import SEG_TOKEN
    from calico_jax.data.tokenize import DEFAULT_CORPUS, build_tiny_tokenizer
    from calico_jax.models.calico import Calico, CalicoConfig

    tok = build_tiny_tokenizer(root / "tok", list(DEFAULT_CORPUS), vocab_size=256)
    base = CalicoConfig.tiny()
    cfg = base.replace(llm=base.llm.replace(vocab_size=len(tok)), cam=base.cam.replace(zero_init=False),
                       seg=base.seg.replace(token_id=tok.convert_tokens_to_ids(SEG_TOKEN), identifier_ids=()),
                       preprocess=base.preprocess.replace(mask_size=64))
    module = Calico(cfg)
    out = root / "model"
    out.mkdir()
    pretrained.write(out, "calico", cfg, pretrained.init_params(module, seed=3))
    tok.save_pretrained(str(out / "tokenizer"))
    return out


def worker(args) -> None:
    """One configuration: timings and a digest of every answer and mask, as JSON on stdout."""
    import numpy as np

    from calico_jax.inference.placement import parse_mesh
    from calico_jax.inference.predict import build_question
    from calico_jax.inference.predictor import load_predictor, plan_batches

    pred = load_predictor(args.ckpt, mesh=parse_mesh(args.mesh), max_new_tokens=args.max_new_tokens)
    rng = np.random.default_rng(0)
    samples = [([rng.integers(0, 256, (64, 48, 3), np.uint8), rng.integers(0, 256, (48, 64, 3), np.uint8)],
                build_question(2, "common-parts")) for _ in range(args.samples)]
    batches = plan_batches([2] * len(samples), args.batch_size)
    t0 = time.perf_counter()
    outs = pred.predict_batch([samples[i] for i in batches[0]], args.batch_size)
    first = time.perf_counter() - t0
    rates = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outs_rest = [p for b in batches[1:] for p in pred.predict_batch([samples[i] for i in b], args.batch_size)]
        rates.append(sum(len(b) for b in batches[1:]) / (time.perf_counter() - t0))
    digest = hashlib.sha256()
    for p in outs + outs_rest:
        digest.update(p.answer.encode())
        for m in p.masks:
            digest.update(f"{m.label}|{m.image}|".encode() + np.packbits(m.mask).tobytes())
    print(json.dumps({"first_batch_s": first, "samples_per_s": statistics.median(rates), "rates": rates,
                      "digest": digest.hexdigest(), "masks": sum(len(p.masks) for p in outs + outs_rest),
                      "devices": len(__import__("jax").devices())}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.inference_scale", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/inference_scale.md")
    ap.add_argument("--ckpt", default=None, help="model to run (default: a random tiny CALICO in a temp dir)")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--max_new_tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mesh", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or str(_model(Path(tmp)))
        rows = []
        for name, mesh, devices in CONFIGS:
            env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_COMPILATION_CACHE_DIR": str(Path(tmp) / "cache"),
                   "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
            cmd = [sys.executable, "-m", "bench.inference_scale", "--worker", "--ckpt", ckpt, "--samples",
                   str(args.samples), "--batch_size", str(args.batch_size), "--max_new_tokens",
                   str(args.max_new_tokens), "--repeats", str(args.repeats)] + (["--mesh", mesh] if mesh else [])
            r = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if r.returncode:
                print(r.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append((name, mesh, json.loads(r.stdout.strip().splitlines()[-1])))
            print(name, rows[-1][2], flush=True)
    ref = rows[0][2]["digest"]
    load = os.getloadavg()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    lines = ["# Inference at scale: 1 device vs a mesh of 8 simulated CPU devices", "",
             f"Host: {cpu}, {os.cpu_count()} cores; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
             f"(1/5/15 min) at the end (other jobs share the host). Model: "
             f"{'the tiny random-init CALICO' if not args.ckpt else args.ckpt}; {args.samples} two-image samples, "
             f"batch {args.batch_size}, {args.max_new_tokens} new tokens; `python -m bench.inference_scale`.", "",
             "| configuration | mesh | first batch (compile + run) | samples/s after it (median of "
             f"{args.repeats}) | answers and masks = 1 device |", "|---|---|---|---|---|"]
    for name, mesh, r in rows:
        lines.append(f"| {name} | `{mesh or '-'}` | {r['first_batch_s']:.1f} s | {r['samples_per_s']:.2f} "
                     f"({min(r['rates']):.2f}-{max(r['rates']):.2f}) | {'yes' if r['digest'] == ref else 'NO'} "
                     f"({r['masks']} masks) |")
    lines += ["", "The 8 devices are simulated on this host's cores: the mesh rows show that sharding leaves the "
              "outputs unchanged and what it costs here (per-device programs, collectives, padding each batch to "
              "a multiple of `data`), not a speed-up; on real accelerators each device has its own compute."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
