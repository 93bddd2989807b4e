"""Peer: a `langgraph-supervisor` graph over three ReAct worker agents.

`python -m benchmarks.peers.supervisor --latency-ms 100 --runs 3` (in .venv-peers, with
PYTHONPATH=<repo root>).

What it measures: the fan-out workload as langgraph-supervisor users get it. `create_supervisor`
with its defaults (output_mode="last_message", add_handoff_messages=True, handoff-back messages on,
parallel_tool_calls=False, no checkpointer) over one `create_react_agent` per team (the worker's
persona as its prompt, ATLAS's tool for that team). The supervisor gets the task and the 9 steps in
the user message and hands them off one at a time, in order, with its `transfer_to_<team>` tools;
each worker sees the shared message history, calls its tool once and answers. So the run is
sequential: 10 supervisor calls (9 handoffs and the final answer) plus 2 calls per step, 28 calls.
"""

from __future__ import annotations

import warnings
from importlib.metadata import version
from pathlib import Path
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage
from langgraph.prebuilt import create_react_agent
from langgraph_supervisor import create_supervisor

from benchmarks.peers.common import (
    PeerScriptedModel,
    RunStats,
    Workload,
    cli,
    load_workload,
    make_workspace,
    measure_runs,
    steps_answered,
    steps_text,
    team_tools,
)

# create_react_agent is deprecated in LangGraph 1.x in favour of langchain's create_agent, but it
# is what langgraph-supervisor's README uses and what create_supervisor itself builds on.
warnings.filterwarnings("ignore", message=".*create_react_agent.*", category=DeprecationWarning)
warnings.filterwarnings("ignore", message=".*has been moved to.*")


def supervisor_prompt(workload: Workload) -> str:
    teams = "\n".join(f"- {name}: {t.description}" for name, t in workload.teams.items())
    return (
        "You are the supervisor of three teams. Hand each step of the plan to the team it names, "
        "one step at a time and in order, using your transfer tools. When every step has been "
        "answered, reply with a short summary of the answers.\n\nTeams:\n" + teams
    )


def user_message(workload: Workload) -> str:
    criteria = "\n".join(f"{i}. {c}" for i, c in enumerate(workload.spec.acceptance, 1))
    return (
        f"Task: {workload.task}\n\nAcceptance criteria:\n{criteria}\n\n"
        f"Steps:\n{steps_text(workload.steps)}"
    )


def build_app(workload: Workload, model: PeerScriptedModel, run_dir: Path) -> Any:
    """The compiled supervisor graph over this run's tools (fresh workspace under `run_dir`)."""
    tools = team_tools(workload, make_workspace(workload, run_dir))
    agents: list[Any] = [
        create_react_agent(model, tools[name], prompt=team.persona.prompt.strip(), name=name)
        for name, team in workload.teams.items()
    ]
    graph = create_supervisor(agents, model=model, prompt=supervisor_prompt(workload))
    return graph.compile()


def run_once(workload: Workload, model: PeerScriptedModel, run_dir: Path) -> RunStats:
    model.reset_counts()
    app = build_app(workload, model, run_dir)
    state = app.invoke({"messages": [HumanMessage(user_message(workload))]})
    answers = [
        str(m.content)
        for m in state["messages"]
        if isinstance(m, AIMessage) and m.name in workload.teams and not m.tool_calls
    ]
    return RunStats(
        model_calls=len(model.calls),
        prompt_tokens=model.prompt_total,
        completion_tokens=model.completion_total,
        steps_done=steps_answered(answers, workload.steps),
    )


def measure(latency_ms: int, runs: int) -> dict[str, Any]:
    """langgraph-supervisor: supervisor hands 9 steps one at a time to 3 ReAct workers."""
    workload = load_workload()
    model = PeerScriptedModel(latency_ms=latency_ms)
    return measure_runs(
        "langgraph-supervisor",
        version("langgraph-supervisor"),
        lambda run_dir: run_once(workload, model, run_dir),
        runs,
        len(workload.steps),
    )


def main(argv: list[str] | None = None) -> int:
    return cli("benchmarks.peers.supervisor", measure, argv)


if __name__ == "__main__":
    raise SystemExit(main())
