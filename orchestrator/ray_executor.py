"""The Ray backend: each experiment run of a batch is a Ray task (`--backend ray`). Imported only by such a batch.

How the tree reaches the worker: through a **shared filesystem path** (the default and, today, the only way). The
task runs the same command, with the same environment allowlist, sandbox, timeout and process-group kill
(`runner.run`), in the session folder at the path the driver uses, where the driver has just committed the
attempt; `run_i/` is written in place. So a run on Ray leaves the same `run_i/` files, journal records and tags
as a local run, large caches are shared, and nothing is copied. A node that cannot see the session folder fails
the run with a message saying so. (Shipping the commit as an archive and `run_i/` back is not built.)

Ray leases: a run asks for one GPU (`num_gpus=1`, or `1/per_gpu`), one CPU when the batch has CPU slots, or the
`--ray-resource` amounts; Ray sets CUDA_VISIBLE_DEVICES for GPU tasks. Ctrl-C or a session's end cancels the
task; the worker then stops the run's process group as a local run would.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.batch import BatchSpec
from orchestrator.config import ConfigError
from orchestrator.errors import OrchestratorError
from orchestrator.executors import Leased
from orchestrator.runner import RunRequest, RunResult, RunStartError
from orchestrator.sandbox import SandboxUsed
from orchestrator.secrets import looks_secret

RAY_ADDRESS_VAR = "ORCHESTRATOR_RAY_ADDRESS"  # set by the batch process for its session processes
CANCEL_PATIENCE_S = 30.0  # after a cancel, how long the task gets to stop its run's group and report


class RayError(OrchestratorError, RuntimeError):
    pass


def check_ray_installed() -> None:
    """Without importing it: Ray reads its authentication settings from the environment when it is imported."""
    import importlib.util

    if importlib.util.find_spec("ray") is None:
        raise ConfigError("--backend ray needs Ray: pip install 'orchestrator[ray]'")


def _run_on_worker(request_json: str) -> str:
    """The Ray task: one run, exactly as the local executor runs it, in the session folder on a shared path."""
    import ray

    from orchestrator.runner import proc_start_ticks, run
    from orchestrator.sandbox import protect_process, stop_strays

    protect_process()  # like the orchestrator: other processes of the user cannot read this worker's memory
    request = RunRequest.model_validate_json(request_json)
    if not Path(request.cwd).is_dir():
        raise RunStartError(f"the session folder {request.cwd} is not visible on Ray node "
                            f"{ray.get_runtime_context().get_node_id()}: the Ray backend needs it on a shared "
                            "filesystem at the same path")
    gpu_ids = ray.get_runtime_context().get_accelerator_ids().get("GPU") or []
    if gpu_ids:
        request = request.model_copy(update={"gpus": ",".join(str(g) for g in gpu_ids)})
    started = proc_start_ticks(os.getpid())
    try:
        return run(request).model_dump_json()
    finally:  # what the run left outside its group was re-parented to this worker (a subreaper): stop it
        stop_strays(started)


def _scrubbed_environment() -> dict[str, str]:
    """This process's environment without secrets: what a local Ray's workers inherit."""
    return {k: v for k, v in os.environ.items() if not looks_secret(k)}


@contextmanager
def ray_cluster(spec: BatchSpec, child_env: dict[str, str]) -> Iterator[str]:
    """The batch's Ray cluster for the block: `--ray-address`, or a local Ray started here (and stopped after),
    whose processes never see an API key. Puts its address into `child_env` for the session processes."""
    if spec.ray_address:
        child_env[RAY_ADDRESS_VAR] = spec.ray_address
        yield spec.ray_address
        return
    # Ray's token authentication, with a token of our own, so the session processes can connect (a local Ray
    # would otherwise make one they cannot know). Runs never see it: *_TOKEN names never reach a run.
    token = os.environ.get("RAY_AUTH_TOKEN") or secrets.token_hex(32)
    kept = dict(os.environ)
    os.environ.clear()
    os.environ.update(_scrubbed_environment())
    quiet = {"RAY_USAGE_STATS_ENABLED": "0"}  # Ray would otherwise report usage over the network
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, **quiet})
    child_env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, **quiet})
    if spec.pool.kind == "gpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(spec.pool.devices)
    try:
        import ray  # after the environment is set: Ray reads RAY_AUTH_* when it is imported

        extra = {k: v * len(spec.pool.slots()) for k, v in spec.ray_resources.items() if k not in ("GPU", "CPU")}
        context = ray.init(num_cpus=len(spec.pool.slots()),
                           num_gpus=len(spec.pool.devices) if spec.pool.kind == "gpu" else 0,
                           resources=extra or None, include_dashboard=False, log_to_driver=False,
                           configure_logging=False)
    finally:
        os.environ.clear()
        os.environ.update(kept)
        os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token})  # this process talks to it too
    address = str(context.address_info["gcs_address"])  # type: ignore[attr-defined]
    child_env[RAY_ADDRESS_VAR] = address
    try:
        yield address
    finally:
        ray.shutdown()
        for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # this process's own, as they were before
            if name in kept:
                os.environ[name] = kept[name]
            else:
                os.environ.pop(name, None)


class RayHandle:
    """A run submitted as a Ray task, with the runner's handle protocol. There is no local pid to journal."""

    pid = None
    pgid = None
    proc_start_ticks = None

    def __init__(self, request: RunRequest, remote: Any) -> None:
        self.request = request
        self.sandbox: SandboxUsed = "bwrap" if request.sandbox is not None else "none"
        self.started_at = time.time()
        self._remote = remote
        self._ref: Any = None
        self._result: RunResult | None = None

    def __enter__(self) -> RayHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._result is None:
            self.kill()

    def release(self, env: Mapping[str, str] | None = None, timeout_s: float | None = None) -> None:
        if self._ref is None:
            if timeout_s is not None:
                self.request = self.request.model_copy(update={"timeout_s": timeout_s})
            self.started_at = time.time()
            self._ref = self._remote.remote(self.request.model_dump_json())

    def wait(self) -> RunResult:
        import ray

        self.release()
        while True:  # short waits, so a signal reaches this process's handlers between them
            ready, _ = ray.wait([self._ref], timeout=0.2)
            if ready:
                break
        try:
            self._result = RunResult.model_validate_json(ray.get(self._ref))
        except ray.exceptions.RayTaskError as exc:
            cause = exc.cause if getattr(exc, "cause", None) is not None else exc
            if isinstance(cause, RunStartError):
                raise RunStartError(str(cause)) from None
            raise RayError(f"the run's Ray task failed: {str(cause).splitlines()[0] if str(cause) else cause!r}") \
                from None
        return self._result

    def kill(self) -> None:
        """Cancel the task: Ray raises KeyboardInterrupt in it, and the runner stops the run's process group."""
        import ray

        if self._ref is None or self._result is not None:
            return
        with contextlib.suppress(Exception):
            ray.cancel(self._ref)
        deadline = time.monotonic() + CANCEL_PATIENCE_S
        while time.monotonic() < deadline:
            ready, _ = ray.wait([self._ref], timeout=0.2)
            if ready:
                break
        else:  # the task did not stop: end its worker (its run dies with it under bwrap's --die-with-parent)
            with contextlib.suppress(Exception):
                ray.cancel(self._ref, force=True)


