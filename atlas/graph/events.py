"""Sending progress events from inside the graph, through LangGraph's `custom` stream mode.

The runner forwards them to `on_event`, `atlas.astream()` and `atlas.iter_events()` on the
caller's thread or event loop, whichever thread a step runs in. What each event holds is in
`atlas.events`.
"""

from __future__ import annotations

import time
from typing import Any

from langgraph.config import get_stream_writer


def emit(event: dict[str, Any]) -> None:
    """Send a progress event to whoever streams this run (nobody, when invoked plainly).

    `event["event"]` is its kind; the event also gets it as `type`, and a timestamp."""
    try:
        writer = get_stream_writer()
    except RuntimeError:  # called outside a graph run
        return
    writer({"ts": round(time.time(), 3), **event, "type": event["event"]})
