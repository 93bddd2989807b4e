"""Entities and relations extracted from findings, and the name normalisation that merges them.

Extraction is one structured-output model call per finding (the `Entities` schema, forced as a
tool call, grammar-constrained on the local server). `normalize()` makes "The ACME Corp.",
"acme corp" and "ACME  Corp" one entity, across runs and across backends.
"""

from __future__ import annotations

import re
import unicodedata

from pydantic import BaseModel, Field

_ARTICLE = re.compile(r"^(the|a|an)\s+")
_EDGE = re.compile(r"^[\W_]+|[\W_]+$")
_SPACE = re.compile(r"\s+")
MAX_NAME = 120


class Entity(BaseModel):
    name: str = Field(description="The entity's name, copied from the text")
    type: str = Field("", description="person, organisation, place, product, concept, ...")


class Relation(BaseModel):
    source: str = Field(description="Name of the first entity")
    relation: str = Field(description="A short verb phrase from the text")
    target: str = Field(description="Name of the second entity")


class Entities(BaseModel):
    """The named entities a text mentions and the relations it states between them."""

    entities: list[Entity] = Field(default_factory=list, max_length=20)
    relations: list[Relation] = Field(default_factory=list, max_length=20)


Extraction = Entities


def normalize(name: str) -> str:
    """The merge key of an entity name: Unicode-folded, lower case, no leading article, no
    punctuation at the ends, single spaces. Empty if nothing is left."""
    text = unicodedata.normalize("NFKC", str(name)).casefold()
    text = _SPACE.sub(" ", text).strip()
    text = _EDGE.sub("", text)
    text = _ARTICLE.sub("", text)
    return _EDGE.sub("", text)[:MAX_NAME]


MAX_NAME_WORDS = 6


def grounded(extraction: Entities, text: str) -> Entities:
    """Only what the text says: entities whose name occurs in it (a small model copies names
    from the prompt or invents them) and that are names, not sentences; relations between
    kept entities."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    haystack = " " + " ".join(re.findall(r"\w+", folded)) + " "

    def ok(name: str) -> bool:
        key = normalize(name)
        words = re.findall(r"\w+", key)
        return 0 < len(words) <= MAX_NAME_WORDS and f" {' '.join(words)} " in haystack

    entities = [e for e in extraction.entities if ok(e.name)]
    relations = [
        r for r in extraction.relations if ok(r.source) and ok(r.target) and r.relation.strip()
    ]
    return Entities(entities=entities, relations=relations)


def candidate_names(text: str, max_words: int = 3) -> list[str]:
    """Every run of 1 to `max_words` words in `text`, normalised: the names to look up in the
    graph when the planner wants context for a task."""
    words = re.findall(r"[\w][\w'&.-]*", unicodedata.normalize("NFKC", text))
    out: dict[str, None] = {}
    for size in range(1, max_words + 1):
        for i in range(len(words) - size + 1):
            key = normalize(" ".join(words[i : i + size]))
            if len(key) > 2:
                out[key] = None
    return list(out)


EXTRACT_PROMPT = (
    "List the named entities (organisations, people, places, products, policies, figures with "
    "their subject) in the text below, and the relations the text states between them. Use the "
    "names exactly as written. Only include what the text says."
)

__all__ = [
    "EXTRACT_PROMPT",
    "Entities",
    "Entity",
    "Extraction",
    "Relation",
    "candidate_names",
    "grounded",
    "normalize",
]
