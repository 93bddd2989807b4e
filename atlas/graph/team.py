"""A team: a supervisor routing one step between its worker agents.

`build_team(team_def)` returns an uncompiled `StateGraph`; the caller compiles it (as a subgraph
of the run graph, or alone with its own checkpointer). The supervisor hands work over with its
handoff tool (`handoff(to=<worker>|finish)`); handoffs are bounded by `budget.max_handoffs`,
and a supervisor bouncing between two workers (A, B, A, B) is stopped as ping-pong.

Each worker is a tool-calling agent limited to the tools its definition lists: its tool set comes
from `agents/*.yaml`, never from text it read. Repeating the same tool call is refused.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import BaseTool, StructuredTool
from langgraph.graph import END, START, StateGraph
from langgraph.types import Command
from pydantic import Field, create_model

from atlas.context import RunContext
from atlas.errors import BudgetExhausted, ToolError
from atlas.graph.approval import TOOL_REVIEW, item_id, needs_approval, tool_names, tool_review_body
from atlas.graph.effects import Body, CallResult, Io, ModelCall, ToolRun, node
from atlas.graph.events import emit
from atlas.graph.limits import Limits, clip, limits_for
from atlas.graph.memory import recall, store_entities, store_finding
from atlas.graph.state import StepResult, TeamInput, TeamOutput, TeamState
from atlas.memory.entities import EXTRACT_PROMPT, Entities, grounded
from atlas.models.resilience import ProviderError
from atlas.models.usage import Usage, merge_usage
from atlas.registry import TeamDef, WorkerDef

FINISH = "finish"
HANDOFF = "handoff"


def handoff_tool(team: TeamDef) -> StructuredTool:
    """The supervisor's one routing tool: `handoff(to, task, reason)`, `to` an enum of workers.

    Made per team by this factory. The supervisor node turns the call into
    `Command(goto=<worker>)`; `to="finish"` ends the step. One forced tool with an enum keeps
    even a small model's choice valid (grammar-constrained on the local server).
    """
    targets: Any = Literal[(*[w.name for w in team.workers], FINISH)]
    roster = "; ".join(f"{w.name}: {w.description}" for w in team.workers)
    args = create_model(
        "HandoffArgs",
        to=(targets, Field(description=f"Worker to hand to, or finish. Workers: {roster}")),
        task=(str, Field(description="What the worker should do (or, for finish, a summary)")),
        reason=(str, Field(description="Why, in one sentence")),
    )
    return StructuredTool.from_function(
        func=lambda to, task, reason: "",
        name=HANDOFF,
        description="Hand the step to one of your workers, or finish it when it is done",
        args_schema=args,
    )


def _step_header(state: dict[str, Any], limits: Limits) -> str:
    step = state["step"]
    lines = [f"Task: {state['task'].strip()}", f"Step: {step['instruction']}"]
    if state.get("criteria"):
        lines.append("Acceptance criteria of the whole task:")
        lines += [f"{i}. {c}" for i, c in enumerate(state["criteria"], 1)]
    if state.get("context"):
        parts = state["context"].split("\n\n### ")
        shown = [clip(p, limits.context_per_step) for p in parts]
        lines += ["", "Results of earlier steps:", "\n\n### ".join(shown)]
    return "\n".join(lines)


def _ping_pong(handoffs: list[dict[str, str]]) -> bool:
    names = [h["to"] for h in handoffs[-4:]]
    return (
        len(names) == 4 and names[0] == names[2] and names[1] == names[3] and names[0] != names[1]
    )


def supervisor_body(team: TeamDef) -> Any:
    worker_names = [w.name for w in team.workers]
    tools = [handoff_tool(team)]

    def body(state: dict[str, Any], ctx: RunContext) -> Body:
        step = state["step"]
        handoffs = state.get("handoffs") or []
        limit = ctx.spec.budget.max_handoffs
        persona = ctx.registry.persona(team.supervisor.persona)
        messages: list[BaseMessage] = list(state.get("messages") or [])
        if not messages:
            roster = "\n".join(f"- {w.name}: {w.description}" for w in team.workers)
            messages = [
                SystemMessage(f"{persona.prompt}\n\nYour workers:\n{roster}"),
                HumanMessage(_step_header(state, limits_for(ctx, "supervisor"))),
            ]
        stop_note = None
        if state.get("stop_reason"):
            return Command(goto="report")
        if len(handoffs) >= limit:
            stop_note = f"handoff limit reached ({limit})"
        elif _ping_pong(handoffs):
            stop_note = f"ping-pong between {handoffs[-1]['to']} and {handoffs[-2]['to']} stopped"
        if stop_note:
            ctx.tracer.event(
                "loop_guard", {"team": team.name, "step": step["id"], "reason": stop_note}
            )
            return Command(goto="report", update={"note": stop_note})
        try:
            result: CallResult = yield ModelCall(
                role="supervisor",
                team=team.name,
                messages=messages,
                tools=tools,
                tool_choice=HANDOFF,
                run_name=f"supervisor:{team.name}",
                max_tokens=80,
            )
        except BudgetExhausted as exc:
            return Command(goto="report", update={"note": str(exc), "stop_reason": str(exc)})
        except ProviderError as exc:
            return Command(goto="report", update={"note": f"supervisor model unavailable: {exc}"})
        call = result.message.tool_calls[0] if result.message.tool_calls else None
        target, args = _decide(dict(call) if call else None, worker_names, handoffs)
        if target == FINISH:
            summary = str(args.get("task", ""))
            return Command(goto="report", update={"summary": summary, "usage": result.usage})
        reason = str(args.get("reason", "")) or "no reason given"
        task = str(args.get("task", "")) or step["instruction"]
        call_id = call["id"] if call and call.get("id") else f"handoff_{len(handoffs) + 1}"
        routed = AIMessage(
            content="",
            tool_calls=[
                {
                    "name": HANDOFF,
                    "args": {"to": target, "task": task, "reason": reason},
                    "id": call_id,
                }
            ],
        )
        handoff = {"from": "supervisor", "to": target, "reason": reason, "call_id": call_id}
        with ctx.tracer.span(
            f"handoff:{team.name}->{target}",
            span_type="CHAIN",
            inputs={"task": task},
            attributes={
                "atlas.handoff.from": "supervisor",
                "atlas.handoff.to": target,
                "atlas.handoff.reason": reason,
                "atlas.step": step["id"],
            },
        ):
            pass
        emit(
            {
                "event": "handoff",
                "team": team.name,
                "step": step["id"],
                "to": target,
                "reason": reason,
            }
        )
        return Command(
            goto=target,
            update={
                "messages": [*messages, routed],
                "handoffs": [handoff],
                "assignment": task,
                "usage": result.usage,
            },
        )

    return body


def _decide(
    call: dict[str, Any] | None, workers: list[str], handoffs: list[dict[str, str]]
) -> tuple[str, dict[str, Any]]:
    """Where the supervisor's tool call routes; repairs a missing or unknown choice."""
    if call is not None and call.get("name") == HANDOFF:
        raw_args = call.get("args")
        args: dict[str, Any] = raw_args if isinstance(raw_args, dict) else {}
        target = str(args.get("to", ""))
        if target == FINISH and handoffs:
            return FINISH, args
        if target in workers:
            return target, args
    used = {h["to"] for h in handoffs}
    for worker in workers:
        if worker not in used:
            return worker, {"reason": "routed by ATLAS: the supervisor's choice was unusable"}
    return FINISH, {"task": ""}


