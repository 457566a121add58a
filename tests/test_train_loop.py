"""Train loop on the stand-in task (8 simulated CPU devices): a sharded step equals the single-device
step; frozen leaves bit-identical and without optimizer state; gradient accumulation equals one big
batch; NaN batches are skipped, counted and stop the run after K in a row; restore onto other meshes
and device counts continues the run; a corrupt newest checkpoint falls back to the previous one."""
import json
import shutil
import warnings

import jax
import numpy as np
import optax
import pytest

from calico_jax.checkpoints.training import Checkpointer
from calico_jax.core import params as state_lib
from calico_jax.core.config import split_overrides
from calico_jax.parallel.sharding import make_mesh
from calico_jax.train import config as config_lib
from calico_jax.train import optim
from calico_jax.train.loop import NonFiniteError, train
from calico_jax.train.tasks import build as build_task
from calico_jax.train.trainer import build, load_frozen

TOY = "tests/toy_config.py"
EXACT = ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "lr", "grad_norm")


def cfg_(**over):
    return config_lib.load(TOY, [(k, v if isinstance(v, str) else json.dumps(v)) for k, v in over.items()])


def read_metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def trace(workdir):
    return {r["step"]: tuple(r[k] for k in EXACT) for r in read_metrics(workdir)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted 12-step run on the (data 4, fsdp 2) mesh."""
    wd = tmp_path_factory.mktemp("ref")
    out = train(cfg_(mesh={"data": 4, "fsdp": 2, "tensor": 1}), wd)
    return wd, out


def test_sharded_step_equals_single_device(tmp_path):
    a = train(cfg_(mesh={"data": 2, "fsdp": 2, "tensor": 2}, total_steps=4), tmp_path / "a")
    one = cfg_(num_devices=1, mesh={"data": 1}, total_steps=4)
    b = train(one, tmp_path / "b")
    ta, tb = trace(tmp_path / "a"), trace(tmp_path / "b")
    assert sorted(ta) == [1, 2, 3, 4]
    np.testing.assert_allclose(np.array(list(ta.values())), np.array(list(tb.values())), rtol=1e-5)
    # Params really sharded over fsdp/tensor on the 8-device run, and equal to the 1-device run.
    kernel = a["state"]["params"]["head_text"]["kernel"]
    assert len(kernel.sharding.device_set) == 8 and kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # Compared as updates (trained - initial). Sharding reorders fp32 sums, and Adam divides each gradient by
    # its own running RMS, so an element whose gradient is a near-cancelling sum moves slightly differently
    # (seen on an AVX2 host: 5.7e-7 on a 0.03 update; the leaf's update agreed to 5e-7 in norm). A sharding
    # bug (a missing reduction, a wrong batch split) changes the updates by O(1).
    (init, _), _ = load_frozen(build(one, build_task(one), make_mesh(one.mesh, jax.devices()[:1])))
    for x, y, y0 in zip(*(jax.tree.leaves(t) for t in (a["state"]["params"], b["state"]["params"], init["params"]))):
        x, y, y0 = (np.asarray(v, np.float64) for v in (x, y, y0))
        assert np.linalg.norm(x - y) <= 1e-5 * np.linalg.norm(y - y0)
        assert np.abs(x - y).max() <= 1e-4 * np.abs(y - y0).max()


def test_tensorboard_scalars_written(reference):
    wd, _ = reference
    events = list((wd / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    data = events[0].read_bytes()
    for tag in (b"loss", b"ce_loss", b"lr", b"grad_norm", b"step_time_s"):
        assert tag in data


def test_frozen_bit_identical_trainable_updated_and_no_frozen_opt_state(reference):
    wd, out = reference
    cfg = cfg_(mesh={"data": 4, "fsdp": 2, "tensor": 1})
    tr = build(cfg, build_task(cfg), make_mesh(cfg.mesh))
    (init_state, init_frozen), source = load_frozen(tr)
    assert source == {"kind": "init", "seed": 0}
    assert set(out["frozen"]) == {"tower_up", "tower_down"}
    for x, y in zip(jax.tree.leaves(out["frozen"]), jax.tree.leaves(init_frozen)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
    assert set(out["state"]["params"]) == {"lora_a", "lora_b", "head_text", "head_mask"}
    for x, y in zip(jax.tree.leaves(out["state"]["params"]), jax.tree.leaves(init_state["params"])):
        assert not np.array_equal(np.asarray(x), np.asarray(y))
    # Adam moments exist for the trainable leaves only (no frozen-sized state anywhere).
    n_train = sum(x.size for x in jax.tree.leaves(out["state"]["params"]))
    n_opt = sum(x.size for x in jax.tree.leaves(out["state"]["opt_state"]))
    assert n_opt == 2 * n_train + 2   # mu, nu + the adam and schedule step counters (clip is stateless)


def test_grad_accum_equals_one_big_batch(tmp_path):
    over = dict(total_steps=3, batch_size=16, mesh={"data": 4, "fsdp": 2}, **{"model.noise": "false"})
    a = train(cfg_(**over), tmp_path / "a")
    b = train(cfg_(**over, **{"optim.grad_accum": 2}), tmp_path / "b")
    np.testing.assert_allclose(np.array(list(trace(tmp_path / "a").values())),
                               np.array(list(trace(tmp_path / "b").values())), rtol=2e-5)
    for x, y in zip(jax.tree.leaves(a["state"]["params"]), jax.tree.leaves(b["state"]["params"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)


def test_nonfinite_batch_is_skipped_counted_then_stops(tmp_path):
    ref = train(cfg_(total_steps=4, **{"data.nan_steps": "9"}), tmp_path / "ref")   # NaN never reached
    out = train(cfg_(total_steps=4, **{"data.nan_steps": "3"}), tmp_path / "a")
    rows = read_metrics(tmp_path / "a")
    assert out["skipped"] == 1 and [r["skipped"] for r in rows] == [0, 0, 1, 1]
    assert not np.isfinite(rows[2]["loss"]) and np.isfinite(rows[3]["loss"])
    assert trace(tmp_path / "a")[2] == trace(tmp_path / "ref")[2]
    # The skipped step left params and optimizer state untouched: 3 clean steps == steps 1, 2, 4 here.
    three = train(cfg_(total_steps=3, **{"data.nan_steps": "9", "optim.decay": "constant"}), tmp_path / "c")
    skip = train(cfg_(total_steps=4, **{"data.nan_steps": "3", "optim.decay": "constant"}), tmp_path / "d")
    assert int(skip["state"]["opt_state"][1][0].count) == int(three["state"]["opt_state"][1][0].count) == 3
    with pytest.raises(NonFiniteError, match="3 in a row"):
        train(cfg_(total_steps=8, max_consecutive_nonfinite=3, **{"data.nan_steps": "2,3,4"}), tmp_path / "e")
    with pytest.raises(NonFiniteError, match="1 in a row"):
        train(cfg_(total_steps=8, skip_nonfinite=False, **{"data.nan_steps": "2"}), tmp_path / "f")
    del ref


@pytest.mark.parametrize("target", [{"num_devices": 8, "mesh": {"data": 8, "fsdp": 1}},
                                    {"num_devices": 4, "mesh": {"data": 1, "fsdp": 4}},
                                    {"num_devices": 1, "mesh": {"data": 1}}], ids=["8x1", "fsdp4", "1dev"])
def test_restore_on_another_mesh_continues(reference, tmp_path, target):
    ref_wd, ref_out = reference
    wd = tmp_path / "wd"
    shutil.copytree(ref_wd / "checkpoints", wd / "checkpoints")
    for step in (12,):    # drop the last checkpoint: resume from step 8 on the new mesh
        shutil.rmtree(wd / "checkpoints" / str(step))
    # Restored values equal the saved ones exactly, now laid out on the new mesh.
    cfg = cfg_(**target)
    mesh = make_mesh(cfg.mesh, jax.devices()[:cfg.num_devices])
    tr = build(cfg, build_task(cfg), mesh)
    ck = Checkpointer(wd / "checkpoints")
    with tr.context():
        got, meta = ck.restore_step(8, tr.abstract_state, None)
    ck.close()
    ck_ref = Checkpointer(ref_wd / "checkpoints")
    ref_tr = build(cfg_(mesh={"data": 4, "fsdp": 2, "tensor": 1}), build_task(cfg), make_mesh({"data": 4, "fsdp": 2}))
    with ref_tr.context():
        saved, _ = ck_ref.restore_step(8, ref_tr.abstract_state, None)
    ck_ref.close()
    assert meta["step"] == 8 and int(got["step"]) == 8
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(saved)):
        assert np.array_equal(np.asarray(x), np.asarray(y))
        assert x.sharding.mesh.devices.size == cfg.num_devices
    out = train(cfg, wd)
    new, old = trace(wd), trace(ref_wd)
    assert sorted(new) == list(range(9, 13))
    np.testing.assert_allclose(np.array([new[s] for s in new]), np.array([old[s] for s in new]), rtol=1e-5)
    assert out["step"] == 12


def test_corrupt_latest_checkpoint_falls_back(reference, tmp_path):
    ref_wd, _ = reference
    wd = tmp_path / "wd"
    shutil.copytree(ref_wd, wd)
    shutil.rmtree(wd / "checkpoints" / "12")
    # Truncate every data file of the newest checkpoint (8): it exists but cannot be read.
    broken = [p for p in (wd / "checkpoints" / "8" / "state").rglob("*") if p.is_file()]
    assert broken
    for p in broken:
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])
    lines = (wd / "metrics.jsonl").read_text().splitlines()
    (wd / "metrics.jsonl").write_text("\n".join(lines[:10]) + '\n{"step": 11, "lo')   # torn last line
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = train(cfg_(mesh={"data": 4, "fsdp": 2, "tensor": 1}), wd)
    assert any("step 8" in str(w.message) and "falling back" in str(w.message) for w in caught)
    assert (wd / "checkpoints_corrupt").is_dir() and out["step"] == 12
    assert trace(wd) == trace(ref_wd)             # steps 5..12 replayed exactly, file clean
    assert sorted(Checkpointer(wd / "checkpoints").all_steps()) == [4, 8, 12]


def test_schedule_and_optimizer_only_trainable():
    cfg = config_lib.OptimConfig(learning_rate=1.0, warmup_steps=4, decay="linear", end_lr_ratio=0.1)
    lr = optim.schedule(cfg, 14)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 3, 4, 9, 14)], [0.25, 1.0, 1.0, 0.55, 0.1], rtol=1e-6)
    cos = optim.schedule(cfg.replace(decay="cosine", end_lr_ratio=0.0), 14)
    np.testing.assert_allclose([float(cos(s)) for s in (4, 9, 14)], [1.0, 0.5, 0.0], atol=1e-6)
    tx, _ = optim.make_optimizer(cfg.replace(weight_decay=0.1), 14)
    params = {"frozen": {"w": np.ones((3, 3), np.float32)}, "lora": {"w": np.ones((3, 2), np.float32),
                                                                     "b": np.ones(2, np.float32)}}
    train_p, frozen = state_lib.partition(params, [r"lora/.*"])
    st = tx.init(train_p)
    assert sum(np.size(x) for x in jax.tree.leaves(st)) == 2 * 8 + 2
    upd, _ = tx.update(jax.tree.map(np.zeros_like, train_p), st, train_p)
    # Weight decay hits the matrix only; a zero gradient still decays it, never the bias.
    assert np.all(np.asarray(upd["lora"]["w"]) < 0) and np.all(np.asarray(upd["lora"]["b"]) == 0)
    assert optax.tree.norm(upd) > 0 and "frozen" not in upd


def test_config_overrides_and_errors(tmp_path):
    over, rest = split_overrides(["--config.optim.learning_rate=1e-4", "--workdir", "x",
                                  "--config.mesh", '{"data": 2, "fsdp": -1}', "--config.mesh.tensor=1",
                                  "--config.data.nan_steps=3,5", "--config.progress=false"])
    assert rest == ["--workdir", "x"]
    cfg = config_lib.load(TOY, over)
    assert cfg.optim.learning_rate == 1e-4 and cfg.mesh == {"data": 2, "fsdp": -1, "tensor": 1}
    assert cfg.data.nan_steps == (3, 5) and cfg.progress is False
    for key, val, msg in (("optim.learnin_rate", "1", "no field 'learnin_rate'"),
                          ("total_steps", "ten", "cannot parse"), ("optim.decay", "exp", "cosine, linear"),
                          ("optim.grad_accum", "3", "not divisible")):
        with pytest.raises(config_lib.ConfigError, match=msg):
            config_lib.load(TOY, [(key, val)])
    path = config_lib.save(cfg, tmp_path)
    assert type(cfg).from_dict(json.loads(path.read_text())) == cfg   # the toy experiment type


def test_data_skips_reach_the_metrics_record():
    from calico_jax.train.metrics_log import data_skip_record

    class Task:
        def data_skips(self):
            return {"too_many_segs": 3, "image_unreadable": 1, "missing_image": 2}

    assert data_skip_record(Task()) == {"data_skipped_too_many_segs": 3, "data_skipped_image_unreadable": 1,
                                        "data_skipped_other": 2}
    assert data_skip_record(object()) == {}            # a task without a data stream: nothing to report
