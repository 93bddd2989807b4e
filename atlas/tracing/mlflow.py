"""MLflow tracing for a run: one MLflow run and one trace, autolog plus ATLAS's coordination spans.

- Store: `tracing.tracking_uri`, `--tracking-uri` or `MLFLOW_TRACKING_URI`, else a sqlite file in
  the state directory. The chosen store is checked before MLflow touches it: a server must
  connect, answer `/health` and answer an API call (3.5 s in all at most); a sqlite file must be
  in an existing, writable directory, writable itself and a database. When a check or MLflow's
  set-up fails, the run traces to the local store instead, with one warning line.
- Logs: while tracing, MLflow's log records become one line per distinct problem (no
  tracebacks, at most `MAX_LOG_LINES` a run); `ATLAS_DEBUG=1` keeps them whole. A trace that
  could not be written is reported once ("trace not stored: ...") and the run's `trace_id` is
  None.
- Secrets: every line ATLAS prints about tracking has URL passwords redacted, and
  `MlflowTrace.tracking_uri` is the redacted form (the real URI stays private to the client).
- Spans: `mlflow.langchain.autolog()` records model, tool and graph-node spans. ATLAS's spans (plan,
  dispatch, handoff, worker, judge, budget stop) are parented explicitly on the graph node that
  opened them, so they nest correctly in async runs too.
- Tracing never fails a run: every MLflow call here is guarded and logged at debug level.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import socket
import sqlite3
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    from atlas.context import RunContext
    from atlas.spec import TaskSpec

log = logging.getLogger("atlas.tracing")

DEFAULT_EXPERIMENT = "atlas"
PROBE_TIMEOUT_S = 1.5
_MAX_ATTR = 2000
_autologged = False


OFFLINE_DEFAULTS = {
    # ATLAS prices calls itself; MLflow would otherwise fetch a model catalog from GitHub
    # for every new model name, retrying for seconds when offline.
    "MLFLOW_MODEL_CATALOG_URI": "",
    # No phoning home by default: ATLAS runs offline. Set it to false to opt back in.
    "MLFLOW_DISABLE_TELEMETRY": "true",
    # One trace per run, exported when the run ends. Measured here (benchmarks/): exporting a
    # 130-span trace synchronously to sqlite takes about 80 ms, while the asynchronous queue
    # needs about 2 s before a flush returns, and ATLAS must flush to attach the verdict.
    "MLFLOW_ENABLE_ASYNC_TRACE_LOGGING": "false",
}


def offline_defaults() -> None:
    """Set ATLAS's MLflow defaults, leaving any value the user set alone."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def local_uri(state_dir: Path) -> str:
    return f"sqlite:///{state_dir / 'mlflow.db'}"


def choose_uri(spec: TaskSpec, state_dir: Path, explicit: str | None) -> str:
    return (
        explicit
        or spec.tracing.tracking_uri
        or os.environ.get("MLFLOW_TRACKING_URI")
        or local_uri(state_dir)
    )


PROBE_BUDGET_S = 3.5
"""The whole check of a tracking server (connect, `/health`, one API call) ends within this."""
PROBE_ENV = "ATLAS_TRACKING_PROBE_S"
"""A longer budget for that check (and for MLflow's set-up calls), for a server that is slow to
answer under load; the default fits a server that answers at all."""


def _probe_scale() -> float:
    """How much longer than the defaults the tracking checks may take (`ATLAS_TRACKING_PROBE_S`)."""
    try:
        budget = float(os.environ.get(PROBE_ENV) or PROBE_BUDGET_S)
    except ValueError:
        return 1.0
    return max(1.0, min(budget, 120.0) / PROBE_BUDGET_S)


SETUP_HTTP_TIMEOUT_S = 2
"""MLflow's HTTP timeout (s, no retries) while it gets or creates the experiment."""
RUN_HTTP_DEFAULTS = {
    # Bound MLflow's HTTP client for the rest of the run: its defaults retry for minutes on a
    # dead server. A value the user set is left alone.
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
_SQL_SCHEMES = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
_ours: set[str] = set()
"""Environment variables ATLAS set (and may change again); the user's own are never touched."""


def public(text: str) -> str:
    """`text` as it may be printed: URL passwords, known secrets and key-shaped strings
    redacted."""
    from atlas.tracing.redact import scrub_text, secret_values

    return scrub_text(text, secret_values())


def _set_default_env(values: dict[str, str]) -> None:
    for key, value in values.items():
        if key not in os.environ or key in _ours:
            os.environ[key] = value
            _ours.add(key)


@contextlib.contextmanager
def _bounded_http() -> Iterator[None]:
    """MLflow's HTTP client bounded to one quick try per call while the store is set up."""
    _set_default_env(
        {
            "MLFLOW_HTTP_REQUEST_TIMEOUT": str(round(SETUP_HTTP_TIMEOUT_S * _probe_scale())),
            "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
            "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        }
    )
    try:
        yield
    finally:
        _set_default_env(RUN_HTTP_DEFAULTS)


def _split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """The URI without user:password, and the headers that carry them (and MLflow's own
    MLFLOW_TRACKING_TOKEN / _USERNAME / _PASSWORD) for the probe."""
    parsed = urlparse(uri)
    headers: dict[str, str] = {}
    user, password = parsed.username, parsed.password
    if user is None and os.environ.get("MLFLOW_TRACKING_USERNAME"):
        user = os.environ["MLFLOW_TRACKING_USERNAME"]
        password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if user is not None:
        import base64

        pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password or '')}"
        headers["Authorization"] = "Basic " + base64.b64encode(pair.encode()).decode()
    elif os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"
    host = parsed.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parsed.port}" if parsed.port else host
    return urllib.parse.urlunparse(parsed._replace(netloc=netloc)).rstrip("/"), headers


