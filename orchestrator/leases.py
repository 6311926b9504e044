"""Slots leased per run: a batch's GPUs (or CPU slots) shared by its sessions, one run per slot at a time.

A slot is a lock file in the batch folder (`.slots/<device>.<k>.lock`); holding an exclusive `flock` on it is the
lease. The kernel drops the lock when its holder's file is closed, also when the process dies (SIGKILL, OOM), so a
slot always comes back: after a run ends, times out, crashes, or its session is interrupted or killed. Sessions run
as separate processes, and a session resumed on its own (`orchestrator resume SESSION`) still leases from its
batch's pool.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from orchestrator.errors import OrchestratorError
from orchestrator.runner import proc_start_ticks

SLOTS_DIR = ".slots"
POLL_S = 0.02  # how often a waiting run tries the slots again
_GPU_ID = re.compile(r"(\d+|GPU-[0-9A-Fa-f-]+|MIG-[\w/.-]+)\Z")


class LeaseTimeout(OrchestratorError, TimeoutError):
    """No slot came free before the deadline."""


class Slot(BaseModel):
    """One place a run can execute: `gpu 1` (second lease of device 1 with --per-gpu 2 is `1.2`) or `cpu 3`."""

    name: str  # "gpu0", "gpu0.2", "cpu3"
    device: str | None  # CUDA_VISIBLE_DEVICES for the run; None for a CPU slot


class SlotPool(BaseModel):
    """A batch's slots: each GPU id `per_gpu` times, or `cpu_slots` CPU slots when there are no GPUs."""

    kind: Literal["gpu", "cpu"]
    devices: list[str] = Field(default_factory=list)  # GPU ids as CUDA_VISIBLE_DEVICES takes them
    per_gpu: int = Field(1, ge=1)
    cpu_slots: int = Field(1, ge=1)

    def slots(self) -> list[Slot]:
        if self.kind == "cpu":
            return [Slot(name=f"cpu{i}", device=None) for i in range(self.cpu_slots)]
        return [Slot(name=f"gpu{d}" + (f".{k + 1}" if self.per_gpu > 1 else ""), device=d)
                for d in self.devices for k in range(self.per_gpu)]

    def describe(self) -> str:
        if self.kind == "cpu":
            return f"{self.cpu_slots} CPU slot{'s' if self.cpu_slots != 1 else ''}"
        per = f", {self.per_gpu} runs per GPU" if self.per_gpu > 1 else ""
        return f"GPUs {','.join(self.devices)}{per}"


def detect_gpus() -> list[str]:
    """The GPU ids this process can use, as CUDA_VISIBLE_DEVICES names them: CUDA_VISIBLE_DEVICES if set, else
    the indexes `nvidia-smi` lists (0 .. n-1 as CUDA numbers them); none without NVIDIA's tools or GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        listed = subprocess.run([smi, "--query-gpu=index", "--format=csv,noheader"], capture_output=True,
                                text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    if listed.returncode != 0:
        return []
    return [line.strip() for line in listed.stdout.splitlines() if line.strip().isdigit()]


def _lock_path(folder: Path, slot: Slot) -> Path:
    return Path(folder) / SLOTS_DIR / f"{slot.name}.lock"


def _try(path: Path) -> int | None:
    """An open fd holding the exclusive lock on `path`, or None when someone else holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class Lease:
    """A held slot. `hold(pid, ticks)` names the run using it in the lock file: should the session process die
    while its run goes on (an unsandboxed run outlives it), the slot stays taken until that run is gone too."""

    def __init__(self, slot: Slot, fd: int) -> None:
        self.slot = slot
        self._fd = fd

    def hold(self, pid: int | None, start_ticks: int | None) -> None:
        record = {"session_pid": os.getpid(), "run_pid": pid, "run_start_ticks": start_ticks}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(record).encode(), 0)


def _run_still_there(fd: int) -> bool:
    """Whether the lock file names a run that is still alive (same pid and start time)."""
    try:
        record = json.loads(os.pread(fd, 512, 0) or b"{}")
        pid, ticks = record.get("run_pid"), record.get("run_start_ticks")
    except (OSError, ValueError, AttributeError):
        return False
    if not isinstance(pid, int) or pid <= 0:
        return False
    return proc_start_ticks(pid) == ticks if ticks is not None else proc_start_ticks(pid) is not None


