"""The message history: append with merging, normalise for a provider profile, validate before every call.

The history is ours, not the provider's. `append` never lets two messages of the same role sit side by side (it
merges them with a blank line), `normalise` turns any history into one a provider accepts, and `validate` refuses
to let a call go out with a history that breaks the rules. The rules, for every profile:

- at most one system message, and only first (folded into the first user message where the model takes none);
- the first non-system message is from the user, roles alternate user/assistant, the last message is the user's;
- no empty messages; assistant `reasoning_content` is never sent back.

Nothing here mutates its input: every function returns new lists of frozen messages.

Trimming for the context window (`fit`, `tighten`, `apply_trim`) never touches the system message, the first user
message (the task) or the last user message (the pending prompt). It first elides the file dumps ("## Current
files" and the like) of older user messages, oldest first, then drops the oldest exchanges (a reply and the
prompt that answered it), oldest first. A `Trim` names messages by their index in the full history, so a trim made
earlier stays meaningful as the history grows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, NonNegativeInt, field_validator, model_validator

from orchestrator.errors import OrchestratorError

Role = Literal["system", "user", "assistant"]
SystemHandling = Literal["system", "developer", "fold"]

MERGE_SEPARATOR = "\n\n"
# Stands in for a user turn when a history would otherwise open with the assistant (never happens in the loop,
# whose first message is the prompt; it keeps `normalise` total without dropping the assistant's text).
OPENING_USER_PLACEHOLDER = "(continuing an earlier conversation)"


class Message(BaseModel):
    """One message of the history, exactly as journaled. `reasoning_content` is kept for review, never sent."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    role: Role
    content: str
    reasoning_content: str | None = None


class Profile(BaseModel):
    """What a family of models accepts."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    system: SystemHandling  # how the leading system message is sent
    temperature: bool  # whether a temperature may be sent
    description: str = ""


PROFILES: dict[str, Profile] = {
    "deepseek-reasoner": Profile(
        name="deepseek-reasoner",
        system="system",
        temperature=False,
        description="DeepSeek reasoner (R1): strict alternation, no temperature, reasoning never sent back",
    ),
    "openai-reasoning": Profile(
        name="openai-reasoning",
        system="developer",
        temperature=False,
        description="OpenAI o-series and gpt-5 reasoning models: system sent as developer, no temperature",
    ),
    "anthropic": Profile(
        name="anthropic",
        system="system",
        temperature=True,
        description="Anthropic Claude: system message lifted by litellm, strict alternation starting with user",
    ),
    "default": Profile(
        name="default",
        system="system",
        temperature=True,
        description="any other chat model",
    ),
    "no-system": Profile(
        name="no-system",
        system="fold",
        temperature=False,
        description="models that take neither a system message nor a temperature (o1-mini, o1-preview); "
        "also the strictest profile, used by the scripted model",
    ),
}
STRICTEST_PROFILE: Profile = PROFILES["no-system"]


class ConversationError(OrchestratorError, ValueError):
    """A history breaks a provider rule; the message names the rule and the message index."""


class UnknownProfileError(OrchestratorError, ValueError):
    """A profile override names no known profile."""


# --------------------------------------------------------------------------------------------------- profiles

_O_SERIES = re.compile(r"^o\d+(-|$)")


def _base_name(model_name: str) -> str:
    return model_name.strip().lower().rsplit("/", 1)[-1]


def _profile_from_name(model_name: str) -> Profile | None:
    lower = model_name.strip().lower()
    base = _base_name(model_name)
    if "deepseek-reasoner" in base or "deepseek-r1" in base:
        return PROFILES["deepseek-reasoner"]
    if base.startswith(("o1-mini", "o1-preview")):
        return PROFILES["no-system"]
    if _O_SERIES.match(base) or base.startswith("gpt-5"):
        return PROFILES["openai-reasoning"]
    if lower.startswith("anthropic/") or base.startswith("claude") or ".claude" in base:
        return PROFILES["anthropic"]
    return None


def _profile_from_model_info(model_name: str) -> Profile:
    """Ask litellm's (bundled) model map; unknown models get the default profile."""
    import os

    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm

        litellm.suppress_debug_info = True
        info: dict[str, Any] = dict(litellm.get_model_info(model_name))
    except Exception:  # litellm raises a plain Exception subclass for unmapped models
        return PROFILES["default"]
    return _profile_from_info(info)


def _profile_from_info(info: Mapping[str, Any] | None) -> Profile:
    """The profile a model map entry implies (None: an unmapped model, the default profile)."""
    if info is None:
        return PROFILES["default"]
    provider = str(info.get("litellm_provider") or "")
    if provider.startswith("anthropic") or "claude" in str(info.get("key") or ""):
        return PROFILES["anthropic"]
    if info.get("supports_system_messages") is False:
        return PROFILES["no-system"]
    if info.get("supports_reasoning") and provider in ("openai", "azure", "text-completion-openai"):
        return PROFILES["openai-reasoning"]
    return PROFILES["default"]


