"""Multi-process training for real: 2 JAX processes x 4 CPU devices (gloo over loopback) started by
``python -m calico_jax.launch``, on the toy task (tests/toy.py), with faults injected one after another into one
run: kill -9 of one process at a seeded step (two seeds), kill -9 while a checkpoint is being written, a
checkpoint write that fails part-way, SIGTERM to the job, then a resume on 1 process (2 -> 1) and back on 2
(1 -> 2). Every rerun is the same command; it must resume from the newest complete checkpoint, no checkpoint may be
corrupted, restored states are bit-equal to the saved ones, and the final loss trace is the uninterrupted run's.
Plus the pieces in-process: settings, per-process data blocks, iterator-state translation (the launcher:
test_launch.py)."""
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time

import grain
import numpy as np
import pytest

from calico_jax.checkpoints.training import translate_data_state
from calico_jax.data.pipeline import shard
from calico_jax.parallel import distributed, launch
from calico_jax.train import config as config_lib
from tests import multihost_helpers as H
from tests.toy import ToyTask

ARGS = ["--config", "tests/toy_config.py", "--config.total_steps=12", "--config.checkpoint_every=4",
        '--config.mesh={"data": 2, "fsdp": 4}']


def toy(workdir, *faults, dump=None) -> list[str]:
    script = ["tests/toy_train.py"]
    for f in faults:
        script += ["--fault", f]
    if dump is not None:
        script += ["--dump", str(dump)]
    return script + [*ARGS, "--workdir", str(workdir)]


def out(p) -> str:
    return (p.stdout or "") + (p.stderr or "")


# ---------------------------------------------------------------------------------------------- in-process
def test_settings_from_flags_and_environment():
    ap = __import__("argparse").ArgumentParser()
    distributed.add_arguments(ap)
    assert distributed.spec_from(ap.parse_args([]), {}) is None                        # a single-process run
    auto = distributed.spec_from(ap.parse_args(["--multihost"]), {})
    assert auto == distributed.Spec(None, None, None, distributed.DEFAULT_TIMEOUT)    # TPU/SLURM/MPI detection
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3",
           "CALICO_INIT_TIMEOUT": "7"}
    assert distributed.spec_from(ap.parse_args([]), env) == distributed.Spec("10.0.0.1:1234", 4, 3, 7.0)
    flags = ap.parse_args(["--coordinator_address", "h:1", "--num_processes", "2", "--process_id", "0",
                           "--init_timeout", "5"])
    assert distributed.spec_from(flags, env) == distributed.Spec("h:1", 2, 0, 5.0)      # flags win
    with pytest.raises(distributed.DistributedError, match="--num_processes, --process_id missing"):
        distributed.spec_from(ap.parse_args(["--multihost", "--coordinator_address", "h:1"]), {})
    with pytest.raises(distributed.DistributedError, match="not in 0..1"):
        distributed.spec_from(ap.parse_args([]), {**env, "JAX_NUM_PROCESSES": "2"})
    with pytest.raises(distributed.DistributedError, match="JAX_PROCESS_ID='x' is not an integer"):
        distributed.spec_from(ap.parse_args([]), {**env, "JAX_PROCESS_ID": "x"})


