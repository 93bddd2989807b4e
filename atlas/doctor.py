"""`python -m atlas doctor [TASK]`: check every server the task (or, without one, the
environment) is configured to use, one line each (`atlas.stack`); then the state directory's
databases, moving corrupt ones aside.

Each of `runs.db`, `checkpoints.db` and `mlflow.db` is checked with `PRAGMA quick_check` on a
read-only connection. A corrupt file is only reported, unless `--yes` is given: then it is
renamed to `<name>.corrupt-<timestamp>` (with its `-wal` and `-shm` files, so the copy stays
openable), and the rows of `runs.db` that can still be read are copied into a new `runs.db`.
Nothing else is touched: the runs' folders, memory and the other databases stay as they are.

Exit code 0 when every file is fine or was repaired, 1 when a problem is left.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas.errors import StateError
from atlas.runs import RunRecord, RunStore, connect_readonly, guard_state, state_dir

FILES = ("runs.db", "checkpoints.db", "mlflow.db")
"""The SQLite files ATLAS keeps in a state directory (the MLflow store when tracing is local)."""

_AFTER_MOVE = {
    "runs.db": "",
    "checkpoints.db": "; interrupted runs whose checkpoints it held start over when resumed",
    "mlflow.db": "; earlier traces stay in the moved file, the next traced run starts a new store",
}

_PROBE_LIMIT = 100_000
"""Row ids tried one by one past a damaged page of runs.db (a run is one row)."""


@dataclass
class Finding:
    name: str
    """The file's name in the state directory."""
    path: Path
    status: str
    """`ok`, `missing`, `corrupt` (doctor can move it aside) or `unusable` (a directory, or
    unreadable: the user has to fix it)."""
    detail: str = ""


def add_parser(sub: Any, state: Any) -> None:
    doctor = sub.add_parser(
        "doctor",
        help="check every configured server and the state directory's databases; move corrupt "
        "ones aside",
    )
    doctor.add_argument(
        "file",
        nargs="?",
        metavar="TASK",
        help="task YAML file whose servers to check (default: the environment's)",
    )
    doctor.add_argument("--tracking-uri", metavar="URI", help="as for run")
    doctor.add_argument(
        "--yes",
        action="store_true",
        help="move corrupt files aside and keep the readable runs (default: only report)",
    )
    state(doctor)


def run(args: argparse.Namespace) -> int:
    from atlas.spec import load_task
    from atlas.stack import check_stack, default_spec

    directory = state_dir(args.state_dir)
    spec = load_task(args.file) if getattr(args, "file", None) else default_spec()
    problems = 0
    for part in check_stack(spec, directory, getattr(args, "tracking_uri", None)):
        print(part.line())
        problems += part.problem is not None
    if not directory.is_dir():
        print(f"no state in {directory}: no database files to check")
        return 1 if problems else 0
    for finding in (check(directory / name) for name in FILES):
        if finding.status in ("ok", "missing"):
            print(f"{finding.name}: {'ok' if finding.status == 'ok' else 'not there'}")
            continue
        if finding.status == "unusable" or not args.yes:
            hint = "; run `python -m atlas doctor --yes` to move it aside" * (
                finding.status == "corrupt"
            )
            print(f"{finding.name}: {finding.status}: {finding.detail}{hint}")
            problems += 1
            continue
        print(f"{finding.name}: corrupt: {finding.detail}")
        for line in repair(finding):
            print(f"{finding.name}: {line}")
    return 1 if problems else 0


def check(path: Path) -> Finding:
    """What `PRAGMA quick_check` (on a read-only connection) says of one file."""
    name = path.name
    if not path.exists() and not path.is_symlink():
        return Finding(name, path, "missing")
    if path.is_dir():
        return Finding(name, path, "unusable", f"{path} is a directory, not a database file")
    if not os.access(path, os.R_OK):
        return Finding(name, path, "unusable", f"{path} cannot be read (permission denied)")
    try:
        con = connect_readonly(path)
        try:
            with guard_state(path):
                rows = [str(r[0]) for r in con.execute("PRAGMA quick_check").fetchall()]
        finally:
            con.close()
    except StateError as exc:
        if exc.corrupt:
            return Finding(name, path, "corrupt", _cause(exc))
        return Finding(name, path, "unusable", str(exc))
    if rows == ["ok"]:
        return Finding(name, path, "ok")
    more = f" (and {len(rows) - 1} more problems)" if len(rows) > 1 else ""
    return Finding(name, path, "corrupt", f"{rows[0]}{more}")


