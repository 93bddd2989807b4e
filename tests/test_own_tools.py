"""A user's own tools end to end: a task from outside the project brings its own team, a Python
tool beside the task file and a stdio MCP server written with the official SDK. Its dry run calls
both (their side effects are read back), traces both as TOOL spans, and exits 0, on the CLI and
through `atlas.arun`; every mistake in a tool reference stops the run before any model call."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import atlas
from tests.conftest import ROOT, atlas_cli

SERVER = '''
import os, sys
from pathlib import Path
from mcp.server.fastmcp import FastMCP

Path(os.environ["PID_DIR"]).mkdir(exist_ok=True)
(Path(os.environ["PID_DIR"]) / f"{os.getpid()}.pid").write_text(str(os.getpid()))
app = FastMCP("warehouse")

@app.tool()
def reserve_stock(sku: str, quantity: int = 1) -> str:
    """Reserve units of a product in the warehouse."""
    with open("mcp-side-effect.txt", "a") as fh:
        fh.write(f"{sku}|{quantity}|{os.environ.get('WAREHOUSE_TOKEN', '')[:3]}\\n")
    return f"reserved {quantity} of {sku}"

@app.tool()
def explode(reason: str) -> str:
    """Always fails."""
    raise RuntimeError("warehouse is on fire")

if __name__ == "__main__":
    app.run()
'''

TOOLS = '''
from pathlib import Path
import atlas

def check_inventory(sku: str, ctx: atlas.ToolContext) -> dict:
    """Look up how many units of a product are in stock.

    Args:
        sku: The product code or name.
    """
    (Path(__file__).parent / "py-side-effect.txt").write_text(f"{ctx.run_id}|{sku}")
    return {"sku": sku, "in_stock": 7}
'''

TEAM = """
description: Checks stock with the shop's own inventory tool and reserves it in the warehouse.
supervisor:
  persona: research_lead
workers:
  - name: clerk
    persona: researcher
    description: Checks and reserves stock.
    tools: [{tools}]
