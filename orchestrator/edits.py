"""SEARCH/REPLACE edits: parse a model's reply, find each block's ONE place, apply all blocks or none.

A reply holds blocks like this (the path alone on the line before the fence)::

    experiment.py
    ```python
    <<<<<<< SEARCH
        lr = 3e-3
    =======
        lr = 1e-3
    >>>>>>> REPLACE
    ```

Matching rules, tried in order; a rule that finds one place wins, a rule that finds several fails the block:

1. ``exact``: the SEARCH lines, whole and exact;
2. ``trailing-whitespace``: the same, ignoring trailing whitespace on each line;
3. ``indent-shift``: the SEARCH lines shifted by one uniform indentation (REPLACE is shifted the same way);
4. ``indent-map``: where neither indentation is a suffix of the other (a file indented with tabs, SEARCH with
   spaces, or the reverse), SEARCH's common leading whitespace stands for one prefix that is identical on every
   matched non-blank line of the file; REPLACE gets the same mapping, so the file keeps its own indentation
   (deeper REPLACE lines too, in the file's unit, when SEARCH sits at one level). Like rule 3 it re-indents
   uniformly and must find exactly one place, so it cannot pick between two places;
5. ``blank-lines-trimmed``: rules 1-4 again with leading/trailing blank SEARCH lines dropped;
6. ``elision``: ``...`` lines split SEARCH and REPLACE into pieces; each piece must be found once, in order.

No similarity-based replacement: ``difflib`` only ever produces *suggestions* in the feedback text.
Every block is applied to an in-memory copy first; files are written (atomically) only when every block
succeeded, so a failed reply leaves the folder exactly as it was.

Shapes of real replies (measured on model replies written in AI-Scientist sessions) read the way a person
reading the reply would, each narrow enough that a block still applies at exactly one place or not at all:

- A divider line at the end of REPLACE, right before ``>>>>>>> REPLACE``, is a terminator, not content: written
  into the file it is a syntax error the model did not mean. A REPLACE holding nothing but it is refused.
- A block with no ``>>>>>>> REPLACE`` whose second ``=======`` is followed only by a closing fence, the next
  block or the end of the reply ends at that divider (any text after it leaves the block malformed, as before).
- An empty SEARCH on an existing non-blank file is refused, except two appends: the file holds nothing but
  comment and blank lines (a placeholder), none of which REPLACE repeats; or the file is Python without an
  ``if __name__ ==`` line and REPLACE is such a guard at column 0 followed only by its indented body. Both are
  added after the file's last line, on a line of their own. An indented method appended after the main guard
  would land outside its class, a helper would be defined after main() ran: both stay refused.
- The same SEARCH text in k blocks of one reply for one file, found at exactly k places when the first of them
  is applied: the blocks take the places in file order (a block whose REPLACE already stands around its place
  is already applied). Any other count stays ambiguous, and a place changed by a block in between fails the
  block that was to take it. Taking "the first match" in general was measured to write wrong edits.
- A block whose SEARCH matches nowhere counts as already applied when its REPLACE is found once (or once per
  block carrying the same SEARCH and REPLACE); found only through the indentation or blank-line rules, REPLACE
  must hold at least two non-blank lines: one line elsewhere at another indentation is no sign of the change.
- A block naming a file that does not exist, with a non-empty SEARCH that matches exactly one place in exactly
  one editable file (and nowhere in the others), is applied there and the result's feedback says so. Only for
  a path that passed every safety check (no ``..``, not absolute, not protected, editable by pattern).
- A path line may name a file with spaces (``my notes.txt``): in backticks or quotes, or bare when it names an
  existing editable file (a bare line of prose before a fence is not a path).
- A file's missing final newline stays missing (aider adds one; a tie, kept for the smallest change).
"""

from __future__ import annotations

import difflib
import fnmatch
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from orchestrator.atomic import write_temp_beside
from orchestrator.errors import OrchestratorError

DEFAULT_EDITABLE: tuple[str, ...] = ("experiment.py", "plot.py", "notes.txt")
NEVER_EDITABLE_DIRS = frozenset({".git", ".orchestrator"})

SEARCH_MARK = "<<<<<<< SEARCH"
DIVIDER_MARK = "======="
REPLACE_MARK = ">>>>>>> REPLACE"

_SEARCH_RE = re.compile(r"^\s*<{5,9}\s?SEARCH\s*>?\s*$")
_DIVIDER_RE = re.compile(r"^\s*={5,9}\s*$")
_REPLACE_RE = re.compile(r"^\s*>{5,9}\s?REPLACE\s*$")
_FENCE_RE = re.compile(r"^\s*(`{3,}|~{3,})\s*(.*?)\s*$")
_ELISION_RE = re.compile(r"^\s*\.\.\.\s*$")
_PATH_CHARS_RE = re.compile(r"[\w\-./\\+@]+(?: [\w\-./\\+@]+)*")  # single spaces inside a name
_QUOTED_PATH_RE = re.compile(
    r"^(?:(?:file(?:name)?|path)\s*:\s*)?[*_]*([`'\"])[^`'\"]+\1[*_]*:?$", re.IGNORECASE
)
_COMMENT_RE = re.compile(r"^(#|//|--|;|<!--)")

_Known = Callable[[str], bool]  # does this path name an existing file the reply may edit?

SUGGEST_MIN_SCORE = 0.6
FEEDBACK_HEAD_LINES = 3
FEEDBACK_MAX_SUGGESTED_LINES = 15


# ---------------------------------------------------------------------------------------------- data


class EditParseError(OrchestratorError, ValueError):
    """A reply holds a malformed SEARCH/REPLACE block; the message says which block and what was expected."""

    def __init__(self, message: str, block: int = 0):
        super().__init__(message)
        self.block = block


class Edit(BaseModel):
    """One SEARCH/REPLACE block of a reply. `search` and `replace` are whole lines ending in "\\n" (or "")."""

    path: str
    search: str
    replace: str
    block: int = Field(ge=1, description="1-based number of the block in the reply")


Status = Literal["applied", "created", "already_applied", "failed"]


class BlockOutcome(BaseModel):
    """What happened to one block (when the reply as a whole failed, `applied` means 'would have applied')."""

    block: int
    path: str
    status: Status
    rule: str = ""
    line: int | None = None
    reason: str = ""


class EditResult(BaseModel):
    ok: bool
    changed: list[str] = Field(default_factory=list)
    feedback: str = ""
    already_applied: list[int] = Field(default_factory=list)
    blocks: int = 0
    outcomes: list[BlockOutcome] = Field(default_factory=list)
    parse_error: str = ""


# ---------------------------------------------------------------------------------------------- parsing


@dataclass
class _Parsed:
    edits: list[Edit]
    first_header: int | None  # reply line where the first block's header (path / fence) starts


def parse_edits(reply: str) -> list[Edit]:
    """All SEARCH/REPLACE blocks of a reply, in order. Raises EditParseError for a malformed block."""
    return _parse(reply).edits