def worker_tools(ctx: RunContext, team: TeamDef, worker: WorkerDef) -> list[BaseTool]:
    """The worker's tools for this run, as its definition lists them (built-in, Python, MCP)."""
    if ctx.toolbox is None:
        ctx.open_tools()
    assert ctx.toolbox is not None
    return ctx.toolbox.tools_for(team.name, worker.name, ctx.workspace, ctx.tracer)


def worker_body(team: TeamDef, worker: WorkerDef) -> Any:
    def body(state: dict[str, Any], ctx: RunContext) -> Body:
        step = state["step"]
        persona = ctx.registry.persona(worker.persona)
        tools = worker_tools(ctx, team, worker)
        by_name = {t.name: t for t in tools}
        max_calls = ctx.spec.budget.max_tool_calls
        limits = limits_for(ctx, f"team:{team.name}")
        sup_limits = limits_for(ctx, "supervisor")
        if ctx.models.provider(f"team:{team.name}") == "local":
            # A small local model makes one forced tool call, then answers from its result.
            max_calls = 1
        writes = any(t in ("save_draft",) for t in worker.tools)
        lines = [
            _step_header(state, limits),
            "",
            f"Your task: {state.get('assignment') or step['instruction']}",
        ]
        reports = state.get("reports") or []
        if reports:
            lines += ["", "Reports from your teammates on this step:"]
            lines += [f"[{r['worker']}] {clip(r['report'], limits.report)}" for r in reports]
        messages: list[BaseMessage] = [
            SystemMessage(persona.prompt),
            HumanMessage("\n".join(lines)),
        ]
        usage: Usage = {}
        calls_made = 0
        seen_calls: set[str] = set()
        note = ""
        report = ""
        wip = state.get("wip") if (state.get("wip") or {}).get("worker") == worker.name else None
        # A turn that paused for approval goes on from where it stopped: its conversation and
        # the tool calls it wanted, with the decisions. Its model calls are not made again.
        batch: list[dict[str, Any]] | None = None
        decisions: dict[str, dict[str, Any]] = {}
        if wip is not None:
            messages = list(wip["messages"])
            calls_made = int(wip["calls_made"])
            seen_calls = set(wip["seen"])
            batch = list(wip["pending"])
            decisions = dict(wip.get("decisions") or {})
        with ctx.tracer.span(
            f"worker:{worker.name}",
            span_type="AGENT",
            inputs={"task": state.get("assignment") or step["instruction"]},
            attributes={
                "atlas.team": team.name,
                "atlas.worker": worker.name,
                "atlas.step": step["id"],
                "atlas.persona": persona.name,
                "atlas.tools": worker.tools,
            },
        ) as span:
            if wip is None:
                recalled = yield Io(
                    recall,
                    (ctx, state.get("assignment") or step["instruction"]),
                    {"name": f"memory.recall:{worker.name}"},
                )
                if recalled:
                    memory_lines = ["From memory (earlier runs; cite the id in brackets):"]
                    memory_lines += [clip(line, limits.recalled) for line in recalled]
                    head = f"{messages[1].content}\n\n" + "\n".join(memory_lines)
                    messages[1] = HumanMessage(head)
            while True:
                if batch is not None:
                    counters: dict[str, Any] = {"made": calls_made, "note": note}
                    yield from _run_calls(
                        ctx,
                        worker,
                        batch,
                        by_name,
                        decisions,
                        messages,
                        limits,
                        max_calls,
                        seen_calls,
                        counters,
                    )
                    calls_made, note = int(counters["made"]), str(counters["note"])
                    batch, decisions = None, {}
                    continue
                allow_tools = bool(tools) and calls_made < max_calls and not note
                try:
                    result: CallResult = yield ModelCall(
                        role=f"team:{team.name}",
                        team=team.name,
                        messages=messages,
                        tools=tools if allow_tools else None,
                        tool_choice="any" if allow_tools and calls_made == 0 else None,
                        run_name=f"worker:{worker.name}",
                        max_tokens=450 if writes else (160 if allow_tools else 200),
                    )
                except BudgetExhausted as exc:
                    note = str(exc)
                    report = report or "(stopped by the budget before answering)"
                    break
                except ProviderError as exc:
                    note = f"model unavailable: {exc}"
                    report = report or "(the model was unavailable; no answer)"
                    break
                usage = merge_usage(usage, result.usage)
                message = result.message
                wanted: list[dict[str, Any]] = [dict(c) for c in message.tool_calls if allow_tools]
                if not wanted:
                    report = str(message.content or "").strip() or "(no answer)"
                    break
                messages.append(message)
                held = _held(ctx, state, worker, wanted, by_name, seen_calls, calls_made)
                if held:
                    # The calls wait for a person: this turn stops here, with everything it
                    # needs to go on, and the team's approval node asks (an interrupt).
                    span.set_attributes({"atlas.approval.waiting": len(held)})
                    paused = {
                        "worker": worker.name,
                        "messages": messages,
                        "calls_made": calls_made,
                        "seen": sorted(seen_calls),
                        "pending": wanted,
                        "held": held,
                        "asked_at": time.time(),
                    }
                    return Command(goto=TOOL_REVIEW, update={"wip": paused, "usage": usage})
                batch = wanted
            span.set_outputs({"report": clip(report, 1000)})
            span.set_attributes({"atlas.tool_calls": calls_made})
        update: dict[str, Any] = {
            "reports": [{"worker": worker.name, "report": report}],
            "usage": usage,
        }
        if len(team.workers) > 1:
            # The supervisor reads the report as the answer to its handoff call.
            call_id = (state.get("handoffs") or [{}])[-1].get("call_id", "handoff")
            update["messages"] = [
                *(state.get("messages") or []),
                ToolMessage(
                    content=f"{worker.name} reported:\n{clip(report, sup_limits.report)}",
                    tool_call_id=call_id,
                ),
            ]
        if note.startswith("budget exhausted"):
            update["stop_reason"] = note
        if note:
            update["note"] = f"{worker.name}: {note}"
        if wip is not None:
            update["wip"] = None
        return Command(goto="supervisor" if len(team.workers) > 1 else "report", update=update)

    return body


