"""Slots leased per run: a batch's GPUs (or CPU slots) shared by its sessions, one run per slot at a time.

A slot is a lock file in the batch folder (`.slots/<device>.<k>.lock`); holding an exclusive `flock` on it is the
lease. The kernel drops the lock when its holder's file is closed, also when the process dies (SIGKILL, OOM), so a
slot always comes back: after a run ends, times out, crashes, or its session is interrupted or killed. Sessions run
as separate processes, and a session resumed on its own (`orchestrator resume SESSION`) still leases from its
batch's pool.
"""

from __future__ import annotations

import fcntl
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from orchestrator.errors import OrchestratorError

SLOTS_DIR = ".slots"
POLL_S = 0.02  # how often a waiting run tries the slots again


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
    """The GPU ids this machine has, as CUDA_VISIBLE_DEVICES names them: CUDA_VISIBLE_DEVICES if set, else one id
    per /dev/nvidiaN device node; none on a machine without NVIDIA GPUs."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip() and d.strip() != "-1"]
    found = []
    for entry in os.listdir("/dev") if os.path.isdir("/dev") else []:
        if entry.startswith("nvidia") and entry[6:].isdigit():
            found.append(int(entry[6:]))
    return [str(n) for n in sorted(found)]


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


@contextmanager
def lease(pool: SlotPool, folder: Path, on_wait: Callable[[], None] | None = None,
          deadline: float | None = None) -> Iterator[Slot]:
    """Hold one free slot of `pool` for the block; wait (polling) while all are taken. `on_wait` is called once if
    the run has to wait; `deadline` (time.monotonic()) raises LeaseTimeout when none came free by then. The lock
    file's content names the holder (pid), for people looking; the lock itself is the truth."""
    slots = pool.slots()
    (Path(folder) / SLOTS_DIR).mkdir(parents=True, exist_ok=True)
    start = random.randrange(len(slots))  # waiters spread over the slots rather than all trying slot 0 first
    waited = False
    while True:
        for i in range(len(slots)):
            slot = slots[(start + i) % len(slots)]
            fd = _try(_lock_path(folder, slot))
            if fd is not None:
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                    yield slot
                finally:
                    os.close(fd)  # the lease ends: the kernel releases the flock
                return
        if not waited:
            waited = True
            if on_wait is not None:
                on_wait()
        if deadline is not None and time.monotonic() >= deadline:
            raise LeaseTimeout(f"no free slot among {pool.describe()} before the deadline")
        time.sleep(POLL_S)


def busy_slots(pool: SlotPool, folder: Path) -> int:
    """How many of the pool's slots are leased now (read from /proc/locks, so it never takes a lock itself)."""
    inodes = set()
    for slot in pool.slots():
        try:
            inodes.add(os.stat(_lock_path(folder, slot)).st_ino)
        except FileNotFoundError:
            continue
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
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[3] == "WRITE":
            inode = parts[5].rsplit(":", 1)[-1]
            if inode.isdigit() and int(inode) in inodes:
                held.add(int(inode))
    return len(held)
