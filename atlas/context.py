"""Run-scoped dependencies, injected into the graph as LangGraph's runtime context.

Nothing here is global: two runs in one process have two contexts, two budgets, two workspaces.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

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
    from atlas.tracing import Tracer


@dataclass
class Budget:
    """Live spend of one run, shared by its parallel workers.

    `reserve()` is called before every model call and raises `BudgetExhausted` when a limit is
    already reached. Parallel callers take a slot under one lock, and a call is refused while the
    spend plus the calls already in flight could pass a limit, so a run overshoots by at most one
    call.
    """

    limits: BudgetSpec
    started: float = field(default_factory=time.monotonic)
    """Monotonic start of this session of the run (a resumed run starts a new session)."""
    tokens: int = 0
    """Input plus output tokens spent so far, across sessions."""
    cost: float = 0.0
    """USD spent on calls with a known price."""
    calls: int = 0
    in_flight: int = 0
    """Model calls started and not yet charged."""
    stopped: BudgetExhausted | None = None
    """The first limit that was hit, if any."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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

    def reserve(self) -> None:
        with self._lock:
            self._check_locked()
            self.in_flight += 1

    def release(self, *, model: str, input_tokens: int, output_tokens: int) -> float | None:
        """Charge a finished call (or release a failed one with zero tokens); returns its cost."""
        cost = cost_usd(model, input_tokens, output_tokens)
        with self._lock:
            self.in_flight = max(0, self.in_flight - 1)
            self.tokens += input_tokens + output_tokens
            self.calls += 1 if (input_tokens or output_tokens) else 0
            if cost is not None:
                self.cost += cost
        return cost

    def check(self) -> None:
        with self._lock:
            self._check_locked()

    def _check_locked(self) -> None:
        if self.stopped is not None:
            raise self.stopped
        lim = self.limits
        avg = self.tokens / self.calls if self.calls else 0
        if lim.max_tokens is not None and self.tokens + avg * self.in_flight >= lim.max_tokens:
            self.stopped = BudgetExhausted("max_tokens", self.tokens, lim.max_tokens)
        elif lim.max_cost_usd is not None and self.cost >= lim.max_cost_usd:
            self.stopped = BudgetExhausted("max_cost_usd", self.cost, lim.max_cost_usd)
        elif lim.timeout_s is not None and self.elapsed >= lim.timeout_s:
            self.stopped = BudgetExhausted("timeout_s", round(self.elapsed, 1), lim.timeout_s)
        if self.stopped is not None:
            raise self.stopped


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

    def close(self) -> None:
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
        from atlas.registry import Registry
        from atlas.tools import Workspace
        from atlas.tracing import NullTracer

        rid = run_id or new_run_id()
        base = (state_dir or Path(".atlas")).resolve()
        run_dir = base / "runs" / rid
        run_dir.mkdir(parents=True, exist_ok=True)
        memory = Memory.for_spec(spec, base) if spec.memory.enabled else None
        return cls(
            spec=spec,
            models=ModelRoles(spec, override=model),
            registry=Registry.for_spec(spec),
            workspace=Workspace.for_spec(spec, run_dir, memory=memory),
            budget=Budget(spec.budget),
            run_id=rid,
            run_dir=run_dir,
            tracer=tracer or NullTracer(),
            memory=memory,
        )
