"""What the embedded graph takes and gives: `atlas.build_graph()`'s public input and output.

The input carries the task, so one compiled graph serves any number of tasks; the spec given
to `build_graph` supplies everything else (teams, models, memory, tracing). Both are
`typing_extensions.TypedDict`s so that pydantic can build their JSON schemas on Python 3.11
(LangGraph's server publishes them through `get_schemas`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, NotRequired, Required

from typing_extensions import TypedDict


class TaskBudget(TypedDict, total=False):
    """Limits for this task; any left out come from the spec."""

    max_iterations: int
    max_steps: int
    max_tokens: int | None
    max_cost_usd: float | None
    timeout_s: float | None


class TaskInputs(TypedDict, total=False):
    """Files the tools may read: globs relative to the spec's folder."""

    documents: list[str]
    data: list[str]


class AtlasInput(TypedDict, total=False):
    """One task for the graph: `graph.invoke({"task": "..."}, config)`."""

    task: Required[str]
    """What to do, in plain words."""
    acceptance: NotRequired[list[str]]
    """Criteria the judge checks; the spec's when left out."""
    name: NotRequired[str]
    """Short name shown in run listings and traces."""
    inputs: NotRequired[TaskInputs]
    budget: NotRequired[TaskBudget]
    namespace: NotRequired[str]
    """The memory partition this run reads and writes; the spec's (`memory.namespace`) when
    left out."""


Status = Literal["passed", "failed", "budget_exhausted", "error", "interrupted"]


class AtlasOutput(TypedDict, total=False):
    """What an invocation returns (and what a parent graph's state receives)."""

    run_id: str
    status: str
    """passed, failed or budget_exhausted (a run that raised has no output state)."""
    output: str
    """The output's text."""
    output_path: str | None
    """Where the output was written: inside the run's own folder, so concurrent runs never
    overwrite each other's."""
    verdict: dict[str, Any] | None
    """The judge's last verdict: passed, score, criteria, feedback."""
    stop_reason: str | None
    iteration: int
    tokens: int
    cost_usd: float | None
    model_calls: int
    trace_id: str | None
    """The MLflow trace of this run (the caller's, when ATLAS ran inside a traced graph)."""


@dataclass
class AtlasContext:
    """What a caller may set per invocation (`graph.invoke(input, config, context=...)`).

    Every field has a default, so LangGraph's server, which builds the context from a request,
    always gets a working one."""

    model: str | None = None
    """Model for every role, e.g. `scripted` or `openai:gpt-4o-mini`; the spec's when unset."""
    state_dir: str | None = None
    """Where run records, checkpoints and outputs go; the graph's when unset."""
    tracking_uri: str | None = None
    """MLflow tracking URI; the spec's (or the state directory's store) when unset."""
    namespace: str | None = None
    """Memory partition; the input's, else the spec's, when unset."""
