"""`python -m atlas ui` (filled in by the tracing work)."""

from __future__ import annotations

import argparse

from atlas.errors import AtlasError


def serve(args: argparse.Namespace) -> int:
    raise AtlasError("tracing UI is not available yet")
