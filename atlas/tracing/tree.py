"""The shape of a run's trace: cost on model spans as they end; at the run's end, iterations,
folded wrappers and per-step totals, and the one batched write of every span to the store.

LangGraph's autolog gives every graph node a span of its own, and ATLAS's span inside it often
says the same thing again (`plan > plan`, `judge > judge`, `team.research > LangGraph`); all of a
run's rounds hang flat under the graph's span. `reshape` works on plain span dicts (MLflow's
`Span.to_dict` form) so it is testable without a run:

- a node span whose only child has its name, and `LangGraph`/`RunnableCallable` wrappers, are
  folded into what they wrap (a failed wrapper is kept: its status is news);
- each plan -> dispatch -> teams -> judge round goes under an `iteration N` span;
- team spans are named with their step (`team.research · 2.research`) and carry the step id, the
  iteration, their tokens and, when every model call in them was priced, their cost.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

USAGE = "mlflow.chat.tokenUsage"
COST = "mlflow.llm.cost"
MODEL = "mlflow.llm.model"
PROVIDER = "mlflow.llm.provider"
SPAN_TYPE = "mlflow.spanType"
INPUTS = "mlflow.spanInputs"
OUTPUTS = "mlflow.spanOutputs"

MODEL_KEY = "atlas.model"
"""Metadata ATLAS puts on each model call (its provider:model label) to price its span."""

_WRAPPERS = ("LangGraph", "RunnableCallable", "RunnableSequence", "RunnableLambda", "", "None")
"""Spans that only wrap others: a subgraph's own span inside its node's, and the anonymous
runnables LangGraph's edge writers show up as (named differently in sync and async runs)."""
_STEP = re.compile(r"^(\d+)\.")


# -- cost, as each model span ends -----------------------------------------------------------------


def cost_processor() -> Callable[[Any], None]:
    """The function MLflow calls on every span before it ends: a model span with token usage
    and ATLAS's model label gets MLflow's cost attribute (what the Overview's cost chart and
    the trace view read) and its model name, for priced models only."""
    from atlas.models.pricing import price_for

    def process(span: Any) -> None:
        try:
            if span.span_type != "CHAT_MODEL":
                return
            attributes = span.attributes or {}
            label = attributes.get(MODEL_KEY)
            if not isinstance(label, str):
                return
            provider, _, name = label.partition(":")
            names = {MODEL: (name or provider).split("?", 1)[0], PROVIDER: provider}
            span.set_attributes({k: v for k, v in names.items() if v and k not in attributes})
            usage = attributes.get(USAGE)
            price = price_for(label)
            if not isinstance(usage, dict) or price is None:
                return
            span.set_attribute(COST, span_cost(usage, price))
        except Exception as exc:  # telemetry never fails a run
            log.debug("could not price span %s: %s", getattr(span, "name", "?"), exc)

    return process


def span_cost(usage: dict[str, Any], price: tuple[float, float]) -> dict[str, float]:
    """MLflow's cost attribute for a call's token usage at (input, output) USD per 1M tokens."""
    inp = int(usage.get("input_tokens") or 0) * price[0] / 1_000_000
    out = int(usage.get("output_tokens") or 0) * price[1] / 1_000_000
    return {"input_cost": inp, "output_cost": out, "total_cost": inp + out}


# -- the tree, at the run's end ------------------------------------------------------------------


class _Node:
    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.attrs: dict[str, Any] = {}
        for key, raw in (data.get("attributes") or {}).items():
            try:
                self.attrs[key] = json.loads(raw) if isinstance(raw, str) else raw
            except ValueError:
                self.attrs[key] = raw
        self.children: list[_Node] = []
        self.parent: _Node | None = None

    @property
    def id(self) -> str:
        return str(self.data["span_id"])

    @property
    def name(self) -> str:
        return str(self.data.get("name") or "")

    @property
    def type(self) -> str:
        return str(self.attrs.get(SPAN_TYPE) or "")

    @property
    def start(self) -> int:
        return int(self.data.get("start_time_unix_nano") or 0)

    @property
    def end(self) -> int:
        return int(self.data.get("end_time_unix_nano") or self.start)

    @property
    def failed(self) -> bool:
        return (self.data.get("status") or {}).get("code") == "STATUS_CODE_ERROR"

    def set(self, key: str, value: Any) -> None:
        self.attrs[key] = value
        self.data.setdefault("attributes", {})[key] = json.dumps(value, default=str)

    def walk(self) -> list[_Node]:
        out = [self]
        for child in self.children:
            out += child.walk()
        return out


def _attach(node: _Node, parent: _Node) -> None:
    if node.parent is not None:
        node.parent.children.remove(node)
    node.parent = parent
    parent.children.append(node)
    node.data["parent_span_id"] = parent.id


def _splice(node: _Node) -> None:
    """Remove `node`, its children taking its place under its parent."""
    parent = node.parent
    if parent is None:
        return
    index = parent.children.index(node)
    kids = node.children
    for kid in kids:
        kid.parent = parent
        kid.data["parent_span_id"] = parent.id
    parent.children[index : index + 1] = kids
    node.children = []
    node.parent = None


