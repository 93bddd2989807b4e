"""What a paused run waits for, and deciding it: `atlas approvals` and `atlas approve`.

A run pauses (status `awaiting_approval`) when its task's `approval:` asks a person about a plan
or a tool call (see `atlas/graph/approval.py`). What waits lives in the run's checkpoint as
LangGraph interrupts, several at once when parallel steps each wait on a tool call. This module
reads them (`pending`), turns a person's decision into the `Command(resume=...)` LangGraph
resumes with, keyed by interrupt id (`resume_command`), and resumes the run (`approve`), exactly
as `atlas resume` would: nothing done before the pause is done again.
"""

from __future__ import annotations

import getpass
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atlas.errors import SpecError
from atlas.events import EventHandler
from atlas.graph.approval import INTERRUPT_TYPE, parse_decision
from atlas.session import RunResult

WHO_ENV = "ATLAS_USER"
"""Who decides, as recorded on the trace; else the login name."""


@dataclass(frozen=True)
class Pending:
    """One plan or tool call waiting for a decision."""

    interrupt_id: str
    item: dict[str, Any]

    @property
    def id(self) -> str:
        return str(self.item["id"])

    @property
    def kind(self) -> str:
        return str(self.item.get("kind"))

    def as_dict(self) -> dict[str, Any]:
        return {**self.item, "interrupt_id": self.interrupt_id}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Pending:
        """The inverse of `as_dict` (a summary's `pending`, an `approval_needed` event)."""
        item = {k: v for k, v in data.items() if k not in ("interrupt_id", "type", "event", "ts")}
        return cls(str(data.get("interrupt_id")), item)

    def describe(self) -> str:
        """One line: what waits."""
        if self.kind == "plan":
            steps = self.item.get("steps") or []
            teams = ", ".join(f"{s.get('id')} ({s.get('team')})" for s in steps)
            return f"plan of iteration {self.item.get('iteration')}: {len(steps)} steps: {teams}"
        args = json.dumps(self.item.get("args") or {}, ensure_ascii=False, default=str)
        if len(args) > 200:
            args = args[:197] + "..."
        return f"tool {self.item.get('tool')} {args} (step {self.item.get('step')})"

    def event(self) -> dict[str, Any]:
        """The progress event of an item waiting (`approval_needed`)."""
        return {
            "type": "approval_needed",
            "event": "approval_needed",
            "ts": round(time.time(), 3),
            **self.as_dict(),
        }


def pending_in(snapshot: Any) -> list[Pending]:
    """The items waiting in a LangGraph state snapshot (ATLAS's interrupts only)."""
    found: list[Pending] = []
    for interrupt in getattr(snapshot, "interrupts", ()) or ():
        value = getattr(interrupt, "value", None)
        if not isinstance(value, dict) or value.get("type") != INTERRUPT_TYPE:
            continue
        for item in value.get("items") or []:
            if isinstance(item, dict) and item.get("id"):
                found.append(Pending(str(interrupt.id), dict(item)))
    return found


def pending(run_id: str, *, state_dir_path: str | os.PathLike[str] | None = None) -> list[Pending]:
    """What the run waits for, read from its checkpoint (empty when it waits for nothing)."""
    from atlas.graph.build import build_run_graph
    from atlas.runs import checkpoints, restore_secrets, run_store, state_dir
    from atlas.runs_postgres import state_url

    directory = state_dir(state_dir_path)
    record = run_store(directory).get(run_id)
    spec = restore_secrets(record)
    with checkpoints(directory, state_url(spec)) as saver:
        graph = build_run_graph(spec).compile(checkpointer=saver, name="atlas")
        snapshot = graph.get_state({"configurable": {"thread_id": record.run_id}})
    return pending_in(snapshot)


def decider() -> str:
    """Who is deciding: `$ATLAS_USER`, else the login name."""
    who = os.environ.get(WHO_ENV, "").strip()
    if who:
        return who[:200]
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def read_edit(path: str | os.PathLike[str], item: Pending) -> dict[str, Any]:
    """An edit from a YAML or JSON file: a tool call's new arguments (a mapping), or a plan's
    new steps (a list, or a mapping with `steps`)."""
    import yaml

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise SpecError(f"--edit {file}: {exc.strerror or exc}", field="--edit") from None
    except yaml.YAMLError as exc:
        raise SpecError(f"--edit {file}: not YAML or JSON ({exc})"[:300], field="--edit") from None
    if item.kind == "plan":
        steps = data.get("steps") if isinstance(data, dict) else data
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            raise SpecError(
                f"--edit {file}: a plan's edit is a list of steps (id, team, instruction, "
                "depends_on)",
                field="--edit",
            )
        return {"steps": steps}
    if not isinstance(data, dict):
        raise SpecError(
            f"--edit {file}: a tool call's edit is a mapping of its arguments", field="--edit"
        )
    return {"args": data}


def resume_command(
    waiting: list[Pending],
    *,
    ids: list[str] | None = None,
    action: str = "approve",
    reason: str | None = None,
    edit: dict[str, Any] | None = None,
    by: str | None = None,
) -> Any:
    """The `Command(resume=...)` that decides the chosen items (all when `ids` is None), keyed
    by interrupt id as LangGraph resumes them. Items not chosen stay waiting."""
    if not waiting:
        raise SpecError("nothing is waiting for approval", field="run_id")
    by_id = {p.id: p for p in waiting}
    chosen = list(waiting) if not ids else []
    for wanted in ids or []:
        if wanted not in by_id:
            raise SpecError(
                f"no approval {wanted!r} waiting; waiting: {', '.join(by_id)}", field="--id"
            )
        chosen.append(by_id[wanted])
    if edit is not None and len(chosen) != 1:
        raise SpecError(
            "--edit decides one item: name it with --id (waiting: " + ", ".join(by_id) + ")",
            field="--edit",
        )
    if action == "reject" and not (reason or "").strip():
        raise SpecError("--reject needs --reason: it goes back to the model", field="--reason")
    asked: dict[str, Any] = {"action": "edit" if edit is not None else action}
    asked["by"] = by or decider()
    if reason:
        asked["reason"] = reason
    asked["at"] = time.time()
    if edit is not None:
        asked.update(edit)
    decision = parse_decision(asked)
    return command_for(waiting, {item.id: decision for item in chosen})


