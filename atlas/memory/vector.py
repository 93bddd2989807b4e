"""Vector memory on Chroma: passages with provenance, searched by meaning.

Embedded `PersistentClient` under the memory directory by default; `HttpClient` when a Chroma
server URL is configured. ATLAS embeds texts itself (see `embeddings.py`) and gives Chroma the
vectors, so Chroma never tries to download its default model.

Every record has a deterministic id (`doc:<path>#<n>`, `finding:<run>:<step>:<iteration>`,
`output:<run>`), so writing the same thing twice (a resumed run, a re-ingested folder) updates it
instead of duplicating it, and unchanged texts are not embedded again.

Each memory namespace is its own collection (`atlas_memory` for the default one,
`atlas_memory_<ns>` for another), so a search in one can never return another's passages.
A run's findings and outputs are stored `pending` until the run finishes (`settle`), and searches
leave pending passages out unless asked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from atlas._process import file_lock
from atlas.errors import MemoryStoreError
from atlas.memory.embeddings import Embedder

COLLECTION = "atlas_memory"
DEFAULT_NAMESPACE = "default"


def collection_name(namespace: str) -> str:
    return COLLECTION if namespace == DEFAULT_NAMESPACE else f"{COLLECTION}_{namespace}"


KINDS = ("document", "finding", "output")
_BATCH = 256
"""Records whose content hashes are checked at once."""
_EMBED_SECONDS = 1.0
"""About how long one embedded-and-written batch takes: the grain of progress and of stopping."""
_EMBED_MIN, _EMBED_FIRST = 8, 8
"""The smallest batch embedded, and the first (before the pace is known)."""


@dataclass(frozen=True)
class Record:
    """One stored passage and where it came from."""

    id: str
    text: str
    kind: str
    """`document` (a chunk of an input file), `finding` (a team step's result) or `output`."""
    source: str
    """What a worker cites: `path#n` for a document chunk, `run/step` for a finding."""
    run_id: str = ""
    step_id: str = ""
    team: str = ""
    path: str = ""
    position: int = 0
    pending: bool = False
    """Written by a run that has not finished; searches leave it out until `settle`."""

    def metadata(self) -> dict[str, str | int | bool]:
        meta = {k: v for k, v in asdict(self).items() if k not in ("id", "text")}
        meta["sha"] = _sha(self.text)
        return meta


@dataclass(frozen=True)
class Hit:
    id: str
    text: str
    source: str
    score: float
    """Cosine similarity, 1 is identical."""
    kind: str
    metadata: dict[str, Any]


@dataclass
class Upserted:
    """What one `upsert_until` stored."""

    total: int
    """Distinct records given."""
    written: int = 0
    """New or changed, and so embedded and written."""
    unchanged: int = 0
    """Already stored with the same text: skipped without embedding."""
    stopped: bool = False
    """The deadline passed before every record was checked or written."""

    @property
    def done(self) -> int:
        return self.written + self.unchanged

    @property
    def skipped(self) -> int:
        """Records left for a later call (0 unless stopped)."""
        return self.total - self.done


def _past(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _next_size(last: int, seconds: float, deadline: float | None) -> int:
    """How many records to embed next: about `_EMBED_SECONDS` of work at the last batch's pace,
    and no more than fit before the deadline (so a stop comes within about one batch of it)."""
    rate = last / max(seconds, 1e-3)
    budget = _EMBED_SECONDS
    if deadline is not None:
        budget = min(budget, max(0.0, deadline - time.monotonic()))
    return max(_EMBED_MIN, min(_BATCH, int(rate * budget)))


def _sha(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def safe_url(url: str) -> str:
    """The URL without credentials, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def _settings() -> Any:
    from chromadb.config import Settings

    return Settings(anonymized_telemetry=False, allow_reset=False)


class VectorMemory:
    """One Chroma collection of passages. Safe to share between a run's threads."""

    def __init__(
        self,
        embedder: Embedder,
        *,
        path: Path | None = None,
        url: str | None = None,
        read_only: bool = False,
        namespace: str = DEFAULT_NAMESPACE,
    ):
        if path is None and url is None:
            raise ValueError("VectorMemory needs a path or a url")
        self.embedder = embedder
        self.path = path
        self.url = url
        self.read_only = read_only
        self.namespace = namespace
        self.name = collection_name(namespace)
        """Never create or write anything: a store that does not exist reads as empty."""
        self._collection: Any = None
        """A server's collection (an embedded store's lives in `_EmbeddedStore`)."""
        self._embedder_checked = False
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        base = safe_url(self.url) if self.url else str(self.path)
        if self.namespace == DEFAULT_NAMESPACE:
            return base
        return f"{base} (namespace {self.namespace})"

    # -- opening -------------------------------------------------------------------------------
    def _http_client(self) -> Any:
        import chromadb

        assert self.url is not None
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise MemoryStoreError(f"memory.vector_url {self.where!r} is not an http(s) URL")
        try:
            client = chromadb.HttpClient(
                host=parts.hostname,
                port=parts.port or (443 if parts.scheme == "https" else 8000),
                ssl=parts.scheme == "https",
                settings=_settings(),
            )
            client.heartbeat()
        except Exception as exc:
            raise MemoryStoreError(
                f"cannot reach the Chroma server at {self.where}: {_first_line(exc)}"
            ) from None
        return client

    def _metadata(self) -> dict[str, str]:
        return {"hnsw:space": "cosine", "atlas_embedder": self.embedder.name}

    def _checked(self, col: Any) -> Any:
        built_with = (col.metadata or {}).get("atlas_embedder")
        if built_with and built_with != self.embedder.name:
            raise MemoryStoreError(
                f"vector store {self.where} was built with embedder {built_with}, "
                f"not {self.embedder.name}: configure the same embedder or another store"
            )
        return col

    @contextlib.contextmanager
    def _use(self, *, write: bool) -> Iterator[Any]:
        """The collection, safe to use for one operation.

        A server needs nothing more. An embedded store is held under its cross-process lock for
        the operation (see `_EmbeddedStore`). Read-only, a store that does not exist yet is an
        empty one, and nothing is created.
        """
        if write and self.read_only:
            raise MemoryStoreError(f"vector store {self.where} is open for reading only")
        if self.url:
            with self._lock:
                if self._collection is None:
                    try:
                        client = self._http_client()
                        col = (
                            _get_collection(client, self.name)
                            if self.read_only
                            else client.get_or_create_collection(
                                self.name, embedding_function=None, metadata=self._metadata()
                            )
                        )
                    except MemoryStoreError:
                        raise
                    except Exception as exc:
                        raise MemoryStoreError(
                            f"vector store {self.where} cannot be read: {_first_line(exc)}"
                        ) from None
                    self._collection = _EMPTY if col is None else self._checked(col)
            yield self._collection
            return
        assert self.path is not None
        if self.read_only and not _readable_store(self.path):
            yield _EMPTY
            return
        store = _EmbeddedStore.shared(self.path)
        with store.use(self.name, self._metadata(), write=write, create=not self.read_only) as col:
            if col is None:
                yield _EMPTY
                return
            if not self._embedder_checked:
                self._checked(col)
                self._embedder_checked = True
            yield col

    @property
    def collection(self) -> Any:
        """The Chroma collection, opened and checked (raises MemoryStoreError).

        For a single process's inspection; ATLAS's own reads and writes go through `_use`, which
        keeps an embedded store consistent when several processes share it.
        """
        with self._use(write=False) as col:
            return col

    # -- writing -------------------------------------------------------------------------------
    def upsert(self, records: Sequence[Record]) -> int:
        """Store records; returns how many were new or changed (and so embedded and written)."""
        return self.upsert_until(records).written

    def upsert_until(
        self,
        records: Sequence[Record],
        *,
        deadline: float | None = None,
        on_batch: Callable[[Upserted], None] | None = None,
    ) -> Upserted:
        """Store records in batches, stopping before a batch when `deadline` (monotonic) is past.

        Unchanged records (same id, same content hash) are skipped without embedding them. The
        changed ones are embedded in batches of about a second's work, each written before the
        next starts, so a stop keeps every record counted as written: storing the same records
        again later skips those and goes on with the rest. `on_batch` gets the counts so far
        after each batch.
        """
        unique = list({r.id: r for r in records}.values())
        tally = Upserted(total=len(unique))
        size = _EMBED_FIRST
        for start in range(0, len(unique), _BATCH):
            if _past(deadline):
                break
            checked = unique[start : start + _BATCH]
            changed = self._changed(checked)
            tally.unchanged += len(checked) - len(changed)
            at = 0
            while at < len(changed) and not _past(deadline):
                batch = changed[at : at + size]
                began = time.monotonic()
                self._write(batch, self.embedder.embed([r.text for r in batch]))
                tally.written += len(batch)
                at += len(batch)
                size = _next_size(len(batch), time.monotonic() - began, deadline)
                if on_batch is not None:
                    on_batch(tally)
            if at < len(changed):
                break
            if not changed and on_batch is not None:
                on_batch(tally)
        tally.stopped = tally.done < tally.total
        return tally

    def _write(self, batch: list[Record], vectors: Any) -> None:
        with self._use(write=True) as col:
            col.upsert(
                ids=[r.id for r in batch],
                embeddings=vectors,
                documents=[r.text for r in batch],
                metadatas=[r.metadata() for r in batch],
            )

    def _changed(self, batch: list[Record]) -> list[Record]:
        with self._use(write=False) as col:
            found = col.get(ids=[r.id for r in batch], include=["metadatas"])
        known = {
            i: (m or {}).get("sha") for i, m in zip(found["ids"], found["metadatas"], strict=True)
        }
        return [r for r in batch if known.get(r.id) != _sha(r.text)]

    def delete_where(self, where: dict[str, Any]) -> int:
        """Delete the passages matching a Chroma `where` filter; returns how many."""
        with self._use(write=True) as col:
            ids = col.get(where=where, include=[])["ids"]
            if ids:
                col.delete(ids=ids)
        return len(ids)

    def settle(self, run_id: str) -> int:
        """Mark what `run_id` stored as finished, so searches show it; returns how many."""
        with self._use(write=True) as col:
            found = col.get(
                where={"$and": [{"run_id": run_id}, {"pending": True}]}, include=["metadatas"]
            )
            if found["ids"]:
                col.update(
                    ids=found["ids"],
                    metadatas=[{**(m or {}), "pending": False} for m in found["metadatas"]],
                )
        return len(found["ids"])

    # -- reading -------------------------------------------------------------------------------
    def search(
        self,
        queries: Sequence[str],
        k: int = 5,
        *,
        kinds: Iterable[str] | None = None,
        exclude_run: str | None = None,
        include_pending: bool = False,
        own_run: str | None = None,
    ) -> list[list[Hit]]:
        """The `k` closest passages for each query, best first. Passages of runs that have not
        finished are left out unless `include_pending`, but for `own_run`'s."""
        if not queries:
            return []
        filters: list[dict[str, Any]] = []
        if kinds is not None:
            filters.append({"kind": {"$in": list(kinds)}})
        if exclude_run:
            filters.append({"run_id": {"$ne": exclude_run}})
        if not include_pending:
            settled: dict[str, Any] = {"pending": {"$ne": True}}
            if own_run and own_run != exclude_run:
                settled = {"$or": [settled, {"run_id": own_run}]}
            filters.append(settled)
        where: dict[str, Any] | None = (
            None if not filters else filters[0] if len(filters) == 1 else {"$and": filters}
        )
        with self._use(write=False) as col:
            if col is _EMPTY:
                return [[] for _ in queries]
        vectors = self.embedder.embed(list(queries))
        with self._use(write=False) as col:
            res = col.query(
                query_embeddings=vectors,
                n_results=max(1, k),
                where=where,
                include=["documents", "metadatas", "distances"],
            )
        out: list[list[Hit]] = []
        for ids, docs, metas, dists in zip(
            res["ids"], res["documents"], res["metadatas"], res["distances"], strict=True
        ):
            out.append(
                [
                    Hit(
                        id=i,
                        text=d or "",
                        source=str((m or {}).get("source", i)),
                        score=round(1.0 - float(dist), 4),
                        kind=str((m or {}).get("kind", "")),
                        metadata=dict(m or {}),
                    )
                    for i, d, m, dist in zip(ids, docs, metas, dists, strict=True)
                ]
            )
        return out

    def get(self, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        with self._use(write=False) as col:
            found = col.get(ids=list(ids), include=["metadatas"])
        return {i: dict(m or {}) for i, m in zip(found["ids"], found["metadatas"], strict=True)}

    def count(self, kind: str | None = None, *, pending: bool = False) -> int:
        where: dict[str, Any] | None = {"kind": kind} if kind else None
        if pending:
            where = {"$and": [where, {"pending": True}]} if where else {"pending": True}
        with self._use(write=False) as col:
            if where is None:
                return int(col.count())
            return len(col.get(where=where, include=[])["ids"])

    def stats(self) -> dict[str, Any]:
        return {
            "store": self.where,
            "namespace": self.namespace,
            "embedder": self.embedder.name,
            "passages": self.count(),
            **{f"{kind}s": self.count(kind) for kind in KINDS},
            "pending": self.count(pending=True),
        }

    def clear(self) -> int:
        """Delete every passage; returns how many there were."""
        with self._use(write=True) as col:
            n = int(col.count())
            while True:
                ids = col.get(limit=5000, include=[])["ids"]
                if not ids:
                    break
                col.delete(ids=ids)
        return n


class _EmbeddedStore:
    """One embedded Chroma directory, shared by every `VectorMemory` on it in this process.

    Chroma's embedded store is not safe for several processes: each keeps its own view of the
    index, and when two write at once queries fail ("Error finding id") and vectors are lost
    (measured: 12 processes writing one store left it unreadable). So each operation holds the
    store's file lock, every write bumps a generation file, and a process whose view is older
    than the last write reopens the store before using it. A process alone never reopens.
    The lock and the generation are the directory's: every namespace's collection shares them.
    """

    def __init__(self, path: Path):
        self.path = path
        self.client: Any = None
        self.collections: dict[str, Any] = {}
        self.generation: str | None = None
        self._thread_lock = threading.Lock()

    @classmethod
    def shared(cls, path: Path) -> _EmbeddedStore:
        if path.exists() and not path.is_dir():
            raise MemoryStoreError(f"vector store {path} is a file, not a directory")
        key = str(path.resolve())
        with _stores_lock:
            store = _stores.get(key)
            if store is None:
                store = _stores[key] = cls(Path(key))
            return store

    @contextlib.contextmanager
    def use(
        self, name: str, metadata: dict[str, str], *, write: bool, create: bool = True
    ) -> Iterator[Any]:
        """Collection `name` under the store's lock; None when it does not exist and `create`
        is false (then nothing is created: no lock file, no collection)."""
        lock = file_lock(self.path / ".atlas.lock") if create else _shared_lock(self.path)
        with self._thread_lock, lock:
            current = self._read_generation()
            if self.client is None or current != self.generation:
                self._reopen()
            try:
                yield self._collection(name, metadata, create=create)
            finally:
                # Also when the write was interrupted: others reopen rather than miss it.
                if write:
                    current = f"{os.getpid()}:{time.time_ns()}"
                    tmp = self.path / f".atlas-generation.{os.getpid()}"
                    tmp.write_text(current)
                    os.replace(tmp, self.path / ".atlas-generation")
                self.generation = current

    def _read_generation(self) -> str:
        try:
            return (self.path / ".atlas-generation").read_text()
        except FileNotFoundError:
            return ""

    def _reopen(self) -> None:
        import chromadb

        if self.client is not None:
            with contextlib.suppress(Exception):
                self.client.close()
        self.client = None
        self.collections.clear()
        try:
            self.client = chromadb.PersistentClient(path=str(self.path), settings=_settings())
        except Exception as exc:
            raise self._failure(exc) from None

    def _collection(self, name: str, metadata: dict[str, str], *, create: bool) -> Any:
        col = self.collections.get(name)
        if col is not None:
            return col
        try:
            col = (
                self.client.get_or_create_collection(
                    name, embedding_function=None, metadata=metadata
                )
                if create
                else _get_collection(self.client, name)
            )
        except Exception as exc:
            raise self._failure(exc) from None
        if col is not None:
            self.collections[name] = col
        return col

    def _failure(self, exc: Exception) -> MemoryStoreError:
        if "readonly database" in str(exc):
            return MemoryStoreError(_read_only_message(self.path))
        return MemoryStoreError(
            f"vector store {self.path} cannot be opened (corrupt or not a Chroma store?): "
            f"{_first_line(exc)}"
        )


_stores: dict[str, _EmbeddedStore] = {}
_stores_lock = threading.Lock()


class _EmptyCollection:
    """What a store that does not exist holds, for reading without creating it."""

    metadata: dict[str, str] = {}  # noqa: RUF012 (never mutated)

    def count(self) -> int:
        return 0

    def get(self, ids: Sequence[str] | None = None, **_: Any) -> dict[str, list[Any]]:
        return {"ids": [], "metadatas": [], "documents": []}


_EMPTY: Any = _EmptyCollection()


def _get_collection(client: Any, name: str) -> Any:
    """Collection `name`, or None when the store has none (nothing is created)."""
    if name not in {getattr(c, "name", c) for c in client.list_collections()}:
        return None
    return client.get_collection(name, embedding_function=None)


def _read_only_message(path: Path) -> str:
    return (
        f"vector store {path} is read-only, and Chroma cannot open a store without writing to "
        "it: make it writable, or copy it and pass --store COPY"
    )


def _readable_store(path: Path) -> bool:
    """Whether an embedded store exists at `path` (False: it reads as empty). Raises
    MemoryStoreError when it does but cannot be opened without write access."""
    if path.exists() and not path.is_dir():
        raise MemoryStoreError(f"vector store {path} is a file, not a directory")
    database = path / "chroma.sqlite3"
    if not database.exists():
        return False
    if not (os.access(path, os.W_OK) and os.access(database, os.W_OK)):
        raise MemoryStoreError(_read_only_message(path))
    return True


@contextlib.contextmanager
def _shared_lock(path: Path) -> Iterator[None]:
    """A reader's hold on a store's lock: waits for a writer, creates no lock file."""
    try:
        fd = os.open(path / ".atlas.lock", os.O_RDONLY)
    except FileNotFoundError:
        yield  # no ATLAS process has written here
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


__all__ = [
    "COLLECTION",
    "KINDS",
    "Hit",
    "Record",
    "Upserted",
    "VectorMemory",
    "collection_name",
    "safe_url",
]
