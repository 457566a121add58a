"""Every command-line tool answers ``--help`` without importing JAX (fast, and silent on any machine), and a CPU-only
machine's command-line runs keep JAX off the accelerator plugins (no CUDA/TPU noise)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from calico_jax.core import platform

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["calico_jax.predict", "calico_jax.evaluate", "calico_jax.export", "calico_jax.demo", "calico_jax.launch",
           "calico_jax.data.synthetic", "calico_jax.data.pairs", "calico_jax.data.pack", "convert", "bench"]
# The loader's own command: its module defines grain transforms at import, and grain imports JAX. Its --help is
# still usage and exit 0 (and quiet: test_cpu_machine_command_line_is_quiet), just not JAX-free.
NEEDS_GRAIN = ["calico_jax.data.pipeline"]
PROBE = """
import contextlib, io, runpy, sys
target, args = sys.argv[1], sys.argv[2:]
sys.argv = [target, *args]
out = io.StringIO()
try:
    with contextlib.redirect_stdout(out):
        if target.endswith(".py"):
            runpy.run_path(target, run_name="__main__")
        else:
            runpy.run_module(target, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code or 0
print(code, "jax" in sys.modules, "usage:" in out.getvalue())
"""


def _probe(target: str, *args: str) -> tuple[int, bool, bool]:
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    p = subprocess.run([sys.executable, "-c", PROBE, target, *args], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    code, jax_imported, usage = p.stdout.split()[-3:]
    return int(code), jax_imported == "True", usage == "True"


@pytest.mark.parametrize("target", [*MODULES, "train.py"])
def test_help_is_usage_without_jax(target):
    code, jax_imported, usage = _probe(target, "--help")
    assert code == 0 and usage, f"{target} --help: exit {code}"
    assert not jax_imported, f"{target} --help imported jax"


@pytest.mark.parametrize("target", NEEDS_GRAIN)
def test_help_is_usage(target):
    code, _, usage = _probe(target, "--help")
    assert code == 0 and usage


@pytest.mark.parametrize("sub", ["inspect", "calico-assemble"])
def test_convert_subcommand_help_is_usage(sub):
    code, _, usage = _probe("convert", sub, "--help")
    assert code == 0 and usage


QUIET = """
import sys
sys.argv = ["-m", *sys.argv[1:]]          # as `python -m calico_jax.<tool>` sees it while the package imports
import calico_jax, os
import jax.numpy as jnp
print(float(jnp.ones(3).sum()), os.environ.get("JAX_PLATFORMS"))
"""


@pytest.mark.skipif(platform.accelerator_present(), reason="this machine has an accelerator: nothing to keep quiet")
def test_cpu_machine_command_line_is_quiet():
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TF_CPP_MIN_LOG_LEVEL")}
    p = subprocess.run([sys.executable, "-c", QUIET, "--image", "a.jpg"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["3.0", "cpu"]
    assert "cuda" not in p.stderr.lower() and "Traceback" not in p.stderr and "ERROR" not in p.stderr, p.stderr


def test_planning_keeps_the_plugins_and_an_explicit_platform_wins():
    assert platform.plans_for_accelerator(["train.py", "--compile_only", "--target", "h100:8"])
    assert platform.plans_for_accelerator(["x", "--target=v5p:2x2x1"])
    assert not platform.plans_for_accelerator(["x", "--targets_file", "t"])
    assert platform.decide("", ["x"], accelerator=False) == ("cpu", True)            # a CPU machine: quiet
    assert platform.decide("", ["x", "--target", "h100:8"], accelerator=False) == ("cpu", False)  # plans: plugins
    assert platform.decide("", ["x"], accelerator=True) == (None, False)             # a GPU/TPU machine: untouched
    assert platform.decide("cuda", ["x"], accelerator=False) == (None, False)        # the user's choice wins
    assert platform.decide("cpu", ["x"], accelerator=True) == (None, True)           # cpu asked: no CUDA plugin


def test_demo_reports_a_config_error_in_one_line(tmp_path, capsys):
    from calico_jax.demo import main as demo_main

    assert demo_main(["--workdir", str(tmp_path / "w"), "--config.train.total_steps=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("demo: --config.train.total_steps") and "no field 'train'" in err[0]
    assert not (tmp_path / "w").exists()                   # nothing built, nothing written

