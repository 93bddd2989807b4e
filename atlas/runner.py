"""Running a task: `run()`, `arun()` and `resume()`.

A run has an id, a record in `<state dir>/runs.db`, checkpoints after every step (LangGraph's
SQLite saver, synchronous durability, so a SIGKILL loses at most the steps in flight), and one
MLflow trace. Progress events go to `on_event`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from langchain_core.runnables import RunnableConfig
from langgraph.types import StreamMode

from atlas.context import RunContext, new_run_id
from atlas.errors import AtlasError, RunInterrupted, RunLocked
from atlas.events import EVENT_TYPES, EndEvent, Event, EventHandler, StartEvent, to_caller
from atlas.events import iter_events as iter_events  # moved to atlas.events; still here
from atlas.models.usage import totals
from atlas.runs import (
    SYNCHRONOUS,
    RunRecord,
    RunStore,
    connect,
    now,
    restore_secrets,
    spec_to_json,
    state_dir,
    sync_checkpointer,
)
from atlas.spec import TaskSpec
from atlas.tracing.redact import REDACTED, public_model


@dataclass
class RunResult:
    """The outcome of a run, as printed by `python -m atlas run --json`."""

    run_id: str
    status: str
    """passed, failed, budget_exhausted, error or interrupted."""
    output: str | None
    """Path of the output file."""
    iterations: int
    tokens: int
    input_tokens: int
    output_tokens: int
    model_calls: int
    cost_usd: float | None
    """Absent (None) when a model's price is unknown."""
    wall_s: float
    trace_id: str | None
    tracking_uri: str | None
    score: float | None = None
    stop_reason: str | None = None
    models: dict[str, str] = field(default_factory=dict)
    by_team: dict[str, dict[str, Any]] = field(default_factory=dict)
    by_model: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Usage per model that answered (fallbacks included)."""
    resumed: bool = False
    error: str | None = None
    setup_s: float | None = None
    """Seconds of set-up before the run's own work (stores, tracing); not part of `wall_s`
    and not counted against `timeout_s`."""
    run_dir: str | None = None
    """The run's own files: drafts, plan.json, the call journal."""
    lost_calls: int = 0
    """Model calls that a kill cut off before they answered (charged, made again on resume)."""
    tool_calls: int = 0
    """Tool calls the workers made in this session (built-in, Python and MCP)."""
    tool_errors: int = 0
    """Of those, calls that failed: raised, timed out, or answered `error: ...`. Each went back
    to the model as the tool's answer."""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str)


_STREAM_MODES: list[StreamMode] = ["custom", "values"]
# Progress events (custom) from every subgraph, the top-level state after each step, and a
# checkpoint written before the next step starts, so a SIGKILL loses only steps in flight.
_STREAM: dict[str, Any] = {"stream_mode": _STREAM_MODES, "subgraphs": True, "durability": "sync"}


def _consume(part: Any, emit: EventHandler, values: dict[str, Any]) -> dict[str, Any]:
    """Handle one streamed (namespace, mode, chunk): forward ATLAS's events (not what a user's
    tool writes to the stream), keep the latest state."""
    namespace, mode, chunk = part
    if mode == "custom":
        if isinstance(chunk, dict) and chunk.get("type") in EVENT_TYPES:
            emit(cast(Event, chunk))
    elif mode == "values" and not namespace:
        return cast(dict[str, Any], chunk)
    return values


def _start(ctx: RunContext, resumed: bool) -> StartEvent:
    return {
        "type": "start",
        "event": "start",
        "ts": round(time.time(), 3),
        "run_id": ctx.run_id,
        "models": ctx.models.describe(),
        "resumed": resumed,
    }


def _end(result: RunResult) -> EndEvent:
    event = {"type": "end", "event": "end", "ts": round(time.time(), 3), **result.to_dict()}
    return cast(EndEvent, event)


