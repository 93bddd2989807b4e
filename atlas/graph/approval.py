"""Human approval inside the run graph: a plan, or a tool call, waits for a person's decision.

The pause is a LangGraph interrupt raised by a node of its own, never by the node that did the
work: the planner's node has already returned its plan (and the worker's node its model answer,
with the tool calls it wants) when `plan_review` or a team's `approval` node interrupts. On
resume only the review node runs again, so nothing done before the pause repeats: no model call,
no tool call, no side effect.

An interrupt's value is `{"type": "atlas.approval", "run_id", "items": [...]}`; each item has an
`id`, a `kind` (`plan` or `tool`) and what is waiting (the steps, or the tool with its arguments).
Its resume value is a decision for every item, or a mapping of item ids to decisions. A decision
is `"approve"`, `"reject"`, or `{"action": "approve" | "edit" | "reject", "reason", "by", "args"
(a tool's edited arguments), "steps" (an edited plan)}`. Items left undecided are asked again
(a second interrupt of the same node), so one item of several can be decided at a time. A value
that cannot be read is asked again too, with the problem in the interrupt's `problem`.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from langchain_core.tools import BaseTool
from langgraph.types import Command, interrupt

from atlas.context import RunContext
from atlas.graph.effects import Body
from atlas.graph.events import emit

PLAN_REVIEW = "plan_review"
"""The top-level node between `plan` and `dispatch` when `approval.plan` is on."""
TOOL_REVIEW = "approval"
"""The team-level node a worker goes to when a tool call it wants needs approval."""
INTERRUPT_TYPE = "atlas.approval"
ACTIONS = ("approve", "edit", "reject")
AUTO = "--approve-all"
"""Who decided, for calls that `--approve-all` let through."""


# -- policy --------------------------------------------------------------------------------------


def tool_names(tool: BaseTool) -> list[str]:
    """The names a tool is matched by in `approval.tools`: its name as the model sees it, and
    for an MCP tool `mcp.<server>.<tool>`."""
    meta = tool.metadata or {}
    names = [tool.name]
    if meta.get("atlas.tool.kind") == "mcp":
        names.insert(0, f"mcp.{meta.get('atlas.mcp.server')}.{meta.get('atlas.mcp.tool')}")
    return names


def needs_approval(ctx: RunContext, tool: BaseTool | None) -> bool:
    """Whether a call of `tool` waits for a person (`approval.tools`, else the tool's own
    declaration of side effects)."""
    if tool is None:
        return False
    declared = bool((tool.metadata or {}).get("atlas.tool.side_effects"))
    return ctx.spec.approval.mode_for(tool_names(tool), declared) == "always"


def item_id(*parts: Any) -> str:
    """A short id for a tool call waiting for approval, stable across listing and deciding."""
    digest = hashlib.sha1("|".join(str(p) for p in parts).encode("utf-8")).hexdigest()
    return f"tool-{digest[:8]}"


# -- decisions -----------------------------------------------------------------------------------


class BadDecision(ValueError):
    """A resume value ATLAS cannot read as a decision."""


def parse_decision(value: Any) -> dict[str, Any]:
    """One decision, normalised: `action`, and `reason`, `by`, `at`, `args`, `steps` if given."""
    if isinstance(value, bool):
        value = "approve" if value else "reject"
    if isinstance(value, str):
        value = {"action": value}
    if not isinstance(value, Mapping):
        raise BadDecision(f"a decision is 'approve', 'reject' or a mapping, not {value!r}"[:200])
    action = str(value.get("action") or "").strip().lower()
    action = {"approved": "approve", "rejected": "reject", "edited": "edit"}.get(action, action)
    if action not in ACTIONS:
        raise BadDecision(f"decision action {action!r} is not one of {', '.join(ACTIONS)}")
    decision: dict[str, Any] = {"action": action}
    reason = value.get("reason")
    if reason is not None:
        decision["reason"] = str(reason)[:2000]
    decision["by"] = str(value.get("by") or "unknown")[:200]
    at = value.get("at")
    decision["at"] = float(at) if isinstance(at, int | float) else time.time()
    if action == "edit":
        if isinstance(value.get("args"), Mapping):
            decision["args"] = dict(value["args"])
        elif isinstance(value.get("steps"), list):
            decision["steps"] = list(value["steps"])
        else:
            raise BadDecision("an edit needs the edited 'args' (a tool call) or 'steps' (a plan)")
    return decision


def read_decisions(value: Any, waiting: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Decisions by item id from a resume value: one decision for every waiting item, or a
    mapping of (some of) their ids to decisions."""
    if isinstance(value, Mapping) and value and all(k in waiting for k in value):
        return {str(k): parse_decision(v) for k, v in value.items()}
    if isinstance(value, Mapping) and "action" not in value and value:
        unknown = ", ".join(sorted(str(k) for k in value if k not in waiting))
        raise BadDecision(f"no approval waiting with id {unknown}; waiting: {', '.join(waiting)}")
    decision = parse_decision(value)
    return {item: dict(decision) for item in waiting}


