"""Embedding: one compiled graph serves many tasks, and every invocation of it is a run.

`atlas.build_graph(spec)` returns an `AtlasGraph`, LangGraph's compiled graph with its `stream`
and `astream` wrapped (and with them `invoke`, `ainvoke`, and its use as a node of a parent
graph or by LangGraph's server). Each invocation:

- builds its task from the input (`AtlasInput`: task, acceptance, inputs, budget, namespace)
  over the spec's defaults (teams, models, memory, tracing);
- gets a `RunContext` of its own, made when it starts (its budget clock too) and closed when it
  ends, whatever the end: stores, model servers and MCP sessions;
- is a run: a record in the state directory's `runs.db`, a folder with its output, and one
  MLflow trace (or ATLAS's spans inside the caller's trace, when a span is active);
- does its set-up and bookkeeping in a worker thread on the async path, so nothing blocking
  runs on the event loop.

Invoked with `None` (or a `Command`) on a thread that holds a run, it resumes that run from
its last checkpoint. A graph given a `RunContext` as `context=` (what `atlas.run` does) runs
as a plain LangGraph graph.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from langchain_core.runnables import RunnableConfig
from langgraph.graph.state import CompiledStateGraph

from atlas.context import RunContext, new_run_id
from atlas.errors import RunInterrupted, SpecError
from atlas.graph.io import AtlasContext
from atlas.session import Session, recursion_limit, thread_count
from atlas.spec import TaskSpec


@dataclass(frozen=True)
class Defaults:
    """What `build_graph` was given: the base for every invocation."""

    spec: TaskSpec
    model: str | None = None
    state_dir: str | None = None
    tracking_uri: str | None = None


STATE_HOME_ENV = "XDG_STATE_HOME"


def default_state_dir() -> Path:
    """An embedded graph's state directory when none is given: `$ATLAS_STATE_DIR`, else
    `$XDG_STATE_HOME/atlas` (`~/.local/state/atlas`). Never the current directory, which in an
    app or a server is whatever the process started in."""
    from atlas.runs import STATE_DIR_ENV

    if os.environ.get(STATE_DIR_ENV):
        return Path(os.environ[STATE_DIR_ENV]).expanduser()
    home = os.environ.get(STATE_HOME_ENV) or str(Path.home() / ".local" / "state")
    return Path(home).expanduser() / "atlas"


def spec_for(base: TaskSpec, request: Mapping[str, Any], output_dir: Path) -> TaskSpec:
    """The spec of one invocation: the input's task over the base spec, its output in the
    run's own folder (concurrent runs of one graph never write the same file)."""
    if not isinstance(request, Mapping):
        raise SpecError(f"the graph's input must be a mapping with a 'task', not {request!r}"[:200])
    task = request.get("task")
    if not isinstance(task, str) or not task.strip():
        raise SpecError(
            "the graph's input needs a 'task': what to do, in plain words", field="task"
        )
    data = base.model_dump(exclude={"base_dir"})
    data["task"] = task
    data["name"] = None  # named after its own task, unless the input names it
    for key in ("acceptance", "name", "inputs"):
        if request.get(key) is not None:
            data[key] = request[key]
    if request.get("budget") is not None:
        if not isinstance(request["budget"], Mapping):
            raise SpecError("the input's 'budget' must be a mapping of limits", field="budget")
        data["budget"] = {**data["budget"], **request["budget"]}
    if request.get("namespace") is not None:
        data["memory"] = {**data["memory"], "namespace": request["namespace"]}
    data["output"] = str(output_dir / Path(base.output).name)
    return TaskSpec.from_dict(data, base_dir=base.base_dir)