_ASK_LITELLM: Any = object()


def profile_for(model_name: str, override: str | None = None, info: Mapping[str, Any] | None = _ASK_LITELLM) -> Profile:
    """The profile for a litellm model name; `override` (a key of PROFILES) wins when given. `info`: the model's
    map entry when the caller has it (None for an unmapped model); otherwise litellm is asked."""
    if override:
        try:
            return PROFILES[override]
        except KeyError:
            known = ", ".join(sorted(PROFILES))
            raise UnknownProfileError(f"unknown model profile {override!r} (known: {known})") from None
    if info is _ASK_LITELLM:
        return _profile_from_name(model_name) or _profile_from_model_info(model_name)
    return _profile_from_name(model_name) or _profile_from_info(info)


# --------------------------------------------------------------------------------------------------- history


def _join(a: str, b: str) -> str:
    if not a.strip():
        return b
    if not b.strip():
        return a
    return a + MERGE_SEPARATOR + b


def _join_optional(a: str | None, b: str | None) -> str | None:
    if a is None or not a.strip():
        return b
    if b is None or not b.strip():
        return a
    return a + MERGE_SEPARATOR + b


def append(
    history: Sequence[Message], role: Role, content: str, reasoning: str | None = None
) -> list[Message]:
    """A new history with the message added; a message of the same role as the last is merged into it."""
    result = list(history)
    if result and result[-1].role == role:
        last = result[-1]
        result[-1] = Message(
            role=role,
            content=_join(last.content, content),
            reasoning_content=_join_optional(last.reasoning_content, reasoning),
        )
    else:
        result.append(Message(role=role, content=content, reasoning_content=reasoning))
    return result


def normalise(messages: Sequence[Message], profile: Profile) -> list[Message]:
    """The history as the profile's provider accepts it, keeping every message's text.

    - system messages before the first user/assistant message become one leading system message (or, for a
      profile that takes none, are folded into the first user message); a system message later in the history
      is an instruction at that point, so it is sent as (part of) a user message;
    - reasoning is dropped, empty messages are dropped, same-role neighbours are merged with a blank line;
    - a history opening with the assistant gets a short placeholder user turn first.
    A history whose last message is the assistant's cannot be fixed here: `validate` rejects it.
    """
    system_text = ""
    body: list[Message] = []
    for m in messages:
        if not m.content.strip():
            continue
        if m.role == "system" and not body:
            system_text = _join(system_text, m.content)
            continue
        role: Role = "user" if m.role == "system" else m.role
        body = append(body, role, m.content)
    if body and body[0].role == "assistant":
        body.insert(0, Message(role="user", content=OPENING_USER_PLACEHOLDER))
    if not system_text:
        return body
    if profile.system == "fold":
        if body:
            body[0] = Message(role="user", content=_join(system_text, body[0].content))
            return body
        return [Message(role="user", content=system_text)]
    return [Message(role="system", content=system_text), *body]


def validate(messages: Sequence[Message], profile: Profile) -> None:
    """Raise ConversationError naming the first rule the history breaks and where."""
    if not messages:
        raise ConversationError("conversation rule 'not-empty': there are no messages to send")
    for i, m in enumerate(messages):
        if not m.content.strip():
            raise ConversationError(
                f"conversation rule 'no-empty-messages': messages[{i}] ({m.role}) is empty"
            )
        if m.reasoning_content is not None:
            raise ConversationError(
                f"conversation rule 'no-reasoning-sent': messages[{i}] carries reasoning_content, "
                "which is never sent back"
            )
        if m.role == "system":
            if profile.system == "fold":
                raise ConversationError(
                    f"conversation rule 'no-system': messages[{i}] is a system message but profile "
                    f"{profile.name!r} takes none (fold it into the first user message)"
                )
            if i != 0:
                raise ConversationError(
                    f"conversation rule 'system-first': messages[{i}] is a system message; only messages[0] may be"
                )
    start = 1 if messages[0].role == "system" else 0
    if start >= len(messages):
        raise ConversationError(
            "conversation rule 'not-empty': there is a system message but nothing to answer"
        )
    if messages[start].role != "user":
        raise ConversationError(
            f"conversation rule 'first-user': messages[{start}] is {messages[start].role!r}; "
            "the first non-system message must be the user's"
        )
    for j in range(start + 1, len(messages)):
        if messages[j].role == messages[j - 1].role:
            raise ConversationError(
                f"conversation rule 'alternate': messages[{j - 1}] and messages[{j}] are both "
                f"{messages[j].role!r}; user and assistant must alternate"
            )
    last = len(messages) - 1
    if messages[last].role != "user":
        raise ConversationError(
            f"conversation rule 'last-user': messages[{last}] is {messages[last].role!r}; "
            "the last message must be the user's"
        )


