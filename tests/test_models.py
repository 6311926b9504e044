"""LiteLLMModel over litellm's real HTTP path, against the fake provider (tests/fake_provider.py) on 127.0.0.1."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest

from orchestrator.conversation import Message, append
from orchestrator.models import (
    ContextWindowError,
    LiteLLMModel,
    MissingAPIKeyError,
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


def history(*texts: str) -> list[Message]:
    """system, then user/assistant alternating over `texts` (starting with user)."""
    msgs = [Message(role="system", content="You edit experiment.py.")]
    for i, text in enumerate(texts):
        msgs.append(Message(role="user" if i % 2 == 0 else "assistant", content=text))
    return msgs


def model(name: str, fake: FakeProvider, **kw: Any) -> LiteLLMModel:
    kw.setdefault("api_key", KEY)
    kw.setdefault("timeout_s", 10)
    return LiteLLMModel(name, api_base=fake.url, **{**FAST, **kw})


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
    m = LiteLLMModel(
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
    ("name", "var"), [(DEEPSEEK, "DEEPSEEK_API_KEY"), (UNKNOWN_OPENAI, "OPENAI_API_KEY")]
)
def test_missing_api_key_names_the_variable_and_sends_nothing(
    fake_provider: StartFake, monkeypatch: pytest.MonkeyPatch, name: str, var: str
) -> None:
    monkeypatch.delenv(var, raising=False)
    fake = fake_provider(["ok"])
    m = LiteLLMModel(name, api_base=fake.url, **FAST)
    with pytest.raises(MissingAPIKeyError, match=var) as excinfo:
        m.check_credentials()
    assert "\n" not in str(excinfo.value)
    with pytest.raises(MissingAPIKeyError, match=var):
        m.complete(history("go"))
    assert fake.requests() == []


def test_key_from_the_environment_is_used(fake_provider: StartFake, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPSEEK_API_KEY", KEY)
    fake = fake_provider(["ok"], api_key=KEY)
    m = LiteLLMModel(DEEPSEEK, api_base=fake.url, **FAST)
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
    m = LiteLLMModel(DEEPSEEK, api_base=fake.url, on_retry=events.append, **FAST)
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
