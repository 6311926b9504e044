"""Where a run executes: a process group on this machine (with a slot leased from a batch's pool), or a Ray task.

The loop sees one interface: `start(request)` returns a gated handle with the runner's protocol (`release`, `wait`,
`kill`, used as a context that stops the run on exit), and `slot(request)` holds what the run needs to begin (a
leased GPU or CPU slot; nothing for a single session, nothing for Ray, whose scheduler leases at submission). The
loop starts and journals the run first, then takes the slot, then releases the run with the slot's environment.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Protocol

from orchestrator.config import Settings
from orchestrator.leases import Lease, SlotPool, lease
from orchestrator.runner import RunHandle, RunRequest, RunResult
from orchestrator.runner import start as start_local
from orchestrator.sandbox import SandboxUsed


class Handle(Protocol):
    """A started run, as the loop uses it (runner.RunHandle is one; a Ray task has no local pid)."""

    @property
    def pid(self) -> int | None: ...
    @property
    def pgid(self) -> int | None: ...
    @property
    def proc_start_ticks(self) -> int | None: ...
    @property
    def started_at(self) -> float: ...
    @property
    def sandbox(self) -> SandboxUsed: ...

    def __enter__(self) -> Handle: ...
    def __exit__(self, *exc: object) -> None: ...
    def release(self, env: Mapping[str, str] | None = None, timeout_s: float | None = None) -> None: ...
    def wait(self) -> RunResult: ...
    def kill(self) -> None: ...


class Leased:
    """What a run holds while it executes: its slot, and the environment that gives it that slot's GPU."""

    def __init__(self, slot: str | None = None, device: str | None = None, held: Lease | None = None) -> None:
        self.slot = slot
        self.env = {} if device is None else {"CUDA_VISIBLE_DEVICES": device}  # set as the run begins
        self._held = held

    def started(self, pid: int | None, start_ticks: int | None) -> None:
        """Name the started run in the lease, so the slot stays taken while it lives, even past its session."""
        if self._held is not None:
            self._held.hold(pid, start_ticks)


class Executor(Protocol):
    name: str

    def slot(self, request: RunRequest, deadline: float | None = None, priority: float = 0.0,
             label: str = "") -> AbstractContextManager[Leased]: ...

    def start(self, request: RunRequest) -> Handle: ...


class LocalExecutor:
    """Runs on this machine. With a pool (a batch's), every run first leases a slot and gets exactly that GPU."""

    name = "local"

    def __init__(self, pool: SlotPool | None = None, folder: Path | None = None) -> None:
        self.pool = pool
        self.folder = folder

    @contextmanager
    def slot(self, request: RunRequest, deadline: float | None = None, priority: float = 0.0,
             label: str = "") -> Iterator[Leased]:
        if self.pool is None or self.folder is None:
            yield Leased()
            return
        with lease(self.pool, self.folder, deadline=deadline, priority=priority, label=label) as held:
            # a GPU slot is exactly that device; a CPU slot leaves the session's own --gpus (usually none)
            yield Leased(held.slot.name, held.slot.device, held)

    def start(self, request: RunRequest) -> RunHandle:
        # gated: the experiment begins only once the loop has journaled its pid
        return start_local(request, gate=True)


def executor_for(settings: Settings) -> Executor:
    """The executor a session's settings call for: its batch's (slot pool, or Ray), else plain local runs."""
    folder = settings.batch
    if folder is None:
        return LocalExecutor()
    from orchestrator.batch import load_batch

    spec = load_batch(Path(folder))
    if spec.backend == "ray":
        from orchestrator.ray_executor import RayExecutor

        return RayExecutor.connect(spec)
    return LocalExecutor(spec.pool, Path(folder))
