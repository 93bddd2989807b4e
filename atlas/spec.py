"""The task file (`task.yaml`) and how it is validated.

Pydantic lives here, at the edge. `load_task()` turns a file into a `TaskSpec`, resolves every path
relative to the file, and turns any problem into one `SpecError` line that names the file and the
field path.
"""

from __future__ import annotations

import difflib
import glob
import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from atlas.errors import SpecError

DEFAULT_TEAMS = ("research", "analysis", "writing")

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
    text = value.strip()
    for prefix, provider in _INFERRED.items():
        if text.startswith(prefix):
            text = f"{provider}:{text}"
            break
    match = _MODEL_RE.match(text)
    if not match:
        raise ValueError(
            f"malformed model spec {value!r}: expected provider:model, e.g. openai:gpt-4o-mini"
        )
    provider, name, query = match["provider"], match["name"] or "", match["query"] or ""
    if provider not in PROVIDERS:
        raise ValueError(
            f"unknown provider {provider!r} in model spec {value!r} (known: {', '.join(PROVIDERS)})"
        )
    if provider in ("openai", "anthropic") and not name:
        raise ValueError(f"model spec {value!r} names no model, e.g. {provider}:<model-name>")
    params: dict[str, Any] = {}
    for pair in filter(None, query.split("&")):
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ValueError(
                f"malformed option {pair!r} in model spec {value!r}: expected key=value"
            )
        params[key] = _coerce(raw)
    return provider, name, params


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


class JudgeSettings(_Strict):
    pass_threshold: float = Field(0.7, ge=0, le=1, description="Minimum score to pass")


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
    agents_dir: str | None = Field(None, description="Extra team definitions, relative to file")
    personas_dir: str | None = Field(None, description="Extra personas, relative to the file")
    base_dir: str = Field(".", description="Set by the loader: the task file's directory")

    @field_validator("task")
    @classmethod
    def _task_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

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
        return _expand(self, self.inputs.documents)

    @property
    def data_paths(self) -> list[Path]:
        return _expand(self, self.inputs.data)

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
        return _validate(data, Path(base_dir).resolve(), source="<dict>")


def _expand(spec: TaskSpec, patterns: list[str]) -> list[Path]:
    return _matches(spec, patterns)[0]


def _matches(spec: TaskSpec, patterns: list[str]) -> tuple[list[Path], list[Path]]:
    """The files the patterns name, and the ones refused: files found by a glob or a folder
    walk that are symlinks to somewhere outside the folder searched (a path named outright is
    the user's choice and is kept)."""
    found: list[Path] = []
    refused: list[Path] = []
    for pattern in patterns:
        full = str(spec.resolve(pattern))
        candidates: list[tuple[Path, Path | None]]
        if glob.has_magic(full):
            parts = Path(full).parts
            first_magic = next(i for i, part in enumerate(parts) if glob.has_magic(part))
            base = Path(*parts[:first_magic])
            candidates = [(Path(m), base) for m in sorted(glob.glob(full, recursive=True))]
        else:
            candidates = [(Path(full), None)]
        for path, searched in candidates:
            walked: list[tuple[Path, Path | None]]
            if path.is_dir():
                walked = [(p, path) for p in sorted(path.rglob("*")) if p.is_file()]
            elif path.is_file():
                walked = [(path, searched)]
            else:
                continue
            for file, folder in walked:
                if folder is not None and not _inside(file, folder):
                    refused.append(file)
                else:
                    found.append(file)
    # keep order, drop duplicates
    return list(dict.fromkeys(found)), refused


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


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


def load_task(path: str | os.PathLike[str], *, known_teams: list[str] | None = None) -> TaskSpec:
    """Read, validate and resolve a task file. Every failure is a one-line `SpecError`."""
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
    spec = _validate(data, file.resolve().parent, source=shown)
    check_inputs(spec, source=shown, known_teams=known_teams)
    return spec


def _validate(data: Any, base_dir: Path, *, source: str) -> TaskSpec:
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise SpecError(
            f"top level must be a mapping with at least 'task', got {kind}", file=source
        )
    if "base_dir" in data:
        raise SpecError("unknown field (set by the loader)", file=source, field="base_dir")
    try:
        return TaskSpec.model_validate({**data, "base_dir": str(base_dir)})
    except ValidationError as exc:
        raise _spec_error(exc, source) from None
    except RecursionError:
        raise SpecError("structure is nested too deeply", file=source) from None


def check_inputs(spec: TaskSpec, *, source: str, known_teams: list[str] | None = None) -> None:
    """Checks that need the file system or the team registry."""
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
    for kind, patterns in (("documents", spec.inputs.documents), ("data", spec.inputs.data)):
        for index, pattern in enumerate(patterns):
            kept, refused = _matches(spec, [pattern])
            if refused:
                raise SpecError(
                    f"{refused[0]} is a symlink to {refused[0].resolve()}, outside the folder "
                    "searched; name the file directly if it is meant to be read",
                    file=source,
                    field=f"inputs.{kind}[{index}]",
                )
            if not kept:
                raise SpecError(
                    f"no file matches {pattern!r} (looked in {spec.resolve(pattern).parent})",
                    file=source,
                    field=f"inputs.{kind}[{index}]",
                )
    for index, path in enumerate(spec.data_paths):
        if path.suffix.lower() not in (".csv", ".tsv", ".parquet", ".json", ".jsonl"):
            raise SpecError(
                f"{path.name}: unsupported data file (use .csv, .tsv, .parquet, .json or .jsonl)",
                file=source,
                field=f"inputs.data[{index}]",
            )
    out = spec.output_path
    if out.exists() and out.is_dir():
        raise SpecError(f"{out} is a directory", file=source, field="output")
    for name in ("agents_dir", "personas_dir"):
        value = getattr(spec, name)
        if value and not spec.resolve(value).is_dir():
            raise SpecError(f"directory not found: {spec.resolve(value)}", file=source, field=name)


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


def _did_you_mean(name: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""
