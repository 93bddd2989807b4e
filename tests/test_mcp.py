"""MCP client layer (`atlas/tools/mcp.py`) against real servers written with the official SDK
(`tests/fixtures/mcp_servers/`): stdio children and a streamable HTTP server on 127.0.0.1.

Each test checks what a user would notice: tool calls answer on the sync and async paths, one
server process serves a whole run, failures are one clear line and never hang, secrets stay out
of messages and logs, and no server outlives the run, even when ATLAS is killed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ValidationError

from atlas.errors import SpecError, ToolError
from atlas.tools.mcp import McpConnectError, McpHub, McpServer, expand_env
from tests.conftest import free_port

SERVERS = Path(__file__).resolve().parent / "fixtures" / "mcp_servers"
STDIO = SERVERS / "stdio_server.py"
HTTP = SERVERS / "http_server.py"
PAGED = SERVERS / "paged_server.py"
HTTP_TOKEN = "tok-http-5f1c2a9e77"
DIED = r"^mcp server 'local' is not running \(exited with code 3\)$"


def stdio(*flags: str, **fields: Any) -> McpServer:
    return McpServer(command="python", args=[str(STDIO), *flags], **fields)


def wait_until(check: Callable[[], bool], timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def gone(pid: int) -> bool:
    """No such process, or only a zombie left for init to reap."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def children_running(script: Path) -> list[int]:
    """Live processes that this test process started with `script` on their command line."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == os.getpid() and str(script).encode() in cmdline and not gone(int(entry.name)):
            found.append(int(entry.name))
    return found


@pytest.fixture
def make_hub(tmp_path: Path) -> Iterator[Callable[..., McpHub]]:
    hubs: list[McpHub] = []

    def make(servers: dict[str, McpServer] | None = None, **servers_kw: McpServer) -> McpHub:
        hub = McpHub(servers or servers_kw, base_dir=tmp_path, log_dir=tmp_path / "logs")
        hubs.append(hub)
        return hub

    yield make
    for hub in hubs:
        hub.close()


@pytest.fixture
def hub(make_hub: Callable[..., McpHub]) -> McpHub:
    hub = make_hub(local=stdio(timeout_s=2))
    hub.connect()
    return hub


@pytest.fixture(scope="module")
def http_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The HTTP fixture server, requiring `Authorization: Bearer HTTP_TOKEN`, on a free port."""
    port = free_port()
    log = tmp_path_factory.mktemp("http") / "server.log"
    env = {**os.environ, "ATLAS_MCP_FIXTURE_TOKEN": HTTP_TOKEN}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(HTTP), str(port)], env=env, stdout=out, stderr=out
        )

    def ready() -> bool:
        if proc.poll() is not None:
            return True
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    try:
        assert wait_until(ready, 60) and proc.poll() is None, log.read_text()
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ToolEvents(BaseCallbackHandler):
    """What MLflow's autolog sees: one start and one end per tool call."""

    def __init__(self) -> None:
        self.events: list[str] = []

    def on_tool_start(self, serialized: dict[str, Any], input_str: str, **kw: Any) -> None:
        self.events.append(f"start {serialized.get('name')}")

    def on_tool_end(self, output: Any, **kw: Any) -> None:
        self.events.append("end")


# -- calls ----------------------------------------------------------------------------------


def test_stdio_tools_answer_on_the_sync_and_async_paths(hub: McpHub) -> None:
    echo, add = hub.tool("local", "echo"), hub.tool("local", "add")
    events = ToolEvents()
    assert echo.invoke({"text": "hello"}, config={"callbacks": [events]}) == "hello"
    assert events.events == ["start echo", "end"]

    async def main() -> list[Any]:
        return list(
            await asyncio.gather(add.ainvoke({"a": 2, "b": 3}), echo.ainvoke({"text": "x"}))
        )

    assert asyncio.run(main()) == ["5", "x"]
    assert hub.tool("local", "picture").invoke({}) == "[image: image/png]"
    assert echo.metadata == {
        "atlas.mcp.server": "local",
        "atlas.mcp.tool": "echo",
        "atlas.tool.kind": "mcp",
        "atlas.mcp.destructive": False,
        "atlas.mcp.read_only": True,
        "atlas.tool.side_effects": False,  # what approval reads: only a declared destructiveHint
    }


