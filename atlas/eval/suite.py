"""An evaluation suite (`atlas eval SUITE.yaml`): cases, variants, scorers and the gate.

```yaml
name: briefs
cases:
  - task: tasks/brief.yaml              # a task file, relative to the suite
    expect: {passed: true, min_score: 0.7}
  - template: tasks/summary.yaml        # one task file as a template: {name} in its task and
    rows:                               # acceptance texts is filled from each row
      - {topic: rider feedback}
      - {topic: maintenance}
variants:                               # each is its own evaluation run; the first is the
  baseline: {}                          # baseline unless --baseline names an earlier eval
  strict: {personas_dir: personas-strict, model: "openai:gpt-4o-mini"}
scorers: [mypkg.scorers:cites_sources]  # the user's own, by import string
gate: {max_score_drop: 0.05, max_pass_rate_drop: 0.0}
```

A variant's fields are task-file fields merged into every case (`personas_dir`, `agents_dir`,
`models`, `budget`, ...), paths relative to the suite; `model` replaces every role's model, as
`--model` does. `--variant NAME=field=value,field=value` adds one from the command line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from atlas.errors import SpecError

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_PATH_FIELDS = ("personas_dir", "agents_dir")


class Expect(BaseModel):
    model_config = ConfigDict(extra="forbid")
    passed: bool | None = None
    min_score: float | None = Field(None, ge=0, le=1)


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str | None = None
    template: str | None = None
    rows: list[dict[str, Any]] = Field(default_factory=list)
    name: str | None = None
    expect: Expect = Field(default_factory=Expect)

    def model_post_init(self, __context: Any) -> None:
        if bool(self.task) == bool(self.template):
            raise ValueError("give `task` (a task file) or `template` with `rows`")
        if self.template and not self.rows:
            raise ValueError("a template needs `rows`")


class Gate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_score_drop: float = Field(0.05, ge=0, le=1)
    """A variant fails the gate when its mean judge score is lower than the baseline's by more."""
    max_pass_rate_drop: float = Field(0.0, ge=0, le=1)
    """... or when its share of passed cases is lower by more."""


def _default_variants() -> dict[str, dict[str, Any]]:
    return {"default": {}}


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "eval"
    cases: list[Case] = Field(min_length=1)
    variants: dict[str, dict[str, Any]] = Field(default_factory=_default_variants)
    scorers: list[str] = Field(default_factory=list)
    gate: Gate = Field(default_factory=Gate)
    base_dir: str = "."

    @field_validator("variants")
    @classmethod
    def _names(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for name in value:
            if not re.match(_NAME, name):
                raise ValueError(f"variant name {name!r}: letters, digits, '_', '.', '-'")
        return value

    @property
    def root(self) -> Path:
        return Path(self.base_dir)


def load_suite(path: str | Path) -> Suite:
    file = Path(path)
    if not file.is_file():
        raise SpecError("file not found", file=str(path))
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SpecError(f"not valid YAML: {type(exc).__name__}", file=str(path)) from None
    if not isinstance(data, dict):
        raise SpecError("expected a mapping with `cases`", file=str(path))
    data.setdefault("variants", {"default": {}})
    if not data["variants"]:
        data["variants"] = {"default": {}}
    try:
        suite = Suite.model_validate({**data, "base_dir": str(file.resolve().parent)})
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise SpecError(
            error["msg"].removeprefix("Value error, "), file=str(path), field=where
        ) from None
    return suite


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """`NAME=field=value,field=value` (values are YAML: numbers, true/false, strings; a dotted
    field sets a nested one, `budget.max_iterations=2`)."""
    name, sep, rest = text.partition("=")
    if not sep or not re.match(_NAME, name):
        raise SpecError(f"{text!r}: write NAME=field=value[,field=value]", field="--variant")
    fields: dict[str, Any] = {}
    for part in filter(None, rest.split(",")):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise SpecError(f"{part!r}: write field=value", field="--variant")
        target = fields
        *parents, leaf = key.strip().split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
        try:
            target[leaf] = yaml.safe_load(value)
        except yaml.YAMLError:
            target[leaf] = value
    return name, fields


def variant_fields(suite: Suite, fields: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """(task-field overrides with paths made absolute, the `model` override or None)."""
    out = dict(fields)
    model = out.pop("model", None)
    for key in _PATH_FIELDS:
        if isinstance(out.get(key), str):
            out[key] = str((suite.root / out[key]).resolve())
    return out, model


def expand_cases(suite: Suite) -> list[tuple[str, str, dict[str, Any], Expect]]:
    """Every case as (name, task file, overrides, expectation): a template gives one per row."""
    out: list[tuple[str, str, dict[str, Any], Expect]] = []
    for number, case in enumerate(suite.cases, start=1):
        if case.task:
            path = (suite.root / case.task).resolve()
            out.append(
                (case.name or f"{number}:{Path(case.task).stem}", str(path), {}, case.expect)
            )
            continue
        assert case.template is not None
        path = (suite.root / case.template).resolve()
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
        if not isinstance(data, dict):
            raise SpecError("template not found or not a task file", file=str(path))
        for row_number, row in enumerate(case.rows, start=1):
            try:
                fields: dict[str, Any] = {"task": str(data.get("task", "")).format_map(row)}
                if isinstance(data.get("acceptance"), list):
                    fields["acceptance"] = [str(a).format_map(row) for a in data["acceptance"]]
            except (KeyError, ValueError) as exc:
                raise SpecError(
                    f"row {row_number}: the template names {exc} which the row lacks",
                    file=str(path),
                ) from None
            label = case.name or Path(case.template).stem
            out.append((f"{number}.{row_number}:{label}", str(path), fields, case.expect))
    return out
