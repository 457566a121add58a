"""Per-tower rematerialisation (``remat`` field of each tower's config, ``CalicoConfig.with_remat``): parameter
paths, shapes, logical axes and init values do not change; gradients of the tiny CALICO loss (w.r.t.
every parameter, so the frozen towers' backward runs too) equal the no-remat ones; each tower's policy
shows up in the traced program as one checkpoint per block call, with that policy."""
import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from calico_jax.core.config import ConfigError
from calico_jax.models import layers
from calico_jax.models.calico import REMAT_TOWERS, Calico, CalicoConfig
from calico_jax.train import config as config_lib
from calico_jax.train.losses import calico_loss
from tests.test_calico import apply, make_batch

TOWERS = REMAT_TOWERS


def remat_cfg(base: CalicoConfig, **policies) -> CalicoConfig:
    return base.with_remat(**{t: policies.get(t, "none") for t in TOWERS})


def all_towers(policy):
    return {t: policy for t in TOWERS}


def gt_masks(cfg, b=2):
    r = np.random.default_rng(3)
    gt = np.zeros((b, cfg.seg.max_seg, *cfg.mask_size), np.float32)
    for i in range(b):
        for k in range(cfg.seg.max_seg):
            y0, x0 = r.integers(0, 15, 2)
            gt[i, k, y0:y0 + 12, x0:x0 + 14] = 1
    return jnp.asarray(gt)


