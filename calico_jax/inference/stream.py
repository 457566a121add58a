"""Streaming, resumable predictions: one JSON-lines part file per process, appended one batch at a time.

Layout: ``DIR/p{I}-of-{N}.jsonl`` for process I of N. Its first line is a header (``{"header": fingerprint}``:
the checkpoint, pairs file, sample ids, batch size and the settings that change the answers); every other line is
one sample's prediction record with the index of its batch (``{"batch": b, "id": ..., ...}``).

A batch is appended with a single ``write`` of all its lines, then ``flush`` + ``fsync``, so after a crash (even
``kill -9``) the file holds whole batches plus at most one torn tail. On resume (:meth:`PartFile.open`) the tail
after the last *complete* batch -- a line without its newline, a line that does not parse, a batch with fewer
lines than planned -- is truncated away and that batch is predicted again; batches are formed deterministically
(:func:`calico_jax.inference.predictor.plan_batches`), so the merged file equals an uninterrupted run's, without
gap or duplicate. A header that differs from this run's is an error naming the field: rerun the same command, or
delete the directory.

For tests, ``CALICO_KILL_AFTER_BATCH=k`` makes the process ``SIGKILL`` itself right after its k-th append of this
run (counting from 1): a deterministic crash point, no timing involved.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

KILL_ENV = "CALICO_KILL_AFTER_BATCH"


def fingerprint(sample_ids: Sequence[str], **settings: Any) -> dict[str, Any]:
    """What a part file must agree on to be resumed: the settings and a digest of the sample ids in order."""
    digest = hashlib.sha256("\n".join(sample_ids).encode()).hexdigest()[:16]
    return {**settings, "num_samples": len(sample_ids), "samples_sha256": digest}


def part_path(directory: Path, index: int, count: int) -> Path:
    return Path(directory) / f"p{index}-of-{count}.jsonl"


def split_batches(batches: Sequence[Sequence[int]], index: int, count: int) -> list[int]:
    """Batch numbers of process ``index`` of ``count``: a contiguous block of the plan, sizes differing by at most
    one batch (the same batches whatever the process count, so every split gives the same predictions)."""
    n = len(batches)
    lo, hi = n * index // count, n * (index + 1) // count
    return list(range(lo, hi))


class PartFile:
    """One process's part file, opened for appending after its last complete batch."""

    def __init__(self, path: Path, header: dict, expected: dict[int, list[str]]):
        """``expected``: batch number -> the sample ids it holds, in order (this process's batches)."""
        self.path, self.header, self.expected = Path(path), header, expected
        self.done: dict[int, list[dict]] = {}
        self.appended = 0
        self.kill_after = int(os.environ.get(KILL_ENV) or 0)

    def open(self) -> PartFile:
        """Reads what a previous run left (truncating a torn tail), or starts the file with its header."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            self._write(json.dumps({"header": self.header}) + "\n", create=True)
            return self
        data = self.path.read_bytes()
        lines, keep, pos, current = [], 0, 0, None
        while True:
            end = data.find(b"\n", pos)
            if end < 0:
                break   # no newline after it: a torn tail (or nothing)
            try:
                rec = json.loads(data[pos:end])
            except (json.JSONDecodeError, UnicodeDecodeError):
                break
            pos = end + 1
            if not lines and "header" not in rec:
                raise ValueError(f"{self.path}: no header line; not a predictions part file (delete it)")
            if "header" in rec:
                if lines:
                    break
                self._check_header(rec["header"])
                lines.append(rec)
                keep = pos
                continue
            b = rec.get("batch")
            if b not in self.expected or b in self.done or (current is not None and current[0] != b):
                break   # out of plan (a batch without all its lines before it): keep only what came before
            current = (b, (current[1] if current else []) + [rec])
            if [r["id"] for r in current[1]] == self.expected[b]:
                self.done[b] = current[1]
                current, keep = None, pos
            elif len(current[1]) >= len(self.expected[b]):
                break
        if not lines:
            raise ValueError(f"{self.path}: no header line; not a predictions part file (delete it)")
        if keep < len(data):
            with open(self.path, "r+b") as f:
                f.truncate(keep)
                os.fsync(f.fileno())
        return self

    def _check_header(self, stored: dict) -> None:
        diff = sorted(k for k in set(stored) | set(self.header) if stored.get(k) != self.header.get(k))
        if diff:
            k = diff[0]
            raise ValueError(f"{self.path}: left by a run with other settings ({k}: {stored.get(k)!r}, now "
                             f"{self.header.get(k)!r}); rerun that command or delete {self.path.parent}")

    def _write(self, text: str, create: bool = False) -> None:
        flags = os.O_WRONLY | os.O_APPEND | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o644)
        try:
            data = text.encode("utf-8")
            written = os.write(fd, data)   # one write per batch: a kill leaves whole lines plus one torn tail
            while written < len(data):     # a short write (a signal, a full disk) continues where it stopped
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)

    def pending(self) -> list[int]:
        return [b for b in self.expected if b not in self.done]

    def append(self, batch: int, records: list[dict]) -> None:
        """Appends one batch's records (in its planned order) durably."""
        if [r["id"] for r in records] != self.expected[batch]:
            raise ValueError(f"batch {batch}: records {[r['id'] for r in records]} are not the planned "
                             f"{self.expected[batch]}")
        self._write("".join(json.dumps({"batch": batch, **r}, ensure_ascii=False) + "\n" for r in records))
        self.done[batch] = records
        self.appended += 1
        if self.kill_after and self.appended >= self.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)   # the test hook (module doc)

    def records(self) -> dict[str, dict]:
        return {r["id"]: _strip(r) for recs in self.done.values() for r in recs}