def _held(
    ctx: RunContext,
    state: dict[str, Any],
    worker: WorkerDef,
    wanted: list[dict[str, Any]],
    by_name: dict[str, BaseTool],
    seen: set[str],
    calls_made: int,
) -> list[dict[str, Any]]:
    """The calls of `wanted` that wait for a person before they run (`approval.tools`, or a
    tool that declares side effects), as approval items."""
    held = []
    step = state["step"]
    for position, call in enumerate(wanted):
        tool = by_name.get(call["name"])
        if _call_key(call) in seen or not needs_approval(ctx, tool):
            continue
        assert tool is not None
        held.append(
            {
                "id": item_id(
                    ctx.run_id, step["id"], worker.name, calls_made, position, call["id"]
                ),
                "kind": "tool",
                "call_id": call["id"],
                "tool": tool_names(tool)[0],
                "args": dict(call.get("args") or {}),
                "step": step["id"],
                "team": step["team"],
                "worker": worker.name,
                "instruction": clip(state.get("assignment") or step["instruction"], 300),
                "asked_at": time.time(),
            }
        )
    return held


def _call_key(call: dict[str, Any]) -> str:
    return json.dumps([call["name"], call.get("args")], sort_keys=True, default=str)


def _run_calls(
    ctx: RunContext,
    worker: WorkerDef,
    wanted: list[dict[str, Any]],
    by_name: dict[str, BaseTool],
    decisions: dict[str, dict[str, Any]],
    messages: list[BaseMessage],
    limits: Limits,
    max_calls: int,
    seen_calls: set[str],
    counters: dict[str, Any],
) -> Body:
    """Run a model answer's tool calls in order, each answer appended to `messages`. A call a
    person rejected goes back to the model as a refusal with the reason; an edited one runs
    with the edited arguments."""
    for call in wanted:
        key = _call_key(call)
        tool = by_name.get(call["name"])
        decision = decisions.get(call["id"])
        args = dict(call.get("args") or {})
        if tool is None:
            output = f"error: no tool named {call['name']!r}; yours: {', '.join(by_name)}"
        elif decision is not None and decision["action"] == "reject":
            seen_calls.add(key)  # the same call again is refused without asking again
            reason = decision.get("reason") or "no reason given"
            output = (
                f"refused: {decision.get('by', 'a reviewer')} rejected this call ({reason}); "
                "do not retry it: answer with what you have"
            )
        elif key in seen_calls:
            output = "error: you already made this exact call; answer with what you have"
            counters["note"] = "repeated tool call refused"
            ctx.tracer.event("loop_guard", {"worker": worker.name, "reason": counters["note"]})
        elif counters["made"] >= max_calls:
            output = f"error: tool call limit ({max_calls}) reached; answer now"
        else:
            if decision is not None and decision["action"] == "edit":
                args = dict(decision.get("args") or {})
            seen_calls.add(key)
            counters["made"] += 1
            try:
                output = yield ToolRun(tool, args)
            except ToolError as exc:
                output = f"error: {exc}"
            except Exception as exc:
                output = f"error: {type(exc).__name__}: {exc}"
            ctx.count_tool_call(failed=str(output).startswith("error:"))
        messages.append(
            ToolMessage(
                content=clip(str(output), limits.tool_output),
                tool_call_id=call["id"],
                name=call["name"],
            )
        )


