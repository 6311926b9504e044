"""SEARCH/REPLACE engine: parsing, the matching rules in order, wrong-location traps, paths, all-or-nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestrator.edits import (
    DEFAULT_EDITABLE,
    Edit,
    EditParseError,
    EditResult,
    apply_edits,
    parse_edits,
    plan_line,
    shorten,
)

DATA = Path(__file__).parent / "data"
FENCE = "```"


def block(path: str | None, search: str, replace: str, fence: str = FENCE, lang: str = "python") -> str:
    head = f"{path}\n" if path is not None else ""
    return f"{head}{fence}{lang}\n<<<<<<< SEARCH\n{search}=======\n{replace}>>>>>>> REPLACE\n{fence}\n"


def write(root: Path, files: dict[str, str | bytes]) -> None:
    for name, content in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def seed_reply() -> str:
    """The model's first reply in the founding transcript: after the first user message, before the usage line."""
    lines = (DATA / "seed_transcript.txt").read_text(encoding="utf-8").split("\n")
    first_user_end = max(i for i, line in enumerate(lines[:80]) if line.startswith("####"))
    usage = next(i for i, line in enumerate(lines) if line.startswith("> Tokens:"))
    return "\n".join(lines[first_user_end + 1 : usage])


# ---------------------------------------------------------------------------------------------- the seed


def test_seed_reply_parses_into_its_two_edits_of_experiment_py():
    edits = parse_edits(seed_reply())
    assert [(e.block, e.path) for e in edits] == [(1, "experiment.py"), (2, "experiment.py")]
    assert edits[0].search.startswith("    def __init__(\n        self,\n")
    assert edits[0].search.endswith("        self.b_dec = nn.Parameter(torch.zeros(d_in))\n")
    assert edits[0].replace.endswith(
        "self.register_buffer('ema_act', torch.zeros(d_sae))  # Track feature activity\n"
    )
    assert edits[1].search == "        l1_loss = f.norm(p=1, dim=-1).mean()\n"
    assert edits[1].replace.count("\n") == 8
    assert "--out_dir" not in "".join(e.search + e.replace for e in edits)  # the ```bash block is not an edit


def test_seed_reply_applies_to_a_file_holding_its_search_text(tmp_path):
    edits = parse_edits(seed_reply())
    original = (
        "import torch\n\n\nclass CustomSAE(nn.Module):\n"
        + edits[0].search
        + "\n    def loss(self, x):\n        f = self.encode(x)\n"
        + edits[1].search
        + "        return l1_loss\n"
    )
    write(tmp_path, {"experiment.py": original})
    result = apply_edits(tmp_path, seed_reply())
    assert result.ok and result.changed == ["experiment.py"] and result.blocks == 2
    new = (tmp_path / "experiment.py").read_text()
    assert new == original.replace(edits[0].search, edits[0].replace).replace(
        edits[1].search, edits[1].replace
    )
    # Sent again (a model repeating itself after a retry): recognised, nothing duplicated.
    again = apply_edits(tmp_path, seed_reply())
    assert again.ok and again.changed == [] and again.already_applied == [1, 2]
    assert (tmp_path / "experiment.py").read_text() == new


def test_seed_plan_line_is_the_first_prose_line_cut_to_72_chars():
    line = plan_line(seed_reply())
    assert line.startswith("Let me plan the experiments") and len(line) <= 72


# ---------------------------------------------------------------------------------------------- parsing

BODY = "<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE\n"


@pytest.mark.parametrize(
    "reply",
    [
        pytest.param(f"experiment.py\n```python\n{BODY}```\n", id="path-before-fence"),
        pytest.param(f"```python\nexperiment.py\n{BODY}```\n", id="path-inside-fence"),
        pytest.param(f"```python\n# experiment.py\n{BODY}```\n", id="path-as-comment"),
        pytest.param(f"`experiment.py`\n```python\n{BODY}```\n", id="path-in-backticks"),
        pytest.param(f"**experiment.py**\n```python\n{BODY}```\n", id="path-in-bold"),
        pytest.param(f"### `experiment.py`:\n\n```python\n{BODY}```\n", id="path-as-heading"),
        pytest.param(f"```python experiment.py\n{BODY}```\n", id="path-in-fence-info"),
        pytest.param(f"experiment.py\n````python\n{BODY}````\n", id="four-backtick-fence"),
        pytest.param(f"experiment.py\n```python\n{BODY}```\n".replace("\n", "\r\n"), id="crlf-reply"),
        pytest.param(
            "experiment.py\n```\n<<<<< SEARCH\nx = 1\n=====\nx = 2\n>>>>> REPLACE\n```\n", id="5-markers"
        ),
        pytest.param(
            "experiment.py\n```\n<<<<<<<<< SEARCH\nx = 1\n=========\nx = 2\n>>>>>>>>> REPLACE\n```\n",
            id="9-markers",
        ),
        pytest.param(f"experiment.py\n```python\n{BODY.replace('SEARCH', 'SEARCH>')}```\n", id="stray-gt"),
        pytest.param(f"Some plan.\n\nexperiment.py\n{BODY}", id="no-fence"),
    ],
)
def test_block_formats_models_emit_all_parse(reply):
    assert parse_edits(reply) == [Edit(path="experiment.py", search="x = 1\n", replace="x = 2\n", block=1)]


def test_several_blocks_and_files_and_a_block_without_path_reuses_the_previous_one():
    reply = (
        "Plan: two changes.\n\nexperiment.py\n```python\n" + BODY + "\n" + BODY.replace("1", "3") + "```\n\n"
        "plot.py\n```python\n"
        + BODY.replace("x", "y")
        + "```\n\n```python\n"
        + BODY.replace("x", "z")
        + "```\n\nThen run:\n```bash\npython experiment.py --out_dir=run_1\n```\n"
    )
    edits = parse_edits(reply)
    assert [(e.block, e.path, e.search) for e in edits] == [
        (1, "experiment.py", "x = 1\n"),
        (2, "experiment.py", "x = 3\n"),
        (3, "plot.py", "y = 1\n"),
        (4, "plot.py", "z = 1\n"),
    ]


