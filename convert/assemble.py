"""``python -m convert calico-assemble``: one CALICO checkpoint from converted parts.

    python -m convert calico-assemble --blip2 OUT_A --dinov2 OUT_B --llm OUT_C --out OUT
        [--sam OUT_D] [--config OVERRIDES.json] [--seed 0] [--dtype float32|bfloat16] [--overwrite]

Parts (directories written by ``python -m convert``):

* ``--blip2``: ``blip2_vision`` (hf-blip2 / lavis-blip2): ``vision_model``, ``qformer``, ``query_tokens``,
  ``language_projection``. The Q-Former's instruction embeddings (InstructBLIP) are dropped unless
  ``qformer_text_input`` is on (by default CALICO's Q-Former reads no instruction text); the part's ``tokenizer/``
  (hf-blip2: InstructBLIP's Q-Former tokenizer) becomes ``OUT/tokenizer/qformer_tokenizer/``;
* ``--dinov2``: ``dinov2`` (hf-dinov2 / dinov2) -> ``dinov2`` (needed when the CEM uses DINOv2);
* ``--llm``: ``glamm_parts`` (glamm) -> ``llm``, ``sam``, ``text_hidden_fcs_0_*`` (and ``seg.token_id``
  from its tokenizer), or a plain ``llama`` (hf-llama) together with ``--sam`` (``sam`` / ``hf-sam``);
  then f_segmentation is new.

The :class:`~calico_jax.models.calico.CalicoConfig` is built from the parts' configs (``llm.lora``
defaults to the paper's r=8 on q/v when the LLM part has none), then the ``--config`` JSON object is
merged in recursively (e.g. ``{"cem": {"num_heads": 4}, "cam": {"layers": [11, 22]}, "seg": {...}}``).
An override that changes a part's own architecture (any field of ``vision``/``dinov2``/``sam``, or of
``llm`` other than ``lora``) is an error: the part's weights were converted for the original.

New modules are initialised as ``Calico.init`` does for the final config: CEM (``out_proj`` zero when
``cem.zero_init_output``), CAMs (zero when ``cam.zero_init``), LoRA (``lora_a`` random, ``lora_b``
zero), f_segmentation when no GLaMM part gives it; ``cam_query_tokens`` (and per-CAM copies) are
copies of the BLIP-2 part's ``query_tokens``. Every part tensor is copied bit for bit. All problems
(missing / unexpected tensors, shape or config mismatches) are reported together; OUT is written
atomically (nothing is left on error). Exit codes as ``python -m convert``: 2 for user errors.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from calico_jax.checkpoints import converted as pretrained
from calico_jax.checkpoints.converted import abstract_params
from calico_jax.checkpoints.torch_files import CheckpointError, load_json_arg
from calico_jax.core import fs
from calico_jax.core.config import ConfigError
from calico_jax.models import scan
from calico_jax.models.calico import Calico, CalicoConfig

NEW_MODULES = r"cem/.*|cam_\d+/.*|cam_query_tokens(_\d+)?|llm/.*/lora_[ab]|text_hidden_fcs_0_[02]/.*"
UNUSED = {r"qformer/embeddings/.*": "Q-Former instruction embeddings (qformer_text_input is off: no instruction text)"}
PART_MODELS = {"blip2": ("blip2_vision",), "dinov2": ("dinov2",), "llm": ("glamm_parts", "llama"), "sam": ("sam",)}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m convert calico-assemble", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blip2", required=True, help="converted blip2_vision directory (hf-blip2 / lavis-blip2)")
    p.add_argument("--dinov2", default=None, help="converted dinov2 directory (needed when the CEM uses DINOv2)")
    p.add_argument("--llm", required=True, help="converted glamm_parts (glamm) or llama (hf-llama) directory")
    p.add_argument("--sam", default=None, help="converted sam directory (only with a plain llama --llm)")
    p.add_argument("--out", required=True, help="output directory (model 'calico')")
    p.add_argument("--config", default=None, help="JSON file of CalicoConfig overrides, merged recursively")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for the randomly initialised new params")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="stored param dtype")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    return p.parse_args(argv)


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}/").items()}
    return {prefix[:-1]: tree}


def _unflatten(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def load_part(role: str, path: str | None):
    """(model name, config, flat params) of a converted part, or CheckpointError."""
    try:
        meta = pretrained.read_meta(path)
    except (FileNotFoundError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"--{role} {path}: {e}") from None
    if meta["model"] not in PART_MODELS[role]:
        raise CheckpointError(f"--{role} {path}: a {meta['model']!r} checkpoint; expected "
                              f"{' or '.join(repr(m) for m in PART_MODELS[role])}")
    try:
        _, params, config = pretrained.load(path)
    except ValueError as e:
        raise CheckpointError(f"--{role}: {e}") from None
    return meta["model"], config, _flat(params)


def build_config(parts: dict[str, tuple], overrides: dict) -> Any:
    """CalicoConfig from the parts' configs + overrides; raises CheckpointError listing every conflict."""
    base = CalicoConfig().to_dict()
    given: dict[str, dict] = {"vision": parts["blip2"][1].to_dict()}
    if "dinov2" in parts:
        given["dinov2"] = parts["dinov2"][1].to_dict()
    model, llm_cfg, _ = parts["llm"]
    llm = (llm_cfg.llm if model == "glamm_parts" else llm_cfg).to_dict()
    given["llm"] = {**llm, "lora": llm["lora"] if llm["lora"] is not None else base["llm"]["lora"]}
    given["sam"] = (llm_cfg.sam if model == "glamm_parts" else parts["sam"][1]).to_dict()
    seg = {}
    if model == "glamm_parts":
        seg["projection"] = llm_cfg.seg_projection
        if llm_cfg.seg_token_id is not None:
            seg["token_id"] = llm_cfg.seg_token_id
    # Input sizes the parts' position tables are made for (overridable; SAM's must match, CalicoConfig checks it).
    native = {"blip_size": given["vision"]["vision"]["image_size"],
              "sam_size": given["sam"]["image_encoder"]["img_size"]}
    merged = merge(merge(base, {**given, "seg": {**base["seg"], **seg},
                                "preprocess": {**base["preprocess"], **native}}), overrides)
    conflicts = []
    for name, cfg in given.items():
        for field, value in cfg.items():
            if not (name == "llm" and field == "lora") and merged[name][field] != value:
                conflicts.append(f"{name}.{field}: the part has {value!r}, --config sets {merged[name][field]!r}")
    if conflicts:
        raise CheckpointError("--config changes the architecture of converted parts (their weights would not "
                              "fit):\n    " + "\n    ".join(conflicts))
    try:
        return CalicoConfig.from_dict(merged)
    except (ConfigError, ValueError, TypeError) as e:
        raise CheckpointError(f"CALICO config from the parts{' + --config' if overrides else ''}: {e}") from None


