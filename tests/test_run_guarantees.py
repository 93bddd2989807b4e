"""What a run guarantees when things go wrong: outputs are never lost, one process runs a run,
every call is bounded in time and charged, budgets bind in parallel, signals end a run cleanly.

Each test reproduces a defect that a hostile-user campaign found (issue 12) and fails on the
code before its fix.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import EXAMPLES, atlas_cli

QUICK = EXAMPLES / "quickstart"


def _task(where: Path, extra: str = "", *, memory: bool = False, tracing: bool = False) -> Path:
    """The quickstart's task in `where`, inputs by absolute path, output in `where/out/`."""
    text = (
        (QUICK / "task.yaml")
        .read_text()
        .replace("docs/*.md", str(QUICK / "docs" / "*.md"))
        .replace("data/*.csv", str(QUICK / "data" / "*.csv"))
        .replace("output/brief.md", "out/brief.md")
    )
    if not memory:
        text += "memory: {enabled: false}\n"
    if not tracing:
        text += "tracing: {enabled: false}\n"
    task = where / "task.yaml"
    task.write_text(text + extra)
    return task


def _summary(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON summary; stderr: {proc.stderr[-2000:]}"
    return dict(json.loads(lines[-1]))


def _log(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _budget(task: Path, **limits: Any) -> None:
    """Replace the quickstart's budget block."""
    text = task.read_text()
    start = text.index("budget:")
    end = text.index("\n", text.index("timeout_s:", start))
    block = "budget:\n" + "".join(f"  {k}: {v}\n" for k, v in limits.items())
    task.write_text(text[:start] + block + text[end + 1 :])


# -- outputs ---------------------------------------------------------------------------------


def test_a_rerun_that_produces_nothing_keeps_the_earlier_output(tmp_path: Path) -> None:
    """A re-run that a budget stops before any step finished used to empty the output: the
    first run's 1,538 bytes became a 1-byte file."""
    task = _task(tmp_path)
    first = atlas_cli("run", str(task), "--model", "scripted", "--json", cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    output = tmp_path / "out" / "brief.md"
    before = output.read_bytes()
    assert len(before) > 500

    _budget(task, max_iterations=1, timeout_s=0.3)
    second = atlas_cli(
        "run", str(task), "--model", "scripted?latency_ms=500", "--json", cwd=tmp_path
    )
    summary = _summary(second)
    assert second.returncode == 1 and summary["status"] == "budget_exhausted"
    assert summary["output"] is None
    assert f"no output produced; {output} left as it was" in " ".join(second.stderr.split())
    assert output.read_bytes() == before


def test_an_overwritten_output_keeps_its_previous_version_beside_it(tmp_path: Path) -> None:
    task = _task(tmp_path)
    output = tmp_path / "out" / "brief.md"
    output.parent.mkdir()
    output.write_text("my own notes, written by hand\n")
    proc = atlas_cli("run", str(task), "--model", "scripted", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "brief.previous.md").read_text() == (
        "my own notes, written by hand\n"
    )
    assert output.read_text() != "my own notes, written by hand\n"
    leftovers = [p.name for p in output.parent.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


def test_a_run_that_fails_at_the_end_says_where_its_drafts_are(tmp_path: Path) -> None:
    """The output folder turns into a file while the run works: finalize cannot write. The
    message says where the drafts are and how to resume, in a few lines, no traceback."""
    task = _task(tmp_path)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atlas",
            "run",
            str(task),
            "--json",
            "--model",
            "scripted?latency_ms=150",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    out_dir.rmdir()
    out_dir.write_text("not a folder any more")
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 3, stderr[-2000:]
    assert "Traceback" not in stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    run_dir = Path(summary["run_dir"])
    assert f"drafts and plan are kept in {run_dir}" in stderr
    assert f"resume {summary['run_id']}" in stderr
    assert list((run_dir / "drafts").glob("draft-*.md"))


# -- one runner per run ---------------------------------------------------------------------


def _start(tmp_path: Path, task: Path, model: str, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "atlas", *extra, "--model", model, "--json"]
        if extra and extra[0] == "resume"
        else [sys.executable, "-m", "atlas", "run", str(task), "--model", model, "--json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _kill_after(proc: subprocess.Popen[str], log: Path, calls: int) -> None:
    deadline = time.monotonic() + 120
    while len(_log(log)) < calls:
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)


def _run_id(tmp_path: Path) -> str:
    runs = json.loads(atlas_cli("runs", "--json", cwd=tmp_path).stdout)
    return str(runs[0]["run_id"])


def test_two_resumes_of_one_run_do_not_both_run_it(tmp_path: Path) -> None:
    """After a kill, two concurrent resumes used to both run the rest (44 and 51 calls where
    about 48 were needed, 8 drafts instead of 4). Now the second says so, exit 2, no calls."""
    task = _task(tmp_path)
    log = tmp_path / "calls.jsonl"
    # Slow enough calls that the first resume is still running when the second (a new
    # process, a few seconds to start on a loaded machine) asks for the run.
    model = f"scripted?latency_ms=300&call_log={log}"
    _kill_after(_start(tmp_path, task, model), log, 6)
    run_id = _run_id(tmp_path)
    before = len(_log(log))

    first = subprocess.Popen(
        [sys.executable, "-m", "atlas", "resume", run_id, "--json"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The second starts once the first holds the run (its first call is answered).
    deadline = time.monotonic() + 60
    while len(_log(log)) == before:
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    during = len(_log(log))
    second = atlas_cli("resume", run_id, "--json", cwd=tmp_path)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 2, second.stderr[-2000:]
    assert f"run {run_id} is already running" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    pids = {c["pid"] for c in _log(log)[during:]}
    assert len(pids) == 1, "the refused resume made model calls"
    drafts = list((tmp_path / ".atlas" / "runs" / run_id / "drafts").glob("draft-*.md"))
    assert len(drafts) <= 2


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path: Path) -> None:
    task = _task(tmp_path)
    log = tmp_path / "calls.jsonl"
    _kill_after(_start(tmp_path, task, f"scripted?latency_ms=50&call_log={log}"), log, 3)
    run_id = _run_id(tmp_path)
    assert (tmp_path / ".atlas" / "runs" / run_id / "run.lock").exists()
    proc = atlas_cli("resume", run_id, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _summary(proc)["status"] == "passed"


def test_calls_cut_off_by_a_kill_are_charged(tmp_path: Path) -> None:
    """Calls lost in flight to a SIGKILL are made again on resume, and counted: the run used to
    report 58 calls where 62 were made. Now the summary's calls are every call the model
    answered across both sessions, plus the ones the kill cut off."""
    task = _task(tmp_path)
    log = tmp_path / "calls.jsonl"
    model = f"scripted?latency_ms=400&call_log={log}"
    proc = _start(tmp_path, task, model)
    journal: Path | None = None
    deadline = time.monotonic() + 60

    def in_flight() -> int:
        entries = _log(journal) if journal else []
        return len({e["s"] for e in entries if "s" in e} - {e["e"] for e in entries if "e" in e})

    # Kill in the parallel wave, while research and analysis each have a call in flight.
    while len(_log(log)) < 3 or in_flight() < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        found = list((tmp_path / ".atlas" / "runs").glob("*/calls.jsonl"))
        journal = found[0] if found else None
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    cut_off = in_flight()
    answered_before = len(_log(log))
    run_id = _run_id(tmp_path)
    resumed = atlas_cli("resume", run_id, "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    summary = _summary(resumed)
    answered = len(_log(log))
    assert answered > answered_before
    assert summary["lost_calls"] == cut_off >= 2
    assert summary["model_calls"] == answered + cut_off


# -- time ------------------------------------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[str]:
    """A TCP server on 127.0.0.1 that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}/v1"
    stop.set()
    thread.join(timeout=5)
    for conn in held:
        conn.close()
    server.close()


def test_a_provider_that_never_answers_is_bounded_by_timeout_s(
    tmp_path: Path, silent_server: str
) -> None:
    """Against a socket that accepts and never replies, a run with `timeout_s: 10` was still
    waiting at 900 s. Every call is now bounded by the time the run has left."""
    task = _task(
        tmp_path,
        "models:\n"
        f"  default: {{model: openai:gpt-4o-mini, base_url: '{silent_server}', max_retries: 0}}\n",
    )
    _budget(task, max_iterations=1, timeout_s=4)
    started = time.monotonic()
    proc = atlas_cli("run", str(task), "--json", cwd=tmp_path, timeout=120)
    took = time.monotonic() - started
    summary = _summary(proc)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert summary["status"] == "budget_exhausted"
    assert "timeout_s" in (summary["stop_reason"] or "")
    assert took < 4 + summary["setup_s"] + 15


def test_the_clock_starts_when_the_run_s_own_work_starts(tmp_path: Path) -> None:
    """With tracing (MLflow's start-up is seconds) and `timeout_s: 2`, a run used to make 0 calls
    and say "used 2.7 of 2" while its own wall time was 0.3 s."""
    task = _task(tmp_path, tracing=True)
    _budget(task, max_iterations=1, timeout_s=2)
    proc = atlas_cli("run", str(task), "--model", "scripted", "--json", cwd=tmp_path)
    summary = _summary(proc)
    assert summary["model_calls"] > 5, proc.stderr[-2000:]
    assert summary["setup_s"] > 0
    assert summary["status"] == "passed"


# -- budgets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["sync", "async"])
@pytest.mark.parametrize("max_tokens", [5000, 7000])
def test_the_token_budget_binds_exactly_in_a_parallel_wave(
    tmp_path: Path, max_tokens: int, path: str
) -> None:
    """12 parallel steps, every call exactly 100 tokens. The run used to stop at 41% of the
    budget (calls in flight counted as already spent) or go 2.7 calls over. Now it spends up
    to the limit and stops within one call per parallel branch over it."""
    from atlas.runner import run
    from atlas.spec import TaskSpec

    per_call = 100
    spec = TaskSpec.from_dict(
        {
            "task": "Brief on the pilot.",
            "inputs": {
                "documents": [str(QUICK / "docs" / "*.md")],
                "data": [str(QUICK / "data" / "*.csv")],
            },
            "output": str(tmp_path / "out.md"),
            "budget": {"max_iterations": 1, "max_tokens": max_tokens, "max_steps": 30},
            "memory": {"enabled": False},
            "tracing": {"enabled": False},
        },
        base_dir=tmp_path,
    )
    model = "scripted?fanout=4&latency_ms=30&prompt_tokens=80&completion_tokens=20"
    if path == "sync":
        result = run(spec, model=model, state_dir_path=tmp_path / "state")
    else:
        import asyncio

        from atlas.runner import arun

        # The async path waits for room on the event loop (Budget.areserve); same bound.
        result = asyncio.run(
            asyncio.wait_for(arun(spec, model=model, state_dir_path=tmp_path / "state"), 120)
        )
    assert result.status == "budget_exhausted"
    branches = 12
    assert result.tokens >= max_tokens, "stopped before the budget was spent"
    assert result.tokens <= max_tokens + branches * per_call
    assert result.tokens == result.model_calls * per_call


def test_max_steps_stops_the_run(tmp_path: Path) -> None:
    """`max_steps: 1` used to let the run pass after 10 calls: the plan was cut to one step and
    nothing said the budget had stopped the rest."""
    task = _task(tmp_path)
    _budget(task, max_iterations=1, max_steps=1)
    log = tmp_path / "calls.jsonl"
    proc = atlas_cli(
        "run", str(task), "--model", f"scripted?call_log={log}", "--json", cwd=tmp_path
    )
    summary = _summary(proc)
    assert proc.returncode == 1
    assert summary["status"] == "budget_exhausted"
    assert "max_steps (1)" in summary["stop_reason"]
    assert "cut the plan from 3 to 1 steps" in summary["stop_reason"]
    # One step's calls, then the stop: no judge, no second plan.
    roles = [c["role"] for c in _log(log)]
    assert roles.count("planner") == 1 and "judge" not in roles
    assert summary["output"] and Path(summary["output"]).is_file()


# -- signals ---------------------------------------------------------------------------------


def _start_and_signal(tmp_path: Path, signals: list[tuple[float, int]]) -> tuple[int, str, str]:
    task = _task(tmp_path, memory=True)
    log = tmp_path / "calls.jsonl"
    model = f"scripted?latency_ms=120&call_log={log}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "atlas", "run", str(task), "--json", "--model", model],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    # Once the first wave's steps are done (the writing team routes), so there is work to keep.
    while not any("handoff:drafter" in c["tools"] for c in _log(log)):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    for delay, signum in signals:
        time.sleep(delay)
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


def _record(tmp_path: Path) -> dict[str, Any]:
    runs = json.loads(atlas_cli("runs", "--json", cwd=tmp_path).stdout)
    return dict(runs[0])


def test_sigterm_ends_a_run_cleanly(tmp_path: Path) -> None:
    """SIGTERM used to kill `run` at once: the record stayed `running`, no partial output."""
    code, out, err = _start_and_signal(tmp_path, [(0.0, signal.SIGTERM)])
    assert code == 143, err[-2000:]
    assert "Traceback" not in err
    assert _record(tmp_path)["status"] == "interrupted"
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["output"] and Path(summary["output"]).name == "brief.partial.md"
    resumed = atlas_cli("resume", summary["run_id"], "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]


@pytest.mark.parametrize("gap", [0.0, 0.05, 0.3])
def test_a_second_ctrl_c_does_not_crash_the_run(tmp_path: Path, gap: float) -> None:
    """A second Ctrl-C used to segfault the checkpointer, print 180 lines of "cannot schedule
    new futures after shutdown", or fail with "release unlocked lock"."""
    code, _, err = _start_and_signal(tmp_path, [(0.0, signal.SIGINT), (gap, signal.SIGINT)])
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "RuntimeError" not in err
    assert len(err.strip().splitlines()) < 40
    record = _record(tmp_path)
    assert record["status"] == "interrupted"
    resumed = atlas_cli("resume", record["run_id"], "--json", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _summary(resumed)["status"] == "passed"


# -- disks -----------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 3 MB tmpfs (needs root, as on CI)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_one_line_that_says_so(tmp_path: Path, small_disk: Path) -> None:
    task = _task(tmp_path)
    state = small_disk / "state"
    argv = ["run", str(task), "--quiet", "--state-dir", str(state), "--model", "scripted"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "atlas", *argv[:-1], "scripted?latency_ms=100"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.5)
    # Fill what is left of the disk while the run checkpoints.
    # (Unbuffered: a buffered file would raise again when it closes, flushing what did not fit.)
    with open(small_disk / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 65536)
        except OSError:
            pass
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-2000:]
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.startswith("atlas: error")]
    assert len(lines) == 1 and "disk is full" in lines[0]
