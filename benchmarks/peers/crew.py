"""Peer: a CrewAI hierarchical crew (a manager delegating 9 tasks to three agents).

`python -m benchmarks.peers.crew --latency-ms 100 --runs 3` (in .venv-peers, with
PYTHONPATH=<repo root>).

What it measures: the fan-out workload as CrewAI users get it with `Process.hierarchical` and its
defaults (sequential tasks, each task's context = the outputs of the tasks before it, no memory,
no planning, no cache of tool results across tasks). Three agents, one per team (role, goal and
backstory from the worker's persona; ATLAS's tool for the team wrapped as a CrewAI tool), and 9
tasks, one per step. The manager (made by CrewAI from `manager_llm`) takes each task in turn,
delegates it to the right coworker with CrewAI's "Delegate work to coworker" tool, and returns the
coworker's answer; the coworker calls its tool once, then answers. So per task: 2 manager calls and
2 coworker calls, 36 calls in all, one after another.

The LLM (`ScriptedCrewLLM`) is a CrewAI `BaseLLM` that runs the same script as `ScriptedModel`:
the coworker's tool call and answer are `ScriptedModel`'s (`_work`), the manager is a cooperative
delegator. It answers in CrewAI's text ReAct format (CrewAI's path for an LLM that does not declare
native function calling), sleeps the same latency per call, and counts calls and tokens with the
same rule (a quarter of the characters of the messages sent, and of the answer).

Telemetry, tracing, the version check and memory are off; nothing here needs the network.
"""

# CrewAI is imported below its telemetry and tracing switches:
# ruff: noqa: E402
from __future__ import annotations

import asyncio
import atexit
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

# CrewAI reads these at import and at kickoff: no telemetry, no tracing, no PyPI version check.
_OFFLINE = {
    "CREWAI_DISABLE_TELEMETRY": "true",
    "CREWAI_DISABLE_TRACKING": "true",
    "OTEL_SDK_DISABLED": "true",
    "CREWAI_TRACING_ENABLED": "false",
    "CREWAI_DISABLE_VERSION_CHECK": "true",
}
for _key, _value in _OFFLINE.items():
    os.environ[_key] = _value
if "CREWAI_STORAGE_DIR" not in os.environ:
    # CrewAI's local state (task outputs, settings) goes to a throwaway folder, not ~/.local.
    _storage = tempfile.mkdtemp(prefix="crewai-storage-")
    os.environ["CREWAI_STORAGE_DIR"] = _storage
    atexit.register(shutil.rmtree, _storage, ignore_errors=True)

from crewai import Agent, Crew, Process, Task
from crewai.crews.crew_output import CrewOutput
from crewai.llms.base_llm import BaseLLM
from crewai.tools.base_tool import Tool
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolCall,
    ToolMessage,
)
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field, PrivateAttr

from atlas.testing import ScriptedModel
from benchmarks.peers.common import (
    RunStats,
    Workload,
    WorkloadFailed,
    cli,
    load_workload,
    make_workspace,
    measure_runs,
    steps_answered,
    team_tools,
)

# BaseLLM's token estimate (chars/4, the same rule as ours) warns on every call of a custom LLM
# without a native token count; CrewAI calls it three times per model call.
logging.getLogger("crewai.llms.base_llm").setLevel(logging.ERROR)

DELEGATE = "delegate_work_to_coworker"
"""CrewAI's delegation tool, as its name appears in the manager's prompt."""
_TOOL_NAME = re.compile(r"^Tool Name:\s*(.+?)\s*$", re.M)
_CURRENT_TASK = re.compile(r"Current Task:\s*(.+?)(?:\n\n|\Z)", re.S)
_OBSERVATION = "Observation:"
_TEAM_OF_STEP = re.compile(r"Part \d+ of the (\w+) work")