def _split_reply(reply: str) -> list[str]:
    return reply.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _parse(reply: str, known: _Known | None = None) -> _Parsed:
    """Blocks of a reply; `known` tells whether a bare path line holding spaces names a file (_clean_path)."""
    lines = _split_reply(reply)
    edits: list[Edit] = []
    prev_path: str | None = None
    prev_end = -1
    first_header: int | None = None
    i = 0
    while i < len(lines):
        if _REPLACE_RE.match(lines[i]):
            raise EditParseError(
                f"reply line {i + 1}: a '{REPLACE_MARK}' line with no '{SEARCH_MARK}' line before it; "
                f"each block is: path line, fence, {SEARCH_MARK}, old lines, {DIVIDER_MARK}, new lines, "
                f"{REPLACE_MARK}, fence",
                block=len(edits) + 1,
            )
        if not _SEARCH_RE.match(lines[i]):
            i += 1
            continue
        number = len(edits) + 1
        path, header = _find_path(lines, i, prev_end, known)
        if first_header is None:
            first_header = header
        if path is None:
            path = prev_path
        if path is None:
            raise EditParseError(
                f"block {number}: no file path before its '{SEARCH_MARK}' line; put the file's path alone on "
                "the line before the opening fence",
                block=number,
            )
        where = f"block {number} ({path})"
        search: list[str] = []
        j = i + 1
        while j < len(lines) and not _DIVIDER_RE.match(lines[j]):
            if _SEARCH_RE.match(lines[j]) or _REPLACE_RE.match(lines[j]):
                raise EditParseError(
                    f"{where}: expected a '{DIVIDER_MARK}' line after the SEARCH lines, "
                    f"found {lines[j].strip()!r} at reply line {j + 1}",
                    block=number,
                )
            search.append(lines[j])
            j += 1
        if j >= len(lines):
            raise EditParseError(
                f"{where}: expected a '{DIVIDER_MARK}' line after the SEARCH lines, the reply ended first",
                block=number,
            )
        replace, k = _read_replace(lines, j + 1, where, number, known)
        edits.append(Edit(path=path, search=_join(search), replace=_join(replace), block=number))
        prev_path, prev_end = path, k
        i = k + 1
    return _Parsed(edits=edits, first_header=first_header)


def _read_replace(
    lines: list[str], start: int, where: str, number: int, known: _Known | None
) -> tuple[list[str], int]:
    """The REPLACE lines from `start`, and the reply line that ends the block (its REPLACE marker or divider).

    Two shapes of real replies are read as their writers meant them:
    - divider lines at the end of REPLACE (blank lines aside) are a terminator, not content (``new lines``,
      ``=======``, ``>>>>>>> REPLACE``): written into the file they would be a syntax error the model did not
      intend. A REPLACE that holds nothing else (either way) is refused: deleting the SEARCH lines is a guess;
    - with no REPLACE marker before the next SEARCH line or the reply's end, a divider line ends the block when
      only a closing fence, the next block's header or the end of the reply follows it (blank lines aside).
    """
    k = start
    while k < len(lines) and not _REPLACE_RE.match(lines[k]) and not _SEARCH_RE.match(lines[k]):
        k += 1
    if k < len(lines) and _REPLACE_RE.match(lines[k]):
        end = k
    else:
        divider = _divider_ending_block(lines, start, k, known)
        if divider is None:
            found = (
                f"found {lines[k].strip()!r} at reply line {k + 1}"
                if k < len(lines)
                else "the reply ended first"
            )
            raise EditParseError(
                f"{where}: expected a '{REPLACE_MARK}' line after the REPLACE lines, {found}", block=number
            )
        end = divider
    replace = lines[start:end]
    last = next((n for n in range(len(replace) - 1, -1, -1) if replace[n].strip()), None)
    stray = last is not None and _DIVIDER_RE.match(replace[last]) is not None
    if stray and last is not None:
        del replace[last + 1 :]  # blank lines after the stray divider belong to the terminator
        while replace and _DIVIDER_RE.match(replace[-1]):
            replace.pop()
    if (stray or end != k) and not any(line.strip() for line in replace):
        raise EditParseError(
            f"{where}: its REPLACE holds nothing but a '{DIVIDER_MARK}' line, so it is unclear what the SEARCH "
            f"lines should become; to delete them, write '{DIVIDER_MARK}' once and then '{REPLACE_MARK}'",
            block=number,
        )
    return replace, end


def _divider_ending_block(lines: list[str], start: int, stop: int, known: _Known | None) -> int | None:
    """The first divider line in [start, stop) if it ends the block: after it (and any divider or blank lines
    right after it) comes a closing fence, the next block's header (its SEARCH line is at `stop`) or the end of
    the reply. None otherwise, also when a line of text follows the first divider."""
    first = next((d for d in range(start, stop) if _DIVIDER_RE.match(lines[d])), None)
    if first is None:
        return None
    after = next(
        (n for n in range(first + 1, stop) if lines[n].strip() and not _DIVIDER_RE.match(lines[n])), stop
    )
    if after == stop:
        return first
    fence = _FENCE_RE.match(lines[after])
    if fence is not None and not fence.group(2):
        return first
    next_header = _find_path(lines, stop, first, known)[1] if stop < len(lines) else stop
    return first if after >= next_header else None


def _join(lines: list[str]) -> str:
    return "".join(line + "\n" for line in lines)


def _find_path(
    lines: list[str], marker: int, stop: int, known: _Known | None = None
) -> tuple[str | None, int]:
    """The path written before the SEARCH line at `marker`, and the reply line where the block's header starts.

    Walks back from the marker: inside the fence a `# path` comment or a bare path line counts; the fence's
    info string may hold the path; outside the fence only the line right before it (blank lines skipped).
    """
    inside = True  # between the opening fence (if any) and the SEARCH line
    comments_skipped = 0
    header = marker
    for j in range(marker - 1, stop, -1):
        raw = lines[j]
        if not raw.strip():
            continue
        fence = _FENCE_RE.match(raw)
        if fence:
            if not inside:
                return None, header  # the previous block's closing fence
            header = j
            inside = False
            info_path = _path_from_info(fence.group(2))
            if info_path:
                return info_path, header
            continue
        candidate = _clean_path(raw, known=known)
        if candidate:
            return candidate, j
        if inside and _COMMENT_RE.match(raw.strip()) and comments_skipped < 2:
            comments_skipped += 1
            header = j
            continue
        return None, header
    return None, header


def _path_from_info(info: str) -> str | None:
    for token in re.split(r"[\s:]+", info):
        path = _clean_path(token, allow_prefix=False)
        if path:
            return path
    return None


