"""Packs a pairs file (:mod:`calico_jax.data.pairs_io`) into ArrayRecord shards that training reads on demand.

    python -m calico_jax.data.pack --pairs pairs.json [more.json ...] --out pairs_packed/ [--shard_size 500000]
        [--strict]

Several pairs files go into one directory in turn (their image, mask and source indices shifted): e.g. builds with
2 and 3 images per sample, trained together (the pipeline pads every sample to ``max_images``).

The pairs file is streamed (:class:`JsonStream`: one ``images`` / ``masks`` / ``samples`` element in memory at a
time, the rest of the file never parsed as a whole), so packing a file of millions of samples needs little
memory. Each sample is checked as the JSON reader checks it (``[SEG]`` identifiers against the mask references);
a bad one is left out and counted in the index's ``report`` (``--strict``: exit 2 at the first). The output is
written into a temporary directory renamed at the end: a failed pack leaves nothing. The directory layout and its
reader are :mod:`calico_jax.data.packed`; every command that reads a pairs file accepts the directory too.

:class:`PackWriter` is the writing half alone, for a producer that has samples in hand (a builder's iterator).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
from array_record.python import array_record_module
from tqdm import tqdm

from calico_jax.core.fs import atomic_directory
from calico_jax.data.packed import FORMAT, INDEX, VERSION
from calico_jax.data.pairs_schema import TASKS, validate_sample
from calico_jax.data.skips import DataError, Report

WRITE_OPTIONS = "group_size:1"   # one record per chunk: random access reads (and decompresses) one record
ARRAYS = ("images", "masks", "samples")
_WS = " \t\r\n"


# ------------------------------------------------------------------------------------- streaming JSON
class JsonStream:
    """Events of a top-level JSON object, read in chunks: ``(key, value)`` for an ordinary key and, for the keys in
    ``arrays``, ``(key, element)`` per element of the array (``(key, ARRAY_END)`` after its last one)."""

    ARRAY_END = object()

    def __init__(self, f, arrays=ARRAYS, chunk: int = 1 << 20, progress=None):
        self.f, self.arrays, self.chunk, self.progress = f, set(arrays), chunk, progress
        self.buf, self.pos, self.eof = "", 0, False
        self.dec = json.JSONDecoder()

    def _fill(self, want: int) -> bool:
        if self.eof:
            return False
        if self.pos > len(self.buf) // 2:
            self.buf, self.pos = self.buf[self.pos:], 0
        got = self.f.read(max(want, self.chunk))
        if not got:
            self.eof = True
            return False
        if self.progress is not None:
            self.progress.update(len(got))   # characters: bytes for ASCII text
        self.buf += got
        return True

    def _peek(self) -> str:
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._fill(self.chunk):
                raise DataError(f"unexpected end of JSON at character {self._where()}")

    def _where(self) -> str:
        return f"{self.pos} of the buffer"

    def _expect(self, chars: str) -> str:
        c = self._peek()
        if c not in chars:
            raise DataError(f"JSON: expected {' or '.join(repr(x) for x in chars)}, found {c!r}")
        self.pos += 1
        return c

    def _value(self):
        self._peek()
        while True:
            try:
                v, end = self.dec.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                if self._fill(2 * (len(self.buf) - self.pos)):   # the value may continue: read on, then retry
                    continue
                raise DataError(f"JSON: {e.msg} near {self.buf[max(self.pos, e.pos - 40):e.pos + 40]!r}") from None
            cut = end == len(self.buf) or (isinstance(v, (int, float)) and self.buf[end] not in _WS + ",]}")
            if cut and self._fill(self.chunk):   # a number cut by the chunk end ("1.5" of "1.5e3"): read on
                continue
            self.pos = end
            return v

    def __iter__(self):
        self._expect("{")
        if self._peek() == "}":
            return
        while True:
            key = self._value()
            if not isinstance(key, str):
                raise DataError("JSON: object key is not a string")
            self._expect(":")
            if key in self.arrays and self._peek() == "[":
                self.pos += 1
                if self._peek() != "]":
                    while True:
                        yield key, self._value()
                        if self._expect(",]") == "]":
                            break
                else:
                    self.pos += 1
                yield key, self.ARRAY_END
            else:
                yield key, self._value()
            if self._expect(",}") == "}":
                return


# ------------------------------------------------------------------------------------------- writer
def _dump(x) -> bytes:
    return json.dumps(x, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class PackWriter:
    """Writes images, masks and samples of one pairs set into ``directory`` (an empty one; see
    :func:`pack` for the atomic rename). Images and masks are appended in their index order before the samples
    that refer to them; :meth:`finish` writes ``index.json``."""

    def __init__(self, directory, shard_size: int = 500_000, report: Report | None = None):
        self.dir, self.shard_size = Path(directory), int(shard_size)
        self.report = report if report is not None else Report()
        self.images = array_record_module.ArrayRecordWriter(str(self.dir / "images.array_record"), WRITE_OPTIONS)
        self.masks = array_record_module.ArrayRecordWriter(str(self.dir / "masks.array_record"), WRITE_OPTIONS)
        self.n_images = self.n_masks = 0
        self.img_off = self.mask_off = self.src_off = 0   # where the current input file's tables start
        self.mask_image = np.zeros(1024, np.int32)   # mask -> its image (the sample check needs only that)
        self.mask_bytes = np.zeros(1024, np.int32)
        self.shards: list[dict] = []
        self.shard = None
        self.counts, self.image_counts = Counter(), Counter()
        self.inline_mask_bytes = 0

    def begin_file(self, n_sources: int) -> None:
        """The next input file's indices start after everything written so far (``n_sources``: the previous
        file's source count)."""
        self.img_off, self.mask_off, self.src_off = self.n_images, self.n_masks, self.src_off + n_sources

    def add_image(self, im: dict) -> None:
        if not isinstance(im, dict) or not all(isinstance(im.get(k), int) for k in ("source", "height", "width")) \
                or not isinstance(im.get("file"), str):
            raise DataError(f"images[{self.n_images - self.img_off}]: needs int source/height/width and str file, "
                            f"got {im!r:.200}")
        self.images.write(_dump({**im, "source": im["source"] + self.src_off}))
        self.n_images += 1

    def add_mask(self, m: dict) -> None:
        n_img = self.n_images - self.img_off
        if not isinstance(m, dict) or not isinstance(m.get("image"), int) or not 0 <= m["image"] < n_img \
                or not isinstance(m.get("rle"), dict):
            raise DataError(f"masks[{self.n_masks - self.mask_off}]: needs an image index < {n_img} and an rle, "
                            f"got {m!r:.200}")
        m = {**m, "image": m["image"] + self.img_off}
        raw = _dump(m)
        if self.n_masks == len(self.mask_image):
            self.mask_image = np.resize(self.mask_image, 2 * self.n_masks)
            self.mask_bytes = np.resize(self.mask_bytes, 2 * self.n_masks)
        self.mask_image[self.n_masks], self.mask_bytes[self.n_masks] = m["image"], len(raw)
        self.masks.write(raw)
        self.n_masks += 1

    def add_sample(self, s: dict, where: str) -> bool:
        """Checks and appends one sample; a bad one is counted in ``report`` (raises under ``strict``)."""
        view = _MaskImages(self.mask_image, self.mask_off, self.img_off)
        try:
            if not isinstance(s, dict) or s.get("task") not in TASKS:
                raise DataError(f"{where}: not a sample of a known task")
            validate_sample(s, self.n_images - self.img_off, self.n_masks - self.mask_off, view)
            if self.img_off or self.mask_off:
                s = {**s, "images": [i + self.img_off for i in s["images"]],
                     "segs": [{**g, "mask": g["mask"] + self.mask_off} for g in s["segs"]]}
        except DataError as e:
            self.report.skip("bad_sample", f"sample {s.get('id', where) if isinstance(s, dict) else where}", str(e))
            return False
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            self.report.skip("bad_record", where, f"{type(e).__name__}: {e}")
            return False
        if self.shard is None or self.shards[-1]["count"] == self.shard_size:
            self._next_shard()
        self.shard.write(_dump(s))
        self.shards[-1]["count"] += 1
        self.counts[s["task"]] += 1
        self.image_counts[str(len(s["images"]))] += 1
        self.inline_mask_bytes += int(sum(self.mask_bytes[g["mask"]] for g in s["segs"]))
        return True

    def _next_shard(self) -> None:
        if self.shard is not None:
            self.shard.close()
        self.shards.append({"file": f"samples-{len(self.shards):05d}.array_record", "count": 0})
        self.shard = array_record_module.ArrayRecordWriter(str(self.dir / self.shards[-1]["file"]), WRITE_OPTIONS)

    def finish(self, meta: dict) -> dict:
        """Closes every file and writes ``index.json``; ``meta``: the pairs file's other keys (sources, seed...)."""
        for w in (self.images, self.masks, self.shard):
            if w is not None:
                w.close()
        if not self.shards:
            self._next_shard()
            self.shard.close()
        n = len(self.shards)
        for k, sh in enumerate(self.shards):   # final names carry the shard count, as sharded files usually do
            name = f"samples-{k:05d}-of-{n:05d}.array_record"
            (self.dir / sh["file"]).rename(self.dir / name)
            sh["file"] = name
        total = sum(sh["count"] for sh in self.shards)
        pairs_report = meta.get("report") or {}
        index = {"format": FORMAT, "version": VERSION, "total": total, "shards": self.shards,
                 "counts": {t: self.counts.get(t, 0) for t in TASKS},
                 "image_counts": dict(sorted(self.image_counts.items(), key=lambda kv: int(kv[0]))),
                 "sources": meta.get("sources", []), "seed": meta.get("seed"), "config": meta.get("config"),
                 "inputs": meta.get("inputs", []),
                 "images": {"file": "images.array_record", "count": self.n_images},
                 "masks": {"file": "masks.array_record", "count": self.n_masks},
                 "mask_bytes": {"table": int(self.mask_bytes[:self.n_masks].sum()),
                                "inline": self.inline_mask_bytes},
                 "pairs_report": {"counts": pairs_report.get("counts", {})},
                 "report": {"counts": self.report.counts(),
                            "records": self.report.to_json()["records"][:100]}}
        (self.dir / INDEX).write_text(json.dumps(index, indent=1), encoding="utf-8")
        return index


