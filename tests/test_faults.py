"""The fault suite: SIGKILL at random moments, torn journal lines, stale git locks; every crash must be resumable.

The main test SIGKILLs the orchestrator (launch, then each `resume`) at random moments of a toy session against
the fake provider, 20 times in all, each kill followed by `resume`. A session that completes before the kills are
used up is followed by a fresh one, so the 20 kills spread over a few sessions. Every session must end exactly as
an uninterrupted one (status, tags, the code, results and files at each tag, metrics and attempt history, the
commit subjects, figures, notes), `status` must work after every kill, no model reply may be requested again once
it was journaled (the server's request log against the journal's timestamps; a request whose reply a kill lost
may be re-sent, with the same conversation), every experiment process a session started must be on record (a
`run_started` with its pid) and none may outlive the resume that follows its orchestrator's death.

The random choices come from one seeded generator: ORCH_FAULT_SEED=<int> reproduces a sequence of kills (the
machine's timing still varies), ORCH_FAULT_KILLS=<n> changes how many kills are made. The test prints the seed
and every kill it made (`pytest -s` shows them as they happen; a failure shows them too).
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from orchestrator.journal import load_state
from tests.session_helpers import (
    REPO,
    TEST_KEY,
    UNSANDBOXED,
    edit,
    git,
    make_idea,
    make_template,
    orchestrator,
    status_json,
)

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("ORCH_FAULT_SEED", "20261129"))
KILLS = int(os.environ.get("ORCH_FAULT_KILLS", "20"))
PROCESS_DEADLINE_S = 180.0  # one launch or resume that runs longer than this is hung
# The runs log their pids to $FAULT_DIR in the test's tmp folder, and orphans must be seen by the test's pid checks.
MODEL_ENV = {"DEEPSEEK_API_KEY": TEST_KEY, **UNSANDBOXED}

# --------------------------------------------------------------------------------------------------- the toy

# Both scripts log every process they start ("start|end PID START_TICKS CWD WHAT") to $FAULT_DIR/procs.log, and
# a process that starts while an earlier one is still alive (an orphan nobody stopped) says so in overlaps.log.
FAULT_LOG = '''\
def fault_log(event, what):
    """Bookkeeping for tests/test_faults.py: log this process, and note any earlier run still alive."""
    folder = os.environ["FAULT_DIR"]
    with open("/proc/self/stat") as fh:
        me = fh.read().rsplit(")", 1)[1].split()[19]
    log = os.path.join(folder, "procs.log")
    if event == "start" and os.path.exists(log):
        with open(log) as fh:
            lines = [line.split(" ", 3) for line in fh.read().splitlines()]
        ended = {(pid, ticks) for kind, pid, ticks, _ in lines if kind == "end"}
        for kind, pid, ticks, where in lines:
            if kind != "start" or (pid, ticks) in ended:
                continue
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    rest = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if rest[19] == ticks and rest[0] not in ("Z", "X"):
                with open(os.path.join(folder, "overlaps.log"), "a") as fh:
                    fh.write(f"{os.getcwd()} {what} started while {where} (pid {pid}) was still running\\n")
    with open(log, "a") as fh:
        fh.write(f"{event} {os.getpid()} {me} {os.getcwd()} {what}\\n")
'''

EXPERIMENT = f'''\
"""A toy experiment: the score peaks at LR = 0.3. It sleeps a little, so that kills can land inside a run."""
import argparse
import json
import os
import time

LR = 0.1


{FAULT_LOG}

def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out_dir", required=True)
    args = parser.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    fault_log("start", args.out_dir)
    time.sleep(0.3)
    score = 1.0 - abs(LR - 0.3)
    info = {{"toy": {{"means": {{"score": score, "gap": abs(LR - 0.3)}}, "stderrs": {{"score": 0.01, "gap": 0.0}}}}}}
    with open(os.path.join(args.out_dir, "final_info.json"), "w") as fh:
        json.dump(info, fh)
    fault_log("end", args.out_dir)


if __name__ == "__main__":
    main()
'''

PLOT = f'''\
"""Writes scores.png: one byte per run's score (a stand-in for a real figure)."""
import glob
import json
import os
import time


{FAULT_LOG}

fault_log("start", "plot.py")
time.sleep(0.2)
scores = [json.load(open(p))["toy"]["means"]["score"] for p in sorted(glob.glob("run_*/final_info.json"))]
TITLE = "scores"
with open("scores.png", "wb") as fh:
    fh.write(bytes(int(s * 100) for s in scores))
