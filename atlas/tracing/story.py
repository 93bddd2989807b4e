"""`python -m atlas trace RUN_ID`: a run's story told from its MLflow trace alone.

The run's record (`runs.db`) gives the trace id and the store; everything else comes from the
trace's spans (names, types, attributes, inputs and outputs), never from the checkpoint or
`plan.json`. The work is split so it can be tested on plain data:

    fetch_spans(uri, trace_id) -> [span dict]   (the only part that talks to MLflow)
    build_story(spans, ...)    -> story dict    (pure)
    render(story)              -> text          (pure)

A span dict has `span_id`, `parent_id`, `name`, `type`, `start_ns`, `end_ns`, `attributes`,
`inputs` and `outputs`. Spans are recognised by name prefix, type and attributes, never by
their exact nesting, so both trace shapes work: the flat one (`plan`/`dispatch`/`judge` node
spans around ATLAS's own spans) and the grouped one (`iteration N` spans, folded wrappers, team
spans named `team.<name> · <step id>` carrying the step's usage).

- plan: a span named `plan...` of type AGENT (or with `atlas.plan.steps`); its outputs hold the
  steps. wave: a span with `atlas.wave` (a list of step ids). team step: a span named
  `team.<name>...`; its step id is `atlas.step`, the name's `· <id>` suffix, or the first
  `atlas.step` below it. handoff: a span with `atlas.handoff.to`. loop guard: `loop_guard...`.
  verdict: an EVALUATOR span (or one with `atlas.verdict.passed`); its outputs hold the verdict.
  model call: a CHAT_MODEL (or LLM) span; usage from `mlflow.chat.tokenUsage`, cost from
  `mlflow.llm.cost`.
- iteration of a span: its `atlas.iteration`, else its step id's prefix (`2.research` is 2),
  else an enclosing span's, else the plan that started last before it.
- a step's usage: the team span's `atlas.tokens` / `atlas.input_tokens` / `atlas.output_tokens`
  / `atlas.cost_usd` when present (a missing `atlas.cost_usd` means unpriced), else the sum of
  the model spans below it (cost only when every one of them has `mlflow.llm.cost`).

The JSON document (`--json`), stable; fields may be added, none removed or renamed:

    {"run_id", "trace_id", "status", "stop_reason", "task",
     "iterations": [{"iteration",
                     "plan": [{"id", "team", "instruction", "depends_on"}],
                     "waves": [["1.research", "1.analysis"], ["1.writing"]],
                     "steps": [{"id", "team", "tokens", "input_tokens", "output_tokens",
                                "cost_usd", "model_calls",
                                "handoffs": [{"from", "to", "reason"}],
                                "guards": [{"reason", "worker"}]}],
                     "planner": USAGE, "judge": USAGE, "tokens",
                     "verdict": {"passed", "score", "criteria": [{"criterion", "passed",
                                 "reason"}], "feedback", "fallback"} | null,
                     "notes": [str]}],
     "totals": {"status", "iterations", "tokens", "input_tokens", "output_tokens",
                "model_calls", "cost_usd", "wall_s", "unattributed_tokens"}}

    USAGE = {"tokens", "input_tokens", "output_tokens", "cost_usd", "model_calls"}

`cost_usd` is null when unknown (a model without a price). Tokens add up exactly: an
iteration's `tokens` is its planner's, its steps' and its judge's. When the steps' usage comes
from their model spans (the flat shape), the iterations' `tokens` plus
`totals.unattributed_tokens` (model calls outside any plan, step or judge span) is the sum of
the trace's model spans, which is `totals.tokens` whenever every model call has its span (a
scripted run: the steps add up to `by_team` of `atlas run --json`, and with planner and judge to
its `tokens`). `totals` comes from the root span's `atlas.usage.*` (what `atlas run` reported)
when present, else from the model spans.

Errors are one line (the CLI's `AtlasError` handling): unknown run or ambiguous prefix
(`RunNotFound`, `AmbiguousRun`: exit 2), no trace or a store whose password ATLAS does not keep
(`NoTrace`: exit 2), a store that is gone, unreachable or without the trace (`TraceStoreError`,
`TraceNotFound`: exit 3). A store is checked before MLflow opens it and is never created.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from atlas.errors import AtlasError

INSTRUCTION_CHARS = 90
"""An instruction is shown on one line, cut to about this many characters."""

_MODEL_TYPES = ("CHAT_MODEL", "LLM")


class NoTrace(AtlasError):
    """The run has no trace to tell (tracing was off, or the trace was not stored), or its
    store needs a password ATLAS does not keep (exit code 2)."""

    exit_code = 2


class TraceStoreError(AtlasError):
    """The run's MLflow store is gone or unreachable, or does not hold its trace (exit 3)."""

    exit_code = 3


