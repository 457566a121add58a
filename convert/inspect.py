"""``python -m convert inspect SRC [--family F] [--depth N]``: what a checkpoint holds, and what a family makes of it.

SRC is anything ``python -m convert`` reads (a file, a ``save_pretrained`` directory, shards + index), or a
calico_jax checkpoint directory (``python -m convert`` / ``calico_jax.export`` output: its model, dtype, source,
tokenizer and parameter tree, read from the orbax metadata). No tensor is loaded: safetensors headers (and the
index) give names, shapes and dtypes; pickles are opened with ``torch.load(weights_only=True, mmap=True)``.
Printed:

* the files, the tensor count, the total parameter count and the dtypes;
* the key tree grouped by prefix (``--depth`` components, stopping at the first ModuleList index; a PEFT
  ``base_model.model.`` wrapper is left out): tensors, parameters, dtypes and the shapes of the first few keys;
* for a family (``--family``, or else the family whose layout fits best, named with its score), which rule each
  group's keys map to (the canonical names it produces, e.g. ``-> qformer.encoder``, or ``skipped: reason``),
  and the groups no rule matches.

Exit 0 for every readable checkpoint, unknown layouts included (their groups are listed as unmatched);
2 for unreadable input (missing, truncated, corrupt, not weights-only).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import jax

from calico_jax.checkpoints import author_layout, converted
from calico_jax.checkpoints.torch_files import CheckpointError, open_checkpoint
from calico_jax.models.calico import CalicoConfig
from calico_jax.models.llama import LlamaConfig
from calico_jax.models.sam import SamConfig
from convert import families
from convert.families import blip2, calico, dinov2, glamm, lavis_blip2, llama, peft_lora, sam
from convert.mapping import Skip

PEFT = "base_model.model."
AUTHOR_ONLY = re.compile(r"model\.(?:Qformer|dino_model|extraction_layer|adaptive_layers|reintegration_layers|"
                         r"visual_encoder|ln_vision)\.")


def _sam_prefix(keys: list[str]) -> str:
    try:
        return sam.find_prefix(keys, "")
    except CheckpointError:
        return "model.grounding_encoder."


def family_rules(name: str, keys: list[str]) -> list[tuple[re.Pattern, Any, str]]:
    """(regex, target | Skip, label) of a family's rename table, with default configs (nothing is read)."""
    labels: dict[str, str] = {}
    if name == "calico":
        labels = {r.author_regex.pattern: r.label for r in author_layout.RULES}
        rules = calico.rules({}, CalicoConfig(), _sam_prefix(keys))
    elif name == "glamm":
        rules = glamm.parts_rules(LlamaConfig(), _sam_prefix(keys))
    elif name == "lavis-blip2":
        rules = lavis_blip2.lavis_rules(True, [])
    elif name == "hf-blip2":
        rules = blip2.hf_rules()
    elif name == "dinov2":
        rules = [*dinov2.ORIGINAL_RULES, (dinov2.QKV.pattern, r"encoder.layer.\1.attention.attention.{q,k,v}.\2")]
    elif name == "hf-dinov2":
        rules = [(r"(?:dinov2\.)?" + p, t) for p, t in dinov2.HF_RULES]
        rules.append((r"(?:dinov2\.)?" + dinov2.SWIGLU_SPLIT.pattern, r"encoder.layer.\1.mlp.weights_in.\3"))
    elif name == "sam":
        p = re.escape(_sam_prefix(keys))
        rules = [(p + r"((?:image_encoder|prompt_encoder|mask_decoder)\..+)", r"\1"),
                 (p + r"pixel_(?:mean|std)", Skip("pixel_mean/pixel_std constants"))]
    elif name == "hf-sam":
        rules = sam.hf_rules(SamConfig())
    elif name == "hf-llama":
        rules = llama.rules(LlamaConfig())
    elif name == "peft-lora":
        rules = peft_lora.RULES
    else:
        raise CheckpointError(f"--family {name!r}: no rule table")
    return [(re.compile(p), t, labels.get(p, "")) for p, t in rules]


