"""Prices per million tokens, in USD, for the models people pick. Extend `PRICES` or pass your own.

Unknown models get no price: their cost is left absent, never written as 0.
"""

from __future__ import annotations

# (input, output) USD per 1M tokens. Longest matching prefix wins, so dated snapshots
# (gpt-4o-2024-08-06, claude-sonnet-4-5-20250929) match their family.
PRICES: dict[str, tuple[float, float]] = {
    # OpenAI
    "gpt-5": (1.25, 10.0),
    "gpt-5-mini": (0.25, 2.0),
    "gpt-5-nano": (0.05, 0.40),
    "gpt-4.1": (2.0, 8.0),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-4o": (2.50, 10.0),
    "gpt-4o-mini": (0.15, 0.60),
    "o3": (2.0, 8.0),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
    # Anthropic
    "claude-opus-4": (15.0, 75.0),
    "claude-opus-4-1": (15.0, 75.0),
    "claude-sonnet-4": (3.0, 15.0),
    "claude-sonnet-4-5": (3.0, 15.0),
    "claude-haiku-4-5": (1.0, 5.0),
    "claude-3-7-sonnet": (3.0, 15.0),
    "claude-3-5-haiku": (0.80, 4.0),
}


FREE_PROVIDERS = ("scripted", "local")


def price_for(
    model: str, prices: dict[str, tuple[float, float]] | None = None
) -> tuple[float, float] | None:
    """(input, output) USD per 1M tokens for `provider:model`, or None when not known."""
    table = PRICES if prices is None else prices
    provider, _, rest = model.partition(":")
    if provider.split("?", 1)[0] in FREE_PROVIDERS:
        return (0.0, 0.0)
    name = (rest or provider).split("?", 1)[0].lower()
    best = None
    for key in table:
        if (name == key or name.startswith(key + "-")) and (best is None or len(key) > len(best)):
            best = key
    return table[best] if best is not None else None


def cost_usd(model: str, input_tokens: int, output_tokens: int) -> float | None:
    price = price_for(model)
    if price is None:
        return None
    return (input_tokens * price[0] + output_tokens * price[1]) / 1_000_000