class TraceNotFound(TraceStoreError):
    """The store answers but does not hold the trace (exit 3)."""


# --- loading -------------------------------------------------------------------------------


def story_for_record(
    record: Any, state_dir: Path, *, tracking_uri: str | None = None
) -> dict[str, Any]:
    """The story of the run `record` (a RunRecord), read from its trace."""
    if not record.trace_id:
        raise NoTrace(
            f"run {record.run_id} has no trace (tracing was off for it, or its trace could "
            "not be stored)"
        )
    uri = _reading_uri(record, state_dir, tracking_uri)
    try:
        spans = fetch_spans(uri, record.trace_id)
    except TraceNotFound as exc:
        if record.status != "running":
            raise
        raise TraceNotFound(
            f"run {record.run_id} is still running (or was killed): its trace is written when "
            f"it ends ({exc})"
        ) from None
    return build_story(spans, run_id=record.run_id, trace_id=record.trace_id, status=record.status)


def _reading_uri(record: Any, state_dir: Path, explicit: str | None) -> str:
    from atlas.tracing.mlflow import local_uri
    from atlas.tracing.redact import REDACTED, public_url

    if explicit:
        return explicit
    stored = record.tracking_uri
    if not stored:
        return local_uri(state_dir)
    if REDACTED not in stored:
        return str(stored)
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and public_url(env) == stored:
        return env
    raise NoTrace(
        f"run {record.run_id} traced to {stored}, whose password ATLAS does not store: pass "
        "--tracking-uri (or set MLFLOW_TRACKING_URI) with it"
    )


def fetch_spans(uri: str, trace_id: str) -> list[dict[str, Any]]:
    """The spans of trace `trace_id` in the MLflow store at `uri`, as plain dicts.

    The store is checked first without creating anything (a missing sqlite file is not made;
    a server must answer within `probe`'s few seconds), then read with MLflow's HTTP client
    bounded to one quick try. Raises TraceStoreError with one line."""
    from atlas.tracing.mlflow import (
        QUIET,
        _bounded_http,
        offline_defaults,
        quiet_mlflow_logs,
    )
    from atlas.tracing.redact import public_url

    shown = public_url(uri)
    problem = _read_problem(uri)
    if problem is not None:
        raise TraceStoreError(f"cannot read trace {trace_id}: the MLflow store {shown} {problem}")
    offline_defaults()
    import mlflow
    from mlflow.exceptions import MlflowException

    quiet_mlflow_logs()
    with QUIET.capture(), _bounded_http():
        try:
            trace = mlflow.MlflowClient(uri).get_trace(trace_id)
        except MlflowException as exc:
            if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
                raise TraceNotFound(
                    f"trace {trace_id} is not in the MLflow store {shown} (was the store "
                    "replaced? pass --tracking-uri to read another)"
                ) from None
            raise TraceStoreError(
                f"cannot read trace {trace_id} from the MLflow store {shown}: {_one_line(exc)}"
            ) from None
        except Exception as exc:
            raise TraceStoreError(
                f"cannot read trace {trace_id} from the MLflow store {shown}: "
                f"{type(exc).__name__}: {_one_line(exc)}"
            ) from None
    if trace is None:  # older MLflow clients return None for an unknown id
        raise TraceNotFound(f"trace {trace_id} is not in the MLflow store {shown}")
    return spans_from_trace(trace)


def _read_problem(uri: str) -> str | None:
    """Why the store at `uri` cannot be read, checked without changing anything; else None."""
    from atlas.tracing.mlflow import _sqlite_path, probe, store_problem

    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        problem = probe(uri)
        return None if problem is None else f"is unreachable ({problem})"
    if uri.startswith("sqlite:"):
        path = _sqlite_path(uri)
        if path is None:
            return "is not a file (nothing to read)"
        if not path.exists():
            return f"is gone ({path} does not exist)"
        if not path.is_file():
            return f"is not usable ({path} is not a file)"
        if not os.access(path, os.R_OK):
            return f"cannot be read ({path}: permission denied)"
        return None
    if parsed.scheme in ("", "file"):
        root = Path(urllib.parse.unquote(parsed.path) if parsed.scheme else uri)
        return None if root.is_dir() else f"is gone ({root} does not exist)"
    problem = store_problem(uri, "")  # SQL servers: one bounded connect
    return None if problem is None else f"is unreachable ({problem})"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def spans_from_trace(trace: Any) -> list[dict[str, Any]]:
    """An MLflow Trace's spans as plain dicts (see the module's docstring)."""
    spans = []
    for span in trace.data.spans:
        attributes = {
            str(k): v
            for k, v in (span.attributes or {}).items()
            if not str(k).startswith("mlflow.span")
        }
        spans.append(
            {
                "span_id": span.span_id,
                "parent_id": span.parent_id,
                "name": str(span.name or ""),
                "type": span.span_type,
                "start_ns": span.start_time_ns,
                "end_ns": span.end_time_ns,
                "attributes": attributes,
                "inputs": span.inputs,
                "outputs": span.outputs,
            }
        )
    return spans


