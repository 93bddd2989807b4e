"""A span processor: no secrets and no bulky payloads leave the process in a trace.

- Secrets: the values of environment variables whose names look secret (`*_KEY`, `*TOKEN*`,
  `*SECRET*`, `*PASSWORD*`), secrets given in model strings and task options (registered with
  `register_secret` when a model is resolved), secret-named query options (`?api_key=...`),
  strings shaped like provider keys (`sk-...`) and passwords in URLs are replaced by
  `[REDACTED]` in span inputs, outputs and attributes (and in run records and console lines).
- Size: graph-node spans carry the whole graph state by default. Any input, output or attribute
  larger than `MAX_FIELD_CHARS` is cut, so a trace stays small however long the run.

`public_model` and `public_url` give the form of a model string or URL that may be shown or
stored anywhere.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("atlas.tracing")

MAX_FIELD_CHARS = 2500
MIN_SECRET_CHARS = 6
"""Shorter registered values are not redacted by value (they would blank out ordinary words)."""
_SECRET_NAME = re.compile(r"(_KEY|TOKEN|SECRET|PASSWORD|_PAT)$|^(OPENAI|ANTHROPIC)_API_KEY$", re.I)
_KEY_SHAPE = re.compile(r"\b(sk-(?:ant-|proj-)?[A-Za-z0-9_\-]{16,})\b")
_SECRET_OPTION = re.compile(
    r"key|token|secret|password|passwd|authorization|credential|cookie", re.I
)
_COUNT_NAME = re.compile(r"tokens", re.I)
"""`max_tokens`, `max_new_tokens`: counts of tokens, not secrets."""
# user:password@ in a URL; the password runs to the last "@" before the path.
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^/\s]*@", re.I)
# name=value after "?" or "&": a query option, in a model string or a URL, inside any text.
_QUERY_OPTION = re.compile(r"(?<=[?&])([A-Za-z0-9_.\-]+)=([^&\s'\"<>]+)")
_AUTH_SCHEME = re.compile(r"^(bearer|basic|token)\s+(\S+)$", re.I)
REDACTED = "[REDACTED]"

_known: set[str] = set()
_known_lock = threading.Lock()


def secret_option(name: str) -> bool:
    """Whether a provider option's name says its value is secret (`api_key`, `X-Gateway-Token`,
    `Authorization`); `*_env` options name an environment variable, not a secret, and
    `max_tokens` is a count."""
    if name.endswith("_env"):
        return False
    return bool(_SECRET_OPTION.search(_COUNT_NAME.sub("", name)))


def register_secret(value: Any) -> None:
    """Remember a secret given outside the environment (a model string's `api_key`, a task
    file's header token) so that every later span, record and console line of this process
    redacts it. For `Bearer <token>` the token alone is remembered too."""
    if not isinstance(value, str):
        return
    value = value.strip()
    found = {value}
    scheme = _AUTH_SCHEME.match(value)
    if scheme:
        found.add(scheme[2])
    keep = {v for v in found if len(v) >= MIN_SECRET_CHARS and REDACTED not in v}
    if keep:
        with _known_lock:
            _known.update(keep)


def register_secrets(options: Mapping[str, Any]) -> None:
    """`register_secret` for every value under a secret-named option, at any depth, and for
    every password in a URL among the values."""
    _register(options, secret=False)


def _register(value: Any, *, secret: bool) -> None:
    if isinstance(value, Mapping):
        for name, item in value.items():
            _register(item, secret=secret or secret_option(str(name)))
    elif isinstance(value, list | tuple):
        for item in value:
            _register(item, secret=secret)
    elif isinstance(value, str):
        if secret:
            register_secret(value)
        elif "://" in value:
            try:
                password = urlsplit(value.strip()).password
            except ValueError:
                password = None
            register_secret(password)
    elif secret and isinstance(value, int | float) and not isinstance(value, bool):
        register_secret(str(value))


def secret_values() -> list[str]:
    """Secret-looking environment values and registered secrets, longest first (so no prefix
    is left behind)."""
    values = {v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= 8}
    with _known_lock:
        values |= _known
    return sorted(values, key=len, reverse=True)


def _query_option(match: re.Match[str]) -> str:
    return f"{match[1]}={REDACTED}" if secret_option(match[1]) else match[0]


def scrub_text(text: str, secrets: list[str]) -> str:
    """Secret values, secret-named query options, passwords in URLs and key-shaped strings
    replaced by `[REDACTED]`."""
    for value in secrets:
        if value in text:
            text = text.replace(value, REDACTED)
    text = _URL_PASSWORD.sub(rf"\1{REDACTED}@", text)
    text = _QUERY_OPTION.sub(_query_option, text)
    return _KEY_SHAPE.sub(REDACTED, text)


def public_url(url: str) -> str:
    """`url` with its password and its secret-named query options (`?token=`) replaced by
    `[REDACTED]`; everything else kept. Idempotent."""
    return scrub_text(url, [])


def public_model(model: str) -> str:
    """A `provider:model?name=value&...` string as it may be shown and stored: the value of
    every secret-named option (`api_key`, `x-token`, ...) is `[REDACTED]`, and so are passwords
    in URLs (`base_url=https://user:pw@host`), secrets inside JSON-valued options and
    key-shaped strings. The provider, model name and other options are kept. Idempotent."""
    head, sep, query = model.partition("?")
    head = scrub_text(head, [])
    if not sep:
        return head
    return f"{head}?{'&'.join(_public_option(pair) for pair in query.split('&'))}"


def _public_option(pair: str) -> str:
    name, eq, value = pair.partition("=")
    if not eq:
        return scrub_text(pair, [])
    if secret_option(name):
        return f"{name}={REDACTED}" if value else pair
    return f"{name}={_public_value(value)}"


def _public_value(value: str) -> str:
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict | list):
        cleaned = _redact_named(parsed)
        if cleaned != parsed:
            return json.dumps(cleaned, separators=(",", ":"))
    return scrub_text(value, [])


def _redact_named(value: Any, secret: bool = False) -> Any:
    """A JSON value with everything under a secret-named key redacted."""
    if isinstance(value, dict):
        return {k: _redact_named(v, secret or secret_option(str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_named(v, secret) for v in value]
    if secret and value is not None and not isinstance(value, bool):
        return REDACTED
    return scrub_text(value, []) if isinstance(value, str) else value


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
            # A tool's own metadata (`atlas.tool.kind`, `atlas.mcp.server`) arrives inside
            # autolog's `metadata` attribute; lifted to the span's top level, the UI and
            # `search_traces` can filter on it.
            meta = cleaned.get("metadata")
            if isinstance(meta, dict):
                changed.update(
                    {k: v for k, v in meta.items() if k.startswith("atlas.") and k not in cleaned}
                )
            if changed:
                span.set_attributes(changed)
        except Exception as exc:  # telemetry never fails a run
            log.debug("could not clean span %s: %s", getattr(span, "name", "?"), exc)

    return process
