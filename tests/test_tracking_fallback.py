"""A tracking store that cannot take the trace costs a run a few seconds and one warning line,
never the trace: read-only, missing and corrupt SQLite stores, a server whose API hangs, a server
that dies mid-run. MLflow's own log noise is one line per problem, and no tracking URL's password
is printed. `atlas ui` refuses impossible and busy ports in one line."""

from __future__ import annotations

import contextlib
import http.server
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import atlas
from tests.conftest import EXAMPLES, ROOT, atlas_cli, free_port, record_figure

PASSWORD = "s3cretPASSatlas"


def _spec(make_spec: Callable[..., Any]) -> Any:
    return make_spec(
        tracing={"enabled": True, "experiment": "atlas-fallback"}, memory={"enabled": False}
    )


def _task_file(tmp_path: Path) -> Path:
    """A quick dry-run task (no memory) whose output lands in tmp_path."""
    docs = EXAMPLES / "quickstart"
    path = tmp_path / "task.yaml"
    path.write_text(
        "task: Write a short brief on the bike-share pilot.\n"
        "acceptance: [States the total number of trips.]\n"
        f"inputs: {{documents: ['{docs}/docs/*.md'], data: ['{docs}/data/*.csv']}}\n"
        f"output: '{tmp_path}/out/brief.md'\n"
        "memory: {enabled: false}\n"
        "budget: {max_iterations: 1}\n"
    )
    return path


def _run(
    make_spec: Callable[..., Any], state: Path, uri: str | None = None
) -> tuple[Any, list[dict[str, Any]], float]:
    events: list[dict[str, Any]] = []
    started = time.monotonic()
    result = atlas.run(
        _spec(make_spec),
        model="scripted",
        state_dir_path=state,
        on_event=events.append,
        tracking_uri=uri,
    )
    return result, [e for e in events if e["event"] == "warning"], time.monotonic() - started