def test_a_collective_that_lost_its_peer_is_told_apart():
    import jax
    ci = ("UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] Connection closed by peer "
          "[127.0.0.1]:61164")
    assert distributed.lost_peer(jax.errors.JaxRuntimeError(ci))
    assert distributed.lost_peer(jax.errors.JaxRuntimeError("DEADLINE_EXCEEDED: Gloo context initialization failed"))
    assert not distributed.lost_peer(jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory allocating"))
    assert not distributed.lost_peer(ValueError(ci))                             # not a runtime failure of jax


MEET = """import argparse, os, sys, time
from pathlib import Path
from calico_jax.parallel import distributed
ap = argparse.ArgumentParser()
distributed.add_arguments(ap)
distributed.initialize(distributed.spec_from(ap.parse_args(["--multihost"])))
import jax
i, gate = jax.process_index(), Path(sys.argv[1])
def wait_for(name):   # a file the test (go) or process 0 (done) creates
    while not (gate / name).exists():
        time.sleep(0.005)
if i == 0:
    print("at meet", flush=True)
else:
    wait_for("go")
distributed.barrier("meet")
print("met", i, "after go" if (gate / "go").exists() else "before go", flush=True)
if i == 0:
    try:
        distributed.barrier("late", timeout=0.5)
    except distributed.DistributedError as e:
        print("late:", e, flush=True)
    (gate / "done").touch()
else:
    wait_for("done")   # never reaches 'late'
sys.stdout.flush()
os._exit(0)   # jax's shutdown would wait for the peer that never arrived
"""


def test_barrier_waits_for_every_process_and_names_the_one_that_is_late(tmp_path):
    """Process 1 reaches 'meet' only once the test has seen process 0 waiting there; process 0 passes it only after
    that. At 'late' process 1 never arrives: process 0 gives up after its (short) timeout, naming the barrier."""
    job = subprocess.Popen([sys.executable, "-m", "calico_jax.launch", "--local", "2", "--", sys.executable, "-c",
                            MEET, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           env=H.env())
    watchdog = threading.Timer(120, job.kill)
    watchdog.start()
    lines = []
    try:
        for line in job.stdout:
            lines.append(line)
            if line.startswith("[p0] at meet"):
                (tmp_path / "go").touch()
        job.wait()
    finally:
        watchdog.cancel()
    text = "".join(lines)
    # (then jax's coordination agent may abort process 1: a failed barrier is an error for the whole job)
    assert {"[p0] met 0 after go", "[p1] met 1 after go"} <= set(text.splitlines()), text[-3000:]
    assert "[p0] late: multihost: process 0 waited 0.5 s at barrier 'late' and not every process arrived" in text


def test_each_process_reads_its_block_of_every_global_micro_batch():
    ds = grain.MapDataset.range(48)
    blocks = [list(shard(ds, i, 2, 3)) for i in range(2)]
    assert blocks[0][:6] == [0, 1, 2, 6, 7, 8] and blocks[1][:6] == [3, 4, 5, 9, 10, 11]
    # The toy task with 2 micro-batches per step: the local batches, split like step.device_batch and put side by
    # side, are the one-process batches row for row (union = the global batch, disjoint, same order).
    cfg = config_lib.load("tests/toy_config.py", [("optim.grad_accum", "2")])
    task = ToyTask(cfg)
    one = next(iter(task.dataset(0, 1)))["x"]
    parts = [next(iter(task.dataset(i, 2)))["x"] for i in range(2)]
    micro = [np.concatenate([p[m * 2:(m + 1) * 2] for p in parts]) for m in range(2)]
    np.testing.assert_array_equal(np.concatenate(micro), one)


def test_data_position_moves_to_another_process_count():
    # 2 processes x 4 rows per batch, 3 batches read -> 1 process reads on at 24, 4 processes at 6.
    assert translate_data_state({0: {"next_index": 12}, 1: {"next_index": 12}}, 1, 8) == {"next_index": 24}
    assert translate_data_state({0: {"next_index": 24}}, 4, 8) == {"next_index": 6}
    # a process that skipped an unreadable sample has read further: nothing is read twice
    assert translate_data_state({0: {"next_index": 13}, 1: {"next_index": 12}}, 1, 8) == {"next_index": 32}
    with pytest.raises(ValueError, match="grain workers"):
        translate_data_state({0: {"workers_state": {}}, 1: {"workers_state": {}}}, 1, 8)


# ------------------------------------------------------------------------------------------ real processes
def test_unreachable_coordinator_fails_in_bounded_time(tmp_path):
    port = launch.free_port()   # nobody listens there
    t0 = time.monotonic()
    p = H.run(1, ["train.py", "--config", "tests/toy_config.py", "--workdir", str(tmp_path / "w"),
                  "--coordinator_address", f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", "1",
                  "--init_timeout", "1"], timeout=60)
    assert p.returncode == 2, out(p)
    assert f"could not join the job through coordinator 127.0.0.1:{port} (process 1 of 2) within 1 s" in p.stderr
    assert time.monotonic() - t0 < 40 and not (tmp_path / "w").exists()


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    with H.cache_dir(tmp_path_factory.mktemp("jax_cache")):
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory, compile_cache):
    """The uninterrupted 2-process run (12 steps, checkpoints 4, 8, 12)."""
    wd = tmp_path_factory.mktemp("reference")
    p = H.run(2, toy(wd, dump=wd / "dump"))
    assert p.returncode == 0, out(p)[-4000:]
    assert [r["step"] for r in H.rows(wd)] == list(range(1, 13)) and H.steps(wd) == [4, 8, 12]
    return wd


LATE_BARRIERS = "init|first_train_step|first_eval"   # the barriers before each program's first run


def _logged_steps(workdir) -> list[int]:
    path = workdir / "metrics.jsonl"
    return [int(m) for m in re.findall(r'^\{"step": (\d+),', path.read_text(), re.M)] if path.exists() else []


def test_a_process_that_compiles_late_is_waited_for(reference, tmp_path):
    """Process 1 holds each of its compiles (the initial state, the train step, the evaluation) until the test
    releases it, which the test does only once process 0 waits at the coordination-service barrier before that
    program's first run: process 0 passes each barrier only after the release (a late peer would otherwise have the
    30 s CPU collectives give it: "Gloo context initialization failed"), and the steps are the uninterrupted
    run's. Nothing waits for a fixed time: the test drives the lateness."""
    wd, gate = tmp_path / "run", tmp_path / "gate"
    gate.mkdir()
    job = H.popen(2, ["tests/toy_train.py", "--late", f"1:{gate}", "--config", "tests/toy_config.py",
                      "--config.total_steps=2", "--config.eval_every=2", "--config.checkpoint_every=2",
                      '--config.mesh={"data": 2, "fsdp": 4}', "--workdir", str(wd)])
    watchdog = threading.Timer(240, job.kill)   # a hang fails the test instead of stalling the suite
    watchdog.start()
    lines, held, waiting, released = [], 0, 0, 0
    try:
        for line in job.stdout:
            lines.append(line)
            held += bool(re.match(r"\[p1\] toy_train: compile \d+ held$", line))
            waiting += bool(re.match(rf"\[p0\] toy_train: at barrier ({LATE_BARRIERS})$", line))
            if released < min(held, waiting):   # process 0 waits for the program process 1 is held before
                released += 1
                (gate / f"release-{released}").touch()
        job.wait()
    finally:
        watchdog.cancel()
    text = "".join(lines)
    assert job.returncode == 0, text[-4000:]
    assert held == 3 and "[p0] toy_train: compile" not in text, text[-4000:]
    passed = re.findall(rf"^\[p0\] toy_train: passed barrier ({LATE_BARRIERS}) with (\d+) released$", text, re.M)
    assert passed == [("init", "1"), ("first_train_step", "2"), ("first_eval", "3")], text[-4000:]
    rows = H.rows(wd)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2] and [r["step"] for r in rows if "eval_loss" in r] == [2]
    first, ref = rows[0], H.rows(reference)[0]   # step 1 does not depend on total_steps (the lr schedule)
    assert [first[k] for k in ("loss", "grad_norm")] == [ref[k] for k in ("loss", "grad_norm")]


