"""Progress events, streamed through LangGraph's `custom` stream mode.

`atlas.run(..., on_event=...)`, `atlas.stream()` and the CLI's live view consume them. Every event
is a small dict with an `event` key: plan, dispatch, step_start, handoff, step_done, verdict,
budget_stop, finalize.
"""

from __future__ import annotations

import time
from typing import Any

from langgraph.config import get_stream_writer


def emit(event: dict[str, Any]) -> None:
    """Send a progress event to whoever streams this run (nobody, when invoked plainly)."""
    try:
        writer = get_stream_writer()
    except RuntimeError:  # called outside a graph run
        return
    writer({"ts": round(time.time(), 3), **event})