def probe(uri: str, experiment: str = DEFAULT_EXPERIMENT) -> str | None:
    """None if a tracking server at `uri` connects, answers `/health` and answers an API call
    (the experiment look-up MLflow makes first); else why not, without the password. The whole
    check ends within `PROBE_BUDGET_S` (a server whose health check answers while its API hangs
    costs that, not MLflow's minutes of retries)."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return None
    scale = _probe_scale()
    deadline = time.monotonic() + PROBE_BUDGET_S * scale
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection(
            (host, port), timeout=_left(deadline, PROBE_TIMEOUT_S * scale)
        ):
            pass
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({exc.strerror or type(exc).__name__})"
    base, headers = _split_credentials(uri)
    context = None
    if parsed.scheme == "https" and os.environ.get("MLFLOW_TRACKING_INSECURE_TLS") == "true":
        import ssl

        context = ssl._create_unverified_context()
    health = f"{base}/health"
    status, problem = _get(health, headers, _left(deadline, PROBE_TIMEOUT_S * scale), context)
    if problem is not None:
        return problem
    if status is not None and status >= 500:
        return f"{health} answered {status}"
    query = urllib.parse.urlencode({"experiment_name": experiment})
    api = f"{base}/api/2.0/mlflow/experiments/get-by-name"
    status, problem = _get(f"{api}?{query}", headers, _left(deadline, 2.0 * scale), context, api)
    if problem is not None:
        return problem
    if status in (401, 403):
        return f"{api} refused the credentials ({status})"
    if status is not None and status not in (200, 404):
        return f"{api} answered {status}"
    return None


def _left(deadline: float, cap: float) -> float:
    return max(0.05, min(cap, deadline - time.monotonic()))


def _get(
    url: str, headers: dict[str, str], timeout: float, context: Any, shown: str | None = None
) -> tuple[int | None, str | None]:
    """(HTTP status, None) for any answer; (None, why) for none within `timeout`."""
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return int(response.status), None
    except urllib.error.HTTPError as exc:
        exc.close()  # an HTTPError holds the response's socket open until closed
        return int(exc.code), None
    except (OSError, ValueError) as exc:
        name = type(getattr(exc, "reason", None) or exc).__name__
        return None, f"no answer from {shown or url} within {timeout:.1f}s ({name})"


def _sqlite_path(uri: str) -> Path | None:
    """The file of a `sqlite:///` URI (relative ones from the working directory), or None."""
    if not uri.startswith("sqlite:///"):
        return None
    text = urllib.parse.unquote(uri.removeprefix("sqlite:///").split("?", 1)[0])
    if not text or text == ":memory:":
        return None
    return Path(text)


def _writable_dir(directory: Path) -> str | None:
    if not directory.is_dir():
        return f"its directory {directory} does not exist"
    if not os.access(directory, os.W_OK | os.X_OK):
        return f"its directory {directory} is not writable"
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as exc:
        return f"cannot write in {directory} ({exc.strerror or type(exc).__name__})"
    return None


def _sqlite_problem(path: Path) -> str | None:
    """Why MLflow could not keep a store in this SQLite file, checked without creating or
    changing anything; None if it can."""
    problem = _writable_dir(path.parent)
    if problem is not None or not path.exists():
        return problem
    if not path.is_file():
        return f"{path} is not a file"
    try:
        with open(path, "r+b"):
            pass
    except OSError as exc:
        return f"cannot write to {path} ({exc.strerror or type(exc).__name__})"
    try:
        con = sqlite3.connect(f"file:{urllib.parse.quote(str(path))}?mode=ro", uri=True, timeout=5)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            con.close()
    except sqlite3.DatabaseError as exc:
        return f"{path} is not a usable SQLite database ({exc})"
    return None


def store_problem(uri: str, local: str, experiment: str = DEFAULT_EXPERIMENT) -> str | None:
    """Why the tracking store at `uri` cannot take this run's trace, found before MLflow opens
    it (MLflow would retry for minutes, or create missing directories); None if it can. The
    local store `local` may be created (its directory is the state directory)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https"):
        return probe(uri, experiment)
    path = _sqlite_path(uri)
    if path is not None:
        if uri == local and not path.parent.exists():
            return None
        return _sqlite_problem(path)
    dialect = parsed.scheme.split("+", 1)[0]
    if dialect in _SQL_SCHEMES:
        host = parsed.hostname or "127.0.0.1"
        port = parsed.port or _SQL_SCHEMES[dialect]
        try:
            with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
                pass
        except OSError as exc:
            return f"cannot connect to {host}:{port} ({exc.strerror or type(exc).__name__})"
        return None
    if parsed.scheme in ("", "file"):
        root = Path(urllib.parse.unquote(parsed.path) if parsed.scheme else uri)
        return _writable_dir(root if root.exists() else root.parent)
    return None


MAX_LOG_LINES = 3
"""MLflow log lines shown a run at most (after deduplication); the rest are counted and hidden."""
_MLFLOW_LOGGERS = ("mlflow", "sqlalchemy.engine", "alembic", "huey", "urllib3.connectionpool")
"""The loggers MLflow configures itself (and urllib3's retry warnings under its HTTP client)."""


class QuietMlflowLogs(logging.Filter):
    """MLflow's log records as one line per distinct problem, with no traceback.

    MLflow logs a failed trace export or store call with its exception (and, below it, every
    retry of urllib3 and SQLAlchemy); a dead server at the end of a run printed about 100
    lines. This filter, on MLflow's loggers and on their handlers, keeps a record's first line
    (secrets redacted), drops `exc_info` and stack, drops a line seen before in this run (digits
    ignored) and lets at most `MAX_LOG_LINES` warnings through a run. While `capture()` is
    active on a thread, warnings logged on it are handed to the caller instead of printed: ATLAS
    reports them in its own one line. With `ATLAS_DEBUG` set, records pass whole.
    """

    def __init__(self) -> None:
        super().__init__()
        self._lock = threading.Lock()
        self._seen: set[str] = set()
        self._shown = 0
        self._hidden = 0
        self._local = threading.local()

    def reset(self) -> None:
        """A new run: every problem may be shown once again."""
        with self._lock:
            self._seen.clear()
            self._shown = 0
            self._hidden = 0

    @property
    def hidden(self) -> int:
        return self._hidden

    @contextlib.contextmanager
    def capture(self) -> Iterator[list[tuple[str, str]]]:
        """Collect (and do not print) the warnings MLflow logs on this thread meanwhile, as
        (logger name, line)."""
        found: list[tuple[str, str]] = []
        previous = getattr(self._local, "found", None)
        self._local.found = found
        try:
            yield found
        finally:
            self._local.found = previous

    def filter(self, record: logging.LogRecord) -> bool:
        # The filter sits on loggers and on their handlers: decide once per record.
        verdict = getattr(record, "_atlas_verdict", None)
        if verdict is not None:
            return bool(verdict)
        verdict = self._decide(record)
        record._atlas_verdict = verdict
        return verdict

    def _decide(self, record: logging.LogRecord) -> bool:
        if os.environ.get("ATLAS_DEBUG"):
            return True
        line = one_line(record)
        record.msg, record.args = line, None
        record.exc_info, record.exc_text, record.stack_info = None, None, None
        if record.levelno < logging.WARNING:
            # The registry's "Waiting up to 300 seconds for prompt version ..." line, once per
            # persona a run registers, says nothing to the user.
            return not record.name.startswith("mlflow.store.model_registry")
        found = getattr(self._local, "found", None)
        if found is not None:
            found.append((record.name, line))
            return False
        key = re.sub(r"\d+", "#", line)
        with self._lock:
            if key in self._seen or self._shown >= MAX_LOG_LINES:
                self._hidden += key not in self._seen
                self._seen.add(key)
                return False
            self._seen.add(key)
            self._shown += 1
        return True


def one_line(record: logging.LogRecord, limit: int = 300) -> str:
    """A log record's message (or its exception's) as one printable line."""
    try:
        text = record.getMessage()
    except (TypeError, ValueError):
        text = str(record.msg)
    if not text.strip() and record.exc_info and record.exc_info[1] is not None:
        exc = record.exc_info[1]
        text = f"{type(exc).__name__}: {exc}"
    return _first_line(text, limit)


