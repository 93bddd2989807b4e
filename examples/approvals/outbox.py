"""A tool with a side effect: it sends an email (here, it appends it to an outbox file).

`side_effects=True` tells ATLAS that a call changes something outside the run, so each call
waits for a person's approval unless the task's `approval.tools` says `never`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from atlas import ToolContext, tool

SUPPLIER = "orders@beans-and-oats.example"


@tool(side_effects=True)
def send_email(to: str, subject: str, body: str, ctx: ToolContext) -> str:
    """Send an email.

    Args:
        to: The recipient's address (the supplier is orders@beans-and-oats.example).
        subject: The subject line.
        body: The message.
    """
    outbox = Path(os.environ.get("OUTBOX_FILE") or Path(__file__).with_name("outbox.jsonl"))
    outbox.parent.mkdir(parents=True, exist_ok=True)
    sent = {"to": to, "subject": subject, "body": body, "run": ctx.run_id, "at": time.time()}
    with open(outbox, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(sent) + "\n")
    ctx.logger.info("sent an email to %s", to)
    return f"sent to {to}: {subject}"
