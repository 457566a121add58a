"""SAM parity: calico_jax.models.sam vs segment-anything on tiny random configs (HF: test_sam_hf.py,
converter CLI: test_sam_convert.py); the fixture builders here are shared with those files."""
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from calico_jax.checkpoints.converted import abstract_params  # noqa: E402
from calico_jax.checkpoints.torch_files import open_checkpoint  # noqa: E402
from calico_jax.core.config import ConfigError  # noqa: E402
from calico_jax.models.sam import PRESETS, Sam, SamConfig  # noqa: E402
from calico_jax.models.sam.image_encoder import get_rel_pos  # noqa: E402
from convert.families.sam import SAM, build_original, compare_original  # noqa: E402
from convert.mapping import build_params, flax_path  # noqa: E402
from tests.helpers import randomize, rel_err, segment_anything_modeling  # noqa: E402

try:
    segment_anything_modeling()
except ImportError as e:  # the package __init__ needs torchvision; the loader avoids it
    pytest.skip(str(e), allow_module_level=True)

TOL = 1e-5

# A: grid 8 not divisible by window 3 (pads to 9), odd head count (3), global block in the middle,
#    mlp_ratio 2, narrow mask_in_chans (LayerNorm2d over 2 channels).
#    The decoder is 32 wide, not narrower: with transformer_dim 16 the upscaling LayerNorm2d normalises
#    over 4 channels and amplifies fp32 round-off of its input ~40x, so that torch fp32 itself is up to
#    9e-6 (relative) away from a float64 run of the same weights, and two correct fp32 implementations
#    can differ by 1.8e-5. Such a fixture measures rounding luck, not fidelity.
CONFIG_A = {
    "image_encoder": dict(img_size=64, patch_size=8, embed_dim=30, depth=3, num_heads=3, mlp_ratio=2.0,
                          out_chans=32, use_rel_pos=True, window_size=3, global_attn_indexes=[1]),
    "prompt_encoder": dict(embed_dim=32, image_embedding_size=[8, 8], input_image_size=[64, 64], mask_in_chans=8),
    "mask_decoder": dict(transformer_dim=32, num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=12,
                         transformer=dict(depth=2, embedding_dim=32, num_heads=2, mlp_dim=24)),
}
# B: 96 px / patch 16 (grid 6, window 4 pads to 8), 5 heads, two global blocks, no abs pos, no qkv bias,
#    3 TwoWay layers without attention downsampling, 2 multimask outputs, a 2-layer IoU head.
CONFIG_B = {
    "image_encoder": dict(img_size=96, patch_size=16, embed_dim=40, depth=3, num_heads=5, mlp_ratio=3.0,
                          out_chans=24, qkv_bias=False, use_abs_pos=False, use_rel_pos=True, window_size=4,
                          global_attn_indexes=[0, 2]),
    "prompt_encoder": dict(embed_dim=24, image_embedding_size=[6, 6], input_image_size=[96, 96], mask_in_chans=12),
    "mask_decoder": dict(transformer_dim=24, num_multimask_outputs=2, iou_head_depth=2, iou_head_hidden_dim=20,
                         transformer=dict(depth=3, embedding_dim=24, num_heads=3, mlp_dim=40,
                                          attention_downsample_rate=1)),
}


def scale_up(decoder, factor=3.0):
    """Std-0.1 weights shrink activations through the ReLU MLPs of the IoU head and the hypernetworks
    until only their last biases are left (mask logits ~1e-2, at fp32 round-off of the upscaling);
    larger weights keep the IoU and mask comparisons meaningful."""
    for mlp in [decoder.iou_prediction_head, *decoder.output_hypernetworks_mlps]:
        for p in mlp.parameters():
            p.mul_(factor)


def original_fixture(tmp_path, config_dict, seed=0):
    """A randomised segment-anything Sam, its state dict saved to tmp_path, and the converted params."""
    config = SamConfig.from_original(config_dict)
    ref = build_original(config)
    randomize(ref, seed=seed)
    with torch.no_grad():  # the real table is N(0, 1) (scale 1), not the std-0.1 noise of randomize
        gaussian = ref.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        gaussian.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
        scale_up(ref.mask_decoder)
    path = tmp_path / "sam.pth"
    torch.save(ref.state_dict(), path)
    (tmp_path / "config.json").write_text(json.dumps(config_dict))
    ckpt = open_checkpoint(path)
    plan = SAM.plan(ckpt, str(tmp_path / "config.json"))
    return ref, plan.config, build_params(ckpt, plan, progress=False), path


def hf_fixture(tmp_path, decoder_eps, seed=0):
    from transformers import SamConfig as HFSamConfig
    from transformers import SamModel

    hf_config = HFSamConfig(
        vision_config=dict(hidden_size=24, num_hidden_layers=2, num_attention_heads=3, image_size=48, patch_size=8,
                           window_size=4, global_attn_indexes=[1], output_channels=16, num_pos_feats=8, mlp_dim=40),
        prompt_encoder_config=dict(hidden_size=16, image_size=48, patch_size=8, mask_input_channels=8,
                                   layer_norm_eps=1e-5),
        mask_decoder_config=dict(hidden_size=16, mlp_dim=32, num_hidden_layers=2, num_attention_heads=2,
                                 iou_head_hidden_dim=12, iou_head_depth=4, layer_norm_eps=decoder_eps))
    model = SamModel(hf_config).eval()
    randomize(model, seed=seed)
    with torch.no_grad():
        model.shared_image_embedding.positional_embedding.normal_(0, 1, generator=torch.Generator().manual_seed(seed))
        scale_up(model.mask_decoder)
    model.save_pretrained(tmp_path)
    return model, tmp_path