def _clean_path(text: str, allow_prefix: bool = True, known: _Known | None = None) -> str | None:
    """The path a header line names, or None.

    A name holding spaces (``my notes.txt``) counts only when quoted (in backticks or quotes) or, written bare,
    when `known` says it names an existing editable file: a bare line of prose ("Then change experiment.py:")
    must not be taken for a path.
    """
    s = text.strip()
    if allow_prefix:
        s = re.sub(r"^(#+|//|--|;+|>+)\s*", "", s)
        s = re.sub(r"^(?:[-*+]\s+|\d+[.)]\s+)", "", s)  # a list item
    quoted = allow_prefix and bool(_QUOTED_PATH_RE.match(s))
    for _ in range(3):
        s = s.strip().strip("*_`'\"").strip().rstrip(":").strip()
        if allow_prefix:
            s = re.sub(r"^(?:file(?:name)?|path)\s*:\s*", "", s, flags=re.IGNORECASE)
    if not s or not _PATH_CHARS_RE.fullmatch(s):
        return None
    if not re.search(r"[A-Za-z0-9]", s) or s.endswith("."):
        return None
    if "." not in s and "/" not in s:
        return None
    if " " in s and not (quoted or (known is not None and known(s))):
        return None
    return s


PLAN_CHARS = 400  # a plan as kept in the journal (shown whole by `show`, `status --json` and the report)
SUBJECT_CHARS = 72  # a plan in a commit subject


def plan_line(reply: str, limit: int = SUBJECT_CHARS) -> str:
    """The reply's first paragraph of prose before the first block, without markdown markers; when longer than
    `limit`, cut at the last sentence (else word) boundary that fits, with an ellipsis."""
    try:
        parsed = _parse(reply)
        end = parsed.first_header
    except EditParseError:
        end = None
    lines = _split_reply(reply)
    if end is None:
        end = next((n for n, line in enumerate(lines) if _SEARCH_RE.match(line)), len(lines))
    in_fence = False
    paragraph: list[str] = []
    for line in lines[:end]:
        if _FENCE_RE.match(line):
            if paragraph:
                break
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        if paragraph and (not line.strip() or _starts_block(line)):
            break  # a paragraph ends at a blank line, a heading, a list item or a quote
        text = _strip_markdown(line)
        if text:
            paragraph.append(text)
    return shorten(" ".join(paragraph), limit)


def _starts_block(line: str) -> bool:
    return re.match(r"\s*(?:#+\s|>|[-*+]\s|\d+[.)]\s)", line) is not None


def _strip_markdown(line: str) -> str:
    s = line.strip()
    s = re.sub(r"^(?:#+|>+)\s*", "", s)
    s = re.sub(r"^(?:[-*+]\s+|\d+[.)]\s+)", "", s)
    s = s.replace("**", "").replace("__", "").replace("`", "")
    s = re.sub(r"^[*_]+|[*_]+$", "", s)
    return " ".join(s.split())


def shorten(text: str, limit: int) -> str:
    """`text` when it fits in `limit` characters; else its longest head that ends a sentence (or, when that
    keeps less than half, a word), followed by an ellipsis. Never cuts mid-word unless one word fills `limit`."""
    if len(text) <= limit:
        return text
    sentences = [m.end() for m in re.finditer(r"[.!?](?=\s)", text[:limit])]
    if sentences and sentences[-1] >= limit // 2:
        end = sentences[-1]
        return text[:end] + (" …" if end <= limit - 2 else "…")
    head = text[: limit - 1]  # room for "…"
    if not text[limit - 1].isspace() and " " in head.strip():
        head = head[: head.rstrip().rfind(" ")]  # the last whole word
    return head.rstrip(" ,;:-") + "…"


# ---------------------------------------------------------------------------------------------- documents


@dataclass
class _Doc:
    """A text file as lines plus each line's own terminator ("\\n", "\\r\\n", or "" for a last line without)."""

    lines: list[str] = field(default_factory=list)
    ends: list[str] = field(default_factory=list)
    newline: str = "\n"
    bom: bool = False
    exists: bool = True
    claims: dict[int, _Claim] = field(default_factory=dict)  # reply index of a later block -> its place
    block: int = 0  # the block being applied, named in any claim it breaks

    @classmethod
    def from_text(cls, text: str, exists: bool = True) -> _Doc:
        bom = text.startswith("\ufeff")
        if bom:
            text = text[1:]
        parts = text.split("\n")
        lines: list[str] = []
        ends: list[str] = []
        for n, part in enumerate(parts):
            last = n == len(parts) - 1
            if last:
                if part:
                    lines.append(part)
                    ends.append("")
                break
            if part.endswith("\r"):
                lines.append(part[:-1])
                ends.append("\r\n")
            else:
                lines.append(part)
                ends.append("\n")
        newline = "\r\n" if ends.count("\r\n") > ends.count("\n") else "\n"
        return cls(lines=lines, ends=ends, newline=newline, bom=bom, exists=exists)

    def text(self) -> str:
        return ("\ufeff" if self.bom else "") + "".join(
            a + b for a, b in zip(self.lines, self.ends, strict=True)
        )

    def is_blank(self) -> bool:
        return all(not line.strip() for line in self.lines)

    def splice(self, start: int, end: int, new: list[str]) -> None:
        """Replace lines [start, end) by `new`, keeping a missing final newline missing.

        Lines added after an unterminated last line start on a line of their own (the old last line gets a
        terminator, the new last line goes without). Places claimed by later blocks move with the text.
        """
        new_ends = [self.newline] * len(new)
        touches_unterminated_end = end == len(self.lines) and bool(self.ends) and self.ends[-1] == ""
        if touches_unterminated_end and start == end and new:
            self.ends[-1] = self.newline
        self.lines[start:end] = new
        self.ends[start:end] = new_ends
        if touches_unterminated_end:
            last = start + len(new) - 1
            if last >= 0:
                self.ends[last] = ""
        self._move_claims(start, end, len(new))

    def _move_claims(self, start: int, end: int, count: int) -> None:
        delta = count - (end - start)
        for claim in self.claims.values():
            if end <= claim.start:
                claim.start += delta
                claim.end += delta
            elif start < claim.end and claim.lost_to is None:
                claim.lost_to = self.block


@dataclass
class _Claim:
    """A place of the file taken for a later block of the reply (rule: repeated SEARCH, see the module doc)."""

    start: int
    end: int
    replace: Lines  # that block's REPLACE, shaped for this place
    rule: str
    done: bool  # that block's REPLACE already stands around this place
    lost_to: int | None = None  # the block of this reply that changed these lines first


def _decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


# ---------------------------------------------------------------------------------------------- matching


@dataclass
class _Match:
    start: int
    end: int
    replace: list[str] | None  # None: REPLACE cannot be re-indented the way SEARCH was
    rule: str


@dataclass
class _Found:
    rule: str
    matches: list[_Match]


Lines = list[str]
_Rule = Callable[[Lines, Lines, Lines], list[_Match]]


def _rule_exact(doc: Lines, search: Lines, replace: Lines) -> list[_Match]:
    n = len(search)
    first = search[0]
    out = []
    for p in range(len(doc) - n + 1):
        if doc[p] == first and doc[p : p + n] == search:
            out.append(_Match(p, p + n, list(replace), "exact"))
    return out


