"""A Python tool for ATLAS: reads stock levels from the cafés' stock API over HTTP.

The worker in agents/stock.yaml lists it as `inventory:check_stock`; ATLAS finds this module
beside the task file. `run.py` starts the API and sets STOCK_API_URL.
"""

from __future__ import annotations

import json
import os
import urllib.parse
import urllib.request

from atlas import ToolContext


def check_stock(item: str, ctx: ToolContext) -> dict[str, object]:
    """Look up how much of an item the cafés have on hand.

    Args:
        item: The item to look up, in plain words (for example "oat milk"); several items may
            be named at once.
    """
    base = os.environ.get("STOCK_API_URL", "http://127.0.0.1:8765")
    url = f"{base}/stock?q={urllib.parse.quote(item)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        found = json.load(response)
    ctx.logger.info("stock lookup for %r: %d items", item, len(found["items"]))
    # Keep what this run looked up beside its other files (runs/<id>/workspace/).
    ctx.workspace.mkdir(parents=True, exist_ok=True)
    with open(ctx.workspace / "stock-lookups.jsonl", "a", encoding="utf-8") as log:
        log.write(json.dumps({"item": item, "found": found["items"]}) + "\n")
    return found