def _first_line(text: str, limit: int = 300) -> str:
    lines = [line.strip() for line in public(text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _exc_line(exc: BaseException) -> str:
    return _first_line(f"{type(exc).__name__}: {exc}")


QUIET = QuietMlflowLogs()


def quiet_mlflow_logs() -> None:
    """Put `QUIET` on MLflow's loggers and their handlers (idempotent; MLflow may have replaced
    its handler since the last call). Called after `import mlflow`, which sets them up."""
    for name in _MLFLOW_LOGGERS:
        logger = logging.getLogger(name)
        for target in (logger, *logger.handlers):
            if QUIET not in target.filters:
                target.addFilter(QUIET)


def agent_version(spec: TaskSpec, ctx: RunContext) -> str:
    """A short hash of the teams, personas and models: traces group by it."""
    reg = ctx.registry
    parts: dict[str, Any] = {"models": ctx.models.describe()}
    for name in spec.teams:
        team = reg.team(name)
        parts[f"team:{name}"] = team.model_dump()
        personas = [team.supervisor.persona, *(w.persona for w in team.workers)]
        parts[f"personas:{name}"] = {p: reg.persona(p).prompt for p in personas}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return digest[:12]


def agent_params(spec: TaskSpec, ctx: RunContext) -> dict[str, str]:
    """What an agent version is: teams, workers, personas (with content hashes), tools and the
    model of each role; the LoggedModel's params, so two versions can be compared."""
    reg = ctx.registry
    params: dict[str, str] = {f"model.{k}": v for k, v in ctx.models.describe().items()}
    params["teams"] = ",".join(spec.teams)
    for name in spec.teams:
        team = reg.team(name)
        params[f"team.{name}.supervisor"] = team.supervisor.persona
        params[f"team.{name}.workers"] = ",".join(w.name for w in team.workers)
        for worker in team.workers:
            params[f"worker.{name}.{worker.name}.tools"] = ",".join(worker.tools) or "-"
            params[f"worker.{name}.{worker.name}.persona"] = worker.persona
        for persona in {team.supervisor.persona, *(w.persona for w in team.workers)}:
            text = reg.persona(persona).prompt
            params[f"persona.{persona}"] = hashlib.sha256(text.encode()).hexdigest()[:12]
    return {k[:250]: v[:6000] for k, v in params.items()}


class _Handle:
    def __init__(self, span: Any) -> None:
        self.span = span

    def set_outputs(self, outputs: Any) -> None:
        with contextlib.suppress(Exception):
            self.span.set_outputs(outputs)

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        with contextlib.suppress(Exception):
            self.span.set_attributes(_clean(attributes))


class _NoSpan:
    def set_outputs(self, outputs: Any) -> None:
        pass

    def set_attributes(self, attributes: dict[str, Any]) -> None:
        pass


def _clean(attributes: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (attributes or {}).items():
        if isinstance(value, str) and len(value) > _MAX_ATTR:
            value = value[:_MAX_ATTR] + "...[cut]"
        out[key] = value
    return out


def _langchain_parent() -> Any:
    """The MLflow span of the LangChain run (graph node) that is executing now, if any.

    MLflow's LangChain tracer keeps run-id -> span in a private mapping, and exposes no public
    lookup. In async graphs the tracer's callbacks run in worker threads, so the node's span is not
    the active span in the node's own context; looking it up by run id is the only way to parent
    ATLAS's spans correctly. `tests/test_tracing.py::test_async_span_tree` pins this behaviour.
    """
    try:
        from langgraph.config import get_config
        from mlflow.langchain.langchain_tracer import MlflowLangchainTracer
    except ImportError:
        return None
    try:
        config = get_config()
    except RuntimeError:
        return None
    manager = config.get("callbacks")
    run_id = getattr(manager, "parent_run_id", None)
    if run_id is None:
        return None
    for handler in getattr(manager, "handlers", []) or []:
        if isinstance(handler, MlflowLangchainTracer):
            with contextlib.suppress(Exception):
                return handler._get_span_by_run_id(run_id)
    return None


class MlflowTracer:
    """ATLAS's coordination spans, as MLflow spans of the run's trace."""

    def __init__(self) -> None:
        self.root: Any = None

    @contextlib.contextmanager
    def span(
        self,
        name: str,
        *,
        span_type: str = "CHAIN",
        inputs: Any = None,
        attributes: dict[str, Any] | None = None,
    ) -> Iterator[Any]:
        import mlflow
        from mlflow.tracing.provider import detach_span_from_context, set_span_in_context

        try:
            active = mlflow.get_current_active_span()
            parent = _langchain_parent()
            if active is not None and parent is not None and _is_descendant(active, parent):
                parent = active
            parent = parent or active or self.root
            span = mlflow.start_span_no_context(
                name,
                span_type=span_type,
                parent_span=parent,
                inputs=inputs,
                attributes=_clean(attributes),
            )
            token = set_span_in_context(span)
        except Exception as exc:
            log.debug("could not start span %s: %s", name, exc)
            yield _NoSpan()
            return
        handle = _Handle(span)
        status = "OK"
        try:
            yield handle
        except BaseException:
            status = "ERROR"
            raise
        finally:
            with contextlib.suppress(Exception):
                detach_span_from_context(token)
            with contextlib.suppress(Exception):
                span.end(status=status)

    def event(self, name: str, attributes: dict[str, Any]) -> None:
        """A zero-length span for a decision (a budget stop, a loop guard)."""
        with self.span(
            name, span_type="CHAIN", attributes={f"atlas.{k}": v for k, v in attributes.items()}
        ):
            pass


class _Shaped:
    """A finished span of a still-open trace, replaced by its reshaped immutable form: what
    MLflow's trace manager calls on it (`to_immutable_span`, the span's fields) it answers."""

    def __init__(self, span: Any) -> None:
        self._span = span

    def to_immutable_span(self) -> Any:
        return self._span

    def __getattr__(self, name: str) -> Any:
        return getattr(self._span, name)


def _reshape_live(trace_id: str) -> list[Any]:
    """Reshape a trace whose spans have all ended but its root (`atlas.tracing.tree`), in
    MLflow's trace manager, before the root ends: the trace MLflow then writes (its artifact,
    size and previews) is the reshaped one. Returns the reshaped spans but the root (MLflow
    `Span`s), or [] when the trace is not in that state (it is then written as it is).

    MLflow has no hook between a trace's last span and its export; its manager's span table is
    the one place both see. `tests/test_tracing.py` pins the result."""
    try:
        from mlflow.entities import Span
        from mlflow.tracing.trace_manager import InMemoryTraceManager

        from atlas.tracing.tree import reshape

        with InMemoryTraceManager.get_instance().get_trace(trace_id) as trace:
            if trace is None:
                return []
            spans = list(trace.span_dict.values())
            roots = [s for s in spans if s.parent_id is None]
            if len(roots) != 1 or any(s.end_time_ns is None for s in spans if s is not roots[0]):
                return []
            root = roots[0]
            dicts = reshape([s.to_immutable_span().to_dict() for s in spans])
            shaped = [Span.from_dict(d) for d in dicts if d["parent_span_id"]]
            table: dict[str, Any] = {root.span_id: root}
            table.update({s.span_id: _Shaped(s) for s in shaped})
            trace.span_dict = table
            return shaped
    except Exception as exc:  # telemetry never fails a run; the trace is written unshaped
        log.debug("could not reshape the trace: %s", exc)
        return []


def _is_descendant(span: Any, ancestor: Any) -> bool:
    """Whether `span` is `ancestor` or below it (walks the live trace's parent ids)."""
    try:
        from mlflow.tracing.trace_manager import InMemoryTraceManager

        if span.trace_id != ancestor.trace_id:
            return False
        manager = InMemoryTraceManager.get_instance()
        current = span
        for _ in range(200):
            if current.span_id == ancestor.span_id:
                return True
            if not current.parent_id:
                return False
            current = manager.get_span_from_id(span.trace_id, current.parent_id)
            if current is None:
                return False
    except Exception:
        return False
    return False


def _warn(on_event: Any, message: str) -> None:
    """One warning line about tracking, redacted: an event when the caller listens for them
    (the CLI prints it), else a log record."""
    message = public(message)
    if on_event is not None:
        log.debug(message)
        on_event({"event": "warning", "message": message})
    else:
        log.warning(message)


def _captured(found: list[tuple[str, str]]) -> str:
    """The line that says most about what failed: MLflow's own, rather than a retry's."""
    for name, line in found:
        if name.startswith("mlflow") and line:
            return line
    return found[0][1] if found else ""


class MlflowTrace:
    """The run-level half: the MLflow run, the root span, metrics, artifacts, assessments.

    `tracking_uri` is the store's URI as it may be printed or stored (password redacted); the
    real one is private to the MLflow client.
    """

    def __init__(self, spec: TaskSpec, uri: str, experiment_id: str, on_event: Any) -> None:
        from atlas.tracing.redact import public_url

        self.spec = spec
        self._uri = uri
        self.tracking_uri = public_url(uri)
        self.experiment_id = experiment_id
        self.tracer = MlflowTracer()
        self.trace_id: str | None = None
        self.mlflow_run_id: str | None = None
        self.on_event = on_event
        self.trace_problem: str | None = None
        """Why the trace was not stored (reported once), or None."""
        self._verdict: dict[str, Any] | None = None
        self._artifacts: list[Path] = []
        self._metrics: dict[str, float] = {}
        self._alerts: list[dict[str, Any]] = []
        self._model_id: str | None = None
        self._spans: list[Any] = []
        """The run's spans as they ended (MLflow `Span`s), for the one batched write."""
        self._verdicts: list[dict[str, Any]] = []
        self._status: str | None = None
        self._judge_model = "atlas.judge"
        self._prompts: list[Any] = []
        """The registry's versions of the personas the run used (`atlas.tracing.prompts`)."""
        self.task_file: str | None = None
        """The task file the run was made from (what its expectations are credited to)."""
        self._started = time.perf_counter()
        self._began_at = time.time()
        self._approvals: list[dict[str, Any]] = []
        """Approval decisions applied in this session: HUMAN assessments on its trace."""
        self.nested = False
        """Whether the root span is a child of the caller's span (the caller's trace)."""

    @classmethod
    def start(
        cls,
        spec: TaskSpec,
        state_dir: Path,
        *,
        tracking_uri: str | None = None,
        on_event: Any = None,
    ) -> MlflowTrace | None:
        """Check the chosen store, fall back to the local one if it cannot take the trace, and
        set MLflow up; None (tracing off, one warning) if the local store fails too."""
        offline_defaults()
        import mlflow  # noqa: F401  (sets up MLflow's loggers, which quiet_mlflow_logs wraps)

        from atlas.tracing.redact import register_secrets

        quiet_mlflow_logs()
        QUIET.reset()
        uri = choose_uri(spec, state_dir, tracking_uri)
        register_secrets({"tracking_uri": uri})
        local = local_uri(state_dir)
        experiment = spec.tracing.experiment or DEFAULT_EXPERIMENT
        remote = urlparse(uri).scheme in ("http", "https")
        problem = store_problem(uri, local, experiment)
        experiment_id: str | None = None
        if problem is None:
            experiment_id, problem = _try_setup(uri, experiment, state_dir)
        if problem is None and experiment_id is not None:
            return cls(spec, uri, experiment_id, on_event)
        what = "server" if remote else "store"
        verb = "unreachable" if remote else "unusable"
        if uri == local:
            _warn(on_event, f"tracing off for this run: the MLflow store {uri} {verb} ({problem})")
            return None
        local_problem = store_problem(local, local, experiment)
        if local_problem is None:
            experiment_id, local_problem = _try_setup(local, experiment, state_dir)
        if local_problem is not None or experiment_id is None:
            _warn(
                on_event,
                f"tracing off for this run: MLflow tracking {what} {uri} {verb} ({problem}), "
                f"and the local store {local} too ({local_problem})",
            )
            return None
        _warn(on_event, f"MLflow tracking {what} {uri} {verb} ({problem}); tracing to {local}")
        return cls(spec, local, experiment_id, on_event)

    def _not_stored(self, problem: str) -> None:
        """Say once that this run's trace is not in the store; its trace id is dropped."""
        self.trace_id = None
        if self.trace_problem is None:
            self.trace_problem = problem or "unknown error"
            _warn(self.on_event, f"trace not stored: {self.trace_problem}")

    @contextlib.contextmanager
    def root(self, ctx: RunContext, *, resumed: bool) -> Iterator[None]:
        """`begin`, `attach` and `end` around the graph's execution, on one thread."""
        self.begin(ctx, resumed=resumed)
        token = self.attach()
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.detach(token)
            self.end(error)

    def begin(self, ctx: RunContext, *, resumed: bool) -> None:
        """Start the MLflow run and the trace's root span (blocking: the store is written).

        The run is managed through the client with its id, not MLflow's thread-local "active
        run", so parallel and async runs in one process never see each other's run. When a span
        is active in the caller's context (ATLAS inside a traced graph or app), the root span is
        its child and ATLAS's spans join the caller's trace; otherwise the run has a trace of its
        own. If MLflow fails here, the run goes on untraced and its summary has no trace id.
        """
        import mlflow
        from mlflow.tracing.constant import TraceMetadataKey, TraceTagKey

        quiet_mlflow_logs()
        with contextlib.suppress(Exception):
            ensure_processors()
        client = mlflow.MlflowClient(self._uri)
        parent = mlflow.get_current_active_span()
        try:
            with QUIET.capture() as found:
                self.mlflow_run_id = _open_run(client, self.experiment_id, ctx, resumed=resumed)
                label, digest = version_name(ctx.spec, ctx)
                model_id = _logged_model(
                    client,
                    self.experiment_id,
                    label,
                    source_run=self.mlflow_run_id,
                    params=agent_params(ctx.spec, ctx),
                    digest=digest,
                )
                self._model_id = model_id
                self._judge_model = ctx.models.label("judge")
                self._prompts = _personas_as_prompts(client, ctx, model_id)
            for _, line in found:
                log.debug("MLflow while starting the run: %s", line)
            own: dict[str, Any] = {}
            if parent is None:
                metadata: dict[str, str] = {
                    "atlas.resumed": str(resumed),
                    "mlflow.sourceRun": self.mlflow_run_id,
                    TraceMetadataKey.TRACE_SESSION: ctx.run_id,
                }
                if model_id:
                    metadata[TraceMetadataKey.MODEL_ID] = model_id
                own = {
                    "tags": {"atlas.run_id": ctx.run_id, **batch_tags()},
                    "metadata": metadata,
                    "experiment_id": self.experiment_id,
                }
                own["tags"][TraceTagKey.TRACE_NAME] = _title(ctx.spec)
            span = mlflow.start_span_no_context(
                "atlas.task",
                span_type="AGENT",
                parent_span=parent,
                inputs={"task": ctx.spec.task, "acceptance": list(ctx.spec.acceptance)},
                **own,
            )
            span.set_attributes({"atlas.run_id": ctx.run_id, "atlas.resumed": resumed})
            export_whole_traces()
            self.nested = parent is not None
            self.trace_id = ctx.trace_id = span.trace_id
            self.tracer.root = span
        except Exception as exc:
            log.debug("could not start the trace: %s", exc)
            self._not_stored(f"could not start it: {_exc_line(exc)}")

    def attach(self) -> Any:
        """Make the root span the active one in the caller's context (cheap; on the thread or
        event loop that runs the graph), so the model and tool spans of MLflow's LangChain
        autolog nest under it. Returns the token for `detach`."""
        if self.tracer.root is None:
            return None
        from mlflow.tracing.provider import set_span_in_context

        with contextlib.suppress(Exception):
            return set_span_in_context(self.tracer.root)
        return None

    def detach(self, token: Any) -> None:
        if token is None:
            return
        from mlflow.tracing.provider import detach_span_from_context

        with contextlib.suppress(Exception):
            detach_span_from_context(token)

    def end(self, error: BaseException | None) -> None:
        """End the root span, which writes the trace (blocking) unless it is part of the
        caller's trace; notice when MLflow could not write it."""
        span, self.tracer.root = self.tracer.root, None
        if span is None:
            return
        failure: str | None = None
        shaped = [] if self.nested else _reshape_live(span.trace_id)
        with QUIET.capture() as found:
            try:
                if isinstance(error, Exception):
                    from mlflow.entities import SpanEvent

                    span.add_event(SpanEvent.from_exception(error))
                    span.end(status="ERROR")
                else:
                    span.end()
            except Exception as exc:
                failure = _exc_line(exc)
        if shaped:
            with contextlib.suppress(Exception):
                self._spans = [span.to_immutable_span(), *shaped]
        if self.nested or (failure is None and not found):
            return
        if failure is None and self.trace_id and self._stored(self.trace_id):
            # MLflow complained about something else (attachments, prompt links).
            for _, line in found:
                log.debug("MLflow while writing the trace: %s", line)
            return
        self._not_stored(failure or _captured(found))

    def _stored(self, trace_id: str) -> bool:
        import mlflow

        with QUIET.capture():
            try:
                mlflow.MlflowClient(self._uri).get_trace(trace_id)
            except Exception as exc:
                log.debug("trace %s is not in the store: %s", trace_id, exc)
                return False
        return True

    def finish(self, ctx: RunContext, values: dict[str, Any]) -> None:
        from atlas.models.usage import totals

        usage = values.get("usage") or {}
        run = totals(usage)
        verdict = values.get("verdict") or None
        self._verdict = verdict
        self._verdicts = [v for v in values.get("verdicts") or [] if isinstance(v, dict)]
        if verdict and not self._verdicts:
            self._verdicts = [verdict]
        self._status = values.get("status")
        # Decisions carried over from an earlier session are on that session's trace already.
        self._approvals = [
            a
            for a in values.get("approvals") or []
            if isinstance(a, dict) and float(a.get("applied_at") or 0) >= self._began_at
        ]
        root = self.tracer.root
        metrics: dict[str, float] = {
            "tokens": run["tokens"],
            "input_tokens": run["input_tokens"],
            "output_tokens": run["output_tokens"],
            "model_calls": run["calls"],
            "iterations": int(values.get("iteration") or 0),
        }
        if "cost_usd" in run and not run.get("cost_unknown_calls"):
            metrics["cost_usd"] = float(run["cost_usd"])
        if run.get("cache_hits"):
            metrics["cache_hits"] = int(run["cache_hits"])
            metrics["cache_saved_tokens"] = int(run.get("cache_saved_tokens", 0))
        if verdict and verdict.get("score") is not None:
            metrics["judge_score"] = float(verdict["score"])
        self._metrics = metrics
        if root is not None:
            with contextlib.suppress(Exception):
                attrs: dict[str, Any] = {f"atlas.usage.{k}": v for k, v in metrics.items()}
                for scope, counters in usage.items():
                    if scope.startswith("team:"):
                        team = scope.removeprefix("team:")
                        attrs[f"atlas.team.{team}.tokens"] = counters.get(
                            "input_tokens", 0
                        ) + counters.get("output_tokens", 0)
                        if "cost_usd" in counters and not counters.get("cost_unknown_calls"):
                            attrs[f"atlas.team.{team}.cost_usd"] = counters["cost_usd"]
                attrs["atlas.status"] = values.get("status") or ""
                root.set_attributes(attrs)
                root.set_outputs(
                    {
                        # The text first: the trace's response (and its preview in the UI, and
                        # what `mlflow.genai.evaluate` scorers get as `outputs`) is the work.
                        "text": _output_text(values.get("output_path")),
                        "status": values.get("status"),
                        "output": values.get("output_path"),
                        "stop_reason": values.get("stop_reason"),
                        **({"pending": values["pending"]} if values.get("pending") else {}),
                    }
                )
        plan_file = ctx.run_dir / "plan.json"
        self._artifacts = [
            p for p in (plan_file, Path(values.get("output_path") or "")) if p.is_file()
        ]

    def record_alerts(self, breaches: list[dict[str, Any]]) -> None:
        """Alerts the run raised (`name`, `value`, `limit`, `message` each), recorded on the
        trace by `close` as `atlas.alert.<name>` tags and assessments."""
        self._alerts = list(breaches)

    def _write_spans(self) -> dict[int, str]:
        """Every span of the run, reshaped (see `atlas.tracing.tree`), to the tracking store in
        one batched write, so span search, the Overview's charts and the UI's span filters see
        them. Returns the judge span's id per iteration."""
        from mlflow.tracing.client import TracingClient

        from atlas.tracing.tree import judge_spans

        spans, self._spans = self._spans, []
        TracingClient(self._uri).log_spans(self.experiment_id, spans)
        return judge_spans(spans)

    def _log_verdicts(self, trace_id: str, judges: dict[int, str]) -> None:
        judge_model = self._judge_model
        for verdict in self._verdicts:
            iteration = verdict.get("iteration")
            span_id = judges.get(iteration) if isinstance(iteration, int) else None
            log_verdict(trace_id, verdict, source_id=judge_model, span_id=span_id)
        if self._verdict:
            log_verdict(trace_id, self._verdict, source_id=judge_model, final=True)
        if self.spec.acceptance:
            log_criteria(trace_id, list(self.spec.acceptance), self.task_file)
        for alert in self._alerts:
            log_alert(trace_id, alert)
        for decision in self._approvals:
            log_approval(trace_id, decision)

    def _tag_trace(self, trace_id: str, status: str | None) -> None:
        import mlflow

        client = mlflow.MlflowClient(self._uri)
        if status not in (None, "passed"):
            client.set_trace_tag(trace_id, "atlas.outcome", str(status))
        for alert in self._alerts:
            client.set_trace_tag(
                trace_id, f"atlas.alert.{alert['name']}", str(alert.get("message", ""))[:250]
            )

    def _link_model(self, client: Any, run_id: str) -> None:
        """The run as one of the agent version's source runs, its judge score and cost as the
        version's metrics (logged with `model_id` in `close`)."""
        from mlflow.entities import LoggedModelOutput

        if not self._model_id:
            return
        # A run that paused for approval (or was resumed) closes once per session: link once.
        outputs = getattr(client.get_run(run_id), "outputs", None)
        linked = {o.model_id for o in getattr(outputs, "model_outputs", None) or []}
        if self._model_id not in linked:
            client.log_outputs(run_id, [LoggedModelOutput(self._model_id, 0)])

    def close(self, status: str | None = None) -> None:
        """Record the run's metrics, artifacts and verdict, and end the MLflow run.

        A tracking failure never fails the run: after the first one only ending the MLflow run
        is still tried (the store is likely gone; each further call would wait for it), and one
        warning says what was not recorded, unless the trace's own warning already did.
        """
        import mlflow
        from mlflow.entities import Metric

        run_id = self.mlflow_run_id
        if run_id is None:
            return
        client = mlflow.MlflowClient(self._uri)
        now_ms = int(time.time() * 1000)
        steps: list[tuple[str, Callable[[], Any]]] = []
        if self._metrics:
            self._metrics["wall_s"] = round(time.perf_counter() - self._started, 3)
            self._metrics["passed"] = 1.0 if status == "passed" else 0.0
            metrics = [
                Metric(k, float(v), now_ms, 0, model_id=self._model_id)
                for k, v in self._metrics.items()
            ]
            steps.append(("metrics", lambda: client.log_batch(run_id, metrics=metrics)))
        if status not in (None, "passed"):
            steps.append(("the outcome", lambda: client.set_tag(run_id, "atlas.outcome", status)))
        for path in self._artifacts:
            steps.append((path.name, functools.partial(client.log_artifact, run_id, str(path))))
        steps.append(("trace", mlflow.flush_trace_async_logging))
        trace_id = self.trace_id
        judges: dict[int, str] = {}
        if trace_id and self._spans:

            def write_spans() -> None:
                judges.update(self._write_spans())

            steps.append(("the spans", write_spans))
        if trace_id and not self.nested:  # the caller's trace is not stored yet
            steps.append(("the verdicts", lambda: self._log_verdicts(trace_id, judges)))
            steps.append(("the trace's tags", lambda: self._tag_trace(trace_id, status)))
            if self._prompts:
                prompts = self._prompts
                steps.append(
                    (
                        "the personas",
                        lambda: client.link_prompt_versions_to_trace(prompts, trace_id),
                    )
                )
        if self._model_id and self._metrics:
            steps.append(("the agent version", lambda: self._link_model(client, run_id)))
        final = "FINISHED" if status in (None, "passed", "failed", "budget_exhausted") else "FAILED"
        if status == "interrupted":
            final = "KILLED"
        failed: str | None = None
        with QUIET.capture() as found:
            for label, step in steps:
                try:
                    step()
                except Exception as exc:
                    failed = f"{label}: {_exc_line(exc)}"
                    break
            try:
                if status != "awaiting_approval":  # a paused run goes on in a later session
                    client.set_terminated(run_id, status=final)
            except Exception as exc:
                failed = failed or f"the run's end: {_exc_line(exc)}"
        for _, line in found:
            log.debug("MLflow while closing the run: %s", line)
        if failed is not None and self.trace_problem is None:
            where = self.tracking_uri
            _warn(self.on_event, f"MLflow tracking store {where} did not record {failed}")


def _title(spec: TaskSpec) -> str:
    """The trace's name in MLflow's lists: the task's short title."""
    title = " ".join(spec.display_name.split())
    return title if len(title) <= 80 else title[:79] + "…"


OUTPUT_TEXT_CAP = 20_000
"""Characters of the output kept in the trace's response (the file keeps all of it)."""


def _output_text(path: Any) -> str | None:
    if not path:
        return None
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            text = fh.read(OUTPUT_TEXT_CAP + 1)
    except OSError:
        return None
    if len(text) > OUTPUT_TEXT_CAP:
        return text[:OUTPUT_TEXT_CAP] + f"\n[... cut at {OUTPUT_TEXT_CAP} characters; see {path}]"
    return text


BATCH_ENV = "ATLAS_BATCH_ID"
"""Set by `atlas batch` in its workers: every run's trace and MLflow run is tagged with it."""


def batch_tags() -> dict[str, str]:
    batch = os.environ.get(BATCH_ENV, "").strip()
    return {"atlas.batch_id": batch[:250]} if batch else {}


def _open_run(client: Any, experiment_id: str, ctx: RunContext, *, resumed: bool) -> str:
    """The MLflow run for this ATLAS run: a resume continues the run its first session made
    (found by its `atlas.run_id` tag), so a killed run leaves no orphan and no duplicate."""
    from mlflow.entities import Param

    tags = {
        "atlas.run_id": ctx.run_id,
        "atlas.task": ctx.spec.display_name[:250],
        **batch_tags(),
    }
    params = {f"model.{k}": v for k, v in ctx.models.describe().items()}
    params["teams"] = ",".join(ctx.spec.teams)
    if resumed:
        found = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`atlas.run_id` = '{ctx.run_id}'",
            max_results=1,
        )
        if found:
            run = found[0]
            client.update_run(run.info.run_id, status="RUNNING")
            sessions = int(run.data.tags.get("atlas.sessions", "1")) + 1
            client.set_tag(run.info.run_id, "atlas.resumed", "True")
            client.set_tag(run.info.run_id, "atlas.sessions", str(sessions))
            new = {k: v for k, v in params.items() if k not in run.data.params}
            if new:
                client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in new.items()])
            return str(run.info.run_id)
    created = client.create_run(
        experiment_id,
        run_name=ctx.run_id,
        tags={**tags, "atlas.resumed": str(resumed), "atlas.sessions": "1"},
    )
    run_id = str(created.info.run_id)
    client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
    return run_id