def test_faults_lose_nothing(reference, tmp_path):
    wd, dump = tmp_path / "run", tmp_path / "dump"
    table, outputs = [], []

    def launch_(processes, *faults, expect_rc):
        before = max(_logged_steps(wd), default=0)
        p = H.run(processes, toy(wd, *faults, dump=dump))
        text = out(p)
        outputs.append(text)
        assert p.returncode == expect_rc, text[-4000:]
        return p, text, before

    def resumed(text, before_fault_step, fault):
        """The rerun resumed from the newest complete checkpoint; its restored state is the saved one."""
        r = H.resumed_from(text)
        assert r == newest[-1], (r, newest, text[-3000:])
        assert H.bit_equal(H.load_dump(dump / f"restored-{r}.npz"), H.load_dump(dump / f"saved-{r}.npz"))
        table.append({"fault": fault, "at_step": before_fault_step, "resumed_from": r,
                      "steps_lost": before_fault_step - r})

    rng0, rng1 = random.Random(0), random.Random(1)
    # (a) kill -9 of one process at a seeded step after the first checkpoint
    s0, p0 = rng0.randint(5, 7), rng0.randint(0, 1)
    _, text, _ = launch_(2, f"kill:{s0}@{p0}", expect_rc=137)
    # the peer may already have exited (its collective lost the killed process): "the other 0 or 1"
    assert re.search(rf"launch: process {p0} \(pid \d+\) was killed by SIGKILL; stopping the other [01] ", text)
    newest = H.steps(wd)
    assert newest == [4]
    # (b) kill -9 while the step-8 checkpoint is being written: step 8 never appears (the main thread may have
    # logged step 9 before the writer thread reached the kill)
    _, text, before = launch_(2, "killsave:8", expect_rc=137)
    resumed(text, s0, f"kill -9 p{p0} after step {s0}")
    assert H.steps(wd) == [4] and max(_logged_steps(wd)) >= 8
    # (d) the step-8 write fails part-way (truncated file, ENOSPC): reported, step 4 stays the newest
    _, text, _ = launch_(2, "failsave:8", "slow:200", expect_rc=4)   # slow: steps as long as the async write
    resumed(text, 8, "kill -9 p0 while writing checkpoint 8")
    assert "checkpoint step 8 could not be written" in text and "No space left on device" in text
    assert "the newest complete checkpoint is step 4" in text and H.steps(wd) == [4]
    failed_at = max(_logged_steps(wd))
    # (a) another seed: a later step
    s1, p1 = rng1.randint(9, 11), rng1.randint(0, 1)
    _, text, _ = launch_(2, f"kill:{s1}@{p1}", expect_rc=137)
    resumed(text, failed_at, "checkpoint 8 write fails (ENOSPC)")
    assert f"launch: process {p1} (pid" in text
    newest = H.steps(wd)
    # (c) SIGTERM to the job (preemption) once it has trained past the checkpoint: every process stops after the
    # same step, with a final checkpoint
    assert newest[-1] == 8
    job, seen = H.popen(2, toy(wd, "hold:9", dump=dump)), []
    for line in job.stdout:                                 # until both processes wait after step 9
        seen.append(line)
        if sum("toy_train: holding at step 9" in x for x in seen) == 2:
            break
    job.send_signal(signal.SIGTERM)
    text = "".join(seen) + job.communicate(timeout=120)[0]
    outputs.append(text)
    assert job.returncode == 0 and text.count("(preempted: final checkpoint written)") == 2, text[-4000:]
    resumed(text, s1, f"kill -9 p{p1} after step {s1}")
    t = max(_logged_steps(wd))
    assert H.steps(wd)[-1] == t == 9
    newest = H.steps(wd)
    # 2 -> 1 process (same 8-device mesh), preempted after step 11; then 1 -> 2 to the end
    _, text, _ = launch_(1, "term:11", expect_rc=0)
    resumed(text, t, "SIGTERM to the job")
    assert "data iterator of step" in text and "saved by 2 process(es), restored onto 1" in text
    newest = H.steps(wd)
    assert newest[-1] == 11
    _, text, _ = launch_(2, expect_rc=0)
    resumed(text, 11, "SIGTERM (1 process)")
    assert "saved by 1 process(es), restored onto 2" in text

    # Nothing corrupted, nothing set aside; the trace is the uninterrupted run's (exact while on 2 processes;
    # the 1-process segment sums in another order: fp32 rounding).
    assert not (wd / "checkpoints_corrupt").exists() and not any("unreadable" in o for o in outputs)
    got, ref = H.trace(wd), H.trace(reference)
    assert [r[0] for r in got] == list(range(1, 13))
    assert got[:t] == ref[:t]
    np.testing.assert_allclose(np.array(got[t:], float), np.array(ref[t:], float), rtol=2e-6, atol=1e-7)
    for s in (4, 8):
        assert H.bit_equal(H.load_dump(dump / f"saved-{s}.npz"), H.load_dump(reference / "dump" / f"saved-{s}.npz"))
    print("\nfault table:\n" + "\n".join(json.dumps(r) for r in table))
    (tmp_path / "fault_table.json").write_text(json.dumps(table, indent=1))
    # steps lost: at most the checkpoint interval (4) -- the kills come once the checkpoint in flight has committed;
    # a failed write is noticed once it ends (a step or two after it here), at the latest by the next save (its
    # interval again)
    assert len(table) == 6 and all(r["steps_lost"] <= (8 if "fails" in r["fault"] else 4) for r in table)
