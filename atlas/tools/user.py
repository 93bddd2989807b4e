"""Users' own Python tools: a function, a LangChain tool or a factory, named in a worker's `tools:`.

What a tool can be:

- a plain function, sync or async. Its JSON schema comes from its type hints and its docstring
  (Google style `Args:` give the parameter descriptions), so every parameter must be annotated;
  defaults make a field optional. A parameter annotated `ToolContext` is not in the schema: ATLAS
  passes the run's context there at call time.
- a LangChain `BaseTool` instance, used with its own name, description and schema. Whichever of
  sync or async it implements, it works on both paths (a coroutine-only `StructuredTool` is
  driven on a fresh event loop on the sync path).
- a factory: a plain callable whose only parameter is a `ToolContext` (and whose return
  annotation, if any, is a callable or a tool). It is called once per run and returns one of
  the above, so per-run state (a connection, a cache, the run's workspace) lives in a closure,
  never in module globals two concurrent runs would share.

How a reference in `agents/*.yaml` resolves, in this order:

1. `package.module:function` imports the module: first from the folder of the task file, then
   from the team file's folder, then from installed packages, so a task's own `tools.py` wins
   over an unrelated installed `tools`. Two tasks in two folders may each have a `tools.py` in
   one process: the second is loaded under a private alias instead of reusing the first. (The
   helper modules such a module imports are ordinary imports: two tasks whose tools both import
   a different `helpers.py` share whichever was imported first.)
2. a name given to `register_tool` (embedding code).
3. an entry point of group `atlas.tools` (a package that ships tools).

Everything that can be checked (the import, the annotations, the schema) is checked when the
reference is loaded, before any model call; what a factory returns, when a run builds it. At call
time, whatever the user's code raises becomes a one-line `ToolError`, which goes back to the model
as text; a call that outlives its timeout stops being waited for (sync code runs in a daemon
thread per call, so a hung call cannot keep the process alive). `@tool` only attaches metadata
and returns the function unchanged, so a tool module stays importable and testable without ATLAS.

MLflow's LangChain autolog makes the TOOL span of each call; the wrappers here call the inner
code directly (never through another tool's `invoke`), so there is no second span.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import dataclasses
import difflib
import functools
import hashlib
import importlib
import importlib.machinery
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import re
import sys
import threading
import types
import typing
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, overload

from langchain_core.runnables import RunnableConfig, ensure_config
from langchain_core.tools import BaseTool, StructuredTool, Tool, create_schema_from_function
from pydantic import BaseModel

from atlas.errors import AtlasError, SpecError, ToolError

ENTRY_POINT_GROUP = "atlas.tools"

_META = "__atlas_tool__"
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_REF = re.compile(r"(?P<module>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):(?P<attr>[A-Za-z_]\w*(?:\.\w+)*)")
_ERROR_CHARS = 500
_ASYNC_GRACE_S = 1.0
"""On the sync path an async tool is cancelled at its timeout; this long after, stop waiting."""

_F = TypeVar("_F", bound=Callable[..., Any])
_T = TypeVar("_T")


@dataclass(frozen=True)
class ToolContext:
    """What one run gives a tool that asks for it (a parameter annotated `ToolContext`).

    Run-scoped, never global: two runs in one process each see their own.
    """

    run_id: str
    workspace: Path
    """A per-run folder the tool may write files into (created before the tool first runs)."""
    task_dir: Path
    """The task file's folder."""
    logger: logging.Logger
    """Named `atlas.tools.<tool name>` (`ToolSource.build` sets it per tool)."""


@dataclass(frozen=True)
class _Meta:
    name: str | None
    description: str | None
    timeout_s: float | None
    side_effects: bool


@overload
def tool(fn: _F, /) -> _F: ...


@overload
def tool(
    fn: None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = None,
    side_effects: bool = False,
) -> Callable[[_F], _F]: ...


def tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = None,
    side_effects: bool = False,
) -> Any:
    """Mark a function or factory as a tool, with its name, description, timeout and whether it
    changes anything outside the run (`side_effects`). Returns it unchanged."""
    meta = _Meta(name, description, timeout_s, side_effects)

    def mark(target: _F) -> _F:
        if isinstance(target, BaseTool):
            raise TypeError("@tool marks functions; give a BaseTool's settings to register_tool")
        setattr(target, _META, meta)
        return target

    return mark if fn is None else mark(fn)