def check(comparisons, n):
    assert len(comparisons) == n
    worst = max(comparisons, key=lambda c: c.max_rel)
    print("\n".join(f"{c.name}: {c.max_rel:.2e}" for c in comparisons))
    assert worst.max_rel <= TOL, worst


@pytest.mark.parametrize("config_dict", [CONFIG_A, CONFIG_B], ids=["A", "B"])
def test_parity_original(tmp_path, config_dict):
    ref, config, params, _ = original_fixture(tmp_path, config_dict)
    # image embeddings, then masks + IoU for points, box, points+box, mask+points, text_embeds
    check(compare_original(ref, Sam(config), params), 11)


def test_prompt_encoder_and_dense_pe(tmp_path):
    ref, config, params, _ = original_fixture(tmp_path, CONFIG_A, seed=1)
    module, v = Sam(config), {"params": params}
    pe = np.asarray(module.apply(v, method="dense_pe")).transpose(0, 3, 1, 2)
    assert rel_err(pe, ref.prompt_encoder.get_dense_pe()) <= TOL
    g = np.random.default_rng(0)
    pts = g.uniform(0, 64, (2, 3, 2)).astype(np.float32)
    labels = np.array([[1, 0, -1], [0, 0, 1]])
    boxes = g.uniform(0, 64, (2, 4)).astype(np.float32)
    masks = g.normal(0, 2, (2, 1, 32, 32)).astype(np.float32)
    for kw in (dict(points=pts, labels=labels), dict(boxes=boxes), dict(points=pts, labels=labels, boxes=boxes),
               dict(masks=masks)):
        t = {k: torch.from_numpy(x) for k, x in kw.items()}
        sparse, dense = ref.prompt_encoder(points=(t["points"], t["labels"]) if "points" in t else None,
                                           boxes=t.get("boxes"), masks=t.get("masks"))
        j = {k: jnp.asarray(x.transpose(0, 2, 3, 1) if k == "masks" else x) for k, x in kw.items()}
        sparse_j, dense_j = module.apply(v, method="encode_prompts", **j)
        assert sparse_j.shape == tuple(sparse.shape)
        if sparse.numel():
            assert rel_err(sparse_j, sparse) <= TOL, kw.keys()
        assert rel_err(np.asarray(dense_j).transpose(0, 3, 1, 2), dense) <= TOL, kw.keys()
    # GLaMM/LISA [SEG] prompt alone: batch from text_embeds, tokens appended without PE
    text = g.normal(size=(4, 1, 32)).astype(np.float32)
    sparse_j, dense_j = module.apply(v, method="encode_prompts", text_embeds=jnp.asarray(text))
    np.testing.assert_array_equal(np.asarray(sparse_j), text)
    assert dense_j.shape == (4, 8, 8, 32)
    np.testing.assert_array_equal(np.asarray(dense_j[3, 5, 2]), ref.prompt_encoder.no_mask_embed.weight[0].numpy())


def test_prompts_of_several_images(tmp_path):
    """Prompts of two images in one call (each image's prompts contiguous) == the original per-image loop."""
    ref, config, params, _ = original_fixture(tmp_path, CONFIG_B, seed=2)
    module, v = Sam(config), {"params": params}
    g = np.random.default_rng(1)
    pixels = g.normal(size=(2, 3, 96, 96)).astype(np.float32)
    pts = g.uniform(0, 96, (4, 2, 2)).astype(np.float32)
    labels = np.array([[1, 1], [0, 1], [1, -1], [1, 0]])
    out = module.apply(v, jnp.asarray(pixels.transpose(0, 2, 3, 1)), points=jnp.asarray(pts),
                       labels=jnp.asarray(labels), multimask_output=True)
    with torch.no_grad():
        emb = ref.image_encoder(torch.from_numpy(pixels))
        for i in range(2):
            sl = slice(2 * i, 2 * i + 2)
            sparse, dense = ref.prompt_encoder(points=(torch.from_numpy(pts[sl]), torch.from_numpy(labels[sl])),
                                               boxes=None, masks=None)
            masks, iou = ref.mask_decoder(emb[i:i + 1], ref.prompt_encoder.get_dense_pe(), sparse, dense, True)
            assert masks.shape == (2, 2, 24, 24)
            assert rel_err(out["low_res_masks"][sl], masks) <= TOL
            assert rel_err(out["iou_predictions"][sl], iou) <= TOL


