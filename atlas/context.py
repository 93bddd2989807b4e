"""Run-scoped dependencies, injected into the graph as LangGraph's runtime context.

Nothing here is global: two runs in one process have two contexts, two budgets, two workspaces.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atlas.errors import BudgetExhausted
from atlas.models.pricing import cost_usd
from atlas.models.usage import Usage, totals

if TYPE_CHECKING:
    from atlas.memory import Memory
    from atlas.models import ModelRoles
    from atlas.registry import Registry
    from atlas.spec import Budget as BudgetSpec
    from atlas.spec import TaskSpec
    from atlas.tools import Workspace
    from atlas.tools.catalog import Toolbox
    from atlas.tracing import Tracer


@dataclass
class Budget:
    """Live spend of one run, shared by its parallel workers.

    `reserve()` is called before every model call. A call is admitted while the spend so far,
    plus an average call for each call in flight and for this one, stays within the token and
    cost limits; otherwise it waits for the calls in flight to finish and looks again. So a
    parallel wave never stops while the calls in flight could still leave room, and once the
    spend reaches a limit no call starts: the run ends over the limit by at most the calls that
    were in flight when it was reached (one per parallel branch; one call in a sequential run).
    `BudgetExhausted` is raised for a limit already reached.
    """

    limits: BudgetSpec
    started: float = field(default_factory=time.monotonic)
    """Monotonic start of this session's own work (`start()`: after set-up; a resumed run
    starts a new session)."""
    tokens: int = 0
    """Input plus output tokens spent so far, across sessions."""
    cost: float = 0.0
    """USD spent on calls with a known price."""
    calls: int = 0
    in_flight: int = 0
    """Model calls started and not yet charged."""
    stopped: BudgetExhausted | None = None
    """The first limit that was hit, if any."""
    cancelled: BaseException | None = None
    """Set by `cancel()` (an interrupt): every later `reserve()` raises it."""
    journal: CallJournal | None = None
    """Where every call's start and end is appended, so calls lost to a kill are charged."""
    _lock: threading.Condition = field(default_factory=threading.Condition, repr=False)

    def start(self) -> None:
        """The run's own work starts now: the time limit counts from here, not from set-up."""
        with self._lock:
            self.started = time.monotonic()

    def absorb(self, usage: Usage | None) -> None:
        """Start from what earlier sessions of the same run spent (on resume)."""
        run = totals(usage)
        with self._lock:
            self.tokens = max(self.tokens, run["tokens"])
            self.cost = max(self.cost, float(run.get("cost_usd", 0.0)))
            self.calls = max(self.calls, run["calls"])

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def remaining_s(self) -> float | None:
        """Seconds left of `timeout_s`, or None without a time limit."""
        if self.limits.timeout_s is None:
            return None
        return max(0.0, self.limits.timeout_s - self.elapsed)

    def reserve(self) -> int | None:
        """Admit one model call (waiting for calls in flight when it might not fit); returns
        the call's journal number. Raises BudgetExhausted, or the cancelling exception."""
        with self._lock:
            while not self._admit_locked():
                remaining = self.remaining_s
                self._lock.wait(timeout=1.0 if remaining is None else min(1.0, remaining + 0.01))
        return self.journal.started() if self.journal is not None else None

    async def areserve(self) -> int | None:
        """`reserve()` for the event loop: it waits by sleeping, never in a thread (a thread
        pool of waiters could hold every thread the calls in flight need to answer)."""
        import asyncio

        delay = 0.002
        while True:
            with self._lock:
                if self._admit_locked():
                    break
            await asyncio.sleep(delay)
            delay = min(0.05, delay * 2)
        return self.journal.started() if self.journal is not None else None

    def _admit_locked(self) -> bool:
        self._check_locked()
        if self.in_flight == 0 or self._fits_locked():
            self.in_flight += 1
            return True
        return False

    def _fits_locked(self) -> bool:
        lim = self.limits
        ahead = self.in_flight + 1
        if lim.max_tokens is not None and self.calls:
            if self.tokens + self.tokens / self.calls * ahead > lim.max_tokens:
                return False
        if lim.max_cost_usd is not None and self.calls and self.cost:
            if self.cost + self.cost / self.calls * ahead > lim.max_cost_usd:
                return False
        return True

    def release(
        self,
        *,
        model: str,
        input_tokens: int,
        output_tokens: int,
        number: int | None = None,
    ) -> float | None:
        """Charge a finished call (or release a failed one with zero tokens); returns its cost."""
        cost = cost_usd(model, input_tokens, output_tokens)
        with self._lock:
            self.in_flight = max(0, self.in_flight - 1)
            self.tokens += input_tokens + output_tokens
            self.calls += 1 if (input_tokens or output_tokens) else 0
            if cost is not None:
                self.cost += cost
            self._lock.notify_all()
        if self.journal is not None and number is not None:
            self.journal.ended(number, input_tokens, output_tokens, cost)
        return cost

    def cancel(self, exc: BaseException) -> None:
        """Refuse every later call with `exc` (an interrupt); calls in flight finish."""
        with self._lock:
            self.cancelled = exc
            self._lock.notify_all()

    def check(self) -> None:
        with self._lock:
            self._check_locked()

    def _check_locked(self) -> None:
        if self.cancelled is not None:
            raise self.cancelled
        if self.stopped is not None:
            raise self.stopped
        lim = self.limits
        if lim.max_tokens is not None and self.tokens >= lim.max_tokens:
            self.stopped = BudgetExhausted("max_tokens", self.tokens, lim.max_tokens)
        elif lim.max_cost_usd is not None and self.cost >= lim.max_cost_usd:
            self.stopped = BudgetExhausted("max_cost_usd", round(self.cost, 6), lim.max_cost_usd)
        elif lim.timeout_s is not None and self.elapsed >= lim.timeout_s:
            self.stopped = BudgetExhausted("timeout_s", round(self.elapsed, 1), lim.timeout_s)
        if self.stopped is not None:
            raise self.stopped


