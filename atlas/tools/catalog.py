"""The tools each worker of a run gets, resolved and checked before the first model call.

A worker's `tools:` entry (in `agents/*.yaml`) is one of:
- a built-in name (`search_documents`, ...: `BUILTIN_TOOLS`);
- `mcp.<server>.<tool>` or `mcp.<server>.*`: tools of an MCP server declared under `mcp_servers:`
  in the task file (or in the team file; the task's declaration of a name wins);
- a Python tool: `package.module:function`, a name registered with `atlas.register_tool`, or an
  entry point of the `atlas.tools` group (see `atlas/tools/user.py`).

`Toolbox.resolve()` imports every module and checks every reference of every team the task uses,
and starts nothing: `atlas validate` and the start of every run call it, so a misspelled name or a
module that does not import fails with one line naming the file, before any model call.
`Toolbox.open()` then starts the run's MCP sessions (one per server, shared by the run's parallel
workers; `atlas/tools/mcp.py`), checks the MCP tool names against what each server offers, and
builds the Python tools with the run's `ToolContext`. `close()` stops the servers.

The tool set of a worker is fixed here, from its definition: nothing a model reads adds a tool.
"""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from langchain_core.tools import BaseTool

from atlas.errors import SpecError
from atlas.tools.mcp import McpHub, McpServer, McpToolInfo, expand_env
from atlas.tools.user import ToolContext, ToolSource, load_reference

if TYPE_CHECKING:
    from atlas.registry import Registry
    from atlas.spec import TaskSpec
    from atlas.tools import Workspace
    from atlas.tracing import Tracer

log = logging.getLogger("atlas.tools")

_MCP_REF = re.compile(r"^mcp\.(?P<server>[^.]+)\.(?P<tool>.+)$")
_TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True)
class Ref:
    """One entry of a worker's `tools:` list, resolved."""

    text: str
    """As written in the team file."""
    kind: Literal["builtin", "python", "mcp"]
    source: ToolSource | None = None
    server: str = ""
    tool: str = ""
    """The MCP tool's name, or `*` for all of the server's tools."""


@dataclass(frozen=True)
class WorkerTools:
    team: str
    worker: str
    file: str
    """The team file that lists the tools (errors name it)."""
    refs: tuple[Ref, ...]


@dataclass(frozen=True)
class ServerDecl:
    server: McpServer
    base_dir: Path
    """Relative `cwd`, commands and arguments resolve against the declaring file's folder."""
    file: str


