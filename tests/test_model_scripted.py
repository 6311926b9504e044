from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.conversation import ConversationError, Message, UnknownProfileError, append
from orchestrator.models import (
    Model,
    ProviderModel,
    ScriptedModel,
    ScriptExhaustedError,
    ScriptFormatError,
    make_model,
)

YAML_SCRIPT = """\
- "first reply"
- content: |
    second reply
  reasoning: why not
  prompt_tokens: 120
  completion_tokens: 30
  cached_tokens: 100
  cost_usd: 0.25
"""


def opening() -> list[Message]:
    return [Message(role="system", content="You are helpful."), Message(role="user", content="Start.")]


@pytest.fixture
def yaml_script(tmp_path: Path) -> Path:
    path = tmp_path / "replies.yaml"
    path.write_text(YAML_SCRIPT, encoding="utf-8")
    return path


def test_replies_come_in_order_with_usage(yaml_script: Path) -> None:
    model = ScriptedModel(yaml_script)
    first = model.complete(opening())
    assert first.content == "first reply"
    assert first.reasoning is None
    assert first.prompt_tokens > 0 and first.completion_tokens > 0  # estimated, so sessions show usage
    assert first.cost_usd == 0.0 and first.cached_tokens == 0
    history = append(append(opening(), "assistant", first.content), "user", "Run 1 ok")
    second = model.complete(history)
    assert second.content == "second reply\n"
    assert second.reasoning == "why not"
    assert (second.prompt_tokens, second.completion_tokens, second.cached_tokens) == (120, 30, 100)
    assert second.cost_usd == 0.25
    assert second.model == f"scripted:{yaml_script}"


def test_jsonl_scripts_work_too(tmp_path: Path) -> None:
    path = tmp_path / "replies.jsonl"
    path.write_text(json.dumps("plain") + "\n\n" + json.dumps({"content": "obj", "reasoning": "r"}) + "\n")
    model = ScriptedModel(path)
    assert model.complete(opening()).content == "plain"
    history = append(append(opening(), "assistant", "plain"), "user", "more")
    assert model.complete(history).reasoning == "r"


def test_an_exhausted_script_says_so(yaml_script: Path) -> None:
    model = ScriptedModel(yaml_script, start_at=2)
    with pytest.raises(ScriptExhaustedError, match=r"scripted model: all 2 replies used"):
        model.complete(opening())


def test_start_at_skips_replies_already_consumed(yaml_script: Path) -> None:
    model = ScriptedModel(yaml_script, start_at=1)
    assert model.complete(opening()).content == "second reply\n"
    assert model.remaining == 0


def test_the_strictest_rules_apply(yaml_script: Path) -> None:
    model = ScriptedModel(yaml_script)
    with pytest.raises(ConversationError, match="last-user"):
        model.complete([*opening(), Message(role="assistant", content="x")])
    assert model.remaining == 2  # a refused call consumes nothing
    model.complete(opening())
    assert model.calls[0] == [{"role": "user", "content": "You are helpful.\n\nStart."}]  # system folded


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        ("bad.yaml", "content: not a list\n", "must hold a list"),
        ("bad.yaml", "- {content: x, colour: red}\n", "item 1: colour"),
        ("bad.yaml", "- [unclosed\n", "not valid YAML"),
        ("bad.jsonl", '"ok"\n{not json}\n', "line 2 is not JSON"),
        ("bad.jsonl", '{"reasoning": "no content"}\n', "line 1: content"),
    ],
)
def test_a_bad_script_is_one_clear_error(tmp_path: Path, name: str, text: str, error: str) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ScriptFormatError, match=error) as excinfo:
        ScriptedModel(path)
    assert "\n" not in str(excinfo.value)


def test_a_missing_script_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ScriptFormatError, match="cannot read"):
        make_model(f"scripted:{tmp_path / 'nope.yaml'}")