# --- spans -> story ------------------------------------------------------------------------


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    return None


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _json(value: Any) -> Any:
    """A value MLflow may hand back as JSON text, decoded."""
    if isinstance(value, str) and value[:1] in ("{", "["):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _step_iteration(step_id: Any) -> int | None:
    match = re.match(r"\s*(\d+)\.", step_id) if isinstance(step_id, str) else None
    return int(match.group(1)) if match else None


class _Trace:
    """The spans, indexed: parents, children, start order."""

    def __init__(self, spans: Iterable[dict[str, Any]]) -> None:
        self.spans = [dict(s) for s in spans if isinstance(s, dict) and s.get("span_id")]
        for span in self.spans:
            span["name"] = str(span.get("name") or "")
            span["attributes"] = _json(span.get("attributes")) or {}
            if not isinstance(span["attributes"], dict):
                span["attributes"] = {}
        self.spans.sort(key=lambda s: _int(s.get("start_ns")) or 0)
        self.by_id = {s["span_id"]: s for s in self.spans}
        self.children: dict[str, list[dict[str, Any]]] = {}
        for span in self.spans:
            parent = span.get("parent_id")
            if isinstance(parent, str) and parent in self.by_id:
                self.children.setdefault(parent, []).append(span)

    def ancestors(self, span: dict[str, Any]) -> Iterator[dict[str, Any]]:
        seen = {span["span_id"]}
        parent = self.by_id.get(span.get("parent_id"))
        while parent is not None and parent["span_id"] not in seen:
            seen.add(parent["span_id"])
            yield parent
            parent = self.by_id.get(parent.get("parent_id"))

    def descendants(self, span: dict[str, Any]) -> Iterator[dict[str, Any]]:
        stack = list(reversed(self.children.get(span["span_id"], [])))
        seen: set[str] = set()
        while stack:
            child = stack.pop()
            if child["span_id"] in seen:
                continue
            seen.add(child["span_id"])
            yield child
            stack.extend(reversed(self.children.get(child["span_id"], [])))

    def subtree(self, root: dict[str, Any]) -> _Trace:
        return _Trace([root, *self.descendants(root)])


def _attrs(span: dict[str, Any]) -> dict[str, Any]:
    attributes = span.get("attributes")
    return attributes if isinstance(attributes, dict) else {}


def _type(span: dict[str, Any]) -> str:
    return str(span.get("type") or "").upper()


def _is_model(span: dict[str, Any]) -> bool:
    return _type(span) in _MODEL_TYPES


def _is_plan(span: dict[str, Any]) -> bool:
    return "atlas.plan.steps" in _attrs(span) or (
        span["name"].startswith("plan") and _type(span) == "AGENT"
    )


def _is_verdict(span: dict[str, Any]) -> bool:
    return "atlas.verdict.passed" in _attrs(span) or _type(span) == "EVALUATOR"


def _is_team(span: dict[str, Any]) -> bool:
    return span["name"].startswith("team.")


def _wave_of(span: dict[str, Any]) -> list[str] | None:
    wave = _json(_attrs(span).get("atlas.wave"))
    if wave is None and span["name"].startswith("dispatch"):
        outputs = _json(span.get("outputs"))
        wave = outputs.get("steps") if isinstance(outputs, dict) else None
    if isinstance(wave, list) and wave and all(isinstance(s, str) for s in wave):
        return list(wave)
    return None


def _usage_of(span: dict[str, Any]) -> tuple[int, int, int, float | None] | None:
    """(input, output, total tokens, cost or None) of a model span; None without usage."""
    attributes = _attrs(span)
    usage = _json(attributes.get("mlflow.chat.tokenUsage"))
    if not isinstance(usage, dict):
        return None
    tokens_in = _int(usage.get("input_tokens")) or 0
    tokens_out = _int(usage.get("output_tokens")) or 0
    total = _int(usage.get("total_tokens"))
    cost_value = _json(attributes.get("mlflow.llm.cost"))
    cost: float | None = None
    if isinstance(cost_value, dict):
        cost = _float(cost_value.get("total_cost"))
        if cost is None:
            parts = [_float(cost_value.get(k)) for k in ("input_cost", "output_cost")]
            if any(p is not None for p in parts):
                cost = sum(p or 0.0 for p in parts)
    return tokens_in, tokens_out, tokens_in + tokens_out if total is None else total, cost


