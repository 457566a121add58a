"""Golden parameter trees of the composed CALICO model (the MaxText habit).

For ``CalicoConfig.tiny()`` and one ablation variant (the CEM switched off, which drops ``cem`` and
``dinov2``), the parameter tree is built with ``jax.eval_shape`` (no allocation), flattened to
``a/b/c`` paths, and every leaf's shape, dtype and logical axis names are compared with
``tests/golden/calico_tiny_params.json``. A second section holds the PartitionSpec each leaf gets from
the one rules table (``calico_jax.parallel.sharding``) on the 2x2x2 mesh of the 8 simulated devices, so
a lost or changed sharding annotation shows up as a diff even when the logical names look plausible.

A difference fails with a readable list of paths added / removed / changed (old -> new).

``tests/golden/calico_tiny_scan_params.json`` records the same for the scanned layout (``with_scan(True)``: the
EVA, DINOv2 and LLaMA stacks as ``scan_{a}_{b}`` segments with a leading ``layers`` axis), and a test checks that
:func:`calico_jax.models.scan.unstack_layers` of it is exactly the per-layer golden tree.

Regenerating (only after an *intended* change of the parameter tree; review the git diff of the json):

    .venv/bin/python -m tests.test_golden --update
    # or, from pytest:
    CALICO_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py

A normal test run never writes the file; a missing golden is a failure that names the command above.
"""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # standalone regeneration: the same 8 simulated devices as under pytest
    import tests.conftest  # noqa: F401  (sets XLA_FLAGS before jax starts a backend)

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import traverse_util

from calico_jax.models import scan
from calico_jax.models.calico import Calico, CalicoConfig
from calico_jax.models.cem import CemConfig
from calico_jax.parallel import sharding

GOLDEN = Path(__file__).parent / "golden" / "calico_tiny_params.json"
SCAN_GOLDEN = Path(__file__).parent / "golden" / "calico_tiny_scan_params.json"
UPDATE_ENV = "CALICO_UPDATE_GOLDEN"
REGEN_HINT = f"regenerate with `python -m tests.test_golden --update` (or {UPDATE_ENV}=1 pytest tests/test_golden.py)"
# All three mesh axes > 1, so every rule of the table is visible in the recorded specs.
MESH_SHAPE = {"data": 2, "fsdp": 2, "tensor": 2}
MAX_DIFF_LINES = 40  # per category; a renamed subtree should not bury the summary

# name -> config factory. Keep variants cheap: each costs one eval_shape of the tiny model.
VARIANTS: dict[str, Callable[[], CalicoConfig]] = {
    "tiny": CalicoConfig.tiny,
    "tiny_no_cem": lambda: CalicoConfig.tiny(cem=CemConfig(enabled=False)),
}
SCAN_VARIANTS: dict[str, Callable[[], CalicoConfig]] = {"tiny_scan": lambda: CalicoConfig.tiny().with_scan(True)}
GOLDENS = {GOLDEN: VARIANTS, SCAN_GOLDEN: SCAN_VARIANTS}
ALL_VARIANTS = {**VARIANTS, **SCAN_VARIANTS}


# ----------------------------------------------------------------------------- building the records
def abstract_params(cfg: CalicoConfig) -> dict[str, Any]:
    """Boxed params as ShapeDtypeStructs, flattened to {"a/b/c": leaf}; boxes stay leaves."""
    module = Calico(cfg, jnp.float32)
    variables = jax.eval_shape(lambda key: module.init(key, module.dummy_inputs()), jax.random.key(0))
    flat = traverse_util.flatten_dict(variables["params"], sep="/")
    return dict(sorted(flat.items()))


def leaf_record(leaf: Any) -> dict[str, Any]:
    """shape / dtype / logical names of one leaf; names is None for an unannotated (unboxed) param."""
    names = list(leaf.names) if isinstance(leaf, nn.Partitioned) else None
    value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
    return {"shape": list(value.shape), "dtype": str(value.dtype), "names": names}


def spec_record(spec: jax.sharding.PartitionSpec) -> list[Any]:
    """JSON form of a PartitionSpec: None, an axis name, or a list of axis names per dim."""
    return [list(entry) if isinstance(entry, tuple) else entry for entry in spec]


def mesh_specs(boxed_flat: dict[str, Any]) -> dict[str, list[Any]]:
    """The PartitionSpec of every leaf via the project's rules table on the 8-device mesh."""
    mesh = sharding.make_mesh(MESH_SHAPE)
    shardings = sharding.param_shardings(traverse_util.unflatten_dict(boxed_flat, sep="/"), mesh)
    flat = traverse_util.flatten_dict(shardings, sep="/")
    return {path: spec_record(s.spec) for path, s in sorted(flat.items())}


def current_golden(variants: dict[str, Callable[[], CalicoConfig]] = VARIANTS) -> dict[str, Any]:
    out = {}
    for name, make_cfg in variants.items():
        flat = abstract_params(make_cfg())
        out[name] = {"params": {p: leaf_record(leaf) for p, leaf in flat.items()}, "specs": mesh_specs(flat)}
    return out


# ----------------------------------------------------------------------------- file format
def dumps(golden: dict[str, Any]) -> str:
    """One leaf per line, sorted: small, stable, reviewable git diffs."""
    lines = ["{", f'  "_regenerate": {json.dumps(REGEN_HINT)},', f'  "_mesh": {json.dumps(MESH_SHAPE)},']
    for v_i, (variant, sections) in enumerate(golden.items()):
        lines.append(f"  {json.dumps(variant)}: {{")
        for s_i, (section, entries) in enumerate(sections.items()):
            lines.append(f"    {json.dumps(section)}: {{")
            items = [f"      {json.dumps(p)}: {json.dumps(r)}" for p, r in entries.items()]
            lines.append(",\n".join(items))
            lines.append("    }" + ("," if s_i < len(sections) - 1 else ""))
        lines.append("  }" + ("," if v_i < len(golden) - 1 else ""))
    lines.append("}")
    return "\n".join(lines) + "\n"


