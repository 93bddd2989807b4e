"""The CLI's live view of a run (rich), and its summary.

On a terminal: a live table of the plan's steps (waiting, running, done) under the iteration and the
judge's last verdict. Elsewhere (pipes, CI, `--json`): one line per event, on stderr with `--json`
so stdout stays machine-readable.

No line shows a secret: models are shown in their public form (`public_model`) and every line
is scrubbed of known secret values, secret-named query options and passwords in URLs.
"""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from atlas.tracing.redact import public_model, scrub_text, secret_values

_ICON = {"waiting": "·", "running": "▶", "done": "✔", "stopped": "■", "budget_exhausted": "$"}


class Progress:
    def __init__(self, *, enabled: bool = True, to_stderr: bool = False) -> None:
        self.enabled = enabled
        self.console = Console(
            file=sys.stderr if to_stderr else sys.stdout, highlight=False, soft_wrap=True
        )
        self.live: Live | None = None
        self.steps: dict[str, dict[str, Any]] = {}
        self.iteration = 0
        self.verdict: dict[str, Any] | None = None
        self.header = ""
        self.notes: list[str] = []

    def __enter__(self) -> Progress:
        if self.enabled and self.console.is_terminal:
            self.live = Live(
                self._render(), console=self.console, refresh_per_second=8, transient=False
            )
            self.live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live is not None:
            self.live.update(self._render())
            self.live.__exit__(*exc)
            self.live = None

    # -- events -----------------------------------------------------------------------------
    def handle(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        line: str | None = None
        if kind == "start":
            models = sorted({public_model(str(m)) for m in event.get("models", {}).values()})
            verb = "resuming" if event.get("resumed") else "run"
            self.header = _clean(f"{verb} {event['run_id']} · model {', '.join(models)}")
            line = self.header
        elif kind == "plan":
            self.iteration = event["iteration"]
            for step in event["steps"]:
                self.steps[step["id"]] = {
                    "team": step["team"],
                    "status": "waiting",
                    "instruction": step["instruction"],
                    "workers": [],
                }
            line = f"plan (iteration {self.iteration}): " + ", ".join(
                f"{s['id']}[{s['team']}]" for s in event["steps"]
            )
            if event.get("repaired"):
                line += f" · repaired: {'; '.join(event['repaired'])}"
        elif kind == "dispatch":
            line = (
                f"dispatch: {', '.join(event['steps'])} in parallel"
                if len(event["steps"]) > 1
                else (f"dispatch: {event['steps'][0]}")
            )
        elif kind == "step_start":
            self.steps.setdefault(event["id"], {"team": event["team"], "workers": []})["status"] = (
                "running"
            )
        elif kind == "handoff":
            step = self.steps.setdefault(event["step"], {"team": event["team"], "workers": []})
            step["workers"] = [*step.get("workers", []), event["to"]]
            line = f"  {event['team']}: supervisor -> {event['to']} ({event.get('reason', '')})"
        elif kind == "step_done":
            step = self.steps.setdefault(event["id"], {"team": event["team"], "workers": []})
            step["status"] = event.get("status", "done")
            line = f"  done {event['id']} [{event['team']}] {event.get('note') or ''}".rstrip()
        elif kind == "verdict":
            self.verdict = event
            mark = "passed" if event.get("passed") else "failed"
            line = f"judge: {mark}, score {event.get('score')} · {event.get('feedback', '')}"
        elif kind == "budget_stop":
            line = f"budget stop: {event.get('limit')}"
        elif kind == "finalize":
            where = event["output"] or "no output written"
            line = f"finalize: {event['status']} -> {where}"
        elif kind == "memory_ingest":
            line = f"memory: ingesting {event['done']}/{event['total']} chunks"
        elif kind == "approval_needed":
            from atlas.approvals import Pending

            waiting = Pending.from_dict(event)
            line = f"awaiting approval [{waiting.id}]: {waiting.describe()}"
            if self.live is not None:
                self.live.console.print(_clean(line), markup=False)
        elif kind == "approval":
            what = event.get("tool") or event.get("kind")
            reason = f" ({event['reason']})" if event.get("reason") else ""
            line = f"approval [{event['id']}]: {what} {event['action']} by {event['by']}{reason}"
            if self.live is not None:
                self.live.console.print(_clean(line), markup=False)
        elif kind == "warning":
            line = f"warning: {event.get('message')}"
        if line:
            line = _clean(line)
        if self.live is not None:
            if kind == "warning" and line:
                self.live.console.print(line)
            self.live.update(self._render())
        elif self.enabled and line:
            self.console.print(line, markup=False)

    def _render(self) -> Group:
        table = Table(box=None, show_header=True, header_style="bold", pad_edge=False)
        for col in ("", "step", "team", "workers", "instruction"):
            table.add_column(col, overflow="ellipsis", no_wrap=True, max_width=60)
        for sid, step in self.steps.items():
            status = step.get("status", "waiting")
            table.add_row(
                _ICON.get(status, "?"),
                sid,
                step.get("team", ""),
                " → ".join(step.get("workers", [])),
                _clean(step.get("instruction", "")),
            )
        parts: list[Any] = [Text(self.header, style="bold")]
        if self.iteration:
            parts.append(Text(f"iteration {self.iteration}"))
        parts.append(table)
        if self.verdict:
            mark = "passed" if self.verdict.get("passed") else "failed"
            parts.append(
                Text(
                    _clean(
                        f"judge: {mark} (score {self.verdict.get('score')}): "
                        f"{self.verdict.get('feedback', '')}"
                    )
                )
            )
        return Group(*parts)

    # -- summary ----------------------------------------------------------------------------
    def summary(self, result: Any) -> None:
        console = self.console
        table = Table(box=None, show_header=False, pad_edge=False)
        table.add_column(style="bold")
        table.add_column()
        cost = (
            "unknown (no price for a model)"
            if result.cost_usd is None
            else f"${result.cost_usd:.4f}"
        )
        rows = [
            ("status", result.status + (f" ({result.stop_reason})" if result.stop_reason else "")),
            ("run id", result.run_id),
            ("iterations", str(result.iterations)),
            (
                "tokens",
                f"{result.tokens} ({result.input_tokens} in, {result.output_tokens} out, "
                f"{result.model_calls} calls)",
            ),
            ("cost", cost),
            (
                "tool calls",
                f"{getattr(result, 'tool_calls', 0)}"
                + (f" ({result.tool_errors} failed)" if getattr(result, "tool_errors", 0) else ""),
            ),
            ("wall time", f"{result.wall_s:.1f} s"),
            ("output", str(result.output)),
            ("models", ", ".join(sorted({public_model(str(m)) for m in result.models.values()}))),
        ]
        if getattr(result, "cache_hits", 0):
            rows.insert(
                4,
                (
                    "cache",
                    f"{result.cache_hits} of {result.model_calls} calls answered from the cache "
                    f"({result.cache_saved_tokens} tokens saved)",
                ),
            )
        if result.score is not None:
            rows.insert(1, ("judge score", f"{result.score:.2f}"))
        if getattr(result, "approvals", 0):
            waited = result.approval_wait_s
            rows.insert(
                -1,
                (
                    "approvals",
                    f"{result.approvals} decided"
                    + (
                        f", {waited:.1f} s waiting (not counted as run time)"
                        if waited and waited >= 0.1
                        else ""
                    ),
                ),
            )
        if result.trace_id:
            rows.append(("trace", f"{result.trace_id} in {result.tracking_uri}"))
            rows.append(("view", "python -m atlas ui"))
        else:
            rows.append(("trace", "tracing is off"))
        for key, value in rows:
            table.add_row(key, _clean(value))
        console.print(table)


def _clean(text: str) -> str:
    """A console line with no secret in it."""
    return scrub_text(text, secret_values())


def runs_table(records: list[Any]) -> None:
    import time

    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)  # pipes and logs: one row per line
    table = Table(show_header=True, header_style="bold")
    for col in ("run id", "name", "status", "score", "iter", "tokens", "started", "trace id"):
        table.add_column(col, overflow="fold")
    for r in records:
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.started_at))
        table.add_row(
            r.run_id,
            r.name or "",
            r.status,
            "" if r.score is None else f"{r.score:.2f}",
            "" if r.iterations is None else str(r.iterations),
            "" if r.tokens is None else str(r.tokens),
            started,
            r.trace_id or "",
        )
    console.print(table)