def _new_record(ctx: RunContext, model: str | None, task_file: str | None) -> RunRecord:
    """The record of a run that starts now."""
    return RunRecord(
        run_id=ctx.run_id,
        name=ctx.spec.display_name,
        task_file=task_file,
        spec_json=spec_to_json(ctx.spec),
        model=public_model(model) if model else None,
        status="running",
        started_at=now(),
        pid=os.getpid(),
    )


def _record_fields(result: RunResult) -> dict[str, Any]:
    """What a finished (or failed) run writes to its record in runs.db."""
    return {
        "status": result.status,
        "finished_at": now(),
        "iterations": result.iterations,
        "tokens": result.tokens,
        "cost_usd": result.cost_usd,
        "score": result.score,
        "trace_id": result.trace_id,
        "tracking_uri": result.tracking_uri,
        "output": result.output,
        "stop_reason": result.stop_reason or result.error,
    }


def _prepare(
    spec: TaskSpec, directory: Path, *, run_id: str | None, model: str | None
) -> RunContext:
    """Make the run's context and resolve every role's model now, so a missing key or an unknown
    provider fails before anything starts."""
    ctx = RunContext.create(spec, run_id=run_id, state_dir=directory, model=model)
    for role in ctx.models.describe():
        ctx.models.get(role)
    if ctx.memory is not None:
        # Open the stores now: a corrupt store or an unreachable memory server fails here,
        # before any model call.
        try:
            ctx.memory.open()
        except BaseException:
            ctx.close()
            raise
    return ctx


def _recursion_limit(spec: TaskSpec) -> int:
    b = spec.budget
    per_iteration = 4 + 2 * b.max_steps
    return max(200, b.max_iterations * per_iteration + 4 * b.max_handoffs + 50)


def _threads(spec: TaskSpec) -> int:
    """Enough threads for every step of a wave plus the checkpoint writes; idle ones cost
    nothing (the pool starts threads as it needs them)."""
    return min(64, spec.budget.max_steps + 8)


def _summarize(
    ctx: RunContext, values: dict[str, Any], wall: float, trace: Any, resumed: bool
) -> RunResult:
    usage = values.get("usage") or {}
    run = totals(usage)
    cost = run.get("cost_usd") if not run.get("cost_unknown_calls") else None
    verdict = values.get("verdict") or {}
    by_team = {k.removeprefix("team:"): totals(usage, k) for k in usage if k.startswith("team:")}
    by_model = {k.removeprefix("model:"): totals(usage, k) for k in usage if k.startswith("model:")}
    for counters in [*by_team.values(), *by_model.values()]:
        if counters.get("cost_unknown_calls"):
            counters.pop("cost_usd", None)
    return RunResult(
        run_id=ctx.run_id,
        status=values.get("status") or "failed",
        output=values.get("output_path"),
        iterations=int(values.get("iteration") or 0),
        tokens=run["tokens"],
        input_tokens=run["input_tokens"],
        output_tokens=run["output_tokens"],
        model_calls=run["calls"],
        cost_usd=round(cost, 6) if isinstance(cost, float | int) else None,
        wall_s=round(wall, 3),
        trace_id=getattr(trace, "trace_id", None),
        tracking_uri=getattr(trace, "tracking_uri", None),  # already without passwords
        score=verdict.get("score"),
        stop_reason=values.get("stop_reason"),
        models=ctx.models.describe(),
        by_team=by_team,
        by_model=by_model,
        resumed=resumed,
        tool_calls=ctx.tool_calls,
        tool_errors=ctx.tool_errors,
    )


def _salvage_output(ctx: RunContext, values: dict[str, Any]) -> str | None:
    """After a failure, write what was produced so far, so no finished work is lost."""
    from atlas.graph.build import write_output
    from atlas.graph.judge import current_output

    if not values.get("results") and not ctx.workspace.drafts.count():
        return None
    text = current_output(values, ctx)
    partial = ctx.spec.output_path.with_name(ctx.spec.output_path.stem + ".partial.md")
    return str(write_output(partial, text))


