"""Logical axis names on every parameter of every registered model, mapped through the one rules
table onto an 8-device Auto mesh: golden specs, and sharded forwards equal to unsharded ones."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from calico_jax import models
from calico_jax.checkpoints import converted as pretrained
from calico_jax.parallel import sharding

KNOWN = {name for name, _ in sharding.RULES}


@pytest.mark.parametrize("name", sorted(models.REGISTRY))
def test_every_param_has_known_logical_axes(name):
    module_cls, config_cls = models.classes(name)
    boxed = pretrained.abstract_params(module_cls(config_cls()))  # full-size config, shapes only
    leaves = jax.tree_util.tree_leaves_with_path(boxed, is_leaf=lambda v: isinstance(v, nn.Partitioned))
    assert leaves
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path)
        assert isinstance(leaf, nn.Partitioned), f"{name}{where} has no logical axis names"
        assert len(leaf.names) == leaf.value.ndim, where
        assert set(leaf.names) - {None} <= KNOWN, f"{name}{where}: {leaf.names} not in the rules table"


def test_mesh_is_auto_and_fills():
    mesh = sharding.make_mesh({"data": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="need 6 devices"):
        sharding.make_mesh({"data": 3, "tensor": 2})
    with pytest.raises(ValueError, match="unknown axis"):
        sharding.make_mesh({"model": 8})


def test_golden_specs_llama():
    from calico_jax.models.llama import LlamaConfig, LlamaForCausalLM
    specs = sharding.logical_specs(pretrained.abstract_params(LlamaForCausalLM(LlamaConfig())))
    layer = specs["model"]["layers_0"]
    assert layer["self_attn"]["q_proj"]["kernel"] == P("fsdp", "tensor")
    assert layer["self_attn"]["o_proj"]["kernel"] == P("tensor", "fsdp")
    assert layer["mlp"]["down_proj"]["kernel"] == P("tensor", "fsdp")
    assert specs["model"]["embed_tokens"]["embedding"] == P("tensor", "fsdp")


def _tiny(name):
    """Tiny configs whose sharded dims divide the 2x2x2 mesh."""
    if name == "eva_vit":
        from calico_jax.models.eva_vit import EvaVitConfig
        return EvaVitConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4)
    from calico_jax.models.llama import LlamaConfig
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("name", ["eva_vit", "llama"])
def test_sharded_forward_equals_unsharded(name):
    module_cls, _ = models.classes(name)
    module = module_cls(_tiny(name))
    params = pretrained.init_params(module, seed=1)
    inputs = jax.tree.map(lambda x: jnp.asarray(np.random.default_rng(0).integers(0, 64, x.shape), x.dtype)
                          if jnp.issubdtype(x.dtype, jnp.integer)
                          else jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), x.dtype),
                          module.dummy_inputs())
    def first(out):  # EvaVit returns a dict, LLaMA a LlamaOutput(logits, hidden, cache)
        return out["last_hidden_state"] if isinstance(out, dict) else out.logits

    expected = first(module.apply({"params": params}, **inputs))
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = sharding.param_shardings(pretrained.abstract_params(module), mesh)
    sharded = jax.device_put(params, shardings)
    assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated for x in jax.tree.leaves(sharded))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        got = first(jax.jit(lambda p, kw: module.apply({"params": p}, **kw))(sharded, inputs))
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-5)
