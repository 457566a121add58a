"""``python -m convert sam|hf-sam``: end-to-end --verify, GLaMM/LISA merged checkpoints, load(), bad inputs."""
import json
import re

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import calico_jax  # noqa: E402
from calico_jax.checkpoints.torch_files import open_checkpoint  # noqa: E402
from calico_jax.models.sam import SamConfig  # noqa: E402
from convert.families.sam import SAM, infer_preset  # noqa: E402
from tests.helpers import nothing_at, rel_err, run_convert  # noqa: E402
from tests.test_sam import CONFIG_A, CONFIG_B, TOL, hf_fixture, original_fixture  # noqa: E402

PASS = re.compile(r"^verify: max_rel_err=(\S+) \(tol 1e-05\) PASS$", re.M)


def test_cli_sam_verify_and_load(tmp_path):
    ref, config, _, pth = original_fixture(tmp_path, CONFIG_A)
    out = tmp_path / "out"
    rc, stdout, stderr = run_convert("sam", "--src", pth, "--out", out, "--config", tmp_path / "config.json",
                                     "--verify")
    assert rc == 0, stderr
    assert float(PASS.search(stdout).group(1)) <= TOL
    for name in ("image_embeddings", "points: low_res_masks", "box: iou_predictions", "mask+points: low_res_masks",
                 "text_embeds: low_res_masks"):
        assert f"  {name} " in stdout
    module, params, loaded = calico_jax.load(out)
    assert loaded == config
    pixels = np.random.default_rng(5).normal(size=(1, 3, 64, 64)).astype(np.float32)
    pts, labels = np.array([[[10.0, 50.0], [33.0, 2.0]]], np.float32), np.array([[1, 0]])
    got = module.apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)), points=jnp.asarray(pts),
                       labels=jnp.asarray(labels), multimask_output=True)
    with torch.no_grad():
        emb = ref.image_encoder(torch.from_numpy(pixels))
        sparse, dense = ref.prompt_encoder(points=(torch.from_numpy(pts), torch.from_numpy(labels)), boxes=None,
                                           masks=None)
        masks, iou = ref.mask_decoder(emb, ref.prompt_encoder.get_dense_pe(), sparse, dense, True)
    assert rel_err(got["low_res_masks"], masks) <= TOL and rel_err(got["iou_predictions"], iou) <= TOL


def _merged(state, prefix):
    """A merged GLaMM/LISA-style state dict: SAM under ``prefix`` beside LLM / projector weights."""
    merged = {prefix + k: v for k, v in state.items()}
    merged.update({"model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8), "lm_head.weight": torch.randn(5, 8),
                   "model.text_hidden_fcs.0.0.weight": torch.randn(8, 8)})
    return merged


def test_cli_glamm_merged_safetensors(tmp_path):
    from safetensors.torch import save_file

    ref, config, _, _ = original_fixture(tmp_path, CONFIG_B, seed=3)
    src = tmp_path / "glamm.safetensors"
    save_file(_merged(ref.state_dict(), "model.grounding_encoder."), src)
    rc, stdout, stderr = run_convert("sam", "--src", src, "--out", tmp_path / "out", "--config",
                                     tmp_path / "config.json", "--verify")
    assert rc == 0, stderr
    assert PASS.search(stdout)
    assert "skipped 3 key(s): not under 'model.grounding_encoder.'" in stdout


def test_lisa_prefix_and_pixel_buffers(tmp_path):
    ref, config, _, _ = original_fixture(tmp_path, CONFIG_A)
    state = _merged(ref.state_dict(), "model.visual_model.")
    state["model.visual_model.pixel_mean"] = torch.zeros(3, 1, 1)
    torch.save({"state_dict": state}, tmp_path / "lisa.pth")  # wrapped, as training scripts save
    plan = SAM.plan(open_checkpoint(tmp_path / "lisa.pth"), str(tmp_path / "config.json"))
    assert set(plan.tensors) == set(ref.state_dict()) and not plan.unexpected
    assert sorted(plan.skipped.values()) == [1, 3]