def version_name(spec: TaskSpec, ctx: RunContext) -> tuple[str, str]:
    """(the LoggedModel's name, the configuration's hash): the task's `version:` label (or
    `ATLAS_VERSION`) when set, else `atlas-<hash>`."""
    from atlas.spec import agent_version_label

    digest = agent_version(spec, ctx)
    return (agent_version_label(spec) or f"atlas-{digest}"), digest


def _personas_as_prompts(client: Any, ctx: RunContext, model_id: str | None) -> list[Any]:
    """The run's personas in the prompt registry; [] (and the run goes on) if that fails."""
    from atlas.tracing.prompts import register_personas

    try:
        return register_personas(client, ctx, model_id)
    except Exception as exc:
        log.debug("could not register the personas as prompts: %s", exc)
        return []


_models: dict[tuple[str, str, str], str] = {}


def _logged_model(
    client: Any,
    experiment_id: str,
    name: str,
    *,
    source_run: str | None = None,
    params: dict[str, str] | None = None,
    digest: str | None = None,
) -> str | None:
    """Get or create the LoggedModel for an agent version (READY, with its params and the run
    that made it); traces and runs link to it."""
    key = (str(client.tracking_uri), experiment_id, name)
    if key in _models:
        return _models[key]
    try:
        found = client.search_logged_models(
            experiment_ids=[experiment_id], filter_string=f"name = '{name}'", max_results=1
        )
        if found:
            model_id = str(found[0].model_id)
            known = dict(found[0].params or {})
        else:
            created = client.create_logged_model(
                experiment_id,
                name=name,
                model_type="agent",
                source_run_id=source_run,
                tags={"atlas.config_hash": digest} if digest else None,
            )
            model_id = str(created.model_id)
            known = {}
            from mlflow.entities import LoggedModelStatus

            client.finalize_logged_model(model_id, LoggedModelStatus.READY)
        new = {k: v for k, v in (params or {}).items() if k not in known}
        if new:
            client.log_model_params(model_id, new)
    except Exception as exc:
        log.debug("could not record the agent version: %s", exc)
        return None
    _models[key] = model_id
    return model_id


