"""MCP servers as LangChain tools: the client side of the Model Context Protocol.

A task declares servers in the de-facto `mcpServers` shape (`McpServer`); `McpHub` opens them for
one run and hands out one LangChain tool per MCP tool. What it guarantees, and why:

- One session per server per run. Sessions are opened once by `connect()` and shared by all the
  run's parallel workers, sync and async callers alike; no call starts a server. Every session
  lives on the hub's own event loop in one daemon thread, because an anyio/mcp session is bound to
  the task that opened it: sync callers (LangGraph worker threads) wait on
  `run_coroutine_threadsafe(...).result()`, async callers await `wrap_future(...)` on their own
  loop (cancelling the caller cancels the call).
- Lifetime. A stdio server is started through a tiny launcher that sets PR_SET_PDEATHSIG and then
  execs the real command, so the server dies with ATLAS even on SIGKILL; it is spawned from the
  hub's loop thread, which lives until `close()` (the death signal follows the spawning thread).
  It runs in its own session, so Ctrl-C at ATLAS's terminal does not reach it; `close()` stops it.
  A server that dies mid-run fails its calls at once ("not running (exited with code N)") and is
  restarted once, on the next call.
- Environment. A stdio server sees only a short allowlist of ATLAS's environment (`_INHERITED`)
  plus its declared `env`, never the whole environment with its provider keys. Its stderr goes to
  `log_dir/mcp-<name>.log` (or nowhere), never to ATLAS's terminal.
- Secrets. Header and env values are never printed or logged: error messages show a URL without
  its userinfo and query, and the declared values are redacted from error messages and from the
  server's log. `McpHub.secrets` lists them for the run's trace redaction.
- Errors. A server that cannot start raises `McpConnectError` (one line naming it); a failed,
  timed-out or refused call raises `ToolError` (one line, at most `MAX_ERROR_CHARS`).
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import json
import math
import os
import re
import shutil
import signal
import sys
import threading
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeAlias
from urllib.parse import urlsplit

from langchain_core.tools import BaseTool, StructuredTool

from atlas.errors import McpConnectError, SpecError, ToolError
from atlas.spec import McpServer, expand_env
from atlas.tracing.redact import MIN_SECRET_CHARS, scrub_text

# The SDK (with anyio and httpx) is imported where the hub uses it: every task file's loading
# imports `McpServer`, and the SDK alone takes most of a second to import.
if TYPE_CHECKING:
    from anyio.abc import Process
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
    from mcp import types
    from mcp.client.session import ClientSession
    from mcp.shared.message import SessionMessage

    _Streams: TypeAlias = tuple[
        MemoryObjectReceiveStream[SessionMessage | Exception],
        MemoryObjectSendStream[SessionMessage],
    ]

MAX_ERROR_CHARS = 500

_INHERITED = (
    *("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR"),
    *("USER", "LOGNAME", "SHELL", "TERM"),
)
"""The only variables of ATLAS's environment a stdio server sees (besides its declared `env`)."""

_LAUNCHER = """\
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(1)
os.execv(sys.argv[2], sys.argv[2:])
"""
"""Run as `python -I -S -c`: die with ATLAS (PR_SET_PDEATHSIG, which survives exec), give up if
ATLAS is already gone, then become the server (anyio's `open_process` takes no preexec_fn,
which is unsafe in a threaded program anyway)."""

_NOT_NAME = re.compile(r"[^A-Za-z0-9_-]")
_BEARER = re.compile(r"^(?:bearer|basic|token)\s+(\S+)$", re.I)
_REQUEST_TIMEOUT = 408
"""The error code the SDK gives a request whose `read_timeout_seconds` ran out."""
_STOP_GRACE_S = 2.0
"""How long a stopping server has after stdin closes (then SIGTERM), and after SIGTERM (SIGKILL)."""


