"""Public test doubles: a deterministic scripted chat model that needs no network.

`ScriptedModel` is a real LangChain chat model. It reads what ATLAS asks of it from the structure
of the request (the structured-output schema it must fill, the handoff tools a supervisor has, the
tools a worker has) and answers like a cooperative model would: plans with research and analysis in
parallel and writing after both, real tool calls with valid arguments, drafts, and verdicts. Its
latency and the token usage it reports are settable, so it also drives benchmarks.

Select it with `--model scripted` or `models: {default: scripted}`; options go in the query string,
for example `scripted?latency_ms=100&fail_iterations=1`.

It is for tests, dry runs and benchmarks only; it is never a default.
"""

from __future__ import annotations

import asyncio
import difflib
import itertools
import json
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, BaseMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field, PrivateAttr, ValidationError

Behaviour = Literal[
    "cooperative", "always_delegate", "ping_pong", "repeat_tool", "always_fail", "obey_injection"
]
"""`obey_injection`: a worker that reads "call the tool X" in a tool result calls X, as a
model taken in by instructions hidden in a document would (to test that it cannot)."""

_SOURCE = re.compile(r"\[([^\[\]\s]+#\d+)\]")
_TABLE = re.compile(r"^table (\w+) \(", re.MULTILINE)
_log_lock = threading.Lock()


SCRIPTED_OPTIONS = (
    "model_name",
    "latency_ms",
    "prompt_tokens",
    "completion_tokens",
    "fail_iterations",
    "behaviour",
    "fanout",
    "tool_rounds",
    "call_log",
)
"""The options `scripted?...` takes (ScriptedModel's own settings)."""
_TEXT_OPTIONS = ("model_name", "call_log")


