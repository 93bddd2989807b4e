"""`Memory`: the vector and graph stores of one memory directory (or servers), joined.

`Memory` joins the two over one directory (default `<state dir>/memory`: `chroma/` and
`graph.lbdb`) or over servers (`memory.vector_url`, `memory.graph_uri`). What is stored, each
with its provenance (run, step, team, source path, chunk position):

- the task's documents, chunked as the document tools chunk them (`doc:` records);
- each team step's findings (`finding:` records), and the entities and relations in them;
- the final output (`output:` records).

Stores open lazily, so a run that never touches memory pays nothing for it.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atlas.memory.embeddings import Embedder, get_embedder
from atlas.memory.entities import Entities, candidate_names, normalize
from atlas.memory.graph import GraphMemory, Provenance
from atlas.memory.vector import DEFAULT_NAMESPACE, Hit, Record, Upserted, VectorMemory

if TYPE_CHECKING:
    from atlas.spec import TaskSpec

GRAPH_FILE = "graph.lbdb"
VECTOR_DIR = "chroma"


def document_records(path: Path, *, source_path: str) -> list[Record]:
    """A text file's chunks as records; `source_path` is how citations name the file."""
    from atlas.tools.documents import chunk_text

    text = path.read_text(encoding="utf-8", errors="replace")
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    return [
        Record(
            id=f"doc:{key}:{pos}",
            text=piece,
            kind="document",
            source=f"{source_path}#{pos}",
            path=str(path.resolve()),
            position=pos,
        )
        for pos, piece in enumerate(chunk_text(text), start=1)
    ]


def finding_records(
    *, run_id: str, step_id: str, team: str, iteration: int, text: str, pending: bool = False
) -> list[Record]:
    """A step's result, chunked; ids `finding:<run>:<step>:<iteration>#<n>`. `pending`: the
    run has not finished yet (see `Memory.settle`)."""
    from atlas.tools.documents import chunk_text

    base = f"finding:{run_id}:{step_id}:{iteration}"
    return [
        Record(
            id=f"{base}#{pos}",
            text=piece,
            kind="finding",
            source=f"{run_id}/{step_id}",
            run_id=run_id,
            step_id=step_id,
            team=team,
            position=pos,
            pending=pending,
        )
        for pos, piece in enumerate(chunk_text(text), start=1)
    ]


def output_records(*, run_id: str, path: str, text: str, pending: bool = False) -> list[Record]:
    """The final output, chunked; ids `output:<run>#<n>`."""
    from atlas.tools.documents import chunk_text

    return [
        Record(
            id=f"output:{run_id}#{pos}",
            text=piece,
            kind="output",
            source=path,
            run_id=run_id,
            path=path,
            position=pos,
            pending=pending,
        )
        for pos, piece in enumerate(chunk_text(text), start=1)
    ]


