"""ATLAS behind a web API: one compiled graph serves every request, each request is a run, and
the run's progress streams back as server-sent events.

    uvicorn app:app --app-dir examples/fastapi_app

- `POST /runs` with `{"task": ..., "acceptance"?: [...], "namespace"?: ...}` answers
  `text/event-stream`: one `data: <json>` per ATLAS event (plan, dispatch, step_start, handoff,
  step_done, verdict, finalize, warning...), then `event: end` whose data is the run's output
  (status, output, run_id, trace_id...). A client that hangs up cancels the run: it is recorded
  `interrupted`, with its partial output.
- `GET /runs/{run_id}` returns the run's record.

Settings, read once at start: `ATLAS_TASK` (the task file whose teams, models, memory, tracing
and budget every request starts from; default the quickstart's), `ATLAS_MODEL` (default the task
file's) and `ATLAS_STATE_DIR` (run records, outputs, traces, memory; default
`~/.local/state/atlas`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

import atlas
from atlas.embed import AtlasGraph, default_state_dir, spec_for
from atlas.errors import AmbiguousRun, RunNotFound, SpecError
from atlas.events import EVENT_TYPES
from atlas.graph.io import AtlasOutput
from atlas.runs import RunStore, state_dir

QUICKSTART = Path(__file__).resolve().parent.parent / "quickstart" / "task.yaml"


class RunRequest(BaseModel):
    """One task for the graph; everything else comes from the task file."""

    model_config = ConfigDict(extra="forbid")

    task: str = Field(min_length=1, description="What to do, in plain words.")
    acceptance: list[str] | None = Field(
        None, description="Criteria the judge checks; the task file's when left out."
    )
    namespace: str | None = Field(
        None,
        description="The memory partition this run reads and writes (letters, digits, "
        "underscores); the task file's when left out.",
    )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Build the one graph all requests share (compiling it per request would cost more than
    the run's set-up)."""
    app.state.state_dir = state_dir(default_state_dir())
    app.state.graph = atlas.build_graph(
        atlas.load_task(os.environ.get("ATLAS_TASK") or QUICKSTART),
        model=os.environ.get("ATLAS_MODEL") or None,
        state_dir=app.state.state_dir,
    )
    yield


app = FastAPI(title="ATLAS", lifespan=lifespan)


@app.exception_handler(RequestValidationError)
async def one_line_422(request: Request, exc: RequestValidationError) -> JSONResponse:
    """`task: Field required` rather than FastAPI's list of error objects."""
    problems = [
        f"{'.'.join(p for p in error['loc'][1:] if isinstance(p, str)) or 'body'}: {error['msg']}"
        for error in exc.errors()
    ]
    return JSONResponse({"detail": "; ".join(problems)}, status_code=422)


@app.post("/runs", response_class=StreamingResponse)
async def start_run(body: RunRequest, request: Request) -> StreamingResponse:
    graph: AtlasGraph = request.app.state.graph
    task = body.model_dump(exclude_none=True)
    # The checks the run makes at its start, made here while an HTTP error can still be sent
    # (once the stream has begun, the status is 200). In a thread: it globs the task's files.
    try:
        await asyncio.to_thread(
            spec_for, graph.atlas_defaults.spec, task, request.app.state.state_dir
        )
    except SpecError as exc:
        raise HTTPException(400, _one_line(exc)) from None
    return StreamingResponse(
        _sse_events(graph, task),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


@app.get("/runs/{run_id}")
def get_run(run_id: str, request: Request) -> dict[str, Any]:
    """The run's record (status, output path, tokens, trace id...), without the spec it ran."""
    try:
        record = RunStore(request.app.state.state_dir).get(run_id)
    except (RunNotFound, AmbiguousRun):
        record = None
    if record is None or record.run_id != run_id:  # an id, not a prefix
        raise HTTPException(404, f"no run {run_id!r}")
    return {k: v for k, v in dataclasses.asdict(record).items() if k != "spec_json"}


OUTPUT_FIELDS = tuple(AtlasOutput.__annotations__)


async def _sse_events(graph: AtlasGraph, task: Mapping[str, Any]) -> AsyncIterator[str]:
    """The run's events as they happen, then its output. `subgraphs=True`: the teams' events
    (handoff, step_done...) come from their subgraphs. Of the "values" stream (the graph's
    state after each step) only the top graph's last value is kept: the output."""
    final: dict[str, Any] = {}
    parts = graph.astream(task, stream_mode=["custom", "values"], subgraphs=True)
    try:
        async for namespace, mode, part in parts:
            if mode == "custom" and isinstance(part, dict) and part.get("type") in EVENT_TYPES:
                yield _sse(part)  # ATLAS's events; not what a user's tool may write
            elif mode == "values" and not namespace:
                final = part
    except Exception as exc:  # the response has begun: the client learns of it in the stream
        yield _sse({"type": "error", "error": _one_line(exc)}, event="error")
        return
    yield _sse({"type": "end", **{k: final.get(k) for k in OUTPUT_FIELDS}}, event="end")


def _sse(data: Mapping[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, default=str)}\n\n"


def _one_line(exc: Exception) -> str:
    if isinstance(exc, SpecError):  # the request is the input: no file to name
        return f"{exc.field}: {exc.detail}" if exc.field else exc.detail
    return " ".join(str(exc).split()) or type(exc).__name__