def load_golden(path: Path = GOLDEN) -> dict[str, Any]:
    if not path.exists():
        pytest.fail(f"golden file {path} is missing; {REGEN_HINT}")
    data = json.loads(path.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def write_golden() -> None:
    for path, variants in GOLDENS.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(dumps(current_golden(variants)))


# ----------------------------------------------------------------------------- diffing
def _fmt(record: Any) -> str:
    if isinstance(record, dict) and "shape" in record:
        return f"{tuple(record['shape'])} {record['dtype']} names={record['names']}"
    return str(record)


def _capped(title: str, lines: list[str]) -> list[str]:
    if not lines:
        return []
    shown = lines[:MAX_DIFF_LINES]
    more = [f"    ... and {len(lines) - MAX_DIFF_LINES} more"] if len(lines) > MAX_DIFF_LINES else []
    return [f"  {title} ({len(lines)}):"] + shown + more


def diff_section(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Readable differences between two {path: record} maps; empty when equal."""
    added = [f"    + {p}: {_fmt(new[p])}" for p in sorted(new.keys() - old.keys())]
    removed = [f"    - {p}: {_fmt(old[p])}" for p in sorted(old.keys() - new.keys())]
    changed = [f"    ~ {p}: {_fmt(old[p])}  ->  {_fmt(new[p])}"
               for p in sorted(old.keys() & new.keys()) if old[p] != new[p]]
    return _capped("added", added) + _capped("removed", removed) + _capped("changed", changed)


def diff_golden(old: dict[str, Any], new: dict[str, Any]) -> str:
    out = []
    for variant in sorted(old.keys() | new.keys()):
        if variant not in old or variant not in new:
            out.append(f"[{variant}] variant {'added' if variant in new else 'removed'}")
            continue
        for section in sorted(old[variant].keys() | new[variant].keys()):
            lines = diff_section(old[variant].get(section, {}), new[variant].get(section, {}))
            if lines:
                out += [f"[{variant}] {section}:"] + lines
    return "\n".join(out)


# ----------------------------------------------------------------------------- tests
@pytest.mark.parametrize("path", sorted(GOLDENS), ids=lambda p: p.name)
def test_param_tree_matches_golden(path):
    if os.environ.get(UPDATE_ENV) == "1":  # explicit opt-in only; never on a normal run
        write_golden()
        pytest.skip(f"{UPDATE_ENV}=1: rewrote {sorted(p.name for p in GOLDENS)}; review their git diff")
    diff = diff_golden(load_golden(path), current_golden(GOLDENS[path]))
    assert not diff, f"parameter tree differs from {path.name} (old -> new):\n{diff}\n\nIf intended, {REGEN_HINT}"


def test_scan_golden_unstacks_to_the_per_layer_golden():
    """The scanned tree is the per-layer tree stacked: unstacking the scanned golden's boxed leaves (shape, dtype,
    logical names) gives exactly the per-layer golden records of the same model."""
    flat = abstract_params(SCAN_VARIANTS["tiny_scan"]())
    per_layer = scan.unstack_layers(traverse_util.unflatten_dict(flat, sep="/"), SCAN_VARIANTS["tiny_scan"]())
    records = {p: leaf_record(leaf) for p, leaf in traverse_util.flatten_dict(per_layer, sep="/").items()}
    diff = diff_section(load_golden(GOLDEN)["tiny"]["params"], records)
    assert not diff, "\n".join(diff)


@pytest.mark.parametrize("variant", sorted(ALL_VARIANTS))
def test_every_leaf_has_logical_names(variant):
    """No unannotated param: every leaf is a box whose names match its rank and the rules table."""
    known = {name for name, _ in sharding.RULES}
    problems = []
    for path, leaf in abstract_params(ALL_VARIANTS[variant]()).items():
        if not isinstance(leaf, nn.Partitioned):
            problems.append(f"{path}: no logical axis names ({type(leaf).__name__})")
        elif len(leaf.names) != leaf.value.ndim:
            problems.append(f"{path}: names {leaf.names} for rank {leaf.value.ndim}")
        elif set(leaf.names) - {None} - known:
            problems.append(f"{path}: {sorted(set(leaf.names) - {None} - known)} not in sharding.RULES")
    assert not problems, "\n".join(problems)


def test_diff_is_readable():
    """The differ itself: each kind of change is reported with old and new values."""
    rec = {"shape": [2, 3], "dtype": "float32", "names": ["embed", "mlp"]}
    old = {"v": {"params": {"a/k": rec, "b/k": rec}, "specs": {"a/k": ["fsdp", "tensor"]}}}
    new = {"v": {"params": {"a/k": {**rec, "names": [None, "mlp"]}, "c/k": rec},
                 "specs": {"a/k": [None, "tensor"]}}}
    text = diff_golden(old, new)
    assert "+ c/k: (2, 3) float32" in text and "- b/k: (2, 3) float32" in text
    assert "~ a/k: (2, 3) float32 names=['embed', 'mlp']  ->  (2, 3) float32 names=[None, 'mlp']" in text
    assert "[v] specs:" in text and "['fsdp', 'tensor']  ->  [None, 'tensor']" in text
    assert diff_golden(old, old) == ""
    assert json.loads(dumps(old)).get("v") == old["v"]


def main(argv: list[str]) -> int:
    if argv != ["--update"]:
        print(__doc__)
        return 2
    write_golden()
    print(f"wrote {GOLDEN}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
