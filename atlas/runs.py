"""The state directory (default `.atlas/`): run records, checkpoints, traces, memory.

`runs.db` holds one row per run: what `python -m atlas runs` lists and `resume` reads. LangGraph's
checkpoints live in `checkpoints.db` beside it. Both use SQLite in WAL mode so concurrent runs can
share them.

A state file SQLite cannot use (corrupt, a directory, unreadable) is a one-line `StateError`
naming it; `python -m atlas doctor` moves a corrupt one aside (`atlas/doctor.py`). Reading
commands open `runs.db` read-only and create nothing: no directory, table or WAL file.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from atlas.errors import AmbiguousRun, RunNotFound, SpecError, StateError

STATE_DIR_ENV = "ATLAS_STATE_DIR"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    name TEXT,
    task_file TEXT,
    spec_json TEXT NOT NULL,
    model TEXT,
    status TEXT NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL,
    iterations INTEGER,
    tokens INTEGER,
    cost_usd REAL,
    score REAL,
    trace_id TEXT,
    tracking_uri TEXT,
    output TEXT,
    stop_reason TEXT,
    pid INTEGER
)
"""


def state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """`--state-dir`, else `$ATLAS_STATE_DIR`, else `./.atlas`.

    Nothing is created here. A path that is (or lies under) a file is a SpecError (exit 2)."""
    from_env = not explicit and bool(os.environ.get(STATE_DIR_ENV))
    chosen = explicit or os.environ.get(STATE_DIR_ENV) or ".atlas"
    field = STATE_DIR_ENV if from_env else "--state-dir"
    try:
        path = Path(chosen).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise SpecError(f"{chosen!s} is not a usable path ({exc})", field=field) from None
    # The nearest part that exists must be a directory (`file.txt/sub` fails on mkdir too).
    for part in (path, *path.parents):
        if part.exists():
            if not part.is_dir():
                raise SpecError(f"{part} is a file, not a directory", field=field)
            break
    return path


# SQLite's primary result codes that mean "this file is not usable as a database".
_CORRUPT, _NOTADB, _CANTOPEN, _READONLY, _PERM = 11, 26, 14, 8, 3


def state_error(path: Path, exc: sqlite3.Error) -> StateError | None:
    """The one-line error for a state file SQLite cannot use, or None for other failures
    (locked, disk full, ...), which keep their own error."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code in (_CORRUPT, _NOTADB):
        return StateError(
            f"{path} is corrupt ({exc}); run `python -m atlas doctor` to move it aside",
            path=str(path),
            corrupt=True,
        )
    if code not in (_CANTOPEN, _READONLY, _PERM):
        return None
    if path.is_dir():
        why = "is a directory, not a database file; move it away"
    elif path.exists() and not os.access(path, os.R_OK):
        why = "cannot be read (permission denied); fix its permissions"
    elif code == _READONLY or (path.exists() and not os.access(path, os.W_OK)):
        why = f"cannot be written ({exc}); make it and its directory writable"
    else:
        why = f"cannot be opened ({exc})"
    return StateError(f"{path} {why}", path=str(path))


@contextmanager
def guard_state(path: Path) -> Iterator[None]:
    """Turn SQLite's "not a database", "malformed", "unable to open" raised inside the block
    into a StateError naming `path`."""
    try:
        yield
    except sqlite3.Error as exc:
        error = state_error(path, exc)
        if error is None:
            raise
        raise error from exc


SYNCHRONOUS = "NORMAL"
"""WAL with synchronous=NORMAL: a commit is in the OS's hands when it returns, so a killed
process (even SIGKILL) loses nothing committed; only a power cut can roll back the last
commits, never corrupt the file. FULL would fsync every checkpoint write, and profiling the
fan-out benchmark found those fsyncs on the run's critical path."""


