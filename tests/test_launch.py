"""The local launcher (``python -m calico_jax.launch``, calico_jax/parallel/launch.py) with plain Python children:
each child's environment; a child that dies stops the job with its status, named as the cause (not a peer that
lost it); SIGTERM is forwarded to every child once, also while they are starting."""
import signal
import subprocess
import sys
import threading
import time

from calico_jax.parallel import launch


def out(p) -> str:
    return (p.stdout or "") + (p.stderr or "")


def test_launch_environment():
    e = launch.child_env({"XLA_FLAGS": "--a=1 --xla_force_host_platform_device_count=8"}, 1, 2, 555, devices=4,
                         gpus=2)
    assert e["JAX_COORDINATOR_ADDRESS"] == e["JAX_COORDINATOR_BIND_ADDRESS"] == "127.0.0.1:555"
    assert (e["JAX_NUM_PROCESSES"], e["JAX_PROCESS_ID"], e["CUDA_VISIBLE_DEVICES"]) == ("2", "1", "2,3")
    assert e["XLA_FLAGS"].split() == ["--a=1", "--xla_force_host_platform_device_count=4"]


CHILD = """import os, signal, sys, time
from pathlib import Path
i, n = int(os.environ["JAX_PROCESS_ID"]), int(os.environ["JAX_NUM_PROCESSES"])
signal.signal(signal.SIGTERM, lambda *a: (print("term", i, flush=True), sys.exit(0)))
print("up", i, n, flush=True)
ready = Path(sys.argv[2])
(ready / str(i)).touch()
if i == int(sys.argv[1]):   # dies once every process is up (a loaded host starts them slowly)
    deadline = time.monotonic() + 30
    while len(list(ready.iterdir())) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    sys.exit(3)
time.sleep(60)
"""


def test_launcher_stops_the_job_when_a_process_dies_and_forwards_sigterm(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "calico_jax.launch", "--local", "3", "--", sys.executable, "-c", CHILD,
                        "1", str(tmp_path / "a")], capture_output=True, text=True, timeout=60)
    assert p.returncode == 3, out(p)
    assert "launch: process 1 (pid" in p.stderr and "exited with status 3; stopping the other 2" in p.stderr
    assert {"[p0] up 0 3", "[p2] up 2 3"} <= set(p.stdout.splitlines())
    assert time.monotonic() - t0 < 30                                            # not the children's 60 s sleep
    job = subprocess.Popen([sys.executable, "-m", "calico_jax.launch", "--local", "2", "--", sys.executable, "-c",
                            CHILD, "-1", str(tmp_path / "b")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    lines = []
    while len(lines) < 2:                                                        # both children are up
        lines.append(job.stdout.readline())
    job.send_signal(signal.SIGTERM)
    stdout, _ = job.communicate(timeout=30)
    assert job.returncode == 0 and {"[p0] term 0", "[p1] term 1"} <= set(stdout.splitlines())


class _FakeChild:
    """A started child that records the signals it gets; it ends a little after the first (as a real one runs its
    handler), so a second signal sent meanwhile reaches it."""

    def __init__(self, *a, **k):
        import io
        self.pid, self.signals, self.got, self.ended = 4242, [], threading.Event(), False
        self.stdout, self.stderr = io.BytesIO(b""), io.BytesIO(b"")

    def send_signal(self, sig):
        self.signals.append(sig)
        self.got.set()

    def poll(self):
        return 0 if self.ended else None

    def wait(self):
        self.got.wait(10)
        time.sleep(0.2)
        self.ended = True
        return 0


def test_a_sigterm_while_the_children_start_reaches_each_of_them_once(monkeypatch):
    """The signal arrives between the first and the second child's start: the first gets it from the handler,
    the second from the end of start-up, and neither twice (a second SIGTERM kills a child that is already
    ending: it has given its handler back)."""
    started = []

    def popen(*a, **k):
        if len(started) == 1:
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)   # the launcher's handler, as the signal runs it
        started.append(_FakeChild())
        return started[-1]

    monkeypatch.setattr(launch.subprocess, "Popen", popen)
    job = launch.Job(["x"], 3, 1, 0, 0, grace=0.1, settle=0.1)
    assert job.wait() == 0
    assert [c.signals for c in started] == [[signal.SIGTERM]] * 3


CAUSE = """import os, sys, time
from pathlib import Path
i, marker, last = int(os.environ["JAX_PROCESS_ID"]), Path(sys.argv[1]), sys.argv[2]
if i == 1:
    marker.write_text("up")
    if last == "never":
        time.sleep(60)
    time.sleep(0.3)
    os._exit(3)
while not marker.exists():
    time.sleep(0.001)
os._exit(69)   # the peer that lost process 1's connection, and ended first
"""


def test_launcher_names_the_cause_not_the_peer_that_lost_it(tmp_path):
    """Process 0 exits 69 (it lost a peer) 0.3 s before process 1 exits 3: the launcher names process 1, and with
    no other failure within --settle it names the 69 itself and stops the rest."""
    p = subprocess.run([sys.executable, "-m", "calico_jax.launch", "--local", "2", "--", sys.executable, "-c",
                        CAUSE, str(tmp_path / "a"), "late"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 3 and "launch: process 1 (pid" in p.stderr and "status 3" in p.stderr, out(p)
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "calico_jax.launch", "--local", "2", "--settle", "0.2", "--",
                        sys.executable, "-c", CAUSE, str(tmp_path / "b"), "never"], capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 69 and "process 0 (pid" in p.stderr and "(it lost a peer); stopping the other 1" \
        in p.stderr, out(p)
    assert time.monotonic() - t0 < 30                                            # not process 1's 60 s sleep
