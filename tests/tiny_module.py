"""A minimal registered model (conv -> LayerNorm -> Linear) for testing the conversion framework alone."""
import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from calico_jax.core.config import Config
from calico_jax.models import layers


@dataclasses.dataclass(frozen=True)
class TinyConfig(Config):
    width: int = 4
    out: int = 3


class Tiny(nn.Module):
    config: TinyConfig

    def dummy_inputs(self):
        return {"x": jnp.zeros((1, 3, 3, 2))}

    @nn.compact
    def __call__(self, x):
        x = layers.conv(self.config.width, 2, name="proj")(x)
        x = layers.layer_norm(1e-5, name="norm")(x)
        return layers.dense(self.config.out, ("embed", "mlp"), name="fc")(x)
