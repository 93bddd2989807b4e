"""`python -m atlas ui`: MLflow's UI on the runs' store, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import collections
import errno
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import IO, cast

from atlas._process import die_with_parent, stop, wait_for_http
from atlas.errors import AtlasError, SpecError
from atlas.runs import run_store, state_dir


def trace_url(base: str, experiment_id: str, trace_id: str) -> str:
    return f"{base}/#/experiments/{experiment_id}/traces?selectedEvaluationId={trace_id}"


def ui_command(tracking_uri: str, host: str, port: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        tracking_uri,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]


def check_port_range(port: int) -> None:
    """Raise SpecError unless `port` is a TCP port number (1..65535)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise SpecError(f"{port} is not a TCP port number (1 to 65535)", field="--port")


def check_port(host: str, port: int) -> None:
    """Raise SpecError unless `port` is free on `host` right now: it is bound once and released
    for the MLflow server. SO_REUSEADDR is set as the server (uvicorn) sets it: on Linux that
    still refuses a port another socket has bound or listens on, but not one whose old
    connections linger in TIME_WAIT after an earlier `atlas ui`, which the server can bind."""
    check_port_range(port)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise SpecError(f"cannot resolve host {host!r} ({exc.strerror})", field="--host") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise SpecError(f"port {port} on {host} is in use", field="--port") from None
            if exc.errno == errno.EACCES:
                raise SpecError(
                    f"port {port} on {host} needs privileges to bind", field="--port"
                ) from None
            raise SpecError(
                f"cannot listen on {host} port {port} ({exc.strerror})", field="--host"
            ) from None


class _Tail:
    """Reads a child's stderr: held back while the server starts (only its last line is
    shown if it exits then; ATLAS_DEBUG=1 shows all), passed through once it is up."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=200)
        self.passing = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode(errors="replace").rstrip()
            if self.passing.is_set():
                print(line, file=sys.stderr, flush=True)
            else:
                self.lines.append(line)

    def pass_through(self) -> None:
        self.passing.set()
        while self.lines:
            print(self.lines.popleft(), file=sys.stderr, flush=True)

    def last(self, timeout: float = 2.0) -> str:
        """The last non-blank line the child wrote (after it exited)."""
        self._thread.join(timeout)
        for line in reversed(self.lines):
            if line.strip():
                return " ".join(line.split())[:300]
        return ""


def serve(args: argparse.Namespace) -> int:
    check_port_range(args.port)
    directory = state_dir(args.state_dir)
    latest = run_store(directory).latest()
    uri = args.tracking_uri or (latest.tracking_uri if latest and latest.tracking_uri else None)
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{directory / 'mlflow.db'}"
    if uri.startswith("http"):
        from atlas.tracing.redact import public_url

        print(f"traces are on the tracking server {public_url(uri)}: open it there")
        return 0
    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///")):
        raise SpecError(f"no MLflow store at {uri}: run a task first", field="--state-dir")
    check_port(args.host, args.port)
    from atlas.tracing.mlflow import offline_defaults

    offline_defaults()
    base = f"http://{args.host}:{args.port}"
    proc = subprocess.Popen(
        ui_command(uri, args.host, args.port),
        stderr=subprocess.PIPE,
        preexec_fn=die_with_parent,
    )
    tail = _Tail(cast(IO[bytes], proc.stderr))
    if os.environ.get("ATLAS_DEBUG"):
        tail.pass_through()
    # SIGTERM ends `atlas ui` like Ctrl-C does, through the `finally` that stops the server.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        problem = wait_for_http(f"{base}/health", proc, 90.0)
        if problem is not None:
            if proc.poll() is not None:
                last = tail.last()
                said = f": {last}" if last else ""
                raise AtlasError(
                    f"the MLflow server exited with code {proc.returncode} while starting{said}"
                )
            raise AtlasError(f"the MLflow UI {problem}")
        tail.pass_through()
        print(f"MLflow UI: {base}", flush=True)
        if latest is not None and latest.trace_id:
            import mlflow

            client = mlflow.MlflowClient(uri)
            trace = client.get_trace(latest.trace_id)
            exp = trace.info.experiment_id
            url = trace_url(base, exp, latest.trace_id)
            print(f"latest run {latest.run_id}: {url}", flush=True)
        print("Ctrl-C to stop", flush=True)
        code = proc.wait()
        if code != 0:
            last = tail.last()
            raise AtlasError(f"the MLflow server stopped with code {code}: {last}")
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop(proc, signal.SIGINT)