def ask(ctx: RunContext, items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A decision for every item: at once under `--approve-all`, else from a person, through
    one interrupt per round until every item is decided."""
    if ctx.approve_all:
        now = time.time()
        return {i["id"]: {"action": "approve", "by": AUTO, "at": now, "auto": True} for i in items}
    decided: dict[str, dict[str, Any]] = {}
    problem: str | None = None
    while True:
        left = [i for i in items if i["id"] not in decided]
        if not left:
            return decided
        payload: dict[str, Any] = {"type": INTERRUPT_TYPE, "run_id": ctx.run_id, "items": left}
        if problem:
            payload["problem"] = problem
        value = interrupt(payload)
        try:
            decided.update(read_decisions(value, [i["id"] for i in left]))
            problem = None
        except BadDecision as exc:
            problem = str(exc)


def audit(item: dict[str, Any], decision: dict[str, Any]) -> dict[str, Any]:
    """What the run keeps of a decision (state `approvals`, the trace's HUMAN assessment)."""
    asked = item.get("asked_at")
    waited = None
    if isinstance(asked, int | float):
        waited = round(max(0.0, decision["at"] - float(asked)), 3)
    record = {
        "id": item["id"],
        "kind": item["kind"],
        "action": decision["action"],
        "by": decision.get("by", "unknown"),
        "at": decision["at"],
        "reason": decision.get("reason"),
        "waited_s": waited,
        "auto": bool(decision.get("auto")),
        "applied_at": time.time(),
    }
    for key in ("tool", "args", "step", "team", "worker", "iteration"):
        if key in item:
            record[key] = item[key]
    if "args" in decision:
        record["edited_args"] = decision["args"]
    if "steps" in decision:
        record["edited_steps"] = len(decision["steps"])
    return record


def _record(ctx: RunContext, record: dict[str, Any]) -> None:
    attributes = {
        "atlas.approval.id": record["id"],
        "atlas.approval.kind": record["kind"],
        "atlas.approval.action": record["action"],
        "atlas.approval.by": record["by"],
        "atlas.approval.reason": record.get("reason") or "",
    }
    if record.get("waited_s") is not None:
        attributes["atlas.approval.waited_s"] = record["waited_s"]
    if record.get("tool"):
        attributes["atlas.approval.tool"] = record["tool"]
    with ctx.tracer.span(f"approval:{record['kind']}", attributes=attributes) as span:
        span.set_outputs({"action": record["action"], "reason": record.get("reason")})
    emit({"event": "approval", **{k: v for k, v in record.items() if k != "args"}})


# -- the nodes -----------------------------------------------------------------------------------


def plan_review_body(state: dict[str, Any], ctx: RunContext) -> Body:
    """Approve, edit or reject the plan the planner just made. A rejected plan goes back to the
    planner with the reason (the same iteration, planned again)."""
    from atlas.graph.planner import edited_plan

    plan = state.get("plan") or []
    if not plan or state.get("stop_reason"):
        return Command(goto="dispatch")
    iteration = int(state.get("iteration") or 1)
    item = {
        "id": f"plan-{iteration}-{len(state.get('plans') or [])}",
        "kind": "plan",
        "iteration": iteration,
        "steps": [
            {k: s[k] for k in ("id", "team", "instruction", "depends_on") if k in s} for s in plan
        ],
        "asked_at": state.get("asked_at"),
    }
    decision = ask(ctx, [item])[str(item["id"])]
    if decision["action"] == "edit":
        steps, notes = edited_plan(decision.get("steps") or [], state, ctx)
        if not steps:
            decision = {**decision, "action": "reject", "reason": "; ".join(notes)}
    record = audit(item, decision)
    _record(ctx, record)
    update: dict[str, Any] = {"approvals": [record], "asked_at": None}
    if decision["action"] == "reject":
        reason = decision.get("reason") or "no reason given"
        update.update(iteration=iteration - 1, plan=[], plan_feedback=reason)
        return Command(goto="plan", update=update)
    if decision["action"] == "edit":
        plan_record = {
            "iteration": iteration,
            "steps": steps,
            "repaired": notes,
            "fallback": False,
            "edited_by": record["by"],
        }
        emit({"event": "plan", **plan_record})
        update.update(plan=steps, plans=[plan_record])
    return Command(goto="dispatch", update=update)
    yield


def tool_review_body(state: dict[str, Any], ctx: RunContext) -> Body:
    """Decide the tool calls a worker is waiting on, then hand the decisions back to it."""
    wip = state.get("wip") or {}
    items = [dict(i) for i in wip.get("held") or []]
    decisions = ask(ctx, items)
    records = []
    by_call: dict[str, dict[str, Any]] = {}
    for item in items:
        decision = decisions[item["id"]]
        record = audit(item, decision)
        _record(ctx, record)
        records.append(record)
        by_call[item["call_id"]] = decision
    return Command(
        goto=wip["worker"], update={"wip": {**wip, "decisions": by_call}, "approvals": records}
    )
    yield