def _cause(exc: StateError) -> str:
    cause = exc.__cause__
    return str(cause) if cause is not None else str(exc)


def repair(finding: Finding) -> Iterator[str]:
    """Move a corrupt file aside; for runs.db, copy the readable runs into a new one. Yields
    one line per action."""
    aside = move_aside(finding.path)
    yield f"moved aside to {aside}{_AFTER_MOVE.get(finding.name, '')}"
    if finding.name != "runs.db":
        return
    records, unreadable = salvage_runs(aside)
    kept = RunStore(finding.path.parent).restore(records)
    lost = f", {unreadable} unreadable" if unreadable else ""
    yield f"kept {kept} readable runs in a new {finding.path}{lost}"


def move_aside(path: Path) -> Path:
    """Rename `path` and its `-wal`/`-shm` files to `<name>.corrupt-<UTC time>[-n]`. The side
    files go first, so a process opening the database meanwhile never pairs the old WAL with a
    new file."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while any(_with(target, s).exists() for s in ("", "-wal", "-shm")):
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    for suffix in ("-wal", "-shm", ""):
        source = _with(path, suffix)
        if source.exists():
            os.replace(source, _with(target, suffix))
    return target


def _with(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def salvage_runs(path: Path) -> tuple[list[RunRecord], int]:
    """The run records that can still be read from a damaged runs.db, and how many rows could
    not be read (as far as the row ids tell; 0 when nothing is known).

    The table is read forwards and backwards until each hits damage, then the row ids in
    between are tried one by one: a damaged page loses only the rows on it."""
    try:
        con = connect_readonly(path)
    except StateError:
        return [], 0
    found: dict[int, dict[str, Any]] = {}
    try:
        con.row_factory = sqlite3.Row
        for order in ("ASC", "DESC"):
            _scan(con, f"SELECT rowid AS _rowid_, * FROM runs ORDER BY rowid {order}", (), found)
        top = _max_rowid(con, found)
        failed = 0
        for rowid in range(1, min(top, _PROBE_LIMIT) + 1):
            if rowid in found:
                continue
            if not _scan(
                con, "SELECT rowid AS _rowid_, * FROM runs WHERE rowid = ?", (rowid,), found
            ):
                failed += 1
    finally:
        con.close()
    records = [r for r in (_as_record(row) for row in found.values()) if r is not None]
    return records, failed + (len(found) - len(records))


def _scan(
    con: sqlite3.Connection, sql: str, params: tuple[Any, ...], found: dict[int, dict[str, Any]]
) -> bool:
    """Add the rows a query returns before it hits damage; False if it failed."""
    try:
        cursor = con.execute(sql, params)
        for row in cursor:
            data = dict(row)
            found[int(data.pop("_rowid_"))] = data
    except sqlite3.DatabaseError:
        return False
    return True


def _max_rowid(con: sqlite3.Connection, found: dict[int, dict[str, Any]]) -> int:
    try:
        (top,) = con.execute("SELECT max(rowid) FROM runs").fetchone()
    except sqlite3.DatabaseError:
        top = None
    return int(top) if top is not None else max(found, default=0)


def _as_record(row: dict[str, Any]) -> RunRecord | None:
    """A record from a salvaged row, or None when its required fields did not survive."""
    names = RunRecord.__dataclass_fields__
    data = {k: v for k, v in row.items() if k in names}
    required = ("run_id", "spec_json", "status", "started_at")
    if any(data.get(k) is None for k in required):
        return None
    try:
        return RunRecord(**data)
    except TypeError:
        return None
