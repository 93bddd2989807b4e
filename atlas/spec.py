"""The task file (`task.yaml`) and how it is validated.

Pydantic lives here, at the edge. `load_task()` turns a file into a `TaskSpec`, resolves every path
relative to the file, and turns any problem into one `SpecError` line that names the file and the
field path.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import glob
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from atlas.errors import SpecError
from atlas.tracing.redact import public_model

DEFAULT_TEAMS = ("research", "analysis", "writing")

MAX_MATCHES = 10_000
"""An input pattern may name at most this many files."""
MAX_GLOB_SECONDS = 10.0
"""Expanding one input pattern may take at most this long."""
MAX_VALUES = 100_000
"""A task file may hold at most this many values once YAML aliases are expanded."""
MAX_DEPTH = 50
"""... nested at most this deep."""
MAX_PARAMS = 50
"""Options of one model (query string or `params`)."""
MAX_OPTION_BYTES = 10_240
"""Size of one model option's value, serialised."""

# Providers ATLAS knows how to reach. `openai` also covers OpenAI-compatible servers via base_url.
PROVIDERS = ("openai", "anthropic", "local", "scripted")
_MODEL_RE = re.compile(
    r"^(?P<provider>[a-z][a-z0-9_-]*)(?::(?P<name>[^?\s]+))?(?:\?(?P<query>\S*))?$"
)
_INFERRED = {
    "gpt-": "openai",
    "o1": "openai",
    "o3": "openai",
    "o4": "openai",
    "claude": "anthropic",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_model_string(value: str) -> tuple[str, str, dict[str, Any]]:
    """Split `provider:model?key=value&...` into its parts. Raises ValueError when malformed."""
    shown = public_model(value)  # what messages quote: no secret option values
    text = value.strip()
    for prefix, provider in _INFERRED.items():
        if text.startswith(prefix):
            text = f"{provider}:{text}"
            break
    match = _MODEL_RE.match(text)
    if not match:
        raise ValueError(
            f"malformed model spec {shown!r}: expected provider:model, e.g. openai:gpt-4o-mini"
        )
    provider, name, query = match["provider"], match["name"] or "", match["query"] or ""
    if provider not in PROVIDERS:
        raise ValueError(
            f"unknown provider {provider!r} in model spec {shown!r} (known: {', '.join(PROVIDERS)})"
        )
    if provider in ("openai", "anthropic") and not name:
        raise ValueError(f"model spec {shown!r} names no model, e.g. {provider}:<model-name>")
    params: dict[str, Any] = {}
    written: dict[str, str] = {}
    for pair in filter(None, query.split("&")):
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(
                f"malformed option {pair!r} in model spec {shown!r}: expected key=value"
            )
        _check_option(key, len(raw.encode("utf-8")))
        params[key] = _coerce(raw)
        written[key] = raw
    if len(params) > MAX_PARAMS:
        raise ValueError(f"model spec has {len(params)} options; at most {MAX_PARAMS}")
    if provider == "scripted":
        from atlas.testing import check_scripted_options

        params = check_scripted_options(params, written)
    return provider, name, params


def _check_option(key: str, size: int) -> None:
    """A model option is a name (it becomes a keyword argument) with a value of bounded size.
    The value is never shown: it may be a key."""
    if not key.isidentifier():
        shown = repr(key) if len(key) <= 40 else repr(key[:37] + "...")
        raise ValueError(f"option name {shown} is not a name (letters, digits, _)")
    if size > MAX_OPTION_BYTES:
        raise ValueError(f"option {key}: value is {size} bytes; at most {MAX_OPTION_BYTES}")


def _coerce(raw: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw


class ModelSpec(_Strict):
    """One model: `provider:model` plus connection settings."""

    model: str = Field(
        description="provider:model, e.g. openai:gpt-4o-mini or anthropic:claude-sonnet-4-5"
    )
    base_url: str | None = Field(
        None, description="OpenAI-compatible server (vLLM, Ollama, llama.cpp)"
    )
    api_key_env: str | None = Field(
        None, description="Name of the environment variable holding the API key (never the key)"
    )
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, gt=0, description="Cap on tokens generated per call")
    timeout_s: float | None = Field(None, gt=0)
    max_retries: int = Field(
        3, ge=0, le=10, description="Retries on 429, 5xx and timeouts (backoff with jitter)"
    )
    fallbacks: list[ModelSpec] = Field(
        default_factory=list, description="Tried in order when this model keeps failing"
    )
    params: dict[str, Any] = Field(default_factory=dict, description="Extra provider options")

    @field_validator("model")
    @classmethod
    def _check_model(cls, value: str) -> str:
        parse_model_string(value)
        return value

    @field_validator("fallbacks", mode="before")
    @classmethod
    def _fallback_strs(cls, value: Any) -> Any:
        return _models_from_strings(value)

    @field_validator("params")
    @classmethod
    def _bounded_params(cls, value: dict[str, Any]) -> dict[str, Any]:
        if len(value) > MAX_PARAMS:
            raise ValueError(f"has {len(value)} options; at most {MAX_PARAMS}")
        for key, item in value.items():
            try:
                size = len(json.dumps(item, default=str).encode("utf-8"))
            except (ValueError, RecursionError):
                raise ValueError(f"option {key}: value cannot be serialised") from None
            _check_option(key, size)
        return value

    @model_validator(mode="after")
    def _scripted_params(self) -> ModelSpec:
        provider, _, query = parse_model_string(self.model)
        if provider == "scripted" and self.params:
            from atlas.testing import check_scripted_options

            check_scripted_options({**query, **self.params})
        return self

    @property
    def provider(self) -> str:
        return parse_model_string(self.model)[0]


def _model_from_string(value: Any) -> Any:
    if isinstance(value, str):
        return {"model": value}
    return value


def _models_from_strings(value: Any) -> Any:
    if isinstance(value, list):
        return [_model_from_string(v) for v in value]
    return value


class Models(_Strict):
    """Which model each role uses. Unset roles use `default`."""

    default: ModelSpec | None = None
    planner: ModelSpec | None = None
    judge: ModelSpec | None = None
    supervisor: ModelSpec | None = None
    memory: ModelSpec | None = Field(
        None, description="Extracts entities from findings for graph memory"
    )
    teams: dict[str, ModelSpec] = Field(default_factory=dict, description="Per team, e.g. research")
    fallbacks: list[ModelSpec] = Field(
        default_factory=list, description="Tried in order when a role's model keeps failing"
    )

    @field_validator("default", "planner", "judge", "supervisor", "memory", mode="before")
    @classmethod
    def _str_to_spec(cls, value: Any) -> Any:
        return _model_from_string(value)

    @field_validator("teams", mode="before")
    @classmethod
    def _team_strs(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: _model_from_string(v) for k, v in value.items()}
        return value

    @field_validator("fallbacks", mode="before")
    @classmethod
    def _fallback_strs(cls, value: Any) -> Any:
        return _models_from_strings(value)


class Budget(_Strict):
    """Hard limits. Every loop in a run is bounded by one of these."""

    max_iterations: int = Field(3, ge=1, le=100, description="Plan/judge rounds")
    max_steps: int = Field(30, ge=1, le=10_000, description="Team steps over the whole run")
    max_tokens: int | None = Field(500_000, gt=0, description="Input plus output tokens")
    max_cost_usd: float | None = Field(None, gt=0)
    timeout_s: float | None = Field(1800, gt=0, description="Wall time of the whole run")
    max_handoffs: int = Field(6, ge=1, le=100, description="Supervisor handoffs per team step")
    max_tool_calls: int = Field(6, ge=1, le=100, description="Tool calls per worker turn")
    tool_timeout_s: float = Field(
        60,
        gt=0,
        description="Seconds one call of a Python tool may take (MCP servers set their own)",
    )


class Inputs(_Strict):
    documents: list[str] = Field(
        default_factory=list, description="Paths or globs, relative to the task file"
    )
    data: list[str] = Field(
        default_factory=list, description="CSV paths or globs, relative to the task file"
    )


class Tracing(_Strict):
    enabled: bool = True
    tracking_uri: str | None = Field(
        None, description="MLflow tracking URI; default sqlite under the state directory"
    )
    experiment: str | None = Field(None, description="MLflow experiment; default 'atlas'")


DEFAULT_NAMESPACE = "default"
NAMESPACE_PATTERN = r"^[A-Za-z0-9](?:[A-Za-z0-9_]{0,62}[A-Za-z0-9])?$"
"""Memory namespaces name Chroma collections and graph labels, so they keep to what both
accept: 1-64 letters, digits and underscores, starting and ending with a letter or digit."""


class Memory(_Strict):
    enabled: bool = True
    dir: str | None = Field(
        None, description="Memory directory, relative to the task file; default <state dir>/memory"
    )
    vector_url: str | None = Field(
        None, pattern=r"^https?://", description="Chroma server URL; default embedded"
    )
    graph_uri: str | None = Field(
        None,
        pattern=r"^(bolt|neo4j)(\+s|\+ssc)?://",
        description="Neo4j server, bolt:// or neo4j://; default embedded LadybugDB",
    )
    embedder: str = Field(
        "local",
        pattern=r"^(local|openai:[\w.-]+)$",
        description="'local' (all-MiniLM-L6-v2, offline) or 'openai:<embedding model>'",
    )
    extract_entities: bool = Field(
        True, description="Extract entities and relations from each finding into graph memory"
    )
    recall: int = Field(
        3, ge=0, le=10, description="Passages from earlier runs shown to the planner and workers"
    )
    namespace: str = Field(
        DEFAULT_NAMESPACE,
        pattern=NAMESPACE_PATTERN,
        description=(
            "The memory partition this task reads and writes (letters, digits, underscores); "
            "runs in other namespaces never see its passages or entities"
        ),
    )
    recall_unfinished: bool = Field(
        False,
        description=(
            "Also recall findings of runs that have not finished (running, interrupted); "
            "by default only finished runs' findings are recalled"
        ),
    )


class JudgeSettings(_Strict):
    pass_threshold: float = Field(0.7, ge=0, le=1, description="Minimum score to pass")


class Alerts(_Strict):
    """Thresholds the run is checked against when it ends. A breach does not change the run's
    status: it prints a warning line, tags the trace `atlas.alert.<name>` and is logged as an
    assessment, so the runs that alerted can be searched for."""

    max_wall_s: float | None = Field(None, gt=0, description="Wall time of the run, seconds")
    max_cost_usd: float | None = Field(None, ge=0, description="Cost of the run, USD")
    min_score: float | None = Field(None, ge=0, le=1, description="Lowest acceptable judge score")
    max_tool_error_rate: float | None = Field(
        None, ge=0, le=1, description="Failed tool calls over all tool calls"
    )


class State(_Strict):
    """Where ATLAS keeps its own state: run records and checkpoints. Default: SQLite files in
    the state directory. `$ATLAS_STATE_URL` overrides `url`, and is what `atlas runs`, `resume`
    and `approve` read (they have no task file to read it from)."""

    url: str | None = Field(
        None,
        description="postgresql://user:password@host:5432/db: records and checkpoints in Postgres",
    )

    @field_validator("url")
    @classmethod
    def _postgres(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql:// URL")
        return value


class Cache(_Strict):
    """The model-response cache (`atlas.models.cache`): an identical request (model, settings,
    messages, tools) is answered from the cache at no cost. Off by default; `cache: true` keeps
    responses in `cache.db` in the state directory, `url: redis://...` shares them through Redis.
    `$ATLAS_CACHE_URL` sets the URL (and turns the cache on) for every run of the process."""

    enabled: bool = Field(False, description="Cache model responses (SQLite unless url is set)")
    url: str | None = Field(
        None, description="redis://[user:password@]host:6379/0, or sqlite:///path/cache.db"
    )
    ttl_s: float | None = Field(None, gt=0, description="Forget responses older than this")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(
            ("redis://", "rediss://", "unix://", "sqlite:///")
        ):
            raise ValueError("must be a redis://, rediss:// or sqlite:/// URL")
        return value


ApprovalMode = Literal["always", "never"]


class Approval(_Strict):
    """What a person approves before the run goes on. A pause ends the process with status
    `awaiting_approval`; `atlas approve RUN_ID` decides and resumes.

    Tools are matched by name (`send_email`) or glob (`mcp.crm.*`); MCP tools are named
    `mcp.<server>.<tool>`. A tool that declares side effects (`@atlas.tool(side_effects=True)`,
    or MCP's `destructiveHint: true`) is `always` unless listed here as `never`."""

    plan: bool = Field(False, description="Approve each plan before its steps run")
    tools: dict[str, ApprovalMode] = Field(
        default_factory=dict,
        description="Per tool name or glob: always (ask before each call) or never",
    )

    @field_validator("tools")
    @classmethod
    def _patterns(cls, value: dict[str, str]) -> dict[str, str]:
        for pattern in value:
            if not pattern.strip() or len(pattern) > 200:
                raise ValueError(f"tool pattern {pattern!r} must be 1-200 characters")
        return value

    def mode_for(self, names: Sequence[str], declared_side_effects: bool) -> ApprovalMode:
        """`always` or `never` for a tool known by `names` (its exposed and qualified names):
        an exact name wins over a glob, a longer glob over a shorter one."""
        import fnmatch

        for name in names:
            if name in self.tools:
                return self.tools[name]
        matches = [
            (len(pattern), mode)
            for pattern, mode in self.tools.items()
            if any(fnmatch.fnmatchcase(name, pattern) for name in names)
        ]
        if matches:
            return max(matches)[1]
        return "always" if declared_side_effects else "never"


VERSION_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""Agent version labels name MLflow LoggedModels, whose names refuse `/ : . % " '`: 1-64
letters, digits, dashes and underscores."""


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class McpServer(BaseModel):
    """One MCP server, as declared under `mcpServers`: a local command spoken to over stdio, or a
    streamable HTTP `url`.

    - `command: python` (or `python3`) means the interpreter running ATLAS (`sys.executable`),
      so a server written with the `mcp` SDK finds it installed.
    - A relative `cwd` resolves against the task file's folder, the default working directory;
      a relative `command` path (`./server.sh`) against the working directory.
    - `${VAR}` (or `${VAR:-default}`) is expanded in `env` and `headers` values only
      (`expand_env`), so a token stays out of the task file.
    - `timeout_s` bounds each tool call; `connect_timeout_s` bounds starting (or reaching) the
      server, the MCP handshake and listing its tools.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["stdio", "http", "streamable-http", "streamable_http"] | None = None
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    timeout_s: float = Field(60.0, gt=0, description="Bound on each tool call, in seconds")
    connect_timeout_s: float = Field(
        10.0, gt=0, description="Bound on start or connect, handshake and tool listing"
    )

    @model_validator(mode="before")
    @classmethod
    def _no_sse(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and data.get("type") == "sse":
            raise ValueError(
                "type 'sse' (the old HTTP+SSE transport) is not supported; use the server's "
                "streamable HTTP endpoint: type: http, url: ..."
            )
        return data

    @model_validator(mode="after")
    def _consistent(self) -> McpServer:
        if (self.command is None) == (self.url is None):
            raise ValueError(
                "give exactly one of command (a local server over stdio) or url (streamable HTTP)"
            )
        if self.type == "stdio" and self.command is None:
            raise ValueError("type stdio needs a command, not a url")
        if self.type not in (None, "stdio") and self.url is None:
            raise ValueError(f"type {self.type} needs a url, not a command")
        if self.command is not None:
            if not self.command.strip():
                raise ValueError("command is empty")
            if self.headers:
                raise ValueError("headers are for a url server; a command server takes env")
        elif self.args or self.env or self.cwd is not None:
            raise ValueError(
                "args, env and cwd are for a command server; a url server takes headers"
            )
        fixed = {"command": self.command, "cwd": self.cwd, "url": self.url}
        fixed |= {f"args[{i}]": a for i, a in enumerate(self.args)}
        fixed |= {f"env key {k!r}": k for k in self.env}
        fixed |= {f"header {k!r}": k for k in self.headers}
        for where, value in fixed.items():
            if value and "${" in value:
                raise ValueError(
                    f"{where}: ${{...}} is expanded only in env and headers values; write the "
                    "value itself here"
                )
        if self.url is not None:
            parts = urlsplit(self.url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError("url must be an http:// or https:// URL with a host")
        return self

    @property
    def transport(self) -> Literal["stdio", "http"]:
        return "stdio" if self.command is not None else "http"


def expand_env(name: str, server: McpServer, environ: Mapping[str, str]) -> McpServer:
    """`server` with `${VAR}` and `${VAR:-default}` expanded in its env and headers values.

    A variable that is not set (and has no default) is a SpecError naming the server and field."""

    def expand(value: str, where: str) -> str:
        def sub(match: re.Match[str]) -> str:
            var, default = match[1], match[2]
            if environ.get(var):
                return environ[var]
            if default is not None:
                return default
            if var in environ:
                return ""
            raise SpecError(
                f"mcp server {name!r}: environment variable {var} is not set", field=where
            )

        if value.count("${") != len(_VAR.findall(value)):
            raise SpecError(
                f"mcp server {name!r}: malformed ${{...}} (write ${{NAME}} or ${{NAME:-default}})",
                field=where,
            )
        return _VAR.sub(sub, value)

    base = f"mcp_servers.{name}"
    env = {k: expand(v, f"{base}.env.{k}") for k, v in server.env.items()}
    headers = {k: expand(v, f"{base}.headers.{k}") for k, v in server.headers.items()}
    return server.model_copy(update={"env": env, "headers": headers})


class TaskSpec(_Strict):
    """A job for ATLAS, as written in `task.yaml`."""

    task: str = Field(min_length=1, description="What to do, in plain words")
    name: str | None = Field(None, description="Short name shown in listings")
    acceptance: list[str] = Field(default_factory=list, description="Criteria the judge checks")
    teams: list[str] = Field(default_factory=lambda: list(DEFAULT_TEAMS), min_length=1)
    inputs: Inputs = Field(default_factory=Inputs)
    output: str = Field("output.md", min_length=1, description="Relative to the task file")
    budget: Budget = Field(default_factory=Budget)
    models: Models = Field(default_factory=Models)
    tracing: Tracing = Field(default_factory=Tracing)
    memory: Memory = Field(default_factory=Memory)
    judge: JudgeSettings = Field(default_factory=JudgeSettings)
    alerts: Alerts = Field(default_factory=Alerts)
    approval: Approval = Field(default_factory=Approval)
    state: State = Field(default_factory=State)
    cache: Cache = Field(default_factory=Cache)
    version: str | None = Field(
        None,
        pattern=VERSION_PATTERN,
        description="Names this agent version in MLflow (ATLAS_VERSION overrides it)",
    )
    mcp_servers: dict[str, McpServer] = Field(
        default_factory=dict,
        description="MCP servers; workers list their tools as mcp.<server>.<tool>",
    )
    agents_dir: str | None = Field(None, description="Extra team definitions, relative to file")
    personas_dir: str | None = Field(None, description="Extra personas, relative to the file")
    base_dir: str = Field(".", description="Set by the loader: the task file's directory")
    _found: dict[tuple[str, tuple[str, ...]], _Found] = PrivateAttr(default_factory=dict)
    """Inputs as expanded when first asked for (validation does it): one walk per spec."""

    @field_validator("task")
    @classmethod
    def _task_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("mcp_servers")
    @classmethod
    def _server_names(cls, value: dict[str, McpServer]) -> dict[str, McpServer]:
        return check_server_names(value)

    @field_validator("teams")
    @classmethod
    def _unique_teams(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("lists a team twice")
        return value

    # -- resolved views -------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.base_dir)

    def resolve(self, relative: str) -> Path:
        path = Path(os.path.expanduser(relative))
        return path if path.is_absolute() else (self.root / path).resolve()

    @property
    def output_path(self) -> Path:
        return self.resolve(self.output)

    @property
    def document_paths(self) -> list[Path]:
        """Input documents, each once (by real path)."""
        return _collect(self, self.inputs.documents, kind="documents").files

    @property
    def data_paths(self) -> list[Path]:
        return _collect(self, self.inputs.data, kind="data").files

    @property
    def display_name(self) -> str:
        if self.name:
            return self.name
        first = self.task.strip().splitlines()[0]
        return first if len(first) <= 60 else first[:57] + "..."

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TaskSpec:
        return load_task(path)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base_dir: str | os.PathLike[str] = ".") -> TaskSpec:
        spec = _validate(data, Path(base_dir).resolve(), source="<dict>")
        check_output(spec, source="<dict>")
        return spec


def agent_version_label(spec: TaskSpec, environ: Mapping[str, str] | None = None) -> str | None:
    """The agent version's label: `ATLAS_VERSION` when set, else the task's `version:`.
    Raises SpecError for a label MLflow could not name a model by."""
    value = (os.environ if environ is None else environ).get("ATLAS_VERSION", "").strip()
    if not value:
        return spec.version
    if not re.match(VERSION_PATTERN, value):
        raise SpecError(
            f"ATLAS_VERSION: {value[:70]!r} is not a version label "
            "(1-64 letters, digits, '_' or '-')"
        )
    return value


@dataclasses.dataclass
class _Found:
    """What a list of input patterns names."""

    files: list[Path] = dataclasses.field(default_factory=list)
    """Files to read, each once (by real path), in the order found."""
    origin: list[int] = dataclasses.field(default_factory=list)
    """For each file, the index of the pattern that first named it."""
    refused: list[tuple[int, Path]] = dataclasses.field(default_factory=list)
    """Files found by a glob or folder walk that are symlinks to outside the folder searched."""
    links: list[tuple[int, Path]] = dataclasses.field(default_factory=list)
    """Symlinked folders a walk did not go into (a link such as `docs/loop -> .` would repeat
    every file)."""
    empty: list[int] = dataclasses.field(default_factory=list)
    """Patterns that name no file."""


class _Limit:
    """Bounds one pattern's expansion in files and time; over either it is a SpecError."""

    def __init__(self, pattern: str, where: str, source: str | None) -> None:
        self.pattern, self.where, self.source = pattern, where, source
        self.deadline = time.monotonic() + MAX_GLOB_SECONDS
        self.files = 0
        self.ticks = 0

    def tick(self) -> None:
        self.ticks += 1
        if self.ticks % 256 == 0 and time.monotonic() > self.deadline:
            self._fail(f"takes more than {MAX_GLOB_SECONDS:g} s to expand")

    def add_file(self) -> None:
        self.files += 1
        if self.files > MAX_MATCHES:
            self._fail(f"matches more than {MAX_MATCHES} files")

    def _fail(self, what: str) -> None:
        raise SpecError(
            f"{self.pattern!r} {what}; narrow the pattern", file=self.source, field=self.where
        )


def _collect(
    spec: TaskSpec, patterns: list[str], *, kind: str = "documents", source: str | None = None
) -> _Found:
    """Expand input patterns: globs (`*`, `?`, `[...]`, `**`) and folders (every file below).
    Walks never go into symlinked folders, so a link loop cannot repeat files; a file is kept
    once, by its real path. Bounded by MAX_MATCHES files and MAX_GLOB_SECONDS per pattern.
    Kept on the spec: a spec's inputs are walked once."""
    key = (kind, tuple(patterns))
    cached = spec._found.get(key)
    if cached is not None:
        return cached
    found = _Found()
    seen: set[Path] = set()
    for index, pattern in enumerate(patterns):
        limit = _Limit(pattern, f"inputs.{kind}[{index}]", source)
        full = spec.resolve(pattern)
        hits = 0
        candidates: list[tuple[Path, Path | None]]
        if glob.has_magic(str(full)):
            parts = full.parts
            first_magic = next(i for i, part in enumerate(parts) if glob.has_magic(part))
            base = Path(*parts[:first_magic])
            candidates = [
                (m, base) for m in _glob(base, parts[first_magic:], limit, found.links, index)
            ]
        else:
            candidates = [(full, None)]
        for path, searched in candidates:
            walked: list[tuple[Path, Path | None]]
            if path.is_dir():
                walked = [(p, path) for p in _walk(path, limit, found.links, index)]
            elif path.is_file():
                walked = [(path, searched)]
            else:
                continue
            for file, folder in walked:
                hits += 1
                if folder is not None and not _inside(file, folder):
                    found.refused.append((index, file))
                    continue
                real = file.resolve()
                if real in seen:
                    continue
                limit.add_file()
                seen.add(real)
                found.files.append(file)
                found.origin.append(index)
        if not hits:
            found.empty.append(index)
    spec._found[key] = found
    return found


def _glob(
    folder: Path, parts: tuple[str, ...], limit: _Limit, links: list[tuple[int, Path]], index: int
) -> Iterator[Path]:
    """Paths under `folder` matching the pattern `parts`, like glob.glob(recursive=True) but
    without following symlinked folders for `**` (hidden names need a pattern starting with .)."""
    if not parts:
        yield folder
        return
    head, tail = parts[0], parts[1:]
    if head == "**":
        yield from _glob(folder, tail, limit, links, index)
        for sub in _subfolders(folder, limit, links, index, hidden=False):
            yield from _glob(sub, parts, limit, links, index)
        return
    if not glob.has_magic(head):
        path = folder / head
        if os.path.lexists(path):
            yield from _glob(path, tail, limit, links, index)
        return
    for entry in _entries(folder, limit):
        if entry.name.startswith(".") and not head.startswith("."):
            continue
        if not fnmatch.fnmatchcase(entry.name, head):
            continue
        path = Path(entry.path)
        if not tail:
            yield path
        elif _is_dir(entry):
            yield from _glob(path, tail, limit, links, index)


def _entries(folder: Path, limit: _Limit) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(folder) as it:
            entries = []
            for entry in it:
                limit.tick()
                entries.append(entry)
    except OSError:
        return []
    return sorted(entries, key=lambda e: e.name)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _subfolders(
    folder: Path,
    limit: _Limit,
    links: list[tuple[int, Path]],
    index: int,
    *,
    hidden: bool,
) -> Iterator[Path]:
    for entry in _entries(folder, limit):
        if not hidden and entry.name.startswith("."):
            continue
        if not _is_dir(entry):
            continue
        if entry.is_symlink():
            links.append((index, Path(entry.path)))
            continue
        yield Path(entry.path)


def _walk(folder: Path, limit: _Limit, links: list[tuple[int, Path]], index: int) -> Iterator[Path]:
    """Every file below `folder` (hidden ones too), sorted, not going into symlinked folders."""
    for entry in _entries(folder, limit):
        path = Path(entry.path)
        if _is_dir(entry):
            if entry.is_symlink():
                links.append((index, path))
            else:
                yield from _walk(path, limit, links, index)
        elif path.is_file():
            yield path


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def input_warnings(spec: TaskSpec) -> list[str]:
    """One line per input that will not be read: a document that is not a text file, is binary
    or cannot be read, and a symlinked folder that a walk did not go into. Cheap: it reads only
    the first few kilobytes of each document."""
    from atlas.tools.documents import unindexable_reason

    lines: list[str] = []
    for kind, patterns in (("documents", spec.inputs.documents), ("data", spec.inputs.data)):
        found = _collect(spec, patterns, kind=kind)
        if kind == "documents":
            for path, index in zip(found.files, found.origin, strict=True):
                reason = unindexable_reason(path)
                if reason is not None:
                    lines.append(
                        f"inputs.documents[{index}]: {_shown(spec, path)} will not be indexed: "
                        f"{reason}"
                    )
        for index, link in dict.fromkeys(found.links):
            lines.append(
                f"inputs.{kind}[{index}]: {_shown(spec, link)} is a symlinked folder and is not "
                "followed; name it in the task to read it"
            )
    return [_one_line(line) for line in lines]


def indexed_documents(spec: TaskSpec) -> list[Path]:
    """The documents that will be indexed (those `input_warnings` does not name)."""
    from atlas.tools.documents import unindexable_reason

    return [p for p in spec.document_paths if unindexable_reason(p) is None]


def _shown(spec: TaskSpec, path: Path) -> str:
    try:
        return str(Path(os.path.abspath(path)).relative_to(spec.root))
    except ValueError:
        return str(path)


def json_schema() -> dict[str, Any]:
    """JSON Schema for task files, for editors (`python -m atlas schema`)."""
    schema = TaskSpec.model_json_schema(mode="validation")
    schema["properties"].pop("base_dir", None)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "ATLAS task file"
    # Model specs accept a plain "provider:model" string as well as the mapping.
    defs = schema.get("$defs", {})
    if "ModelSpec" in defs:
        defs["ModelSpecOrString"] = {
            "anyOf": [
                {"type": "string", "examples": ["openai:gpt-4o-mini"]},
                {"$ref": "#/$defs/ModelSpec"},
            ]
        }
        text = json.dumps(schema).replace('"#/$defs/ModelSpec"', '"#/$defs/ModelSpecOrString"')
        schema = json.loads(text)
        schema["$defs"]["ModelSpecOrString"]["anyOf"][1] = {"$ref": "#/$defs/ModelSpec"}
    return schema


# -- loading ---------------------------------------------------------------------------------


def load_task(
    path: str | os.PathLike[str],
    *,
    known_teams: list[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TaskSpec:
    """Read, validate and resolve a task file. Every failure is a one-line `SpecError`.

    `overrides` are merged into the file's fields before validation (mappings key by key, so
    `{"budget": {"max_iterations": 2}}` keeps the file's other budget settings): how an
    evaluation's variant changes a task without a copy of its file."""
    file = Path(path)
    shown = str(path)
    if not file.exists():
        raise SpecError("file not found", file=shown)
    if file.is_dir():
        raise SpecError("is a directory, expected a task YAML file", file=shown)
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read: {exc.strerror}", file=shown) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError("not a text file (expected UTF-8 YAML)", file=shown) from None
    if "\x00" in text:
        raise SpecError("not a text file (contains NUL bytes)", file=shown)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise SpecError(f"not valid YAML{where}: {problem}", file=shown) from None
    except (ValueError, RecursionError):
        raise SpecError("not valid YAML", file=shown) from None
    if data is None:
        raise SpecError("file is empty; expected a mapping with at least 'task'", file=shown)
    if overrides and isinstance(data, dict):
        data = merge_fields(data, overrides)
    spec = _validate(data, file.resolve().parent, source=shown)
    check_inputs(spec, source=shown, known_teams=known_teams, task_file=file)
    return spec


def merge_fields(data: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`data` with `overrides` merged in: nested mappings key by key, everything else replaced."""
    out = dict(data)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_fields(out[key], value)
        else:
            out[key] = value
    return out


def _validate(data: Any, base_dir: Path, *, source: str) -> TaskSpec:
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise SpecError(
            f"top level must be a mapping with at least 'task', got {kind}", file=source
        )
    if "base_dir" in data:
        raise SpecError("unknown field (set by the loader)", file=source, field="base_dir")
    _check_size(data, source)
    try:
        return TaskSpec.model_validate({**data, "base_dir": str(base_dir)})
    except ValidationError as exc:
        raise _spec_error(exc, source) from None
    except RecursionError:
        raise SpecError("structure is nested too deeply", file=source) from None


def _check_size(data: Any, source: str) -> None:
    """Refuse a document that is huge once expanded: YAML aliases let a few lines stand for
    billions of values ("billion laughs"), which validation and dumping would expand. Every
    reference to a shared node counts, each time it is referenced."""
    count = 0
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise SpecError(
                f"expands to more than {MAX_VALUES} values (YAML aliases?)", file=source
            )
        if depth > MAX_DEPTH:
            raise SpecError(
                f"structure is nested too deeply (more than {MAX_DEPTH} levels)", file=source
            )
        if isinstance(node, dict):
            for key, value in node.items():
                stack.append((key, depth + 1))
                stack.append((value, depth + 1))
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend((item, depth + 1) for item in node)


def check_inputs(
    spec: TaskSpec,
    *,
    source: str,
    known_teams: list[str] | None = None,
    task_file: str | os.PathLike[str] | None = None,
) -> None:
    """Checks that need the file system or the team registry. With `task_file`, the output may
    not be that file either."""
    if known_teams is None:
        from atlas.registry import Registry

        known_teams = Registry.for_spec(spec).team_names()
    for index, team in enumerate(spec.teams):
        if team not in known_teams:
            hint = _did_you_mean(team, known_teams)
            raise SpecError(
                f"unknown team {team!r}{hint} (known: {', '.join(known_teams)})",
                file=source,
                field=f"teams[{index}]",
            )
    for team in spec.models.teams:
        if team not in spec.teams:
            raise SpecError(
                f"model set for team {team!r}, which this task does not use",
                file=source,
                field=f"models.teams.{team}",
            )
    collected: dict[str, _Found] = {}
    for kind, patterns in (("documents", spec.inputs.documents), ("data", spec.inputs.data)):
        found = _collect(spec, patterns, kind=kind, source=source)
        collected[kind] = found
        for index, file in found.refused[:1]:
            raise SpecError(
                f"{file} is a symlink to {file.resolve()}, outside the folder "
                "searched; name the file directly if it is meant to be read",
                file=source,
                field=f"inputs.{kind}[{index}]",
            )
        for index in found.empty[:1]:
            pattern = patterns[index]
            raise SpecError(
                f"no file matches {pattern!r} (looked in {spec.resolve(pattern).parent})",
                file=source,
                field=f"inputs.{kind}[{index}]",
            )
    data = collected["data"]
    for path, index in zip(data.files, data.origin, strict=True):
        if path.suffix.lower() not in (".csv", ".tsv", ".parquet", ".json", ".jsonl"):
            raise SpecError(
                f"{path.name}: unsupported data file (use .csv, .tsv, .parquet, .json or .jsonl)",
                file=source,
                field=f"inputs.data[{index}]",
            )
    inputs = (collected["documents"].files, data.files)
    check_output(spec, source=source, inputs=inputs, task_file=task_file)
    for name in ("agents_dir", "personas_dir"):
        value = getattr(spec, name)
        if value and not spec.resolve(value).is_dir():
            raise SpecError(f"directory not found: {spec.resolve(value)}", file=source, field=name)


def check_output(
    spec: TaskSpec,
    *,
    source: str,
    inputs: tuple[list[Path], list[Path]] | None = None,
    task_file: str | os.PathLike[str] | None = None,
) -> None:
    """The output can be written, without overwriting anything the task reads: not the task
    file, an input document or data file; not through a symlink; not a folder or device; and
    its folder exists or can be made, and takes a file (tried, and nothing is left behind)."""

    def refuse(message: str) -> SpecError:
        return SpecError(message, file=source, field="output")

    if inputs is None:
        inputs = (spec.document_paths, spec.data_paths)
    literal = _literal(spec, spec.output)
    for name in literal.parts:
        if len(os.fsencode(name)) > 255:
            raise refuse(f"a name in the path is too long ({len(os.fsencode(name))} bytes)")
    try:
        _check_output_path(spec, literal, inputs, task_file, refuse)
    except OSError as exc:
        raise refuse(f"cannot use {literal}: {exc.strerror or exc}") from None


def _check_output_path(
    spec: TaskSpec,
    literal: Path,
    inputs: tuple[list[Path], list[Path]],
    task_file: str | os.PathLike[str] | None,
    refuse: Callable[[str], SpecError],
) -> None:
    # Symlinks: the output itself, and any folder on the way to it below the task's folder.
    try:
        below = literal.relative_to(spec.root).parts
        steps = [spec.root.joinpath(*below[: i + 1]) for i in range(len(below))]
    except ValueError:
        steps = [literal]
    for step in steps:
        if step.is_symlink():
            what = "output" if step == literal else f"output folder {_shown(spec, step)}"
            raise refuse(
                f"{what} is a symlink to {os.readlink(step)}; ATLAS does not write through "
                "links — name the real path"
            )
    if literal.is_dir():
        raise refuse(f"{literal} is a directory")
    if literal.exists() and not literal.is_file():
        raise refuse(f"{literal} exists and is not a regular file")
    real = literal.resolve()
    partial = real.with_name(real.stem + ".partial.md")
    protected: dict[Path, str] = {}
    for what, paths in zip(("an input document", "a data file"), inputs, strict=True):
        for path in paths:
            protected.setdefault(path.resolve(), f"{what} ({_shown(spec, path)})")
    if task_file is not None:
        protected[Path(task_file).resolve()] = f"the task file itself ({Path(task_file).name})"
    for target, label in ((real, "output"), (partial, "output's partial file")):
        if target in protected:
            raise refuse(f"the {label} would overwrite {protected[target]}; choose another path")
    # The nearest folder that exists must be a folder, and must take a new file.
    ancestor = literal.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise refuse(f"{ancestor} is a file, not a folder, so {literal} cannot be written")
    try:
        handle, probe = tempfile.mkstemp(prefix=".atlas-write-check-", dir=ancestor)
    except OSError as exc:
        raise refuse(f"cannot write in {ancestor}: {exc.strerror or exc}") from None
    os.close(handle)
    os.unlink(probe)


def _literal(spec: TaskSpec, relative: str) -> Path:
    """A path from the task as written, made absolute without following symlinks."""
    path = Path(os.path.expanduser(relative))
    return Path(os.path.abspath(path if path.is_absolute() else spec.root / path))


def _spec_error(exc: ValidationError, source: str) -> SpecError:
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = tuple(first["loc"])
    field = _loc_str(loc)
    kind = first["type"]
    if kind == "extra_forbidden":
        name = str(loc[-1])
        hint = _did_you_mean(name, _fields_at(loc[:-1]))
        message = f"unknown field{hint}"
    elif kind == "missing":
        message = "required field is missing"
    else:
        message = first["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        got = first.get("input")
        if kind not in ("model_type", "dict_type") and isinstance(got, (int, float, str, bool)):
            if isinstance(got, str):
                from atlas.tracing.redact import scrub_text, secret_values

                got = scrub_text(got, secret_values())
            shown = repr(got)
            if len(shown) > 40:
                shown = shown[:37] + "..."
            message += f" (got {shown})"
    if len(errors) > 1:
        message += f" [and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''}]"
    return SpecError(_one_line(message), file=source, field=field or None)


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


def _loc_str(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            text = str(part)
            # A key that would vanish or blur in a dotted path is shown quoted.
            if not text or not text.isprintable() or any(c in text for c in ".[] :"):
                text = repr(text)
            out += ("." if out else "") + text
    return out


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    model: type[BaseModel] | None = TaskSpec
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            # a dict key such as models.teams.<name>
            model = ModelSpec if str(part) not in ("teams",) else None
            continue
        model = _model_of(field.annotation)
    if model is None:
        return []
    return [name for name in model.model_fields if name != "base_dir"]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_of(arg)
        if found is not None:
            return found
    return None


_SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_server_names(value: dict[str, McpServer]) -> dict[str, McpServer]:
    """MCP server names appear in tool references (`mcp.<server>.<tool>`): no dots."""
    for name in value:
        if not _SERVER_NAME.match(name):
            raise ValueError(
                f"MCP server name {name!r}: use letters, digits, '_' and '-' (it goes in "
                "mcp.<server>.<tool>)"
            )
    return value


def _did_you_mean(name: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
