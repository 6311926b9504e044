from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.conversation import (
    MERGE_SEPARATOR,
    PROFILES,
    ConversationError,
    Message,
    UnknownProfileError,
    append,
    normalise,
    profile_for,
    to_wire,
    validate,
)

DEFAULT = PROFILES["default"]
DEEPSEEK = PROFILES["deepseek-reasoner"]


def test_append_returns_a_new_list_and_leaves_the_old_one_alone() -> None:
    history = append([], "user", "first")
    longer = append(history, "assistant", "reply")
    assert [m.role for m in history] == ["user"]
    assert [m.role for m in longer] == ["user", "assistant"]


def test_append_merges_a_same_role_message_with_a_blank_line() -> None:
    history = append(append([], "user", "Run failed: error A"), "user", "Run failed: error B")
    assert len(history) == 1
    assert history[0].content == "Run failed: error A" + MERGE_SEPARATOR + "Run failed: error B"


def test_append_merges_reasoning_of_merged_assistant_messages() -> None:
    history = append(append([], "assistant", "a", reasoning="r1"), "assistant", "b", reasoning="r2")
    assert history == [Message(role="assistant", content="a\n\nb", reasoning_content="r1\n\nr2")]


def test_normalise_folds_leading_system_messages_into_one() -> None:
    msgs = [
        Message(role="system", content="s1"),
        Message(role="system", content="s2"),
        Message(role="user", content="u"),
    ]
    assert normalise(msgs, DEFAULT) == [
        Message(role="system", content="s1\n\ns2"),
        Message(role="user", content="u"),
    ]


def test_profile_without_system_gets_it_folded_into_the_first_user_message() -> None:
    msgs = [Message(role="system", content="rules"), Message(role="user", content="task")]
    wire = to_wire(msgs, PROFILES["no-system"])
    assert wire == [{"role": "user", "content": "rules\n\ntask"}]


def test_openai_reasoning_profile_sends_system_as_developer() -> None:
    msgs = [Message(role="system", content="rules"), Message(role="user", content="task")]
    assert [m["role"] for m in to_wire(msgs, PROFILES["openai-reasoning"])] == ["developer", "user"]


def test_normalise_strips_reasoning_and_drops_empty_messages() -> None:
    msgs = [
        Message(role="user", content="go"),
        Message(role="assistant", content="done", reasoning_content="long thoughts"),
        Message(role="user", content="   "),
        Message(role="user", content="next"),
    ]
    out = normalise(msgs, DEEPSEEK)
    assert out == [
        Message(role="user", content="go"),
        Message(role="assistant", content="done"),
        Message(role="user", content="next"),
    ]
    wire = to_wire(msgs, DEEPSEEK)
    assert all(set(m) == {"role", "content"} for m in wire)


def test_a_late_system_message_is_sent_as_user_text_in_place() -> None:
    msgs = [
        Message(role="user", content="go"),
        Message(role="assistant", content="ok"),
        Message(role="system", content="note: budget is low"),
        Message(role="user", content="continue"),
    ]
    out = normalise(msgs, DEFAULT)
    assert out[-1] == Message(role="user", content="note: budget is low\n\ncontinue")
    validate(out, DEFAULT)


def test_validate_names_the_rule_and_the_indices() -> None:
    msgs = [
        Message(role="system", content="s"),
        Message(role="user", content="u"),
        Message(role="assistant", content="a"),
        Message(role="user", content="Run failed 1"),
        Message(role="user", content="Run failed 2"),
    ]
    with pytest.raises(ConversationError, match=r"'alternate'.*messages\[3\] and messages\[4\]"):
        validate(msgs, DEEPSEEK)


@pytest.mark.parametrize(
    ("msgs", "rule"),
    [
        ([], "not-empty"),
        ([Message(role="user", content="u"), Message(role="assistant", content="a")], "last-user"),
        ([Message(role="assistant", content="a"), Message(role="user", content="u")], "first-user"),
        ([Message(role="user", content="")], "no-empty-messages"),
        ([Message(role="user", content="u", reasoning_content="r")], "no-reasoning-sent"),
        ([Message(role="user", content="u"), Message(role="system", content="s")], "system-first"),
    ],
)
def test_validate_rejects_each_broken_rule(msgs: list[Message], rule: str) -> None:
    with pytest.raises(ConversationError, match=rule):
        validate(msgs, DEFAULT)


def test_validate_rejects_a_system_message_for_a_profile_that_takes_none() -> None:
    msgs = [Message(role="system", content="s"), Message(role="user", content="u")]
    with pytest.raises(ConversationError, match="no-system"):
        validate(msgs, PROFILES["no-system"])


def test_a_history_ending_with_the_assistant_cannot_be_sent() -> None:
    history = append(append([], "user", "u"), "assistant", "a")
    with pytest.raises(ConversationError, match="last-user"):
        to_wire(history, DEFAULT)


def test_messages_are_immutable() -> None:
    m = Message(role="user", content="x")
    with pytest.raises(ValueError):
        m.content = "y"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "profile"),
    [
        ("deepseek/deepseek-reasoner", "deepseek-reasoner"),
        ("openrouter/deepseek/deepseek-r1", "deepseek-reasoner"),
        ("openai/o3-mini", "openai-reasoning"),
        ("o4-mini", "openai-reasoning"),
        ("gpt-5-mini", "openai-reasoning"),
        ("openai/o1-mini", "no-system"),
        ("anthropic/claude-sonnet-4-5", "anthropic"),
        ("claude-3-5-haiku-20241022", "anthropic"),
        ("deepseek/deepseek-chat", "default"),
        ("openai/gpt-4o", "default"),
        ("openai/some-local-model", "default"),
        ("ollama/qwen2.5-coder", "default"),
    ],
)
def test_profile_is_chosen_from_the_model_name(name: str, profile: str) -> None:
    assert profile_for(name).name == profile


def test_profile_override_wins_and_unknown_override_is_one_clear_error() -> None:
    assert profile_for("openai/gpt-4o", "deepseek-reasoner").name == "deepseek-reasoner"
    with pytest.raises(UnknownProfileError, match="unknown model profile 'nope'.*known:"):
        profile_for("openai/gpt-4o", "nope")


# --------------------------------------------------------------------------------------------------- property

_text = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40),
    st.sampled_from(["", " ", "\n\n", "\t \n"]),  # blank messages happen (an empty reply, an empty log)
)
_step = st.tuples(st.sampled_from(["system", "user", "assistant"]), _text, st.one_of(st.none(), _text))


def _contains_in_order(haystack: str, needles: list[str]) -> bool:
    pos = 0
    for needle in needles:
        found = haystack.find(needle, pos)
        if found < 0:
            return False
        pos = found + len(needle)
    return True


@settings(max_examples=300, deadline=None)
@given(steps=st.lists(_step, max_size=25), final=_text.filter(lambda t: t.strip() != ""))
def test_any_appended_history_normalises_to_a_valid_one_for_every_profile(
    steps: list[tuple[str, str, str | None]], final: str
) -> None:
    history: list[Message] = []
    for role, content, reasoning in steps:
        history = append(history, role, content, reasoning)  # type: ignore[arg-type]
    history = append(history, "user", final)  # a call always follows the pending user message
    snapshot = list(history)
    texts = [c for _, c, _ in steps if c.strip()] + [final]
    for profile in PROFILES.values():
        out = normalise(history, profile)
        validate(out, profile)
        assert _contains_in_order("\x00".join(m.content for m in out), texts)
        assert all(m.reasoning_content is None for m in out)
    assert history == snapshot