class _Usage:
    def __init__(self) -> None:
        self.tokens = 0
        self.input_tokens = 0
        self.output_tokens = 0
        self.calls = 0
        self.cost = 0.0
        self.priced = True

    def add(self, usage: tuple[int, int, int, float | None]) -> None:
        tokens_in, tokens_out, total, cost = usage
        self.input_tokens += tokens_in
        self.output_tokens += tokens_out
        self.tokens += total
        self.calls += 1
        if cost is None:
            self.priced = False
        else:
            self.cost += cost

    def cost_usd(self) -> float | None:
        return round(self.cost, 6) if self.priced else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd(),
            "model_calls": self.calls,
        }


def _find_root(trace: _Trace, run_id: str | None) -> dict[str, Any] | None:
    if run_id:
        for span in trace.spans:
            if _attrs(span).get("atlas.run_id") == run_id:
                return span
    tops = [s for s in trace.spans if s.get("parent_id") not in trace.by_id]
    return tops[0] if tops else None


def build_story(
    spans: Iterable[dict[str, Any]],
    *,
    run_id: str | None = None,
    trace_id: str | None = None,
    status: str | None = None,
) -> dict[str, Any]:
    """The story of a run (see the module's docstring for its shape) from its spans. `status`
    is used when the trace does not say."""
    trace = _Trace(spans)
    root = _find_root(trace, run_id)
    if root is not None and root.get("parent_id") in trace.by_id:
        trace = trace.subtree(root)  # the run inside a caller's trace: only its own spans
        root = trace.by_id[root["span_id"]]
    story = _Story(trace, root)
    story.read()
    rounds = story.iterations()
    root_attrs = _attrs(root) if root is not None else {}
    outputs = _json(root.get("outputs")) if root is not None else None
    outputs = outputs if isinstance(outputs, dict) else {}
    inputs = _json(root.get("inputs")) if root is not None else None
    task = inputs.get("task") if isinstance(inputs, dict) else None
    final = root_attrs.get("atlas.status") or outputs.get("status") or status or "unknown"
    stop = outputs.get("stop_reason")
    return {
        "run_id": run_id or root_attrs.get("atlas.run_id"),
        "trace_id": trace_id,
        "status": str(final),
        "stop_reason": stop if isinstance(stop, str) else None,
        "task": _line(task if isinstance(task, str) else (root or {}).get("name", "")) or None,
        "iterations": rounds,
        "totals": _totals(root, root_attrs, story, len(rounds), final),
    }


class _Round:
    """One iteration while it is being read."""

    def __init__(self, number: int) -> None:
        self.number = number
        self.plan: list[dict[str, Any]] = []
        self.waves: list[list[str]] = []
        self.steps: dict[str, dict[str, Any]] = {}
        self.planner = _Usage()
        self.judge = _Usage()
        self.verdict: dict[str, Any] | None = None
        self.notes: list[str] = []


