"""`python -m atlas ui`: MLflow's UI on the runs' store, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys

from atlas._process import die_with_parent, stop, wait_for_http
from atlas.errors import AtlasError, SpecError
from atlas.runs import RunStore, state_dir


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


def serve(args: argparse.Namespace) -> int:
    directory = state_dir(args.state_dir)
    latest = RunStore(directory).latest()
    uri = args.tracking_uri or (latest.tracking_uri if latest and latest.tracking_uri else None)
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{directory / 'mlflow.db'}"
    if uri.startswith("http"):
        print(f"traces are on the tracking server {uri}: open it there")
        return 0
    if uri.startswith("sqlite:///") and not os.path.exists(uri.removeprefix("sqlite:///")):
        raise SpecError(f"no MLflow store at {uri}: run a task first", field="--state-dir")
    from atlas.tracing.mlflow import offline_defaults

    offline_defaults()
    base = f"http://{args.host}:{args.port}"
    proc = subprocess.Popen(ui_command(uri, args.host, args.port), preexec_fn=die_with_parent)
    # SIGTERM ends `atlas ui` like Ctrl-C does, through the `finally` that stops the server.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        problem = wait_for_http(f"{base}/health", proc, 90.0)
        if problem is not None:
            raise AtlasError(f"the MLflow UI {problem}")
        print(f"MLflow UI: {base}", flush=True)
        if latest is not None and latest.trace_id:
            import mlflow

            client = mlflow.MlflowClient(uri)
            trace = client.get_trace(latest.trace_id)
            exp = trace.info.experiment_id
            url = trace_url(base, exp, latest.trace_id)
            print(f"latest run {latest.run_id}: {url}", flush=True)
        print("Ctrl-C to stop", flush=True)
        return proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(proc, signal.SIGINT)
