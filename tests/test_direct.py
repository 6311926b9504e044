"""Hostile answers to the direct route (orchestrator/direct.py via ProviderModel), from a tiny HTTP server on
127.0.0.1 started in the test: what tests/fake_provider.py cannot produce (HTML, malformed JSON, odd error
shapes, redirects, echoed keys ...). Every test asserts what a user would notice."""

from __future__ import annotations

import gzip
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from orchestrator.conversation import Message
from orchestrator.models import (
    ContextWindowError,
    ModelError,
    ProviderModel,
    ProviderRejectedError,
    TransientError,
)

KEY = "sk-test-0123456789abcdefXYZ"
HTML = b"<html><head><style>body { color: red }</style></head><body><h1>Welcome to nginx!</h1></body></html>"
Answer = tuple[int, dict[str, str], bytes]
TRICKLE_HEADER = "X-Test-Keep-Alive-S"  # not sent: the test server's cue to trickle blank lines first


def completion(message: Any = None, **extra: Any) -> bytes:
    message = {"role": "assistant", "content": "OK"} if message is None else message
    body = {"id": "x", "object": "chat.completion",
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}, **extra}
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


class Server:
    """Answers each POST with the next of `answers` (the last one repeats); records what it was sent."""

    def __init__(self) -> None:
        self.answers: list[Answer] = [(200, {}, completion())]
        self.requests: list[dict[str, Any]] = []
        self.port = 0

    def answer(self, *answers: Answer | bytes) -> Server:
        self.answers = [(200, {}, a) if isinstance(a, bytes) else a for a in answers]
        return self

    def model(self, **kw: Any) -> ProviderModel:
        options: dict[str, Any] = {"api_key": KEY, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
                                   "max_attempts": 3, "timeout_s": 5, **kw}
        return ProviderModel("openai/some-model", api_base=f"http://127.0.0.1:{self.port}/v1", **options)


@pytest.fixture
def server() -> Iterator[Server]:
    state = Server()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            state.requests.append({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                   "body": json.loads(raw) if raw else None})
            posts = sum(r["method"] == "POST" for r in state.requests)
            status, headers, body = state.answers[min(posts, len(state.answers)) - 1]
            if self.command != "POST":
                status, headers, body = 405, {}, b'{"error": {"message": "Method Not Allowed"}}'
            headers = dict(headers)
            # TRICKLE_HEADER: keep-alive blank lines, one every 0.1 s for that many seconds, before the body
            keep_alive = int(float(headers.pop(TRICKLE_HEADER, 0)) / 0.1)
            self.send_response(status)
            for name, value in {"Content-Type": "application/json", **headers}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(keep_alive + len(body)))
            self.end_headers()
            try:
                for _ in range(keep_alive):
                    self.wfile.write(b"\n")
                    self.wfile.flush()
                    time.sleep(0.1)
                self.wfile.write(body)
            except OSError:  # the client gave up on this answer
                self.close_connection = True

        do_GET = do_POST

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def ask(model: ProviderModel) -> Any:
    return model.complete([Message(role="system", content="You edit experiment.py."),
                           Message(role="user", content="go")])


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text and "Traceback" not in text
    return text


# --------------------------------------------------------------------------------------------------- not a reply


@pytest.mark.parametrize("body", [
    HTML,
    b"",
    b'{"id": "x", "object": "chat.completion"}',
    b'{"choices": []}',
    b'{"choices": [{"message": null, "finish_reason": "stop"}]}',
    b'{"choices": [null]}',
    b'{"choices": "none"}',
    b"[1, 2]",
    b"null",
    b"data: {\"choices\": []}\n\n",  # a stream although stream is false
], ids=["html", "empty", "no-choices", "choices-empty", "message-null", "choice-null", "choices-str", "list",
        "null", "sse"])
def test_a_200_that_is_not_a_chat_completion_is_retried_then_named(server: Server, body: bytes) -> None:
    with pytest.raises(TransientError) as caught:
        ask(server.answer((200, {"Content-Type": "text/html"}, body)).model())
    assert caught.value.kind == "server_error" and caught.value.attempts == 3
    assert len(server.requests) == 3
    text = one_line(caught.value)
    assert "not a chat completion" in text and "gave up after 3 attempts" in text


def test_a_200_carrying_an_error_object_is_retried_and_shows_its_message(server: Server) -> None:
    with pytest.raises(TransientError, match="upstream overloaded"):
        ask(server.answer(b'{"error": {"message": "upstream overloaded", "code": 502}}').model())
    assert len(server.requests) == 3


def test_a_wrong_api_base_404_html_is_rejected_once_in_one_line(server: Server) -> None:
    page = b"<html>\n<head><title>404 Not Found</title></head>\n<body>\n" + b"<p>nope</p>\n" * 200 + b"</body>"
    with pytest.raises(ProviderRejectedError) as caught:
        ask(server.answer((404, {"Content-Type": "text/html"}, page)).model())
    assert caught.value.status == 404 and len(server.requests) == 1
    text = one_line(caught.value)
    assert "404" in text and "Not Found" in text and len(text) < 800


