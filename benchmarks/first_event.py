"""How soon a web client sees a run start: the FastAPI example (examples/fastapi_app) served by
uvicorn on 127.0.0.1, dry run (`scripted`), one request at a time.

Each request is timed from just before it is sent to the first server-sent event parsed (what
a user's page would show first), and to the `end` event. One warm-up request comes first: the
first run of a process creates the MLflow store and loads the embedder, which a long-lived
server pays once. The figures are medians over the timed requests, in milliseconds.

`python -m benchmarks.first_event [REQUESTS]` prints them as JSON.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from atlas._process import die_with_parent, stop, wait_for_http

APP_DIR = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app"
GOAL_MS = 500.0
TASK = "Write a short brief on the bike-share pilot's usage."


@contextmanager
def serve(state: Path, model: str) -> Iterator[str]:
    """`uvicorn app:app` on a free port of 127.0.0.1; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    dropped = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "MLFLOW_TRACKING_URI", "ATLAS_TASK")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update({"ATLAS_MODEL": model, "ATLAS_STATE_DIR": str(state)})
    command = [sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(APP_DIR)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    log = state.parent / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, cwd=state.parent, env=env, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        problem = wait_for_http(f"{url}/openapi.json", proc, timeout=120)
        if problem:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"uvicorn {problem}:\n{tail}")
        yield url
    finally:
        stop(proc)


def _timed_request(client: httpx.Client, task: str) -> tuple[float, float, str, str]:
    """(ms to the first event, ms to `end`, the first event's type, the run's status)."""
    started = time.perf_counter()
    first_ms, first_type, data = 0.0, "", ""
    with client.stream("POST", "/runs", json={"task": task}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data:"):
                data = line.removeprefix("data:").strip()
            elif not line and data:
                event = json.loads(data)
                if not first_type:
                    first_ms = (time.perf_counter() - started) * 1000
                    first_type = event["type"]
                if event["type"] == "end":
                    return (
                        first_ms,
                        (time.perf_counter() - started) * 1000,
                        first_type,
                        event["status"],
                    )
                data = ""
    raise RuntimeError("the stream closed before its end event")


def bench_first_event(requests: int = 10, model: str = "scripted") -> dict[str, Any]:
    """Medians over `requests` sequential requests, after one warm-up: ms to the first event
    and to the end; the goal is the first event within 0.5 s."""
    first: list[float] = []
    end: list[float] = []
    kinds: Counter[str] = Counter()
    with tempfile.TemporaryDirectory(prefix="atlas-first-event-") as tmp:
        state = Path(tmp) / "state"
        with serve(state, model) as url, httpx.Client(base_url=url, timeout=300) as client:
            warm_first, warm_end, _, status = _timed_request(client, TASK)
            if status != "passed":
                raise RuntimeError(f"the warm-up run ended {status}")
            for n in range(requests):
                first_ms, end_ms, kind, status = _timed_request(client, f"{TASK} (#{n})")
                if status != "passed":
                    raise RuntimeError(f"request {n} ended {status}")
                first.append(first_ms)
                end.append(end_ms)
                kinds[kind] += 1
    median_first = statistics.median(first)
    return {
        "workload": f"POST /runs on the FastAPI example, {model}, {requests} requests after "
        "one warm-up",
        "first_event_ms": round(median_first, 1),
        "end_ms": round(statistics.median(end), 1),
        "first_event_type": kinds.most_common(1)[0][0],
        "warmup_first_event_ms": round(warm_first, 1),
        "warmup_end_ms": round(warm_end, 1),
        "goal": f"first event <= {GOAL_MS:g} ms",
        "met": median_first <= GOAL_MS,
        "samples": {
            "first_event_ms": [round(x, 1) for x in first],
            "end_ms": [round(x, 1) for x in end],
        },
    }


if __name__ == "__main__":
    print(json.dumps(bench_first_event(int(sys.argv[1]) if len(sys.argv) > 1 else 10), indent=2))
