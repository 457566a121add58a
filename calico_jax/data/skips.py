"""Bad-input bookkeeping shared by the data readers: :class:`Report` collects skipped records
(``kind``, the record's name, a detail); ``strict=True`` raises :class:`DataError` on the first instead."""
from __future__ import annotations

from collections import defaultdict


class DataError(ValueError):
    """A bad record under ``strict=True`` (message names the file and record), or an unreadable file."""


class Report:
    """Skipped records: ``(kind, record, detail)``; ``strict`` raises on the first one instead."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.entries: list[tuple[str, str, str]] = []

    def skip(self, kind: str, record: str, detail: str = "") -> None:
        if self.strict:
            raise DataError(f"{kind}: {record}" + (f": {detail}" if detail else ""))
        self.entries.append((kind, record, detail))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for kind, _, _ in self.entries:
            out[kind] += 1
        return dict(sorted(out.items()))

    def __len__(self) -> int:
        return len(self.entries)

    def summary(self, max_names: int = 3) -> str:
        if not self.entries:
            return "skipped: 0"
        lines = [f"skipped: {len(self.entries)}"]
        for kind, n in self.counts().items():
            names = [r for k, r, _ in self.entries if k == kind][:max_names]
            more = f", ... (+{n - len(names)})" if n > len(names) else ""
            lines.append(f"  {kind}: {n} ({'; '.join(names)}{more})")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"counts": self.counts(),
                "records": [{"kind": k, "record": r, "detail": d} for k, r, d in self.entries]}


__all__ = ["DataError", "Report"]
