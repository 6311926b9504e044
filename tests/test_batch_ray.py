"""`orchestrator batch --backend ray` against a real local Ray: the same batch gives the same per-session results
as the local backend, with Ray's leases (a custom resource standing in for GPUs) as the only limit on runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.session_helpers import REPO, default_stop_signals, git, orchestrator, pid_alive

ray = pytest.importorskip("ray", reason="the [ray] extra is not installed")

pytestmark = pytest.mark.slow

SLEEP_TEMPLATE = REPO / "tests" / "data" / "sleep_template"
IDEAS = "idea_a,idea_b,idea_c,idea_d"
RAY_TOKEN = "orchestrator-test-ray-token-6d1f"
RAY_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": RAY_TOKEN, "RAY_USAGE_STATS_ENABLED": "0"}


def _replies(path: Path, n: int = 6) -> Path:
    edits = [{"content": f"One more run.\n\nexperiment.py\n```python\n<<<<<<< SEARCH\n# runs so far\n=======\n"
                         f"# runs so far\n# edit {i}\n>>>>>>> REPLACE\n```\n"} for i in range(1, n + 1)]
    path.write_text(yaml.safe_dump(edits))
    return path


def _batch(tmp: Path, root: str, *extra: str, env: dict[str, str] | None = None) -> Path:
    result = orchestrator(
        "batch", str(SLEEP_TEMPLATE / "seed_ideas.json"), "--ideas", IDEAS, "--template", str(SLEEP_TEMPLATE),
        "--model", f"scripted:{_replies(tmp / 'replies.yaml')}", "--max-runs", "2", "--no-plots",
        "--env", "SLEEP_SCALE=0.15", "--root", str(tmp / root), *extra, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = Path(result.stdout.splitlines()[0])
    assert (folder / "batch.json").is_file()
    return folder


def _per_session(folder: Path) -> dict[str, dict]:
    """What a session produced, by idea: status, tags, each run's results and the device count it saw."""
    spec = json.loads((folder / "batch.json").read_text())
    out = {}
    for entry in spec["sessions"]:
        session = Path(entry["path"])
        state = json.loads((session / ".orchestrator" / "session.json").read_text())
        runs = {}
        for run_dir in sorted(session.glob("run_*")):
            seen = json.loads((run_dir / "slot.json").read_text())
            results = run_dir / "final_info.json"
            runs[run_dir.name] = {"final_info": json.loads(results.read_text()) if results.exists() else None,
                                  "files": sorted(p.name for p in run_dir.iterdir()),
                                  "devices": seen["cuda_visible_devices"]}
        kinds = [json.loads(line)["kind"] for line in (session / ".orchestrator" / "journal.jsonl").read_text()
                 .splitlines()]
        out[entry["idea"]] = {"status": state["session"]["status"], "tags": git(session, "tag", "-l").split(),
                              "runs": runs, "events": [k for k in kinds if k != "phase"]}
    return out


def _overlaps(folder: Path) -> int:
    """The largest number of runs that executed at the same moment, from the runs' own start/end records."""
    spans = []
    for slot in folder.glob("*/run_*/slot.json"):
        seen = json.loads(slot.read_text())
        spans.append((seen["start"], seen["end"]))
    edges = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans])
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ray_head(tmp: Path, fake_gpus: int) -> tuple[subprocess.Popen, str]:
    """`ray start --head --block` with `fake_gpu` resources, in its own process group (stopped by the test)."""
    port = _free_port()
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, **RAY_ENV}
    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
         "--num-cpus=2", "--num-gpus=0", f"--resources={json.dumps({'fake_gpu': fake_gpus})}",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={ray_tmp}"],
        env=env, stdout=open(tmp / "ray-head.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(ray.cluster_resources().get('fake_gpu', 0))")
    deadline = time.monotonic() + 180
    while True:
        assert head.poll() is None, (tmp / "ray-head.log").read_text()[-3000:]
        check = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True,
                               timeout=120)
        if check.returncode == 0 and check.stdout.strip().startswith(str(float(fake_gpus))):
            return head, address
        assert time.monotonic() < deadline, check.stderr[-3000:]


def _stop_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            continue
        # the head's own children (gcs_server, raylet ...) share its group: wait for the group to empty
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)


