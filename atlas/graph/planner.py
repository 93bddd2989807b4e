"""The `plan` node: the planner model splits the task into steps for the teams.

A weak model's plan is repaired (unknown dependencies dropped, cycles broken, ids made unique, a
writing step added when the task has a writing team) or, when nothing usable came back, replaced by
the default plan. Either way the plan says so (`repaired`, `fallback`) in the state and the trace.
"""

from __future__ import annotations

import re
from typing import Any

from langchain_core.messages import HumanMessage, SystemMessage

from atlas.context import RunContext
from atlas.errors import BudgetExhausted
from atlas.graph.effects import Body, CallResult, Io, ModelCall
from atlas.graph.events import emit
from atlas.graph.limits import COMPACT, limits_for
from atlas.graph.memory import prelude
from atlas.graph.state import plan_schema
from atlas.models.resilience import ProviderError
from atlas.models.usage import Usage, merge_usage

PLANNER_PROMPT = """You are the planner of a team of AI teams. Split the task into a few steps, each
for one team. Steps that do not need each other's results must not depend on each other: they run in
parallel. A step that uses other steps' results lists their ids in depends_on. Give each step a
self-contained instruction. Use only the teams listed."""


def default_plan(teams: list[str], task: str) -> list[dict[str, Any]]:
    """Gathering teams in parallel, then writing after all of them."""
    gatherers = [t for t in teams if t != "writing"]
    steps = [
        {"id": t, "team": t, "instruction": f"Do the {t} work needed for: {task}", "depends_on": []}
        for t in gatherers
    ]
    if "writing" in teams:
        steps.append(
            {
                "id": "writing",
                "team": "writing",
                "instruction": f"Write the deliverable for: {task}",
                "depends_on": gatherers,
            }
        )
    return steps


