"""`atlas doctor TASK` over the production stack: one line per configured server, each really
reached (Postgres state, the MLflow server with basic auth, a Chroma server, the graph
server, Redis), a broken part
named on its line, exit 1, and no password printed."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import (
    EXAMPLES,
    MLFLOW_ADMIN,
    PG_PASSWORD,
    REDIS_PASSWORD,
    atlas_cli,
    free_port,
)

pytestmark = pytest.mark.e2e


def _task(tmp_path: Path, **settings: object) -> Path:
    folder = tmp_path / "quickstart"
    shutil.copytree(EXAMPLES / "quickstart", folder, dirs_exist_ok=True)
    task = folder / "task.yaml"
    data = yaml.safe_load(task.read_text())
    data.update(settings)
    task.write_text(yaml.safe_dump(data))
    return task


def _lines(stdout: str) -> dict[str, str]:
    return {line.split(":", 1)[0]: line for line in stdout.splitlines() if ": " in line}


def test_doctor_checks_every_configured_server_in_one_line_each(
    tmp_path: Path,
    postgres_url: str,
    mlflow_server: str,
    redis_server: str,
    chroma_server: str,
    falkordb_server: str,
) -> None:
    task = _task(
        tmp_path,
        state={"url": postgres_url},
        tracing={"tracking_uri": mlflow_server},
        cache={"url": redis_server},
        memory={"vector_url": chroma_server, "graph_uri": falkordb_server},
    )
    # The server's first API call can take seconds on a loaded 2-core machine: doctor is to
    # say whether it works, so it gets the longer check a busy server needs.
    env = {
        "MLFLOW_TRACKING_USERNAME": MLFLOW_ADMIN[0],
        "MLFLOW_TRACKING_PASSWORD": MLFLOW_ADMIN[1],
        "ATLAS_TRACKING_PROBE_S": "30",
    }
    state = tmp_path / "state"
    out = atlas_cli("doctor", str(task), "--state-dir", str(state), env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = _lines(out.stdout)
    assert "reachable; the first run makes tables" in lines["state"]
    assert lines["tracking"].endswith(f"{mlflow_server}: ok")
    assert lines["cache"].endswith(": ok") and "127.0.0.1" in lines["cache"]
    assert lines["vector memory"].endswith(f"{chroma_server}: ok")
    assert lines["graph memory"].endswith(f"{falkordb_server}: ok")

    # After a run, the state's tables are there.
    ran = atlas_cli("run", str(task), "--model", "scripted", "--state-dir", str(state), env=env)
    assert ran.returncode == 0, ran.stderr[-2000:]
    again = atlas_cli("doctor", str(task), "--state-dir", str(state), env=env)
    assert again.returncode == 0, again.stdout
    assert _lines(again.stdout)["state"].endswith("tables ready")

    # Wrong credentials and a server that is not there: each on its own line, exit 1.
    wrong = {**env, "MLFLOW_TRACKING_PASSWORD": "not-the-pw-5"}
    bad = _task(
        tmp_path / "bad",
        state={"url": postgres_url.replace(PG_PASSWORD, "wrong-pg-pw")},
        tracing={"tracking_uri": mlflow_server},
        cache={"url": redis_server.replace(REDIS_PASSWORD, "wrong-redis-pw")},
        memory={
            "vector_url": f"http://127.0.0.1:{free_port()}",
            "graph_uri": f"bolt://127.0.0.1:{free_port()}",
        },
    )
    out = atlas_cli("doctor", str(bad), "--state-dir", str(state), env=wrong)
    assert out.returncode == 1, out.stdout + out.stderr
    lines = _lines(out.stdout)
    assert "FAILED" in lines["state"] and "password authentication failed" in lines["state"]
    assert "FAILED" in lines["tracking"] and "refused the credentials" in lines["tracking"]
    assert "FAILED" in lines["cache"]
    assert "FAILED" in lines["vector memory"] and "FAILED" in lines["graph memory"]
    printed = out.stdout + out.stderr
    for secret in (
        PG_PASSWORD,
        MLFLOW_ADMIN[1],
        REDIS_PASSWORD,
        "wrong-pg-pw",
        "not-the-pw-5",
        "wrong-redis-pw",
    ):
        assert secret not in printed
    assert "Traceback" not in printed
