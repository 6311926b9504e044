"""Settings: defaults < orchestrator.toml < ORCH_* environment < command-line flags, with one-line errors."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, Settings, load_settings, public_dump


@pytest.fixture(autouse=True)
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test starts in an empty folder with no ORCH_* variables."""
    for key in list(os.environ):
        if key.upper().startswith("ORCH_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def one_line(err: pytest.ExceptionInfo[ConfigError]) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    return text


def test_defaults_without_file_env_or_flags() -> None:
    s = load_settings({})
    assert s.model == "deepseek/deepseek-reasoner"
    assert (s.max_runs, s.attempts_per_run, s.edit_retries) == (10, 4, 3)
    assert s.timeout_s is None and s.run_timeout_s() == 7200 and s.run_timeout_s(30) == 30
    assert s.python == sys.executable and s.root == Path("experiments") and s.plots is True
    assert s.env == {} and s.templates_dirs == []


def test_precedence_defaults_toml_env_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "orchestrator.toml").write_text(
        'model = "openai/gpt-4o"\n'
        "max_runs = 5\n"
        "attempts_per_run = 2\n"
        "edit_retries = 1\n"
        'root = "runs"\n'
        "plots = false\n"
    )
    s = load_settings({})
    assert (s.model, s.max_runs, s.attempts_per_run, s.edit_retries) == ("openai/gpt-4o", 5, 2, 1)
    assert s.root == Path("runs") and s.plots is False
    assert s.request_timeout_s == 600  # untouched default

    monkeypatch.setenv("ORCH_MAX_RUNS", "7")
    monkeypatch.setenv("ORCH_ATTEMPTS_PER_RUN", "3")
    monkeypatch.setenv("orch_plots", "true")  # case does not matter
    s = load_settings({})
    assert (s.model, s.max_runs, s.attempts_per_run, s.plots) == ("openai/gpt-4o", 7, 3, True)

    # None flags (not given on the command line) do not override anything.
    s = load_settings({"max_runs": 9, "attempts_per_run": None, "model": None, "edit_retries": 0})
    assert (s.model, s.max_runs, s.attempts_per_run, s.edit_retries) == ("openai/gpt-4o", 9, 3, 0)


def test_env_variables_for_runs_merge_across_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "orchestrator.toml").write_text('[env]\nA = "toml"\nB = "toml"\nC = "toml"\n')
    monkeypatch.setenv("ORCH_ENV", "B=env,D=env")
    s = load_settings({"env": ["C=cli", "E=a=b"]})
    assert s.env == {"A": "toml", "B": "env", "C": "cli", "D": "env", "E": "a=b"}


def test_named_config_file_and_list_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "conf" / "mine.toml"
    cfg.parent.mkdir()
    cfg.write_text('templates_dirs = ["t1", "t2"]\ngpus = 1\nbudget_usd = 2.5\n')
    (tmp_path / "orchestrator.toml").write_text("max_runs = 2\n")  # not read when a file is named
    s = load_settings({}, cfg)
    assert s.templates_dirs == [Path("t1"), Path("t2")] and s.gpus == "1" and s.budget_usd == 2.5
    assert s.max_runs == 10
    monkeypatch.setenv("ORCH_TEMPLATES_DIRS", os.pathsep.join(["/x", "/y"]))
    monkeypatch.setenv("ORCH_GPUS", "0, 1")
    s = load_settings({}, cfg)
    assert s.templates_dirs == [Path("/x"), Path("/y")] and s.gpus == "0,1"


@pytest.mark.parametrize(
    ("cli", "expected"),
    [
        ({"max_runs": 11}, "max_runs must be at most 10 (from command line)"),
        ({"max_runs": 0}, "max_runs must be at least 1"),
        ({"attempts_per_run": "four"}, "attempts_per_run must be a whole number, got 'four'"),
        ({"budget_usd": -1}, "budget_usd must be greater than 0"),
        ({"timeout_s": "soon"}, "timeout_s must be a number"),
        ({"env": ["NOEQUALS"]}, "env: entries must be KEY=VALUE, got 'NOEQUALS'"),
        ({"env": ["1BAD=x"]}, "not an environment variable name"),
        ({"gpus": "0,,1"}, "gpus"),
        ({"model": "  "}, "model: must not be empty"),
        ({"modle": "x"}, "unknown setting 'modle'"),
    ],
)
def test_invalid_flags_give_one_line(cli: dict, expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(cli)
    assert expected in one_line(err)


def test_invalid_values_name_where_they_came_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "orchestrator.toml").write_text("max_runs = 12\n")
    with pytest.raises(ConfigError) as err:
        load_settings({})
    assert one_line(err) == "max_runs must be at most 10 (from orchestrator.toml)"
    monkeypatch.setenv("ORCH_MAX_RUNS", "20")
    with pytest.raises(ConfigError) as err:
        load_settings({})
    assert one_line(err) == "max_runs must be at most 10 (from environment variable ORCH_MAX_RUNS)"
    # A valid flag wins over both invalid values.
    assert load_settings({"max_runs": 3}).max_runs == 3


def test_bad_config_files(tmp_path: Path) -> None:
    (tmp_path / "orchestrator.toml").write_text('model = "x"\nmax_runs = \n')
    with pytest.raises(ConfigError) as err:
        load_settings({})
    assert "orchestrator.toml: invalid TOML" in one_line(err) and "line 2" in str(err.value)
    (tmp_path / "orchestrator.toml").write_text("max_run = 3\n")
    with pytest.raises(ConfigError) as err:
        load_settings({})
    assert "unknown setting 'max_run' in orchestrator.toml" in one_line(err)
    with pytest.raises(ConfigError) as err:
        load_settings({}, tmp_path / "missing.toml")
    assert "missing.toml not found" in one_line(err)


def test_public_dump_is_json_and_hides_secrets() -> None:
    s = load_settings(
        {
            "api_base": "http://user:hunter2@127.0.0.1:8000/v1",
            "env": ["WANDB_API_KEY=sk-secret-123", "HF_TOKEN=hf_abc", "SEED=1"],
            "root": Path("out"),
        }
    )
    dumped = json.dumps(public_dump(s))
    for secret in ("hunter2", "sk-secret-123", "hf_abc", "user:"):
        assert secret not in dumped
    data = json.loads(dumped)
    assert data["env"]["SEED"] == "1" and data["env"]["WANDB_API_KEY"] == "***"
    assert data["api_base"] == "http://***@127.0.0.1:8000/v1"
    assert data["root"] == "out" and data["max_runs"] == 10
    # What is dumped reads back as the same settings, secrets aside.
    again = Settings.model_validate({**data, "env": {"SEED": "1"}, "api_base": None})
    assert again.root == s.root and again.max_runs == s.max_runs