@dataclass(frozen=True)
class McpToolInfo:
    """One tool a server offers, as listed at connect time.

    `input_schema` has local `$defs` inlined. `read_only` is the server's readOnlyHint;
    `destructive` follows the MCP defaults: true unless the tool is read-only or the server says
    destructiveHint: false (an unannotated tool may change things)."""

    server: str
    name: str
    description: str
    input_schema: dict[str, Any]
    destructive: bool
    read_only: bool
    declared_destructive: bool = False
    """The server said destructiveHint: true (not just left it unset): what makes ATLAS ask
    for approval before each call by default."""


# -- schemas and results ---------------------------------------------------------------------


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with its local `$ref`s (`#/$defs/X`, `#/definitions/X`) replaced by what they
    point to, so a model sees one self-contained schema. A recursive reference is kept as it is
    (with the definitions it needs); sibling keys of a `$ref` (a description) win over the
    definition's."""
    defs: dict[str, Any] = {}
    for section in ("definitions", "$defs"):
        for key, value in (schema.get(section) or {}).items():
            pointer = key.replace("~", "~0").replace("/", "~1")
            defs[f"#/{section}/{pointer}"] = value
    kept_recursive = False

    def resolve(node: Any, active: frozenset[str]) -> Any:
        nonlocal kept_recursive
        if isinstance(node, list):
            return [resolve(item, active) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        rest = {k: resolve(v, active) for k, v in node.items() if k != "$ref"}
        if isinstance(ref, str) and ref in defs:
            if ref in active:
                kept_recursive = True
            else:
                target = resolve(defs[ref], active | {ref})
                if isinstance(target, dict):
                    return {**target, **rest}
        return {"$ref": ref, **rest} if "$ref" in node else rest

    body = {k: v for k, v in schema.items() if k not in ("$defs", "definitions")}
    result: dict[str, Any] = resolve(body, frozenset())
    if kept_recursive:
        result.update({k: schema[k] for k in ("definitions", "$defs") if k in schema})
    return result


def _allows_null(prop: Any) -> bool:
    """Whether a JSON schema accepts null (an unconstrained one does)."""
    if not isinstance(prop, dict):
        return True
    kind = prop.get("type")
    if kind == "null" or (isinstance(kind, list) and "null" in kind):
        return True
    if any(any(_allows_null(p) for p in prop.get(k, [])) for k in ("anyOf", "oneOf")):
        return True
    if "enum" in prop:
        return None in prop["enum"]
    if "const" in prop:
        return prop["const"] is None
    constrained = ("type", "anyOf", "oneOf", "allOf", "$ref", "properties", "items", "not")
    return not any(k in prop for k in constrained)


def _drop_nulls(arguments: Mapping[str, Any], schema: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments without a None the schema would refuse: models send null for optional
    fields, and a server validating `"type": "string"` rejects it."""
    props = schema.get("properties") or {}
    required = set(schema.get("required") or ())
    return {
        k: v
        for k, v in arguments.items()
        if v is not None or k in required or k not in props or _allows_null(props[k])
    }


def _result_text(result: types.CallToolResult) -> str:
    """What the model reads: the texts joined; images and audio as a placeholder naming their
    type; structured content as JSON when there is no text."""
    from mcp import types

    parts: list[str] = []
    has_text = False
    for item in result.content:
        if isinstance(item, types.TextContent):
            parts.append(item.text)
            has_text = True
        elif isinstance(item, types.ImageContent):
            parts.append(f"[image: {item.mimeType}]")
        elif isinstance(item, types.AudioContent):
            parts.append(f"[audio: {item.mimeType}]")
        elif isinstance(item, types.EmbeddedResource):
            resource = item.resource
            if isinstance(resource, types.TextResourceContents):
                parts.append(resource.text)
                has_text = True
            else:
                parts.append(f"[resource: {resource.uri} ({resource.mimeType or 'binary'})]")
        elif isinstance(item, types.ResourceLink):
            parts.append(f"[resource link: {item.uri}]")
    if result.structuredContent is not None and not has_text:
        parts.append(json.dumps(result.structuredContent, ensure_ascii=False, default=str))
    return "\n".join(parts)


def _tool_info(server: str, tool: types.Tool) -> McpToolInfo:
    notes = tool.annotations
    read_only = bool(notes and notes.readOnlyHint)
    destructive = not read_only and not (notes and notes.destructiveHint is False)
    return McpToolInfo(
        server=server,
        name=tool.name,
        description=(tool.description or "").strip(),
        input_schema=_inline_refs(dict(tool.inputSchema)),
        destructive=destructive,
        read_only=read_only,
        declared_destructive=bool(notes and notes.destructiveHint is True and not read_only),
    )


def _exposed(name: str) -> str:
    return _NOT_NAME.sub("_", name)[:64] or "tool"


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def _public_url(url: str) -> str:
    """`url` as error messages show it: no userinfo, no query, no fragment."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


# -- the hub ---------------------------------------------------------------------------------


class _Refused(Exception):
    """A server not started at all (command not found, no such folder): the reason as given."""


@dataclass(eq=False)
class _Conn:
    """One server's session and child process. Touched only on the hub's loop thread (except
    `tools`, written once before `ready`)."""

    name: str
    server: McpServer
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    session: ClientSession | None = None
    tools: list[McpToolInfo] = field(default_factory=list)
    process: Process | None = None
    killed: bool = False
    """The hub stopped the process (so its exit code is not the server's own)."""
    last_stderr: str = ""
    stderr_done: asyncio.Event = field(default_factory=asyncio.Event)
    failure: str | None = None
    """Why it never became ready."""
    ended: str | None = None
    """Why a ready session ended."""
    restarted: bool = False
    task: asyncio.Task[None] | None = None

    @property
    def alive(self) -> bool:
        return self.session is not None and self.task is not None and not self.task.done()


class McpHub:
    """The MCP sessions of one run: opened by `connect()`, shared by every worker, closed by
    `close()` (see the module docstring for what it guarantees).

    `servers` are as `expand_env` returns them. `base_dir` is the task file's folder: a relative
    `cwd` resolves against it, and it is the working directory of a server that names none. With
    `log_dir`, each stdio server's stderr goes to `log_dir/mcp-<name>.log`; without, nowhere."""

    def __init__(
        self, servers: Mapping[str, McpServer], *, base_dir: Path, log_dir: Path | None = None
    ) -> None:
        self._servers = dict(servers)
        self._base_dir = Path(base_dir)
        self._log_dir = log_dir
        self._conns: dict[str, _Conn] = {}
        self._restart_locks: dict[str, asyncio.Lock] = {}
        self._processes: list[Process] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        found: list[str] = []
        for server in self._servers.values():
            for value in (*server.env.values(), *server.headers.values()):
                found.append(value)
                bearer = _BEARER.match(value.strip())
                if bearer:
                    found.append(bearer[1])
            password = urlsplit(server.url).password if server.url else None
            if password:
                found.append(password)
        self._secrets = list(dict.fromkeys(v for v in found if v))
        self._redacted = sorted(
            (v for v in self._secrets if len(v) >= MIN_SECRET_CHARS), key=len, reverse=True
        )

    @property
    def secrets(self) -> list[str]:
        """Header and env values (and URL passwords): the run registers them for redaction."""
        return list(self._secrets)

    # -- public, any thread ----------------------------------------------------------------
    def connect(self, names: Iterable[str] | None = None) -> None:
        """Open the named servers' sessions (all declared ones by default), concurrently, each
        bounded by its `connect_timeout_s`. Servers already connected are left as they are.
        Raises McpConnectError naming the first server (in the order given) that failed."""
        wanted = list(self._servers) if names is None else list(dict.fromkeys(names))
        for name in wanted:
            self._server(name)
        if not wanted:
            return
        loop = self._running_loop(for_connect=True)
        bound = max((self._servers[n].connect_timeout_s for n in wanted), default=0) + 15
        future = asyncio.run_coroutine_threadsafe(self._connect_all(wanted), loop)
        try:
            failures = future.result(timeout=bound)
        except TimeoutError:  # a safety net: each server's own deadline comes first
            future.cancel()
            failures = {
                n: f"did not start within {bound:g} s"
                for n in wanted
                if (c := self._conns.get(n)) is None or c.failure is not None or not c.alive
            }
        for name in wanted:
            if name in failures:
                raise McpConnectError(f"mcp server {name!r}: {failures[name]}")

    def list_tools(self, server: str) -> list[McpToolInfo]:
        """The server's tools as listed at connect time (connecting it first if need be)."""
        self._server(server)
        conn = self._conns.get(server)
        if conn is None or conn.failure is not None or not conn.ready.is_set():
            self.connect([server])
            conn = self._conns[server]
        return list(conn.tools)

    def tool(self, server: str, name: str, *, exposed_name: str | None = None) -> BaseTool:
        """The MCP tool `name` of `server` as a LangChain tool (sync and async). Its name is
        `exposed_name` or the MCP name, made safe for model APIs; its `args_schema` is the
        server's JSON schema. Raises SpecError if the server has no such tool."""
        infos = self.list_tools(server)
        info = next((t for t in infos if t.name == name), None)
        if info is None:
            offered = [t.name for t in infos]
            close = difflib.get_close_matches(name, offered, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            listing = ", ".join(offered[:30]) or "none"
            raise SpecError(
                f"mcp server {server!r} has no tool {name!r}{hint} (it offers: {listing})",
                field=f"mcp.{server}.{name}",
            )
        schema = info.input_schema

        def call(**arguments: Any) -> str:
            return self._call_sync(server, name, _drop_nulls(arguments, schema))

        async def acall(**arguments: Any) -> str:
            return await self._call_async(server, name, _drop_nulls(arguments, schema))

        return StructuredTool(
            name=_exposed(exposed_name or name),
            description=info.description or f"MCP tool {name} on server {server}",
            args_schema=schema,
            func=call,
            coroutine=acall,
            metadata={
                "atlas.mcp.server": server,
                "atlas.mcp.tool": name,
                "atlas.tool.kind": "mcp",
                "atlas.mcp.destructive": info.destructive,
                "atlas.mcp.read_only": info.read_only,
                "atlas.tool.side_effects": info.declared_destructive,
            },
        )

    def close(self) -> None:
        """Close every session and stop every child. Idempotent; safe from any thread, also
        after a failed connect."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if threading.current_thread() is thread:
            loop.create_task(self._shutdown()).add_done_callback(lambda _: loop.stop())
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=30)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        for process in self._processes:  # anything the loop could not stop
            if process.returncode is None:
                with contextlib.suppress(OSError):
                    os.killpg(process.pid, signal.SIGKILL)

    # -- thread side of calls ----------------------------------------------------------------
    def _call_sync(self, server: str, name: str, arguments: dict[str, Any]) -> str:
        loop = self._running_loop()
        future = asyncio.run_coroutine_threadsafe(self._call(server, name, arguments), loop)
        try:
            return future.result(timeout=self._call_bound(server))
        except TimeoutError:
            future.cancel()
            raise self._timed_out(server, name) from None

    async def _call_async(self, server: str, name: str, arguments: dict[str, Any]) -> str:
        loop = self._running_loop()
        future = asyncio.run_coroutine_threadsafe(self._call(server, name, arguments), loop)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), self._call_bound(server))
        except TimeoutError:
            raise self._timed_out(server, name) from None

    def _call_bound(self, server: str) -> float:
        """The outer bound on a call: its own timeout plus a possible restart, plus slack."""
        spec = self._servers[server]
        return spec.timeout_s + spec.connect_timeout_s + 5

    def _timed_out(self, server: str, name: str) -> ToolError:
        return ToolError(
            f"mcp {server}.{name}: timed out after {self._servers[server].timeout_s:g} s"
        )

    def _server(self, name: str) -> McpServer:
        server = self._servers.get(name)
        if server is None:
            declared = ", ".join(sorted(self._servers)) or "none"
            raise SpecError(f"unknown mcp server {name!r} (declared: {declared})")
        return server

    def _running_loop(self, *, for_connect: bool = False) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                if for_connect:
                    raise McpConnectError("mcp servers: this run's MCP sessions are closed")
                raise ToolError("mcp: this run's MCP sessions are closed")
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(
                    target=self._serve, args=(loop,), name="atlas-mcp", daemon=True
                )
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    # -- loop side ---------------------------------------------------------------------------
    async def _connect_all(self, names: list[str]) -> dict[str, str]:
        opened = await asyncio.gather(*(self._open(name) for name in names))
        return {c.name: c.failure for c in opened if c.failure is not None}

    async def _open(self, name: str) -> _Conn:
        """The server's session: the current one if it is up or coming up, else a new one."""
        conn = self._conns.get(name)
        if conn is None or conn.failure is not None or (conn.ready.is_set() and not conn.alive):
            restarted = conn is not None and conn.ended is not None
            conn = _Conn(name, self._servers[name], restarted=restarted)
            self._conns[name] = conn
            conn.task = asyncio.create_task(self._own(conn), name=f"mcp-{name}")
        await conn.ready.wait()
        return conn

    async def _own(self, conn: _Conn) -> None:
        """Open, serve and close one session, all in this one task (anyio requires it)."""
        import anyio
        from mcp import types
        from mcp.client.session import ClientSession

        from atlas import __version__

        client = types.Implementation(name="atlas", version=__version__)
        server = conn.server
        scope = anyio.CancelScope(deadline=anyio.current_time() + server.connect_timeout_s)
        error: BaseException | None = None
        try:
            with scope:
                async with contextlib.AsyncExitStack() as stack:
                    opened = self._stdio(conn) if server.transport == "stdio" else self._http(conn)
                    read, write = await stack.enter_async_context(opened)
                    session = await stack.enter_async_context(
                        ClientSession(read, write, client_info=client)
                    )
                    await session.initialize()
                    conn.tools = await self._list(session, conn.name)
                    scope.deadline = math.inf
                    conn.session = session
                    conn.ready.set()
                    await self._until_stopped(conn)
        except Exception as exc:
            error = exc
        finally:
            conn.session = None
            why = self._why(conn, error, timed_out=scope.cancelled_caught)
            if conn.ready.is_set():
                conn.ended = "closed" if conn.stop.is_set() else why
            else:
                conn.failure = why
                conn.ready.set()

    @staticmethod
    async def _list(session: ClientSession, name: str) -> list[McpToolInfo]:
        from mcp import types

        tools: list[McpToolInfo] = []
        cursor: str | None = None
        seen: set[str] = set()
        while True:
            params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
            page = await session.list_tools(params=params)
            tools.extend(_tool_info(name, t) for t in page.tools)
            cursor = page.nextCursor
            if not cursor or cursor in seen:
                return tools
            seen.add(cursor)

    @staticmethod
    async def _until_stopped(conn: _Conn) -> None:
        """Until `close()` asks, or the child exits (an HTTP session's failure cancels this)."""
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(conn.stop.wait())]
        if conn.process is not None:
            waits.append(asyncio.ensure_future(conn.process.wait()))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()

    async def _call(self, server: str, name: str, arguments: dict[str, Any]) -> str:
        from mcp import types
        from mcp.shared.exceptions import McpError

        conn = await self._live(server)
        assert conn.session is not None and conn.task is not None
        label = f"mcp {server}.{name}"
        timeout = conn.server.timeout_s
        # `send_request`, not `call_tool`: that one re-checks structured output against the
        # tool's schema with jsonschema on every call (half of a call's cost here), for content
        # the model reads as text anyway.
        params = types.CallToolRequestParams(name=name, arguments=arguments)
        request = types.ClientRequest(types.CallToolRequest(params=params))
        call = asyncio.ensure_future(
            conn.session.send_request(
                request,
                types.CallToolResult,
                request_read_timeout_seconds=timedelta(seconds=timeout),
            )
        )
        try:
            await asyncio.wait({call, conn.task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not call.done():
                call.cancel()
        if not call.done() or call.cancelled():
            raise ToolError(await self._not_running(conn))
        exc = call.exception()
        if exc is None:
            result = call.result()
            text = _result_text(result)
            if result.isError:
                raise ToolError(_one_line(f"{label}: {self._redact(text) or 'the tool failed'}"))
            return text or "(no output)"
        if isinstance(exc, McpError):
            if exc.error.code == _REQUEST_TIMEOUT:
                raise self._timed_out(server, name)
            if exc.error.code == types.CONNECTION_CLOSED:
                raise ToolError(await self._not_running(conn))
            raise ToolError(_one_line(f"{label}: {self._redact(exc.error.message)}"))
        if _lost_connection(exc):
            raise ToolError(await self._not_running(conn))
        raise ToolError(_one_line(f"{label}: {type(exc).__name__}: {self._redact(str(exc))}"))

    async def _live(self, server: str) -> _Conn:
        """The server's session; one that died is restarted once per run."""
        conn = self._conns.get(server)
        if conn is None:
            raise ToolError(f"mcp server {server!r} is not connected")
        await conn.ready.wait()
        if conn.alive:
            return conn
        lock = self._restart_locks.setdefault(server, asyncio.Lock())
        async with lock:
            conn = self._conns[server]
            if conn.alive:
                return conn
            if conn.restarted or conn.ended in (None, "closed") or self._closed:
                raise ToolError(await self._not_running(conn))
            before = await self._not_running(conn)
            fresh = await self._open(server)
            if fresh.failure is not None:
                raise ToolError(_one_line(f"{before}; restarting it failed: {fresh.failure}"))
            return fresh

    async def _not_running(self, conn: _Conn) -> str:
        if conn.task is not None and not conn.task.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(conn.task), _STOP_GRACE_S * 3)
        if conn.ended == "closed" or (self._closed and conn.ended is None):
            return f"mcp server {conn.name!r} is closed (the run is over)"
        state = "not running" if conn.server.transport == "stdio" else "not reachable"
        why = conn.ended or conn.failure or "it stopped"
        return _one_line(f"mcp server {conn.name!r} is {state} ({why})")

    async def _shutdown(self) -> None:
        for conn in self._conns.values():
            conn.stop.set()
        tasks = [c.task for c in self._conns.values() if c.task is not None and not c.task.done()]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=_STOP_GRACE_S * 4)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=_STOP_GRACE_S)

    # -- transports --------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _http(self, conn: _Conn) -> AsyncIterator[_Streams]:
        import httpx
        from mcp.client.streamable_http import streamable_http_client

        server = conn.server
        assert server.url is not None
        timeout = httpx.Timeout(server.connect_timeout_s, read=max(300.0, server.timeout_s + 5))
        async with (
            httpx.AsyncClient(headers=server.headers, timeout=timeout) as client,
            streamable_http_client(server.url, http_client=client) as (read, write, _),
        ):
            yield read, write

    @contextlib.asynccontextmanager
    async def _stdio(self, conn: _Conn) -> AsyncIterator[_Streams]:
        """The server as a child speaking newline-delimited JSON-RPC on stdin/stdout. Written
        here rather than taken from the SDK to know the child: its exit code and last stderr
        line for error messages, its pid to stop it, and the launcher in front of it."""
        import anyio
        from mcp import types
        from mcp.shared.message import SessionMessage
        from pydantic import ValidationError

        argv, env, cwd = self._command(conn)
        log = self._open_log(conn.name)
        try:
            process = await anyio.open_process(argv, env=env, cwd=cwd, start_new_session=True)
        except OSError as exc:
            if log is not None:
                log.close()
            raise _Refused(f"cannot start the server: {exc}") from None
        conn.process = process
        self._processes.append(process)
        to_session, read = anyio.create_memory_object_stream[SessionMessage | Exception](0)
        write, from_session = anyio.create_memory_object_stream[SessionMessage](0)

        async def pump_out() -> None:
            assert process.stdout is not None
            buffer = bytearray()
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                async with to_session:
                    async for chunk in process.stdout:
                        buffer.extend(chunk)
                        while (end := buffer.find(b"\n")) >= 0:
                            line = bytes(buffer[:end]).strip()
                            del buffer[: end + 1]
                            if not line:
                                continue
                            try:
                                message = types.JSONRPCMessage.model_validate_json(line)
                            except ValidationError:
                                self._log_line(log, b"[atlas] ignored a stdout line: not JSON-RPC")
                                continue
                            await to_session.send(SessionMessage(message))

        async def pump_in() -> None:
            assert process.stdin is not None
            with contextlib.suppress(anyio.ClosedResourceError, anyio.BrokenResourceError):
                async with from_session:
                    async for item in from_session:
                        data = item.message.model_dump_json(by_alias=True, exclude_none=True)
                        await process.stdin.send(data.encode() + b"\n")

        async def pump_err() -> None:
            assert process.stderr is not None
            buffer = bytearray()
            try:
                async for chunk in process.stderr:
                    buffer.extend(chunk)
                    while (end := buffer.find(b"\n")) >= 0:
                        self._stderr_line(conn, log, bytes(buffer[:end]))
                        del buffer[: end + 1]
                if buffer:
                    self._stderr_line(conn, log, bytes(buffer))
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass
            finally:
                conn.stderr_done.set()

        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(pump_out)
                tg.start_soon(pump_in)
                tg.start_soon(pump_err)
                try:
                    yield read, write
                finally:
                    with anyio.CancelScope(shield=True):
                        await self._stop_process(conn, process)
                        with anyio.move_on_after(1):
                            await conn.stderr_done.wait()
                    tg.cancel_scope.cancel()
        finally:
            if log is not None:
                log.close()

    def _command(self, conn: _Conn) -> tuple[list[str], dict[str, str], str]:
        """The launcher's argv, the child's environment and working directory."""
        server = conn.server
        assert server.command is not None
        env = {k: os.environ[k] for k in _INHERITED if k in os.environ} | server.env
        cwd = Path(os.path.expanduser(server.cwd)) if server.cwd else self._base_dir
        if not cwd.is_absolute():
            cwd = self._base_dir / cwd
        if not cwd.is_dir():
            raise _Refused(f"working directory {str(cwd)!r} does not exist")
        command = os.path.expanduser(server.command)
        if command in ("python", "python3"):
            found = sys.executable
        elif os.sep in command:
            path = Path(command) if Path(command).is_absolute() else cwd / command
            if not (path.is_file() and os.access(path, os.X_OK)):
                raise _Refused(f"command {server.command!r} not found (no executable {path})")
            found = str(path)
        else:
            which = shutil.which(command, path=env.get("PATH", os.defpath))
            if which is None:
                raise _Refused(f"command {server.command!r} not found on PATH")
            found = which
        launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid())]
        return [*launcher, found, *server.args], env, str(cwd)

    def _open_log(self, name: str) -> BinaryIO | None:
        if self._log_dir is None:
            return None
        self._log_dir.mkdir(parents=True, exist_ok=True)
        return open(self._log_dir / f"mcp-{_exposed(name)}.log", "ab")

    def _stderr_line(self, conn: _Conn, log: BinaryIO | None, raw: bytes) -> None:
        line = self._redact(raw.decode("utf-8", "replace").rstrip())
        if line.strip():
            conn.last_stderr = line
        self._log_line(log, line.encode())

    @staticmethod
    def _log_line(log: BinaryIO | None, line: bytes) -> None:
        if log is not None:
            with contextlib.suppress(OSError):
                log.write(line + b"\n")
                log.flush()

    async def _stop_process(self, conn: _Conn, process: Process) -> None:
        """Closing stdin asks a stdio server to exit (a stopping run gives it a moment); then
        SIGTERM, then SIGKILL, to its whole process group. Whatever is left in the group (the
        server's own children) gets SIGKILL however the server ended."""
        import anyio

        if process.stdin is not None:
            with contextlib.suppress(Exception):
                await process.stdin.aclose()
        if process.returncode is None:
            # A stopping run gives the server time to exit; a failing start only time to be
            # reaped if it exited by itself (so its own exit code is what the error shows).
            with anyio.move_on_after(_STOP_GRACE_S if conn.stop.is_set() else 0.5):
                await process.wait()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if process.returncode is not None:
                break
            conn.killed = True
            with contextlib.suppress(OSError):
                os.killpg(process.pid, sig)
            with anyio.move_on_after(_STOP_GRACE_S):
                await process.wait()
        with contextlib.suppress(OSError):
            os.killpg(process.pid, signal.SIGKILL)

    # -- messages ----------------------------------------------------------------------------
    def _redact(self, text: str) -> str:
        return scrub_text(text, self._redacted)

    def _why(self, conn: _Conn, error: BaseException | None, *, timed_out: bool) -> str:
        """One line saying why a session never started, or ended."""
        import httpx
        from mcp.shared.exceptions import McpError

        server = conn.server
        process = conn.process
        if timed_out and not conn.ready.is_set():
            what = "start" if server.transport == "stdio" else "answer"
            return f"did not {what} within {server.connect_timeout_s:g} s (connect_timeout_s)"
        exc = _leaf(error) if error is not None else None
        exited = process is not None and process.returncode is not None and not conn.killed
        if process is not None and exited and (exc is None or _lost_connection(exc)):
            code = process.returncode
            assert code is not None
            why = f"exited with code {code}" if code >= 0 else f"was killed by {_signal(-code)}"
            if not conn.ready.is_set():
                why += " before it was ready"
                if conn.last_stderr:
                    why += f": {conn.last_stderr.strip()}"
            return _one_line(why)
        url = _public_url(server.url) if server.url else ""
        if exc is None:
            return "the session ended"
        if isinstance(exc, _Refused):
            why = str(exc)
        elif isinstance(exc, httpx.HTTPStatusError):
            response = exc.response
            why = f"HTTP {response.status_code} {response.reason_phrase} from {url}"
        elif isinstance(exc, httpx.TransportError):
            why = f"cannot reach {url} ({str(exc) or type(exc).__name__})"
        elif isinstance(exc, McpError) and url and exc.error.message == "Session terminated":
            # What the SDK makes of a 404 (also: a server that forgot the session).
            why = f"HTTP 404 Not Found from {url} (is the path right? it is often /mcp)"
        elif isinstance(exc, McpError):
            why = exc.error.message + (f" (at {url})" if url else "")
        else:
            why = f"{type(exc).__name__}: {exc}"
        return _one_line(self._redact(why))


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside (nested) exception groups, cancellations aside."""
    while isinstance(exc, BaseExceptionGroup):
        inner = [e for e in exc.exceptions if not isinstance(e, asyncio.CancelledError)]
        exc = (inner or list(exc.exceptions))[0]
    return exc


def _lost_connection(exc: BaseException) -> bool:
    import anyio
    from mcp import types
    from mcp.shared.exceptions import McpError

    closed = isinstance(exc, McpError) and exc.error.code == types.CONNECTION_CLOSED
    return closed or isinstance(exc, anyio.ClosedResourceError | anyio.BrokenResourceError)


def _signal(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


__all__ = ["McpConnectError", "McpHub", "McpServer", "McpToolInfo", "expand_env"]
