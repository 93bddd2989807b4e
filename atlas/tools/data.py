"""Read-only SQL over the task's data files, with DuckDB.

The tables are loaded once; then external access is switched off and the configuration locked, so
a query can read no file and reach no network. Only single SELECT statements run, with a row cap,
a memory limit and a time limit.
"""

from __future__ import annotations

import re
import threading
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


def table_name(path: Path, taken: set[str]) -> str:
    base = re.sub(r"[^a-z0-9_]", "_", path.stem.lower()).strip("_") or "data"
    if base[0].isdigit():
        base = f"t_{base}"
    name, n = base, 2
    while name in taken:
        name, n = f"{base}_{n}", n + 1
    return name


@dataclass
class DataSource:
    """The task's data files as DuckDB tables."""

    paths: list[Path]
    max_rows: int = 50
    timeout_s: float = 10.0
    memory_limit: str = "512MB"
    tables: dict[str, Path] = field(default_factory=dict)
    _con: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _connect(self) -> Any:
        if self._con is not None:
            return self._con
        import duckdb

        con = duckdb.connect(":memory:")
        for path in self.paths:
            name = table_name(path, set(self.tables))
            reader = _READERS.get(path.suffix.lower(), "read_csv_auto")
            con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM {reader}(?)', [str(path)])
            self.tables[name] = path
        con.execute(f"SET memory_limit='{self.memory_limit}'")
        con.execute("SET threads=1")
        con.execute("SET enable_external_access=false")
        con.execute("SET lock_configuration=true")
        self._con = con
        return con

    def describe(self) -> str:
        with self._lock:
            con = self._connect()
            if not self.tables:
                return "No data tables are available for this task."
            lines = []
            for name in self.tables:
                cols = con.execute(f'DESCRIBE "{name}"').fetchall()
                count = con.execute(f'SELECT COUNT(*) FROM "{name}"').fetchone()[0]
                columns = ", ".join(f"{c[0]} {c[1]}" for c in cols)
                lines.append(f"table {name} ({count} rows): {columns}")
            return "\n".join(lines)

    def query(self, sql: str) -> str:
        import duckdb

        sql = sql.strip().rstrip(";").strip()
        if not sql:
            raise ToolError("empty query")
        try:
            statements = duckdb.extract_statements(sql)
        except duckdb.Error as exc:
            raise ToolError(f"SQL error: {_first_line(exc)}") from None
        if len(statements) != 1:
            raise ToolError("send exactly one SELECT statement")
        if statements[0].type != duckdb.StatementType.SELECT:
            raise ToolError("only read-only SELECT queries are allowed")
        with self._lock:
            con = self._connect()
            timer = threading.Timer(self.timeout_s, con.interrupt)
            timer.start()
            try:
                cursor = con.execute(sql)
                columns = [d[0] for d in cursor.description or []]
                rows = cursor.fetchmany(self.max_rows + 1)
            except duckdb.InterruptException:
                raise ToolError(
                    f"query took longer than {self.timeout_s:g}s and was stopped"
                ) from None
            except duckdb.Error as exc:
                raise ToolError(f"SQL error: {_first_line(exc)}") from None
            finally:
                timer.cancel()
        return format_table(columns, rows, self.max_rows)

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None


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
    return str(value)
