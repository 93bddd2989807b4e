"""ATLAS: multi-agent orchestration on LangGraph, with MLflow tracing built in.

from atlas import TaskSpec, run
result = run(TaskSpec.from_file("task.yaml"), model="scripted")
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = [
    "ApprovalEvent",
    "ApprovalNeededEvent",
    "AtlasError",
    "BudgetExhausted",
    "BudgetStopEvent",
    "DispatchEvent",
    "EndEvent",
    "ErrorEvent",
    "Event",
    "EventHandler",
    "FallbackEvent",
    "FinalizeEvent",
    "HandoffEvent",
    "MemoryErrorEvent",
    "MemoryIngestEvent",
    "PlanEvent",
    "RetryEvent",
    "RunContext",
    "RunResult",
    "SpecError",
    "StartEvent",
    "StepDoneEvent",
    "StepStartEvent",
    "TaskSpec",
    "ToolContext",
    "VerdictEvent",
    "WarningEvent",
    "__version__",
    "approve",
    "arun",
    "astream",
    "build_graph",
    "build_team",
    "iter_events",
    "load_task",
    "pending_approvals",
    "register_tool",
    "resume",
    "run",
    "tool",
    "unregister_tool",
]

# Heavy modules (LangGraph, LangChain, MLflow) load on first use, so `import atlas` and
# `python -m atlas --help` stay fast and have no side effects.
_LAZY = {
    "ApprovalEvent": "atlas.events",
    "ApprovalNeededEvent": "atlas.events",
    "approve": "atlas.approvals",
    "pending_approvals": "atlas.approvals",
    "AtlasError": "atlas.errors",
    "BudgetExhausted": "atlas.errors",
    "SpecError": "atlas.errors",
    "TaskSpec": "atlas.spec",
    "load_task": "atlas.spec",
    "RunContext": "atlas.context",
    "RunResult": "atlas.runner",
    "run": "atlas.runner",
    "arun": "atlas.runner",
    "resume": "atlas.runner",
    "BudgetStopEvent": "atlas.events",
    "DispatchEvent": "atlas.events",
    "EndEvent": "atlas.events",
    "ErrorEvent": "atlas.events",
    "Event": "atlas.events",
    "EventHandler": "atlas.events",
    "FallbackEvent": "atlas.events",
    "FinalizeEvent": "atlas.events",
    "HandoffEvent": "atlas.events",
    "MemoryErrorEvent": "atlas.events",
    "MemoryIngestEvent": "atlas.events",
    "PlanEvent": "atlas.events",
    "RetryEvent": "atlas.events",
    "StartEvent": "atlas.events",
    "StepDoneEvent": "atlas.events",
    "StepStartEvent": "atlas.events",
    "VerdictEvent": "atlas.events",
    "WarningEvent": "atlas.events",
    "astream": "atlas.events",
    "iter_events": "atlas.events",
    "build_graph": "atlas.graph",
    "build_team": "atlas.graph",
    "ToolContext": "atlas.tools.user",
    "register_tool": "atlas.tools.user",
    "unregister_tool": "atlas.tools.user",
    "tool": "atlas.tools.user",
}

if TYPE_CHECKING:
    from atlas.approvals import approve
    from atlas.approvals import pending as pending_approvals
    from atlas.context import RunContext
    from atlas.errors import AtlasError, BudgetExhausted, SpecError
    from atlas.events import (
        ApprovalEvent,
        ApprovalNeededEvent,
        BudgetStopEvent,
        DispatchEvent,
        EndEvent,
        ErrorEvent,
        Event,
        EventHandler,
        FallbackEvent,
        FinalizeEvent,
        HandoffEvent,
        MemoryErrorEvent,
        MemoryIngestEvent,
        PlanEvent,
        RetryEvent,
        StartEvent,
        StepDoneEvent,
        StepStartEvent,
        VerdictEvent,
        WarningEvent,
        astream,
        iter_events,
    )
    from atlas.graph import build_graph, build_team
    from atlas.runner import RunResult, arun, resume, run
    from atlas.spec import TaskSpec, load_task
    from atlas.tools.user import ToolContext, register_tool, tool, unregister_tool


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'atlas' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