def _meta(obj: Any) -> _Meta:
    found = getattr(obj, _META, None) if not isinstance(obj, BaseTool) else None
    return found if isinstance(found, _Meta) else _Meta(None, None, None, False)


@dataclass(frozen=True)
class ToolSource:
    """A resolved tool reference: what to build for each run, and where it came from."""

    ref: str
    name: str
    kind: Literal["function", "tool", "factory"]
    obj: Any
    timeout_s: float | None
    side_effects: bool
    origin: str

    def build(self, ctx: ToolContext, *, default_timeout_s: float = 60.0) -> BaseTool:
        """The tool for one run. A factory is called here, once, with the run's context."""
        timeout = self.timeout_s if self.timeout_s is not None else default_timeout_s
        ctx = dataclasses.replace(ctx, logger=logging.getLogger(f"atlas.tools.{self.name}"))
        if self.kind == "tool":
            return _wrap_tool(self, self.obj, timeout)
        if self.kind == "function":
            plan = _plan(self.obj, self.ref)
            if plan.context_params:
                _make_workspace(self, ctx)
            return _wrap_function(self, plan, ctx, timeout, _meta(self.obj).description)
        _make_workspace(self, ctx)
        try:
            made = self.obj(ctx)
        except Exception as exc:
            raise AtlasError(f"tool {self.ref!r}: its factory failed: {_one_line(exc)}") from exc
        if isinstance(made, BaseTool):
            return _wrap_tool(self, made, timeout)
        if not callable(made) or isinstance(made, type):
            raise SpecError(
                f"tool {self.ref!r}: its factory returned {type(made).__name__}, "
                "not a function or a BaseTool"
            )
        plan = _plan(made, self.ref)
        return _wrap_function(self, plan, ctx, timeout, _meta(self.obj).description)


def _make_workspace(source: ToolSource, ctx: ToolContext) -> None:
    try:
        ctx.workspace.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AtlasError(
            f"tool {source.ref!r}: cannot create its workspace {ctx.workspace}: {exc.strerror}"
        ) from exc


# --- functions: signature, schema ------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """What a function tool needs: which parameters get the context, and its arguments' model."""

    fn: Callable[..., Any]
    context_params: list[str]
    is_async: bool
    schema: type[BaseModel]


def _hints(fn: Callable[..., Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Resolved type hints of `fn` (a function, partial or callable object), and the globals its
    string annotations refer to."""
    target: Any = fn
    while isinstance(target, functools.partial):
        target = target.func
    if not inspect.isfunction(target) and not inspect.ismethod(target):
        target = getattr(target, "__call__", target)  # noqa: B004 - a callable object's method
    globalns = getattr(inspect.unwrap(target), "__globals__", {})
    try:
        return typing.get_type_hints(target, include_extras=True), globalns
    except Exception:  # a name only imported under TYPE_CHECKING: resolve one by one below
        return {}, globalns


def _resolve(annotation: Any, globalns: dict[str, Any]) -> Any:
    if not isinstance(annotation, str):
        return annotation
    try:
        return eval(annotation, globalns)  # what typing.get_type_hints does with a string
    except Exception:
        return annotation


def _is_context(annotation: Any) -> bool:
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, str):
        return annotation.rsplit(".", 1)[-1] == "ToolContext"
    return annotation is ToolContext


def _returns_tool(annotation: Any) -> bool:
    """A factory's return annotation: absent, a callable or a tool (not a plain value)."""
    if annotation in (inspect.Signature.empty, Any, Callable):
        return True
    if isinstance(annotation, str):
        return "Callable" in annotation or "Tool" in annotation
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_returns_tool(a) for a in typing.get_args(annotation))
    if origin is not None:
        return origin is Callable
    return isinstance(annotation, type) and issubclass(annotation, BaseTool)


def _signature(obj: Any, ref: str) -> inspect.Signature:
    try:
        return inspect.signature(obj)
    except (TypeError, ValueError) as exc:
        raise SpecError(f"tool {ref!r}: cannot read its signature: {_one_line(exc)}") from exc


def _is_factory(obj: Any, ref: str) -> bool:
    if _is_async(obj):
        return False
    sig = _signature(obj, ref)
    params = list(sig.parameters.values())
    if len(params) != 1:
        return False
    hints, globalns = _hints(obj)
    if not _is_context(_resolve(hints.get(params[0].name, params[0].annotation), globalns)):
        return False
    return _returns_tool(_resolve(hints.get("return", sig.return_annotation), globalns))


def _is_async(fn: Any) -> bool:
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004
    )