def _rule_trailing(doc: Lines, search: Lines, replace: Lines) -> list[_Match]:
    n = len(search)
    s = [line.rstrip() for line in search]
    d = [line.rstrip() for line in doc]
    return [
        _Match(p, p + n, list(replace), "trailing-whitespace")
        for p in range(len(doc) - n + 1)
        if d[p] == s[0] and d[p : p + n] == s
    ]


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _rule_indent(doc: Lines, search: Lines, replace: Lines) -> list[_Match]:
    """Rule 3: the window is SEARCH shifted by one indentation `delta`, added to or removed from every line."""
    n = len(search)
    anchor = next((k for k, line in enumerate(search) if line.strip()), None)
    if anchor is None:
        return []
    s_strip = [line.strip() for line in search]
    out = []
    for p in range(len(doc) - n + 1):
        window = doc[p : p + n]
        if window[anchor].strip() != s_strip[anchor]:
            continue
        f_ind, s_ind = _indent(window[anchor]), _indent(search[anchor])
        if len(f_ind) > len(s_ind) and f_ind.endswith(s_ind):
            delta, deeper = f_ind[: len(f_ind) - len(s_ind)], True
        elif len(s_ind) > len(f_ind) and s_ind.endswith(f_ind):
            delta, deeper = s_ind[: len(s_ind) - len(f_ind)], False
        else:
            continue
        if not _shift_fits(window, search, delta, deeper):
            continue
        out.append(_Match(p, p + n, _reindent(replace, delta, deeper), "indent-shift"))
    return out


def _shift_fits(window: Lines, search: Lines, delta: str, deeper: bool) -> bool:
    for f, s in zip(window, search, strict=True):
        if not s.strip():
            if f.strip():
                return False
            continue
        f, s = f.rstrip(), s.rstrip()
        if (f != delta + s) if deeper else (s != delta + f):
            return False
    return True


def _reindent(replace: Lines, delta: str, deeper: bool) -> Lines | None:
    out = []
    for line in replace:
        if not line.strip():
            out.append(line)
        elif deeper:
            out.append(delta + line)
        elif line.startswith(delta):
            out.append(line[len(delta) :])
        else:
            return None
    return out


def _rule_indent_map(doc: Lines, search: Lines, replace: Lines) -> list[_Match]:
    """Rule 4: SEARCH's common leading whitespace stands for one prefix of the file's lines (tabs for spaces).

    Only where rule 3 has no ground (neither indentation of the first non-blank line is a suffix of the other):
    every non-blank line of the window must be that same file prefix followed by what SEARCH has after its
    common whitespace; REPLACE lines get the file's prefix in place of SEARCH's common whitespace. When every
    SEARCH line sits at that common whitespace (so SEARCH shows nothing of how the file nests deeper), REPLACE's
    deeper lines are written in the file's unit too (see _units): two tabs then four spaces would mix tabs and
    spaces in one block, which Python refuses (TabError) as soon as the file's own deeper lines follow.
    """
    n = len(search)
    anchor = next((k for k, line in enumerate(search) if line.strip()), None)
    if anchor is None:
        return []
    common = os.path.commonprefix([_indent(line) for line in search if line.strip()])
    if not common:
        return []
    s_ind = _indent(search[anchor])
    inner = s_ind[len(common) :]
    s_strip = search[anchor].strip()
    flat = all(_indent(line) == common for line in search if line.strip())
    out = []
    for p in range(len(doc) - n + 1):
        window = doc[p : p + n]
        if window[anchor].strip() != s_strip:
            continue
        f_ind = _indent(window[anchor])
        if f_ind.endswith(s_ind) or s_ind.endswith(f_ind) or not f_ind.endswith(inner):
            continue
        prefix = f_ind[: len(f_ind) - len(inner)]
        if _map_fits(window, search, common, prefix):
            units = _units(common, prefix) if flat else None
            out.append(_Match(p, p + n, _remap(replace, common, prefix, units), "indent-map"))
    return out


def _map_fits(window: Lines, search: Lines, common: str, prefix: str) -> bool:
    for f, s in zip(window, search, strict=True):
        if not s.strip():
            if f.strip():
                return False
        elif f.rstrip() != prefix + s.rstrip()[len(common) :]:
            return False
    return True


