"""A local HTTP server that answers in OpenAI's and Anthropic's documented wire formats.

The real `openai` and `anthropic` SDKs talk to it on 127.0.0.1. Answers come from ATLAS's
`ScriptedModel` (so a whole run can go over the wire), and faults can be queued per request:
`"429"` (with `retry-after`), `"500"`, `"timeout"` (sleeps past the client's timeout), `"drop"`
(closes the connection), `"malformed"` (invalid JSON) and `"truncate"` (a stream cut short).
"""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from atlas.testing import ScriptedModel

ALL_FAULTS = ("429", "500", "timeout", "drop", "malformed", "truncate")


@dataclass
class Recorded:
    api: str
    body: dict[str, Any]
    fault: str | None
    headers: dict[str, str] = field(default_factory=dict)
    """Request headers, names lower-cased."""


@dataclass
class FakeProviders:
    """Start with `with FakeProviders() as fake:`; `fake.url` is the base address."""

    model: ScriptedModel = field(default_factory=ScriptedModel)
    retry_after: float = 0.2
    hang_s: float = 3.0
    faults: deque[str] = field(default_factory=deque)
    always: str | None = None
    """A fault for every request (a provider that is down)."""
    fault_every: int = 0
    """When > 0, every n-th request gets the next fault of `fault_cycle`."""
    fault_cycle: tuple[str, ...] = ("429", "500", "timeout", "drop", "malformed")
    fault_rate: float = 0.0
    """When > 0, each request gets a fault with this probability, drawn from `ALL_FAULTS`."""
    seed: int = 0
    requests: list[Recorded] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _count: int = 0
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> FakeProviders:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                fake._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _next_fault(self) -> str | None:
        with self._lock:
            self._count += 1
            if self.always:
                return self.always
            if self.faults:
                return self.faults.popleft()
            if self.fault_every and self._count % self.fault_every == 0:
                return self.fault_cycle[(self._count // self.fault_every) % len(self.fault_cycle)]
            if self.fault_rate and self._rng.random() < self.fault_rate:
                return self._rng.choice(ALL_FAULTS)
        return None

    @property
    def injected(self) -> dict[str, int]:
        """How many of each fault were served."""
        counts: dict[str, int] = {}
        for r in self.requests:
            if r.fault:
                counts[r.fault] = counts.get(r.fault, 0) + 1
        return counts

    # -- dispatch ------------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("content-length") or 0)
        body = json.loads(h.rfile.read(length) or b"{}")
        api = "anthropic" if h.path.rstrip("/").endswith("/messages") else "openai"
        fault = self._next_fault()
        with self._lock:
            self.requests.append(
                Recorded(api, body, fault, {k.lower(): v for k, v in h.headers.items()})
            )
        if fault == "429":
            return _send(
                h, 429, _error(api, "rate_limit"), {"retry-after": f"{self.retry_after:g}"}
            )
        if fault == "500":
            return _send(h, 500, _error(api, "server_error"))
        if fault == "timeout":
            time.sleep(self.hang_s)
            return _send(h, 500, _error(api, "server_error"))
        if fault == "drop":
            h.close_connection = True
            h.connection.close()
            return None
        if fault == "malformed":
            return _send_raw(h, 200, b'{"id": "x", "choices": [', "application/json")
        message = self._answer(api, body)
        if body.get("stream"):
            events = (
                _openai_stream(body, message)
                if api == "openai"
                else _anthropic_stream(body, message)
            )
            if fault == "truncate":
                events = events[: max(1, len(events) // 2)]
            return _send_sse(h, events, done=api == "openai" and fault != "truncate")
        payload = _openai_body(body, message) if api == "openai" else _anthropic_body(body, message)
        if fault == "truncate":  # the connection ends halfway through the announced body
            return _send_truncated(h, json.dumps(payload).encode())
        return _send(h, 200, payload)

    def _answer(self, api: str, body: dict[str, Any]) -> AIMessage:
        messages = _openai_messages(body) if api == "openai" else _anthropic_messages(body)
        tools = _tools(api, body)
        result = self.model._respond(messages, tools)
        message = result.generations[0].message
        assert isinstance(message, AIMessage)
        return message


# -- requests -> LangChain ------------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _openai_messages(body: dict[str, Any]) -> list[BaseMessage]:
    out: list[BaseMessage] = []
    for m in body.get("messages", []):
        role = m.get("role")
        if role in ("system", "developer"):
            out.append(SystemMessage(_text(m.get("content"))))
        elif role == "user":
            out.append(HumanMessage(_text(m.get("content"))))
        elif role == "assistant":
            calls = [
                {
                    "name": c["function"]["name"],
                    "args": json.loads(c["function"]["arguments"] or "{}"),
                    "id": c["id"],
                }
                for c in m.get("tool_calls") or []
            ]
            out.append(AIMessage(content=_text(m.get("content")), tool_calls=calls))
        elif role == "tool":
            out.append(
                ToolMessage(content=_text(m.get("content")), tool_call_id=m.get("tool_call_id", ""))
            )
    return out


def _anthropic_messages(body: dict[str, Any]) -> list[BaseMessage]:
    out: list[BaseMessage] = []
    system = body.get("system")
    if system:
        out.append(SystemMessage(_text(system)))
    for m in body.get("messages", []):
        content = m.get("content")
        blocks = content if isinstance(content, list) else [{"type": "text", "text": content or ""}]
        if m.get("role") == "assistant":
            calls = [
                {"name": b["name"], "args": b.get("input") or {}, "id": b["id"]}
                for b in blocks
                if b.get("type") == "tool_use"
            ]
            text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
            out.append(AIMessage(content=text, tool_calls=calls))
            continue
        results = [b for b in blocks if b.get("type") == "tool_result"]
        for b in results:
            out.append(
                ToolMessage(content=_text(b.get("content")), tool_call_id=b.get("tool_use_id", ""))
            )
        text = "".join(b.get("text", "") for b in blocks if b.get("type") == "text")
        if text or not results:
            out.append(HumanMessage(text))
    return out


def _tools(api: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    tools = body.get("tools") or []
    if api == "openai":
        return [t for t in tools if t.get("type") == "function"]
    return [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                "description": t.get("description", ""),
                "parameters": t.get("input_schema", {}),
            },
        }
        for t in tools
    ]


# -- LangChain -> responses ------------------------------------------------------------------------


def _usage(message: AIMessage) -> tuple[int, int]:
    meta = message.usage_metadata or {}
    return int(meta.get("input_tokens", 1)), int(meta.get("output_tokens", 1))


def _openai_body(body: dict[str, Any], message: AIMessage) -> dict[str, Any]:
    inp, out = _usage(message)
    msg: dict[str, Any] = {"role": "assistant", "content": str(message.content) or None}
    if message.tool_calls:
        msg["tool_calls"] = [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": json.dumps(c["args"])},
            }
            for c in message.tool_calls
        ]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.get("model", "gpt-4o-mini"),
        "choices": [
            {
                "index": 0,
                "message": msg,
                "logprobs": None,
                "finish_reason": "tool_calls" if message.tool_calls else "stop",
            }
        ],
        "usage": {"prompt_tokens": inp, "completion_tokens": out, "total_tokens": inp + out},
    }


def _openai_stream(body: dict[str, Any], message: AIMessage) -> list[dict[str, Any]]:
    inp, out = _usage(message)
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": body.get("model", "gpt-4o-mini"),
    }
    chunks = [
        {
            **base,
            "choices": [
                {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
            ],
        }
    ]
    text = str(message.content)
    for i in range(0, len(text), 16):
        chunks.append(
            {
                **base,
                "choices": [
                    {"index": 0, "delta": {"content": text[i : i + 16]}, "finish_reason": None}
                ],
            }
        )
    for n, c in enumerate(message.tool_calls):
        chunks.append(
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": None,
                        "delta": {
                            "tool_calls": [
                                {
                                    "index": n,
                                    "id": c["id"],
                                    "type": "function",
                                    "function": {
                                        "name": c["name"],
                                        "arguments": json.dumps(c["args"]),
                                    },
                                }
                            ]
                        },
                    }
                ],
            }
        )
    reason = "tool_calls" if message.tool_calls else "stop"
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
    if (body.get("stream_options") or {}).get("include_usage"):
        chunks.append(
            {
                **base,
                "choices": [],
                "usage": {
                    "prompt_tokens": inp,
                    "completion_tokens": out,
                    "total_tokens": inp + out,
                },
            }
        )
    return chunks


