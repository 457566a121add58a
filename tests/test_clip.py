"""ClipVision (LLaVA/GLaMM's CLIP tower, hidden_states[select_layer] patch tokens) against HF CLIPVisionModel."""
import math

import flax
import flax.linen  # noqa: F401
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from calico_jax.checkpoints.converted import abstract_params  # noqa: E402
from calico_jax.core.config import ConfigError  # noqa: E402
from calico_jax.models.clip import ClipVision, ClipVisionConfig  # noqa: E402
from calico_jax.models.inputs import CalicoInputs  # noqa: E402
from convert.mapping import flax_path, to_flax  # noqa: E402
from tests.helpers import randomize, rel_err  # noqa: E402

# (HF config, select_layer): LLaVA's -2 with 3 heads of 12; the last state (-1) and a positive index
# with 5 heads of 8, a non-default eps and exact gelu.
CONFIGS = {
    "h36x3-sel-2": (dict(hidden_size=36, intermediate_size=50, num_hidden_layers=3, num_attention_heads=3,
                         image_size=28, patch_size=7), -2),
    "h40x5-sel-1-gelu": (dict(hidden_size=40, intermediate_size=64, num_hidden_layers=2, num_attention_heads=5,
                              image_size=24, patch_size=4, layer_norm_eps=1e-6, hidden_act="gelu"), -1),
    "h40x5-sel1": (dict(hidden_size=40, intermediate_size=64, num_hidden_layers=3, num_attention_heads=5,
                        image_size=24, patch_size=6), 1),
}