def report_body(team: TeamDef) -> Any:
    def body(state: dict[str, Any], ctx: RunContext) -> Body:
        step = state["step"]
        reports = state.get("reports") or []
        output = "\n\n".join(f"[{r['worker']}]\n{r['report']}" for r in reports) or "(no reports)"
        stop = state.get("stop_reason")
        status: Literal["done", "stopped", "budget_exhausted"] = (
            "budget_exhausted" if stop else ("stopped" if state.get("note") else "done")
        )
        result: StepResult = {
            "id": step["id"],
            "team": team.name,
            "instruction": step["instruction"],
            "iteration": state.get("iteration", 1),
            "output": output,
            "summary": state.get("summary", ""),
            "workers": [r["worker"] for r in reports],
            "handoffs": len(state.get("handoffs") or []),
            "status": status,
            "note": state.get("note", ""),
        }
        usage: Usage = {}
        record = yield Io(store_finding, (ctx, result))
        if record is not None and ctx.spec.memory.extract_entities and not stop:
            usage = yield from _extract_entities(ctx, team, output, record)
        emit(
            {
                "event": "step_done",
                "id": step["id"],
                "team": team.name,
                "status": status,
                "workers": result["workers"],
                "note": result["note"],
            }
        )
        return {"results": {step["id"]: result}, "usage": usage}

    return body


