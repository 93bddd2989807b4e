"""Running a task: `run()`, `arun()` and `resume()`.

A run has an id, a record in `<state dir>/runs.db`, checkpoints after every step (LangGraph's
SQLite saver, synchronous durability, so a SIGKILL loses at most the steps in flight), and one
MLflow trace. Progress events go to `on_event`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from langchain_core.runnables import RunnableConfig
from langgraph.types import StreamMode

from atlas.context import RunContext, new_run_id
from atlas.errors import AtlasError, OutputBusy, RunInterrupted, RunLocked
from atlas.events import EVENT_TYPES, Event, EventHandler, to_caller
from atlas.events import iter_events as iter_events  # moved to atlas.events; still here
from atlas.graph.build import build_run_graph
from atlas.runs import (
    SYNCHRONOUS,
    checkpoints,
    connect,
    restore_secrets,
    run_store,
    state_dir,
)
from atlas.session import RunResult as RunResult
from atlas.session import (
    Session,
    end_event,
    recursion_limit,
    start_event,
    thread_count,
)
from atlas.spec import TaskSpec
from atlas.tracing.redact import REDACTED

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


def run(
    spec: TaskSpec,
    *,
    model: str | None = None,
    state_dir_path: str | os.PathLike[str] | None = None,
    run_id: str | None = None,
    on_event: EventHandler | None = None,
    tracking_uri: str | None = None,
    task_file: str | None = None,
    approve_all: bool = False,
    _resume: bool = False,
    _command: Any = None,
) -> RunResult:
    """Run a task to the end (passed, failed, or a budget stop) and return its summary.

    A run whose task asks for approval (`approval:`) stops when a plan or a tool call waits for
    a person: its status is `awaiting_approval`, `result.pending` lists what waits, and
    `atlas.approvals.approve()` decides and goes on. `approve_all` approves everything instead.

    One process at a time runs a given run: a second `run`/`resume` of the same run id while
    it runs raises `RunLocked` and does nothing.

    `on_event` gets every progress event (see `atlas.events`), only on the calling thread.
    """
    on_event = to_caller(on_event)
    begun = time.perf_counter()
    directory = state_dir(state_dir_path)
    rid = run_id or new_run_id()
    from atlas.runs_postgres import state_url

    url = state_url(spec)
    with run_lock(directory, rid, url), output_lock(directory, spec, rid):
        session = Session.open(
            spec,
            directory,
            run_id=rid,
            model=model,
            tracking_uri=tracking_uri,
            on_event=on_event,
            resumed=_resume,
            task_file=task_file,
            begun=begun,
        )
        session.ctx.approve_all = approve_all
        return _execute(session, on_event, _command)


def _config(ctx: RunContext) -> RunnableConfig:
    return {
        "configurable": {"thread_id": ctx.run_id},
        "recursion_limit": recursion_limit(ctx.spec),
        # Threads for a wave's parallel steps. LangGraph's default pool is cores + 4 threads,
        # shared with its checkpoint writes, so on a small machine a wave of six steps queued
        # one of them behind the others (measured in the fan-out benchmark).
        "max_concurrency": thread_count(ctx.spec),
    }


def _execute(session: Session, on_event: EventHandler | None, command: Any = None) -> RunResult:
    ctx, directory, resumed = session.ctx, session.directory, session.resumed
    values: dict[str, Any] = {}
    config = _config(ctx)
    emit = on_event or (lambda event: None)
    emit(start_event(ctx, resumed))
    status = "error"
    error: BaseException | None = None
    _ACTIVE[id(ctx)] = ctx
    try:
        with (
            checkpoints(directory, session.state_url) as saver,
            session.trace.root(ctx, resumed=resumed),
        ):
            graph = build_run_graph(ctx).compile(checkpointer=saver, name="atlas")
            snapshot = graph.get_state(config)
            # The time limit counts the run's own work, not the set-up above.
            session.start_clock(snapshot.values.get("usage"))
            if resumed and not snapshot.next and snapshot.values.get("status"):
                values = dict(snapshot.values)
            else:
                graph_input = None if resumed and snapshot.values else {"task": ctx.spec.task}
                if command is not None and snapshot.interrupts:
                    graph_input = command
                stream = graph.stream(graph_input, config, context=ctx, **_STREAM)
                for part in stream:
                    values = _consume(part, emit, values)
            values.pop("__interrupt__", None)
            if not values.get("status"):  # not finished: paused for approval?
                snapshot = graph.get_state(config)
                if snapshot.interrupts:
                    values = _paused(ctx, dict(snapshot.values), snapshot, emit)
            status = values.get("status") or "failed"
            session.trace.finish(ctx, values)
    except KeyboardInterrupt:
        status, error = "interrupted", None
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        _ACTIVE.pop(id(ctx), None)
        with contextlib.suppress(Exception):
            if status in ("error", "interrupted") and not values:
                values = _last_values(directory, config, session.state_url)
        result = session.close(values, status, error)
        emit(end_event(result))
        _LAST_RESULT[0] = result
    return result


def _paused(ctx: RunContext, values: dict[str, Any], snapshot: Any, emit: Any) -> dict[str, Any]:
    """The run waits for approval: what waits goes to the caller, one event per item."""
    from atlas.approvals import pending_in

    waiting = pending_in(snapshot)
    ctx.pending = [p.as_dict() for p in waiting]
    for item in waiting:
        emit(item.event())
    return {**values, "status": "awaiting_approval", "pending": ctx.pending}


_ACTIVE: dict[int, RunContext] = {}
"""Runs executing in this process (the CLI's signal handler cancels them)."""


def cancel_active(exc: BaseException) -> None:
    """Make every run in this process refuse further model calls with `exc` (an interrupt):
    calls in flight finish, nothing new starts, so stopping is quick and leaves no half-work."""
    for ctx in list(_ACTIVE.values()):
        ctx.budget.cancel(exc)


@contextlib.contextmanager
def _flock(path: Path, busy: Callable[[str], AtlasError]) -> Iterator[None]:
    """Hold an exclusive lock on `path` (holding this pid) or raise `busy(holder)`. The kernel
    drops the lock when its process dies, even of SIGKILL, so a stale lock is taken over."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            raise busy(fh.read().strip() or "another process") from None
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


@contextlib.contextmanager
def run_lock(directory: Path, run_id: str, url: str | None = None) -> Iterator[None]:
    """Held in `runs/<id>/run.lock` while the run executes: one process at a time runs it; with
    a Postgres state store, also an advisory lock there, so one host at a time does."""
    with _local_run_lock(directory, run_id):
        if url is None:
            yield
            return
        from atlas.runs_postgres import run_lock as shared_lock

        with shared_lock(url, run_id):
            yield


def _local_run_lock(directory: Path, run_id: str) -> contextlib.AbstractContextManager[None]:
    return _flock(
        directory / "runs" / run_id / "run.lock",
        lambda holder: RunLocked(
            f"run {run_id} is already running (pid {holder}); wait for it to end, or stop "
            "it, then resume"
        ),
    )


def output_lock(
    directory: Path, spec: TaskSpec, run_id: str
) -> contextlib.AbstractContextManager[None]:
    """Held while a run of the spec may write its output file: a second run writing the same
    file at the same time (from this state directory) refuses before any model call instead
    of overwriting it. The lock lives in the state directory, keyed by the output's path, so
    the output's folder gets no extra file. (Embedded graphs write each run's output in its own
    folder and never wait here.)"""
    import hashlib

    out = spec.output_path
    key = hashlib.sha256(str(out).encode("utf-8")).hexdigest()[:16]
    return _flock(
        directory / "locks" / f"output-{key}.lock",
        lambda holder: OutputBusy(
            f"{out} is being written by another run of this task (pid {holder}); wait for it "
            "to end, or give this run another `output:`"
        ),
    )


_LAST_RESULT: list[RunResult | None] = [None]


def last_result() -> RunResult | None:
    """The summary of the last run in this process, also after it raised."""
    return _LAST_RESULT[0]


def _last_values(directory: Path, config: RunnableConfig, url: str | None = None) -> dict[str, Any]:
    with checkpoints(directory, url) as saver:
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
    approve_all: bool = False,
    _command: Any = None,
) -> RunResult:
    """Continue an interrupted run from its last checkpoint. Finished steps are not redone.

    A run awaiting approval asks again (see `atlas.approvals.approve` to decide)."""
    directory = state_dir(state_dir_path)
    record = run_store(directory).get(run_id)
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
        approve_all=approve_all,
        _resume=True,
        _command=_command,
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
    so the event loop is never blocked by them. A cancel (`task.cancel()`, a client that hung
    up) records the run as `interrupted`, writes its partial output, and leaves it resumable.

    `on_event` gets every progress event (see `atlas.events`), only on the caller's event loop
    (in its thread), also those of the set-up and bookkeeping run in worker threads.
    """
    on_event = to_caller(on_event)
    begun = time.perf_counter()
    directory = await asyncio.to_thread(state_dir, state_dir_path)
    rid = run_id or new_run_id()
    lock = output_lock(directory, spec, rid)
    await asyncio.to_thread(lock.__enter__)
    try:
        session = await asyncio.to_thread(
            Session.open,
            spec,
            directory,
            run_id=rid,
            model=model,
            tracking_uri=tracking_uri,
            on_event=on_event,
            begun=begun,
        )
        return await _aexecute(session, on_event)
    finally:
        await asyncio.to_thread(lock.__exit__, None, None, None)


