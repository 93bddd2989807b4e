"""Progress events of a run: the reference, and three ways to consume them.

- `atlas.run(spec, on_event=handler)` / `await atlas.arun(spec, on_event=handler)`: a callback.
- `async for event in atlas.astream(spec)`: an async iterator, on your event loop.
- `for event in atlas.iter_events(spec)`: a sync iterator (the run goes on in a thread).

Every event is a dict with a `type` (one of the kinds below), `ts` (Unix time, seconds) and the
fields of its kind. `event` holds the same value as `type` (the key older code reads). The
`TypedDict` of each kind is exported from `atlas`; `Event` is their union, and checking
`event["type"]` narrows it (`if event["type"] == "plan": event["steps"]`).

In the order a run sends them:

- `start` (StartEvent): the run begins, after its set-up. `run_id`, `models` (role -> model,
  in public form), `resumed`.
- `memory_ingest` (MemoryIngestEvent): while the first plan stores the task's documents in
  memory, about once a second and only when that takes longer: `done` of `total` chunks, `files`.
- `plan` (PlanEvent): the planner's plan for an iteration. `iteration`, `steps` (PlanStep: `id`,
  `team`, `instruction`, `depends_on`), `repaired` (what was changed to make it executable),
  `fallback` (the default plan was used).
- `dispatch` (DispatchEvent): a wave of steps whose dependencies are done starts, in parallel.
  `steps` (ids), `teams`.
- `step_start` (StepStartEvent): one step of the wave starts. `id`, `team`.
- `handoff` (HandoffEvent): a team's supervisor hands work to a worker. `team`, `step`, `to`
  (the worker), `reason`.
- `retry` (RetryEvent): a model call failed and is tried again after `delay_s`. `role`, `model`,
  `attempt` (1 for the first retry), `reason`.
- `fallback` (FallbackEvent): a model kept failing; the role's next model takes over. `role`,
  `from`, `to`, `reason`.
- `step_done` (StepDoneEvent): a step finished. `id`, `team`, `status` (done, stopped: a loop
  guard or an outage ended it, see `note`; budget_exhausted), `workers`, `note`.
- `verdict` (VerdictEvent): the judge's verdict on the output. `passed`, `score` (0 to 1),
  `criteria` (CriterionFinding: `criterion`, `passed`, `reason`), `feedback`, `iteration`,
  `fallback` (the judge could not answer: not passed); `repaired` when its answer was fixed up.
  A failed verdict with iterations left is followed by the next `plan`.
- `budget_stop` (BudgetStopEvent): the step budget stops the run. `limit` (`max_steps`); the
  other limits end the run with a `finalize` whose `stop_reason` names them.
- `finalize` (FinalizeEvent): the run's outcome is decided and its output written. `status`
  (passed, failed, budget_exhausted), `output` (its path, or None when nothing was produced),
  `stop_reason`, `tokens`.
- `approval_needed` (ApprovalNeededEvent): the run pauses (status `awaiting_approval`), one
  event per item waiting for a person: `id`, `kind` (plan or tool), `interrupt_id`, and the
  plan's `iteration` and `steps`, or the tool call's `tool`, `args`, `step`, `team`, `worker`.
- `approval` (ApprovalEvent): a decision was applied: `id`, `kind`, `action` (approve, edit,
  reject), `by`, `reason`, `waited_s`, `auto` (decided by `--approve-all`).
- `end` (EndEvent): the last event of every run that started, also of one that raised: the
  summary `RunResult.to_dict()` (`status` is also awaiting_approval, error or interrupted
  there).

At any time:

- `warning` (WarningEvent): one line for the user (`message`): tracing fell back or is off (this
  can come before `start`), ingest stopped early, no output was produced...
- `memory_error` (MemoryErrorEvent): a memory read or write failed and the run went on without
  it. `operation`, `error`.

Only the iterators send `error` (ErrorEvent): the run raised; `error` is its one-line message. It
comes after the run's `end`, or alone when set-up failed (a bad model, a locked run), and the
iterator then raises the exception.

Where a handler is called: `run()` (and `resume()`) call `on_event` only on the thread that
called them, between steps (LangGraph's stream brings the parallel steps' events to that thread);
`arun()` calls it only on the caller's event loop, in its thread, also for the warnings of the
set-up and bookkeeping it runs in worker threads. A handler is in the run's path: keep it quick
(in `arun` it holds the loop), and do not raise from it (that ends the run as an error).
"""