def test_a_batch_on_a_ray_cluster_gives_the_same_results_as_the_local_backend(tmp_path: Path) -> None:
    local = _per_session(_batch(tmp_path, "local", "--gpus", "0,1,2"))
    head, address = _ray_head(tmp_path, fake_gpus=3)
    try:
        on_ray = _batch(tmp_path, "ray", "--backend", "ray", "--ray-address", address,
                        "--ray-resource", "fake_gpu=1", env=RAY_ENV)
    finally:
        _stop_group(head)
    remote = _per_session(on_ray)
    assert set(remote) == set(local) == set(IDEAS.split(","))
    for idea, expected in local.items():
        got = remote[idea]
        assert got["status"] == expected["status"] == "max_runs", idea
        assert got["tags"] == expected["tags"] == ["run_0", "run_1", "run_2"], idea
        assert got["events"] == expected["events"], idea  # the same journal records, in the same order
        assert {r: v["final_info"] for r, v in got["runs"].items()} == \
               {r: v["final_info"] for r, v in expected["runs"].items()}, idea
        assert {r: v["files"] for r, v in got["runs"].items()} == \
               {r: v["files"] for r, v in expected["runs"].items()}, idea
    assert _overlaps(on_ray) <= 3  # Ray's fake_gpu resource was the lease: never more than 3 runs at once
    journal = next(on_ray.glob("*_idea_a")) / ".orchestrator" / "journal.jsonl"
    started = [json.loads(line)["data"] for line in journal.read_text().splitlines()
               if json.loads(line)["kind"] == "run_started"]
    assert started and all(d["executor"] == "ray" and d["pid"] is None for d in started)


def _hanging_template(tmp: Path) -> Path:
    """The sleep template whose idea_b hangs in run_1 (every other run sleeps as planned)."""
    template = tmp / "sleep_template"
    shutil.copytree(SLEEP_TEMPLATE, template)
    durations = json.loads((template / "durations.json").read_text())
    durations["idea_b"] = [1, "hang", 1, 1]
    (template / "durations.json").write_text(json.dumps(durations))
    return template


def test_a_ray_batch_without_an_address_uses_its_own_local_ray_and_ctrl_c_stops_the_runs(tmp_path: Path) -> None:
    """No --ray-address: a local Ray is started with the batch's GPUs; Ray sets CUDA_VISIBLE_DEVICES. Ctrl-C
    cancels the Ray tasks and their runs' process groups die; every session records `interrupted`."""
    template = _hanging_template(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(REPO), "LITELLM_LOCAL_MODEL_COST_MAP": "True", "ORCH_SANDBOX": "none"}
    batch = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "batch", str(template / "seed_ideas.json"), "--ideas",
         "idea_a,idea_b", "--template", str(template), "--model", f"scripted:{_replies(tmp_path / 'r.yaml')}",
         "--max-runs", "2", "--no-plots", "--env", "SLEEP_SCALE=0.15", "--root", str(tmp_path / "root"),
         "--backend", "ray", "--gpus", "0,1"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
        preexec_fn=default_stop_signals)
    try:
        deadline = time.monotonic() + 300
        hang = None
        while hang is None:
            assert batch.poll() is None, batch.communicate()
            found = list((tmp_path / "root").glob("*/*_idea_b/run_1/slot.json"))
            if found:
                hang = json.loads(found[0].read_text())
            else:
                assert time.monotonic() < deadline, "the hanging run never started"
                time.sleep(0.2)
        os.kill(batch.pid, signal.SIGINT)
        out, err = batch.communicate(timeout=240)
    finally:
        if batch.poll() is None:
            os.killpg(batch.pid, signal.SIGKILL)
            batch.wait()
    assert batch.returncode == 130, out[-2000:] + err[-3000:]
    assert hang["cuda_visible_devices"] in {"0", "1"}
    folder = Path(out.splitlines()[0])
    idea_b = next(folder.glob("*_idea_b"))
    state = json.loads((idea_b / ".orchestrator" / "session.json").read_text())
    assert state["session"]["status"] == "interrupted"
    deadline = time.monotonic() + 60  # the task was cancelled: the runner stopped the run's process group
    while pid_alive(hang["pid"]):
        assert time.monotonic() < deadline, f"the hanging run {hang['pid']} outlived its cancelled Ray task"
        time.sleep(0.2)
    results = _per_session(folder)
    seen = {v["devices"] for r in results.values() for v in r["runs"].values()}
    assert seen <= {"0", "1"} and seen  # Ray set CUDA_VISIBLE_DEVICES to exactly one of the batch's GPUs
