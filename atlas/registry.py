"""Teams, workers and personas, loaded from data folders.

The folders `agents/` (one YAML file per team) and `personas/` (Markdown with YAML front matter)
ship inside the wheel as `atlas/_bundled/`; in a source checkout they are read from the repository
root. A user's own folders (the task's `agents_dir` / `personas_dir`, or `ATLAS_AGENTS_PATH` /
`ATLAS_PERSONAS_PATH`) are read first, so a user's file overrides a bundled one of the same name.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from atlas.errors import SpecError
from atlas.spec import McpServer

if TYPE_CHECKING:
    from atlas.spec import TaskSpec

_T = TypeVar("_T")
_NAME = r"^[a-z][a-z0-9_]*$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class WorkerDef(_Strict):
    """A worker agent inside a team."""

    name: str = Field(pattern=_NAME)
    persona: str = Field(pattern=_NAME)
    description: str = Field(min_length=1, description="What the supervisor reads when routing")
    tools: list[str] = Field(default_factory=list)


class SupervisorDef(_Strict):
    persona: str = Field(pattern=_NAME)


class TeamDef(_Strict):
    """A team: a supervisor routing between its workers.

    A team with one worker has nothing to route, so its steps go straight to that worker and the
    supervisor makes no model call.
    """

    name: str = Field(pattern=_NAME)
    description: str = Field(
        min_length=1, description="What the planner reads when assigning steps"
    )
    supervisor: SupervisorDef
    workers: list[WorkerDef] = Field(min_length=1)
    mcp_servers: dict[str, McpServer] = Field(
        default_factory=dict,
        description="MCP servers this team's workers use; the task file's of the same name wins",
    )

    @field_validator("mcp_servers")
    @classmethod
    def _server_names(cls, value: dict[str, McpServer]) -> dict[str, McpServer]:
        from atlas.spec import check_server_names

        return check_server_names(value)

    @field_validator("workers")
    @classmethod
    def _unique(cls, workers: list[WorkerDef]) -> list[WorkerDef]:
        names = [w.name for w in workers]
        if len(set(names)) != len(names):
            raise ValueError("worker names must be unique within a team")
        return workers


class PersonaMeta(_Strict):
    name: str = Field(pattern=_NAME)
    role: str = Field(min_length=1)
    description: str = ""


@dataclass(frozen=True)
class Persona:
    """A persona prompt: front matter plus the Markdown body that becomes the system prompt."""

    name: str
    """File stem and reference used by agent definitions."""
    role: str
    """One-line role, shown in traces and to supervisors."""
    prompt: str
    """The system prompt text."""
    description: str = ""
    source: str = ""
    """Where it was loaded from."""


@dataclass
class Registry:
    """Every team and persona visible to one task."""

    teams: dict[str, TeamDef] = field(default_factory=dict)
    personas: dict[str, Persona] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def team_names(self) -> list[str]:
        return sorted(self.teams)

    def team(self, name: str) -> TeamDef:
        try:
            return self.teams[name]
        except KeyError:
            raise SpecError(
                f"unknown team {name!r} (known: {', '.join(self.team_names())})"
            ) from None

    def persona(self, name: str) -> Persona:
        try:
            return self.personas[name]
        except KeyError:
            raise SpecError(f"unknown persona {name!r}") from None

    @classmethod
    def load(cls, agent_dirs: list[Path], persona_dirs: list[Path]) -> Registry:
        """Load folders in priority order: the first folder that defines a name wins."""
        reg = cls()
        for folder in reversed(persona_dirs):
            for path in sorted(folder.glob("*.md")):
                persona = _load_persona(path)
                reg.personas[persona.name] = persona
        for folder in reversed(agent_dirs):
            for path in sorted([*folder.glob("*.yaml"), *folder.glob("*.yml")]):
                team = _load_team(path)
                reg.teams[team.name] = team
                reg.sources[team.name] = str(path)
        reg._check_references()
        return reg

    @classmethod
    def for_spec(cls, spec: TaskSpec | None = None) -> Registry:
        agent_dirs = _env_dirs("ATLAS_AGENTS_PATH")
        persona_dirs = _env_dirs("ATLAS_PERSONAS_PATH")
        if spec is not None and spec.agents_dir:
            agent_dirs.insert(0, spec.resolve(spec.agents_dir))
        if spec is not None and spec.personas_dir:
            persona_dirs.insert(0, spec.resolve(spec.personas_dir))
        return cls.load(
            [*agent_dirs, bundled_dir("agents")], [*persona_dirs, bundled_dir("personas")]
        )

    def _check_references(self) -> None:
        for team in self.teams.values():
            src = self.sources.get(team.name, team.name)
            refs = [("supervisor.persona", team.supervisor.persona)]
            refs += [(f"workers.{w.name}.persona", w.persona) for w in team.workers]
            for where, persona in refs:
                if persona not in self.personas:
                    raise SpecError(f"persona {persona!r} not found", file=src, field=where)


def bundled_dir(kind: str) -> Path:
    """The packaged `agents/` or `personas/` folder (wheel), else the source checkout's."""
    packaged = resources.files("atlas") / "_bundled" / kind
    if packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / kind


def _env_dirs(name: str) -> list[Path]:
    value = os.environ.get(name, "")
    return [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p]


def _read_yaml(path: Path, text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"not valid YAML: {getattr(exc, 'problem', exc)}", file=str(path)) from None


def _pydantic_error(exc: ValidationError, path: Path) -> SpecError:
    first = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"])
    return SpecError(first["msg"], file=str(path), field=loc or None)


def _cached(load: Callable[[Path], _T]) -> Callable[[Path], _T]:
    """Parse a file once per process while it is unchanged (same size and mtime): a run reads
    the registry more than once, and parsing YAML showed up in the fan-out benchmark's profile.
    Failures are not cached, so a fixed file is read again."""
    cache: dict[Path, tuple[tuple[int, int], _T]] = {}
    lock = threading.Lock()

    def cached(path: Path) -> _T:
        st = path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
        with lock:
            hit = cache.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = load(path)
        with lock:
            cache[path] = (stamp, value)
        return value

    return cached


@_cached
def _load_team(path: Path) -> TeamDef:
    data = _read_yaml(path, path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise SpecError("expected a mapping", file=str(path))
    data.setdefault("name", path.stem)
    try:
        return TeamDef.model_validate(data)
    except ValidationError as exc:
        raise _pydantic_error(exc, path) from None


@_cached
def _load_persona(path: Path) -> Persona:
    text = path.read_text(encoding="utf-8")
    meta: dict[str, Any] = {}
    body = text
    if text.startswith("---"):
        _, front, body = text.split("---", 2) if text.count("---") >= 2 else ("", "", text)
        loaded = _read_yaml(path, front)
        if not isinstance(loaded, dict):
            raise SpecError("front matter must be a mapping", file=str(path))
        meta = loaded
    meta.setdefault("name", path.stem)
    try:
        parsed = PersonaMeta.model_validate(meta)
    except ValidationError as exc:
        raise _pydantic_error(exc, path) from None
    prompt = body.strip()
    if not prompt:
        raise SpecError("persona has no prompt text", file=str(path))
    return Persona(parsed.name, parsed.role, prompt, parsed.description, str(path))