def run(
    spec: TaskSpec,
    *,
    model: str | None = None,
    state_dir_path: str | os.PathLike[str] | None = None,
    run_id: str | None = None,
    on_event: EventHandler | None = None,
    tracking_uri: str | None = None,
    task_file: str | None = None,
    _resume: bool = False,
) -> RunResult:
    """Run a task to the end (passed, failed, or a budget stop) and return its summary.

    One process at a time runs a given run: a second `run`/`resume` of the same run id while
    it runs raises `RunLocked` and does nothing.

    `on_event` gets every progress event (see `atlas.events`), only on the calling thread.
    """
    on_event = to_caller(on_event)
    begun = time.perf_counter()
    directory = state_dir(state_dir_path)
    store = RunStore(directory)
    rid = run_id or new_run_id()
    with run_lock(directory, rid):
        ctx = _prepare(spec, directory, run_id=rid, model=model)
        try:
            from atlas.tracing.setup import start_tracing

            ctx.tracer, trace = start_tracing(
                spec, directory, tracking_uri=tracking_uri, on_event=on_event
            )
            if not _resume:
                store.start(_new_record(ctx, model, task_file))
            else:
                store.update(ctx.run_id, status="running", pid=os.getpid())
        except BaseException:
            ctx.close()
            raise
        return _execute(ctx, store, trace, directory, on_event, _resume, begun)


def _execute(
    ctx: RunContext,
    store: RunStore,
    trace: Any,
    directory: Path,
    on_event: EventHandler | None,
    resumed: bool,
    begun: float,
) -> RunResult:
    spec = ctx.spec
    earlier = ctx.budget.journal.open_session() if ctx.budget.journal is not None else {}
    values: dict[str, Any] = {}
    config: RunnableConfig = {
        "configurable": {"thread_id": ctx.run_id},
        "recursion_limit": _recursion_limit(spec),
        # Threads for a wave's parallel steps. LangGraph's default pool is cores + 4 threads,
        # shared with its checkpoint writes, so on a small machine a wave of six steps queued
        # one of them behind the others (measured in the fan-out benchmark).
        "max_concurrency": _threads(spec),
    }
    emit = on_event or (lambda event: None)
    emit(_start(ctx, resumed))
    status = "error"
    error: BaseException | None = None
    started = time.perf_counter()
    _ACTIVE[id(ctx)] = ctx
    try:
        with sync_checkpointer(directory) as saver, trace.root(ctx, resumed=resumed):
            from atlas.graph import build_graph

            graph = build_graph(spec, checkpointer=saver, context=ctx)
            snapshot = graph.get_state(config)
            if resumed:
                ctx.budget.absorb(snapshot.values.get("usage"))
                ctx.budget.absorb(_as_usage(earlier))
            # The time limit counts the run's own work, not the set-up above.
            started = time.perf_counter()
            ctx.budget.start()
            if resumed and not snapshot.next and snapshot.values.get("status"):
                values = dict(snapshot.values)
            else:
                graph_input = None if resumed and snapshot.values else {"task": spec.task}
                stream = graph.stream(graph_input, config, context=ctx, **_STREAM)
                for part in stream:
                    values = _consume(part, emit, values)
            status = values.get("status") or "failed"
            trace.finish(ctx, values)
    except KeyboardInterrupt:
        status, error = "interrupted", None
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        _ACTIVE.pop(id(ctx), None)
        wall = time.perf_counter() - started
        with contextlib.suppress(Exception):
            if status in ("error", "interrupted") and not values:
                values = _last_values(directory, config)
        salvaged = None
        if status in ("error", "interrupted"):
            with contextlib.suppress(Exception):
                salvaged = _salvage_output(ctx, values)
        result = _summarize(ctx, values, wall, trace, resumed)
        result.status = status
        result.setup_s = round(started - begun, 3)
        result.run_dir = str(ctx.run_dir)
        _charge_journal(ctx, result)
        if salvaged:
            result.output = salvaged
        if error is not None:
            result.error = _one_line(error)
        with contextlib.suppress(Exception):
            store.update(ctx.run_id, **_record_fields(result))
        ctx.close()
        trace.close(status)
        emit(_end(result))
        _LAST_RESULT[0] = result
    return result