class RayExecutor:
    """Runs each run as a Ray task of the batch's cluster; Ray's scheduler is the lease."""

    name = "ray"

    def __init__(self, options: dict[str, Any]) -> None:
        import ray

        self.options = options
        self._remote = ray.remote(_run_on_worker).options(max_retries=0, retry_exceptions=False, **options)

    @classmethod
    def connect(cls, spec: BatchSpec) -> RayExecutor:
        import ray

        address = os.environ.get(RAY_ADDRESS_VAR) or spec.ray_address
        if not address:
            raise ConfigError("this session belongs to a Ray batch: resume the batch (orchestrator resume BATCH) "
                              "so its Ray cluster is started, or set --ray-address for the batch")
        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False, configure_logging=False)
        return cls(run_options(spec))

    @contextmanager
    def slot(self, request: RunRequest, deadline: float | None = None, priority: float = 0.0,
             label: str = "") -> Iterator[Leased]:
        yield Leased()  # Ray's scheduler leases when the task is submitted (at release)

    def start(self, request: RunRequest) -> RayHandle:
        return RayHandle(request.model_copy(update={"gpus": None}), self._remote)  # Ray picks the GPU and sets it


def run_options(spec: BatchSpec) -> dict[str, Any]:
    """What one run asks of Ray: the --ray-resource amounts, else a GPU share, else one CPU."""
    if spec.ray_resources:
        custom = {k: v for k, v in spec.ray_resources.items() if k not in ("GPU", "CPU")}
        out: dict[str, Any] = {"num_cpus": spec.ray_resources.get("CPU", 0)}
        if "GPU" in spec.ray_resources:
            out["num_gpus"] = spec.ray_resources["GPU"]
        elif spec.pool.kind == "gpu":  # a resource that picks the kind of GPU: the run still needs one
            out["num_gpus"] = 1 / spec.pool.per_gpu
        if custom:
            out["resources"] = custom
        return out
    if spec.pool.kind == "gpu":
        return {"num_gpus": 1 / spec.pool.per_gpu, "num_cpus": 0}
    return {"num_cpus": 1}
