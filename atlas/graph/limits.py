"""How much text each prompt may carry, by model size.

Workers get scoped context, not whole histories; these caps keep it that way. A small local model
(SmolLM2-135M on two CPU cores reads about 250 prompt tokens a second) gets the compact tier.
"""

from __future__ import annotations

from dataclasses import dataclass

from atlas.context import RunContext


@dataclass(frozen=True)
class Limits:
    context_per_step: int
    """Characters of each dependency's result shown to a step."""
    report: int
    """Characters of a worker's report passed to teammates and the supervisor."""
    tool_output: int
    """Characters of one tool result shown to the model."""
    judged: int
    """Characters of the output shown to the judge."""
    recalled: int
    """Characters of each passage recalled from memory for a worker."""


FULL = Limits(context_per_step=2500, report=1500, tool_output=4000, judged=12000, recalled=600)
COMPACT = Limits(context_per_step=500, report=400, tool_output=900, judged=2500, recalled=160)


def limits_for(ctx: RunContext, role: str) -> Limits:
    return COMPACT if ctx.models.provider(role) == "local" else FULL


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + " ...[cut]"