class _MaskImages:
    """``masks[m]["image"]`` for :func:`validate_sample` from an int array (no mask dicts kept)."""

    def __init__(self, arr, mask_off: int = 0, img_off: int = 0):
        self.arr, self.mask_off, self.img_off = arr, mask_off, img_off

    def __getitem__(self, m):
        return {"image": int(self.arr[m + self.mask_off]) - self.img_off}


# ------------------------------------------------------------------------------------------- pack
def pack(pairs_paths, out, shard_size: int = 500_000, strict: bool = False, overwrite: bool = False,
         progress: bool = True) -> dict:
    """Packs one pairs file, or several (their samples in turn: e.g. builds with different numbers of images per
    sample, trained together), into the directory ``out``; returns the index. Raises :class:`DataError` (bad
    input: nothing written) or ``FileExistsError``."""
    paths = [Path(p) for p in ([pairs_paths] if isinstance(pairs_paths, (str, Path)) else pairs_paths)]
    report = Report(strict)
    try:
        size = sum(p.stat().st_size for p in paths)
    except OSError as e:
        raise DataError(f"cannot read pairs file: {e}") from None
    bar = tqdm(total=size, unit="B", unit_scale=True, desc="pack", disable=not progress)
    try:
        with atomic_directory(out, overwrite=overwrite) as tmp:
            w, metas = PackWriter(tmp, shard_size, report), []
            for p in paths:
                w.begin_file(len(metas[-1].get("sources", [])) if metas else 0)
                try:
                    with open(p, encoding="utf-8") as f:
                        metas.append(_pack(JsonStream(f, progress=bar), w, p))
                except OSError as e:
                    raise DataError(f"cannot read pairs file {p}: {e}") from None
                except UnicodeDecodeError as e:
                    raise DataError(f"{p}: not UTF-8 text ({e})") from None
            meta = dict(metas[0])
            if len(metas) > 1:
                meta["sources"] = [src for m in metas for src in m.get("sources", [])]
                meta["report"] = {"counts": dict(sum((Counter(m.get("report", {}).get("counts", {})) for m in metas),
                                                     Counter()))}
            meta["inputs"] = [{"path": str(p), "seed": m.get("seed"), "config": m.get("config")}
                              for p, m in zip(paths, metas)]
            return w.finish(meta)
    finally:
        bar.close()