def test_a_reply_without_blocks_parses_to_nothing_and_applies_as_ok(tmp_path):
    reply = "All experiments are done.\n```bash\npython experiment.py --out_dir=run_2\n```\nALL_COMPLETED\n"
    assert parse_edits(reply) == []
    write(tmp_path, {"experiment.py": "x = 1\n"})
    result = apply_edits(tmp_path, reply)
    assert result == EditResult(ok=True, changed=[], feedback="", blocks=0)


@pytest.mark.parametrize(
    "reply, needle",
    [
        pytest.param(
            "experiment.py\n```\n<<<<<<< SEARCH\nx = 1\n>>>>>>> REPLACE\n```\n",
            "block 1 (experiment.py): expected a '=======' line",
            id="missing-divider",
        ),
        pytest.param(
            f"experiment.py\n```\n{BODY}```\n\nexperiment.py\n```\n<<<<<<< SEARCH\nx\n=======\ny\n```\n",
            "block 2 (experiment.py): expected a '>>>>>>> REPLACE' line",
            id="missing-replace-marker",
        ),
        pytest.param(
            "experiment.py\n```\nx = 1\n=======\nx = 2\n>>>>>>> REPLACE\n```\n",
            "no '<<<<<<< SEARCH' line before it",
            id="missing-search-marker",
        ),
        pytest.param(f"Here is the change:\n```python\n{BODY}```\n", "block 1: no file path", id="no-path"),
    ],
)
def test_malformed_blocks_name_the_block_and_what_was_expected(tmp_path, reply, needle):
    with pytest.raises(EditParseError) as info:
        parse_edits(reply)
    assert needle in str(info.value)
    write(tmp_path, {"experiment.py": "x = 1\n"})
    result = apply_edits(tmp_path, reply)
    assert not result.ok and needle in result.feedback and "Nothing was applied" in result.feedback
    assert (tmp_path / "experiment.py").read_text() == "x = 1\n"


# ---------------------------------------------------------------------------------------------- matching rules

PY = """\
class Model:
    def __init__(self):
        self.lr = 3e-3
        self.steps = 100

    def train(self):
        for step in range(self.steps):
            loss = self.step()
        return loss
"""

# (id, original file, SEARCH, REPLACE, expected file or None when the block must fail, rule or failure kind)
CASES = [
    (
        "exact",
        PY,
        "        self.lr = 3e-3\n",
        "        self.lr = 1e-3\n",
        PY.replace("3e-3", "1e-3"),
        "exact",
    ),
    (
        "trailing-whitespace",
        PY,
        "        self.lr = 3e-3   \n        self.steps = 100\t\n",
        "        self.lr = 1e-3\n        self.steps = 100\n",
        PY.replace("3e-3", "1e-3"),
        "trailing-whitespace",
    ),
    (
        "indent-shift-deeper",
        PY,
        "for step in range(self.steps):\n    loss = self.step()\n",
        "for step in range(self.steps):\n    loss = self.step()\n    print(loss)\n",
        PY.replace("self.step()\n", "self.step()\n            print(loss)\n"),
        "indent-shift",
    ),
    (
        "indent-shift-shallower",
        PY,
        "            def train(self):\n                for step in range(self.steps):\n",
        "            def train(self, steps=None):\n                for step in range(steps or self.steps):\n",
        PY.replace(
            "def train(self):\n        for step in range(self.steps)",
            "def train(self, steps=None):\n        for step in range(steps or self.steps)",
        ),
        "indent-shift",
    ),
    (
        "blank-lines-trimmed",
        PY,
        "\n\n        self.steps = 100\n\n\n",
        "\n\n        self.steps = 200\n\n\n",
        PY.replace("100", "200"),
        "blank-lines-trimmed+exact",
    ),
    (
        "elision",
        PY,
        "    def train(self):\n...\n        return loss\n",
        "    def train(self):\n...\n        return float(loss)\n",
        PY.replace("return loss", "return float(loss)"),
        "elision",
    ),
    (
        "elision-two-changes",
        PY,
        "        self.lr = 3e-3\n...\n        return loss\n",
        "        self.lr = 1e-3\n...\n        return loss.item()\n",
        PY.replace("3e-3", "1e-3").replace("return loss", "return loss.item()"),
        "elision",
    ),
    ("deletion", PY, "        self.steps = 100\n", "", PY.replace("        self.steps = 100\n", ""), "exact"),
    ("not-found", PY, "        self.lr = 2e-3\n", "        self.lr = 1e-3\n", None, "not_found"),
    (
        "elision-out-of-order",
        PY,
        "        return loss\n...\n        self.lr = 3e-3\n",
        "        x\n...\n        y\n",
        None,
        "elision",
    ),
    (
        "elision-unpaired",
        PY,
        "        self.lr = 3e-3\n...\n        return loss\n",
        "        self.lr = 1e-3\n",
        None,
        "elision",
    ),
    ("reindent-impossible", PY, "            def train(self):\n", "def train(self):\n", None, "reindent"),
]


