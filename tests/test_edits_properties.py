"""Property tests: a unique span is edited exactly there; a corrupted or ambiguous SEARCH never changes a file."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from orchestrator.edits import Edit, apply_edits

# A small alphabet makes repeated lines (and so ambiguity) common; REPLACE lines use other words, so they never
# occur in the original file.
WORDS = ["x = 1", "y = 2", "return x", "pass", "", "# note", "for i in r:", "α = 0.5", "if ok:"]
line = st.builds(
    lambda indent, word: " " * indent + word, st.sampled_from([0, 0, 4, 8]), st.sampled_from(WORDS)
)
new_line = st.builds(
    lambda indent, n: " " * indent + f"new_{n}()", st.sampled_from([0, 4]), st.integers(0, 99)
)
newline = st.sampled_from(["\n", "\r\n"])
SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def text_of(lines: list[str], nl: str, final_newline: bool) -> bytes:
    return (nl.join(lines) + (nl if final_newline and lines else "")).encode()


def render(lines: list[str], nl: str, final_newline: bool) -> bytes:
    assume(final_newline or not lines or lines[-1] != "")  # else the text would read as one line fewer
    return text_of(lines, nl, final_newline)


def occurrences(lines: list[str], span: list[str]) -> int:
    return sum(lines[p : p + len(span)] == span for p in range(len(lines) - len(span) + 1))


def loose_occurrences(lines: list[str], span: list[str]) -> int:
    """Places matching after folding all whitespace: the widest any rule can reach (elisions aside)."""
    fold = [" ".join(x.split()) for x in lines]
    target = [" ".join(x.split()) for x in span]
    return sum(fold[p : p + len(target)] == target for p in range(len(fold) - len(target) + 1))


def apply_one(content: bytes, search: list[str], replace: list[str]) -> tuple[bool, bytes]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "experiment.py").write_bytes(content)
        edit = Edit(
            path="experiment.py",
            search="".join(s + "\n" for s in search),
            replace="".join(r + "\n" for r in replace),
            block=1,
        )
        result = apply_edits(root, [edit])
        return result.ok, (root / "experiment.py").read_bytes()


@SETTINGS
@given(
    lines=st.lists(line, min_size=1, max_size=30),
    data=st.data(),
    nl=newline,
    final=st.booleans(),
    replace=st.lists(new_line, max_size=4),
)
def test_a_unique_span_is_replaced_exactly_there(lines, data, nl, final, replace):
    start = data.draw(st.integers(0, len(lines) - 1))
    end = data.draw(st.integers(start + 1, min(len(lines), start + 6)))
    span = lines[start:end]
    assume(any(s.strip() for s in span))
    assume(occurrences(lines, span) == 1)
    ok, after = apply_one(render(lines, nl, final), span, replace)
    assert ok
    expected = lines[:start] + replace + lines[end:]
    known_nl = nl if len(lines) > 1 or final else "\n"  # one line without a terminator: no ending to keep
    assert after == text_of(expected, known_nl, final)  # a missing final newline stays missing


@SETTINGS
@given(
    lines=st.lists(line, min_size=1, max_size=30),
    data=st.data(),
    nl=newline,
    final=st.booleans(),
    replace=st.lists(new_line, max_size=4),
)
def test_a_corrupted_search_never_changes_the_file(lines, data, nl, final, replace):
    start = data.draw(st.integers(0, len(lines) - 1))
    end = data.draw(st.integers(start + 1, min(len(lines), start + 6)))
    span = list(lines[start:end])
    k = data.draw(st.integers(0, len(span) - 1))
    position = data.draw(st.integers(0, len(span[k])))
    span[k] = span[k][:position] + "§" + span[k][position:]  # a character the file does not hold
    content = render(lines, nl, final)
    ok, after = apply_one(content, span, replace)
    assert not ok and after == content


@SETTINGS
@given(
    before=st.lists(line, max_size=10),
    chunk=st.lists(line, min_size=1, max_size=5),
    middle=st.lists(line, max_size=10),
    after_part=st.lists(line, max_size=10),
    nl=newline,
    shift=st.sampled_from(["", "    ", "\t"]),
    trailing=st.sampled_from(["", "  "]),
    replace=st.lists(new_line, max_size=4),
)
def test_an_ambiguous_search_never_changes_the_file(
    before, chunk, middle, after_part, nl, shift, trailing, replace
):
    assume(any(c.strip() for c in chunk))
    lines = before + chunk + middle + chunk + after_part
    content = render(lines, nl, True)
    # The model's copy of the chunk, possibly with different indentation or trailing whitespace.
    search = [shift + c + trailing if c.strip() else c for c in chunk]
    assume(loose_occurrences(lines, search) >= 2)
    ok, after = apply_one(content, search, replace)
    if ok:
        # Only allowed when exactly one place matched under a stricter rule than the others.
        assert (
            occurrences(lines, search) == 1
            or occurrences([x.rstrip() for x in lines], [s.rstrip() for s in search]) == 1
        )
    else:
        assert after == content


reply_line = st.one_of(
    st.sampled_from(
        [
            "<<<<<<< SEARCH",
            "=======",
            ">>>>>>> REPLACE",
            "```",
            "```python",
            "...",
            "",
            "experiment.py",
            "plot.py",
            "sae_data.py",
            "../x.py",
            ".git/config",
            "# experiment.py",
            "**notes.txt**",
            "<<<<<<<<< SEARCH>",
            ">>>>> REPLACE",
        ]
    ),
    line,
    st.text(max_size=20),
)


@SETTINGS
@given(
    reply=st.lists(reply_line, max_size=40),
    nl=st.sampled_from(["\n", "\r\n"]),
    lines=st.lists(line, max_size=15),
)
def test_any_reply_gives_a_result_and_a_refused_reply_changes_nothing(reply, nl, lines):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        content = text_of(lines, "\n", True)
        for name in ("experiment.py", "plot.py", "sae_data.py"):
            (root / name).write_bytes(content)
        result = apply_edits(root, nl.join(reply), protected=("sae_data.py",))
        files = {p.name: p.read_bytes() for p in root.iterdir()}
        if not result.ok:
            assert result.feedback and result.changed == []
            assert files == {name: content for name in ("experiment.py", "plot.py", "sae_data.py")}
        assert files["sae_data.py"] == content
        assert set(files) <= {"experiment.py", "plot.py", "sae_data.py", "notes.txt"}


@SETTINGS
@given(
    parts=st.lists(st.lists(line, max_size=6), min_size=2, max_size=5),
    chunk=st.lists(st.sampled_from(["twin = 0", "    twin()", "", "if twin:"]), min_size=1, max_size=3),
    blocks=st.integers(1, 4),
    nl=newline,
)
def test_blocks_sharing_one_search_take_its_places_in_file_order_only_when_they_are_as_many(
    parts, chunk, blocks, nl
):
    """k blocks with the same SEARCH and a SEARCH found at k places: block i edits place i. Any other count: no
    change at all (the SEARCH chunk uses words the other lines never hold, so its places are known)."""
    assume(any(c.strip() for c in chunk))
    lines: list[str] = []
    starts: list[int] = []
    for n, part in enumerate(parts):
        if n:
            starts.append(len(lines))
            lines += chunk
        lines += part
    content = render(lines, nl, True)
    places = occurrences(lines, chunk)
    assume(places == len(starts))  # a chunk of blank-padded lines could overlap itself
    edits = [
        Edit(
            path="experiment.py",
            search="".join(c + "\n" for c in chunk),
            replace=f"new_{n}()\n",
            block=n + 1,
        )
        for n in range(blocks)
    ]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "experiment.py").write_bytes(content)
        result = apply_edits(root, edits)
        after = (root / "experiment.py").read_bytes()
    if blocks != places:
        assert not result.ok and after == content
        return
    assert result.ok, result.feedback
    expected: list[str] = []
    for n, part in enumerate(parts):
        if n:
            expected.append(f"new_{n - 1}()")
        expected += part
    assert after == text_of(expected, nl, True)