def test_http_tools_answer_with_the_declared_headers(make_hub: Any, http_url: str) -> None:
    server = McpServer(type="http", url=http_url, headers={"Authorization": f"Bearer {HTTP_TOKEN}"})
    hub = make_hub(remote=server)
    hub.connect()
    assert hub.tool("remote", "echo").invoke({"text": "over http"}) == "over http"
    assert asyncio.run(hub.tool("remote", "add").ainvoke({"a": 20, "b": 22})) == "42"
    with pytest.raises(ToolError, match=r"^mcp remote\.fail: .*no such table$"):
        hub.tool("remote", "fail").invoke({"message": "no such table"})


def test_parallel_workers_share_one_server_process(hub: McpHub) -> None:
    pid_tool = hub.tool("local", "pid")

    def sync_calls(_: int) -> list[str]:
        return [pid_tool.invoke({}) for _ in range(10)]

    async def async_calls() -> list[str]:
        return list(await asyncio.gather(*(pid_tool.ainvoke({}) for _ in range(20))))

    with ThreadPoolExecutor(8) as pool:
        threaded = pool.map(sync_calls, range(8))
        from_loop = pool.submit(asyncio.run, async_calls())
        pids = {p for batch in threaded for p in batch} | set(from_loop.result())
    assert len(pids) == 1
    assert len(children_running(STDIO)) == 1


def test_relative_cwd_and_command_resolve_against_the_task_folder(
    make_hub: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "servers"
    folder.mkdir()
    script = folder / "run.sh"
    script.write_text(f'#!/bin/sh\nexec "$FIXTURE_PYTHON" "{STDIO}"\n')
    script.chmod(0o755)
    server = McpServer(command="./run.sh", cwd="servers", env={"FIXTURE_PYTHON": sys.executable})
    hub = make_hub(local=server)
    hub.connect()
    assert hub.tool("local", "echo").invoke({"text": "found"}) == "found"


def test_side_effect_happens_once_per_call(make_hub: Any, tmp_path: Path) -> None:
    record = tmp_path / "record.txt"
    hub = make_hub(local=stdio(env={"ATLAS_MCP_FIXTURE_RECORD": str(record)}))
    hub.connect()
    tool = hub.tool("local", "record")
    assert tool.invoke({"entry": "first"}) == "recorded"
    assert asyncio.run(tool.ainvoke({"entry": "second"})) == "recorded"
    assert record.read_text().splitlines() == ["first", "second"]


# -- schemas --------------------------------------------------------------------------------


def test_model_sees_the_real_schema_with_defs_inlined_and_optional_fields(hub: McpHub) -> None:
    tool = hub.tool("local", "create_item")
    params = convert_to_openai_tool(tool)["function"]["parameters"]
    assert params["required"] == ["item"]
    assert set(params["properties"]) == {"item", "note", "priority"}
    item = params["properties"]["item"]
    assert item["type"] == "object" and item["required"] == ["name"]
    assert item["additionalProperties"] is False
    assert item["properties"]["name"] == {
        "type": "string",
        "description": "What the item is called",
    }
    size = item["properties"]["size"]["anyOf"]
    assert {"type": "null"} in size and size[0]["required"] == ["width", "height"]
    assert params["properties"]["note"]["anyOf"] == [{"type": "string"}, {"type": "null"}]
    assert params["properties"]["priority"] == {"type": "integer", "default": 3}
    info = next(t for t in hub.list_tools("local") if t.name == "create_item")
    assert "$defs" not in info.input_schema and tool.args_schema == info.input_schema

    # Models send null for optional fields: null reaches the server only where it is allowed.
    answer = json.loads(tool.invoke({"item": {"name": "bolt"}, "note": None, "priority": None}))
    assert answer == {
        "item": {"name": "bolt", "quantity": 1, "size": None},
        "note": None,
        "priority": 3,
    }


def test_paginated_tools_recursive_schema_and_result_kinds(make_hub: Any) -> None:
    hub = make_hub(paged=McpServer(command="python", args=[str(PAGED)]))
    hub.connect()
    names = [t.name for t in hub.list_tools("paged")]
    assert names == [*(f"page_tool_{i}" for i in range(4)), "tree", "structured", "document"]
    tree = next(t for t in hub.list_tools("paged") if t.name == "tree").input_schema
    root = tree["properties"]["root"]
    assert root["properties"]["children"]["items"] == {"$ref": "#/$defs/Node"}
    assert "Node" in tree["$defs"] and tree["additionalProperties"] is False
    assert json.loads(hub.tool("paged", "structured").invoke({})) == {"total": 3, "unit": "apples"}
    assert hub.tool("paged", "document").invoke({}) == "the notes say hello"
    assert hub.tool("paged", "structured").description == "MCP tool structured on server paged"


def test_tool_names_annotations_and_unknown_tools(hub: McpHub) -> None:
    assert hub.tool("local", "echo", exposed_name="local.echo/v2").name == "local_echo_v2"
    infos = {t.name: t for t in hub.list_tools("local")}
    assert infos["delete_everything"].destructive and not infos["delete_everything"].read_only
    assert infos["echo"].read_only and not infos["echo"].destructive
    assert infos["add"].destructive  # MCP's default for a tool that says nothing
    with pytest.raises(SpecError, match=r"has no tool 'ech'; did you mean 'echo'\?.*offers: echo"):
        hub.tool("local", "ech")
    with pytest.raises(SpecError, match="unknown mcp server 'nope'"):
        hub.tool("nope", "echo")


# -- failures -------------------------------------------------------------------------------


def test_timed_out_call_then_the_session_still_works(hub: McpHub) -> None:
    sleep = hub.tool("local", "sleep")
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"^mcp local\.sleep: timed out after 2 s$"):
        sleep.invoke({"seconds": 60})
    assert time.monotonic() - started < 20

    async def late() -> str:
        return str(await sleep.ainvoke({"seconds": 60}))

    with pytest.raises(ToolError, match="timed out after 2 s"):
        asyncio.run(late())
    assert hub.tool("local", "echo").invoke({"text": "still here"}) == "still here"


