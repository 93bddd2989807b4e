"""ATLAS served by LangGraph's own server, `langgraph dev` (the back end of LangGraph Studio),
driven through LangGraph's SDK the way Studio drives it.

The server runs without `--allow-blocking`, so any blocking call ATLAS makes on the server's
event loop fails the run. It stays on 127.0.0.1: no browser, no reload, and none of its
phone-home calls (usage analytics, the PyPI version check, LangSmith tracing).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from atlas._process import die_with_parent, stop, wait_for_http
from tests.conftest import ROOT, free_port

pytestmark = pytest.mark.e2e

GRAPH = "atlas.langgraph_app:graph"
"""As a module path: the server imports it like any package (a file path would load a second
copy of the module under another name)."""

TASK: dict[str, Any] = {
    "task": "Write a short brief on the bike-share pilot.",
    "acceptance": ["States the total number of trips.", "Cites the notes."],
}

START_TIMEOUT_S = 180
"""Generous: about 5 s on an idle machine, but these machines are shared."""


@dataclass
class Server:
    url: str
    tracking_uri: str
    log: Path


def _server_env(tmp_path: Path, tracking_uri: str) -> dict[str, str]:
    """This process's environment without provider or LangSmith keys, offline and scripted."""
    dropped = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "MLFLOW_TRACKING_URI", "ATLAS_STATE_DIR")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in dropped and not k.startswith(("LANGSMITH_", "LANGCHAIN_", "LANGGRAPH_"))
    }
    env.update(
        {
            "ATLAS_MODEL": "scripted",
            "ATLAS_STATE_DIR": str(tmp_path / "state"),
            "MLFLOW_TRACKING_URI": tracking_uri,
            # The CLI reports each command to LangChain's analytics unless told not to.
            "LANGGRAPH_CLI_NO_ANALYTICS": "1",
            # The server asks PyPI for a newer langgraph-api at start unless told not to.
            "LANGGRAPH_NO_VERSION_CHECK": "true",
            "LANGSMITH_TRACING": "false",
            "LOG_COLOR": "false",  # a readable log tail in failure messages
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _tail(log: Path, lines: int = 60) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture
def langgraph_server(tmp_path: Path) -> Iterator[Server]:
    """`langgraph dev` serving ATLAS's graph on a free port of 127.0.0.1."""
    with _serve(tmp_path) as server:
        yield server


@contextlib.contextmanager
def _serve(tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    """`langgraph dev` serving ATLAS's graph on a free port of 127.0.0.1, with `env` added to
    its environment.

    It runs in `tmp_path`, where it keeps its own state (`.langgraph_api/`); `dependencies`
    puts the repository on its import path, so a fresh clone works too."""
    # The repository's own langgraph.json, with its "." made absolute (the server runs here).
    settings = json.loads((ROOT / "langgraph.json").read_text())
    assert settings["graphs"]["atlas"] == GRAPH
    settings["dependencies"] = [str(ROOT)]
    config = tmp_path / "langgraph.json"
    config.write_text(json.dumps(settings))
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    port = free_port()
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "langgraph_cli", "dev", "--config", str(config)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--no-browser", "--no-reload"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            command,
            cwd=tmp_path,
            env={**_server_env(tmp_path, tracking_uri), **(env or {})},
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=die_with_parent,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        # /ok answers once the graph is imported and registered.
        problem = wait_for_http(f"{url}/ok", proc, timeout=START_TIMEOUT_S)
        assert problem is None, f"langgraph dev {problem}:\n{_tail(log)}"
        yield Server(url, tracking_uri, log)
    finally:
        stop(proc)


def _traces(tracking_uri: str) -> list[Any]:
    """Every trace in the store's `atlas` experiment (a client of its own: no global URI)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("atlas")
    assert experiment is not None, f"no 'atlas' experiment in {tracking_uri}"
    return list(client.search_traces(locations=[experiment.experiment_id]))


async def test_studio_server_runs_a_task_to_a_passed_verdict_with_a_trace(
    langgraph_server: Server,
) -> None:
    """What a Studio user does: open the graph (its input and output forms come from the
    schemas), start a run on a new thread with a task and its criteria, watch its values
    stream, then find the run's trace in MLflow."""
    from langgraph_sdk import get_client

    server = langgraph_server
    async with get_client(url=server.url, api_key=None) as client:
        (assistant,) = await client.assistants.search(graph_id="atlas")
        schemas = await client.assistants.get_schemas(assistant["assistant_id"])
        assert schemas["input_schema"] is not None, _tail(server.log)
        assert schemas["output_schema"] is not None, _tail(server.log)
        assert {"task", "acceptance"} <= set(schemas["input_schema"]["properties"])

        thread = await client.threads.create()
        values: list[dict[str, Any]] = []
        errors: list[Any] = []
        async for part in client.runs.stream(
            thread["thread_id"], "atlas", input=TASK, stream_mode="values"
        ):
            if part.event == "values":
                values.append(part.data)
            elif part.event == "error":
                errors.append(part.data)
        # The stream says only "An internal error occurred"; the reason is in the server's log.
        assert not errors, f"{errors}\n{_tail(server.log)}"
        (run,) = await client.runs.list(thread["thread_id"])
        assert run["status"] == "success", _tail(server.log)
        state = await client.threads.get_state(thread["thread_id"])

    final = values[-1]
    assert final["status"] == "passed", final
    assert isinstance(state["values"], dict) and state["values"]["status"] == "passed"
    traces = _traces(server.tracking_uri)
    trace = next((t for t in traces if t.info.trace_id == final["trace_id"]), None)
    assert trace is not None, f"trace {final['trace_id']} not in {server.tracking_uri}"
    assert trace.info.tags.get("atlas.run_id") == final["run_id"]


async def test_studio_server_pauses_for_approval_and_resumes_by_interrupt_id(
    tmp_path: Path,
) -> None:
    """A task whose plan and email need approval, served by `langgraph dev`: the run stops on
    an interrupt the server shows in the thread's state; a `Command(resume={id: ...})` run, as
    Studio sends it, moves it on to the email, and a second one finishes it. The email is sent
    once."""
    import shutil

    from langgraph_sdk import get_client

    folder = tmp_path / "approvals"
    shutil.copytree(ROOT / "examples" / "approvals", folder)
    outbox = tmp_path / "outbox.jsonl"
    env = {"ATLAS_TASK": str(folder / "task.yaml"), "OUTBOX_FILE": str(outbox)}
    task = {"task": "Order 12 kg of espresso beans from the supplier by email, then say so."}
    with _serve(tmp_path, env) as server:
        async with get_client(url=server.url, api_key=None) as client:
            thread = await client.threads.create()
            tid = thread["thread_id"]

            async def drive(**kwargs: Any) -> list[dict[str, Any]]:
                errors = []
                async for part in client.runs.stream(tid, "atlas", stream_mode="values", **kwargs):
                    if part.event == "error":
                        errors.append(part.data)
                assert not errors, f"{errors}\n{_tail(server.log)}"
                state = await client.threads.get_state(tid)
                return list(state.get("interrupts") or [])

            (plan,) = await drive(input=task)
            assert plan["value"]["items"][0]["kind"] == "plan", plan
            (tool,) = await drive(command={"resume": {plan["id"]: "approve"}})
            assert tool["value"]["items"][0]["tool"] == "send_email", tool
            assert not outbox.exists()
            done = await drive(
                command={"resume": {tool["id"]: {"action": "approve", "by": "studio"}}}
            )
            assert done == []
            state = await client.threads.get_state(tid)
    assert state["values"]["status"] == "passed", state["values"]
    assert len(outbox.read_text().splitlines()) == 1
    decided = [a["by"] for a in state["values"]["approvals"]]
    assert decided == ["unknown", "studio"]
