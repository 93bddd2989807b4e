"""Baseline: the fan-out workload as a minimal hand-written LangGraph `StateGraph`.

`python -m benchmarks.handwritten --latency-ms 0 --runs 3 [--use-async]` (in ATLAS's .venv).

It makes the model calls ATLAS makes on this workload and nothing else: one planner call (the
`Plan` tool), the 9 steps fanned out in parallel with `Send` (each: a worker call bound to its one
tool, the tool run, the worker's answer call), then one judge call (the `Verdict` tool), 20 calls in
all, with the same `ScriptedModel`, the same persona prompts and the same ATLAS tools. No tracing,
no checkpointer, no budgets, no retries, no events. Against ATLAS untraced at zero latency it gives
ATLAS's orchestration overhead per model call. `invoke` runs the parallel steps on LangGraph's
thread pool; `--use-async` runs the same graph with `ainvoke` on the event loop instead.
"""

from __future__ import annotations

import asyncio
import operator
from importlib.metadata import version
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.runnables import RunnableLambda
from langchain_core.tools import BaseTool
from langgraph.graph import END, START, StateGraph
from langgraph.types import Send
from pydantic import BaseModel, Field

from benchmarks.peers.common import (
    FANOUT,
    PeerScriptedModel,
    RunStats,
    Workload,
    cli,
    load_workload,
    make_workspace,
    measure_runs,
    steps_answered,
    team_tools,
)

PLANNER_PROMPT = (
    "You are the planner of a team of AI teams. Split the task into steps, each for one team. "
    "Steps that do not need each other's results run in parallel."
)
JUDGE_PROMPT = (
    "You are a strict, fair judge. Decide whether the output meets each acceptance criterion."
)

Team = Literal["research", "analysis", "writing"]


class PlanStep(BaseModel):
    id: str
    team: Team
    instruction: str
    depends_on: list[str] = Field(default_factory=list)


class Plan(BaseModel):
    """A plan: steps for the teams."""

    steps: list[PlanStep]
    rationale: str = ""


class Criterion(BaseModel):
    criterion: str
    passed: bool
    reason: str


class Verdict(BaseModel):
    """The judge's decision on the output."""

    passed: bool
    score: float
    criteria: list[Criterion]
    feedback: str


class RunState(TypedDict, total=False):
    plan: list[dict[str, Any]]
    results: Annotated[dict[str, str], operator.or_]
    verdict: dict[str, Any]


class StepState(TypedDict):
    step: dict[str, Any]


def _structured(message: AIMessage, schema: type[BaseModel]) -> dict[str, Any]:
    call = message.tool_calls[0]
    if call["name"] != schema.__name__:
        raise RuntimeError(f"expected a {schema.__name__} call, got {call['name']}")
    return schema.model_validate(call["args"]).model_dump()