@dataclass
class Toolbox:
    """One run's tools: references resolved at construction, servers started by `open()`."""

    workers: dict[tuple[str, str], WorkerTools]
    servers: dict[str, ServerDecl]
    hub: McpHub | None = None
    _python: dict[str, BaseTool] = field(default_factory=dict)
    _mcp: dict[tuple[str, str, str], BaseTool] = field(default_factory=dict)
    _opened: bool = False

    # -- resolving (no side effects beyond imports) --------------------------------------------
    @classmethod
    def resolve(cls, spec: TaskSpec, registry: Registry) -> Toolbox:
        """Check every tool reference of every team the task uses. Raises a one-line SpecError."""
        from atlas.tools import BUILTIN_TOOLS

        servers = _declared_servers(spec, registry)
        workers: dict[tuple[str, str], WorkerTools] = {}
        for team_name in spec.teams:
            team = registry.team(team_name)
            file = registry.sources.get(team_name, team_name)
            search = _search_dirs(spec, file)
            for worker in team.workers:
                where = f"workers.{worker.name}.tools"
                refs = tuple(
                    _resolve_ref(text, search, servers, file, where, known=list(BUILTIN_TOOLS))
                    for text in worker.tools
                )
                _check_unique(refs, file, where)
                workers[(team_name, worker.name)] = WorkerTools(team_name, worker.name, file, refs)
        used = {r.server for w in workers.values() for r in w.refs if r.kind == "mcp"}
        return cls(workers=workers, servers={k: v for k, v in servers.items() if k in used})

    # -- opening for a run -----------------------------------------------------------------------
    def open(
        self,
        *,
        run_id: str,
        run_dir: Path,
        task_dir: Path,
        default_timeout_s: float,
        connect: bool = True,
    ) -> None:
        """Start the MCP servers the workers use, check their tool names, build the Python tools.

        Raises SpecError (exit 2) for a missing `${VAR}` or a tool a server does not offer, and
        `McpConnectError` (exit 3) for a server that does not start or answer."""
        from atlas.tracing.redact import register_secret

        if self._opened:
            return
        self._opened = True
        if self.servers and connect:
            expanded = {}
            for name, decl in self.servers.items():
                server = expand_env(name, decl.server, os.environ)
                expanded[name] = _anchored(server, decl.base_dir)
            self.hub = McpHub(expanded, base_dir=task_dir, log_dir=run_dir)
            for secret in self.hub.secrets:
                register_secret(secret)
            self.hub.connect()
            self._check_mcp_names()
        for wt in self.workers.values():
            for ref in wt.refs:
                if ref.kind == "python" and ref.text not in self._python:
                    assert ref.source is not None
                    ctx = ToolContext(
                        run_id=run_id,
                        workspace=run_dir / "workspace",
                        task_dir=task_dir,
                        logger=logging.getLogger(f"atlas.tools.{ref.source.name}"),
                    )
                    self._python[ref.text] = ref.source.build(
                        ctx, default_timeout_s=default_timeout_s
                    )

    def _check_mcp_names(self) -> None:
        assert self.hub is not None
        for wt in self.workers.values():
            for ref in wt.refs:
                if ref.kind != "mcp" or ref.tool == "*":
                    continue
                offered = [t.name for t in self.hub.list_tools(ref.server)]
                if ref.tool not in offered:
                    hint = _did_you_mean(ref.tool, offered)
                    listing = ", ".join(offered[:20]) or "none"
                    raise SpecError(
                        f"MCP server {ref.server!r} has no tool {ref.tool!r}{hint} "
                        f"(it offers: {listing})",
                        file=wt.file,
                        field=f"workers.{wt.worker}.tools",
                    )

    # -- per worker ------------------------------------------------------------------------------
    def mcp_tools(self, ref: Ref) -> list[McpToolInfo]:
        if self.hub is None:
            return []
        offered = self.hub.list_tools(ref.server)
        return offered if ref.tool == "*" else [t for t in offered if t.name == ref.tool]

    def tools_for(
        self, team: str, worker: str, ws: Workspace, tracer: Tracer | None = None
    ) -> list[BaseTool]:
        """The worker's tools, in the order its definition lists them."""
        from atlas.tools import make_tools

        wt = self.workers.get((team, worker))
        if wt is None:
            raise SpecError(f"team {team!r} has no worker {worker!r} in this run")
        builtin_names = [r.text for r in wt.refs if r.kind == "builtin"]
        taken = set(builtin_names) | {
            self._python[r.text].name for r in wt.refs if r.kind == "python"
        }
        tools: list[BaseTool] = []
        for ref in wt.refs:
            if ref.kind == "builtin":
                tools.extend(make_tools([ref.text], ws, tracer))
            elif ref.kind == "python":
                tools.append(self._python[ref.text])
            else:
                tools.extend(self._mcp_tool(ref, info, taken) for info in self.mcp_tools(ref))
        return tools

    def _mcp_tool(self, ref: Ref, info: McpToolInfo, taken: set[str]) -> BaseTool:
        assert self.hub is not None
        exposed = info.name
        if exposed in taken or not _TOOL_NAME.match(exposed):
            exposed = f"{ref.server}_{info.name}"
        key = (ref.server, info.name, exposed)
        tool = self._mcp.get(key)
        if tool is None:
            tool = self._mcp[key] = self.hub.tool(ref.server, info.name, exposed_name=exposed)
        taken.add(tool.name)
        return tool

    def describe(self, ws: Workspace | None = None) -> list[dict[str, Any]]:
        """What `atlas tools` shows: each worker's tools with their kind, origin and schema."""
        from langchain_core.utils.function_calling import convert_to_openai_tool

        rows: list[dict[str, Any]] = []
        for (team, worker), wt in self.workers.items():
            entries: list[dict[str, Any]] = []
            for ref in wt.refs:
                if ref.kind == "mcp" and self.hub is None:
                    entries.append({"ref": ref.text, "kind": "mcp", "server": ref.server})
                    continue
                if ref.kind == "builtin" and ws is None:
                    entries.append({"ref": ref.text, "kind": "builtin"})
                    continue
                for tool in self._tools_of(ref, wt, ws):
                    fn = convert_to_openai_tool(tool)["function"]
                    entry = {
                        "ref": ref.text,
                        "kind": ref.kind,
                        "name": fn["name"],
                        "description": fn.get("description", ""),
                        "parameters": fn.get("parameters", {}),
                    }
                    if ref.kind == "mcp":
                        entry["server"] = ref.server
                    if ref.source is not None:
                        entry["origin"] = ref.source.origin
                    entries.append(entry)
            rows.append({"team": team, "worker": worker, "file": wt.file, "tools": entries})
        return rows

    def _tools_of(self, ref: Ref, wt: WorkerTools, ws: Workspace | None) -> list[BaseTool]:
        from atlas.tools import make_tools

        if ref.kind == "builtin":
            assert ws is not None
            return make_tools([ref.text], ws)
        if ref.kind == "python":
            return [self._python[ref.text]]
        taken = {r.text for r in wt.refs if r.kind == "builtin"}
        return [self._mcp_tool(ref, info, taken) for info in self.mcp_tools(ref)]

    def close(self) -> None:
        if self.hub is not None:
            self.hub.close()


