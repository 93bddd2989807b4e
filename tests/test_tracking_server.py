"""The production pair: ATLAS's state in Postgres and its traces on an MLflow tracking server
(backend store in the same Postgres, proxied artifacts, basic auth with credentials from the
environment). A dry run is SIGKILLed mid-run and resumed; the trace read back from the server
has its spans and assessments; no password lands anywhere a run writes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLES, MLFLOW_ADMIN, PG_PASSWORD, atlas_cli

pytestmark = pytest.mark.e2e


def _env(postgres_url: str) -> dict[str, str]:
    return {
        "ATLAS_STATE_URL": postgres_url,
        "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN[0],
        "MLFLOW_TRACKING_PASSWORD": MLFLOW_ADMIN[1],
    }


def _client(url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", MLFLOW_ADMIN[0])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", MLFLOW_ADMIN[1])
    return mlflow.MlflowClient(url)


def test_sigkill_and_resume_with_postgres_state_and_an_mlflow_server(
    postgres_url: str, mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(EXAMPLES / "quickstart", tmp_path / "quickstart")
    task = tmp_path / "quickstart" / "task.yaml"
    log = tmp_path / "calls.jsonl"
    env = {**os.environ, **_env(postgres_url)}
    env.pop("OPENAI_API_KEY", None)
    state = tmp_path / "state"
    command = [
        sys.executable,
        "-m",
        "atlas",
        "run",
        str(task),
        "--quiet",
        "--model",
        f"scripted?latency_ms=150&call_log={log}",
        "--tracking-uri",
        mlflow_server,
        "--state-dir",
        str(state),
    ]
    err = tmp_path / "run.stderr"
    with open(err, "wb") as err_fh:
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err_fh)
    deadline = time.monotonic() + 180
    try:
        while not (log.exists() and '"handoff:drafter"' in log.read_text()):
            assert proc.poll() is None, err.read_text()[-2000:]
            assert time.monotonic() < deadline, "the run never reached its writing step"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    runs = json.loads(atlas_cli("runs", "--json", env=_env(postgres_url)).stdout)
    (record,) = runs
    assert record["status"] == "running"
    before = len(log.read_text().splitlines())

    resumed = atlas_cli(
        "resume", record["run_id"], "--json", "--state-dir", str(state), env=_env(postgres_url)
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert summary["status"] == "passed" and summary["resumed"] is True
    assert summary["tracking_uri"] == mlflow_server  # not a fallback to the local store
    assert len(log.read_text().splitlines()) - before < before + 30  # not started over

    client = _client(mlflow_server, monkeypatch)
    trace = client.get_trace(summary["trace_id"])
    names = {s.name for s in trace.data.spans}
    assert "judge" in names and any(n.startswith("team.") for n in names), sorted(names)
    assert any(s.span_type == "TOOL" for s in trace.data.spans)
    feedback = {a.name for a in trace.info.assessments}
    assert {"judge", "judge_score"} <= feedback, feedback
    assert trace.info.token_usage and trace.info.token_usage.get("total_tokens", 0) > 0
    # Span search runs on the server's Postgres store.
    experiment = client.get_experiment_by_name("atlas")
    found = client.search_traces(
        locations=[experiment.experiment_id], filter_string="span.type = 'TOOL'"
    )
    assert summary["trace_id"] in {t.info.trace_id for t in found}
    # The run's artifacts went through the server (proxied), readable back.
    (mlflow_run,) = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`atlas.run_id` = '{record['run_id']}'"
    )
    assert mlflow_run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert "plan.json" in artifacts, artifacts

    story = atlas_cli("trace", record["run_id"], "--state-dir", str(state), env=_env(postgres_url))
    assert story.returncode == 0, story.stderr
    assert "verdict: passed" in story.stdout

    # No password in anything the run printed or wrote.
    secrets = (PG_PASSWORD, MLFLOW_ADMIN[1])
    printed = resumed.stdout + resumed.stderr + story.stdout + story.stderr
    assert not any(s in printed for s in secrets)
    for path in [p for p in state.rglob("*") if p.is_file()]:
        data = path.read_bytes()
        assert not any(s.encode() in data for s in secrets), path
    assert not any(s in json.dumps(runs) for s in secrets)
    assert not any(s in json.dumps(trace.to_dict(), default=str) for s in secrets)


def test_wrong_tracking_credentials_fall_back_to_the_local_store_with_one_warning(
    mlflow_server: str, tmp_path: Path
) -> None:
    quick = tmp_path / "quickstart"
    shutil.copytree(EXAMPLES / "quickstart", quick)
    env = {"MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN[0], "MLFLOW_TRACKING_PASSWORD": "wrong-pw-91"}
    out = atlas_cli(
        "run",
        str(quick / "task.yaml"),
        "--model",
        "scripted",
        "--json",
        "--tracking-uri",
        mlflow_server,
        "--state-dir",
        str(tmp_path / "state"),
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["tracking_uri"].startswith("sqlite:///")
    warnings = [line for line in out.stderr.splitlines() if "refused the credentials" in line]
    assert len(warnings) == 1, out.stderr
    assert "wrong-pw-91" not in out.stderr + out.stdout