def _part_leaves(parts: dict[str, tuple]) -> dict[str, tuple[str, Any]]:
    """Calico path -> (role, array) for every tensor the parts provide."""
    out: dict[str, tuple[str, Any]] = {}
    for role, (model, _, flat) in parts.items():
        prefix = {"dinov2": "dinov2/", "sam": "sam/"}.get(role, "llm/" if model == "llama" else "")
        out.update({prefix + k: (role, v) for k, v in flat.items()})
    return out


def assemble(parts: dict[str, tuple], config: Any, seed: int = 0) -> tuple[dict, dict[str, int], list[str]]:
    """-> (Calico params, tensors per source, notes); raises CheckpointError with every problem."""
    import flax.linen as nn
    import jax
    import numpy as np

    module = Calico(config)
    # per layer, whatever the config's scan_layers (converted checkpoints are stored so: models/scan.py)
    target = {k: v for k, v in _flat(scan.unstack_layers(nn.unbox(abstract_params(module)), config)).items()}
    given = _part_leaves(parts)
    skipped: dict[str, int] = {}
    unexpected, mismatched = [], []
    for path, (role, value) in given.items():
        if path in target:
            if tuple(np.shape(value)) != tuple(target[path].shape):
                mismatched.append(f"{path} (from --{role}): {tuple(np.shape(value))}, CALICO expects "
                                  f"{tuple(target[path].shape)}")
            continue
        reason = next((r for p, r in UNUSED.items() if re.fullmatch(p, path)), None)
        if reason is None and role == "dinov2":
            reason = "DINOv2 (the config's CEM does not use it)"
        if reason is None:
            unexpected.append(f"{path} (from --{role})")
        else:
            skipped[reason] = skipped.get(reason, 0) + 1
    new = [p for p in target if p not in given]
    missing = [f"{p} {tuple(target[p].shape)}" for p in new if not re.fullmatch(NEW_MODULES, p)]
    problems = []
    for title, items in (("missing (no part provides it: pass --dinov2 / --sam?)", missing),
                         ("unexpected (not a parameter of this CALICO config)", unexpected),
                         ("shape mismatch(es)", mismatched)):
        if items:
            problems.append(f"{len(items)} {title}:\n    " + "\n    ".join(items[:60])
                            + (f"\n    ... and {len(items) - 60} more" if len(items) > 60 else ""))
    if problems:
        raise CheckpointError("cannot assemble CALICO from these parts:\n  " + "\n  ".join(problems))

    # Only the new leaves leave the jitted init, so XLA never materialises the frozen parts' random init.
    new_set = sorted(new)
    init = jax.jit(lambda k: {p: v for p, v in _flat(nn.unbox(module.init(k, module.dummy_inputs())["params"]))
                              .items() if p in new_set})
    fresh = {k: np.asarray(v) for k, v in init(jax.random.key(seed)).items()}
    for p in fresh:
        if re.fullmatch(r"cam_query_tokens(_\d+)?", p):   # Cheetah's new_query_tokens: a copy of q
            fresh[p] = np.array(given["query_tokens"][1], dtype=fresh[p].dtype, copy=True)
    params = {p: (given[p][1] if p in given else fresh[p]) for p in target}
    counts: dict[str, int] = {}
    for p in target:
        src = f"--{given[p][0]}" if p in given else "new"
        counts[src] = counts.get(src, 0) + 1
    zeros = sorted({p.split("/")[0] for p in fresh if not np.any(fresh[p])})
    notes = [f"new modules: {sorted({p.split('/')[0] for p in fresh})}; all-zero leaves in {zeros}",
             *[f"skipped {n} tensor(s): {r}" for r, n in sorted(skipped.items())]]
    return _unflatten(params), counts, notes


