"""ProviderModel against the fake provider (tests/fake_provider.py) on 127.0.0.1, every test twice: with the
default client (deepseek/ and openai/ with an api_base posted directly, without litellm) and with every call
through litellm's real HTTP path (`client="litellm"`): both must behave the same."""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from orchestrator import models
from orchestrator.conversation import Message, append
from orchestrator.models import (
    PROVIDER_KEY_VARS,
    ContextWindowError,
    MissingAPIKeyError,
    ProviderModel,
    ProviderRejectedError,
    RetryEvent,
    TransientError,
)

if TYPE_CHECKING:
    from tests.conftest import FakeProvider

KEY = "sk-test-0123456789abcdefXYZ"
DEEPSEEK = "deepseek/deepseek-reasoner"
UNKNOWN_OPENAI = "openai/fake-local-model"
ROUTES = [DEEPSEEK, UNKNOWN_OPENAI]
FAST = {"backoff_base_s": 0.01, "backoff_max_s": 0.05}

StartFake = Callable[..., "FakeProvider"]


@pytest.fixture(autouse=True, params=["auto", "litellm"])
def model_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The client every ProviderModel of this module is made with (this module's name for the class is bound to
    the class with that client)."""
    monkeypatch.setitem(globals(), "ProviderModel", functools.partial(models.ProviderModel, client=request.param))
    return str(request.param)


def history(*texts: str) -> list[Message]:
    """system, then user/assistant alternating over `texts` (starting with user)."""
    msgs = [Message(role="system", content="You edit experiment.py.")]
    for i, text in enumerate(texts):
        msgs.append(Message(role="user" if i % 2 == 0 else "assistant", content=text))
    return msgs


def model(name: str, fake: FakeProvider, **kw: Any) -> ProviderModel:
    kw.setdefault("api_key", KEY)
    kw.setdefault("timeout_s", 10)
    return ProviderModel(name, api_base=fake.url, **{**FAST, **kw})


# --------------------------------------------------------------------------------------------------- routes


def test_deepseek_route_reads_reasoning_usage_cache_hits_and_cost(fake_provider: StartFake) -> None:
    import litellm

    fake = fake_provider(
        [
            {
                "content": "PLAN",
                "reasoning": "thinking",
                "prompt_tokens": 100,
                "completion_tokens": 20,
                "cached_tokens": 40,
            }
        ],
        api_key=KEY,
    )
    reply = model(DEEPSEEK, fake, temperature=0.7).complete(history("go"))
    assert reply.content == "PLAN"
    assert reply.reasoning == "thinking"
    assert (reply.prompt_tokens, reply.completion_tokens, reply.cached_tokens) == (100, 20, 40)
    price = litellm.model_cost["deepseek/deepseek-reasoner"]
    expected = (
        60 * price["input_cost_per_token"]
        + 40 * price["cache_read_input_token_cost"]
        + 20 * price["output_cost_per_token"]
    )
    assert reply.cost_usd == pytest.approx(expected)
    assert reply.model == DEEPSEEK and reply.attempts == 1 and reply.latency_s > 0
    (req,) = fake.requests()
    assert (
        req["path"] == "/v1/chat/completions"
    )  # litellm's deepseek route posts api_base + /chat/completions
    assert req["model"] == "deepseek-reasoner"
    assert not req["temperature_sent"]  # the reasoner profile takes no temperature
    assert [m["role"] for m in req["messages"]] == ["system", "user"]


@pytest.mark.parametrize("name", ROUTES)
def test_deepseek_native_cache_hit_fields_are_counted(fake_provider: StartFake, name: str) -> None:
    fake = fake_provider(
        [
            {
                "content": "x",
                "prompt_tokens": 50,
                "completion_tokens": 5,
                "cached_tokens": 30,
                "usage_fields": "deepseek",
            }
        ],
        api_key=KEY,
    )
    reply = model(name, fake).complete(history("go"))
    assert reply.cached_tokens == 30


def test_unknown_openai_model_gives_tokens_and_no_cost(fake_provider: StartFake) -> None:
    fake = fake_provider([{"content": "hi", "prompt_tokens": 12, "completion_tokens": 3}], api_key=KEY)
    reply = model(UNKNOWN_OPENAI, fake, temperature=0.2).complete(history("go"))
    assert (reply.prompt_tokens, reply.completion_tokens, reply.cost_usd) == (12, 3, None)
    (req,) = fake.requests()
    assert req["path"] == "/v1/chat/completions"
    assert req["model"] == "fake-local-model"
    assert req["temperature_sent"] and req["temperature"] == 0.2


def test_openai_reasoning_model_gets_a_developer_message_and_no_temperature(fake_provider: StartFake) -> None:
    fake = fake_provider(["ok"], api_key=KEY)
    model("openai/o3-mini", fake, temperature=0.2).complete(history("go"))
    (req,) = fake.requests()
    assert [m["role"] for m in req["messages"]] == ["developer", "user"]
    assert not req["temperature_sent"]


def test_profile_override_changes_what_is_sent(fake_provider: StartFake) -> None:
    fake = fake_provider(["ok"], api_key=KEY)
    model(UNKNOWN_OPENAI, fake, temperature=0.2, profile="no-system").complete(history("go"))
    (req,) = fake.requests()
    assert [m["role"] for m in req["messages"]] == ["user"]
    assert req["messages"][0]["content"] == "You edit experiment.py.\n\ngo"
    assert not req["temperature_sent"]


@pytest.mark.parametrize("name", ROUTES)
def test_reasoning_is_kept_in_the_reply_but_never_sent_back(fake_provider: StartFake, name: str) -> None:
    fake = fake_provider([{"content": "first", "reasoning": "hidden thoughts"}, "second"], api_key=KEY)
    m = model(name, fake)
    msgs = history("go")
    reply = m.complete(msgs)
    msgs = append(msgs, "assistant", reply.content, reply.reasoning)
    msgs = append(msgs, "user", "Run 1 ok")
    assert msgs[2].reasoning_content == "hidden thoughts"
    assert m.complete(msgs).content == "second"  # the fake answers 400 to any reasoning_content sent back
    second = fake.requests()[1]
    assert second["status"] == 200
    assert all("reasoning_content" not in msg for msg in second["messages"])


# --------------------------------------------------------------------------------------------------- seed


def seed_history(transcript: str) -> list[dict[str, str]]:
    """The message list the old loop built in the seed: user blocks (####), the assistant's reply, and one user
    message per 'Run failed', each appended behind the previous one (tool output lines '> ' end a message)."""
    blocks: list[list[Any]] = []
    boundary = True
    for line in transcript.splitlines():
        if line.startswith("# aider chat started"):
            continue
        if line.startswith("> ") or line.rstrip() == ">":  # aider's tool output, not ">>>>>>> REPLACE"
            boundary = True
            continue
        role = "user" if line.startswith("####") else "assistant"
        text = line[5:] if role == "user" else line
        if not line.strip():
            if blocks:
                blocks[-1][1].append("")
            continue
        if boundary or blocks[-1][0] != role:
            blocks.append([role, []])
            boundary = False
        blocks[-1][1].append(text)
    system = {"role": "system", "content": "Act as an expert ML researcher and software developer."}
    return [system] + [{"role": r, "content": "\n".join(lines).strip()} for r, lines in blocks]


def test_seed_history_is_rejected_raw_and_accepted_after_normalise(
    fake_provider: StartFake, seed_transcript: str
) -> None:
    import litellm

    raw = seed_history(seed_transcript)
    roles = [m["role"] for m in raw]
    assert roles[:4] == ["system", "user", "assistant", "user"] and roles[4:] == ["user"] * 8
    assert all("Run failed" in m["content"] for m in raw[3:])

    fake = fake_provider(["<<<<<<< SEARCH fixed"], api_key=KEY)
    with pytest.raises(litellm.BadRequestError) as excinfo:
        litellm.completion(
            model=DEEPSEEK, messages=raw, api_base=fake.url, api_key=KEY, timeout=10, max_retries=0
        )
    seed_error = re.search(
        r"'message': '(deepseek-reasoner does not support successive[^']*)'", seed_transcript
    )
    assert seed_error is not None
    expected = seed_error.group(1).replace("messages[7] and messages[8]", "messages[3] and messages[4]")
    assert expected in str(excinfo.value)  # word for word the provider's answer in the seed

    history_in = [Message(role=m["role"], content=m["content"]) for m in raw]  # type: ignore[arg-type]
    reply = model(DEEPSEEK, fake).complete(history_in)
    assert reply.content == "<<<<<<< SEARCH fixed"
    rejected, accepted = fake.requests()
    assert rejected["status"] == 400 and accepted["status"] == 200
    assert [m["role"] for m in accepted["messages"]] == ["system", "user", "assistant", "user"]
    assert accepted["messages"][3]["content"].count("Run failed") == 9
    assert history_in == [Message(role=m["role"], content=m["content"]) for m in raw]  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------------- retries


@pytest.mark.parametrize("name", ROUTES)
def test_two_server_errors_then_success_resend_the_same_history_once(
    fake_provider: StartFake, name: str
) -> None:
    fake = fake_provider(
        {"replies": ["fixed"], "faults": {"1": {"status": 500}, "2": {"status": 500}}}, api_key=KEY
    )
    events: list[RetryEvent] = []
    msgs = history("go", "edit 1", "Run failed: CUDA OOM")
    before = list(msgs)
    reply = model(name, fake, on_retry=events.append).complete(msgs)
    assert reply.content == "fixed" and reply.attempts == 3
    assert msgs == before  # the caller's history is untouched
    reqs = fake.requests()
    assert [r["status"] for r in reqs] == [500, 500, 200]
    assert reqs[0]["messages"] == reqs[1]["messages"] == reqs[2]["messages"]
    pending = [m for m in reqs[2]["messages"] if "Run failed: CUDA OOM" in m["content"]]
    assert len(pending) == 1 and pending[0]["content"].count("Run failed: CUDA OOM") == 1
    assert [(e.attempt, e.kind) for e in events] == [(1, "server_error"), (2, "server_error")]


def test_rate_limit_retry_after_is_honoured(fake_provider: StartFake) -> None:
    fake = fake_provider({"replies": ["ok"], "faults": {"1": {"status": 429, "retry_after": 1}}}, api_key=KEY)
    events: list[RetryEvent] = []
    reply = model(DEEPSEEK, fake, on_retry=events.append).complete(history("go"))
    assert reply.content == "ok"
    assert len(events) == 1 and events[0].kind == "rate_limit" and events[0].wait_s >= 1.0
    first, second = fake.requests()
    assert second["ts"] - first["ts"] >= 0.95  # backoff alone would have waited at most 0.05 s


@pytest.mark.parametrize("name", ROUTES)
def test_a_hang_past_the_timeout_is_retried(fake_provider: StartFake, name: str) -> None:
    fake = fake_provider({"replies": ["ok"], "faults": {"1": {"hang_s": 5}}}, api_key=KEY)
    events: list[RetryEvent] = []
    reply = model(name, fake, timeout_s=0.5, on_retry=events.append).complete(history("go"))
    assert reply.content == "ok" and reply.attempts == 2
    assert [e.kind for e in events] == ["timeout"]


@pytest.mark.parametrize("name", ROUTES)
def test_a_dropped_connection_is_retried(fake_provider: StartFake, name: str) -> None:
    fake = fake_provider({"replies": ["ok"], "faults": {"1": {"drop": True}}}, api_key=KEY)
    events: list[RetryEvent] = []
    reply = model(name, fake, on_retry=events.append).complete(history("go"))
    assert reply.content == "ok"
    assert [e.kind for e in events] == ["connection"]
    assert [r["status"] for r in fake.requests()] == ["drop", 200]


@pytest.mark.parametrize("name", ROUTES)
def test_a_bad_request_is_not_retried_and_says_what_the_provider_said(
    fake_provider: StartFake, name: str
) -> None:
    fake = fake_provider(
        {"replies": ["ok"], "faults": {"1": {"status": 400, "message": "unknown field 'foo'"}}}
    )
    with pytest.raises(ProviderRejectedError, match="unknown field 'foo'") as excinfo:
        model(name, fake).complete(history("go"))
    assert excinfo.value.status == 400
    assert "\n" not in str(excinfo.value)
    assert len(fake.requests()) == 1


def test_a_wrong_key_is_not_retried(fake_provider: StartFake) -> None:
    fake = fake_provider(["ok"], api_key=KEY)
    with pytest.raises(ProviderRejectedError) as excinfo:
        model(DEEPSEEK, fake, api_key="sk-wrong-key-000000000000").complete(history("go"))
    assert excinfo.value.status == 401
    assert len(fake.requests()) == 1


@pytest.mark.parametrize("name", ROUTES)
def test_context_window_overflow_has_its_own_error(fake_provider: StartFake, name: str) -> None:
    message = "This model's maximum context length is 65536 tokens. However, you requested 70000 tokens."
    fake = fake_provider(
        {"replies": ["ok"], "faults": {"1": {"status": 400, "message": message}}}, api_key=KEY
    )
    with pytest.raises(ContextWindowError, match="maximum context length"):
        model(name, fake).complete(history("go"))
    assert len(fake.requests()) == 1


def test_persistent_server_errors_give_up_after_max_attempts(fake_provider: StartFake) -> None:
    faults = {str(i): {"status": 503} for i in range(1, 10)}
    fake = fake_provider({"replies": ["ok"], "faults": faults}, api_key=KEY)
    with pytest.raises(TransientError, match="gave up after 3 attempts") as excinfo:
        model(DEEPSEEK, fake, max_attempts=3).complete(history("go"))
    assert excinfo.value.kind == "server_error" and excinfo.value.attempts == 3
    assert len(fake.requests()) == 3


def test_connection_refused_is_retried_then_reported(fake_provider: StartFake) -> None:
    fake = fake_provider(["ok"])
    url = fake.url
    fake.stop()
    events: list[RetryEvent] = []
    m = ProviderModel(
        UNKNOWN_OPENAI, api_base=url, api_key=KEY, max_attempts=2, on_retry=events.append, **FAST
    )
    with pytest.raises(TransientError) as excinfo:
        m.complete(history("go"))
    assert excinfo.value.kind == "connection" and [e.kind for e in events] == ["connection"]


def test_an_invalid_history_is_refused_before_anything_is_sent(fake_provider: StartFake) -> None:
    fake = fake_provider(["ok"], api_key=KEY)
    with pytest.raises(ValueError, match="last-user"):
        model(DEEPSEEK, fake).complete(history("go", "an answer"))
    assert fake.requests() == []


# --------------------------------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    ("name", "var"), [(DEEPSEEK, "DEEPSEEK_API_KEY")]
)  # openai/: see the local tests below
def test_missing_api_key_names_the_variable_and_sends_nothing(
    fake_provider: StartFake, monkeypatch: pytest.MonkeyPatch, name: str, var: str
) -> None:
    monkeypatch.delenv(var, raising=False)
    fake = fake_provider(["ok"])
    m = ProviderModel(name, api_base=fake.url, **FAST)
    with pytest.raises(MissingAPIKeyError, match=var) as excinfo:
        m.check_credentials()
    assert "\n" not in str(excinfo.value)
    with pytest.raises(MissingAPIKeyError, match=var):
        m.complete(history("go"))
    assert fake.requests() == []


def test_key_from_the_environment_is_used(fake_provider: StartFake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPSEEK_API_KEY", KEY)
    fake = fake_provider(["ok"], api_key=KEY)
    m = ProviderModel(DEEPSEEK, api_base=fake.url, **FAST)
    m.check_credentials()
    assert m.complete(history("go")).content == "ok"


def test_the_key_never_appears_in_anything_the_model_layer_writes(
    fake_provider: StartFake,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    secret = "plain-secret-value-7f3a9c"  # not key-shaped: only the environment says it is a secret
    monkeypatch.setenv("DEEPSEEK_API_KEY", secret)
    caplog.set_level(logging.DEBUG)
    plan = {
        "replies": [{"content": f"echo {secret}", "reasoning": f"the key is {secret}"}],
        "faults": {
            "1": {"status": 500, "message": f"upstream saw key {secret}"},
            "2": {"status": 400, "message": f"bad request for key {secret}"},
        },
    }
    fake = fake_provider(plan, api_key=secret)
    events: list[RetryEvent] = []
    m = ProviderModel(DEEPSEEK, api_base=fake.url, on_retry=events.append, **FAST)
    with pytest.raises(ProviderRejectedError) as excinfo:
        m.complete(history("go"))
    reply = m.complete(history("go"))
    written = [
        str(excinfo.value),
        repr(excinfo.value),
        reply.model_dump_json(),
        *(e.model_dump_json() for e in events),
        caplog.text,
        *capfd.readouterr(),
        repr(m),
    ]
    assert [r["status"] for r in fake.requests()] == [500, 400, 200]  # the key really was sent and accepted
    assert "bad request for key [REDACTED]" in str(excinfo.value)
    assert reply.content == "echo [REDACTED]"
    assert events and "[REDACTED]" in events[0].message
    for text in written:
        assert secret not in text


# --------------------------------------------------------------------------------------------------- hardening


def test_a_retry_after_that_is_not_a_number_falls_back_to_backoff(fake_provider: StartFake) -> None:
    fake = fake_provider(
        {"replies": ["ok"], "faults": {"1": {"status": 429, "retry_after": "1.5s"}}}, api_key=KEY
    )
    events: list[RetryEvent] = []
    reply = model(DEEPSEEK, fake, on_retry=events.append).complete(history("go"))
    assert reply.content == "ok" and reply.attempts == 2
    assert [e.kind for e in events] == ["rate_limit"]
    assert events[0].wait_s <= FAST["backoff_max_s"]  # the unreadable header is ignored, backoff decides


class _Asked(Exception):
    """An error carrying response headers, as litellm's exceptions do (litellm_response_headers)."""

    def __init__(self, headers: dict[str, str]) -> None:
        super().__init__("429")
        self.litellm_response_headers = headers


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "1.5"}, 1.5),
        ({"retry-after": "2"}, 2.0),
        ({"Retry-After": "-3"}, 0.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after-ms": "soon", "Retry-After": "4"}, 4.0),
        ({"Retry-After": "1.5s"}, None),
        ({"Retry-After": "soon"}, None),
        ({"Retry-After": ""}, None),
        ({"Retry-After": "nan"}, None),
        ({"Retry-After": "inf"}, None),
        ({}, None),
    ],
)
def test_retry_after_header_values(headers: dict[str, str], expected: float | None) -> None:
    from orchestrator.models import retry_after_s

    assert retry_after_s(_Asked(headers)) == (None if expected is None else pytest.approx(expected))


