"""Routes sent without litellm: chat completions posted straight to an OpenAI-compatible endpoint over httpx.

litellm's import costs seconds of CPU (5 to 7 here) in every orchestrator process, which a session whose first
model call comes soon (a short baseline, a resume, a batch of sessions) pays in full. Two routes are plain
OpenAI-compatible HTTP, and are sent here instead:

- `deepseek/<model>`: to `--api-base`, else DEEPSEEK_API_BASE, else DeepSeek's API (the base litellm uses);
- `openai/<model>` with `--api-base`: an OpenAI-compatible server (vLLM, llama.cpp, Ollama, a proxy ...).

Everything else (and these too with `model_client = "litellm"`) goes through litellm. What is sent is what
litellm sends for these routes: the model name without its prefix, the messages as given, temperature and
max_tokens when set, no streaming. Errors come back as `ProviderHTTPError` (an HTTP status with the provider's
message) or httpx's own transport errors; the caller sorts them for retries exactly as it sorts litellm's.
"""

from __future__ import annotations

import functools
import json
import os
import ssl
import threading
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

DEEPSEEK_DEFAULT_BASE = "https://api.deepseek.com/beta"
ModelClient = Literal["auto", "litellm"]

# What providers answer when the prompt is longer than the model's context window (lower case; litellm's list).
_CONTEXT_PHRASES = (
    "exceed context limit",
    "this model's maximum context length is",
    "requested token count exceeds the model's maximum context length",
    "model's maximum context limit",
    "is longer than the model's context length",
    "input tokens exceed the configured limit",
    "exceeds the available context size",
    "context_length_exceeded",
    "prompt is too long",
)


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
        text = self.message.lower()
        code = str((self.body or {}).get("code") or "").lower()
        return self.status_code == 400 and (code == "context_length_exceeded" or
                                            any(p in text for p in _CONTEXT_PHRASES))


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
def _tls_context() -> ssl.SSLContext:
    import certifi

    return ssl.create_default_context(cafile=certifi.where())  # what httpx would make: the same CA bundle


_TLS_LOCK = threading.Lock()


def tls_context() -> ssl.SSLContext:
    """The TLS settings every direct client shares: made once (loading the CA bundle takes 50 to 100 ms), on the
    warm-up thread when there is one."""
    with _TLS_LOCK:
        return _tls_context()


def warm() -> None:
    """What a first direct call would otherwise load: httpx and the TLS context."""
    import httpx  # noqa: F401

    tls_context()


class DirectClient:
    """Posts chat completions for one route; one keep-alive connection pool per model."""

    def __init__(self, route: Route, timeout_s: float) -> None:
        import httpx

        self.route = route
        self._http = httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=False, verify=tls_context())

    def complete(self, body: dict[str, Any], api_key: str | None) -> dict[str, Any]:
        """The provider's answer as JSON. Raises ProviderHTTPError, or httpx.TimeoutException /
        httpx.TransportError when no answer came."""
        from orchestrator import __version__

        headers = {"Content-Type": "application/json", "Accept": "application/json",
                   "User-Agent": f"orchestrator/{__version__}"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        response = self._http.post(self.route.url, content=json.dumps(body).encode("utf-8"), headers=headers)
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
            shown = response.text[:200] if response.text else "(empty body)"
            raise ProviderHTTPError(f"{self.route.provider}'s answer is not a chat completion: {shown}",
                                    None, _error_object(data), response)
        return data

    def close(self) -> None:
        self._http.close()