def _anthropic_content(message: AIMessage) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if message.content:
        blocks.append({"type": "text", "text": str(message.content)})
    for c in message.tool_calls:
        blocks.append(
            {
                "type": "tool_use",
                "id": c["id"] or f"toolu_{uuid.uuid4().hex[:8]}",
                "name": c["name"],
                "input": c["args"],
            }
        )
    return blocks or [{"type": "text", "text": ""}]


def _anthropic_body(body: dict[str, Any], message: AIMessage) -> dict[str, Any]:
    inp, out = _usage(message)
    return {
        "id": f"msg_{uuid.uuid4().hex[:12]}",
        "type": "message",
        "role": "assistant",
        "model": body.get("model", "claude-haiku-4-5"),
        "content": _anthropic_content(message),
        "stop_reason": "tool_use" if message.tool_calls else "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": inp, "output_tokens": out},
    }


def _anthropic_stream(body: dict[str, Any], message: AIMessage) -> list[dict[str, Any]]:
    inp, out = _usage(message)
    full = _anthropic_body(body, message)
    events: list[dict[str, Any]] = [
        {
            "type": "message_start",
            "message": {
                **full,
                "content": [],
                "stop_reason": None,
                "usage": {"input_tokens": inp, "output_tokens": 1},
            },
        }
    ]
    for i, block in enumerate(full["content"]):
        if block["type"] == "text":
            events.append(
                {
                    "type": "content_block_start",
                    "index": i,
                    "content_block": {"type": "text", "text": ""},
                }
            )
            events.append(
                {
                    "type": "content_block_delta",
                    "index": i,
                    "delta": {"type": "text_delta", "text": block["text"]},
                }
            )
        else:
            events.append(
                {"type": "content_block_start", "index": i, "content_block": {**block, "input": {}}}
            )
            events.append(
                {
                    "type": "content_block_delta",
                    "index": i,
                    "delta": {
                        "type": "input_json_delta",
                        "partial_json": json.dumps(block["input"]),
                    },
                }
            )
        events.append({"type": "content_block_stop", "index": i})
    events.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": full["stop_reason"], "stop_sequence": None},
            "usage": {"output_tokens": out},
        }
    )
    events.append({"type": "message_stop"})
    return events


