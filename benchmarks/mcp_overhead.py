"""What calling a tool through MCP costs: one function called (a) as a plain LangChain
`StructuredTool` and (b) as an MCP tool over stdio through `McpHub` (the sync path a LangGraph
worker thread takes: hub loop thread, JSON-RPC over pipes, a FastMCP server in a child process).

Both are timed in the same run, in interleaved batches (these machines are shared and noisy);
each figure is the median over batches of milliseconds per call. The server's start-up is
timed apart (`connect_ms`): a run pays it once per server, not per call.

`python -m benchmarks.mcp_overhead [CALLS]` prints the figures as JSON.
"""

from __future__ import annotations

import inspect
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BATCHES = 10


def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


def _server_source() -> str:
    """A FastMCP server exposing `add`, with the very source of the function above."""
    return "\n".join(
        [
            "from mcp.server.fastmcp import FastMCP",
            "",
            'mcp = FastMCP("bench", log_level="WARNING")',
            "",
            "",
            inspect.getsource(add),
            "mcp.tool()(add)",
            'mcp.run("stdio")',
            "",
        ]
    )


def _per_call_ms(call: Callable[[], Any], n: int) -> float:
    started = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - started) * 1000 / n


def measure(calls: int = 300) -> dict[str, float]:
    """Milliseconds per call for the plain tool and the MCP tool, their ratio, and the MCP
    server's connect time."""
    from langchain_core.tools import StructuredTool

    from atlas.tools.mcp import McpHub, McpServer

    plain = StructuredTool.from_function(add)
    args = {"a": 2, "b": 3}
    per_batch = max(1, calls // BATCHES)
    with tempfile.TemporaryDirectory(prefix="atlas-mcp-bench-") as tmp:
        script = Path(tmp) / "server.py"
        script.write_text(_server_source())
        server = McpServer(command="python", args=[str(script)])
        hub = McpHub({"bench": server}, base_dir=Path(tmp))
        try:
            started = time.perf_counter()
            hub.connect()
            connect_ms = (time.perf_counter() - started) * 1000
            remote = hub.tool("bench", "add")
            assert plain.invoke(args) == 5 and remote.invoke(args) == "5"
            for _ in range(20):  # warm both paths up
                plain.invoke(args)
                remote.invoke(args)
            plain_ms: list[float] = []
            mcp_ms: list[float] = []
            for _ in range(BATCHES):
                plain_ms.append(_per_call_ms(lambda: plain.invoke(args), per_batch))
                mcp_ms.append(_per_call_ms(lambda: remote.invoke(args), per_batch))
        finally:
            hub.close()
    plain_median, mcp_median = statistics.median(plain_ms), statistics.median(mcp_ms)
    return {
        "calls": float(per_batch * BATCHES),
        "plain_tool_ms": round(plain_median, 4),
        "mcp_stdio_ms": round(mcp_median, 4),
        "ratio": round(mcp_median / plain_median, 1),
        "connect_ms": round(connect_ms, 1),
    }


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 300), indent=2))
