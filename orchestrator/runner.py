"""One experiment run: `python experiment.py --out_dir=run_i` in the session folder, and what came of it.

The child runs in its own session and process group, with an environment built from an allowlist (API keys and
tokens never reach it) and no core dumps. Its stdout and stderr come to this process through pipes and are kept
within a cap (head and tail, with a line stating exactly how many bytes were cut between them) in `stdout.log`
and `stderr.log` of the run folder, rewritten whole and atomically while it runs; the child never writes those
files itself, so nothing it writes is lost without a note. (If this process dies, the child's next write fails
with a broken pipe, so an orphaned run soon ends; a resumed session stops it with `stop_orphan` anyway.)

A timeout sends SIGTERM to the whole group, then SIGKILL after a grace period; when the child exits on its own,
anything it left running in its group is stopped the same way, and the logs end there (a process that left the
group and still holds the pipes is not waited for). The pid, process group and kernel start time are exposed
before waiting, so a journal can record them and a resumed session can stop an orphan with `stop_orphan`
without ever signalling an unrelated process that reused the pid. `with start(req) as handle:` stops the run
if the block ends without `handle.wait()` having finished it (for instance because journaling it failed).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import resource
import select
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator import sandbox as sandboxing
from orchestrator.atomic import write_bytes_atomic
from orchestrator.errors import OrchestratorError
from orchestrator.sandbox import SandboxSpec, SandboxUsed
from orchestrator.secrets import looks_secret, redact_bytes

# quota: the run folder grew past its disk quota; tampered (set by the loop): the run changed guarded files
Outcome = Literal["ok", "error", "timeout", "oom", "no_results", "quota", "tampered", "sandbox_failed"]

ALLOWED_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TEMP", "TMP", "TERM", "VIRTUAL_ENV",
    "CONDA_PREFIX", "LD_LIBRARY_PATH", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "TRANSFORMERS_CACHE", "TORCH_HOME", "XDG_CACHE_HOME",
    "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS", "OMP_WAIT_POLICY",
    "TOKENIZERS_PARALLELISM",
})
ALLOWED_PREFIXES = ("LC_", "CUDA_", "NVIDIA_", "PYTORCH_")
# PYTHONDONTWRITEBYTECODE: a run never writes __pycache__ beside a protected module, so any byte code that
# appears there was planted (see guard.shadows).
FORCED_ENV = {"PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1"}
# Defaults a run gets unless the user's environment or --env sets them. OpenMP threads (torch on the CPU) that wait
# by spinning lose much of their time when other work shares the cores: a CPU-bound torch loop took 1.6 times as
# long next to two busy processes as with PASSIVE (3 to 4 times under heavier load), and 0.88 times on an idle
# machine; the policy changes no result (bench/run_threads.py).
RUN_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}

# Name parts (split on "_") that mark a variable as a credential; the allowlist is the main defence, this is the
# backstop that holds even for names a template declares or a user passes with --env.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_GPUS = re.compile(r"[A-Za-z0-9,:_\-]*\Z")

OOM_MARKERS = ("MemoryError", "CUDA out of memory", "OutOfMemoryError", "out of memory", "Cannot allocate memory")
HEAD_LINES, TAIL_LINES, EXCERPT_CHARS = 30, 60, 4000
MARKER_ROOM = 120  # bytes of a capped log left for the line saying how much was cut
FLUSH_S = 0.5  # while output comes, the log files on disk are at most this old
READ_CHUNK = 1 << 16
DRAIN_READS = 256  # reads of what is left in a pipe once the run's group is gone
RESULTS_MAX_BYTES = 32 * 2**20  # a results file larger than this is not read
_WAIT_STEP_S = 0.05


class ResultsError(OrchestratorError, ValueError):
    """The results file is missing or does not hold metrics. The message is one line."""


class EnvRefused(OrchestratorError, ValueError):
    """An environment variable for runs is refused (it looks like a secret, or is not a valid name)."""


class RunStartError(OrchestratorError, RuntimeError):
    """The experiment process could not be started (missing interpreter, unusable folder)."""


# Models marked defer_build are built on first use: this module is imported on the way to a launch's first line.
class Metric(BaseModel):
    model_config = ConfigDict(defer_build=True)
    mean: float
    stderr: float | None = None


class RunLimits(BaseModel):
    """Resource limits of one run (None: no limit)."""
    model_config = ConfigDict(defer_build=True)

    processes: int | None = Field(None, ge=1)  # tasks the run's user may add (RLIMIT_NPROC; not for root)
    file_bytes: int | None = Field(None, ge=1)  # largest file the run may write (RLIMIT_FSIZE)
    run_dir_bytes: int | None = Field(None, ge=1)  # disk quota of the run folder, checked while it runs


class RunRequest(BaseModel):
    model_config = ConfigDict(defer_build=True)
    cwd: Path  # the session folder
    run_name: str  # "run_3": the run folder, relative to cwd; its logs go there
    python: str = sys.executable
    script: str = "experiment.py"
    args: list[str] | None = None  # replaces the default [f"--out_dir={run_name}"] when given ([] for plot.py)
    timeout_s: float = 7200
    kill_grace_s: float = 10
    env_allow: list[str] = Field(default_factory=list)  # extra names the template declares
    env_set: dict[str, str] = Field(default_factory=dict)  # --env KEY=VALUE
    gpus: str | None = None  # -> CUDA_VISIBLE_DEVICES
    log_cap_bytes: int = 256 * 1024  # stdout.log and stderr.log each
    results_file: str | None = "final_info.json"  # relative to the run folder; None: exit 0 is "ok"
    sandbox: SandboxSpec | None = None  # None: run directly (the defences in orchestrator.sandbox still hold)
    limits: RunLimits = Field(default_factory=RunLimits)

    def command(self) -> list[str]:
        args = self.args if self.args is not None else [f"--out_dir={self.run_name}"]
        return [self.python, self.script, *args]


class RunResult(BaseModel):
    model_config = ConfigDict(defer_build=True)
    outcome: Outcome
    returncode: int | None  # negative: killed by that signal
    duration_s: float
    pid: int
    started_at: float  # unix time
    metrics: dict[str, Metric] = Field(default_factory=dict)
    stdout_tail: str = ""
    stderr_head: str = ""  # empty when stderr_tail already holds all of stderr
    stderr_tail: str = ""
    message: str = ""  # one line, e.g. "exit 1: ValueError: bad shape"
    sandbox: SandboxUsed = "none"
    discarded: list[str] = Field(default_factory=list)  # copy-on-write files the run changed (changes dropped)


# --------------------------------------------------------------------------------------------------- environment


def _allowed(name: str, declared: set[str]) -> bool:
    return name in ALLOWED_NAMES or name.startswith(ALLOWED_PREFIXES) or name in declared


def check_env_set(env_set: Mapping[str, str]) -> None:
    """Raise EnvRefused (one line) for a --env variable that may not reach a run."""
    for name, value in env_set.items():
        if not _ENV_NAME.match(name):
            raise EnvRefused(f"--env {name!r}: not an environment variable name")
        if looks_secret(name):
            raise EnvRefused(f"--env {name}: refused, the name looks like a secret (runs never see keys or tokens)")
        if "\0" in value:
            raise EnvRefused(f"--env {name}: the value contains a NUL character")


def build_env(req: RunRequest, parent: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The child's whole environment: allowlisted and declared names from `parent`, PYTHONUNBUFFERED/MPLBACKEND,
    OMP_WAIT_POLICY=PASSIVE unless set, then --env values and CUDA_VISIBLE_DEVICES from `gpus`. Secret-looking names
    never pass."""
    check_env_set(req.env_set)
    declared = {n for n in req.env_allow if _ENV_NAME.match(n)}
    env = {k: v for k, v in parent.items() if _allowed(k, declared) and not looks_secret(k)}
    env.update(FORCED_ENV)
    for name, value in RUN_ENV_DEFAULTS.items():
        env.setdefault(name, value)
    env.update(req.env_set)
    if req.gpus is not None:
        gpus = req.gpus.replace(" ", "")
        if not _GPUS.match(gpus):
            raise EnvRefused(f"--gpus {req.gpus!r}: expected device ids such as 0 or 0,1")
        env["CUDA_VISIBLE_DEVICES"] = gpus
    return env