_ACTIVE: dict[int, RunContext] = {}
"""Runs executing in this process (the CLI's signal handler cancels them)."""


def cancel_active(exc: BaseException) -> None:
    """Make every run in this process refuse further model calls with `exc` (an interrupt):
    calls in flight finish, nothing new starts, so stopping is quick and leaves no half-work."""
    for ctx in list(_ACTIVE.values()):
        ctx.budget.cancel(exc)


def _as_usage(spent: dict[str, Any]) -> dict[str, Any]:
    return {
        "run": {
            "input_tokens": int(spent.get("tokens", 0)),
            "output_tokens": 0,
            "calls": int(spent.get("calls", 0)),
            "cost_usd": float(spent.get("cost_usd", 0.0)),
        }
    }


def _charge_journal(ctx: RunContext, result: RunResult) -> None:
    """The run's totals include every call the journal saw, also those of steps a kill cut off
    (made again on resume) and those that never answered."""
    journal = ctx.budget.journal
    if journal is None:
        return
    with contextlib.suppress(OSError, ValueError):
        spent = journal.totals()
        result.lost_calls = int(spent["lost"])
        if spent["calls"] > result.model_calls:
            result.model_calls = int(spent["calls"])
        if spent["tokens"] > result.tokens:
            extra = int(spent["tokens"]) - result.tokens
            result.tokens += extra
            result.input_tokens += extra
        if result.cost_usd is not None and spent["cost_usd"] > result.cost_usd:
            result.cost_usd = round(float(spent["cost_usd"]), 6)


@contextlib.contextmanager
def run_lock(directory: Path, run_id: str) -> Iterator[None]:
    """Hold `runs/<id>/run.lock` while the run executes. The kernel drops the lock when its
    process dies, even of SIGKILL, so a stale lock is simply taken over."""
    import fcntl

    path = directory / "runs" / run_id / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            raise RunLocked(
                f"run {run_id} is already running (pid {holder}); wait for it to end, or stop "
                "it, then resume"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                fh.seek(0)
                fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)


_LAST_RESULT: list[RunResult | None] = [None]


def last_result() -> RunResult | None:
    """The summary of the last run in this process, also after it raised."""
    return _LAST_RESULT[0]


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300] if not isinstance(exc, AtlasError) else text[:300]


def _last_values(directory: Path, config: RunnableConfig) -> dict[str, Any]:
    with sync_checkpointer(directory) as saver:
        tup = saver.get_tuple(config)
        if tup is None:
            return {}
        return dict(tup.checkpoint.get("channel_values", {}))


def resume(
    run_id: str,
    *,
    state_dir_path: str | os.PathLike[str] | None = None,
    on_event: EventHandler | None = None,
    model: str | None = None,
) -> RunResult:
    """Continue an interrupted run from its last checkpoint. Finished steps are not redone."""
    directory = state_dir(state_dir_path)
    record = RunStore(directory).get(run_id)
    if model is None and record.model and REDACTED in record.model:
        from atlas.errors import SpecError

        raise SpecError(
            f"run {record.run_id} was started with a secret in its --model, which ATLAS does not "
            f"store ({record.model}): pass the same --model to resume",
            field="--model",
        )
    spec = restore_secrets(record)
    uri = (
        record.tracking_uri if record.tracking_uri and REDACTED not in record.tracking_uri else None
    )
    return run(
        spec,
        model=model or record.model,
        state_dir_path=directory,
        run_id=record.run_id,
        on_event=on_event,
        tracking_uri=uri,
        task_file=record.task_file,
        _resume=True,
    )


