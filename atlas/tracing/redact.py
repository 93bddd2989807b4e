"""A span processor: no secrets and no bulky payloads leave the process in a trace.

- Secrets: the values of environment variables whose names look secret (`*_KEY`, `*TOKEN*`,
  `*SECRET*`, `*PASSWORD*`), strings shaped like provider keys (`sk-...`) and passwords in URLs
  are replaced by `[REDACTED]` in span inputs, outputs and attributes (and in run records).
- Size: graph-node spans carry the whole graph state by default. Any input, output or attribute
  larger than `MAX_FIELD_CHARS` is cut, so a trace stays small however long the run.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

log = logging.getLogger("atlas.tracing")

MAX_FIELD_CHARS = 2500
_SECRET_NAME = re.compile(r"(_KEY|TOKEN|SECRET|PASSWORD|_PAT)$|^(OPENAI|ANTHROPIC)_API_KEY$", re.I)
_KEY_SHAPE = re.compile(r"\b(sk-(?:ant-|proj-)?[A-Za-z0-9_\-]{16,})\b")
_SECRET_OPTION = re.compile(r"key|token|secret|password|authorization|credential|cookie", re.I)
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@", re.I)
REDACTED = "[REDACTED]"


def secret_option(name: str) -> bool:
    """Whether a provider option's name says its value is secret (`api_key`, `X-Gateway-Token`,
    `Authorization`); `*_env` options name an environment variable, not a secret."""
    return bool(_SECRET_OPTION.search(name)) and not name.endswith("_env")


def secret_values() -> list[str]:
    """Secret-looking environment values, longest first (so no prefix is left behind)."""
    values = {v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8}
    return sorted(values, key=len, reverse=True)


def scrub_text(text: str, secrets: list[str]) -> str:
    """Secret values, key-shaped strings and passwords in URLs replaced by `[REDACTED]`."""
    for value in secrets:
        if value in text:
            text = text.replace(value, REDACTED)
    text = _URL_PASSWORD.sub(rf"\1{REDACTED}@", text)
    return _KEY_SHAPE.sub(REDACTED, text)


def scrub(value: Any, secrets: list[str], limit: int = MAX_FIELD_CHARS) -> Any:
    """Redact secrets anywhere in a JSON-like value, then cut it to about `limit` characters."""
    return _cap(_redact(value, secrets, limit), limit)


def _redact(value: Any, secrets: list[str], limit: int) -> Any:
    if isinstance(value, str):
        text = scrub_text(value, secrets)
        return text if len(text) <= limit else text[:limit] + f"...[cut {len(text) - limit} chars]"
    if isinstance(value, dict):
        return {str(k): _redact(v, secrets, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v, secrets, limit) for v in value]
    return value


def _cap(value: Any, limit: int) -> Any:
    """Serialise once; only a value that is too large is summarised, entry by entry."""
    if not isinstance(value, dict | list):
        return value
    try:
        size = len(json.dumps(value, default=str))
    except (TypeError, ValueError):
        return value
    if size <= limit * 2:
        return value
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            text = json.dumps(item, default=str)
            out[key] = item if len(text) <= 300 else _summary(item, text)
        return out
    return [*value[:5], f"...[{len(value) - 5} more items cut]"] if len(value) > 5 else value


def _summary(value: Any, text: str) -> str:
    kind = type(value).__name__
    size = len(value) if isinstance(value, dict | list | str) else 1
    return f"[{kind} with {size} entries, {len(text)} chars, cut: {text[:200]}...]"


def make_processor() -> Any:
    """The function MLflow calls on every span before export."""

    def process(span: Any) -> None:
        secrets = secret_values()
        try:
            inputs = span.inputs
            if inputs is not None:
                span.set_inputs(scrub(inputs, secrets))
            outputs = span.outputs
            if outputs is not None:
                span.set_outputs(scrub(outputs, secrets))
            attributes = span.attributes or {}
            cleaned = {
                k: scrub(v, secrets)
                for k, v in attributes.items()
                if not k.startswith("mlflow.span")
            }
            changed = {k: v for k, v in cleaned.items() if v != attributes.get(k)}
            if changed:
                span.set_attributes(changed)
        except Exception as exc:  # telemetry never fails a run
            log.debug("could not clean span %s: %s", getattr(span, "name", "?"), exc)

    return process
