"""Models: the `Model` protocol, `ProviderModel` (any litellm name) and `ScriptedModel` (`scripted:PATH`).

`complete(messages)` normalises and validates the history for the model's profile before anything goes out, never
mutates what it is given, and returns a `Reply` with usage, cached tokens and cost. Transient failures (rate
limits, 5xx, timeouts, dropped connections) are retried here with exponential backoff and full jitter, honouring
Retry-After; the caller's history is not touched, so a retry re-sends exactly the same messages. Everything that
leaves this module (errors, replies, log lines, retry events) is passed through `secrets.redact`, and is safe to
write as UTF-8 (unpaired surrogates a provider may send become U+FFFD).

For the context window and the budget, every model also says `context_limit()` (input tokens, None when unknown),
`count_tokens(messages)` (what the history would cost as input) and `price_known()`.

litellm is imported lazily: importing this module costs nothing.
"""

from __future__ import annotations

import copy
import email.utils
import json
import logging
import math
import os
import random
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from orchestrator.conversation import STRICTEST_PROFILE, Message, Profile, profile_for, to_wire
from orchestrator.credentials import (
    PROVIDER_KEY_VARS,
    MissingAPIKeyError,
    check_known_provider,
    needs_no_key,
)
from orchestrator.direct import (
    DirectClient,
    ModelClient,
    ProviderHTTPError,
    TLSSettingsError,
    finish_reason,
    reasoning_and_content,
    route_for,
)
from orchestrator.errors import ModelError
from orchestrator.secrets import is_secret_env_name, redact

log = logging.getLogger(__name__)

SCRIPTED_PREFIX = "scripted:"
MAX_RETRY_AFTER_S = 600.0  # a provider asking for a longer pause than this is treated as if it asked for this
MAX_ERROR_CHARS = 600
# Sent as the key to an OpenAI-compatible server on this machine when no key is set: such servers usually check
# none, but the openai client refuses to send a request without one.
LOCAL_PLACEHOLDER_KEY = "sk-no-key-needed"
# Tokenizers litellm would download from the Hugging Face hub (slowly failing offline): counted with tiktoken.
_DOWNLOADED_TOKENIZERS = frozenset({"cohere", "llama2", "llama3"})

ErrorKind = Literal["rate_limit", "server_error", "timeout", "connection"]


def utf8_safe(text: str) -> str:
    """The text with unpaired surrogates (which cannot be written as UTF-8) replaced by U+FFFD; surrogate pairs
    that stand for one character become that character."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return text


class Reply(BaseModel):
    """One answer of a model, with what it cost."""

    model_config = ConfigDict(frozen=True)

    content: str
    reasoning: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float | None = None  # None when the model's price is unknown
    latency_s: float = 0.0  # the successful request only
    model: str
    attempts: int = 1
    finish_reason: str | None = None  # "stop"; "length" when cut at max_tokens (the reply may be incomplete)
    via: Literal["direct", "litellm", "scripted"] | None = None  # what carried the call (None: not recorded)

    @field_validator("content", "reasoning", "model", "finish_reason", mode="after")
    @classmethod
    def _writable(cls, value: str | None) -> str | None:
        return utf8_safe(value) if value is not None else None


class RetryEvent(BaseModel):
    """Reported to `on_retry` before each pause between attempts."""

    model_config = ConfigDict(frozen=True)

    attempt: int  # the attempt that failed, 1-based
    kind: ErrorKind
    wait_s: float
    message: str  # one line, redacted


# --------------------------------------------------------------------------------------------------- errors


class UnknownModelError(ModelError):
    """litellm cannot tell which provider serves the model name."""

    def __init__(self, model: str) -> None:
        self.model = model
        super().__init__(f"unknown model {model!r}: litellm cannot tell its provider; name it as provider/model, "
                         "e.g. deepseek/deepseek-reasoner, openai/gpt-4o or anthropic/claude-sonnet-4-5")


class ContextWindowError(ModelError):
    """The history no longer fits the model's context window; the caller may shorten it and try again."""


class ProviderRejectedError(ModelError):
    """A non-retryable answer (400, 401, 403, 404 ...); the message carries the provider's text, redacted."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)


class TransientError(ModelError):
    """Retries exhausted on rate limits, 5xx, timeouts or dropped connections."""

    def __init__(self, message: str, kind: ErrorKind, attempts: int) -> None:
        self.kind = kind
        self.attempts = attempts
        super().__init__(message)


class ScriptExhaustedError(ModelError):
    """The scripted model has no reply left."""


class ScriptFormatError(ModelError):
    """A scripted model's file cannot be read or has an invalid item."""