# --------------------------------------------------------------------------------------------------- results


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _finite(v: Any) -> float | None:
    """`v` as a float if it is a number a float can hold and is finite; None otherwise (NaN, infinities, and
    integers too big for a float, such as 10**400)."""
    if not _is_number(v):
        return None
    try:
        f = float(v)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def _shown(name: str) -> str:
    """A metric name as it may appear in a one-line message."""
    return name.encode("unicode_escape", errors="backslashreplace").decode("ascii")


def _read_results(path: Path) -> bytes:
    """The bytes of a results file: a regular file within `RESULTS_MAX_BYTES`, else ResultsError."""
    name = path.name
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ResultsError(f"{name} was not written") from None
    except OSError as err:
        raise ResultsError(f"{name} cannot be read: {err.strerror}") from None
    if not stat.S_ISREG(st.st_mode):  # a FIFO would block the read forever, a device never end
        raise ResultsError(f"{name} is not a regular file")
    limit = f"{RESULTS_MAX_BYTES / 2**20:g} MiB"
    if st.st_size > RESULTS_MAX_BYTES:
        raise ResultsError(f"{name} is {st.st_size / 2**20:.1f} MiB, over the {limit} limit for a results file")
    try:
        with open(path, "rb") as fh:
            raw = fh.read(RESULTS_MAX_BYTES + 1)
    except OSError as err:
        raise ResultsError(f"{name} cannot be read: {err.strerror}") from None
    if len(raw) > RESULTS_MAX_BYTES:  # it grew after the size was checked
        raise ResultsError(f"{name} is over the {limit} limit for a results file")
    return raw


