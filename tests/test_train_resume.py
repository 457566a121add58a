"""`python train.py` as a user runs it (subprocesses, 8 simulated CPU devices): kill -9 in the middle
of a run and rerun the same command -> the metrics of the resumed run equal those of an uninterrupted
run exactly; SIGTERM writes a final checkpoint at the current step and the rerun continues exactly;
a bad override fails before anything runs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXACT = ("loss", "ce_loss", "mask_bce_loss", "mask_dice_loss", "lr", "grad_norm", "skipped")
ARGS = ["--config.total_steps=14", "--config.checkpoint_every=4", '--config.mesh={"data": 4, "fsdp": 2}']


def run(workdir, fault=None, extra=()):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "tests/toy_train.py", *(["--fault", fault] if fault else []), "--config",
           "tests/toy_config.py", "--workdir", str(workdir), *ARGS, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def rows(workdir):
    return [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def trace(workdir):
    return [(r["step"], *(r[k] for k in EXACT)) for r in rows(workdir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    wd = tmp_path_factory.mktemp("ref")
    p = run(wd)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["step"] for r in rows(wd)] == list(range(1, 15))
    cfg = json.loads((wd / "config.json").read_text())
    assert cfg["total_steps"] == 14 and cfg["mesh"] == {"data": 4, "fsdp": 2}
    return wd


def test_kill9_then_rerun_reproduces_the_loss_trace(reference, tmp_path):
    p = run(tmp_path, fault="kill:10")
    assert p.returncode == -9, p.stderr[-3000:]
    assert [r["step"] for r in rows(tmp_path)] == list(range(1, 11))
    assert not (tmp_path / "checkpoints" / "12").exists()
    p = run(tmp_path)                                     # the same command again
    assert p.returncode == 0, p.stderr[-3000:]
    assert trace(tmp_path) == trace(reference)            # every step once, bit-identical values
    steps = sorted(int(d.name) for d in (tmp_path / "checkpoints").iterdir() if d.name.isdigit())
    assert steps == [8, 12, 14]                           # keep the last 3


def test_sigterm_writes_final_checkpoint_and_rerun_continues(reference, tmp_path):
    p = run(tmp_path, fault="term:6")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "preempted" in p.stdout
    assert (tmp_path / "checkpoints" / "6" / "state").is_dir()
    meta = json.loads((tmp_path / "checkpoints" / "6" / "meta" / "metadata").read_text())
    assert meta == {"step": 6, "config": "toy", "frozen_source": {"kind": "init", "seed": 0}}
    assert [r["step"] for r in rows(tmp_path)] == list(range(1, 7))
    p = run(tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert trace(tmp_path) == trace(reference)


def test_bad_override_fails_fast(tmp_path):
    p = run(tmp_path / "w", extra=["--config.optim.lr=1"])
    assert p.returncode == 2 and "no field 'lr'" in p.stderr
    assert not (tmp_path / "w").exists()


def test_compile_only_prints_a_memory_plan():
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "tests/toy_train.py", "--config", "tests/toy_config.py", "--compile_only", "--devices", "4",
           '--config.mesh={"data": 2, "fsdp": 2}', "--config.model.hidden=4096"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    got = dict(line.split("=", 1) for line in p.stdout.splitlines() if "=" in line)
    assert got["devices"] == "4" and int(got["frozen_params"]) == 2 * 32 * 4096 + 4096 + 32
    # The frozen 2x(32x4096) f32 tower is FSDP-sharded over 2 of the 4 devices: >= 0.5 MiB per device.
    assert float(got["argument_gb"]) * 1024 ** 3 >= 2 * 32 * 4096 * 4 / 2
    assert float(got["per_device_memory_gb"]) >= float(got["argument_gb"]) and float(got["step_tflops"]) > 0
