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


# --- Hostile cases for the hand-layered loader ---------------------------------------------------------------


def test_env_json_orch_env_and_cli_override_per_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ORCH_ENV as a JSON object keeps values with commas intact; TOML numbers and booleans become text; for one
    key the flag beats the environment, which beats the file, while the other keys of every layer survive."""
    (tmp_path / "orchestrator.toml").write_text('[env]\nA = "toml"\nB = "toml"\nN = 3\nFLAG = true\n')
    monkeypatch.setenv("ORCH_ENV", '{"B": "env", "N": 4, "XLA_FLAGS": "--a=1,--b=2"}')
    s = load_settings({"env": ["B=cli", "XLA_FLAGS=--c=3"]})
    assert s.env == {"A": "toml", "B": "cli", "N": "4", "FLAG": "true", "XLA_FLAGS": "--c=3"}
    s = load_settings({})
    assert s.env == {"A": "toml", "B": "env", "N": "4", "FLAG": "true", "XLA_FLAGS": "--a=1,--b=2"}


def test_lower_case_orch_variable_counts_and_upper_case_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "orchestrator.toml").write_text("max_runs = 2\n")
    monkeypatch.setenv("orch_max_runs", "5")
    assert load_settings({}).max_runs == 5
    monkeypatch.setenv("orch_max_runs", "50")
    with pytest.raises(ConfigError) as err:
        load_settings({})
    text = one_line(err)
    assert (
        text.startswith("max_runs must be at most 10")
        and "environment variable orch_max_runs" in text.lower()
    )
    assert "orchestrator.toml" not in text
    # The exact upper-case spelling is preferred: the bad lower-case one is then not used at all.
    monkeypatch.setenv("ORCH_MAX_RUNS", "4")
    assert load_settings({}).max_runs == 4


def test_foreign_orch_variables_ignored_but_misspelled_toml_key_blames_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other tools may use the ORCH_ prefix: such variables are ignored, and they must not be blamed for an
    unknown key in orchestrator.toml that happens to share their name."""
    monkeypatch.setenv("ORCH_MAX_RUN", "3")
    monkeypatch.setenv("ORCH_WORKER_ID", "abc")
    s = load_settings({})
    assert s.max_runs == 10
    (tmp_path / "orchestrator.toml").write_text("max_run = 3\n")
    with pytest.raises(ConfigError) as err:
        load_settings({})
    text = one_line(err)
    assert "unknown setting 'max_run' in orchestrator.toml" in text, text
    assert "environment variable" not in text


@pytest.mark.parametrize("toml", ["env = 5\n", "env = true\n", "env = [1, 2]\n", '[env]\n"A-B" = "x"\n'])
def test_toml_env_that_is_not_a_table_of_variables_is_one_config_error(tmp_path: Path, toml: str) -> None:
    (tmp_path / "orchestrator.toml").write_text(toml)
    with pytest.raises(ConfigError) as err:
        load_settings({})
    text = one_line(err)
    assert text.startswith("env") and text.endswith("(from orchestrator.toml)"), text


def test_toml_dates_under_env_reach_runs_as_iso_text(tmp_path: Path) -> None:
    """TOML has dates and times; `WHEN = 2024-01-01` under [env] is the text a run would expect, not a crash."""
    (tmp_path / "orchestrator.toml").write_text("[env]\nWHEN = 2024-01-01\nAT = 07:30:00\nLIST = [2024-01-01]\n")
    assert load_settings({}).env == {"WHEN": "2024-01-01", "AT": "07:30:00", "LIST": '["2024-01-01"]'}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("A=1,oops", "env: entries must be KEY=VALUE, got 'oops'"),
        ("1BAD=x", "env: '1BAD' is not an environment variable name"),
        ('{"A": ', "env: invalid JSON object"),
    ],
)
def test_bad_orch_env_names_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, expected: str
) -> None:
    (tmp_path / "orchestrator.toml").write_text('[env]\nA = "fine"\n')
    monkeypatch.setenv("ORCH_ENV", value)
    with pytest.raises(ConfigError) as err:
        load_settings({"env": ["B=fine"]})
    text = one_line(err)
    assert text.startswith(expected) and text.endswith("(from environment variable ORCH_ENV)"), text


