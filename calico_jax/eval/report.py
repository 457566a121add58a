"""``report.json`` (written atomically) and the paper's table layout for an :func:`evaluate` report."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from calico_jax.core.fs import write_atomic
from calico_jax.data.pairs import TASKS
from calico_jax.eval.metrics import METRICS

ROW_NAMES = {"common_object": "Common objects", "common_parts": "Common parts", "unique_parts": "Unique parts",
             "mean": "Mean"}


def _json_safe(x: Any) -> Any:
    """NaN (an undefined metric, e.g. AP50 without ground truth) -> null: strict JSON has no NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def write_report(path: str | os.PathLike, report: dict) -> Path:
    """Writes ``report`` as JSON via a temp sibling + rename (never half-written); creates the parent."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(_json_safe(report), indent=2, allow_nan=False) + "\n")
    return path


def read_report(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read report {path}: {e}") from None


def _cell(v: Any) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.1f}"


def format_table(report: dict) -> str:
    """Rows: the tasks present (paper order) and the mean; columns AP50 mIoU Recall SS S-IoU, one decimal."""
    per_task = report.get("per_task", {})
    present = [t for t in TASKS if t in per_task]
    # the paper's mean is over its three tasks; over fewer (e.g. evaluate --limit) the row says so
    mean_name = ROW_NAMES["mean"] if len(present) == len(TASKS) else \
        f"Mean of {len(present)} of {len(TASKS)} tasks ({', '.join(ROW_NAMES[t].lower() for t in present)})"
    rows = [(ROW_NAMES[t], per_task[t]) for t in present] + [(mean_name, report["mean"])]
    width = max(len(name) for name, _ in rows)
    lines = [f"{'Task':<{width}}" + "".join(f"{m:>8}" for m in METRICS)]
    lines.append("-" * len(lines[0]))
    for name, vals in rows:
        if name == mean_name:
            lines.append("-" * len(lines[0]))
        lines.append(f"{name:<{width}}" + "".join(f"{_cell(vals.get(m)):>8}" for m in METRICS))
    if report.get("per_images"):
        lines += ["", format_images(report["per_images"])]
    return "\n".join(lines)


def format_images(per_images: dict[str, dict]) -> str:
    """A report's ``per_images`` (a set mixing image counts): one row per N with its samples, the mean over tasks
    of each metric and the percent of samples in which every image got a mask."""
    head = f"{'Images':<8}{'samples':>8}" + "".join(f"{m:>8}" for m in METRICS) + "  every image masked"
    lines = [head, "-" * len(head)]
    for n, r in per_images.items():
        lines.append(f"{'N = ' + n:<8}{r['num_samples']:>8}" + "".join(f"{_cell(r['mean'].get(m)):>8}" for m in METRICS)
                     + f"  {r['all_images_masked']:.0f} %")
    return "\n".join(lines)


__all__ = ["write_report", "read_report", "format_table", "format_images"]
