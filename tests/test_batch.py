"""`atlas batch` on the local executor: a failing task does not stop the others, every run has
its record and its trace tagged with the batch id, Ctrl-C stops cleanly and `--resume` finishes
the batch without redoing finished steps, and a worker process killed mid-run is retried by
resuming its run."""

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
import yaml

from tests.conftest import EXAMPLES, ROOT, atlas_cli

pytestmark = pytest.mark.e2e


def _tasks(tmp_path: Path, models: list[str]) -> list[Path]:
    """Quickstart copies, one per model (each task names its own), memory in the folder."""
    out = []
    for n, model in enumerate(models, start=1):
        folder = tmp_path / f"task{n}"
        shutil.copytree(EXAMPLES / "quickstart", folder)
        task = folder / "task.yaml"
        data = yaml.safe_load(task.read_text())
        data["models"] = {"default": {"model": model}}
        data["budget"] = {**data.get("budget", {}), "max_iterations": 1}
        task.write_text(yaml.safe_dump(data))
        out.append(task)
    return out


def _manifest(state: Path) -> dict[str, Any]:
    (path,) = (state / "batches").glob("*.json")
    return json.loads(path.read_text())


def _calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


def test_a_failing_task_does_not_stop_the_batch_and_every_run_is_tagged(tmp_path: Path) -> None:
    import mlflow

    tasks = _tasks(tmp_path, ["scripted", "scripted?fail_iterations=5", "scripted"])
    state = tmp_path / "state"
    out = atlas_cli(
        "batch", *map(str, tasks), "--json", "--max-concurrency", "2", "--state-dir", str(state)
    )
    assert out.returncode == 1, out.stderr[-3000:]  # not every task passed
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["status"] for r in lines) == ["failed", "passed", "passed"]
    # Each line is what `run --json` prints for that run.
    assert all({"run_id", "trace_id", "tokens", "cost_usd", "wall_s"} <= r.keys() for r in lines)
    manifest = _manifest(state)
    batch_id = manifest["batch_id"]
    assert [i["status"] for i in manifest["items"]] == ["passed", "failed", "passed"]
    assert "state_url" not in manifest["options"]
    # Every run has its own record...
    runs = json.loads(atlas_cli("runs", "--json", "--state-dir", str(state)).stdout)
    assert {r["run_id"] for r in runs} == {i["run_id"] for i in manifest["items"]}
    # ... and its own trace, tagged with the batch.
    client = mlflow.MlflowClient(lines[0]["tracking_uri"])
    experiment = client.get_experiment_by_name("atlas")
    traces = client.search_traces(
        locations=[experiment.experiment_id],
        filter_string=f"tags.`atlas.batch_id` = '{batch_id}'",
    )
    assert {t.info.trace_id for t in traces} == {r["trace_id"] for r in lines}
    assert "3 tasks on local" in out.stderr and "2/3 passed" in out.stderr


def _driver(tasks: list[Path], state: Path, *extra: str) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atlas",
            "batch",
            *map(str, tasks),
            "--state-dir",
            str(state),
            *extra,
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(check: Any, proc: subprocess.Popen[str], what: str, limit: float = 120) -> None:
    deadline = time.monotonic() + limit
    while not check():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def test_ctrl_c_stops_the_batch_and_resume_finishes_it_without_redoing_steps(
    tmp_path: Path,
) -> None:
    log = tmp_path / "calls.jsonl"
    tasks = _tasks(tmp_path, [f"scripted?latency_ms=150&call_log={log}"] * 2)
    state = tmp_path / "state"
    proc = _driver(tasks, state, "--max-concurrency", "2")
    try:
        _wait_for(lambda: '"handoff:drafter"' in (log.read_text() if log.exists() else ""), proc,
                  "a run reached its writing step")  # fmt: skip
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "atlas batch --resume batch-" in err and "Traceback" not in err
    manifest = _manifest(state)
    assert {i["status"] for i in manifest["items"]} <= {"interrupted", "passed"}
    before = _calls(log)

    out = atlas_cli("batch", "--resume", manifest["batch_id"], "--state-dir", str(state))
    assert out.returncode == 0, out.stderr[-3000:]
    manifest = _manifest(state)
    assert [i["status"] for i in manifest["items"]] == ["passed", "passed"]
    # Resumed from checkpoints: far fewer calls than running both again.
    assert _calls(log) - before < before