def _plan(fn: Callable[..., Any], ref: str) -> _Plan:
    """Check a function's parameters and make its schema: every problem is one SpecError."""
    sig = _signature(fn, ref)
    hints, globalns = _hints(fn)
    params: list[inspect.Parameter] = []
    context_params: list[str] = []
    for p in sig.parameters.values():
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            stars = "*" if p.kind == p.VAR_POSITIONAL else "**" if p.kind == p.VAR_KEYWORD else ""
            shown = stars + p.name
            raise SpecError(
                f"tool {ref!r}: parameter {shown!r} is not supported; "
                "give each parameter a name and a type"
            )
        annotation = _resolve(hints.get(p.name, p.annotation), globalns)
        if _is_context(annotation):
            context_params.append(p.name)
            annotation = ToolContext
        elif annotation is inspect.Parameter.empty:
            raise SpecError(f"tool {ref!r}: parameter {p.name!r} has no type annotation")
        elif isinstance(annotation, str):
            raise SpecError(
                f"tool {ref!r}: parameter {p.name!r}: cannot resolve its annotation "
                f"{annotation!r} (import that name at module level)"
            )
        params.append(p.replace(annotation=annotation))
    schema = _schema(ref, fn, params, context_params)
    return _Plan(fn, context_params, _is_async(fn), schema)


def _schema(
    ref: str, fn: Callable[..., Any], params: list[inspect.Parameter], context_params: list[str]
) -> type[BaseModel]:
    """The arguments' model, from a stand-in that has `fn`'s resolved annotations and docstring
    (LangChain would resolve string annotations again, and fail on TYPE_CHECKING-only names)."""

    def stand_in(**kwargs: Any) -> None:
        del kwargs

    name = getattr(fn, "__name__", None) or "tool"
    setattr(stand_in, "__signature__", inspect.Signature(params))  # noqa: B010
    stand_in.__annotations__ = {p.name: p.annotation for p in params}
    stand_in.__doc__ = inspect.getdoc(fn)
    stand_in.__name__ = stand_in.__qualname__ = name
    try:
        schema = create_schema_from_function(
            name,
            stand_in,
            filter_args=context_params or None,
            parse_docstring=True,
            error_on_invalid_docstring=False,
        )
        if not (isinstance(schema, type) and issubclass(schema, BaseModel)):
            raise TypeError("a pydantic v1 model; use pydantic v2 types")
        schema.model_json_schema()  # unsupported parameter types fail here, not at a model call
    except Exception as exc:
        raise SpecError(f"tool {ref!r}: cannot make its schema: {_one_line(exc)}") from exc
    return schema


# --- the tools ATLAS runs ---------------------------------------------------------------------


def _start(call: Callable[[], Any], name: str) -> concurrent.futures.Future[Any]:
    """Run `call` in a daemon thread (a hung tool cannot keep the process alive at exit)."""
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    context = contextvars.copy_context()

    def work() -> None:
        future.set_running_or_notify_cancel()
        try:
            result = context.run(call)
        except BaseException as exc:  # handed to the caller, who re-raises it
            future.set_exception(exc)
        else:
            future.set_result(result)

    threading.Thread(target=work, name=f"atlas-tool-{name}", daemon=True).start()
    return future


