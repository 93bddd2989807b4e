"""The state directory: corrupt and read-only files, run ids, `atlas doctor`.

A corrupt database is named in a one-line error and `atlas doctor` moves it aside, keeping what
can be read; reading commands work on read-only state and create nothing; a run id is an exact
id or a unique prefix, never a pattern.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from atlas.errors import AmbiguousRun, RunNotFound
from atlas.runs import RunRecord, RunStore, connect_readonly, matched_prefix, sync_checkpointer
from tests.conftest import EXAMPLES, ROOT, atlas_cli

# --- helpers -----------------------------------------------------------------------------------


def _record(run_id: str, started: float, spec_json: str = '{"task": "x"}') -> RunRecord:
    return RunRecord(
        run_id=run_id,
        name="seeded",
        task_file=None,
        spec_json=spec_json,
        model="scripted",
        status="passed",
        started_at=started,
    )


def _seed(state: Path, ids: list[str], spec_json: str = '{"task": "x"}') -> None:
    """Run records, each with its run folder, a memory folder and a checkpoints file."""
    store = RunStore(state)
    for n, run_id in enumerate(ids):
        store.start(_record(run_id, 1_000_000.0 + n, spec_json))
        (state / "runs" / run_id).mkdir(parents=True, exist_ok=True)
        (state / "runs" / run_id / "plan.json").write_text(json.dumps({"run": run_id}))
    (state / "memory").mkdir(exist_ok=True)
    (state / "memory" / "notes.txt").write_text("kept")
    with sync_checkpointer(state):
        pass


def _task(tmp_path: Path) -> Path:
    """The quickstart copied into tmp_path, tracing and memory off (fast dry runs)."""
    folder = tmp_path / "quickstart"
    shutil.copytree(EXAMPLES / "quickstart", folder)
    task = folder / "task.yaml"
    task.write_text(
        task.read_text() + "\ntracing: {enabled: false}\nmemory: {enabled: false}\n",
        encoding="utf-8",
    )
    return task


def _dry_run(task: Path, state: Path) -> subprocess.CompletedProcess[str]:
    return atlas_cli(
        "run", str(task), "--model", "scripted", "--json", "--quiet", "--state-dir", str(state)
    )


def _error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The `atlas: error:` line; the error is on one line and there is no traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("atlas: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def _listed(state: Path) -> list[str]:
    result = atlas_cli("runs", "--json", "--limit", "1000", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    return [r["run_id"] for r in json.loads(result.stdout)]


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` with its size and mtime (ns)."""
    found = {}
    for path in [folder, *folder.rglob("*")]:
        info = path.lstat()
        found[str(path.relative_to(folder))] = (info.st_size, info.st_mtime_ns)
    return found


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _corrupt(path: Path, how: str) -> None:
    if how == "random":
        path.write_bytes(os.urandom(max(path.stat().st_size, 8192)))
    elif how == "truncated":
        with open(path, "r+b") as fh:  # the schema page survives; the tables' pages do not
            fh.truncate(4096)
    else:
        raise ValueError(how)


def _drop_file_privileges() -> None:
    """`preexec_fn`: as root, give up the capabilities that let root ignore file permissions
    (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER), so a chmod binds the child."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2, 3):
        libc.prctl(24, capability, 0, 0, 0)  # PR_CAPBSET_DROP


def _unprivileged(*args: str) -> subprocess.CompletedProcess[str]:
    """`python -m atlas ...` bound by file permissions, even when the tests run as root."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        preexec_fn=_drop_file_privileges,
    )


@pytest.fixture
def read_only() -> Iterator[Callable[[Path], None]]:
    """chmod -R a-w a folder (restored afterwards), skipping if writes still succeed."""
    made: list[Path] = []

    def make(folder: Path) -> None:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode & ~0o222)
        made.append(folder)
        probe = folder / "probe"
        result = _unprivileged("-c", f"open({str(probe)!r}, 'w')")
        if result.returncode == 0:
            probe.unlink()
            pytest.skip("file permissions do not bind this process")

    yield make
    for folder in made:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


