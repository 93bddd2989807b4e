"""Graph state and the typed structured outputs of the planner and the judge.

State holds plain JSON-able values (dicts, lists, strings) so checkpoints stay portable. It carries
step results, not chat histories: a worker sees its instruction, the results its step depends on,
and what it retrieves.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypedDict

from pydantic import BaseModel, Field, create_model

from atlas.models.usage import Usage, merge_usage

# -- structured outputs (the edge with the models) -----------------------------------------------


class CriterionResult(BaseModel):
    """The judge's finding on one acceptance criterion."""

    criterion: str = Field(description="The criterion, as given")
    passed: bool
    reason: str = Field(description="One sentence: why it passed or failed")


class Verdict(BaseModel):
    """The judge's decision on the output."""

    passed: bool = Field(description="True only if every criterion is met")
    score: float = Field(ge=0, le=1, description="Overall quality from 0 to 1")
    criteria: list[CriterionResult] = Field(description="One entry per acceptance criterion")
    feedback: str = Field(description="What to change to pass; empty if passed")


class StepModel(BaseModel):
    id: str = Field(description="Short unique id, e.g. research_1")
    team: str
    instruction: str = Field(description="What the team must do, self-contained")
    depends_on: list[str] = Field(description="Ids of steps whose results this step needs")


def plan_schema(teams: list[str], max_steps: int = 12) -> type[BaseModel]:
    """The `Plan` output schema for one task: `team` is an enum of the task's teams."""
    team_type: Any = Literal[tuple(teams)]
    step = create_model(
        "Step",
        __base__=StepModel,
        team=(team_type, Field(description="Which team does this step")),
    )
    return create_model(
        "Plan",
        steps=(
            list[step],
            Field(max_length=max_steps, description="Steps; independent steps run in parallel"),
        ),
        rationale=(str, Field(description="One or two sentences on the plan")),
        __doc__="A plan: steps for the teams, with dependencies.",
    )


# -- reducers -------------------------------------------------------------------------------------

RESET: dict[str, Any] = {"__atlas_reset__": True}
"""Written to an accumulating channel, empties it: a new task on a thread that already holds a
run starts clean instead of inheriting that run's results, usage and stop reason."""


def is_reset(value: Any) -> bool:
    return isinstance(value, dict) and value.get("__atlas_reset__") is True


def merge_dicts(left: dict[str, Any] | None, right: dict[str, Any] | None) -> dict[str, Any]:
    if is_reset(right):
        return {}
    return {**(left or {}), **(right or {})}


def first_set(left: Any, right: Any) -> Any:
    """Keeps the first value written (the first stop reason wins)."""
    if is_reset(right):
        return None
    return left if left else right


def append(left: list[Any] | None, right: list[Any] | None) -> list[Any]:
    if is_reset(right):
        return []
    return [*(left or []), *(right or [])]


def add_usage(left: Usage | None, right: Usage | None) -> Usage:
    return {} if is_reset(right) else merge_usage(left, right)


# -- state ----------------------------------------------------------------------------------------


class StepResult(TypedDict, total=False):
    id: str
    team: str
    instruction: str
    iteration: int
    output: str
    summary: str
    workers: list[str]
    handoffs: int
    status: Literal["done", "stopped", "budget_exhausted"]
    note: str


class RunState(TypedDict, total=False):
    """The top-level graph's state."""

    run_id: str
    """The run this state belongs to; a new run on the same thread resets the rest."""
    request: dict[str, Any] | None
    """The embedded graph's input this run was made from: what a resume rebuilds it with."""
    task: str
    iteration: int
    plan: list[dict[str, Any]]
    """The current iteration's steps (ids prefixed with the iteration: `2.research`)."""
    plans: Annotated[list[dict[str, Any]], append]
    """Every plan made, with its iteration and whether it was repaired."""
    wave: list[str]
    """Step ids dispatched in the current wave."""
    plan_cut: str | None
    """Set when `budget.max_steps` cut the current plan: what was cut. The run stops with
    `budget_exhausted` once the steps it kept are done."""
    results: Annotated[dict[str, StepResult], merge_dicts]
    verdict: dict[str, Any] | None
    verdicts: Annotated[list[dict[str, Any]], append]
    usage: Annotated[Usage, add_usage]
    stop_reason: Annotated[str | None, first_set]
    status: str
    output_path: str | None
    output: str
    """The output's text (the file holds the same)."""
    tokens: int
    cost_usd: float | None
    model_calls: int
    trace_id: str | None
    approvals: Annotated[list[dict[str, Any]], append]
    """Every approval decision of the run (`atlas.graph.approval.audit`), in order."""
    plan_feedback: str | None
    """Why a person rejected the last plan: the planner reads it when it plans again."""
    asked_at: float | None
    """When the plan now waiting for approval was made (the wait is measured from it)."""


class TeamInput(TypedDict):
    """What a team receives for one step (the `Send` payload)."""

    task: str
    step: dict[str, Any]
    context: str
    criteria: list[str]
    iteration: int


class TeamOutput(TypedDict, total=False):
    results: dict[str, StepResult]
    usage: Usage
    stop_reason: str | None
    approvals: list[dict[str, Any]]


class TeamState(TeamInput, total=False):
    """A team's private state while it works on one step."""

    messages: list[Any]
    """The supervisor's own short conversation for this step."""
    reports: Annotated[list[dict[str, str]], append]
    handoffs: Annotated[list[dict[str, str]], append]
    assignment: str
    summary: str
    note: str
    results: Annotated[dict[str, StepResult], merge_dicts]
    usage: Annotated[Usage, add_usage]
    stop_reason: Annotated[str | None, first_set]
    approvals: Annotated[list[dict[str, Any]], append]
    wip: dict[str, Any] | None
    """A worker's turn paused for approval: its conversation, counters, the tool calls it wants
    (`pending`), those that wait for a person (`held`), and, once decided, `decisions`."""