def test_a_killed_worker_is_retried_by_resuming_its_run(tmp_path: Path) -> None:
    log = tmp_path / "calls.jsonl"
    tasks = _tasks(tmp_path, [f"scripted?latency_ms=150&call_log={log}"] * 2)
    state = tmp_path / "state"
    proc = _driver(tasks, state, "--max-concurrency", "2", "--json")
    try:
        _wait_for(lambda: '"handoff:drafter"' in (log.read_text() if log.exists() else ""), proc,
                  "a run reached its writing step")  # fmt: skip
        workers = subprocess.run(
            ["pgrep", "-P", str(proc.pid), "-f", "multiprocessing.spawn"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        assert workers, "no worker process found"
        os.kill(int(workers[0]), signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "retry" in err and "a worker process died" in err
    statuses = [json.loads(line)["status"] for line in out.splitlines() if line.startswith("{")]
    assert statuses == ["passed", "passed"]
    manifest = _manifest(state)
    assert max(i["attempts"] for i in manifest["items"]) >= 2
    resumed = [
        json.loads(line)
        for line in out.splitlines()
        if line.startswith("{") and '"resumed": true' in line
    ]
    assert resumed, "the retried run was started over, not resumed"


def test_bad_input_is_one_line_before_any_run(tmp_path: Path) -> None:
    (good,) = _tasks(tmp_path, ["scripted"])
    missing = tmp_path / "nope.yaml"
    state = tmp_path / "state"
    out = atlas_cli("batch", str(good), str(missing), "--state-dir", str(state))
    assert out.returncode == 2 and "nope.yaml" in out.stderr and "Traceback" not in out.stderr
    assert not (state / "batches").exists()
    out = atlas_cli("batch", str(good), "--max-per-provider", "openai", "--state-dir", str(state))
    assert out.returncode == 2 and "PROVIDER=N" in out.stderr
    out = atlas_cli("batch", "--resume", "batch-nope", "--state-dir", str(state))
    assert out.returncode == 2 and "no batch" in out.stderr


def test_on_ray_a_killed_worker_is_retried_and_every_run_finishes(tmp_path: Path) -> None:
    """A local Ray cluster started by the batch (usage stats off, no dashboard); one Ray
    worker process is SIGKILLed mid-run: the driver resumes that run, all finish."""
    log = tmp_path / "calls.jsonl"
    tasks = _tasks(tmp_path, [f"scripted?latency_ms=150&call_log={log}"] * 3)
    state = tmp_path / "state"
    proc = _driver(tasks, state, "--executor", "ray", "--max-concurrency", "2", "--json")
    try:
        _wait_for(lambda: '"handoff:drafter"' in (log.read_text() if log.exists() else ""), proc,
                  "a run reached its writing step", limit=240)  # fmt: skip
        workers = subprocess.run(
            ["pgrep", "-f", "^ray::run_item"], capture_output=True, text=True, check=False
        ).stdout.split()
        assert workers, "no Ray worker running a task"
        os.kill(int(workers[0]), signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert "3 tasks on ray" in err and "a Ray worker process died" in err
    results = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [r["status"] for r in results] == ["passed"] * 3
    assert any(r["resumed"] for r in results), "the retried run was started over"
    assert len({r["trace_id"] for r in results}) == 3


def test_a_cluster_of_several_machines_refuses_embedded_stores(tmp_path: Path) -> None:
    from atlas.batch import Options, make_batch
    from atlas.batch.ray import refuse_embedded
    from atlas.errors import SpecError

    (task,) = _tasks(tmp_path, ["scripted"])
    batch = make_batch([str(task)], Options(state_dir=str(tmp_path / "s")), executor="ray")
    with pytest.raises(SpecError) as caught:
        refuse_embedded(batch)
    message = str(caught.value)
    for needed in ("ATLAS_STATE_URL", "--tracking-uri", "memory.vector_url", "memory.graph_uri"):
        assert needed in message
    assert "\n" not in message