# --- 1. corrupt state ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["random", "truncated"])
def test_corrupt_runs_db_is_named_in_one_line(state_dir: Path, how: str) -> None:
    _seed(state_dir, [f"run-{n}" for n in range(3)])
    _corrupt(state_dir / "runs.db", how)
    result = atlas_cli("runs", "--state-dir", str(state_dir))
    assert result.returncode == 3
    line = _error_line(result)
    assert str(state_dir / "runs.db") in line
    assert "python -m atlas doctor" in line


@pytest.mark.parametrize("name", ["runs.db", "checkpoints.db"])
def test_corrupt_file_fails_runs_until_doctor_moves_it_aside(
    tmp_path: Path, state_dir: Path, name: str
) -> None:
    _seed(state_dir, ["old-run-1", "old-run-2"])
    _corrupt(state_dir / name, "random")
    broken = _digest(state_dir / name)
    task = _task(tmp_path)

    failed = _dry_run(task, state_dir)
    assert failed.returncode == 3, failed.stderr
    assert str(state_dir / name) in _error_line(failed)

    other = "checkpoints.db" if name == "runs.db" else "runs.db"
    before = _digest(state_dir / other)
    doctor = atlas_cli("doctor", "--yes", "--state-dir", str(state_dir))
    assert doctor.returncode == 0, doctor.stdout + doctor.stderr
    assert f"{name}: corrupt" in doctor.stdout
    assert "moved aside to" in doctor.stdout

    aside = list(state_dir.glob(f"{name}.corrupt-*"))
    assert len(aside) == 1 and _digest(aside[0]) == broken  # kept as it was
    assert _digest(state_dir / other) == before  # the other database is untouched
    assert (state_dir / "memory" / "notes.txt").read_text() == "kept"
    assert json.loads((state_dir / "runs" / "old-run-1" / "plan.json").read_text())

    ok = _dry_run(task, state_dir)
    assert ok.returncode == 0, ok.stderr
    new_id = json.loads(ok.stdout)["run_id"]
    listed = _listed(state_dir)
    assert new_id in listed
    if name == "checkpoints.db":
        assert {"old-run-1", "old-run-2"} <= set(listed)