def test_postprocess_masks(tmp_path):
    ref, config, _, _ = original_fixture(tmp_path, CONFIG_A)
    module = Sam(config)
    masks = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
    # crop to the resized (unpadded) input, then one side down- and one side up-sampled
    for input_size, original_size in (((48, 64), (37, 90)), ((64, 40), (130, 21))):
        want = ref.postprocess_masks(torch.from_numpy(masks), input_size, original_size)
        got = module.apply({}, jnp.asarray(masks), input_size, original_size, method="postprocess")
        assert got.shape == tuple(want.shape)
        assert rel_err(got, want) <= TOL


@pytest.mark.parametrize("q,k,length", [(6, 6, 7), (6, 6, 15), (4, 6, 11), (5, 3, 9)])
def test_get_rel_pos(q, k, length):
    """Table lengths != 2*max(q,k)-1 are linearly resized (F.interpolate 'linear'); q != k rescales coords."""
    sm = segment_anything_modeling()
    table = np.random.default_rng(0).normal(size=(length, 5)).astype(np.float32)
    want = sm.image_encoder.get_rel_pos(q, k, torch.from_numpy(table))
    got = get_rel_pos(q, k, jnp.asarray(table))
    assert got.shape == tuple(want.shape)
    assert rel_err(got, want) <= 1e-6


def test_patch_conv_transpose_matches_conv_transpose2d():
    """Two nested layers.PatchConvTranspose (torch (in,out,kh,kw) -> (2,3,1,0)), interleaved once at the end
    with layers.interleave_patches == two ConvTranspose2d(kernel 2, stride 2) applied one after the other."""
    from calico_jax.models import layers

    conv1, conv2 = torch.nn.ConvTranspose2d(6, 4, kernel_size=2, stride=2), torch.nn.ConvTranspose2d(4, 3, 2, 2)
    randomize(conv1, seed=4, std=1.0)
    randomize(conv2, seed=5, std=1.0)
    x = np.random.default_rng(0).normal(size=(2, 6, 5, 3)).astype(np.float32)

    def params(conv):
        return {"params": {"kernel": conv.weight.detach().numpy().transpose(2, 3, 1, 0),
                           "bias": conv.bias.detach().numpy()}}

    one = layers.PatchConvTranspose(4, 2).apply(params(conv1), jnp.asarray(x.transpose(0, 2, 3, 1)))
    assert one.shape == (2, 5, 3, 2, 2, 4)
    two = layers.PatchConvTranspose(3, 2).apply(params(conv2), one)              # [2, 5, 3, 2, 2, 2, 2, 3]
    with torch.no_grad():
        want1 = conv1(torch.from_numpy(x))
        want2 = conv2(want1)
    assert rel_err(layers.interleave_patches(jnp.moveaxis(one, -1, 1), levels=1), want1) <= 1e-6
    assert rel_err(layers.interleave_patches(jnp.moveaxis(two, -1, 1), levels=2), want2) <= 1e-6


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_match_original_state_dict(name):
    """Every key of build_sam_<name>() (meta device) maps onto the Flax tree with the right shape."""
    config = SamConfig.preset(name)
    with torch.device("meta"):
        ref = build_original(config)
    boxed = abstract_params(Sam(config))
    leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert all(isinstance(x, nn.Partitioned) and len(x.names) == x.value.ndim for x in leaves)  # logical axes
    flat = {tuple(k.key for k in p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(nn.unbox(boxed))}
    seen = set()
    for key, t in ref.state_dict().items():
        prefix, leaf = flax_path(key)
        names = ("kernel", "scale", "embedding") if leaf == "weight" else (leaf,)
        path = next(prefix + (n,) for n in names if prefix + (n,) in flat)
        shape = tuple(t.shape)
        want = shape[::-1] if len(shape) == 2 and path[-1] == "kernel" else (
            tuple(shape[i] for i in (2, 3, 1, 0)) if len(shape) == 4 and path[-1] == "kernel" else shape)
        assert tuple(flat[path]) == want, key
        seen.add(path)
    assert seen == set(flat)
    if name == "vit_h":  # sam_vit_h_4b8939.pth: 594 state-dict tensors, 641,090,864 elements
        assert len(flat) == 594 and sum(int(np.prod(s)) for s in flat.values()) == 641_090_864


def test_config_errors():
    with pytest.raises(ConfigError, match="window"):
        SamConfig.from_original({**CONFIG_A, "image_encoder": {**CONFIG_A["image_encoder"], "window": 3}})
    with pytest.raises(ConfigError, match="widths must be equal"):
        SamConfig.from_original({**CONFIG_A, "prompt_encoder": {**CONFIG_A["prompt_encoder"], "embed_dim": 48}})
    with pytest.raises(ConfigError, match="transformer"):
        SamConfig.from_original({**CONFIG_A, "mask_decoder": {"transformer_dim": 16}})
    with pytest.raises(ConfigError, match="image_embedding_size"):
        SamConfig.from_original({**CONFIG_A, "prompt_encoder": {**CONFIG_A["prompt_encoder"],
                                                                "image_embedding_size": [4, 4]}})
    config = SamConfig.from_original(CONFIG_B)
    assert SamConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert config.image_encoder.global_attn_indexes == (0, 2) and config.mask_decoder.transformer.norm_eps == 1e-5