def repair_plan(
    raw: list[dict[str, Any]], teams: list[str], task: str, max_steps: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """Make a plan executable. Returns the steps and a list of what was changed."""
    notes: list[str] = []
    steps: list[dict[str, Any]] = []
    seen: set[str] = set()
    renamed: dict[str, str] = {}
    for index, item in enumerate(raw):
        team = str(item.get("team", ""))
        if team not in teams:
            notes.append(f"dropped a step for unknown team {team!r}")
            continue
        sid = re.sub(r"[^A-Za-z0-9_-]", "_", str(item.get("id") or f"s{index + 1}"))[:40] or "s"
        original = sid
        n = 2
        while sid in seen:
            sid, n = f"{original}_{n}", n + 1
        if sid != original:
            notes.append(f"renamed duplicate step id {original!r} to {sid!r}")
        renamed.setdefault(original, sid)
        seen.add(sid)
        instruction = (
            str(item.get("instruction") or "").strip() or f"Do the {team} work for: {task}"
        )
        deps = [str(d) for d in item.get("depends_on") or []]
        steps.append({"id": sid, "team": team, "instruction": instruction, "depends_on": deps})
    # Only depend on earlier steps: drops unknown ids and breaks every cycle.
    earlier: set[str] = set()
    for step in steps:
        kept = []
        for dep in step["depends_on"]:
            dep = renamed.get(dep, dep)
            if dep in earlier and dep not in kept:
                kept.append(dep)
            elif dep not in earlier:
                notes.append(f"step {step['id']!r}: dropped dependency {dep!r}")
        step["depends_on"] = kept
        earlier.add(step["id"])
    if not steps:
        return default_plan(teams, task)[:max_steps], ["no usable steps: used the default plan"]
    # A writing step that waits for nothing writes from nothing: make it wait for the gathering.
    gatherers = [s["id"] for s in steps if s["team"] != "writing"]
    orphans = [s for s in steps if s["team"] == "writing" and not s["depends_on"] and gatherers]
    for step in orphans:
        step["depends_on"] = list(gatherers)
        notes.append(f"step {step['id']!r} now waits for {', '.join(gatherers)}")
    if orphans:
        steps = [s for s in steps if s not in orphans] + orphans
    if "writing" in teams and not any(s["team"] == "writing" for s in steps):
        ids = [s["id"] for s in steps]
        steps.append(
            {
                "id": "writing" if "writing" not in seen else "writing_final",
                "team": "writing",
                "instruction": f"Write the deliverable for: {task}",
                "depends_on": ids,
            }
        )
        notes.append("added a final writing step")
    if len(steps) > max_steps:
        notes.append(f"cut the plan from {len(steps)} to {max_steps} steps (budget max_steps)")
        steps = steps[:max_steps]
        kept_ids = {s["id"] for s in steps}
        for step in steps:
            step["depends_on"] = [d for d in step["depends_on"] if d in kept_ids]
    return steps, notes


def planner_messages(
    state: dict[str, Any], ctx: RunContext, memory: dict[str, list[str]] | None = None
) -> list[Any]:
    spec = ctx.spec
    iteration = int(state.get("iteration", 0)) + 1
    lines = [f"Task: {spec.task.strip()}", ""]
    if spec.acceptance:
        lines.append("Acceptance criteria:")
        lines += [f"{i}. {c}" for i, c in enumerate(spec.acceptance, 1)]
        lines.append("")
    lines.append("Teams:")
    for name in spec.teams:
        lines.append(f"- {name}: {ctx.registry.team(name).description}")
    docs = ctx.workspace.documents.sources
    if docs:
        lines.append(f"\nDocuments available to research: {', '.join(docs[:20])}")
    if spec.data_paths:
        lines.append(
            f"Data files available to analysis: {', '.join(p.name for p in spec.data_paths)}"
        )
    if memory and (memory.get("recalled") or memory.get("graph")):
        size = 160 if limits_for(ctx, "planner") is COMPACT else 400
        lines.append("\nFrom memory:")
        lines += [f"- {_clip(line, size)}" for line in memory.get("recalled", [])]
        lines += [f"- {_clip(line, size)}" for line in memory.get("graph", [])]
    lines.append(f"\nIteration: {iteration}")
    verdicts = state.get("verdicts") or []
    if verdicts:
        last = verdicts[-1]
        lines.append(
            f"Feedback from the judge on iteration {iteration - 1}: {last.get('feedback', '')}"
        )
        failed = [c["criterion"] for c in last.get("criteria", []) if not c.get("passed")]
        if failed:
            lines.append("Criteria not yet met: " + "; ".join(failed))
        lines.append("Results so far:")
        for sid, result in (state.get("results") or {}).items():
            lines.append(f"- [{sid}] {result.get('team')}: {_clip(result.get('output', ''), 300)}")
    rejected = state.get("plan_feedback")
    if rejected:
        lines.append(f"\nA reviewer rejected your last plan for this iteration: {rejected}")
        lines.append("Plan again, taking that into account.")
    budget_left = spec.budget.max_steps - len(state.get("results") or {})
    lines.append(f"\nUse at most {max(1, min(budget_left, 12))} steps.")
    return [SystemMessage(PLANNER_PROMPT), HumanMessage("\n".join(lines))]


def _clip(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def plan_body(state: dict[str, Any], ctx: RunContext) -> Body:
    spec = ctx.spec
    iteration = int(state.get("iteration", 0)) + 1
    steps_left = spec.budget.max_steps - len(state.get("results") or {})
    usage: Usage = {}
    with ctx.tracer.span(
        "plan", span_type="AGENT", attributes={"atlas.iteration": iteration}
    ) as span:
        if steps_left <= 0:
            reason = "budget exhausted: max_steps"
            ctx.tracer.event("budget_stop", {"limit": "max_steps"})
            return {"iteration": iteration, "plan": [], "stop_reason": reason}
        memory = (yield Io(prelude, (ctx,))) if iteration == 1 else None
        compact = limits_for(ctx, "planner") is COMPACT
        # A small model plans one step per team; a larger one may split work further.
        schema = plan_schema(list(spec.teams), len(spec.teams) if compact else 12)
        notes: list[str] = []
        fallback = False
        try:
            result: CallResult = yield ModelCall(
                role="planner",
                messages=planner_messages(state, ctx, memory),
                schema=schema,
                run_name="planner",
                max_tokens=120 * len(spec.teams) + 80,
            )
            usage = merge_usage(usage, result.usage)
            raw = (
                result.parsed.model_dump()["steps"]
                if result.parsed is not None
                else _salvage(result)
            )
        except BudgetExhausted as exc:
            ctx.tracer.event("budget_stop", {"limit": exc.limit, "where": "plan"})
            return {"iteration": iteration, "plan": [], "stop_reason": str(exc), "usage": usage}
        except ProviderError as exc:  # every model failed after retries: fall back, say so
            raw = []
            notes.append(f"planner call failed ({type(exc).__name__}): used the default plan")
        if not raw:
            fallback = True
        steps, repairs = repair_plan(raw, list(spec.teams), spec.task.strip(), steps_left)
        notes += repairs
        fallback = fallback or any("default plan" in n for n in notes)
        for step in steps:
            step["id"] = f"{iteration}.{step['id']}"
            step["depends_on"] = [f"{iteration}.{d}" for d in step["depends_on"]]
        record = {"iteration": iteration, "steps": steps, "repaired": notes, "fallback": fallback}
        span.set_outputs(record)
        span.set_attributes({"atlas.plan.steps": len(steps), "atlas.plan.fallback": fallback})
        emit({"event": "plan", **record})
        cut = next((n for n in notes if n.startswith("cut the plan")), None)
        return {
            "iteration": iteration,
            "plan": steps,
            "plans": [record],
            "usage": usage,
            "plan_cut": cut,
            "plan_feedback": None,
        }


def edited_plan(
    raw: list[Any], state: dict[str, Any], ctx: RunContext
) -> tuple[list[dict[str, Any]], list[str]]:
    """A plan a person edited, made executable as a planner's plan is (unknown teams dropped,
    dependencies only on earlier steps, the budget's cut), with the iteration's id prefix.
    Ids may be given with or without it (`research` or `1.research`)."""
    spec = ctx.spec
    iteration = int(state.get("iteration") or 1)
    prefix = f"{iteration}."
    items = []
    for item in raw:
        if not isinstance(item, dict):
            continue
        item = dict(item)
        item["id"] = str(item.get("id") or "").removeprefix(prefix)
        item["depends_on"] = [str(d).removeprefix(prefix) for d in item.get("depends_on") or []]
        items.append(item)
    if not items:
        return [], ["the edited plan has no steps"]
    steps_left = spec.budget.max_steps - len(state.get("results") or {})
    steps, notes = repair_plan(items, list(spec.teams), spec.task.strip(), steps_left)
    if any("default plan" in n for n in notes):
        return [], ["the edited plan has no step for a team of this task"]
    for step in steps:
        step["id"] = f"{prefix}{step['id']}"
        step["depends_on"] = [f"{prefix}{d}" for d in step["depends_on"]]
    return steps, notes


def _salvage(result: CallResult) -> list[dict[str, Any]]:
    """Pull steps out of an unparseable structured answer, if any are there."""
    calls = result.message.tool_calls
    args = calls[0]["args"] if calls else None
    if isinstance(args, dict) and isinstance(args.get("steps"), list):
        return [s for s in args["steps"] if isinstance(s, dict)]
    return []
