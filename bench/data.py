"""Input pipeline throughput (no PyTorch counterpart): samples/s of the grain loader on synthetic pairs, from the
JSON file and from its packed directory (``calico_jax.data.pack``). At MixedParts scale: ``bench/data_scale.py``."""
from __future__ import annotations

import functools
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.timing import Result
from calico_jax.core.preprocess import Preprocess
from calico_jax.data.pairs import read_pairs
from calico_jax.data.pipeline import Pipeline, PipelineConfig, measure_throughput
from calico_jax.data.tokenize import build_tiny_tokenizer, load_tokenizer


@functools.lru_cache(maxsize=1)
def _pairs() -> Path:
    d = Path(tempfile.mkdtemp(prefix="calico_bench_data_"))
    run = lambda *a: subprocess.run([sys.executable, "-m", *a], check=True, capture_output=True)  # noqa: E731
    run("calico_jax.data.synthetic", "--out", str(d / "syn"), "--num_images", "60", "--seed", "0")
    run("calico_jax.data.pairs", "--coco", str(d / "syn" / "annotations.json"), "--images", str(d / "syn" / "images"),
        "--out", str(d / "pairs.json"), "--seed", "0")
    run("calico_jax.data.pack", "--pairs", str(d / "pairs.json"), "--out", str(d / "packed"), "--quiet")
    return d / "pairs.json"


def data_pipeline(ctx) -> Result:
    """Batch 4, no workers: tiny shapes (SAM 128, no DINOv2) and 7B input shapes (SAM 1024, DINOv2 224)."""
    tok_dir = tempfile.mkdtemp()
    build_tiny_tokenizer(tok_dir, vocab_size=400)
    tok, pairs = load_tokenizer(tok_dir), read_pairs(_pairs())
    rates = {}
    for name, sam, dino in (("tiny", 128, None), ("7b", 1024, 256)):
        pre = Preprocess(sam_size=sam, mask_size=sam, dinov2_size=dino or 0, dinov2_crop=224 if dino else 0)
        cfg = PipelineConfig(batch_size=4, worker_count=0, preprocess=pre, max_tokens=512, num_epochs=None)
        rates[name] = measure_throughput(Pipeline(pairs, tok, cfg, 0, 1), num_batches=10)["samples_per_s"]
        if name == "tiny":
            packed = read_pairs(_pairs().parent / "packed")
            rates["packed"] = measure_throughput(Pipeline(packed, tok, cfg, 0, 1), num_batches=10)["samples_per_s"]
    ms_per_batch = 4 / rates["7b"] * 1e3
    return Result(name="data_pipeline", jax_ms=ms_per_batch, torch_ms=None, ratio=None, gflops=0.0,
                  limit_fraction=0.0, compile_s=0.0, jax_range_ms=(ms_per_batch, ms_per_batch),
                  note=f"samples/s: tiny shapes {rates['tiny']:.1f} (packed {rates['packed']:.1f}), "
                       f"7B input shapes {rates['7b']:.1f} "
                       "(batch 4, 0 workers); jax_ms = ms per 7B-shape batch")


ITEMS = {"data_pipeline": data_pipeline}
