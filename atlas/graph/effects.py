"""Model and tool calls as effects, so each node is written once and runs sync or async.

A node body is a generator: it yields `ModelCall`, `ToolRun` and `Io` effects and receives their
results. `node()` wraps it into a LangGraph node with a real sync path (`invoke`) and a real async
path (`ainvoke`: model calls awaited, sync tools sent to a thread). Budget checks, usage accounting
and the per-call attributes on traces happen here, in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_core.tools import BaseTool
from langgraph.runtime import get_runtime
from pydantic import BaseModel, ValidationError

from atlas.context import RunContext
from atlas.errors import ModelConfigError
from atlas.graph.events import emit
from atlas.models.cache import hit_of, keyed, request_key
from atlas.models.resilience import Notice, Sleep, attempts
from atlas.models.usage import Usage, call_usage
from atlas.spec import ModelSpec
from atlas.tracing.redact import public_model
from atlas.tracing.tree import MODEL_KEY


@dataclass
class ModelCall:
    """One chat-model call for a role."""

    role: str
    """`planner`, `judge`, `supervisor` or `team:<name>` (workers)."""
    messages: list[BaseMessage]
    team: str | None = None
    tools: list[Any] | None = None
    tool_choice: str | None = None
    schema: type[BaseModel] | None = None
    """Structured output: the result's `parsed` holds an instance, or None if unparseable."""
    run_name: str | None = None
    max_tokens: int | None = None
    """Output cap for this call on the local model (plans and drafts need more than a routing)."""


@dataclass
class CallResult:
    message: AIMessage
    parsed: BaseModel | None = None
    parse_error: str | None = None
    usage: Usage = field(default_factory=dict)


@dataclass
class ToolRun:
    tool: BaseTool
    args: dict[str, Any]


@dataclass
class Io:
    """A blocking call (a memory read or write): inline on the sync path, in a worker thread on
    the async path so parallel runs in one event loop keep going."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


Effect = ModelCall | ToolRun | Io
Body = Generator[Effect, Any, Any]


DEFAULT_CALL_TIMEOUT_S = 300.0
"""A model call that has not answered in this long is abandoned (and retried or failed over),
unless the model's own `timeout_s` says otherwise. No call outlives the run's `timeout_s`."""
_TIMEOUT_PROVIDERS = ("openai", "anthropic", "local")
"""Providers whose SDKs take a per-request `timeout`."""


def _call_timeout(ctx: RunContext, spec: ModelSpec) -> float | None:
    """Seconds this call may take: the model's `timeout_s` (default 300 s), never past the
    run's remaining `timeout_s`."""
    if spec.provider not in _TIMEOUT_PROVIDERS:
        return None
    limit = spec.timeout_s or DEFAULT_CALL_TIMEOUT_S
    remaining = ctx.budget.remaining_s
    if remaining is not None:
        limit = min(limit, remaining)
    return max(0.5, limit)


def _runnable(
    model: Any, spec: ModelSpec, call: ModelCall, timeout: float | None = None
) -> Runnable[Any, Any]:
    provider = spec.provider
    local = provider == "local"
    extra: dict[str, Any] = {}
    if timeout is not None:
        extra["timeout"] = timeout
    if local and call.max_tokens:
        extra["extra_body"] = {"max_tokens": call.max_tokens}
    if call.schema is not None:
        # Structured output as one forced tool call, parsed in _finish: a single model span in
        # the trace instead of with_structured_output's parser chain. On the local server the
        # forced call is grammar-constrained by the schema.
        return model.bind_tools([call.schema], tool_choice=call.schema.__name__, **extra)
    if call.tools:
        choice = call.tool_choice
        if local and choice == "any":
            # llama.cpp's function-calling format only honours a choice that names one tool.
            choice = str(getattr(call.tools[0], "name", None) or call.tools[0].__name__)
        return model.bind_tools(call.tools, tool_choice=choice, **extra)
    return model.bind(**extra) if extra else model


def parse_structured(
    message: AIMessage, schema: type[BaseModel]
) -> tuple[BaseModel | None, str | None]:
    """The schema instance from a tool call, or from JSON in the text; else why not."""
    candidates: list[Any] = [
        c.get("args") for c in message.tool_calls if c.get("name") == schema.__name__
    ]
    candidates += [c.get("args") for c in message.tool_calls]
    text = message.content if isinstance(message.content, str) else ""
    if text.strip():
        start, end = text.find("{"), text.rfind("}")
        if start != -1 and end > start:
            with contextlib.suppress(ValueError):
                candidates.append(json.loads(text[start : end + 1]))
    error = "no structured answer"
    for candidate in candidates:
        if not isinstance(candidate, dict):
            continue
        try:
            return schema.model_validate(candidate), None
        except ValidationError as exc:
            error = f"invalid {schema.__name__}: {exc.errors()[0]['msg']}"
    return None, error