def connect(path: Path) -> sqlite3.Connection:
    """A connection for writing (WAL, busy timeout). Creates the directory and the file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with guard_state(path):
        con = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
        try:
            con.execute("PRAGMA busy_timeout=30000")
            _use_wal(con, path)
            con.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
        except BaseException:
            con.close()
            raise
    return con


def connect_readonly(path: Path, *, immutable: bool | None = None) -> sqlite3.Connection:
    """A connection that cannot write and creates nothing: no directory, no WAL files.

    `mode=ro` on a WAL database creates `-wal` and `-shm` beside it, and fails in a directory
    it cannot write to ("attempt to write a readonly database"; measured). When no `-wal` file
    exists every commit is in the main file, so it is opened `immutable=1` (no locks, no side
    files). When one exists its commits are needed, and `mode=ro` uses the files already there.
    The caller retries with `immutable=False` if an immutable read fails (a writer may have
    checkpointed into the file meanwhile)."""
    if immutable is None:
        immutable = not path.with_name(path.name + "-wal").exists()
    query = "immutable=1" if immutable else "mode=ro"
    uri = f"file:{urllib.parse.quote(str(path))}?{query}"
    with guard_state(path):
        con = sqlite3.connect(uri, uri=True, timeout=30, check_same_thread=False)
        try:
            con.execute("PRAGMA busy_timeout=30000")
            con.execute("PRAGMA query_only=1")
        except BaseException:
            con.close()
            raise
    return con


def _use_wal(con: sqlite3.Connection, path: Path) -> None:
    """Put a database in WAL mode (it stays so). Switching a new file takes an exclusive lock
    and SQLite fails it at once, without waiting, when another run has the file open: runs
    starting together on a new state directory did. So the switch happens once, under a file
    lock, and a file already in WAL mode is left alone."""
    (mode,) = con.execute("PRAGMA journal_mode").fetchone()
    if str(mode).lower() == "wal":
        return
    from atlas._process import file_lock

    with file_lock(path.with_name(path.name + ".lock")):
        con.execute("PRAGMA journal_mode=WAL")


@dataclass
class RunRecord:
    run_id: str
    name: str | None
    task_file: str | None
    spec_json: str
    model: str | None
    status: str
    started_at: float
    finished_at: float | None = None
    iterations: int | None = None
    tokens: int | None = None
    cost_usd: float | None = None
    score: float | None = None
    trace_id: str | None = None
    tracking_uri: str | None = None
    output: str | None = None
    stop_reason: str | None = None
    pid: int | None = None


_COLUMNS = tuple(f.name for f in fields(RunRecord))


class RunStore:
    """Run records in `<state dir>/runs.db`.

    `start` and `update` create the directory and the file; `get`, `resolve`, `list` and
    `latest` only read (see `connect_readonly`) and never create anything."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "runs.db"

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        con = connect(self.path)
        try:
            with guard_state(self.path):
                con.execute(_SCHEMA)
                yield con
        finally:
            con.close()

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        """Rows of one query on a read-only connection; [] when there is no runs.db or no
        table yet."""
        if not self.path.exists() and not self.path.is_symlink():
            return []
        try:
            return self._query(sql, params, immutable=None)
        except StateError as first:
            if not first.corrupt or not self.path.with_name("runs.db-wal").exists():
                raise
            # An immutable read can catch a file a writer (it made the -wal file) is
            # checkpointing into at that moment; a normal read-only open settles whether the
            # file is really corrupt. With no writer, the first answer stands.
            try:
                return self._query(sql, params, immutable=False)
            except StateError:
                raise first from None

    def _query(
        self, sql: str, params: tuple[Any, ...], *, immutable: bool | None
    ) -> list[sqlite3.Row]:
        con = connect_readonly(self.path, immutable=immutable)
        try:
            with guard_state(self.path):
                con.row_factory = sqlite3.Row
                return list(con.execute(sql, params).fetchall())
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            con.close()

    def start(self, record: RunRecord) -> None:
        values = record.__dict__
        with self._db() as con:
            con.execute(
                f"INSERT OR REPLACE INTO runs ({', '.join(values)}) "
                f"VALUES ({', '.join('?' * len(values))})",
                list(values.values()),
            )

    def restore(self, records: Iterable[RunRecord]) -> int:
        """Insert records kept from a damaged runs.db (`atlas doctor`); a run already here
        (started since) is left as it is. Returns how many were added. Creates the file even
        when there are none."""
        added = 0
        with self._db() as con:
            con.execute("BEGIN")
            for record in records:
                values = record.__dict__
                cursor = con.execute(
                    f"INSERT OR IGNORE INTO runs ({', '.join(values)}) "
                    f"VALUES ({', '.join('?' * len(values))})",
                    list(values.values()),
                )
                added += cursor.rowcount
            con.execute("COMMIT")
        return added

    def update(self, run_id: str, **values: Any) -> None:
        if not values:
            return
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._db() as con:
            con.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", [*values.values(), run_id])

    def resolve(self, run_id: str) -> RunRecord:
        """The run with this exact id, else the one run whose id starts with `run_id`.

        Never a pattern: `%` and `_` are plain characters, and an empty or blank id matches
        nothing. Several runs sharing the prefix raise AmbiguousRun (listing them); none,
        RunNotFound. Whether a prefix was matched: `matched_prefix(run_id, record)`."""
        missing = RunNotFound(f"no run {run_id!r} in {self.directory} (see `python -m atlas runs`)")
        if not run_id.strip():
            raise missing
        rows = self._read("SELECT * FROM runs WHERE run_id = ?", (run_id,))
        if not rows:
            rows = self._read(
                "SELECT * FROM runs WHERE substr(run_id, 1, length(?1)) = ?1 "
                "ORDER BY started_at DESC LIMIT 11",
                (run_id,),
            )
            # SQLite's substr counts characters as Python does; checked again in Python.
            rows = [r for r in rows if str(r["run_id"]).startswith(run_id)]
        if not rows:
            raise missing
        if len(rows) > 1:
            everyone = self._read(
                "SELECT run_id FROM runs WHERE substr(run_id, 1, length(?1)) = ?1 "
                "ORDER BY started_at DESC",
                (run_id,),
            )
            raise AmbiguousRun(run_id, [str(r["run_id"]) for r in everyone])
        return _record(rows[0])

    def get(self, run_id: str) -> RunRecord:
        """`resolve`: an exact id or a unique prefix."""
        return self.resolve(run_id)

    def list(self, limit: int = 50) -> list[RunRecord]:
        rows = self._read("SELECT * FROM runs ORDER BY started_at DESC LIMIT ?", (limit,))
        return [_record(r) for r in rows]

    def latest(self) -> RunRecord | None:
        runs = self.list(limit=1)
        return runs[0] if runs else None