def _units(common: str, prefix: str) -> tuple[str, str] | None:
    """SEARCH's and the file's indentation unit: ``common`` and ``prefix`` as the same number of repeats of
    one unit each, the most repeats possible (8 spaces / 2 tabs: 4 spaces / 1 tab); None if there is none."""
    for n in range(min(len(common), len(prefix)), 0, -1):
        if len(common) % n or len(prefix) % n:
            continue
        s_unit, f_unit = common[: len(common) // n], prefix[: len(prefix) // n]
        if s_unit * n == common and f_unit * n == prefix:
            return s_unit, f_unit
    return None


def _remap(replace: Lines, common: str, prefix: str, units: tuple[str, str] | None) -> Lines | None:
    """REPLACE with SEARCH's common whitespace swapped for the file's prefix; None if a line lacks it.

    With `units`, whitespace after the common part that is whole SEARCH units becomes as many file units; any
    other whitespace stays as written.
    """
    out = []
    for line in replace:
        if not line.strip():
            out.append(line)
            continue
        if not line.startswith(common):
            return None
        rest = line[len(common) :]
        deeper = _indent(rest)
        if units is not None and deeper:
            s_unit, f_unit = units
            count = len(deeper) // len(s_unit)
            if s_unit * count == deeper:
                rest = f_unit * count + rest[len(deeper) :]
        out.append(prefix + rest)
    return out


_LINE_RULES: tuple[_Rule, ...] = (_rule_exact, _rule_trailing, _rule_indent, _rule_indent_map)


def _trim_blank(search: Lines, replace: Lines) -> tuple[Lines, Lines] | None:
    lead = next((k for k, line in enumerate(search) if line.strip()), len(search))
    if lead == len(search):
        return None
    trail = next(k for k, line in enumerate(reversed(search)) if line.strip())
    if lead == 0 and trail == 0:
        return None
    r_lead = next((k for k, line in enumerate(replace) if line.strip()), len(replace))
    r_trail = next((k for k, line in enumerate(reversed(replace)) if line.strip()), len(replace))
    r_cut_lead = min(lead, r_lead)
    r_cut_trail = min(trail, r_trail, len(replace) - r_cut_lead)
    return search[lead : len(search) - trail], replace[r_cut_lead : len(replace) - r_cut_trail]


def _locate_lines(doc: Lines, search: Lines, replace: Lines) -> _Found | None:
    """Rules 1-5: the first rule that finds anything, with everything it found."""
    for rule in _LINE_RULES:
        found = rule(doc, search, replace)
        if found:
            return _Found(found[0].rule, found)
    trimmed = _trim_blank(search, replace)
    if trimmed is not None:
        t_search, t_replace = trimmed
        for rule in _LINE_RULES:
            found = rule(doc, t_search, t_replace)
            if found:
                for m in found:
                    m.rule = f"blank-lines-trimmed+{m.rule}"
                return _Found(found[0].rule, found)
    return None


def _split_elided(lines: Lines) -> list[Lines]:
    pieces: list[Lines] = [[]]
    for line in lines:
        if _ELISION_RE.match(line):
            pieces.append([])
        else:
            pieces[-1].append(line)
    return pieces


class _BlockFailure(Exception):
    def __init__(self, kind: str, reason: str, matches: list[_Match] | None = None, advice: str = ""):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.matches = matches or []
        self.advice = advice


def _describe_places(matches: list[_Match]) -> str:
    spans = [f"{m.start + 1}" if m.end - m.start == 1 else f"{m.start + 1}-{m.end}" for m in matches]
    return ", ".join(spans)


def _ambiguous(found: _Found, path: str, what: str = "SEARCH") -> _BlockFailure:
    rule = found.rule.replace("+", " then ")
    return _BlockFailure(
        "ambiguous",
        f"{what} matches {len(found.matches)} places in {path} (rule: {rule}), at lines "
        f"{_describe_places(found.matches)}; it must match exactly one",
        found.matches,
        advice="Add lines above or below the place you mean, so SEARCH matches only there.",
    )


_Twins = Sequence[
    tuple[int, Lines]
]  # (reply index, REPLACE lines) of the blocks sharing one SEARCH, one file


def _block_lines(edit: Edit) -> tuple[Lines, Lines]:
    """A block's SEARCH lines (none when SEARCH is blank) and REPLACE lines."""
    search = [line.rstrip("\r") for line in _lines_of(edit.search)] if edit.search.strip() else []
    replace = [line.rstrip("\r") for line in _lines_of(edit.replace)] if edit.replace else []
    return search, replace


def _apply_block(
    doc: _Doc, edit: Edit, path: str, me: int = 0, twins: _Twins = ()
) -> tuple[Status, str, int | None]:
    """Apply one block to `doc` in place. Returns (status, rule, first line); raises _BlockFailure.

    `me` is the block's index in the reply; `twins` lists every block of the reply (this one included, in reply
    order) that carries the same SEARCH text for the same file.
    """
    search, replace = _block_lines(edit)
    doc.block = edit.block
    if not search:
        return _apply_create(doc, replace, path)
    claim = doc.claims.pop(me, None)
    if claim is not None:
        return _apply_claim(doc, claim, path, len(twins))

    found = _locate_lines(doc.lines, search, replace)
    if found is None and any(_ELISION_RE.match(line) for line in search):
        return _apply_elided(doc, search, replace, path)
    if found is None:
        identical = sum(1 for _, other in twins if other == replace)
        done = _replace_present(doc.lines, replace)
        if done is not None and len(done.matches) in {1, identical}:
            return "already_applied", f"replace-present ({done.rule})", done.matches[0].start + 1
        raise _BlockFailure(
            "not_found",
            f"SEARCH does not match any lines of {path}, not even ignoring trailing whitespace, a uniform "
            "indentation shift or surrounding blank lines",
            advice="Copy the lines to change from the current file exactly, indentation included.",
        )
    if len(found.matches) > 1:
        claims = _claim_places(doc.lines, found, search, twins) if twins and twins[0][0] == me else None
        if claims is None:
            raise _ambiguous(found, path)
        mine = claims.pop(me)
        doc.claims.update(claims)
        return _apply_claim(doc, mine, path, len(twins))
    m = found.matches[0]
    if m.replace is None:
        raise _reindent_failure(m, path)
    if _already_there(doc.lines, m, replace):
        return "already_applied", f"replace-present ({found.rule})", m.start + 1
    doc.splice(m.start, m.end, m.replace)
    return "applied", found.rule, m.start + 1


def _reindent_failure(m: _Match, path: str) -> _BlockFailure:
    if m.rule.endswith("indent-map"):
        why = (
            "only when its indentation is written as the file's, and some REPLACE lines do not start with the "
            "whitespace all SEARCH lines start with"
        )
    else:
        why = (
            "only when indented less than written, and some REPLACE lines are not indented enough to shift "
            "them the same way"
        )
    return _BlockFailure(
        "reindent",
        f"SEARCH matches lines {_describe_places([m])} of {path} {why}",
        [m],
        advice="Write SEARCH and REPLACE with the file's own indentation.",
    )


def _lines_of(text: str) -> list[str]:
    return text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")


def _replace_present(doc: Lines, replace: Lines) -> _Found | None:
    """Where REPLACE already stands, by the rules SEARCH is matched with; None when nowhere, or when it was
    found only through the indentation or blank-line rules and holds fewer than two non-blank lines (one such
    line, elsewhere at another indentation, is too weak a sign that the change was made: it is "not found")."""
    if not any(line.strip() for line in replace):
        return None
    found = _locate_lines(doc, replace, replace)
    if found is None or found.rule in ("exact", "trailing-whitespace"):
        return found
    return found if sum(1 for line in replace if line.strip()) >= 2 else None


def _already_there(doc: Lines, m: _Match, replace: Lines) -> bool:
    """REPLACE already stands, once, around the SEARCH match: applying again would duplicate its new lines."""
    if len(replace) <= m.end - m.start or not any(line.strip() for line in replace):
        return False
    found = _locate_lines(doc, replace, replace)
    if found is None or len(found.matches) != 1:
        return False
    r = found.matches[0]
    return r.start <= m.start and m.end <= r.end


def _stands_around(doc: Lines, m: _Match, replace: Lines) -> bool:
    """REPLACE already stands around this SEARCH match (wherever else it stands too)."""
    if len(replace) <= m.end - m.start or not any(line.strip() for line in replace):
        return False
    found = _locate_lines(doc, replace, replace)
    return found is not None and any(r.start <= m.start and m.end <= r.end for r in found.matches)


def _claim_places(doc: Lines, found: _Found, search: Lines, twins: _Twins) -> dict[int, _Claim] | None:
    """SEARCH matches k places and exactly k blocks carry it: each block's place, in file order; else None."""
    if len(twins) != len(found.matches):
        return None
    claims = {}
    for (index, replace), m in zip(twins, found.matches, strict=True):
        # The same lines again, alone, with this block's REPLACE: shaped by the rule that found them.
        here = _locate_lines(doc[m.start : m.end], search, replace)
        shaped = here.matches[0].replace if here is not None and len(here.matches) == 1 else None
        if shaped is None:
            return None
        claims[index] = _Claim(m.start, m.end, shaped, found.rule, _stands_around(doc, m, replace))
    return claims


def _apply_claim(doc: _Doc, claim: _Claim, path: str, count: int) -> tuple[Status, str, int | None]:
    rule = f"repeated-search+{claim.rule}"
    if claim.lost_to is not None:
        raise _BlockFailure(
            "claim_lost",
            f"its SEARCH matches {count} places of {path}, one for each of the {count} blocks carrying it, but "
            f"block {claim.lost_to} of this reply changed the lines this block was to take",
            advice="Change each place in one block only, and add lines around SEARCH so it matches one place.",
        )
    if claim.done:
        return "already_applied", f"replace-present ({rule})", claim.start + 1
    doc.splice(claim.start, claim.end, claim.replace)
    return "applied", rule, claim.start + 1


_MAIN_GUARD_RE = re.compile(r"^if\s+__name__\s*==")


def _apply_create(doc: _Doc, replace: Lines, path: str) -> tuple[Status, str, int | None]:
    if not doc.exists or doc.is_blank():
        status: Status = "created" if not doc.exists else "applied"
        doc.lines, doc.ends = list(replace), [doc.newline] * len(replace)
        doc.exists = True
        return status, "new-file" if status == "created" else "empty-file", 1
    if any(line.strip() for line in replace):
        if [line.rstrip() for line in doc.lines] == [line.rstrip() for line in replace]:
            return "already_applied", "replace-present (whole file)", 1
        done = _replace_present(doc.lines, replace)
        if done is not None and len(done.matches) == 1:
            return "already_applied", f"replace-present ({done.rule})", done.matches[0].start + 1
        append = _append_rule(doc.lines, replace, path)
        if append is not None:
            line = len(doc.lines) + 1
            doc.splice(len(doc.lines), len(doc.lines), replace)
            return "applied", append, line
    raise _BlockFailure(
        "file_exists",
        f"SEARCH is empty, which creates a new file, but {path} already exists and is not empty",
        advice=(
            f"To change {path}, put the lines to replace in SEARCH. To add lines at its end, SEARCH its "
            "last lines and repeat them in REPLACE followed by the new lines."
        ),
    )


def _append_rule(doc: Lines, replace: Lines, path: str) -> str | None:
    """The append an empty SEARCH on a non-blank file amounts to, or None (the block is refused).

    - ``placeholder-append``: the file holds only comment lines (and blank ones), none of which REPLACE repeats
      (REPLACE repeating them may be meant to replace the file, not to follow it);
    - ``main-guard-append``: a Python file without an ``if __name__ ==`` line, and REPLACE is such a guard at
      column 0 followed only by its indented body, so it runs after every definition of the file.
    """
    text = [line.strip() for line in doc if line.strip()]
    if all(_COMMENT_RE.match(line) for line in text):
        return None if set(text) & {line.strip() for line in replace} else "placeholder-append"
    body = [line for line in replace if line.strip()]
    guard = (
        path.endswith(".py")
        and len(body) >= 2
        and _MAIN_GUARD_RE.match(body[0]) is not None
        and all(line[:1] in (" ", "\t") for line in body[1:])
    )
    if guard and not any(_MAIN_GUARD_RE.match(line.strip()) for line in doc):
        return "main-guard-append"
    return None


def _apply_elided(doc: _Doc, search: Lines, replace: Lines, path: str) -> tuple[Status, str, int | None]:
    s_pieces, r_pieces = _split_elided(search), _split_elided(replace)
    if len(s_pieces) != len(r_pieces):
        raise _BlockFailure(
            "elision",
            f"SEARCH has {len(s_pieces) - 1} '...' lines but REPLACE has {len(r_pieces) - 1}; they must pair up "
            "so each piece of SEARCH has its own piece of REPLACE",
            advice="Avoid '...' lines: copy the lines in full, or split the change into several small blocks.",
        )
    planned: list[_Match] = []
    for n, (s_piece, r_piece) in enumerate(zip(s_pieces, r_pieces, strict=True), start=1):
        if not any(line.strip() for line in s_piece):
            if any(line.strip() for line in r_piece):
                raise _BlockFailure(
                    "elision",
                    f"piece {n} of SEARCH (between '...' lines) is empty but its REPLACE piece is not, so there "
                    "is no place to put it",
                    advice="Give each '...'-separated piece of SEARCH at least one line of the file.",
                )
            continue
        found = _locate_lines(doc.lines, s_piece, r_piece)
        if found is None:
            raise _BlockFailure(
                "not_found",
                f"piece {n} of SEARCH (between '...' lines) does not match any lines of {path}",
                advice="Copy the lines to change from the current file exactly, indentation included.",
            )
        if len(found.matches) > 1:
            raise _ambiguous(found, path, what=f"piece {n} of SEARCH")
        m = found.matches[0]
        if m.replace is None:
            raise _BlockFailure("reindent", f"piece {n} of SEARCH cannot be re-indented like the file", [m])
        if planned and m.start < planned[-1].end:
            raise _BlockFailure(
                "elision",
                f"the pieces of SEARCH between '...' lines are found out of order in {path} "
                f"(piece {n} at line {m.start + 1}, before the end of the previous piece)",
                planned + [m],
            )
        planned.append(m)
    if not planned:
        raise _BlockFailure("not_found", f"SEARCH holds only '...' lines, nothing to find in {path}")
    for m in reversed(planned):
        doc.splice(m.start, m.end, m.replace or [])
    return "applied", "elision", planned[0].start + 1


# ---------------------------------------------------------------------------------------------- paths


class _PathError(Exception):
    pass


def _matches_any(rel: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(rel, pattern) for pattern in patterns)


def _allowed(editable: Sequence[str]) -> str:
    return ", ".join(editable) if editable else "(none)"


def _check_rel(rel: str, raw: str, editable: Sequence[str], protected: Sequence[str]) -> None:
    parts = rel.split("/")
    if any(part in NEVER_EDITABLE_DIRS for part in parts):
        raise _PathError(
            f"{raw!r} is inside {parts[0]}/, which is never edited. Files you may edit: {_allowed(editable)}"
        )
    if _matches_any(rel, protected):
        raise _PathError(
            f"{raw!r} is protected by the template and may not be edited. "
            f"Files you may edit: {_allowed(editable)}"
        )
    if not _matches_any(rel, editable):
        raise _PathError(
            f"{raw!r} is not one of the files you may edit. Files you may edit: {_allowed(editable)}"
        )


def _resolve(root: Path, raw: str, editable: Sequence[str], protected: Sequence[str]) -> tuple[str, Path]:
    p = raw.strip().replace("\\", "/")
    if not p:
        raise _PathError("the block has an empty file path")
    if p.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", p):
        raise _PathError(
            f"{raw!r} is an absolute path; write the path relative to the experiment folder, "
            f"one of: {_allowed(editable)}"
        )
    parts = [part for part in p.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _PathError(
            f"{raw!r} uses '..'; only files inside the experiment folder may be edited: {_allowed(editable)}"
        )
    if not parts or any(ord(ch) < 32 for ch in p):
        raise _PathError(f"{raw!r} is not a file path. Files you may edit: {_allowed(editable)}")
    rel = "/".join(parts)
    _check_rel(rel, raw, editable, protected)
    try:
        return _resolve_on_disk(root, raw, rel, parts, editable, protected)
    except OSError as exc:
        raise _PathError(f"{raw!r} cannot be used: {exc.strerror or exc}") from exc


def _resolve_on_disk(
    root: Path, raw: str, rel: str, parts: list[str], editable: Sequence[str], protected: Sequence[str]
) -> tuple[str, Path]:
    real_root = os.path.realpath(root)
    real = os.path.realpath(os.path.join(real_root, *parts))
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
        raise _PathError(
            f"{raw!r} is a symbolic link (or lies under one) leading outside the experiment folder"
        )
    real_rel = Path(os.path.relpath(real, real_root)).as_posix()
    if real_rel != rel:
        _check_rel(real_rel, raw, editable, protected)
    target = Path(real)
    if target.exists() and not target.is_file():
        raise _PathError(f"{raw!r} is not a regular file")
    return rel, target


# ---------------------------------------------------------------------------------------------- applying


@dataclass
class _FileWork:
    rel: str
    target: Path
    original: bytes | None
    doc: _Doc
    touched_by: list[int] = field(default_factory=list)


@dataclass
class _Failure:
    edit: Edit
    kind: str
    reason: str
    advice: str = ""
    matches: list[_Match] = field(default_factory=list)
    doc: _Doc | None = None
    earlier_blocks: list[int] = field(default_factory=list)


def apply_edits(
    root: str | os.PathLike[str],
    reply_or_edits: str | Sequence[Edit],
    editable: Sequence[str] = DEFAULT_EDITABLE,
    protected: Sequence[str] = (),
    dry_run: bool = False,
) -> EditResult:
    """Apply every block of a reply (or a list of edits) under `root`, or none of them.

    Never raises for a model's mistake: a malformed reply, a SEARCH that matches no place or several, or a
    forbidden path gives ok=False with `feedback` for the model, and then nothing was written.
    With `dry_run` nothing is written either way; `changed` lists the files that would be.
    """
    root_path = Path(root)
    editable, protected = tuple(editable), tuple(protected)
    if isinstance(reply_or_edits, str):
        try:
            edits = _parse(
                reply_or_edits, lambda raw: _names_editable_file(root_path, raw, editable, protected)
            ).edits
        except EditParseError as exc:
            return EditResult(
                ok=False,
                blocks=exc.block,
                parse_error=str(exc),
                feedback=(
                    f"Your reply could not be parsed: {exc}.\nNothing was applied: every file is unchanged. "
                    "Reply with the SEARCH/REPLACE blocks again, each one complete."
                ),
            )
    else:
        edits = list(reply_or_edits)

    named = [_try_resolve(root_path, edit.path, editable, protected) for edit in edits]
    files: dict[str, _FileWork] = {}
    outcomes: list[BlockOutcome] = []
    failures: list[_Failure] = []
    notes: list[str] = []
    for index, edit in enumerate(edits):
        where = named[index]
        if isinstance(where, _PathError):
            failures.append(_Failure(edit, "path", str(where)))
            outcomes.append(
                BlockOutcome(block=edit.block, path=edit.path, status="failed", reason=str(where))
            )
            continue
        rel, target = where
        twins = _twins(edits, named, index)
        note = ""
        try:
            work = _work_for(files, rel, target)
            if not work.doc.exists and edit.search.strip():
                elsewhere = _misnamed_target(root_path, edit, files, editable, protected)
                if elsewhere is not None:
                    note = (
                        f"Block {edit.block} names {edit.path}, which does not exist; its SEARCH matches one "
                        f"place in one file, {elsewhere.rel}, so it was applied there"
                    )
                    work, twins = elsewhere, []
        except _LoadError as exc:
            failures.append(_Failure(edit, exc.kind, exc.reason))
            outcomes.append(BlockOutcome(block=edit.block, path=rel, status="failed", reason=exc.reason))
            continue
        earlier = list(work.touched_by)
        try:
            status, rule, line = _apply_block(work.doc, edit, work.rel, index, twins)
        except _BlockFailure as exc:
            snapshot = _Doc(
                list(work.doc.lines), list(work.doc.ends), work.doc.newline, work.doc.bom, work.doc.exists
            )
            failures.append(_Failure(edit, exc.kind, exc.reason, exc.advice, exc.matches, snapshot, earlier))
            outcomes.append(BlockOutcome(block=edit.block, path=work.rel, status="failed", reason=exc.reason))
            continue
        if status != "already_applied":
            work.touched_by.append(edit.block)
        if note:
            notes.append(note + ".")
        outcomes.append(
            BlockOutcome(block=edit.block, path=work.rel, status=status, rule=rule, line=line, reason=note)
        )

    already = [o.block for o in outcomes if o.status == "already_applied"]
    if failures:
        return EditResult(
            ok=False,
            blocks=len(edits),
            outcomes=outcomes,
            already_applied=already,
            feedback=_feedback(failures, outcomes, len(edits)),
        )

    pending: list[tuple[_FileWork, bytes]] = []
    for work in files.values():
        new = work.doc.text().encode("utf-8")
        if work.original is None and not work.doc.exists:
            continue
        if work.original is not None and new == work.original:
            continue
        pending.append((work, new))
    if not dry_run:
        _write_all(pending)
    return EditResult(
        ok=True,
        changed=[w.rel for w, _ in pending],
        feedback="\n".join(notes),
        blocks=len(edits),
        outcomes=outcomes,
        already_applied=already,
    )


def _try_resolve(
    root: Path, raw: str, editable: Sequence[str], protected: Sequence[str]
) -> tuple[str, Path] | _PathError:
    try:
        return _resolve(root, raw, editable, protected)
    except _PathError as exc:
        return exc


def _names_editable_file(root: Path, raw: str, editable: Sequence[str], protected: Sequence[str]) -> bool:
    where = _try_resolve(root, raw, editable, protected)
    return not isinstance(where, _PathError) and where[1].is_file()


def _twins(edits: Sequence[Edit], named: Sequence[tuple[str, Path] | _PathError], index: int) -> _Twins:
    """The blocks (this one included) carrying the same non-blank SEARCH text as block `index`, for its file."""
    edit, where = edits[index], named[index]
    if not edit.search.strip() or isinstance(where, _PathError):
        return []
    return [
        (j, _block_lines(other)[1])
        for j, (other, there) in enumerate(zip(edits, named, strict=True))
        if other.search == edit.search and not isinstance(there, _PathError) and there[0] == where[0]
    ]


class _LoadError(Exception):
    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind
        self.reason = reason


def _read_work(rel: str, target: Path) -> _FileWork:
    """The file as it is on disk (absent: an empty document that does not exist yet)."""
    try:
        original = target.read_bytes() if target.exists() else None
    except OSError as exc:
        raise _LoadError("unreadable", f"{rel} cannot be read: {exc.strerror or exc}") from exc
    text = "" if original is None else _decode(original)
    if text is None:
        raise _LoadError("not_text", f"{rel} is not UTF-8 text, so it cannot be edited with SEARCH/REPLACE")
    return _FileWork(rel, target, original, _Doc.from_text(text, exists=original is not None))


def _work_for(files: dict[str, _FileWork], rel: str, target: Path) -> _FileWork:
    if rel not in files:
        files[rel] = _read_work(rel, target)
    return files[rel]


def _misnamed_target(
    root: Path, edit: Edit, files: dict[str, _FileWork], editable: Sequence[str], protected: Sequence[str]
) -> _FileWork | None:
    """The one editable file where the SEARCH of a block naming a missing file matches, once; else None.

    Models sometimes misname the file they mean (``plot.py`` for ``experiment.py``). Only reached for a path
    that passed every safety check; the SEARCH must match nowhere in every other editable file, and exactly one
    place (by the first rule that finds anything) in this one, as the file reads after the earlier blocks.
    """
    search, replace = _block_lines(edit)
    hits: list[_FileWork] = []
    for rel, target in _existing_editable(root, editable, protected, files):
        try:
            work = files[rel] if rel in files else _read_work(rel, target)
        except _LoadError:
            continue
        found = _locate_lines(work.doc.lines, search, replace)
        if found is not None:
            if len(found.matches) > 1 or hits:
                return None
            hits.append(work)
    if not hits:
        return None
    files.setdefault(hits[0].rel, hits[0])
    return files[hits[0].rel]


def _existing_editable(
    root: Path, editable: Sequence[str], protected: Sequence[str], files: dict[str, _FileWork]
) -> list[tuple[str, Path]]:
    """Every file under `root` a block may edit (existing on disk, or created by an earlier block), sorted."""
    found = {rel: work.target for rel, work in files.items() if work.doc.exists}
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in NEVER_EDITABLE_DIRS)
        for name in names:
            rel = Path(os.path.relpath(os.path.join(folder, name), root)).as_posix()
            if rel in found or not _matches_any(rel, editable) or _matches_any(rel, protected):
                continue
            where = _try_resolve(root, rel, editable, protected)
            if not isinstance(where, _PathError) and where[1].is_file():
                found[where[0]] = where[1]
    return sorted(found.items())


def _write_all(pending: list[tuple[_FileWork, bytes]]) -> None:
    """Write every new content to a temp file next to its target (fsynced), then rename them all in place."""
    staged: list[tuple[str, Path]] = []
    try:
        for work, data in pending:
            staged.append((str(write_temp_beside(work.target, data)), work.target))
    except BaseException:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)
        raise
    for tmp, target in staged:
        os.replace(tmp, target)
    for directory in {target.parent for _, target in staged}:
        try:
            dir_fd = os.open(directory, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)