class _Ticket:
    """A waiting run's place in the queue: `.slots/queue/<name>` holding its priority and arrival, locked by the
    waiter while it waits (a waiter that died leaves an unlocked file, which the next reader removes)."""

    def __init__(self, queue: Path, priority: float, since: float, label: str) -> None:
        self.name = f"{os.getpid()}-{random.getrandbits(48):012x}"
        self.path = queue / self.name
        # Written and locked under a hidden name, then renamed: a reader never sees it unlocked, so never takes a
        # live waiter's ticket for a dead one's.
        making = queue / f".{self.name}"
        self.fd = os.open(making, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
            os.pwrite(self.fd, json.dumps({"priority": priority, "since": since, "label": label}).encode(), 0)
            os.rename(making, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                making.unlink()
            os.close(self.fd)
            raise

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self.fd)


def _waiters(queue: Path, mine: str | None = None) -> list[tuple[float, float, str, str]]:
    """(priority, since, name, label) of every live waiter but `mine`."""
    out: list[tuple[float, float, str, str]] = []
    try:
        names = os.listdir(queue)
    except FileNotFoundError:
        return out
    for name in names:
        if name == mine or name.startswith("."):  # "." : a ticket still being made
            continue
        try:
            fd = os.open(queue / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # locked: its waiter is alive
                with contextlib.suppress(ValueError, TypeError, KeyError, OSError):
                    record = json.loads(os.pread(fd, 256, 0))
                    out.append((float(record["priority"]), float(record["since"]), name,
                                str(record.get("label", ""))))
                continue
            with contextlib.suppress(OSError):  # nobody holds it: a waiter that died
                os.unlink(queue / name)
        finally:
            os.close(fd)
    return out


def _free_slots(folder: Path, slots: list[Slot], want: int) -> list[tuple[Slot, int]]:
    """Lock up to `want` free slots (from a random one on, so waiters spread); the caller keeps or closes them."""
    got: list[tuple[Slot, int]] = []
    start = random.randrange(len(slots))
    for i in range(len(slots)):
        slot = slots[(start + i) % len(slots)]
        fd = _try(_lock_path(folder, slot))
        if fd is None:
            continue
        if _run_still_there(fd):
            os.close(fd)
            continue
        got.append((slot, fd))
        if len(got) >= want:
            break
    return got


@contextmanager
def lease(pool: SlotPool, folder: Path, deadline: float | None = None, priority: float = 0.0,
          label: str = "") -> Iterator[Lease]:
    """Hold one free slot of `pool` for the block; wait (polling) while all are taken. `deadline`
    (time.monotonic()) raises LeaseTimeout when none came free by then. A slot
    whose lock is free but whose file names a run still alive (its session died, the run did not) is taken.

    Waiting runs queue: a free slot goes to the waiter with the lowest `priority` (a session's number of runs
    done, so the sessions furthest behind go first and the batch's tail is short), then to the first arrived."""
    slots = pool.slots()
    queue = Path(folder) / SLOTS_DIR / "queue"
    queue.mkdir(parents=True, exist_ok=True)
    since = time.time()
    ticket: _Ticket | None = None
    try:
        while True:
            me = (priority, since, ticket.name if ticket else "~")
            ahead = sum(1 for w in _waiters(queue, ticket.name if ticket else None) if w[:3] < me)
            got = _free_slots(folder, slots, ahead + 1)
            if len(got) > ahead:  # enough free slots for everyone ahead of this run, and one for it
                slot, fd = got.pop()
                for _, other in got:
                    os.close(other)
                if ticket is not None:
                    ticket.close()
                    ticket = None
                try:
                    held = Lease(slot, fd)
                    held.hold(None, None)
                    yield held
                finally:
                    os.close(fd)  # the lease ends: the kernel releases the flock
                return
            for _, other in got:
                os.close(other)
            if ticket is None:
                ticket = _Ticket(queue, priority, since, label)
            if deadline is not None and time.monotonic() >= deadline:
                raise LeaseTimeout(f"no free slot among {pool.describe()} before the deadline")
            time.sleep(POLL_S)
    finally:
        if ticket is not None:
            ticket.close()


def waiting(folder: Path) -> list[str]:
    """The labels of the runs waiting for a slot of the batch in `folder` now."""
    return [w[3] for w in _waiters(Path(folder) / SLOTS_DIR / "queue")]


def busy_slots(pool: SlotPool, folder: Path) -> int:
    """How many of the pool's slots are leased now (read from /proc/locks, so it never takes a lock itself)."""
    inodes = set()
    for slot in pool.slots():
        try:
            info = os.stat(_lock_path(folder, slot))
        except FileNotFoundError:
            continue
        inodes.add(f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}")
    if not inodes:
        return 0
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return 0
    held = set()
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[3] == "WRITE" and parts[5] in inodes:
            held.add(parts[5])  # major:minor (hex) and inode, as /proc/locks writes them
    return len(held)


def slot_pool(gpus: str | None, per_gpu: int | None, slots: int | None) -> SlotPool:
    """A batch's pool from its flags: --gpus (else the GPUs found) with --per-gpu, or --slots CPU slots."""
    from orchestrator.config import ConfigError

    if per_gpu is not None and per_gpu < 1 or slots is not None and slots < 1:
        raise ConfigError("--per-gpu and --slots must be at least 1")
    ids = [part.strip() for part in gpus.split(",")] if gpus is not None and gpus.strip() else detect_gpus()
    odd = [i for i in ids if not _GPU_ID.match(i)]
    if odd:
        raise ConfigError(f"--gpus {gpus!r}: {odd[0]!r} is not a GPU id (a number, GPU-<uuid> or MIG-<uuid>, as "
                          "CUDA_VISIBLE_DEVICES takes them)")
    if ids:
        if slots is not None:
            raise ConfigError("--slots counts CPU slots; with GPUs, use --per-gpu N for N runs per GPU")
        if len(set(ids)) != len(ids):
            raise ConfigError(f"--gpus {gpus!r} names a GPU twice; use --per-gpu N to share one")
        return SlotPool(kind="gpu", devices=ids, per_gpu=per_gpu or 1)
    if per_gpu is not None:
        raise ConfigError("--per-gpu needs GPUs: none were found and --gpus was not given (use --slots N)")
    return SlotPool(kind="cpu", cpu_slots=slots or 1)