def to_wire(messages: Sequence[Message], profile: Profile, *, check: bool = True) -> list[dict[str, str]]:
    """Normalise, validate, and return the dicts exactly as sent (roles mapped, no reasoning_content).

    `check=False` skips validation (for counting tokens of a history that is not ready to be sent)."""
    normalised = normalise(messages, profile)
    if check:
        validate(normalised, profile)
    wire: list[dict[str, str]] = []
    for m in normalised:
        role = "developer" if (m.role == "system" and profile.system == "developer") else m.role
        wire.append({"role": role, "content": m.content})
    return wire


# --------------------------------------------------------------------------------------------------- trimming

# The headings under which prompts show files (prompts/*.md): "## Current files", "## Current plot.py", ...
FILES_HEADING_PREFIX = "## Current "
ELIDED_FILES_NOTE = "(files as they were then: omitted to fit the context window)"
DEFAULT_TIGHTEN_KEEP = 0.75  # `tighten` cuts the history's text to at most this share of what it was
_FENCE_OPEN = re.compile(r"^(`{3,})[A-Za-z0-9_+.\-]*$")


class Trim(BaseModel):
    """What to leave out of a history to fit a context window: indices into the full, untrimmed history.

    `elided`: user messages whose file dumps are replaced by ELIDED_FILES_NOTE; `dropped`: messages left out.
    Indices are sorted and unique, and a dropped message is not also listed as elided."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    elided: tuple[NonNegativeInt, ...] = ()
    dropped: tuple[NonNegativeInt, ...] = ()

    @field_validator("elided", "dropped", mode="after")
    @classmethod
    def _sorted_unique(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(sorted(set(value)))

    @model_validator(mode="after")
    def _disjoint(self) -> Trim:
        if set(self.elided) & set(self.dropped):
            gone = set(self.dropped)
            object.__setattr__(self, "elided", tuple(i for i in self.elided if i not in gone))
        return self


def _dump_end(lines: list[str], start: int) -> int | None:
    """Index just past the files block (as `prompts.files_block` writes it) opening at lines[start]; None if none.

    A block is one or more of: the path alone on a line, an opening fence (three or more backticks and maybe a
    language), the text, the same fence alone on a line; files are separated by one blank line."""
    end: int | None = None
    i = start
    while i + 1 < len(lines):
        opening = _FENCE_OPEN.match(lines[i + 1])
        if not lines[i].strip() or lines[i].startswith("`") or opening is None:
            break
        fence = opening.group(1)
        close = next((k for k in range(i + 2, len(lines)) if lines[k] == fence), None)
        if close is None:
            break
        end = close + 1
        if end + 1 < len(lines) and lines[end] == "":
            i = end + 1
            continue
        break
    return end


def elide_files(text: str) -> str | None:
    """The text with each file dump under a "## Current ..." heading replaced by ELIDED_FILES_NOTE (the heading
    and everything around the dump are kept); None when the text holds no dump, or eliding would not shorten it."""
    lines = text.split("\n")
    out: list[str] = []
    i = 0
    changed = False
    while i < len(lines):
        out.append(lines[i])
        if lines[i].startswith(FILES_HEADING_PREFIX):
            end = _dump_end(lines, i + 1)
            if end is not None:
                out.append(ELIDED_FILES_NOTE)
                changed = True
                i = end
                continue
        i += 1
    if not changed:
        return None
    short = "\n".join(out)
    return short if len(short) < len(text) else None


def _kept(messages: Sequence[Message]) -> set[int]:
    """Indices trimming never touches: system messages, the first and the last user message, and anything before
    the first or after the last user message."""
    users = [i for i, m in enumerate(messages) if m.role == "user" and m.content.strip()]
    if not users:
        return set(range(len(messages)))
    first, last = users[0], users[-1]
    kept = {i for i, m in enumerate(messages) if m.role == "system"}
    kept.update(range(first + 1))
    kept.update(range(last, len(messages)))
    return kept


_Step = tuple[Literal["elide", "drop"], tuple[int, ...]]


def _steps(messages: Sequence[Message]) -> list[_Step]:
    """Every trimming step in policy order: elide each older dump (oldest first), then drop each complete
    exchange (oldest first). An exchange is a run of assistant messages and the user messages that follow them;
    the last one (the reply the pending prompt answers) is never complete, so it is never dropped."""
    kept = _kept(messages)
    middle = [i for i in range(len(messages)) if i not in kept]
    elide: list[_Step] = [
        ("elide", (i,))
        for i in middle
        if messages[i].role == "user" and elide_files(messages[i].content) is not None
    ]
    groups: list[list[int]] = []
    for i in middle:
        starts = messages[i].role == "assistant" and (not groups or messages[groups[-1][-1]].role == "user")
        if starts or not groups:
            groups.append([i])
        else:
            groups[-1].append(i)
    drop: list[_Step] = [("drop", tuple(g)) for g in groups if messages[g[-1]].role == "user"]
    return elide + drop


def _covered(trim: Trim, step: _Step) -> bool:
    kind, indices = step
    gone = set(trim.dropped)
    if kind == "drop":
        return all(i in gone for i in indices)
    return all(i in gone or i in trim.elided for i in indices)


def _with(trim: Trim, step: _Step) -> Trim:
    kind, indices = step
    if kind == "drop":
        return Trim(elided=trim.elided, dropped=(*trim.dropped, *indices))
    return Trim(elided=(*trim.elided, *indices), dropped=trim.dropped)


def _pending(messages: Sequence[Message], trim: Trim) -> list[_Step]:
    return [step for step in _steps(messages) if not _covered(trim, step)]


def apply_trim(messages: Sequence[Message], trim: Trim) -> list[Message]:
    """The history with the trim's messages elided or dropped. Indices past the end are ignored, and the messages
    trimming never touches (system, first and last user message) are kept whatever the trim says."""
    kept = _kept(messages)
    gone, elided = set(trim.dropped), set(trim.elided)
    out: list[Message] = []
    for i, m in enumerate(messages):
        if i not in kept:
            if i in gone:
                continue
            if i in elided and m.role == "user":
                short = elide_files(m.content)
                if short is not None:
                    m = Message(role=m.role, content=short, reasoning_content=m.reasoning_content)
        out.append(m)
    return out


def fit(
    messages: Sequence[Message],
    count_tokens: Callable[[Sequence[Message]], int],
    limit: int,
    start: Trim | None = None,
) -> Trim:
    """The least trimming (at least `start`) after which `count_tokens` of the trimmed history is <= `limit`.

    Steps are taken in policy order (older file dumps elided, oldest first; then the oldest exchanges dropped);
    a binary search over how many steps keeps the number of counts logarithmic. When even every step is not
    enough, the most trimmed history is returned: the caller may check `count_tokens(apply_trim(...))`, or send
    it and let the provider decide. `limit` should leave room for the reply.

    A history whose `token_ceiling` is within the limit fits without being counted: the same answer, without
    the tokenizer (which, for most models, needs litellm's import)."""

    def fits(trim: Trim) -> bool:
        trimmed = apply_trim(messages, trim)
        return token_ceiling(trimmed) <= limit or count_tokens(trimmed) <= limit

    trim = start or Trim()
    if fits(trim):
        return trim
    trims: list[Trim] = []
    for step in _pending(messages, trim):
        trim = _with(trim, step)
        trims.append(trim)
    if not trims:
        return trim
    lo, hi = 0, len(trims) - 1  # find the first trim that fits; trims[hi] is the answer if none does
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(trims[mid]):
            hi = mid
        else:
            lo = mid + 1
    return trims[lo]


# Per message, more than any tokenizer adds around a message's text (role, separators, a BOS token) and more than
# `normalise` can add (a joining separator, a short placeholder message).
_CEILING_PER_MESSAGE = 32


def token_ceiling(messages: Sequence[Message]) -> int:
    """A number of tokens the history cannot exceed for any model, counted without a tokenizer: the tokenizers
    models use (byte-level BPE, SentencePiece with byte fallback) give no token less than one byte of text, so
    the UTF-8 size of the text, plus a margin per message, is a ceiling."""
    return sum(len(m.content.encode("utf-8", "surrogatepass")) + _CEILING_PER_MESSAGE for m in messages) \
        + _CEILING_PER_MESSAGE


def _size(messages: Sequence[Message]) -> int:
    return sum(len(m.content) for m in messages)


def tighten(
    messages: Sequence[Message], trim: Trim | None, *, keep: float = DEFAULT_TIGHTEN_KEEP
) -> Trim | None:
    """A trim strictly more aggressive than `trim`, for a history the provider said is too long; None when nothing
    more can be elided or dropped.

    Steps are taken in policy order until the trimmed text is at most `keep` of what `trim` left (or the steps run
    out), so a handful of refusals reach any size a provider accepts."""
    current = trim or Trim()
    steps = _pending(messages, current)
    if not steps:
        return None
    target = keep * _size(apply_trim(messages, current))
    for step in steps:
        current = _with(current, step)
        if _size(apply_trim(messages, current)) <= target:
            break
    return current
