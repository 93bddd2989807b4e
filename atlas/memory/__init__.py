"""Memory kept across runs: passages in a vector store (Chroma), entities and relations in a
graph store (embedded LadybugDB, or Neo4j).

- `store.py`: `Memory`, the two stores joined, and the records it keeps (documents, findings,
  outputs) with their provenance.
- `vector.py`: Chroma. `graph.py`: LadybugDB and Neo4j, one Cypher vocabulary.
- `embeddings.py`: the offline embedder (all-MiniLM-L6-v2) and OpenAI's.
- `entities.py`: the extraction schema and name normalisation.
- `cli.py`: `python -m atlas memory ...`.

Names are imported lazily, so `python -m atlas --help` does not load the stores.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from atlas.memory.entities import Entities as Entities
    from atlas.memory.store import Memory as Memory
    from atlas.memory.store import document_records as document_records
    from atlas.memory.store import finding_records as finding_records
    from atlas.memory.store import output_records as output_records
    from atlas.memory.vector import Hit as Hit
    from atlas.memory.vector import Record as Record

_EXPORTS = {
    "Entities": "atlas.memory.entities",
    "Hit": "atlas.memory.vector",
    "Memory": "atlas.memory.store",
    "Record": "atlas.memory.vector",
    "document_records": "atlas.memory.store",
    "finding_records": "atlas.memory.store",
    "output_records": "atlas.memory.store",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'atlas.memory' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = sorted(_EXPORTS)
