"""MLflow tracing for a run: one MLflow run and one trace, autolog plus ATLAS's coordination spans.

- Store: `tracing.tracking_uri`, `--tracking-uri` or `MLFLOW_TRACKING_URI`, else a sqlite file in
  the state directory. A remote server is probed first (about 3 s at most); when it cannot be
  reached the run falls back to the local store with one warning.
- Spans: `mlflow.langchain.autolog()` records model, tool and graph-node spans. ATLAS's spans (plan,
  dispatch, handoff, worker, judge, budget stop) are parented explicitly on the graph node that
  opened them, so they nest correctly in async runs too.
- Tracing never fails a run: every MLflow call here is guarded and logged at debug level.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterator
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


def probe(uri: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """None if a tracking server answers at `uri`; else why not. Bounded to about 2 x timeout."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("http", "https"):
        return None
    host = parsed.hostname or "127.0.0.1"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        return f"cannot connect to {host}:{port} ({exc.strerror or type(exc).__name__})"
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout) as response:
            if response.status >= 500:
                return f"{health} answered {response.status}"
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            return f"{health} answered {exc.code}"
    except (OSError, TimeoutError) as exc:
        return f"no answer from {health} within {timeout:g}s ({type(exc).__name__})"
    return None


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


class MlflowTrace:
    """The run-level half: the MLflow run, the root span, metrics, artifacts, assessments."""

    def __init__(self, spec: TaskSpec, uri: str, experiment_id: str, on_event: Any) -> None:
        self.spec = spec
        self.tracking_uri = uri
        self.experiment_id = experiment_id
        self.tracer = MlflowTracer()
        self.trace_id: str | None = None
        self.mlflow_run_id: str | None = None
        self.on_event = on_event
        self._verdict: dict[str, Any] | None = None
        self._artifacts: list[Path] = []
        self._metrics: dict[str, float] = {}
        self._started = time.perf_counter()

    @classmethod
    def start(
        cls,
        spec: TaskSpec,
        state_dir: Path,
        *,
        tracking_uri: str | None = None,
        on_event: Any = None,
    ) -> MlflowTrace | None:
        offline_defaults()
        uri = choose_uri(spec, state_dir, tracking_uri)
        problem = probe(uri)
        if problem is not None:
            fallback = local_uri(state_dir)
            message = f"MLflow tracking server {uri} unreachable ({problem}); tracing to {fallback}"
            log.warning(message)
            if on_event is not None:
                on_event({"event": "warning", "message": message})
            uri = fallback
        elif urlparse(uri).scheme in ("http", "https"):
            # Bound MLflow's HTTP client: its defaults retry for minutes on a dead server.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        try:
            experiment_id = _setup(uri, spec.tracing.experiment or DEFAULT_EXPERIMENT, state_dir)
        except Exception as exc:
            message = f"tracing disabled for this run: {type(exc).__name__}: {str(exc)[:200]}"
            log.warning(message)
            if on_event is not None:
                on_event({"event": "warning", "message": message})
            return None
        return cls(spec, uri, experiment_id, on_event)

    @contextlib.contextmanager
    def root(self, ctx: RunContext, *, resumed: bool) -> Iterator[None]:
        """The MLflow run and the trace's root span around the graph's execution.

        The run is managed through the client with its id, not MLflow's thread-local "active
        run", so parallel and async runs in one process never see each other's run.
        """
        import mlflow

        client = mlflow.MlflowClient(self.tracking_uri)
        root_cm: Any = None
        try:
            run = client.create_run(
                self.experiment_id,
                run_name=ctx.run_id,
                tags={
                    "atlas.run_id": ctx.run_id,
                    "atlas.resumed": str(resumed),
                    "atlas.task": ctx.spec.display_name[:250],
                },
            )
            self.mlflow_run_id = run.info.run_id
            params = {f"model.{k}": v for k, v in ctx.models.describe().items()}
            params["teams"] = ",".join(ctx.spec.teams)
            from mlflow.entities import Param

            client.log_batch(self.mlflow_run_id, params=[Param(k, v) for k, v in params.items()])
            model_id = _logged_model(
                client, self.experiment_id, f"atlas-{agent_version(ctx.spec, ctx)}"
            )
            root_cm = mlflow.start_span("atlas.task", span_type="AGENT")
            span = root_cm.__enter__()
            export_whole_traces()
            span.set_inputs({"task": ctx.spec.task, "acceptance": list(ctx.spec.acceptance)})
            span.set_attributes({"atlas.run_id": ctx.run_id, "atlas.resumed": resumed})
            self.trace_id = span.trace_id
            self.tracer.root = span
            mlflow.update_current_trace(
                tags={"atlas.run_id": ctx.run_id},
                metadata={"atlas.resumed": str(resumed), "mlflow.sourceRun": self.mlflow_run_id},
                session_id=ctx.run_id,
                model_id=model_id,
            )
        except Exception as exc:
            log.debug("could not start the trace: %s", exc)
        error: BaseException | None = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            if root_cm is not None:
                with contextlib.suppress(Exception):
                    if error is not None:
                        root_cm.__exit__(type(error), error, error.__traceback__)
                    else:
                        root_cm.__exit__(None, None, None)

    def finish(self, ctx: RunContext, values: dict[str, Any]) -> None:
        from atlas.models.usage import totals

        usage = values.get("usage") or {}
        run = totals(usage)
        verdict = values.get("verdict") or None
        self._verdict = verdict
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
                        "status": values.get("status"),
                        "output": values.get("output_path"),
                        "stop_reason": values.get("stop_reason"),
                    }
                )
        plan_file = ctx.run_dir / "plan.json"
        self._artifacts = [
            p for p in (plan_file, Path(values.get("output_path") or "")) if p.is_file()
        ]

    def close(self, status: str | None = None) -> None:
        import mlflow
        from mlflow.entities import Metric

        client = mlflow.MlflowClient(self.tracking_uri)
        run_id = self.mlflow_run_id
        if run_id is None:
            return
        now_ms = int(time.time() * 1000)
        with contextlib.suppress(Exception):
            if self._metrics:
                self._metrics["wall_s"] = round(time.perf_counter() - self._started, 3)
                client.log_batch(
                    run_id,
                    metrics=[Metric(k, float(v), now_ms, 0) for k, v in self._metrics.items()],
                )
        for path in self._artifacts:
            with contextlib.suppress(Exception):
                client.log_artifact(run_id, str(path))
        with contextlib.suppress(Exception):
            mlflow.flush_trace_async_logging()
        if self.trace_id and self._verdict:
            with contextlib.suppress(Exception):
                log_verdict(self.trace_id, self._verdict, list(self.spec.acceptance))
        with contextlib.suppress(Exception):
            final = (
                "FINISHED" if status in (None, "passed", "failed", "budget_exhausted") else "FAILED"
            )
            if status == "interrupted":
                final = "KILLED"
            client.set_terminated(run_id, status=final)


