"""Graph memory: entities and their relations, with where each was found.

Two backends speak the same Cypher (the statements below): LadybugDB, an embedded Cypher
database (a maintained fork of Kuzu) stored under the memory directory, by default; Neo4j through
its official driver when a `bolt://` or `neo4j://` URI is configured. Only schema creation and
the conversion of returned paths differ.

The model:

    (:Entity {name, label, kind})          name: normalised, the merge key; label: as first seen
    (:Finding {id, run_id, step_id, team, source, kind})   mirrors a vector-memory record
    (:Finding)-[:MENTIONS]->(:Entity)
    (:Entity)-[:RELATED {relation, finding, run_id, step_id, source}]->(:Entity)

Writes are MERGEs keyed on names and finding ids, so writing a finding twice adds nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from atlas.errors import MemoryStoreError
from atlas.memory.entities import Extraction, normalize
from atlas.memory.vector import safe_url

# -- the shared Cypher -------------------------------------------------------------------------
MERGE_FINDING = (
    "MERGE (f:Finding {id: $id}) "
    "SET f.run_id = $run_id, f.step_id = $step_id, f.team = $team, f.source = $source, "
    "f.kind = $kind"
)
MERGE_ENTITY = (
    "MERGE (e:Entity {name: $name}) ON CREATE SET e.label = $label, e.kind = $kind "
    "WITH e MATCH (f:Finding {id: $finding}) MERGE (f)-[:MENTIONS]->(e)"
)
MERGE_RELATION = (
    "MATCH (a:Entity {name: $a}), (b:Entity {name: $b}) "
    "MERGE (a)-[r:RELATED {relation: $relation, finding: $finding}]->(b) "
    "SET r.run_id = $run_id, r.step_id = $step_id, r.source = $source"
)
FIND_ENTITIES = "MATCH (e:Entity) WHERE e.name IN $names RETURN e.name AS name, e.label AS label"
NEIGHBOURS = (
    "MATCH (e:Entity {name: $name})-[r:RELATED]->(o:Entity) "
    "RETURN o.label AS other, r.relation AS relation, 'out' AS direction, r.source AS source, "
    "r.run_id AS run_id, r.step_id AS step_id LIMIT {limit} "
    "UNION ALL "
    "MATCH (e:Entity {name: $name})<-[r:RELATED]-(o:Entity) "
    "RETURN o.label AS other, r.relation AS relation, 'in' AS direction, r.source AS source, "
    "r.run_id AS run_id, r.step_id AS step_id LIMIT {limit}"
)
TWO_HOP = (
    "MATCH (a:Entity {name: $name})-[:RELATED]-(:Entity)-[:RELATED]-(c:Entity) "
    "WHERE c.name <> $name RETURN DISTINCT c.label AS label LIMIT {limit}"
)
PATHS = (
    "MATCH p = (a:Entity {name: $a})-[:RELATED*1..{hops}]-(b:Entity {name: $b}) "
    "RETURN nodes(p) AS ns, rels(p) AS rs ORDER BY length(p) LIMIT 20"
)
MENTIONED_IN = (
    "MATCH (f:Finding)-[:MENTIONS]->(e:Entity {name: $name}) "
    "RETURN f.id AS id, f.run_id AS run_id, f.step_id AS step_id, f.team AS team, "
    "f.source AS source, f.kind AS kind LIMIT {limit}"
)
COUNT_ENTITIES = "MATCH (e:Entity) RETURN count(e) AS n"
COUNT_RELATIONS = "MATCH ()-[r:RELATED]->() RETURN count(r) AS n"
COUNT_FINDINGS = "MATCH (f:Finding) RETURN count(f) AS n"
DELETE_ALL = ("MATCH (f:Finding) DETACH DELETE f", "MATCH (e:Entity) DETACH DELETE e")


@dataclass(frozen=True)
class Provenance:
    """Where a finding came from: the run, its step and team, and the citable source id."""

    finding: str
    run_id: str
    step_id: str = ""
    team: str = ""
    source: str = ""
    kind: str = "finding"


class Backend(Protocol):
    where: str

    def run(self, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]: ...

    @contextlib.contextmanager
    def write(self) -> Iterator[Any]: ...

    def path_steps(self, nodes: Any, rels: Any) -> list[tuple[str, str, str]]: ...

    def close(self) -> None: ...


# -- LadybugDB (embedded) ----------------------------------------------------------------------
_LADYBUG_SCHEMA = (
    "CREATE NODE TABLE IF NOT EXISTS Entity(name STRING, label STRING, kind STRING, "
    "PRIMARY KEY(name))",
    "CREATE NODE TABLE IF NOT EXISTS Finding(id STRING, run_id STRING, step_id STRING, "
    "team STRING, source STRING, kind STRING, PRIMARY KEY(id))",
    "CREATE REL TABLE IF NOT EXISTS MENTIONS(FROM Finding TO Entity)",
    "CREATE REL TABLE IF NOT EXISTS RELATED(FROM Entity TO Entity, relation STRING, "
    "finding STRING, run_id STRING, step_id STRING, source STRING)",
)
_BUFFER_POOL = 256 * 1024 * 1024
_shared: dict[str, LadybugBackend] = {}
_shared_lock = threading.Lock()
_OPEN_WAIT_S = 30.0


class LadybugBackend:
    """An embedded LadybugDB database file.

    LadybugDB lets one process at a time open a database file for writing. So the file is held
    open only while it is in use (a lease shared by the process's threads): another process (a
    second run, `atlas memory ...` during a run) waits for the current operation, never for a
    whole run. `hold()` keeps it open across many operations.

    `read_only` opens the file in LadybugDB's read-only mode: nothing is created or written
    (no schema, no write-ahead log), and a read-only file can be read.
    """

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self.where = str(path)
        self.read_only = read_only
        self._mutex = threading.Lock()
        self._write_lock = threading.Lock()
        self._db: Any = None
        self._users = 0
        if not read_only:
            with self.write() as tx:
                for statement in _LADYBUG_SCHEMA:
                    tx.execute(statement)

    @classmethod
    def shared(cls, path: Path, *, read_only: bool = False) -> LadybugBackend:
        """One backend per database file (and mode) per process: runs in one process share its
        lease and its writer lock instead of opening the file twice."""
        key = f"{path.resolve()}{' (read-only)' if read_only else ''}"
        with _shared_lock:
            backend = _shared.get(key)
            if backend is None:
                backend = _shared[key] = cls(path, read_only=read_only)
            return backend

    def _open(self) -> Any:
        import ladybug

        if self.path.is_dir():
            raise MemoryStoreError(f"graph store {self.path} is a directory, not a database file")
        if not self.read_only:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + _OPEN_WAIT_S
        while True:
            try:
                return ladybug.Database(
                    str(self.path), buffer_pool_size=_BUFFER_POOL, read_only=self.read_only
                )
            except RuntimeError as exc:
                text = str(exc)
                # Another process holds the file: wait for it, up to a bound.
                if "lock" in text.lower() and time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                raise MemoryStoreError(
                    f"graph store {self.path} cannot be opened: {text.splitlines()[0][:200]}"
                ) from None

    @contextlib.contextmanager
    def hold(self) -> Iterator[Any]:
        """The open database, for as long as the block runs (and any other holder's)."""
        with self._mutex:
            if self._db is None:
                self._db = self._open()
            self._users += 1
            db = self._db
        try:
            yield db
        finally:
            with self._mutex:
                self._users -= 1
                if self._users == 0:
                    with contextlib.suppress(Exception):
                        self._db.close()
                    self._db = None

    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        import ladybug

        with self.hold() as db:
            conn = ladybug.Connection(db)
            try:
                yield conn
            finally:
                with contextlib.suppress(Exception):
                    conn.close()

    def run(self, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        with self._connection() as conn:
            result = conn.execute(query, params or {})
            results = result if isinstance(result, list) else [result]
            rows: list[dict[str, Any]] = []
            for res in results:
                names = res.get_column_names()
                rows += [dict(zip(names, row, strict=True)) for row in res.get_all()]
            return rows

    @contextlib.contextmanager
    def write(self) -> Iterator[Any]:
        if self.read_only:
            raise MemoryStoreError(f"graph store {self.where} is open for reading only")
        with self._write_lock, self._connection() as conn:
            conn.execute("BEGIN TRANSACTION")
            try:
                yield _LadybugTx(conn)
            except BaseException:
                with contextlib.suppress(Exception):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def path_steps(self, nodes: Any, rels: Any) -> list[tuple[str, str, str]]:
        by_id = {_lb_id(n["_ID"]): n for n in nodes}
        steps = []
        for rel in rels:
            src, dst = by_id.get(_lb_id(rel["_SRC"])), by_id.get(_lb_id(rel["_DST"]))
            if src is None or dst is None:
                continue
            steps.append((str(src.get("label")), str(rel.get("relation")), str(dst.get("label"))))
        return steps

    def close(self) -> None:
        """Nothing stays open between operations; a `hold()` in progress closes on exit."""


class _LadybugTx:
    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, query: str, params: dict[str, Any] | None = None) -> None:
        self.conn.execute(query, params or {})


def _lb_id(value: Any) -> tuple[int, int]:
    return (int(value["table"]), int(value["offset"]))


class _EmptyBackend:
    """A graph file that does not exist, read without creating it: it knows nothing."""

    def __init__(self, path: Path) -> None:
        self.where = str(path)

    def run(self, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return []

    @contextlib.contextmanager
    def write(self) -> Iterator[Any]:
        raise MemoryStoreError(f"graph store {self.where} is open for reading only")
        yield  # pragma: no cover (a generator, for contextmanager)

    def path_steps(self, nodes: Any, rels: Any) -> list[tuple[str, str, str]]:
        return []

    def close(self) -> None:
        """Nothing is open."""


# -- Neo4j (server) ------------------------------------------------------------------------------
_NEO4J_SCHEMA = (
    "CREATE CONSTRAINT atlas_entity IF NOT EXISTS FOR (e:Entity) REQUIRE e.name IS UNIQUE",
    "CREATE CONSTRAINT atlas_finding IF NOT EXISTS FOR (f:Finding) REQUIRE f.id IS UNIQUE",
)


class Neo4jBackend:
    """A Neo4j server through the official driver. Credentials: the URI's user:password, or
    NEO4J_USERNAME / NEO4J_PASSWORD; they never appear in messages."""

    def __init__(self, uri: str) -> None:
        try:
            import neo4j
        except ImportError:
            raise MemoryStoreError(
                "memory.graph_uri names a Neo4j server: pip install 'atlas-agents[neo4j]'"
            ) from None
        parts = urlsplit(uri)
        user = parts.username or os.environ.get("NEO4J_USERNAME", "neo4j")
        password = parts.password or os.environ.get("NEO4J_PASSWORD", "")
        bare = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        self.where = safe_url(uri)
        self.database = (parts.path or "").strip("/") or None
        try:
            self.driver = neo4j.GraphDatabase.driver(
                bare, auth=(user, password) if password else None, connection_timeout=5.0
            )
            self.driver.verify_connectivity()
        except Exception as exc:
            raise MemoryStoreError(
                f"cannot reach the Neo4j server at {self.where}: {str(exc).splitlines()[0][:200]}"
            ) from None
        with self.write() as tx:
            for statement in _NEO4J_SCHEMA:
                tx.execute(statement)

    def run(self, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        records, _, _ = self.driver.execute_query(
            query, params or {}, database_=self.database, routing_="r"
        )
        return [dict(record) if _has_graph_values(record) else record.data() for record in records]

    @contextlib.contextmanager
    def write(self) -> Iterator[Any]:
        with self.driver.session(database=self.database) as session:
            tx = session.begin_transaction()
            try:
                yield _Neo4jTx(tx)
            except BaseException:
                tx.rollback()
                raise
            tx.commit()

    def path_steps(self, nodes: Any, rels: Any) -> list[tuple[str, str, str]]:
        return [
            (str(r.start_node.get("label")), str(r.get("relation")), str(r.end_node.get("label")))
            for r in rels
        ]

    def close(self) -> None:
        self.driver.close()


class _Neo4jTx:
    def __init__(self, tx: Any) -> None:
        self.tx = tx

    def execute(self, query: str, params: dict[str, Any] | None = None) -> None:
        self.tx.run(query, params or {}).consume()


def _has_graph_values(record: Any) -> bool:
    return any(isinstance(v, list) and v and hasattr(v[0], "element_id") for v in record.values())


# -- the store ---------------------------------------------------------------------------------
def is_server_uri(uri: str | None) -> bool:
    return bool(uri) and urlsplit(str(uri)).scheme.split("+")[0] in ("bolt", "neo4j")


class GraphMemory:
    """Entities and relations with provenance, on either backend."""

    def __init__(
        self, *, path: Path | None = None, uri: str | None = None, read_only: bool = False
    ) -> None:
        """`read_only`: never create or write an embedded graph (a file that does not exist
        reads as empty). A Neo4j server is opened as usual."""
        if uri is not None and not is_server_uri(uri):
            raise MemoryStoreError(
                f"memory.graph_uri {safe_url(uri)!r} is not a bolt:// or neo4j:// URI"
            )
        if uri is None and path is None:
            raise ValueError("GraphMemory needs a path or a uri")
        self._path = path
        self._uri = uri
        self._read_only = read_only
        self._backend: Backend | None = None
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return safe_url(self._uri) if self._uri else str(self._path)

    @property
    def backend(self) -> Backend:
        with self._lock:
            if self._backend is None:
                if self._uri:
                    self._backend = Neo4jBackend(self._uri)
                else:
                    assert self._path is not None
                    if not self._read_only:
                        self._backend = LadybugBackend.shared(self._path)
                    elif self._path.is_file():
                        self._backend = LadybugBackend.shared(self._path, read_only=True)
                    elif self._path.exists():
                        raise MemoryStoreError(
                            f"graph store {self._path} is a directory, not a database file"
                        )
                    else:
                        self._backend = _EmptyBackend(self._path)
            return self._backend

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Keep an embedded graph open across many operations (a Neo4j driver always is)."""
        backend = self.backend
        if isinstance(backend, LadybugBackend):
            with backend.hold():
                yield
        else:
            yield

    # -- writing ---------------------------------------------------------------------------------
    def add(self, extraction: Extraction, provenance: Provenance) -> tuple[int, int]:
        """Merge the extraction's entities and relations; returns (entities, relations) kept."""
        names: dict[str, tuple[str, str]] = {}
        for entity in extraction.entities:
            key = normalize(entity.name)
            if key and key not in names:
                names[key] = (" ".join(entity.name.split())[:120], entity.type[:40])
        relations = []
        for rel in extraction.relations:
            a, b = normalize(rel.source), normalize(rel.target)
            if not a or not b or a == b:
                continue
            for key, raw in ((a, rel.source), (b, rel.target)):
                names.setdefault(key, (" ".join(raw.split())[:120], ""))
            relations.append((a, " ".join(rel.relation.split())[:80] or "related to", b))
        prov = {
            "run_id": provenance.run_id,
            "step_id": provenance.step_id,
            "source": provenance.source,
        }
        with self.backend.write() as tx:
            tx.execute(
                MERGE_FINDING,
                {
                    "id": provenance.finding,
                    "run_id": provenance.run_id,
                    "step_id": provenance.step_id,
                    "team": provenance.team,
                    "source": provenance.source,
                    "kind": provenance.kind,
                },
            )
            for key, (label, kind) in names.items():
                tx.execute(
                    MERGE_ENTITY,
                    {"name": key, "label": label, "kind": kind, "finding": provenance.finding},
                )
            for a, relation, b in relations:
                tx.execute(
                    MERGE_RELATION,
                    {"a": a, "b": b, "relation": relation, "finding": provenance.finding, **prov},
                )
        return len(names), len(relations)

    # -- reading ---------------------------------------------------------------------------------
    def find(self, names: Sequence[str]) -> list[dict[str, Any]]:
        keys = sorted({normalize(n) for n in names} - {""})
        return self.backend.run(FIND_ENTITIES, {"names": keys}) if keys else []

    def neighbours(self, entity: str, limit: int = 25) -> list[dict[str, Any]]:
        query = NEIGHBOURS.replace("{limit}", str(int(limit)))
        return self.backend.run(query, {"name": normalize(entity)})

    def two_hop(self, entity: str, limit: int = 50) -> list[str]:
        query = TWO_HOP.replace("{limit}", str(int(limit)))
        return [r["label"] for r in self.backend.run(query, {"name": normalize(entity)})]

    def mentions(self, entity: str, limit: int = 20) -> list[dict[str, Any]]:
        query = MENTIONED_IN.replace("{limit}", str(int(limit)))
        return self.backend.run(query, {"name": normalize(entity)})

    def paths(
        self, a: str, b: str, max_hops: int = 3, limit: int = 3
    ) -> list[list[tuple[str, str, str]]]:
        """Shortest-first paths between two entities, without revisiting an entity."""
        hops = max(1, min(int(max_hops), 4))
        rows = self.backend.run(
            PATHS.replace("{hops}", str(hops)), {"a": normalize(a), "b": normalize(b)}
        )
        found: list[list[tuple[str, str, str]]] = []
        for row in rows:
            steps = self.backend.path_steps(row["ns"], row["rs"])
            labels = [s[0] for s in steps] + [s[2] for s in steps]
            if len(set(labels)) < len(steps) + 1 or steps in found:
                continue  # a walk that comes back on itself
            found.append(steps)
            if len(found) >= limit:
                break
        return found

    def stats(self) -> dict[str, Any]:
        b = self.backend
        return {
            "store": self.where,
            "entities": _count(b, COUNT_ENTITIES),
            "relations": _count(b, COUNT_RELATIONS),
            "findings": _count(b, COUNT_FINDINGS),
        }

    def clear(self) -> int:
        n = self.stats()["entities"]
        with self.backend.write() as tx:
            for statement in DELETE_ALL:
                tx.execute(statement)
        return n

    def close(self) -> None:
        with self._lock:
            if self._backend is not None:
                self._backend.close()
                self._backend = None


def _count(backend: Backend, query: str) -> int:
    rows = backend.run(query)
    return int(rows[0]["n"]) if rows else 0


__all__ = ["GraphMemory", "LadybugBackend", "Neo4jBackend", "Provenance", "is_server_uri"]
