"""Shared fixtures: the fake OpenAI-compatible provider (tests/fake_provider.py) run as a real subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# Any test process that imports litellm uses the bundled price map and never fetches it.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

TESTS_DIR = Path(__file__).resolve().parent
FAKE_PROVIDER = TESTS_DIR / "fake_provider.py"
DATA_DIR = TESTS_DIR / "data"
START_DEADLINE_S = 15.0


class FakeProvider:
    """One fake provider process: `start(plan)`, then `url`, `requests()`, `stop()`.

    `plan` is the PLAN.json object ({"replies": [...], "faults": {...}, "rules": ...}) or just a list of replies.
    `url` ends in /v1 and works for both litellm routes (openai/ posts /v1/chat/completions, deepseek/ posts
    api_base + /chat/completions; the server answers any path ending in /chat/completions).
    """

    def __init__(self, workdir: Path, script: Path = FAKE_PROVIDER) -> None:
        self.workdir = workdir
        self.script = script  # a wrapper around fake_provider.py may take the same arguments
        self.process: subprocess.Popen[bytes] | None = None
        self.port: int | None = None
        self.api_key: str | None = None
        self.log_path = workdir / "requests.jsonl"
        self.stderr_path = workdir / "stderr.log"

    def start(self, plan: dict[str, Any] | list[Any], api_key: str | None = None) -> FakeProvider:
        if self.process is not None:
            raise RuntimeError("fake provider already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        plan_path = self.workdir / "plan.json"
        port_file = self.workdir / "port"
        plan_path.write_text(
            json.dumps({"replies": plan} if isinstance(plan, list) else plan), encoding="utf-8"
        )
        cmd = [
            sys.executable,
            str(self.script),
            "--port-file",
            str(port_file),
            "--plan",
            str(plan_path),
            "--requests-log",
            str(self.log_path),
        ]
        if api_key is not None:
            cmd += ["--api-key", api_key]
        self.api_key = api_key
        with open(self.stderr_path, "wb") as err:
            self.process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + START_DEADLINE_S
        while not port_file.exists():
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"fake provider exited early: {self.stderr_path.read_text(errors='replace')}"
                )
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("fake provider did not write its port in time")
            time.sleep(0.02)
        self.port = int(port_file.read_text())
        return self

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("fake provider not started")
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def requests(self) -> list[dict[str, Any]]:
        """Every request received so far: index, ts, path, model, messages, temperature_sent, fault, status."""
        if not self.log_path.exists():
            return []
        lines = self.log_path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]

    def stop(self) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


class FakeProviderFactory:
    """Starts fake providers under one folder and stops them all at the end.

    `factory.start(plan, api_key=None)` (or just `factory(plan, api_key=None)`) returns a started FakeProvider;
    `script=` runs another server script taking fake_provider.py's arguments (default: fake_provider.py itself).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[FakeProvider] = []

    def start(self, plan: dict[str, Any] | list[Any], api_key: str | None = None,
              script: Path | None = None) -> FakeProvider:
        provider = FakeProvider(self.root / f"fake_provider_{len(self.started)}", script or FAKE_PROVIDER)
        self.started.append(provider)
        return provider.start(plan, api_key=api_key)

    __call__ = start

    def stop_all(self) -> None:
        for provider in self.started:
            provider.stop()


@pytest.fixture
def fake_provider(tmp_path: Path) -> Iterator[FakeProviderFactory]:
    """Start fake providers with `fake_provider.start(plan, api_key=...)`; all are stopped (by pid) at teardown."""
    factory = FakeProviderFactory(tmp_path)
    yield factory
    factory.stop_all()


@pytest.fixture(scope="module")
def fake_provider_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeProviderFactory]:
    """The same, for module-scoped fixtures; servers are stopped when the module's tests are done."""
    factory = FakeProviderFactory(tmp_path_factory.mktemp("fake_providers"))
    yield factory
    factory.stop_all()


@pytest.fixture
def seed_transcript() -> str:
    return (DATA_DIR / "seed_transcript.txt").read_text(encoding="utf-8")