def criterion_names(criteria: list[str]) -> list[str]:
    """A short slug of each criterion's text, in the task's order, unique within the task."""
    names: list[str] = []
    for index, text in enumerate(criteria, 1):
        words = re.findall(r"[a-z0-9]+", text.lower())
        kept: list[str] = []
        for word in (w for w in words if w not in _SLUG_SKIP):
            if kept and len("_".join([*kept, word])) > 36:
                break
            kept.append(word)
        slug = "_".join(kept)[:48] or "criterion"
        name = f"criterion.{slug}"
        if name in names:
            name = f"{name}_{index}"
        names.append(name)
    return names


_SLUG_SKIP = {"a", "an", "the", "of", "and", "or", "to", "from", "in", "on", "for", "with"}


def log_verdict(
    trace_id: str,
    verdict: dict[str, Any],
    *,
    source_id: str,
    span_id: str | None = None,
    final: bool = False,
) -> None:
    """One verdict of the judge as feedback: `judge` (passed), `judge_score`, and one per
    criterion named by `criterion_names`; on its judge span (`span_id`) for an iteration's
    verdict, on the trace for the final one (`final`, also in its metadata)."""
    import mlflow
    from mlflow.entities import AssessmentSource, AssessmentSourceType

    source = AssessmentSource(source_type=AssessmentSourceType.LLM_JUDGE, source_id=source_id)
    iteration = str(verdict.get("iteration"))
    meta = {"iteration": iteration, "final": str(final)}
    common: dict[str, Any] = {"trace_id": trace_id, "source": source, "span_id": span_id}
    feedback = verdict.get("feedback") or None
    mlflow.log_feedback(
        name="judge",
        value=bool(verdict.get("passed")),
        rationale=feedback,
        metadata={**meta, "score": str(verdict.get("score"))},
        **common,
    )
    mlflow.log_feedback(
        name="judge_score",
        value=float(verdict.get("score") or 0.0),
        rationale=feedback,
        metadata=meta,
        **common,
    )
    results = [r for r in verdict.get("criteria") or [] if isinstance(r, dict)]
    texts = [str(r.get("criterion", "")) for r in results]
    for name, text, result in zip(criterion_names(texts), texts, results, strict=True):
        reason = str(result.get("reason") or "")
        mlflow.log_feedback(
            name=name,
            value=bool(result.get("passed")),
            rationale=f"{text}: {reason}" if reason else text,
            metadata={**meta, "criterion": text[:500]},
            **common,
        )


