"""The run graph.

    start -> plan -> dispatch -> team.<name> (in parallel) -> dispatch ... -> judge
                                                                   -> plan | finalize

Node names are stable (`start`, `plan`, `dispatch`, `team.<name>`, `judge`, `finalize`) so traces
and checkpoints read well. `dispatch` sends every ready step at once with `Send`; a step is ready
when every step it depends on has a result.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from langgraph.graph import END, START, StateGraph
from langgraph.types import Command, Send

from atlas.context import RunContext
from atlas.errors import BudgetExhausted
from atlas.graph.approval import PLAN_REVIEW, plan_review_body
from atlas.graph.effects import Body, Io, node
from atlas.graph.events import emit
from atlas.graph.io import AtlasContext, AtlasInput, AtlasOutput
from atlas.graph.judge import current_output, judge_body
from atlas.graph.memory import settle_run, store_output
from atlas.graph.planner import plan_body
from atlas.graph.state import RESET, RunState
from atlas.graph.team import build_team
from atlas.models.usage import totals
from atlas.spec import TaskSpec

MAX_CONTEXT_PER_STEP = 2500


def ready_steps(state: dict[str, Any]) -> list[dict[str, Any]]:
    done = set((state.get("results") or {}).keys())
    return [
        s
        for s in state.get("plan") or []
        if s["id"] not in done and all(d in done for d in s["depends_on"])
    ]


def dispatch_body(state: dict[str, Any], ctx: RunContext) -> Body:
    ready = [] if state.get("stop_reason") else ready_steps(state)
    steps_left = ctx.spec.budget.max_steps - len(state.get("results") or {})
    update: dict[str, Any] = {}
    if len(ready) > steps_left:
        ready = ready[: max(0, steps_left)]
        if not ready:
            reason = f"budget exhausted: max_steps ({ctx.spec.budget.max_steps})"
            ctx.tracer.event("budget_stop", {"limit": "max_steps"})
            emit({"event": "budget_stop", "limit": "max_steps"})
            update["stop_reason"] = reason
    plan = state.get("plan") or []
    done = set((state.get("results") or {}).keys())
    cut = state.get("plan_cut")
    if cut and not ready and plan and all(s["id"] in done for s in plan):
        # Every step the budget let the plan keep is done; the rest was cut: that is the limit.
        reason = f"budget exhausted: max_steps ({ctx.spec.budget.max_steps}): {cut}"
        ctx.tracer.event("budget_stop", {"limit": "max_steps"})
        emit({"event": "budget_stop", "limit": "max_steps"})
        update["stop_reason"] = reason
    if not update.get("stop_reason") and not state.get("stop_reason"):
        try:
            ctx.budget.check()
        except BudgetExhausted as exc:
            update["stop_reason"] = str(exc)
            ready = []
    ids = [s["id"] for s in ready]
    if ids:
        with ctx.tracer.span(
            "dispatch", attributes={"atlas.wave": ids, "atlas.parallel": len(ids)}
        ) as span:
            span.set_outputs({"steps": ids})
        emit({"event": "dispatch", "steps": ids, "teams": [s["team"] for s in ready]})
    update["wave"] = ids
    # Routed from here, with the update, in one write: a cancel can never keep the wave
    # without its steps (LangGraph would take the half as the node's result on resume).
    stop = state.get("stop_reason") or update.get("stop_reason")  # the first one set wins
    return Command(
        update=update, goto=route_dispatch({**state, **update, "stop_reason": stop}, ctx)
    )
    yield


def _context_for(step: dict[str, Any], results: dict[str, Any]) -> str:
    parts = []
    for dep in step["depends_on"]:
        res = results.get(dep)
        if res:
            text = res.get("output", "")
            if len(text) > MAX_CONTEXT_PER_STEP:
                text = text[:MAX_CONTEXT_PER_STEP] + " ...[cut]"
            parts.append(f"### {dep} ({res.get('team')})\n{text}")
    return "\n\n".join(parts)


def start_body(state: dict[str, Any], ctx: RunContext) -> Body:
    """The first node of a run: a thread that held another run starts clean."""
    update: dict[str, Any] = {"run_id": ctx.run_id, "task": ctx.spec.task, "request": ctx.request}
    if ctx.request is not None:
        # An embedded run's stream starts with the run's id (`atlas.run` sends its own).
        emit(
            {
                "event": "start",
                "run_id": ctx.run_id,
                "models": ctx.models.describe(),
                "resumed": False,
            }
        )
    if state.get("run_id") not in (None, ctx.run_id) or state.get("status"):
        update.update(
            plans=RESET,
            results=RESET,
            verdicts=RESET,
            usage=RESET,
            stop_reason=RESET,
            iteration=0,
            plan=[],
            wave=[],
            plan_cut=None,
            verdict=None,
            status=None,
            output_path=None,
            output="",
            approvals=RESET,
            plan_feedback=None,
            asked_at=None,
        )
    return update
    yield


def route_dispatch(state: dict[str, Any], ctx: RunContext) -> Any:
    """Where `dispatch` goes: a `Send` per step of the wave, else the judge, or `finalize`
    after a stop."""
    if state.get("stop_reason"):
        return "finalize"
    spec = ctx.spec
    wave = set(state.get("wave") or [])
    sends = []
    results = state.get("results") or {}
    for step in state.get("plan") or []:
        if step["id"] in wave:
            emit({"event": "step_start", "id": step["id"], "team": step["team"]})
            payload = {
                "task": spec.task.strip(),
                "step": step,
                "context": _context_for(step, results),
                "criteria": list(spec.acceptance),
                "iteration": state.get("iteration", 1),
            }
            sends.append(Send(f"team.{step['team']}", payload))
    return sends or "judge"


def route_judge(state: dict[str, Any], ctx: RunContext) -> str:
    verdict = state.get("verdict") or {}
    if state.get("stop_reason") or verdict.get("passed"):
        return "finalize"
    if int(state.get("iteration", 1)) >= ctx.spec.budget.max_iterations:
        return "finalize"
    return "plan"


def routed_plan(state: dict[str, Any], ctx: RunContext) -> Body:
    """The planner, routed from inside the node: to `plan_review` when plans need a person's
    approval, else straight to `dispatch`."""
    update = yield from plan_body(state, ctx)
    review = ctx.spec.approval.plan and update.get("plan") and not update.get("stop_reason")
    if not review:
        return Command(update=update, goto="dispatch")
    return Command(update={**update, "asked_at": time.time()}, goto=PLAN_REVIEW)


def routed_judge(state: dict[str, Any], ctx: RunContext) -> Body:
    """The judge, routed from inside the node (as `dispatch`)."""
    update = yield from judge_body(state, ctx)
    stop = state.get("stop_reason") or update.get("stop_reason")
    return Command(update=update, goto=route_judge({**state, **update, "stop_reason": stop}, ctx))


def finalize_body(state: dict[str, Any], ctx: RunContext) -> Body:
    verdict = state.get("verdict") or {}
    stop = state.get("stop_reason")
    if verdict.get("passed"):
        status = "passed"
    elif stop and stop.startswith("budget exhausted"):
        status = "budget_exhausted"
    else:
        status = "failed"
    if (
        status == "failed"
        and not stop
        and int(state.get("iteration", 1)) >= ctx.spec.budget.max_iterations
    ):
        stop = f"max_iterations ({ctx.spec.budget.max_iterations}) reached without passing"
    if status == "budget_exhausted":
        with ctx.tracer.span("budget_stop", attributes={"atlas.stop_reason": stop}):
            pass
    output = yield Io(current_output, (state, ctx))
    written: str | None = None
    if output.strip():
        path = yield Io(write_output, (ctx.spec.output_path, output))
        written = str(path)
        yield Io(store_output, (ctx, output, written))
    else:
        # Nothing was produced (a budget stop before any step finished): an earlier run's
        # output stays as it was.
        kept = ctx.spec.output_path
        note = "no output produced" + (f"; {kept} left as it was" if kept.exists() else "")
        emit({"event": "warning", "message": note})
    # The run is finished: what it stored in memory becomes recallable by other runs.
    yield Io(settle_run, (ctx,))
    plan_file = ctx.run_dir / "plan.json"
    plan_file.write_text(json.dumps(state.get("plans") or [], indent=2), encoding="utf-8")
    run = totals(state.get("usage"))
    cost = run.get("cost_usd") if not run.get("cost_unknown_calls") else None
    emit(
        {
            "event": "finalize",
            "status": status,
            "output": written,
            "stop_reason": stop,
            "tokens": run["tokens"],
        }
    )
    final = {
        "status": status,
        "output_path": written,
        "output": output,
        "stop_reason": stop,
        "tokens": run["tokens"],
        "cost_usd": round(cost, 6) if isinstance(cost, float | int) else None,
        "model_calls": run["calls"],
        "trace_id": ctx.trace_id,
    }
    ctx.outcome = {**state, **final}
    return final


def previous_path(path: Path) -> Path:
    """Where an output's previous version is kept: `brief.md` -> `brief.previous.md`."""
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def write_output(path: Path, text: str) -> Path:
    """Write atomically (a temporary file, then a rename): a crash mid-write never leaves a
    half-written output. An existing output with other content is kept beside it first, as
    `<stem>.previous<suffix>`, so a run never destroys what an earlier run delivered."""
    body = text if text.endswith("\n") else text + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink():
        raise OSError(f"{path} is a symlink; ATLAS does not write through links")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(body, encoding="utf-8")
        if path.is_file() and path.read_bytes() != body.encode("utf-8"):
            keep = previous_path(path)
            staged = keep.with_name(f".{keep.name}.{os.getpid()}.tmp")
            staged.unlink(missing_ok=True)
            try:
                os.link(path, staged)
            except OSError:
                shutil.copy2(path, staged)
            staged.replace(keep)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def build_run_graph(
    ctx_or_spec: RunContext | TaskSpec, *, public: bool = False
) -> StateGraph[Any, Any, Any, Any]:
    """The top-level graph for a spec's teams, uncompiled. Its nodes take the run's
    `RunContext` from LangGraph's runtime context.

    `public` gives it the embedded graph's input and output (`AtlasInput`, `AtlasOutput`);
    otherwise it takes and gives the whole `RunState` (what `atlas.run` streams)."""
    spec = ctx_or_spec.spec if isinstance(ctx_or_spec, RunContext) else ctx_or_spec
    from atlas.registry import Registry

    registry = (
        ctx_or_spec.registry if isinstance(ctx_or_spec, RunContext) else Registry.for_spec(spec)
    )
    schemas: dict[str, Any] = (
        {"input_schema": AtlasInput, "output_schema": AtlasOutput, "context_schema": AtlasContext}
        if public
        else {"context_schema": RunContext}
    )
    graph: StateGraph[Any, Any, Any, Any] = StateGraph(RunState, **schemas)
    graph.add_node("start", node("start", start_body))
    graph.add_node("plan", node("plan", routed_plan), destinations=(PLAN_REVIEW, "dispatch"))
    graph.add_node(
        PLAN_REVIEW, node(PLAN_REVIEW, plan_review_body), destinations=("plan", "dispatch")
    )
    graph.add_node(
        "dispatch",
        node("dispatch", dispatch_body),
        destinations=(*[f"team.{name}" for name in spec.teams], "judge", "finalize"),
    )
    for name in spec.teams:
        team_graph = build_team(registry.team(name)).compile()
        graph.add_node(f"team.{name}", team_graph)
        graph.add_edge(f"team.{name}", "dispatch")
    graph.add_node("judge", node("judge", routed_judge), destinations=("plan", "finalize"))
    graph.add_node("finalize", node("finalize", finalize_body))
    graph.add_edge(START, "start")
    graph.add_edge("start", "plan")
    graph.add_edge("finalize", END)
    return graph
