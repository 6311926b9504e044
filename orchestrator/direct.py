"""Routes sent without litellm: chat completions posted straight to an OpenAI-compatible endpoint over httpx.

litellm's import costs seconds of CPU (5 to 7 here) in every orchestrator process, which a session whose first
model call comes soon (a short baseline, a resume, a batch of sessions) pays in full. Two routes are plain
OpenAI-compatible HTTP, and are sent here instead:

- `deepseek/<model>`: to `--api-base`, else DEEPSEEK_API_BASE, else DeepSeek's API (the base litellm uses);
- `openai/<model>` with `--api-base`: an OpenAI-compatible server (vLLM, llama.cpp, Ollama, a proxy ...).

Everything else (and these too with `model_client = "litellm"`) goes through litellm. The request carries what
litellm's does for these routes (the model name without its prefix, the messages as given, temperature and
max_tokens when set) and `"stream": false`; 307/308 redirects are followed, others are an error naming where
they lead; TLS certificates are checked as litellm
checks them (SSL_VERIFY, SSL_CERT_FILE; not litellm's client certificates, SSL_CERTIFICATE). Replies are read as litellm reads them (`reasoning_and_content`,
`finish_reason`). Errors come back as `ProviderHTTPError` (an HTTP status with the provider's message) or httpx's
own transport errors; the caller sorts them for retries as it sorts litellm's (context-window and rate-limit
wordings as litellm knows them).
"""

from __future__ import annotations

import functools
import json
import os
import re
import threading
import time
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from orchestrator.errors import OrchestratorError

if TYPE_CHECKING:
    import ssl  # imported where a context is made: its import is a cost on the way to a launch's first line

DEEPSEEK_DEFAULT_BASE = "https://api.deepseek.com/beta"
MAX_REDIRECTS = 5
MAX_SHOWN_CHARS = 4000  # of a body that is not a reply, in its error
ModelClient = Literal["auto", "litellm"]

# What servers answer, whatever the status, when the prompt is longer than the model's context window (lower
# case; litellm's list, so both paths shorten the history on the same answers).
_CONTEXT_PHRASES = (
    "exceed context limit",
    "this model's maximum context length is",
    "requested token count exceeds the model's maximum context length",
    "model's maximum context limit",
    "is longer than the model's context length",
    "is longer than the model's maximum context length",
    "input tokens exceed the configured limit",
    "`inputs` tokens + `max_new_tokens` must be",
    "exceeds the available context size",  # llama.cpp
    "exceeds the maximum number of tokens allowed",
    "context_length_exceeded",
    "prompt is too long",
)
_CONTEXT_PAIRS = (("current length is", "while limit is"), ("maximum input length is", "tokens"),
                  ("input too long:", "input tokens, limit is"))
# A finish reason meaning the reply was cut at the output limit, as servers other than OpenAI's spell it.
_LENGTH_REASONS = frozenset({"length", "max_tokens", "MAX_TOKENS", "model_context_window_exceeded"})
_RATE_LIMIT = re.compile(r"rate[\s_\-]*limit")
_THINK_BLOCK = re.compile(r"<(?:think|thinking|budget:thinking)>(.*?)</(?:think|thinking|budget:thinking)>(.*)",
                          re.DOTALL)


class TLSSettingsError(OrchestratorError, ValueError):
    """The CA bundle the environment names cannot be read."""


class Route(BaseModel):
    """Where and how one model is asked."""

    model_config = ConfigDict(frozen=True)

    provider: Literal["deepseek", "openai"]
    url: str  # the chat completions endpoint
    wire_model: str  # the name sent in the request body


def route_for(name: str, api_base: str | None, client: ModelClient = "auto") -> Route | None:
    """The direct route for a model name, or None when litellm must carry it."""
    if client != "auto":
        return None
    provider, _, bare = name.partition("/")
    if not bare.strip():
        return None
    if provider == "deepseek":
        base = api_base or os.environ.get("DEEPSEEK_API_BASE", "").strip() or DEEPSEEK_DEFAULT_BASE
    elif provider == "openai" and api_base:
        base = api_base
    else:
        return None
    base = base.rstrip("/")
    url = base if base.endswith("/chat/completions") else f"{base}/chat/completions"
    return Route(provider=provider, url=url, wire_model=bare)


