from __future__ import annotations

import pytest

from orchestrator.secrets import REDACTED, is_secret_env_name, redact, redact_obj


@pytest.mark.parametrize(
    "name",
    [
        "DEEPSEEK_API_KEY",
        "OPENAI_API_KEY",
        "HF_TOKEN",
        "GITHUB_TOKEN",
        "MY_SECRET",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_ACCESS_KEY_ID",
        "AWS_SESSION_TOKEN",
        "LITELLM_MASTER_KEY",
        "DB_PASSWORD",
        "anthropic_api_key",
    ],
)
def test_secret_names_are_recognised(name: str) -> None:
    assert is_secret_env_name(name)


@pytest.mark.parametrize(
    "name", ["PATH", "HOME", "OPENAI_API_BASE", "CUDA_VISIBLE_DEVICES", "TOKENIZERS_PARALLELISM"]
)
def test_ordinary_names_are_not_secret(name: str) -> None:
    assert not is_secret_env_name(name)


def test_values_of_secret_variables_are_redacted_wherever_they_appear() -> None:
    env = {"DEEPSEEK_API_KEY": "plain-looking-value-1234", "HOME": "/home/someone-long-name"}
    text = "request failed with key plain-looking-value-1234 (home /home/someone-long-name)"
    out = redact(text, env)
    assert "plain-looking-value-1234" not in out
    assert out.count(REDACTED) == 1
    assert "/home/someone-long-name" in out  # not a secret variable


def test_short_secret_values_are_left_alone() -> None:
    # A 3-character "secret" would blank out ordinary words everywhere.
    assert redact("the abc module", {"X_TOKEN": "abc"}) == "the abc module"


def test_environment_is_the_default_source(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOME_SERVICE_API_KEY", "value-from-the-environment")
    assert "value-from-the-environment" not in redact("x value-from-the-environment y")


@pytest.mark.parametrize(
    "secret",
    [
        "sk-abcdefghijklmnopqrstuvwx",
        "sk-ant-api03-AbCdEfGhIjKlMnOpQrStUv",
        "sk-proj-1234567890abcdefghij",
        "ghp_abcdefghijklmnopqrstuvwxyz0123",
        "github_pat_11ABCDEFG0123456789_abcdefghijk",
        "hf_abcdefghijklmnopqrstuvwxyzABCD",
        "AKIAIOSFODNN7EXAMPLE",
        "AIzaSyA-1234567890abcdefghijklmnopqrstu",
    ],
)
def test_key_shaped_strings_are_redacted_without_any_environment(secret: str) -> None:
    out = redact(f"config: key={secret}, done", env={})
    assert secret not in out
    assert out == f"config: key={REDACTED}, done"


def test_bearer_credentials_are_redacted_but_the_word_stays() -> None:
    out = redact("Authorization: Bearer abc.def-123456789", env={})
    assert out == f"Authorization: Bearer {REDACTED}"


@pytest.mark.parametrize(
    "text",
    ["task-force-deployment-manager-v2", "risk-assessment-of-many-things", "the hf_ prefix", "sk-short"],
)
def test_ordinary_text_is_not_mistaken_for_keys(text: str) -> None:
    assert redact(text, env={}) == text


def test_redaction_is_idempotent() -> None:
    once = redact("sk-abcdefghijklmnopqrstuvwx and Bearer zzzzzzzzzz", env={})
    assert redact(once, env={}) == once


def test_redact_obj_reaches_every_string_leaf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_TEST_TOKEN", "deep-secret-value-42")
    obj = {
        "a": ["x deep-secret-value-42", {"b": ("deep-secret-value-42", 3)}],
        "n": 1.5,
        "none": None,
        "deep-secret-value-42": "key as a dict key",
    }
    out = redact_obj(obj)
    assert "deep-secret-value-42" not in repr(out)
    assert out["a"][0] == f"x {REDACTED}"
    assert out["a"][1]["b"] == (REDACTED, 3)
    assert out["n"] == 1.5 and out["none"] is None
    assert obj["a"][0] == "x deep-secret-value-42"  # the input is not modified


def test_a_key_set_with_spaces_around_it_is_redacted_as_sent() -> None:
    """Clients send a key stripped of the spaces a careless `export` left around it; that form is secret too."""
    env = {"DEEPSEEK_API_KEY": "  abcdEFGH1234ijklMNOP5678qrst \n"}
    assert "abcdEFGH1234ijklMNOP5678qrst" not in redact("401: invalid key abcdEFGH1234ijklMNOP5678qrst", env)


def test_redact_obj_uses_the_env_it_is_given_and_key_shapes_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    """With `env` given, its secret values are redacted (and the process environment's are not looked at);
    key-shaped strings are redacted in keys, values and sequences whatever the environment holds."""
    monkeypatch.setenv("OTHER_API_KEY", "only-in-os-environ-77")
    env = {"FOO_API_KEY": "value-from-the-argument", "BAR_TOKEN": "short", "HOME": "/home/long-enough-name"}
    shaped = "sk-abcdefghijklmnopqrstuvwx"
    obj = {
        "value-from-the-argument": [("x value-from-the-argument y", shaped), {shaped: b"value-from-the-argument"}],
        "plain": ("short", "/home/long-enough-name", "only-in-os-environ-77", 7, None, True),
        1: [[["Bearer abcdefghij"]]],
    }
    out = redact_obj(obj, env)
    assert out == {
        REDACTED: [(f"x {REDACTED} y", REDACTED), {REDACTED: b"value-from-the-argument"}],  # bytes: not a string
        "plain": ("short", "/home/long-enough-name", "only-in-os-environ-77", 7, None, True),
        1: [[[f"Bearer {REDACTED}"]]],
    }
    assert type(out["plain"]) is tuple and type(out[REDACTED][0]) is tuple and type(out[1][0]) is list
    assert redact_obj({"k": ["only-in-os-environ-77"]}, env={}) == {"k": ["only-in-os-environ-77"]}
    assert redact_obj("a " + shaped, env={}) == f"a {REDACTED}" and redact_obj(3.5, env) == 3.5


def test_redact_obj_reads_the_environment_anew_at_each_call(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LATER_API_KEY", raising=False)
    obj = {"log": ["key later-set-value-123 used"], "later-set-value-123": ("later-set-value-123",)}
    assert redact_obj(obj) == obj
    monkeypatch.setenv("LATER_API_KEY", "later-set-value-123")
    assert redact_obj(obj) == {"log": [f"key {REDACTED} used"], REDACTED: (REDACTED,)}
    monkeypatch.setenv("LATER_API_KEY", "changed-value-4567")
    assert redact_obj(["later-set-value-123", "changed-value-4567"]) == ["later-set-value-123", REDACTED]