def test_cancelling_an_async_caller_cancels_the_call(hub: McpHub) -> None:
    sleep = hub.tool("local", "sleep")

    async def main() -> None:
        task = asyncio.ensure_future(sleep.ainvoke({"seconds": 60}))
        await asyncio.sleep(0.5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    started = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - started < 10
    assert hub.tool("local", "echo").invoke({"text": "ok"}) == "ok"


def test_raising_tool_is_a_one_line_tool_error(hub: McpHub) -> None:
    with pytest.raises(ToolError) as info:
        hub.tool("local", "fail").invoke({"message": "disk is full\nsecond line"})
    assert str(info.value).startswith("mcp local.fail: ")
    assert "disk is full second line" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ToolError) as info:
        hub.tool("local", "fail").invoke({"message": "x" * 5000})
    assert len(str(info.value)) <= 500


def test_server_dying_mid_run_fails_fast_and_is_restarted_once(hub: McpHub) -> None:
    pid, die = hub.tool("local", "pid"), hub.tool("local", "die")
    first = pid.invoke({})
    started = time.monotonic()
    with pytest.raises(ToolError, match=DIED):
        die.invoke({})
    assert time.monotonic() - started < 10
    assert wait_until(lambda: gone(int(first)))

    second = pid.invoke({})  # the next call starts it again
    assert second != first
    with pytest.raises(ToolError, match="exited with code 3"):
        asyncio.run(die.ainvoke({"code": 3}))
    started = time.monotonic()
    with pytest.raises(ToolError, match=DIED):
        pid.invoke({})  # no second restart
    assert time.monotonic() - started < 10
    assert children_running(STDIO) == []


@pytest.mark.parametrize(
    ("server", "expected"),
    [
        (McpServer(command="no-such-mcp-server-xyz"), "command 'no-such-mcp-server-xyz' not found"),
        (McpServer(command="./bin/server.sh"), "command './bin/server.sh' not found"),
        (McpServer(url="http://127.0.0.1:9/mcp", connect_timeout_s=5), "cannot reach http://"),
        (stdio("--fail-at-start"), "exited with code 3 before it was ready: fatal: the token"),
        (stdio("--hang", connect_timeout_s=1), "did not start within 1 s"),
    ],
    ids=["not-on-path", "no-such-file", "refused", "exits-at-start", "hangs"],
)
def test_server_that_cannot_start_is_one_line_naming_it(
    make_hub: Any, server: McpServer, expected: str
) -> None:
    hub = make_hub(broken=server)
    started = time.monotonic()
    with pytest.raises(McpConnectError) as info:
        hub.connect()
    assert time.monotonic() - started < server.connect_timeout_s + 10
    message = str(info.value)
    assert message.startswith("mcp server 'broken': ") and expected in message
    assert "\n" not in message and info.value.exit_code == 3
    hub.close()
    assert children_running(STDIO) == []


