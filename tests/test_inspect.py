"""``python -m convert inspect``: key tree, counts, dtypes and the family rule per group, without reading tensors,
on the first author's CALICO layout, GLaMM, LISA, InstructBLIP, an unknown layout and a mixed-dtype .bin."""
from __future__ import annotations

import json
import re

import flax.linen
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from calico_jax.checkpoints import converted as pretrained  # noqa: E402
from calico_jax.checkpoints import torch_export  # noqa: E402
from calico_jax.models.calico import Calico, CalicoConfig  # noqa: E402
from convert.inspect import group_of  # noqa: E402
from tests.helpers import run_convert  # noqa: E402


def inspect(*args):
    return run_convert("inspect", *args)


def groups(stdout: str) -> dict[str, tuple[int, str]]:
    """group -> (tensor count, the family line under it)."""
    out, current = {}, None
    for line in stdout.splitlines():
        m = re.match(r"^(\S+)\s+(\d+)\s+[\d,]+\s+\S+$", line)
        if m and not line.startswith(" "):
            current = m[1]
            out[current] = (int(m[2]), "")
        elif current and re.match(r"^    [\w-]+: ", line):
            out[current] = (out[current][0], line.strip())
    return out


@pytest.fixture(scope="module")
def author_dir(tmp_path_factory):
    cfg = CalicoConfig.tiny()
    shapes = flax.linen.unbox(pretrained.abstract_params(Calico(cfg)))
    params = jax.tree.map(lambda v: np.zeros(v.shape, np.float32), shapes)
    out = tmp_path_factory.mktemp("author") / "pt"
    torch_export.save(out, cfg, params, full=True, shard_bytes=100_000)   # several shards + index
    return out, params


def test_author_layout_all_matched(author_dir):
    out, params = author_dir
    rc, stdout, err = inspect(out)
    assert rc == 0, err
    assert "best matching family: calico" in stdout
    n = len(json.loads((out / "model.safetensors.index.json").read_text())["weight_map"])
    assert n < len(jax.tree.leaves(params)) - 16   # LoRA in adapter/; DINOv2 qkv and in_proj_bias fused
    assert f"calico: all {n} keys matched" in stdout
    assert re.search(r"\d+ file\(s\): model-00001-of-000(0[2-9]|1\d)\.safetensors", stdout)
    g = groups(stdout)
    for name, rule in (("model.Qformer", "qformer.* [Q-Former]"), ("model.dino_model", "dinov2.* [DINOv2]"),
                       ("model.extraction_layer", "cem.* [CEM (MultiheadAttention)]"),
                       ("model.adaptive_layers", "cam[0].* [CAM f_adaptation]"),
                       ("model.visual_encoder", "vision_model.* [EVA ViT]"), ("model.layers", "llm.* [LLaMA]")):
        assert rule in g[name][1], (name, g[name])
    assert all("UNMATCHED" not in line for _, line in g.values())
    assert sum(c for c, _ in g.values()) == n


def test_glamm_lisa_instructblip_layouts(tmp_path):
    from tests.test_convert_blip2 import hf_model
    from tests.test_convert_glamm import glamm_checkpoint
    glamm_checkpoint(tmp_path / "glamm", "glamm")
    glamm_checkpoint(tmp_path / "lisa", "lisa")
    hf_model("instructblip").save_pretrained(tmp_path / "iblip")
    for src, family, group, rule in (("glamm", "glamm", "model.grounding_encoder", "-> sam.*"),
                                     ("lisa", "glamm", "model.visual_model", "-> sam.*"),
                                     ("iblip", "hf-blip2", "qformer.encoder", "-> qformer.*")):
        rc, stdout, err = inspect(tmp_path / src)
        assert rc == 0, err
        assert f"best matching family: {family} " in stdout, stdout
        g = groups(stdout)
        assert rule in g[group][1], (src, g[group])
    rc, stdout, _ = inspect(tmp_path / "glamm", "--family", "glamm")
    assert "skipped: CLIP vision tower" in groups(stdout)["model.vision_tower"][1]
    rc, stdout, _ = inspect(tmp_path / "iblip", "--family", "calico")   # another family: unmatched groups named
    assert rc == 0 and re.search(r"calico: \d+ key\(s\) unmatched in \d+ group\(s\): .*language_model", stdout)


def test_unknown_layout_and_mixed_bin(tmp_path):
    from safetensors.numpy import save_file
    save_file({"encoder.blocks.0.w": np.zeros((2, 3), np.float32), "head.proj.weight": np.zeros(4, np.float16)},
              tmp_path / "x.safetensors")
    rc, stdout, err = inspect(tmp_path / "x.safetensors")
    assert rc == 0, err
    assert "best matching family: none" in stdout and "2 tensors, 10 parameters; dtypes: F32 1, F16 1" in stdout
    rc, stdout, _ = inspect(tmp_path / "x.safetensors", "--family", "glamm")
    assert rc == 0 and "glamm: 2 key(s) unmatched in 2 group(s): encoder.blocks, head.proj" in stdout
    torch.save({"model.mm_projector.weight": torch.zeros(3, 2, dtype=torch.bfloat16),
                "model.query_tokens": torch.zeros(1, 4, 2)}, tmp_path / "mixed.bin")
    rc, stdout, _ = inspect(tmp_path / "mixed.bin", "--family", "calico")
    assert rc == 0 and "dtypes: bfloat16 1, float32 1" in stdout and "calico: all 2 keys matched" in stdout
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00")
    rc, _, err = inspect(tmp_path / "bad.safetensors")
    assert rc == 2 and "truncated" in err


def test_group_of():
    assert group_of("base_model.model.model.layers.3.self_attn.q_proj.weight", 2) == "model.layers"
    assert group_of("lm_head.weight", 2) == "lm_head"
    key = "model.grounding_encoder.mask_decoder.iou_token.weight"
    assert group_of(key, 3) == "model.grounding_encoder.mask_decoder"


def test_reads_our_own_checkpoint_directory(tmp_path):
    cfg = CalicoConfig.tiny()
    shapes = flax.linen.unbox(pretrained.abstract_params(Calico(cfg)))
    params = jax.tree.map(lambda v: np.zeros(v.shape, np.float32), shapes)
    pretrained.save(tmp_path / "ours", "calico", cfg, params, source={"from": "test"})
    (tmp_path / "ours" / "tokenizer").mkdir()
    (tmp_path / "ours" / "tokenizer" / "tokenizer.model").write_bytes(b"x")
    rc, stdout, err = inspect(tmp_path / "ours", "--depth", "1")
    assert rc == 0, err
    n = len(jax.tree.leaves(params))
    total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))
    assert "calico_jax checkpoint" in stdout and "model 'calico'" in stdout and '"from": "test"' in stdout
    assert f"{n} tensors, {total:,} parameters" in stdout
    assert "tokenizer/: tokenizer.model" in stdout
    top = {k for k in params}
    assert set(groups(stdout)) == top
    (tmp_path / "ours" / "params" / "_METADATA").unlink()       # broken metadata: one line, exit 2
    rc, _, err = inspect(tmp_path / "ours")
    assert rc == 2 and "cannot read the orbax metadata" in err