def checkpoints(jaxpr) -> list:
    """Every checkpoint (remat) equation, recursively through nested jaxprs (pjit, custom_vjp, ...)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
            found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += checkpoints(sub)
    return found


def small_config() -> CalicoConfig:
    """CalicoConfig.tiny with fewer blocks per tower (compile time): EVA, DINOv2, Q-Former and SAM 1, LLaMA 2
    with a CAM at layer 1."""
    t = CalicoConfig.tiny()
    v, ie = t.vision, t.sam.image_encoder
    return t.replace(vision=v.replace(vision=v.vision.replace(num_hidden_layers=1),
                                      qformer=v.qformer.replace(num_hidden_layers=1)),
                     dinov2=t.dinov2.replace(num_hidden_layers=1), llm=t.llm.replace(num_hidden_layers=2),
                     cam=t.cam.replace(layers=(1,)),
                     sam=t.sam.replace(image_encoder=ie.replace(depth=2, global_attn_indexes=(1,))))


@pytest.fixture(scope="module")
def setup():
    """Small config, its batch and random params (every leaf non-zero, so every tower gets a gradient)."""
    base = small_config()
    batch = {k: jnp.asarray(v) for k, v in make_batch(base, seed=2).items()}
    m = Calico(base)
    shapes = nn.unbox(jax.eval_shape(m.init, jax.random.key(0), m.dummy_inputs())["params"])
    leaves, tree = jax.tree.flatten(shapes)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [0.1 * jax.random.normal(k, x.shape, x.dtype) + (x.ndim == 1)
                                       for k, x in zip(keys, leaves)])
    return base, batch, params, grads_for(base, batch, params, gt_masks(base))


def grads_for(cfg, batch, params, gt):
    m = Calico(cfg)

    def loss_fn(p):
        out = apply(m, p, batch, deterministic=False, rngs={"dropout": jax.random.key(5)})
        return calico_loss(out, gt)[0]

    return jax.jit(jax.value_and_grad(loss_fn))(params)


def test_param_tree_identical_with_any_policy():
    """Paths, shapes, dtypes and logical axis names of every tower (CLIP via image_path='clip_mlp')."""
    def tree(cfg):
        m = Calico(cfg)
        boxed = jax.eval_shape(m.init, jax.random.key(0), m.dummy_inputs())["params"]
        return jax.tree_util.tree_map_with_path(
            lambda path, x: (jax.tree_util.keystr(path), x.value.shape, x.value.dtype, x.names), boxed,
            is_leaf=lambda x: isinstance(x, nn.Partitioned))

    for base in (CalicoConfig.tiny(), CalicoConfig.tiny(image_path="clip_mlp", cam=CalicoConfig.tiny().cam.replace(
            layers=()), clip=CalicoConfig().clip.replace(image_size=28, hidden_size=16, intermediate_size=32,
                                                         num_hidden_layers=3, num_attention_heads=2))):
        ref = tree(base)
        assert len(jax.tree.leaves(ref, is_leaf=lambda x: isinstance(x, tuple))) > 100
        for policy in ("full", "dots", "dots_no_batch"):
            assert tree(remat_cfg(base, **all_towers(policy))) == ref, policy


def test_init_values_identical():
    """Same RNG streams under remat: a converted or saved checkpoint and a fresh init agree either way."""
    from calico_jax.models.llama import LlamaForCausalLM
    cfg = CalicoConfig.tiny().llm
    init = lambda c: nn.unbox(jax.jit(LlamaForCausalLM(c).init)(  # noqa: E731
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    ref, got = init(cfg), init(cfg.replace(remat="full"))
    assert jax.tree.structure(got) == jax.tree.structure(ref)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# Two assignments that give every policy to two towers, the LLM and the Q-Former (the towers CALICO's
# trainable set backpropagates through) included.
ASSIGNMENTS = [{"vision": "full", "dinov2": "dots", "qformer": "dots_no_batch", "llm": "full", "sam": "dots"},
               {"vision": "dots_no_batch", "dinov2": "full", "qformer": "dots", "llm": "dots_no_batch",
                "sam": "full"}]


@pytest.mark.parametrize("assignment", ASSIGNMENTS, ids=["A", "B"])
def test_gradients_equal_no_remat(setup, assignment):
    base, batch, params, (loss0, g0) = setup
    loss1, g1 = grads_for(remat_cfg(base, **assignment), batch, params, gt_masks(base))
    np.testing.assert_allclose(float(loss1), float(loss0), rtol=1e-6)
    flat0 = dict(jax.tree_util.tree_leaves_with_path(g0))
    flat1 = dict(jax.tree_util.tree_leaves_with_path(g1))
    for tower in ("vision_model", "qformer", "dinov2", "llm", "sam/image_encoder"):   # every tower has a gradient
        assert any(tower in jax.tree_util.keystr(k, simple=True, separator="/") and float(jnp.abs(v).max()) > 0
                   for k, v in flat0.items()), tower
    # Per leaf, relative to its own largest gradient; leaves whose gradient is analytically zero (the CEM
    # key bias: softmax cancels it) hold rounding noise, compared against 1e-3 of the largest gradient.
    floor = 1e-3 * max(float(jnp.abs(v).max()) for v in flat0.values())
    for k, v0 in flat0.items():
        v0, v1 = np.asarray(v0), np.asarray(flat1[k])
        scale = max(float(np.abs(v0).max()), floor)
        assert float(np.abs(v1 - v0).max()) <= 1e-5 * scale, jax.tree_util.keystr(k)


# tower -> checkpointed block calls in one forward of small_config(): EVA 1 layer; DINOv2 1; Q-Former 1 layer x
# (image encoding + the CAM at LLM layer 1); LLaMA 2; SAM image encoder 2.
CALLS = {"vision": 1, "dinov2": 1, "qformer": 2, "llm": 2, "sam": 2}


@pytest.mark.parametrize("tower", TOWERS)
def test_policy_reaches_the_program_per_tower(setup, tower):
    base, batch, params, _ = setup
    policy = {"vision": "full", "dinov2": "dots", "qformer": "dots_no_batch", "llm": "dots", "sam": "full"}[tower]
    m = Calico(remat_cfg(base, **{tower: policy}))
    jaxpr = jax.make_jaxpr(lambda p: apply(m, p, batch))(params).jaxpr
    found = checkpoints(jaxpr)
    assert len(found) == CALLS[tower], (tower, len(found))
    assert all(e.params["policy"] is layers.REMAT_POLICIES[policy] for e in found)
    assert not checkpoints(jax.make_jaxpr(lambda p: apply(Calico(base), p, batch))(params).jaxpr)


def test_model_config_maps_towers_and_rejects_unknown():
    cfg = config_lib.load("configs/tiny.py", [("model.llm.remat", "dots"), ("model.sam.image_encoder.remat", "full")])
    mcfg = cfg.model
    assert (mcfg.llm.remat, mcfg.sam.image_encoder.remat, mcfg.vision.vision.remat, mcfg.vision.qformer.remat,
            mcfg.dinov2.remat) == ("dots", "full", "none", "none", "none")
    assert mcfg.remat_policies()["llm"] == "dots"
    with pytest.raises(ConfigError, match="unknown remat policy 'dot'"):
        config_lib.load("configs/tiny.py", [("model.llm.remat", "dot")])
    with pytest.raises(ConfigError, match="unknown tower"):
        CalicoConfig.tiny().with_remat(eva="full")
    with pytest.raises(ValueError, match="remat policy 'x' for EvaBlock unknown"):
        from calico_jax.models.eva_vit import EvaBlock
        layers.remat_block(EvaBlock, "x")
