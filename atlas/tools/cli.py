"""`atlas tools [TASK]`: the tools each worker of a task would get, with their schemas; and the
checks `atlas validate` and `atlas run` make of a task's tools before any model call."""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atlas.spec import TaskSpec
    from atlas.tools.catalog import Toolbox


def check_tools(spec: TaskSpec, *, connect: bool = False) -> Toolbox:
    """Resolve every tool of every team the task uses (imports the user's modules). With
    `connect`, also start each MCP server, check the tools named exist, and close it again.
    Raises a one-line SpecError (exit 2), or McpConnectError (exit 3) for a server."""
    from atlas.registry import Registry
    from atlas.tools.catalog import Toolbox

    box = Toolbox.resolve(spec, Registry.for_spec(spec))
    if connect and box.servers:
        scratch = Path(tempfile.mkdtemp(prefix="atlas-tools-"))
        try:
            box.open(
                run_id="check",
                run_dir=scratch,
                task_dir=spec.root.resolve(),
                default_timeout_s=spec.budget.tool_timeout_s,
            )
        except BaseException:
            box.close()
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    return box


def server_lines(box: Toolbox) -> list[str]:
    """One line per connected MCP server: its tools."""
    if box.hub is None:
        return []
    lines = []
    for name in sorted(box.servers):
        names = [t.name for t in box.hub.list_tools(name)]
        lines.append(f"mcp server {name}: {len(names)} tools ({', '.join(names) or 'none'})")
    return lines


def cmd_tools(args: argparse.Namespace) -> int:
    from atlas.tools import BUILTIN_TOOLS, Workspace, make_tools

    if not args.file:
        from langchain_core.utils.function_calling import convert_to_openai_tool

        scratch = Path(tempfile.mkdtemp(prefix="atlas-tools-"))
        try:
            from atlas.tools import DataSource, DocumentIndex, DraftStore

            ws = Workspace(DocumentIndex([]), DataSource([]), DraftStore(scratch / "drafts"))
            rows = [
                convert_to_openai_tool(t)["function"] for t in make_tools(list(BUILTIN_TOOLS), ws)
            ]
            ws.close()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        points = [
            {"name": ep.name, "value": ep.value}
            for ep in sorted(entry_points(group="atlas.tools"), key=lambda ep: ep.name)
        ]
        if args.json:
            print(json.dumps({"builtin": rows, "entry_points": points}, indent=2))
            return 0
        print("built-in tools:")
        for fn in rows:
            print(f"  {fn['name']}: {_first_line(fn.get('description', ''))}")
        print("entry points (group atlas.tools):" + ("" if points else " none installed"))
        for point in points:
            print(f"  {point['name']}: {point['value']}")
        return 0

    from atlas.spec import load_task

    spec = load_task(args.file)
    box = check_tools(spec, connect=not args.no_connect)
    scratch = Path(tempfile.mkdtemp(prefix="atlas-tools-"))
    try:
        ws = Workspace.for_spec(spec, scratch)
        if box.hub is None:
            box.open(
                run_id="tools",
                run_dir=scratch,
                task_dir=spec.root.resolve(),
                default_timeout_s=spec.budget.tool_timeout_s,
                connect=False,
            )
        rows = box.describe(ws)
        ws.close()
    finally:
        box.close()
        shutil.rmtree(scratch, ignore_errors=True)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(f"{row['team']}.{row['worker']}  ({row['file']})")
        for entry in row["tools"]:
            if "name" not in entry:
                print(f"  {entry['ref']}  [{entry['kind']}; start the server to list its tools]")
                continue
            params = entry["parameters"].get("properties", {})
            required = set(entry["parameters"].get("required", []))
            args_text = ", ".join(
                f"{k}{'' if k in required else '?'}: {_type_of(v)}" for k, v in params.items()
            )
            where = entry.get("server") or entry.get("origin") or entry["kind"]
            print(f"  {entry['name']}({args_text})  [{entry['kind']}: {where}]")
            if entry["description"]:
                print(f"      {_first_line(entry['description'])}")
    return 0


def _type_of(schema: dict[str, Any]) -> str:
    if "type" in schema:
        kind = schema["type"]
        return "|".join(kind) if isinstance(kind, list) else str(kind)
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return "|".join(_type_of(s) for s in schema[key])
    if "enum" in schema:
        return "enum"
    return "object" if "properties" in schema else "any"


def _first_line(text: str, limit: int = 100) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."