def test_retry_after_as_an_http_date() -> None:
    import email.utils
    import time as _time

    from orchestrator.models import retry_after_s

    when = email.utils.formatdate(_time.time() + 30, usegmt=True)
    assert 25 <= (retry_after_s(_Asked({"Retry-After": when})) or 0) <= 31
    naive = when.removesuffix(" GMT")  # no zone: HTTP dates are GMT, whatever the machine's zone
    assert 25 <= (retry_after_s(_Asked({"Retry-After": naive})) or 0) <= 31
    past = email.utils.formatdate(_time.time() - 30, usegmt=True)
    assert retry_after_s(_Asked({"Retry-After": past})) == 0.0


def test_a_reply_with_unpaired_surrogates_is_safe_to_write(fake_provider: StartFake, tmp_path: Any) -> None:
    fake = fake_provider([{"content": "bad \ud800 byte", "reasoning": "half \udfff pair"}], api_key=KEY)
    reply = model(UNKNOWN_OPENAI, fake).complete(history("go"))
    assert reply.content == "bad \ufffd byte"
    assert reply.reasoning == "half \ufffd pair"
    (tmp_path / "journal.jsonl").write_text(reply.model_dump_json() + "\n", encoding="utf-8")
    assert "\ufffd" in (tmp_path / "journal.jsonl").read_text(encoding="utf-8")


