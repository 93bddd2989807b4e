"""Run records, checkpoints and the run lock in Postgres, for runs shared by several hosts.

Chosen by `ATLAS_STATE_URL` (or `--state-url`, or a task's `state.url`):
`postgresql://user:password@host:5432/db`. Then `atlas runs`, `resume`, `approve` and every run
read and write:

- run records: the table `atlas_runs` (the columns of `RunRecord`);
- checkpoints: LangGraph's `PostgresSaver` / `AsyncPostgresSaver` over a connection pool (its own
  tables, created once by `setup()`, under an advisory lock so hosts starting together do not
  race);
- the run lock: a session-level advisory lock held on its own connection for the whole run. The
  server drops it when that connection closes, so a SIGKILLed process leaves no stale lock, on
  any host.

A run's own files (drafts, `plan.json`, the call journal) stay in its local state directory. The
URL's password never appears in records, traces or messages (`public_url`).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atlas.errors import AmbiguousRun, RunLocked, RunNotFound, SpecError, StateError

if TYPE_CHECKING:
    from atlas.runs import RunRecord

STATE_URL_ENV = "ATLAS_STATE_URL"
SCHEMES = ("postgresql://", "postgres://")
CONNECT_TIMEOUT_S = 10
POOL_SIZE = 10
"""Connections per run's checkpointer: a wave's parallel steps write their checkpoints at once."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS atlas_runs (
    run_id TEXT PRIMARY KEY,
    name TEXT,
    task_file TEXT,
    spec_json TEXT NOT NULL,
    model TEXT,
    status TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL,
    finished_at DOUBLE PRECISION,
    iterations INTEGER,
    tokens BIGINT,
    cost_usd DOUBLE PRECISION,
    score DOUBLE PRECISION,
    trace_id TEXT,
    tracking_uri TEXT,
    output TEXT,
    stop_reason TEXT,
    pid INTEGER
)
"""
_SCHEMA_LOCK = 0x41544C53  # "ATLS": serialises schema set-up across processes and hosts

_ready: set[tuple[str, str]] = set()
_ready_lock = threading.Lock()


def check_url(url: str, field: str = STATE_URL_ENV) -> str:
    """`url` if it names a Postgres database, else a one-line SpecError (with no password)."""
    from atlas.tracing.redact import public_url

    if not url.startswith(SCHEMES):
        raise SpecError(
            f"{public_url(url)!r} is not a Postgres URL: write postgresql://user@host:5432/db",
            field=field,
        )
    return url


def state_url(spec: Any = None) -> str | None:
    """Where ATLAS's state lives: `$ATLAS_STATE_URL`, else the task's `state.url`, else None
    (SQLite files in the state directory)."""
    url = os.environ.get(STATE_URL_ENV, "").strip()
    if url:
        return check_url(url)
    given = getattr(getattr(spec, "state", None), "url", None)
    return check_url(given, "state.url") if given else None


STATE_NOTE = "state.json"
"""In a run's local folder, when its state URL came from its task file (`state.url`) and not
the environment: the task file's path, so `resume`, `approve` and `approvals` find the run in
Postgres with no URL given. The URL itself (and its password) is never written there."""


def note_task_state(run_dir: Path, task_file: str | None) -> None:
    import json

    note = {"state": "postgres", "task_file": str(Path(task_file).resolve()) if task_file else None}
    (run_dir / STATE_NOTE).write_text(json.dumps(note))


def url_of_local_run(directory: Path, run_id: str) -> str | None:
    """The state URL of a run started on this host whose task file named it (`state.url`), for
    commands that get only a run id; None when no such run is here. The id may be a prefix of
    one run's id. A run started by the API (no task file) needs `$ATLAS_STATE_URL`."""
    import json

    from atlas.spec import load_task

    runs = directory / "runs"
    if not run_id.strip() or not runs.is_dir():
        return None
    found = [p for p in runs.glob(f"{glob.escape(run_id)}*/{STATE_NOTE}") if p.is_file()]
    exact = [p for p in found if p.parent.name == run_id]
    if len(exact or found) != 1:
        return None
    try:
        task_file = json.loads((exact or found)[0].read_text()).get("task_file")
    except (OSError, ValueError):
        return None
    if not task_file:
        raise StateError(
            f"run {run_id!r} keeps its state in Postgres: set {STATE_URL_ENV} (or --state-url)"
        )
    if not Path(task_file).is_file():
        raise StateError(
            f"run {run_id!r} keeps its state in Postgres as {task_file} said, which is gone: "
            f"set {STATE_URL_ENV} (or --state-url)"
        )
    return state_url(load_task(task_file))