class CallJournal:
    """An append-only record of a run's model calls (`runs/<id>/calls.jsonl`).

    A line is appended when a call starts and when it ends, before its result is used. The
    checkpoints only know the calls of finished steps; after a kill, the journal also knows the
    calls of steps that were in flight (they are made again on resume) and the calls that never
    answered, so the run is charged for every call it made.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._next = 0
        self._session = 0

    def _append(self, entry: dict[str, Any]) -> None:
        # Opened per line (no file handle outlives a call, whoever owns the context); the
        # append reaches the OS before the call goes on, which is what survives a kill. Its
        # folder (the run's) exists from the start: nothing here blocks an event loop.
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock:
            with open(self.path, "a", encoding="utf-8") as fh:
                fh.write(line)

    def started(self) -> int:
        with self._lock:
            self._next += 1
            number = self._next
        self._append({"s": number, "session": self.session})
        return number

    def ended(self, number: int, input_tokens: int, output_tokens: int, cost: float | None) -> None:
        entry: dict[str, Any] = {"e": number, "session": self.session, "in": input_tokens}
        entry["out"] = output_tokens
        if cost is not None:
            entry["cost"] = cost
        self._append(entry)

    @property
    def session(self) -> int:
        return self._session

    def open_session(self) -> dict[str, Any]:
        """Start a new session (a run or a resume) and return what earlier sessions spent (see
        `totals`)."""
        spent = self.totals()
        self._session = int(spent.pop("sessions")) + 1
        return spent

    def totals(self) -> dict[str, Any]:
        """What the journal records: `calls` (every call answered, plus every call started and
        never answered), `lost` (started, never answered), `tokens`, `cost_usd`."""
        sessions: set[int] = set()
        started: set[tuple[int, int]] = set()
        ended: set[tuple[int, int]] = set()
        tokens, cost, answered = 0, 0.0, 0
        if self.path.is_file():
            for raw in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue  # a line cut by a kill
                if not isinstance(entry, dict):
                    continue
                session = int(entry.get("session", 0))
                sessions.add(session)
                if "s" in entry:
                    started.add((session, int(entry["s"])))
                elif "e" in entry:
                    ended.add((session, int(entry["e"])))
                    spent = int(entry.get("in", 0)) + int(entry.get("out", 0))
                    tokens += spent
                    answered += 1 if spent else 0
                    cost += float(entry.get("cost", 0.0))
        lost = len(started - ended)
        return {
            "calls": answered + lost,
            "lost": lost,
            "tokens": tokens,
            "cost_usd": cost,
            "sessions": max(sessions, default=0),
        }


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S") + "-" + uuid.uuid4().hex[:6]


@dataclass
class RunContext:
    """Everything one run's nodes need. Passed as `context=` to the compiled graph."""

    spec: TaskSpec
    """The validated task."""
    models: ModelRoles
    """The chat model for each role."""
    registry: Registry
    """Teams and personas."""
    workspace: Workspace
    """Documents, data and drafts that the tools see."""
    budget: Budget
    """Live spend against the task's limits."""
    run_id: str
    """Stable across resumes; also the LangGraph thread id and the MLflow session id."""
    run_dir: Path
    """Per-run files: drafts, plan.json."""
    tracer: Tracer
    """Coordination spans; a no-op tracer when tracing is off."""
    memory: Memory | None = None
    """Vector and graph memory kept across runs; None when `memory.enabled` is false."""
    toolbox: Toolbox | None = None
    """Every worker's tools: built-in, the user's Python tools, MCP sessions (`open_tools()`)."""
    tool_calls: int = 0
    """Tool calls made in this session."""
    tool_errors: int = 0
    """Tool calls that failed (raised, timed out, or answered `error: ...`) in this session."""
    trace_id: str | None = None
    """The MLflow trace this run's spans go to, once tracing has started."""
    outcome: dict[str, Any] | None = None
    """The final state, set by the `finalize` node."""
    request: dict[str, Any] | None = None
    """The embedded graph's input this run was made from (None for `atlas.run`)."""
    approve_all: bool = False
    """Approve every plan and tool call that `approval:` would ask a person about (`--approve-all`,
    for CI): recorded as decided by `--approve-all`, never paused."""
    pending: list[dict[str, Any]] = field(default_factory=list)
    """What the run waits on when it paused for approval (`atlas.approvals.Pending.as_dict`)."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_tool_call(self, failed: bool) -> None:
        with self._lock:
            self.tool_calls += 1
            self.tool_errors += int(failed)

    def open_tools(self) -> None:
        """Resolve every worker's tools and start the MCP servers they use: before the first
        model call, so a bad reference or a server that does not start costs no call."""
        from atlas.tools.catalog import Toolbox

        if self.toolbox is None:
            self.toolbox = Toolbox.resolve(self.spec, self.registry)
        self.toolbox.open(
            run_id=self.run_id,
            run_dir=self.run_dir,
            task_dir=self.spec.root.resolve(),
            default_timeout_s=self.spec.budget.tool_timeout_s,
        )

    def close(self) -> None:
        if self.toolbox is not None:
            self.toolbox.close()
        self.workspace.close()
        self.models.close()
        if self.memory is not None:
            self.memory.close()

    @classmethod
    def create(
        cls,
        spec: TaskSpec,
        *,
        run_id: str | None = None,
        state_dir: Path | None = None,
        model: str | None = None,
        tracer: Tracer | None = None,
    ) -> RunContext:
        from atlas.memory.store import Memory
        from atlas.models import ModelRoles
        from atlas.models.cache import for_spec as cache_for_spec
        from atlas.registry import Registry
        from atlas.tools import Workspace
        from atlas.tracing import NullTracer

        rid = run_id or new_run_id()
        base = (state_dir or Path(".atlas")).resolve()
        run_dir = base / "runs" / rid
        run_dir.mkdir(parents=True, exist_ok=True)
        memory = Memory.for_spec(spec, base, run_id=rid) if spec.memory.enabled else None
        # An unreachable cache server fails here, before any model call.
        response_cache = cache_for_spec(spec, base)
        ctx = cls(
            spec=spec,
            models=ModelRoles(spec, override=model, response_cache=response_cache),
            registry=Registry.for_spec(spec),
            workspace=Workspace.for_spec(spec, run_dir, memory=memory),
            budget=Budget(spec.budget, journal=CallJournal(run_dir / "calls.jsonl")),
            run_id=rid,
            run_dir=run_dir,
            tracer=tracer or NullTracer(),
            memory=memory,
        )
        try:
            ctx.open_tools()
        except BaseException:
            ctx.close()
            raise
        return ctx