class ProviderHTTPError(Exception):
    """An answer that is not a chat completion: an HTTP error status, or a body that cannot be read as one.
    `status_code` is None for the latter; `body` is the provider's `error` object when it sent one (so
    `models.provider_text` finds its message); `response` carries the headers (Retry-After)."""

    def __init__(self, message: str, status_code: int | None, body: Mapping[str, Any] | None, response: Any) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.body = body
        self.response = response

    def is_context_window(self) -> bool:
        if self.status_code is None:  # a 200 that is not a reply: its text may be model output
            return False
        text = self.message.lower()
        if "string_above_max_length" in text or ("invalid 'user'" in text and "string too long" in text):
            return False  # a request field too long, not the prompt
        code = str((self.body or {}).get("code") or "").lower()
        return (code == "context_length_exceeded" or any(p in text for p in _CONTEXT_PHRASES)
                or any(a in text and b in text for a, b in _CONTEXT_PAIRS))

    def is_rate_limit(self) -> bool:
        """A rate limit some servers send as another status than 429 (litellm's wording test)."""
        return self.status_code is not None and _RATE_LIMIT.search(self.message.lower()) is not None


def reasoning_and_content(message: Mapping[str, Any]) -> tuple[str | None, str]:
    """The reasoning and the answer of a reply message, as litellm reads them: the `reasoning_content` field (even
    null), else `reasoning`, else a leading <think>...</think> block of the content (servers running a reasoning
    model without a reasoning parser: Ollama, llama.cpp, vLLM)."""
    content = message.get("content")
    text = content if isinstance(content, str) else ""
    for field in ("reasoning_content", "reasoning"):
        if field in message:
            value = message[field]
            return (value if isinstance(value, str) and value else None), text
    found = _THINK_BLOCK.match(text)
    if found:
        return found.group(1) or None, found.group(2)
    return None, text


def finish_reason(value: Any) -> str | None:
    """The reply's finish reason, with the spellings of 'cut at the output limit' read as OpenAI's `length`."""
    if not isinstance(value, str) or not value:
        return None
    return "length" if value in _LENGTH_REASONS else value


def _error_object(data: Any) -> Mapping[str, Any] | None:
    error = data.get("error") if isinstance(data, Mapping) else None
    if isinstance(error, Mapping):
        return error
    if isinstance(error, str):
        return {"message": error}
    if isinstance(data, Mapping) and isinstance(data.get("message"), str):
        return data
    return None


@functools.cache
def _tls_context(cafile: str) -> ssl.SSLContext:
    import ssl

    return ssl.create_default_context(cafile=cafile)


_TLS_LOCK = threading.Lock()


def _ca_bundle() -> str | None:
    """The CA bundle the environment names, as litellm reads it: SSL_VERIFY (a bundle's path; false: check
    nothing, None here), else SSL_CERT_FILE when it exists, else certifi's bundle."""
    verify = os.environ.get("SSL_VERIFY", "").strip()
    if verify.lower() == "false":
        return None
    if verify and os.path.exists(verify):
        return verify
    cert_file = os.environ.get("SSL_CERT_FILE", "").strip()
    if cert_file and os.path.exists(cert_file):
        return cert_file
    import certifi

    return certifi.where()


def check_tls_settings() -> None:
    """Before any work: a CA bundle named by the environment that cannot be a bundle (a folder, an unreadable
    file) is one clear error now rather than at the first model call. Cheap: the bundle is not parsed here."""
    cafile = _ca_bundle()
    if cafile is not None and not (os.path.isfile(cafile) and os.access(cafile, os.R_OK)):
        raise TLSSettingsError(f"{cafile} (from SSL_VERIFY or SSL_CERT_FILE) is not a readable CA bundle file")


def tls_context() -> ssl.SSLContext | bool:
    """How direct clients check TLS certificates (see `_ca_bundle`). A context is made once per bundle (loading
    one takes 50 to 100 ms), on the warm-up thread when there is one."""
    import ssl

    cafile = _ca_bundle()
    if cafile is None:
        return False
    with _TLS_LOCK:
        try:
            return _tls_context(cafile)
        except (OSError, ssl.SSLError) as exc:
            raise TLSSettingsError(f"cannot read the CA bundle {cafile} (from SSL_VERIFY, SSL_CERT_FILE or certifi) "
                                   f"to check the provider's certificate: {exc}") from None