@pytest.mark.parametrize(
    ("name", "data", "error"),
    [
        ("nope.yaml", None, r"cannot read .*nope\.yaml: it does not exist"),
        ("folder", "dir", r"cannot read .*folder: it is a folder, not a file"),
        ("latin1.yaml", "- caf\xe9\n".encode("latin-1"), r"cannot read .*latin1\.yaml: it is not UTF-8 text"),
        ("empty.yaml", b"[]\n", r"empty\.yaml has no replies"),
        ("empty.jsonl", b"\n\n", r"empty\.jsonl has no replies"),
        ("blank.yaml", b"", r"blank\.yaml has no replies"),
    ],
)
def test_an_unusable_script_is_refused_when_the_model_is_made(
    tmp_path: Path, name: str, data: bytes | str | None, error: str
) -> None:
    path = tmp_path / name
    if data == "dir":
        path.mkdir()
    elif isinstance(data, bytes):
        path.write_bytes(data)
    with pytest.raises(ScriptFormatError, match=error) as excinfo:
        make_model(f"scripted:{path}")
    assert "\n" not in str(excinfo.value) and str(excinfo.value).startswith("scripted model: ")


def test_a_script_path_with_an_unknown_home_is_one_clear_error() -> None:
    with pytest.raises(ScriptFormatError, match="does not exist"):
        make_model("scripted:~no-such-user-here/replies.yaml")


def test_a_scripted_reply_can_be_cut_at_max_tokens(tmp_path: Path) -> None:
    path = tmp_path / "cut.yaml"
    path.write_text("- content: half a pla\n  finish_reason: length\n- whole\n", encoding="utf-8")
    model = ScriptedModel(path)
    assert model.complete(opening()).finish_reason == "length"
    history = append(append(opening(), "assistant", "half a pla"), "user", "go on")
    assert model.complete(history).finish_reason == "stop"


def test_a_scripted_reply_with_unpaired_surrogates_is_safe_to_write(tmp_path: Path) -> None:
    path = tmp_path / "odd.jsonl"
    path.write_text(json.dumps({"content": "a \ud800 b", "reasoning": "\udfff"}) + "\n", encoding="utf-8")
    reply = ScriptedModel(path).complete(opening())
    assert (reply.content, reply.reasoning) == ("a \ufffd b", "\ufffd")
    reply.model_dump_json().encode("utf-8")


def test_a_bogus_profile_is_refused_for_every_kind_of_model(yaml_script: Path) -> None:
    for name in (f"scripted:{yaml_script}", "openai/gpt-4o"):
        with pytest.raises(
            UnknownProfileError, match=r"unknown model profile 'bogus' \(known: .*default"
        ) as exc:
            make_model(name, profile="bogus")
        assert "\n" not in str(exc.value)


def test_the_scripted_model_costs_nothing_and_estimates_tokens(yaml_script: Path) -> None:
    model = ScriptedModel(yaml_script)
    assert model.price_known() and model.context_limit() is None
    assert (
        0
        < model.count_tokens(opening())
        < model.count_tokens([*opening()[:1], Message(role="user", content="x" * 4000)])
    )


def test_a_scripted_context_window_refuses_a_history_that_is_too_long(yaml_script: Path) -> None:
    from orchestrator.models import ContextWindowError

    model = make_model(f"scripted:{yaml_script}", context_tokens=100)
    assert model.context_limit() == 100
    long = [*opening()[:1], Message(role="user", content="x" * 4000)]
    with pytest.raises(ContextWindowError, match="context window"):
        model.complete(long)
    assert model.complete(opening()).content == "first reply"  # the refused call consumed nothing


def test_make_model_picks_the_implementation(yaml_script: Path) -> None:
    scripted = make_model(f"scripted:{yaml_script}", start_at=1)
    assert isinstance(scripted, ScriptedModel) and scripted.remaining == 1
    real = make_model(
        "openai/some-model", api_base="http://127.0.0.1:9/v1", api_key="k", timeout_s=5, max_attempts=2
    )
    assert isinstance(real, ProviderModel) and real.max_attempts == 2 and real.timeout_s == 5
    assert isinstance(scripted, Model) and isinstance(real, Model)
