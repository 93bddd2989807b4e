"""Typed errors. The CLI maps each family to an exit code; none of them prints a traceback."""

from __future__ import annotations


class AtlasError(Exception):
    """Base class for every error ATLAS raises on purpose."""

    exit_code = 3


class SpecError(AtlasError):
    """A task, agent or persona file is missing or invalid (bad input: exit code 2)."""

    exit_code = 2

    def __init__(self, message: str, *, file: str | None = None, field: str | None = None) -> None:
        self.file = file
        self.field = field
        self.detail = message
        parts = [p for p in (file, field) if p]
        super().__init__(": ".join([*parts, message]))


class ModelConfigError(AtlasError):
    """No usable model is configured, or a model spec names an unknown provider (exit code 2)."""

    exit_code = 2


class BudgetExhausted(AtlasError):
    """A budget limit was reached. Raised before the model call that would exceed it."""

    exit_code = 1

    def __init__(self, limit: str, used: float, maximum: float) -> None:
        self.limit = limit
        self.used = used
        self.maximum = maximum
        super().__init__(f"budget exhausted: {limit} used {used:g} of {maximum:g}")


class RunNotFound(AtlasError):
    """`atlas resume RUN_ID` named a run that does not exist in the state directory."""

    exit_code = 2


class MemoryStoreError(AtlasError):
    """A memory store cannot be opened or used: corrupt files, an unreachable server, a store
    built with another embedder (exit code 3)."""


class MemoryInputError(MemoryStoreError):
    """Bad input to a memory command, such as a path that does not exist (exit code 2)."""

    exit_code = 2


class ToolError(AtlasError):
    """A tool refused its input (for example a path outside the workspace).

    Tools return the message to the model instead of failing the run.
    """


class RunLocked(AtlasError):
    """Another process is running (or resuming) this run right now (exit code 2)."""

    exit_code = 2


class OutputBusy(RunLocked):
    """Another run of the same spec is writing the same output file right now."""


class RunInterrupted(AtlasError):
    """The run was interrupted (Ctrl-C, SIGTERM): model calls that had not started are refused
    with this; the run stays resumable (exit code 130)."""

    exit_code = 130


class StateError(AtlasError):
    """A file in the state directory cannot be used: corrupt, a directory, unreadable (exit
    code 3). The message names the file and what to do (`python -m atlas doctor`)."""

    exit_code = 3

    def __init__(self, message: str, *, path: str | None = None, corrupt: bool = False) -> None:
        self.path = path
        self.corrupt = corrupt  # SQLite found the file damaged (not a database, malformed)
        super().__init__(message)


class AmbiguousRun(AtlasError):
    """A run id prefix matches several runs; the message lists them (exit code 2)."""

    exit_code = 2

    def __init__(self, prefix: str, candidates: list[str]) -> None:
        self.prefix = prefix
        self.candidates = candidates
        shown = ", ".join(candidates[:10])
        more = f" and {len(candidates) - 10} more" if len(candidates) > 10 else ""
        super().__init__(
            f"run id prefix {prefix!r} matches {len(candidates)} runs: {shown}{more}; "
            "give more of the id"
        )


class McpConnectError(AtlasError):
    """An MCP server did not start or answer: "mcp server 'x': <why>" (exit code 3)."""

    exit_code = 3
