"""What every peer shares: the fan-out workload, the scripted model, and the measuring protocol.

The workload is `benchmarks/fixtures/fanout/task.yaml` with its three one-worker teams: 3 teams x 3
independent steps ("Part n of the <team> work: <task>", the plan `ScriptedModel(fanout=3)` makes
for ATLAS). Each step is one worker making two model calls: a call of its one tool, then its answer.
The tools are ATLAS's own (`atlas.tools.make_tools` over a `Workspace` for the task), the personas
are ATLAS's persona files, and every model call goes through `ScriptedModel` (or, for CrewAI, the
same script behind CrewAI's LLM interface) with the same simulated latency and the same token rule:
prompt tokens are a quarter of the characters of the messages actually sent.

This module imports only atlas.testing / atlas.tools / atlas.spec / atlas.registry and
langchain-core, so it works in ATLAS's .venv and in .venv-peers alike.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.tools import BaseTool
from pydantic import PrivateAttr

from atlas.registry import Persona, Registry
from atlas.spec import TaskSpec, load_task
from atlas.testing import ScriptedModel
from atlas.tools import Workspace, make_tools

ROOT = Path(__file__).resolve().parents[2]
TASK_FILE = ROOT / "benchmarks" / "fixtures" / "fanout" / "task.yaml"
FANOUT = 3
"""Independent steps per team."""

HANDOFF_PREFIX = "transfer_to_"
"""langgraph-supervisor's handoff tools are `transfer_to_<agent>`."""


# -- the workload --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    id: str
    team: str
    instruction: str


@dataclass(frozen=True)
class TeamSetup:
    """A team of the fixture: its one worker, that worker's persona and tool names."""

    name: str
    description: str
    worker: str
    worker_description: str
    persona: Persona
    tools: list[str]


@dataclass(frozen=True)
class Workload:
    spec: TaskSpec
    teams: dict[str, TeamSetup]
    steps: list[Step]

    @property
    def task(self) -> str:
        return self.spec.task.strip()


def load_workload() -> Workload:
    """The fan-out task, its teams (one worker each) and the 9-step plan."""
    spec = load_task(TASK_FILE)
    registry = Registry.for_spec(spec)
    teams: dict[str, TeamSetup] = {}
    for name in spec.teams:
        team = registry.team(name)
        if len(team.workers) != 1:
            raise SystemExit(f"error: team {name!r} must have exactly one worker for this workload")
        worker = team.workers[0]
        teams[name] = TeamSetup(
            name=name,
            description=team.description,
            worker=worker.name,
            worker_description=worker.description,
            persona=registry.persona(worker.persona),
            tools=list(worker.tools),
        )
    task = spec.task.strip()
    steps = [
        Step(f"{team}_{n}", team, f"Part {n} of the {team} work: {task}")
        for team in spec.teams
        for n in range(1, FANOUT + 1)
    ]
    return Workload(spec=spec, teams=teams, steps=steps)


def make_workspace(workload: Workload, run_dir: Path) -> Workspace:
    """A fresh workspace (document index, data tables, drafts folder) for one run."""
    return Workspace.for_spec(workload.spec, run_dir)


def team_tools(workload: Workload, ws: Workspace) -> dict[str, list[BaseTool]]:
    """ATLAS's tools for each team's worker, bound to this run's workspace."""
    return {name: make_tools(team.tools, ws) for name, team in workload.teams.items()}


def steps_text(steps: Sequence[Step]) -> str:
    """The plan as numbered lines, `n. [team] instruction`."""
    return "\n".join(f"{i}. [{s.team}] {s.instruction}" for i, s in enumerate(steps, 1))


_STEP_LINE = re.compile(r"^\s*\d+\.\s+\[(\w+)\]\s+(.+?)\s*$", re.M)


def parse_steps(text: str) -> list[tuple[str, str]]:
    """`(team, instruction)` for every line written by `steps_text`."""
    return [(m.group(1), m.group(2)) for m in _STEP_LINE.finditer(text)]


def steps_answered(answers: Sequence[str], steps: Sequence[Step]) -> int:
    """How many plan steps a worker answer names (answers start `Findings for: <instruction>`)."""
    done = {
        s.id for s in steps for a in answers if a.startswith(f"Findings for: {s.instruction[:150]}")
    }
    return len(done)


# -- the scripted model --------------------------------------------------------------------------


