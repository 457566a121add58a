"""Shared test helpers: PyTorch fixtures (tiny, randomised) and running the converter CLI in-process."""
from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np


def segment_anything_modeling():
    """``segment_anything.modeling`` without its torchvision-importing package ``__init__``
    (one copy of the loader lives in convert/families/sam.py, which ``--verify`` uses)."""
    from convert.families.sam import segment_anything_modeling as load

    return load()


def randomize(module, seed: int = 0, std: float = 0.1) -> None:
    """Replaces every float tensor of the state dict (parameters and persistent buffers) with random
    values, so zero- or one-initialised paths (LayerNorm scale/bias, layer-scale, rel-pos tables,
    position embeddings) are exercised. 1-D tensors named like norm weights are centred on 1.
    Non-persistent buffers (e.g. LLaMA's RoPE ``inv_freq``) are derived from the config and kept."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict(keep_vars=True).items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g, dtype=torch.float32) * std
            leaf = name.rsplit(".", 1)[-1]
            centre = 1.0 if (t.ndim == 1 and leaf in ("weight", "gamma", "lambda1")) else 0.0
            t.copy_((noise + centre).to(t.dtype))


def rel_err(a, b) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b.detach().numpy() if hasattr(b, "detach") else b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def flat(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """Nested param dict -> {"a/b/c": array}."""
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in flat(sub, f"{prefix}{key}/").items()}
    return {prefix[:-1]: np.asarray(tree)}


def assert_bit_equal_reload(path, cfg, params) -> None:
    """The checkpoint at ``path`` loads with config ``cfg`` and every parameter of ``params`` bit for bit."""
    import calico_jax

    _, loaded, loaded_cfg = calico_jax.load(path)
    assert loaded_cfg == cfg
    want, got = flat(params), flat(loaded)
    assert set(want) == set(got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def run_convert(*argv: str) -> tuple[int, str, str]:
    """Runs ``python -m convert ARGV`` in this process; returns (exit code, stdout, stderr)."""
    from convert.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:  # argparse errors
            rc = int(e.code or 0)
    return rc, out.getvalue(), err.getvalue()


def nothing_at(path: Path) -> bool:
    """No OUT and no leftover temporary siblings."""
    path = Path(path)
    return not path.exists() and not any(p.name.startswith(f".{path.name}.") for p in path.parent.iterdir())


def synthetic_pairs(d: Path, num_images: int, *pair_args: str):
    """A synthetic part set of ``num_images`` under ``d``, its pairs file ``d/p.json`` (seed 0, extra builder
    arguments ``pair_args``) and a tiny tokenizer trained on it: ``(pairs, tokenizer)``."""
    from calico_jax.data import pairs, synthetic
    from calico_jax.data.tokenize import build_tiny_tokenizer, load_tokenizer

    ann = synthetic.generate(d / "syn", num_images, seed=0, progress=False)
    assert pairs.main(["--coco", str(ann), "--images", str(d / "syn" / "images"), "--out", str(d / "p.json"),
                       "--seed", "0", *pair_args]) == 0
    p = pairs.read_pairs(d / "p.json")
    build_tiny_tokenizer(d / "tok", [s["prompt"] + " " + s["answer"] for s in p.samples], vocab_size=400)
    return p, load_tokenizer(d / "tok")


def pipeline_batches(pipe, n: int | None = None) -> list:
    """The first ``n`` batches of a data pipeline (all with None), its iterator closed afterwards."""
    it = iter(pipe.dataset())
    try:
        return [b for _, b in zip(range(n) if n else iter(int, 1), it)]
    finally:
        it.close()