def _strip(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k != "batch"}


def gather(directory: Path, count: int, headers: dict, expected: dict[int, list[str]]) -> dict[str, dict]:
    """Every process's records (process 0, after the others finished): {id: record}; a missing batch raises."""
    out: dict[str, dict] = {}
    for i in range(count):
        part = PartFile(part_path(directory, i, count), headers, expected)
        if not part.path.exists():
            raise ValueError(f"{part.path}: missing; process {i} wrote no predictions")
        part.open()
        out.update(part.records())
    missing = [b for b in expected if not all(sid in out for sid in expected[b])]
    if missing:
        raise ValueError(f"{directory}: batches {missing[:5]} have no predictions in any part file")
    return out


class Progress:
    """A tqdm bar of samples whose rate and ETA leave out the first batch (compilation): after that batch it
    prints how long it took and restarts the bar's clock."""

    def __init__(self, total: int, done: int, enabled: bool, desc: str = "evaluate"):
        self.bar = tqdm(total=total, initial=done, desc=desc, unit="sample", disable=not enabled, smoothing=0)
        self.first_s: float | None = None
        self.t0, self.rest_n = time.perf_counter(), 0

    def update(self, n: int) -> None:
        bar = self.bar
        bar.update(n)
        if self.first_s is not None:
            self.rest_n += n
        else:
            self.first_s = time.perf_counter() - self.t0
            bar.set_postfix_str(f"first batch {self.first_s:.1f} s (compile)", refresh=False)
            if not bar.disable:   # restart the clock: rate = samples since then / time since then
                bar.initial, bar.last_print_n = bar.n, bar.n
                bar.start_t = bar.last_print_t = bar._time()
            bar.refresh()

    def close(self) -> dict[str, float]:
        """Timings: the first batch (compile + run) and the rest's samples/s."""
        self.bar.close()
        rest = time.perf_counter() - self.t0 - (self.first_s or 0.0)
        n = self.rest_n
        return {"first_batch_s": self.first_s or 0.0, "samples_per_s": n / rest if rest > 0 and n else 0.0}
