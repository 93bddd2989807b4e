"""Crash and resume: a run killed with SIGKILL continues from its checkpoint, redoing no work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import EXAMPLES, atlas_cli, record_figure

RESEARCH_OR_ANALYSIS = {
    "handoff:searcher",
    "handoff:reader",
    "handoff:data_explorer",
    "handoff:statistician",
    "search_documents",
    "read_document",
    "describe_data",
    "query_data",
}


def _calls(log: Path) -> list[dict]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def _write_task(where: Path) -> Path:
    """The quickstart, with its inputs named by absolute path, in `where`."""
    shutil_src = EXAMPLES / "quickstart"
    task = where / "task.yaml"
    task.write_text(
        (shutil_src / "task.yaml")
        .read_text()
        .replace("docs/*.md", str(shutil_src / "docs" / "*.md"))
        .replace("data/*.csv", str(shutil_src / "data" / "*.csv"))
        # room for a second round, for the kill points in it
        .replace("max_iterations: 1 ", "max_iterations: 2 ")
    )
    return task


def _start_and_kill(
    tmp_path: Path,
    log: Path,
    when: Callable[[list[dict]], bool],
    options: str = "",
    extra_env: dict[str, str] | None = None,
) -> str:
    task = _write_task(tmp_path)
    model = f"scripted?latency_ms=150&call_log={log}{options}"
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    env.update(extra_env or {})
    err = tmp_path / "run.stderr"
    with open(err, "wb") as err_fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "atlas", "run", str(task), "--model", model, "--quiet"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err_fh,
        )
    deadline = time.monotonic() + 120
    try:
        while not when(_calls(log)):
            assert proc.poll() is None, (
                f"run ended before the kill point: {err.read_text()[-2000:]}"
            )
            assert time.monotonic() < deadline, "kill point never reached"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    runs = json.loads(atlas_cli("runs", "--json", cwd=tmp_path, env=extra_env).stdout)
    assert runs[0]["status"] == "running"  # killed: never marked finished
    return str(runs[0]["run_id"])


@pytest.fixture(params=["sqlite", "postgres"])
def state_env(request: pytest.FixtureRequest) -> dict[str, str]:
    """The run's state in SQLite files (the default) or in Postgres (`ATLAS_STATE_URL`)."""
    if request.param == "sqlite":
        return {}
    return {"ATLAS_STATE_URL": request.getfixturevalue("postgres_url")}


@pytest.mark.e2e
def test_kill_during_writing_then_resume_redoes_nothing_finished(
    tmp_path: Path, state_env: dict[str, str]
) -> None:
    log = tmp_path / "calls.jsonl"
    run_id = _start_and_kill(
        tmp_path,
        log,
        lambda calls: any("handoff:drafter" in c["tools"] for c in calls),
        extra_env=state_env,
    )
    first_pid = _calls(log)[0]["pid"]
    proc = atlas_cli("resume", run_id, "--json", cwd=tmp_path, env=state_env)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "passed" and summary["resumed"] is True
    after = [c for c in _calls(log) if c["pid"] != first_pid]
    assert after, "the resumed run made no calls"
    assert not any(c["role"] == "planner" for c in after)
    assert not any(set(c["tools"]) & RESEARCH_OR_ANALYSIS for c in after)
    assert Path(summary["output"]).is_file()
    # MLflow: the resume continued the killed session's run; none is left RUNNING, none doubled.
    import mlflow

    client = mlflow.MlflowClient(summary["tracking_uri"])
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`atlas.run_id` = '{run_id}'")
    assert [r.info.status for r in runs] == ["FINISHED"]
    assert runs[0].data.tags["atlas.sessions"] == "2"
    assert runs[0].data.metrics["passed"] == 1.0


@pytest.mark.e2e
def test_kill_during_parallel_wave_then_resume_completes(
    tmp_path: Path, state_env: dict[str, str]
) -> None:
    log = tmp_path / "calls.jsonl"
    run_id = _start_and_kill(
        tmp_path,
        log,
        lambda calls: sum(c["role"] == "worker" for c in calls) >= 2,
        extra_env=state_env,
    )
    before = _calls(log)
    first_pid = before[0]["pid"]
    proc = atlas_cli("resume", run_id, "--json", cwd=tmp_path, env=state_env)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "passed"
    after = [c for c in _calls(log) if c["pid"] != first_pid]
    assert not any(c["role"] == "planner" for c in after)  # the plan was checkpointed
    full_run = 28
    assert len(before) + len(after) < full_run + len(before)  # less than starting over
    assert len(after) < full_run


@pytest.mark.e2e
def test_kill_during_memory_write_then_resume_duplicates_nothing(tmp_path: Path) -> None:
    """Killed right after a step's entity extraction (its vector and graph writes in flight):
    after resume, memory holds exactly what an uninterrupted run of the same task holds."""
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    killed.mkdir()
    clean.mkdir()
    log = killed / "calls.jsonl"
    run_id = _start_and_kill(killed, log, lambda calls: any(c["role"] == "memory" for c in calls))
    proc = atlas_cli("resume", run_id, "--json", cwd=killed)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-3000:]
    uninterrupted = atlas_cli(
        "run", str(killed / "task.yaml"), "--model", "scripted", "--json", cwd=clean
    )
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-2000:]

    def stats(where: Path) -> dict:
        out = atlas_cli("memory", "stats", "--json", cwd=where)
        assert out.returncode == 0, out.stderr
        data = json.loads(out.stdout)
        return {
            **{f"vector.{k}": data["vector"][k] for k in ("documents", "findings", "outputs")},
            **{f"graph.{k}": data["graph"][k] for k in ("entities", "relations", "findings")},
        }

    assert stats(killed) == stats(clean)