def _parse_results(name: str, raw: bytes) -> Any:
    """The JSON value in a results file's bytes (UTF-8, as JSON requires), else ResultsError."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ResultsError(f"{name} is not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ResultsError(f"{name} is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}") from None
    except RecursionError:
        raise ResultsError(f"{name} is nested too deeply to read") from None
    except ValueError:  # an integer literal longer than Python converts (sys.get_int_max_str_digits)
        raise ResultsError(f"{name} holds a number too long to read") from None


def _entries(prefix: str, obj: dict[str, Any]) -> Iterator[tuple[str, Any, Any, dict[str, Any] | None]]:
    """(dotted name, value, stderr, None) for each numeric entry of `obj`, and (name + ".", None, None, child)
    for each object in it to walk next; a {"means": ..., "stderrs": ...} group gives its means only."""
    means = obj.get("means")
    if isinstance(means, dict):
        stderrs = obj.get("stderrs")
        if not isinstance(stderrs, dict):
            stderrs = {}
        for k, v in means.items():
            if _is_number(v):
                yield f"{prefix}{k}", v, stderrs.get(k), None
        return
    for k, v in obj.items():
        if _is_number(v):
            yield f"{prefix}{k}", v, None, None
        elif isinstance(v, dict):
            yield f"{prefix}{k}.", None, None, v


def read_metrics(path: Path) -> dict[str, Metric]:
    """Metrics from a results file: every finite numeric leaf of the JSON object, named by its dotted path.
    A group shaped {"means": {...}, "stderrs": {...}} (AI-Scientist) gives "group.name" with mean and stderr and
    nothing else from that group. Lists, strings, booleans, null, NaN, infinities and integers too big for a
    float are not metrics.

    Whatever the file holds, the only error is ResultsError with a one-line message: a file that is missing,
    not a regular file, over `RESULTS_MAX_BYTES`, not UTF-8, not JSON, nested too deeply for the JSON parser,
    not an object, or without a single metric. Objects are walked without recursion, so depth never matters
    once the file parsed."""
    name = path.name
    data = _parse_results(name, _read_results(path))
    if not isinstance(data, dict):
        raise ResultsError(f"{name} must hold a JSON object, not {type(data).__name__}")
    metrics: dict[str, Metric] = {}
    skipped: list[str] = []
    stack = [_entries("", data)]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
            continue
        key, value, stderr, child = entry
        if child is not None:
            stack.append(_entries(key, child))
            continue
        mean = _finite(value)
        if mean is None:
            skipped.append(key)
            continue
        metrics[key] = Metric(mean=mean, stderr=_finite(stderr))
    if not metrics:
        detail = f" (not finite: {', '.join(_shown(k) for k in skipped[:5])})" if skipped else ""
        raise ResultsError(f"{name} holds no numeric values{detail}")
    return metrics


# --------------------------------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, pgrp, session, start ticks) of a live or zombie process, None if there is none."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            text = fh.read().decode("ascii", errors="replace")
    except OSError:
        return None
    rest = text[text.rfind(")") + 2:].split()
    try:
        return rest[0], int(rest[2]), int(rest[3]), int(rest[19])
    except (IndexError, ValueError):
        return None


def proc_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22); None if unknown."""
    stat = _proc_stat(pid)
    return stat[3] if stat else None