# -- helpers ---------------------------------------------------------------------------------


def _declared_servers(spec: TaskSpec, registry: Registry) -> dict[str, ServerDecl]:
    """MCP servers visible to the task: the task file's, then those of the teams it uses."""
    found: dict[str, ServerDecl] = {}
    task_file = "task file"
    for name, server in spec.mcp_servers.items():
        found[name] = ServerDecl(server, spec.root, task_file)
    for team_name in spec.teams:
        team = registry.team(team_name)
        file = registry.sources.get(team_name, team_name)
        for name, server in team.mcp_servers.items():
            earlier = found.get(name)
            if earlier is None:
                found[name] = ServerDecl(server, Path(file).resolve().parent, file)
            elif earlier.file != task_file and earlier.server != server:
                raise SpecError(
                    f"MCP server {name!r} is declared differently in {earlier.file}; "
                    "rename one, or declare it once in the task file",
                    file=file,
                    field=f"mcp_servers.{name}",
                )
    return found


def _search_dirs(spec: TaskSpec, team_file: str) -> list[Path]:
    """Where a tool's module is looked for first: next to the task file, then the team file."""
    dirs = [spec.root.resolve()]
    team_dir = Path(team_file).resolve().parent
    if Path(team_file).is_file() and team_dir not in dirs:
        dirs.append(team_dir)
    return dirs


def _resolve_ref(
    text: str,
    search: list[Path],
    servers: dict[str, ServerDecl],
    file: str,
    where: str,
    *,
    known: list[str],
) -> Ref:
    if text in known:
        return Ref(text, "builtin")
    match = _MCP_REF.match(text)
    if match:
        server, tool = match["server"], match["tool"]
        if server not in servers:
            declared = ", ".join(sorted(servers)) or "none"
            hint = _did_you_mean(server, sorted(servers))
            raise SpecError(
                f"tool {text!r}: no MCP server {server!r} is declared{hint} "
                f"(declared: {declared}; add it under mcp_servers: in the task file)",
                file=file,
                field=where,
            )
        return Ref(text, "mcp", server=server, tool=tool)
    if text.startswith("mcp.") or text == "mcp":
        raise SpecError(
            f"tool {text!r}: MCP tools are written mcp.<server>.<tool> or mcp.<server>.*",
            file=file,
            field=where,
        )
    try:
        source = load_reference(text, search_dirs=search, known=known, file=file)
    except SpecError as exc:
        raise SpecError(exc.detail, file=file, field=where) from None
    if source.name in known:
        raise SpecError(
            f"tool {text!r} is named {source.name!r}, like a built-in tool; give it another name",
            file=file,
            field=where,
        )
    return Ref(text, "python", source=source)


def _check_unique(refs: tuple[Ref, ...], file: str, where: str) -> None:
    seen: dict[str, str] = {}
    for ref in refs:
        name = ref.source.name if ref.source is not None else ref.text
        if name in seen:
            raise SpecError(
                f"two tools are named {name!r} ({seen[name]!r} and {ref.text!r})",
                file=file,
                field=where,
            )
        seen[name] = ref.text


def _anchored(server: McpServer, base_dir: Path) -> McpServer:
    """A server whose working directory is its declaring file's folder unless it says otherwise
    (so `args: [server.py]` finds the file beside the task)."""
    if server.transport != "stdio":
        return server
    cwd = Path(os.path.expanduser(server.cwd)) if server.cwd else base_dir
    if not cwd.is_absolute():
        cwd = base_dir / cwd
    return server.model_copy(update={"cwd": str(cwd.resolve())})


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


__all__ = ["Ref", "Toolbox", "WorkerTools"]