def test_http_refusals_name_the_status(make_hub: Any, http_url: str) -> None:
    hub = make_hub(remote=McpServer(url=http_url, headers={"Authorization": "Bearer wrong-token"}))
    with pytest.raises(McpConnectError, match=r"^mcp server 'remote': HTTP 401 Unauthorized from"):
        hub.connect()
    wrong_path = http_url.replace("/mcp", "/api")
    hub = make_hub(
        remote=McpServer(url=wrong_path, headers={"Authorization": f"Bearer {HTTP_TOKEN}"})
    )
    with pytest.raises(
        McpConnectError, match=r"^mcp server 'remote': HTTP 404 Not Found from .*/api"
    ):
        hub.connect()


def test_connect_names_the_first_failing_server_and_keeps_the_good_ones(make_hub: Any) -> None:
    hub = make_hub(good=stdio(), bad=McpServer(command="no-such-mcp-server-xyz"))
    with pytest.raises(McpConnectError, match=r"^mcp server 'bad': "):
        hub.connect()
    assert hub.tool("good", "echo").invoke({"text": "fine"}) == "fine"


# -- environment and secrets ------------------------------------------------------------------


def test_server_sees_only_the_allowlist_and_its_declared_env(
    make_hub: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ATLAS_TEST_SECRET_TOKEN", "sk-should-not-leak-123456")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-also-not-this-one-98765")
    hub = make_hub(local=stdio(env={"DECLARED_VAR": "yes"}))
    hub.connect()
    has_env = hub.tool("local", "has_env")
    seen = {name: has_env.invoke({"name": name}) for name in ("ATLAS_TEST_SECRET_TOKEN",
            "OPENAI_API_KEY", "VIRTUAL_ENV", "DECLARED_VAR", "PATH")}  # fmt: skip
    assert seen == {
        "ATLAS_TEST_SECRET_TOKEN": "unset",
        "OPENAI_API_KEY": "unset",
        "VIRTUAL_ENV": "unset",
        "DECLARED_VAR": "set",
        "PATH": "set",
    }


def test_tokens_never_appear_in_messages_or_logs(
    make_hub: Any, tmp_path: Path, http_url: str
) -> None:
    env_token, header_token = "tok-env-7d3b9c11aa", "tok-header-41e0f2bb"
    port = http_url.split(":")[2].split("/")[0]
    servers = {
        "env": stdio("--fail-at-start", env={"ATLAS_MCP_FIXTURE_TOKEN": env_token}),
        "header": McpServer(url=http_url, headers={"Authorization": f"Bearer {header_token}"}),
        "userinfo": McpServer(
            url=f"http://bob:pw-{header_token}@127.0.0.1:{port}/nope?token=q-{env_token}",
            headers={"X-Api-Key": header_token},
        ),
    }
    messages = []
    for name, server in servers.items():
        hub = make_hub({name: server})
        assert env_token in hub.secrets or header_token in hub.secrets
        with pytest.raises(McpConnectError) as info:
            hub.connect()
        messages.append(str(info.value))
        hub.close()
    assert "fatal: the token [REDACTED] was refused" in messages[0]
    assert f"http://127.0.0.1:{port}/nope" in messages[2]
    logs = "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
    assert "[REDACTED]" in logs
    for text in [*messages, logs]:
        assert env_token not in text and header_token not in text and "bob" not in text