def _one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------------- protocol


@runtime_checkable
class Model(Protocol):
    name: str

    @property
    def profile(self) -> Profile: ...

    def complete(self, messages: Sequence[Message]) -> Reply: ...

    def context_limit(self) -> int | None: ...

    def count_tokens(self, messages: Sequence[Message]) -> int: ...

    def price_known(self) -> bool: ...


# --------------------------------------------------------------------------------------------------- litellm


# Loggers through which litellm and the SDK under it can emit request or response text (at DEBUG). A filter on a
# logger only sees records emitted on that exact logger, so each one is named.
_THIRD_PARTY_LOGGERS = (
    "LiteLLM",
    "LiteLLM Router",
    "LiteLLM Proxy",
    "openai._base_client",
    "httpx",
    "httpcore.connection",
    "httpcore.http11",
)


class RedactingLogFilter(logging.Filter):
    """Passes every record through `redact` before any handler (ours, litellm's, pytest's) sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


_LOG_FILTER = RedactingLogFilter()


def _install_log_redaction() -> None:
    for name in (__name__, *_THIRD_PARTY_LOGGERS):
        logger = logging.getLogger(name)
        if _LOG_FILTER not in logger.filters:
            logger.addFilter(_LOG_FILTER)


def _litellm() -> Any:
    """Import litellm on first use: offline cost map, no debug banners, redacted log records. When a warm-up
    (`start_warm_up`) is under way on another thread, wait for it first: litellm's lazy set-up is not made to run
    on two threads at once."""
    warm = _WARM_UP
    if warm is not None and warm.thread is not threading.current_thread():
        warm.thread.join()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    litellm.suppress_debug_info = True
    _install_log_redaction()
    return litellm


def preload(name: str, api_base: str | None = None, client: ModelClient = "auto") -> None:
    """Load what model `name`'s calls need here and now, on this thread and starting none, so that processes
    forked from this one (a batch's sessions) have it loaded already: litellm, or for a direct route only the
    model map and httpx."""
    if name.startswith(SCRIPTED_PREFIX):
        return
    if route_for(name, api_base, client) is not None:
        _load_direct()
    else:
        _litellm()


def _load_direct() -> None:
    from orchestrator import direct, model_map

    model_map.load()
    direct.warm()


class _WarmUp:
    def __init__(self, thread: threading.Thread) -> None:
        self.thread = thread
        self.error: BaseException | None = None


_WARM_UP: _WarmUp | None = None


def start_warm_up(name: str, api_base: str | None = None, client: ModelClient = "auto") -> None:
    """Load what model `name`'s first call needs on a background (daemon) thread, so that it overlaps the
    session's start (template copy, git, baseline run) and the first model call costs what later ones do. For a
    direct route that is the model map and httpx; otherwise litellm's import and its lazy per-provider set-up.
    Nothing goes out on the network: the warm-up call is answered by litellm's `mock_response`. Any later use of
    litellm in this module waits for it; a failure here is ignored (the real call will say)."""
    global _WARM_UP
    if _WARM_UP is not None or name.startswith(SCRIPTED_PREFIX):
        return

    def work() -> None:
        try:
            if route_for(name, api_base, client) is not None:
                _load_direct()
                return
            litellm = _litellm()
            model = ProviderModel(name, api_base=api_base, client="litellm")
            model.context_limit()
            model.count_tokens([Message(role="user", content="warm up")])
            model.price_known()
            litellm.completion(**{**model._request_kwargs([{"role": "user", "content": "warm up"}]),
                                  "api_key": LOCAL_PLACEHOLDER_KEY, "mock_response": "ok"})
            # What a mocked call skips: the default tokenizer most provider routes load on their first real call
            # (module attribute `encoding`, loaded lazily), and the HTTP transport under the clients.
            import litellm.main

            getattr(litellm.main, "encoding", None)
            import httpcore  # noqa: F401
        except BaseException as exc:  # a warm-up never fails the session
            assert _WARM_UP is not None
            _WARM_UP.error = exc

    _WARM_UP = _WarmUp(threading.Thread(target=work, name="litellm-warm-up", daemon=True))
    _WARM_UP.thread.start()


def _header(headers: Any, name: str) -> str | None:
    if not headers:
        return None
    try:
        items = headers.items()
    except AttributeError:
        return None
    for k, v in items:
        if str(k).lower() == name:
            return str(v)
    return None


def _finite_seconds(value: float) -> float | None:
    return max(0.0, value) if math.isfinite(value) else None


def _retry_after_value(value: str) -> float | None:
    """A Retry-After value: seconds (decimals allowed) or an HTTP date; None when it is neither."""
    text = value.strip()
    if not text:
        return None
    try:
        return _finite_seconds(float(text))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None  # "1.5s", "soon", ...: as if the provider had not said
    if when.tzinfo is None:  # HTTP dates are GMT
        when = when.replace(tzinfo=UTC)
    return _finite_seconds(when.timestamp() - time.time())


def retry_after_s(exc: BaseException) -> float | None:
    """Seconds the provider asked us to wait (Retry-After / retry-after-ms), if it said in a form we can read."""
    sources = [getattr(exc, "litellm_response_headers", None)]
    response = getattr(exc, "response", None)
    sources.append(getattr(response, "headers", None))
    for headers in sources:
        ms = _header(headers, "retry-after-ms")
        if ms is not None:
            try:
                seconds = _finite_seconds(float(ms) / 1000.0)
            except ValueError:
                seconds = None
            if seconds is not None:
                return seconds
        value = _header(headers, "retry-after")
        if value is not None:
            seconds = _retry_after_value(value)
            if seconds is not None:
                return seconds
    return None


def provider_text(exc: BaseException) -> str:
    """The provider's own error message where it can be found, else the exception's text (not yet redacted)."""
    body = getattr(exc, "body", None)
    if isinstance(body, Mapping) and isinstance(body.get("message"), str):
        return body["message"]
    message = str(getattr(exc, "message", None) or exc)
    start = message.find("{")
    if start >= 0:
        try:
            payload = json.loads(message[start:])
        except ValueError:
            payload = None
        error = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(error, Mapping) and isinstance(error.get("message"), str):
            return error["message"]
        if isinstance(error, str):
            return error
    marker = "Exception - "  # litellm's "litellm.XError: <Provider>Exception - <text>"
    return message.split(marker, 1)[1] if marker in message else message


class _Classified(BaseModel):
    kind: ErrorKind | Literal["context", "rejected", "missing_key"]
    status: int | None = None


def _classify(litellm: Any, exc: Exception) -> _Classified | None:
    """Sort an exception from litellm.completion; None when it is not a provider/transport error."""
    status = getattr(exc, "status_code", None)
    status = status if isinstance(status, int) else None
    text = str(exc)
    if isinstance(exc, litellm.ContextWindowExceededError):
        return _Classified(kind="context", status=status)
    if isinstance(exc, litellm.Timeout):
        return _Classified(kind="timeout", status=status)
    if "Missing credentials" in text or "api_key client option must be set" in text:
        return _Classified(kind="missing_key", status=status)
    if isinstance(exc, litellm.RateLimitError):
        return _Classified(kind="rate_limit", status=status)
    if isinstance(exc, litellm.APIConnectionError) and _certificate_refused(exc):
        return None  # final, as on the direct routes
    if isinstance(exc, litellm.APIConnectionError):
        return _Classified(kind="connection", status=status)
    if isinstance(exc, litellm.InternalServerError):
        # litellm reports refused and dropped connections as a 500 "Connection error." / "Server disconnected".
        lowered = text.lower()
        dropped = (
            "connection error" in lowered or "disconnected" in lowered or "connection refused" in lowered
        )
        return _Classified(kind="connection" if dropped else "server_error", status=status)
    if isinstance(exc, litellm.ServiceUnavailableError | litellm.BadGatewayError):
        return _Classified(kind="server_error", status=status)
    if status is not None:
        return _by_status(status)
    if isinstance(exc, litellm.BadRequestError):
        return _Classified(kind="rejected", status=400)
    return _by_transport(exc)  # transport errors that escaped litellm's mapping


def _by_status(status: int) -> _Classified:
    """An HTTP error status: 429 and 408 retried as rate limit and timeout, 5xx as a server error; others final."""
    if status == 429:
        return _Classified(kind="rate_limit", status=status)
    if status == 408:
        return _Classified(kind="timeout", status=status)
    if status >= 500:
        return _Classified(kind="server_error", status=status)
    return _Classified(kind="rejected", status=status)


def _certificate_refused(exc: BaseException) -> bool:
    """A TLS certificate the client would not trust: a setting to fix (SSL_CERT_FILE ...), not a passing fault."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(current):
            return True
        current = current.__cause__ or current.__context__
    return False


def _by_transport(exc: Exception) -> _Classified | None:
    import httpx  # comes with litellm, and carries the direct routes

    if _certificate_refused(exc):
        return None  # final: "call failed" with the TLS error's text
    if isinstance(exc, httpx.TimeoutException):
        return _Classified(kind="timeout")
    if isinstance(exc, httpx.TransportError):
        return _Classified(kind="connection")
    return None


def _classify_direct(exc: Exception) -> _Classified | None:
    """Sort an exception from a direct route (`direct.DirectClient`) as `_classify` sorts litellm's."""
    if isinstance(exc, ProviderHTTPError):
        if exc.is_context_window():
            return _Classified(kind="context", status=exc.status_code)
        if exc.is_rate_limit():
            return _Classified(kind="rate_limit", status=exc.status_code)
        if exc.status_code is None:  # an answer that is not a chat completion: a fault of the server's, may pass
            return _Classified(kind="server_error")
        return _by_status(exc.status_code)
    return _by_transport(exc)


def _usage_field(usage: Any, name: str) -> Any:
    if usage is None:
        return None
    value = getattr(usage, name, None)
    if value is None and isinstance(usage, Mapping):
        value = usage.get(name)
    return value


def _count(value: Any) -> int:
    """A token count from a reply's usage; 0 for what is not a count (a server's odd answer does not end the
    session: the reply itself is good)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int | float) and math.isfinite(value):
        return max(0, int(value))
    return 0


def _cached_tokens(usage: Any) -> int:
    details = _usage_field(usage, "prompt_tokens_details")
    return (_count(_usage_field(details, "cached_tokens"))
            or _count(_usage_field(usage, "prompt_cache_hit_tokens"))  # DeepSeek's own name
            or _count(_usage_field(usage, "cache_read_input_tokens")))  # Anthropic's own name


class ProviderModel:
    """Any model litellm can name, with our own retry loop and the profile's message rules. The routes of
    `direct.route_for` (deepseek/, openai/ with an api_base) are posted by `direct.DirectClient` without litellm;
    the others, or all with `client="litellm"`, go through litellm."""

    def __init__(
        self,
        name: str,
        *,
        api_base: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 600,
        max_attempts: int = 6,
        backoff_base_s: float = 2.0,
        backoff_max_s: float = 60.0,
        temperature: float | None = None,
        max_tokens: int | None = None,
        profile: str | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
        context_tokens: int | None = None,
        client: ModelClient = "auto",
    ) -> None:
        if not name.strip():
            raise ModelError("no model name given")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if context_tokens is not None and context_tokens < 1:
            raise ValueError("context_tokens must be at least 1")
        self.name = name
        self.api_base = api_base
        self._api_key = api_key
        self.timeout_s = float(timeout_s)
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.on_retry = on_retry
        # An override is checked at once; otherwise the profile may need litellm's model map, so it is looked up
        # on first use (litellm's import takes seconds, and is done on a background thread meanwhile).
        self._profile: Profile | None = profile_for(name, profile) if profile else None
        self.context_tokens = context_tokens  # overrides litellm's map (a local model it does not know)
        self._credentials_checked = False
        self._info: dict[str, Any] | None = None
        self._info_looked_up = False
        self.route = route_for(name, api_base, client)  # None: litellm carries the calls
        self._direct: DirectClient | None = None

    def __repr__(self) -> str:  # never shows the key
        base = self._redact(self.api_base) if self.api_base else None
        return f"ProviderModel(name={self.name!r}, api_base={base!r}, profile={self.profile.name!r})"

    @property
    def profile(self) -> Profile:
        """The message rules for this model: the override, else from its name or litellm's model map."""
        if self._profile is None:
            if self.route is not None:
                self._profile = profile_for(self.name, info=self._model_info())
            else:
                _litellm()  # waits for a warm-up under way (litellm's lazy set-up is not made for two threads)
                self._profile = profile_for(self.name)
        return self._profile

    # ---------------------------------------------------------------------------------------------- helpers

    def _redact(self, text: str) -> str:
        env: Mapping[str, str] = os.environ
        if self._api_key:
            env = {**os.environ, "ORCHESTRATOR_EXPLICIT_API_KEY": self._api_key}
        return utf8_safe(redact(text, env))

    def _model_info(self) -> dict[str, Any] | None:
        """litellm's (bundled, offline) entry for the model; None when it has none."""
        if not self._info_looked_up:
            if self.route is not None:
                from orchestrator import model_map

                self._info = model_map.entry(self.name)
            else:
                litellm = _litellm()
                try:
                    self._info = dict(litellm.get_model_info(self.name))
                except Exception:  # an unmapped model
                    self._info = None
            self._info_looked_up = True
        return self._info

    # ---------------------------------------------------------------------------------------------- sizes

    def context_limit(self) -> int | None:
        """Input tokens the model accepts: `context_tokens` when given, else litellm's map; None when unknown."""
        if self.context_tokens is not None:
            return self.context_tokens
        value = (self._model_info() or {}).get("max_input_tokens")
        return value if isinstance(value, int) and value > 0 else None

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Input tokens of the history as it would be sent (normalised for the profile; not validated)."""
        wire = to_wire(messages, self.profile, check=False)
        litellm = _litellm()
        counting_name = self.name
        try:
            from litellm.utils import huggingface_tokenizer_kind

            if huggingface_tokenizer_kind(self.name) in _DOWNLOADED_TOKENIZERS:
                counting_name = ""  # tiktoken's default encoding: never a download
        except Exception:  # pragma: no cover - litellm's internals moved: count with the model's name
            pass
        try:
            return int(litellm.token_counter(model=counting_name, messages=wire))
        except Exception:  # a tokenizer that cannot load: an estimate is better than no answer
            return _estimate_tokens("".join(m["content"] for m in wire))

    def price_known(self) -> bool:
        """Whether litellm's local price map knows both the input and the output price of the model."""
        info = self._model_info() or {}
        return info.get("input_cost_per_token") is not None and info.get("output_cost_per_token") is not None

    def _error_text(self, exc: BaseException) -> str:
        # redacted whole, then cut: a key cut in two would match neither its value nor a key's shape
        return _one_line(self._redact(f"{type(exc).__name__}: {provider_text(exc)}"))

    def _wait_s(self, failed_attempt: int, exc: BaseException) -> float:
        cap = min(self.backoff_max_s, self.backoff_base_s * (2 ** (failed_attempt - 1)))
        wait = random.uniform(0.0, max(0.0, cap))  # full jitter
        asked = retry_after_s(exc)
        if asked is not None:
            wait = max(wait, min(asked, MAX_RETRY_AFTER_S))
        return wait

    def check_credentials(self) -> None:
        """Raise MissingAPIKeyError (without any network) when the provider's key is not available, and
        UnknownModelError when litellm cannot tell the model's provider. A provider of PROVIDER_KEY_VARS is
        checked at once; any other waits for litellm's import."""
        if self._credentials_checked:
            return
        if check_known_provider(self.name, self.api_base, self.route is not None, api_key=self._api_key):
            self._credentials_checked = True
            return
        litellm = _litellm()
        try:
            litellm.get_llm_provider(model=self.name, api_base=self.api_base)
        except Exception:  # litellm's multi-line "LLM Provider NOT provided" and friends
            raise UnknownModelError(self.name) from None
        if self._api_key or needs_no_key(self.name, self.api_base):
            self._credentials_checked = True
            return
        # litellm counts a variable set to "" as present; for us an empty key is a missing key.
        empty = {k: v for k, v in os.environ.items() if is_secret_env_name(k) and not v.strip()}
        for k in empty:
            del os.environ[k]
        try:
            report = litellm.validate_environment(model=self.name, api_base=self.api_base)
        except Exception:  # an unknown provider: let the call itself say what is wrong
            report = {}
        finally:
            os.environ.update(empty)
        missing = [k for k in report.get("missing_keys", []) if is_secret_env_name(k)]
        if missing:
            raise MissingAPIKeyError(self.name, missing, api_base=self.api_base)
        self._credentials_checked = True

    def _request_kwargs(self, wire: list[dict[str, str]]) -> dict[str, Any]:
        # A fresh copy per attempt: litellm may rewrite what it is given, and every attempt must send the same.
        kwargs: dict[str, Any] = {
            "model": self.name,
            "messages": copy.deepcopy(wire),
            "timeout": self.timeout_s,
            "max_retries": 0,  # the openai SDK's own retries: off, we retry here
            "num_retries": 0,  # litellm's wrapper retries: off
        }
        if self.api_base:
            kwargs["api_base"] = self.api_base
        if self._api_key:
            kwargs["api_key"] = self._api_key
        elif needs_no_key(self.name, self.api_base) and not os.environ.get("OPENAI_API_KEY", "").strip():
            kwargs["api_key"] = LOCAL_PLACEHOLDER_KEY
        if self.temperature is not None and self.profile.temperature:
            kwargs["temperature"] = self.temperature
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        return kwargs

    def _reply(self, litellm: Any, response: Any, latency_s: float, attempts: int) -> Reply:
        choice = response.choices[0]
        message = choice.message
        content = message.content or ""
        reasoning = getattr(message, "reasoning_content", None) or None
        usage = getattr(response, "usage", None)
        hidden = getattr(response, "_hidden_params", None) or {}
        cost = hidden.get("response_cost")
        if cost is None:
            try:
                cost = litellm.completion_cost(completion_response=response)
            except Exception:  # ModelNotMappedError and friends: the price is unknown
                cost = None
        return Reply(
            content=self._redact(content),
            reasoning=self._redact(reasoning) if reasoning else None,
            prompt_tokens=int(_usage_field(usage, "prompt_tokens") or 0),
            completion_tokens=int(_usage_field(usage, "completion_tokens") or 0),
            cached_tokens=_cached_tokens(usage),
            cost_usd=float(cost) if cost is not None else None,
            latency_s=latency_s,
            model=self.name,
            attempts=attempts,
            finish_reason=str(choice.finish_reason) if getattr(choice, "finish_reason", None) else None,
            via="litellm",
        )

    def _direct_reply(self, data: Mapping[str, Any], latency_s: float, attempts: int) -> Reply:
        from orchestrator import model_map

        choice = data["choices"][0]
        reasoning, content = reasoning_and_content(choice["message"])
        usage = data.get("usage") if isinstance(data.get("usage"), Mapping) else None
        prompt = _count(_usage_field(usage, "prompt_tokens"))
        completion = _count(_usage_field(usage, "completion_tokens"))
        cached = _cached_tokens(usage)
        return Reply(
            content=self._redact(content),
            reasoning=self._redact(reasoning) if reasoning else None,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cached_tokens=cached,
            cost_usd=model_map.cost_usd(self.name, prompt, completion, cached),
            latency_s=latency_s,
            model=self.name,
            attempts=attempts,
            finish_reason=finish_reason(choice.get("finish_reason")),
            via="direct",
        )

    # ---------------------------------------------------------------------------------------------- call

    def _direct_body(self, wire: list[dict[str, str]]) -> dict[str, Any]:
        """What litellm would send on a direct route (a fresh copy per attempt)."""
        assert self.route is not None
        body: dict[str, Any] = {"model": self.route.wire_model, "messages": copy.deepcopy(wire), "stream": False}
        if self.temperature is not None and self.profile.temperature:
            body["temperature"] = self.temperature
        if self.max_tokens is not None:
            reasoning = self.profile.name == "openai-reasoning"  # o-series and gpt-5: max_completion_tokens
            body["max_completion_tokens" if reasoning else "max_tokens"] = self.max_tokens
        return body

    def _direct_key(self) -> str | None:
        if self._api_key:
            return self._api_key
        assert self.route is not None
        key = next((os.environ[v].strip() for v in PROVIDER_KEY_VARS[self.route.provider]
                    if os.environ.get(v, "").strip()), None)
        return key or (LOCAL_PLACEHOLDER_KEY if needs_no_key(self.name, self.api_base) else None)

    def complete(self, messages: Sequence[Message]) -> Reply:
        wire = to_wire(messages, self.profile)  # raises ConversationError before anything is sent
        self.check_credentials()
        litellm: Any = None
        if self.route is None:
            litellm = _litellm()
        elif self._direct is None:
            _install_log_redaction()  # httpx logs requests too
            try:
                self._direct = DirectClient(self.route, self.timeout_s)
            except TLSSettingsError as exc:
                raise ModelError(f"model {self.name!r}: {exc}") from None
        attempt = 0
        while True:
            attempt += 1
            started = time.monotonic()
            try:
                if litellm is None:
                    assert self._direct is not None
                    response = self._direct.complete(self._direct_body(wire), self._direct_key())
                else:
                    response = litellm.completion(**self._request_kwargs(wire))
            except Exception as exc:
                verdict = _classify(litellm, exc) if litellm is not None else _classify_direct(exc)
                text = self._error_text(exc)
                if verdict is None:
                    raise ModelError(f"model {self.name!r} call failed: {text}") from None
                if verdict.kind == "missing_key":
                    raise MissingAPIKeyError(self.name, self._expected_key_vars(litellm)) from None
                if verdict.kind == "context":
                    raise ContextWindowError(
                        f"model {self.name!r}: context window exceeded: {text}"
                    ) from None
                if verdict.kind == "rejected":
                    raise ProviderRejectedError(
                        f"model {self.name!r} rejected the request (status {verdict.status}): {text}",
                        status=verdict.status,
                    ) from None
                kind: ErrorKind = verdict.kind
                if attempt >= self.max_attempts:
                    raise TransientError(
                        f"model {self.name!r}: gave up after {attempt} attempts; last error ({kind}): {text}",
                        kind=kind,
                        attempts=attempt,
                    ) from None
                wait = self._wait_s(attempt, exc)
                event = RetryEvent(attempt=attempt, kind=kind, wait_s=wait, message=text)
                log.info(
                    "model %s attempt %d failed (%s), retrying in %.2fs: %s",
                    self.name,
                    attempt,
                    kind,
                    wait,
                    text,
                )
                if self.on_retry is not None:
                    self.on_retry(event)
                time.sleep(wait)
                continue
            latency = time.monotonic() - started
            if litellm is None:
                reply = self._direct_reply(response, latency, attempt)
            else:
                reply = self._reply(litellm, response, latency, attempt)
            log.debug("model %s answered in %.2fs after %d attempt(s)", self.name, latency, attempt)
            return reply

    def _expected_key_vars(self, litellm: Any) -> list[str]:
        if litellm is None:
            assert self.route is not None
            return list(PROVIDER_KEY_VARS[self.route.provider])
        try:
            report = litellm.validate_environment(model=self.name, api_base=self.api_base)
            found = [k for k in report.get("missing_keys", []) if is_secret_env_name(k)]
        except Exception:
            found = []
        if not found and "/" in self.name:
            found = [self.name.split("/", 1)[0].upper().replace("-", "_") + "_API_KEY"]
        return found


# --------------------------------------------------------------------------------------------------- scripted


class ScriptedReply(BaseModel):
    """One item of a scripted model's file."""

    model_config = ConfigDict(extra="forbid")

    content: str
    reasoning: str | None = None
    prompt_tokens: int | None = Field(default=None, ge=0)
    completion_tokens: int | None = Field(default=None, ge=0)
    cached_tokens: int | None = Field(default=None, ge=0)
    cost_usd: float | None = Field(default=None, ge=0)
    finish_reason: str = "stop"  # "length" simulates a reply cut at max_tokens


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4)