# ---------------------------------------------------------------------------------------------- feedback


def _feedback(failures: list[_Failure], outcomes: list[BlockOutcome], total: int) -> str:
    failed_numbers = [f.edit.block for f in failures]
    good = [o.block for o in outcomes if o.status != "failed"]
    head = (
        f"{len(failures)} of {total} SEARCH/REPLACE blocks failed, so nothing was applied: "
        "every file is unchanged."
    )
    parts = [head]
    for failure in failures:
        parts.append(_failure_text(failure))
    ask = f"Reply with SEARCH/REPLACE blocks only: the failed {_plural(failed_numbers, 'block')} corrected"
    if good:
        ask += (
            f", and {_plural(good, 'block')} again as before, since nothing from this reply was written "
            "(a block whose change is already in the file is recognised and skipped)"
        )
    ask += ". SEARCH must copy the current lines of the file exactly."
    parts.append(ask)
    return "\n\n".join(parts)


def _plural(numbers: list[int], noun: str) -> str:
    joined = ", ".join(str(n) for n in numbers)
    return f"{noun} {joined}" if len(numbers) == 1 else f"{noun}s {joined}"


def _failure_text(failure: _Failure) -> str:
    edit = failure.edit
    out = [f"## Block {edit.block} ({edit.path}) failed: {failure.reason}."]
    head = _lines_of(edit.search)[:FEEDBACK_HEAD_LINES] if edit.search.strip() else []
    if head:
        more = len(_lines_of(edit.search)) - len(head)
        shown = "\n".join(f"    {line}" for line in head)
        out.append(
            f"Its SEARCH starts with:\n{shown}" + (f"\n    ... ({more} more lines)" if more > 0 else "")
        )
    doc = failure.doc
    note = ""
    if failure.earlier_blocks:
        note = f" (as it reads after {_plural(failure.earlier_blocks, 'block')} of this reply)"
    if doc is not None and failure.kind in {"ambiguous", "reindent"}:
        for m in failure.matches[:5]:
            where = f"line {m.start + 1}" if m.end - m.start == 1 else f"lines {m.start + 1}-{m.end}"
            shown = _numbered(
                doc.lines, max(0, m.start - 2), min(len(doc.lines), m.end + 2), (m.start, m.end)
            )
            out.append(
                f"Match at {where} of {edit.path}{note}, marked '>' among the lines around it:\n{shown}"
            )
    elif doc is not None and failure.kind in {"not_found", "elision"} and edit.search.strip():
        near = _closest(doc.lines, [line for line in _lines_of(edit.search) if not _ELISION_RE.match(line)])
        if near is not None:
            start, end = near
            out.append(f"The closest lines in {edit.path}{note} are:\n{_numbered(doc.lines, start, end)}")
    if failure.advice:
        out.append(failure.advice)
    return "\n".join(out)