def _finish(
    ctx: RunContext, call: ModelCall, out: Any, label: str, number: int | None
) -> CallResult:
    message = out if isinstance(out, AIMessage) else AIMessage(content=str(out))
    result = CallResult(message)
    if call.schema is not None:
        result.parsed, result.parse_error = parse_structured(message, call.schema)
    meta: dict[str, Any] = dict(result.message.usage_metadata or {})
    inp, outp = int(meta.get("input_tokens", 0)), int(meta.get("output_tokens", 0))
    cost = ctx.budget.release(model=label, input_tokens=inp, output_tokens=outp, number=number)
    cached = hit_of(message)
    if cached is not None:
        attributes = {"role": call.role, "model": label, **cached}
        attributes.pop("hit", None)
        ctx.tracer.event("cache_hit", attributes)
    result.usage = call_usage(
        model=label, team=call.team, input_tokens=inp, output_tokens=outp, cost=cost, cached=cached
    )
    return result


def _cache_key(ctx: RunContext, spec: ModelSpec, call: ModelCall) -> str | None:
    """The request's key in the model-response cache, or None when the run has no cache."""
    if ctx.models.response_cache is None:
        return None
    from langchain_core.utils.function_calling import convert_to_openai_tool

    shape = {
        "tools": [convert_to_openai_tool(t) for t in call.tools or ()],
        "tool_choice": call.tool_choice,
        "schema": call.schema.model_json_schema() if call.schema is not None else None,
        "max_tokens": call.max_tokens,
    }
    model = spec.model_dump_json(exclude={"fallbacks", "max_retries", "timeout_s"})
    return request_key(model, shape, _messages_for(spec.provider, call))


def _deadline(ctx: RunContext) -> float | None:
    timeout = ctx.spec.budget.timeout_s
    return None if timeout is None else ctx.budget.started + timeout


def _report(ctx: RunContext, notice: Notice) -> None:
    ctx.tracer.event(notice.kind, notice.attributes)
    emit({"event": notice.kind, **notice.attributes})


def run_model(ctx: RunContext, call: ModelCall, config: RunnableConfig | None = None) -> CallResult:
    """One model call with the budget, retries, fallbacks and usage accounting."""
    number = ctx.budget.reserve()
    plan = attempts(call.role, ctx.models.chain(call.role), _deadline(ctx))
    try:
        step = next(plan)
        while True:
            if isinstance(step, Sleep):
                time.sleep(step.seconds)
                step = next(plan)
            elif isinstance(step, Notice):
                _report(ctx, step)
                step = next(plan)
            else:
                try:
                    model = ctx.models.resolve(step.spec)
                    runnable = _runnable(model, step.spec, call, _call_timeout(ctx, step.spec))
                    messages = _messages_for(step.spec.provider, call)
                    with keyed(_cache_key(ctx, step.spec, call)):
                        out = runnable.invoke(
                            messages, config=_config(call, config, public_model(step.spec.model))
                        )
                except Exception as exc:
                    step = plan.send(exc)
                    continue
                return _finish(ctx, call, out, public_model(step.spec.model), number)
    except BaseException:
        ctx.budget.release(
            model=ctx.models.label(call.role), input_tokens=0, output_tokens=0, number=number
        )
        raise
    finally:
        plan.close()


async def arun_model(
    ctx: RunContext, call: ModelCall, config: RunnableConfig | None = None
) -> CallResult:
    """`run_model` for the async path: awaits the model and the backoff sleeps."""
    number = await ctx.budget.areserve()
    plan = attempts(call.role, ctx.models.chain(call.role), _deadline(ctx))
    try:
        step = next(plan)
        while True:
            if isinstance(step, Sleep):
                await asyncio.sleep(step.seconds)
                step = next(plan)
            elif isinstance(step, Notice):
                _report(ctx, step)
                step = next(plan)
            else:
                try:
                    model = await asyncio.to_thread(ctx.models.resolve, step.spec)
                    timeout = _call_timeout(ctx, step.spec)
                    runnable = _runnable(model, step.spec, call, timeout)
                    messages = _messages_for(step.spec.provider, call)
                    with keyed(_cache_key(ctx, step.spec, call)):
                        pending = runnable.ainvoke(
                            messages, config=_config(call, config, public_model(step.spec.model))
                        )
                        # The SDK's own timeout bounds the request; this also bounds a model
                        # that does its own waiting (a test double, a slow client-side step).
                        out = await asyncio.wait_for(
                            pending, None if timeout is None else timeout + 5
                        )
                except Exception as exc:
                    step = plan.send(exc)
                    continue
                return _finish(ctx, call, out, public_model(step.spec.model), number)
    except BaseException:
        ctx.budget.release(
            model=ctx.models.label(call.role), input_tokens=0, output_tokens=0, number=number
        )
        raise
    finally:
        plan.close()