def to_params(state_dict, cfg):
    """HF keys (``vision_model.`` stripped) -> our tree; the layers after select_layer and post_layernorm
    are not parameters of ours."""
    want = flax.traverse_util.flatten_dict(flax.linen.unbox(abstract_params(ClipVision(cfg))))
    out = {}
    for key, t in state_dict.items():
        key = key.removeprefix("vision_model.")
        if key.startswith("post_layernorm") or (key.startswith("encoder.layers.")
                                               and int(key.split(".")[2]) >= cfg.layers_used):
            continue
        prefix, leaf = flax_path(key)
        names = ("kernel", "scale", "embedding") if leaf == "weight" else (leaf,)
        path = next(prefix + (n,) for n in names if prefix + (n,) in want)
        out[path] = to_flax(path[-1], t.detach().numpy())
        assert out[path].shape == tuple(want[path].shape), (key, out[path].shape)
    assert set(out) == set(want), set(want) ^ set(out)
    return flax.traverse_util.unflatten_dict(out)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity(name):
    hf_cfg, select = CONFIGS[name]
    model = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**hf_cfg)).eval()
    randomize(model, seed=1)
    cfg = ClipVisionConfig.from_hf_config(model.config, select_layer=select)
    assert cfg.layer_norm_eps == hf_cfg.get("layer_norm_eps", 1e-5)
    params = to_params(model.state_dict(), cfg)
    x = np.random.default_rng(0).standard_normal((2, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    with torch.no_grad():
        ref = model(pixel_values=torch.from_numpy(x), output_hidden_states=True).hidden_states[select][:, 1:]
    ours = jax.jit(ClipVision(cfg).apply)({"params": params}, x.transpose(0, 2, 3, 1))
    assert ours.shape == (2, cfg.num_patches, cfg.hidden_size)
    err = rel_err(ours, ref)
    print(f"{name}: rel_err={err:.3g}")
    assert err <= 1e-5
    # the selected layer matters: the next state differs
    if select == -2:
        with torch.no_grad():
            nxt = model(pixel_values=torch.from_numpy(x), output_hidden_states=True).hidden_states[-1][:, 1:]
        assert rel_err(ours, nxt) > 1e-2


def test_defaults_and_errors():
    cfg = ClipVisionConfig()
    assert (cfg.num_patches, cfg.layers_used, cfg.hidden_act, cfg.layer_norm_eps) == (576, 23, "quick_gelu", 1e-5)
    with pytest.raises(ConfigError, match="select_layer"):
        ClipVisionConfig(num_hidden_layers=2, select_layer=-5)
    tiny = ClipVisionConfig(image_size=14, patch_size=7, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                            num_attention_heads=2)
    params = ClipVision(tiny).init(jax.random.key(0), **ClipVision(tiny).dummy_inputs())
    with pytest.raises(ValueError, match="expected 14"):
        ClipVision(tiny).apply(params, np.zeros((1, 21, 21, 3), np.float32))


def glamm_tiny():
    from calico_jax.models.calico import CalicoConfig
    from calico_jax.models.cam import CamConfig
    from calico_jax.models.cem import CemConfig
    clip = ClipVisionConfig(image_size=28, patch_size=7, hidden_size=20, intermediate_size=40, num_hidden_layers=2,
                            num_attention_heads=2)
    return CalicoConfig.tiny(image_path="clip_mlp", clip=clip, cam=CamConfig(layers=()), cem=CemConfig(enabled=False))


def test_calico_clip_mlp_forward():
    """The glamm_like image path: S_I = 16 CLIP patch tokens -> GELU MLP projector, spliced into the LLM."""
    from calico_jax.checkpoints.converted import init_params
    from calico_jax.models.calico import Calico
    cfg = glamm_tiny()
    model = Calico(cfg)
    params = init_params(model, seed=3)
    assert {"vision_tower", "mm_projector_0", "mm_projector_2"} <= set(params)
    assert not {"qformer", "query_tokens", "vision_model", "language_projection", "cem", "dinov2"} & set(params)
    assert params["mm_projector_0"]["kernel"].shape == (20, 48) and params["mm_projector_2"]["kernel"].shape == (48, 48)

    rng = np.random.default_rng(0)
    px = rng.standard_normal((2, 28, 28, 3)).astype(np.float32)
    feats, tokens = model.apply({"params": params}, px, method=Calico.encode_images)
    clip_out = ClipVision(cfg.clip).apply({"params": params["vision_tower"]}, px)
    np.testing.assert_allclose(feats, clip_out, rtol=0, atol=0)
    p0, p2 = params["mm_projector_0"], params["mm_projector_2"]
    h = np.asarray(clip_out, np.float64) @ np.asarray(p0["kernel"], np.float64) + np.asarray(p0["bias"])
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))        # exact GELU (LLaVA mlp2x_gelu)
    ref = h @ np.asarray(p2["kernel"], np.float64) + np.asarray(p2["bias"])
    assert tokens.shape == (2, 16, 48) and rel_err(tokens, ref) <= 1e-5

    # two images in one sample: the expanded sequence holds 16 tokens per image, and they matter
    ids = np.array([[1, -200, 7, -200, 8, 60, 61, 62]], np.int32)
    kw = dict(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=px[None],
              sam_pixel_values=rng.standard_normal((1, 2, 32, 32, 3)).astype(np.float32),
              resized_hw=np.full((1, 2, 2), 32, np.int32), mask_hw=np.full((1, 2, 2), 32, np.int32))
    fwd = jax.jit(lambda p, **k: model.apply({"params": p}, CalicoInputs(**k)))
    out = fwd(params, **kw)
    assert out["logits"].shape == (1, 8 + 2 * 15, 64)
    np.testing.assert_array_equal(out["image_positions"][0], [np.arange(1, 17), np.arange(18, 34)])
    assert out["mask_logits"].shape == (1, 4, 40, 40) and bool(out["seg_valid"][0, 0])
    assert np.all(np.isfinite(out["logits"]))
    out2 = fwd(params, **dict(kw, pixel_values=px[None, ::-1]))
    assert float(np.max(np.abs(out2["logits"][0, -1] - out["logits"][0, -1]))) > 1e-4


def test_clip_mlp_rejects_cams():
    from calico_jax.models.calico import CalicoConfig
    with pytest.raises(ConfigError, match="clip_mlp"):
        CalicoConfig.tiny(image_path="clip_mlp")
    with pytest.raises(ConfigError, match="image_path"):
        CalicoConfig.tiny(image_path="clip")
