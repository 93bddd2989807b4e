"""The task's documents: chunked, searchable (BM25) and readable by source id.

Only files listed in the task's `inputs.documents` are indexed, and `read_document` only returns
indexed sources, so workers cannot read outside the task's workspace.
"""

from __future__ import annotations

import codecs
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

_TOKEN = re.compile(r"[a-z0-9]+")
_STOP = frozenset(
    "a an and are as at be by for from has have in is it its of on or that the this to was were "
    "what which who will with how does do did".split()
)
TEXT_SUFFIXES = frozenset({".md", ".txt", ".rst", ".markdown", ".text", ".html", ".csv", ".json"})
_HEAD_BYTES = 8192
"""How much of a document is read to decide whether it is text."""
_MAX_REPLACED = 0.05
"""A head in which more than this share of characters is not UTF-8 is not text."""


def unindexable_reason(path: Path) -> str | None:
    """Why `path` will not be indexed (not a text suffix, binary, not UTF-8, unreadable), or None.

    Cheap: reads at most the first few kilobytes."""
    suffix = path.suffix.lower()
    if suffix not in TEXT_SUFFIXES:
        kinds = ", ".join(sorted(TEXT_SUFFIXES))
        return f"not a text document ({suffix or 'no suffix'}; indexed kinds: {kinds})"
    try:
        with path.open("rb") as handle:
            head = handle.read(_HEAD_BYTES)
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    if b"\x00" in head:
        return "binary (contains NUL bytes), not text"
    text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(head, final=False)
    if text and text.count("\ufffd") > _MAX_REPLACED * len(text):
        return "not UTF-8 text"
    return None


def tokenize(text: str) -> list[str]:
    return [t for t in _TOKEN.findall(text.lower()) if t not in _STOP]


@dataclass(frozen=True)
class Chunk:
    source: str
    """Source id: `<relative path>#<position>`, cited by workers."""
    path: str
    """File path relative to the task's directory."""
    position: int
    """Chunk number within the file, from 1."""
    text: str


def chunk_text(text: str, *, size: int = 900) -> list[str]:
    """Split on blank lines, packing paragraphs into chunks of about `size` characters."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    chunks: list[str] = []
    current = ""
    for para in paragraphs:
        # Long paragraphs are cut by index: slicing off the rest each time copied it again,
        # so one huge paragraph (a 50 MB file without blank lines) took quadratic time.
        start, end = 0, len(para)
        while end - start > size:
            if current:
                chunks.append(current)
                current = ""
            cut = para.rfind(" ", start, start + size)
            cut = cut if cut - start > size // 2 else start + size
            chunks.append(para[start:cut].strip())
            start = cut
            while start < end and para[start].isspace():
                start += 1
        para = para[start:]
        if current and len(current) + len(para) + 2 > size:
            chunks.append(current)
            current = para
        else:
            current = f"{current}\n\n{para}" if current else para
    if current:
        chunks.append(current)
    return chunks


@dataclass
class DocumentIndex:
    """An in-process BM25 index over the task's documents."""

    chunks: list[Chunk] = field(default_factory=list)
    _tf: list[Counter[str]] = field(default_factory=list, repr=False)
    _df: Counter[str] = field(default_factory=Counter, repr=False)

    @classmethod
    def from_paths(cls, paths: list[Path], root: Path) -> DocumentIndex:
        """Index each file once (by real path); a file that is not text or cannot be read is
        skipped (`atlas.spec.input_warnings` reports it before the run)."""
        index = cls()
        seen: set[Path] = set()
        for path in paths:
            real = path.resolve()
            if real in seen or unindexable_reason(path) is not None:
                continue
            seen.add(real)
            try:
                rel = str(real.relative_to(root.resolve()))
            except ValueError:
                rel = path.name
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            for pos, piece in enumerate(chunk_text(text), start=1):
                index.add(Chunk(f"{rel}#{pos}", rel, pos, piece))
        return index

    def add(self, chunk: Chunk) -> None:
        tf = Counter(tokenize(chunk.text + " " + chunk.path))
        self.chunks.append(chunk)
        self._tf.append(tf)
        self._df.update(tf.keys())

    @property
    def sources(self) -> list[str]:
        return list(dict.fromkeys(c.path for c in self.chunks))

    def search(self, query: str, k: int = 5) -> list[tuple[Chunk, float]]:
        terms = tokenize(query)
        if not terms or not self.chunks:
            return []
        n = len(self.chunks)
        avg = sum(sum(tf.values()) for tf in self._tf) / n
        scored: list[tuple[float, int]] = []
        for i, tf in enumerate(self._tf):
            length = sum(tf.values()) or 1
            score = 0.0
            for term in terms:
                freq = tf.get(term, 0)
                if not freq:
                    continue
                idf = math.log(1 + (n - self._df[term] + 0.5) / (self._df[term] + 0.5))
                score += idf * freq * 2.2 / (freq + 1.2 * (0.25 + 0.75 * length / avg))
            if score > 0:
                scored.append((score, i))
        scored.sort(key=lambda item: (-item[0], item[1]))
        return [(self.chunks[i], round(s, 4)) for s, i in scored[:k]]

    def read(self, source: str) -> list[Chunk]:
        """All chunks of a file (`path`) or one chunk (`path#n`). Unknown sources give []."""
        source = source.strip().strip("[]")
        if "#" in source:
            return [c for c in self.chunks if c.source == source]
        return [c for c in self.chunks if c.path == source or Path(c.path).name == source]