async def _aexecute(session: Session, on_event: EventHandler | None) -> RunResult:
    ctx = session.ctx
    emit = on_event or (lambda event: None)
    emit(start_event(ctx, False))
    values: dict[str, Any] = {}
    config = _config(ctx)
    status = "error"
    error: BaseException | None = None
    try:
        async with _async_checkpointer(session.directory, session.state_url) as saver:
            await asyncio.to_thread(session.trace.begin, ctx, resumed=False)
            token = session.trace.attach()
            try:
                graph = build_run_graph(ctx).compile(checkpointer=saver, name="atlas")
                await asyncio.to_thread(session.start_clock)
                async for part in graph.astream(
                    {"task": ctx.spec.task}, config, context=ctx, **_STREAM
                ):
                    values = _consume(part, emit, values)
                values.pop("__interrupt__", None)
                if not values.get("status"):  # not finished: paused for approval?
                    snapshot = await graph.aget_state(config)
                    if snapshot.interrupts:
                        values = _paused(ctx, dict(snapshot.values), snapshot, emit)
                status = values.get("status") or "failed"
                await asyncio.to_thread(session.trace.finish, ctx, values)
            except BaseException as exc:
                error = exc
                raise
            finally:
                session.trace.detach(token)
                await asyncio.to_thread(session.trace.end, error)
    except (asyncio.CancelledError, KeyboardInterrupt):
        # A client that hung up (or a task.cancel()): the run stays resumable, like Ctrl-C.
        status, error = "interrupted", None
        ctx.budget.cancel(RunInterrupted("the run was cancelled"))
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        result = await asyncio.to_thread(session.close, values, status, error)
        emit(end_event(result))
    return result


@contextlib.asynccontextmanager
async def _async_checkpointer(directory: Path, url: str | None = None) -> Any:
    if url:
        from atlas.runs_postgres import async_checkpointer

        async with async_checkpointer(url) as saver:
            yield saver
        return
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
