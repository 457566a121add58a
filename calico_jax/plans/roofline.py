"""What a compiled program costs: FLOPs, bytes, collectives, and a roofline estimate of its time on a chip.

FLOPs (:func:`traced_flops`) are the matmul and convolution FLOPs of the traced whole (unpartitioned) program, each
scan body times its length. XLA's own counts are kept beside them but are unreliable here: its HLO cost analysis
counts a loop body once (the blocked SAM attention is a ``lax.map``); on GPU ``cost_analysis()`` is None and the
optimised module hides GEMMs in cuBLAS custom calls; on 8 TPU chips the per-device counts summed to 75 % of the
step. Bytes accessed per device come from the compiled program's cost analysis (TPU, CPU) or XLA's cost analysis
of the optimised per-device module (GPU) -- loop bodies once, so a lower bound. Collectives are read from the
optimised HLO text; one inside a loop body counts once.

The estimate (:func:`estimate`) is a roofline, not a measurement: step time = max(FLOPs / peak, bytes / HBM
bandwidth, collective bytes / link bandwidth) per device, i.e. perfect overlap and peak rates.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable

import numpy as np

COLLECTIVES = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
# "%name = <shape or tuple of shapes> <opcode>(" -- async collectives count at their -start.
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]")


def _shape_bytes(text: str) -> int:
    """Largest array in a (tuple) shape string: the gathered/reduced buffer of a collective."""
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d] or [1])) * _DTYPE_BYTES[dt]
             for dt, dims in _SHAPE.findall(text) if dt in _DTYPE_BYTES]
    return max(sizes, default=0)


_OP_NAME = re.compile(r'op_name="([^"]*)"')


def collectives(hlo_texts: Iterable[str], top: int = 0) -> dict[str, dict]:
    """{op: {"count", "bytes"}} over the optimised HLO modules (bytes = the op's result buffer per device); with
    ``top``, also "largest": the ``top`` biggest instructions (bytes, op, shape, the jax op_name they came from)."""
    out: dict[str, dict] = {op: {"count": 0, "bytes": 0} for op in COLLECTIVES}
    largest = []
    for text in hlo_texts:
        for line in text.splitlines():
            m = _INSTR.match(line)
            if m:
                size = _shape_bytes(m.group(1))
                out[m.group(2)]["count"] += 1
                out[m.group(2)]["bytes"] += size
                if top:
                    name = _OP_NAME.search(line)
                    largest.append((size, m.group(2), m.group(1)[:80], name.group(1)[-160:] if name else ""))
    if top:
        out["largest"] = [dict(zip(("bytes", "op", "shape", "op_name"), x))
                          for x in sorted(largest, key=lambda x: -x[0])[:top]]
    return out


def traced_flops(traced) -> tuple[float, int]:
    """:func:`jaxpr_flops` of a ``jit(...).trace(...)`` result after dead-code elimination (as XLA would)."""
    from jax._src.interpreters import partial_eval as pe
    jaxpr = traced.jaxpr.jaxpr
    return jaxpr_flops(pe.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))[0])


def jaxpr_flops(jaxpr) -> tuple[float, int]:
    """(matmul + convolution FLOPs, 2 per multiply-add, of a traced program; number of while loops) with every
    scan body times its length (XLA's cost analysis counts a loop body once: a ``lax.map`` of 8 matmuls counts 1).
    A while loop's trip count is unknown before it runs: its body counts once."""
    from jax.extend.core import ClosedJaxpr, Jaxpr
    total, whiles = 0.0, 0
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
        name, params = eqn.primitive.name, eqn.params
        if name == "dot_general":
            (lc, _), _ = params["dimension_numbers"]
            lhs = eqn.invars[0].aval
            total += 2.0 * eqn.outvars[0].aval.size * math.prod(lhs.shape[i] for i in lc)
        elif name == "conv_general_dilated":
            rhs, spec = eqn.invars[1].aval, params["dimension_numbers"].rhs_spec
            total += 2.0 * eqn.outvars[0].aval.size * math.prod(rhs.shape) / rhs.shape[spec[0]]
        elif name == "cond":
            counts = [jaxpr_flops(b) for b in params["branches"]]
            total, whiles = total + max(c[0] for c in counts), whiles + max(c[1] for c in counts)
        else:
            scale = params["length"] if name == "scan" else 1
            whiles += name == "while"
            for v in params.values():
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    if isinstance(sub, (Jaxpr, ClosedJaxpr)):
                        f, w = jaxpr_flops(sub)
                        total, whiles = total + scale * f, whiles + w
    return total, whiles


def _cpu_cost(module) -> dict:
    from jax._src import xla_bridge
    from jax._src.lib import _jax
    return dict(_jax.hlo_module_cost_analysis(xla_bridge.get_backend("cpu"), module))


def lowered_flops(lowered) -> float:
    """FLOPs of a lowered (whole, unpartitioned) program: XLA's HLO cost analysis (2 per multiply-add)."""
    return float(_cpu_cost(lowered.compiler_ir("hlo").get_hlo_module()).get("flops", 0.0))


def compiled_cost(compiled) -> dict:
    """Per-device {"flops", "bytes"} of a compiled program: its own cost analysis, else (GPU) XLA's cost analysis
    of its optimised module on the CPU client."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- optional on some backends
        ca = None
    ca = ca[0] if isinstance(ca, (list, tuple)) and ca else ca
    if not ca:
        ca = _cpu_cost(compiled.runtime_executable().hlo_modules()[0])
    # XLA:GPU's count of a module with cuBLAS custom calls can be negative (-1: unknown)
    return {"flops": max(float(ca.get("flops", 0.0)), 0.0), "bytes": max(float(ca.get("bytes accessed", 0.0)), 0.0)}


def hlo_text(compiled) -> str:
    return compiled.as_text() or ""


def estimate(flops_per_device: float, bytes_per_device: float, collective_bytes: float, chip) -> dict:
    """Roofline step time (seconds) and the FLOP utilisation it implies, per device; {} without chip figures."""
    if chip is None or not chip.peak_tflops:
        return {}
    t = {"compute_s": flops_per_device / (chip.peak_tflops * 1e12),
         "hbm_s": bytes_per_device / (chip.hbm_gbps * 1e9) if chip.hbm_gbps else 0.0,
         "collective_s": collective_bytes / (chip.link_gbps * 1e9) if chip.link_gbps else 0.0}
    step = max(t.values())
    bound = max(t, key=t.get).removesuffix("_s")
    return {**t, "step_s": step, "bound": bound,
            "mfu": flops_per_device / step / (chip.peak_tflops * 1e12) if step else 0.0}
