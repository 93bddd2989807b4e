"""The span processor's cleaning: secrets out, bulky payloads cut."""

from __future__ import annotations

import json

from atlas.tracing.redact import REDACTED, scrub


def test_secrets_are_redacted_everywhere() -> None:
    secret = "gateway-token-value-123456"
    value = {"a": [f"key={secret}", {"b": "sk-proj-abcdefghijklmnopqrstu"}], "c": 3}
    cleaned = scrub(value, [secret])
    text = json.dumps(cleaned)
    assert secret not in text and "sk-proj-abcdefghijklmnopqrstu" not in text
    assert text.count(REDACTED) == 2 and cleaned["c"] == 3


def test_large_payloads_are_cut_small_ones_kept() -> None:
    small = {"step": "1.research", "team": "research"}
    assert scrub(small, []) == small
    state = {"results": {f"1.s{i}": {"output": "x" * 3000} for i in range(20)}, "iteration": 2}
    cleaned = scrub(state, [], limit=1000)
    assert cleaned["iteration"] == 2
    assert isinstance(cleaned["results"], str) and cleaned["results"].startswith(
        "[dict with 20 entries"
    )
    assert len(json.dumps(cleaned)) < 1000
    assert scrub("y" * 5000, [], limit=100).endswith("...[cut 4900 chars]")
