"""Read-only SQL over the task's data files, with DuckDB in a capped child process.

DuckDB runs in a child process (this file, run as a script) so that the limits hold for every SQL
function, not only for DuckDB's buffer manager: the child's data segment is capped with
`RLIMIT_DATA` (DuckDB's `memory_limit` plus room for the interpreter), DuckDB runs on one thread
with `memory_limit` set, and the parent stops a query that runs past `timeout_s` (DuckDB is
interrupted first; a child that does not answer is killed). After a query ran out of memory or
was killed, the next one starts a fresh child, which loads the tables again.

The tables are loaded one file at a time; then external access is switched off and the
configuration locked, so a query can read no file and reach no network. Only single SELECT
statements run, with a row cap. A data file that cannot be read is named and skipped, and the
good tables stay (`describe()` lists both; `check_data_files` finds the cheap cases without
starting DuckDB).
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atlas.errors import ToolError

_READERS = {
    ".csv": "read_csv_auto",
    ".tsv": "read_csv_auto",
    ".parquet": "read_parquet",
    ".json": "read_json_auto",
    ".jsonl": "read_json_auto",
}

_HEADROOM_BYTES = 512 * 2**20
"""What the child may use beyond DuckDB's memory_limit: the interpreter and DuckDB's own code take
about 110 MB of data segment; the rest is for allocations outside the buffer manager."""
_KILL_GRACE_S = 1.0
"""How long past `timeout_s` the parent waits for the interrupted child before killing it."""
_START_TIMEOUT_S = 60.0
_MAX_CELL = 1000
_MAX_TEXT = 100_000
_SNIFF_BYTES = 64 * 1024
_JSON_PARSE_WHOLE = 2 * 2**20


def table_name(path: Path, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9_]", "_", path.stem.lower()).strip("_") or "data"
    if base[0].isdigit():
        base = f"t_{base}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    return name


# ----------------------------------------------------------------------------- cheap file checks


def check_data_files(paths: Iterable[Path]) -> list[tuple[Path, str]]:
    """The data files that cannot be loaded, each with a one-line reason, found without DuckDB:
    missing or empty files, Parquet files without their magic bytes, CSV/TSV that is not UTF-8
    text, JSON that does not parse. A file that passes may still fail to load (DuckDB reads all
    of it); `DataSource.describe()` names those too."""
    problems = []
    for path in paths:
        reason = _check_file(Path(path))
        if reason:
            problems.append((Path(path), reason))
    return problems


def _check_file(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        if path.is_dir():
            return "is a directory, not a data file"
        if size == 0:
            return "empty file"
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
            tail = b""
            if size >= 8:
                fh.seek(size - 8)
                tail = fh.read(8)
    except FileNotFoundError:
        return "file not found"
    except OSError as exc:
        return f"cannot read it: {exc.strerror or type(exc).__name__}"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _check_parquet(head, tail, size)
    text_problem = _check_text(head, truncated=size > len(head))
    if text_problem:
        return text_problem
    if suffix in (".json", ".jsonl"):
        return _check_json(path, head, size, lines=suffix == ".jsonl")
    return None


def _check_parquet(head: bytes, tail: bytes, size: int) -> str | None:
    if size < 12 or head[:4] != b"PAR1" or tail[4:] != b"PAR1":
        return "not a Parquet file (no PAR1 magic bytes at both ends)"
    footer = int.from_bytes(tail[:4], "little")
    if footer <= 0 or footer > size - 12:
        return "not a complete Parquet file (its footer length is wrong)"
    return None


def _check_text(head: bytes, *, truncated: bool) -> str | None:
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the sniff's end is not a fault of the file.
        if not (
            truncated and exc.start >= len(head) - 3 and exc.reason == "unexpected end of data"
        ):
            return f"not UTF-8 text (bad byte at offset {exc.start})"
    return None


def _check_json(path: Path, head: bytes, size: int, *, lines: bool) -> str | None:
    text = head.decode("utf-8", errors="ignore")
    if not text.strip():
        return "no JSON in the file (only blank space)"
    if not lines and size <= _JSON_PARSE_WHOLE:
        whole = path.read_text(encoding="utf-8", errors="replace")
        try:
            json.loads(whole)
            return None
        except ValueError:
            text = whole  # DuckDB also reads newline-delimited JSON from a .json file
        return _check_json_lines(text, complete=True, kind="JSON")
    if not lines:
        first = text.lstrip()[:1]
        return None if first in ("{", "[") else "not JSON (it does not start with { or [)"
    return _check_json_lines(text, complete=size <= len(head), kind="JSON Lines")


def _check_json_lines(text: str, *, complete: bool, kind: str) -> str | None:
    lines = text.splitlines()
    if not complete:
        lines = lines[:-1]  # the last line of a sniff may be cut
    for number, line in enumerate(lines[:50], start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except ValueError as exc:
            message = str(exc).split(":")[0]
            return f"not {kind} (line {number}: {message})"
    return None


# ----------------------------------------------------------------------------- the parent side


def _parse_bytes(text: str) -> int:
    units = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
             "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
             "tib": 2**40}  # fmt: skip
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not match or match.group(2).lower() not in units:
        raise ValueError(f"memory_limit {text!r} is not a size such as '512MB'")
    return int(float(match.group(1)) * units[match.group(2).lower()])


class _NoAnswer(Exception):
    """The child gave no answer: it timed out (and was killed) or died."""

    def __init__(self, timed_out: bool, returncode: int | None) -> None:
        super().__init__("timed out" if timed_out else f"exited with {returncode}")
        self.timed_out = timed_out
        self.returncode = returncode


class _Spawner:
    """Starts children from one long-lived daemon thread. PR_SET_PDEATHSIG fires when the
    *thread* that forked the child ends, so a child started from a short-lived worker thread
    would die with that thread; this one lives as long as the process."""

    def __init__(self) -> None:
        self._requests: queue.SimpleQueue[tuple[list[str], dict[str, str], queue.SimpleQueue[Any]]]
        self._requests = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def popen(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._serve, name="atlas-sql-spawner", daemon=True
                )
                self._thread.start()
        box: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._requests.put((argv, env, box))
        result = box.get()
        if isinstance(result, BaseException):
            raise result
        proc: subprocess.Popen[bytes] = result
        return proc

    def _serve(self) -> None:
        while True:
            argv, env, box = self._requests.get()
            try:
                box.put(
                    subprocess.Popen(
                        argv,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.DEVNULL,
                        env=env,
                        close_fds=True,
                    )
                )
            except OSError as exc:
                box.put(exc)


_SPAWNER = _Spawner()


class _Child:
    """One DuckDB child process and its line-delimited JSON pipe."""

    def __init__(self, config: dict[str, Any]) -> None:
        env = dict(os.environ)
        # The child imports what the parent imports (the same duckdb, atlas from a source tree).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isabs(p))
        argv = [sys.executable, "-P", os.path.abspath(__file__), json.dumps(config)]
        self.proc = _SPAWNER.popen(argv, env)
        self._buffer = b""
        # A DataSource dropped without close() (or alive at exit) does not leave its child.
        weakref.finalize(self, _reap, self.proc)

    def hello(self) -> dict[str, Any]:
        return self._read(_START_TIMEOUT_S)

    def request(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        stdin = self.proc.stdin
        if stdin is None:
            raise _NoAnswer(False, self.proc.poll())
        try:
            stdin.write(json.dumps(message).encode() + b"\n")
            stdin.flush()
        except OSError:
            self.kill()
            raise _NoAnswer(False, self.proc.returncode) from None
        return self._read(timeout)

    def _read(self, timeout: float) -> dict[str, Any]:
        stdout = self.proc.stdout
        if stdout is None:
            raise _NoAnswer(False, self.proc.poll())
        fd = stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.kill()
                raise _NoAnswer(True, self.proc.returncode)
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                self.kill()
                raise _NoAnswer(False, self.proc.returncode)
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        return answer

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        _reap(self.proc)

    def stop(self) -> None:
        """Close the pipe (the child exits at end of input); kill it if it has not within 2 s."""
        self._close_pipes()
        try:
            self.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self.kill()

    def _close_pipes(self) -> None:
        _close_pipes(self.proc)


def _close_pipes(proc: subprocess.Popen[bytes]) -> None:
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def _reap(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    _close_pipes(proc)


@dataclass
class DataSource:
    """The task's data files as DuckDB tables, queried in a capped child process."""

    paths: list[Path]
    max_rows: int = 50
    timeout_s: float = 10.0
    """Wall-clock limit for one query; past it DuckDB is interrupted, or its process killed."""
    memory_limit: str = "512MB"
    """DuckDB's memory limit; the child process may use this plus 512 MiB in all."""
    root: Path | None = None
    """Skipped files are named relative to this folder (the task's); None: by file name."""
    load_timeout_s: float = 60.0
    """Wall-clock limit for loading one data file."""
    tables: dict[str, Path] = field(default_factory=dict)
    """The tables that loaded, by name (filled on first use)."""
    skipped: dict[Path, str] = field(default_factory=dict)
    """The data files that could not be loaded, each with a one-line reason."""
    _planned: list[tuple[str, Path]] | None = field(default=None, repr=False)
    _child: _Child | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        self._limit_bytes = _parse_bytes(self.memory_limit)

    @property
    def engine_pid(self) -> int | None:
        """The process id of the DuckDB child while one runs (for diagnostics and tests)."""
        child = self._child
        return child.proc.pid if child is not None and child.alive() else None

    @property
    def process_cap_bytes(self) -> int:
        """The child's data-segment limit (RLIMIT_DATA)."""
        return self._limit_bytes + _HEADROOM_BYTES

    # -- the child's life

    def _engine(self) -> _Child:
        """The running child, started (and the tables loaded) if there is none."""
        if self._child is not None and self._child.alive():
            return self._child
        self._child = None
        if self._planned is None:
            self._plan()
        planned = self._planned if self._planned is not None else []
        while True:
            child = self._start()
            if self._load(child, planned):
                break
        answer = self._ask(child, {"op": "seal"}, _START_TIMEOUT_S)
        if not answer.get("ok"):
            child.kill()
            raise ToolError(f"the SQL engine could not start: {answer.get('error')}")
        self._child = child
        return child

    def _plan(self) -> None:
        """Name the tables of the files that pass the cheap checks; skip the others."""
        bad = dict(check_data_files(self.paths))
        planned: list[tuple[str, Path]] = []
        taken: set[str] = set()
        for path in self.paths:
            if path in bad:
                self.skipped[path] = bad[path]
                continue
            name = table_name(path, taken)
            taken.add(name)
            planned.append((name, path))
        self._planned = planned

    def _start(self) -> _Child:
        config = {
            "ppid": os.getpid(),
            "data_bytes": self.process_cap_bytes,
            "memory_limit": self.memory_limit,
            "timeout_s": self.timeout_s,
            "load_timeout_s": self.load_timeout_s,
            "max_rows": self.max_rows,
        }
        try:
            child = _Child(config)
        except OSError as exc:
            raise ToolError(f"the SQL engine could not start: {exc}") from None
        try:
            answer = child.hello()
        except _NoAnswer as exc:
            raise ToolError(f"the SQL engine could not start: it {exc}") from None
        if not answer.get("ok"):
            child.kill()
            raise ToolError(f"the SQL engine could not start: {answer.get('error')}")
        return child

    def _load(self, child: _Child, planned: list[tuple[str, Path]]) -> bool:
        """Load the planned tables into `child`. False when the child had to be dropped (a file
        ran out of memory, took too long or crashed it): that file is skipped, and the caller
        starts a fresh child for the rest."""
        for name, path in list(planned):
            message = {
                "op": "load",
                "name": name,
                "path": os.path.abspath(path),
                "reader": _READERS.get(path.suffix.lower(), "read_csv_auto"),
            }
            try:
                answer = child.request(message, self.load_timeout_s + _KILL_GRACE_S)
            except _NoAnswer as exc:
                answer = {
                    "ok": False,
                    "kind": "timeout" if exc.timed_out else "crash",
                    "error": f"exit {exc.returncode}",
                }
            if answer.get("ok"):
                self.tables[name] = path
                continue
            planned.remove((name, path))
            self.tables.pop(name, None)
            self.skipped[path] = self._load_reason(path, answer)
            if answer.get("kind") in ("oom", "timeout", "crash", "fatal"):
                child.kill()
                return False
        return True

    def _load_reason(self, path: Path, answer: dict[str, Any]) -> str:
        kind = answer.get("kind")
        if kind == "oom":
            return f"loading it needed more memory than the {self.memory_limit} limit"
        if kind == "timeout":
            return f"loading it took longer than {self.load_timeout_s:g}s"
        if kind == "crash":
            return f"loading it stopped the SQL engine ({answer.get('error')})"
        error = str(answer.get("error") or "could not be read")
        error = error.replace(os.path.abspath(path), self._display(path))
        return error[:200]

    def _ask(self, child: _Child, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        try:
            return child.request(message, timeout)
        except _NoAnswer as exc:
            self._child = None
            raise ToolError(f"the SQL engine stopped: it {exc}") from None

    def _drop(self) -> None:
        if self._child is not None:
            self._child.kill()
            self._child = None

    def _display(self, path: Path) -> str:
        if self.root is not None:
            with contextlib.suppress(ValueError):
                return (
                    Path(os.path.abspath(path)).relative_to(os.path.abspath(self.root)).as_posix()
                )
        return path.name

    # -- the tool's calls

    def describe(self) -> str:
        with self._lock:
            if not self.paths:
                return "No data tables are available for this task."
            child = self._engine()
            lines = []
            if self.tables:
                answer = self._ask(
                    child, {"op": "describe", "names": list(self.tables)}, self.load_timeout_s
                )
                if not answer.get("ok"):
                    raise ToolError(f"SQL error: {answer.get('error')}")
                for name, count, columns in answer["tables"]:
                    lines.append(f"table {name} ({count} rows): {columns}")
            else:
                lines.append("No data tables are available for this task.")
            for path, reason in self.skipped.items():
                lines.append(f"skipped {self._display(path)}: {reason}")
            return "\n".join(lines)

    def query(self, sql: str) -> str:
        sql = sql.strip().rstrip(";").strip()
        if not sql:
            raise ToolError("empty query")
        with self._lock:
            child = self._engine()
            try:
                answer = child.request({"op": "query", "sql": sql}, self.timeout_s + _KILL_GRACE_S)
            except _NoAnswer as exc:
                self._child = None
                if exc.timed_out:
                    raise ToolError(self._timeout_message()) from None
                raise ToolError(
                    f"Out of Memory: the query stopped the SQL engine (exit {exc.returncode}); "
                    f"most likely it needed more memory than the {self.memory_limit} limit"
                ) from None
            if answer.get("ok"):
                text: str = answer["text"]
                return text
            kind = answer.get("kind")
            if kind in ("oom", "fatal"):
                self._drop()  # a fresh child for the next query, with all its memory back
            if kind == "oom":
                raise ToolError(
                    f"Out of Memory: the query needed more memory than the {self.memory_limit} "
                    "limit and was stopped"
                )
            if kind == "timeout":
                raise ToolError(self._timeout_message())
            if kind == "refused":
                raise ToolError(str(answer.get("error")))
            raise ToolError(f"SQL error: {answer.get('error')}")

    def _timeout_message(self) -> str:
        return f"query took longer than {self.timeout_s:g}s and was stopped"

    def close(self) -> None:
        with self._lock:
            if self._child is not None:
                self._child.stop()
                self._child = None


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


def format_table(columns: list[str], rows: list[tuple[Any, ...]], max_rows: int) -> str:
    if not columns:
        return "(no result)"
    shown = rows[:max_rows]
    out = [" | ".join(columns)]
    out += [" | ".join(_cell(v) for v in row) for row in shown]
    if len(rows) > max_rows:
        out.append(f"... (more than {max_rows} rows; add LIMIT or aggregate)")
    if not shown:
        out.append("(0 rows)")
    return "\n".join(out)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    text = str(value)
    if len(text) > _MAX_CELL:
        return f"{text[:_MAX_CELL]}... [{len(text) - _MAX_CELL} more characters]"
    return text


# ----------------------------------------------------------------------------- the child side
# Run as `python -P data.py CONFIG`. It imports only the standard library and duckdb (plus
# atlas.errors, which is small), answers one JSON line per request line, and exits at end of input.


def _child_main(config: dict[str, Any]) -> int:
    import ctypes
    import resource

    # Die with the parent even if it is SIGKILLed; if it died before this line, stop now.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != config["ppid"]:
        return 1
    cap = int(config["data_bytes"])
    resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    # Stray prints from DuckDB go to stderr; the answers go to our own copy of stdout.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)

    def send(answer: dict[str, Any]) -> None:
        out.write(json.dumps(answer, default=str).encode() + b"\n")
        out.flush()

    try:
        import duckdb

        con = duckdb.connect(":memory:")
        con.execute(f"SET memory_limit='{config['memory_limit']}'")
        con.execute("SET threads=1")
        con.execute("SET temp_directory=''")  # never spill to disk
        con.execute("SET autoinstall_known_extensions=false")
    except Exception as exc:  # the parent reports it in one line
        send({"ok": False, "error": _first_line(exc)})
        return 1
    send({"ok": True, "pid": os.getpid()})
    engine = _ChildEngine(con, config)
    for line in sys.stdin.buffer:
        try:
            send(engine.handle(json.loads(line)))
        except MemoryError:
            send({"ok": False, "kind": "oom", "error": "out of memory"})
    return 0


class _ChildEngine:
    def __init__(self, con: Any, config: dict[str, Any]) -> None:
        self.con = con
        self.timeout_s = float(config["timeout_s"])
        self.load_timeout_s = float(config["load_timeout_s"])
        self.max_rows = int(config["max_rows"])

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        if op == "load":
            sql = f'CREATE TABLE "{request["name"]}" AS SELECT * FROM {request["reader"]}(?)'
            return self._run(lambda: self.con.execute(sql, [request["path"]]), self.load_timeout_s)
        if op == "seal":
            self.con.execute("SET enable_external_access=false")
            self.con.execute("SET lock_configuration=true")
            return {"ok": True}
        if op == "describe":
            return self._run(
                lambda: {"tables": self._describe(request["names"])}, self.load_timeout_s
            )
        if op == "query":
            return self._query(str(request["sql"]))
        return {"ok": False, "kind": "refused", "error": f"unknown request {op!r}"}

    def _describe(self, names: list[str]) -> list[tuple[str, int, str]]:
        tables = []
        for name in names:
            cols = self.con.execute(f'DESCRIBE "{name}"').fetchall()
            count = self.con.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0]
            tables.append((name, count, ", ".join(f"{c[0]} {c[1]}" for c in cols)))
        return tables

    def _query(self, sql: str) -> dict[str, Any]:
        import duckdb

        try:
            statements = duckdb.extract_statements(sql)
        except duckdb.Error as exc:
            return {"ok": False, "kind": "sql", "error": _first_line(exc)}
        if len(statements) != 1:
            return {"ok": False, "kind": "refused", "error": "send exactly one SELECT statement"}
        if statements[0].type != duckdb.StatementType.SELECT:
            return {
                "ok": False,
                "kind": "refused",
                "error": "only read-only SELECT queries are allowed",
            }

        def run() -> dict[str, Any]:
            cursor = self.con.execute(sql)
            columns = [d[0] for d in cursor.description or []]
            rows = cursor.fetchmany(self.max_rows + 1)
            text = format_table(columns, rows, self.max_rows)
            if len(text) > _MAX_TEXT:
                text = text[:_MAX_TEXT] + f"\n... [{len(text) - _MAX_TEXT} more characters cut]"
            return {"text": text}

        return self._run(run, self.timeout_s)

    def _run(self, work: Any, timeout: float) -> dict[str, Any]:
        import duckdb

        timer = threading.Timer(timeout, self.con.interrupt)
        timer.start()
        try:
            result = work()
        except duckdb.InterruptException:
            return {"ok": False, "kind": "timeout", "error": "interrupted"}
        except (duckdb.OutOfMemoryException, MemoryError):
            return {"ok": False, "kind": "oom", "error": "out of memory"}
        except (duckdb.FatalException, duckdb.InternalException) as exc:
            return {"ok": False, "kind": "fatal", "error": _first_line(exc)}
        except duckdb.Error as exc:
            return {"ok": False, "kind": "sql", "error": _first_line(exc)}
        finally:
            timer.cancel()
        answer = {"ok": True}
        if isinstance(result, dict):
            answer.update(result)
        return answer


if __name__ == "__main__":
    sys.exit(_child_main(json.loads(sys.argv[1])))