def build_graph(
    workload: Workload, model: PeerScriptedModel, tools: dict[str, list[BaseTool]], drafts: Any
) -> Any:
    """plan -> Send one `step` per planned step -> judge. Nodes work under invoke and ainvoke."""
    spec = workload.spec
    criteria = "\n".join(f"{i}. {c}" for i, c in enumerate(spec.acceptance, 1))
    planner = model.bind_tools([Plan], tool_choice="Plan")
    judge = model.bind_tools([Verdict], tool_choice="Verdict")
    bound = {
        team: (model.bind_tools(ts, tool_choice="any"), model.bind_tools(ts))
        for team, ts in tools.items()
    }

    def plan_messages() -> list[BaseMessage]:
        teams = "\n".join(f"- {n}: {t.description}" for n, t in workload.teams.items())
        text = f"Task: {workload.task}\n\nAcceptance criteria:\n{criteria}\n\nTeams:\n{teams}"
        return [SystemMessage(PLANNER_PROMPT), HumanMessage(text)]

    def step_messages(step: dict[str, Any]) -> list[BaseMessage]:
        persona = workload.teams[step["team"]].persona
        text = (
            f"Task: {workload.task}\nStep: {step['instruction']}\n"
            f"Acceptance criteria of the whole task:\n{criteria}\n\n"
            f"Your task: {step['instruction']}"
        )
        return [SystemMessage(persona.prompt), HumanMessage(text)]

    def judge_messages(state: RunState) -> list[BaseMessage]:
        output = drafts.latest() or "\n\n".join((state.get("results") or {}).values())
        text = (
            f"Task: {workload.task}\nIteration: 1\n\nAcceptance criteria:\n{criteria}\n\n"
            f"Output to judge:\n{output}"
        )
        return [SystemMessage(JUDGE_PROMPT), HumanMessage(text)]

    def plan(state: RunState) -> RunState:
        return {"plan": _structured(planner.invoke(plan_messages()), Plan)["steps"]}

    async def aplan(state: RunState) -> RunState:
        return {"plan": _structured(await planner.ainvoke(plan_messages()), Plan)["steps"]}

    def fan_out(state: RunState) -> list[Send]:
        return [Send("step", {"step": step}) for step in state["plan"]]

    def tool_message(team: str, call: Any, output: Any) -> ToolMessage:
        return ToolMessage(content=str(output), tool_call_id=call["id"], name=call["name"])

    def step(state: StepState) -> RunState:
        first, then = bound[state["step"]["team"]]
        by_name = {t.name: t for t in tools[state["step"]["team"]]}
        messages = step_messages(state["step"])
        ask = first.invoke(messages)
        messages.append(ask)
        for call in ask.tool_calls:
            output = by_name[call["name"]].invoke(call["args"])
            messages.append(tool_message(state["step"]["team"], call, output))
        answer = then.invoke(messages)
        return {"results": {state["step"]["id"]: str(answer.content)}}

    async def astep(state: StepState) -> RunState:
        first, then = bound[state["step"]["team"]]
        by_name = {t.name: t for t in tools[state["step"]["team"]]}
        messages = step_messages(state["step"])
        ask = await first.ainvoke(messages)
        messages.append(ask)
        for call in ask.tool_calls:
            output = await by_name[call["name"]].ainvoke(call["args"])
            messages.append(tool_message(state["step"]["team"], call, output))
        answer = await then.ainvoke(messages)
        return {"results": {state["step"]["id"]: str(answer.content)}}

    def judge_node(state: RunState) -> RunState:
        return {"verdict": _structured(judge.invoke(judge_messages(state)), Verdict)}

    async def ajudge_node(state: RunState) -> RunState:
        return {"verdict": _structured(await judge.ainvoke(judge_messages(state)), Verdict)}

    graph: StateGraph[Any, Any, Any, Any] = StateGraph(RunState)
    graph.add_node("plan", RunnableLambda(plan, afunc=aplan))
    graph.add_node("step", RunnableLambda(step, afunc=astep), input_schema=StepState)
    graph.add_node("judge", RunnableLambda(judge_node, afunc=ajudge_node))
    graph.add_edge(START, "plan")
    graph.add_conditional_edges("plan", fan_out, ["step"])
    graph.add_edge("step", "judge")
    graph.add_edge("judge", END)
    return graph.compile()


def run_once(
    workload: Workload, model: PeerScriptedModel, run_dir: Path, use_async: bool
) -> RunStats:
    model.reset_counts()
    ws = make_workspace(workload, run_dir)
    try:
        app = build_graph(workload, model, team_tools(workload, ws), ws.drafts)
        state = asyncio.run(app.ainvoke({})) if use_async else app.invoke({})
    finally:
        ws.close()
    if "verdict" not in state:
        raise RuntimeError("the judge gave no verdict")
    return RunStats(
        model_calls=len(model.calls),
        prompt_tokens=model.prompt_total,
        completion_tokens=model.completion_total,
        steps_done=steps_answered(list(state.get("results", {}).values()), workload.steps),
    )


def measure(latency_ms: int, runs: int, use_async: bool = False) -> dict[str, Any]:
    """Hand-written LangGraph: plan, 9 steps in parallel with Send, judge; no tracing."""
    workload = load_workload()
    model = PeerScriptedModel(latency_ms=latency_ms, fanout=FANOUT)
    return measure_runs(
        "handwritten-async" if use_async else "handwritten",
        version("langgraph"),
        lambda run_dir: run_once(workload, model, run_dir, use_async),
        runs,
        len(workload.steps),
    )


def main(argv: list[str] | None = None) -> int:
    return cli(
        "benchmarks.handwritten",
        measure,
        argv,
        use_async=("store_true", "run the graph with ainvoke instead of invoke"),
    )


if __name__ == "__main__":
    raise SystemExit(main())
