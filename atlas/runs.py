"""The state directory (default `.atlas/`): run records, checkpoints, traces, memory.

`runs.db` holds one row per run: what `python -m atlas runs` lists and `resume` reads. LangGraph's
checkpoints live in `checkpoints.db` beside it. Both use SQLite in WAL mode so concurrent runs can
share them.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas.errors import RunNotFound

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
    """`--state-dir`, else `$ATLAS_STATE_DIR`, else `./.atlas`."""
    chosen = explicit or os.environ.get(STATE_DIR_ENV) or ".atlas"
    return Path(chosen).expanduser().resolve()


SYNCHRONOUS = "NORMAL"
"""WAL with synchronous=NORMAL: a commit is in the OS's hands when it returns, so a killed
process (even SIGKILL) loses nothing committed; only a power cut can roll back the last
commits, never corrupt the file. FULL would fsync every checkpoint write, and profiling the
fan-out benchmark found those fsyncs on the run's critical path."""


def connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=30, check_same_thread=False, isolation_level=None)
    con.execute("PRAGMA busy_timeout=30000")
    _use_wal(con, path)
    con.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
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


class RunStore:
    """Run records in `<state dir>/runs.db`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / "runs.db"

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        con = connect(self.path)
        try:
            con.execute(_SCHEMA)
            yield con
        finally:
            con.close()

    def start(self, record: RunRecord) -> None:
        fields = record.__dict__
        with self._db() as con:
            con.execute(
                f"INSERT OR REPLACE INTO runs ({', '.join(fields)}) "
                f"VALUES ({', '.join('?' * len(fields))})",
                list(fields.values()),
            )

    def update(self, run_id: str, **values: Any) -> None:
        if not values:
            return
        sets = ", ".join(f"{k} = ?" for k in values)
        with self._db() as con:
            con.execute(f"UPDATE runs SET {sets} WHERE run_id = ?", [*values.values(), run_id])

    def get(self, run_id: str) -> RunRecord:
        with self._db() as con:
            con.row_factory = sqlite3.Row
            row = con.execute("SELECT * FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            if row is None:
                row = con.execute(
                    "SELECT * FROM runs WHERE run_id LIKE ? ORDER BY started_at DESC",
                    (f"{run_id}%",),
                ).fetchone()
        if row is None:
            raise RunNotFound(f"no run {run_id!r} in {self.directory} (see `python -m atlas runs`)")
        return RunRecord(**dict(row))

    def list(self, limit: int = 50) -> list[RunRecord]:
        if not self.path.exists():
            return []
        with self._db() as con:
            con.row_factory = sqlite3.Row
            rows = con.execute(
                "SELECT * FROM runs ORDER BY started_at DESC LIMIT ?", (limit,)
            ).fetchall()
        return [RunRecord(**dict(r)) for r in rows]

    def latest(self) -> RunRecord | None:
        runs = self.list(limit=1)
        return runs[0] if runs else None


def checkpoint_path(directory: Path) -> Path:
    return directory / "checkpoints.db"


@contextmanager
def sync_checkpointer(directory: Path) -> Iterator[Any]:
    from langgraph.checkpoint.sqlite import SqliteSaver

    con = connect(checkpoint_path(directory))
    try:
        saver = SqliteSaver(con)
        saver.setup()
        yield saver
    finally:
        con.close()


def spec_to_json(spec: Any) -> str:
    """The spec as a run record keeps it: no secrets.

    Provider options whose names look secret (`api_key`, `X-Gateway-Token`, `Authorization`),
    passwords in URLs, secret environment values and key-shaped strings become `[REDACTED]`.
    `resume` takes them back from the task file (see `restore_secrets`).
    """
    from atlas.tracing.redact import REDACTED, scrub_text, secret_option, secret_values

    secrets = secret_values()

    def clean(value: Any, name: str = "", option: bool = False) -> Any:
        """`option`: inside a model's free-form `params`, where names tell what is secret."""
        if isinstance(value, dict):
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