def run(args: argparse.Namespace) -> int:
    import jax
    import ml_dtypes
    import numpy as np

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CheckpointError(f"{out} already exists (pass --overwrite to replace it)")
    t0 = time.time()
    parts = {"blip2": load_part("blip2", args.blip2), "llm": load_part("llm", args.llm)}
    if args.dinov2 is not None:
        parts["dinov2"] = load_part("dinov2", args.dinov2)
    if parts["llm"][0] == "llama":
        if args.sam is None:
            raise CheckpointError(f"--llm {args.llm} is a plain llama: pass --sam (a converted SAM), or convert "
                                  "a GLaMM/LISA checkpoint with the glamm family")
        parts["sam"] = load_part("sam", args.sam)
    elif args.sam is not None:
        raise CheckpointError(f"--sam: the glamm_parts --llm {args.llm} already holds SAM")
    overrides = load_json_arg(args.config, {}, "CalicoConfig overrides") if args.config else {}
    config = build_config(parts, overrides)
    params, counts, notes = assemble(parts, config, args.seed)
    n = sum(np.size(x) for x in jax.tree.leaves(params))
    print(f"calico-assemble: {sum(counts.values())} tensors -> calico ({n:,} parameters) in {time.time() - t0:.1f}s")
    for src, count in sorted(counts.items()):
        print(f"  {src}: {count} tensor(s)")
    for note in notes:
        print(f"  {note}")
    dtype = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.float32  # parts may be stored in either
    floating = (lambda d: np.issubdtype(d, np.floating) or d == ml_dtypes.bfloat16)  # noqa: E731
    params = jax.tree.map(lambda x: np.asarray(x).astype(dtype) if floating(np.asarray(x).dtype) else np.asarray(x),
                          params)
    source = {"family": "calico-assemble", **{role: str(Path(getattr(args, role)).absolute())
                                              for role in parts}}
    tok = Path(args.llm) / "tokenizer"   # glamm copies its tokenizer there; predict/evaluate read it from OUT
    qtok = Path(args.blip2) / "tokenizer"   # hf-blip2: InstructBLIP's Q-Former tokenizer (qformer_text_input)
    with fs.atomic_directory(out, overwrite=args.overwrite) as tmp:
        pretrained.write(tmp, "calico", config, params, dtype=args.dtype, source=source)
        if tok.is_dir():
            shutil.copytree(tok, tmp / "tokenizer")
        if qtok.is_dir():
            shutil.copytree(qtok, tmp / "tokenizer" / "qformer_tokenizer")
    print(f"wrote {out}"
          + ("" if tok.is_dir() else f" (no tokenizer: {tok} is missing; add OUT/tokenizer/ for predict)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except (CheckpointError, ConfigError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