class AtlasGraph(CompiledStateGraph[Any, Any, Any, Any]):
    """The compiled run graph, with a run made around every invocation."""

    def __init__(self, *, atlas_defaults: Defaults, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.atlas_defaults = atlas_defaults

    # -- one invocation ---------------------------------------------------------------------

    def _begin(
        self, input: Any, config: RunnableConfig | None, context: Any, saved: dict[str, Any]
    ) -> _Invocation:
        """Set the invocation's run up (blocking). `saved` is the thread's state, read only when
        the invocation resumes (`input` is None or a `Command`)."""
        begun = time.perf_counter()
        d = self.atlas_defaults
        given = _as_context(context)
        directory = Path(given.state_dir or d.state_dir or default_state_dir()).expanduser()
        from atlas.runs import state_dir

        directory = state_dir(directory)
        run_config: dict[str, Any] = dict(config or {})
        configurable = dict(run_config.get("configurable") or {})
        resumed = input is None or not isinstance(input, Mapping)
        if resumed:
            request, run_id = saved.get("request"), saved.get("run_id")
            if not request or not run_id:
                thread = configurable.get("thread_id")
                raise SpecError(
                    f"nothing to resume on thread {thread!r}: invoke the graph with a task "
                    "({'task': ...})",
                    field="input",
                )
        else:
            request, run_id = dict(input), new_run_id()
            if given.namespace:
                request["namespace"] = given.namespace
        run_dir = directory / "runs" / str(run_id)
        spec = spec_for(d.spec, request, run_dir)
        session = Session.open(
            spec,
            directory,
            run_id=str(run_id),
            model=given.model or d.model,
            tracking_uri=given.tracking_uri or d.tracking_uri,
            resumed=resumed,
            begun=begun,
        )
        session.ctx.request = request
        try:
            session.trace.begin(session.ctx, resumed=resumed)
            session.start_clock(saved.get("usage") if resumed else None)
        except BaseException:
            session.close({}, "error")
            raise
        configurable.setdefault("thread_id", session.ctx.run_id)
        run_config["configurable"] = configurable
        # As a node of a parent graph, the config holds the parent's limit (25 by default).
        limit = max(int(run_config.get("recursion_limit") or 0), recursion_limit(spec))
        run_config["recursion_limit"] = limit
        run_config.setdefault("max_concurrency", thread_count(spec))
        return _Invocation(session, input, cast(RunnableConfig, run_config))

    def _saved(self, input: Any, config: RunnableConfig | None) -> dict[str, Any]:
        if isinstance(input, Mapping) or self.checkpointer is None or not config:
            return {}
        return dict(self.get_state(config).values)

    async def _asaved(self, input: Any, config: RunnableConfig | None) -> dict[str, Any]:
        if isinstance(input, Mapping) or self.checkpointer is None or not config:
            return {}
        return dict((await self.aget_state(config)).values)

    def stream(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        context: Any = None,
        **kwargs: Any,
    ) -> Iterator[Any]:
        if isinstance(context, RunContext):
            yield from super().stream(input, config, context=context, **kwargs)
            return
        inv = self._begin(input, config, context, self._saved(input, config))
        token = inv.session.trace.attach()
        try:
            parts = super().stream(inv.input, inv.config, context=inv.session.ctx, **kwargs)
            yield from parts
            inv.status = "completed"  # `end` reads the final status from the state
        except GeneratorExit:
            inv.stopped("the caller stopped reading the run")
            raise
        except KeyboardInterrupt:
            inv.stopped("the run was interrupted")
            raise
        except BaseException as exc:
            inv.error = exc
            raise
        finally:
            inv.session.trace.detach(token)
            inv.end(self)

    async def astream(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        context: Any = None,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        if isinstance(context, RunContext):
            async for part in super().astream(input, config, context=context, **kwargs):
                yield part
            return
        saved = await self._asaved(input, config)
        begin = asyncio.ensure_future(asyncio.to_thread(self._begin, input, config, context, saved))
        try:
            inv = await asyncio.shield(begin)
        except asyncio.CancelledError:
            # Cancelled during set-up: the run is made (or fails) in its thread all the same;
            # once it is, end it as interrupted rather than leave it `running`.
            begin.add_done_callback(self._end_unstarted)
            raise
        token = inv.session.trace.attach()
        try:
            parts = super().astream(inv.input, inv.config, context=inv.session.ctx, **kwargs)
            async for part in parts:
                yield part
            inv.status = "completed"  # `end` reads the final status from the state
        except (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt):
            # A client that hung up, a task.cancel(), a caller that stopped reading: the run
            # stays resumable, with its partial output written.
            inv.stopped("the run was cancelled")
            raise
        except BaseException as exc:
            inv.error = exc
            raise
        finally:
            inv.session.trace.detach(token)
            # Shielded: a server that cancels every await after the first (Starlette's cancel
            # scope, on a client that hung up) would otherwise drop the run's end unwritten.
            await asyncio.shield(asyncio.to_thread(inv.end, self))

    def _end_unstarted(self, begun: asyncio.Future[_Invocation]) -> None:
        if begun.cancelled() or begun.exception() is not None:
            return
        made = begun.result()
        made.stopped("the run was cancelled")
        asyncio.get_running_loop().run_in_executor(None, made.end, self)


class _Invocation:
    def __init__(self, session: Session, input: Any, config: RunnableConfig) -> None:
        self.session = session
        self.input = input
        self.config = config
        self.status = "error"
        self.error: BaseException | None = None

    def stopped(self, why: str) -> None:
        self.status = "interrupted"
        self.session.ctx.budget.cancel(RunInterrupted(why))

    def end(self, graph: AtlasGraph) -> None:
        """Write the run's end (blocking): the trace, the record, a partial output."""
        ctx = self.session.ctx
        values = ctx.outcome or {}
        if not values and graph.checkpointer is not None:
            with contextlib.suppress(Exception):
                snapshot = graph.get_state(self.config)
                values = dict(snapshot.values)
                if self.status == "completed" and snapshot.interrupts:
                    # Paused for approval: resumed with Command(resume={interrupt_id: ...}).
                    from atlas.approvals import pending_in

                    ctx.pending = [p.as_dict() for p in pending_in(snapshot)]
                    values.update(status="awaiting_approval", pending=ctx.pending)
        if self.status not in ("error", "interrupted"):
            self.status = str(values.get("status") or "failed")
            self.session.trace.finish(ctx, values)
        error = self.error if self.status == "error" else None
        self.session.trace.end(error)
        self.session.close(values, self.status, error)


def _as_context(context: Any) -> AtlasContext:
    if context is None:
        return AtlasContext()
    if isinstance(context, AtlasContext):
        return context
    if isinstance(context, Mapping):
        known = set(AtlasContext.__dataclass_fields__)
        unknown = sorted(set(context) - known)
        if unknown:
            raise SpecError(
                f"unknown context field(s) {', '.join(unknown)}; "
                f"ATLAS takes {', '.join(sorted(known))}",
                field="context",
            )
        return AtlasContext(**context)
    raise SpecError(
        f"context= must be an atlas.embed.AtlasContext or a mapping, not {type(context).__name__}",
        field="context",
    )


__all__ = ["AtlasContext", "AtlasGraph", "default_state_dir", "spec_for"]