@pytest.mark.parametrize(("body", "shown"), [
    (b'{"error": {"message": "model zork-7 does not exist", "type": "invalid_request_error"}}', "zork-7"),
    (b'{"error": "model zork-7 does not exist"}', "zork-7"),
    (b'{"object": "error", "message": "model zork-7 does not exist", "code": 400}', "zork-7"),  # vLLM
    (b'{"detail": "model zork-7 does not exist"}', "zork-7"),  # FastAPI
    (b'{"detail": [{"loc": ["body", "model"], "msg": "field zork-7 required"}]}', "zork-7"),
    (b'{"error": {"code": 400}}', "400"),
    (b"", "400"),
], ids=["openai", "error-str", "vllm", "detail", "detail-list", "no-message", "empty"])
def test_error_bodies_of_every_shape_show_their_message(server: Server, body: bytes, shown: str) -> None:
    with pytest.raises(ProviderRejectedError) as caught:
        ask(server.answer((400, {}, body)).model())
    assert shown in one_line(caught.value) and caught.value.status == 400 and len(server.requests) == 1


@pytest.mark.parametrize("body", [
    {"error": {"message": "This model's maximum context length is 100 tokens. However, you requested 180."}},
    {"error": {"message": "too long", "type": "invalid_request_error", "code": "context_length_exceeded"}},
    {"object": "error", "message": "the request exceeds the available context size, try increasing it"},
    {"error": "This model's maximum context length is 100 tokens"},
])
def test_a_context_overflow_is_a_context_window_error(server: Server, body: dict[str, Any]) -> None:
    with pytest.raises(ContextWindowError):
        ask(server.answer((400, {}, json.dumps(body).encode())).model())
    assert len(server.requests) == 1


def test_a_rate_limit_with_retry_after_zero_then_a_reply(server: Server) -> None:
    server.answer((429, {"Retry-After": "0"}, b'{"error": {"message": "slow down"}}'), completion())
    reply = ask(server.model())
    assert reply.content == "OK" and reply.attempts == 2 and len(server.requests) == 2


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_a_redirect_is_followed_as_a_post_or_is_one_clear_error(server: Server, status: int) -> None:
    """A redirect (http for https, a missing or extra slash) is either followed with the same POST, or refused at
    once naming where it points; never retried as a server error, never turned into a GET."""
    where = f"http://127.0.0.1:{server.port}/elsewhere/v1/chat/completions"
    server.answer((status, {"Location": where, "Content-Type": "text/html"}, b""), completion())
    try:
        reply = ask(server.model())
    except ModelError as err:
        text = one_line(err)
        assert len(server.requests) == 1, f"a redirect was retried or became a GET: {text}"
        assert str(status) in text and where in text
    else:
        first, second = server.requests
        assert reply.content == "OK" and second["method"] == "POST" and second["path"].startswith("/elsewhere")
        assert second["body"] == first["body"]
        assert second["headers"]["Authorization"] == f"Bearer {KEY}"


# --------------------------------------------------------------------------------------------------- replies


def test_unpaired_surrogates_become_writable_text(server: Server, tmp_path: Any) -> None:
    server.answer(b'{"choices": [{"message": {"content": "a\\ud800b\\udfffc\\ud83d\\ude00",'
                  b' "reasoning_content": "r\\udc00"}}]}')
    reply = ask(server.model())
    assert reply.content == "a\ufffdb\ufffdc\U0001f600" and reply.reasoning == "r\ufffd"
    (tmp_path / "reply.txt").write_text(reply.content + reply.reasoning, encoding="utf-8")


@pytest.mark.parametrize("usage", [None, {}, {"prompt_tokens": None}, {"prompt_tokens": "n/a"},
                                   {"prompt_tokens_details": None}, {"prompt_tokens_details": {"cached_tokens": []}}])
def test_missing_or_odd_usage_counts_zero_tokens(server: Server, usage: Any) -> None:
    body = json.loads(completion())
    body["usage"] = usage
    reply = ask(server.answer(json.dumps(body).encode()).model())
    assert reply.content == "OK" and reply.prompt_tokens == 0 and reply.cached_tokens == 0


def test_null_content_with_reasoning_keeps_the_reasoning(server: Server) -> None:
    reply = ask(server.answer(completion({"role": "assistant", "content": None,
                                          "reasoning_content": "thought"}, usage=None)).model())
    assert reply.content == "" and reply.reasoning == "thought" and reply.completion_tokens == 0


# --------------------------------------------------------------------------------------------------- secrets


@pytest.mark.parametrize("key", [KEY, "plain-local-secret-4f9a2c"], ids=["sk-shaped", "plain"])
@pytest.mark.parametrize("status", [401, 500, 200])
def test_an_echoed_key_is_never_shown(server: Server, key: str, status: int) -> None:
    echo = f"bad header Authorization: Bearer {key} (key {key})"
    body = json.dumps({"error": {"message": echo}}).encode() if status != 200 else f"<p>{echo}</p>".encode()
    model = server.answer((status, {}, body)).model(api_key=key)
    with pytest.raises(ModelError) as caught:
        ask(model)
    assert server.requests[0]["headers"]["Authorization"] == f"Bearer {key}"
    for shown in (str(caught.value), repr(model), repr(caught.value)):
        assert key not in shown and key[:12] not in shown