@dataclass(frozen=True)
class _Call:
    """How to run one tool's code on the sync and the async path, bounded by its timeout."""

    name: str
    timeout: float
    sync: Callable[[dict[str, Any]], Any] | None
    asynchronous: Callable[[dict[str, Any]], Awaitable[Any]] | None

    def _timed_out(self, *, may_run: bool) -> ToolError:
        tail = " (it may still be running)" if may_run else ""
        return ToolError(f"tool {self.name!r} timed out after {self.timeout:g} s{tail}")

    async def _bounded(
        self, call: Callable[[dict[str, Any]], Awaitable[Any]], kwargs: dict[str, Any]
    ) -> Any:
        deadline = asyncio.timeout(self.timeout)
        try:
            async with deadline:
                return await call(kwargs)
        except TimeoutError:
            if deadline.expired():
                raise self._timed_out(may_run=False) from None
            raise

    def run(self, **kwargs: Any) -> str:
        sync, asynchronous = self.sync, self.asynchronous
        try:
            if sync is not None:
                future = _start(lambda: sync(kwargs), self.name)
                wait = self.timeout
            else:  # a fresh loop in a fresh thread: fine whether or not this thread has one
                assert asynchronous is not None
                future = _start(lambda: asyncio.run(self._bounded(asynchronous, kwargs)), self.name)
                wait = self.timeout + _ASYNC_GRACE_S
            done, _ = concurrent.futures.wait([future], timeout=wait)
            if not done:
                raise self._timed_out(may_run=True)
            value = future.result()
        except ToolError:
            raise
        except Exception as exc:
            raise ToolError(_one_line(exc)) from exc
        return _render(value)

    async def arun(self, **kwargs: Any) -> str:
        sync, asynchronous = self.sync, self.asynchronous
        try:
            if asynchronous is not None:
                value = await self._bounded(asynchronous, kwargs)
            else:
                assert sync is not None
                future = asyncio.wrap_future(_start(lambda: sync(kwargs), self.name))
                deadline = asyncio.timeout(self.timeout)
                try:
                    async with deadline:
                        value = await future
                except TimeoutError:
                    if deadline.expired():
                        raise self._timed_out(may_run=True) from None
                    raise
        except ToolError:
            raise
        except Exception as exc:
            raise ToolError(_one_line(exc)) from exc
        return _render(value)


def _metadata(source: ToolSource, timeout: float) -> dict[str, Any]:
    return {
        "atlas.tool.kind": "python",
        "atlas.tool.origin": source.origin,
        "atlas.tool.side_effects": source.side_effects,
        "atlas.tool.timeout_s": timeout,
    }


def _wrap_function(
    source: ToolSource, plan: _Plan, ctx: ToolContext, timeout: float, description: str | None
) -> BaseTool:
    fn = plan.fn
    inject = dict.fromkeys(plan.context_params, ctx)

    def call(kwargs: dict[str, Any]) -> Any:
        return fn(**kwargs, **inject)

    runner = _Call(
        source.name,
        timeout,
        sync=None if plan.is_async else call,
        asynchronous=call if plan.is_async else None,
    )
    text = description or (plan.schema.__doc__ or "").strip() or f"Tool {source.name}"
    return StructuredTool(
        name=source.name,
        description=text,
        args_schema=plan.schema,
        func=runner.run,
        coroutine=runner.arun,
        metadata=_metadata(source, timeout),
    )


def _runtime_kwargs(method: Callable[..., Any]) -> dict[str, Any]:
    """What a tool's `_run`/`_arun` expects besides its arguments: no callbacks (so no second
    span), and the config of the call in progress (a model call inside nests under this span)."""
    params = inspect.signature(method).parameters
    extra: dict[str, Any] = {}
    for name, p in params.items():
        if name == "config" or p.annotation in (RunnableConfig, "RunnableConfig"):
            extra[name] = ensure_config()
    if "run_manager" in params:
        extra["run_manager"] = None
    return extra