def load_script(path: Path) -> list[ScriptedReply]:
    """Read a scripted model's replies: YAML/JSON (a list) or JSONL (one item per line); at least one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScriptFormatError(f"scripted model: cannot read {path}: it does not exist") from None
    except IsADirectoryError:
        raise ScriptFormatError(f"scripted model: cannot read {path}: it is a folder, not a file") from None
    except UnicodeDecodeError as exc:
        raise ScriptFormatError(
            f"scripted model: cannot read {path}: it is not UTF-8 text (byte {exc.start})"
        ) from None
    except OSError as exc:
        raise ScriptFormatError(f"scripted model: cannot read {path}: {exc.strerror or exc}") from None
    where: list[str] = []
    items: list[Any]
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        items = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ScriptFormatError(
                    f"scripted model: {path} line {lineno} is not JSON: {exc.msg}"
                ) from None
            where.append(f"line {lineno}")
    else:
        import yaml

        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ScriptFormatError(
                f"scripted model: {path} is not valid YAML/JSON: {_one_line(str(exc))}"
            ) from None
        if loaded is None:
            loaded = []
        if not isinstance(loaded, list):
            raise ScriptFormatError(f"scripted model: {path} must hold a list of replies")
        items = loaded
        where = [f"item {i + 1}" for i in range(len(items))]
    replies: list[ScriptedReply] = []
    for item, place in zip(items, where, strict=True):
        try:
            replies.append(
                ScriptedReply(content=item) if isinstance(item, str) else ScriptedReply.model_validate(item)
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"]) or "item"
            raise ScriptFormatError(f"scripted model: {path} {place}: {loc}: {first['msg']}") from None
    if not replies:
        raise ScriptFormatError(f"scripted model: {path} has no replies")
    return replies


class ScriptedModel:
    """Replies from a file, in order, for the offline demo and tests. Validates with the strictest profile.

    It costs nothing (its price is known: zero). Its context window is unlimited unless `context_tokens` is given;
    then a history whose estimated tokens exceed it is refused with ContextWindowError, as a provider would."""

    def __init__(self, path: Path, *, start_at: int = 0, context_tokens: int | None = None) -> None:
        self.path = Path(path)
        self.name = f"{SCRIPTED_PREFIX}{self.path}"
        self.profile: Profile = STRICTEST_PROFILE
        self.replies = load_script(self.path)
        if start_at < 0:
            raise ValueError("start_at must be >= 0")
        if context_tokens is not None and context_tokens < 1:
            raise ValueError("context_tokens must be at least 1")
        self.context_tokens = context_tokens
        self.used = start_at
        self.calls: list[list[dict[str, str]]] = []  # what each call would have sent, for tests and debugging

    def check_credentials(self) -> None:
        """Nothing to check: a scripted model needs no key (here so callers can treat every model alike)."""

    @property
    def remaining(self) -> int:
        return max(0, len(self.replies) - self.used)

    def context_limit(self) -> int | None:
        return self.context_tokens

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """The same estimate as the prompt_tokens of its replies (a quarter of the characters)."""
        return _estimate_tokens("".join(m["content"] for m in to_wire(messages, self.profile, check=False)))

    def price_known(self) -> bool:
        return True  # it costs nothing

    def complete(self, messages: Sequence[Message]) -> Reply:
        wire = to_wire(messages, self.profile)
        prompt_tokens = _estimate_tokens("".join(m["content"] for m in wire))
        if self.context_tokens is not None and prompt_tokens > self.context_tokens:
            raise ContextWindowError(
                f"scripted model: context window exceeded: the history is about {prompt_tokens} tokens, "
                f"the limit {self.context_tokens}"
            )
        if self.used >= len(self.replies):
            n = len(self.replies)
            raise ScriptExhaustedError(
                f"scripted model: all {n} replies used ({self.path}); the session asked for reply {self.used + 1}"
            )
        item = self.replies[self.used]
        self.used += 1
        self.calls.append(wire)
        completion_text = item.content + (item.reasoning or "")
        return Reply(
            content=redact(item.content),
            reasoning=redact(item.reasoning) if item.reasoning else None,
            prompt_tokens=item.prompt_tokens if item.prompt_tokens is not None else prompt_tokens,
            completion_tokens=(
                item.completion_tokens
                if item.completion_tokens is not None
                else _estimate_tokens(completion_text)
            ),
            cached_tokens=item.cached_tokens or 0,
            cost_usd=item.cost_usd if item.cost_usd is not None else 0.0,
            latency_s=0.0,
            model=self.name,
            attempts=1,
            finish_reason=item.finish_reason,
            via="scripted",
        )


# --------------------------------------------------------------------------------------------------- factory


def make_model(
    name: str,
    *,
    api_base: str | None = None,
    api_key: str | None = None,
    timeout_s: float = 600,
    profile: str | None = None,
    on_retry: Callable[[RetryEvent], None] | None = None,
    **kw: Any,
) -> Model:
    """`scripted:PATH` -> ScriptedModel (kw: start_at, context_tokens); anything else -> ProviderModel (kw: its other
    options). Either is checked as it is made: an unusable script, or an unknown profile, is one clear error."""
    if name.startswith(SCRIPTED_PREFIX):
        if profile:
            profile_for(
                name, profile
            )  # the scripted model always uses the strictest, but a bogus name is an error
        path = name[len(SCRIPTED_PREFIX) :]
        if not path.strip():
            raise ScriptFormatError("scripted model: give a file, as scripted:PATH")
        try:
            where = Path(path).expanduser()
        except RuntimeError:  # "~someone/..." for a user this machine does not know
            raise ScriptFormatError(f"scripted model: cannot read {path}: it does not exist") from None
        return ScriptedModel(
            where, start_at=int(kw.get("start_at", 0)), context_tokens=kw.get("context_tokens")
        )
    kw.pop("start_at", None)
    return ProviderModel(
        name,
        api_base=api_base,
        api_key=api_key,
        timeout_s=timeout_s,
        profile=profile,
        on_retry=on_retry,
        **kw,
    )