def command_for(waiting: list[Pending], decided: dict[str, dict[str, Any]]) -> Any:
    """`Command(resume={interrupt_id: {item_id: decision}})` for the decided items."""
    from langgraph.types import Command

    by_id = {p.id: p for p in waiting}
    resume: dict[str, dict[str, Any]] = {}
    for item, decision in decided.items():
        resume.setdefault(by_id[item].interrupt_id, {})[item] = parse_decision(decision)
    return Command(resume=resume)


def approve(
    run_id: str,
    *,
    ids: list[str] | None = None,
    reject: bool = False,
    reason: str | None = None,
    edit: str | os.PathLike[str] | dict[str, Any] | None = None,
    by: str | None = None,
    state_dir_path: str | os.PathLike[str] | None = None,
    on_event: EventHandler | None = None,
    model: str | None = None,
) -> RunResult:
    """Decide what the run waits for (all of it, or the items `ids` names) and resume it.

    `edit` is a file (YAML or JSON) or the edit itself (`{"args": ...}` for a tool call,
    `{"steps": [...]}` for a plan). Returns the run's summary: `awaiting_approval` again when
    more waits (the next tool call, or items not decided)."""
    from atlas.runner import resume

    waiting = pending(run_id, state_dir_path=state_dir_path)
    if not waiting:
        raise SpecError(f"run {run_id} is not waiting for approval", field="run_id")
    change: dict[str, Any] | None = None
    if isinstance(edit, dict):
        change = edit
    elif edit is not None:
        chosen = [p for p in waiting if not ids or p.id in ids]
        if len(chosen) != 1:
            raise SpecError(
                "--edit decides one item: name it with --id (waiting: "
                + ", ".join(p.id for p in waiting)
                + ")",
                field="--edit",
            )
        change = read_edit(edit, chosen[0])
    command = resume_command(
        waiting,
        ids=ids,
        action="reject" if reject else "approve",
        reason=reason,
        edit=change,
        by=by,
    )
    return resume(
        run_id, state_dir_path=state_dir_path, on_event=on_event, model=model, _command=command
    )


__all__ = [
    "Pending",
    "approve",
    "approve_decided",
    "ask_decisions",
    "decider",
    "pending",
    "pending_approvals",
    "pending_in",
    "resume_command",
]


def approve_decided(
    run_id: str,
    waiting: list[Pending],
    decided: dict[str, dict[str, Any]],
    *,
    state_dir_path: str | os.PathLike[str] | None = None,
    on_event: EventHandler | None = None,
    model: str | None = None,
) -> RunResult:
    """Resume the run with decisions already made (`{item_id: decision}`), as the terminal
    prompt of `atlas run` gathers them."""
    from atlas.runner import resume

    command = command_for(waiting, decided)
    return resume(
        run_id, state_dir_path=state_dir_path, on_event=on_event, model=model, _command=command
    )


# -- on a terminal ---------------------------------------------------------------------------


def ask_decisions(
    waiting: list[Pending], ask: Any = input, say: Any = print
) -> dict[str, dict[str, Any]]:
    """Ask a person at the terminal about each waiting item: approve, edit or reject (with a
    reason). Returns the decisions; an empty mapping (end of input, Ctrl-C) leaves the run
    paused."""
    try:
        return _ask_each(waiting, ask, say)
    except KeyboardInterrupt:
        say("")
        return {}


def _ask_each(waiting: list[Pending], ask: Any, say: Any) -> dict[str, dict[str, Any]]:
    decided: dict[str, dict[str, Any]] = {}
    by = decider()
    for item in waiting:
        say(f"\nwaiting for approval [{item.id}]: {item.describe()}")
        if item.kind == "plan":
            for step in item.item.get("steps") or []:
                deps = ", ".join(step.get("depends_on") or []) or "-"
                head = f"  {step.get('id')} [{step.get('team')}] after {deps}"
                say(f"{head}: {step.get('instruction')}")
        while True:
            try:
                answer = ask("approve, edit or reject? [a/e/r] ").strip().lower()
            except EOFError:
                return {}
            if answer in ("a", "approve", "y", "yes"):
                decided[item.id] = {"action": "approve", "by": by}
                break
            if answer in ("r", "reject", "n", "no"):
                try:
                    reason = ask("reason (goes back to the model): ").strip()
                except EOFError:
                    return {}
                decided[item.id] = {"action": "reject", "by": by, "reason": reason or "rejected"}
                break
            if answer in ("e", "edit"):
                what = "new arguments as JSON" if item.kind == "tool" else "edited plan file"
                try:
                    given = ask(f"{what}: ").strip()
                except EOFError:
                    return {}
                try:
                    if item.kind == "tool":
                        args = json.loads(given)
                        if not isinstance(args, dict):
                            raise ValueError("arguments are a JSON object")
                        edit: dict[str, Any] = {"args": args}
                    else:
                        edit = read_edit(given, item)
                except (ValueError, SpecError) as exc:
                    say(f"  not usable: {exc}")
                    continue
                decided[item.id] = {"action": "edit", "by": by, **edit}
                break
            say("  answer a, e or r")
    return decided


pending_approvals = pending
"""`atlas.pending_approvals(run_id)`: the same as `pending`."""
