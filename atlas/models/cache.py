"""The model-response cache: an identical request (model, parameters, messages, tools) is
answered from a store instead of the provider, at no cost.

Off unless the task sets `cache:` (or `$ATLAS_CACHE_URL` is set). `cache: true` keeps responses
in `cache.db` in the state directory (SQLite); `cache: {url: redis://...}` shares them through a
Redis server, so every process and machine of a team reuses them.

The key is ATLAS's, computed per call in `atlas.graph.effects` (`request_key`): the model's spec,
the messages, the tools or output schema, the tool choice and the output cap. LangChain's own
cache key holds the per-call timeout and, for the local model, the server's port, which would
make no two runs agree. The store is plugged in as the LangChain chat model's `cache`, so a hit
still goes through the model's callbacks: the trace shows the model span, its output marked
`atlas_cache` in the response metadata and zero tokens used.

What is stored is the response (LangChain's serialised generations) with every secret value
this process knows replaced, under a SHA-256 of the key: no prompt text, no API key. A store
that fails mid-run is reported once and the run goes on uncached; one that is unreachable when
the run starts fails the run before its first model call.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from langchain_core._api import LangChainBetaWarning
from langchain_core.caches import BaseCache
from langchain_core.load import dumps, loads
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, Generation

from atlas.errors import AtlasError
from atlas.tracing.redact import public_url, scrub_text, secret_values

log = logging.getLogger("atlas.cache")

CACHE_URL_ENV = "ATLAS_CACHE_URL"
CACHE_FILE = "cache.db"
MARK = "atlas_cache"
"""The response-metadata key that marks an answer from the cache."""
_REDIS_PREFIX = "atlas:cache:"

_KEY: ContextVar[str | None] = ContextVar("atlas_cache_key", default=None)


class CacheError(AtlasError):
    """The configured cache cannot be used (unreachable server, unwritable file)."""

    exit_code = 2


def cache_url(spec: Any = None) -> str | None:
    """`$ATLAS_CACHE_URL`, else the task's `cache.url`; None for the default (SQLite)."""
    return os.environ.get(CACHE_URL_ENV) or (spec.cache.url if spec is not None else None)


def cache_enabled(spec: Any) -> bool:
    return bool(os.environ.get(CACHE_URL_ENV)) or bool(spec.cache.enabled or spec.cache.url)


def request_key(model: str, call: dict[str, Any], messages: Sequence[BaseMessage]) -> str:
    """The cache key of one request: `model` names the model and its settings, `call` holds
    the tools, schema, tool choice and output cap as JSON-able values."""
    plain = [_as_sent(m) for m in messages]
    body = json.dumps({"model": model, "call": call}, sort_keys=True, default=str)
    digest = hashlib.sha256(body.encode())
    digest.update(b"\x00")
    digest.update(dumps(plain).encode())
    return digest.hexdigest()


def _as_sent(message: BaseMessage) -> BaseMessage:
    """The message as a provider receives it: without its id, and for an earlier answer without
    the metadata that ATLAS and the SDK keep beside it (an answer from the cache differs from
    the original there, and must not make the next request a new one)."""
    update: dict[str, Any] = {"id": None}
    if isinstance(message, AIMessage):
        update.update(response_metadata={}, usage_metadata=None)
    return message.model_copy(update=update)


@contextlib.contextmanager
def keyed(key: str | None) -> Iterator[None]:
    """Calls made inside use `key` as their cache key."""
    token = _KEY.set(key)
    try:
        yield
    finally:
        _KEY.reset(token)