fault_log("end", "plot.py")
'''


def make_fault_template(root: Path) -> Path:
    template = make_template(root)
    (template / "experiment.py").write_text(EXPERIMENT)
    (template / "plot.py").write_text(PLOT)
    toml = template / "template.toml"
    toml.write_text(toml.read_text().replace('"notes.txt"]', '"notes.txt", "plot.py"]'))
    return template


def fault_replies() -> list[dict[str, Any]]:
    """Run 1 applies; run 2 first sends an edit that matches nothing, then one that crashes, then the fix; then
    ALL_COMPLETED, the plot step's edit and the notes. The k-th reply answers a conversation with k replies."""
    crash = ("    score = 1.0 - abs(LR - 0.3)\n", "    raise RuntimeError('exploded on purpose')\n")
    return [
        {"content": edit("LR = 0.1\n", "LR = 0.2\n", plan="Run 1: raise LR to 0.2."),
         "reasoning": "A larger LR first.", "prompt_tokens": 900, "completion_tokens": 100, "cached_tokens": 300},
        {"content": edit("LR = 0.25\n", "LR = 0.3\n", plan="Run 2: LR 0.3.")},  # the SEARCH matches nothing
        {"content": edit("LR = 0.2\n", "LR = 0.3\n", plan="Run 2: LR 0.3.") + edit(*crash, plan="")},
        {"content": edit(crash[1], crash[0], plan="Fix the crash.")},
        {"content": "Both planned runs are done: LR 0.3 is best.\n\nALL_COMPLETED"},
        {"content": edit('TITLE = "scores"\n', 'TITLE = "toy score by run"\n', path="plot.py", plan="Title.")},
        {"content": edit("# Notes\n", "# Notes\nLR = 0.3 scored best.\n", path="notes.txt", plan="Notes.")},
    ]


# fake_provider.py answers with its replies in the order requests come; a request sent again after a crash
# (legitimately, when its reply never reached the journal) would then get the next reply and shift the session.
# This wrapper picks the reply by the conversation instead: a request carrying k assistant messages gets reply k,
# so the same request always gets the same reply and a repeated request shows only in the server's log.
KEYED_PROVIDER = '''\
"""tests/fake_provider.py, except that a request with k assistant messages gets reply k (tests/test_faults.py)."""
import sys
import threading

sys.path.insert(0, {tests_dir!r})
import fake_provider as fp  # noqa: E402

_here = threading.local()
_rules = fp.deepseek_rule_violation


def _check(messages):  # called for every request (rules "deepseek") before a reply is taken
    _here.replies_before = sum(1 for m in messages if m.get("role") == "assistant")
    return _rules(messages)


def _take(self):
    k = getattr(_here, "replies_before", None)
    return self.replies[k] if k is not None and k < len(self.replies) else None