def _group_members(pgid: int, min_ticks: int | None = None) -> list[int]:
    """Live (not zombie) processes in process group `pgid`."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [pgid]
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _proc_stat(int(entry))
        if stat is None or stat[1] != pgid or stat[0] in ("Z", "X"):
            continue
        if min_ticks is not None and stat[3] < min_ticks:
            continue
        members.append(int(entry))
    return members


def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop_group(pgid: int, grace_s: float, min_ticks: int | None = None) -> bool:
    """SIGTERM the group, wait up to `grace_s` for it to go, then SIGKILL what is left and wait for that.
    Returns True if any live member was signalled."""
    if not _group_members(pgid, min_ticks):
        return False
    _signal_group(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while _group_members(pgid, min_ticks) and time.monotonic() < deadline:
        time.sleep(_WAIT_STEP_S)
    if _group_members(pgid, min_ticks):
        _signal_group(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while _group_members(pgid, min_ticks) and time.monotonic() < deadline:
            time.sleep(_WAIT_STEP_S)
    return True


def stop_orphan(pid: int, proc_start_ticks: int | None, grace_s: float = 10.0) -> bool:
    """Stop the process group of a run left behind by a crashed orchestrator. Acts only when a process with that
    pid still exists with the same start ticks (the same process, not a reuse of its pid), or, if the leader is
    gone, on members of its group that started after it. Returns True if something was stopped."""
    if proc_start_ticks is None or pid <= 1:
        return False
    stat = _proc_stat(pid)
    if stat is not None:
        state, pgrp, _session, ticks = stat
        if ticks != proc_start_ticks:
            return False
        if pgrp != pid:  # not the leader of its own group any more: stop that process alone
            if state in ("Z", "X"):
                return False
            return _stop_group_of_one(pid, grace_s)
        return _stop_group(pid, grace_s, min_ticks=proc_start_ticks)
    # the leader is gone; a group with its id can only be the orphan's own (pids of live groups are not reused)
    return _stop_group(pid, grace_s, min_ticks=proc_start_ticks)


def _stop_group_of_one(pid: int, grace_s: float) -> bool:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace_s
    while (s := _proc_stat(pid)) is not None and s[0] not in ("Z", "X") and time.monotonic() < deadline:
        time.sleep(_WAIT_STEP_S)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return True


# --------------------------------------------------------------------------------------------------- logs


def _cut_note(cut: int) -> bytes:
    return f"\n[... {cut} bytes of this log cut by the orchestrator ...]\n".encode()


class CappedLog:
    """One output stream of a run, held in memory (at most about twice `cap` bytes): all of it while it fits in
    `cap`; past that, its first bytes (a quarter of the cap) and a ring of its latest ones.

    `render` is the log file's content: everything, or the head, the note `_cut_note(n)` and the tail, where the
    head ends and the tail starts on a line break when one is near and n is exactly the number of the stream's
    bytes left out between them (so head + n + tail is every byte the stream carried). The file stays within
    `cap` bytes when the cap leaves room for the note."""

    def __init__(self, cap: int) -> None:
        self.cap = max(int(cap), 0)
        self.head_room = self.cap // 4
        self.ring_room = self.cap - self.head_room
        self.tail_room = max(self.ring_room - MARKER_ROOM, 0)
        self.head = bytearray()
        self.ring = bytearray()  # the latest bytes after the head: at least ring_room of them once there are
        self.total = 0

    def feed(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_room - len(self.head)
        if room > 0:
            self.head += data[:room]
            data = data[room:]
        self.ring += data
        if len(self.ring) > 2 * self.ring_room:  # trimmed in bulk, so a stream of small reads costs no copy each
            del self.ring[: len(self.ring) - self.ring_room]

    def render(self) -> bytes:
        if self.total <= self.cap:
            return bytes(self.head + self.ring)
        head = bytes(self.head)
        nl = head.rfind(b"\n")
        if nl >= len(head) // 2:
            head = head[: nl + 1]
        tail = bytes(self.ring[len(self.ring) - self.tail_room:]) if self.tail_room else b""
        nl = tail.find(b"\n")
        if 0 <= nl < len(tail) // 2:
            tail = tail[nl + 1:]
        return head + _cut_note(self.total - len(head) - len(tail)) + tail


def _write_log(path: Path, data: bytes, durable: bool) -> None:
    """Replace `path` with `data` atomically (fsynced first when `durable`), keeping its mode. A run folder the
    experiment removed is made again."""
    write_bytes_atomic(path, redact_bytes(data), durable)


class _Pump:
    """Reads a run's stdout and stderr pipes in a thread into their `CappedLog`s and keeps the log files on disk:
    each is rewritten whole (atomically) at most every FLUSH_S while output comes, and once more, durably, at
    the end. Reading ends when both pipes are closed, or, after `finish`, once what the pipes hold then is read:
    a process that left the run's group and still holds a pipe cannot keep the run from ending. A log that
    cannot be written never stops the reading (the child would block on a full pipe); `write_error` says so."""

    def __init__(self, streams: list[tuple[int, Path, CappedLog]]) -> None:
        self.streams = {fd: (path, log) for fd, path, log in streams}
        self.write_error = ""
        self._dirty: set[int] = set()
        self._wake_r, self._wake_w = os.pipe()
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="run-logs", daemon=True)
        self._thread.start()

    def finish(self) -> None:
        """End the reading (see the class docstring), wait for the logs to be written. Safe to call again."""
        if self._finished:
            return
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join()
        self._finished = True
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        open_fds = set(self.streams)
        try:
            for fd in open_fds:
                selector.register(fd, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            finishing = False
            last_flush = time.monotonic()
            while open_fds and not finishing:
                timeout = max(last_flush + FLUSH_S - time.monotonic(), 0) if self._dirty else None
                for key, _ in selector.select(timeout):
                    if key.fd == self._wake_r:
                        finishing = True
                    elif not self._read(key.fd):
                        selector.unregister(key.fd)
                        open_fds.discard(key.fd)
                if self._dirty and time.monotonic() - last_flush >= FLUSH_S:
                    self._flush(list(self._dirty), durable=False)
                    last_flush = time.monotonic()
            for fd in open_fds:  # what the pipe holds now, not what a process outside the group writes later
                os.set_blocking(fd, False)
                for _ in range(DRAIN_READS):
                    if not self._read(fd):
                        break
        finally:
            selector.close()
            for fd in self.streams:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._flush(list(self.streams), durable=True)

    def _read(self, fd: int) -> bool:
        """Read one chunk into its log; False at the end of the stream (or, non-blocking, when it is empty)."""
        try:
            data = os.read(fd, READ_CHUNK)
        except OSError:  # BlockingIOError when draining; anything else ends the stream too
            return False
        if not data:
            return False
        self.streams[fd][1].feed(data)
        self._dirty.add(fd)
        return True

    def _flush(self, fds: list[int], durable: bool) -> None:
        self._dirty.difference_update(fds)
        for fd in fds:
            path, log = self.streams[fd]
            try:
                _write_log(path, log.render(), durable)
            except OSError as err:
                self.write_error = f"{path.name} could not be written: {err.strerror or err}"


def _excerpt_lines(text: str, n_lines: int, n_chars: int, from_end: bool) -> str:
    lines = text.splitlines()
    lines = lines[-n_lines:] if from_end else lines[:n_lines]
    out = "\n".join(lines)
    if len(out) > n_chars:
        out = ("..." + out[-n_chars:]) if from_end else (out[:n_chars] + "...")
    return out


def _summary_line(stderr: str) -> str:
    """The most telling line of stderr: the exception line of the last traceback, else the last line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("[... ")]
    if not lines:
        return ""
    exc = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)|[A-Z]\w*Error)\b.*")
    for ln in reversed(lines):
        if exc.match(ln):
            return ln[:300]
    return lines[-1][:300]


