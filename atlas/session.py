"""One run from set-up to summary, shared by `atlas.run`, `atlas.arun` and every invocation of
`atlas.build_graph()`'s graph: the run's context, its record in `runs.db`, its trace, the budget
clock, and what is written when it ends (the record, a partial output, the summary).

Every step here may block (files, SQLite, MLflow's client): async callers run them in a worker
thread.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from atlas.alerts import check_alerts
from atlas.context import RunContext
from atlas.errors import AtlasError
from atlas.events import EndEvent, EventHandler, StartEvent
from atlas.models.usage import totals
from atlas.runs import RunRecord, now, run_store, spec_to_json
from atlas.spec import TaskSpec, agent_version_label
from atlas.tracing.redact import public_model

log = logging.getLogger("atlas.alerts")


@dataclass
class RunResult:
    """The outcome of a run, as printed by `python -m atlas run --json`."""

    run_id: str
    status: str
    """passed, failed, budget_exhausted, awaiting_approval, error or interrupted."""
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
    pending: list[dict[str, Any]] = field(default_factory=list)
    """When `status` is `awaiting_approval`: what waits for a person (`id`, `kind`, the plan's
    steps or the tool and its arguments, `interrupt_id`); `atlas approve` decides."""
    approvals: int = 0
    """Approval decisions made in this run so far (each is on the trace as HUMAN feedback)."""
    approval_wait_s: float | None = None
    """Seconds plans and tool calls waited for their decisions; not counted against
    `timeout_s`."""
    cache_hits: int = 0
    """Model calls answered from the model-response cache (`cache:`): no tokens, no cost."""
    cache_saved_tokens: int = 0
    """Tokens those calls would have used: what the cached answers cost when first made."""
    alerts: list[dict[str, Any]] = field(default_factory=list)
    """Thresholds of the task's `alerts:` that the run breached (`name`, `value`, `limit`,
    `message` each); the status is unchanged by them."""

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), default=str)


def start_event(ctx: RunContext, resumed: bool) -> StartEvent:
    return {
        "type": "start",
        "event": "start",
        "ts": round(time.time(), 3),
        "run_id": ctx.run_id,
        "models": ctx.models.describe(),
        "resumed": resumed,
    }


def end_event(result: RunResult) -> EndEvent:
    event = {"type": "end", "event": "end", "ts": round(time.time(), 3), **result.to_dict()}
    return cast(EndEvent, event)


def new_record(ctx: RunContext, model: str | None, task_file: str | None) -> RunRecord:
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


def record_fields(result: RunResult) -> dict[str, Any]:
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


def prepare(
    spec: TaskSpec, directory: Path, *, run_id: str | None, model: str | None
) -> RunContext:
    """Make the run's context and resolve every role's model now, so a missing key or an unknown
    provider fails before anything starts."""
    if spec.tracing.enabled:
        agent_version_label(spec)  # a bad ATLAS_VERSION is one line, before anything starts
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


def recursion_limit(spec: TaskSpec) -> int:
    b = spec.budget
    per_iteration = 4 + 2 * b.max_steps
    return max(200, b.max_iterations * per_iteration + 4 * b.max_handoffs + 50)


def thread_count(spec: TaskSpec) -> int:
    """Enough threads for every step of a wave plus the checkpoint writes; idle ones cost
    nothing (the pool starts threads as it needs them)."""
    return min(64, spec.budget.max_steps + 8)


def summarize(
    ctx: RunContext, values: dict[str, Any], wall: float, trace: Any, resumed: bool
) -> RunResult:
    usage = values.get("usage") or {}
    run = totals(usage)
    cost = run.get("cost_usd") if not run.get("cost_unknown_calls") else None
    verdict = values.get("verdict") or {}
    by_team = {k.removeprefix("team:"): totals(usage, k) for k in usage if k.startswith("team:")}
    by_model = {k.removeprefix("model:"): totals(usage, k) for k in usage if k.startswith("model:")}
    decided = [a for a in values.get("approvals") or [] if isinstance(a, dict)]
    waits = [float(a["waited_s"]) for a in decided if isinstance(a.get("waited_s"), int | float)]
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
        pending=list(ctx.pending),
        approvals=len(decided),
        approval_wait_s=round(sum(waits), 3) if waits else None,
        cache_hits=int(run.get("cache_hits", 0)),
        cache_saved_tokens=int(run.get("cache_saved_tokens", 0)),
    )


def salvage_output(ctx: RunContext, values: dict[str, Any]) -> str | None:
    """After a failure, write what was produced so far, so no finished work is lost."""
    from atlas.graph.build import write_output
    from atlas.graph.judge import current_output

    if not values.get("results") and not ctx.workspace.drafts.count():
        return None
    text = current_output(values, ctx)
    partial = ctx.spec.output_path.with_name(ctx.spec.output_path.stem + ".partial.md")
    return str(write_output(partial, text))


def as_usage(spent: dict[str, Any]) -> dict[str, Any]:
    return {
        "run": {
            "input_tokens": int(spent.get("tokens", 0)),
            "output_tokens": 0,
            "calls": int(spent.get("calls", 0)),
            "cost_usd": float(spent.get("cost_usd", 0.0)),
        }
    }


def charge_journal(ctx: RunContext, result: RunResult) -> None:
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


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300] if not isinstance(exc, AtlasError) else text[:300]


class Session:
    """A run's bookkeeping around its graph execution (which the caller drives)."""

    def __init__(
        self,
        ctx: RunContext,
        store: Any,
        trace: Any,
        directory: Path,
        *,
        resumed: bool,
        begun: float,
    ) -> None:
        self.ctx = ctx
        self.store = store
        self.trace = trace
        self.directory = directory
        self.resumed = resumed
        self.begun = begun
        self.started = begun
        """When the run's own work started (after set-up); `timeout_s` counts from here."""
        self.state_url: str | None = None
        """The Postgres state store the run's records and checkpoints are in, or None."""

    @classmethod
    def open(
        cls,
        spec: TaskSpec,
        directory: Path,
        *,
        run_id: str,
        model: str | None = None,
        tracking_uri: str | None = None,
        on_event: EventHandler | None = None,
        resumed: bool = False,
        task_file: str | None = None,
        begun: float | None = None,
    ) -> Session:
        """Set the run up: its context (models resolved, stores and tools open), its tracer,
        and its record (`running`). Anything that fails here fails before any model call."""
        begun = time.perf_counter() if begun is None else begun
        from atlas.runs_postgres import STATE_URL_ENV, note_task_state, state_url

        url = state_url(spec)
        store = run_store(directory, url)
        ctx = prepare(spec, directory, run_id=run_id, model=model)
        try:
            from atlas.tracing.setup import start_tracing

            ctx.tracer, trace = start_tracing(
                spec, directory, tracking_uri=tracking_uri, on_event=on_event
            )
            if task_file and hasattr(trace, "task_file"):
                trace.task_file = task_file  # the criteria's expectation is credited to it
            if not resumed:
                if url and not os.environ.get(STATE_URL_ENV):
                    note_task_state(ctx.run_dir, task_file)
                record = new_record(ctx, model, task_file)
                # Where the trace goes, known from the start: a resume after a kill (which
                # never wrote the summary) continues on the same tracking server.
                record.tracking_uri = getattr(trace, "tracking_uri", None)
                store.start(record)
            else:
                store.update(ctx.run_id, status="running", pid=os.getpid())
        except BaseException:
            ctx.close()
            raise
        session = cls(ctx, store, trace, directory, resumed=resumed, begun=begun)
        session.state_url = url
        return session

    def start_clock(self, earlier_usage: dict[str, Any] | None = None) -> None:
        """Start the run's own work: a new session in the call journal, what earlier sessions
        spent charged to the budget (on resume), and the `timeout_s` clock."""
        budget = self.ctx.budget
        earlier = budget.journal.open_session() if budget.journal is not None else {}
        if self.resumed:
            budget.absorb(earlier_usage)
            budget.absorb(as_usage(earlier))
        self.started = time.perf_counter()
        budget.start()

    def close(
        self, values: dict[str, Any], status: str, error: BaseException | None = None
    ) -> RunResult:
        """End the run: a partial output if it stopped early, the summary, the record, and the
        context's stores, tools and model servers closed. Never raises for bookkeeping."""
        ctx = self.ctx
        wall = time.perf_counter() - self.started
        salvaged = None
        if status in ("error", "interrupted", "awaiting_approval"):
            with contextlib.suppress(Exception):
                salvaged = salvage_output(ctx, values)
        result = summarize(ctx, values, wall, self.trace, self.resumed)
        result.status = status
        result.setup_s = round(self.started - self.begun, 3)
        result.run_dir = str(ctx.run_dir)
        charge_journal(ctx, result)
        if salvaged:
            result.output = salvaged
        if error is not None:
            result.error = one_line(error)
        if status not in ("error", "awaiting_approval"):  # checked when the run has ended
            result.alerts = [a.as_dict() for a in check_alerts(ctx.spec.alerts, result)]
            for alert in result.alerts:
                log.warning("alert %s: %s", alert["name"], alert["message"])
        with contextlib.suppress(Exception):
            self.store.update(ctx.run_id, **record_fields(result))
        ctx.close()
        self.trace.record_alerts(result.alerts)
        self.trace.close(status)
        return result
