"""The analysis tool's SQL sandbox: DuckDB runs in a capped child process, so the memory and time
limits hold for every SQL function; a bad data file is named and skipped, the good tables stay."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from atlas.errors import ToolError
from atlas.tools.data import DataSource, check_data_files
from tests.conftest import EXAMPLES

DATA = sorted((EXAMPLES / "quickstart" / "data").glob("*.csv"))
ROOT = Path(__file__).resolve().parents[1]


def _gone(pid: int) -> bool:
    """The process has exited (reaped, or a zombie nobody reaped yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


def _rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


class _PeakRss:
    """Samples a process's resident memory every 10 ms while a query runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak = pid, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss = _rss_bytes(self.pid)
            if rss is None:
                return
            self.peak = max(self.peak, rss)
            time.sleep(0.01)

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def data() -> Iterator[DataSource]:
    source = DataSource(DATA)
    yield source
    source.close()


@pytest.fixture(scope="module")
def shared_data() -> Iterator[DataSource]:
    source = DataSource(DATA)
    yield source
    source.close()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT length(repeat('x', 3000000000))",
        "SELECT len(list(range)) FROM range(100000000)",
        "SELECT length(string_agg(repeat('x', 1000), ',')) FROM range(3000000)",
    ],
    ids=["repeat", "list-of-range", "string_agg"],
)
def test_memory_hungry_functions_are_stopped_at_the_process_cap(data: DataSource, sql: str) -> None:
    """Before, repeat('x', 3e9) grew the process to 5.8 GB and ran 21 s against a 10 s limit:
    DuckDB's memory_limit does not cover string functions. Now the whole DuckDB process is
    capped, the model gets a one-line out-of-memory message, and the next query works."""
    assert "table stations (5 rows)" in data.describe()
    pid = data.engine_pid
    assert pid is not None and pid != os.getpid()
    limits = Path(f"/proc/{pid}/limits").read_text()
    (data_line,) = [line for line in limits.splitlines() if line.startswith("Max data size")]
    assert data_line.split()[3] == str(data.process_cap_bytes)
    started = time.monotonic()
    with _PeakRss(pid) as rss, pytest.raises(ToolError) as err:
        data.query(sql)
    elapsed = time.monotonic() - started
    assert str(err.value) == (
        "Out of Memory: the query needed more memory than the 512MB limit and was stopped"
    )
    assert elapsed < data.timeout_s + 3
    assert 0 < rss.peak < data.process_cap_bytes
    out = data.query("SELECT COUNT(*) AS n FROM trips_by_month")
    assert out.splitlines() == ["n", "30"]


def test_a_query_that_runs_forever_is_stopped_and_the_next_works() -> None:
    data = DataSource(DATA, timeout_s=1.0)
    try:
        data.describe()  # the child is up: what follows times the queries alone
        for sql in (
            "SELECT COUNT(*) FROM range(100000000000) a, range(1000) b",  # DuckDB interrupts it
            "SELECT md5(repeat('x', 400000000))",  # not interruptible: the child is killed
        ):
            started = time.monotonic()
            with pytest.raises(ToolError, match=r"^query took longer than 1s and was stopped$"):
                data.query(sql)
            assert time.monotonic() - started < data.timeout_s + 2
            assert data.query("SELECT COUNT(*) AS n FROM stations").splitlines() == ["n", "5"]
    finally:
        data.close()


def test_a_child_killed_between_queries_is_replaced(data: DataSource) -> None:
    data.query("SELECT 1")
    pid = data.engine_pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    assert _wait_gone(pid, 5)
    # /proc shows the main thread a zombie while the child's other threads may still be exiting;
    # only then can the parent see the exit. Wait for that: "between queries" means it is dead.
    deadline = time.monotonic() + 5
    while data.engine_pid is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert data.engine_pid is None
    assert data.query("SELECT COUNT(*) AS n FROM stations").splitlines() == ["n", "5"]
    assert data.engine_pid not in (None, pid)


@pytest.mark.parametrize(
    "sql",
    [
        "SET memory_limit='100GB'",
        "SET threads=8",
        "SET enable_external_access=true",
        "RESET memory_limit",
        "PRAGMA threads=4",
        "SELECT * FROM read_csv_auto('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "COPY stations TO '/tmp/atlas-leak.csv'",
        "ATTACH '/tmp/atlas-x.db'",
        "SELECT 1; SET threads=8",
    ],
)
def test_sql_cannot_lift_the_limits(shared_data: DataSource, sql: str) -> None:
    with pytest.raises(ToolError):
        shared_data.query(sql)
    settings = shared_data.query(
        "SELECT current_setting('threads') AS t, current_setting('memory_limit') AS m, "
        "current_setting('enable_external_access') AS e"
    )
    assert settings.splitlines()[1] == "1 | 488.2 MiB | False"
    assert not Path("/tmp/atlas-leak.csv").exists()


def _bad_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    folder = tmp_path / "data"
    folder.mkdir()
    good = folder / "stations.csv"
    shutil.copy(EXAMPLES / "quickstart" / "data" / "stations.csv", good)
    parquet = folder / "bad.parquet"
    parquet.write_bytes(b"this was never a parquet file\n" * 20)
    garbage = folder / "garbage.csv"
    garbage.write_bytes(bytes(range(256)) * 40)
    return good, parquet, garbage


def test_a_bad_data_file_is_named_and_skipped_and_the_good_tables_stay(tmp_path: Path) -> None:
    """Before, one corrupt parquet or garbage CSV made every table unavailable."""
    good, parquet, garbage = _bad_files(tmp_path)
    data = DataSource([parquet, good, garbage], root=tmp_path)
    try:
        lines = data.describe().splitlines()
        assert lines[0].startswith("table stations (5 rows): station_id VARCHAR")
        assert lines[1:] == [
            "skipped data/bad.parquet: not a Parquet file (no PAR1 magic bytes at both ends)",
            "skipped data/garbage.csv: not UTF-8 text (bad byte at offset 128)",
        ]
        assert list(data.tables) == ["stations"]
        out = data.query("SELECT name FROM stations WHERE station_id = 'S1'")
        assert out.splitlines() == ["name", "Central Station"]
    finally:
        data.close()


def test_check_data_files_names_exactly_the_bad_files(tmp_path: Path) -> None:
    good, parquet, garbage = _bad_files(tmp_path)
    problems = check_data_files([parquet, good, garbage, *DATA])
    assert [path for path, _ in problems] == [parquet, garbage]
    assert all(reason and "\n" not in reason for _, reason in problems)
    assert check_data_files(DATA) == []


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.csv", b"", "empty file"),
        ("cut.parquet", b"PAR1" + b"\0" * 40 + (10**6).to_bytes(4, "little") + b"PAR1", "footer"),
        ("bad.jsonl", b'{"a": 1}\n{"a": \n{"a": 3}\n', "not JSON Lines (line 2"),
        ("bad.json", b"hello world", "not JSON (line 1: Expecting value)"),
        ("latin1.tsv", "a\tb\nZürich\t1\n".encode("latin-1"), "not UTF-8 text"),
    ],
)
def test_check_data_files_reasons(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    ((found, why),) = check_data_files([path, *DATA])
    assert found == path and reason in why
    missing = tmp_path / "missing.csv"
    assert check_data_files([missing]) == [(missing, "file not found")]


def test_good_json_files_pass_the_check_and_load(tmp_path: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"a": 1, "b": "x"}\n{"a": 2, "b": "y"}\n')
    array = tmp_path / "array.json"
    array.write_text('[{"a": 1}, {"a": 2}, {"a": 3}]')
    assert check_data_files([rows, array]) == []
    data = DataSource([rows, array])
    try:
        text = data.describe()
        assert "table rows (2 rows)" in text and "table array (3 rows)" in text
    finally:
        data.close()


def test_a_file_duckdb_cannot_read_is_skipped_with_its_reason(tmp_path: Path) -> None:
    """The cheap checks pass (magic bytes at both ends), DuckDB fails on the footer: the file is
    named with DuckDB's reason, without the absolute path, and the other table stays."""
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1" + b"\x07" * 64 + (16).to_bytes(4, "little") + b"PAR1")
    assert check_data_files([broken]) == []
    data = DataSource([broken, DATA[0]])
    try:
        lines = data.describe().splitlines()
        assert lines[0].startswith("table stations (5 rows)")
        assert lines[1].startswith("skipped broken.parquet: ")
        assert str(tmp_path) not in lines[1] and len(lines) == 2
    finally:
        data.close()


def test_queries_from_many_threads_share_one_child(data: DataSource) -> None:
    results: list[str] = []
    pids: set[int | None] = set()

    def ask(n: int) -> None:
        for _ in range(5):
            results.append(data.query(f"SELECT {n} + COUNT(*) AS v FROM stations"))
            pids.add(data.engine_pid)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = sorted(str(5 + n) for n in range(4) for _ in range(5))
    assert sorted(r.splitlines()[1] for r in results) == expected
    assert len(pids) == 1


def test_close_stops_the_child(data: DataSource) -> None:
    data.query("SELECT 1")
    pid = data.engine_pid
    assert pid is not None
    data.close()
    assert _wait_gone(pid, 3)
    assert data.engine_pid is None


_ORPHAN_SCRIPT = """
import sys, threading, time
from pathlib import Path
from atlas.tools.data import DataSource

RUNAWAY = "SELECT COUNT(*) FROM range(100000000000) a, range(1000) b"
data = DataSource([Path(p) for p in sys.argv[1:]], timeout_s=120)
# Started from a worker thread that then ends: the child must outlive that thread.
worker = threading.Thread(target=data.query, args=("SELECT 1",))
worker.start()
worker.join()
time.sleep(0.5)
print(data.engine_pid, data.query("SELECT COUNT(*) AS n FROM stations").splitlines()[1], flush=True)
# Busy when the parent is killed: the child does not just see its input close.
threading.Thread(target=data.query, args=(RUNAWAY,), daemon=True).start()
time.sleep(0.5)
print(data.engine_pid, flush=True)
time.sleep(60)
"""


def test_a_killed_parent_leaves_no_child() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _ORPHAN_SCRIPT, *map(str, DATA)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        first_pid, count = proc.stdout.readline().split()
        assert count == "5"
        assert proc.stdout.readline().strip() == first_pid
        pid = int(first_pid)
        assert not _gone(pid)
        time.sleep(0.3)
        assert Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "R"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        assert _wait_gone(pid, 5), "the DuckDB child outlived its SIGKILLed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
