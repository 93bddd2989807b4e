"""The FastAPI example (examples/fastapi_app) served for real by uvicorn and used as a web client
uses it: concurrent streamed runs that stay apart, a client that hangs up, and bad input refused
before any model call."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from atlas._process import die_with_parent, stop, wait_for_http
from atlas.runs import RunStore
from tests.conftest import EXAMPLES, free_port

APP_DIR = EXAMPLES / "fastapi_app"

TASK_A = "Count the bike-share trips per month in the pilot data."
TASK_B = "Summarise what riders said about the e-bikes in the pilot notes."
HANG_UP = "Write a long report on the pilot's maintenance problems."

START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 300
"""Generous: a warm dry run takes a few seconds, the first one (MLflow's store, the embedder)
ten or more, and these machines are shared."""


@dataclass
class Server:
    url: str
    state: Path
    log: Path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`uvicorn app:app` as a user starts it, on a free port of 127.0.0.1, with a dry-run model
    slow enough (100 ms a call) for two runs to overlap and a client to hang up mid-run."""
    tmp = tmp_path_factory.mktemp("fastapi_app")
    dropped = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "MLFLOW_TRACKING_URI", "ATLAS_TASK")
    env = {k: v for k, v in os.environ.items() if k not in dropped}
    env.update(
        {
            "ATLAS_MODEL": "scripted?latency_ms=100",
            "ATLAS_STATE_DIR": str(tmp / "state"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "app:app", "--app-dir", str(APP_DIR)]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    log = tmp / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command, cwd=tmp, env=env, stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        problem = wait_for_http(f"{url}/openapi.json", proc, timeout=START_TIMEOUT_S)
        assert problem is None, f"uvicorn {problem}:\n{_tail(log)}"
        yield Server(url, tmp / "state", log)
    finally:
        stop(proc)


def _tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


async def _sse(response: httpx.Response) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """(event name, data) of each server-sent event; unnamed events are `message`."""
    name, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith("event:"):
            name = line.removeprefix("event:").strip()
        elif line.startswith("data:"):
            data += line.removeprefix("data:").strip()
        elif not line and data:
            yield name, json.loads(data)
            name, data = "message", ""


async def _run(client: httpx.AsyncClient, body: dict[str, Any]) -> list[tuple[str, Any]]:
    """POST /runs and read its stream to the end."""
    async with client.stream("POST", "/runs", json=body) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        return [event async for event in _sse(response)]


def _client(server: Server) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=server.url, timeout=RUN_TIMEOUT_S)


def _recalled_runs(server: Server, end: dict[str, Any]) -> set[str]:
    """The runs whose findings or outputs the run's `memory.recall:*` spans returned."""
    import mlflow

    uri = RunStore(server.state).get(end["run_id"]).tracking_uri
    trace = mlflow.MlflowClient(uri).get_trace(end["trace_id"])
    runs: set[str] = set()
    for span in trace.data.spans:
        if span.name.startswith("memory.recall"):
            for doc in span.outputs or []:
                kind, _, rest = str(doc["id"]).partition(":")
                if kind in ("finding", "output"):
                    runs.add(rest.split(":")[0].split("#")[0])
    return runs


async def test_two_concurrent_requests_stream_two_runs_that_stay_apart(server: Server) -> None:
    async with _client(server) as client:
        # An earlier run in namespace alpha, for the concurrent ones to recall (or not).
        seed = (await _run(client, {"task": TASK_A, "namespace": "alpha"}))[-1][1]
        assert seed["status"] == "passed", seed
        a, b = await asyncio.wait_for(
            asyncio.gather(
                _run(client, {"task": TASK_A, "namespace": "alpha"}),
                _run(client, {"task": TASK_B, "namespace": "beta"}),
            ),
            RUN_TIMEOUT_S,
        )
    ends = {}
    for events, task, other in ((a, TASK_A, TASK_B), (b, TASK_B, TASK_A)):
        kinds = [data["type"] for _, data in events]
        assert kinds[-1] == "end" and events[-1][0] == "end"
        assert {"plan", "dispatch", "step_start", "step_done", "verdict", "finalize"} <= set(kinds)
        assert all(name == "message" for name, _ in events[:-1])
        plan = next(data for _, data in events if data["type"] == "plan")
        instructions = " ".join(step["instruction"] for step in plan["steps"])
        assert task in instructions and other not in instructions
        end = events[-1][1]
        assert end["status"] == "passed", end
        assert end["output"].startswith(f"# {task}") and other not in end["output"]
        assert end["trace_id"]
        ends[task] = end
    end_a, end_b = ends[TASK_A], ends[TASK_B]
    # They ran at once: each planned before the other finalized.
    ts = {
        (task, kind): next(d["ts"] for _, d in events if d["type"] == kind)
        for events, task in ((a, TASK_A), (b, TASK_B))
        for kind in ("plan", "finalize")
    }
    assert ts[TASK_A, "plan"] < ts[TASK_B, "finalize"]
    assert ts[TASK_B, "plan"] < ts[TASK_A, "finalize"]
    # Two runs, two records, two output files.
    store = RunStore(server.state)
    record_a, record_b = store.get(end_a["run_id"]), store.get(end_b["run_id"])
    assert record_a.run_id != record_b.run_id
    assert record_a.status == record_b.status == "passed"
    assert end_a["output_path"] != end_b["output_path"]
    written = await asyncio.to_thread(Path(end_b["output_path"]).read_text)
    assert written.rstrip() == end_b["output"].rstrip()
    # Memory stayed apart: A (alpha) recalled the earlier alpha run and nothing of B's; B (beta)
    # recalled nothing of alpha's, neither the finished seed run nor A's unfinished findings.
    recalled_a = await asyncio.to_thread(_recalled_runs, server, end_a)
    recalled_b = await asyncio.to_thread(_recalled_runs, server, end_b)
    assert recalled_a == {seed["run_id"]}
    assert recalled_b == set()


async def test_a_client_that_hangs_up_mid_stream_leaves_the_run_interrupted(
    server: Server,
) -> None:
    async with _client(server) as client:
        async with client.stream("POST", "/runs", json={"task": HANG_UP}) as response:
            assert response.status_code == 200
            async for _, data in _sse(response):
                if data["type"] == "step_start":
                    break  # and leave: the connection closes mid-run
    store = RunStore(server.state)
    deadline = time.monotonic() + 120
    while True:
        mine = [r for r in store.list() if HANG_UP in r.spec_json]
        if (mine and mine[0].status != "running") or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert mine, "the run left no record"
    (record,) = mine
    assert record.status == "interrupted", _tail(server.log)
    assert record.finished_at is not None
    async with _client(server) as client:
        got = (await client.get(f"/runs/{record.run_id}")).json()
    assert got["run_id"] == record.run_id and got["status"] == "interrupted"


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        ({"tsak": "typo"}, 422, "task: Field required"),
        ({"task": "   "}, 400, "needs a 'task'"),
        (
            {"task": "ok", "acceptance": "not a list"},
            422,
            "acceptance: Input should be a valid list",
        ),
        ({"task": "ok", "namespace": "user 42"}, 400, "namespace"),
    ],
)
async def test_bad_input_is_one_line_and_starts_no_run(
    server: Server, body: dict[str, Any], code: int, message: str
) -> None:
    before = len(RunStore(server.state).list(limit=1000))
    async with _client(server) as client:
        response = await client.post("/runs", json=body)
        missing = await client.get("/runs/no-such-run")
    assert response.status_code == code
    detail = response.json()["detail"]
    assert message in detail and "\n" not in detail
    assert len(RunStore(server.state).list(limit=1000)) == before
    assert missing.status_code == 404 and missing.json() == {"detail": "no run 'no-such-run'"}