def test_expand_env_only_in_env_and_headers() -> None:
    server = McpServer(url="https://mcp.example/mcp", headers={"Authorization": "Bearer ${TOK}"})
    expanded = expand_env("gh", server, {"TOK": "abc123def"})
    assert expanded.headers == {"Authorization": "Bearer abc123def"}
    assert server.headers == {"Authorization": "Bearer ${TOK}"}
    local = stdio(env={"LEVEL": "${LEVEL:-info}", "HOME_DIR": "${HOME}"})
    assert expand_env("x", local, {"HOME": "/home/u"}).env == {
        "LEVEL": "info",
        "HOME_DIR": "/home/u",
    }
    with pytest.raises(SpecError) as info:
        expand_env("gh", server, {})
    assert str(info.value) == (
        "mcp_servers.gh.headers.Authorization: mcp server 'gh': environment variable TOK is not set"
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"command": "srv", "args": ["--token", "${TOK}"]}, "expanded only in env and headers"),
        ({"type": "sse", "url": "http://127.0.0.1/sse"}, "'sse'.*not supported.*streamable HTTP"),
        ({"command": "srv", "url": "http://127.0.0.1/mcp"}, "exactly one of command"),
        ({}, "exactly one of command"),
        ({"type": "stdio", "url": "http://127.0.0.1/mcp"}, "stdio needs a command"),
        ({"url": "ftp://127.0.0.1/mcp"}, "http:// or https://"),
        ({"command": "srv", "headers": {"A": "b"}}, "headers are for a url server"),
        ({"command": "srv", "timeout_s": 0}, "greater than 0"),
        ({"command": "srv", "autoApprove": []}, "Extra inputs are not permitted"),
    ],
)
def test_server_declarations_are_checked(fields: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        McpServer.model_validate(fields)


def test_loading_declarations_does_not_import_the_sdk() -> None:
    """Every task file's loading imports `McpServer`; the SDK costs most of a second."""
    code = "import sys, atlas.tools.mcp; print(sorted({'mcp', 'httpx'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_transport_follows_the_declaration() -> None:
    assert McpServer(command="srv").transport == "stdio"
    assert McpServer(type="streamable-http", url="https://h/mcp").transport == "http"


# -- lifetime -------------------------------------------------------------------------------


def test_connect_and_close_are_idempotent_and_close_stops_every_child(make_hub: Any) -> None:
    hub = make_hub(a=stdio(), b=stdio())
    hub.connect()
    pids = {hub.tool(n, "pid").invoke({}) for n in ("a", "b")}
    hub.connect()
    hub.connect(["a"])
    assert {hub.tool(n, "pid").invoke({}) for n in ("a", "b")} == pids
    assert len(children_running(STDIO)) == 2

    helper = int(hub.tool("a", "spawn_helper").invoke({}))  # a server's own child
    closer = threading.Thread(target=hub.close)
    closer.start()
    closer.join(30)
    hub.close()
    assert all(gone(int(p)) for p in pids) and children_running(STDIO) == []
    try:
        assert wait_until(lambda: gone(helper), 10), "the server's own child outlived the run"
    finally:
        if not gone(helper):
            os.kill(helper, signal.SIGKILL)
    with pytest.raises(ToolError, match="closed"):
        hub.tool("a", "echo").invoke({"text": "late"})


def test_close_stops_a_server_busy_in_a_call(make_hub: Any) -> None:
    hub = make_hub(local=stdio())
    hub.connect()
    server_pid = int(hub.tool("local", "pid").invoke({}))
    errors: list[Exception] = []

    def busy() -> None:
        try:
            hub.tool("local", "block").invoke({"seconds": 600})
        except ToolError as exc:
            errors.append(exc)

    caller = threading.Thread(target=busy)
    caller.start()
    time.sleep(1)
    started = time.monotonic()
    hub.close()
    caller.join(30)
    assert time.monotonic() - started < 20 and not caller.is_alive()
    assert [str(e) for e in errors] == ["mcp server 'local' is closed (the run is over)"]
    assert gone(server_pid)


def test_close_after_a_failed_connect_leaves_nothing(make_hub: Any) -> None:
    hub = make_hub(slow=stdio("--hang", connect_timeout_s=1), ok=stdio())
    with pytest.raises(McpConnectError, match="'slow'"):
        hub.connect()
    hub.close()
    hub.close()
    assert wait_until(lambda: children_running(STDIO) == [], 10)


def test_servers_die_with_a_sigkilled_parent(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from pathlib import Path
            from atlas.tools.mcp import McpHub, McpServer

            hub = McpHub(
                {"local": McpServer(command="python", args=[sys.argv[1]])}, base_dir=Path.cwd()
            )
            hub.connect()
            print(hub.tool("local", "pid").invoke({}), flush=True)
            hub.tool("local", "block").invoke({"seconds": 600})
            """
        )
    )
    parent = subprocess.Popen(
        [sys.executable, str(script), str(STDIO)], stdout=subprocess.PIPE, text=True
    )
    server_pid = 0
    try:
        assert parent.stdout is not None
        server_pid = int(parent.stdout.readline())
        time.sleep(1)  # the server is now inside `block`: closing its stdin would not stop it
        assert not gone(server_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert wait_until(lambda: gone(server_pid), 30), "the server outlived its parent"
    finally:
        parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
        if server_pid and not gone(server_pid):
            os.kill(server_pid, signal.SIGKILL)
