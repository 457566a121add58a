"""Reading an exported model in one process of a job of several (evaluation split over processes).

:func:`calico_jax.checkpoints.converted.load` lets orbax restore as the job: its restore meets every process in a
device collective and refuses a checkpoint saved on another device topology. A process that predicts on its own
devices needs neither, so here orbax is limited to this process and restores onto its first local device (the
predictor then places the weights on its mesh). The params are checked against the model's abstract params as
``load`` does (and stacked for a scanned config).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import SingleDeviceSharding

from calico_jax import models
from calico_jax.checkpoints import converted as pretrained


def load_in_process(path: str | Path) -> tuple[nn.Module, Any, Any]:
    """``(module, params, config)`` of a converted/exported checkpoint, read by this process alone."""
    import orbax.checkpoint as ocp  # heavy; only this path needs it

    path = Path(path).absolute()
    meta = pretrained.read_meta(path)
    module, config = models.build(meta["model"], meta["config"])
    options = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={jax.process_index()},
                                                 barrier_sync_key_prefix=f"calico_p{jax.process_index()}")
    device = SingleDeviceSharding(jax.local_devices()[0])
    with ocp.StandardCheckpointer(multiprocessing_options=options) as ckptr:
        stored = ckptr.metadata(path / "params")
        tree = getattr(stored, "item_metadata", stored)
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), tree)
        params = ckptr.restore(path / "params", target)
    return module, pretrained.checked_params(path, meta["model"], module, config, params), config
