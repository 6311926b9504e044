"""One experiment run, with real child processes running tiny scripts written by the tests."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from orchestrator.runner import (
    CappedLog,
    EnvRefused,
    Metric,
    ResultsError,
    RunRequest,
    build_env,
    looks_secret,
    proc_start_ticks,
    read_metrics,
    run,
    start,
    stop_orphan,
)


def write(tmp_path: Path, body: str, name: str = "experiment.py") -> Path:
    (tmp_path / name).write_text(textwrap.dedent(body))
    return tmp_path


def request(cwd: Path, **kw: object) -> RunRequest:
    return RunRequest(cwd=cwd, run_name=str(kw.pop("run_name", "run_1")), python=sys.executable, **kw)  # type: ignore[arg-type]


def poll(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


def alive(pid: int) -> bool:
    """A process that still runs (a zombie waiting to be reaped does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


WRITES_RESULTS = """
    import argparse, json, os
    p = argparse.ArgumentParser(); p.add_argument("--out_dir"); a = p.parse_args()
    os.makedirs(a.out_dir, exist_ok=True)
    print("training done")
    json.dump({"shakespeare_char": {"means": {"val_loss": 1.25, "train_loss": 1.0},
                                    "stderrs": {"val_loss": 0.05, "train_loss": 0.0},
                                    "final_info_dict": {"val_loss": [1.2, 1.3]}}},
              open(os.path.join(a.out_dir, "final_info.json"), "w"))
"""

# A child that ignores SIGTERM and forks a grandchild that ignores it too; both write their pids, then hang.
STUBBORN = """
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child.stdout.readline()
    with open(sys.argv[1], "w") as fh:
        fh.write(f"{os.getpid()} {child.pid}")
    time.sleep(30)
"""


# --------------------------------------------------------------------------------------------------- outcomes


def test_ok_run_reads_metrics_and_writes_logs(tmp_path: Path) -> None:
    cwd = write(tmp_path, WRITES_RESULTS)
    started: list[int] = []
    result = run(request(cwd), on_start=lambda h: started.append(h.pid))
    assert result.outcome == "ok", result.message
    assert result.returncode == 0 and started == [result.pid]
    assert result.metrics == {"shakespeare_char.val_loss": Metric(mean=1.25, stderr=0.05),
                              "shakespeare_char.train_loss": Metric(mean=1.0, stderr=0.0)}
    assert (cwd / "run_1" / "stdout.log").read_text() == "training done\n"
    assert (cwd / "run_1" / "stderr.log").read_text() == ""
    assert result.stdout_tail == "training done"
    assert result.duration_s > 0 and abs(result.started_at - time.time()) < 60


def test_error_outcome_summarises_the_exception(tmp_path: Path) -> None:
    cwd = write(tmp_path, """
        import warnings
        warnings.warn("just a warning")
        def f():
            raise ValueError("shapes (3,) and (4,) not aligned")
        f()
    """)
    result = run(request(cwd))
    assert result.outcome == "error"
    assert result.returncode == 1
    assert result.message == "exit 1: ValueError: shapes (3,) and (4,) not aligned"
    assert "Traceback (most recent call last)" in result.stderr_tail
    assert result.stderr_head == ""  # the whole of stderr fits in the tail
    assert result.metrics == {}


def test_missing_or_invalid_results_are_no_results(tmp_path: Path) -> None:
    cwd = write(tmp_path, "print('forgot to write results')\n")
    result = run(request(cwd))
    assert result.outcome == "no_results"
    assert result.message == "exit 0 but run_1/final_info.json was not written"
    write(tmp_path, """
        import sys, os
        os.makedirs("run_2", exist_ok=True)
        open("run_2/final_info.json", "w").write('{"loss": 1.0,')
    """)
    result = run(request(cwd, run_name="run_2"))
    assert result.outcome == "no_results"
    assert result.message.startswith("exit 0 but run_2/final_info.json is not valid JSON")


def test_plot_run_without_results_file_is_ok_on_exit_0(tmp_path: Path) -> None:
    cwd = write(tmp_path, "import sys; print(sys.argv[1:])\n", name="plot.py")
    result = run(request(cwd, run_name="plot_logs", script="plot.py", args=[], results_file=None))
    assert result.outcome == "ok"
    assert (cwd / "plot_logs" / "stdout.log").read_text() == "[]\n"


@pytest.mark.parametrize("body", [
    "raise MemoryError()\n",
    "import sys; print('torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB', file=sys.stderr);"
    " sys.exit(1)\n",
    "import os, signal; os.kill(os.getpid(), signal.SIGKILL)\n",
])
def test_oom_outcomes(tmp_path: Path, body: str) -> None:
    result = run(request(write(tmp_path, body)))
    assert result.outcome == "oom", result.message
    assert result.message.startswith("out of memory")


def test_timeout_kills_the_whole_group_even_when_it_ignores_sigterm(tmp_path: Path) -> None:
    cwd = write(tmp_path, STUBBORN)
    pids_file = tmp_path / "pids"
    t0 = time.monotonic()
    result = run(request(cwd, args=[str(pids_file)], timeout_s=1.5, kill_grace_s=0.3))
    assert result.outcome == "timeout"
    assert time.monotonic() - t0 < 4
    child, grandchild = map(int, pids_file.read_text().split())
    assert poll(lambda: not alive(child) and not alive(grandchild))
    assert result.message.startswith("timed out after 1.5 s")


def test_leftover_processes_are_stopped_when_the_child_exits(tmp_path: Path) -> None:
    cwd = write(tmp_path, """
        import subprocess, sys
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        open(sys.argv[1], "w").write(str(p.pid))
        print("exiting, leaving a worker behind")
    """)
    pid_file = tmp_path / "worker"
    result = run(request(cwd, args=[str(pid_file)], results_file=None, kill_grace_s=1))
    assert result.outcome == "ok"
    assert poll(lambda: not alive(int(pid_file.read_text())))


def test_on_tick_reports_elapsed_time_while_waiting(tmp_path: Path) -> None:
    cwd = write(tmp_path, "import time; time.sleep(0.6)\n")
    handle = start(request(cwd, results_file=None))
    ticks: list[float] = []
    result = handle.wait(on_tick=ticks.append, tick_s=0.1)
    assert result.outcome == "ok"
    assert len(ticks) >= 2 and ticks == sorted(ticks)


def test_kill_stops_a_running_run(tmp_path: Path) -> None:
    cwd = write(tmp_path, STUBBORN)
    pids_file = tmp_path / "pids"
    handle = start(request(cwd, args=[str(pids_file)], kill_grace_s=0.3))
    assert poll(pids_file.exists)
    assert poll(lambda: len(pids_file.read_text().split()) == 2)
    handle.kill()
    result = handle.wait()
    assert result.outcome == "error" and result.message.startswith("stopped by the orchestrator")
    assert not any(alive(int(p)) for p in pids_file.read_text().split())


# --------------------------------------------------------------------------------------------------- folders, logs


def test_run_folder_is_cleaned_before_a_rerun(tmp_path: Path) -> None:
    cwd = write(tmp_path, WRITES_RESULTS)
    stale = tmp_path / "run_1" / "checkpoint_from_crashed_attempt.pt"
    stale.parent.mkdir()
    stale.write_text("stale")
    (tmp_path / "run_1" / "stdout.log").write_text("old output\n" * 100)
    result = run(request(cwd))
    assert result.outcome == "ok"
    assert not stale.exists()
    assert (tmp_path / "run_1" / "stdout.log").read_text() == "training done\n"


def test_logs_are_capped_keeping_head_and_tail(tmp_path: Path) -> None:
    cwd = write(tmp_path, """
        import sys
        for i in range(40000):
            print(f"line {i:05d} of output")
            print(f"err {i:05d}", file=sys.stderr)
        print("LAST STDOUT LINE")
        raise RuntimeError("the end")
    """)
    cap = 20_000
    result = run(request(cwd, log_cap_bytes=cap))
    assert result.outcome == "error"
    for name, first in (("stdout.log", "line 00000 of output"), ("stderr.log", "err 00000")):
        data = (cwd / "run_1" / name).read_text()
        assert len(data.encode()) <= cap
        assert data.startswith(first)
        assert "bytes of this log cut by the orchestrator" in data
    out = (cwd / "run_1" / "stdout.log").read_text()
    assert out.endswith("LAST STDOUT LINE\n")
    marker = re.search(r"\n\[\.\.\. (\d+) bytes of this log cut by the orchestrator \.\.\.\]\n", out)
    assert marker is not None
    kept = len(out) - len(marker.group(0))
    assert int(marker.group(1)) + kept == 40000 * len("line 00000 of output\n") + len("LAST STDOUT LINE\n")
    assert result.message == "exit 1: RuntimeError: the end"
    assert result.stderr_tail.endswith("RuntimeError: the end")
    assert result.stderr_head.startswith("err 00000\nerr 00001")
    assert len(result.stderr_head.splitlines()) == 30 and len(result.stderr_tail.splitlines()) == 60
    assert len(result.stdout_tail) <= 4003


def test_a_log_that_floods_is_cut_while_the_run_goes_on(tmp_path: Path) -> None:
    cwd = write(tmp_path, """
        import os, sys, time
        sys.stdout.write("x" * 99 + "\\n" * 1 + ("y" * 99 + "\\n") * 2000)
        sys.stdout.flush()
        open("flooded", "w").close()
        deadline = time.monotonic() + 5
        while not os.path.exists("seen") and time.monotonic() < deadline:
            time.sleep(0.01)
        print("after the flood")
    """)
    cap = 10_000
    sizes_while_running: list[int] = []

    def on_tick(_elapsed: float) -> None:
        if (cwd / "flooded").exists():
            sizes_while_running.append((cwd / "run_1" / "stdout.log").stat().st_size)
            (cwd / "seen").touch()

    result = start(request(cwd, log_cap_bytes=cap, results_file=None)).wait(on_tick=on_tick, tick_s=0.05)
    assert result.outcome == "ok"
    assert sizes_while_running and sizes_while_running[0] <= cap  # cut before the child ended
    out = (cwd / "run_1" / "stdout.log").read_text()
    assert out.startswith("x" * 99) and out.endswith("y\nafter the flood\n")
    assert len(out) <= cap


def test_run_name_must_stay_inside_the_session_folder(tmp_path: Path) -> None:
    for bad in ("../elsewhere", "/tmp/x", "", "."):
        with pytest.raises(ValueError, match="must be a folder name inside the session folder"):
            start(request(tmp_path, run_name=bad))


# --------------------------------------------------------------------------------------------------- environment

ENV_DUMP = """
    import json, os, sys
    os.makedirs(sys.argv[1], exist_ok=True)
    json.dump(dict(os.environ), open(os.path.join(sys.argv[1], "env.json"), "w"))
"""


def test_child_sees_no_api_keys_but_sees_declared_and_allowed_variables(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secrets = {"DEEPSEEK_API_KEY": "sk-deepseek", "OPENAI_API_KEY": "sk-openai", "ANTHROPIC_API_KEY": "sk-ant",
               "MY_SERVICE_TOKEN": "tok", "HF_TOKEN": "hf_x", "AWS_SECRET_ACCESS_KEY": "aws",
               "DB_PASSWORD": "pw", "LITELLM_MASTER_KEY": "lm"}
    for k, v in secrets.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("DATASET_DIR", "/data/sets")   # declared by the template
    monkeypatch.setenv("UNDECLARED_THING", "x")
    monkeypatch.setenv("HF_HOME", "/cache/hf")
    monkeypatch.setenv("LC_NUMERIC", "C")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    cwd = write(tmp_path, ENV_DUMP)
    req = request(cwd, args=["run_1"], results_file=None, env_allow=["DATASET_DIR", "OPENAI_API_KEY"],
                  env_set={"SEED": "7"}, gpus="0,1")
    assert run(req).outcome == "ok"
    env = json.loads((cwd / "run_1" / "env.json").read_text())
    assert not set(secrets) & set(env)
    assert not any(v in json.dumps(env) for v in secrets.values())
    assert env["DATASET_DIR"] == "/data/sets" and env["SEED"] == "7"
    assert env["HF_HOME"] == "/cache/hf" and env["LC_NUMERIC"] == "C"
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert env["PYTHONUNBUFFERED"] == "1" and env["MPLBACKEND"] == "Agg"
    assert env["PATH"] == os.environ["PATH"]
    assert "UNDECLARED_THING" not in env


def test_openmp_threads_wait_passively_unless_the_user_says_otherwise() -> None:
    req = RunRequest(cwd=Path("."), run_name="r")
    assert build_env(req, {"PATH": "/bin"})["OMP_WAIT_POLICY"] == "PASSIVE"
    assert build_env(req, {"PATH": "/bin", "OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"
    given = RunRequest(cwd=Path("."), run_name="r", env_set={"OMP_WAIT_POLICY": "ACTIVE"})
    assert build_env(given, {"PATH": "/bin"})["OMP_WAIT_POLICY"] == "ACTIVE"


def test_gpus_absent_passes_the_parents_devices_and_empty_hides_them() -> None:
    parent = {"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "2"}
    assert build_env(RunRequest(cwd=Path("."), run_name="r"), parent)["CUDA_VISIBLE_DEVICES"] == "2"
    assert build_env(RunRequest(cwd=Path("."), run_name="r", gpus=""), parent)["CUDA_VISIBLE_DEVICES"] == ""
    with pytest.raises(EnvRefused, match="--gpus"):
        build_env(RunRequest(cwd=Path("."), run_name="r", gpus="0; rm -rf /"), parent)


@pytest.mark.parametrize("name", ["OPENAI_API_KEY", "MY_SERVICE_TOKEN", "DB_PASSWORD", "STRIPE_SECRET",
                                  "AWS_ACCESS_KEY_ID", "GITHUB_PAT", "HUGGING_FACE_HUB_TOKEN", "APIKEY",
                                  "AZURE_AD_TOKEN", "LITELLM_LICENSE", "WATSONX_APIKEY", "AWS_BEARER_TOKEN_BEDROCK",
                                  "VERTEXAI_CREDENTIALS", "openai_api_key"])
def test_env_flag_with_a_secret_looking_name_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(EnvRefused, match=f"--env {name}: refused, the name looks like a secret"):
        start(request(write(tmp_path, "print(1)\n"), env_set={name: "value"}))
    assert not (tmp_path / "run_1").exists()  # refused before anything was touched


def test_harmless_names_are_not_taken_for_secrets() -> None:
    for name in ("TOKENIZERS_PARALLELISM", "SEED", "DATASET_DIR", "KEYBOARD_LAYOUT", "MAX_NEW_TOKENS", "NUM_TOKENS"):
        assert not looks_secret(name), name
    with pytest.raises(EnvRefused, match="not an environment variable name"):
        build_env(RunRequest(cwd=Path("."), run_name="r", env_set={"A=B": "1"}))


# --------------------------------------------------------------------------------------------------- metrics


def test_read_metrics_plain_nested_object(tmp_path: Path) -> None:
    path = tmp_path / "final_info.json"
    path.write_text(json.dumps({"accuracy": 0.9, "eval": {"loss": 0.25, "steps": 100, "ok": True, "name": "x",
                                                           "curve": [1, 2, 3], "nan": float("nan")}}))
    assert read_metrics(path) == {"accuracy": Metric(mean=0.9), "eval.loss": Metric(mean=0.25),
                                  "eval.steps": Metric(mean=100.0)}


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "must hold a JSON object, not list"),
    ("{\"a\": ", "is not valid JSON"),
    ('{"done": true, "name": "x", "losses": [1.0]}', "holds no numeric values"),
    ('{"loss": NaN}', "holds no numeric values (not finite: loss)"),
])
def test_read_metrics_errors_are_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "final_info.json"
    path.write_text(text)
    with pytest.raises(ResultsError, match=message.replace("(", r"\(").replace(")", r"\)")) as err:
        read_metrics(path)
    assert "\n" not in str(err.value)
    with pytest.raises(ResultsError, match="was not written"):
        read_metrics(tmp_path / "absent.json")


# --------------------------------------------------------------------------------------------------- orphans


def _spawn_orphan(tmp_path: Path) -> tuple[subprocess.Popen[bytes], list[int]]:
    script = write(tmp_path, STUBBORN, name="stubborn.py") / "stubborn.py"
    pids_file = tmp_path / "orphan_pids"
    proc = subprocess.Popen([sys.executable, str(script), str(pids_file)], start_new_session=True)
    assert poll(lambda: pids_file.exists() and len(pids_file.read_text().split()) == 2)
    return proc, [int(p) for p in pids_file.read_text().split()]


def test_stop_orphan_stops_the_same_process_and_its_group(tmp_path: Path) -> None:
    proc, pids = _spawn_orphan(tmp_path)
    try:
        ticks = proc_start_ticks(proc.pid)
        assert ticks is not None
        assert stop_orphan(proc.pid, ticks, grace_s=0.3) is True
        assert poll(lambda: not any(alive(p) for p in pids))
    finally:
        os.killpg(proc.pid, signal.SIGKILL) if any(alive(p) for p in pids) else None
        proc.wait()
    assert stop_orphan(proc.pid, ticks, grace_s=0.3) is False  # nothing left to stop


def test_stop_orphan_refuses_a_pid_whose_start_time_differs(tmp_path: Path) -> None:
    proc, pids = _spawn_orphan(tmp_path)
    try:
        ticks = proc_start_ticks(proc.pid)
        assert ticks is not None
        assert stop_orphan(proc.pid, ticks + 1, grace_s=0.3) is False
        assert stop_orphan(proc.pid, None, grace_s=0.3) is False
        assert all(alive(p) for p in pids)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert poll(lambda: not any(alive(p) for p in pids))


def test_stop_orphan_stops_what_is_left_of_a_group_whose_leader_is_gone(tmp_path: Path) -> None:
    script = write(tmp_path, """
        import subprocess, sys
        code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(30)"
        worker = subprocess.Popen([sys.executable, "-c", code])
        open(sys.argv[1], "w").write(str(worker.pid))
    """, name="leader.py") / "leader.py"
    pid_file = tmp_path / "worker_pid"
    leader = subprocess.Popen([sys.executable, str(script), str(pid_file)], start_new_session=True)
    ticks = proc_start_ticks(leader.pid)
    leader.wait()
    worker = int(pid_file.read_text())
    try:
        assert alive(worker)
        assert stop_orphan(leader.pid, ticks, grace_s=0.3) is True
        assert poll(lambda: not alive(worker))
    finally:
        if alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_handle_exposes_identity_before_waiting(tmp_path: Path) -> None:
    cwd = write(tmp_path, "import time; time.sleep(0.2)\n")
    handle = start(request(cwd, results_file=None))
    assert handle.pgid == handle.pid == os.getpgid(handle.pid)
    assert handle.proc_start_ticks == proc_start_ticks(handle.pid)
    assert handle.wait().outcome == "ok"


# A child that writes numbered lines to stdout and stderr as fast as it can, one write per line.
FAST_NUMBERED_LINES = """
    import sys
    n = int(sys.argv[1])
    for i in range(n):
        sys.stdout.write(f"out {i:07d}\\n")
        sys.stderr.write(f"err {i:07d}\\n")
"""


def _check_cut_log(data: bytes, prefix: str, n: int) -> None:
    """The log holds lines 0..h-1, the cut marker, then lines t..n-1, and the marker counts every byte between."""
    line = len(f"{prefix} 0000000\n")
    marker = re.search(rb"\[\.\.\. (\d+) bytes of this log cut by the orchestrator \.\.\.\]\n", data)
    assert marker is not None, data[:200]
    head, tail = data[:marker.start()], data[marker.end():]
    if head.endswith(b"\n\n"):  # the marker's own line break, when the head ends on a whole line
        head = head[:-1]
    head_lines, tail_lines = head.decode().splitlines(), tail.decode().splitlines()
    assert head_lines == [f"{prefix} {i:07d}" for i in range(len(head_lines))]
    first = n - len(tail_lines)
    assert tail_lines == [f"{prefix} {i:07d}" for i in range(first, n)]
    assert len(head) + int(marker.group(1)) + len(tail) == n * line


def test_a_fast_writer_loses_no_line_silently_and_the_cut_is_counted_exactly(tmp_path: Path) -> None:
    n, cap = 200_000, 20_000  # 2.4 MB on each stream, the cap is under 1% of it
    cwd = write(tmp_path, FAST_NUMBERED_LINES)
    result = start(request(cwd, args=[str(n)], log_cap_bytes=cap, results_file=None)).wait(tick_s=0.01)
    assert result.outcome == "ok", result.message
    for name, prefix in (("stdout.log", "out"), ("stderr.log", "err")):
        data = (cwd / "run_1" / name).read_bytes()
        assert len(data) <= cap
        _check_cut_log(data, prefix, n)
    assert result.stdout_tail.endswith(f"out {n - 1:07d}")


@pytest.mark.parametrize("cap", [0, 50, 121, 1000, 5000])
@pytest.mark.parametrize("chunk", [1, 7, 4096, 10**9])
def test_capped_log_accounts_for_every_byte_however_the_output_arrives(cap: int, chunk: int) -> None:
    stream = b"".join(f"line {i}\n".encode() for i in range(500)) + b"no newline at the end"
    log = CappedLog(cap)
    for i in range(0, len(stream), chunk):
        log.feed(stream[i:i + chunk])
    data = log.render()
    if len(stream) <= cap:
        assert data == stream
        return
    marker = re.search(rb"\n\[\.\.\. (\d+) bytes of this log cut by the orchestrator \.\.\.\]\n", data)
    assert marker is not None
    head, tail = data[:marker.start()], data[marker.end():]
    assert stream.startswith(head) and stream.endswith(tail)
    assert len(head) + int(marker.group(1)) + len(tail) == len(stream)
    if cap > 120:
        assert len(data) <= cap


def test_a_process_that_left_the_group_holding_the_pipes_does_not_hang_the_run(tmp_path: Path) -> None:
    cwd = write(tmp_path, """
        import subprocess, sys
        code = "import time; print('escaped', flush=True); time.sleep(120)"
        p = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)  # inherits stdout and stderr
        open(sys.argv[1], "w").write(str(p.pid))
        print("leader done", flush=True)
    """)
    pid_file = tmp_path / "escaped_pid"
    t0 = time.monotonic()
    try:
        result = run(request(cwd, args=[str(pid_file)], results_file=None, kill_grace_s=1))
        assert time.monotonic() - t0 < 60  # the escaped process lives 120 s; the run does not wait for it
        assert result.outcome == "ok"
        assert "leader done\n" in (cwd / "run_1" / "stdout.log").read_text()
    finally:
        if pid_file.exists():
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_start_as_a_context_stops_the_whole_group_when_the_body_raises(tmp_path: Path) -> None:
    cwd = write(tmp_path, STUBBORN)
    pids_file = tmp_path / "pids"
    with pytest.raises(RuntimeError, match="the journal could not be written"):
        with start(request(cwd, args=[str(pids_file)], kill_grace_s=0.3)) as handle:
            assert poll(lambda: pids_file.exists() and len(pids_file.read_text().split()) == 2, timeout=30)
            raise RuntimeError("the journal could not be written")
    child, grandchild = map(int, pids_file.read_text().split())
    assert not alive(child) and not alive(grandchild)  # gone when the block is left, not some time later
    assert handle.proc.returncode is not None  # reaped
    assert handle.wait().outcome == "error"  # waiting afterwards tells what happened, it does not hang


def test_start_as_a_context_stops_a_run_the_body_did_not_wait_for(tmp_path: Path) -> None:
    cwd = write(tmp_path, "import time; print('working', flush=True); time.sleep(120)\n")
    with start(request(cwd, results_file=None, kill_grace_s=0.3)) as handle:
        assert poll(lambda: (cwd / "run_1" / "stdout.log").read_text() == "working\n", timeout=30)
    assert not alive(handle.pid)
    result = handle.wait()
    assert result.outcome == "error" and result.message.startswith("stopped by the orchestrator")


def test_a_run_whose_results_cannot_be_read_is_no_results_not_a_crash(tmp_path: Path) -> None:
    cwd = write(tmp_path, """
        import os, sys
        os.makedirs(sys.argv[1], exist_ok=True)
        open(os.path.join(sys.argv[1], "final_info.json"), "w").write('{"loss": 1' + "0" * 400 + '}')
    """)
    result = run(request(cwd, args=["run_1"]))
    assert result.outcome == "no_results"
    assert result.message == "exit 0 but run_1/final_info.json holds no numeric values (not finite: loss)"


@pytest.mark.parametrize("content, message", [
    (b'{"loss": 1' + b"0" * 400 + b"}", "holds no numeric values (not finite: loss)"),
    (b'{"loss": 1' + b"0" * 5000 + b"}", "holds a number too long to read"),
    (b"[" * 100_000, "is nested too deeply to read"),
    (b'{"a": ' * 100_000, "is nested too deeply to read"),
    (b'{"loss": 1.0, "note": "caf\xe9"}', "is not UTF-8 text (byte 0xe9 at offset 26)"),
    (b'\xff\xfe{\x00}\x00', "is not UTF-8 text (byte 0xff at offset 0)"),
])
def test_read_metrics_odd_contents_are_one_line_results_errors(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "final_info.json"
    path.write_bytes(content)
    with pytest.raises(ResultsError) as err:
        read_metrics(path)
    assert str(err.value) == f"final_info.json {message}"


def test_read_metrics_takes_huge_numbers_as_not_finite_and_keeps_the_rest(tmp_path: Path) -> None:
    path = tmp_path / "final_info.json"
    path.write_text('{"loss": 1' + "0" * 400 + ', "acc": 0.5, "g": {"means": {"x": 1.0}, "stderrs": {"x": 1' +
                    "0" * 400 + "}}}")
    assert read_metrics(path) == {"acc": Metric(mean=0.5), "g.x": Metric(mean=1.0)}


def test_read_metrics_of_deep_objects_that_parse_does_not_overflow_the_stack(tmp_path: Path) -> None:
    path = tmp_path / "final_info.json"
    depth = 300
    path.write_text('{"a": ' * depth + '{"loss": 2.0}' + "}" * depth)
    assert read_metrics(path) == {"a." * depth + "loss": Metric(mean=2.0)}


def test_read_metrics_refuses_a_huge_file_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "final_info.json"
    with open(path, "wb") as fh:
        fh.truncate(33 * 1024 * 1024)  # sparse: no disk used
    with pytest.raises(ResultsError) as err:
        read_metrics(path)
    assert str(err.value) == "final_info.json is 33.0 MiB, over the 32 MiB limit for a results file"


def test_read_metrics_refuses_what_is_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "final_info.json"
    os.mkfifo(fifo)  # opening it to read would wait for a writer forever
    with pytest.raises(ResultsError) as err:
        read_metrics(fifo)
    assert str(err.value) == "final_info.json is not a regular file"
    (tmp_path / "run").mkdir()
    with pytest.raises(ResultsError, match="^run is not a regular file$"):
        read_metrics(tmp_path / "run")


MARKER_EXPERIMENT = """
    import json, os, sys
    open("began", "w").write(str(os.getpid()))
    out = sys.argv[1].split("=", 1)[1]
    os.makedirs(out, exist_ok=True)
    json.dump({"score": 1.0}, open(os.path.join(out, "final_info.json"), "w"))
"""


def test_a_gated_run_begins_only_when_released_and_keeps_its_pid(tmp_path):
    write(tmp_path, MARKER_EXPERIMENT)
    with start(request(tmp_path), gate=True) as handle:
        ticks = proc_start_ticks(handle.pid)
        assert not (tmp_path / "began").exists()  # the shim waits on the gate; the experiment has not begun
        handle.release()
        result = handle.wait()
    assert result.outcome == "ok"
    assert (tmp_path / "began").read_text() == str(handle.pid) and handle.proc_start_ticks == ticks


def test_a_gated_run_whose_orchestrator_never_released_it_never_begins(tmp_path):
    write(tmp_path, MARKER_EXPERIMENT)
    handle = start(request(tmp_path), gate=True)
    handle._close_gate()  # what the orchestrator's death does to the gate's write end
    assert handle.proc.wait(timeout=60) == 0
    handle.wait()
    assert not (tmp_path / "began").exists()


def test_run_begins_the_experiment_only_after_on_start_returned(tmp_path):
    write(tmp_path, MARKER_EXPERIMENT)
    seen: list[bool] = []
    result = run(request(tmp_path), on_start=lambda h: seen.append((tmp_path / "began").exists()))
    assert seen == [False] and result.outcome == "ok" and (tmp_path / "began").exists()
