"""Personas in MLflow's prompt registry, linked to the traces that used them.

Each persona a run's teams use is the prompt `atlas.persona.<name>`. A new version is registered
only when the persona's text changed (its content hash is the version's tag
`atlas.content_hash`), so the registry's history of a persona is the history of its edits, and
every trace lists the exact versions it ran with (`mlflow.linkedPrompts`, the Prompts tab of the
trace). Versions are also linked to the agent version's LoggedModel.
"""

from __future__ import annotations

import hashlib
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atlas.context import RunContext

HASH_TAG = "atlas.content_hash"

_known: dict[tuple[str, str, str], Any] = {}
"""(store, prompt name, content hash) -> PromptVersion, so a process asks the registry once."""


def prompt_name(persona: str) -> str:
    """The registry's name for a persona (letters, digits, `-`, `_` and `.` only)."""
    return "atlas.persona." + re.sub(r"[^A-Za-z0-9_.-]", "_", persona)


def personas_of(ctx: RunContext) -> dict[str, str]:
    """Persona name -> its text, for every supervisor and worker of the run's teams."""
    reg = ctx.registry
    found: dict[str, str] = {}
    for team_name in ctx.spec.teams:
        team = reg.team(team_name)
        for persona in (team.supervisor.persona, *(w.persona for w in team.workers)):
            if persona not in found:
                found[persona] = reg.persona(persona).prompt
    return found


def register_personas(client: Any, ctx: RunContext, model_id: str | None) -> list[Any]:
    """The registry's version of each persona the run uses, registering a version for a
    persona whose text is new. Linked to the LoggedModel `model_id` when one is given."""
    versions = []
    store = str(client.tracking_uri)
    for persona, text in sorted(personas_of(ctx).items()):
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        name = prompt_name(persona)
        key = (store, name, digest)
        version = _known.get(key)
        if version is None:
            version = _find(client, name, digest)
            if version is None:
                version = client.register_prompt(
                    name=name,
                    template=text,
                    commit_message=f"persona {persona} as ATLAS ran it",
                    tags={HASH_TAG: digest, "atlas.persona": persona},
                )
            if model_id:
                client.link_prompt_version_to_model(name, str(version.version), model_id)
            _known[key] = version
        versions.append(version)
    return versions


def _find(client: Any, name: str, digest: str) -> Any:
    """The version of prompt `name` whose content hash is `digest`, or None."""
    if client.get_prompt(name) is None:
        return None
    token = None
    while True:
        page = client.search_prompt_versions(name, max_results=100, page_token=token)
        for version in page:
            if (version.tags or {}).get(HASH_TAG) == digest:
                return version
        token = getattr(page, "token", None)
        if not token:
            return None
