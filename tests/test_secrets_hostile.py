"""Secrets given in model strings and task options: the key given is the key sent, and it shows up
in no record, trace, summary or console line (issue 12, "Nothing lost, nothing leaked").

The key used here is not shaped like a provider key (`sk-...`), so only knowing it was given as a
secret can keep it out."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import atlas
from atlas.tracing.redact import (
    REDACTED,
    make_processor,
    public_model,
    public_url,
    register_secret,
    secret_values,
)
from tests.conftest import EXAMPLES, atlas_cli
from tests.fake_providers import FakeProviders

KEY = "hunter2-given-key-ATLASQ7"
"""A key that looks like nothing in particular (no `sk-` prefix)."""


@pytest.fixture
def fake() -> Iterator[FakeProviders]:
    with FakeProviders() as server:
        yield server


def _task_file(tmp_path: Path, models: dict[str, Any] | None, *, memory: bool = True) -> Path:
    quickstart = EXAMPLES / "quickstart"
    data: dict[str, Any] = {
        "name": "secrets",
        "task": "Write a short brief on the bike-share pilot.",
        "acceptance": ["States the total number of trips."],
        "inputs": {
            "documents": [str(quickstart / "docs" / "*.md")],
            "data": [str(quickstart / "data" / "*.csv")],
        },
        "output": str(tmp_path / "out" / "brief.md"),
        "budget": {"max_iterations": 1},
        "tracing": {"enabled": True, "experiment": "atlas-secrets"},
        "memory": {"enabled": memory},
    }
    if models is not None:
        data["models"] = models
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _assert_nowhere(secret: str, tmp_path: Path, *texts: str) -> list[str]:
    """The secret's bytes are in no file under tmp_path (state directory with its SQLite files and
    WAL files, MLflow artifacts, run folders, memory stores, the output) and in none of `texts`."""
    needle = secret.encode()
    scanned: list[str] = []
    for path in sorted(tmp_path.rglob("*")):
        if path.is_file() and path.name != "task.yaml":
            scanned.append(path.relative_to(tmp_path).as_posix())
            assert needle not in path.read_bytes(), f"the key is in {path}"
    for text in texts:
        assert secret not in text
    return scanned


def _quick(make_spec: Callable[..., Any], models: dict[str, Any]) -> Any:
    """A spec for runs that test what is sent: memory off (it has nothing to do with keys)."""
    return make_spec(models=models, memory={"enabled": False})


def _auth_headers(fake: FakeProviders) -> set[str]:
    return {r.headers.get("authorization", "") for r in fake.requests}


# -- a whole traced run through the CLI --------------------------------------------------------


def test_a_key_in_the_task_files_model_string_is_sent_and_never_kept(
    fake: FakeProviders, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    model = {"model": f"openai:gpt-4o-mini?api_key={KEY}", "base_url": f"{fake.url}/v1"}
    task = _task_file(tmp_path, {"default": model})
    proc = atlas_cli("run", str(task), "--json", "--state-dir", str(state), timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    # The key given is the key sent, on every request (it used to be swapped for "not-needed").
    assert fake.requests and _auth_headers(fake) == {f"Bearer {KEY}"}
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary["models"].values()) == {f"openai:gpt-4o-mini?api_key={REDACTED}"}
    assert proc.stderr.strip(), "progress lines were expected on stderr"
    scanned = _assert_nowhere(KEY, tmp_path, proc.stdout, proc.stderr)
    joined = " ".join(scanned)
    for part in ("runs.db", "checkpoints", "mlflow.db", "mlartifacts", "brief.md"):
        assert part in joined, (part, scanned)
    assert summary["trace_id"]  # the run was traced, so the trace was scanned too


def test_a_key_and_base_url_in_the_command_lines_model_are_sent_and_never_kept(
    fake: FakeProviders, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    task = _task_file(tmp_path, None, memory=False)
    override = f"openai:gpt-4o-mini?api_key={KEY}&base_url={fake.url}/v1"
    proc = atlas_cli(
        "run", str(task), "--model", override, "--json", "--state-dir", str(state), timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert fake.requests and _auth_headers(fake) == {f"Bearer {KEY}"}
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(summary["models"].values()) == {
        f"openai:gpt-4o-mini?api_key={REDACTED}&base_url={fake.url}/v1"
    }
    _assert_nowhere(KEY, tmp_path, proc.stdout, proc.stderr)


def test_a_malformed_model_with_a_key_is_refused_without_showing_the_key(tmp_path: Path) -> None:
    task = _task_file(tmp_path, None)
    proc = atlas_cli(
        "run", str(task), "--model", f"openai:gpt-4o-mini?api_key={KEY}&oops", "--json"
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("atlas: error:") and len(proc.stderr.strip().splitlines()) == 1
    assert "oops" in proc.stderr and KEY not in proc.stderr and KEY not in proc.stdout


# -- the key given is the key sent ---------------------------------------------------------------


@pytest.mark.parametrize("where", ["query", "params"])
def test_a_given_key_is_the_key_sent_to_a_self_hosted_server(
    where: str, fake: FakeProviders, make_spec: Callable[..., Any], state_dir: Path
) -> None:
    model: dict[str, Any] = {"model": "openai:gpt-4o-mini", "base_url": f"{fake.url}/v1"}
    if where == "query":
        model["model"] += f"?api_key={KEY}"
    else:
        model["params"] = {"api_key": KEY}
    result = atlas.run(_quick(make_spec, {"default": model}), state_dir_path=state_dir)
    assert result.status == "passed"
    assert len(fake.requests) == result.model_calls > 0
    assert _auth_headers(fake) == {f"Bearer {KEY}"}


def test_a_given_key_of_digits_is_sent_as_written(
    fake: FakeProviders, make_spec: Callable[..., Any], state_dir: Path
) -> None:
    """The query parser reads `12345678` as a number; the key sent is still the text given."""
    model = {"model": "openai:gpt-4o-mini?api_key=00123456789", "base_url": f"{fake.url}/v1"}
    result = atlas.run(_quick(make_spec, {"default": model}), state_dir_path=state_dir)
    assert result.status == "passed"
    assert _auth_headers(fake) == {"Bearer 00123456789"}


def test_without_a_key_a_self_hosted_server_gets_the_placeholder(
    fake: FakeProviders, make_spec: Callable[..., Any], state_dir: Path
) -> None:
    model = {"model": "openai:gpt-4o-mini", "base_url": f"{fake.url}/v1"}
    result = atlas.run(_quick(make_spec, {"default": model}), state_dir_path=state_dir)
    assert result.status == "passed"
    assert _auth_headers(fake) == {"Bearer not-needed"}


def test_labels_and_usage_are_public_and_still_priced(
    fake: FakeProviders, make_spec: Callable[..., Any], state_dir: Path
) -> None:
    model = {"model": f"openai:gpt-4o-mini?api_key={KEY}", "base_url": f"{fake.url}/v1"}
    result = atlas.run(_quick(make_spec, {"default": model}), state_dir_path=state_dir)
    public = f"openai:gpt-4o-mini?api_key={REDACTED}"
    assert set(result.models.values()) == {public}
    assert list(result.by_model) == [public]
    assert result.cost_usd is not None and result.cost_usd > 0  # gpt-4o-mini's price was found
    assert KEY not in result.to_json()


# -- the progress line ---------------------------------------------------------------------------


def test_progress_lines_show_no_secret(capsys: pytest.CaptureFixture[str]) -> None:
    from atlas.progress import Progress

    register_secret("gateway-token-ATLASQ-55")
    progress = Progress(enabled=True)
    progress.handle(
        {
            "event": "start",
            "run_id": "r1",
            "models": {"planner": f"openai:gpt-4o-mini?api_key={KEY}&temperature=0"},
        }
    )
    progress.handle(
        {
            "event": "step_done",
            "id": "1.a",
            "team": "analysis",
            "note": "model unavailable: last: gateway-token-ATLASQ-55 refused",
        }
    )
    out = capsys.readouterr().out
    assert "openai:gpt-4o-mini?api_key=[REDACTED]&temperature=0" in out
    assert KEY not in out and "gateway-token-ATLASQ-55" not in out


# -- the span processor --------------------------------------------------------------------------


class _Span:
    def __init__(self, inputs: Any, attributes: dict[str, Any]) -> None:
        self.name = "ChatOpenAI"
        self.inputs = inputs
        self.outputs = None
        self.attributes = attributes

    def set_inputs(self, value: Any) -> None:
        self.inputs = value

    def set_outputs(self, value: Any) -> None:
        self.outputs = value

    def set_attributes(self, value: dict[str, Any]) -> None:
        self.attributes = {**self.attributes, **value}


def test_registered_secrets_are_redacted_from_spans() -> None:
    """A key given in a model string or params is redacted from every span, as a value on its
    own (LangChain's serialized kwargs) and inside text, though no environment variable holds
    it and it does not look like a key."""
    secret = "plain-looking-value-ATLASQ-91"
    assert secret not in secret_values()
    register_secret(f"Bearer {secret}")
    assert secret in secret_values() and f"Bearer {secret}" in secret_values()
    span = _Span(
        {"messages": [f"my key is {secret}"]},
        {"invocation_params": {"openai_api_key": secret, "model": "gpt-4o-mini"}},
    )
    make_processor()(span)
    text = json.dumps([span.inputs, span.attributes])
    assert secret not in text and "gpt-4o-mini" in text and REDACTED in text


def test_resolving_a_model_registers_its_secrets(fake: FakeProviders) -> None:
    from atlas.models import resolve_model
    from atlas.spec import ModelSpec

    header = "header-token-ATLASQ-33"
    resolve_model(
        ModelSpec(
            model="openai:gpt-4o-mini?api_key=query-key-ATLASQ-12",
            base_url=f"http://user:url-password-ATLASQ@127.0.0.1:{fake.url.rsplit(':', 1)[1]}/v1",
            params={"default_headers": {"X-Gateway-Token": header}, "max_tokens": 123456},
        )
    )
    known = secret_values()
    assert {"query-key-ATLASQ-12", header, "url-password-ATLASQ"} <= set(known)
    assert "123456" not in known  # max_tokens is a count, not a secret


# -- public_model and public_url -------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "public"),
    [
        ("openai:gpt-4o-mini?api_key=hunter2hunter2", "openai:gpt-4o-mini?api_key=[REDACTED]"),
        (
            "openai:gpt-4o?temperature=0&x-gateway-token=abc&max_tokens=50",
            "openai:gpt-4o?temperature=0&x-gateway-token=[REDACTED]&max_tokens=50",
        ),
        (
            "openai:my-model?base_url=https://me:pa55word@gw.example/v1&api_key_env=GW_KEY",
            "openai:my-model?base_url=https://me:[REDACTED]@gw.example/v1&api_key_env=GW_KEY",
        ),
        (
            'openai:gpt-4o?default_headers={"Authorization":"Bearer abc","X-Trace":"1"}',
            'openai:gpt-4o?default_headers={"Authorization":"[REDACTED]","X-Trace":"1"}',
        ),
        ("anthropic:claude-haiku-4-5?Client_Secret=s&password=p", None),
        # no false positives: nothing secret, nothing changed
        ("scripted?latency_ms=100", "scripted?latency_ms=100"),
        ("local?max_tokens=100&temperature=0.2", "local?max_tokens=100&temperature=0.2"),
        ("openai:gpt-4o-mini", "openai:gpt-4o-mini"),
        ("scripted", "scripted"),
        ("local:/models/keystone-7b.gguf", "local:/models/keystone-7b.gguf"),
    ],
)
def test_public_model(model: str, public: str | None) -> None:
    shown = public_model(model)
    if public is not None:
        assert shown == public
    else:
        assert shown == "anthropic:claude-haiku-4-5?Client_Secret=[REDACTED]&password=[REDACTED]"
    assert public_model(shown) == shown  # idempotent
    assert shown.partition("?")[0] == model.partition("?")[0]  # the model name is kept
    from atlas.models.pricing import price_for

    assert price_for(shown) == price_for(model)  # prices are still found


@pytest.mark.parametrize(
    ("url", "public"),
    [
        ("https://user:s3cret-pass@host:8443/v1", "https://user:[REDACTED]@host:8443/v1"),
        ("https://user:p@ss@host/v1", "https://user:[REDACTED]@host/v1"),
        (
            "http://127.0.0.1:5000/api?token=abc&page=2",
            "http://127.0.0.1:5000/api?token=[REDACTED]&page=2",
        ),
        ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1"),
        ("sqlite:////tmp/state/mlflow.db", "sqlite:////tmp/state/mlflow.db"),
        ("bolt://neo4j@graph:7687", "bolt://neo4j@graph:7687"),
    ],
)
def test_public_url(url: str, public: str) -> None:
    assert public_url(url) == public
    assert public_url(public) == public


def test_a_failing_model_with_a_key_leaves_no_key_in_notes_events_or_checkpoints(
    make_spec: Callable[..., Any], tmp_path: Path
) -> None:
    """Retries, fallbacks and the "model unavailable" note name the model that failed: in its
    public form, in the progress events, the trace and the checkpointed step results."""
    events: list[dict[str, Any]] = []
    with FakeProviders(always="500") as down:
        failing = {
            "model": f"openai:gpt-4o-mini?api_key={KEY}",
            "base_url": f"{down.url}/v1",
            "max_retries": 1,
        }
        spec = make_spec(
            models={"default": "scripted", "teams": {"analysis": failing}},
            tracing={"enabled": True, "experiment": "atlas-secrets"},
            memory={"enabled": False},
        )
        result = atlas.run(spec, state_dir_path=tmp_path / "state", on_event=events.append)
        assert down.requests and _auth_headers(down) == {f"Bearer {KEY}"}
    assert result.status == "passed"
    kinds = {e["event"] for e in events}
    assert {"retry", "step_done"} <= kinds
    notes = [e.get("note") or "" for e in events if e["event"] == "step_done"]
    assert any("model unavailable" in n and "api_key=[REDACTED]" in n for n in notes), notes
    assert KEY not in json.dumps(events, default=str)
    _assert_nowhere(KEY, tmp_path)