# No `from __future__ import annotations` here: TypedDict reads `NotRequired` from evaluated
# annotations only.

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable, Generator, Mapping
from typing import (
    TYPE_CHECKING,
    Any,
    Literal,
    NotRequired,
    TypeAlias,
    cast,
    get_args,
    get_type_hints,
)

from typing_extensions import TypedDict

if TYPE_CHECKING:
    from atlas.spec import TaskSpec


class _Timed(TypedDict):
    ts: float
    """When the event was sent (Unix time, seconds)."""


class StartEvent(_Timed):
    """The run begins (after its set-up)."""

    type: Literal["start"]
    event: Literal["start"]
    run_id: str
    models: dict[str, str]
    """Role -> model, in public form (no secrets)."""
    resumed: bool


class PlanStep(TypedDict):
    id: str
    team: str
    instruction: str
    depends_on: list[str]


class PlanEvent(_Timed):
    """The planner's plan for an iteration."""

    type: Literal["plan"]
    event: Literal["plan"]
    iteration: int
    steps: list[PlanStep]
    repaired: list[str]
    """What was changed to make the plan executable (dropped steps, cut dependencies...)."""
    fallback: bool
    """The default plan was used (the planner's answer was unusable or its model was down)."""


class DispatchEvent(_Timed):
    """A wave of ready steps starts, in parallel."""

    type: Literal["dispatch"]
    event: Literal["dispatch"]
    steps: list[str]
    teams: list[str]


class StepStartEvent(_Timed):
    type: Literal["step_start"]
    event: Literal["step_start"]
    id: str
    team: str


class HandoffEvent(_Timed):
    """A team's supervisor hands the step's work to a worker."""

    type: Literal["handoff"]
    event: Literal["handoff"]
    team: str
    step: str
    to: str
    reason: str


class RetryEvent(_Timed):
    """A model call failed in a way worth retrying; it is made again after `delay_s`."""

    type: Literal["retry"]
    event: Literal["retry"]
    role: str
    model: str
    attempt: int
    reason: str
    delay_s: float


FallbackEvent = TypedDict(
    "FallbackEvent",
    {
        "ts": float,
        "type": Literal["fallback"],
        "event": Literal["fallback"],
        "role": str,
        "from": str,
        "to": str,
        "reason": str,
    },
)
"""A role's model kept failing: the next model of its fallback chain takes over."""


class StepDoneEvent(_Timed):
    type: Literal["step_done"]
    event: Literal["step_done"]
    id: str
    team: str
    status: Literal["done", "stopped", "budget_exhausted"]
    workers: list[str]
    note: str
    """Why a step stopped (a loop guard, a model outage), else empty."""


class CriterionFinding(TypedDict):
    criterion: str
    passed: bool
    reason: str


class VerdictEvent(_Timed):
    """The judge's verdict on the current output."""

    type: Literal["verdict"]
    event: Literal["verdict"]
    passed: bool
    score: float
    criteria: list[CriterionFinding]
    feedback: str
    iteration: int
    fallback: bool
    """The judge could not answer (its model was down, its answer unreadable): not passed."""
    repaired: NotRequired[bool]
    """The judge's answer was malformed and fixed up (a score on another scale)."""


class BudgetStopEvent(_Timed):
    type: Literal["budget_stop"]
    event: Literal["budget_stop"]
    limit: str
    """The limit that stopped the run: `max_steps`."""