def _error(api: str, kind: str) -> dict[str, Any]:
    if api == "anthropic":
        typ = "rate_limit_error" if kind == "rate_limit" else "api_error"
        return {"type": "error", "error": {"type": typ, "message": kind}}
    return {"error": {"message": kind, "type": kind, "param": None, "code": kind}}


def _send_truncated(h: BaseHTTPRequestHandler, data: bytes) -> None:
    h.close_connection = True
    try:
        h.send_response(200)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(data)))
        h.end_headers()
        h.wfile.write(data[: len(data) // 2])
        h.wfile.flush()
    except OSError:
        pass
    h.connection.close()


def _send(
    h: BaseHTTPRequestHandler,
    status: int,
    payload: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> None:
    _send_raw(h, status, json.dumps(payload).encode(), "application/json", headers)


def _send_raw(
    h: BaseHTTPRequestHandler,
    status: int,
    data: bytes,
    ctype: str,
    headers: dict[str, str] | None = None,
) -> None:
    try:
        h.send_response(status)
        h.send_header("content-type", ctype)
        h.send_header("content-length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def _send_sse(h: BaseHTTPRequestHandler, events: list[dict[str, Any]], *, done: bool) -> None:
    lines = []
    for e in events:
        if "type" in e and e["type"].startswith(("message", "content")):
            lines.append(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n")
        else:
            lines.append(f"data: {json.dumps(e)}\n\n")
    if done:
        lines.append("data: [DONE]\n\n")
    _send_raw(h, 200, "".join(lines).encode(), "text/event-stream")