def _stored(result: Any) -> Any:
    import mlflow

    return mlflow.MlflowClient(result.tracking_uri).get_trace(result.trace_id)


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """Make `path` unwritable, for root too (the immutable flag; root ignores mode bits)."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], check=True)
        try:
            yield
        finally:
            subprocess.run(["chattr", "-i", str(path)], check=True)
    else:
        mode = path.stat().st_mode
        path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield
        finally:
            path.chmod(mode)


def _check_fallback(
    result: Any,
    warnings: list[dict[str, Any]],
    state: Path,
    seconds: float,
    reference: float,
    stderr: str,
) -> None:
    local = f"sqlite:///{state / 'mlflow.db'}"
    assert result.status == "passed"
    assert len(warnings) == 1, warnings
    assert local in warnings[0]["message"]
    assert result.tracking_uri == local
    assert _stored(result).info.trace_id == result.trace_id
    assert seconds < reference + 5, (seconds, reference)
    noisy = [line for line in stderr.splitlines() if "WARNING" in line or "Traceback" in line]
    assert not noisy, noisy


@pytest.fixture
def reference_s(make_spec: Callable[..., Any], tmp_path: Path) -> float:
    """Seconds of the same dry run on a fresh local store, the yardstick for a fallback (after a
    first run, so that neither pays for this process's first imports)."""
    _run(make_spec, tmp_path / "warm-up")
    result, warnings, seconds = _run(make_spec, tmp_path / "reference")
    assert result.status == "passed" and not warnings
    return seconds


@pytest.mark.parametrize("what", ["directory", "file"])
def test_read_only_sqlite_store_falls_back(
    what: str,
    make_spec: Callable[..., Any],
    state_dir: Path,
    tmp_path: Path,
    reference_s: float,
    capfd: pytest.CaptureFixture[str],
) -> None:
    store = tmp_path / "readonly"
    store.mkdir()
    db = store / "mlflow.db"
    if what == "file":
        db.write_bytes(b"")
    target = store if what == "directory" else db
    capfd.readouterr()
    with _read_only(target):
        result, warnings, seconds = _run(make_spec, state_dir, f"sqlite:///{db}")
    record_figure(f"tracking_fallback_read_only_{what}_s", round(seconds - reference_s, 2))
    _check_fallback(result, warnings, state_dir, seconds, reference_s, capfd.readouterr().err)
    assert str(db) in warnings[0]["message"] and "writ" in warnings[0]["message"]


def test_sqlite_store_in_missing_directory_is_not_created(
    make_spec: Callable[..., Any],
    state_dir: Path,
    tmp_path: Path,
    reference_s: float,
    capfd: pytest.CaptureFixture[str],
) -> None:
    missing = tmp_path / "nonexistent-dir"
    capfd.readouterr()
    result, warnings, seconds = _run(make_spec, state_dir, f"sqlite:///{missing}/x/mlflow.db")
    record_figure("tracking_fallback_missing_dir_s", round(seconds - reference_s, 2))
    assert not missing.exists(), "the run created the missing directory"
    _check_fallback(result, warnings, state_dir, seconds, reference_s, capfd.readouterr().err)
    assert "does not exist" in warnings[0]["message"]


def test_corrupt_sqlite_store_falls_back(
    make_spec: Callable[..., Any],
    state_dir: Path,
    tmp_path: Path,
    reference_s: float,
    capfd: pytest.CaptureFixture[str],
) -> None:
    bad = tmp_path / "bad" / "mlflow.db"
    bad.parent.mkdir()
    bad.write_bytes(b"this is not a database, whatever its name says" * 100)
    capfd.readouterr()
    result, warnings, seconds = _run(make_spec, state_dir, f"sqlite:///{bad}")
    _check_fallback(result, warnings, state_dir, seconds, reference_s, capfd.readouterr().err)
    # The same store past ATLAS's checks, straight to MLflow: its ten retries (about 100 s) are
    # bounded too, so a failure no check foresaw still falls back in seconds.
    from atlas.tracing.mlflow import _try_setup

    started = time.monotonic()
    experiment_id, problem = _try_setup(f"sqlite:///{bad}", "atlas-fallback", tmp_path / "bad")
    assert experiment_id is None and problem
    assert time.monotonic() - started < 3
    assert bad.read_bytes().startswith(b"this is not a database")


def test_refused_server_password_is_never_printed(
    make_spec: Callable[..., Any],
    state_dir: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    uri = f"http://admin:{PASSWORD}@127.0.0.1:{free_port()}"
    capfd.readouterr()
    # No event handler: the warning is a log record (on stderr outside pytest).
    result = atlas.run(
        _spec(make_spec), model="scripted", state_dir_path=state_dir, tracking_uri=uri
    )
    err = capfd.readouterr().err
    assert result.status == "passed" and result.trace_id
    warned = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1, caplog.text
    assert "[REDACTED]" in warned[0].getMessage()
    assert PASSWORD not in err + caplog.text
    assert PASSWORD not in json.dumps(result.to_dict())


def test_mlflow_log_noise_is_one_line_per_problem(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow  # noqa: F401  (configures MLflow's loggers)

    from atlas.tracing.mlflow import QUIET, quiet_mlflow_logs

    quiet_mlflow_logs()
    QUIET.reset()
    exporter = logging.getLogger("mlflow.tracing.export.mlflow_v3")
    store = logging.getLogger("mlflow.store.db.utils")

    def fail(i: int) -> None:
        try:
            raise ConnectionError(f"http://admin:{PASSWORD}@127.0.0.1:9/x refused\nmore detail")
        except ConnectionError:
            exporter.warning("Failed to send trace to MLflow backend (try %d)", i, exc_info=True)

    for i in range(20):
        fail(i)
        store.warning("SQLAlchemy engine could not be created.\nretry in %.1f seconds", i / 10)
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 2, err
    assert "Traceback" not in err and PASSWORD not in err
    # ATLAS_DEBUG keeps MLflow's whole text, traceback included.
    monkeypatch.setenv("ATLAS_DEBUG", "1")
    fail(99)
    assert "Traceback" in capfd.readouterr().err
    QUIET.reset()


class _HangingApi(http.server.BaseHTTPRequestHandler):
    """/health answers at once; every other path hangs for a minute."""

    def do_GET(self) -> None:
        if self.path.startswith("/health"):
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")
            return
        time.sleep(60)

    do_POST = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def hanging_api() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HangingApi)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


def _summary(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_server_whose_api_hangs_falls_back_quickly(hanging_api: int, tmp_path: Path) -> None:
    task = _task_file(tmp_path)
    started = time.monotonic()
    local = atlas_cli(
        "run", str(task), "--model", "scripted", "--json", "--state-dir", str(tmp_path / "a")
    )
    reference = time.monotonic() - started
    assert local.returncode == 0, local.stderr[-2000:]

    url = f"http://admin:{PASSWORD}@127.0.0.1:{hanging_api}"
    state = tmp_path / "b"
    started = time.monotonic()
    proc = atlas_cli(
        "run",
        str(task),
        "--model",
        "scripted",
        "--json",
        "--tracking-uri",
        url,
        "--state-dir",
        str(state),
    )
    seconds = time.monotonic() - started
    record_figure("tracking_fallback_hanging_api_s", round(seconds - reference, 2))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert seconds < reference + 5, (seconds, reference)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "tracking" in warnings[0], proc.stderr
    assert "WARNING" not in proc.stderr and "Traceback" not in proc.stderr
    assert PASSWORD not in proc.stderr + proc.stdout
    summary = _summary(proc)
    assert summary["tracking_uri"] == f"sqlite:///{state / 'mlflow.db'}"
    import mlflow

    trace = mlflow.MlflowClient(summary["tracking_uri"]).get_trace(summary["trace_id"])
    assert trace.info.trace_id == summary["trace_id"]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A real `mlflow server` on a free 127.0.0.1 port, in its own process group."""
    from atlas._process import wait_for_http
    from atlas.tracing.ui import ui_command

    home = tmp_path / "server"
    home.mkdir()
    port = free_port()
    command = ui_command(f"sqlite:///{home / 'mlflow.db'}", "127.0.0.1", port)
    proc = subprocess.Popen(
        command,
        cwd=home,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        problem = wait_for_http(f"http://127.0.0.1:{port}/health", proc, 120)
        assert problem is None, problem
        yield f"http://127.0.0.1:{port}", proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_server_dying_mid_run_costs_one_line_not_the_run(
    mlflow_server: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    base, server = mlflow_server
    url = base.replace("http://", f"http://admin:{PASSWORD}@")
    task = _task_file(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    env.pop("MLFLOW_TRACKING_URI", None)
    run = subprocess.Popen(
        [
            *(sys.executable, "-m", "atlas", "run", str(task), "--json"),
            *("--model", "scripted?latency_ms=300", "--tracking-uri", url),
            *("--state-dir", str(tmp_path / "state")),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert run.stderr is not None
    seen: list[str] = []
    for line in run.stderr:
        seen.append(line)
        if line.startswith("plan ("):
            break
    assert any(line.startswith("plan (") for line in seen), "".join(seen)
    os.killpg(server.pid, signal.SIGKILL)
    out, rest = run.communicate(timeout=300)
    err = "".join(seen) + rest
    assert run.returncode in (0, 1), err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    mentions = [line for line in err.splitlines() if "mlflow" in line.lower()]
    assert len(mentions) < 5, mentions
    assert PASSWORD not in err + out
    summary = json.loads(out.strip().splitlines()[-1])
    assert Path(summary["output"]).is_file()
    assert summary["trace_id"] is None and "warning: trace not stored:" in err
    assert PASSWORD not in (summary["tracking_uri"] or "")


def _store(state: Path) -> None:
    """An MLflow store in the state directory, as a first run leaves it."""
    import mlflow

    mlflow.MlflowClient(f"sqlite:///{state / 'mlflow.db'}").search_experiments()


@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_ui_refuses_a_port_that_cannot_exist(port: str, state_dir: Path) -> None:
    _store(state_dir)
    started = time.monotonic()
    proc = atlas_cli("ui", "--port", port, "--state-dir", str(state_dir), timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "--port" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "http://" not in proc.stdout
    assert time.monotonic() - started < 10


def test_ui_on_a_busy_port_says_so_at_once(state_dir: Path) -> None:
    _store(state_dir)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        started = time.monotonic()
        proc = atlas_cli("ui", "--port", str(port), "--state-dir", str(state_dir), timeout=120)
        seconds = time.monotonic() - started
    record_figure("ui_busy_port_s", round(seconds, 2))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"atlas: error: --port: port {port} on 127.0.0.1 is in use"
    ]
    assert seconds < 5


def test_ui_server_exiting_on_start_names_its_last_line(state_dir: Path) -> None:
    _store(state_dir)
    port = free_port()
    proc = atlas_cli(
        "ui",
        "--port",
        str(port),
        "--tracking-uri",
        "nosuchscheme://store",
        "--state-dir",
        str(state_dir),
        timeout=180,
    )
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "exited with code 1 while starting" in lines[0] and "nosuchscheme" in lines[0]
    assert "Traceback" not in proc.stderr