class _Story:
    """Reads the spans of one run into iterations: plans, waves, steps, verdicts, usage."""

    def __init__(self, trace: _Trace, root: dict[str, Any] | None) -> None:
        self.trace = trace
        self.root = root
        self.rounds: dict[int, _Round] = {}
        self.plan_starts: list[tuple[int, int]] = []  # (start, iteration), for time order
        self.team_step: dict[str, str] = {}  # team span id -> its step id
        self.steps: dict[str, dict[str, Any]] = {}  # step id -> its entry
        self.step_usage: dict[str, _Usage] = {}
        self.plan_of: dict[str, int] = {}  # plan span id -> iteration
        self.judge_of: dict[str, int] = {}  # verdict span id -> iteration
        self.everything = _Usage()
        self.unattributed = _Usage()

    def read(self) -> None:
        self._plans()  # first: spans with nothing else to go by are placed by time after plans
        self._waves()
        self._team_steps()
        self._named_steps()
        self._events()
        self._verdicts()
        self._model_calls()

    def round(self, number: int) -> _Round:
        if number not in self.rounds:
            self.rounds[number] = _Round(number)
        return self.rounds[number]

    # -- iterations --

    @staticmethod
    def _own_iteration(span: dict[str, Any]) -> int | None:
        attributes = _attrs(span)
        found = _int(attributes.get("atlas.iteration"))
        if found is None:
            found = _step_iteration(attributes.get("atlas.step"))
        if found is None:
            wave = _wave_of(span)
            found = _step_iteration(wave[0]) if wave else None
        return found

    def iteration_of(self, span: dict[str, Any], known: int | None = None) -> int:
        """`known`, else the span's `atlas.iteration` or step id, else an enclosing span's,
        else the plan that started last before it."""
        found = known if known is not None else self._own_iteration(span)
        if found is None:
            for ancestor in self.trace.ancestors(span):
                if ancestor is self.root:
                    break
                found = self._own_iteration(ancestor)
                if found is not None:
                    break
        if found is None:
            start = _int(span.get("start_ns")) or 0
            earlier = [i for s, i in self.plan_starts if s <= start]
            first = self.plan_starts[0][1] if self.plan_starts else 1
            found = earlier[-1] if earlier else first
        return found

    # -- readers --

    def _plans(self) -> None:
        chosen: dict[int, dict[str, Any]] = {}
        for position, span in enumerate(s for s in self.trace.spans if _is_plan(s)):
            outputs = _json(span.get("outputs"))
            hinted = _int(outputs.get("iteration")) if isinstance(outputs, dict) else None
            number = _int(_attrs(span).get("atlas.iteration")) or hinted or position + 1
            self.plan_starts.append((_int(span.get("start_ns")) or 0, number))
            chosen[number] = span  # a later plan span of the same round wins
        self.plan_starts.sort()
        for number, span in chosen.items():
            item = self.round(number)
            self.plan_of[span["span_id"]] = number
            outputs = _json(span.get("outputs"))
            outputs = outputs if isinstance(outputs, dict) else {}
            steps = _json(outputs.get("steps"))
            if isinstance(steps, list):
                item.plan = [_plan_step(s) for s in steps if isinstance(s, dict)]
            else:
                item.notes.append("the plan's steps are not in the trace (cut for size)")
            if outputs.get("fallback") is True or _attrs(span).get("atlas.plan.fallback") is True:
                item.notes.append("the planner's answer was unusable: the default plan ran")
            repaired = outputs.get("repaired")
            if isinstance(repaired, list):
                item.notes += [f"plan repaired: {_line(r)}" for r in repaired if r]

    def _waves(self) -> None:
        for span in self.trace.spans:
            wave = _wave_of(span)
            if wave is None or any(_wave_of(a) == wave for a in self.trace.ancestors(span)):
                continue  # none, or a wrapper's copy of the same wave
            waves = self.round(self.iteration_of(span)).waves
            if wave not in waves:
                waves.append(wave)

    def _add_step(self, number: int, step_id: str, team: str, span: dict[str, Any]) -> None:
        if step_id not in self.steps:
            entry = {
                "id": step_id,
                "team": team,
                "start": _int(span.get("start_ns")) or 0,
                "spans": [],
                "handoffs": [],
                "guards": [],
            }
            self.steps[step_id] = self.round(number).steps[step_id] = entry

    def _team_steps(self) -> None:
        """The outermost team span(s) of each step: `team.<name>` or `team.<name> · <id>`."""
        for span in self.trace.spans:
            if not _is_team(span):
                continue
            attributes = _attrs(span)
            step_id = attributes.get("atlas.step")
            if not isinstance(step_id, str) and "·" in span["name"]:
                step_id = span["name"].split("·", 1)[1].strip()
            if not isinstance(step_id, str) or not step_id:
                below = (_attrs(d).get("atlas.step") for d in self.trace.descendants(span))
                step_id = next((b for b in below if isinstance(b, str) and b), None)
            if not isinstance(step_id, str) or not step_id:
                step_id = f"{span['name']}#{span['span_id']}"
            self.team_step[span["span_id"]] = step_id
            if any(self.team_step.get(a["span_id"]) == step_id for a in self.trace.ancestors(span)):
                continue  # inside a team span of the same step
            team = attributes.get("atlas.team")
            if not isinstance(team, str) or not team:
                team = span["name"].removeprefix("team.").split("·", 1)[0].strip()
            known = _int(attributes.get("atlas.iteration")) or _step_iteration(step_id)
            self._add_step(self.iteration_of(span, known), step_id, team, span)
            self.steps[step_id]["spans"].append(span)

    def _named_steps(self) -> None:
        """Steps with no team span of their own, named by a worker or handoff span."""
        for span in self.trace.spans:
            attributes = _attrs(span)
            step_id = attributes.get("atlas.step")
            if not isinstance(step_id, str) or not step_id or step_id in self.steps:
                continue
            team = attributes.get("atlas.team")
            if not isinstance(team, str) or not team:
                team = span["name"].removeprefix("handoff:").partition("->")[0] or "?"
            number = self.iteration_of(span, _step_iteration(step_id))
            self._add_step(number, step_id, team, span)

    def _step_of(self, span: dict[str, Any]) -> dict[str, Any] | None:
        step_id = _attrs(span).get("atlas.step")
        if not isinstance(step_id, str):
            around = (self.team_step.get(a["span_id"]) for a in self.trace.ancestors(span))
            step_id = next((s for s in around if s), None)
        return self.steps.get(step_id) if isinstance(step_id, str) else None

    def _events(self) -> None:
        """Handoffs and loop guards (to their steps), budget stops and approval decisions (to
        their iterations)."""
        for span in self.trace.spans:
            attributes = _attrs(span)
            name = span["name"]
            if "atlas.handoff.to" in attributes or name.startswith("handoff:"):
                step = self._step_of(span)
                if step is not None:
                    to = attributes.get("atlas.handoff.to") or name.partition("->")[2]
                    step["handoffs"].append(
                        {
                            "from": _line(attributes.get("atlas.handoff.from") or "supervisor"),
                            "to": _line(to),
                            "reason": _line(attributes.get("atlas.handoff.reason") or ""),
                        }
                    )
            elif name.startswith("loop_guard"):
                reason = _line(attributes.get("atlas.reason") or "loop guard")
                worker = attributes.get("atlas.worker")
                guard = {"reason": reason, "worker": _line(worker) if worker else None}
                step = self._step_of(span)
                if step is not None:
                    step["guards"].append(guard)
                else:
                    who = f" ({guard['worker']})" if guard["worker"] else ""
                    self.round(self.iteration_of(span)).notes.append(f"loop guard{who}: {reason}")
            elif name.startswith("approval:"):
                what = attributes.get("atlas.approval.tool") or attributes.get(
                    "atlas.approval.kind", "?"
                )
                action = attributes.get("atlas.approval.action", "?")
                why = str(attributes.get("atlas.approval.reason") or "")
                waited = _float(attributes.get("atlas.approval.waited_s"))
                note = f"approval: {_line(what)} {_line(action)} by "
                note += _line(attributes.get("atlas.approval.by") or "?")
                if waited is not None:
                    note += f" after {waited:.1f} s"
                if why:
                    note += f" ({_line(why, 200)})"
                self.round(self.iteration_of(span)).notes.append(note)
            elif name.startswith("budget_stop"):
                limit = attributes.get("atlas.limit") or attributes.get("atlas.stop_reason")
                where = attributes.get("atlas.where")
                at = f" (in {_line(where)})" if where else ""
                note = f"budget stop: {_line(limit or '?')}{at}"
                self.round(self.iteration_of(span)).notes.append(note)

    def _verdicts(self) -> None:
        for span in self.trace.spans:
            if not _is_verdict(span):
                continue
            outputs = _json(span.get("outputs"))
            outputs = outputs if isinstance(outputs, dict) else {}
            stated = _int(_attrs(span).get("atlas.iteration")) or _int(outputs.get("iteration"))
            number = self.iteration_of(span, stated)
            self.round(number).verdict = _verdict(_attrs(span), outputs)
            self.judge_of[span["span_id"]] = number

    def _model_calls(self) -> None:
        """Each model call counted once, for the nearest enclosing step, plan or judge."""
        for span in self.trace.spans:
            usage = _usage_of(span) if _is_model(span) else None
            if usage is None:
                continue
            ancestors = list(self.trace.ancestors(span))
            if any(_is_model(a) and _usage_of(a) is not None for a in ancestors):
                continue  # a provider's span inside a counted model span
            self.everything.add(usage)
            target: _Usage | None = None
            for ancestor in ancestors:
                key = ancestor["span_id"]
                named = _attrs(ancestor).get("atlas.step")
                if key in self.team_step:
                    target = self.step_usage.setdefault(self.team_step[key], _Usage())
                elif isinstance(named, str) and named in self.steps:
                    target = self.step_usage.setdefault(named, _Usage())
                elif key in self.plan_of:
                    target = self.round(self.plan_of[key]).planner
                elif key in self.judge_of:
                    target = self.round(self.judge_of[key]).judge
                if target is not None:
                    break
            (target or self.unattributed).add(usage)

    # -- result --

    def iterations(self) -> list[dict[str, Any]]:
        rounds = []
        for number in sorted(self.rounds):
            item = self.rounds[number]
            order = {s["id"]: i for i, s in enumerate(item.plan)}
            entries = sorted(
                item.steps.values(), key=lambda e: (order.get(e["id"], len(order)), e["start"])
            )
            steps = [_step(e, self.step_usage.get(e["id"], _Usage())) for e in entries]
            plan = item.plan or [
                {"id": e["id"], "team": e["team"], "instruction": None, "depends_on": []}
                for e in entries
            ]
            planner, judge = item.planner.as_dict(), item.judge.as_dict()
            tokens = planner["tokens"] + judge["tokens"] + sum(s["tokens"] or 0 for s in steps)
            rounds.append(
                {
                    "iteration": number,
                    "plan": plan,
                    "waves": item.waves,
                    "steps": steps,
                    "planner": planner,
                    "judge": judge,
                    "tokens": tokens,
                    "verdict": item.verdict,
                    "notes": item.notes,
                }
            )
        return rounds