def test_cli_hf_sam_verify_and_load(tmp_path):
    model, directory = hf_fixture(tmp_path / "hf", 1e-5, seed=1)
    out = tmp_path / "out"
    rc, stdout, stderr = run_convert("hf-sam", "--src", directory, "--out", out, "--verify")
    assert rc == 0, stderr
    assert float(PASS.search(stdout).group(1)) <= TOL
    module, params, _ = calico_jax.load(out)
    pixels = np.random.default_rng(6).normal(size=(1, 3, 48, 48)).astype(np.float32)
    boxes = np.array([[4.0, 8.0, 30.0, 40.0], [0.0, 0.0, 47.0, 47.0]], np.float32)
    got = module.apply({"params": params}, jnp.asarray(pixels.transpose(0, 2, 3, 1)), boxes=jnp.asarray(boxes))
    with torch.no_grad():
        want = model(pixel_values=torch.from_numpy(pixels), input_boxes=torch.from_numpy(boxes)[None],
                     multimask_output=False)
    assert rel_err(got["low_res_masks"], want.pred_masks[0]) <= TOL
    assert rel_err(got["iou_predictions"], want.iou_scores[0]) <= TOL


@pytest.fixture
def sam_pth(tmp_path):
    ref, _, _, pth = original_fixture(tmp_path, CONFIG_A)
    return ref.state_dict(), tmp_path


def _convert_bad(tmp_path, state, *extra):
    torch.save(state, tmp_path / "bad.pth")
    out = tmp_path / "out"
    rc, stdout, stderr = run_convert("sam", "--src", tmp_path / "bad.pth", "--out", out, *extra)
    assert rc == 2, stdout + stderr
    assert "Traceback" not in stderr
    assert nothing_at(out)
    return stderr


def test_renamed_key(sam_pth):
    state, tmp = sam_pth
    state["image_encoder.blocks.1.attn.qkv_w.weight"] = state.pop("image_encoder.blocks.1.attn.qkv.weight")
    err = _convert_bad(tmp, state, "--config", tmp / "config.json")
    assert "image_encoder.blocks.1.attn.qkv_w.weight" in err  # unexpected
    assert "image_encoder.blocks.1.attn.qkv.weight" in err    # missing


def test_wrong_shape(sam_pth):
    state, tmp = sam_pth
    state["mask_decoder.iou_token.weight"] = torch.zeros(1, 15)
    err = _convert_bad(tmp, state, "--config", tmp / "config.json")
    assert "mask_decoder.iou_token.weight (1, 15): expected (1, 32)" in err


def test_no_preset_matches_without_config(sam_pth):
    state, tmp = sam_pth
    err = _convert_bad(tmp, state)
    assert "embed_dim=30, depth=3 matches no preset" in err and "--config" in err


def test_bad_config_field(sam_pth):
    state, tmp = sam_pth
    bad = json.loads((tmp / "config.json").read_text())
    bad["mask_decoder"]["transformer"]["heads"] = 2
    (tmp / "bad_config.json").write_text(json.dumps(bad))
    err = _convert_bad(tmp, state, "--config", tmp / "bad_config.json")
    assert "heads" in err and "transformer" in err


def test_not_a_sam_checkpoint(sam_pth):
    _, tmp = sam_pth
    err = _convert_bad(tmp, {"encoder.weight": torch.zeros(2)}, "--config", "vit_b")
    assert "no SAM keys found" in err


def test_truncated_safetensors_hf(tmp_path):
    _, directory = hf_fixture(tmp_path / "hf", 1e-6)
    path = directory / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    rc, stdout, stderr = run_convert("hf-sam", "--src", directory, "--out", out)
    assert rc == 2 and "truncated" in stderr and "model.safetensors" in stderr
    assert nothing_at(out)


def test_hf_sam_needs_config_json(tmp_path):
    _, directory = hf_fixture(tmp_path / "hf", 1e-6)
    (directory / "config.json").unlink()
    out = tmp_path / "out"
    rc, _, stderr = run_convert("hf-sam", "--src", directory, "--out", out)
    assert rc == 2 and "config.json" in stderr
    assert nothing_at(out)


class _Shapes:
    """Just enough of calico_jax.checkpoints.torch_files.Checkpoint for architecture inference."""

    def __init__(self, shapes):
        self.path, self._shapes = "stub.pth", shapes

    def keys(self):
        return list(self._shapes)

    def __contains__(self, key):
        return key in self._shapes

    def shape(self, key):
        return self._shapes[key]


@pytest.mark.parametrize("name,dim,depth", [("vit_b", 768, 12), ("vit_l", 1024, 24), ("vit_h", 1280, 32)])
def test_infer_preset(name, dim, depth):
    prefix = "model.grounding_encoder."
    shapes = {prefix + "image_encoder.patch_embed.proj.weight": (dim, 3, 16, 16)}
    shapes.update({f"{prefix}image_encoder.blocks.{i}.norm1.weight": (dim,) for i in range(depth)})
    assert infer_preset(_Shapes(shapes), prefix) == name
    assert SamConfig.preset(name).image_encoder.embed_dim == dim