def _record(row: sqlite3.Row) -> RunRecord:
    data = dict(row)
    values: dict[str, Any] = {k: data.get(k) for k in _COLUMNS}
    return RunRecord(**values)


def matched_prefix(asked: str, record: RunRecord) -> str | None:
    """The note to print when `asked` was a prefix of the run's id, else None."""
    if record.run_id == asked:
        return None
    return f"resuming run {record.run_id} (matched prefix {asked})"


def checkpoint_path(directory: Path) -> Path:
    return directory / "checkpoints.db"


def run_store(directory: Path, url: str | None = None) -> Any:
    """The run records: in Postgres when a state URL is given or `$ATLAS_STATE_URL` is set
    (`atlas/runs_postgres.py`), else `runs.db` in the state directory."""
    from atlas.runs_postgres import PgRunStore, state_url

    chosen = url or state_url()
    return PgRunStore(chosen) if chosen else RunStore(directory)


@contextmanager
def checkpoints(directory: Path, url: str | None = None) -> Iterator[Any]:
    """The checkpointer: Postgres's when a state URL is given or set, else `checkpoints.db`."""
    from atlas.runs_postgres import checkpointer, state_url

    chosen = url or state_url()
    if chosen:
        with checkpointer(chosen) as saver:
            yield saver
    else:
        with sync_checkpointer(directory) as saver:
            yield saver


@contextmanager
def sync_checkpointer(directory: Path) -> Iterator[Any]:
    from langgraph.checkpoint.sqlite import SqliteSaver

    path = checkpoint_path(directory)
    con = connect(path)
    try:
        # Also around the run itself: a file damaged past its first page fails mid-run.
        with guard_state(path):
            saver = SqliteSaver(con)
            saver.setup()
            yield saver
    finally:
        con.close()


_ENV_REF = re.compile(r"((Bearer|Basic|Token) )?\$\{[A-Za-z_][A-Za-z0-9_]*\}", re.I)
"""A header or env value that only names a variable (`${TOKEN}`, `Bearer ${TOKEN}`) holds no
secret and is kept; any other value is redacted."""


def spec_to_json(spec: Any) -> str:
    """The spec as a run record keeps it: no secrets.

    Provider options whose names look secret (`api_key`, `X-Gateway-Token`, `Authorization`),
    passwords in URLs, secret environment values and key-shaped strings become `[REDACTED]`, and
    so does every MCP server's header and env value that is not a bare `${VAR}` reference.
    `resume` takes them back from the task file (see `restore_secrets`).
    """
    from atlas.tracing.redact import REDACTED, scrub_text, secret_option, secret_values

    secrets = secret_values()

    def server(value: Any) -> Any:
        if not isinstance(value, dict):
            return clean(value)
        out = clean({k: v for k, v in value.items() if k not in ("headers", "env")})
        for key in ("headers", "env"):
            if key in value:
                out[key] = {
                    k: v if _ENV_REF.fullmatch(str(v)) else REDACTED for k, v in value[key].items()
                }
        return out

    def clean(value: Any, name: str = "", option: bool = False) -> Any:
        """`option`: inside a model's free-form `params`, where names tell what is secret."""
        if isinstance(value, dict):
            if name == "mcp_servers" and not option:
                return {k: server(v) for k, v in value.items()}
            return {k: clean(v, str(k), option or k == "params") for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v, name, option) for v in value]
        if isinstance(value, str):
            if option and secret_option(name):
                return REDACTED
            return scrub_text(value, secrets)
        return value

    return json.dumps(clean(spec.model_dump(mode="json")))


def restore_secrets(record: RunRecord) -> Any:
    """The run's spec for `resume`. When secrets were left out of the record, they come back from
    the task file, which must still describe the same task; otherwise a one-line SpecError."""
    from atlas.errors import SpecError
    from atlas.spec import TaskSpec, load_task
    from atlas.tracing.redact import REDACTED

    if REDACTED not in record.spec_json:
        return TaskSpec.model_validate_json(record.spec_json)
    how = "put them in environment variables (`api_key_env`) to resume without the file"
    if not record.task_file or not Path(record.task_file).is_file():
        raise SpecError(
            f"run {record.run_id} had secrets in its task options, which ATLAS does not store, "
            f"and its task file is gone: {how}",
            file=record.task_file,
        )
    spec = load_task(record.task_file)
    if spec_to_json(spec) != record.spec_json:
        raise SpecError(
            f"changed since run {record.run_id} started; the run had secrets in its task "
            f"options, which ATLAS does not store: restore the file or {how}",
            file=record.task_file,
        )
    return spec


def now() -> float:
    return time.time()