def _pack(stream: JsonStream, w: PackWriter, path: Path) -> dict:
    """Streams one pairs file into ``w``; returns its other keys."""
    meta, done, spool = {}, set(), []
    n = 0
    for key, v in stream:
        if v is JsonStream.ARRAY_END:
            done.add(key)
        elif key == "images":
            w.add_image(v)
        elif key == "masks":
            if "images" not in done:
                raise DataError(f"{path}: masks before the images array ends (not a pairs file written by "
                                "calico_jax)")
            w.add_mask(v)
        elif key == "samples":
            if {"images", "masks"} <= done:
                w.add_sample(v, f"samples[{n}]")
            else:   # samples before their tables: kept as text in the output's temp dir, added afterwards
                spool.append(n)
                with open(w.dir / "samples.spool", "ab") as sf:
                    sf.write(_dump(v) + b"\n")
            n += 1
        else:
            meta[key] = v
            if key in ("format", "version") and (meta.get("format", "calico_jax.pairs"), meta.get("version", 1)) \
                    != ("calico_jax.pairs", 1):
                raise DataError(f"{path}: not a calico_jax.pairs v1 file (format={meta.get('format')!r}, "
                                f"version={meta.get('version')!r})")
    missing = [k for k in ("format", "version", "sources", *ARRAYS) if k not in meta and k not in done]
    if missing:
        raise DataError(f"{path}: not a pairs file: no {', '.join(missing)}")
    if spool:
        with open(w.dir / "samples.spool", "rb") as sf:
            for i, line in zip(spool, sf):
                w.add_sample(json.loads(line), f"samples[{i}]")
        (w.dir / "samples.spool").unlink()
    return meta


# --------------------------------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m calico_jax.data.pack", description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", required=True, nargs="+", action="extend",
                    help="pairs JSON file(s) (python -m calico_jax.data.pairs); several are packed together")
    ap.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
    ap.add_argument("--shard_size", type=int, default=500_000, help="samples per ArrayRecord shard")
    ap.add_argument("--strict", action="store_true", help="stop at the first bad sample")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    a = ap.parse_args(argv)
    if a.shard_size < 1:
        ap.error("--shard_size must be >= 1")
    try:
        index = pack(a.pairs, a.out, a.shard_size, a.strict, a.overwrite, progress=not a.quiet)
    except (DataError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{index['total']} samples in {len(index['shards'])} shard(s), {index['images']['count']} images, "
          f"{index['masks']['count']} masks -> {a.out}")
    print("per task: " + ", ".join(f"{t} {n}" for t, n in index["counts"].items()) + "; per image count: "
          + ", ".join(f"{k}: {n}" for k, n in index["image_counts"].items()))
    skipped = index["report"]["counts"]
    print(f"skipped: {sum(skipped.values())}" + (f" {skipped}" if skipped else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