@pytest.mark.parametrize(
    "original, search, replace, expected, kind", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_matching_rules(tmp_path, original, search, replace, expected, kind):
    write(tmp_path, {"experiment.py": original})
    result = apply_edits(tmp_path, block("experiment.py", search, replace))
    after = (tmp_path / "experiment.py").read_text()
    if expected is None:
        assert not result.ok and result.changed == [] and after == original
        assert result.outcomes[0].status == "failed"
        assert "nothing was applied" in result.feedback
    else:
        assert result.ok and result.changed == ["experiment.py"], result.feedback
        assert after == expected
        assert result.outcomes[0].rule == kind


TWICE = """\
def a():
    x = compute()
    return x


def b():
    x = compute()
    return x
"""


@pytest.mark.parametrize(
    "original, search, lines",
    [
        pytest.param(TWICE, "    x = compute()\n    return x\n", "2-3, 7-8", id="exact-twice"),
        pytest.param(
            TWICE.replace("    return x\n", "    return x  \n", 1),
            "    x = compute()\n    return x \n",
            "2-3, 7-8",
            id="twice-after-trailing-whitespace-folding",
        ),
        pytest.param(TWICE, "x = compute()\nreturn x\n", "2-3, 7-8", id="twice-after-indent-shift"),
        pytest.param(TWICE, "\n    x = compute()\n\n", "2, 7", id="twice-after-blank-trim"),
        pytest.param(TWICE, "def a():\n...\n    return x\n", "3, 8", id="elision-piece-twice"),
    ],
)
def test_wrong_location_traps_fail_naming_every_place_and_change_nothing(tmp_path, original, search, lines):
    write(tmp_path, {"experiment.py": original})
    replace = "def a():\n...\n    return 0\n" if "..." in search else "    x = 0\n"
    result = apply_edits(tmp_path, block("experiment.py", search, replace))
    assert not result.ok and result.changed == []
    assert (tmp_path / "experiment.py").read_text() == original
    assert f"at lines {lines};" in result.feedback and "must match exactly one" in result.feedback


def test_exact_match_wins_over_a_whitespace_variant_elsewhere(tmp_path):
    original = "def a():\n    x = 1\n\ndef b():\n        x = 1\n"
    write(tmp_path, {"experiment.py": original})
    result = apply_edits(tmp_path, block("experiment.py", "    x = 1\n", "    x = 2\n"))
    assert result.ok and (tmp_path / "experiment.py").read_text() == original.replace(
        "    x = 1", "    x = 2", 1
    )


def test_tabs_shift_keeps_tabs_and_replace_own_tabs(tmp_path):
    original = "def f():\n\tif ok:\n\t\treturn 1\n\treturn 0\n"
    write(tmp_path, {"experiment.py": original})
    result = apply_edits(
        tmp_path, block("experiment.py", "if ok:\n\treturn 1\n", "if ok:\n\tlog()\n\treturn 2\n")
    )
    assert result.ok and result.outcomes[0].rule == "indent-shift"
    assert (
        tmp_path / "experiment.py"
    ).read_text() == "def f():\n\tif ok:\n\t\tlog()\n\t\treturn 2\n\treturn 0\n"


# ---------------------------------------------------------------------------------------------- already applied


def test_search_absent_and_replace_present_once_counts_as_already_applied(tmp_path):
    write(tmp_path, {"experiment.py": PY.replace("3e-3", "1e-3")})
    result = apply_edits(
        tmp_path,
        block("experiment.py", "        self.lr = 3e-3\n", "        self.lr = 1e-3\n")
        + block("experiment.py", "        self.steps = 100\n", "        self.steps = 50\n"),
    )
    assert result.ok and result.already_applied == [1] and result.changed == ["experiment.py"]
    assert [o.status for o in result.outcomes] == ["already_applied", "applied"]
    assert (tmp_path / "experiment.py").read_text() == PY.replace("3e-3", "1e-3").replace("100", "50")


def test_replace_present_twice_is_not_already_applied(tmp_path):
    original = "a = 1\nb = 2\na = 1\n"
    write(tmp_path, {"experiment.py": original})
    result = apply_edits(tmp_path, block("experiment.py", "a = 0\n", "a = 1\n"))
    assert not result.ok and (tmp_path / "experiment.py").read_text() == original


# ---------------------------------------------------------------------------------------------- text details


def test_crlf_file_keeps_crlf_and_missing_final_newline(tmp_path):
    original = b"x = 1\r\ny = 2\r\nz = 3"
    write(tmp_path, {"experiment.py": original})
    result = apply_edits(tmp_path, block("experiment.py", "y = 2\nz = 3\n", "y = 20\nz = 30\nw = 4\n"))
    assert result.ok
    assert (tmp_path / "experiment.py").read_bytes() == b"x = 1\r\ny = 20\r\nz = 30\r\nw = 4"


def test_missing_final_newline_is_kept_when_editing_elsewhere_and_when_deleting_the_last_line(tmp_path):
    write(tmp_path, {"experiment.py": "a\nb\nc"})
    assert apply_edits(tmp_path, block("experiment.py", "a\n", "A\n")).ok
    assert (tmp_path / "experiment.py").read_text() == "A\nb\nc"
    assert apply_edits(tmp_path, block("experiment.py", "b\nc\n", "b\n")).ok
    assert (tmp_path / "experiment.py").read_text() == "A\nb"


def test_unicode_and_byte_order_mark_survive(tmp_path):
    original = "\ufeff# résumé: α-mix 🚀\nalpha = 0.5  # α\n".encode()
    write(tmp_path, {"notes.txt": original})
    result = apply_edits(
        tmp_path, block("notes.txt", "alpha = 0.5  # α\n", "alpha = 0.7  # α → β\n", lang="")
    )
    assert result.ok
    assert (
        tmp_path / "notes.txt"
    ).read_bytes() == "\ufeff# résumé: α-mix 🚀\nalpha = 0.7  # α → β\n".encode()


def test_a_file_that_is_not_utf8_fails_cleanly(tmp_path):
    write(tmp_path, {"notes.txt": b"caf\xe9\n"})
    result = apply_edits(tmp_path, block("notes.txt", "caf\n", "cafe\n"))
    assert not result.ok and "not UTF-8" in result.feedback
    assert (tmp_path / "notes.txt").read_bytes() == b"caf\xe9\n"


def test_empty_search_creates_a_new_editable_file(tmp_path):
    result = apply_edits(tmp_path, block("plot.py", "", "import matplotlib\n"))
    assert result.ok and result.changed == ["plot.py"] and result.outcomes[0].status == "created"
    assert (tmp_path / "plot.py").read_text() == "import matplotlib\n"


def test_empty_search_fills_an_empty_file(tmp_path):
    write(tmp_path, {"notes.txt": ""})
    result = apply_edits(tmp_path, block("notes.txt", "", "# Notes\n", lang=""))
    assert result.ok and (tmp_path / "notes.txt").read_text() == "# Notes\n"


def test_empty_search_on_a_non_empty_file_fails_with_advice(tmp_path):
    write(tmp_path, {"experiment.py": PY})
    result = apply_edits(tmp_path, block("experiment.py", "", "print('hi')\n"))
    assert not result.ok and "already exists and is not empty" in result.feedback
    assert "SEARCH its last lines" in result.feedback
    assert (tmp_path / "experiment.py").read_text() == PY


def test_blocks_on_one_file_apply_in_sequence_and_a_new_file_can_be_edited_after_creation(tmp_path):
    write(tmp_path, {"experiment.py": "a = 1\n"})
    reply = (
        block("experiment.py", "a = 1\n", "a = 1\nb = 2\n")
        + block("experiment.py", "b = 2\n", "b = 3\n")
        + block("plot.py", "", "x = 1\n")
        + block("plot.py", "x = 1\n", "x = 2\n")
    )
    result = apply_edits(tmp_path, reply)
    assert result.ok and result.changed == ["experiment.py", "plot.py"]
    assert snapshot(tmp_path) == {"experiment.py": b"a = 1\nb = 3\n", "plot.py": b"x = 2\n"}


def test_file_mode_is_kept(tmp_path):
    write(tmp_path, {"experiment.py": "a = 1\n"})
    os.chmod(tmp_path / "experiment.py", 0o755)
    assert apply_edits(tmp_path, block("experiment.py", "a = 1\n", "a = 2\n")).ok
    assert (tmp_path / "experiment.py").stat().st_mode & 0o777 == 0o755


# ---------------------------------------------------------------------------------------------- all or nothing


def test_one_failing_block_means_nothing_is_written_and_feedback_covers_every_failure(tmp_path):
    files = {"experiment.py": PY, "plot.py": "plt.plot(x)\n"}
    write(tmp_path, files)
    before = snapshot(tmp_path)
    reply = (
        "Lower the learning rate.\n\n"
        + block("experiment.py", "        self.lr = 3e-3\n", "        self.lr = 1e-3\n")
        + block("plot.py", "plt.plot(x, y)\n", "plt.plot(x, y, 'o')\n")
        + block("experiment.py", "            loss = self.stepp()\n", "            loss = 0\n")
    )
    result = apply_edits(tmp_path, reply)
    assert not result.ok and result.changed == [] and snapshot(tmp_path) == before
    assert [o.status for o in result.outcomes] == ["applied", "failed", "failed"]
    fb = result.feedback
    assert fb.startswith("2 of 3 SEARCH/REPLACE blocks failed, so nothing was applied")
    assert "## Block 2 (plot.py) failed" in fb and "## Block 3 (experiment.py) failed" in fb
    assert "    plt.plot(x, y)" in fb  # the block's first lines
    assert "  1 | plt.plot(x)" in fb  # closest actual lines, numbered
    assert "8 |             loss = self.step()" in fb
    assert "blocks 2, 3 corrected" in fb and "block 1 again" in fb


def test_edits_list_is_accepted_as_well_as_reply_text(tmp_path):
    write(tmp_path, {"experiment.py": "a = 1\n"})
    result = apply_edits(tmp_path, [Edit(path="experiment.py", search="a = 1", replace="a = 2", block=1)])
    assert result.ok and (tmp_path / "experiment.py").read_text() == "a = 2\n"


# ---------------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize(
    "path, needle",
    [
        ("/etc/passwd", "absolute path"),
        ("../experiment.py", "uses '..'"),
        ("sub/../../experiment.py", "uses '..'"),
        (".git/config", "never edited"),
        (".orchestrator/journal.jsonl", "never edited"),
        ("sae_data.py", "protected by the template"),
        ("run_1/final_info.json", "not one of the files you may edit"),
    ],
)
def test_forbidden_paths_fail_naming_the_allowed_files(tmp_path, path, needle):
    write(
        tmp_path,
        {
            "experiment.py": "a = 1\n",
            "sae_data.py": "a = 1\n",
            ".git/config": "a = 1\n",
            ".orchestrator/journal.jsonl": "a = 1\n",
            "run_1/final_info.json": "a = 1\n",
        },
    )
    before = snapshot(tmp_path)
    result = apply_edits(
        tmp_path,
        block(path, "a = 1\n", "a = 2\n"),
        editable=("*.py", "*.txt", ".git/*"),
        protected=("sae_*.py",),
    )
    assert not result.ok and needle in result.feedback
    assert "Files you may edit: *.py, *.txt, .git/*" in result.feedback or needle in (
        "absolute path",
        "uses '..'",
    )
    assert snapshot(tmp_path) == before