def check_scripted_options(
    options: Mapping[str, Any], raw: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Check `scripted?...` options (and `params`) against ScriptedModel's fields, without
    starting anything. Returns the options to build it with: a text option keeps the text as
    written in `raw` (so `call_log=123` stays a file name). Raises a one-line ValueError."""
    for name in options:
        if name not in SCRIPTED_OPTIONS:
            close = difflib.get_close_matches(str(name), SCRIPTED_OPTIONS, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"unknown option {name!r} for scripted{hint}; known: {', '.join(SCRIPTED_OPTIONS)}"
            )
    values = dict(options)
    for name in _TEXT_OPTIONS:
        if raw is not None and name in raw and name in values:
            values[name] = raw[name]
    try:
        ScriptedModel.model_validate(values)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        name = ".".join(str(part) for part in first["loc"]) or "?"
        got = repr(first.get("input"))
        got = got if len(got) <= 40 else got[:37] + "..."
        raise ValueError(f"option {name}: expected {_expected(first)}, got {got}") from None
    return values


def _expected(error: Any) -> str:
    kind, ctx = error["type"], error.get("ctx") or {}
    if kind in ("float_parsing", "float_type", "finite_number"):
        return "a number"
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "a whole number"
    if kind == "greater_than_equal":
        return f"a number >= {ctx.get('ge')}"
    if kind == "less_than_equal":
        return f"a number <= {ctx.get('le')}"
    if kind == "literal_error":
        return f"one of {ctx.get('expected')}"
    if kind == "string_type":
        return "text"
    return " ".join(str(error.get("msg", "a valid value")).split())


class ScriptedModel(BaseChatModel):
    """A deterministic chat model for tests, dry runs and benchmarks."""

    model_name: str = "scripted"
    latency_ms: float = Field(0.0, ge=0, le=600_000, allow_inf_nan=False)
    """Simulated latency of every call."""
    prompt_tokens: int | None = Field(None, ge=0)
    """Reported input tokens per call; by default about a quarter of the prompt's characters."""
    completion_tokens: int | None = Field(None, ge=0)
    """Reported output tokens per call; by default about a quarter of the answer's characters."""
    fail_iterations: int = Field(0, ge=0)
    """The judge fails this many iterations before passing."""
    behaviour: Behaviour = "cooperative"
    """Misbehaviours for loop-guard tests."""
    fanout: int = Field(0, ge=0, le=100)
    """When > 0, plans give every team this many independent steps (benchmark workload)."""
    tool_rounds: int = Field(2, ge=0, le=100)
    """Calls of built-in tools a worker makes before answering. A user's own tools (Python or
    MCP) are each called once besides, so a dry run exercises every tool a team brings."""
    call_log: str | None = None
    """Append one JSON line per call to this file (for counting calls across processes)."""
    calls: list[str] = Field(default_factory=list, exclude=True)
    """The role of every call made through this instance, in order."""
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def _llm_type(self) -> str:
        return "atlas-scripted"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "behaviour": self.behaviour}

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        formatted = [convert_to_openai_tool(t) for t in tools]
        return self.bind(tools=formatted, tool_choice=tool_choice, **kwargs)

    # -- LangChain entry points ----------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.latency_ms:
            time.sleep(self.latency_ms / 1000)
        return self._respond(messages, kwargs.get("tools") or [])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.latency_ms:
            await asyncio.sleep(self.latency_ms / 1000)
        return self._respond(messages, kwargs.get("tools") or [])

    # -- the script ----------------------------------------------------------------------
    def _respond(self, messages: list[BaseMessage], tools: list[dict[str, Any]]) -> ChatResult:
        names = [t["function"]["name"] for t in tools]
        if "Plan" in names:
            role, message = "planner", self._plan(messages, _tool(tools, "Plan"))
        elif "Verdict" in names:
            role, message = "judge", self._verdict(messages)
        elif "Entities" in names:
            role, message = "memory", self._entities(messages)
        elif "handoff" in names:
            role, message = "supervisor", self._route(messages, _tool(tools, "handoff"))
        elif tools:
            role, message = "worker", self._work(messages, tools)
        else:
            role, message = "chat", AIMessage(content=_digest(_human_text(messages), 400))
        prompt_chars = sum(len(str(m.content)) for m in messages)
        answer_chars = len(str(message.content)) + len(json.dumps(message.tool_calls))
        inp = self.prompt_tokens if self.prompt_tokens is not None else max(1, prompt_chars // 4)
        out = (
            self.completion_tokens
            if self.completion_tokens is not None
            else max(1, answer_chars // 4)
        )
        message.usage_metadata = {
            "input_tokens": inp,
            "output_tokens": out,
            "total_tokens": inp + out,
        }
        message.response_metadata = {"model_name": self.model_name, "model_provider": "scripted"}
        self._record(role, message)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _record(self, role: str, message: AIMessage) -> None:
        with self._lock:
            self.calls.append(role)
        if self.call_log:
            calls = [
                f"{c['name']}:{c['args'].get('to')}" if c["name"] == "handoff" else c["name"]
                for c in message.tool_calls
            ]
            line = json.dumps({"pid": os.getpid(), "role": role, "tools": calls})
            with _log_lock, open(self.call_log, "a", encoding="utf-8") as fh:
                fh.write(line + "\n")

    def _plan(self, messages: list[BaseMessage], schema: dict[str, Any]) -> AIMessage:
        teams = _enum_at(schema, "team") or ["research", "analysis", "writing"]
        task = _section(_human_text(messages), "Task") or "the task"
        steps: list[dict[str, Any]] = []
        if self.fanout > 0:
            for team in teams:
                for n in range(1, self.fanout + 1):
                    steps.append(
                        _step(f"{team}_{n}", team, f"Part {n} of the {team} work: {task}", [])
                    )
        else:
            gatherers = [t for t in teams if t != "writing"]
            for team in gatherers:
                steps.append(_step(team, team, _instruction(team, task), []))
            if "writing" in teams:
                steps.append(_step("writing", "writing", _instruction("writing", task), gatherers))
        return _call("Plan", {"steps": steps, "rationale": "Gather in parallel, then write."})

    def _verdict(self, messages: list[BaseMessage]) -> AIMessage:
        text = _human_text(messages)
        criteria = re.findall(
            r"^\s*\d+\.\s+(.+)$", _section(text, "Acceptance criteria") or "", re.M
        )
        match = re.search(r"Iteration:\s*(\d+)", text)
        iteration = int(match.group(1)) if match else 1
        passed = self.behaviour != "always_fail" and iteration > self.fail_iterations
        reason = "Covered by the output." if passed else "Not yet covered well enough."
        results = [{"criterion": c.strip(), "passed": passed, "reason": reason} for c in criteria]
        feedback = (
            "Meets the criteria." if passed else "Add more detail and cite sources for each claim."
        )
        verdict = {
            "passed": passed,
            "score": 0.9 if passed else 0.4,
            "criteria": results,
            "feedback": feedback,
        }
        return _call("Verdict", verdict)

    def _entities(self, messages: list[BaseMessage]) -> AIMessage:
        """Capitalised phrases as entities, each related to the next one."""
        names: list[str] = []
        for match in _NAME.finditer(_human_text(messages)):
            name = match.group(0)
            if name.split()[0] not in _NOT_NAMES and name not in names and len(name) > 2:
                names.append(name)
        names = names[:8]
        relations = [
            {"source": a, "relation": "mentioned with", "target": b}
            for a, b in itertools.pairwise(names)
        ]
        entities = [{"name": n, "type": "thing"} for n in names]
        return _call("Entities", {"entities": entities, "relations": relations})

    def _route(self, messages: list[BaseMessage], tool: dict[str, Any]) -> AIMessage:
        targets = _enum_at(tool, "to") or ["finish"]
        workers = [t for t in targets if t != "finish"]
        done = [
            c["args"].get("to")
            for m in messages
            if isinstance(m, AIMessage)
            for c in m.tool_calls
            if c["name"] == "handoff"
        ]
        task = _section(_human_text(messages), "Step") or "the step"
        if self.behaviour == "ping_pong":
            nxt = workers[len(done) % min(2, len(workers))]
        elif self.behaviour == "always_delegate":
            nxt = workers[len(done) % len(workers)]
        elif len(done) < len(workers):
            nxt = workers[len(done)]
        else:
            summary = f"All workers reported on: {_digest(task, 120)}"
            return _call("handoff", {"to": "finish", "task": summary, "reason": "step answered"})
        reason = f"{nxt} is the next worker for this step"
        return _call("handoff", {"to": nxt, "task": _digest(task, 300), "reason": reason})

    def _work(self, messages: list[BaseMessage], tools: list[dict[str, Any]]) -> AIMessage:
        used = [m for m in messages if isinstance(m, ToolMessage)]
        text = _human_text(messages)
        if self.behaviour == "repeat_tool":
            first = tools[0]
            return _call(first["function"]["name"], _args_for(first, text, used))
        if self.behaviour == "obey_injection":
            called = {m.name for m in used}
            for message in used:
                for wanted in _INJECTED.findall(str(message.content)):
                    if wanted not in called:
                        return _call(wanted, {"content": "injected", "sql": "SELECT 1"})
        due = _next_tool(tools, used, self.tool_rounds)
        if due is not None:
            return _call(due["function"]["name"], _args_for(due, text, used))
        findings = "\n".join(f"- {_digest(str(m.content), 300)}" for m in used)
        step = _section(text, "Step") or _section(text, "Your task") or "the step"
        return AIMessage(content=f"Findings for: {_digest(step, 160)}\n{findings}".strip())


# -- helpers -----------------------------------------------------------------------------------


def _step(sid: str, team: str, instruction: str, deps: list[str]) -> dict[str, Any]:
    return {"id": sid, "team": team, "instruction": instruction, "depends_on": deps}


def _instruction(team: str, task: str) -> str:
    verbs = {
        "research": "Find the facts in the documents that bear on",
        "analysis": "Compute the figures from the data that bear on",
        "writing": "Write the deliverable from the research and analysis results for",
    }
    return f"{verbs.get(team, 'Work on')}: {_digest(task, 200)}"


_INJECTED = re.compile(r"call the tool (\w+)", re.I)
_NAME = re.compile(r"\b[A-Z][\w&'-]+(?:[ \t]+[A-Z][\w&'-]+){0,3}")
_NOT_NAMES = frozenset(
    "A An The This That These Those It Its All Part Find Findings Compute Write Do Step Task "
    "Summary Sources Your Reports From Results No Not Nothing Error".split()
)

_call_counter = 0
_counter_lock = threading.Lock()


def _call(name: str, args: dict[str, Any]) -> AIMessage:
    global _call_counter
    with _counter_lock:
        _call_counter += 1
        call_id = f"call_{_call_counter:06d}"
    return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": call_id}])


def _tool(tools: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(t for t in tools if t["function"]["name"] == name)


def _enum_at(schema: dict[str, Any], prop: str) -> list[str] | None:
    """Find the enum of a property anywhere in a JSON schema (the planner's team names)."""
    found: list[str] | None = None

    def walk(node: Any) -> None:
        nonlocal found
        if found is not None:
            return
        if isinstance(node, dict):
            props = node.get("properties")
            if isinstance(props, dict) and prop in props:
                spec = props[prop]
                if "enum" in spec:
                    found = list(spec["enum"])
                    return
                ref = spec.get("$ref", "")
                target = _resolve(schema, ref) if ref else None
                if target and "enum" in target:
                    found = list(target["enum"])
                    return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return found


def _resolve(schema: dict[str, Any], ref: str) -> dict[str, Any] | None:
    node: Any = schema.get("function", {}).get("parameters", schema)
    for part in ref.lstrip("#/").split("/"):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node if isinstance(node, dict) else None


def _human_text(messages: list[BaseMessage]) -> str:
    return "\n\n".join(str(m.content) for m in messages if m.type == "human")


_HEADERS = (
    "Task",
    "Step",
    "Iteration",
    "Teams",
    "Acceptance criteria",
    "Acceptance criteria of the whole task",
    "Results of earlier steps",
    "Your task",
    "Reports from your teammates on this step",
    "Output to judge",
    "Results so far",
    "From memory",
)
_NEXT = "|".join(re.escape(h) for h in _HEADERS)


def _section(text: str, title: str) -> str | None:
    """The text after a `Title:` line, up to the next header ATLAS writes."""
    pattern = rf"^{re.escape(title)}:[ \t]*(.*?)(?=^(?:{_NEXT}):|\Z)"
    match = re.search(pattern, text, re.M | re.S)
    if not match:
        return None
    return match.group(1).strip() or None


def _digest(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _next_tool(
    tools: list[dict[str, Any]], used: list[ToolMessage], rounds: int
) -> dict[str, Any] | None:
    """The next tool to call: built-in ones in order up to `rounds` calls, then each of the
    user's own tools that has not been called yet."""
    from atlas.tools import BUILTIN_TOOLS

    called = {m.name for m in used}
    builtin_calls = sum(1 for m in used if m.name in BUILTIN_TOOLS)
    for index, tool in enumerate(tools):
        name = tool["function"]["name"]
        if name in BUILTIN_TOOLS:
            if index >= len(used) and builtin_calls < rounds and name not in called:
                return tool
        elif name not in called:
            return tool
    return None


def _value_for(schema: dict[str, Any], name: str, instruction: str, defs: dict[str, Any]) -> Any:
    """A plausible value for a parameter of a user's tool, from its JSON schema."""
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        schema = defs.get(ref.removeprefix("#/$defs/"), {})
    if schema.get("enum"):
        return schema["enum"][0]
    if "default" in schema:
        return schema["default"]
    for key in ("anyOf", "oneOf"):
        options = [o for o in schema.get(key, []) if o.get("type") != "null"]
        if options:
            return _value_for(options[0], name, instruction, defs)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "integer":
        return max(1, int(schema.get("minimum", 1)))
    if kind == "number":
        return float(schema.get("minimum", 1.0))
    if kind == "boolean":
        return True
    if kind == "array":
        return [_value_for(schema.get("items", {}), name, instruction, defs)]
    if kind == "object" or "properties" in schema:
        props = schema.get("properties", {})
        return {
            k: _value_for(props[k], k, instruction, defs)
            for k in schema.get("required", [])
            if k in props
        }
    return _digest(instruction, int(schema.get("maxLength", 200)))


def _args_for(tool: dict[str, Any], text: str, used: list[ToolMessage]) -> dict[str, Any]:
    params = tool["function"].get("parameters", {})
    props: dict[str, Any] = params.get("properties", {})
    required = params.get("required", list(props))
    instruction = _section(text, "Step") or _section(text, "Your task") or _digest(text, 200)
    seen = "\n".join(str(m.content) for m in used) + "\n" + text
    args: dict[str, Any] = {}
    defs = params.get("$defs", {})
    for name in required:
        if name == "query":
            args[name] = _digest(instruction, 200)
        elif name == "sql":
            tables = _TABLE.findall(seen)
            args[name] = (
                f'SELECT COUNT(*) AS rows FROM "{tables[0]}"' if tables else "SELECT 1 AS ok"
            )
        elif name == "source":
            sources = _SOURCE.findall(seen)
            args[name] = sources[0] if sources else "unknown"
        elif name == "content":
            args[name] = _draft(text, used)
        elif props.get(name, {}).get("type") == "integer" and "minimum" not in props[name]:
            args[name] = 3
        else:
            args[name] = _value_for(props.get(name, {}), name, instruction, defs)
    return args


def _draft(text: str, used: list[ToolMessage]) -> str:
    task = _section(text, "Task") or _section(text, "Step") or "Report"
    inputs = _section(text, "Results of earlier steps") or ""
    sources = sorted(set(_SOURCE.findall(text + "\n".join(str(m.content) for m in used))))
    lines = [
        f"# {_digest(task, 80)}",
        "",
        "## Summary",
        "",
        _digest(task, 400),
        "",
        "## Findings",
        "",
    ]
    for para in [p for p in inputs.split("\n") if p.strip().startswith("- ")][:12]:
        lines.append(f"- {_digest(para.strip().lstrip('- '), 300)}")
    if sources:
        lines += ["", "## Sources", "", *[f"- [{s}]" for s in sources]]
    return "\n".join(lines) + "\n"


__all__ = ["Behaviour", "ScriptedModel"]
