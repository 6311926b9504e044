"""What the command line says about itself and about mistakes: --version, --help, one-line errors, honest rows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.cli import DEFAULT_MODEL
from orchestrator.config import Settings
from tests.report_helpers import completed_session
from tests.session_helpers import REPO, orchestrator, status_json


def one_error_line(res) -> str:
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    return lines[0]


def test_version():
    from orchestrator import __version__

    res = orchestrator("--version")
    assert res.returncode == 0 and res.stdout.strip() == f"orchestrator {__version__}"


def test_launch_help_names_the_default_model_and_where_settings_come_from():
    assert Settings.model_fields["model"].default == DEFAULT_MODEL
    res = orchestrator("launch", "--help", env={"COLUMNS": "200"})
    text = " ".join(res.stdout.replace("│", " ").split())
    assert res.returncode == 0
    assert f"(default: {DEFAULT_MODEL})" in text
    assert "orchestrator.toml" in text and "ORCH_MODEL" in text and "ORCH_*" in text and "[env]" in text


def test_list_of_a_missing_folder_is_an_error(tmp_path):
    assert "does not exist" in one_error_line(orchestrator("list", str(tmp_path / "nowhere")))
    (tmp_path / "file").write_text("x")
    assert "not a folder" in one_error_line(orchestrator("list", str(tmp_path / "file")))
    res = orchestrator("list", str(tmp_path))
    assert res.returncode == 0 and "No sessions" in res.stdout


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return completed_session(tmp_path_factory.mktemp("messages") / "completed")


def test_report_to_a_missing_folder_is_an_error_and_makes_no_folders(session, tmp_path):
    target = tmp_path / "missing" / "dir" / "x.html"
    assert "does not exist" in one_error_line(orchestrator("report", str(session), "-o", str(target)))
    assert not (tmp_path / "missing").exists()


def test_a_session_closed_with_all_completed_has_no_pending_run(session):
    state = status_json(session)
    assert state["session"]["status"] == "completed"
    assert {r["status"] for r in state["runs"]} <= {"ok", "failed"}
    assert sum(r["calls"] for r in state["runs"]) < state["session"]["totals"]["calls"]  # the closing reply
    res = orchestrator("report", str(session), "-o", str(session / "r.html"))
    assert res.returncode == 0, res.stderr
    html = (session / "r.html").read_text()
    assert "not run" not in html and not re.search(r">\s*pending\s*<", html)


def test_the_sae_explained_variance_figure_is_titled_for_both_conditions():
    text = (REPO / "templates" / "sae" / "plot.py").read_text()
    title = re.search(r'"explained_variance.png": \("([^"]+)"\s*"([^"]*)"', text)
    assert title and "contaminated" in title.group(1) + title.group(2)
