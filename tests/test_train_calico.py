"""configs/tiny.py end to end (the real tiny CALICO, loss and grain pipeline on a synthetic set), 2 steps
on a (data 2, fsdp 2, tensor 2) mesh: every required metric is logged and finite; only the paper's
trainable set (LoRA, CEM, CAMs, mask decoder) changes and has optimizer state; every frozen weight
is bit-identical to its initial value; the checkpoint holds the trainable leaves only, and
:func:`calico_jax.checkpoints.workdir.restore_workdir` rebuilds the full final params from it without training code."""
import json

import jax
import numpy as np

from calico_jax.checkpoints.training import Checkpointer
from calico_jax.checkpoints.workdir import restore_workdir
from calico_jax.core.params import combine
from calico_jax.train import config as config_lib
from calico_jax.train.loop import train
from calico_jax.train.trainer import load_frozen

REQUIRED = ("step", "loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "lr", "grad_norm", "step_time_s")


def test_tiny_calico_trains_frozen_stay_bit_identical(tmp_path, monkeypatch):
    cfg = config_lib.load("configs/tiny.py", [("total_steps", "2"), ("checkpoint_every", "2"), ("progress", "false"),
                                              ("data.synthetic.num_images", "12"),
                                              ("mesh", '{"data": 2, "fsdp": 2, "tensor": 2}')])
    out = train(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert all(k in r and np.isfinite(r[k]) for k in REQUIRED), r
        assert r["num_masks"] > 0 and r["mask_bce_loss"] > 0 and r["ce_loss"] > 0
    trainable = {"/".join(str(getattr(k, "key", k)) for k in path)
                 for path, _ in jax.tree_util.tree_leaves_with_path(out["state"]["params"])}
    assert any("lora_a" in k for k in trainable) and any(k.startswith("cem/") for k in trainable)
    assert any(k.startswith("cam_") for k in trainable) and any(k.startswith("sam/mask_decoder/") for k in trainable)
    assert not any(k.startswith(("vision_model/", "qformer/", "dinov2/", "sam/image_encoder/")) for k in trainable)
    # Frozen: bit-identical to a fresh init from the same seed (what the checkpoint references).
    tr = out["trainer"]
    (init_state, init_frozen), _ = load_frozen(tr)
    frozen_leaves = jax.tree.leaves(out["frozen"])
    assert len(frozen_leaves) > 100
    for x, y in zip(frozen_leaves, jax.tree.leaves(init_frozen)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    changed = [not np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(out["state"]["params"]), jax.tree.leaves(init_state["params"]))]
    assert sum(changed) > len(changed) // 2
    n_train = sum(x.size for x in jax.tree.leaves(out["state"]["params"]))
    assert sum(x.size for x in jax.tree.leaves(out["state"]["opt_state"])) == 2 * n_train + 2
    # The checkpoint restores the trainable state only (no frozen weight is stored).
    ck = Checkpointer(tmp_path / "checkpoints")
    with tr.context():
        restored, meta = ck.restore_step(2, tr.abstract_state, None)
    ck.close()
    assert meta["frozen_source"] == {"kind": "init", "seed": 0}
    assert sum(x.size for x in jax.tree.leaves(restored["params"])) == n_train
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(out["state"])):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    # Restoring outside training (no optimizer, no mesh): trainable leaves of the newest step over the frozen
    # weights rebuilt from the seed = the run's final params, bit for bit.
    monkeypatch.chdir(tmp_path.parent)
    run = restore_workdir(tmp_path.name)                 # a relative workdir, as users type it
    assert run.step == 2 and run.config == tr.task.model_config and run.tokenizer_dir == tmp_path / "data" / "tokenizer"
    full = combine(out["state"]["params"], out["frozen"])
    assert jax.tree.structure(run.params) == jax.tree.structure(full)
    for x, y in zip(jax.tree.leaves(run.params), jax.tree.leaves(full)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