def _plan_step(step: dict[str, Any]) -> dict[str, Any]:
    depends = step.get("depends_on")
    return {
        "id": str(step.get("id", "")),
        "team": str(step.get("team", "")),
        "instruction": step.get("instruction")
        if isinstance(step.get("instruction"), str)
        else None,
        "depends_on": [str(d) for d in depends] if isinstance(depends, list) else [],
    }


def _step(entry: dict[str, Any], summed: _Usage) -> dict[str, Any]:
    spans = entry["spans"]
    stated = [_attrs(s) for s in spans if _int(_attrs(s).get("atlas.tokens")) is not None]
    if stated:  # the team span says what the step used
        tokens: int | None = sum(_int(a["atlas.tokens"]) or 0 for a in stated)
        ins = [_int(a.get("atlas.input_tokens")) for a in stated]
        outs = [_int(a.get("atlas.output_tokens")) for a in stated]
        costs = [_float(a.get("atlas.cost_usd")) for a in stated]
        tokens_in = None if None in ins else sum(i or 0 for i in ins)
        tokens_out = None if None in outs else sum(o or 0 for o in outs)
        cost = None if None in costs else round(sum(c or 0.0 for c in costs), 6)
    else:
        tokens, tokens_in, tokens_out = summed.tokens, summed.input_tokens, summed.output_tokens
        cost = summed.cost_usd()
    return {
        "id": entry["id"],
        "team": entry["team"],
        "tokens": tokens,
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "cost_usd": cost,
        "model_calls": summed.calls,
        "handoffs": entry["handoffs"],
        "guards": entry["guards"],
    }


