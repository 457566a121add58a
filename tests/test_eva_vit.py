"""EvaVit (EVA-CLIP ViT-g, BLIP-2's 𝓒) against HF Blip2VisionModel on tiny random configs."""
import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.torch import save_file  # noqa: E402

from calico_jax.checkpoints.converted import abstract_params  # noqa: E402
from calico_jax.checkpoints.torch_files import open_checkpoint  # noqa: E402
from calico_jax.core.config import ConfigError  # noqa: E402
from calico_jax.models.eva_vit import EvaVit, EvaVitConfig  # noqa: E402
from convert.families.blip2 import component_plan  # noqa: E402
from convert.mapping import build_params  # noqa: E402
from tests.helpers import randomize, rel_err  # noqa: E402

# Odd head counts (3 heads of 12, 5 heads of 8), no qkv bias, a non-default LN eps.
CONFIGS = {
    "h36x3": dict(hidden_size=36, intermediate_size=50, num_hidden_layers=2, num_attention_heads=3, image_size=28,
                  patch_size=7),
    "h40x5-nobias": dict(hidden_size=40, intermediate_size=64, num_hidden_layers=3, num_attention_heads=5,
                         image_size=24, patch_size=4, qkv_bias=False, layer_norm_eps=1e-5),
}


def hf_vision(name, seed=0):
    model = transformers.Blip2VisionModel(transformers.Blip2VisionConfig(**CONFIGS[name])).eval()
    randomize(model, seed=seed)
    return model


def convert(model, tmp_path):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path)
    plan = component_plan(ckpt, "eva_vit", EvaVitConfig.from_hf_config(model.config))
    assert not plan.unexpected
    return plan.config, build_params(ckpt, plan, progress=False)


def run_both(model, cfg, params, size, seed=0):
    h, w = size
    x = np.random.default_rng(seed).standard_normal((2, 3, h, w)).astype(np.float32)
    ref = model(pixel_values=torch.from_numpy(x), interpolate_pos_encoding=True)
    ours = jax.jit(EvaVit(cfg).apply)({"params": params}, x.transpose(0, 2, 3, 1))
    return ours, ref


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_parity_native_and_interpolated(name, tmp_path):
    model = hf_vision(name)
    cfg, params = convert(model, tmp_path)
    p = cfg.patch_size
    native = cfg.image_size
    # native, upsampled square, downsampled square, non-square grid (and a non-multiple of the patch)
    for size in [(native, native), (native + 2 * p, native + 2 * p), (native - p, native - p),
                 (native + 2 * p + 3, native - p)]:
        ours, ref = run_both(model, cfg, params, size)
        assert ours["last_hidden_state"].shape == tuple(ref.last_hidden_state.shape)
        assert rel_err(ours["last_hidden_state"], ref.last_hidden_state) <= 1e-5, (name, size)
        assert rel_err(ours["pooler_output"], ref.pooler_output) <= 1e-5, (name, size)


def test_k_bias_is_dropped_exactly(tmp_path):
    """The fixture's fused bias has a random (non-zero) K third; we keep only q/v bias, and the output
    still matches, because a K bias shifts each query row's logits by a constant."""
    model = hf_vision("h36x3", seed=1)
    d = model.config.hidden_size
    assert model.encoder.layers[0].self_attn.qkv.bias[d:2 * d].abs().max() > 0.01
    cfg, params = convert(model, tmp_path)
    assert "k_bias" not in params["encoder"]["layers_0"]["self_attn"]
    ours, ref = run_both(model, cfg, params, (cfg.image_size, cfg.image_size))
    assert rel_err(ours["last_hidden_state"], ref.last_hidden_state) <= 1e-5


def test_interpolation_is_not_a_no_op(tmp_path):
    """Guards the parity test above: at another resolution, a plain crop of the table (what HF does
    without interpolate_pos_encoding) gives a clearly different answer."""
    model = hf_vision("h36x3")
    cfg, params = convert(model, tmp_path)
    x = np.random.default_rng(0).standard_normal((1, 3, 21, 21)).astype(np.float32)
    ref = model(pixel_values=torch.from_numpy(x), interpolate_pos_encoding=False).last_hidden_state
    ours = jax.jit(EvaVit(cfg).apply)({"params": params}, x.transpose(0, 2, 3, 1))["last_hidden_state"]
    assert rel_err(ours, ref) > 1e-2


def test_post_layernorm_eps_is_separate(tmp_path):
    model = hf_vision("h36x3")
    cfg, params = convert(model, tmp_path)
    lavis_like = cfg.replace(post_layernorm_eps=1e-5)
    model.post_layernorm.eps = 1e-5
    x = np.random.default_rng(0).standard_normal((1, 3, 28, 28)).astype(np.float32)
    ref = model(pixel_values=torch.from_numpy(x)).last_hidden_state
    ours = jax.jit(EvaVit(lavis_like).apply)({"params": params}, x.transpose(0, 2, 3, 1))["last_hidden_state"]
    assert rel_err(ours, ref) <= 1e-5


def test_configs():
    hf = transformers.Blip2VisionConfig(**CONFIGS["h40x5-nobias"])
    cfg = EvaVitConfig.from_hf_config(hf)
    assert cfg == EvaVitConfig.from_hf_config(hf.to_dict())
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.qkv_bias, cfg.layer_norm_eps, cfg.post_layernorm_eps) == (
        40, 5, False, 1e-5, 1e-5)
    g = EvaVitConfig.from_lavis()  # create_eva_vit_g: int(1408 * 4.3637) == 6144, ln_vision eps 1e-5
    assert (g.intermediate_size, g.post_layernorm_eps, g.layer_norm_eps) == (6144, 1e-5, 1e-6)
    assert g.replace(post_layernorm_eps=1e-6) == EvaVitConfig()
    assert EvaVitConfig.from_dict(g.to_dict()) == g
    with pytest.raises(ConfigError, match="not divisible"):
        EvaVitConfig(hidden_size=36, num_attention_heads=5)


def test_every_param_has_logical_axes():
    cfg = EvaVitConfig(**{k: v for k, v in CONFIGS["h36x3"].items()})
    leaves = jax.tree.leaves(abstract_params(EvaVit(cfg)), is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)
    # full size: the HF parameter count (985,952,256 incl. the K third, 39 * 1408 zeros) without K bias
    full = abstract_params(EvaVit(EvaVitConfig()))
    assert sum(np.prod(x.shape) for x in jax.tree.leaves(nn.unbox(full))) == 985_952_256 - 39 * 1408