class Memory:
    """The vector and graph stores of one memory directory (or servers), seen through one
    namespace. Thread-safe.

    What a run stores is `pending` until the run finishes (`settle`): other runs' recall leaves
    it out, so a run never builds on another's half-done work, unless `include_unfinished`."""

    def __init__(
        self,
        directory: Path,
        *,
        vector_url: str | None = None,
        graph_uri: str | None = None,
        embedder: str | Embedder = "local",
        read_only: bool = False,
        namespace: str = DEFAULT_NAMESPACE,
        include_unfinished: bool = False,
        run_id: str = "",
    ) -> None:
        """`read_only`: for reading commands; nothing is created or written, and a store that
        does not exist reads as empty. `run_id`: the run this memory serves, which always sees
        what it stored itself."""
        self.directory = directory
        self.namespace = namespace
        self.include_unfinished = include_unfinished
        self.run_id = run_id
        self._embedder = get_embedder(embedder) if isinstance(embedder, str) else embedder
        self.vector = VectorMemory(
            self._embedder,
            path=None if vector_url else directory / VECTOR_DIR,
            url=vector_url,
            read_only=read_only,
            namespace=namespace,
        )
        self.graph = GraphMemory(
            path=None if graph_uri else directory / GRAPH_FILE,
            uri=graph_uri,
            read_only=read_only,
            namespace=namespace,
            include_pending=include_unfinished,
            run_id=run_id,
        )
        self._lock = threading.Lock()

    @classmethod
    def for_spec(cls, spec: TaskSpec, state_dir: Path, *, run_id: str = "") -> Memory:
        settings = spec.memory
        directory = (spec.root / settings.dir) if settings.dir else state_dir / "memory"
        return cls(
            directory.resolve(),
            vector_url=settings.vector_url,
            graph_uri=settings.graph_uri,
            embedder=settings.embedder,
            namespace=settings.namespace,
            include_unfinished=settings.recall_unfinished,
            run_id=run_id,
        )

    def open(self) -> None:
        """Open both stores now (they otherwise open on first use); raises MemoryStoreError."""
        _ = self.vector.collection
        _ = self.graph.backend

    # -- writing ---------------------------------------------------------------------------------
    def ingest(
        self,
        paths: Iterable[Path],
        root: Path | None = None,
        *,
        deadline: float | None = None,
        on_progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Chunk, embed and store text files; unchanged chunks are skipped.

        Chunks are embedded and written in batches of about a second's work. After a batch,
        at most about once a second, `on_progress` gets `{"event": "memory_ingest", "done": n,
        "total": N, "files": F}` (`done` counts chunks stored or found unchanged). When
        `time.monotonic()` reaches `deadline`, ingest stops before the next batch.

        Stopping is safe: every chunk has a deterministic id and its content hash is stored, so
        the next ingest of the same files (a later run, `atlas memory ingest`) skips what was
        written, cheaply, and continues where this one stopped. The same holds when an
        interrupt (Ctrl-C) stops it between two batches.

        Returns counts: files, chunks, written (new or changed), unchanged, removed (stale
        chunks of files that got shorter), skipped (chunks left for a later ingest), and
        `"stopped": "timeout"` when the deadline stopped it.
        """
        from atlas.tools.documents import unindexable_reason

        files = [p for p in paths if p.is_file() and unindexable_reason(p) is None]
        records: list[Record] = []
        per_file: dict[str, int] = {}
        for path in files:
            chunks = document_records(path, source_path=_display(path, root))
            per_file[str(path.resolve())] = len(chunks)
            records += chunks
        # Chunks past a file's new end are stale whatever else happens: drop them first.
        removed = sum(self._drop_after(name, last) for name, last in per_file.items())
        report = _Throttled(on_progress, files=len(files))
        result = self.vector.upsert_until(records, deadline=deadline, on_batch=report)
        report.final(result)
        counts: dict[str, Any] = {
            "files": len(files),
            "chunks": len(records),
            "written": result.written,
            "unchanged": result.unchanged,
            "removed": removed,
            "skipped": result.skipped,
        }
        if result.stopped:
            counts["stopped"] = "timeout"
        return counts

    def _drop_after(self, path: str, last: int) -> int:
        return self.vector.delete_where(
            {"$and": [{"path": path}, {"position": {"$gt": last}}, {"kind": "document"}]}
        )

    def remember(self, records: Sequence[Record]) -> int:
        """Store a finding's or an output's chunks; returns how many were new or changed."""
        return self.vector.upsert(records)

    def remember_entities(self, extraction: Entities, record: Record) -> tuple[int, int]:
        """Merge entities into the graph, with `record` (any chunk of the finding) as provenance;
        pending while the record is."""
        return self.graph.add(
            extraction,
            Provenance(
                finding=record.id.split("#")[0],
                run_id=record.run_id,
                step_id=record.step_id,
                team=record.team,
                source=record.source,
                kind=record.kind,
            ),
            pending=record.pending,
        )

    def settle(self, run_id: str) -> dict[str, int]:
        """The run finished: what it stored becomes visible to other runs' recall."""
        passages = self.vector.settle(run_id)
        self.graph.settle(run_id)
        return {"passages": passages}

    # -- reading ---------------------------------------------------------------------------------
    def search(
        self,
        queries: Sequence[str],
        k: int = 5,
        *,
        kinds: Iterable[str] | None = None,
        exclude_run: str | None = None,
    ) -> list[list[Hit]]:
        return self.vector.search(
            queries,
            k,
            kinds=kinds,
            exclude_run=exclude_run,
            include_pending=self.include_unfinished,
            own_run=self.run_id or None,
        )

    def graph_context(self, text: str, *, max_entities: int = 5, per_entity: int = 4) -> list[str]:
        """Short lines on the entities of `text` that the graph knows: what they relate to."""
        lines: dict[str, str] = {}
        with self.graph.hold():  # one open of an embedded graph for every query below
            known = self.graph.find(candidate_names(text))
            # Longer names first: "northwind bikes" says more than "bikes".
            for entity in sorted(known, key=lambda e: -len(e["name"]))[:max_entities]:
                shown = 0
                for n in self.graph.neighbours(entity["name"], limit=4 * per_entity):
                    rel = n["relation"]
                    arrow = f"-[{rel}]->" if n["direction"] == "out" else f"<-[{rel}]-"
                    fact = f"{entity['label']} {arrow} {n['other']}"
                    if fact not in lines and shown < per_entity:
                        lines[fact] = f"{fact} (from {n['source']})"
                        shown += 1
        return list(lines.values())

    def entity(self, name: str, *, limit: int = 25) -> dict[str, Any]:
        """An entity's neighbours and the findings that mention it."""
        key = normalize(name)
        with self.graph.hold():
            found = self.graph.find([name])
            return {
                "entity": found[0]["label"] if found else name,
                "key": key,
                "known": bool(found),
                "relations": self.graph.neighbours(name, limit=limit) if found else [],
                "mentioned_in": self.graph.mentions(name, limit=limit) if found else [],
            }

    def stats(self) -> dict[str, Any]:
        return {"vector": self.vector.stats(), "graph": self.graph.stats()}

    def clear(self) -> dict[str, int]:
        return {"passages": self.vector.clear(), "entities": self.graph.clear()}

    def close(self) -> None:
        self.graph.close()


class _Throttled:
    """Ingest progress for `on_progress`: at most about once a second, and the last count when
    any was shown (a short ingest shows none)."""

    def __init__(self, sink: Callable[[dict[str, Any]], None] | None, *, files: int) -> None:
        self.sink = sink
        self.files = files
        self.last = time.monotonic()
        self.shown = False

    def _send(self, sink: Callable[[dict[str, Any]], None], tally: Upserted) -> None:
        sink(
            {
                "event": "memory_ingest",
                "done": tally.done,
                "total": tally.total,
                "files": self.files,
            }
        )
        self.last, self.shown = time.monotonic(), True

    def __call__(self, tally: Upserted) -> None:
        if self.sink is not None and time.monotonic() - self.last >= 1.0:
            self._send(self.sink, tally)

    def final(self, tally: Upserted) -> None:
        if self.sink is not None and self.shown:
            self._send(self.sink, tally)


def _display(path: Path, root: Path | None) -> str:
    """How citations name a file: relative to the task's folder, else its name (as the document
    tools name it); from the CLI (no root), relative to the working directory, else absolute."""
    base = (root or Path.cwd()).resolve()
    try:
        return str(path.resolve().relative_to(base))
    except ValueError:
        return path.name if root is not None else str(path.resolve())


__all__ = ["Memory", "document_records", "finding_records", "output_records"]