class _Store:
    def get(self, key: str) -> str | None:
        raise NotImplementedError

    def put(self, key: str, value: str) -> None:
        raise NotImplementedError

    def check(self) -> None:
        """Raise CacheError when the store cannot be used."""

    def count(self) -> int:
        raise NotImplementedError

    def clear(self) -> int:
        """Forget every response; returns how many there were."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class SqliteStore(_Store):
    def __init__(self, path: Path, ttl_s: float | None) -> None:
        self.path, self.ttl_s = path, ttl_s
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, timeout=30, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS responses"
                " (key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL)"
            )
            conn.commit()
            self._conn = conn
        return self._conn

    def check(self) -> None:
        try:
            with self._lock:
                self._db()
        except sqlite3.Error as exc:
            raise CacheError(f"cache: cannot open {self.path}: {exc}") from None

    def get(self, key: str) -> str | None:
        with self._lock:
            row = (
                self._db().execute("SELECT value, created FROM responses WHERE key=?", (key,))
            ).fetchone()
        if row is None or (self.ttl_s is not None and time.time() - row[1] > self.ttl_s):
            return None
        return str(row[0])

    def put(self, key: str, value: str) -> None:
        with self._lock:
            db = self._db()
            db.execute(
                "INSERT OR REPLACE INTO responses (key, value, created) VALUES (?, ?, ?)",
                (key, value, time.time()),
            )
            db.commit()

    def count(self) -> int:
        with self._lock:
            return int(self._db().execute("SELECT count(*) FROM responses").fetchone()[0])

    def clear(self) -> int:
        with self._lock:
            db = self._db()
            gone = db.execute("DELETE FROM responses").rowcount
            db.commit()
            return int(gone)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


class RedisStore(_Store):
    def __init__(self, url: str, ttl_s: float | None) -> None:
        try:
            import redis
        except ImportError:
            raise CacheError(
                "cache.url names a Redis server: pip install 'atlas-agents[redis]'"
            ) from None
        self.url, self.ttl_s = url, ttl_s
        self.client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)

    def check(self) -> None:
        try:
            self.client.ping()
        except Exception as exc:
            reason = scrub_text(str(exc), secret_values()).splitlines()[0] if str(exc) else ""
            raise CacheError(
                f"cache: cannot use Redis at {public_url(self.url)}: {reason or type(exc).__name__}"
            ) from None

    def get(self, key: str) -> str | None:
        value = self.client.get(_REDIS_PREFIX + key)
        return None if value is None else value.decode() if isinstance(value, bytes) else value

    def put(self, key: str, value: str) -> None:
        ttl = None if self.ttl_s is None else max(1, int(self.ttl_s))
        self.client.set(_REDIS_PREFIX + key, value, ex=ttl)

    def _keys(self) -> Iterator[Any]:
        return iter(self.client.scan_iter(match=_REDIS_PREFIX + "*", count=1000))

    def count(self) -> int:
        return sum(1 for _ in self._keys())

    def clear(self) -> int:
        gone = 0
        batch: list[Any] = []
        for key in self._keys():
            batch.append(key)
            if len(batch) >= 1000:
                gone += int(self.client.delete(*batch))
                batch = []
        if batch:
            gone += int(self.client.delete(*batch))
        return gone

    def close(self) -> None:
        self.client.close()


def open_store(url: str | None, state_dir: Path, ttl_s: float | None = None) -> _Store:
    if url is None or url.startswith("sqlite:"):
        path = Path(url.removeprefix("sqlite:///")) if url else state_dir / CACHE_FILE
        return SqliteStore(path, ttl_s)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore(url, ttl_s)
    raise CacheError(f"cache.url {public_url(url)!r}: expected redis://, rediss:// or sqlite:///")


class ResponseCache(BaseCache):
    """The LangChain cache of every chat model of one run, with its hit and miss counts."""

    def __init__(self, store: _Store, where: str) -> None:
        self.store, self.where = store, where
        self.hits = self.misses = 0
        self._failed = False
        self._lock = threading.Lock()

    def _key(self, prompt: str, llm_string: str) -> str:
        key = _KEY.get()
        if key is not None:
            return key
        return hashlib.sha256(f"{llm_string}\x00{prompt}".encode()).hexdigest()

    def _broken(self, exc: Exception) -> None:
        with self._lock:
            first, self._failed = not self._failed, True
        if first:
            log.warning(
                "model cache at %s failed (%s): calls go to the model",
                self.where,
                scrub_text(str(exc), secret_values()).splitlines()[0] if str(exc) else exc,
            )

    def lookup(self, prompt: str, llm_string: str) -> list[Generation] | None:
        try:
            raw = self.store.get(self._key(prompt, llm_string))
        except Exception as exc:
            self._broken(exc)
            return None
        if raw is None:
            with self._lock:
                self.misses += 1
            return None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LangChainBetaWarning)
                generations = loads(raw, allowed_objects="messages")
        except Exception:
            return None  # an entry from an incompatible version: treated as a miss
        out: list[Generation] = []
        for gen in generations if isinstance(generations, list) else []:
            if isinstance(gen, dict):
                message = gen.get("message")
                if not isinstance(message, AIMessage):
                    return None
                gen = ChatGeneration(message=_as_hit(message), generation_info=gen.get("info"))
            out.append(gen)
        if not out:
            return None
        with self._lock:
            self.hits += 1
        return out

    def update(self, prompt: str, llm_string: str, return_val: Sequence[Generation]) -> None:
        entries: list[dict[str, Any]] = []
        for gen in return_val:
            message = getattr(gen, "message", None)
            if not isinstance(message, AIMessage):
                return  # only chat answers are kept
            entries.append({"message": message, "info": gen.generation_info})
        try:
            self.store.put(
                self._key(prompt, llm_string), scrub_text(dumps(entries), secret_values())
            )
        except Exception as exc:
            self._broken(exc)

    def clear(self, **kwargs: Any) -> None:
        self.store.clear()

    def stats(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses}

    def close(self) -> None:
        self.store.close()


def _as_hit(message: AIMessage) -> AIMessage:
    """The cached answer as this call's: tokens zeroed (nothing was spent), what the original
    call used kept under `atlas_cache`."""
    used: dict[str, Any] = dict(message.usage_metadata or {})
    meta = dict(message.response_metadata or {})
    meta[MARK] = {
        "hit": True,
        "saved_input_tokens": int(used.get("input_tokens", 0)),
        "saved_output_tokens": int(used.get("output_tokens", 0)),
    }
    return message.model_copy(
        update={
            "response_metadata": meta,
            "usage_metadata": {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0},
        }
    )


def hit_of(message: AIMessage) -> dict[str, Any] | None:
    """What a cached answer saved, or None when the model answered."""
    mark = (message.response_metadata or {}).get(MARK)
    return mark if isinstance(mark, dict) and mark.get("hit") else None


def for_spec(spec: Any, state_dir: Path) -> ResponseCache | None:
    """The run's cache, checked, or None when the task does not use one."""
    if not cache_enabled(spec):
        return None
    url = cache_url(spec)
    store = open_store(url, state_dir, spec.cache.ttl_s)
    store.check()
    return ResponseCache(store, public_url(url) if url else str(state_dir / CACHE_FILE))
