from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import prompts
from orchestrator.conversation import (
    ELIDED_FILES_NOTE,
    MERGE_SEPARATOR,
    PROFILES,
    STRICTEST_PROFILE,
    ConversationError,
    Message,
    Trim,
    UnknownProfileError,
    append,
    apply_trim,
    elide_files,
    fit,
    normalise,
    profile_for,
    tighten,
    to_wire,
    token_ceiling,
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


# --------------------------------------------------------------------------------------------------- trimming


def code(version: int, lines: int = 120) -> str:
    body = "".join(f"def layer_{version}_{i}(x):\n    return x * {i} + {version}\n\n" for i in range(lines))
    return f"LR = 0.{version}\n\n{body}"


def files(version: int) -> dict[str, str]:
    # README holds a fence, so files_block fences it with four backticks.
    return {
        "experiment.py": code(version),
        "README.md": f"Notes v{version}\n```\npython experiment.py\n```\n",
    }


def edit(version: int) -> str:
    return (
        f"Run {version}: try LR 0.{version}\n\nexperiment.py\n```python\n<<<<<<< SEARCH\nLR = 0.{version - 1}\n"
        f"=======\nLR = 0.{version}\n>>>>>>> REPLACE\n```"
    )


def first_turn() -> str:
    return prompts.render(
        "first_turn",
        {
            "title": "LR sweep",
            "experiment": "Try learning rates.",
            "plan": "one LR per run",
            "task_description": "A toy experiment.",
            "baseline": "loss 1.0",
            "max_runs": 10,
            "edit_format": prompts.render(
                "edit_format", {"editable": "experiment.py", "protected": "(none)"}
            ),
            "files": prompts.files_block(files(0)),
        },
    )


def run_ok(run: int) -> str:
    return prompts.render(
        "run_ok",
        {
            "run": run,
            "duration": "3.0 s",
            "results": f"loss {1 - run / 10}",
            "best_line": "",
            "runs_left": 10 - run,
            "next_run": run + 1,
        },
    )


def edits_failed(run: int) -> str:
    block = prompts.files_block(files(run))
    return prompts.render(
        "edits_failed",
        {
            "run": run,
            "feedback": "SEARCH did not match",
            "retries_left": 2,
            "files_part": f"\n## Current files\n{block}",
        },
    )


def restored(run: int) -> str:
    return prompts.render(
        "restored",
        {
            "run": run,
            "attempts": 3,
            "message": "CUDA OOM",
            "restored_to": "run_1",
            "runs_left": 10 - run,
            "files": prompts.files_block(files(run)),
        },
    )


def long_history(rounds: int = 8) -> list[Message]:
    """system, the task (with the files), then rounds of (reply, feedback); every other feedback shows the files."""
    msgs = append([], "system", "You are a careful ML research engineer.")
    msgs = append(msgs, "user", first_turn())
    for run in range(1, rounds + 1):
        msgs = append(msgs, "assistant", edit(run), reasoning=f"thinking about run {run}")
        kind = run % 3
        msgs = append(
            msgs, "user", run_ok(run) if kind == 0 else edits_failed(run) if kind == 1 else restored(run)
        )
    return msgs


def chars(messages: list[Message]) -> int:
    return sum(len(m.content) for m in messages) // 4


def dump_indices(msgs: list[Message]) -> list[int]:
    """Messages between the task and the last prompt that show files."""
    return [i for i, m in enumerate(msgs[:-1]) if i > 1 and "## Current files" in m.content]


def assert_kept_and_valid(msgs: list[Message], trimmed: list[Message]) -> None:
    assert trimmed[0] == msgs[0] and trimmed[1] == msgs[1] and trimmed[-1] == msgs[-1]
    for profile in PROFILES.values():
        validate(normalise(trimmed, profile), profile)
    to_wire(trimmed, STRICTEST_PROFILE)


@pytest.mark.parametrize("render", [edits_failed, restored])
def test_elide_files_replaces_the_dump_with_one_line_and_keeps_the_rest(render: object) -> None:
    text = render(4)  # type: ignore[operator]
    short = elide_files(text)
    assert short is not None and len(short) < len(text) / 5
    assert "def layer_" not in short and "Notes v4" not in short
    assert short.endswith("## Current files\n" + ELIDED_FILES_NOTE)
    assert short.split("## Current files")[0] == text.split("## Current files")[0]  # the feedback is kept


def test_elide_files_keeps_what_follows_the_dump() -> None:
    text = first_turn()
    short = elide_files(text)
    assert short is not None and "def layer_" not in short and ELIDED_FILES_NOTE in short
    assert (
        short.split(ELIDED_FILES_NOTE)[1] == text.split("Notes v0\n```\npython experiment.py\n```\n````")[1]
    )


def test_elide_files_leaves_prompts_without_a_dump_alone() -> None:
    assert elide_files(run_ok(3)) is None
    assert elide_files("## Current files\n(no editable files)") is None
    assert elide_files("## Current files\nnot a fenced block at all") is None


def test_a_history_that_fits_is_left_alone() -> None:
    msgs = long_history()
    trim = fit(msgs, chars, chars(msgs))
    assert trim == Trim() and apply_trim(msgs, trim) == msgs


def test_a_history_within_its_byte_ceiling_fits_without_being_counted() -> None:
    msgs = long_history()

    def no_tokenizer(messages: object) -> int:
        raise AssertionError("counted a history whose size alone shows it fits")

    assert fit(msgs, no_tokenizer, token_ceiling(msgs)) == Trim()
    counted: list[int] = []
    fit(msgs, lambda m: counted.append(1) or 0, token_ceiling(msgs) - 1)  # too close to call: counted
    assert counted


UNICODE_TURN = "Résumé: 学习率 0.1 → 0.2 🚀🚀\n\tΔloss = −0.03\n" + "    " * 50 + "```python\nx = 1\n```"


@pytest.mark.parametrize("model", ["deepseek/deepseek-chat", "deepseek/deepseek-reasoner", "openai/gpt-4o",
                                   "openai/my-local-model", "anthropic/claude-sonnet-4-5", "gemini/gemini-2.5-pro"])
def test_no_model_counts_more_tokens_than_the_byte_ceiling(model: str) -> None:
    import litellm

    for msgs in (long_history(), append(append([], "system", "s"), "user", UNICODE_TURN),
                 append(append([], "user", "x"), "assistant", "")):
        wire = to_wire(msgs, DEFAULT, check=False)
        assert litellm.token_counter(model=model, messages=wire) <= token_ceiling(msgs)


def test_old_file_dumps_are_elided_oldest_first_before_anything_is_dropped() -> None:
    msgs = long_history()
    dumps = dump_indices(msgs)
    assert len(dumps) >= 4
    saved_by_one = chars(msgs) - chars(apply_trim(msgs, Trim(elided=(dumps[0],))))
    trim = fit(msgs, chars, chars(msgs) - saved_by_one - 10)  # one dump is not enough, two are
    assert trim == Trim(elided=tuple(dumps[:2]))
    trimmed = apply_trim(msgs, trim)
    assert len(trimmed) == len(msgs) and chars(trimmed) <= chars(msgs) - saved_by_one - 10
    assert ELIDED_FILES_NOTE in trimmed[dumps[0]].content and ELIDED_FILES_NOTE in trimmed[dumps[1]].content
    assert trimmed[dumps[2]] == msgs[dumps[2]]
    assert "def layer_" in trimmed[1].content and "def layer_" in trimmed[-1].content  # task and last prompt
    assert_kept_and_valid(msgs, trimmed)


def test_exchanges_are_dropped_oldest_first_in_pairs_once_every_dump_is_elided() -> None:
    msgs = long_history()
    elided_all = chars(apply_trim(msgs, Trim(elided=tuple(dump_indices(msgs)))))
    limit = elided_all - 300
    trim = fit(msgs, chars, limit)
    trimmed = apply_trim(msgs, trim)
    assert chars(trimmed) <= limit
    assert trim.dropped and trim.dropped[0] == 2  # the oldest exchange: the first reply and its feedback
    assert len(trim.dropped) % 2 == 0
    for a, u in zip(trim.dropped[::2], trim.dropped[1::2], strict=True):
        assert (msgs[a].role, msgs[u].role, u) == ("assistant", "user", a + 1)
    assert set(dump_indices(msgs)) <= set(trim.elided) | set(trim.dropped)
    assert_kept_and_valid(msgs, trimmed)


def test_an_impossible_limit_keeps_the_system_the_task_and_the_last_exchange() -> None:
    msgs = long_history()
    trimmed = apply_trim(msgs, fit(msgs, chars, 1))
    assert [m.role for m in trimmed] == ["system", "user", "assistant", "user"]
    assert trimmed[2] == msgs[-2]
    assert_kept_and_valid(msgs, trimmed)


def test_a_trim_stays_meaningful_on_the_longer_history_that_follows() -> None:
    msgs = long_history(10)
    shorter = msgs[:16]  # the history as it was six messages ago (it ended with a prompt too)
    trim = fit(shorter, chars, chars(apply_trim(shorter, Trim(elided=tuple(dump_indices(shorter))))) - 10)
    assert trim.dropped == (2, 3) and trim.elided  # every dump elided, then one exchange dropped
    later = apply_trim(msgs, trim)
    assert later[-6:] == msgs[-6:]  # what came later is untouched
    before = apply_trim(shorter, trim)
    assert later[: len(before)] == before  # the same trimmed prefix: what was sent before is sent again
    assert_kept_and_valid(msgs, later)


def test_apply_trim_ignores_indices_past_the_end_and_never_touches_the_kept_messages() -> None:
    msgs = long_history(2)  # system, task, reply, prompt, reply, prompt
    last = len(msgs) - 1
    assert apply_trim(msgs, Trim(elided=(100,), dropped=(101, 102))) == msgs
    assert apply_trim(msgs, Trim(elided=(0, 1, last), dropped=(0, 1, last))) == msgs


def test_trim_indices_are_sorted_and_unique() -> None:
    assert Trim(elided=[5, 3, 3], dropped=(9, 2)) == Trim(elided=(3, 5), dropped=(2, 9))
    with pytest.raises(ValueError):
        Trim(dropped=(-1,))
    assert Trim.model_validate_json(Trim(elided=(3,), dropped=(4, 5)).model_dump_json()) == Trim(
        elided=(3,), dropped=(4, 5)
    )


def test_tighten_is_strictly_more_aggressive_until_nothing_is_left() -> None:
    msgs = long_history()
    trim: Trim | None = Trim()
    sizes = [chars(msgs)]
    seen: list[Trim] = []
    while trim is not None:
        seen.append(trim)
        trim = tighten(msgs, trim)
        if trim is not None:
            previous = seen[-1]
            assert set(previous.dropped) <= set(trim.dropped)
            assert set(previous.elided) | set(previous.dropped) < set(trim.elided) | set(trim.dropped)
            trimmed = apply_trim(msgs, trim)
            if tighten(msgs, trim) is not None:  # each step but the last cuts at least a quarter
                assert chars(trimmed) <= 0.75 * sizes[-1]
            sizes.append(chars(trimmed))
            assert_kept_and_valid(msgs, trimmed)
    assert len(seen) <= 10  # geometric: a handful of provider refusals at most
    assert [m.role for m in apply_trim(msgs, seen[-1])] == ["system", "user", "assistant", "user"]
    assert tighten(msgs, None) == tighten(msgs, Trim())


def test_nothing_to_tighten_in_a_short_history() -> None:
    msgs = append(append(append([], "system", "s"), "user", first_turn()), "assistant", "a")
    msgs = append(msgs, "user", edits_failed(1))
    assert tighten(msgs, Trim()) is None  # the task and the last prompt are never touched


@settings(max_examples=150, deadline=None)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["user", "assistant", "system"]), st.sampled_from(["text", "dump", "blank"])
        ),
        max_size=20,
    ),
    limit=st.integers(min_value=0, max_value=20_000),
)
def test_any_fitted_history_keeps_its_ends_and_stays_valid(steps: list[tuple[str, str]], limit: int) -> None:
    history = append([], "system", "rules")
    history = append(history, "user", first_turn())
    for i, (role, kind) in enumerate(steps):
        text = {"text": f"message {i}", "dump": edits_failed(i), "blank": " "}[kind]
        history = append(history, role, text)  # type: ignore[arg-type]
    history = append(history, "user", "the pending prompt")
    trimmed = apply_trim(history, fit(history, chars, limit))
    assert trimmed[0] == history[0] and trimmed[1] == history[1] and trimmed[-1] == history[-1]
    for profile in PROFILES.values():
        validate(normalise(trimmed, profile), profile)
