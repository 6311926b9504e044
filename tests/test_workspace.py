"""The session folder as a git repository, with real git in temporary folders."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from orchestrator.workspace import GitError, Workspace

BIG = 2 * (1 << 20)


@pytest.fixture(autouse=True)
def bare_git_environment(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Like a fresh CI box: an empty HOME, no global or system git identity, no GIT_* variables."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home / ".config"))
    for name in list(os.environ):
        if name.startswith("GIT_") or name in ("EMAIL",):
            monkeypatch.delenv(name)


def git(root: Path, *args: str) -> str:
    """Plain git as a user would run it in the session folder (system/global config ignored)."""
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull}
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True, env=env
    ).stdout


def session(tmp_path: Path) -> Path:
    root = tmp_path / "session"
    (root / "run_0").mkdir(parents=True)
    (root / "experiment.py").write_text("lr = 0.1\nprint(lr)\n")
    (root / "notes.txt").write_text("notes\n")
    (root / "run_0" / "final_info.json").write_text('{"loss": 1.0}\n')
    (root / ".orchestrator").mkdir()
    (root / ".orchestrator" / "journal.jsonl").write_text("{}\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "x.pyc").write_bytes(b"\0")
    return root


def test_init_commits_template_files_without_any_global_identity(tmp_path: Path) -> None:
    root = session(tmp_path)
    (root / "weights.bin").write_bytes(b"\1" * BIG)
    ws = Workspace.init(root)
    tracked = git(root, "ls-files").split()
    assert sorted(tracked) == [".gitignore", "experiment.py", "notes.txt", "run_0/final_info.json"]
    assert ws.large_files() == ["weights.bin"]
    assert (root / "weights.bin").stat().st_size == BIG  # left on disk, untracked
    assert git(root, "rev-parse", "--abbrev-ref", "HEAD").strip() == "main"
    assert git(root, "log", "-1", "--format=%an <%ae>|%s").strip() == (
        "orchestrator <orchestrator@localhost>|session start: template files"
    )
    assert [c.subject for c in ws.log()] == ["session start: template files"]
    assert ws.head() == git(root, "rev-parse", "HEAD").strip()
    assert not ws.is_dirty()


def test_init_is_idempotent_and_keeps_an_existing_gitignore(tmp_path: Path) -> None:
    root = session(tmp_path)
    (root / ".gitignore").write_text("*.ckpt")  # no trailing newline
    first = Workspace.init(root).head()
    again = Workspace.init(root)
    assert again.head() == first
    assert len(again.log()) == 1
    lines = (root / ".gitignore").read_text().splitlines()
    assert lines[0] == "*.ckpt"
    assert {".orchestrator/", ".act_cache/", "__pycache__/"} <= set(lines)


def test_init_inside_another_repository_leaves_the_outer_one_alone(tmp_path: Path) -> None:
    outer = tmp_path / "project"
    outer.mkdir()
    git(outer, "init", "-q")
    (outer / "README").write_text("outer\n")
    root = outer / "experiments" / "s1"
    root.mkdir(parents=True)
    (root / "experiment.py").write_text("x = 1\n")
    ws = Workspace.init(root)
    assert git(root, "ls-files").split() == [".gitignore", "experiment.py"]
    assert git(outer, "ls-files") == ""
    assert "experiments/" in git(outer, "status", "--porcelain")  # nested repo, outer index untouched
    assert ws.root == root.resolve()


def test_open_refuses_a_folder_that_is_not_a_repository(tmp_path: Path) -> None:
    outer = tmp_path / "project"
    (outer / "sub").mkdir(parents=True)
    git(outer, "init", "-q")
    with pytest.raises(GitError, match="not a session folder"):
        Workspace.open(outer / "sub")  # inside a repository, but not one itself
    with pytest.raises(GitError, match="not a folder"):
        Workspace.open(tmp_path / "missing")


def test_orchestrator_folder_is_never_committed(tmp_path: Path) -> None:
    root = session(tmp_path)
    ws = Workspace.init(root)
    (root / ".orchestrator" / "session.json").write_text("{}\n")
    (root / "experiment.py").write_text("lr = 0.2\n")
    ws.commit("run 1 attempt 1: lower lr")
    every_file_ever = git(root, "log", "--all", "--name-only", "--format=")
    assert ".orchestrator" not in every_file_ever and "__pycache__" not in every_file_ever
    assert "experiment.py" in every_file_ever


def test_large_file_in_a_run_is_reported_never_committed_and_not_dirty(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    run = ws.root / "run_1"
    run.mkdir()
    (run / "final_info.json").write_text('{"loss": 0.5}\n')
    (run / "stdout.log").write_text("step 1\n")
    (run / "model.pt").write_bytes(b"\0" * BIG)
    sha, untracked, problem = ws.commit_run("run_1", "run 1: results (ok)")
    assert untracked == ["run_1/model.pt"] and problem == ""
    assert sorted(git(ws.root, "ls-tree", "-r", "--name-only", sha, "run_1").split()) == [
        "run_1/final_info.json",
        "run_1/stdout.log",
    ]
    assert not ws.is_dirty()
    assert (run / "model.pt").exists()
    # committing everything later still leaves it out, and says so again
    assert ws.commit("all") == sha
    assert ws.commit_run("run_1", "again") == (sha, ["run_1/model.pt"], "")
    assert "model.pt" not in git(ws.root, "log", "--all", "--name-only", "--format=")
    # a reset keeps it on disk
    ws.reset_hard(sha)
    assert (run / "model.pt").stat().st_size == BIG


def test_a_file_that_shrinks_below_the_limit_is_committed_again(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    (ws.root / "run_1").mkdir()
    (ws.root / "run_1" / "out.npy").write_bytes(b"\0" * BIG)
    ws.commit_run("run_1", "run 1")
    (ws.root / "run_1" / "out.npy").write_bytes(b"small")
    assert ws.is_dirty()
    sha, untracked, _ = ws.commit_run("run_1", "run 1 again")
    assert untracked == []
    assert ws.show(sha, "run_1/out.npy") == "small"


def test_a_tracked_file_that_grows_too_large_leaves_the_repository(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    (ws.root / "notes.txt").write_bytes(b"n" * BIG)
    sha = ws.commit("notes grew")
    assert ws.show(sha, "notes.txt") is None
    assert ws.large_files() == ["notes.txt"]
    assert (ws.root / "notes.txt").stat().st_size == BIG
    assert not ws.is_dirty()


def test_commit_with_nothing_changed_makes_no_commit(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    head = ws.head()
    assert ws.commit("nothing") == head
    assert ws.commit("nothing", paths=["experiment.py"]) == head
    assert len(ws.log()) == 1


def test_commit_of_given_paths_leaves_other_changes_uncommitted(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    (ws.root / "experiment.py").write_text("lr = 0.3\n")
    (ws.root / "notes.txt").write_text("changed notes\n")
    sha = ws.commit("only the code", paths=["experiment.py"])
    assert ws.changed_files("HEAD~1", sha) == ["experiment.py"]
    assert ws.is_dirty(["notes.txt"]) and not ws.is_dirty(["experiment.py"])


def test_messages_and_paths_from_the_model_are_never_options_or_shell(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    canary = tmp_path / "canary"
    odd = "--amend; touch $(echo " + str(canary) + ") `touch " + str(canary) + "`"
    (ws.root / "-rf *.py").write_text("odd name\n")
    (ws.root / "experiment.py").write_text("lr = 0.4\n")
    sha = ws.commit(f"-m {odd}\n\nbody line \"quoted\" 'single' $HOME", paths=["experiment.py", "-rf *.py"])
    assert ws.log()[0].subject == f"-m {odd}"
    assert git(ws.root, "log", "-1", "--format=%B", sha).startswith(
        f"-m {odd}\n\nbody line \"quoted\" 'single' $HOME"
    )
    assert sorted(ws.changed_files("HEAD~1", sha)) == ["-rf *.py", "experiment.py"]
    assert len(ws.log()) == 2  # --amend was not taken as an option
    ws.tag("run_1", sha, "--force -d run_0 $(reboot)")
    assert ws.tags()["run_1"] == sha
    assert not canary.exists()
    with pytest.raises(GitError, match="not a valid tag name"):
        ws.tag("-d", sha)
    assert ws.resolve("--all") is None


def test_paths_are_literal_not_globs(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    (ws.root / "[ab].txt").write_text("odd\n")
    (ws.root / "a.txt").write_text("plain\n")
    assert ws.commit("nothing named *.txt", paths=["*.txt"]) == ws.head()
    assert ws.is_dirty(["[ab].txt"])
    sha = ws.commit("only the odd one", paths=["[ab].txt"])
    assert ws.changed_files("HEAD~1", sha) == ["[ab].txt"]
    assert ws.is_dirty(["a.txt"])
    (ws.root / "[ab].txt").unlink()  # a deleted file's name is not a pattern either
    sha = ws.commit("remove the odd one", paths=["[ab].txt"])
    assert ws.changed_files("HEAD~1", sha) == ["[ab].txt"]
    assert ws.show(sha, "a.txt") is None


def test_tags_lightweight_annotated_same_and_moved(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    first = ws.head()
    ws.tag("run_0", first)
    (ws.root / "experiment.py").write_text("lr = 0.5\n")
    second = ws.commit("run 1 attempt 1: change lr")
    ws.tag("run_1", second, "run 1")
    assert ws.tags() == {"run_0": first, "run_1": second}
    tag_object = git(ws.root, "rev-parse", "refs/tags/run_1").strip()
    ws.tag("run_1", second, "run 1, journaled again after a crash")
    assert git(ws.root, "rev-parse", "refs/tags/run_1").strip() == tag_object  # untouched
    ws.tag("run_1", first, "run 1 redone")
    assert ws.tags()["run_1"] == first
    assert ws.resolve("run_1") == first and ws.resolve("no_such_tag") is None
    with pytest.raises(GitError, match="is not a commit"):
        ws.tag("run_2", "0" * 40)


def test_diff_show_and_changed_files(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    base = ws.head()
    (ws.root / "experiment.py").write_text("lr = 0.01\nprint(lr)\n")
    (ws.root / "run_1").mkdir()
    (ws.root / "run_1" / "final_info.json").write_text('{"loss": 0.4}\n')
    new = ws.commit("lower lr")
    text = ws.diff(base, new)
    assert "-lr = 0.1\n+lr = 0.01\n" in text
    assert "--- a/experiment.py\n+++ b/experiment.py" in text
    code_only = ws.diff(base, new, paths=[".", ":(exclude)run_*"])
    assert "experiment.py" in code_only and "run_1" not in code_only
    assert ws.diff(base, new, paths=["notes.txt"]) == ""
    assert "@@ -1,2 +1,2 @@" in ws.diff(base, new, context=5)
    assert "+lr = 0.1\n" in ws.diff(None, base)  # from nothing: the whole first checkpoint
    assert ws.changed_files(base, new) == ["experiment.py", "run_1/final_info.json"]
    assert ws.show(base, "experiment.py") == "lr = 0.1\nprint(lr)\n"
    assert ws.show(new, "missing.py") is None
    assert ws.show(new, "run_1") is None  # a folder is not a file
    with pytest.raises(GitError):
        ws.show("no_such_ref", "experiment.py")


def test_reset_hard_restores_a_crashed_half_edit_and_keeps_run_folders(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    head = ws.head()
    (ws.root / "experiment.py").write_text("lr = 0.1\nprint(l")  # half written
    (ws.root / "helper.py").write_text("new file from a half-applied edit\n")
    (ws.root / "notes.txt").unlink()
    (ws.root / "run_1").mkdir()
    (ws.root / "run_1" / "stdout.log").write_text("partial run output\n")
    (ws.root / ".orchestrator" / "journal.jsonl").write_text('{"kind": "x"}\n')
    (ws.root / "data").mkdir()
    (ws.root / "data" / "train.bin").write_bytes(b"\0" * BIG)  # downloaded since the last checkpoint
    assert ws.is_dirty()
    ws.reset_hard(head)
    assert (ws.root / "experiment.py").read_text() == "lr = 0.1\nprint(lr)\n"
    assert (ws.root / "notes.txt").read_text() == "notes\n"
    assert (ws.root / "helper.py").exists()  # untracked: never deleted (the loop removes editable files itself)
    assert (ws.root / "run_1" / "stdout.log").exists()  # run folders are the loop's business
    assert (ws.root / ".orchestrator" / "journal.jsonl").read_text() == '{"kind": "x"}\n'
    assert (ws.root / "data" / "train.bin").stat().st_size == BIG
    assert ws.head() == head
    assert not ws.is_dirty(["experiment.py", "notes.txt", "data"])


def test_reset_hard_never_deletes_or_overwrites_untracked_files(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    first = ws.head()
    (ws.root / "notes.txt").write_bytes(b"n" * BIG)  # an editable file over the size limit
    (ws.root / "experiment.py").write_text("lr = 0.2\n")
    second = ws.commit("attempt 1: lr 0.2 and long notes")
    assert ws.large_files() == ["notes.txt"]
    (ws.root / "cache").mkdir()
    (ws.root / "cache" / "tokens.pkl").write_bytes(b"cached by the experiment")  # written since the last commit
    (ws.root / "experiment.py").write_text("lr = 0.2\nprint(l")  # a crashed half edit
    kept = ws.reset_hard(second)
    assert (ws.root / "experiment.py").read_text() == "lr = 0.2\n"
    assert (ws.root / "cache" / "tokens.pkl").read_bytes() == b"cached by the experiment"
    assert (ws.root / "notes.txt").stat().st_size == BIG
    assert kept == []
    # back to a checkpoint where notes.txt was small and tracked: the long notes still are not overwritten
    kept = ws.reset_hard(first)
    assert kept == ["notes.txt"]
    assert (ws.root / "notes.txt").stat().st_size == BIG
    assert (ws.root / "experiment.py").read_text() == "lr = 0.1\nprint(lr)\n"
    assert (ws.root / "cache" / "tokens.pkl").exists()
    assert ws.head() == first
    assert ws.large_files() == ["notes.txt"] and ws.commit("after reset") != first
    assert ws.show("HEAD", "notes.txt") is None  # committing again leaves it out, as for any file that grew


def test_reset_hard_removes_files_tracked_only_at_the_old_checkpoint(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    first = ws.head()
    (ws.root / "lib").mkdir()
    (ws.root / "lib" / "helper.py").write_text("x = 1\n")
    ws.commit("attempt 1: add a helper")
    assert ws.reset_hard(first) == []
    assert not (ws.root / "lib").exists()  # it is in the history, nothing is lost
    assert not ws.is_dirty()


def test_restore_leaves_a_file_over_the_size_limit_alone(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    first = ws.head()
    (ws.root / "notes.txt").write_bytes(b"n" * BIG)
    (ws.root / "experiment.py").write_text("broken(\n")
    assert ws.restore(first, ["experiment.py", "notes.txt"]) == ["notes.txt"]
    assert (ws.root / "experiment.py").read_text() == "lr = 0.1\nprint(lr)\n"
    assert (ws.root / "notes.txt").stat().st_size == BIG


def test_restore_with_remove_absent_removes_new_files_but_never_large_ones(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    first = ws.head()
    (ws.root / "notes.txt").write_bytes(b"n" * BIG)
    ws.commit("notes grew")  # notes.txt leaves the repository: absent at HEAD, still on disk
    (ws.root / "lib").mkdir()
    (ws.root / "lib" / "helper.py").write_text("new file of a half-applied edit\n")
    (ws.root / "experiment.py").write_text("broken(\n")
    paths = ["experiment.py", "lib/helper.py", "notes.txt"]
    with pytest.raises(GitError):
        ws.restore("HEAD", paths)  # without remove_absent, a file absent at the ref is an error
    assert ws.restore("HEAD", paths, remove_absent=True) == ["notes.txt"]
    assert (ws.root / "experiment.py").read_text() == "lr = 0.1\nprint(lr)\n"
    assert not (ws.root / "lib").exists()
    assert (ws.root / "notes.txt").stat().st_size == BIG
    assert ws.restore(first, ["notes.txt"]) == ["notes.txt"]
    assert (ws.root / "notes.txt").stat().st_size == BIG


def test_commit_run_leaves_out_a_nested_repository_and_says_so(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    run = ws.root / "run_1"
    (run / "src").mkdir(parents=True)
    (run / "final_info.json").write_text('{"loss": 0.5}\n')
    git(run / "src", "init", "-q")  # cloned by the experiment, never committed in it
    (run / "src" / "data.txt").write_text("d\n")
    result = ws.commit_run("run_1", "run 1: results (ok)")
    assert git(ws.root, "ls-tree", "-r", "--name-only", result.sha, "run_1").split() == ["run_1/final_info.json"]
    assert result.problem == "run_1/src is a nested git repository: its files are not committed"
    assert ws.commit("everything else") == result.sha  # a plain commit leaves it out too, and does not fail


def test_commit_run_commits_a_run_folder_the_template_ignores(tmp_path: Path) -> None:
    root = session(tmp_path)
    (root / ".gitignore").write_text("run_*/\n*.log\n")
    ws = Workspace.init(root)
    run = ws.root / "run_1"
    run.mkdir()
    (run / "final_info.json").write_text('{"loss": 0.5}\n')
    (run / "stdout.log").write_text("step 1\n")
    (run / "stderr.log").write_text("")
    (run / "model.pt").write_bytes(b"\0" * BIG)
    (run / "__pycache__").mkdir()
    (run / "__pycache__" / "m.pyc").write_bytes(b"\0")
    result = ws.commit_run("run_1", "run 1: results (ok)")
    assert result.sha != ws.log()[-1].sha and result.sha == ws.head()
    assert sorted(git(ws.root, "ls-tree", "-r", "--name-only", result.sha, "run_1").split()) == [
        "run_1/final_info.json", "run_1/stderr.log", "run_1/stdout.log"]
    assert result.untracked == ["run_1/model.pt"]
    assert result.problem == ""
    (run / "stdout.log").write_text("step 1\nstep 2\n")  # tracked now: later changes are seen
    again = ws.commit_run("run_1", "run 1 again")
    assert ws.show(again.sha, "run_1/stdout.log") == "step 1\nstep 2\n"


def test_commit_run_says_why_nothing_was_committed(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    head = ws.head()
    result = ws.commit_run("run_7", "run 7: results (error)")
    assert result.sha == head and result.untracked == []
    assert result.problem == "run_7 does not exist"
    (ws.root / "run_7").mkdir()
    (ws.root / "run_7" / "weights.bin").write_bytes(b"\1" * BIG)
    result = ws.commit_run("run_7", "run 7: results (error)")
    assert result.sha == head and result.untracked == ["run_7/weights.bin"]
    assert result.problem == "run_7 holds no file under the size limit to commit"


def test_env_files_written_into_the_session_are_never_committed(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    (ws.root / ".env").write_text("OPENAI_API_KEY=sk-fake-never-committed\n")
    (ws.root / "run_1").mkdir()
    (ws.root / "run_1" / ".env.run").write_text("HF_TOKEN=sk-fake-never-committed\n")
    (ws.root / "run_1" / "final_info.json").write_text('{"loss": 1.0}\n')
    (ws.root / "experiment.py").write_text("lr = 0.3\n")
    ws.commit("everything")
    ws.commit_run("run_1", "run 1")
    assert "sk-fake-never-committed" not in git(ws.root, "log", "-p", "--all")
    assert "run_1/final_info.json" in git(ws.root, "ls-files")


def test_restore_puts_files_back_from_an_earlier_checkpoint(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    ws.tag("run_0", ws.head())
    (ws.root / "experiment.py").write_text("broken(\n")
    (ws.root / "notes.txt").write_text("edited\n")
    ws.commit("run 1 attempt 4: broken")
    ws.restore("run_0", ["experiment.py"])
    assert (ws.root / "experiment.py").read_text() == "lr = 0.1\nprint(lr)\n"
    assert (ws.root / "notes.txt").read_text() == "edited\n"
    sha = ws.commit("run 1: restore code to run_0", paths=["experiment.py"])
    assert ws.changed_files("run_0", sha) == ["notes.txt"]


def test_log_lists_newest_first_with_times(tmp_path: Path) -> None:
    ws = Workspace.init(session(tmp_path))
    for i in range(3):
        (ws.root / "experiment.py").write_text(f"lr = {i}\n")
        ws.commit(f"step {i}")
    log = ws.log()
    assert [c.subject for c in log] == ["step 2", "step 1", "step 0", "session start: template files"]
    assert all(len(c.sha) == 40 and c.time > 1e9 for c in log)
    assert len(ws.log(max_count=2)) == 2
    assert ws.log("no_such_ref") == []


def test_a_temp_file_left_by_a_crash_mid_write_is_never_committed(tmp_path: Path) -> None:
    from orchestrator.atomic import write_temp_beside

    ws = Workspace.init(session(tmp_path))
    run = ws.root / "run_0"
    run.mkdir(exist_ok=True)
    (run / "final_info.json").write_text('{"loss": 0.5}\n')
    left = write_temp_beside(run / "experiment.sha256", b"abc\n")  # killed before the rename
    result = ws.commit_run("run_0", "run 0: results (ok)")
    tracked = git(ws.root, "ls-tree", "-r", "--name-only", result.sha).split()
    assert "run_0/final_info.json" in tracked and left.name not in " ".join(tracked)
    assert left.exists()  # never deleted either: it is only kept out of git


def test_a_new_session_folder_has_the_identity_for_git_commands_run_by_hand(tmp_path: Path) -> None:
    """No global identity here (see bare_git_environment): a user's own `git commit` in the folder works, as the
    orchestrator, and the identity is no key that `config_problems` would call foreign."""
    root = session(tmp_path)
    ws = Workspace.init(root)
    assert git(root, "config", "user.name").strip() == "orchestrator"
    assert git(root, "config", "user.email").strip() == "orchestrator@localhost"
    assert ws.config_problems() == []
    (root / "notes.txt").write_text("notes by hand\n")
    git(root, "commit", "-q", "-a", "-m", "by hand")
    assert git(root, "log", "-1", "--format=%an <%ae>|%cn <%ce>|%s").strip() == (
        "orchestrator <orchestrator@localhost>|orchestrator <orchestrator@localhost>|by hand"
    )
    assert [c.subject for c in ws.log()] == ["by hand", "session start: template files"]


def test_init_again_after_a_crash_before_the_first_commit_writes_the_identity_once(tmp_path: Path) -> None:
    root = session(tmp_path)
    ws = Workspace.init(root)
    Workspace.init(root)  # a second init of a whole folder
    assert git(root, "config", "--get-all", "user.name").splitlines() == ["orchestrator"]
    assert len(ws.log()) == 1
    (root / ".git" / "refs" / "heads" / "main").unlink()  # as if killed between `git init` and the first commit
    assert ws.resolve("HEAD") is None
    again = Workspace.init(root)
    assert [c.subject for c in again.log()] == ["session start: template files"]
    assert sorted(git(root, "ls-files").split()) == [".gitignore", "experiment.py", "notes.txt",
                                                    "run_0/final_info.json"]
    assert git(root, "config", "--get-all", "user.name").splitlines() == ["orchestrator"]
    assert git(root, "config", "--get-all", "user.email").splitlines() == ["orchestrator@localhost"]
    assert again.config_problems() == []
    assert not again.is_dirty()


# --------------------------------------------------------------------------------------------------- atomic writes


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_an_atomic_write_gives_a_new_file_the_mode_a_plain_write_gives(tmp_path: Path) -> None:
    from orchestrator.atomic import write_bytes_atomic, write_text_atomic

    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what open() makes under this process's umask
    usual = plain.stat().st_mode & 0o7777
    assert usual == 0o666 & ~current_umask()
    write_text_atomic(tmp_path / "a.json", "{}\n")
    write_bytes_atomic(tmp_path / "b.bin", b"\0\1")
    assert (tmp_path / "a.json").read_text() == "{}\n" and (tmp_path / "b.bin").read_bytes() == b"\0\1"
    assert (tmp_path / "a.json").stat().st_mode & 0o7777 == usual
    assert (tmp_path / "b.bin").stat().st_mode & 0o7777 == usual
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "plain.txt"]  # no temp file left


@pytest.mark.parametrize("mode", [0o600, 0o755, 0o640])
def test_an_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path: Path, mode: int) -> None:
    from orchestrator.atomic import write_bytes_atomic, write_text_atomic

    target = tmp_path / "run.sh"
    target.write_text("old\n")
    target.chmod(mode)
    write_text_atomic(target, "new\n")
    assert target.read_text() == "new\n" and target.stat().st_mode & 0o7777 == mode
    write_bytes_atomic(target, b"newer\n", durable=False)
    assert target.read_bytes() == b"newer\n" and target.stat().st_mode & 0o7777 == mode
    assert [p.name for p in tmp_path.iterdir()] == ["run.sh"]


@pytest.mark.parametrize("dangling", [False, True])
def test_an_atomic_write_replaces_a_planted_link_and_never_writes_through_it(tmp_path: Path, dangling: bool) -> None:
    from orchestrator.atomic import write_text_atomic

    folder = tmp_path / "session"
    folder.mkdir()
    victim = tmp_path / "victim.txt"
    if not dangling:
        victim.write_text("the user's own file\n")
    target = folder / "session.json"
    target.symlink_to(victim)
    write_text_atomic(target, "{}\n")
    assert not target.is_symlink() and target.is_file() and target.read_text() == "{}\n"
    if dangling:
        assert not victim.exists()
    else:
        assert victim.read_text() == "the user's own file\n"
    assert [p.name for p in folder.iterdir()] == ["session.json"]


def test_a_temp_file_is_named_for_its_target_and_lies_beside_it(tmp_path: Path) -> None:
    from orchestrator.atomic import TEMP_SUFFIX, write_temp_beside

    target = tmp_path / "deep" / "er" / "final_info.json"  # folders that do not exist yet are made
    first = write_temp_beside(target, b"one")
    second = write_temp_beside(target, b"two", durable=False)
    assert first != second  # a temp file left behind is never reused nor overwritten
    for tmp, data in ((first, b"one"), (second, b"two")):
        assert tmp.parent == target.parent
        assert tmp.name.startswith(".final_info.json.") and tmp.name.endswith(TEMP_SUFFIX) and TEMP_SUFFIX == ".orch-tmp"
        assert len(tmp.name) > len(".final_info.json..orch-tmp")  # something random between them
        assert tmp.read_bytes() == data and tmp.stat().st_mode & 0o7777 == 0o666 & ~current_umask()
    assert not target.exists()  # the caller renames it into place
    os.replace(second, target)
    assert target.read_bytes() == b"two" and sorted(p.name for p in target.parent.iterdir()) == sorted(
        [first.name, "final_info.json"])


def test_an_atomic_write_into_a_missing_folder_makes_it(tmp_path: Path) -> None:
    from orchestrator.atomic import write_text_atomic

    target = tmp_path / "sessions" / "s1" / ".orchestrator" / "settings.json"
    write_text_atomic(target, "model = 'x'\n")
    assert target.read_text() == "model = 'x'\n"
    assert [p.name for p in target.parent.iterdir()] == ["settings.json"]