def usage_for(messages: Sequence[BaseMessage], message: AIMessage) -> tuple[int, int]:
    """ScriptedModel's token rule: about a quarter of the characters sent, and of the answer."""
    prompt_chars = sum(len(str(m.content)) for m in messages)
    answer_chars = len(str(message.content)) + len(json.dumps(message.tool_calls))
    return max(1, prompt_chars // 4), max(1, answer_chars // 4)


class PeerScriptedModel(ScriptedModel):
    """`ScriptedModel` that also plays langgraph-supervisor's supervisor, and counts tokens.

    - Bound to `transfer_to_*` tools it is a cooperative supervisor: it reads the numbered steps in
      the user message, transfers to the team of the next step not yet handed off (it counts the
      transfers already in the history), and once every step is handed off answers with a summary.
    - A worker called inside a supervisor's shared history sees that history (and is charged for
      it), but decides on its own turn only: the step it was handed (the k-th step for the k-th
      transfer) and the tool results since the transfer. `ScriptedModel._work` makes that decision,
      so the worker makes the same tool call, then the same answer, as an ATLAS worker.
    - Anything else is `ScriptedModel` unchanged.

    Latency is ScriptedModel's (slept in `_generate` / `_agenerate`); every call adds its usage to
    `prompt_total` / `completion_total`, and its role to `calls`.
    """

    _tokens: list[int] = PrivateAttr(default_factory=lambda: [0, 0])
    _tokens_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    @property
    def prompt_total(self) -> int:
        return self._tokens[0]

    @property
    def completion_total(self) -> int:
        return self._tokens[1]

    def reset_counts(self) -> None:
        with self._tokens_lock:
            self._tokens[:] = [0, 0]
            self.calls.clear()

    def _respond(self, messages: list[BaseMessage], tools: list[dict[str, Any]]) -> ChatResult:
        names = [t["function"]["name"] for t in tools]
        if names and all(n.startswith(HANDOFF_PREFIX) for n in names):
            message = self._supervise(messages, names)
            self._record("supervisor", message)
        else:
            view = _worker_view(messages) if tools and _in_handoff_history(messages) else messages
            message = _message_of(super()._respond(view, tools))
        inp, out = usage_for(messages, message)
        message.usage_metadata = {
            "input_tokens": inp,
            "output_tokens": out,
            "total_tokens": inp + out,
        }
        message.response_metadata = {"model_name": self.model_name, "model_provider": "scripted"}
        with self._tokens_lock:
            self._tokens[0] += inp
            self._tokens[1] += out
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _supervise(self, messages: list[BaseMessage], names: list[str]) -> AIMessage:
        steps = parse_steps(_first_human(messages))
        done = _transfers(messages)
        if done < len(steps):
            team, _ = steps[done]
            wanted = f"{HANDOFF_PREFIX}{team}"
            if wanted not in names:
                raise RuntimeError(f"no handoff tool {wanted!r} among {names}")
            return _tool_call(wanted, {})
        answers = [
            str(m.content)
            for m in messages
            if isinstance(m, AIMessage) and not m.tool_calls and m.name and m.content
        ]
        lines = [line.splitlines()[0] for line in answers if line.startswith("Findings for:")]
        return AIMessage(content="All steps are answered:\n" + "\n".join(f"- {x}" for x in lines))


def _message_of(result: ChatResult) -> AIMessage:
    message = result.generations[0].message
    assert isinstance(message, AIMessage)
    return message


_tool_ids = iter(range(1, 1 << 62))
_tool_ids_lock = threading.Lock()


def _tool_call(name: str, args: dict[str, Any]) -> AIMessage:
    with _tool_ids_lock:
        call_id = f"peer_call_{next(_tool_ids):06d}"
    return AIMessage(content="", tool_calls=[{"name": name, "args": args, "id": call_id}])


def _first_human(messages: Sequence[BaseMessage]) -> str:
    return next((str(m.content) for m in messages if isinstance(m, HumanMessage)), "")


def _is_transfer(message: BaseMessage) -> bool:
    return isinstance(message, AIMessage) and any(
        c["name"].startswith(HANDOFF_PREFIX) for c in message.tool_calls
    )


def _transfers(messages: Sequence[BaseMessage]) -> int:
    return sum(
        1
        for m in messages
        if isinstance(m, AIMessage)
        for c in m.tool_calls
        if c["name"].startswith(HANDOFF_PREFIX)
    )


def _in_handoff_history(messages: Sequence[BaseMessage]) -> bool:
    return any(_is_transfer(m) for m in messages)


def _worker_view(messages: list[BaseMessage]) -> list[BaseMessage]:
    """The worker's own turn: its prompt, the step it was handed, its tool results since then."""
    last = max(i for i, m in enumerate(messages) if _is_transfer(m))
    steps = parse_steps(_first_human(messages))
    k = _transfers(messages) - 1
    instruction = steps[k][1] if 0 <= k < len(steps) else "the step"
    task = _task_line(_first_human(messages))
    prompt = [m for m in messages if isinstance(m, SystemMessage)]
    own = [m for m in messages[last + 1 :] if not isinstance(m, SystemMessage)]
    # Drop the supervisor's "Successfully transferred to ..." tool message: it is not a tool
    # result of this worker.
    own = [
        m
        for m in own
        if not (isinstance(m, ToolMessage) and (m.name or "").startswith(HANDOFF_PREFIX))
    ]
    return [*prompt, HumanMessage(f"Task: {task}\nStep: {instruction}"), *own]


def _task_line(text: str) -> str:
    match = re.search(r"^Task:\s*(.+)$", text, re.M)
    return match.group(1).strip() if match else text.strip().splitlines()[0]


# -- measuring -----------------------------------------------------------------------------------


@dataclass
class RunStats:
    """One run, as counted by the model wrapper (calls, tokens) and read from the output (steps)."""

    model_calls: int
    prompt_tokens: int
    completion_tokens: int
    steps_done: int


@dataclass
class Measurement:
    peer: str
    version: str
    wall_s: list[float] = field(default_factory=list)
    runs: list[RunStats] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        last = self.runs[-1]
        return {
            "peer": self.peer,
            "version": self.version,
            "wall_s": [round(t, 4) for t in self.wall_s],
            "model_calls": last.model_calls,
            "prompt_tokens": last.prompt_tokens,
            "completion_tokens": last.completion_tokens,
            "steps_done": last.steps_done,
        }


class WorkloadFailed(RuntimeError):
    """A run did not answer every step of the plan, or runs disagreed."""


def measure_runs(
    peer: str,
    version: str,
    run_once: Callable[[Path], RunStats],
    runs: int,
    expected_steps: int,
) -> dict[str, Any]:
    """One untimed warm-up run, then `runs` timed runs, each in a fresh run directory.

    A run is everything `run_once` does: build the workspace, tools and the peer's graph or crew,
    and run it to the end. Every run must answer all `expected_steps` steps and make the same
    number of model calls; otherwise `WorkloadFailed`.
    """
    result = Measurement(peer=peer, version=version)
    with tempfile.TemporaryDirectory(prefix=f"peer-{peer}-") as tmp:
        base = Path(tmp)
        _check(run_once(base / "warmup"), expected_steps, "warm-up")
        for n in range(runs):
            started = time.perf_counter()
            stats = run_once(base / f"run{n}")
            result.wall_s.append(time.perf_counter() - started)
            _check(stats, expected_steps, f"run {n + 1}")
            result.runs.append(stats)
    calls = {s.model_calls for s in result.runs}
    if len(calls) > 1:
        raise WorkloadFailed(f"{peer}: model calls differ between runs: {sorted(calls)}")
    return result.as_dict()


def _check(stats: RunStats, expected: int, which: str) -> None:
    if stats.steps_done != expected:
        raise WorkloadFailed(
            f"{which}: {stats.steps_done} of {expected} steps produced a worker answer "
            f"({stats.model_calls} model calls)"
        )


def cli(
    prog: str, measure: Callable[..., dict[str, Any]], argv: list[str] | None = None, **extra: Any
) -> int:
    """`--latency-ms N --runs N`; prints the result as the last line of stdout (JSON).

    Exit status 1 with one `error: ...` line on stderr when a run fails or misses a step.
    """
    parser = argparse.ArgumentParser(prog=f"python -m {prog}", description=measure.__doc__)
    parser.add_argument("--latency-ms", type=int, default=100, help="simulated latency per call")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up run")
    for flag, (kind, help_text) in extra.items():
        parser.add_argument(f"--{flag.replace('_', '-')}", action=kind, help=help_text)
    args = parser.parse_args(argv)
    options = {name: getattr(args, name) for name in extra}
    try:
        result = measure(args.latency_ms, args.runs, **options)
    except WorkloadFailed as exc:
        print(f"error: {prog}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a peer that breaks mid-run is one line, not a traceback
        detail = " ".join(str(exc).split())[:300]
        print(f"error: {prog}: {type(exc).__name__}: {detail}", file=sys.stderr)
        return 1
    print(json.dumps(result), flush=True)
    return 0


__all__ = [
    "FANOUT",
    "ROOT",
    "TASK_FILE",
    "Measurement",
    "PeerScriptedModel",
    "RunStats",
    "Step",
    "TeamSetup",
    "Workload",
    "WorkloadFailed",
    "cli",
    "load_workload",
    "make_workspace",
    "measure_runs",
    "parse_steps",
    "steps_answered",
    "steps_text",
    "team_tools",
    "usage_for",
]