def _new_span(template: _Node, name: str, parent: _Node, members: list[_Node]) -> _Node:
    data: dict[str, Any] = {
        "trace_id": template.data["trace_id"],
        "span_id": base64.b64encode(os.urandom(8)).decode(),
        "parent_span_id": parent.id,
        "name": name,
        "start_time_unix_nano": min(m.start for m in members),
        "end_time_unix_nano": max(m.end for m in members),
        "events": [],
        "status": {
            "code": "STATUS_CODE_ERROR" if any(m.failed for m in members) else "STATUS_CODE_OK",
            "message": "",
        },
        "attributes": {},
        "links": [],
    }
    for key in ("mlflow.traceRequestId", "mlflow.spanLogLevel"):
        if key in template.attrs:
            data["attributes"][key] = json.dumps(template.attrs[key])
    node = _Node(data)
    node.set(SPAN_TYPE, "CHAIN")
    index = parent.children.index(members[0])
    parent.children.insert(index, node)
    node.parent = parent
    for member in members:
        _attach(member, node)
    node.children.sort(key=lambda n: n.start)
    return node


def _iteration_of(node: _Node) -> int | None:
    value = node.attrs.get("atlas.iteration")
    if isinstance(value, int):
        return value
    for candidate in (node.attrs.get("atlas.step"), *(node.attrs.get("atlas.wave") or [])):
        match = _STEP.match(str(candidate or ""))
        if match:
            return int(match.group(1))
    return None


def _step_of(team: _Node) -> str | None:
    inputs = team.attrs.get(INPUTS)
    if isinstance(inputs, dict) and isinstance(inputs.get("step"), dict):
        step = inputs["step"].get("id")
        if isinstance(step, str):
            return step
    for node in team.walk():
        step = node.attrs.get("atlas.step")
        if isinstance(step, str):
            return step
    return None


def _fold(graph: _Node) -> None:
    for node in list(graph.walk()):
        if node is graph or node.failed:
            continue
        if node.name in _WRAPPERS and node.parent is not None:
            _splice(node)
    for node in list(graph.children):
        if node.failed:
            continue
        same = [c for c in node.children if c.name == node.name]
        if len(node.children) == 1 and same:
            _splice(node)
        elif node.name == "dispatch" and not node.children:
            # The routing pass that sends a finished wave on to the judge: it did nothing.
            graph.children.remove(node)
            node.parent = None


def _team_totals(team: _Node) -> None:
    step = _step_of(team)
    name = team.name
    if step:
        team.set("atlas.step", step)
        team.data["name"] = f"{name} · {step}"
        iteration = _iteration_of(team)
        if iteration is not None:
            team.set("atlas.iteration", iteration)
    team.set("atlas.team", name.removeprefix("team."))
    inp = out = 0
    cost = 0.0
    priced = True
    for node in team.walk():
        usage = node.attrs.get(USAGE)
        if node.type != "CHAT_MODEL" or not isinstance(usage, dict):
            continue
        inp += int(usage.get("input_tokens") or 0)
        out += int(usage.get("output_tokens") or 0)
        spent = node.attrs.get(COST)
        if isinstance(spent, dict) and isinstance(spent.get("total_cost"), int | float):
            cost += float(spent["total_cost"])
        else:
            priced = False
    team.set("atlas.input_tokens", inp)
    team.set("atlas.output_tokens", out)
    team.set("atlas.tokens", inp + out)
    if priced:
        team.set("atlas.cost_usd", round(cost, 8))


def _iterations(graph: _Node) -> dict[int, _Node]:
    """Group the graph's rounds under `iteration N` spans; returns them by number."""
    rounds: list[tuple[int | None, list[_Node]]] = []
    for node in sorted(graph.children, key=lambda n: n.start):
        if node.name in ("start", "finalize") or node.name.startswith("iteration "):
            continue
        number = _iteration_of(node)
        if node.name == "plan" or not rounds:
            rounds.append((number, [node]))
            continue
        first, members = rounds[-1]
        members.append(node)
        if first is None and number is not None:
            rounds[-1] = (number, members)
    made: dict[int, _Node] = {}
    for number, members in rounds:
        if number is None:
            continue
        span = _new_span(members[0], f"iteration {number}", graph, members)
        span.set("atlas.iteration", number)
        span.set(INPUTS, {"iteration": number})
        for member in members:
            if (
                member.name in ("plan", "judge", "dispatch")
                and "atlas.iteration" not in member.attrs
            ):
                member.set("atlas.iteration", number)
            verdict = member.attrs.get(OUTPUTS)
            if member.type == "EVALUATOR" and isinstance(verdict, dict):
                span.set(OUTPUTS, {"passed": verdict.get("passed"), "score": verdict.get("score")})
        made[number] = span
    return made


def reshape(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The run's spans (dicts, changed in place where kept) in their reshaped tree."""
    nodes = [_Node(s) for s in spans]
    by_id = {n.id: n for n in nodes}
    roots: list[_Node] = []
    for node in nodes:
        parent = by_id.get(str(node.data.get("parent_span_id") or ""))
        if parent is None:
            roots.append(node)
        else:
            node.parent = parent
            parent.children.append(node)
    for node in nodes:
        node.children.sort(key=lambda n: n.start)
    for root in roots:
        graph = next((c for c in root.children if c.type == "CHAIN"), None)
        if graph is None:
            continue
        _fold(graph)
        for node in graph.walk():
            if node.name.startswith("team.") and node.parent is graph:
                _team_totals(node)
        _iterations(graph)
    out: list[dict[str, Any]] = []
    for root in roots:
        out += [n.data for n in root.walk()]
    return out


def judge_spans(spans: list[Any]) -> dict[int, str]:
    """The judge (EVALUATOR) span's id for each iteration, from MLflow spans."""
    found: dict[int, str] = {}
    for span in spans:
        if span.span_type == "EVALUATOR" and span.name == "judge":
            iteration = (span.attributes or {}).get("atlas.iteration")
            if isinstance(iteration, int):
                found[iteration] = span.span_id
    return found
