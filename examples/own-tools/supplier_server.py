"""The supplier's MCP server (stdio), written with the official `mcp` SDK.

ATLAS starts it when a run begins (see `mcp_servers:` in task.yaml) and stops it when the run
ends; the worker lists its tool as `mcp.supplier.lead_time`.
"""

from __future__ import annotations

import os

from mcp.server.fastmcp import FastMCP

LEAD_DAYS = {"espresso beans": 4, "oat milk": 2, "paper cups": 9, "croissants": 1}

server = FastMCP("supplier")


@server.tool()
def lead_time(item: str) -> dict[str, object]:
    """Days the supplier needs to deliver an item, for each known item named in `item`."""
    wanted = item.lower()
    found = {name: days for name, days in LEAD_DAYS.items() if name in wanted}
    if not found:
        found = dict(LEAD_DAYS)
    region = os.environ.get("SUPPLIER_REGION", "default")
    return {"region": region, "lead_days": found}


if __name__ == "__main__":
    server.run()
