"""Templates as users make them: AI-Scientist folders unchanged, ours with template.toml, found by name or path."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from orchestrator.template import (
    TemplateError,
    baseline_reusable,
    builtin_templates_dir,
    copy_template,
    file_hash,
    find_template,
    list_templates,
    load_template,
    record_baseline_hash,
)
from orchestrator.workspace import Workspace

EXPERIMENT = """\
import argparse, json, os
p = argparse.ArgumentParser()
p.add_argument("--out_dir", default="run_0")
a = p.parse_args()
os.makedirs(a.out_dir, exist_ok=True)
json.dump({"toy": {"means": {"loss": 1.0}}}, open(os.path.join(a.out_dir, "final_info.json"), "w"))
"""


def make_ai_scientist_template(folder: Path) -> Path:
    """The layout AI-Scientist templates have: no template.toml, baseline results without a hash."""
    folder.mkdir(parents=True)
    (folder / "experiment.py").write_text(EXPERIMENT)
    (folder / "plot.py").write_text("print('plot')\n")
    (folder / "prompt.json").write_text(
        json.dumps(
            {
                "system": "You are an ambitious AI researcher.",
                "task_description": "Train a toy model.\nMore details here.",
            }
        )
    )
    (folder / "run_0").mkdir()
    (folder / "run_0" / "final_info.json").write_text(json.dumps({"toy": {"means": {"loss": 1.0}}}))
    (folder / "seed_ideas.json").write_text(json.dumps([{"Name": "a", "Title": "A", "Experiment": "e"}]))
    (folder / "ideas").mkdir()
    (folder / "ideas" / "more.json").write_text("[]")
    (folder / "ideas" / "extra.yaml").write_text("[]")
    (folder / "ideas" / "README.md").write_text("not an idea file")
    return folder


def make_template(folder: Path, toml: str = "") -> Path:
    folder.mkdir(parents=True)
    (folder / "experiment.py").write_text(EXPERIMENT)
    if toml:
        (folder / "template.toml").write_text(toml)
    return folder


def one_line(err: pytest.ExceptionInfo[TemplateError]) -> str:
    text = str(err.value)
    assert "\n" not in text and text
    return text


# ------------------------------------------------------------------------------------------------ loading


def test_ai_scientist_template_loads_unchanged(tmp_path: Path) -> None:
    t = load_template(make_ai_scientist_template(tmp_path / "toy"))
    assert t.name == "toy" and t.path == (tmp_path / "toy").resolve()
    assert t.has_plot
    assert t.system_prompt == "You are an ambitious AI researcher."
    assert t.task_description.startswith("Train a toy model.")
    assert t.description == "Train a toy model."
    assert t.editable == ["experiment.py", "plot.py", "notes.txt"] and t.protected == []
    assert [p.name for p in t.ideas()] == ["seed_ideas.json", "extra.yaml", "more.json"]
    # No recorded hash: the baseline was made by code we cannot vouch for, so it is run first.
    assert not baseline_reusable(t)


def test_template_toml_settings(tmp_path: Path) -> None:
    folder = make_template(
        tmp_path / "ours",
        """
description = "A small template"
editable = ["experiment.py", "lib/*.py"]
protected = ["lib/data.py"]
timeout_s = 90
env = ["HF_TOKEN_PATH", "MY_DATA"]
exclude = ["data", "*.ckpt"]
key_metrics = ["eval.loss", "eval.acc"]