def warm() -> None:
    """What a first direct call would otherwise load: httpx, the transport under it (httpcore, imported when
    a client is made) and the TLS context."""
    import httpx

    httpx.Client(verify=tls_context()).close()


def _keeps_key(old: str, new: str) -> bool:
    """Whether a redirect may carry the key on (httpx's rule): to the same origin, or from http to https on the same
    host with the default ports."""
    a, b = urllib.parse.urlsplit(old), urllib.parse.urlsplit(new)
    if (a.scheme, a.hostname, a.port) == (b.scheme, b.hostname, b.port):
        return True
    return (a.hostname == b.hostname and a.scheme == "http" and b.scheme == "https"
            and a.port in (None, 80) and b.port in (None, 443))


class DirectClient:
    """Posts chat completions for one route; one keep-alive connection pool per model."""

    def __init__(self, route: Route, timeout_s: float) -> None:
        import httpx

        self.route = route
        self.timeout_s = timeout_s  # for the whole answer, redirects included (httpx's own bounds each read)
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=False, verify=tls_context())

    def complete(self, body: dict[str, Any], api_key: str | None) -> dict[str, Any]:
        """The provider's answer as JSON. Raises ProviderHTTPError, or httpx.TimeoutException /
        httpx.TransportError when no answer came."""
        from orchestrator import __version__

        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": f"orchestrator/{__version__}"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        response = self._post(json.dumps(body).encode("utf-8"), headers)
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code >= 400:
            error = _error_object(data)
            text = str(error["message"]) if error and "message" in error else (response.text or response.reason_phrase)
            raise ProviderHTTPError(f"{self.route.provider} answered {response.status_code}: {text}",
                                    response.status_code, error, response)
        choices = data.get("choices") if isinstance(data, Mapping) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping) \
                or not isinstance(choices[0].get("message"), Mapping):
            # collapsed before it is cut, as the error text will be: a key across the cut is past what is shown
            shown = " ".join(response.text.split())[:MAX_SHOWN_CHARS] if response.text else "(empty body)"
            raise ProviderHTTPError(f"{self.route.provider}'s answer is not a chat completion: {shown}",
                                    None, _error_object(data), response)
        return data

    def _post(self, content: bytes, headers: dict[str, str]) -> Any:
        """POST, following a server's 307/308 (which keep the method and body) up to 5 times, without the key
        to another origin. Any other redirect (a 301/302 would turn the POST into a GET) is an error naming
        where it leads, for the user to give as --api-base."""
        url = self.route.url
        deadline = time.monotonic() + self.timeout_s
        for _ in range(MAX_REDIRECTS + 1):
            response = self._post_once(url, content, headers, deadline)
            if not 300 <= response.status_code < 400:
                return response
            location = response.headers.get("location")
            if response.status_code not in (307, 308) or not location:
                break
            target = urllib.parse.urljoin(url, location)
            if not _keeps_key(url, target):
                headers = {k: v for k, v in headers.items() if k != "Authorization"}
            url = target
        location = response.headers.get("location")
        if 300 <= response.status_code < 400 and response.status_code in (307, 308) and location:
            why = f"more than {MAX_REDIRECTS} redirects, the last from {url}"
        else:
            where = urllib.parse.urljoin(url, location) if location else "nowhere"
            why = f"redirected ({response.status_code}) {url} to {where}: give the final address as --api-base"
        raise ProviderHTTPError(f"{self.route.provider}: {why}", response.status_code, None, response)

    def _post_once(self, url: str, content: bytes, headers: dict[str, str], deadline: float) -> Any:
        """One POST whose whole answer must have arrived by `deadline` (time.monotonic()), else
        httpx.ReadTimeout. A server that keeps the connection alive with a byte now and then (DeepSeek sends blank
        lines while a reply is being made) never trips a timeout on each read; this bounds the request itself."""
        import httpx

        with self._http.stream("POST", url, content=content, headers=headers) as streamed:
            raw = bytearray()
            for chunk in streamed.iter_raw():
                raw += chunk
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout(f"no whole answer within {self.timeout_s:g} s", request=streamed.request)
        # the same answer, read: its body decoded (Content-Encoding) when used, as a plain post's would be
        return httpx.Response(streamed.status_code, headers=streamed.headers, content=bytes(raw),
                              request=streamed.request, extensions=streamed.extensions)

    def close(self) -> None:
        self._http.close()