def _extract_entities(ctx: RunContext, team: TeamDef, text: str, record: Any) -> Body:
    """One structured call: the entities and relations in a finding, merged into graph memory."""
    size = 1500 if ctx.models.provider("memory") == "local" else 6000
    try:
        result: CallResult = yield ModelCall(
            role="memory",
            team=team.name,
            messages=[SystemMessage(EXTRACT_PROMPT), HumanMessage(clip(text, size))],
            schema=Entities,
            run_name="memory:extract",
            max_tokens=160,  # the local model's cap: it writes slowly on two cores
        )
    except (BudgetExhausted, ProviderError) as exc:
        ctx.tracer.event("memory_skipped", {"finding": record.id, "reason": str(exc)[:200]})
        return {}
    if isinstance(result.parsed, Entities):
        kept = grounded(result.parsed, text)
        if kept.entities:
            yield Io(store_entities, (ctx, kept, record))
    return result.usage


def build_team(team: TeamDef) -> StateGraph[Any, Any, Any, Any]:
    """The team's supervisor graph, uncompiled: START -> supervisor <-> workers -> report.

    A one-worker team is START -> worker -> report.
    """
    graph: StateGraph[Any, Any, Any, Any] = StateGraph(
        TeamState, input_schema=TeamInput, output_schema=TeamOutput
    )
    graph.add_node("report", node("report", report_body(team)))
    graph.add_edge("report", END)
    names = [w.name for w in team.workers]
    # Workers route themselves (a Command): back to the supervisor, or to the approval node
    # when a tool call they want waits for a person, which hands the decisions back.
    graph.add_node(TOOL_REVIEW, node(TOOL_REVIEW, tool_review_body), destinations=tuple(names))
    after = "report" if len(team.workers) == 1 else "supervisor"
    for worker in team.workers:
        graph.add_node(
            worker.name,
            node(worker.name, worker_body(team, worker)),
            destinations=(after, TOOL_REVIEW),
        )
    if len(team.workers) == 1:
        # Nothing to route: the step goes to the one worker, and its answer is the report.
        graph.add_edge(START, names[0])
        return graph
    graph.add_node(
        "supervisor",
        node("supervisor", supervisor_body(team)),
        destinations=(*names, "report"),
    )
    graph.add_edge(START, "supervisor")
    return graph