def _wrap_tool(source: ToolSource, inner: BaseTool, timeout: float) -> BaseTool:
    """A LangChain tool, callable on both paths. Its `_run`/`_arun` are called directly: through
    its `invoke` every call would open a second TOOL span (autolog hooks every callback manager)."""
    if isinstance(inner, StructuredTool | Tool):
        has_sync, has_async = inner.func is not None, inner.coroutine is not None
    else:
        has_sync, has_async = True, type(inner)._arun is not BaseTool._arun

    def sync(kwargs: dict[str, Any]) -> Any:
        args, kw = inner._to_args_and_kwargs(kwargs, None)
        return _content(inner, inner._run(*args, **kw, **_runtime_kwargs(inner._run)))

    async def asynchronous(kwargs: dict[str, Any]) -> Any:
        args, kw = inner._to_args_and_kwargs(kwargs, None)
        return _content(inner, await inner._arun(*args, **kw, **_runtime_kwargs(inner._arun)))

    runner = _Call(
        source.name,
        timeout,
        sync=sync if has_sync else None,
        asynchronous=asynchronous if has_async else None,
    )
    schema = inner.args_schema if inner.args_schema is not None else inner.tool_call_schema
    return StructuredTool(
        name=source.name,
        description=inner.description,
        args_schema=schema,
        func=runner.run,
        coroutine=runner.arun,
        metadata=_metadata(source, timeout),
    )


def _content(inner: BaseTool, response: Any) -> Any:
    if inner.response_format == "content_and_artifact" and isinstance(response, tuple):
        return response[0]
    return response


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return str(value)


def _render(value: Any) -> str:
    """What the model reads: text as is, anything else as JSON, clipped like built-in tools."""
    from atlas.tools import MAX_TOOL_OUTPUT  # atlas.tools imports this module

    if isinstance(value, str):
        text = value
    elif value is None:
        text = "(no result)"
    else:
        try:
            text = json.dumps(value, default=_jsonable, ensure_ascii=False)
        except Exception:  # circular, or keys JSON cannot hold
            text = str(value)
    if len(text) <= MAX_TOOL_OUTPUT:
        return text
    return text[:MAX_TOOL_OUTPUT] + f"\n... [{len(text) - MAX_TOOL_OUTPUT} more characters cut]"


def _one_line(exc: BaseException) -> str:
    message = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 3] + "..."


# --- resolving references ---------------------------------------------------------------------


def _source(
    obj: Any,
    *,
    ref: str,
    origin: str,
    fallback_name: str | None,
    name: str | None = None,
    timeout_s: float | None = None,
    side_effects: bool = False,
) -> ToolSource:
    """Classify and check what a reference found (a function, a BaseTool or a factory)."""
    if isinstance(obj, type):
        hint = " (use an instance of it)" if issubclass(obj, BaseTool) else ""
        raise SpecError(f"tool {ref!r}: {obj.__name__} is a class, not a function or tool{hint}")
    meta = _meta(obj)
    kind: Literal["function", "tool", "factory"]
    tool_name: str | None
    if isinstance(obj, BaseTool):
        kind, tool_name = "tool", name or obj.name
    elif callable(obj):
        kind = "factory" if _is_factory(obj, ref) else "function"
        tool_name = name or meta.name or fallback_name or getattr(obj, "__name__", None)
    else:
        raise SpecError(
            f"tool {ref!r}: found {type(obj).__name__}, not a function, tool or factory"
        )
    if not tool_name or not _NAME.fullmatch(tool_name):
        what = (
            f"{tool_name!r} is not a valid tool name (letters, digits, _ and -, at most 64)"
            if tool_name
            else "it has no name"
        )
        raise SpecError(f"tool {ref!r}: {what}; give one with name=")
    timeout = timeout_s if timeout_s is not None else meta.timeout_s
    if timeout is not None and not (isinstance(timeout, int | float) and 0 < timeout < 1e9):
        raise SpecError(f"tool {ref!r}: timeout_s must be a positive number of seconds")
    if kind == "function":
        _plan(obj, ref)
    return ToolSource(
        ref=ref,
        name=tool_name,
        kind=kind,
        obj=obj,
        timeout_s=float(timeout) if timeout is not None else None,
        side_effects=side_effects or meta.side_effects,
        origin=origin,
    )


_registry: dict[str, ToolSource] = {}
_registry_lock = threading.Lock()


@overload
def register_tool(
    obj: _T, /, *, name: str | None = None, timeout_s: float | None = None, side_effects: bool = ...
) -> _T: ...


@overload
def register_tool(
    obj: None = None,
    /,
    *,
    name: str | None = None,
    timeout_s: float | None = None,
    side_effects: bool = False,
) -> Callable[[_T], _T]: ...