def _memory_stats(where: Path) -> dict:
    out = atlas_cli("memory", "stats", "--json", cwd=where)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    return {
        **{f"vector.{k}": data["vector"][k] for k in ("documents", "findings", "outputs")},
        **{f"graph.{k}": data["graph"][k] for k in ("entities", "relations", "findings")},
    }


def _role(role: str, n: int = 1) -> Callable[[list[dict]], bool]:
    return lambda calls: sum(c["role"] == role for c in calls) >= n


def _tool(name: str) -> Callable[[list[dict]], bool]:
    return lambda calls: any(name in c["tools"] for c in calls)


# Ten places to die: planning, the parallel wave, each team's routing, tool calls, memory
# writes, writing, judging, and the second iteration's plan and judge.
KILL_POINTS: dict[str, tuple[Callable[[list[dict]], bool], str]] = {
    "after the plan": (_role("planner"), ""),
    "parallel wave": (_role("worker", 2), ""),
    "analysis routing": (_tool("handoff:data_explorer"), ""),
    "research second worker": (_tool("handoff:reader"), ""),
    "memory write": (_role("memory"), ""),
    "writing": (_tool("handoff:drafter"), ""),
    "saving the draft": (_tool("save_draft"), ""),
    "judging": (_role("judge"), ""),
    "second plan": (_role("planner", 2), "&fail_iterations=1"),
    "second judge": (_role("judge", 2), "&fail_iterations=1"),
}
_reference: dict[str, dict] = {}


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_sigkill_anywhere_then_resume(point: str, tmp_path: Path) -> None:
    """SIGKILL at each point, then `resume`: the run passes, finished steps are not run again
    (counted in model calls), memory matches an uninterrupted run's, and the trace says it is a
    resumed session of the same run."""
    when, options = KILL_POINTS[point]
    log = tmp_path / "calls.jsonl"
    run_id = _start_and_kill(tmp_path, log, when, options)
    before = _calls(log)
    first_pid = before[0]["pid"]
    proc = atlas_cli("resume", run_id, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["status"] == "passed" and summary["resumed"] is True
    after = [c for c in _calls(log) if c["pid"] != first_pid]

    if options not in _reference:
        clean = tmp_path / "clean"
        clean.mkdir()
        ref_log = clean / "calls.jsonl"
        ref = atlas_cli(
            "run",
            str(_write_task(clean)),
            "--model",
            f"scripted?call_log={ref_log}{options}",
            "--json",
            cwd=clean,
        )
        assert ref.returncode == 0, ref.stderr[-2000:]
        _reference[options] = {"calls": len(_calls(ref_log)), "memory": _memory_stats(clean)}
    full = _reference[options]["calls"]
    # Work finished before the kill is not redone: the resumed session makes fewer calls than a
    # whole run, and both sessions together redo at most the steps in flight at the kill.
    assert len(before) + len(after) <= full + 12
    # Killed right after a planner call, that plan may not be checkpointed yet: it is made once
    # more. Anywhere else, a finished plan is never made again.
    replanned = point in ("after the plan", "second plan")
    planner_calls = sum(c["role"] == "planner" for c in before + after)
    assert planner_calls <= (2 if options else 1) + replanned, "a finished plan was made again"
    if point == "after the plan":
        assert len(after) <= full  # nothing had finished yet
    else:
        assert len(after) < full
    assert _memory_stats(tmp_path) == _reference[options]["memory"]
    record_figure(
        f"kill:{point}",
        {"calls_before_kill": len(before), "calls_after_resume": len(after), "full_run": full},
    )

    import mlflow

    mlflow.set_tracking_uri(summary["tracking_uri"])
    trace = mlflow.get_trace(summary["trace_id"])
    assert trace.info.trace_metadata.get("atlas.resumed") == "True"
    assert trace.info.trace_metadata.get("mlflow.trace.session") == run_id


def test_secrets_in_task_options_are_not_stored_and_resume_reads_them_back(
    tmp_path: Path,
) -> None:
    """A key written into a task file's provider options never reaches `runs.db`; `resume` takes
    it back from the task file, and refuses in one line when that file no longer matches."""
    from atlas.runs import RunRecord, RunStore, restore_secrets, spec_to_json
    from atlas.spec import load_task

    task = _write_task(tmp_path)
    task.write_text(
        task.read_text()
        + "models:\n  default:\n    model: openai:gpt-4o-mini\n"
        + "    base_url: https://bench:pw-ATLASTESTSECRET-1@gateway.example/v1\n"
        + "    params:\n      api_key: sk-proj-ATLASTESTSECRET0123456789abcdef\n"
        + "      default_headers: {X-Gateway-Token: gw-ATLASTESTSECRET-2}\n"
    )
    spec = load_task(task)
    stored = spec_to_json(spec)
    assert "ATLASTESTSECRET" not in stored
    assert "gateway.example" in stored and "gpt-4o-mini" in stored  # the rest is kept
    record = RunRecord("r1", None, str(task), stored, None, "running", 0.0)
    assert restore_secrets(record) == spec

    state = tmp_path / "state"
    RunStore(state).start(record)
    task.write_text(task.read_text().replace("bike-share", "scooter"))
    out = atlas_cli("resume", "r1", "--state-dir", str(state))
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "changed since run r1 started" in out.stderr
    task.unlink()
    out = atlas_cli("resume", "r1", "--state-dir", str(state))
    assert out.returncode == 2 and "task file is gone" in out.stderr
    assert "Traceback" not in out.stderr
    for path in state.rglob("*"):
        if path.is_file():
            assert b"ATLASTESTSECRET" not in path.read_bytes(), path