def test_templates_dirs_from_environment_json_and_separated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "orchestrator.toml").write_text('templates_dirs = ["from_toml"]\n')
    monkeypatch.setenv("ORCH_TEMPLATES_DIRS", '["/a:b", "dir with space"]')  # JSON: ':' is part of a name
    assert load_settings({}).templates_dirs == [Path("/a:b"), Path("dir with space")]
    monkeypatch.setenv("ORCH_TEMPLATES_DIRS", "/x::/y:")  # empty pieces are dropped
    assert load_settings({}).templates_dirs == [Path("/x"), Path("/y")]
    monkeypatch.setenv("ORCH_TEMPLATES_DIRS", '["/a", ')
    with pytest.raises(ConfigError) as err:
        load_settings({})
    text = one_line(err)
    assert text.startswith("templates_dirs: invalid JSON list")
    assert text.endswith("(from environment variable ORCH_TEMPLATES_DIRS)"), text


def test_empty_orch_api_base_means_no_api_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "orchestrator.toml").write_text('api_base = "http://toml.example/v1"\n')
    assert load_settings({}).api_base == "http://toml.example/v1"
    for blank in ("", "   "):
        monkeypatch.setenv("ORCH_API_BASE", blank)
        assert load_settings({}).api_base is None
    assert load_settings({"api_base": "http://cli.example/v1"}).api_base == "http://cli.example/v1"


@pytest.mark.parametrize(
    ("name", "value", "field", "expected"),
    [
        ("ORCH_PLOTS", "false", "plots", False),
        ("ORCH_PLOTS", "FALSE", "plots", False),
        ("ORCH_PLOTS", "0", "plots", False),
        ("ORCH_ALLOW_NETWORK", "1", "allow_network", True),
        ("ORCH_ALLOW_NETWORK", "true", "allow_network", True),
        ("orch_allow_network", "yes", "allow_network", True),
    ],
)
def test_booleans_from_environment_override_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, field: str, expected: bool
) -> None:
    (tmp_path / "orchestrator.toml").write_text(f"{field} = {str(not expected).lower()}\n")
    assert getattr(load_settings({}), field) is (not expected)
    monkeypatch.setenv(name, value)
    assert getattr(load_settings({}), field) is expected
    assert getattr(load_settings({field: not expected}), field) is (not expected)  # a flag still wins


def test_bad_boolean_and_named_file_errors_name_their_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCH_PLOTS", "maybe")
    with pytest.raises(ConfigError) as err:
        load_settings({})
    assert one_line(err) == "plots must be true or false, got 'maybe' (from environment variable ORCH_PLOTS)"
    monkeypatch.delenv("ORCH_PLOTS")
    cfg = tmp_path / "conf" / "mine.toml"
    cfg.parent.mkdir()
    cfg.write_text("attempts_per_run = 0\n")
    (tmp_path / "orchestrator.toml").write_text("attempts_per_run = 2\n")  # not read, must not be blamed
    with pytest.raises(ConfigError) as err:
        load_settings({}, cfg)
    assert one_line(err) == f"attempts_per_run must be at least 1 (from {cfg})"


def test_setting_names_in_the_file_may_be_in_any_case(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As for ORCH_* variables, a file written with `MAX_RUNS = 3` or an `[ENV]` table is read, and its errors
    name the setting as the tool spells it."""
    (tmp_path / "orchestrator.toml").write_text('MAX_RUNS = 3\nModel = "openai/gpt-4o"\n[ENV]\nSeed = "1"\n')
    monkeypatch.setenv("ORCH_ENV", "B=2")
    s = load_settings({})
    assert (s.max_runs, s.model, s.env) == (3, "openai/gpt-4o", {"Seed": "1", "B": "2"})
    (tmp_path / "orchestrator.toml").write_text("MAX_RUNS = 30\n")
    with pytest.raises(ConfigError) as err:
        load_settings({})
    assert one_line(err) == "max_runs must be at most 10 (from orchestrator.toml)"


def test_one_setting_spelled_twice_in_the_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "orchestrator.toml").write_text('max_runs = 3\nMAX_RUNS = 7\n')
    with pytest.raises(ConfigError) as err:
        load_settings({})
    assert one_line(err) == "orchestrator.toml sets max_runs twice ('max_runs' and 'MAX_RUNS')"