fp.deepseek_rule_violation = _check
fp.FakeState.take_reply = _take
fp.main()
'''


def replies_before(request: dict[str, Any]) -> int:
    return sum(1 for m in request["messages"] if m.get("role") == "assistant")


# --------------------------------------------------------------------------------------------------- processes


def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, start ticks), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            rest = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return rest[0], int(rest[2]), int(rest[19])


def _alive(pid: int, ticks: int | None = None) -> bool:
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X") and (ticks is None or stat[2] == ticks)


def _group(pgid: int, min_ticks: int) -> list[int]:
    """Live members of process group `pgid` started no earlier than its leader (never an unrelated process)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat and stat[1] == pgid and stat[0] not in ("Z", "X") and stat[2] >= min_ticks:
                out.append(int(entry))
    return out


def _child_signals() -> None:
    """In the orchestrator child: default dispositions and nothing blocked, whatever pytest's shell left."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, [])


@dataclass
class Orch:
    """One `python -m orchestrator ...` in its own session (so its process group id is its pid)."""

    proc: subprocess.Popen[bytes]
    ticks: int
    stdout: Path
    stderr: Path
    started: float

    def output(self) -> str:
        out = self.stdout.read_text(errors="replace") if self.stdout.exists() else ""
        err = self.stderr.read_text(errors="replace") if self.stderr.exists() else ""
        return f"--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"

    def session(self) -> Path | None:
        """The session folder, once `launch` has printed it (its first line; only for a launch)."""
        text = self.stdout.read_text(errors="replace") if self.stdout.exists() else ""
        if "\n" not in text:
            return None
        return Path(text.split("\n", 1)[0].strip())


class Reaper:
    """Everything the tests start: orchestrators (by process group) and experiment runs (from procs.log).
    `reap()` kills what is left, checking start times so that no reused pid is ever signalled."""

    def __init__(self, fault_dir: Path, logs: Path) -> None:
        self.fault_dir = fault_dir
        self.logs = logs
        self.orchs: list[Orch] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> Orch:
        n = len(self.orchs)
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        full_env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": pythonpath, **MODEL_ENV,
                    **(env or {})}
        if "ORCH_TEST_CRASH_AT" not in (env or {}):
            full_env.pop("ORCH_TEST_CRASH_AT", None)
        self.logs.mkdir(parents=True, exist_ok=True)
        out, err = self.logs / f"orch_{n}.out", self.logs / f"orch_{n}.err"
        with open(out, "wb") as fo, open(err, "wb") as fe:
            proc = subprocess.Popen([sys.executable, "-m", "orchestrator", *args], cwd=REPO, env=full_env,
                                    stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, start_new_session=True,
                                    restore_signals=True, preexec_fn=_child_signals)
        started = time.monotonic()
        stat = _proc_stat(proc.pid)
        orch = Orch(proc, stat[2] if stat else 0, out, err, started)
        self.orchs.append(orch)
        return orch

    def experiments(self) -> list[tuple[int, int, str]]:
        """(pid, start ticks, where) of every experiment or plot process started, from procs.log."""
        log = self.fault_dir / "procs.log"
        if not log.exists():
            return []
        out = []
        for line in log.read_text().splitlines():
            kind, pid, ticks, where = line.split(" ", 3)
            if kind == "start":
                out.append((int(pid), int(ticks), where))
        return out

    def reap(self) -> None:
        for orch in self.orchs:
            if orch.proc.poll() is None:  # still running (a failed test): its group is surely its own
                for pid in _group(orch.proc.pid, orch.ticks):
                    _kill(pid)
                _kill(orch.proc.pid)
                orch.proc.wait(timeout=10)
        for pid, ticks, _ in self.experiments():
            if _alive(pid, ticks):
                for member in _group(pid, ticks):
                    _kill(member)
                _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def fault_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fault_procs")


@pytest.fixture(scope="module")
def module_reaper(fault_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reaper]:
    reaper = Reaper(fault_dir, tmp_path_factory.mktemp("orch_logs"))
    yield reaper
    reaper.reap()


@pytest.fixture
def reaper(fault_dir: Path, tmp_path: Path) -> Iterator[Reaper]:
    reaper = Reaper(fault_dir, tmp_path / "orch_logs")
    yield reaper
    reaper.reap()


def start_keyed_provider(factory: Any, folder: Path) -> Any:
    script = folder / "keyed_provider.py"
    if not script.exists():
        folder.mkdir(parents=True, exist_ok=True)
        script.write_text(KEYED_PROVIDER.format(tests_dir=str(Path(__file__).resolve().parent)))
    return factory.start({"replies": fault_replies()}, api_key=TEST_KEY, script=script)


def launch_args(root: Path, url: str, fault_dir: Path) -> list[str]:
    template = root / "toy_template"
    if not template.exists():
        make_fault_template(root)
    idea = root / "idea.json"
    if not idea.exists():
        make_idea(root)
    return ["launch", str(idea), "--template", str(template), "--model", "deepseek/deepseek-reasoner",
            "--api-base", url, "--root", str(root / "sessions"), "--max-runs", "3", "--env", f"FAULT_DIR={fault_dir}"]


def wait_finished(orch: Orch, deadline_s: float = PROCESS_DEADLINE_S) -> int:
    try:
        return orch.proc.wait(timeout=deadline_s)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"orchestrator still running after {deadline_s:.0f} s\n{orch.output()}") from None


# --------------------------------------------------------------------------------------------------- outcomes


def journal_events(session: Path) -> list[dict[str, Any]]:
    """The journal's events, read strictly (any bad line fails the test)."""
    path = session / ".orchestrator" / "journal.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def outcome(session: Path) -> dict[str, Any]:
    """What an interrupted session must end with exactly as an uninterrupted one (commit hashes and times aside)."""
    state = status_json(session)  # the CLI, as a user sees it
    runs = [
        {k: r[k] for k in ("run", "status", "attempts", "outcome", "plan", "tag", "calls")}
        | {"history": [(h["attempt"], h["outcome"], h["plan"]) for h in r["history"]],
           "metrics": {name: m["value"] for name, m in r["metrics"].items()}}
        for r in state["runs"]
    ]
    tags = {}
    for tag in sorted(git(session, "tag").split()):
        run_dir = tag  # tags are named after their run folders
        tags[tag] = {
            "experiment.py": git(session, "show", f"{tag}:experiment.py"),
            "final_info.json": git(session, "show", f"{tag}:{run_dir}/final_info.json"),
            "files": git(session, "ls-tree", "-r", "--name-only", tag).splitlines(),
        }
    info = state["session"]
    return {
        "status": info["status"],
        "reason": info["reason"],
        "figures": info["figures"],
        "calls": info["totals"]["calls"],
        "best_run": info["best_run"],
        "runs": runs,
        "tags": tags,
        "commits": git(session, "log", "--format=%s", "HEAD").splitlines(),
        "head_files": git(session, "ls-tree", "-r", "--name-only", "HEAD").splitlines(),
        "files": {p: (session / p).read_text() for p in ("experiment.py", "plot.py", "notes.txt")},
        "scores.png": list((session / "scores.png").read_bytes()) if (session / "scores.png").exists() else None,
        "git_status": git(session, "status", "--porcelain", "--untracked-files=all").splitlines(),
    }


_DURATION = re.compile(r"\(\d+(\.\d+)? s\)")


def normalised(messages: list[dict[str, Any]], session: Path) -> list[dict[str, Any]]:
    """A request's messages with what legitimately differs between two sessions made equal: the session folder
    (in tracebacks) and run durations."""
    out = []
    for m in messages:
        text = str(m.get("content") or "")
        for form in {str(session), str(session.resolve())}:
            text = text.replace(form, "<SESSION>")
        out.append({**m, "content": _DURATION.sub("(<D> s)", text)})
    return out


def first_difference(a: Any, b: Any, path: str = "") -> str:
    """Where two outcomes first differ, for a readable failure."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b), key=str):
            if a.get(k) != b.get(k):
                return first_difference(a.get(k), b.get(k), f"{path}.{k}")
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if x != y:
                return first_difference(x, y, f"{path}[{i}]")
    return f"{path or '(top)'}:\n  reference: {b!r}\n  this one:  {a!r}"


def signature(event: dict[str, Any]) -> tuple[Any, ...]:
    """The step an event records, the same in every session: kind, stage, run, attempt, retry, phase."""
    d = event.get("data", {})
    return (event.get("kind"), d.get("stage"), d.get("run"), d.get("attempt"), d.get("retry"), d.get("phase"))


def describe(event: dict[str, Any] | None) -> str:
    if event is None:
        return "no journal yet"
    d = event.get("data", {})
    where = "/".join(str(d[k]) for k in ("stage", "run", "attempt", "retry") if d.get(k) is not None)
    return f"{event.get('kind')}{':' + d['phase'] if d.get('phase') else ''}{' ' + where if where else ''}"


@dataclass
class Reference:
    outcome: dict[str, Any]
    requests: list[dict[str, Any]]
    session: Path
    duration_s: float
    active_s: float  # on the work clock (see Watcher)
    events: int
    signatures: list[tuple[Any, ...]]

    def events_left(self, session: Path | None) -> int:
        """Events of the reference that this session has not journaled yet: how much of it is left to do."""
        done = {signature(e) for e in journal_events_lenient(session)} if session else set()
        return sum(1 for sig in self.signatures if sig not in done)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, fake_provider_module, module_reaper, fault_dir) -> Reference:
    """One uninterrupted session: what every interrupted one must end with."""
    root = tmp_path_factory.mktemp("reference")
    server = start_keyed_provider(fake_provider_module, root / "provider")
    orch = module_reaper.start(*launch_args(root, server.url, fault_dir))
    watched = run_until_kill(orch, None, None, root, server)
    duration = time.monotonic() - orch.started
    assert watched.rc == 0, orch.output()
    session = orch.session()
    assert session is not None, orch.output()
    events = journal_events(session)
    ref = Reference(outcome(session), server.requests(), session, duration, watched.work_s, len(events),
                    [signature(e) for e in events])
    assert ref.outcome["status"] == "completed", ref.outcome
    assert [r["status"] for r in ref.requests] == [200] * len(fault_replies()), "the reference asked for more"
    assert [replies_before(r) for r in ref.requests] == list(range(len(fault_replies())))
    assert {t: v["final_info.json"] != "" for t, v in ref.outcome["tags"].items()} == dict.fromkeys(
        ["run_0", "run_1", "run_2"], True)
    print(f"reference session: {duration:.1f} s ({ref.active_s:.1f} s of work), {ref.events} journal events, "
          f"{len(ref.requests)} requests")
    return ref


# --------------------------------------------------------------------------------------------------- kills


@dataclass
class KillPlan:
    """When to SIGKILL one orchestrator process, and what: its pid alone (children such as a running `git`
    finish on their own) or its whole process group (they die with it). The experiment has its own group."""

    mode: str  # "time": after `delay_s` of work | "event": `delay_s` after its `events`-th journal event
    delay_s: float
    events: int
    target: str  # "pid" | "group"

    def __str__(self) -> str:
        what = "process" if self.target == "pid" else "group"
        if self.mode == "time":
            return f"SIGKILL its {what} after {self.delay_s:.2f} s of work"
        return f"SIGKILL its {what} {self.delay_s * 1000:.0f} ms after its journal event #{self.events}"


def draw_kill(rng: random.Random, ref: Reference, events_left: int) -> KillPlan:
    """A kill at a random moment of what is left of the session: half at a random time within the work an
    uninterrupted session still had to do from there (estimated from the events left), half just after one of
    the journal events still to come (a resume first adds drive_started), so that kills also land in the short
    windows between a side effect and its record."""
    target = rng.choice(["pid", "group"])
    if rng.random() < 0.5:
        left_s = ref.active_s * events_left / ref.events + 1.5  # a resume takes about a second to start
        return KillPlan("time", rng.uniform(0.05, left_s), 0, target)
    return KillPlan("event", rng.uniform(0.0, 0.05), rng.randint(1, events_left + 1), target)


@dataclass
class Kill:
    at: float  # time.time() just before the signal
    after_s: float  # wall time since the process started
    work_s: float
    journal_events: int
    last_event: str  # what the journal said last when the process died


@dataclass
class Watched:
    rc: int | None  # the exit code when it ended by itself
    kill: Kill | None
    work_s: float


class Watcher:
    """Follows one orchestrator process: the lines it adds to the journal, and its *work clock*.

    The work clock runs from the moment the process has a session (a resume: at once; a launch: when its session
    folder appears) and stops while the process waits for a model reply, i.e. from a `phase: ask` event until the
    fake provider has answered, and once the session is finished. The wait is mostly litellm's import (seconds, in
    every process that asks), the end mostly the interpreter's teardown of litellm (seconds too): kills spread
    over the work clock land on the session's steps instead of piling up there."""

    def __init__(self, orch: Orch, session: Path | None, root: Path, server_log: Path) -> None:
        self.orch = orch
        self.sessions = root / "sessions"
        self.before = set(os.listdir(self.sessions)) if self.sessions.exists() else set()
        self.session = session
        self.server_log = server_log
        self.journal = session / ".orchestrator" / "journal.jsonl" if session else None
        self.offset = self.journal.stat().st_size if self.journal and self.journal.exists() else 0
        self.partial = b""
        self.lines = 0  # added by this process
        self.asking_since_size: int | None = None  # server log size when the last event was `phase: ask`
        self.finished = False  # the session is finished: what is left is printing and exiting
        self.clock_on = session is not None
        self.work_s = 0.0
        self.last = time.monotonic()

    def poll(self) -> None:
        now = time.monotonic()
        if self.journal is None and self.sessions.exists():
            new = sorted(set(os.listdir(self.sessions)) - self.before)
            if new and not self.clock_on:  # create_session has begun (its copy is made in a hidden folder first)
                self.clock_on = True
                self.last = now
            named = [n for n in new if not n.startswith(".")]
            if named:
                self.session = self.sessions / named[0]
                self.journal = self.session / ".orchestrator" / "journal.jsonl"
        if self.journal is not None and self.journal.exists():
            with open(self.journal, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
            self.offset += len(data)
            *whole, self.partial = (self.partial + data).split(b"\n")
            self.lines += len(whole)
            if whole:
                try:
                    event = json.loads(whole[-1])
                except json.JSONDecodeError:
                    event = {}
                asking = event.get("kind") == "phase" and event.get("data", {}).get("phase") == "ask"
                self.asking_since_size = self.server_log.stat().st_size if asking else None
                self.finished = event.get("kind") == "finished"
        if self.asking_since_size is not None and self.server_log.stat().st_size != self.asking_since_size:
            self.asking_since_size = None  # the provider answered
        if self.clock_on and self.asking_since_size is None and not self.finished:
            self.work_s += now - self.last
        self.last = now


def run_until_kill(orch: Orch, plan: KillPlan | None, session: Path | None, root: Path, server: Any) -> Watched:
    """Watch one orchestrator process (`session` None: a launch under `root`) and SIGKILL it as planned."""
    watch = Watcher(orch, session, root, server.log_path)
    reached: float | None = None
    while True:
        watch.poll()
        rc = orch.proc.poll()
        if rc is not None:
            return Watched(rc, None, watch.work_s)
        now = time.monotonic()
        if now - orch.started > PROCESS_DEADLINE_S:
            raise AssertionError(f"orchestrator hung for {PROCESS_DEADLINE_S:.0f} s\n{orch.output()}")
        fire = False
        if plan is not None and plan.mode == "time":
            fire = watch.work_s >= plan.delay_s
        elif plan is not None:
            if reached is None and watch.lines >= plan.events:
                reached = now
            fire = reached is not None and now - reached >= plan.delay_s
        if fire:
            assert plan is not None
            at = time.time()
            if plan.target == "group":
                os.killpg(orch.proc.pid, signal.SIGKILL)
            else:
                os.kill(orch.proc.pid, signal.SIGKILL)
            rc = orch.proc.wait(timeout=30)
            if rc != -signal.SIGKILL:
                return Watched(rc, None, watch.work_s)  # it ended by itself just before the signal
            deadline = time.monotonic() + 30
            while _group(orch.proc.pid, orch.ticks):  # a pid-only kill: let children such as git finish
                assert time.monotonic() < deadline, f"children of a killed orchestrator still run\n{orch.output()}"
                time.sleep(0.02)
            events = journal_events_lenient(watch.session) if watch.session else []
            kill = Kill(at, now - orch.started, watch.work_s, len(events), describe(events[-1] if events else None))
            return Watched(None, kill, watch.work_s)
        time.sleep(0.005)


def journal_events_lenient(session: Path) -> list[dict[str, Any]]:
    """The journal's events, a torn line shown as such."""
    path = session / ".orchestrator" / "journal.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            out.append({"kind": "<torn line>"})
    return out


@dataclass
class Episode:
    """One session, from launch to completion, and the kills it took."""

    number: int
    server: Any
    session: Path | None = None
    kills: list[Kill] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


def check_runs(ep: Episode, reaper: Reaper) -> list[str]:
    """Every experiment or plot process this session started is on record (a `run_started` with its pid), so a
    resume after any crash knows it and can stop it. Returns the problems found."""
    assert ep.session is not None
    recorded = {e["data"].get("pid") for e in journal_events(ep.session) if e["kind"] == "run_started"}
    here = str(ep.session.resolve())
    unrecorded = [(pid, where) for pid, _, where in reaper.experiments()
                  if where.split(" ", 1)[0] == here and pid not in recorded]
    if unrecorded:
        return [f"processes started but never journaled (no run_started with their pid): {unrecorded}"]
    return []


def check_requests(ep: Episode, ref: Reference) -> list[str]:
    """No reply requested twice: every answered request came before its reply was journaled, and a request
    repeated (same conversation) had a kill between the two sends. Returns the problems found."""
    assert ep.session is not None
    problems = []
    requests = ep.server.requests()
    # A kill while the request was being sent leaves the server a body cut short: no model, no messages. That is
    # no request at all (a real provider would not answer it either), only it must come just before a kill.
    cut = [r for r in requests if r["model"] is None and not r["messages"]]
    requests = [r for r in requests if r not in cut]
    for r in cut:
        if not any(0 <= kill.at - r["ts"] < 10 for kill in ep.kills):
            problems.append(f"request {r['index']} came with an empty or unreadable body, and no kill explains it")
    bad = [r for r in requests if r["status"] != 200]
    if bad:
        problems.append(f"requests not answered 200: {[(r['index'], r['status']) for r in bad]}")
    replies = [e for e in journal_events(ep.session) if e["kind"] == "reply"]
    keys = [(e["data"].get("stage"), e["data"].get("run"), e["data"].get("attempt"), e["data"].get("retry"))
            for e in replies]
    if len(keys) != len(set(keys)) or len(replies) != len(fault_replies()):
        problems.append(f"the journal holds {len(replies)} replies for {len(set(keys))} steps "
                        f"({len(fault_replies())} expected)")
    by_k: dict[int, list[dict[str, Any]]] = {}
    for r in requests:
        if r["status"] == 200:
            by_k.setdefault(replies_before(r), []).append(r)
    if sorted(by_k) != list(range(len(fault_replies()))):
        problems.append(f"conversations answered: {sorted(by_k)}")
    for k, sent in sorted(by_k.items()):
        if k < len(replies):
            late = [r["index"] for r in sent if r["ts"] > replies[k]["ts"]]
            if late:
                problems.append(f"reply {k} was requested again (request {late}) after it was journaled "
                                f"(journal seq {replies[k]['seq']})")
        for a, b in zip(sent, sent[1:], strict=False):
            if not any(a["ts"] < kill.at < b["ts"] for kill in ep.kills):
                problems.append(f"reply {k} requested twice (requests {a['index']} and {b['index']}) with no "
                                "kill in between")
            if a["messages"] != b["messages"]:
                problems.append(f"reply {k} was requested twice with different conversations (requests "
                                f"{a['index']} and {b['index']}): the resumed history differs")
        last = normalised(sent[-1]["messages"], ep.session)
        if k < len(ref.requests) and last != normalised(ref.requests[k]["messages"], ref.session):
            problems.append(f"the conversation sent for reply {k} differs from the reference's: "
                            + first_difference(last, normalised(ref.requests[k]["messages"], ref.session)))
    repeats = sum(len(v) - 1 for v in by_k.values())
    ep.lines.append(f"  {len(requests)} requests ({len(ref.requests)} in the reference; {repeats} re-sent after a "
                    f"kill lost their reply" + (f"; {len(cut)} cut short by a kill" if cut else "") + ")")
    return problems


def test_twenty_random_sigkills_each_resumed_end_like_an_uninterrupted_session(
    tmp_path, fake_provider, reaper, reference, fault_dir
):
    rng = random.Random(SEED)
    log: list[str] = []

    def say(line: str) -> None:
        log.append(line)
        print(line, flush=True)

    def fail(message: str) -> None:
        pytest.fail(f"{message}\n\nkill log:\n" + "\n".join(log), pytrace=False)

    say(f"seed {SEED} (ORCH_FAULT_SEED={SEED} reproduces the kill plan), {KILLS} kills; reference "
        f"{reference.duration_s:.1f} s ({reference.active_s:.1f} s of work), {reference.events} events")
    kills = 0
    episodes: list[Episode] = []
    while kills < KILLS:
        ep = Episode(len(episodes) + 1, start_keyed_provider(fake_provider, tmp_path / f"provider_{len(episodes)}"))
        episodes.append(ep)
        root = tmp_path / f"episode_{ep.number}"
        root.mkdir()
        args = launch_args(root, ep.server.url, fault_dir)
        while True:  # one process after another until the session is completed
            command = "launch" if ep.session is None else "resume"
            plan = draw_kill(rng, reference, reference.events_left(ep.session)) if kills < KILLS else None
            orch = reaper.start(*args) if ep.session is None else reaper.start("resume", str(ep.session))
            watched = run_until_kill(orch, plan, ep.session, root, ep.server)
            if command == "launch":
                ep.session = orch.session()  # None: killed before the session was announced; launch again
            if (kill := watched.kill) is not None:
                kills += 1
                ep.kills.append(kill)
                say(f"kill {kills:2d}: episode {ep.number}, {command}: {plan}: killed at {kill.after_s:.2f} s "
                    f"({kill.work_s:.2f} s of work), {kill.journal_events} journal events, the last: "
                    f"{kill.last_event}")
                if ep.session is None:
                    continue
                try:  # `status` works at any moment
                    status = load_state(ep.session).session.status
                except Exception as exc:
                    fail(f"status fails after kill {kills}: {type(exc).__name__}: {exc}")
                if status == "completed":  # killed on its way out
                    break
                continue
            result = watched.rc
            ended = f"{command} ended by itself (exit {result})" + (f" before: {plan}" if plan else "")
            say(f"         episode {ep.number}: {ended}")
            if result != 0:
                fail(f"episode {ep.number}: {command} exited {result} (session {ep.session})\n{orch.output()}")
            break
        assert ep.session is not None
        again = orchestrator("resume", str(ep.session), env=MODEL_ENV)
        if again.returncode != 0 or "already finished" not in again.stdout:
            fail(f"episode {ep.number}: resuming the finished session: exit {again.returncode}\n"
                 f"{again.stdout}\n{again.stderr}")
        assert ep.session is not None
        got = outcome(ep.session)
        if got != reference.outcome:
            fail(f"episode {ep.number} ({len(ep.kills)} kills, session {ep.session}) ended unlike the reference: "
                 + first_difference(got, reference.outcome))
        problems = check_requests(ep, reference) + check_runs(ep, reaper)
        for line in ep.lines:
            say(line)
        if problems:
            fail(f"episode {ep.number} (session {ep.session}):\n- " + "\n- ".join(problems))

    # No experiment or plot process outlived the resume that followed its orchestrator's death...
    alive = [(pid, where) for pid, ticks, where in reaper.experiments() if _alive(pid, ticks)]
    overlaps = (fault_dir / "overlaps.log").read_text() if (fault_dir / "overlaps.log").exists() else ""
    if alive or overlaps:
        fail(f"experiment processes still alive: {alive}\nruns that started while an earlier one still ran:\n"
             f"{overlaps}")
    # ...and every folder a killed launch left behind can still be listed.
    for ep in episodes:
        listed = orchestrator("list", str(ep.session.parent))
        if listed.returncode != 0:
            fail(f"`orchestrator list {ep.session.parent}` exited {listed.returncode}: {listed.stderr}")
    where: dict[str, int] = {}
    for kill in (k for ep in episodes for k in ep.kills):
        where[kill.last_event] = where.get(kill.last_event, 0) + 1
    say(f"{kills} kills over {len(episodes)} sessions, each ended like the reference; the journal's last event "
        "at each kill: " + ", ".join(f"{k} x{n}" for k, n in sorted(where.items())))


# --------------------------------------------------------------------------------------------------- torn journal


def test_a_torn_last_journal_line_does_not_break_resume_or_status(
    tmp_path, fake_provider, reaper, reference, fault_dir
):
    """A SIGKILL (or a full disk, or a power cut) in the middle of an append leaves half a line at the end of the
    journal. `status` and `resume` must still work, and so must every command after that resume."""
    server = start_keyed_provider(fake_provider, tmp_path / "provider")
    orch = reaper.start(*launch_args(tmp_path, server.url, fault_dir), env={"ORCH_TEST_CRASH_AT": "reply:2"})
    assert wait_finished(orch) == -signal.SIGKILL, orch.output()
    session = orch.session()
    assert session is not None
    journal = session / ".orchestrator" / "journal.jsonl"
    whole = journal.read_text()
    torn = json.dumps({"seq": whole.count("\n") + 1, "ts": time.time(), "kind": "phase",
                       "data": {"phase": "ask", "stage": "experiment", "run": 2, "attempt": 1}})
    with open(journal, "a") as fh:
        fh.write(torn[: len(torn) // 2])  # the write the kill cut short

    before = orchestrator("status", str(session), "--json")
    assert before.returncode == 0, before.stderr
    resumed = reaper.start("resume", str(session))
    assert wait_finished(resumed) == 0, resumed.output()
    after = orchestrator("status", str(session), "--json")
    assert after.returncode == 0, f"status after the resume: {after.stderr}"
    got = outcome(session)
    assert got == reference.outcome, first_difference(got, reference.outcome)
    again = orchestrator("resume", str(session))
    assert again.returncode == 0 and "already finished" in again.stdout, again.stdout + again.stderr
    assert len([r for r in server.requests() if r["status"] == 200]) == len(fault_replies())
    # Every event appended after the fragment is a whole line of its own: the fragment may stay (alone on its
    # line) or go, but nothing is glued to it.
    unreadable = [line for line in journal.read_text().splitlines() if line.strip() and not _is_json(line)]
    assert unreadable in ([], [torn[: len(torn) // 2]]), unreadable


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


# --------------------------------------------------------------------------------------------------- stale git locks


def test_a_git_command_killed_with_the_orchestrator_does_not_block_resume(
    tmp_path, fake_provider, reaper, reference, fault_dir
):
    """SIGKILL to the orchestrator's process group (a job scheduler, `kill -9 -PGID`, a power cut) also kills the
    `git` it was running, which leaves `.git/index.lock` (and, inside a commit or tag, a ref's `.lock`) behind.
    Nobody else uses the session's repository while resume holds the session lock, so resume must get past them."""
    server = start_keyed_provider(fake_provider, tmp_path / "provider")
    orch = reaper.start(*launch_args(tmp_path, server.url, fault_dir), env={"ORCH_TEST_CRASH_AT": "edits_written:2"})
    assert wait_finished(orch) == -signal.SIGKILL, orch.output()
    session = orch.session()
    assert session is not None
    # What `git commit` leaves when killed between taking its locks and renaming them into place.
    (session / ".git" / "index.lock").write_bytes(b"")
    (session / ".git" / "refs" / "heads" / "main.lock").write_bytes(b"")

    resumed = reaper.start("resume", str(session))
    assert wait_finished(resumed) == 0, resumed.output()
    got = outcome(session)
    assert got == reference.outcome, first_difference(got, reference.outcome)
    assert len([r for r in server.requests() if r["status"] == 200]) == len(fault_replies())
