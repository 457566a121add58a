"""``--search``: the setting that fits a target, from a small grid of AOT plans (each one a full compile).

The grid (:func:`candidates`) varies the mesh (data x fsdp x tensor), the remat policy per tower and the
micro-batch per device at the config's global batch, ordered from the least memory to the most (more remat, smaller
micro-batches and wider FSDP first). The search compiles in that order until a candidate fits, then ``extra`` more
(each faster if it fits: less recomputation, fewer micro-steps), and picks the fitting plan with the shortest
estimated step time. Every plan is cached as JSON under ``cache_dir`` keyed by a hash of the resolved config, the
target and the compiler versions, so a rerun (or another target's search sharing a candidate) compiles nothing twice.
"""
from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

from calico_jax.plans.train_plan import BACKWARD_TOWERS, REMAT_FIELDS, PlanDoesNotFit, compile_only
from calico_jax.train.config import apply_overrides

DEFAULT_CACHE = Path("~/.cache/calico_jax/plans")
REMAT_SETS = {"llm+qformer": BACKWARD_TOWERS, "llm": ("llm",), "none": ()}


def candidates(cfg, n: int) -> list[tuple[str, list[tuple[str, str]]]]:
    """(label, --config overrides) from the least memory per device to the most."""
    # FSDP over all devices first; pure data parallelism last (replicated frozen weights: most memory, but no
    # per-micro-step all-gathers of them, which bound the FSDP step on 8 x H100: bench/results/aot.md)
    meshes = [(1, n, 1)] + ([(1, n // 2, 2), (2, n // 2, 1)] if n >= 4 and n % 2 == 0 else []) + [(n, 1, 1)]
    meshes = list(dict.fromkeys(meshes))   # n = 1: one mesh
    grid = []
    for remat in REMAT_SETS:
        for micro in (1, 2, 4):
            for rank, (d, f, t) in enumerate(meshes):
                rows = cfg.batch_size // micro
                if rows % (d * f) or cfg.batch_size % (micro * d * f):
                    continue
                accum = cfg.batch_size // (micro * d * f)
                over = [("mesh", json.dumps({"data": d, "fsdp": f, "tensor": t})), ("optim.grad_accum", str(accum))]
                over += [(REMAT_FIELDS[t_], "full" if t_ in REMAT_SETS[remat] else "none") for t_ in REMAT_FIELDS]
                label = f"mesh {d}x{f}x{t}, remat {remat}, micro-batch {micro}/device (grad_accum {accum})"
                # memory order: remat set, then micro-batch, then mesh (FSDP over all devices first)
                grid.append(((list(REMAT_SETS).index(remat), micro, rank), label, over))
    return [(label, over) for _, label, over in sorted(grid, key=lambda g: g[0])]


def _versions() -> str:
    out = []
    for pkg in ("jaxlib", "libtpu", "jax-cuda12-plugin"):
        try:
            out.append(f"{pkg}={metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            pass
    return ",".join(out)


def config_hash(cfg, target_spec: str) -> str:
    text = json.dumps({"config": cfg.to_dict(), "target": target_spec, "versions": _versions()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_plan(cfg, target, cache_dir: Path, memory_gb: float = 0.0) -> dict:
    """The plan of ``cfg`` on ``target`` from the cache, else compiled and cached; ``{"fits": False, "message"}``
    for one that does not fit."""
    path = cache_dir / f"{config_hash(cfg, f'{target.spec}|{memory_gb}')}.json"
    if path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    try:
        rec = compile_only(cfg, target, verbose=False, memory_gb=memory_gb)
    except PlanDoesNotFit as e:
        rec = {**e.report, "fits": False, "message": str(e)}
    cache_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rec, indent=2, sort_keys=True) + "\n")
    return rec


def search(cfg, target, cache_dir: str | Path | None = None, extra: int = 2, max_tries: int = 6,
           json_path: str | Path | None = None, memory_gb: float = 0.0, verbose: bool = True) -> dict | None:
    """The fitting plan with the best estimate (None if none of the first ``max_tries`` fits)."""
    from tqdm import tqdm
    cache_dir = Path(cache_dir or DEFAULT_CACHE).expanduser()
    tried, fits, left = [], [], None
    grid = candidates(cfg, target.num_devices)[:max_tries]
    for label, over in tqdm(grid, desc=f"search {target.spec}", disable=not verbose):
        rec = cached_plan(apply_overrides(cfg, over), target, cache_dir, memory_gb)
        est = (rec.get("estimate") or {}).get("step_s")
        tried.append({"label": label, "overrides": over, "fits": rec["fits"], "cached": rec.get("cached", False),
                      "per_device_memory_gb": rec.get("per_device_memory_gb"), "estimated_step_s": est,
                      "compile_s": rec.get("compile_s")})
        if verbose:
            tqdm.write(f"{label}: {rec.get('per_device_memory_gb', 0):.2f} of {rec['memory_per_device_gb']:.2f} GiB"
                       f"{' fits' if rec['fits'] else ' does not fit'}"
                       + (f", estimated step {est:.3g} s" if est else ""))
        if rec["fits"]:
            fits.append((est if est is not None else float("inf"), label, over, rec))
            left = extra if left is None else left - 1
        elif left is not None:
            left -= 1
        if left is not None and left <= 0:
            break
    best = min(fits, key=lambda f: f[0]) if fits else None
    out = {"target": target.spec, "tried": tried,
           "chosen": None if best is None else {"label": best[1], "overrides": best[2], "plan": best[3]}}
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    if verbose:
        if best is None:
            print(f"search {target.spec}: none of {len(tried)} candidates fits")
        else:
            flags = " ".join(f"--config.{k}={v!r}" if k == "mesh" else f"--config.{k}={v}" for k, v in best[2])
            print(f"chosen for {target.spec}: {best[1]}; estimated step {best[0]:.3g} s (roofline estimate)\n"
                  f"  {flags}")
    return None if best is None else out