def _problem(url: str, exc: BaseException) -> StateError:
    from atlas.tracing.redact import public_url, scrub_text, secret_values

    text = " ".join(str(exc).split()) or type(exc).__name__
    text = scrub_text(text, secret_values())
    return StateError(f"state store {public_url(url)}: {text}"[:400], path=public_url(url))


def connect(url: str) -> Any:
    """One autocommit connection (rows as dicts), or a one-line StateError."""
    import psycopg
    from psycopg.rows import dict_row

    try:
        return psycopg.connect(
            url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, row_factory=dict_row
        )
    except psycopg.Error as exc:
        raise _problem(url, exc) from None


def _ensure(url: str, key: str, make: Any) -> None:
    """Run `make(connection)` once per process and URL, under the schema advisory lock."""
    with _ready_lock:
        if (url, key) in _ready:
            return
    con = connect(url)
    try:
        con.execute("SELECT pg_advisory_lock(%s)", (_SCHEMA_LOCK,))
        try:
            make(con)
        finally:
            con.execute("SELECT pg_advisory_unlock(%s)", (_SCHEMA_LOCK,))
    finally:
        con.close()
    with _ready_lock:
        _ready.add((url, key))


class PgRunStore:
    """Run records in Postgres: what `RunStore` is for `runs.db`, with the same methods."""

    def __init__(self, url: str) -> None:
        self.url = check_url(url)

    @property
    def directory(self) -> str:
        from atlas.tracing.redact import public_url

        return public_url(self.url)

    @contextlib.contextmanager
    def _db(self, *, create: bool = True) -> Iterator[Any]:
        import psycopg

        if create:
            _ensure(self.url, "runs", lambda con: con.execute(_SCHEMA))
        con = connect(self.url)
        try:
            yield con
        except psycopg.errors.UndefinedTable:
            raise
        except psycopg.Error as exc:
            raise _problem(self.url, exc) from None
        finally:
            con.close()

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Rows of one query; [] when the table does not exist yet (reading creates nothing)."""
        import psycopg

        try:
            with self._db(create=False) as con:
                return list(con.execute(sql, params).fetchall())
        except psycopg.errors.UndefinedTable:
            return []

    def start(self, record: RunRecord) -> None:
        values = record.__dict__
        names = ", ".join(values)
        updates = ", ".join(f"{k} = EXCLUDED.{k}" for k in values if k != "run_id")
        with self._db() as con:
            con.execute(
                f"INSERT INTO atlas_runs ({names}) VALUES ({', '.join(['%s'] * len(values))}) "
                f"ON CONFLICT (run_id) DO UPDATE SET {updates}",
                list(values.values()),
            )

    def restore(self, records: Iterable[RunRecord]) -> int:
        added = 0
        with self._db() as con:
            for record in records:
                values = record.__dict__
                cursor = con.execute(
                    f"INSERT INTO atlas_runs ({', '.join(values)}) "
                    f"VALUES ({', '.join(['%s'] * len(values))}) ON CONFLICT DO NOTHING",
                    list(values.values()),
                )
                added += cursor.rowcount
        return added

    def update(self, run_id: str, **values: Any) -> None:
        if not values:
            return
        sets = ", ".join(f"{k} = %s" for k in values)
        with self._db() as con:
            con.execute(
                f"UPDATE atlas_runs SET {sets} WHERE run_id = %s", [*values.values(), run_id]
            )

    def resolve(self, run_id: str) -> RunRecord:
        """The run with this exact id, else the one run whose id starts with `run_id`."""
        missing = RunNotFound(f"no run {run_id!r} in {self.directory} (see `python -m atlas runs`)")
        if not run_id.strip():
            raise missing
        rows = self._read("SELECT * FROM atlas_runs WHERE run_id = %s", (run_id,))
        if not rows:
            rows = self._read(
                "SELECT * FROM atlas_runs WHERE left(run_id, length(%s)) = %s "
                "ORDER BY started_at DESC",
                (run_id, run_id),
            )
        if not rows:
            raise missing
        if len(rows) > 1:
            raise AmbiguousRun(run_id, [str(r["run_id"]) for r in rows])
        return _record(rows[0])

    def get(self, run_id: str) -> RunRecord:
        return self.resolve(run_id)

    def list(self, limit: int = 50) -> list[RunRecord]:
        rows = self._read("SELECT * FROM atlas_runs ORDER BY started_at DESC LIMIT %s", (limit,))
        return [_record(r) for r in rows]

    def latest(self) -> RunRecord | None:
        runs = self.list(limit=1)
        return runs[0] if runs else None


def _record(row: dict[str, Any]) -> RunRecord:
    from atlas.runs import _COLUMNS, RunRecord

    values: dict[str, Any] = {k: row.get(k) for k in _COLUMNS}
    return RunRecord(**values)


def _pool_kwargs() -> dict[str, Any]:
    from psycopg.rows import dict_row

    # What PostgresSaver needs: autocommit (its set-up creates indexes CONCURRENTLY), rows as
    # dicts; no server-side prepared statements, so a pooler in transaction mode works too.
    return {
        "autocommit": True,
        "prepare_threshold": None,
        "row_factory": dict_row,
        "connect_timeout": CONNECT_TIMEOUT_S,
    }


def _setup_checkpoints(url: str) -> None:
    from langgraph.checkpoint.postgres import PostgresSaver

    def make(con: Any) -> None:
        PostgresSaver(con).setup()

    _ensure(url, "checkpoints", make)


@contextlib.contextmanager
def checkpointer(url: str) -> Iterator[Any]:
    """LangGraph's PostgresSaver over a connection pool, its tables set up."""
    from langgraph.checkpoint.postgres import PostgresSaver
    from psycopg_pool import ConnectionPool, PoolTimeout

    _setup_checkpoints(url)
    try:
        pool = ConnectionPool(
            url, min_size=1, max_size=POOL_SIZE, kwargs=_pool_kwargs(), open=False, timeout=30
        )
        pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
    except PoolTimeout as exc:
        raise _problem(url, exc) from None
    try:
        yield PostgresSaver(pool)  # type: ignore[arg-type]
    finally:
        pool.close()


