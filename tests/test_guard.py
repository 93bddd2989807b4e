"""The suite's own guard: a real provider call (anything beyond 127.0.0.1) fails the test."""

from __future__ import annotations

import socket

import pytest


def test_connections_beyond_loopback_are_refused() -> None:
    # 203.0.113.0/24 is a documentation range: the guard refuses before any packet is sent.
    with socket.socket() as sock, pytest.raises(RuntimeError, match=r"tests stay on 127\.0\.0\.1"):
        sock.connect(("203.0.113.5", 443))


def test_a_real_openai_call_cannot_happen() -> None:
    from langchain_openai import ChatOpenAI

    model = ChatOpenAI(model="gpt-4o-mini", api_key="sk-not-real", max_retries=0, timeout=2)  # type: ignore[arg-type]
    with pytest.raises(Exception) as err:
        model.invoke("hello")
    assert (
        "127.0.0.1" in repr(err.value.__context__ or err.value)
        or "Connection" in type(err.value).__name__
    )


def test_provider_keys_are_hidden_from_tests() -> None:
    import os

    assert "OPENAI_API_KEY" not in os.environ and "ANTHROPIC_API_KEY" not in os.environ
