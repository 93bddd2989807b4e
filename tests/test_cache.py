"""The model-response cache (`cache:`): a repeated request is answered from SQLite or a Redis
server, costs nothing, shows in the summary and the trace, and a broken cache never costs a
model call or a run."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

import atlas
from tests.conftest import EXAMPLES, REDIS_PASSWORD, atlas_cli, free_port


def _task(tmp_path: Path, cache: Any) -> Path:
    """The quickstart with `cache:` set and memory off: memory would recall the first run in
    the second, which makes its prompts (rightly) different requests."""
    folder = tmp_path / "quickstart"
    shutil.copytree(EXAMPLES / "quickstart", folder)
    task = folder / "task.yaml"
    data = yaml.safe_load(task.read_text())
    data["memory"] = {"enabled": False}
    if cache is not None:
        data["cache"] = cache
    task.write_text(yaml.safe_dump(data))
    return task


def _run(
    task: Path, state: Path, log: Path, env: dict[str, str] | None = None, *extra: str
) -> tuple[dict[str, Any], str]:
    out = atlas_cli(
        "run",
        str(task),
        "--model",
        f"scripted?call_log={log}",
        "--json",
        "--state-dir",
        str(state),
        *extra,
        env=env,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout + out.stderr


def _calls(log: Path) -> int:
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.e2e
def test_a_repeated_dry_run_is_answered_from_the_cache_at_no_cost(tmp_path: Path) -> None:
    import mlflow

    task, state, log = _task(tmp_path, True), tmp_path / "state", tmp_path / "calls.jsonl"
    first, _ = _run(task, state, log)
    made = _calls(log)
    assert first["status"] == "passed" and first["cache_hits"] == 0 and made > 10
    output = Path(first["output"]).read_text()

    second, _ = _run(task, state, log)
    # Not one call reached the model; every one was answered, and nothing was spent.
    assert _calls(log) == made
    assert second["status"] == "passed"
    assert second["cache_hits"] == second["model_calls"] == first["model_calls"]
    assert second["tokens"] == 0 and second["cost_usd"] in (0, None)
    assert second["cache_saved_tokens"] == first["tokens"]
    assert Path(second["output"]).read_text() == output
    assert (state / "cache.db").exists()

    # The trace shows each hit: an event naming the role, and the root's totals.
    trace = mlflow.MlflowClient(second["tracking_uri"]).get_trace(second["trace_id"])
    hits = [s for s in trace.data.spans if s.name == "cache_hit"]
    assert len(hits) == second["model_calls"]
    assert {s.attributes["atlas.role"] for s in hits} >= {"planner", "judge"}
    root = next(s for s in trace.data.spans if s.parent_id is None)
    assert root.attributes["atlas.usage.cache_hits"] == second["model_calls"]

    # The summary says so in words.
    shown = atlas_cli(
        "run", str(task), "--model", f"scripted?call_log={log}", "--state-dir", str(state)
    )
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert f"{made} of {made} calls answered from the cache" in " ".join(shown.stdout.split())


@pytest.mark.e2e
def test_a_redis_cache_is_shared_across_state_dirs_and_keeps_no_password(
    tmp_path: Path, redis_server: str
) -> None:
    import redis

    task, log = _task(tmp_path, None), tmp_path / "calls.jsonl"
    env = {"ATLAS_CACHE_URL": redis_server}
    first, text1 = _run(task, tmp_path / "host-a", log, env)
    made = _calls(log)
    # Another machine's state directory, the same Redis: every answer is reused.
    second, text2 = _run(task, tmp_path / "host-b", log, env)
    assert _calls(log) == made
    assert second["cache_hits"] == second["model_calls"] == first["model_calls"]
    assert not (tmp_path / "host-a" / "cache.db").exists()

    client = redis.Redis.from_url(redis_server)
    keys = client.keys("atlas:cache:*")
    assert len(keys) == first["model_calls"]
    stored = b"".join(client.get(k) or b"" for k in keys).decode()
    written = [text1, text2, stored]
    for state in ("host-a", "host-b"):
        written += [
            p.read_bytes().decode("utf-8", "replace")
            for p in (tmp_path / state).rglob("*")
            if p.is_file()
        ]
    assert not [w for w in written if REDIS_PASSWORD in w]
    # Requests are stored under their hash, never their text.
    assert all(len(k.decode().removeprefix("atlas:cache:")) == 64 for k in keys)

    # `atlas cache` counts and forgets them, naming the server without its password.
    stats = atlas_cli("cache", "stats", env=env)
    assert stats.returncode == 0 and f"{len(keys)} responses" in stats.stdout
    cleared = atlas_cli("cache", "clear", env=env)
    assert cleared.returncode == 0 and f"forgot {len(keys)} responses" in cleared.stdout
    assert REDIS_PASSWORD not in stats.stdout + cleared.stdout
    assert client.keys("atlas:cache:*") == []


@pytest.mark.e2e
def test_an_unreachable_or_bad_cache_fails_in_one_line_before_any_model_call(
    tmp_path: Path,
) -> None:
    task, log = _task(tmp_path, None), tmp_path / "calls.jsonl"
    url = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{free_port()}/0"
    out = atlas_cli(
        "run",
        str(task),
        "--model",
        f"scripted?call_log={log}",
        "--state-dir",
        str(tmp_path / "s"),
        env={"ATLAS_CACHE_URL": url},
    )
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert "cache" in line and "Redis" in line and "127.0.0.1" in line
    assert REDIS_PASSWORD not in out.stdout + out.stderr
    assert not log.exists()

    bad = _task(tmp_path / "b", {"url": "http://127.0.0.1:6379"})
    out = atlas_cli("run", str(bad), "--model", f"scripted?call_log={log}")
    assert out.returncode == 2 and "cache.url" in out.stderr and "Traceback" not in out.stderr
    assert not log.exists()


async def test_the_async_path_answers_from_the_cache_too(make_spec: Any, state_dir: Path) -> None:
    spec = make_spec(cache=True, memory={"enabled": False})
    first = atlas.run(spec, model="scripted", state_dir_path=state_dir)
    second = await atlas.arun(spec, model="scripted", state_dir_path=state_dir)
    assert first.cache_hits == 0 and first.model_calls > 0
    assert second.cache_hits == second.model_calls == first.model_calls
    assert second.tokens == 0


def test_a_store_that_fails_mid_run_is_reported_once_and_calls_go_to_the_model(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from langchain_core.messages import HumanMessage

    from atlas.models.cache import ResponseCache, keyed
    from atlas.testing import ScriptedModel

    class Down:
        def get(self, key: str) -> str | None:
            raise ConnectionError("Connection reset by peer")

        put = get  # type: ignore[assignment]

        def close(self) -> None:
            pass

    cache = ResponseCache(Down(), "redis://127.0.0.1:1")  # type: ignore[arg-type]
    model = ScriptedModel()
    model.cache = cache
    with caplog.at_level(logging.WARNING, logger="atlas.cache"), keyed("k"):
        for _ in range(3):
            assert model.invoke([HumanMessage("hello")]).content
    assert len(model.calls) == 3
    warned = [r for r in caplog.records if r.name == "atlas.cache"]
    assert len(warned) == 1 and "calls go to the model" in warned[0].getMessage()
