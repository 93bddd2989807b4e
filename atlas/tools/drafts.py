"""Drafts written by the writing team, kept as numbered files in the run's directory."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class DraftStore:
    """Every saved draft is a new file (`draft-0001.md`, ...); the newest is the current draft."""

    directory: Path
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def save(self, content: str) -> Path:
        with self._lock:
            self.directory.mkdir(parents=True, exist_ok=True)
            number = len(self._files()) + 1
            path = self.directory / f"draft-{number:04d}.md"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(content, encoding="utf-8")
            tmp.replace(path)
            return path

    def latest(self) -> str | None:
        files = self._files()
        return files[-1].read_text(encoding="utf-8") if files else None

    def count(self) -> int:
        return len(self._files())

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(self.directory.glob("draft-*.md"))