def register_tool(
    obj: Any = None,
    /,
    *,
    name: str | None = None,
    timeout_s: float | None = None,
    side_effects: bool = False,
) -> Any:
    """Register a tool for this process, so workers can list it by name: a function (sync or
    async), a LangChain BaseTool or a factory. As a decorator or a call; returns `obj`
    unchanged. The same name again replaces the earlier one; a built-in tool's name is refused."""

    def add(target: Any) -> Any:
        own = target.name if isinstance(target, BaseTool) else getattr(target, "__name__", None)
        source = _source(
            target,
            ref=str(name or _meta(target).name or own or target),
            origin="registered in code",
            fallback_name=None,
            name=name,
            timeout_s=timeout_s,
            side_effects=side_effects,
        )
        if source.name in _builtin_names():
            raise SpecError(f"tool {source.name!r} is a built-in tool; register yours as another")
        source = dataclasses.replace(source, ref=source.name)
        with _registry_lock:
            _registry[source.name] = source
        return target

    return add if obj is None else add(obj)


def unregister_tool(name: str) -> None:
    """Forget a tool registered in code (nothing happens if there is none by that name)."""
    with _registry_lock:
        _registry.pop(name, None)


def _builtin_names() -> set[str]:
    from atlas.tools import BUILTIN_TOOLS  # atlas.tools imports this module

    return set(BUILTIN_TOOLS)


def load_reference(
    ref: str, *, search_dirs: Sequence[Path], known: Sequence[str] = (), file: str | None = None
) -> ToolSource:
    """Resolve a worker's tool reference: `module:function` (looked up in `search_dirs` first,
    then installed packages), else a name registered in code, else an `atlas.tools` entry
    point. Every failure is one SpecError line naming `file`."""
    try:
        if ":" in ref:
            return _from_module(ref, search_dirs)
        with _registry_lock:
            registered = _registry.get(ref)
        if registered is not None:
            return registered
        entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        found = [ep for ep in entry_points if ep.name == ref]
        if found:
            return _from_entry_point(ref, found[0])
        with _registry_lock:
            names = [*known, *_registry, *(ep.name for ep in entry_points)]
        hint = _did_you_mean(ref, names)
        if not hint and "." in ref:
            hint = "; a Python function is written module:function"
        raise SpecError(f"unknown tool {ref!r}{hint}")
    except SpecError as exc:
        if file is None or exc.file:
            raise
        raise SpecError(exc.detail, file=file, field=exc.field) from exc.__cause__


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(dict.fromkeys(candidates)), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _from_entry_point(ref: str, ep: importlib.metadata.EntryPoint) -> ToolSource:
    dist = ep.dist
    where = f"entry point {ep.name!r}" + (f" ({dist.name} {dist.version})" if dist else "")
    try:
        obj = ep.load()
    except (Exception, SystemExit) as exc:
        raise SpecError(f"tool {ref!r}: cannot load {where}: {_one_line(exc)}") from exc
    return _source(obj, ref=ref, origin=where, fallback_name=ep.name)


def _from_module(ref: str, search_dirs: Sequence[Path]) -> ToolSource:
    match = _REF.fullmatch(ref.strip())
    if match is None or match["module"].endswith(".py"):
        raise SpecError(
            f"tool {ref!r}: write a Python tool as module:function (inventory:check_stock "
            "for check_stock in inventory.py next to the task file)"
        )
    module_name, attr = match["module"], match["attr"]
    module = _import(ref, module_name, [Path(d) for d in search_dirs])
    where = getattr(module, "__file__", None) or module_name
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            options = _public_callables(module)
            hint = _did_you_mean(attr, options) or (
                f"; it has: {', '.join(options[:10])}" if options else ""
            )
            raise SpecError(f"tool {ref!r}: module {module_name!r} ({where}) has no {attr!r}{hint}")
        obj = getattr(obj, part)
    return _source(obj, ref=ref, origin=f"{ref} ({where})", fallback_name=attr.rsplit(".", 1)[-1])


def _public_callables(module: types.ModuleType) -> list[str]:
    return sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_")
        and (
            isinstance(value, BaseTool)
            or (callable(value) and getattr(value, "__module__", None) == module.__name__)
        )
    )


_import_lock = threading.RLock()
_local_files: set[str] = set()
"""Files this module imported under their own name from a task's or team's folder."""