# --------------------------------------------------------------------------------------------------- running


def _user_tasks() -> int:
    """Tasks (processes and threads) of this real user now: what RLIMIT_NPROC counts."""
    uid, count = os.getuid(), 0
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if name.isdigit():
                try:
                    if os.stat(f"/proc/{name}").st_uid == uid:
                        count += len(os.listdir(f"/proc/{name}/task"))
                except OSError:
                    continue
    return count


def _limit(which: int, value: int) -> None:
    _soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))


def _child_setup(limits: RunLimits, nproc: int | None, sandboxed: bool) -> Callable[[], None]:
    """What the child does between fork and exec: no core dumps, the run's limits, and (unsandboxed, as root)
    no capability that reads the orchestrator's memory."""

    def setup() -> None:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if nproc is not None:
            _limit(resource.RLIMIT_NPROC, nproc)
        if limits.file_bytes is not None:
            _limit(resource.RLIMIT_FSIZE, limits.file_bytes)
        if not sandboxed:
            sandboxing.drop_capabilities()

    return setup


def _disk_bytes(folder: Path) -> int:
    """Disk space the files under `folder` take (allocated blocks, so sparse files count what they use)."""
    total = 0
    stack = [folder]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                else:
                    st = entry.stat(follow_symlinks=False)
                    total += max(st.st_blocks * 512, 0)
            except OSError:
                continue
    return total


def _run_dir(req: RunRequest) -> Path:
    rel = Path(req.run_name)
    if not req.run_name or rel.is_absolute() or ".." in rel.parts or rel == Path("."):
        raise ValueError(f"run name {req.run_name!r} must be a folder name inside the session folder")
    return Path(req.cwd) / rel


