"""The tiny CALICO (configs/tiny.py, synthetic data) trained by 2 processes x 4 CPU devices (``python -m
calico_jax.parallel.launch --local 2``, gloo over loopback) on a (data 2, fsdp 4) mesh spanning both, against 1
process x 8 devices with the same global batch: every step's losses and gradient norm agree to fp32 rounding (the
cross-process all-reduces sum in another order) -- and the 2-process job is killed (kill -9 of process 1 after step
6) and rerun with the same command on the way, resuming from its step-4 checkpoint. Then ``python -m
calico_jax.export`` and ``python -m calico_jax.evaluate`` read the checkpoint the 2-process job wrote. One run of
each, shared by the tests below. Both runs compile at XLA's backend optimisation level 0 (compile time; the
comparison is between the two runs: tests/conftest.py), and the 2-process jobs go through
tests/toy_train.py (train.py with the fault hook, and every process keeps its compiled programs in the module's
compilation cache, so the rerun compiles nothing)."""
import json

import numpy as np
import pytest

from tests import multihost_helpers as H

STEPS = 8
TINY = ["train.py", "--config", "configs/tiny.py", f"--config.total_steps={STEPS}",
        "--config.checkpoint_every=4", "--config.progress=false", "--config.data.synthetic.num_images=12",
        '--config.mesh={"data": 2, "fsdp": 4}']
KEYS = ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "grad_norm", "token_accuracy", "num_masks")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Workdirs of the 1-process run and the 2-process job (killed after step 6, rerun to the end). The 1-process
    run goes alongside the 2-process job: its steps mostly wait on cross-process collectives, which leaves the
    cores room; all of them share the module's compilation cache."""
    one, two, logs = (tmp_path_factory.mktemp(name) for name in ("tiny1", "tiny2", "logs"))
    with H.cache_dir(tmp_path_factory.getbasetemp() / "jax_cache_tiny"), open(logs / "tiny1.txt", "w") as log:
        single = H.start(1, [*TINY, "--workdir", str(one)], log)
        try:
            p = H.run(2, ["tests/toy_train.py", "--fault", "kill:6@1", *TINY[1:], "--workdir", str(two)],
                      timeout=600)
            assert p.returncode == 137 and "process 1 (pid" in p.stderr, (p.stdout + p.stderr)[-4000:]
            assert H.steps(two) == [4]
            p = H.run(2, ["tests/toy_train.py", *TINY[1:], "--workdir", str(two)], timeout=600)
            assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
            assert H.resumed_from(p.stdout + p.stderr) == 4
            single.wait(timeout=600)
        finally:
            if single.poll() is None:
                single.kill()
    text = (logs / "tiny1.txt").read_text()
    assert single.returncode == 0 and H.resumed_from(text) is None, text[-4000:]
    return {1: one, 2: two}


def test_two_processes_train_like_one(runs):
    two, one = H.rows(runs[2]), H.rows(runs[1])
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    a, b = (np.array([[r[k] for k in KEYS] for r in rs]) for rs in (two, one))
    print(f"\nmax |loss(2 proc) - loss(1 proc)| over {STEPS} steps: {np.max(np.abs(a[:, 0] - b[:, 0])):.3g}; "
          f"per metric: {dict(zip(KEYS, np.max(np.abs(a - b), axis=0).round(9)))}")
    assert [r["lr"] for r in two] == [r["lr"] for r in one]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert a[-1, 0] < a[0, 0]                                             # it trains
    ckpt = runs[2] / "checkpoints" / str(STEPS)
    assert sorted(p.name for p in (ckpt / "data_iter").glob("process_*")) == ["process_0-of-2.json",
                                                                             "process_1-of-2.json"]


def test_export_and_evaluate_read_the_two_process_checkpoint(runs, tmp_path_factory, tmp_path):
    wd = runs[2]
    with H.cache_dir(tmp_path_factory.getbasetemp() / "jax_cache_tiny"):   # evaluate reuses export's init compile
        p = H.run(1, ["-m", "calico_jax.export", "--workdir", str(wd), "--out", str(tmp_path / "model")], timeout=300)
        assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
        assert (tmp_path / "model" / "params").is_dir() and (tmp_path / "model" / "tokenizer").is_dir()
        report = tmp_path / "report.json"
        p = H.run(1, ["-m", "calico_jax.evaluate", "--ckpt", str(wd), "--pairs", str(wd / "data" / "heldout" /
                      "pairs.json"), "--limit", "2", "--max_new_tokens", "8", "--no_progress", "--out", str(report)],
                  timeout=300)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    rep = json.loads(report.read_text())
    assert rep["num_samples"] == 2 and rep["source"]["ckpt"] == str(wd)
    assert set(rep["mean"]) >= {"AP50", "mIoU", "Recall", "SS", "S-IoU"}
