"""A packed pairs directory (written by :mod:`calico_jax.data.pack`) read on demand.

Layout (``format: "calico_jax.packed_pairs"``, ``version: 1``)::

    DIR/index.json                       format, version, total, shards [{"file", "count"}], counts per task,
                                         image_counts (samples per number of images), sources, seed, config,
                                         images / masks {"file", "count"}, the pack report, mask_bytes
    DIR/samples-00000-of-0000K.array_record   one JSON sample per record, in the pairs file's order
    DIR/images.array_record              one JSON image entry per record (the pairs file's ``images[i]``)
    DIR/masks.array_record               one JSON mask entry per record (``masks[m]``: image, object, part, rle)

Masks are stored once, in their own table, and samples keep the pairs file's mask indices (a sample's masks
inline would repeat each RLE in every sample that uses it: see ``mask_bytes`` in the index). All files are
ArrayRecord with ``group_size:1`` (one record per chunk), so any record is read without its neighbours.

:class:`PackedPairs` has :class:`~calico_jax.data.pairs_io.Pairs`' interface (``samples``, ``images``, ``masks``
are lazy sequences: ``len``, ``[i]``, ``[a:b]``, iteration) and pickles as its paths: a grain worker that receives
it opens its own readers on first use, so no record travels through the pipeline graph.
"""
from __future__ import annotations

import bisect
import json
import os
import threading
from pathlib import Path

from array_record.python import array_record_module

from calico_jax.data.rle import decode
from calico_jax.data.skips import DataError

FORMAT, VERSION, INDEX = "calico_jax.packed_pairs", 1, "index.json"
READ_OPTIONS = "readahead_buffer_size:0"   # random access: no read-ahead of neighbouring chunks


def is_packed(path) -> bool:
    return Path(path).is_dir() and (Path(path) / INDEX).is_file()


class Table:
    """ArrayRecord files read as one sequence of raw records (bytes); opened lazily, per process, thread-safe."""

    def __init__(self, paths: list[Path], counts: list[int]):
        self.paths, self.counts = [str(p) for p in paths], [int(c) for c in counts]
        self.starts = [0]
        for c in self.counts:
            self.starts.append(self.starts[-1] + c)
        self._readers, self._pid, self._lock = None, None, threading.Lock()

    def __len__(self) -> int:
        return self.starts[-1]

    def __getstate__(self):
        return {"paths": self.paths, "counts": self.counts}

    def __setstate__(self, state):
        self.__init__(state["paths"], state["counts"])

    def _open(self):
        with self._lock:
            if self._readers is None or self._pid != os.getpid():
                self._readers = [array_record_module.ArrayRecordReader(p, READ_OPTIONS) for p in self.paths]
                self._pid = os.getpid()
        return self._readers

    def locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"record {i} of {len(self)}")
        f = bisect.bisect_right(self.starts, i) - 1
        return f, i - self.starts[f]

    def read(self, i: int) -> bytes:
        readers = self._open()
        f, j = self.locate(int(i))
        return readers[f].read(j, j + 1)[0]   # a range: read([j]) goes through a thread pool, ~30x slower

    def read_range(self, a: int, b: int) -> list[bytes]:
        out, readers = [], self._open()
        while a < b:
            f, j = self.locate(a)
            n = min(b - a, self.counts[f] - j)
            out += readers[f].read(j, j + n)
            a += n
        return out


class Records:
    """A lazy sequence of JSON records of a :class:`Table` (``[i]`` -> dict, ``[a:b]`` -> list)."""

    def __init__(self, table: Table, what: str):
        self.table, self.what = table, what

    def __len__(self) -> int:
        return len(self.table)

    def raw(self, i: int) -> bytes:
        return self.table.read(i)

    def __getitem__(self, i):
        if isinstance(i, slice):
            a, b, step = i.indices(len(self))
            if step != 1:
                return [self[k] for k in range(a, b, step)]
            return [self._parse(r, a + k) for k, r in enumerate(self.table.read_range(a, b))]
        if i < 0:
            i += len(self)
        return self._parse(self.table.read(i), i)

    def _parse(self, raw: bytes, i: int):
        try:
            return json.loads(raw)
        except ValueError as e:
            raise DataError(f"{self.table.paths[self.table.locate(i)[0]]}: {self.what} record {i}: "
                            f"not JSON ({e})") from None

    def __iter__(self):
        step = 4096
        for a in range(0, len(self), step):
            yield from self[a:min(a + step, len(self))]


class PackedPairs:
    """A packed pairs directory with the interface of a pairs file in memory (records read on demand)."""

    def __init__(self, path, images_root: str | dict[int, str] | None = None):
        self.path = Path(path).absolute()
        try:
            self.index = json.loads((self.path / INDEX).read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read packed pairs {self.path / INDEX}: {e}") from None
        if self.index.get("format") != FORMAT or self.index.get("version") != VERSION:
            raise DataError(f"{self.path}: not a {FORMAT} v{VERSION} directory (format={self.index.get('format')!r}, "
                            f"version={self.index.get('version')!r})")
        ix = self.index
        missing = [f for f in [s["file"] for s in ix["shards"]] + [ix["images"]["file"], ix["masks"]["file"]]
                   if not (self.path / f).is_file()]
        if missing:
            raise DataError(f"{self.path}: missing {', '.join(missing)}")
        self.sources: list[dict] = ix["sources"]
        if isinstance(images_root, (str, Path)):
            images_root = {i: str(images_root) for i in range(len(self.sources))}
        self.roots = images_root or {}
        self.samples = Records(Table([self.path / s["file"] for s in ix["shards"]],
                                     [s["count"] for s in ix["shards"]]), "sample")
        self.images = Records(Table([self.path / ix["images"]["file"]], [ix["images"]["count"]]), "image")
        self.masks = Records(Table([self.path / ix["masks"]["file"]], [ix["masks"]["count"]]), "mask")
        self.data = {k: v for k, v in ix.items() if k not in ("shards",)}

    def __len__(self) -> int:
        return len(self.samples)

    def image_path(self, sample: dict, k: int) -> Path:
        im = self.images[sample["images"][k]]
        root = self.roots.get(im["source"]) or Path(self.sources[im["source"]]["images_root"])
        return Path(root) / im["file"]

    def mask(self, seg: dict | int):
        m = self.masks[seg["mask"] if isinstance(seg, dict) else seg]
        return decode(m["rle"])

    def __repr__(self) -> str:
        return f"PackedPairs({self.path}, {len(self)} samples)"


__all__ = ["FORMAT", "VERSION", "INDEX", "is_packed", "Table", "Records", "PackedPairs"]