class RunHandle:
    """A started run. Journal `pid`, `pgid`, `started_at` and `proc_start_ticks` before calling `wait`.

    Use it as a context (`with start(req) as handle:`): leaving the block before `wait` has finished the run,
    by an exception or not, stops the whole process group and reaps the child, so a run is never left behind."""

    def __init__(self, req: RunRequest, proc: subprocess.Popen[bytes], started_at: float, t0: float,
                 logs: _Pump, gate: int | None = None, scratch: Path | None = None,
                 cow_before: dict[str, bytes] | None = None, ready: int | None = None) -> None:
        self.req = req
        self._ready = ready  # read end of the sandbox's "set up" pipe (see _READY_SHIM); None when unsandboxed
        self._began: bool | None = None
        self.sandbox: SandboxUsed = "bwrap" if req.sandbox is not None else "none"
        self._scratch = scratch  # copy-on-write copies of the editable files (sandboxed runs)
        self._cow_before = cow_before or {}
        self._over_quota = False
        self._discarded: list[str] = []
        self._gate = gate  # write end of the start gate (see `start`); None once released or closed
        self.proc = proc
        self.pid = proc.pid
        self.pgid = proc.pid  # start_new_session: the child leads its own session and group
        self.started_at = started_at
        self.proc_start_ticks = proc_start_ticks(proc.pid)
        self.run_dir = _run_dir(req)
        self._t0 = t0
        self._logs = logs
        self._killed = False
        self._result: RunResult | None = None
        self._pidfd: int | None = None  # opened on first wait; -1 where pidfds are unavailable

    def __enter__(self) -> RunHandle:
        return self

    def release(self, env: Mapping[str, str] | None = None, timeout_s: float | None = None) -> None:
        """Let a gated run begin (see `start(gate=True)`); does nothing if it is not gated or already released.
        `env` is set in the run's environment as it begins (a GPU leased while the gated process waited), and
        `timeout_s` replaces the request's. The run's clock (timeout, duration) starts here, not at `start`."""
        gate, self._gate = self._gate, None
        if gate is None:
            return
        extra = dict(env or {})
        if any(not _ENV_NAME.match(k) or "\n" in v or "\0" in v for k, v in extra.items()):
            os.close(gate)
            raise EnvRefused(f"cannot pass {sorted(extra)} to a run")
        if timeout_s is not None:
            self.req = self.req.model_copy(update={"timeout_s": timeout_s})
        self.started_at = time.time()
        self._t0 = time.monotonic()
        try:
            os.write(gate, b"1" + "".join(f"\n{k}={v}" for k, v in extra.items()).encode())
        except OSError:  # the shim is gone already (killed): wait() will say so
            pass
        finally:
            os.close(gate)

    def _close_gate(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            os.close(gate)  # the shim reads end-of-file and exits without running the experiment

    def __exit__(self, *exc_info: object) -> None:
        self._close_gate()
        if self._result is None:
            self.kill()
            self._finish()

    def _exited(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the child to exit, without reaping it (its pid keeps the group)."""
        if self.proc.returncode is not None:  # reaped already: its pid may belong to another process now
            return True
        try:
            res = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if res is not None:
            return True
        if timeout <= 0:
            return False
        fd = self._pidfd
        if fd is None and hasattr(os, "pidfd_open"):
            try:
                fd = self._pidfd = os.pidfd_open(self.pid)
            except OSError:
                fd = self._pidfd = -1
        if fd is not None and fd >= 0:
            select.select([fd], [], [], timeout)
        else:
            time.sleep(min(timeout, _WAIT_STEP_S))
        try:
            return os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def kill(self) -> None:
        """Stop the run: SIGTERM to its whole process group, then SIGKILL after the grace period. `wait` then
        reads its outcome ("error", stopped by the orchestrator). Nothing is signalled once the run has ended."""
        if self._result is not None or self.proc.returncode is not None:
            return
        self._killed = True
        self._stop()

    def _stop(self) -> None:
        _stop_group(self.pgid, self.req.kill_grace_s, min_ticks=self.proc_start_ticks)
        if not self._exited(0):  # not in its group any more (it moved itself): the leader is killed directly
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def wait(self, on_tick: Callable[[float], None] | None = None, tick_s: float = 0.5) -> RunResult:
        """Wait for the run to end (or time out), stop anything it left in its group, finish its logs and read
        its outcome. An exception while waiting (Ctrl-C, an `on_tick` failure) stops the run first."""
        if self._result is not None:
            return self._result
        self.release()
        req = self.req
        timed_out = False
        try:
            while True:
                elapsed = time.monotonic() - self._t0
                left = req.timeout_s - elapsed
                if self._exited(max(min(tick_s, left), 0)):
                    break
                elapsed = time.monotonic() - self._t0
                if elapsed >= req.timeout_s:
                    timed_out = True
                    self._stop()
                    break
                quota = req.limits.run_dir_bytes
                if quota is not None and _disk_bytes(self.run_dir) > quota:
                    self._over_quota = True
                    self._stop()
                    break
                if on_tick is not None:
                    on_tick(elapsed)
            quota = req.limits.run_dir_bytes  # once more at the end: a run may fill its folder between two checks
            if not timed_out and quota is not None and _disk_bytes(self.run_dir) > quota:
                self._over_quota = True
            # the child is gone (or a zombie still holding the group id): stop whatever it left behind
            if self.proc.returncode is None and _group_members(self.pgid, self.proc_start_ticks):
                _stop_group(self.pgid, req.kill_grace_s, min_ticks=self.proc_start_ticks)
            self._logs.finish()
        except BaseException:
            self.kill()
            self._finish()
            raise
        returncode = self.proc.wait()
        duration = time.monotonic() - self._t0
        self._began = self._sandbox_began()
        self._close()
        self._result = self._outcome(returncode, duration, timed_out)
        return self._result

    def _sandbox_began(self) -> bool | None:
        """Whether bwrap set the sandbox up and started the command in it: True when the shim inside said so,
        False when every holder of the pipe is gone and it never did, None when unsandboxed or not known."""
        fd = self._ready
        if fd is None:
            return None
        os.set_blocking(fd, False)
        try:
            return os.read(fd, 1) == b"r"
        except BlockingIOError:  # something still holds the write end: it may yet begin
            return None
        except OSError:
            return None

    def _finish(self) -> None:
        """Logs written, child reaped, pidfd closed (after the group was stopped). Safe to call again."""
        self._logs.finish()
        self.proc.wait()
        self._close()

    def _close(self) -> None:
        fd = self._pidfd
        if fd is not None and fd >= 0:
            os.close(fd)
        self._pidfd = -1
        ready, self._ready = self._ready, None
        if ready is not None:
            os.close(ready)
        scratch, self._scratch = self._scratch, None
        if scratch is not None:
            self._discarded = sandboxing.changed_in_scratch(self._cow_before, scratch)
            shutil.rmtree(scratch, ignore_errors=True)

    def _outcome(self, returncode: int, duration: float, timed_out: bool) -> RunResult:
        req = self.req
        if self.sandbox == "bwrap":
            returncode = sandboxing.exit_status(returncode)
        stdout, stderr = (log.render().decode("utf-8", errors="replace") for _, log in self._logs.streams.values())
        tail = _excerpt_lines(stderr, TAIL_LINES, EXCERPT_CHARS, from_end=True)
        head = "" if tail == stderr.rstrip("\n") else _excerpt_lines(stderr, HEAD_LINES, EXCERPT_CHARS, False)
        base: dict[str, Any] = dict(
            returncode=returncode, duration_s=round(duration, 3), pid=self.pid, started_at=self.started_at,
            stdout_tail=_excerpt_lines(stdout, TAIL_LINES, EXCERPT_CHARS, from_end=True),
            stderr_head=head, stderr_tail=tail, sandbox=self.sandbox, discarded=list(self._discarded))
        last = _summary_line(stderr)
        metrics: dict[str, Metric] = {}
        if self._over_quota:
            outcome: Outcome = "quota"
            mib = (req.limits.run_dir_bytes or 0) / 2**20
            message = f"stopped: {req.run_name}/ grew past its {mib:g} MiB disk quota"
        elif timed_out:
            outcome = "timeout"
            message = f"timed out after {req.timeout_s:g} s; the process group was stopped"
        elif self._killed:
            outcome = "error"
            message = "stopped by the orchestrator" + (f" ({last})" if last else "")
        elif self._began is False and returncode != 0:  # bwrap failed before the experiment could begin
            outcome = "sandbox_failed"
            message = "the sandbox could not start it: " + (last or f"bwrap exit {returncode}")
        elif returncode == 0:
            if req.results_file is None:
                outcome, message = "ok", "exit 0"
            else:
                try:
                    metrics = read_metrics(self.run_dir / req.results_file)
                    outcome, message = "ok", f"exit 0: {len(metrics)} metrics"
                except ResultsError as err:
                    outcome, message = "no_results", f"exit 0 but {req.run_name}/{err}"
        elif returncode in (-signal.SIGKILL, 137) or any(m in tail for m in OOM_MARKERS):
            outcome = "oom"
            how = "killed by SIGKILL" if returncode in (-signal.SIGKILL, 137) else f"exit {returncode}"
            message = f"out of memory ({how})" + (f": {last}" if last else "")
        else:
            if returncode < 0:
                try:
                    how = f"killed by {signal.Signals(-returncode).name}"
                except ValueError:
                    how = f"killed by signal {-returncode}"
            else:
                how = f"exit {returncode}"
            outcome, message = "error", how + (f": {last}" if last else "")
        if self._logs.write_error:
            message += f" ({self._logs.write_error})"
        if outcome == "error" and self.sandbox == "bwrap" and "Read-only file system" in stderr:
            message += f" ({sandboxing.EROFS_HINT})"
        return RunResult(outcome=outcome, metrics=metrics, message=message.replace("\n", " "), **base)


# The start gate: the child first runs this in the orchestrator's interpreter, blocks until the parent writes one
# byte to the gate pipe, then execs the experiment (same pid, same start time). If the parent dies before it
# released the gate, the read sees end-of-file and the experiment never starts: a run the journal does not know
# about cannot be left running.
_GATE_SHIM = """import os, sys
fd = int(sys.argv[1])
go = b""
while True:
    chunk = os.read(fd, 65536)
    if not chunk:
        break
    go += chunk
os.close(fd)
if not go.startswith(b"1"):
    os._exit(0)
for line in go[1:].decode().split("\\n"):
    name, sep, value = line.partition("=")
    if sep and name:
        os.environ[name] = value
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as err:
    sys.stderr.write(f"cannot start {sys.argv[2]}: {err.strerror}\\n")
    os._exit(127)
"""

# Inside the sandbox, first: say on the pipe `argv[1]` that bwrap has set the sandbox up and started a command
# in it, then become the experiment (the run's own interpreter; -I -S: nothing imported from the session folder,
# where the run's code lives, nor from PYTHON* variables). A run that ends without
# that word failed in bwrap's set-up (a mount refused, namespaces unavailable): no code of the model's ran.
_READY_SHIM = """import os, sys
fd = int(sys.argv[1])
os.write(fd, b"r")
os.close(fd)
try:
    os.execvp(sys.argv[2], sys.argv[2:])
except OSError as err:
    sys.stderr.write(f"cannot start {sys.argv[2]}: {err.strerror}\\n")
    os._exit(127)
"""


def start(req: RunRequest, gate: bool = False) -> RunHandle:
    """Start a run from a clean run folder (anything left there by an earlier attempt is removed), with its
    stdout and stderr read through pipes into `stdout.log` and `stderr.log` there (see `CappedLog`).

    With `gate`, the process exists (pid and start time known, ready to journal) but the experiment begins only
    on `handle.release()` (or `wait()`); if the orchestrator dies first, it never begins."""
    build_env(req)  # refuse bad --env before touching the folder
    if shutil.which(req.python) is None:
        raise RunStartError(f"cannot start {req.python}: no such interpreter")
    run_dir = _run_dir(req)
    cwd = Path(req.cwd)
    if not cwd.is_dir():
        raise RunStartError(f"{cwd}: the session folder does not exist")
    if run_dir.is_symlink() or run_dir.is_file():
        run_dir.unlink()
    elif run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    env = build_env(req)
    logs = [run_dir / "stdout.log", run_dir / "stderr.log"]
    for path in logs:
        path.touch()
    command = req.command()
    scratch: Path | None = None
    cow_before: dict[str, bytes] = {}
    ready_r: int | None = None
    ready_w: int | None = None
    if req.sandbox is not None:
        scratch = Path(tempfile.mkdtemp(prefix="orch-cow-"))
        try:
            cow_before = sandboxing.prepare_scratch(req.sandbox, cwd, scratch)
            prefix = sandboxing.bwrap_command(req.sandbox, cwd, run_dir, scratch, req.python)
            ready_r, ready_w = os.pipe()
            command = [*prefix, req.python, "-I", "-S", "-c", _READY_SHIM, str(ready_w), *command]
        except BaseException:
            for fd in (ready_r, ready_w):
                if fd is not None:
                    os.close(fd)
            shutil.rmtree(scratch, ignore_errors=True)
            raise
        for name, value in sandboxing.SANDBOX_ENV_DEFAULTS.items():  # the home folder is read-only in the sandbox
            env.setdefault(name, value)
        env["TMPDIR"] = "/tmp"
    nproc = None if req.limits.processes is None else _user_tasks() + req.limits.processes
    setup = _child_setup(req.limits, nproc, sandboxed=req.sandbox is not None)
    (out_r, out_w), (err_r, err_w) = os.pipe(), os.pipe()
    gate_r, gate_w = os.pipe() if gate else (None, None)
    if gate_r is not None:
        command = [sys.executable, "-I", "-S", "-c", _GATE_SHIM, str(gate_r), *command]
    try:
        started_at = time.time()
        t0 = time.monotonic()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out_w,
                                stderr=err_w, start_new_session=True, preexec_fn=setup, close_fds=True,
                                pass_fds=tuple(fd for fd in (gate_r, ready_w) if fd is not None))
    except BaseException as exc:
        for fd in (out_r, err_r, gate_w, ready_r):
            if fd is not None:
                os.close(fd)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        if isinstance(exc, OSError):
            raise RunStartError(f"cannot start {req.python}: {exc.strerror or exc}") from None
        raise
    finally:
        for fd in (out_w, err_w, gate_r, ready_w):  # the child holds them now; reading ends when every holder is gone
            if fd is not None:
                os.close(fd)
    streams = [(out_r, logs[0], CappedLog(req.log_cap_bytes)), (err_r, logs[1], CappedLog(req.log_cap_bytes))]
    try:
        pump = _Pump(streams)
    except BaseException:
        if gate_w is not None:
            os.close(gate_w)
        _stop_group(proc.pid, 0)
        proc.wait()
        for fd in (out_r, err_r, ready_r):
            if fd is not None:
                os.close(fd)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    return RunHandle(req, proc, started_at, t0, pump, gate_w, scratch, cow_before, ready_r)


def run(req: RunRequest, on_start: Callable[[RunHandle], None] | None = None) -> RunResult:
    """start + on_start (e.g. journal the pid) + wait. The experiment begins only after on_start returned; if
    on_start fails, it never begins and the process is stopped."""
    with start(req, gate=True) as handle:
        if on_start is not None:
            on_start(handle)
        handle.release()
        return handle.wait()