def _messages_for(provider: str, call: ModelCall) -> list[BaseMessage]:
    """llama.cpp's server rejects an assistant message whose content is null, which is what
    langchain-openai sends for a tool-calling message with no text: give those a short text."""
    if provider != "local":
        return call.messages
    fixed: list[BaseMessage] = []
    for message in call.messages:
        if isinstance(message, AIMessage) and message.tool_calls and not message.content:
            names = ", ".join(c["name"] for c in message.tool_calls)
            message = message.model_copy(update={"content": f"(calling {names})"})
        fixed.append(message)
    return fixed


def _config(call: ModelCall, config: RunnableConfig | None, label: str) -> RunnableConfig:
    cfg: RunnableConfig = {"run_name": call.run_name} if call.run_name else {}
    # The model's label on its span: what the trace prices the call by (atlas.tracing.tree).
    cfg["metadata"] = {MODEL_KEY: label}
    if config is not None and config.get("callbacks") is not None:
        cfg["callbacks"] = config["callbacks"]
    return cfg


def _drive(body: Body, ctx: RunContext, config: RunnableConfig | None) -> Any:
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = body.throw(error) if error is not None else body.send(value)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        try:
            if isinstance(effect, ModelCall):
                value = run_model(ctx, effect, config)
            elif isinstance(effect, Io):
                value = effect.fn(*effect.args, **effect.kwargs)
            else:
                value = effect.tool.invoke(effect.args, config=_tool_config(config))
        except (ModelConfigError, KeyboardInterrupt):
            raise
        except Exception as exc:
            error = exc


async def _adrive(body: Body, ctx: RunContext, config: RunnableConfig | None) -> Any:
    value: Any = None
    error: BaseException | None = None
    while True:
        try:
            effect = body.throw(error) if error is not None else body.send(value)
        except StopIteration as stop:
            return stop.value
        value, error = None, None
        try:
            if isinstance(effect, ModelCall):
                value = await arun_model(ctx, effect, config)
            elif isinstance(effect, Io):
                value = await asyncio.to_thread(effect.fn, *effect.args, **effect.kwargs)
            else:
                value = await effect.tool.ainvoke(effect.args, config=_tool_config(config))
        except ModelConfigError:
            raise
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            error = exc


def _tool_config(config: RunnableConfig | None) -> RunnableConfig:
    if config is not None and config.get("callbacks") is not None:
        return {"callbacks": config["callbacks"]}
    return {}


NodeBody = Callable[[dict[str, Any], RunContext], Body]


def current_context() -> RunContext:
    """The run's context. `atlas.build_graph()` makes one per invocation; a graph compiled from
    `build_run_graph` or `build_team` must be given one (`context=`)."""
    runtime = get_runtime()
    ctx = runtime.context if runtime is not None else None
    if isinstance(ctx, RunContext):
        return ctx
    raise ModelConfigError(
        "this graph needs an atlas RunContext: use atlas.build_graph(), atlas.run(), or pass "
        "context="
    )


class _Node(Runnable[dict[str, Any], Any]):
    """A graph node with a sync and an async path.

    It calls the body directly instead of through `RunnableLambda`, which would open a second
    callback run (and a second, empty trace span) under the one LangGraph opens for the node.
    """

    def __init__(self, name: str, body: NodeBody) -> None:
        self.name = name
        self._body = body

    def invoke(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Any:
        ctx = current_context()
        return _drive(self._body(input, ctx), ctx, config)

    async def ainvoke(
        self, input: dict[str, Any], config: RunnableConfig | None = None, **kwargs: Any
    ) -> Any:
        ctx = current_context()
        return await _adrive(self._body(input, ctx), ctx, config)


def node(name: str, body: NodeBody) -> Runnable[Any, Any]:
    """Make a LangGraph node, with sync and async paths, from a generator body."""
    return _Node(name, body)
