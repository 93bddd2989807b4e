"""The offline default: a small GGUF model served by llama-cpp-python on 127.0.0.1."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from atlas.errors import ModelConfigError

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

    from atlas.spec import ModelSpec


def local_chat_model(spec: ModelSpec, options: dict[str, Any]) -> BaseChatModel:
    raise ModelConfigError(
        "no model configured: set models.default in the task file, pass --model "
        "(e.g. --model scripted for a dry run), or set OPENAI_API_KEY or ANTHROPIC_API_KEY"
    )