@contextlib.contextmanager
def _front_of_path(dirs: list[str]) -> Iterator[None]:
    """`dirs` first on sys.path while a tool module imports (it may import a sibling helper)."""
    sys.path[:0] = dirs
    try:
        yield
    finally:
        for entry in dirs:
            with contextlib.suppress(ValueError):
                sys.path.remove(entry)


def _file_of(module: types.ModuleType | None) -> str | None:
    path = getattr(module, "__file__", None)
    return os.path.realpath(path) if isinstance(path, str) else None


def _import(ref: str, module_name: str, search_dirs: list[Path]) -> types.ModuleType:
    """Import `module_name`, its top-level package looked up in `search_dirs` first.

    A top-level name already imported from another file (another task's `tools.py`) is not
    reused: this one is loaded under a private alias. So is a folder without `__init__.py`
    (a namespace package): its contents would otherwise follow whatever is on sys.path later.
    """
    top = module_name.partition(".")[0]
    dirs = list(dict.fromkeys(str(d.resolve()) for d in search_dirs))
    with _import_lock:
        importlib.invalidate_caches()
        spec = importlib.machinery.PathFinder.find_spec(top, dirs) if dirs else None
        existing = sys.modules.get(top)
        try:
            with _front_of_path(dirs):
                if spec is not None and spec.origin is None and spec.submodule_search_locations:
                    return _import_aliased(module_name, spec)
                if spec is not None and spec.origin is not None:
                    origin = os.path.realpath(spec.origin)
                    if existing is not None and _file_of(existing) != origin:
                        return _import_aliased(module_name, spec)
                    module = importlib.import_module(module_name)
                    if _file_of(sys.modules.get(top)) != origin:  # a finder ahead of sys.path
                        return _import_aliased(module_name, spec)
                    _local_files.add(origin)
                    return module
                if existing is not None and _file_of(existing) in _local_files:
                    # Another task's module holds the name; this task means an installed one.
                    installed = importlib.machinery.PathFinder.find_spec(top, sys.path[len(dirs) :])
                    if installed is None or installed.origin is None:
                        raise ModuleNotFoundError(f"No module named {top!r}", name=top)
                    return _import_aliased(module_name, installed)
                return importlib.import_module(module_name)
        except (Exception, SystemExit) as exc:
            where = f" ({spec.origin})" if spec is not None and spec.origin else ""
            missing = isinstance(exc, ModuleNotFoundError) and exc.name in (None, top, module_name)
            looked = " (not next to the task or team file, nor installed)" if missing else ""
            raise SpecError(
                f"tool {ref!r}: cannot import module {module_name!r}{where}: "
                f"{_one_line(exc)}{looked}"
            ) from exc


def _import_aliased(module_name: str, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
    """Load the top-level module of `spec` under a name private to its file or folders (reused
    when the same one is asked for again), then the rest of `module_name` inside it."""
    top, _, rest = module_name.partition(".")
    portions = [os.path.realpath(p) for p in spec.submodule_search_locations or ()]
    origin = os.path.realpath(spec.origin) if spec.origin else None
    key = origin or "|".join(portions)
    alias = f"_atlas_tool_{hashlib.sha256(key.encode()).hexdigest()[:12]}_{top}"
    module = sys.modules.get(alias)
    if module is None:
        if origin is None:  # a namespace package: a package with a fixed list of folders
            aliased = importlib.machinery.ModuleSpec(alias, None, is_package=True)
            aliased.submodule_search_locations = portions
        else:
            found = importlib.util.spec_from_file_location(
                alias, origin, submodule_search_locations=spec.submodule_search_locations
            )
            if found is None:
                raise ImportError(f"cannot load {origin}")
            aliased = found
        module = importlib.util.module_from_spec(aliased)
        sys.modules[alias] = module
        try:
            if aliased.loader is not None:
                aliased.loader.exec_module(module)
        except BaseException:
            del sys.modules[alias]
            raise
    return importlib.import_module(f"{alias}.{rest}") if rest else module


__all__ = [
    "ENTRY_POINT_GROUP",
    "ToolContext",
    "ToolSource",
    "load_reference",
    "register_tool",
    "tool",
    "unregister_tool",
]