async def arun(
    spec: TaskSpec,
    *,
    model: str | None = None,
    state_dir_path: str | os.PathLike[str] | None = None,
    run_id: str | None = None,
    on_event: EventHandler | None = None,
    tracking_uri: str | None = None,
) -> RunResult:
    """Async `run()`: model calls are awaited and parallel steps run as tasks on the event loop.

    Set-up and bookkeeping (local files, the run record, MLflow's client) run in a worker thread,
    so the event loop is never blocked by them.

    `on_event` gets every progress event (see `atlas.events`), only on the caller's event loop
    (in its thread), also those of the set-up and bookkeeping run in worker threads.
    """
    on_event = to_caller(on_event)
    begun = time.perf_counter()
    directory = state_dir(state_dir_path)
    ctx = await asyncio.to_thread(_prepare, spec, directory, run_id=run_id, model=model)
    from atlas.tracing.setup import start_tracing

    ctx.tracer, trace = await asyncio.to_thread(
        start_tracing, spec, directory, tracking_uri=tracking_uri, on_event=on_event
    )
    store = RunStore(directory)
    await asyncio.to_thread(store.start, _new_record(ctx, model, None))
    emit = on_event or (lambda event: None)
    emit(_start(ctx, False))
    started = time.perf_counter()
    values: dict[str, Any] = {}
    config: RunnableConfig = {
        "configurable": {"thread_id": ctx.run_id},
        "recursion_limit": _recursion_limit(spec),
    }
    status = "error"
    error: BaseException | None = None
    try:
        async with _async_checkpointer(directory) as saver:
            from atlas.graph import build_graph

            with trace.root(ctx, resumed=False):
                graph = build_graph(spec, checkpointer=saver, context=ctx)
                if ctx.budget.journal is not None:
                    await asyncio.to_thread(ctx.budget.journal.open_session)
                started = time.perf_counter()
                ctx.budget.start()
                async for part in graph.astream(
                    {"task": spec.task}, config, context=ctx, **_STREAM
                ):
                    values = _consume(part, emit, values)
                status = values.get("status") or "failed"
                await asyncio.to_thread(trace.finish, ctx, values)
    except (asyncio.CancelledError, KeyboardInterrupt):
        # A client that hung up (or a task.cancel()): the run stays resumable, like Ctrl-C.
        status = "interrupted"
        ctx.budget.cancel(RunInterrupted("the run was cancelled"))
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        wall = time.perf_counter() - started
        salvaged = None
        if status in ("error", "interrupted"):
            with contextlib.suppress(Exception):
                salvaged = await asyncio.to_thread(_salvage_output, ctx, values)
        result = _summarize(ctx, values, wall, trace, False)
        result.status = status
        result.setup_s = round(started - begun, 3)
        result.run_dir = str(ctx.run_dir)
        _charge_journal(ctx, result)
        if salvaged:
            result.output = salvaged
        if error is not None:
            result.error = _one_line(error)
        await asyncio.to_thread(store.update, ctx.run_id, **_record_fields(result))
        ctx.close()
        await asyncio.to_thread(trace.close, status)
        emit(_end(result))
    return result


@contextlib.asynccontextmanager
async def _async_checkpointer(directory: Path) -> Any:
    import aiosqlite
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    from atlas.runs import checkpoint_path, guard_state

    path = checkpoint_path(directory)
    # As the sync path (runs.connect): WAL and a busy timeout, so many runs in one process or
    # several processes can checkpoint to one file without "database is locked".
    await asyncio.to_thread(lambda: connect(path).close())
    with guard_state(path):
        async with aiosqlite.connect(str(path), timeout=30) as conn:
            await conn.execute("PRAGMA busy_timeout=30000")
            await conn.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
            saver = AsyncSqliteSaver(conn)
            await saver.setup()
            yield saver