def log_criteria(trace_id: str, criteria: list[str], task_file: str | None) -> None:
    """The task's acceptance criteria as an expectation, credited to the task file."""
    import mlflow
    from mlflow.entities import AssessmentSource, AssessmentSourceType

    source = AssessmentSource(source_type=AssessmentSourceType.HUMAN, source_id=task_file or "task")
    mlflow.log_expectation(
        trace_id=trace_id, name="acceptance_criteria", value=criteria, source=source
    )


def log_approval(trace_id: str, decision: dict[str, Any]) -> None:
    """An approval decision as feedback from the person who made it (HUMAN source; CODE for
    `--approve-all`): `approval.plan` or `approval.tool.<tool>`, True unless rejected, with
    who, when, what was decided and how long it waited in its metadata."""
    import mlflow
    from mlflow.entities import AssessmentSource, AssessmentSourceType

    kind = AssessmentSourceType.CODE if decision.get("auto") else AssessmentSourceType.HUMAN
    name = (
        "approval.plan"
        if decision.get("kind") == "plan"
        else f"approval.tool.{decision.get('tool')}"
    )
    meta = {
        "id": str(decision.get("id")),
        "action": str(decision.get("action")),
        "by": str(decision.get("by")),
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(decision.get("at") or 0))),
        "waited_s": str(decision.get("waited_s")),
    }
    for key in ("step", "iteration", "edited_steps"):
        if decision.get(key) is not None:
            meta[key] = str(decision[key])
    if decision.get("args") is not None:
        meta["args"] = json.dumps(decision["args"], default=str)[:1000]
    if decision.get("edited_args") is not None:
        meta["edited_args"] = json.dumps(decision["edited_args"], default=str)[:1000]
    mlflow.log_feedback(
        trace_id=trace_id,
        name=name,
        value=decision.get("action") != "reject",
        rationale=decision.get("reason") or f"{decision.get('action')} by {decision.get('by')}",
        source=AssessmentSource(source_type=kind, source_id=str(decision.get("by") or "unknown")),
        metadata=meta,
    )