@pytest.mark.parametrize("key", [KEY, "plain-local-secret-4f9a2c"], ids=["sk-shaped", "plain"])
@pytest.mark.parametrize("status", [401, 200])
@pytest.mark.parametrize("cut", [200, 580, 4000])
def test_a_key_cut_by_the_length_limit_is_not_half_shown(server: Server, key: str, status: int, cut: int) -> None:
    """Error texts are cut (600 characters shown; 4000 kept of a body that is not a reply): a key lying across
    a cut must not leave its first characters behind."""
    echo = "x" * (cut - 15) + " " + key + " end"
    body = json.dumps({"error": {"message": echo}}).encode() if status != 200 else echo.encode()
    with pytest.raises(ModelError) as caught:
        ask(server.answer((status, {}, body)).model(api_key=key))
    assert key[:10] not in str(caught.value)


def test_the_request_is_what_litellm_would_send(server: Server) -> None:
    ask(server.model())
    ask(server.model(temperature=0.3, max_tokens=7))
    (plain, tuned) = server.requests
    assert plain["path"] == "/v1/chat/completions"
    assert plain["headers"]["Authorization"] == f"Bearer {KEY}"
    assert plain["body"] == {"model": "some-model", "stream": False, "messages": [
        {"role": "system", "content": "You edit experiment.py."}, {"role": "user", "content": "go"}]}
    assert tuned["body"]["temperature"] == 0.3 and tuned["body"]["max_tokens"] == 7


@pytest.mark.parametrize(("sent", "read"), [("max_tokens", "length"), ("MAX_TOKENS", "length"),
                                             ("length", "length"), ("stop", "stop"), ("eos", "eos")])
def test_a_reply_cut_at_the_output_limit_reads_as_length_however_spelled(server: Server, sent: str,
                                                                          read: str) -> None:
    body = json.loads(completion())
    body["choices"][0]["finish_reason"] = sent
    assert ask(server.answer(json.dumps(body).encode()).model()).finish_reason == read


def test_a_rate_limit_sent_as_a_400_is_retried(server: Server) -> None:
    server.answer((400, {}, b'{"error": {"message": "Rate limit reached for requests"}}'), completion())
    reply = ask(server.model())
    assert reply.content == "OK" and reply.attempts == 2 and len(server.requests) == 2


@pytest.mark.parametrize("wording", ["Rate limit reached", "rate_limit_exceeded", "Rate-limit hit"])
def test_a_rate_limit_in_any_wording_is_retried(server: Server, wording: str) -> None:
    server.answer((400, {}, json.dumps({"error": {"message": wording}}).encode()), completion())
    assert ask(server.model()).attempts == 2


def test_model_output_that_mentions_a_context_limit_is_not_a_context_error(server: Server) -> None:
    """A 200 that is not a reply (a stream, say) may hold the model's own words: they are not the server's."""
    server.answer(b"data: this model's maximum context length is 10 tokens\n\n")
    with pytest.raises(TransientError):
        ask(server.model())


def test_a_ca_bundle_setting_that_is_a_folder_stops_before_any_work(tmp_path: Any,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.direct import TLSSettingsError

    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path))
    with pytest.raises(TLSSettingsError, match=str(tmp_path)):
        ProviderModel("deepseek/deepseek-chat", api_key=KEY).check_credentials()


@pytest.mark.parametrize(("value", "checked"), [("false", False), ("False", False), ("0", True), ("no", True)])
def test_only_ssl_verify_false_turns_certificate_checks_off(monkeypatch: pytest.MonkeyPatch, value: str,
                                                            checked: bool) -> None:
    """As litellm reads SSL_VERIFY: only "false" means no checks; anything else keeps them."""
    from orchestrator.direct import tls_context

    monkeypatch.setenv("SSL_VERIFY", value)
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    assert (tls_context() is not False) is checked


# --------------------------------------------------------------------------------------------------- slow answers


def test_blank_keep_alive_lines_before_a_reply_are_read_past(server: Server) -> None:
    """DeepSeek keeps a slow non-streaming request alive with blank lines until the reply is ready."""
    server.answer((200, {TRICKLE_HEADER: "0.5"}, completion()))
    reply = ask(server.model(timeout_s=5))
    assert reply.content == "OK" and reply.attempts == 1


def test_an_answer_kept_alive_past_the_timeout_is_cut_there_and_asked_again(server: Server) -> None:
    """Each byte comes within the timeout, so no read times out; the whole answer still may not take longer than
    timeout_s: the request is abandoned there and retried (the second answer comes at once)."""
    server.answer((200, {TRICKLE_HEADER: "4"}, completion({"role": "assistant", "content": "too late"})),
                  (200, {}, completion()))
    reply = ask(server.model(timeout_s=1))
    assert reply.content == "OK" and reply.attempts == 2
    assert len(server.requests) == 2


def test_a_compressed_answer_is_read(server: Server) -> None:
    server.answer((200, {"Content-Encoding": "gzip"}, gzip.compress(completion())))
    assert ask(server.model()).content == "OK"
