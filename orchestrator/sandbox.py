"""Where a run executes: inside bubblewrap (`bwrap`), or directly, with the defences that hold either way.

`choose` turns the `--sandbox` setting (auto | bwrap | none) into the mode a session uses. `bwrap_command` builds
the bwrap argument list for one run from a `SandboxSpec`: a new PID namespace that dies with the run, a read-only
view of the machine with the run's own folder writable, editable files copy-on-write, a private /tmp, declared
caches writable, no network unless declared, and GPU device nodes bound where present.

`protect_process` is called once by the process that drives sessions: it becomes non-dumpable (a same-user child
cannot read its /proc/<pid>/environ, where API keys live) and a child subreaper (a run's descendants that leave its
process group are re-parented here, so `stop_strays` can find and stop them). `drop_capabilities` runs in an
unsandboxed run's child before exec: as root, the capabilities that bypass non-dumpable are dropped.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import glob
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from orchestrator.errors import OrchestratorError

SandboxMode = Literal["auto", "bwrap", "none"]
SandboxUsed = Literal["bwrap", "none"]

GPU_DEVICES = ("/dev/nvidia*", "/dev/dri")
# CAP_SYS_PTRACE, CAP_SYS_ADMIN and CAP_PERFMON each let a root process read a non-dumpable process's memory and
# environment; an unsandboxed run started as root loses them (a sandboxed one loses every capability: --cap-drop).
_BYPASS_CAPABILITIES = (19, 21, 38)
_PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_SET_CHILD_SUBREAPER, _PR_CAP_AMBIENT = 4, 24, 36, 47
_PR_SET_PDEATHSIG = 1
_PR_CAP_AMBIENT_CLEAR_ALL = 4
# Folders of sockets and services on the host (Docker, D-Bus, the user's session bus and agents): read-only binds do
# not stop connect(), so the sandbox replaces them with empty ones.
HIDDEN_FOLDERS = ("/run", "/var/run")
# Caches programs write under HOME, which is read-only in the sandbox: sent to the private /tmp instead.
SANDBOX_ENV_DEFAULTS = {"MPLCONFIGDIR": "/tmp/.cache/matplotlib", "XDG_CACHE_HOME": "/tmp/.cache",
                        "TRITON_CACHE_DIR": "/tmp/.cache/triton", "TMPDIR": "/tmp"}
EROFS_HINT = ("the sandbox keeps the session folder read-only outside the run folder: declare `caches` or "
              "`writable = true` in template.toml, or use --sandbox none")
PROBE_TIMEOUT_S = 20.0


class SandboxUnavailable(OrchestratorError, RuntimeError):
    """`--sandbox bwrap` was asked for where bubblewrap cannot run."""


class SandboxChoice(BaseModel):
    requested: SandboxMode
    used: SandboxUsed
    warning: str = ""  # one line when `auto` fell back to `none`


# Models marked defer_build are built on first use: this module is imported on the way to a launch's first line.
class SandboxSpec(BaseModel):
    """What one sandboxed run may see and touch. Paths are relative to the session folder unless absolute."""
    model_config = ConfigDict(defer_build=True)

    readonly: list[str] = Field(default_factory=list)  # kept read-only even where the tree is writable
    copy_on_write: list[str] = Field(default_factory=list)  # files the run may change; changes are discarded
    writable_tree: bool = False  # the session folder is writable (the template says so)
    network: bool = False
    caches: list[str] = Field(default_factory=list)  # absolute folders bound writable (created if missing)
    hidden: list[str] = Field(default_factory=list)  # absolute folders the run sees empty (its own session stays)


# --------------------------------------------------------------------------------------------- availability


@functools.cache
def bwrap_problem() -> str | None:
    """None when bubblewrap runs here with the namespaces a run needs; otherwise one line saying why not."""
    exe = shutil.which("bwrap")
    if exe is None:
        return "bubblewrap (bwrap) is not installed; on Debian/Ubuntu: apt install bubblewrap"
    probe = [exe, "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
             "--unshare-pid", "--unshare-net", "--die-with-parent", "--cap-drop", "ALL", "--", "true"]
    try:
        proc = subprocess.run(probe, stdin=subprocess.DEVNULL, capture_output=True, timeout=PROBE_TIMEOUT_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bubblewrap cannot run here ({err})"
    if proc.returncode != 0:
        lines = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        detail = lines[-1] if lines else f"exit {proc.returncode}"
        return f"bubblewrap cannot run here ({detail}; unprivileged user namespaces may be disabled)"
    return None


_BACKGROUND_PROBE: threading.Thread | None = None


def probe_in_background() -> None:
    """Start `bwrap_problem`'s probe (a bwrap process, about 10 ms) on a thread, so that it overlaps the caller's
    own work; `choose` waits for it, so the answer it gives is the one the probe found."""
    global _BACKGROUND_PROBE
    _BACKGROUND_PROBE = threading.Thread(target=bwrap_problem, name="bwrap-probe", daemon=True)
    _BACKGROUND_PROBE.start()


def choose(mode: SandboxMode) -> SandboxChoice:
    """The mode a session uses. `bwrap` where it cannot run raises SandboxUnavailable (one line)."""
    if mode == "none":
        return SandboxChoice(requested=mode, used="none")
    if _BACKGROUND_PROBE is not None:
        _BACKGROUND_PROBE.join()  # one probe, one answer: a second probe run meanwhile could answer otherwise
    problem = bwrap_problem()
    if problem is None:
        return SandboxChoice(requested=mode, used="bwrap")
    if mode == "bwrap":
        raise SandboxUnavailable(f"--sandbox bwrap: {problem}")
    return SandboxChoice(requested=mode, used="none",
                         warning=f"warning: runs are not sandboxed: {problem} (use --sandbox none to silence this)")


# --------------------------------------------------------------------------------------------- bwrap


def gpu_binds() -> list[str]:
    """`--dev-bind` arguments for the GPU device nodes present on this machine (none on a CPU-only one)."""
    args: list[str] = []
    for pattern in GPU_DEVICES:
        for path in sorted(glob.glob(pattern)):
            args += ["--dev-bind", path, path]
    return args


def _under(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def bwrap_command(spec: SandboxSpec, root: Path, run_dir: Path, scratch: Path, python: str) -> list[str]:
    """The bwrap prefix for one run (the experiment's own command follows it).

    `scratch` holds the copy-on-write copies of `spec.copy_on_write` (same relative paths); `python` is bound
    read-only if it lives under /tmp, which the sandbox replaces with a private one."""
    exe = shutil.which("bwrap") or "bwrap"
    # bwrap reads source paths from its own working folder, which is not ours: every path it gets is absolute.
    root, run_dir, scratch = root.resolve(), run_dir.resolve(), scratch.resolve()
    args = [exe, "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", *gpu_binds(),
            "--tmpfs", "/tmp", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent",
            "--cap-drop", "ALL"]
    if not spec.network:  # (with the network, /run stays: resolv.conf often points into it)
        args.append("--unshare-net")
        for hidden in HIDDEN_FOLDERS:
            if os.path.isdir(hidden) and not os.path.islink(hidden):
                args += ["--tmpfs", hidden]
    for hide in spec.hidden:  # a batch folder: other sessions' code and results, the slot locks
        hidden_path = Path(hide).resolve()
        if hidden_path.is_dir() and hidden_path != root:
            args += ["--tmpfs", str(hidden_path)]
            if _under(root, hidden_path):
                args += ["--ro-bind", str(root), str(root)]  # the session itself, under it, stays visible
    tmp = Path("/tmp")
    interpreter = Path(shutil.which(python) or python).absolute()
    # the interpreter's environment as named (a venv) and where its link leads (the base Python)
    for path in (root, interpreter.parent.parent, interpreter.resolve().parent.parent):
        if _under(path, tmp) and path != tmp:  # under the private /tmp: make it visible again
            args += ["--ro-bind", str(path), str(path)]
    if spec.writable_tree:
        args += ["--bind", str(root), str(root)]
    for cache in spec.caches:
        folder = Path(cache).resolve()
        with contextlib.suppress(OSError):
            folder.mkdir(parents=True, exist_ok=True)
        if folder.is_dir():
            args += ["--bind", str(folder), str(folder)]
    for rel in spec.readonly:  # after the writable binds above, so these stay read-only inside them
        path = root / rel
        if path.exists() or path.is_symlink():
            args += ["--ro-bind", str(path), str(path)]
    for rel in spec.copy_on_write:
        copy = scratch / rel
        if copy.is_file():
            args += ["--bind", str(copy), str(root / rel)]
    run_dir.mkdir(parents=True, exist_ok=True)
    args += ["--bind", str(run_dir), str(run_dir), "--chdir", str(root), "--"]
    return args


def prepare_scratch(spec: SandboxSpec, root: Path, scratch: Path) -> dict[str, bytes]:
    """Copy the copy-on-write files into `scratch`; returns their contents before the run."""
    before: dict[str, bytes] = {}
    for rel in spec.copy_on_write:
        src = root / rel
        if src.is_symlink() or not src.is_file():
            continue
        data = src.read_bytes()
        copy = scratch / rel
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(data)
        before[rel] = data
    return before


def changed_in_scratch(before: dict[str, bytes], scratch: Path) -> list[str]:
    """The copy-on-write files the run changed (their changes stay in the scratch folder and are discarded)."""
    changed = []
    for rel, data in before.items():
        copy = scratch / rel
        try:
            if copy.read_bytes() != data:
                changed.append(rel)
        except OSError:
            changed.append(rel)
    return changed


def exit_status(returncode: int) -> int:
    """bwrap reports a command killed by signal N as exit 128+N; give it back as -N, like a direct child."""
    if 128 < returncode <= 128 + 64:
        return -(returncode - 128)
    return returncode


# --------------------------------------------------------------------------------------------- process defences


def _prctl(option: int, arg: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(option, arg, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


@functools.cache
def die_with_parent(parent_pid: int, sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send `sig` to this process when its parent dies (PR_SET_PDEATHSIG). False when the parent
    is already gone (this process was re-parented before the request took effect) or prctl is unavailable."""
    return _prctl(_PR_SET_PDEATHSIG, int(sig)) and os.getppid() == parent_pid


def protect_process() -> bool:
    """Make this process non-dumpable and a child subreaper (see the module docstring). True when both held."""
    dumpable_off = _prctl(_PR_SET_DUMPABLE, 0)
    subreaper = _prctl(_PR_SET_CHILD_SUBREAPER, 1)
    return dumpable_off and subreaper


def drop_capabilities() -> None:
    """In a run's child before exec (root only): drop the capabilities that read non-dumpable processes."""
    if os.geteuid() != 0:
        return
    for cap in _BYPASS_CAPABILITIES:
        _prctl(_PR_CAPBSET_DROP, cap)
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL)