def _detects(name: str, keys: list[str]) -> bool:
    """Whether a family's layout is plausible at all (its rule tables end in catch-alls such as ``model\\..+``)."""
    top = {k.split(".")[0] for k in keys}
    has = lambda rx: any(re.match(rx, k) for k in keys)  # noqa: E731
    return {
        "calico": bool(any(AUTHOR_ONLY.match(k) for k in keys)) or has(r"model\.(?:cem|cams|blip2|dinov2)\."),
        "glamm": has(r"model\.text_hidden_fcs\.") and not any(AUTHOR_ONLY.match(k) for k in keys),
        "lavis-blip2": "Qformer" in top,
        "hf-blip2": "qformer" in top and "vision_model" in top,
        "dinov2": has(r"blocks\.\d+\.attn\.qkv\.") and "pos_embed" in top,
        "hf-dinov2": has(r"(?:dinov2\.)?encoder\.layer\.\d+\.attention\.") and not has(r"qformer\."),
        "sam": top <= {"image_encoder", "prompt_encoder", "mask_decoder", "pixel_mean", "pixel_std"},
        "hf-sam": "vision_encoder" in top and "mask_decoder" in top,
        "hf-llama": top <= {"model", "lm_head"} and not has(r"model\.text_hidden_fcs\."),
        "peft-lora": has(r".*\.lora_A\."),
    }.get(name, False)


def match(keys: list[str], rules) -> dict[str, tuple[str, str, str] | None]:
    """key -> ("map", target, label) | ("skip", reason, label) | None (unmatched); PEFT wrappers removed."""
    out: dict[str, tuple[str, str, str] | None] = {}
    for key in keys:
        k = key.removeprefix(PEFT).replace(".base_layer.", ".")
        hit = None
        for rx, target, label in rules:
            m = rx.fullmatch(k)
            if m is None:
                continue
            if isinstance(target, Skip) or target == "skip":
                hit = ("skip", target.reason if isinstance(target, Skip) else "pattern table: skip", label)
            else:
                hit = ("map", m.expand(target).split("|")[0].split("@")[0], label)
            break
        out[key] = hit
    return out


def best_family(keys: list[str]) -> tuple[str | None, list[tuple[str, int]]]:
    scores = []
    for name in sorted(families.FAMILIES):
        if _detects(name, keys):
            hits = match(keys, family_rules(name, keys))
            scores.append((name, sum(v is not None for v in hits.values())))
    scores.sort(key=lambda s: -s[1])
    return (scores[0][0] if scores else None), scores


def group_of(key: str, depth: int) -> str:
    parts = key.removeprefix(PEFT).split(".")
    out = []
    for p in parts[:-1]:
        if p.isdigit() or len(out) == depth:
            break
        out.append(p)
    return ".".join(out or parts[:1])


def _summary(hits: list) -> str:
    targets: Counter = Counter()
    for h in hits:
        if h is None:
            targets["UNMATCHED"] += 1
        elif h[0] == "skip":
            targets[f"skipped: {h[1]}"] += 1
        else:
            top = re.sub(r"<cam:(\d+)>", r"cam[\1]", h[1]).split(".")[0]
            targets[f"-> {top}.*" + (f" [{h[2]}]" if h[2] else "")] += 1
    return "; ".join(f"{t} ({n})" for t, n in targets.most_common())