@pytest.mark.parametrize("name", ROUTES)
def test_a_reply_cut_at_max_tokens_says_so(fake_provider: StartFake, name: str) -> None:
    fake = fake_provider([{"content": "half a plan", "finish_reason": "length"}, "whole"], api_key=KEY)
    m = model(name, fake, max_tokens=5)
    assert m.complete(history("go")).finish_reason == "length"
    assert m.complete(history("go")).finish_reason == "stop"


def test_the_missing_key_message_says_which_variable_to_export(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    with pytest.raises(MissingAPIKeyError) as excinfo:
        ProviderModel(DEEPSEEK).check_credentials()
    text = str(excinfo.value)
    assert "--api-key" not in text  # no such flag
    assert "export DEEPSEEK_API_KEY=" in text and "\n" not in text


def test_a_hosted_openai_route_still_needs_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    m = ProviderModel(UNKNOWN_OPENAI, api_base="https://llm.example.invalid/v1", **FAST)
    with pytest.raises(MissingAPIKeyError, match="export OPENAI_API_KEY="):
        m.check_credentials()
    with pytest.raises(MissingAPIKeyError):
        m.complete(history("go"))  # refused before any network


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_a_local_openai_compatible_server_needs_no_key(
    fake_provider: StartFake, monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    fake = fake_provider(["ok"])  # checks no key
    m = ProviderModel(UNKNOWN_OPENAI, api_base=fake.url.replace("127.0.0.1", host), **FAST)
    m.check_credentials()
    assert m.complete(history("go")).content == "ok"
    (req,) = fake.requests()
    assert req["authorization"] == "Bearer sk-no-key-needed"  # a placeholder, never a real key


def test_a_local_server_gets_the_real_key_when_there_is_one(
    fake_provider: StartFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    fake = fake_provider(["ok"], api_key=KEY)
    assert ProviderModel(UNKNOWN_OPENAI, api_base=fake.url, **FAST).complete(history("go")).content == "ok"


def test_a_local_deepseek_route_still_needs_its_key(
    fake_provider: StartFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("DEEPSEEK_API_KEY", raising=False)
    fake = fake_provider(["ok"])
    with pytest.raises(MissingAPIKeyError, match="DEEPSEEK_API_KEY"):
        ProviderModel(DEEPSEEK, api_base=fake.url, **FAST).check_credentials()


def test_price_is_known_for_mapped_models_only() -> None:
    assert ProviderModel("deepseek/deepseek-chat").price_known()
    assert not ProviderModel("openai/my-local-model").price_known()


def test_context_limit_comes_from_litellms_map_or_the_caller() -> None:
    import litellm

    expected = litellm.get_model_info("deepseek/deepseek-chat")["max_input_tokens"]
    assert expected and ProviderModel("deepseek/deepseek-chat").context_limit() == expected
    assert ProviderModel("openai/my-local-model").context_limit() is None
    assert ProviderModel("openai/my-local-model", context_tokens=32_000).context_limit() == 32_000


@pytest.mark.parametrize("name", ["deepseek/deepseek-chat", UNKNOWN_OPENAI, "ollama/llama-3-8b"])
def test_count_tokens_counts_what_would_be_sent(name: str) -> None:
    m = ProviderModel(name)
    short = m.count_tokens(history("go"))
    long = m.count_tokens(history("go " * 2000))
    assert 0 < short < long
    assert 1500 <= long - short <= 2500  # about one token per "go "
    assert m.count_tokens(history("go", "an answer")) > short  # counting never validates


def test_a_history_too_long_for_the_provider_is_tightened_until_it_fits(fake_provider: StartFake) -> None:
    from orchestrator.conversation import apply_trim, tighten
    from tests.test_conversation import long_history

    msgs = long_history()
    full = sum(len(m.content) for m in msgs) // 4
    fake = fake_provider({"replies": ["fits"], "context_limit": full // 3}, api_key=KEY)
    m = model(UNKNOWN_OPENAI, fake)
    trim = None
    for _ in range(12):
        try:
            reply = m.complete(apply_trim(msgs, trim) if trim else msgs)
            break
        except ContextWindowError:
            trim = tighten(msgs, trim)
            assert trim is not None
    else:
        pytest.fail("never fitted")
    assert reply.content == "fits"
    reqs = fake.requests()
    assert [r["status"] for r in reqs][-1] == 200 and len(reqs) <= 6
    sent = reqs[-1]["messages"]
    assert sent[0]["content"] == msgs[0].content and sent[1]["content"] == msgs[1].content
    assert sent[-1]["content"] == msgs[-1].content


def test_a_history_fitted_ahead_of_time_goes_through_first_time(fake_provider: StartFake) -> None:
    from orchestrator.conversation import apply_trim, fit
    from tests.test_conversation import long_history

    msgs = long_history()
    m = model(UNKNOWN_OPENAI, fake_provider({"replies": ["fits"], "rules": "none"}, api_key=KEY))
    full = m.count_tokens(msgs)
    limit = full // 2
    trim = fit(msgs, m.count_tokens, limit)
    assert m.count_tokens(apply_trim(msgs, trim)) <= limit
    assert m.complete(apply_trim(msgs, trim)).content == "fits"


def test_a_real_key_never_reaches_the_fake_providers_log(
    fake_provider: StartFake, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    fake = fake_provider(["ok"])
    ProviderModel(UNKNOWN_OPENAI, api_base=fake.url, **FAST).complete(history("go"))
    (req,) = fake.requests()
    assert req["authorization"] == "(a key)" and KEY not in fake.log_path.read_text()


# --------------------------------------------------------------------------------------------------- start-up


@pytest.mark.parametrize("provider", sorted(PROVIDER_KEY_VARS))
def test_the_key_table_asks_for_what_litellm_asks_for(monkeypatch: pytest.MonkeyPatch, provider: str) -> None:
    """Keys of the providers in PROVIDER_KEY_VARS are checked without litellm: the table must agree with litellm's
    own check, both ways (no key: both refuse, naming the same variables; any one of them: both accept)."""
    import litellm

    names = PROVIDER_KEY_VARS[provider]
    name = f"{provider}/some-model"
    for var in names:
        monkeypatch.delenv(var, raising=False)
    asked = litellm.validate_environment(model=name)
    assert not asked["keys_in_environment"] and set(asked["missing_keys"]) == set(names)
    with pytest.raises(MissingAPIKeyError) as excinfo:
        ProviderModel(name).check_credentials()
    assert excinfo.value.env_vars == list(names)
    for var in names:
        monkeypatch.setenv(var, KEY)
        assert litellm.validate_environment(model=name)["keys_in_environment"]
        ProviderModel(name).check_credentials()
        monkeypatch.delenv(var)


@pytest.mark.parametrize("name", ["gpt4o", "claude-sonnet", "no-such-provider/model"])
def test_a_name_litellm_cannot_place_is_one_clear_error(name: str) -> None:
    from orchestrator.models import UnknownModelError

    with pytest.raises(UnknownModelError) as excinfo:
        ProviderModel(name).check_credentials()
    assert "\n" not in str(excinfo.value) and "provider/model" in str(excinfo.value)


@pytest.mark.parametrize("host", ["192.168.1.20", "10.0.0.5", "172.16.3.4", "[fd00::1]"])
def test_a_server_on_the_local_network_needs_no_key(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ProviderModel(UNKNOWN_OPENAI, api_base=f"http://{host}:8000/v1").check_credentials()


@pytest.fixture
def no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """No provider key, no OpenAI base URL and no CA bundle setting in the environment."""
    for var in {v for names in PROVIDER_KEY_VARS.values() for v in names}:
        monkeypatch.delenv(var, raising=False)
    for var in ("OPENAI_API_BASE", "OPENAI_BASE_URL", "SSL_CERT_FILE", "SSL_VERIFY"):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.usefixtures("no_keys")
def test_a_known_providers_key_is_checked_without_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """`launch` checks the key of a provider of PROVIDER_KEY_VARS before making the model: the same answers as
    ProviderModel.check_credentials, and False (litellm must judge) for anything else."""
    from orchestrator import credentials
    from orchestrator.credentials import check_known_provider

    assert models.MissingAPIKeyError is credentials.MissingAPIKeyError  # what the CLI catches, from either module
    assert models.PROVIDER_KEY_VARS is credentials.PROVIDER_KEY_VARS
    for direct in (True, False):
        with pytest.raises(MissingAPIKeyError, match="DEEPSEEK_API_KEY") as excinfo:
            check_known_provider("deepseek/deepseek-chat", None, direct)
        assert "\n" not in str(excinfo.value) and excinfo.value.env_vars == ["DEEPSEEK_API_KEY"]
        assert check_known_provider("deepseek/deepseek-chat", None, direct, api_key=KEY)
        assert check_known_provider("openai/x", "http://127.0.0.1:9/v1", direct)  # a local server checks no key
        with pytest.raises(MissingAPIKeyError, match="OPENAI_API_KEY"):
            check_known_provider("openai/x", "https://llm.example.invalid/v1", direct)
        with pytest.raises(MissingAPIKeyError, match="GEMINI_API_KEY .*GOOGLE_API_KEY"):
            check_known_provider("gemini/gemini-pro", None, direct)
        for unjudged in ("somecorp/x", "deepseek/", "deepseek/  ", "gpt4o", "scripted:/tmp/replies.json"):
            assert check_known_provider(unjudged, None, direct) is False, unjudged
    monkeypatch.setenv("DEEPSEEK_API_KEY", "   ")  # blank is missing
    with pytest.raises(MissingAPIKeyError, match="DEEPSEEK_API_KEY"):
        check_known_provider("deepseek/deepseek-chat", None, True)
    monkeypatch.setenv("DEEPSEEK_API_KEY", KEY)
    assert check_known_provider("deepseek/deepseek-chat", None, True)
    monkeypatch.setenv("GOOGLE_API_KEY", KEY)  # any one of a provider's variables
    assert check_known_provider("gemini/gemini-pro", None, False)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://localhost:8000/v1")  # a local server named by the environment
    assert check_known_provider("openai/x", None, False)


@pytest.mark.usefixtures("no_keys")
def test_a_ca_bundle_that_is_a_folder_is_refused_with_the_key_only_on_a_direct_route(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from orchestrator.credentials import check_known_provider
    from orchestrator.direct import TLSSettingsError

    monkeypatch.setenv("DEEPSEEK_API_KEY", KEY)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path))
    with pytest.raises(TLSSettingsError, match=re.escape(str(tmp_path))):
        check_known_provider("deepseek/deepseek-chat", None, direct=True)
    assert check_known_provider("deepseek/deepseek-chat", None, direct=False)  # litellm reads the bundle its way
    with pytest.raises(TLSSettingsError):
        check_known_provider("openai/x", "http://127.0.0.1:9/v1", direct=True)
    assert check_known_provider("somecorp/x", None, direct=True) is False  # not judged here, TLS neither


def test_the_warm_up_sends_nothing_and_the_first_call_then_works(
    fake_provider: StartFake, monkeypatch: pytest.MonkeyPatch, model_client: Any
) -> None:
    monkeypatch.setattr(models, "_WARM_UP", None)
    monkeypatch.setenv("DEEPSEEK_API_KEY", KEY)
    fake = fake_provider(["ok"], api_key=KEY)
    models.start_warm_up("deepseek/deepseek-chat", fake.url, model_client)
    warm = models._WARM_UP
    assert warm is not None
    m = ProviderModel("deepseek/deepseek-chat", api_base=fake.url, **FAST)
    assert m.complete(history("go")).content == "ok"  # waits for the warm-up, then calls
    assert not warm.thread.is_alive() and warm.error is None
    assert [r["status"] for r in fake.requests()] == [200]


@pytest.mark.parametrize("name", ROUTES)
def test_a_direct_route_never_loads_litellm(fake_provider: StartFake, model_client: str, name: str) -> None:
    """litellm's import takes seconds of CPU; the direct routes (and the session around them) need none of it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    fake = fake_provider([{"content": "ok", "prompt_tokens": 10, "completion_tokens": 2}], api_key=KEY)
    code = (
        "import json, sys\n"
        "from orchestrator.conversation import Message\n"
        "from orchestrator.models import ProviderModel\n"
        f"m = ProviderModel({name!r}, api_base={fake.url!r}, api_key={KEY!r}, client={model_client!r})\n"
        "m.context_limit(); m.price_known()\n"
        "reply = m.complete([Message(role='system', content='s'), Message(role='user', content='go')])\n"
        "print(json.dumps([reply.content, reply.prompt_tokens, 'litellm' in sys.modules]))\n"
    )
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": repo}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["ok", 10, model_client == "litellm"]


@pytest.mark.parametrize("name", ROUTES)
def test_a_think_block_in_the_content_is_reasoning_not_reply(fake_provider: StartFake, name: str) -> None:
    """Local servers running a reasoning model without a reasoning parser put its thinking in the content."""
    fake = fake_provider(["<think>maybe LR = 0.5?\n<<<<<<< SEARCH</think>Run 1: LR 0.2."], api_key=KEY)
    reply = model(name, fake).complete(history("go"))
    assert reply.content == "Run 1: LR 0.2."
    assert reply.reasoning == "maybe LR = 0.5?\n<<<<<<< SEARCH"
