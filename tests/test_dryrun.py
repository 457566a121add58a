"""train.py --dry_run: output format, counts against a real init, FLOPs that respond to the shapes, and
the glamm_like (CLIP + MLP projector) comparison config."""
import re
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import pytest

from calico_jax.core.params import count_params
from calico_jax.models.cam import CamConfig
from calico_jax.models.cem import CemConfig
from calico_jax.models.clip import ClipVisionConfig
from calico_jax.plans.dryrun import PAPER_SHAPES, dry_run
from calico_jax.train.config import load

ROOT = Path(__file__).resolve().parents[1]
TINY_CLIP = {"image_size": 28, "patch_size": 7, "hidden_size": 20, "intermediate_size": 40, "num_hidden_layers": 2,
             "num_attention_heads": 2}
LINE = re.compile(r"^(params_total|params_trainable|trainable_fraction|forward_tflops)=(\S+)$")


def tiny_glamm():
    """configs/glamm_like.py's switches on the tiny model (tiny sizes, a tiny CLIP, no DINOv2 input)."""
    cfg, tiny = load(ROOT / "configs/glamm_like.py"), load(ROOT / "configs/tiny.py")
    model = tiny.model.replace(image_path="clip_mlp", cam=CamConfig(layers=()), cem=CemConfig(enabled=False),
                               clip=ClipVisionConfig().replace(**TINY_CLIP),
                               preprocess=tiny.model.preprocess.replace(dinov2_size=0, dinov2_crop=0))
    return cfg.replace(model=model, dtype="float32", frozen_dtype="float32", data=tiny.data)


def test_cli_format_tiny():
    r = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py", "--dry_run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if LINE.match(ln)]
    assert [LINE.match(ln).group(1) for ln in lines] == ["params_total", "params_trainable", "trainable_fraction",
                                                        "forward_tflops"], r.stdout
    vals = {LINE.match(ln).group(1): LINE.match(ln).group(2) for ln in lines}
    total, trainable = int(vals["params_total"]), int(vals["params_trainable"])
    assert 0 < trainable < total
    assert float(vals["trainable_fraction"]) == pytest.approx(100 * trainable / total, rel=1e-5)
    assert float(vals["forward_tflops"]) > 0

    # the counts are those of a real init of the same model with the paper's trainable patterns
    cfg = load(ROOT / "configs/tiny.py")
    from calico_jax.models.calico import Calico
    from calico_jax.train.config import PAPER_TRAINABLE
    module = Calico(cfg.model)
    params = module.init(jax.random.key(1), module.dummy_inputs())["params"]
    assert count_params(params, PAPER_TRAINABLE) == (total, trainable)


def test_flops_follow_shapes():
    cfg = load(ROOT / "configs/tiny.py")
    base = dry_run(cfg, verbose=False)
    longer = dry_run(cfg, verbose=False, shapes=dict(PAPER_SHAPES, text_tokens=256))
    assert longer["forward_tflops"] > base["forward_tflops"]
    assert longer["params_total"] == base["params_total"]


def test_glamm_like_tiny(capsys):
    cfg = tiny_glamm()
    mcfg = cfg.model
    assert (mcfg.image_path, mcfg.cam.layers, mcfg.cem.enabled, mcfg.num_image_tokens) == ("clip_mlp", (), False, 16)
    report = dry_run(cfg)
    out = capsys.readouterr().out.splitlines()
    assert [ln.split("=")[0] for ln in out] == list(report)
    from calico_jax.models.calico import Calico
    module = Calico(mcfg)
    params = nn.unbox(module.init(jax.random.key(0), module.dummy_inputs())["params"])
    assert "vision_tower" in params and "qformer" not in params and "query_tokens" not in params
    assert count_params(params, cfg.recipe.trainable) == (report["params_total"], report["params_trainable"])
    assert report["forward_tflops"] > 0


def test_glamm_like_7b_config():
    mcfg = load(ROOT / "configs/glamm_like.py").model
    assert mcfg.image_path == "clip_mlp" and mcfg.num_image_tokens == 576 and mcfg.cam.layers == ()
    assert (mcfg.clip.hidden_size, mcfg.llm.hidden_size, mcfg.clip.select_layer) == (1024, 4096, -2)
    assert mcfg.preprocess.blip_size == 336 and mcfg.preprocess.dinov2_size == 0