def _verdict(attributes: dict[str, Any], outputs: dict[str, Any]) -> dict[str, Any]:
    passed = attributes.get("atlas.verdict.passed")
    if not isinstance(passed, bool):
        passed = outputs.get("passed") if isinstance(outputs.get("passed"), bool) else None
    score = _float(attributes.get("atlas.verdict.score"))
    if score is None:
        score = _float(outputs.get("score"))
    criteria = _json(outputs.get("criteria"))
    rows = []
    if isinstance(criteria, list):
        for c in criteria:
            if isinstance(c, dict):
                rows.append(
                    {
                        "criterion": _line(c.get("criterion") or ""),
                        "passed": c.get("passed") if isinstance(c.get("passed"), bool) else None,
                        "reason": _line(c.get("reason") or ""),
                    }
                )
    feedback = outputs.get("feedback")
    return {
        "passed": passed,
        "score": score,
        "criteria": rows,
        "feedback": feedback.strip() if isinstance(feedback, str) else None,
        "fallback": outputs.get("fallback") is True,
    }


def _totals(
    root: dict[str, Any] | None,
    attributes: dict[str, Any],
    story: _Story,
    rounds: int,
    status: Any,
) -> dict[str, Any]:
    everything = story.everything
    stated = _int(attributes.get("atlas.usage.tokens"))
    if stated is not None:
        tokens_in = _int(attributes.get("atlas.usage.input_tokens"))
        tokens_out = _int(attributes.get("atlas.usage.output_tokens"))
        calls = _int(attributes.get("atlas.usage.model_calls"))
        cost = _float(attributes.get("atlas.usage.cost_usd"))
    else:
        stated, tokens_in, tokens_out = (
            everything.tokens,
            everything.input_tokens,
            everything.output_tokens,
        )
        calls, cost = everything.calls, everything.cost_usd()
    wall: float | None = None
    if root is not None:
        start, end = _int(root.get("start_ns")), _int(root.get("end_ns"))
        if start is not None and end is not None and end >= start:
            wall = round((end - start) / 1e9, 2)
    iterations = _int(attributes.get("atlas.usage.iterations"))
    return {
        "status": str(status),
        "iterations": rounds if iterations is None else iterations,
        "tokens": stated,
        "input_tokens": tokens_in,
        "output_tokens": tokens_out,
        "model_calls": calls,
        "cost_usd": cost,
        "wall_s": wall,
        "unattributed_tokens": story.unattributed.tokens,
    }


# --- story -> text -------------------------------------------------------------------------


def _line(value: Any, limit: int | None = None) -> str:
    """`value` as one printable line: whitespace collapsed, control characters dropped, cut
    to about `limit` characters."""
    text = "".join(ch if not unicodedata.category(ch).startswith("C") else " " for ch in str(value))
    text = " ".join(text.split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 1].rstrip() + "…"
    return text