class FinalizeEvent(_Timed):
    """The outcome is decided and the output written."""

    type: Literal["finalize"]
    event: Literal["finalize"]
    status: Literal["passed", "failed", "budget_exhausted"]
    output: str | None
    """The output file, or None when nothing was produced."""
    stop_reason: str | None
    tokens: int


class WarningEvent(_Timed):
    type: Literal["warning"]
    event: Literal["warning"]
    message: str


class MemoryErrorEvent(_Timed):
    """A memory read or write failed; the run went on without it."""

    type: Literal["memory_error"]
    event: Literal["memory_error"]
    operation: str
    error: str


class MemoryIngestEvent(_Timed):
    """Progress of storing the task's documents in memory (about once a second)."""

    type: Literal["memory_ingest"]
    event: Literal["memory_ingest"]
    done: int
    total: int
    files: int


class ApprovalNeededEvent(_Timed):
    """A plan or a tool call waits for a person's decision (`atlas approve`)."""

    type: Literal["approval_needed"]
    event: Literal["approval_needed"]
    id: str
    kind: Literal["plan", "tool"]
    interrupt_id: str
    asked_at: float | None
    iteration: NotRequired[int]
    steps: NotRequired[list[PlanStep]]
    tool: NotRequired[str]
    args: NotRequired[dict[str, Any]]
    step: NotRequired[str]
    team: NotRequired[str]
    worker: NotRequired[str]


class ApprovalEvent(_Timed):
    """A person's (or `--approve-all`'s) decision on a plan or a tool call, applied."""

    type: Literal["approval"]
    event: Literal["approval"]
    id: str
    kind: Literal["plan", "tool"]
    action: Literal["approve", "edit", "reject"]
    by: str
    at: float
    reason: str | None
    waited_s: float | None
    auto: bool
    tool: NotRequired[str]
    step: NotRequired[str]


class EndEvent(_Timed):
    """The run's summary: the fields of `RunResult`."""

    type: Literal["end"]
    event: Literal["end"]
    run_id: str
    status: Literal[
        "passed", "failed", "budget_exhausted", "awaiting_approval", "error", "interrupted"
    ]
    output: str | None
    iterations: int
    tokens: int
    input_tokens: int
    output_tokens: int
    model_calls: int
    cost_usd: float | None
    wall_s: float
    trace_id: str | None
    tracking_uri: str | None
    score: float | None
    stop_reason: str | None
    models: dict[str, str]
    by_team: dict[str, dict[str, Any]]
    by_model: dict[str, dict[str, Any]]
    resumed: bool
    error: str | None
    setup_s: float | None
    run_dir: str | None
    lost_calls: int
    tool_calls: int
    tool_errors: int
    pending: list[dict[str, Any]]
    """What waits for a person when `status` is awaiting_approval (as `approval_needed`)."""
    approvals: int
    approval_wait_s: float | None
    cache_hits: int
    """Model calls answered from the model-response cache (`cache:`): no tokens spent."""
    cache_saved_tokens: int
    alerts: list[dict[str, Any]]
    """Thresholds of the task's `alerts:` the run breached (`name`, `value`, `limit`,
    `message`); see `atlas.alerts`."""


class ErrorEvent(_Timed):
    """From `astream` and `iter_events` only: the run raised (the iterator raises it next)."""

    type: Literal["error"]
    event: Literal["error"]
    error: str


Event: TypeAlias = (
    StartEvent
    | PlanEvent
    | DispatchEvent
    | StepStartEvent
    | HandoffEvent
    | RetryEvent
    | FallbackEvent
    | StepDoneEvent
    | VerdictEvent
    | BudgetStopEvent
    | FinalizeEvent
    | WarningEvent
    | MemoryErrorEvent
    | MemoryIngestEvent
    | ApprovalNeededEvent
    | ApprovalEvent
    | EndEvent
    | ErrorEvent
)
"""Any progress event; `event["type"]` tells which."""

EventHandler: TypeAlias = Callable[[Any], None]
"""An `on_event` callback: it is called with an `Event`. Typed loosely so that a handler taking an
`Event`, a `Mapping` or a `dict[str, Any]` fits."""