@contextlib.asynccontextmanager
async def async_checkpointer(url: str) -> AsyncIterator[Any]:
    """LangGraph's AsyncPostgresSaver over an async pool (set-up done in a worker thread)."""
    import asyncio

    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg_pool import AsyncConnectionPool, PoolTimeout

    await asyncio.to_thread(_setup_checkpoints, url)
    pool = AsyncConnectionPool(
        url, min_size=1, max_size=POOL_SIZE, kwargs=_pool_kwargs(), open=False, timeout=30
    )
    try:
        await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
    except PoolTimeout as exc:
        raise _problem(url, exc) from None
    try:
        yield AsyncPostgresSaver(pool)  # type: ignore[arg-type]
    finally:
        await pool.close()


def _lock_key(run_id: str) -> int:
    """A run's advisory lock key: 63 bits of its id's hash (Postgres keys are signed bigints)."""
    return int.from_bytes(hashlib.sha256(run_id.encode()).digest()[:8], "big") >> 1


@contextlib.contextmanager
def run_lock(url: str, run_id: str) -> Iterator[None]:
    """Held while a run executes, on every host sharing the store: a second `run`/`resume` of
    the same id raises RunLocked. The server releases it when the holder's connection ends."""
    con = connect(url)
    try:
        row = con.execute("SELECT pg_try_advisory_lock(%s) AS got", (_lock_key(run_id),)).fetchone()
        if not row or not row["got"]:
            raise RunLocked(
                f"run {run_id} is already running (on a host sharing this state store); wait "
                "for it to end, or stop it, then resume"
            )
        yield
    finally:
        con.close()  # ends the session, and the lock with it