STRAY_SCANS = 200  # rounds of scan-and-kill before giving up on a process that keeps re-forking
STRAY_GRACE_S = 0.5  # a process still winding down (bwrap's own, a run's last child) gets this long to exit


def _stat_fields(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start time in clock ticks, state letter) of a process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        return int(fields[1]), int(fields[19]), fields[0].decode()
    except (IndexError, ValueError):
        return None


def _process_table() -> dict[int, tuple[int, int, str]]:
    table = {}
    with contextlib.suppress(OSError):
        for name in os.listdir("/proc"):
            if name.isdigit():
                fields = _stat_fields(int(name))
                if fields is not None:
                    table[int(name)] = fields
    return table


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop_strays(started_ticks: int | None, keep: frozenset[int] = frozenset()) -> list[int]:
    """Stop what a run left behind outside its process group: this process's children (we are a child subreaper,
    so an escaped descendant is re-parented here) that started at or after `started_ticks`, with all their
    descendants. Those still alive after STRAY_GRACE_S are killed; all are reaped. Returns the pids killed."""
    me = os.getpid()

    def strays() -> tuple[dict[int, tuple[int, int, str]], list[int]]:
        table = _process_table()
        return table, [pid for pid, (ppid, ticks, _) in table.items()
                       if ppid == me and pid not in keep and (started_ticks is None or ticks >= started_ticks)]

    table, roots = strays()
    deadline = time.monotonic() + STRAY_GRACE_S
    while roots:
        for pid in roots:
            if table[pid][2] == "Z":
                _reap(pid)
        table, roots = strays()
        alive = [pid for pid in roots if table[pid][2] != "Z"]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    doomed: list[int] = []
    # A process that keeps forking and letting its parent exit has a new pid at every scan: scan and kill again
    # until a scan finds nothing alive (each kill of a parent re-parents its children here).
    for _ in range(STRAY_SCANS):
        frontier = [pid for pid in roots if table[pid][2] != "Z"]
        if not frontier:
            break
        killed: list[int] = []
        while frontier:
            pid = frontier.pop()
            killed.append(pid)
            frontier += [child for child, (ppid, _, _) in table.items() if ppid == pid and child not in killed]
        for pid in killed:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for pid in roots:  # our children now: reap them so no zombie is left
            with contextlib.suppress(ChildProcessError, OSError):
                os.waitpid(pid, 0)
        doomed += killed
        table, roots = strays()
    return doomed