"""


def _project(
    tmp_path: Path,
    tools: str = "shoptools:check_inventory, mcp.warehouse.reserve_stock",
    server: dict[str, Any] | None = None,
) -> Path:
    """A task folder as a user outside the project writes it."""
    (tmp_path / "agents").mkdir(exist_ok=True)
    (tmp_path / "agents" / "shop.yaml").write_text(TEAM.format(tools=tools))
    (tmp_path / "shoptools.py").write_text(TOOLS)
    (tmp_path / "warehouse.py").write_text(SERVER)
    declared = server or {
        "command": "python",
        "args": ["warehouse.py"],
        "env": {"PID_DIR": str(tmp_path / "pids"), "WAREHOUSE_TOKEN": "${WAREHOUSE_TOKEN}"},
    }
    task = {
        "task": "Check stock of the blue widget and reserve two units.",
        "acceptance": ["Says how many blue widgets are in stock."],
        "teams": ["shop"],
        "agents_dir": "agents",
        "mcp_servers": {"warehouse": declared},
        "memory": {"enabled": False},
        "budget": {"max_iterations": 1, "timeout_s": 120},
        "output": "out.md",
    }
    path = tmp_path / "task.yaml"
    path.write_text(json.dumps(task))
    return path


ENV = {"WAREHOUSE_TOKEN": "wh-secret-0123456789abcdef"}


def _summary(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, proc.stdout[-2000:] + proc.stderr[-2000:]
    return dict(json.loads(lines[-1]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def _server_pids(tmp_path: Path) -> list[int]:
    folder = tmp_path / "pids"
    return [int(p.stem) for p in folder.glob("*.pid")] if folder.exists() else []


def _wait_gone(pids: list[int], timeout: float = 20) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def test_a_dry_run_calls_the_python_tool_and_the_mcp_tool_and_traces_both(
    tmp_path: Path,
) -> None:
    task = _project(tmp_path)
    proc = atlas_cli("run", str(task), "--model", "scripted", "--json", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(proc)
    assert summary["status"] == "passed"
    assert summary["tool_calls"] >= 2 and summary["tool_errors"] == 0

    run_id, sku = (tmp_path / "py-side-effect.txt").read_text().split("|", 1)
    assert run_id == summary["run_id"] and sku
    reserved = (tmp_path / "mcp-side-effect.txt").read_text().splitlines()
    assert len(reserved) == 1 and reserved[0].endswith("|wh-")  # its env came through

    import mlflow

    trace = mlflow.MlflowClient(summary["tracking_uri"]).get_trace(summary["trace_id"])
    tools = {s.name: s for s in trace.data.spans if s.span_type == "TOOL"}
    assert {"check_inventory", "reserve_stock"} <= set(tools)
    by_id = {s.span_id: s for s in trace.data.spans}
    for name in ("check_inventory", "reserve_stock"):
        span, parents = tools[name], []
        while span.parent_id:
            span = by_id[span.parent_id]
            parents.append(span.name)
        assert "worker:clerk" in parents, (name, parents)
    assert "reserved" in str(tools["reserve_stock"].outputs)
    assert tools["reserve_stock"].attributes.get("atlas.mcp.server") == "warehouse"
    assert _wait_gone(_server_pids(tmp_path)) == []


def test_arun_calls_both_tools_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAREHOUSE_TOKEN", ENV["WAREHOUSE_TOKEN"])
    spec = atlas.load_task(_project(tmp_path))
    result = asyncio.run(atlas.arun(spec, model="scripted", state_dir_path=tmp_path / "state"))
    assert result.status == "passed", result.error
    assert (tmp_path / "py-side-effect.txt").read_text().startswith(result.run_id)
    assert len((tmp_path / "mcp-side-effect.txt").read_text().splitlines()) == 1
    assert result.tool_calls >= 2 and result.tool_errors == 0
    assert _wait_gone(_server_pids(tmp_path)) == []


@pytest.mark.parametrize(
    ("tools", "server", "code", "words"),
    [
        (
            "shoptools:check_inventroy, mcp.warehouse.reserve_stock",
            None,
            2,
            "did you mean 'check_inventory'",
        ),
        ("stocktools:check_inventory", None, 2, "cannot import module 'stocktools'"),
        ("check_inventroy", None, 2, "unknown tool 'check_inventroy'"),
        ("mcp.warehouse.reserve_stok", None, 2, "did you mean 'reserve_stock'"),
        ("mcp.warehose.reserve_stock", None, 2, "did you mean 'warehouse'"),
        (
            "mcp.warehouse.reserve_stock",
            {"command": "no-such-mcp-server-command"},
            3,
            "'warehouse'",
        ),
    ],
    ids=[
        "misspelled-function",
        "missing-module",
        "unknown-name",
        "unknown-mcp-tool",
        "unknown-server",
        "missing-command",
    ],
)
def test_mistakes_stop_the_run_before_any_model_call(
    tmp_path: Path, tools: str, server: dict[str, Any] | None, code: int, words: str
) -> None:
    task = _project(tmp_path, tools=tools, server=server)
    log = tmp_path / "calls.jsonl"
    proc = atlas_cli("run", str(task), "--model", f"scripted?call_log={log}", cwd=tmp_path, env=ENV)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr[-2000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert words in lines[0]
    assert not log.exists(), "a model call was made"
    assert _wait_gone(_server_pids(tmp_path)) == []


def test_validate_resolves_tools_and_connect_lists_the_servers_tools(tmp_path: Path) -> None:
    task = _project(tmp_path)
    ok = atlas_cli("validate", str(task), cwd=tmp_path, env=ENV)
    assert ok.returncode == 0 and "2 tools" in ok.stdout, ok.stderr
    assert _server_pids(tmp_path) == []  # plain validate starts nothing

    connected = atlas_cli("validate", str(task), "--connect", cwd=tmp_path, env=ENV)
    assert connected.returncode == 0, connected.stderr
    assert "mcp server warehouse: 2 tools (reserve_stock, explode)" in connected.stdout
    assert _wait_gone(_server_pids(tmp_path)) == []

    bad = _project(tmp_path, server={"command": "no-such-mcp-server-command"})
    failed = atlas_cli("validate", str(bad), "--connect", cwd=tmp_path, env=ENV)
    assert failed.returncode == 3 and "warehouse" in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1


def test_atlas_tools_lists_each_workers_tools_with_schemas(tmp_path: Path) -> None:
    task = _project(tmp_path)
    proc = atlas_cli("tools", str(task), "--json", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr
    (row,) = json.loads(proc.stdout)
    assert (row["team"], row["worker"]) == ("shop", "clerk")
    by_name = {t["name"]: t for t in row["tools"]}
    inventory = by_name["check_inventory"]
    assert inventory["kind"] == "python"
    assert inventory["parameters"]["properties"]["sku"]["description"] == (
        "The product code or name."
    )
    assert "ctx" not in inventory["parameters"]["properties"]
    reserve = by_name["reserve_stock"]
    assert reserve["kind"] == "mcp" and reserve["server"] == "warehouse"
    assert reserve["parameters"]["required"] == ["sku"]

    text = atlas_cli("tools", str(task), cwd=tmp_path, env=ENV)
    assert "check_inventory(sku: string)" in text.stdout
    assert "reserve_stock(sku: string, quantity?: integer)" in text.stdout


def test_a_failing_mcp_tool_goes_back_to_the_model_and_is_counted(tmp_path: Path) -> None:
    task = _project(tmp_path, tools="mcp.warehouse.explode")
    proc = atlas_cli("run", str(task), "--model", "scripted", "--json", cwd=tmp_path, env=ENV)
    summary = _summary(proc)
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    assert summary["tool_calls"] == 1 and summary["tool_errors"] == 1

    import mlflow

    trace = mlflow.MlflowClient(summary["tracking_uri"]).get_trace(summary["trace_id"])
    (span,) = [s for s in trace.data.spans if s.name == "explode"]
    assert span.status.status_code == "ERROR"
    assert "warehouse is on fire" in json.dumps([e.attributes for e in span.events])


def _start(tmp_path: Path, task: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    env.update(ENV)
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "atlas",
            "run",
            str(task),
            "--model",
            "scripted?latency_ms=400",
            "--quiet",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_server(tmp_path: Path, proc: subprocess.Popen[str]) -> list[int]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not _server_pids(tmp_path):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    pids = _server_pids(tmp_path)
    assert pids and all(_alive(p) for p in pids)
    return pids


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_no_mcp_server_outlives_its_run(tmp_path: Path, how: signal.Signals) -> None:
    proc = _start(tmp_path, _project(tmp_path))
    pids = _wait_for_server(tmp_path, proc)
    time.sleep(0.5)
    proc.send_signal(how)
    proc.communicate(timeout=60)
    assert _wait_gone(pids) == [], "an MCP server outlived its run"


def test_secrets_in_mcp_env_and_headers_stay_out_of_records_traces_and_logs(
    tmp_path: Path,
) -> None:
    """A literal token in `env` and one expanded from `${VAR}` into `env`: neither is in the run
    record, the trace store, the run's files or the console."""
    literal = "lit-secret-9876543210fedcba"
    server = {
        "command": "python",
        "args": ["warehouse.py"],
        "env": {
            "PID_DIR": str(tmp_path / "pids"),
            "WAREHOUSE_TOKEN": "${WAREHOUSE_TOKEN}",
            "LICENSE_TOKEN": literal,
        },
    }
    task = _project(tmp_path, server=server)
    proc = atlas_cli("run", str(task), "--model", "scripted", "--json", cwd=tmp_path, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    leaks = []
    for path in (tmp_path / ".atlas").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in (literal, ENV["WAREHOUSE_TOKEN"]):
                if secret.encode() in data:
                    leaks.append(f"{path}: {secret}")
    assert leaks == []
    assert literal not in proc.stdout + proc.stderr
    assert ENV["WAREHOUSE_TOKEN"] not in proc.stdout + proc.stderr


def test_the_own_tools_example_runs_as_a_dry_run(tmp_path: Path) -> None:
    """`run.py` starts the stock API itself; ATLAS starts and stops the MCP server."""
    example = tmp_path / "own-tools"
    shutil.copytree(
        ROOT / "examples" / "own-tools", example, ignore=shutil.ignore_patterns("output", ".atlas")
    )
    proc = subprocess.run(
        [sys.executable, str(example / "run.py"), "--model", "scripted", "--json"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = _summary(proc)
    assert summary["tool_calls"] >= 2 and summary["tool_errors"] == 0
    text = Path(summary["output"]).read_text().lower()
    assert "on_hand" in text and "lead_days" in text  # both tools' answers reached the output
    lookups = list((tmp_path / ".atlas" / "runs").glob("*/workspace/stock-lookups.jsonl"))
    assert len(lookups) == 1


HTTP_SERVER = ROOT / "tests" / "fixtures" / "mcp_servers" / "http_server.py"


def test_a_token_in_mcp_headers_reaches_the_server_and_nowhere_else(tmp_path: Path) -> None:
    """A streamable-HTTP server that requires `Authorization: Bearer <token>`: the token comes
    from `${CRM_TOKEN}`, a second one is written in the task file itself. The call gets through;
    neither token is in the run record, the trace store, the run's files or the console."""
    from tests.conftest import free_port

    token, literal = "crm-secret-5555666677778888", "hdr-literal-1111222233334444"
    port = free_port()
    record = tmp_path / "crm-record.txt"
    env = {**os.environ, "ATLAS_MCP_FIXTURE_TOKEN": token, "ATLAS_MCP_FIXTURE_RECORD": str(record)}
    server = subprocess.Popen(
        [sys.executable, str(HTTP_SERVER), str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            import socket

            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        declared = {
            "url": f"http://127.0.0.1:{port}/mcp",
            "headers": {"Authorization": "Bearer ${CRM_TOKEN}", "X-Licence": literal},
        }
        task = _project(tmp_path, tools="mcp.crm.record", server=declared)
        text = json.loads(task.read_text())
        text["mcp_servers"] = {"crm": declared}
        task.write_text(json.dumps(text))
        proc = atlas_cli(
            "run",
            str(task),
            "--model",
            "scripted",
            "--json",
            cwd=tmp_path,
            env={"CRM_TOKEN": token},
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert _summary(proc)["tool_errors"] == 0
        assert record.read_text().strip(), "the call did not reach the server"
        leaks = [
            f"{path}: {secret[:4]}"
            for path in (tmp_path / ".atlas").rglob("*")
            if path.is_file()
            for secret in (token, literal)
            if secret.encode() in path.read_bytes()
        ]
        assert leaks == []
        assert token not in proc.stdout + proc.stderr and literal not in proc.stdout + proc.stderr
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_a_tool_registered_in_code_and_a_server_declared_in_the_team_file(
    tmp_path: Path,
) -> None:
    """The embedding way: `atlas.register_tool` names a tool any team file may list, and a team
    file may bring its own MCP server (its relative paths resolve beside the team file)."""
    calls: list[str] = []

    @atlas.register_tool(name="note_down")
    async def note(text: str) -> str:
        """Write a note down.

        Args:
            text: What to note.
        """
        calls.append(text)
        return "noted"

    try:
        task = _project(tmp_path, tools="note_down, mcp.depot.reserve_stock")
        team = tmp_path / "agents" / "shop.yaml"
        (tmp_path / "agents" / "depot.py").write_text(SERVER)
        team.write_text(
            team.read_text()
            + "mcp_servers:\n  depot:\n    command: python\n    args: [depot.py]\n"
            + f"    env: {{PID_DIR: {tmp_path / 'pids'}}}\n"
        )
        data = json.loads(task.read_text())
        del data["mcp_servers"]
        task.write_text(json.dumps(data))
        result = atlas.run(
            atlas.load_task(task), model="scripted", state_dir_path=tmp_path / "state"
        )
        assert result.status == "passed", result.error
        assert len(calls) == 1 and result.tool_errors == 0
        assert (tmp_path / "agents" / "mcp-side-effect.txt").read_text().count("\n") == 1
    finally:
        atlas.unregister_tool("note_down")
    assert _wait_gone(_server_pids(tmp_path)) == []


def test_a_whole_server_by_star_and_the_builtin_listing(tmp_path: Path) -> None:
    """`mcp.<server>.*` gives the worker every tool the server offers; the dry run calls each
    once (one of them fails, and is counted). `atlas tools` alone lists the built-in tools."""
    task = _project(tmp_path, tools="mcp.warehouse.*")
    listed = atlas_cli("tools", str(task), "--json", cwd=tmp_path, env=ENV)
    (row,) = json.loads(listed.stdout)
    assert [t["name"] for t in row["tools"]] == ["reserve_stock", "explode"]
    proc = atlas_cli("run", str(task), "--model", "scripted", "--json", cwd=tmp_path, env=ENV)
    summary = _summary(proc)
    assert summary["tool_calls"] == 2 and summary["tool_errors"] == 1

    builtin = atlas_cli("tools", cwd=tmp_path)
    assert builtin.returncode == 0
    assert "search_documents" in builtin.stdout and "query_data" in builtin.stdout
