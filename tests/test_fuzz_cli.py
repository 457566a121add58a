"""Bounded fuzzing of the command lines users touch, with corrupted inputs from fixed seeds.

Each case runs a CLI's ``main(argv)`` in this process and asserts: no exception escapes (no traceback),
the exit code is 0 (the corruption was harmless, e.g. a flipped bit in tensor data) or 2, a failure
prints a message on stderr that names the file or the field, and a failed run leaves nothing at its
output path. ``test_fuzz_summary`` prints the number of cases per CLI."""
from __future__ import annotations

import contextlib
import io
import json
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import nothing_at

torch = pytest.importorskip("torch")

CASES: dict[str, int] = {}


def call(main, argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main([str(a) for a in argv])
        except SystemExit as e:             # argparse usage errors exit 2 with their own message
            rc = int(e.code or 0)
    return rc, out.getvalue(), err.getvalue()


def check(cli: str, main, argv, out: Path, names: tuple[str, ...], case: str):
    """One fuzz case: a clean exit 0, or exit 2 with a message naming one of ``names``, nothing at ``out``."""
    CASES[cli] = CASES.get(cli, 0) + 1
    rc, so, se = call(main, argv)
    assert "Traceback" not in se + so, f"{cli} [{case}]: traceback\n{se[-2000:]}"
    assert rc in (0, 2), f"{cli} [{case}]: exit {rc}\n{se[-2000:]}"
    if rc == 2:
        assert se.strip(), f"{cli} [{case}]: exit 2 without a message"
        assert any(n in se for n in names), f"{cli} [{case}]: message names none of {names}: {se!r}"
        assert nothing_at(out), f"{cli} [{case}]: {out} left behind after a failure"
    return rc, so, se


# ----------------------------------------------------------------------------------------------- convert
@pytest.fixture(scope="module")
def llama_src(tmp_path_factory):
    from tests.test_llama import hf_llama
    d = tmp_path_factory.mktemp("hf")
    hf_llama().save_pretrained(d)
    return d


def _copy_src(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _mutations(rng: random.Random, blob: bytes, header_len: int):
    """(name, new bytes) corruptions of a safetensors file."""
    n = len(blob)
    for _ in range(8):
        cut = rng.randrange(0, n)
        yield f"truncated at {cut}/{n}", blob[:cut]
    for _ in range(10):
        b = bytearray(blob)
        i = rng.randrange(0, 8 + header_len)       # the length prefix or the JSON header
        b[i] ^= 1 << rng.randrange(8)
        yield f"header bit flip at {i}", bytes(b)
    for _ in range(3):
        b = bytearray(blob)
        i = rng.randrange(8 + header_len, n)       # tensor data: harmless to the format
        b[i] ^= 1 << rng.randrange(8)
        yield f"data bit flip at {i}", bytes(b)
    yield "huge header length", struct.pack("<Q", 1 << 40) + blob[8:]
    yield "empty file", b""


def test_fuzz_convert(llama_src, tmp_path):
    from safetensors.torch import load_file, save_file

    from convert.__main__ import main

    rng = random.Random(0)
    weights = llama_src / "model.safetensors"
    blob = weights.read_bytes()
    header_len = struct.unpack("<Q", blob[:8])[0]
    k = 0

    def run(src: Path, case: str, names=("model.safetensors", "config.json", "pytorch_model.bin")):
        nonlocal k
        k += 1
        out = tmp_path / f"out{k}"
        return check("convert", main, ["hf-llama", "--src", src, "--out", out], out, names + (str(src),), case)

    for case, data in _mutations(rng, blob, header_len):
        src = _copy_src(llama_src, tmp_path / f"src{k}")
        (src / "model.safetensors").write_bytes(data)
        run(src, case)
    sd = load_file(weights)
    keys = sorted(sd)
    for j in range(9):                             # wrong dtype / wrong shape / missing or extra key
        bad = dict(sd)
        key = rng.choice(keys)
        kind = ("int dtype", "wrong shape", "missing key", "extra key")[j % 4]
        if kind == "int dtype":
            bad[key] = bad[key].to(torch.int64)
        elif kind == "wrong shape":
            bad[key] = torch.zeros(*[s + 1 for s in bad[key].shape])
        elif kind == "missing key":
            bad.pop(key)
        else:
            bad[key + "_extra"] = bad[key].clone()
        src = _copy_src(llama_src, tmp_path / f"src{k}")
        save_file(bad, src / "model.safetensors")
        rc, _, se = run(src, f"{kind} {key}", names=(key,))
        assert rc == 2, f"convert accepted a checkpoint with {kind} {key}"
    cfg = json.loads((llama_src / "config.json").read_text())
    for case, text in [("broken JSON", "{"), ("a list", "[]"),
                       ("hidden_size as text", json.dumps({**cfg, "hidden_size": "x"})),
                       ("no hidden_size", json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"})),
                       ("negative layers", json.dumps({**cfg, "num_hidden_layers": -1}))]:
        src = _copy_src(llama_src, tmp_path / f"src{k}")
        (src / "config.json").write_text(text)
        rc, _, _ = run(src, f"config.json: {case}")
        assert rc == 2, f"convert accepted config.json with {case}"

    class Boom:                                     # a pickle that would run code if unpickled unsafely
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    src = _copy_src(llama_src, tmp_path / f"src{k}")
    (src / "model.safetensors").unlink()
    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": Boom()}, f)
    rc, _, _ = run(src, "pickle with code")
    assert rc == 2 and not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------ pairs / COCO
def _coco(tmp_path: Path):
    """A valid 4-image COCO part file (objects with parts) and its images."""
    cats = [{"id": 1, "name": "chair"}, {"id": 2, "name": "chair:leg"}, {"id": 3, "name": "chair:seat"},
            {"id": 4, "name": "stool"}, {"id": 5, "name": "stool:leg"}, {"id": 6, "name": "stool:seat"}]
    images, anns = [], []
    for iid in range(1, 5):
        images.append({"id": iid, "file_name": f"{iid}.png", "height": 48, "width": 48})
        Image.fromarray(np.full((48, 48, 3), 50 * iid, np.uint8)).save(tmp_path / f"{iid}.png")
        obj = 1 if iid <= 2 else 4
        oid = len(anns) + 1
        anns.append({"id": oid, "image_id": iid, "category_id": obj, "obj_ann_id": oid,
                     "segmentation": [[4, 4, 40, 4, 40, 44, 4, 44]]})
        anns.append({"id": oid + 1, "image_id": iid, "category_id": obj + 1, "obj_ann_id": oid,
                     "segmentation": [[4, 30, 12, 30, 12, 44, 4, 44]]})
        anns.append({"id": oid + 2, "image_id": iid, "category_id": obj + 2, "obj_ann_id": oid,
                     "segmentation": [[4, 4, 40, 4, 40, 20, 4, 20]]})
    return {"images": images, "annotations": anns, "categories": cats}


def _values(rng: random.Random):
    return rng.choice([None, "x", -1, 1e9, [], {}, [[1, 2]], [[-5, -5, 900, -5, 900, 900]], "", True])


def _mutate_json(rng: random.Random, data: dict) -> tuple[str, dict]:
    d = json.loads(json.dumps(data))
    section = rng.choice(["images", "annotations", "categories"])
    rec = rng.choice(d[section])
    key = rng.choice(sorted(rec))
    if rng.random() < 0.4:
        rec.pop(key)
        return f"{section}: {key} removed", d
    rec[key] = _values(rng)
    return f"{section}: {key} = {rec[key]!r}", d


def test_fuzz_pairs_from_coco(tmp_path):
    from calico_jax.data.pairs import main
    from calico_jax.data.pairs_io import read_pairs

    rng = random.Random(1)
    good = _coco(tmp_path)
    text = json.dumps(good)
    cases = [_mutate_json(rng, good) for _ in range(110)]
    cases += [(f"truncated at {c}", None) for c in sorted(rng.sample(range(1, len(text)), 10))]
    cases += [("not an object", []), ("no images key", {"annotations": [], "categories": []})]
    ok = 0
    for n, (case, data) in enumerate(cases):
        f = tmp_path / f"coco{n}.json"
        f.write_text(text[:int(case.split()[2])] if data is None else json.dumps(data))
        out = tmp_path / f"pairs{n}.json"
        rc, so, _ = check("pairs", main, ["--coco", f, "--images", tmp_path, "--out", out, "--num_images", 2],
                          out, (f.name, "annotations", "images", "categories", "segmentation"), case)
        if rc == 0:
            ok += 1
            assert "skipped" in so or "images:" in so
            read_pairs(out)                              # a written file is complete and valid
    assert 0 < ok < len(cases)                           # some corruptions are harmless, most are not


# ------------------------------------------------------------------------------------------------ predict
def _image_cases(tmp_path: Path, rng: random.Random):
    good = tmp_path / "good.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), np.uint8)).save(good)
    png = good.read_bytes()
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(buf, "JPEG")
    jpg = buf.getvalue()
    yield "random bytes", bytes(rng.randrange(256) for _ in range(500))
    yield "empty", b""
    yield "text", b"hello, not an image\n"
    for c in sorted(rng.sample(range(1, len(png)), 6)):
        yield f"png truncated at {c}", png[:c]
    for c in sorted(rng.sample(range(1, len(jpg)), 6)):
        yield f"jpeg truncated at {c}", jpg[:c]
    # PNG headers claiming a zero-size and a 100k x 100k image (IHDR rewritten, CRC left stale)
    for w, h in ((0, 20), (30, 0), (100_000, 100_000)):
        b = bytearray(png)
        b[16:24] = struct.pack(">II", w, h)
        yield f"png header {w}x{h}", bytes(b)


def test_fuzz_predict_inputs(tmp_path):
    from calico_jax.inference.predict import main

    rng = random.Random(2)
    for n, (case, data) in enumerate(_image_cases(tmp_path, rng)):
        f = tmp_path / f"in{n}.img"
        f.write_bytes(data)
        out = tmp_path / f"pred{n}"
        rc, _, _ = check("predict", main, ["--ckpt", tmp_path / "no_model", "--image", f, "--image", f,
                                           "--task", "common-parts", "--out", out], out, (f.name,), case)
        assert rc == 2
    out = tmp_path / "pred_dir"
    rc, _, _ = check("predict", main, ["--ckpt", tmp_path / "no_model", "--image", tmp_path, "--task",
                                       "common-parts", "--out", out], out, (str(tmp_path),), "a directory")
    assert rc == 2
    # valid images, missing model: the checkpoint is named
    rc, _, _ = check("predict", main, ["--ckpt", tmp_path / "no_model", "--image", tmp_path / "good.png",
                                       "--task", "common-parts", "--out", out], out, ("no_model",), "no model")
    assert rc == 2


# ------------------------------------------------------------------------------- evaluate --predictions
@pytest.fixture(scope="module")
def eval_pairs(tmp_path_factory):
    from calico_jax.data.pairs import main
    d = tmp_path_factory.mktemp("evalpairs")
    (d / "coco.json").write_text(json.dumps(_coco(d)))
    rc, _, se = call(main, ["--coco", d / "coco.json", "--images", d, "--out", d / "pairs.json"])
    assert rc == 0, se
    return d / "pairs.json"


def _predictions(pairs_path: Path) -> dict:
    from calico_jax.data.pairs_io import read_pairs
    from calico_jax.data.rle import encode
    from calico_jax.inference.evaluate import PRED_FORMAT
    p = read_pairs(pairs_path)
    samples = [{"id": s["id"], "answer": s["answer"],
                "masks": [{"label": g["label"], "image": g["image"], "score": 0.9, "rle": encode(p.mask(g))}
                          for g in s["segs"]]} for s in p.samples]
    return {"format": PRED_FORMAT, "samples": samples}


def _mutate_predictions(rng: random.Random, data: dict) -> tuple[str, dict]:
    d = json.loads(json.dumps(data))
    s = rng.choice(d["samples"])
    where = rng.choice(["sample", "mask", "rle", "top"])
    if where == "top":
        key = rng.choice(["format", "samples"])
        d[key] = _values(rng)
        return f"top-level {key} = {d[key]!r}", d
    if where == "sample":
        key = rng.choice(["id", "masks", "answer"])
        s[key] = _values(rng)
        return f"samples[].{key} = {s[key]!r}", d
    if not s["masks"]:
        return "unchanged", d
    m = rng.choice(s["masks"])
    if where == "mask":
        key = rng.choice(["label", "image", "score", "rle"])
        m[key] = _values(rng) if rng.random() < 0.7 else 99
        return f"masks[].{key} = {m[key]!r}", d
    key = rng.choice(["size", "counts"])
    m["rle"][key] = rng.choice([_values(rng), [3, 3], "!!!", [48, 48, 1]])
    return f"masks[].rle.{key} = {m['rle'][key]!r}", d


def test_fuzz_evaluate_predictions(eval_pairs, tmp_path):
    from calico_jax.inference.evaluate import main

    rng = random.Random(3)
    good = _predictions(eval_pairs)
    cases = [_mutate_predictions(rng, good) for _ in range(45)] + [("not JSON", None), ("a list", [])]
    for n, (case, data) in enumerate(cases):
        f = tmp_path / f"pred{n}.json"
        f.write_text("{\"format\":" if data is None else json.dumps(data))
        out = tmp_path / f"report{n}.json"
        check("evaluate", main, ["--pairs", eval_pairs, "--predictions", f, "--out", out], out,
              (f.name, "samples", "masks", "rle", "label", "image", "score", "format"), case)


# -------------------------------------------------------------------------------------- config overrides
OVERRIDES = [
    "--config.no_such_field=1", "--config.model.no_such=1", "--config.total_steps=many", "--config.total_steps=1.5",
    "--config.recipe.loss.pixel_loss=l2", "--config.model.llm.remat=sometimes", "--config.mesh.fsdp=zero",
    "--config.data.max_images=[1,2", "--config.optim.lr={}", "--config.model.cem.enabled=maybe",
    "--config.model.llm.lora.r=x", "--config.dtype=float7", "--config.model.preprocess.sam_size=-3",
    "--config.data.synthetic.no_field=2", "--config.model.seg.max_seg=a", "--config.batch_size=",
    "--config..x=1", "--config=1", "--config.model=3", "--config.task=nosuchtask",
    "--config.model.loss.pixel_loss=focal", "--config.model.trainable=.*",   # moved to recipe: an error
]


@pytest.mark.parametrize("override", OVERRIDES)
def test_fuzz_config_overrides(override, tmp_path):
    import train
    wd = tmp_path / "wd"
    field = override.removeprefix("--config.").split("=")[0].split(".")[-1] or "config"
    check("config", train.main, ["--config", "configs/tiny.py", "--workdir", wd, override], wd,
          (field, override.split("=")[0].removeprefix("--config."), "config file"), override)
    assert nothing_at(wd)


def test_fuzz_summary():
    """Runs last in this file (pytest keeps definition order): the case counts, for the record."""
    print("fuzz cases:", json.dumps(CASES), "total", sum(CASES.values()))
