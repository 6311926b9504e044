"""A fake OpenAI-compatible chat server for tests: standard library only, loopback only.

Run it as a subprocess:

    python tests/fake_provider.py --port-file F --plan PLAN.json --requests-log LOG.jsonl [--api-key KEY]

It binds 127.0.0.1 on a free port, writes the port number to F (atomically) and serves until killed.

PLAN.json::

    {"replies": [<reply>, ...],              # consumed in order by successful answers
     "faults": {"<request number>": <fault>}, # 1-based, counting every request received
     "rules": "deepseek" | "none",            # default "deepseek"
     "context_limit": <tokens>,               # optional: longer prompts get the provider's context-length 400
     "latency_s": <seconds>,                  # optional: every successful answer waits this long (default 0)
     "cycle": true | false,                   # optional: when the replies run out, start again from the first
     "number_token": "<text>"}                # optional: replaced in a reply's content by the request number

A reply is a string (the content) or {content, reasoning?, prompt_tokens?, completion_tokens?, cached_tokens?,
usage_fields?, finish_reason?} where usage_fields is "both" (default), "openai" (prompt_tokens_details.cached_tokens
only) or "deepseek" (prompt_cache_hit_tokens / prompt_cache_miss_tokens only), and finish_reason defaults to "stop"
("length" simulates a reply cut at max_tokens).
A fault is one of {"status": 429, "retry_after": 1} | {"status": 500} | {"status": 400, "message": "..."} |
{"hang_s": 5} (no answer until the client gives up) | {"drop": true} (connection closed without an answer).

Checks made before anything else, in this order: the bearer key (when --api-key is given) -> 401; DeepSeek
reasoner's message rules (successive user/assistant messages, reasoning_content sent back, an assistant message
last) -> 400 with DeepSeek's error shape; the context limit (when the plan sets one: the prompt's estimated tokens,
len/4 as for usage, above it) -> 400 with OpenAI's "maximum context length" wording. When the replies run out the answer is a 400 "fake provider: no replies
left", so a test that asks for more than it planned fails loudly; with "cycle": true they never run out (the
next reply after the last is the first again), so one plan can serve many concurrent sessions.

"latency_s" is a fixed model latency: a successful answer (a reply, not a fault or an error) is sent that long
after its request arrived. Each request is handled on its own thread, so concurrent requests wait their latencies
in parallel, not one after another.

"number_token" makes cycled replies differ: each occurrence of that text in a reply's content (and reasoning) is
replaced by the request's number (1-based, as in the log), so a SEARCH/REPLACE such as "# marker" -> "# marker /
# edit <n>" applies again and again in the same file (the same REPLACE twice would be recognised as already applied).

Every request is appended to the requests log (one JSON object per line, flushed): index, ts, path, model,
messages, temperature_sent, temperature, authorization (null when none was sent; the header itself only when it
carries a key in PUBLIC_KEYS, else "(a key)": real keys never reach the log), prompt_tokens (the estimate), fault,
status.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

SUCCESSIVE_TEMPLATE = (
    "deepseek-reasoner does not support successive user or assistant messages "
    "(messages[{i}] and messages[{j}] in your input). "
    "You should interleave the user/assistant messages in the message sequence."
)
LAST_ASSISTANT_MESSAGE = (
    "The last message of deepseek-reasoner must be a user message, or an assistant message with prefix mode on "
    "(refer to https://api-docs.deepseek.com/guides/chat_prefix_completion)."
)
REASONING_SENT_TEMPLATE = (
    "deepseek-reasoner does not accept reasoning_content in input messages (messages[{i}]); "
    "remove reasoning_content from the assistant messages you send back."
)
NO_REPLIES_LEFT = "fake provider: no replies left"
PUBLIC_KEYS = frozenset({"sk-no-key-needed"})  # placeholders, safe to log
CONTEXT_TEMPLATE = (
    "This model's maximum context length is {limit} tokens. However, you requested {asked} tokens. "
    "Please reduce the length of the messages."
)


def error_body(message: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    """DeepSeek's (and OpenAI's) error shape."""
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


def deepseek_rule_violation(messages: list[dict[str, Any]]) -> str | None:
    """The first DeepSeek-reasoner rule the messages break, as the provider words it; None if they pass."""
    for j in range(1, len(messages)):
        a, b = messages[j - 1].get("role"), messages[j].get("role")
        if a == b and a in ("user", "assistant"):
            return SUCCESSIVE_TEMPLATE.format(i=j - 1, j=j)
    for i, m in enumerate(messages):
        if m.get("role") == "assistant" and m.get("reasoning_content") is not None:
            return REASONING_SENT_TEMPLATE.format(i=i)
    if messages and messages[-1].get("role") == "assistant":
        return LAST_ASSISTANT_MESSAGE
    return None


def logged_authorization(header: str | None) -> str | None:
    if header is None:
        return None
    return header if header.removeprefix("Bearer ") in PUBLIC_KEYS else "(a key)"


def estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


class FakeState:
    """What the server knows: the plan, the request counter, the log file."""

    def __init__(self, plan: dict[str, Any], log_path: Path, api_key: str | None) -> None:
        self.replies: list[Any] = list(plan.get("replies", []))
        self.faults: dict[str, dict[str, Any]] = {str(k): v for k, v in plan.get("faults", {}).items()}
        self.rules: str = plan.get("rules", "deepseek")
        self.context_limit: int | None = plan.get("context_limit")
        self.latency_s: float = float(plan.get("latency_s", 0.0))
        self.cycle: bool = bool(plan.get("cycle", False))
        self.number_token: str | None = plan.get("number_token") or None
        self.api_key = api_key
        self.log_path = log_path
        self.lock = threading.Lock()
        self.count = 0
        self.next_reply = 0

    def next_index(self) -> int:
        with self.lock:
            self.count += 1
            return self.count

    def take_reply(self) -> Any | None:
        with self.lock:
            if self.cycle and self.replies:
                self.next_reply %= len(self.replies)
            if self.next_reply >= len(self.replies):
                return None
            reply = self.replies[self.next_reply]
            self.next_reply += 1
            return reply

    def log(self, entry: dict[str, Any]) -> None:
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self.lock, open(self.log_path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()


def prompt_estimate(request: dict[str, Any]) -> int:
    return estimate_tokens("".join(str(m.get("content") or "") for m in request.get("messages", [])))


def numbered(reply: Any, token: str | None, index: int) -> Any:
    """The reply with every `token` in its content and reasoning replaced by the request number."""
    if token is None:
        return reply
    if isinstance(reply, str):
        return reply.replace(token, str(index))
    item = dict(reply)
    for key in ("content", "reasoning"):
        if isinstance(item.get(key), str):
            item[key] = item[key].replace(token, str(index))
    return item


def completion_body(reply: Any, request: dict[str, Any]) -> dict[str, Any]:
    item = {"content": reply} if isinstance(reply, str) else dict(reply)
    content = str(item.get("content", ""))
    reasoning = item.get("reasoning")
    prompt_tokens = int(item.get("prompt_tokens", prompt_estimate(request)))
    completion_tokens = int(item.get("completion_tokens", estimate_tokens(content + (reasoning or ""))))
    cached = int(item.get("cached_tokens", 0))
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    usage: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens_details": {"reasoning_tokens": estimate_tokens(reasoning) if reasoning else 0},
    }
    style = item.get("usage_fields", "both")  # "openai": cached_tokens only; "deepseek": cache hit/miss only
    if style in ("both", "openai"):
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    if style in ("both", "deepseek"):
        usage["prompt_cache_hit_tokens"] = cached
        usage["prompt_cache_miss_tokens"] = prompt_tokens - cached
    return {
        "id": f"fake-{time.time_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "fake"),
        "system_fingerprint": "fake_provider",
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": item.get("finish_reason", "stop"),
            }
        ],
        "usage": usage,
    }


class Handler(BaseHTTPRequestHandler):
    server_version = "FakeProvider/1.0"
    state: FakeState  # set on the class by serve()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send_json(self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send_json(200, {"object": "list", "data": [{"id": "fake", "object": "model"}]})
        else:
            self._send_json(404, error_body(f"no route {self.path}", "not_found"))

    def do_POST(self) -> None:
        state = self.state
        index = state.next_index()
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            request = json.loads(raw or b"{}")
        except json.JSONDecodeError:
            request = {}
        messages = request.get("messages", [])
        entry: dict[str, Any] = {
            "index": index,
            "ts": time.time(),
            "path": self.path,
            "model": request.get("model"),
            "messages": messages,
            "temperature_sent": "temperature" in request,
            "temperature": request.get("temperature"),
            "authorization": logged_authorization(self.headers.get("Authorization")),
            "prompt_tokens": prompt_estimate(request),
            "fault": None,
            "status": None,
        }

        def answer(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
            entry["status"] = status
            state.log(entry)
            self._send_json(status, body, headers)

        if not self.path.rstrip("/").endswith("/chat/completions"):
            answer(404, error_body(f"no route {self.path}", "not_found"))
            return
        if state.api_key is not None and self.headers.get("Authorization") != f"Bearer {state.api_key}":
            answer(401, error_body("Authentication Fails, your api key is invalid", "authentication_error"))
            return
        if state.rules == "deepseek":
            violation = deepseek_rule_violation(messages)
            if violation is not None:
                answer(400, error_body(violation))
                return
        if state.context_limit is not None and entry["prompt_tokens"] > state.context_limit:
            message = CONTEXT_TEMPLATE.format(limit=state.context_limit, asked=entry["prompt_tokens"])
            answer(400, error_body(message, "invalid_request_error"))
            return

        fault = state.faults.get(str(index))
        if fault is not None:
            entry["fault"] = fault
            if fault.get("drop"):
                entry["status"] = "drop"
                state.log(entry)
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                return
            if "hang_s" in fault:
                entry["status"] = "hang"
                state.log(entry)
                time.sleep(float(fault["hang_s"]))
                self.close_connection = True
                return
            status = int(fault.get("status", 500))
            headers = {}
            if "retry_after" in fault:
                headers["Retry-After"] = str(fault["retry_after"])
            default_kind = {429: "rate_limit_error", 401: "authentication_error"}.get(
                status, "invalid_request_error"
            )
            if status >= 500:
                default_kind = "server_error"
            message = fault.get("message", f"fake provider: planned fault {status}")
            answer(status, error_body(message, fault.get("type", default_kind)), headers)
            return

        reply = state.take_reply()
        if reply is None:
            answer(400, error_body(NO_REPLIES_LEFT))
            return
        if state.latency_s > 0:  # this request's own thread: concurrent requests wait in parallel
            time.sleep(max(0.0, entry["ts"] + state.latency_s - time.time()))
        answer(200, completion_body(numbered(reply, state.number_token, index), request))


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(plan: dict[str, Any], port_file: Path, log_path: Path, api_key: str | None, host: str) -> None:
    Handler.state = FakeState(plan, log_path, api_key)
    log_path.touch()
    server = Server((host, 0), Handler)
    port = server.server_address[1]
    tmp = port_file.with_name(port_file.name + ".tmp")
    tmp.write_text(str(port))
    os.replace(tmp, port_file)
    server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port-file", type=Path, required=True)
    parser.add_argument("--plan", type=Path, required=True)
    parser.add_argument("--requests-log", type=Path, required=True)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    plan = json.loads(args.plan.read_text(encoding="utf-8"))
    if isinstance(plan, list):
        plan = {"replies": plan}
    serve(plan, args.port_file, args.requests_log, args.api_key, args.host)


if __name__ == "__main__":
    main()