def report_calico_jax(src: str, depth: int = 2, shapes: int = 3) -> str:
    """A calico_jax checkpoint directory: its ``config.json`` and the params' orbax metadata (no tensor read)."""
    import orbax.checkpoint as ocp

    root = Path(src).absolute()
    meta = converted.read_meta(root)
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.metadata(root / "params").item_metadata.tree
    except Exception as e:  # noqa: BLE001 -- orbax's own words name what is missing or broken
        raise CheckpointError(f"{root / 'params'}: cannot read the orbax metadata ({e})") from None
    leaves = {".".join(str(getattr(k, "key", k)) for k in path): (tuple(m.shape), str(m.dtype))
              for path, m in jax.tree_util.tree_leaves_with_path(tree)}
    tok = root / "tokenizer"
    tok_files = ", ".join(sorted(f.name for f in tok.iterdir())) if tok.is_dir() else ""
    lines = [f"{src}: calico_jax checkpoint (format_version {meta.get('format_version')}), model "
             f"{meta.get('model')!r}, stored dtype {meta.get('dtype')}",
             f"source: {json.dumps(meta.get('source') or {}, sort_keys=True)}",
             f"tokenizer/: {tok_files or 'none'}",
             f"{len(leaves)} tensors, {sum(_numel(s) for s, _ in leaves.values()):,} parameters; dtypes: "
             + ", ".join(f"{d} {n}" for d, n in Counter(d for _, d in leaves.values()).most_common())]
    groups: dict[str, list[str]] = {}
    for k in leaves:
        groups.setdefault(".".join(k.split(".")[:depth]), []).append(k)
    lines.append(f"{'group':<44} {'tensors':>7} {'params':>15}  dtypes")
    for g in sorted(groups):
        ks = groups[g]
        dt = ",".join(sorted({leaves[k][1] for k in ks}))
        lines.append(f"{g:<44} {len(ks):>7} {sum(_numel(leaves[k][0]) for k in ks):>15,}  {dt}")
        for k in ks[:shapes]:
            lines.append(f"    {k[len(g) + 1:] or k} {leaves[k][0]}")
    return "\n".join(lines)


def report(src: str, family: str | None, depth: int = 2, shapes: int = 3) -> str:
    if (Path(src) / "config.json").is_file() and (Path(src) / "params").is_dir():
        try:
            converted.read_meta(src)
        except ValueError:
            pass   # a Hugging Face config.json: a PyTorch layout after all
        else:
            return report_calico_jax(src, depth, shapes)
    ckpt = open_checkpoint(src)
    keys = ckpt.keys()
    lines = [f"{src}: {len(ckpt.files)} file(s): {', '.join(f.name for f in ckpt.files[:4])}"
             + (" ..." if len(ckpt.files) > 4 else "")]
    numel = {k: _numel(ckpt.shape(k)) for k in keys}
    dtypes = Counter(ckpt.dtype(k) for k in keys)
    lines.append(f"{len(keys)} tensors, {sum(numel.values()):,} parameters; dtypes: "
                 + ", ".join(f"{d} {n}" for d, n in dtypes.most_common()))
    wrapped = sum(k.startswith(PEFT) for k in keys)
    if wrapped:
        lines.append(f"{wrapped} key(s) under the PEFT wrapper {PEFT!r} (left out of the group names)")
    hits: dict[str, Any] = {}
    if family is None:
        family, scores = best_family(keys)
        lines.append("best matching family: " + (f"{family} ({scores[0][1]}/{len(keys)} keys); candidates: "
                                                  + ", ".join(f"{n} {s}" for n, s in scores)
                                                  if family else "none (no family's layout fits)"))
    if family is not None:
        hits = match(keys, family_rules(family, keys))
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(group_of(k, depth), []).append(k)
    lines.append(f"{'group':<44} {'tensors':>7} {'params':>15}  dtypes")
    for g in sorted(groups):
        ks = groups[g]
        dt = ",".join(sorted({ckpt.dtype(k) for k in ks}))
        lines.append(f"{g:<44} {len(ks):>7} {sum(numel[k] for k in ks):>15,}  {dt}")
        for k in ks[:shapes]:
            lines.append(f"    {k.removeprefix(PEFT)[len(g) + 1:] or k} {tuple(ckpt.shape(k))}")
        if family is not None:
            lines.append(f"    {family}: {_summary([hits[k] for k in ks])}")
    if family is not None:
        unmatched = sorted({group_of(k, depth) for k, h in hits.items() if h is None})
        n = sum(h is None for h in hits.values())
        lines.append(f"{family}: all {len(keys)} keys matched" if not n else
                     f"{family}: {n} key(s) unmatched in {len(unmatched)} group(s): {', '.join(unmatched)}")
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert inspect", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="checkpoint file, save_pretrained directory or shards + index")
    p.add_argument("--family", choices=sorted(families.FAMILIES), default=None,
                   help="show this family's rule per group (default: the best-fitting family)")
    p.add_argument("--depth", type=int, default=2, help="key components per group (default 2)")
    p.add_argument("--shapes", type=int, default=3, help="keys with shapes listed per group (default 3)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        print(report(args.src, args.family, args.depth, args.shapes))
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