class ScriptedCrewLLM(BaseLLM):
    """A CrewAI LLM running `ScriptedModel`'s script, for the manager and the coworkers alike.

    `coworkers` maps a team name to the role of its agent (the manager delegates a task for
    "Part n of the <team> work" to that role); `tool_schemas` are the OpenAI schemas of the
    coworkers' tools, which `ScriptedModel` needs to fill in a tool call's arguments.
    """

    llm_type: str = "atlas-scripted"
    latency_ms: float = 0.0
    coworkers: dict[str, str] = Field(default_factory=dict)
    tool_schemas: dict[str, dict[str, Any]] = Field(default_factory=dict)
    _script: ScriptedModel = PrivateAttr(default_factory=ScriptedModel)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)
    _counts: dict[str, int] = PrivateAttr(
        default_factory=lambda: {"calls": 0, "prompt": 0, "completion": 0}
    )
    _roles: list[str] = PrivateAttr(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    @property
    def roles(self) -> list[str]:
        return list(self._roles)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.update(calls=0, prompt=0, completion=0)
            self._roles.clear()

    def supports_stop_words(self) -> bool:
        return False

    def call(
        self,
        messages: str | list[Any],
        tools: list[dict[str, Any]] | None = None,
        callbacks: list[Any] | None = None,
        available_functions: dict[str, Any] | None = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> str:
        if self.latency_ms:
            time.sleep(self.latency_ms / 1000)
        sent = [{"role": "user", "content": messages}] if isinstance(messages, str) else messages
        role, answer = self._respond(sent)
        prompt_chars = sum(len(str(m.get("content") or "")) for m in sent)
        with self._lock:
            self._counts["calls"] += 1
            self._counts["prompt"] += max(1, prompt_chars // 4)
            self._counts["completion"] += max(1, len(answer) // 4)
            self._roles.append(role)
        return answer

    async def acall(
        self,
        messages: str | list[Any],
        tools: list[dict[str, Any]] | None = None,
        callbacks: list[Any] | None = None,
        available_functions: dict[str, Any] | None = None,
        from_task: Any = None,
        from_agent: Any = None,
        response_model: Any = None,
    ) -> str:
        return await asyncio.to_thread(self.call, messages, tools, callbacks, available_functions)

    # -- the script ------------------------------------------------------------------------
    def _respond(self, messages: list[dict[str, Any]]) -> tuple[str, str]:
        prompt = "\n".join(str(m.get("content") or "") for m in messages if m["role"] == "system")
        first_user = next((str(m["content"]) for m in messages if m["role"] == "user"), "")
        tools = _TOOL_NAME.findall(prompt + "\n" + first_user)
        start = next((i for i, m in enumerate(messages) if m["role"] == "user"), 0) + 1
        observations = [
            str(m["content"]).split(_OBSERVATION, 1)[1].strip()
            for m in messages[start:]
            if _OBSERVATION in str(m.get("content") or "")
        ]
        match = _CURRENT_TASK.search(first_user)
        task = match.group(1).strip() if match else first_user.strip()
        if DELEGATE in tools:
            return "manager", self._manage(task, observations)
        names = [t for t in tools if t in self.tool_schemas]
        if names:
            return "worker", self._work(prompt, task, names, observations)
        return "chat", f"Thought: I can answer directly.\nFinal Answer: {task}"

    def _manage(self, task: str, observations: list[str]) -> str:
        if observations:
            return (
                "Thought: My coworker has done the task; I now know the final answer.\n"
                f"Final Answer: {observations[-1]}"
            )
        found = _TEAM_OF_STEP.search(task)
        coworker = self.coworkers.get(found.group(1), "") if found else ""
        if not coworker:
            raise RuntimeError(f"no coworker for task {task[:80]!r}")
        args = {"task": task, "context": "Use your tool once, then answer.", "coworker": coworker}
        return (
            f"Thought: This is work for the {coworker}.\n"
            f"Action: {DELEGATE}\nAction Input: {json.dumps(args)}"
        )

    def _work(self, prompt: str, task: str, names: list[str], observations: list[str]) -> str:
        schemas = [self.tool_schemas[n] for n in names]
        view: list[BaseMessage] = [SystemMessage(prompt), HumanMessage(f"Step: {task}")]
        if observations:
            asked = ToolCall(name=names[0], args={}, id="crew_call")
            view.append(AIMessage(content="", tool_calls=[asked]))
            view += [
                ToolMessage(content=o, tool_call_id="crew_call", name=names[0])
                for o in observations
            ]
        message = self._script._respond(view, schemas).generations[0].message
        assert isinstance(message, AIMessage)
        if message.tool_calls:
            wanted = message.tool_calls[0]
            return (
                f"Thought: I should use {wanted['name']}.\n"
                f"Action: {wanted['name']}\nAction Input: {json.dumps(wanted['args'])}"
            )
        return f"Thought: I now know the final answer.\nFinal Answer: {message.content}"


def build_crew(workload: Workload, llm: ScriptedCrewLLM, run_dir: Path) -> Crew:
    """Three agents with ATLAS's tools (fresh workspace under `run_dir`), 9 tasks, a manager."""
    tools = team_tools(workload, make_workspace(workload, run_dir))
    agents: dict[str, Agent] = {}
    for name, team in workload.teams.items():
        agents[name] = Agent(
            role=team.persona.role,
            goal=team.worker_description,
            backstory=team.persona.prompt.strip(),
            tools=[Tool.from_langchain(t) for t in tools[name]],
            llm=llm,
            allow_delegation=False,
            verbose=False,
        )
    tasks = [
        Task(
            description=step.instruction,
            expected_output="The findings for this part, each with its source.",
        )
        for step in workload.steps
    ]
    return Crew(
        agents=list(agents.values()),
        tasks=tasks,
        process=Process.hierarchical,
        manager_llm=llm,
        memory=False,
        verbose=False,
    )


def make_llm(workload: Workload, latency_ms: int) -> ScriptedCrewLLM:
    with tempfile.TemporaryDirectory() as tmp:
        ws = make_workspace(workload, Path(tmp))
        schemas = {
            t.name: convert_to_openai_tool(t)
            for ts in team_tools(workload, ws).values()
            for t in ts
        }
        ws.close()
    coworkers = {name: team.persona.role for name, team in workload.teams.items()}
    return ScriptedCrewLLM(
        model="atlas-scripted",
        provider="scripted",
        latency_ms=latency_ms,
        coworkers=coworkers,
        tool_schemas=schemas,
    )


def run_once(workload: Workload, llm: ScriptedCrewLLM, run_dir: Path) -> RunStats:
    llm.reset_counts()
    crew = build_crew(workload, llm, run_dir)
    output = crew.kickoff()
    if not isinstance(output, CrewOutput):
        raise WorkloadFailed(f"unexpected kickoff output {type(output).__name__}")
    answers = [str(t.raw) for t in output.tasks_output]
    counts = llm.counts
    return RunStats(
        model_calls=counts["calls"],
        prompt_tokens=counts["prompt"],
        completion_tokens=counts["completion"],
        steps_done=steps_answered(answers, workload.steps),
    )


def measure(latency_ms: int, runs: int) -> dict[str, Any]:
    """CrewAI hierarchical: a manager delegates 9 tasks, one at a time, to 3 agents."""
    workload = load_workload()
    llm = make_llm(workload, latency_ms)
    return measure_runs(
        "crewai-hierarchical",
        version("crewai"),
        lambda run_dir: run_once(workload, llm, run_dir),
        runs,
        len(workload.steps),
    )


def main(argv: list[str] | None = None) -> int:
    return cli("benchmarks.peers.crew", measure, argv)


if __name__ == "__main__":
    raise SystemExit(main())