def test_doctor_keeps_the_readable_runs_of_a_damaged_runs_db(state_dir: Path) -> None:
    ids = [f"run-{n:04d}" for n in range(200)]
    _seed(state_dir, ids, spec_json=json.dumps({"task": "y" * 1500}))  # about 2 runs a page
    runs_db = state_dir / "runs.db"
    with open(runs_db, "r+b") as fh:  # three pages in the middle of the table
        fh.seek(4096 * 40)
        fh.write(os.urandom(4096 * 3))
    assert atlas_cli("runs", "--state-dir", str(state_dir)).returncode == 3

    result = atlas_cli("doctor", "--yes", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    kept = _listed(state_dir)
    assert 180 <= len(kept) < 200, result.stdout  # only the rows on the damaged pages are lost
    assert set(kept) <= set(ids)
    assert f"kept {len(kept)} readable runs" in result.stdout
    assert len(list(state_dir.glob("runs.db.corrupt-*"))) == 1
    assert len(list((state_dir / "runs").iterdir())) == 200  # every run's folder is kept


def test_doctor_reports_without_moving_anything_unless_told(state_dir: Path) -> None:
    _seed(state_dir, ["a-run"])
    (state_dir / "mlflow.db").write_bytes(os.urandom(20_000))
    before = _snapshot(state_dir)
    result = atlas_cli("doctor", "--state-dir", str(state_dir))
    assert result.returncode == 1
    assert "runs.db: ok" in result.stdout
    assert "checkpoints.db: ok" in result.stdout
    assert "mlflow.db: corrupt" in result.stdout and "--yes" in result.stdout
    assert _snapshot(state_dir) == before

    fixed = atlas_cli("doctor", "--yes", "--state-dir", str(state_dir))
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert not (state_dir / "mlflow.db").exists()
    assert len(list(state_dir.glob("mlflow.db.corrupt-*"))) == 1
    assert _listed(state_dir) == ["a-run"]
    again = atlas_cli("doctor", "--state-dir", str(state_dir))
    assert again.returncode == 0 and "mlflow.db: not there" in again.stdout


# --- 2. read-only state -------------------------------------------------------------------------


def test_runs_lists_read_only_state_and_creates_nothing(
    state_dir: Path, read_only: Callable[[Path], None]
) -> None:
    _seed(state_dir, ["first", "second"])
    read_only(state_dir)
    before = _snapshot(state_dir)
    result = _unprivileged("-m", "atlas", "runs", "--json", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stderr
    assert [r["run_id"] for r in json.loads(result.stdout)] == ["second", "first"]
    assert _snapshot(state_dir) == before


def test_runs_reads_commits_left_in_the_wal_of_read_only_state(
    state_dir: Path, read_only: Callable[[Path], None]
) -> None:
    """A writer killed mid-run leaves its last commits in runs.db-wal: they are listed too."""
    _seed(state_dir, ["first"])
    code = (
        "import os, sys; from pathlib import Path; from atlas.runs import connect; "
        "con = connect(Path(sys.argv[1])); "
        'con.execute("INSERT INTO runs (run_id, spec_json, status, started_at) '
        "VALUES ('in-the-wal', '{}', 'running', 2e6)\"); os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", code, str(state_dir / "runs.db")], check=True, cwd=ROOT)
    assert (state_dir / "runs.db-wal").exists()
    read_only(state_dir)
    before = _snapshot(state_dir)
    result = _unprivileged("-m", "atlas", "runs", "--json", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stderr
    assert [r["run_id"] for r in json.loads(result.stdout)] == ["in-the-wal", "first"]
    assert _snapshot(state_dir) == before


def test_reading_connection_cannot_write(state_dir: Path) -> None:
    _seed(state_dir, ["only"])
    before = _snapshot(state_dir)
    con = connect_readonly(state_dir / "runs.db")
    try:
        with pytest.raises(sqlite3.OperationalError):
            con.execute("DELETE FROM runs")
    finally:
        con.close()
    assert [r.run_id for r in RunStore(state_dir).list()] == ["only"]
    assert RunStore(state_dir).latest() is not None
    assert _snapshot(state_dir) == before


def test_runs_on_a_missing_state_dir_creates_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "never" / "made"
    result = atlas_cli("runs", "--state-dir", str(missing))
    assert result.returncode == 0
    assert result.stdout.strip() == f"no runs in {missing}"
    assert not (tmp_path / "never").exists()


# --- 3. --state-dir naming a file ---------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [["runs"], ["resume", "some-run"], ["doctor"], ["memory", "search", "bikes"], ["run", "TASK"]],
    ids=lambda c: c[0],
)
@pytest.mark.parametrize("below", [False, True], ids=["file", "below-a-file"])
def test_state_dir_that_is_a_file_is_one_line_exit_2(
    tmp_path: Path, command: list[str], below: bool
) -> None:
    a_file = tmp_path / "not-a-dir"
    a_file.write_text("mine")
    target = a_file / "sub" if below else a_file
    args = [str(_task(tmp_path)) if a == "TASK" else a for a in command]
    if command[0] == "run":
        args += ["--model", "scripted", "--quiet"]
    result = atlas_cli(*args, "--state-dir", str(target))
    assert result.returncode == 2, result.stderr
    assert _error_line(result) == f"atlas: error: --state-dir: {a_file} is a file, not a directory"
    assert a_file.read_text() == "mine"


# --- 4. run ids: exact or a unique prefix, never a pattern --------------------------------------


@pytest.mark.parametrize("asked", ["%", "_", "", " ", "%-1", "r_n"])
def test_patterns_and_blanks_match_no_run(state_dir: Path, asked: str) -> None:
    _seed(state_dir, ["run-1", "run-2"])
    with pytest.raises(RunNotFound):
        RunStore(state_dir).get(asked)


def test_resume_percent_resumes_nothing(state_dir: Path) -> None:
    _seed(state_dir, ["run-1"])
    before = _snapshot(state_dir)
    result = atlas_cli("resume", "%", "--quiet", "--state-dir", str(state_dir))
    assert result.returncode == 2
    assert "no run '%'" in _error_line(result)
    assert _snapshot(state_dir) == before


def test_exact_id_wins_and_a_unique_prefix_is_said(state_dir: Path) -> None:
    _seed(
        state_dir, ["20261201-120000-aaaaaa", "20261201-120000-aaaaaa7", "20261201-130000-bbbbbb"]
    )
    store = RunStore(state_dir)
    exact = store.resolve("20261201-120000-aaaaaa")
    assert exact.run_id == "20261201-120000-aaaaaa"
    assert matched_prefix("20261201-120000-aaaaaa", exact) is None
    found = store.resolve("20261201-13")
    assert found.run_id == "20261201-130000-bbbbbb"
    assert matched_prefix("20261201-13", found) == (
        "resuming run 20261201-130000-bbbbbb (matched prefix 20261201-13)"
    )
    assert store.get("20261201-13").run_id == found.run_id


def test_ambiguous_prefix_lists_the_candidates(state_dir: Path) -> None:
    ids = [f"20261201-1200{n:02d}-abc" for n in range(12)]
    _seed(state_dir, ids)
    with pytest.raises(AmbiguousRun) as caught:
        RunStore(state_dir).get("20261201-12")
    assert caught.value.exit_code == 2
    message = str(caught.value)
    assert sum(run_id in message for run_id in ids) == 10 and "2 more" in message

    result = atlas_cli("resume", "20261201-1200", "--quiet", "--state-dir", str(state_dir))
    assert result.returncode == 2
    line = _error_line(result)
    assert "matches 12 runs" in line and ids[-1] in line


# --- 5. a failed resume creates nothing ---------------------------------------------------------


def test_failed_resume_leaves_no_state_dir(tmp_path: Path) -> None:
    new = tmp_path / "new-dir"
    result = atlas_cli("resume", "nosuchid", "--state-dir", str(new))
    assert result.returncode == 2
    assert "no run 'nosuchid'" in _error_line(result)
    assert not new.exists()


# --- 6. a database path that is a directory, or unreadable --------------------------------------


def test_runs_db_that_is_a_directory_is_one_line(state_dir: Path) -> None:
    (state_dir / "runs.db").mkdir()
    result = atlas_cli("runs", "--state-dir", str(state_dir))
    assert result.returncode == 3
    assert _error_line(result) == (
        f"atlas: error: {state_dir / 'runs.db'} is a directory, not a database file; move it away"
    )
    doctor = atlas_cli("doctor", "--yes", "--state-dir", str(state_dir))
    assert doctor.returncode == 1 and "runs.db: unusable" in doctor.stdout
    assert (state_dir / "runs.db").is_dir()  # doctor moves only what it knows to be corrupt


def test_checkpoints_db_that_is_a_directory_is_one_line(tmp_path: Path, state_dir: Path) -> None:
    (state_dir / "checkpoints.db").mkdir()
    result = _dry_run(_task(tmp_path), state_dir)
    assert result.returncode == 3
    assert f"{state_dir / 'checkpoints.db'} is a directory" in _error_line(result)


def test_unreadable_runs_db_is_one_line(state_dir: Path, read_only: Callable[[Path], None]) -> None:
    _seed(state_dir, ["run-1"])
    (state_dir / "runs.db").chmod(0)
    read_only(state_dir)
    result = _unprivileged("-m", "atlas", "runs", "--state-dir", str(state_dir))
    assert result.returncode == 3, result.stderr
    assert _error_line(result) == (
        f"atlas: error: {state_dir / 'runs.db'} cannot be read (permission denied); "
        "fix its permissions"
    )