EVENT_TYPES: Mapping[str, type[Any]] = {
    get_args(get_type_hints(kind)["type"])[0]: kind for kind in get_args(Event)
}
"""Each `type` an event can have, and the TypedDict of that kind."""


def to_caller(handler: Callable[[Any], None] | None) -> Callable[[Any], None] | None:
    """`on_event` as a run calls it: every event typed and timed, and called where the caller is.

    Made where the run starts. `run()` only calls it on its own thread; `arun()` also gets
    warnings from the set-up and bookkeeping it sends to worker threads: those are handed to
    the caller's event loop.
    """
    if handler is None:
        return None
    try:
        loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    owner = threading.get_ident()

    def deliver(event: dict[str, Any]) -> None:
        if "type" not in event:
            event = {"ts": round(time.time(), 3), **event, "type": event["event"]}
        if loop is None or threading.get_ident() == owner:
            handler(event)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(handler, event)

    return deliver


def _error(exc: BaseException) -> ErrorEvent:
    from atlas.session import one_line as _one_line

    return {"type": "error", "event": "error", "ts": round(time.time(), 3), "error": _one_line(exc)}


async def astream(spec: "TaskSpec", **kwargs: Any) -> AsyncGenerator[Event, None]:
    """Run `atlas.arun(spec, **kwargs)` on the caller's event loop and yield its events as they
    happen, from `start` to `end`. If the run raises, an `error` event comes last and then the
    exception.

    Leaving early cancels the run (calls in flight are dropped, the record is written) and
    waits for it to wind down. Close the iterator to leave at once, for example with
    `async with contextlib.aclosing(atlas.astream(spec)) as events:`; a plain `break` leaves
    it to the event loop, which closes it soon after.
    """
    from atlas.runner import arun

    events: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
    task = asyncio.create_task(arun(spec, on_event=events.put_nowait, **kwargs))
    task.add_done_callback(lambda _: events.put_nowait(None))
    try:
        while (event := await events.get()) is not None:
            yield cast(Event, event)
        error = task.exception()
        if error is not None:
            yield _error(error)
            raise error
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled():
                task.exception()  # retrieved: nobody listens any more, and asyncio logs nothing


def iter_events(spec: "TaskSpec", **kwargs: Any) -> Generator[Event, None, None]:
    """The sync twin of `astream`: `atlas.run(spec, **kwargs)` in a thread, its events yielded
    on the caller's thread as they happen, from `start` to `end`; `error` then the exception when
    the run raises.

    Leaving early (a `break`, `close()`) interrupts the run as Ctrl-C does: calls in flight
    finish, nothing new starts, the record says interrupted and the run can be resumed. It
    returns once the run has stopped.
    """
    from atlas.runner import run

    events: queue.Queue[dict[str, Any] | BaseException | None] = queue.Queue()
    stopping = threading.Event()
    started: list[str] = []

    def handler(event: dict[str, Any]) -> None:
        if event["type"] == "start":
            started.append(event["run_id"])
        if stopping.is_set():
            _interrupt(started)
        events.put(event)

    def work() -> None:
        try:
            run(spec, on_event=handler, **kwargs)
        except BaseException as exc:
            events.put(exc)
        finally:
            events.put(None)

    thread = threading.Thread(target=work, name="atlas-run", daemon=True)
    thread.start()
    try:
        while (item := events.get()) is not None:
            if isinstance(item, BaseException):
                yield _error(item)
                raise item
            yield cast(Event, item)
    finally:
        if thread.is_alive():
            stopping.set()
            _interrupt(started)
            thread.join()


def _interrupt(started: list[str]) -> None:
    """Make the run refuse further model calls with an interrupt, which stops it as Ctrl-C does.
    Its context exists once it has sent `start`; until then the next event tries again."""
    from atlas.runner import _ACTIVE

    for ctx in list(_ACTIVE.values()):
        if ctx.run_id in started:
            ctx.budget.cancel(KeyboardInterrupt("the caller stopped reading the run's events"))