def _numbered(lines: Lines, start: int, end: int, mark: tuple[int, int] | None = None) -> str:
    """Lines [start, end) with 1-based numbers; lines inside `mark` get a '>' in front."""
    end = min(end, start + FEEDBACK_MAX_SUGGESTED_LINES)
    width = len(str(end))
    out = []
    for n in range(start, end):
        flag = ">" if mark is not None and mark[0] <= n < mark[1] else " "
        out.append(f" {flag}{n + 1:>{width}} | {lines[n]}")
    return "\n".join(out)


def _closest(doc: Lines, search: Lines) -> tuple[int, int] | None:
    """Suggestion only: the window of the file most similar to SEARCH, or None when nothing is close."""
    wanted = [line.strip() for line in search]
    anchors = [(k, text) for k, text in enumerate(wanted) if text][:6]
    if not anchors or not doc:
        return None
    stripped = [line.strip() for line in doc]
    n = len(search)
    starts: set[int] = set()
    for k, text in anchors:
        matcher = difflib.SequenceMatcher(None, b=text, autojunk=False)
        for j, line in enumerate(stripped):
            if not line:
                continue
            matcher.set_seq1(line)
            if (
                matcher.real_quick_ratio() >= SUGGEST_MIN_SCORE
                and matcher.quick_ratio() >= SUGGEST_MIN_SCORE
                and matcher.ratio() >= SUGGEST_MIN_SCORE
            ):
                starts.add(min(max(j - k, 0), max(len(doc) - n, 0)))
    if not starts:
        return None
    target = "\n".join(wanted)
    best, best_score = None, 0.0
    for s in sorted(starts):
        score = difflib.SequenceMatcher(None, "\n".join(stripped[s : s + n]), target, autojunk=False).ratio()
        if score > best_score:
            best, best_score = s, score
    if best is None or best_score < SUGGEST_MIN_SCORE / 2:
        return None
    return best, min(best + n, len(doc))
