"""Files written whole or not at all: a text file, or a directory that replaces its target only when complete.

Anything that writes results (configs, reports, checkpoints, data sets) goes through here, so that a crash or a
kill never leaves a half-written file or directory where a reader would take it for a finished one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_atomic(path: str | os.PathLike, text: str) -> None:
    """Writes ``text`` to a sibling temp file and renames it onto ``path`` (never half-written)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def current_umask() -> int:
    try:   # Linux says it without changing it (other threads may be creating files right now)
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)   # elsewhere the only way to read it is to set it; put it straight back
        os.umask(mask)
        return mask


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields a temporary directory that replaces ``out`` only if the block finishes without error."""
    out = Path(out).absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~current_umask())   # mkdtemp makes it 0700; the result gets the user's usual mode
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