[metrics]
"eval.loss" = "lower"
"eval.*" = "higher"
"*.loss" = "lower"
""",
    )
    t = load_template(folder)
    assert t.description == "A small template" and t.timeout_s == 90 and not t.has_plot
    assert t.env == ["HF_TOKEN_PATH", "MY_DATA"] and t.key_metrics == ["eval.loss", "eval.acc"]
    assert t.direction("eval.loss") == "lower"  # exact name beats the earlier-matching glob
    assert t.direction("eval.acc") == "higher"  # first glob in file order
    assert t.direction("train.loss") == "lower"
    assert t.direction("speed") is None
    assert t.is_editable("experiment.py") and t.is_editable("lib/model.py")
    assert not t.is_editable("lib/data.py")  # protected wins over editable
    assert not t.is_editable("plot.py") and not t.is_editable("../experiment.py")


def test_editable_files_lists_what_exists(tmp_path: Path) -> None:
    folder = make_template(tmp_path / "t", 'editable = ["experiment.py", "plot.py", "lib/*.py"]\n')
    (folder / "lib").mkdir()
    (folder / "lib" / "model.py").write_text("x = 1\n")
    (folder / "lib" / "notes.md").write_text("")
    assert load_template(folder).editable_files() == ["experiment.py", "lib/model.py"]


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('editabel = ["x.py"]\n', "unknown key 'editabel'"),
        ('[metrics]\nloss = "smaller"\n', "metrics.loss must be 'higher' or 'lower'"),
        ("timeout_s = -5\n", "timeout_s"),
        ('timeout_s = "soon"\n', "timeout_s"),
        ('env = ["NOT A NAME"]\n', "not an environment variable name"),
        ('editable = ["../outside.py"]\n', "relative to the template folder"),
        ('description = "unclosed\n', "invalid TOML"),
    ],
)
def test_invalid_template_toml_names_the_key(tmp_path: Path, toml: str, expected: str) -> None:
    folder = make_template(tmp_path / "t", toml)
    with pytest.raises(TemplateError) as err:
        load_template(folder)
    msg = one_line(err)
    assert "template.toml" in msg and expected in msg


def test_invalid_prompt_json(tmp_path: Path) -> None:
    folder = make_template(tmp_path / "t")
    (folder / "prompt.json").write_text('{\n"system": "x",\n}')
    with pytest.raises(TemplateError) as err:
        load_template(folder)
    assert "prompt.json" in one_line(err) and "line 3" in str(err.value)


def test_folder_without_experiment_py(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(TemplateError) as err:
        load_template(tmp_path / "empty")
    assert "has no experiment.py" in one_line(err)
    with pytest.raises(TemplateError) as err:
        find_template("empty", [tmp_path])
    assert "has no experiment.py" in one_line(err)


# ------------------------------------------------------------------------------------------------ finding


def test_find_by_name_in_search_dirs_then_by_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    make_template(first / "toy", 'description = "first"\n')
    make_template(second / "toy", 'description = "second"\n')
    make_template(second / "other")
    assert find_template("toy", [first, second]).description == "first"
    assert find_template("other", [first, second]).path == (second / "other").resolve()
    assert find_template(str(second / "toy")).description == "second"  # absolute path
    monkeypatch.chdir(tmp_path)
    assert find_template("second/toy").description == "second"  # relative path
    assert find_template("./first/toy").description == "first"


def test_unknown_template_lists_the_available_names(tmp_path: Path) -> None:
    make_template(tmp_path / "alpha")
    make_template(tmp_path / "beta")
    (tmp_path / "not_a_template").mkdir()
    with pytest.raises(TemplateError) as err:
        find_template("gamma", [tmp_path])
    msg = one_line(err)
    assert "unknown template 'gamma'" in msg and "alpha" in msg and "beta" in msg
    assert "not_a_template" not in msg


def test_missing_template_path(tmp_path: Path) -> None:
    with pytest.raises(TemplateError) as err:
        find_template(str(tmp_path / "nowhere"))
    assert "does not exist" in one_line(err)


def test_list_templates_earlier_folders_shadow_later(tmp_path: Path) -> None:
    make_template(tmp_path / "a" / "toy", 'description = "mine"\n')
    make_template(tmp_path / "b" / "toy", 'description = "theirs"\n')
    make_template(tmp_path / "b" / "zeta")
    (tmp_path / "b" / "__pycache__").mkdir()
    found = {t.name: t for t in list_templates([tmp_path / "a", tmp_path / "b"])}
    assert found["toy"].description == "mine"
    assert "zeta" in found and "__pycache__" not in found


def test_builtin_templates_dir_is_the_repository_folder_in_a_checkout() -> None:
    import orchestrator

    if (Path(orchestrator.__file__).parent / "_shipped" / "templates").is_dir():
        pytest.skip("running from an installed wheel")
    assert builtin_templates_dir() == Path(__file__).resolve().parents[1] / "templates"


def test_builtin_templates_are_found_by_name() -> None:
    names = [t.name for t in list_templates() if t.path.parent == builtin_templates_dir()]
    if not names:
        pytest.skip("no built-in templates in this checkout yet")
    for name in names:
        t = find_template(name)
        assert t.path.parent == builtin_templates_dir() and (t.path / "experiment.py").is_file()


# ------------------------------------------------------------------------------------------------ copying


def test_copy_skips_caches_history_and_old_runs(tmp_path: Path) -> None:
    src = make_ai_scientist_template(tmp_path / "toy")
    (src / "template.toml").write_text('exclude = ["data", "*.ckpt"]\n')
    subprocess.run(["git", "init", "-q", str(src)], check=True)
    for junk in ("__pycache__", ".act_cache", "run_1", "run_12", "data"):
        (src / junk).mkdir()
        (src / junk / "f.txt").write_text("junk")
    (src / "model.ckpt").write_bytes(b"\0" * 10)
    (src / "helper.pyc").write_bytes(b"\0")
    (src / "lib").mkdir()
    (src / "lib" / "util.py").write_text("y = 2\n")
    (src / "lib" / "run_3").mkdir()  # only top-level run folders are runs
    (src / "lib" / "run_3" / "keep.txt").write_text("k")
    (src / "experiment.py").chmod(0o755)
    t = load_template(src)

    dest = tmp_path / "session"
    copy_template(t, dest)
    copied = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*"))
    assert copied == [
        "experiment.py",
        "ideas",
        "ideas/README.md",
        "ideas/extra.yaml",
        "ideas/more.json",
        "lib",
        "lib/run_3",
        "lib/run_3/keep.txt",
        "lib/util.py",
        "plot.py",
        "prompt.json",
        "run_0",
        "run_0/final_info.json",
        "seed_ideas.json",
        "template.toml",
    ]
    assert (dest / "experiment.py").read_text() == EXPERIMENT
    assert os.access(dest / "experiment.py", os.X_OK)
    # The copy is a template too: same name rules, loads from its new home.
    assert load_template(dest).system_prompt == t.system_prompt


def test_copy_into_an_empty_folder_and_refuse_a_full_one(tmp_path: Path) -> None:
    t = load_template(make_template(tmp_path / "toy"))
    empty = tmp_path / "empty"
    empty.mkdir()
    copy_template(t, empty)
    assert (empty / "experiment.py").is_file()
    with pytest.raises(TemplateError) as err:
        copy_template(t, empty)
    assert "not an empty folder" in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "toy"]  # no leftovers from the refusal


def test_copy_keeps_symlinks_and_makes_outside_ones_absolute(tmp_path: Path) -> None:
    data = tmp_path / "big_data.bin"
    data.write_bytes(b"\1" * 100)
    src = make_template(tmp_path / "toy")
    (src / "data.bin").symlink_to(Path("..") / "big_data.bin")
    (src / "exp_link.py").symlink_to("experiment.py")
    dest = tmp_path / "out" / "session"
    copy_template(load_template(src), dest)
    assert (dest / "data.bin").is_symlink() and (dest / "data.bin").read_bytes() == b"\1" * 100
    assert os.readlink(dest / "exp_link.py") == "experiment.py"


def test_copy_never_takes_env_files_into_the_session_or_its_history(tmp_path: Path) -> None:
    key = "sk-FAKE-0123456789abcdef-never-copied"
    src = make_template(tmp_path / "toy")
    (src / ".env").write_text(f"OPENAI_API_KEY={key}\n")
    (src / ".env.local").write_text(f"DEEPSEEK_API_KEY={key}\n")
    (src / "lib").mkdir()
    (src / "lib" / ".env").write_text(f"HF_TOKEN={key}\n")
    (src / ".envrc.example").write_text("not a dotenv file\n")  # only .env and .env.* are skipped
    dest = tmp_path / "session"
    copy_template(load_template(src), dest)
    copied = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*"))
    assert copied == [".envrc.example", "experiment.py", "lib"]
    Workspace.init(dest)
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    history = subprocess.run(["git", "-C", str(dest), "log", "-p", "--all"], capture_output=True, text=True,
                             check=True, env=env).stdout
    assert "experiment.py" in history and key not in history


# ------------------------------------------------------------------------------------------------ baseline


def test_baseline_reused_only_when_made_by_the_same_experiment(tmp_path: Path) -> None:
    folder = make_ai_scientist_template(tmp_path / "toy")
    t = load_template(folder)
    assert not baseline_reusable(t)
    digest = record_baseline_hash(folder)
    assert digest == file_hash(folder / "experiment.py")
    assert (folder / "run_0" / "experiment.sha256").read_text().strip() == digest
    assert baseline_reusable(t)
    # A copy carries run_0 and its hash, so a session can reuse the baseline too.
    copy_template(t, tmp_path / "session")
    assert baseline_reusable(load_template(tmp_path / "session"))
    # Editing experiment.py invalidates it.
    (folder / "experiment.py").write_text(EXPERIMENT + "# changed\n")
    assert not baseline_reusable(t)


def test_baseline_not_reusable_without_valid_results(tmp_path: Path) -> None:
    folder = make_template(tmp_path / "toy")
    record_baseline_hash(folder)
    t = load_template(folder)
    assert not baseline_reusable(t)  # hash but no final_info.json
    (folder / "run_0" / "final_info.json").write_text("{ not json")
    assert not baseline_reusable(t)
    (folder / "run_0" / "final_info.json").write_text('{"loss": 1}')
    assert baseline_reusable(t)


def test_file_hash_is_sha256_of_the_bytes(tmp_path: Path) -> None:
    f = tmp_path / "x"
    f.write_bytes(b"abc")
    assert file_hash(f) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