def test_symlinks_leading_outside_or_to_a_protected_file_are_refused(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    write(outside, {"secret.py": "a = 1\n"})
    write(root, {"sae_data.py": "a = 1\n"})
    (root / "experiment.py").symlink_to(outside / "secret.py")
    (root / "plot.py").symlink_to(root / "sae_data.py")
    (root / "sub").symlink_to(outside, target_is_directory=True)
    editable = ("*.py", "sub/*")
    for path, needle in [
        ("experiment.py", "leading outside"),
        ("sub/secret.py", "leading outside"),
        ("plot.py", "protected"),
    ]:
        result = apply_edits(
            root, block(path, "a = 1\n", "a = 2\n"), editable=editable, protected=("sae_data.py",)
        )
        assert not result.ok and needle in result.feedback, path
    assert (outside / "secret.py").read_text() == "a = 1\n" and (
        root / "sae_data.py"
    ).read_text() == "a = 1\n"


def test_a_symlink_inside_the_folder_to_an_editable_file_edits_the_target(tmp_path):
    write(tmp_path, {"experiment.py": "a = 1\n"})
    (tmp_path / "link.py").symlink_to(tmp_path / "experiment.py")
    result = apply_edits(tmp_path, block("link.py", "a = 1\n", "a = 2\n"), editable=("*.py",))
    assert result.ok and (tmp_path / "link.py").is_symlink()
    assert (tmp_path / "experiment.py").read_text() == "a = 2\n"


def test_default_editable_files_and_dot_slash_paths():
    assert DEFAULT_EDITABLE == ("experiment.py", "plot.py", "notes.txt")


def test_dot_slash_path_is_the_same_file(tmp_path):
    write(tmp_path, {"experiment.py": "a = 1\n"})
    result = apply_edits(tmp_path, block("./experiment.py", "a = 1\n", "a = 2\n"))
    assert result.ok and result.changed == ["experiment.py"]


# ---------------------------------------------------------------------------------------------- plan line


@pytest.mark.parametrize(
    "reply, expected",
    [
        (
            "## **Run 2: add the sigmoid gate**\n\nexperiment.py\n```python\n" + BODY + "```\n",
            "Run 2: add the sigmoid gate",
        ),
        ("- `lr` goes down\n\nexperiment.py\n" + BODY, "lr goes down"),
        ("experiment.py\n```python\n" + BODY + "```\nDone.\n", ""),
        ("```bash\nls\n```\n\n> Plan: *tune* it\n" + "experiment.py\n" + BODY, "Plan: *tune* it"),
        ("word " * 40, ("word " * 14).strip() + "…"),
        ("A plan wrapped\nover two lines.\n\nA second paragraph.\n\nexperiment.py\n" + BODY,
         "A plan wrapped over two lines."),
        ("Intro:\n- first item\n- second\n\nexperiment.py\n" + BODY, "Intro:"),
    ],
)
def test_plan_line(reply, expected):
    assert plan_line(reply) == expected
    assert len(plan_line(reply)) <= 72


LONG_PLAN = ("Run 2: raise the learning rate to 0.3 because the baseline underfits. We also add warmup for the first "
             "100 steps so that the larger rate stays stable. Expect the score to rise.")


def test_a_long_plan_is_cut_at_a_sentence_or_word_with_an_ellipsis_and_kept_whole_where_there_is_room():
    reply = LONG_PLAN + "\n\nexperiment.py\n" + BODY
    assert plan_line(reply, 400) == LONG_PLAN
    assert plan_line(reply) == "Run 2: raise the learning rate to 0.3 because the baseline underfits. …"
    one_sentence = LONG_PLAN.split(". ")[1]  # no sentence ends within 72 characters: cut at a word
    cut = plan_line(one_sentence + "\n\nexperiment.py\n" + BODY)
    assert cut.endswith("…") and len(cut) <= 72 and one_sentence.startswith(cut[:-1])
    assert one_sentence[len(cut) - 1] == " "  # the cut falls between words
    assert shorten("x" * 100, 72) == "x" * 71 + "…"  # one word longer than the room: cut, still marked


# ------------------------------------------------------------------------------------- shapes of real replies
# Each shape below was seen in replies real models wrote in AI-Scientist sessions (content made up, same shape).


def test_a_stray_divider_right_before_the_replace_marker_ends_the_replace_text(tmp_path):
    write(tmp_path, {"experiment.py": "import os\n\nprint(os.getcwd())\n"})
    reply = (
        "experiment.py\n```python\n<<<<<<< SEARCH\nimport os\n=======\nimport os\nimport time\n=======\n"
        ">>>>>>> REPLACE\n```\n"
    )
    result = apply_edits(tmp_path, reply)
    assert result.ok, result.feedback
    assert (tmp_path / "experiment.py").read_text() == "import os\nimport time\n\nprint(os.getcwd())\n"


@pytest.mark.parametrize(
    "ending", [pytest.param(">>>>>>> REPLACE\n```\n", id="replace-marker"), pytest.param("```\n", id="fence")]
)
def test_a_replace_holding_nothing_but_a_stray_divider_is_refused(tmp_path, ending):
    write(tmp_path, {"experiment.py": "import os\nimport time\n"})
    reply = "experiment.py\n```python\n<<<<<<< SEARCH\nimport time\n=======\n=======\n" + ending
    result = apply_edits(tmp_path, reply)
    assert (
        not result.ok and "holds nothing but" in result.feedback and "Nothing was applied" in result.feedback
    )
    assert (tmp_path / "experiment.py").read_text() == "import os\nimport time\n"


@pytest.mark.parametrize(
    "between",
    [
        pytest.param("```\n\nplot.py\n```python\n", id="fence-close-then-next-block"),
        pytest.param("\nplot.py\n```python\n", id="next-block-header-right-after"),
        pytest.param("", id="next-search-marker-right-after"),
    ],
)
def test_a_divider_used_as_the_end_of_a_block_ends_it_when_a_new_block_follows(tmp_path, between):
    write(tmp_path, {"experiment.py": "lr = 3e-3\n", "plot.py": "title = 'old'\n"})
    second_path = "plot.py" if "plot.py" in between else "experiment.py"
    second = (
        ("title = 'old'\n", "title = 'new'\n") if second_path == "plot.py" else ("lr = 1e-3\n", "lr = 2e-3\n")
    )
    reply = (
        "experiment.py\n```python\n<<<<<<< SEARCH\nlr = 3e-3\n=======\nlr = 1e-3\n=======\n"
        + between
        + f"<<<<<<< SEARCH\n{second[0]}=======\n{second[1]}>>>>>>> REPLACE\n```\n"
    )
    result = apply_edits(tmp_path, reply)
    assert result.ok and result.blocks == 2, result.feedback
    assert [e.path for e in parse_edits(reply)] == ["experiment.py", second_path]
    expected_lr = "lr = 2e-3\n" if second_path == "experiment.py" else "lr = 1e-3\n"
    assert (tmp_path / "experiment.py").read_text() == expected_lr
    expected_title = "title = 'new'\n" if second_path == "plot.py" else "title = 'old'\n"
    assert (tmp_path / "plot.py").read_text() == expected_title


@pytest.mark.parametrize(
    "tail", [pytest.param("```\n\nRun it.\n", id="fence-close"), pytest.param("\n", id="end-of-reply")]
)
def test_a_divider_used_as_the_end_of_the_last_block_ends_it(tmp_path, tail):
    write(tmp_path, {"experiment.py": "lr = 3e-3\n"})
    reply = "experiment.py\n```python\n<<<<<<< SEARCH\nlr = 3e-3\n=======\nlr = 1e-3\n=======\n" + tail
    result = apply_edits(tmp_path, reply)
    assert result.ok, result.feedback
    assert (tmp_path / "experiment.py").read_text() == "lr = 1e-3\n"


def test_a_second_divider_followed_by_more_text_is_still_a_malformed_block(tmp_path):
    write(tmp_path, {"experiment.py": "lr = 3e-3\n"})
    reply = (
        "experiment.py\n```python\n<<<<<<< SEARCH\nlr = 3e-3\n=======\nlr = 1e-3\n=======\nlr = 2e-3\n```\n"
    )
    result = apply_edits(tmp_path, reply)
    assert not result.ok and "expected a '>>>>>>> REPLACE' line" in result.feedback
    assert (tmp_path / "experiment.py").read_text() == "lr = 3e-3\n"


@pytest.mark.parametrize(
    "ending, expected",
    [
        pytest.param("=======\n\n", "x = 2\n", id="blank-line-after-the-stray-divider"),
        pytest.param("=======\n=======\n", "x = 2\n", id="two-stray-dividers"),
        pytest.param("\n=======\n", "x = 2\n\n", id="blank-line-before-the-stray-divider-is-content"),
    ],
)
def test_stray_dividers_at_the_end_of_replace_are_dropped_and_nothing_else(tmp_path, ending, expected):
    write(tmp_path, {"experiment.py": "x = 1\n"})
    reply = f"experiment.py\n```\n<<<<<<< SEARCH\nx = 1\n=======\nx = 2\n{ending}>>>>>>> REPLACE\n```\n"
    result = apply_edits(tmp_path, reply)
    assert result.ok, result.feedback
    assert (tmp_path / "experiment.py").read_text() == expected


@pytest.mark.parametrize(
    "name, header",
    [
        pytest.param("my notes.txt", "my notes.txt\n", id="bare"),
        pytest.param("data prep.py", "`data prep.py`\n", id="backticks"),
        pytest.param("data prep.py", "**`data prep.py`**:\n", id="bold-backticks-colon"),
        pytest.param("my notes.txt", '"my notes.txt"\n', id="double-quotes"),
    ],
)
def test_a_file_name_with_spaces_resolves_to_that_editable_file(tmp_path, name, header):
    write(tmp_path, {name: "a = 1\n", "experiment.py": "a = 1\n"})
    reply = f"{header}```\n<<<<<<< SEARCH\na = 1\n=======\na = 2\n>>>>>>> REPLACE\n```\n"
    result = apply_edits(tmp_path, reply, editable=("*.py", "*.txt"))
    assert result.ok and result.changed == [name], result.feedback
    assert (tmp_path / name).read_text() == "a = 2\n" and (
        tmp_path / "experiment.py"
    ).read_text() == "a = 1\n"


def test_a_prose_line_with_spaces_before_a_fence_is_not_taken_for_a_path(tmp_path):
    write(tmp_path, {"experiment.py": "a = 1\nb = 1\n"})
    reply = (
        block("experiment.py", "a = 1\n", "a = 2\n")
        + "\nThen change b in experiment.py:\n"
        + "```python\n<<<<<<< SEARCH\nb = 1\n=======\nb = 2\n>>>>>>> REPLACE\n```\n"
    )
    result = apply_edits(tmp_path, reply, editable=("*.py",))
    assert result.ok and (tmp_path / "experiment.py").read_text() == "a = 2\nb = 2\n"


TABBED = (
    "class Model:\n\tdef __init__(self):\n\t\tself.lr = 3e-3\n\t\tself.steps = 100\n\n"
    "\tdef run(self):\n\t\treturn self.lr\n"
)


def test_a_tab_indented_file_edited_with_a_space_indented_search_keeps_its_tabs(tmp_path):
    write(tmp_path, {"experiment.py": TABBED})
    reply = block(
        "experiment.py",
        "        self.lr = 3e-3\n        self.steps = 100\n",
        "        self.lr = 1e-3\n        self.steps = 100\n        self.decay = 0.9\n",
    )
    result = apply_edits(tmp_path, reply)
    assert result.ok and result.outcomes[0].rule == "indent-map", result.feedback
    assert (tmp_path / "experiment.py").read_text() == TABBED.replace(
        "\t\tself.lr = 3e-3\n\t\tself.steps = 100\n",
        "\t\tself.lr = 1e-3\n\t\tself.steps = 100\n\t\tself.decay = 0.9\n",
    )


def test_a_space_indented_file_edited_with_a_tab_indented_search_keeps_its_spaces(tmp_path):
    write(tmp_path, {"experiment.py": PY})
    result = apply_edits(tmp_path, block("experiment.py", "\t\tself.lr = 3e-3\n", "\t\tself.lr = 1e-3\n"))
    assert result.ok and result.outcomes[0].rule == "indent-map", result.feedback
    assert (tmp_path / "experiment.py").read_text() == PY.replace("3e-3", "1e-3")


def test_tab_mapping_finding_two_places_is_ambiguous(tmp_path):
    original = "def a():\n\tx = 1\n\ndef b():\n\tx = 1\n"
    write(tmp_path, {"experiment.py": original})
    result = apply_edits(tmp_path, block("experiment.py", "  x = 1\n", "  x = 2\n"))
    assert not result.ok and "must match exactly one" in result.feedback
    assert (tmp_path / "experiment.py").read_text() == original


def test_a_tab_file_gets_tabs_for_the_deeper_lines_a_space_indented_replace_adds(tmp_path):
    original = "def f(xs):\n\tfor x in xs:\n\t\tif x:\n\t\t\tshow(x)\n"
    write(tmp_path, {"experiment.py": original})
    result = apply_edits(
        tmp_path,
        block("experiment.py", "        if x:\n", "        if x > 0:\n            count(x)\n"),
    )
    assert result.ok, result.feedback
    after = (tmp_path / "experiment.py").read_text()
    assert after == "def f(xs):\n\tfor x in xs:\n\t\tif x > 0:\n\t\t\tcount(x)\n\t\t\tshow(x)\n"
    compile(after, "experiment.py", "exec")  # no TabError: one kind of indentation in the block


def test_a_one_line_replace_found_only_at_another_indentation_is_not_already_applied(tmp_path):
    original = "def f():\n    x = 2\n    return x\n"
    write(tmp_path, {"experiment.py": original})
    result = apply_edits(tmp_path, block("experiment.py", "x = 1\n", "x = 2\n"))
    assert not result.ok and result.already_applied == []
    assert "does not match any lines" in result.feedback
    assert (tmp_path / "experiment.py").read_text() == original


def test_a_two_line_replace_found_at_another_indentation_still_counts_as_already_applied(tmp_path):
    original = "def f():\n    x = 2\n    y = 3\n"
    write(tmp_path, {"experiment.py": original})
    result = apply_edits(tmp_path, block("experiment.py", "x = 1\ny = 1\n", "x = 2\ny = 3\n"))
    assert result.ok and result.already_applied == [1] and result.changed == []


@pytest.mark.parametrize(
    "placeholder, expected",
    [
        pytest.param(
            "# plot.py: the model writes this file\n\n",
            "# plot.py: the model writes this file\n\nimport matplotlib\nplot()\n",
            id="comment-and-blank-line",
        ),
        pytest.param(
            "# to be written", "# to be written\nimport matplotlib\nplot()", id="no-final-newline-not-glued"
        ),
    ],
)
def test_empty_search_on_a_placeholder_file_of_comments_appends_on_a_new_line(
    tmp_path, placeholder, expected
):
    write(tmp_path, {"plot.py": placeholder})
    result = apply_edits(tmp_path, block("plot.py", "", "import matplotlib\nplot()\n"))
    assert result.ok and result.changed == ["plot.py"], result.feedback
    assert (tmp_path / "plot.py").read_text() == expected


def test_empty_search_on_a_placeholder_whose_comments_reappear_in_replace_is_refused(tmp_path):
    placeholder = "# Title: robust SAE\n# Experiment description: median statistics\n"
    write(tmp_path, {"notes.txt": placeholder})
    reply = block("notes.txt", "", placeholder + "\n## Run 0: Baseline\n", lang="")
    result = apply_edits(tmp_path, reply)
    assert not result.ok and "already exists and is not empty" in result.feedback
    assert (tmp_path / "notes.txt").read_text() == placeholder


def test_empty_search_whose_replace_is_a_main_guard_appends_it_when_the_file_has_none(tmp_path):
    original = "def main():\n    print('run')\n"
    write(tmp_path, {"experiment.py": original})
    guard = '\n\nif __name__ == "__main__":\n    main()\n'
    result = apply_edits(tmp_path, block("experiment.py", "", guard))
    assert result.ok and result.changed == ["experiment.py"], result.feedback
    assert (tmp_path / "experiment.py").read_text() == original + guard


WITH_GUARD = (
    "class Model:\n    def f(self):\n        return 0\n\n\nif __name__ == '__main__':\n    Model().f()\n"
)


@pytest.mark.parametrize(
    "original, replace",
    [
        pytest.param(
            WITH_GUARD, "    def extra(self):\n        return 1\n", id="indented-method-would-leave-its-class"
        ),
        pytest.param(WITH_GUARD, "def helper():\n    return 1\n", id="helper-defined-after-the-main-guard"),
        pytest.param(WITH_GUARD, "if __name__ == '__main__':\n    main()\n", id="a-second-main-guard"),
        pytest.param(WITH_GUARD, "print('hi')\n", id="plain-statement"),
        pytest.param(
            "class Model:\n    pass\n",
            "if __name__ == '__main__':\n    main()\ndef late():\n    pass\n",
            id="main-guard-followed-by-a-definition",
        ),
        pytest.param(
            "class Model:\n    pass\n",
            "    if __name__ == '__main__':\n        main()\n",
            id="indented-guard",
        ),
    ],
)
def test_empty_search_on_a_file_with_code_stays_refused(tmp_path, original, replace):
    write(tmp_path, {"experiment.py": original})
    result = apply_edits(tmp_path, block("experiment.py", "", replace))
    assert not result.ok and "already exists and is not empty" in result.feedback
    assert (tmp_path / "experiment.py").read_text() == original


TRAIN_EVAL = """\
def train(steps):
    for step in range(steps):
        loss = step * 0.5
        log(loss)


def evaluate(steps):
    for step in range(steps):
        loss = step * 0.5
        report(loss)
"""


def test_the_same_search_in_as_many_blocks_as_places_takes_the_places_in_file_order(tmp_path):
    write(tmp_path, {"experiment.py": TRAIN_EVAL, "plot.py": "x = 1\n"})
    reply = (
        block("experiment.py", "        loss = step * 0.5\n", "        loss = step * 0.25\n")
        + block("plot.py", "x = 1\n", "x = 2\n")
        + block("experiment.py", "        loss = step * 0.5\n", "        loss = step * 0.75\n")
    )
    result = apply_edits(tmp_path, reply)
    assert result.ok, result.feedback
    assert [(o.block, o.status, o.line) for o in result.outcomes] == [
        (1, "applied", 3),
        (2, "applied", 1),
        (3, "applied", 9),
    ]
    assert (tmp_path / "experiment.py").read_text() == TRAIN_EVAL.replace("0.5", "0.25", 1).replace(
        "0.5", "0.75"
    )


def test_blocks_sharing_a_search_that_adds_lines_apply_once_and_are_recognised_when_sent_again(tmp_path):
    write(tmp_path, {"experiment.py": TRAIN_EVAL})
    add = block(
        "experiment.py", "        loss = step * 0.5\n", "        loss = step * 0.5\n        loss.check()\n"
    )
    result = apply_edits(tmp_path, add + add)
    assert result.ok, result.feedback
    expected = TRAIN_EVAL.replace("step * 0.5\n", "step * 0.5\n        loss.check()\n")
    assert (tmp_path / "experiment.py").read_text() == expected
    again = apply_edits(tmp_path, add + add)
    assert again.ok and again.changed == [] and again.already_applied == [1, 2]
    assert (tmp_path / "experiment.py").read_text() == expected


@pytest.mark.parametrize(
    "original, blocks",
    [
        pytest.param(
            TRAIN_EVAL + "\n\ndef test(steps):\n    loss = step * 0.5\n", 2, id="three-places-two-blocks"
        ),
        pytest.param(TRAIN_EVAL, 3, id="two-places-three-blocks"),
    ],
)
def test_the_same_search_in_a_different_number_of_blocks_than_places_stays_ambiguous(
    tmp_path, original, blocks
):
    write(tmp_path, {"experiment.py": original})
    one = block("experiment.py", "loss = step * 0.5\n", "loss = step * 0.1\n")
    result = apply_edits(tmp_path, one * blocks)
    assert not result.ok and "must match exactly one" in result.feedback
    assert (tmp_path / "experiment.py").read_text() == original


def test_a_block_that_changes_a_place_claimed_by_a_later_twin_fails_the_reply(tmp_path):
    write(tmp_path, {"experiment.py": TRAIN_EVAL})
    reply = (
        block("experiment.py", "        loss = step * 0.5\n", "        loss = step * 0.25\n")
        + block("experiment.py", "        loss = step * 0.5\n        report(loss)\n", "        pass\n")
        + block("experiment.py", "        loss = step * 0.5\n", "        loss = step * 0.75\n")
    )
    result = apply_edits(tmp_path, reply)
    assert not result.ok and (tmp_path / "experiment.py").read_text() == TRAIN_EVAL
    assert [o.status for o in result.outcomes] == ["applied", "applied", "failed"]
    assert "block 2" in result.outcomes[2].reason


def test_a_block_naming_a_missing_file_applies_where_its_search_matches_once_and_says_so(tmp_path):
    write(tmp_path, {"experiment.py": PY, "notes.txt": "# Notes\n"})
    result = apply_edits(tmp_path, block("plot.py", "        self.lr = 3e-3\n", "        self.lr = 1e-3\n"))
    assert result.ok and result.changed == ["experiment.py"], result.feedback
    assert "plot.py" in result.feedback and "experiment.py" in result.feedback
    assert result.outcomes[0].path == "experiment.py"
    assert (tmp_path / "experiment.py").read_text() == PY.replace("3e-3", "1e-3")
    assert not (tmp_path / "plot.py").exists()


LR = "        self.lr = 3e-3\n"


@pytest.mark.parametrize(
    "path, files, search",
    [
        pytest.param("sae_experiment.py", {}, LR, id="protected"),
        pytest.param("../experiment.py", {}, LR, id="parent-dir"),
        pytest.param("/tmp/experiment.py", {}, LR, id="absolute"),
        pytest.param("run_1/experiment.py", {}, LR, id="outside-the-editable-patterns"),
        pytest.param("plot.py", {"notes.txt": LR}, LR, id="matches-in-two-files"),
        pytest.param("plot.py", {"notes.txt": "# Notes\n"}, "        self.lr = 9e-3\n", id="matches-nowhere"),
        pytest.param("plot.py", {}, "        x = compute()\n", id="matches-twice-in-one-file"),
    ],
)
def test_a_block_naming_a_missing_file_is_not_redirected_unless_safe_and_unique(
    tmp_path, path, files, search
):
    write(tmp_path, {"experiment.py": PY + TWICE, **files})
    before = snapshot(tmp_path)
    result = apply_edits(
        tmp_path,
        block(path, search, "        self.lr = 1e-3\n"),
        editable=("experiment.py", "plot.py", "notes.txt", "sae_*.py"),
        protected=("sae_*.py",),
    )
    assert not result.ok and result.changed == []
    assert snapshot(tmp_path) == before
