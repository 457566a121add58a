"""``python -m bench --suite gpu --tiny``: the accelerator suite end to end at the tiny model's size, on a CPU (the
same code a GPU runs, one call: train-step and predict rows in one table, the JSON beside it)."""
import json
import subprocess
import sys
from pathlib import Path

from bench import gpu

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_gpu_suite_runs_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, "-m", "bench", "--suite", "gpu", "--tiny", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rec = json.loads(out.read_text())
    train, *predict = rec["rows"]
    assert train["what"] == "train step" and train["config"] == "tiny" and train["batch"] == 2
    assert train["compile_s"] > 0 and train["time_s"] > 0 and train["samples_per_s"] > 0
    assert train["plan_bytes"] > 0                    # the compiled step's own memory plan
    assert [r["batch"] for r in predict] == [1, 4]
    assert all(r["compile_s"] > 0 and r["samples_per_s"] > 0 for r in predict)
    assert "| train step | tiny | 2 |" in p.stdout and "| predict | tiny | 4 |" in p.stdout
    assert out.with_suffix(".md").read_text() in p.stdout


def test_ladder_moves_on_only_when_out_of_memory():
    assert gpu.out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.2GiB"))
    assert not gpu.out_of_memory(ValueError("shape mismatch"))
    rows = [{"what": "train step", "config": "calico_7b", "batch": 2, "note": "out of memory"},
            {"what": "train step", "config": "calico_7b", "batch": 1, "compile_s": 61.0, "time_s": 1.5,
             "samples_per_s": 0.67, "mfu": 0.41, "plan_bytes": 40 * 2 ** 30, "peak_bytes": 42 * 2 ** 30}]
    text = gpu.table(rows, "gpu H100")
    assert "| train step | calico_7b | 2 | out of memory |" in text
    assert "| 61.0 | 1.500 | 0.67 | 41 % | 40.00 / 42.00 |" in text