def _tokens(usage: dict[str, Any]) -> str:
    tokens = usage.get("tokens")
    if tokens is None:
        return "tokens unknown"
    ins, outs = usage.get("input_tokens"), usage.get("output_tokens")
    split = f" ({ins} in, {outs} out)" if ins is not None and outs is not None else ""
    return f"{tokens} tokens{split}"


def _cost(value: Any) -> str:
    return "cost unknown" if value is None else f"${float(value):.4f}"


def render(story: dict[str, Any]) -> str:
    """The story as the terminal shows it."""
    lines = [f"run {_line(story.get('run_id'))} · trace {_line(story.get('trace_id'))}"]
    if story.get("task"):
        lines.append(f"task: {_line(story['task'], 160)}")
    rounds = story.get("iterations") or []
    if not rounds:
        lines.append("")
        lines.append("(the trace holds no plan, step or verdict)")
    for position, item in enumerate(rounds):
        lines.append("")
        lines.append(f"iteration {item['iteration']}")
        plan = item.get("plan") or []
        planner = item.get("planner") or {}
        by = f", planner {planner['tokens']} tokens" if planner.get("model_calls") else ""
        lines.append(f"  plan ({len(plan)} step{'s' if len(plan) != 1 else ''}{by})")
        width = max((len(_line(s["id"])) for s in plan), default=0)
        team_width = max((len(_line(s["team"])) for s in plan), default=0)
        for step in plan:
            after = (
                f"after {', '.join(_line(d) for d in step['depends_on'])}: "
                if step.get("depends_on")
                else ""
            )
            text = _line(step.get("instruction") or "(instruction not in the trace)")
            lines.append(
                f"    {_line(step['id']):<{width}}  {_line(step['team']):<{team_width}}  "
                f"{_line(after + text, INSTRUCTION_CHARS)}"
            )
        if item.get("waves"):
            lines.append("  waves")
            for number, wave in enumerate(item["waves"], 1):
                together = " + ".join(_line(s) for s in wave)
                lines.append(f"    {number}. {together}")
        for step in item.get("steps") or []:
            cost = step.get("cost_usd")
            priced = "" if cost is None else f", {_cost(cost)}"
            lines.append(
                f"  step {_line(step['id'])} ({_line(step['team'])}): {_tokens(step)}{priced}"
            )
            for handoff in step.get("handoffs") or []:
                why = f": {_line(handoff['reason'], 100)}" if handoff.get("reason") else ""
                lines.append(f"    handoff {_line(handoff['from'])} -> {_line(handoff['to'])}{why}")
            for guard in step.get("guards") or []:
                who = f" ({_line(guard['worker'])})" if guard.get("worker") else ""
                lines.append(f"    loop guard{who}: {_line(guard['reason'], 100)}")
        for note in item.get("notes") or []:
            lines.append(f"  note: {_line(note, 140)}")
        verdict = item.get("verdict")
        if verdict is None:
            lines.append("  verdict: none (the run stopped before the judge)")
            continue
        outcome = {True: "passed", False: "failed"}.get(verdict.get("passed"), "unknown")
        score = verdict.get("score")
        scored = f", score {score:.2f}" if isinstance(score, int | float) else ""
        judge = item.get("judge") or {}
        by = f" (judge {judge['tokens']} tokens)" if judge.get("model_calls") else ""
        fallback = " [judge fallback]" if verdict.get("fallback") else ""
        lines.append(f"  verdict: {outcome}{scored}{by}{fallback}")
        for row in verdict.get("criteria") or []:
            mark = {True: "pass", False: "FAIL"}.get(row.get("passed"), "?   ")
            reason = f" — {_line(row['reason'], 100)}" if row.get("reason") else ""
            lines.append(f"    {mark}  {_line(row['criterion'], 80)}{reason}")
        if verdict.get("feedback"):
            told = " to the planner" if position + 1 < len(rounds) else ""
            lines.append(f"    feedback{told}: {_line(verdict['feedback'], 300)}")
    totals = story.get("totals") or {}
    lines.append("")
    status = _line(totals.get("status") or story.get("status"))
    if story.get("stop_reason"):
        status += f" ({_line(story['stop_reason'], 120)})"
    count = totals.get("iterations")
    wall = totals.get("wall_s")
    lines.append(
        f"{status} · {count} iteration{'s' if count != 1 else ''} · {_tokens(totals)} · "
        f"{_cost(totals.get('cost_usd'))} · "
        + ("wall time unknown" if wall is None else f"wall {wall:.1f} s")
    )
    return "\n".join(lines)