def log_alert(trace_id: str, alert: dict[str, Any]) -> None:
    """An alert the run raised, as failed feedback from ATLAS's monitor."""
    import mlflow
    from mlflow.entities import AssessmentSource, AssessmentSourceType

    mlflow.log_feedback(
        trace_id=trace_id,
        name=f"alert.{alert['name']}",
        value=False,
        rationale=str(alert.get("message") or "") or None,
        source=AssessmentSource(source_type=AssessmentSourceType.CODE, source_id="atlas.alerts"),
        metadata={"value": str(alert.get("value")), "limit": str(alert.get("limit"))},
    )


def export_whole_traces() -> None:
    """Write each trace to the store once, when its root span ends.

    MLflow 3 also writes every span to a SQL store the moment it ends: one transaction per span,
    on the thread that ended it, so inside the run's critical path. Profiled (py-spy, the
    fan-out benchmark): those writes were most of tracing's cost, and skipping them took a traced
    zero-latency run from 3.0 s to 0.5 s (0.27 s untraced). The spans are not lost: when the
    run ends, `_AtlasTrace.close` writes all of them, reshaped, in one batched `log_spans` call
    (`_write_spans`), so span search, the Overview's tool-call charts and the UI's span filters
    see them, and the trace's artifact holds the same tree.

    MLflow has no setting for this; the exporter's flag is the one MLflow itself clears for a
    store without span logging. Without that attribute (another MLflow), nothing changes.
    """
    try:
        from mlflow.tracing.provider import _get_trace_exporter

        exporter = _get_trace_exporter()
    except Exception:  # pragma: no cover - another MLflow layout
        return
    if exporter is not None and hasattr(exporter, "_store_supports_log_spans"):
        exporter._store_supports_log_spans = False


