"""ATLAS's own state in Postgres (`ATLAS_STATE_URL`): run records, checkpoints and the run lock
on a real server (a throwaway cluster the tests start, with password auth), and the password
nowhere in what a run writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PG_PASSWORD, QUICKSTART, atlas_cli, free_port

pytestmark = pytest.mark.e2e


def _env(url: str) -> dict[str, str]:
    return {"ATLAS_STATE_URL": url}


def _rows(url: str, sql: str) -> list[dict[str, Any]]:
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(url, autocommit=True, row_factory=dict_row) as con:
        return list(con.execute(sql).fetchall())


def test_a_run_keeps_its_record_and_checkpoints_in_postgres(
    postgres_url: str, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    out = atlas_cli(
        "run",
        str(QUICKSTART),
        "--model",
        "scripted",
        "--json",
        "--state-dir",
        str(state),
        env=_env(postgres_url),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    (row,) = _rows(postgres_url, "SELECT * FROM atlas_runs")
    assert row["run_id"] == summary["run_id"] and row["status"] == "passed"
    assert row["trace_id"] == summary["trace_id"]
    threads = _rows(postgres_url, "SELECT DISTINCT thread_id FROM checkpoints")
    assert [t["thread_id"] for t in threads] == [summary["run_id"]]
    # Nothing of the state went to SQLite files.
    assert not (state / "runs.db").exists() and not (state / "checkpoints.db").exists()
    listed = atlas_cli("runs", "--json", "--state-dir", str(state), env=_env(postgres_url))
    assert [r["run_id"] for r in json.loads(listed.stdout)] == [summary["run_id"]]
    # --state-url does what the environment variable does.
    flagged = atlas_cli(
        "runs", "--json", "--state-dir", str(tmp_path / "x"), "--state-url", postgres_url
    )
    assert [r["run_id"] for r in json.loads(flagged.stdout)] == [summary["run_id"]]
    # The password is in none of what the run printed or wrote.
    assert PG_PASSWORD not in out.stdout + out.stderr + listed.stdout
    for path in [p for p in state.rglob("*") if p.is_file()]:
        assert PG_PASSWORD.encode() not in path.read_bytes(), path
    for row in _rows(postgres_url, "SELECT * FROM atlas_runs"):
        assert PG_PASSWORD not in json.dumps(row, default=str)


def test_approval_pause_and_resume_on_postgres(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A paused run read back from Postgres's checkpoints by `approvals`, then approved."""
    import shutil

    from tests.conftest import EXAMPLES

    shutil.copytree(EXAMPLES / "approvals", tmp_path / "approvals")
    env = {**_env(postgres_url), "OUTBOX_FILE": str(tmp_path / "outbox.jsonl")}
    state = ["--state-dir", str(tmp_path / "state")]
    task = str(tmp_path / "approvals" / "task.yaml")
    first = atlas_cli("run", task, "--model", "scripted", "--json", *state, env=env)
    assert first.returncode == 4, first.stderr[-2000:]
    run_id = json.loads(first.stdout.strip().splitlines()[-1])["run_id"]
    for _ in range(2):
        waiting = atlas_cli("approvals", run_id, "--json", *state, env=env)
        assert len(json.loads(waiting.stdout)) == 1, waiting.stderr
        last = atlas_cli("approve", run_id, "--json", *state, env=env)
    assert last.returncode == 0, last.stderr[-2000:]
    assert len((tmp_path / "outbox.jsonl").read_text().splitlines()) == 1


def test_one_host_at_a_time_runs_a_run(postgres_url: str, tmp_path: Path) -> None:
    """The run lock is in Postgres: a run held by another host (another state directory, the
    same store) is refused at once, and taken over when the holder's connection ends."""
    from atlas.errors import RunLocked
    from atlas.runs_postgres import run_lock

    with run_lock(postgres_url, "r-1"):
        with pytest.raises(RunLocked), run_lock(postgres_url, "r-1"):
            pass
        with run_lock(postgres_url, "r-2"):
            pass
    with run_lock(postgres_url, "r-1"):
        pass


async def test_the_async_path_checkpoints_to_postgres(
    postgres_url: str, make_spec: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from atlas.runner import arun

    monkeypatch.setenv("ATLAS_STATE_URL", postgres_url)
    result = await arun(make_spec(), model="scripted", state_dir_path=tmp_path / "state")
    assert result.status == "passed"
    threads = _rows(postgres_url, "SELECT DISTINCT thread_id FROM checkpoints")
    assert [t["thread_id"] for t in threads] == [result.run_id]
    (row,) = _rows(postgres_url, "SELECT status FROM atlas_runs")
    assert row["status"] == "passed"


def test_a_bad_or_unreachable_state_url_is_one_line_before_any_model_call(
    tmp_path: Path,
) -> None:
    log = tmp_path / "calls.log"
    model = f"scripted?call_log={log}"
    cases = [
        ("mysql://u:pw-zz1@127.0.0.1/db", 2, "not a Postgres URL"),
        (f"postgresql://u:pw-zz1@127.0.0.1:{free_port()}/db", 3, "state store"),
    ]
    for url, code, expected in cases:
        out = atlas_cli(
            "run",
            str(QUICKSTART),
            "--model",
            model,
            "--state-dir",
            str(tmp_path / "s"),
            env=_env(url),
        )
        assert out.returncode == code, (url, out.stderr)
        assert expected in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "pw-zz1" not in out.stderr
    assert not log.exists()
