"""Which chat model each role uses, resolved from `provider:model` specs.

Roles: `planner`, `judge`, `supervisor`, and one per team (`team:research`, ...) for workers.
A role without its own model uses `models.default`; with none configured, a provider key in the
environment picks that provider's small model; failing that, the offline local model is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from atlas.errors import ModelConfigError
from atlas.spec import ModelSpec, parse_model_string
from atlas.tracing.redact import (
    public_model,
    register_secret,
    register_secrets,
    scrub_text,
    secret_option,
    secret_values,
)

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

    from atlas.models.cache import ResponseCache
    from atlas.spec import TaskSpec

KEY_DEFAULTS = (
    ("OPENAI_API_KEY", "openai:gpt-4o-mini"),
    ("ANTHROPIC_API_KEY", "anthropic:claude-haiku-4-5"),
)


def default_model_spec() -> ModelSpec:
    """The model used when a task configures none."""
    for env, model in KEY_DEFAULTS:
        if os.environ.get(env):
            return ModelSpec(model=model)
    from atlas.models.local import DEFAULT_LOCAL

    return ModelSpec(model=DEFAULT_LOCAL)


_KEY_OPTIONS = ("api_key", "openai_api_key", "anthropic_api_key")
"""Options that give a provider's key outright (LangChain takes each of these names)."""


def _raw_query(model: str) -> dict[str, str]:
    """A model string's query options as written (no JSON coercion: a key of digits stays text)."""
    query = model.partition("?")[2]
    pairs = (pair.partition("=") for pair in query.split("&") if pair)
    return {name: value for name, sep, value in pairs if sep and name}


def resolve_model(spec: ModelSpec, servers: list[Any] | None = None) -> BaseChatModel:
    """Build the LangChain chat model for one spec. Local servers started are added to `servers`.

    Every secret given here (a secret-named option in the model string or `params`, a password
    in `base_url`, the value of `api_key_env`) is registered with `register_secret` first, so no
    span, record or console line of this process shows it. A key given in the options is the key
    sent; `api_key_env` and the provider's environment variable are used only without one."""
    provider, name, params = parse_model_string(spec.model)
    raw = _raw_query(spec.model)
    params.update({k: raw[k] for k in params if secret_option(k) and k in raw})
    options: dict[str, Any] = {**params, **spec.params}
    register_secrets(options)
    if spec.base_url:
        register_secrets({"base_url": spec.base_url})
    public = public_model(spec.model)
    if provider == "scripted":
        from atlas.testing import ScriptedModel

        return ScriptedModel(**options)
    if provider == "local":
        from atlas.models.local import local_chat_model

        model, server = local_chat_model(spec, options)
        if servers is not None:
            servers.append(server)
        return model
    if spec.temperature is not None:
        options["temperature"] = spec.temperature
    if spec.max_tokens is not None:
        options["max_tokens"] = spec.max_tokens
    if spec.timeout_s is not None:
        options["timeout"] = spec.timeout_s
    if spec.base_url:
        options["base_url"] = spec.base_url
    given = [k for k in _KEY_OPTIONS if options.get(k) not in (None, "")]
    if len(given) > 1:
        raise ModelConfigError(f"model {public}: give the key once, not as {' and '.join(given)}")
    # A key given in the model string or params is the key sent; only without one do the
    # environment and the keyless self-hosted default come in.
    if not given and spec.api_key_env:
        key = os.environ.get(spec.api_key_env)
        if not key:
            raise ModelConfigError(
                f"model {public}: environment variable {spec.api_key_env} is not set"
            )
        register_secret(key)
        options["api_key"] = key
    elif not given:
        env = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}[provider]
        if not os.environ.get(env):
            if not spec.base_url and "base_url" not in options:
                raise ModelConfigError(
                    f"model {public} needs {env} to be set (or api_key_env, or api_key)"
                )
            # A self-hosted OpenAI-compatible server (vLLM, Ollama, llama.cpp) needs no key.
            options["api_key"] = "not-needed"
    options.setdefault("max_retries", 0)  # retries are ATLAS's, see atlas.models.calls
    from langchain.chat_models import init_chat_model

    try:
        return init_chat_model(name, model_provider=provider, **options)
    except ImportError as exc:
        raise ModelConfigError(f"model {public}: {scrub_text(str(exc), secret_values())}") from None


@dataclass
class ModelRoles:
    """The resolved model for every role of one run. Instances are shared between roles."""

    spec: TaskSpec
    override: str | None = None
    """`--model` from the command line: replaces every role's model."""
    response_cache: ResponseCache | None = None
    """The model-response cache every model of the run answers from (`cache:`), or None."""
    _cache: dict[str, BaseChatModel] = field(default_factory=dict)
    _servers: list[Any] = field(default_factory=list)

    def spec_for(self, role: str) -> ModelSpec:
        if self.override:
            return ModelSpec(model=self.override)
        models = self.spec.models
        chosen: ModelSpec | None
        if role.startswith("team:"):
            chosen = models.teams.get(role.removeprefix("team:"))
        else:
            chosen = getattr(models, role, None)
        return chosen or models.default or default_model_spec()

    def chain(self, role: str) -> list[ModelSpec]:
        """The role's model, then its fallbacks (its own, else `models.fallbacks`)."""
        primary = self.spec_for(role)
        if self.override:
            return [primary]
        return [primary, *(primary.fallbacks or self.spec.models.fallbacks)]

    def get(self, role: str) -> BaseChatModel:
        return self.resolve(self.spec_for(role))

    def resolve(self, spec: ModelSpec) -> BaseChatModel:
        key = spec.model_dump_json()
        if key not in self._cache:
            model = resolve_model(spec, self._servers)
            if self.response_cache is not None:
                model.cache = self.response_cache
            self._cache[key] = model
        return self._cache[key]

    def provider(self, role: str) -> str:
        return self.spec_for(role).provider

    def close(self) -> None:
        """Release local model servers this run started (they stop when no run uses them)."""
        from atlas.models.local import release

        servers, self._servers = self._servers, []
        for server in servers:
            release(server)
        if self.response_cache is not None:
            self.response_cache.close()

    def label(self, role: str) -> str:
        """The role's model as it may be shown and stored (`public_model`: no secrets)."""
        return public_model(self.spec_for(role).model)

    def describe(self) -> dict[str, str]:
        """Role -> public model label, for progress lines, summaries, records and traces."""
        roles = ["planner", "judge", "supervisor", *(f"team:{t}" for t in self.spec.teams)]
        if self.spec.memory.enabled and self.spec.memory.extract_entities:
            roles.append("memory")
        return {role: self.label(role) for role in roles}


def check_override(value: str) -> str:
    """Validate a `--model` value; raises ModelConfigError with the parser's message."""
    try:
        parse_model_string(value)
    except ValueError as exc:
        # The parser quotes the value, which may hold a key: the message shows the public form.
        message = str(exc).replace(value, public_model(value))
        raise ModelConfigError(scrub_text(message, secret_values())) from None
    return value