_ready: dict[tuple[str, str], str] = {}
_current: list[tuple[str, str] | None] = [None]


SQL_OPEN_TRIES = 3
"""MLflow's tries at opening a SQL store (its own default: 10, sleeping about 100 s in all)."""


def _try_setup(uri: str, experiment: str, state_dir: Path) -> tuple[str | None, str | None]:
    """(experiment id, None), or (None, why MLflow could not set the store up). MLflow's HTTP
    calls get one quick try each, its SQL store opening `SQL_OPEN_TRIES`, and whatever MLflow
    logs meanwhile is collected rather than printed (the caller warns once)."""
    _bound_sql_retries()
    with QUIET.capture() as found, _bounded_http():
        try:
            return _setup(uri, experiment, state_dir), None
        except Exception as exc:
            return None, _exc_line(exc) or _captured(found)


def _bound_sql_retries() -> None:
    """MLflow retries opening a SQL store ten times with exponential sleeps (about 100 s when
    the file cannot be opened) and has no setting for it; the count is a module constant that
    MLflow reads on each call. The checks in `store_problem` catch the known causes first; this
    bounds any other. `tests/test_tracking_fallback.py::test_corrupt_sqlite_store_falls_back`
    pins it."""
    try:
        from mlflow.store.db import utils
    except ImportError:  # pragma: no cover - MLflow without its SQL store
        return
    if getattr(utils, "MAX_RETRY_COUNT", 0) > SQL_OPEN_TRIES:
        utils.MAX_RETRY_COUNT = SQL_OPEN_TRIES


_atlas_experiment: list[tuple[str, str] | None] = [None]
"""The active experiment ATLAS set itself (the process had chosen none), if any: (store, id),
as ids repeat across stores."""


def _caller_chose_experiment(uri: str) -> bool:
    """Whether the process's active experiment is someone else's choice than ATLAS's."""
    from mlflow.tracking import fluent

    active = getattr(fluent, "_active_experiment_id", None)
    if active is not None and (uri, str(active)) == _atlas_experiment[0]:
        return False
    return bool(
        active or os.environ.get("MLFLOW_EXPERIMENT_ID") or os.environ.get("MLFLOW_EXPERIMENT_NAME")
    )


def _setup(uri: str, experiment: str, state_dir: Path) -> str:
    """Point MLflow at the store and experiment (get-or-create), once per process and store."""
    import mlflow

    global _autologged
    key = (uri, experiment)
    if key in _ready and _current[0] == key and mlflow.get_tracking_uri() == uri:
        return _ready[key]
    from atlas._process import file_lock

    # Serialises first creation of the sqlite store across processes (schema migrations race).
    with file_lock(state_dir / "mlflow.lock"):
        before = mlflow.get_tracking_uri()
        mlflow.set_tracking_uri(uri)
        client = mlflow.MlflowClient(uri)
        if uri.startswith("sqlite:///"):
            # WAL, as ATLAS's own SQLite files, so concurrent runs' trace writes do not block
            # each other's reads (MLflow leaves SQLite in rollback-journal mode).
            from atlas.runs import connect

            connect(Path(uri.removeprefix("sqlite:///"))).close()
        found = client.get_experiment_by_name(experiment)
        if found is None:
            artifacts = (state_dir / "mlartifacts").as_uri() if uri.startswith("sqlite") else None
            try:
                experiment_id = client.create_experiment(experiment, artifact_location=artifacts)
            except Exception:
                again = client.get_experiment_by_name(experiment)
                if again is None:
                    raise
                experiment_id = again.experiment_id
        else:
            experiment_id = found.experiment_id
        # Every span, run and model of ATLAS names its experiment explicitly, so a caller's
        # active experiment stays theirs. Only a process that chose none gets ATLAS's, for
        # the traces MLflow's autolog starts itself (an embedded graph's `invoke`): they would
        # otherwise go to the Default experiment, whose artifacts MLflow keeps in ./mlruns.
        if not _caller_chose_experiment(before):
            mlflow.set_experiment(experiment_id=experiment_id)
            _atlas_experiment[0] = (uri, str(experiment_id))
    _ready[key] = experiment_id
    _current[0] = key
    if not _autologged:
        # MLflow warns about its own internals while loading the LangChain flavour; those
        # warnings say nothing about the user's run.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mlflow.langchain

            mlflow.langchain.autolog(log_traces=True, silent=True)
        _autologged = True
    ensure_processors()
    return experiment_id


_processors: list[Any] = []


def ensure_processors() -> None:
    """ATLAS's span processors (secret redaction, then model cost) in MLflow's tracing config,
    after any of the caller's own. Checked at every run's start, not only once: MLflow's config
    is process-global, and `reset_config` or a `with mlflow.tracing.configure(...)` block
    elsewhere in the process drops or restores it (a test run once lost the cost attribute so)."""
    from mlflow.tracing import configure
    from mlflow.tracing.config import get_config

    if not _processors:
        from atlas.tracing.redact import make_processor
        from atlas.tracing.tree import cost_processor

        _processors.extend([make_processor(), cost_processor()])
    current = list(get_config().span_processors or [])
    if all(any(p is q for q in current) for p in _processors):
        return
    others = [p for p in current if not any(p is q for q in _processors)]
    configure(span_processors=[*others, *_processors])