_models: dict[tuple[str, str, str], str] = {}


def _logged_model(client: Any, experiment_id: str, name: str) -> str | None:
    """Get or create the LoggedModel for an agent version; traces link to it."""
    key = (str(client.tracking_uri), experiment_id, name)
    if key in _models:
        return _models[key]
    try:
        found = client.search_logged_models(
            experiment_ids=[experiment_id], filter_string=f"name = '{name}'", max_results=1
        )
        if found:
            model_id = str(found[0].model_id)
        else:
            created = client.create_logged_model(experiment_id, name=name, model_type="agent")
            model_id = str(created.model_id)
    except Exception as exc:
        log.debug("could not record the agent version: %s", exc)
        return None
    _models[key] = model_id
    return model_id


def log_verdict(trace_id: str, verdict: dict[str, Any], criteria: list[str]) -> None:
    """The judge's verdict as feedback assessments; the criteria as expectations."""
    import mlflow
    from mlflow.entities import AssessmentSource, AssessmentSourceType

    source = AssessmentSource(source_type=AssessmentSourceType.LLM_JUDGE, source_id="atlas.judge")
    mlflow.log_feedback(
        trace_id=trace_id,
        name="judge",
        value=bool(verdict.get("passed")),
        source=source,
        rationale=verdict.get("feedback") or None,
        metadata={"score": str(verdict.get("score")), "iteration": str(verdict.get("iteration"))},
    )
    mlflow.log_feedback(
        trace_id=trace_id,
        name="judge_score",
        value=float(verdict.get("score") or 0.0),
        source=source,
        rationale=verdict.get("feedback") or None,
    )
    for index, result in enumerate(verdict.get("criteria") or [], 1):
        mlflow.log_feedback(
            trace_id=trace_id,
            name=f"criterion_{index}",
            value=bool(result.get("passed")),
            source=source,
            rationale=result.get("reason") or None,
            metadata={"criterion": str(result.get("criterion", ""))[:500]},
        )
    if criteria:
        mlflow.log_expectation(trace_id=trace_id, name="acceptance_criteria", value=criteria)


def export_whole_traces() -> None:
    """Write each trace to the store once, when its root span ends.

    MLflow 3 also writes every span to a SQL store the moment it ends: one transaction per span,
    on the thread that ended it, so inside the run's critical path. Profiled (py-spy, the
    fan-out benchmark): those writes were most of tracing's cost, and skipping them took a traced
    zero-latency run from 3.0 s to 0.5 s (0.27 s untraced). The whole trace is still written
    when the run ends, with every span; the spans then live in the trace's artifact, which the
    UI and `mlflow.get_trace` read, so only span-level trace search is lost.

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
        mlflow.set_experiment(experiment_id=experiment_id)
    _ready[key] = experiment_id
    _current[0] = key
    if not _autologged:
        # MLflow warns about its own internals while loading the LangChain flavour; those
        # warnings say nothing about the user's run.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import mlflow.langchain
            from mlflow.tracing import configure

            from atlas.tracing.redact import make_processor

            configure(span_processors=[make_processor()])
            mlflow.langchain.autolog(log_traces=True, silent=True)
        _autologged = True
    return experiment_id
