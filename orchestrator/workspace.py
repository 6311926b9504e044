"""The session folder as a git repository: checkpoint commits, run tags, diffs and restores.

Every operation is one plain `git` subprocess (no GitPython: it keeps `git cat-file` children alive and changes
the process's working directory). Each call is made independent of the machine and of what the experiment may
have written into the folder:

- the repository is always named explicitly (`--git-dir`, `--work-tree`), so a session folder inside another
  repository never reaches the outer one;
- system and global configuration are ignored and the identity is given on every call, so commits work on a
  machine with no git identity and whatever HOME is;
- hooks, fsmonitor, external diff drivers, textconv, signing and automatic gc are switched off, the user's
  attributes and excludes files are not read, and git's environment is an allowlist (no key or token reaches it);
- `.git/config` may hold only the keys git and this module write there: a filter, diff or merge driver, an
  include or any other key a run planted makes every call refuse with `RepositoryTampered` (filters and drivers
  cannot be switched off from the command line) until `repair_config` removes it;
- text from the model (commit and tag messages) goes through stdin, never as an option; paths are passed after
  `--` and, except for `diff`, as literal paths (no glob or pathspec magic).

Files over `MAX_FILE_BYTES` are never committed: they are listed in the repository's `info/exclude` (inside a
block this module owns), so they stay on disk untracked and are not reported as changes. A file that later
shrinks below the limit leaves the block and is committed again.

Nothing here deletes or overwrites data that is not in the history: `reset_hard` and `restore` leave untracked
files (caches and outputs the experiment wrote, files over the size limit) as they are. `.env` files are never
committed (`IGNORED`), not even from a run folder, whose other files are committed even when the template's
.gitignore ignores them.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict

from orchestrator.atomic import TEMP_SUFFIX, write_text_atomic
from orchestrator.errors import OrchestratorError

IDENTITY_NAME = "orchestrator"
IDENTITY_EMAIL = "orchestrator@localhost"
EMPTY_TREE = "4b825dc642cb6eb9a060e54bf8d69288fbee4904"  # sha1 of the empty tree
# The session's own ignore rules, written into its .gitignore; they hold even where a run folder is force-added.
IGNORED = (".orchestrator/", ".act_cache/", "__pycache__/", ".env", ".env.*", f"*{TEMP_SUFFIX}")
START_MESSAGE = "session start: template files"
GIT_TIMEOUT_S = 300.0

_CONFIG = (
    f"user.name={IDENTITY_NAME}",
    f"user.email={IDENTITY_EMAIL}",
    "core.hooksPath=/dev/null",
    "core.fsmonitor=false",
    "core.attributesFile=/dev/null",
    "core.excludesFile=/dev/null",
    "core.autocrlf=false",
    "core.safecrlf=false",
    "core.quotePath=false",
    "core.pager=cat",
    "commit.gpgSign=false",
    "tag.gpgSign=false",
    "tag.forceSignAnnotated=false",
    "gc.auto=0",
    "maintenance.auto=false",
    "diff.noprefix=false",
    "diff.mnemonicPrefix=false",
    "color.ui=false",
    "advice.detachedHead=false",
    "init.defaultBranch=main",
)

_EXCLUDE_BEGIN = "# >>> orchestrator: files over the size limit, never committed (managed automatically)"
_EXCLUDE_END = "# <<< orchestrator"


class GitError(OrchestratorError, RuntimeError):
    """A git operation failed, or the folder is not a session repository. The message is one line."""


class RepositoryTampered(GitError):
    """`.git/config` holds keys the orchestrator did not write (a filter, hook path, include ...)."""


# The keys `git init` and `Workspace.init` write; anything else in .git/config was planted.
CONFIG_KEYS = frozenset({
    "core.repositoryformatversion", "core.filemode", "core.bare", "core.logallrefupdates", "core.ignorecase",
    "core.precomposeunicode", "core.symlinks", "extensions.objectformat", "user.name", "user.email",
})
# Sections a user adds to share a session (`git remote add`, a tracking branch); the orchestrator never fetches or
# pushes, so nothing in them runs.
USER_SECTIONS = ("remote.", "branch.")
# What git may see of the environment (secrets never: a planted filter or hook would run with it).
GIT_ENV_NAMES = ("PATH", "HOME", "TMPDIR", "TZ", "SYSTEMROOT")


class RunCommit(NamedTuple):
    """What `commit_run` did."""

    sha: str  # the checkpoint holding the run folder (the current one when nothing in it changed)
    untracked: list[str]  # the run folder's files left out because they are over the size limit
    problem: str = ""  # one line when the checkpoint does not hold the run folder's files, saying why; else ""


# Models marked defer_build are built on first use: this module is imported on the way to a launch's first line.
class CommitInfo(BaseModel):
    model_config = ConfigDict(defer_build=True)
    sha: str
    subject: str
    time: float  # commit time, unix seconds


def _git_env() -> dict[str, str]:
    env = {k: os.environ[k] for k in GIT_ENV_NAMES if k in os.environ}
    env.update(
        GIT_CONFIG_NOSYSTEM="1",
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_TERMINAL_PROMPT="0",
        GIT_OPTIONAL_LOCKS="0",
        GIT_AUTHOR_NAME=IDENTITY_NAME,
        GIT_AUTHOR_EMAIL=IDENTITY_EMAIL,
        GIT_COMMITTER_NAME=IDENTITY_NAME,
        GIT_COMMITTER_EMAIL=IDENTITY_EMAIL,
        LC_ALL="C",
        LANGUAGE="C",
    )
    return env


def _one_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    # git's last "fatal:"/"error:" line is the useful one; hints come after it
    for ln in lines:
        if ln.startswith(("fatal:", "error:")):
            return ln
    return lines[-1] if lines else ""


def _literal(paths: Iterable[str]) -> list[str]:
    return [":(literal)" + os.fspath(p) for p in paths]


def _own_rules_ignore(rel: str) -> bool:
    """Whether the session's own rules (IGNORED) keep `rel` out of the repository, whatever .gitignore says."""
    parts = rel.split("/")
    for pattern in IGNORED:
        if pattern.endswith("/"):
            if pattern[:-1] in parts[:-1]:
                return True
        elif any(fnmatch.fnmatchcase(part, pattern) for part in parts):
            return True
    return False


def _escape_ignore(path: str) -> str | None:
    """An anchored .gitignore pattern that matches exactly `path`, or None if no pattern can."""
    if "\n" in path or "\r" in path:
        return None
    out = []
    for ch in path:
        if ch in "\\*?[":
            out.append("\\")
        out.append(ch)
    text = "".join(out)
    if text.endswith(" "):
        text = text[:-1] + "\\ "
    return "/" + text


def _unescape_ignore(pattern: str) -> str:
    body = pattern[1:] if pattern.startswith("/") else pattern
    out = []
    i = 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            i += 1
        out.append(body[i])
        i += 1
    return "".join(out)


class Workspace:
    """A session folder that is a git repository (see the module docstring for the rules every call follows)."""

    MAX_FILE_BYTES = 1 << 20

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.git_dir = self.root / ".git"
        self._config_seen: tuple[int, ...] | None = None  # .git/config's stat when it last passed the check

    # ------------------------------------------------------------------------------------------- open / init

    @classmethod
    def init(cls, root: Path) -> Workspace:
        """Make `root` a repository on branch main, ignore the orchestrator's own folders, and commit everything
        present as the first checkpoint. Files over the size limit stay untracked (see `large_files`).
        Safe to call again: an existing repository is opened, and finished if a crash interrupted its first
        commit; existing history is never touched."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        ws = cls(root)
        fresh = not ws.git_dir.exists()
        if fresh:
            ws._git("init", "-q", "-b", "main", cwd_only=True)
            # The identity, for git commands a user runs in the folder by hand (every call here passes it with -c).
            # Appended as text: a `git config` call per key costs a process each, on the way to a launch's first line.
            with open(ws.git_dir / "config", "a", encoding="utf-8") as fh:
                fh.write(f"[user]\n\tname = {IDENTITY_NAME}\n\temail = {IDENTITY_EMAIL}\n")
        elif not ws.git_dir.is_dir():
            raise GitError(f"{ws.root}: .git is not a directory (a worktree or submodule is not a session folder)")
        ws._ensure_gitignore()
        if fresh or ws.resolve("HEAD") is None:
            ws.commit(START_MESSAGE)
        return ws

    @classmethod
    def open(cls, root: Path) -> Workspace:
        """Open an existing session repository; GitError if `root` is not one."""
        ws = cls(root)
        if not ws.root.is_dir():
            raise GitError(f"{ws.root}: not a folder")
        if not (ws.git_dir / "HEAD").is_file():
            raise GitError(f"{ws.root}: not a session folder (no git repository in it)")
        ws._git("rev-parse", "--git-dir", reads_only=True)
        return ws

    def _ensure_gitignore(self) -> None:
        path = self.root / ".gitignore"
        text = path.read_text(encoding="utf-8", errors="surrogateescape") if path.exists() else ""
        present = {ln.strip() for ln in text.splitlines()}
        missing = [p for p in IGNORED if p not in present and "/" + p not in present]
        if not missing:
            return
        if text and not text.endswith("\n"):
            text += "\n"
        write_text_atomic(path, text + "".join(p + "\n" for p in missing))

    # ------------------------------------------------------------------------------------------- plumbing

    def config_problems(self) -> list[str]:
        """Keys in .git/config that the orchestrator did not write (sorted); [] for a clean repository."""
        path = self.git_dir / "config"
        try:
            st = path.lstat()
        except FileNotFoundError:
            return []
        sig = (st.st_mode, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
        if sig == self._config_seen:
            return []
        if not path.is_file() or path.is_symlink():
            return [".git/config is not a plain file"]
        try:
            proc = subprocess.run(["git", "config", "--file", str(path), "--no-includes", "--list", "--name-only",
                                   "-z"], capture_output=True, env=_git_env(), timeout=GIT_TIMEOUT_S, check=False)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise GitError(f"git config could not be read in {self.root}: {err}") from None
        if proc.returncode != 0:
            return [".git/config cannot be parsed"]
        keys = {k.decode("utf-8", "replace") for k in proc.stdout.split(b"\0") if k}
        bad = sorted(k for k in keys if k.lower() not in CONFIG_KEYS and not k.lower().startswith(USER_SECTIONS))
        if not bad:
            self._config_seen = sig
        return bad

    def repair_config(self) -> list[str]:
        """Remove every key `config_problems` names (an unparsable config is rewritten with git's defaults plus
        ours); returns what was removed."""
        bad = self.config_problems()
        if not bad:
            return []
        path = self.git_dir / "config"
        keep: list[tuple[str, str]] = []
        if bad[0] not in (".git/config is not a plain file", ".git/config cannot be parsed"):
            proc = subprocess.run(["git", "config", "--file", str(path), "--no-includes", "--list", "-z"],
                                  capture_output=True, env=_git_env(), timeout=GIT_TIMEOUT_S, check=False)
            for item in proc.stdout.split(b"\0"):
                key, _, value = item.decode("utf-8", "surrogateescape").partition("\n")
                if key and (key.lower() in CONFIG_KEYS or key.lower().startswith(USER_SECTIONS)):
                    keep.append((key, value))
        else:
            keep = [("core.repositoryformatversion", "0"), ("core.filemode", "true"), ("core.bare", "false"),
                    ("core.logallrefupdates", "true")]
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
        for key, value in keep:
            subprocess.run(["git", "config", "--file", str(path), key, value], capture_output=True,
                           env=_git_env(), timeout=GIT_TIMEOUT_S, check=True)
        self._config_seen = None
        left = self.config_problems()
        if left:
            raise RepositoryTampered(f"{self.root}: .git/config could not be repaired ({', '.join(left)})")
        return bad

    def _check_config(self) -> None:
        bad = self.config_problems()
        if bad:
            raise RepositoryTampered(
                f"{self.root}: .git/config holds keys the orchestrator did not write ({', '.join(bad[:5])}); "
                f"git is not run on a tampered repository (`orchestrator resume` repairs it)")

    def _git(self, *args: str, input: str | None = None, ok_codes: Sequence[int] = (0,),
             cwd_only: bool = False, reads_only: bool = False) -> subprocess.CompletedProcess[str]:
        """One git call. `reads_only`: a command that runs no filter or driver (rev-parse), allowed on a tampered
        repository so it can be opened and repaired."""
        if not (cwd_only or reads_only):
            self._check_config()
        cmd = ["git"]
        for item in _CONFIG:
            cmd += ["-c", item]
        if cwd_only:
            cmd += ["-C", str(self.root)]
        else:
            cmd += [f"--git-dir={self.git_dir}", f"--work-tree={self.root}", "-C", str(self.root)]
        cmd += args
        try:
            proc = subprocess.run(cmd, input=input if input is not None else "", capture_output=True, text=True,
                                  encoding="utf-8", errors="surrogateescape", env=_git_env(),
                                  timeout=GIT_TIMEOUT_S, check=False)
        except FileNotFoundError:
            raise GitError("git is not installed (the `git` command was not found)") from None
        except subprocess.TimeoutExpired:
            raise GitError(f"git {args[0]} took longer than {GIT_TIMEOUT_S:.0f} s in {self.root}") from None
        if proc.returncode not in ok_codes:
            detail = _one_line(proc.stderr) or f"exit code {proc.returncode}"
            if ".lock': File exists" in proc.stderr:
                detail += " (a git process was interrupted; if none is running, delete that .lock file)"
            raise GitError(f"git {args[0]} failed in {self.root}: {detail}")
        return proc

    def _size(self, rel: str) -> int | None:
        """Size of a regular file in the worktree (symlinks count as small), None if absent."""
        try:
            st = os.lstat(self.root / rel)
        except (FileNotFoundError, NotADirectoryError):
            return None
        return st.st_size if not os.path.islink(self.root / rel) else 0

    def _status_paths(self, paths: Sequence[str] | None) -> list[str]:
        """Worktree paths that differ from the index or HEAD, untracked non-ignored files included."""
        args = ["status", "--porcelain=v1", "-z", "--untracked-files=all", "--no-renames", "--ignore-submodules"]
        if paths is not None:
            args += ["--", *_literal(paths)]
        out = self._git(*args).stdout
        result = []
        for entry in out.split("\0"):
            if len(entry) > 3:
                result.append(entry[3:])
        return result

    # ------------------------------------------------------------------------------------------- large files

    def _exclude_file(self) -> Path:
        return self.git_dir / "info" / "exclude"

    def _read_exclude(self) -> tuple[list[str], list[str]]:
        """(lines outside our block, paths inside it)."""
        path = self._exclude_file()
        if not path.exists():
            return [], []
        outside, ours, inside = [], [], False
        for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
            if line == _EXCLUDE_BEGIN:
                inside = True
            elif line == _EXCLUDE_END:
                inside = False
            elif inside:
                if line.strip():
                    ours.append(_unescape_ignore(line))
            else:
                outside.append(line)
        return outside, ours

    def _write_exclude(self, outside: list[str], ours: list[str]) -> None:
        lines = list(outside)
        patterns = [p for p in (_escape_ignore(x) for x in ours) if p is not None]
        if patterns:
            lines += [_EXCLUDE_BEGIN, *patterns, _EXCLUDE_END]
        write_text_atomic(self._exclude_file(), "".join(ln + "\n" for ln in lines))

    def large_files(self) -> list[str]:
        """Files left untracked because they are over the size limit (relative paths, sorted)."""
        return sorted(p for p in self._read_exclude()[1] if (self._size(p) or 0) > self.MAX_FILE_BYTES)

    def _refresh_large(self) -> None:
        """Let files that were too large, and are no longer (or are gone), be seen by git again."""
        outside, ours = self._read_exclude()
        keep = [p for p in ours if (self._size(p) or 0) > self.MAX_FILE_BYTES]
        if keep != ours:
            self._write_exclude(outside, keep)

    def _exclude_large(self, new: list[str]) -> None:
        outside, ours = self._read_exclude()
        merged = sorted(set(ours) | set(new))
        if merged != ours:
            self._write_exclude(outside, merged)

    # ------------------------------------------------------------------------------------------- reading

    def resolve(self, ref: str) -> str | None:
        """The commit sha that `ref` (sha, tag, branch, `run_3~1`, HEAD) names, or None."""
        if not ref or ref.startswith("-"):
            return None
        proc = self._git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{ref}^{{commit}}",
                         ok_codes=(0, 1, 128))
        sha = proc.stdout.strip()
        return sha if proc.returncode == 0 and sha else None

    def _commit_of(self, ref: str) -> str:
        sha = self.resolve(ref)
        if sha is None:
            raise GitError(f"{ref!r} is not a commit in {self.root}")
        return sha

    def head(self) -> str:
        """The full sha of the current checkpoint."""
        sha = self.resolve("HEAD")
        if sha is None:
            raise GitError(f"{self.root}: the repository has no commit yet")
        return sha

    def changed(self, paths: Sequence[str]) -> list[str]:
        """The files under `paths` that differ from the last checkpoint, new untracked ones included (sorted)."""
        return sorted(self._status_paths(list(paths))) if paths else []

    def is_dirty(self, paths: Sequence[str] | None = None) -> bool:
        """True if tracked files changed or untracked, non-ignored files exist (optionally only under `paths`).
        Files over the size limit that were already left out do not count."""
        self._refresh_large()
        return any((self._size(p) or 0) <= self.MAX_FILE_BYTES for p in self._status_paths(paths))

    def diff(self, a: str | None, b: str, paths: Sequence[str] | None = None, context: int = 3) -> str:
        """Unified diff from commit `a` (None: the empty tree, everything shows as added) to commit `b`.
        `paths` are git pathspecs: `:(exclude)run_*` and globs work here."""
        left = EMPTY_TREE if a is None else self._commit_of(a)
        right = self._commit_of(b)
        args = ["diff", "--no-ext-diff", "--no-textconv", "--no-color", "--no-renames", f"-U{int(context)}",
                left, right, "--"]
        if paths:
            args += list(paths)
        return self._git(*args).stdout

    def changed_files(self, a: str | None, b: str) -> list[str]:
        """Paths that differ between commits `a` (None: the empty tree) and `b`, sorted."""
        left = EMPTY_TREE if a is None else self._commit_of(a)
        out = self._git("diff", "--no-ext-diff", "--name-only", "-z", "--no-renames", left,
                        self._commit_of(b), "--").stdout
        return sorted(p for p in out.split("\0") if p)

    def tracked(self, paths: Sequence[str]) -> list[str]:
        """Those of `paths` that git tracks (in the index)."""
        if not paths:
            return []
        out = self._git("ls-files", "-z", "--", *_literal(paths)).stdout
        return [p for p in out.split("\0") if p]

    def show(self, ref: str, path: str) -> str | None:
        """Text of `path` at commit `ref`, or None if the file is not there. GitError if `ref` is unknown."""
        sha = self._commit_of(ref)
        rel = Path(path).as_posix().lstrip("/")
        if rel.startswith("./"):
            rel = rel[2:]
        kind = self._git("cat-file", "-t", f"{sha}:{rel}", ok_codes=(0, 128)).stdout.strip()
        if kind != "blob":
            return None
        proc = subprocess.run(
            ["git", f"--git-dir={self.git_dir}", "cat-file", "blob", f"{sha}:{rel}"],
            capture_output=True, env=_git_env(), timeout=GIT_TIMEOUT_S, check=False)
        if proc.returncode != 0:
            return None
        return proc.stdout.decode("utf-8", errors="replace")

    def log(self, ref: str = "HEAD", max_count: int = 200) -> list[CommitInfo]:
        """Commits reachable from `ref`, newest first. An unknown ref (or an empty repository) gives []."""
        sha = self.resolve(ref)
        if sha is None:
            return []
        out = self._git("log", f"--max-count={int(max_count)}", "--format=%H%x00%ct%x00%s%x1e", sha, "--").stdout
        result = []
        for rec in out.split("\x1e"):
            rec = rec.strip("\n")
            if not rec:
                continue
            h, ct, subject = rec.split("\0", 2)
            result.append(CommitInfo(sha=h, subject=subject, time=float(ct)))
        return result

    def tags(self) -> dict[str, str]:
        """Tag name -> the commit it marks."""
        out = self._git("for-each-ref", "--format=%(refname:strip=2)%00%(objectname)%00%(*objectname)",
                        "refs/tags").stdout
        result = {}
        for line in out.splitlines():
            name, obj, peeled = line.split("\0")
            result[name] = peeled or obj
        return result

    # ------------------------------------------------------------------------------------------- writing

    def commit(self, message: str, paths: Sequence[str] | None = None) -> str:
        """Checkpoint the given paths (files or folders; default: every change) and return the commit sha.
        Files over the size limit are left untracked (see `large_files`). Nothing changed: no new commit, the
        current head is returned."""
        sha, _ = self._commit(message, paths)
        return sha

    def commit_run(self, run_dir: str, message: str) -> RunCommit:
        """Checkpoint a run folder: its results, logs and every other file under the size limit, even files the
        template's .gitignore ignores (they are added with force; only the session's own rules, IGNORED, still
        apply). Files over the size limit are left untracked and listed. When the checkpoint does not hold the
        folder's files (the folder is missing or empty, all of it is too large, or git did not take some file),
        `problem` says so in one line: a run is never silently left out."""
        rel = Path(run_dir).as_posix().strip("/")
        sha, _ = self._commit(message, [rel], force=True)
        prefix = rel + "/"
        untracked = [p for p in self.large_files() if p.startswith(prefix)]
        return RunCommit(sha, untracked, self._run_problem(rel, sha, untracked))

    def _run_problem(self, rel: str, sha: str, untracked: list[str]) -> str:
        """Why checkpoint `sha` does not hold the files of run folder `rel`, or "" when it does."""
        if not (self.root / rel).is_dir():
            return f"{rel} does not exist"
        files, nested = self._files_under(rel)
        files = [p for p in files if not _own_rules_ignore(p)]
        if not files and not nested:
            return f"{rel} is empty"
        problems = []
        if nested:
            more = f" (and {len(nested) - 1} more)" if len(nested) > 1 else ""
            problems.append(f"{nested[0]} is a nested git repository{more}: its files are not committed")
        committed = set(self._tree_files(sha, rel))
        missing = sorted(set(files) - committed - set(untracked))
        if missing:
            problems.append(f"{len(missing)} file(s) are not in the checkpoint, e.g. {missing[0]}")
        elif files and not committed:
            problems.append(f"{rel} holds no file under the size limit to commit")
        return "; ".join(problems)

    def _files_under(self, rel: str) -> tuple[list[str], list[str]]:
        """(files and symbolic links under folder `rel` of the worktree, nested git repositories there). Links
        to folders are not followed; nothing inside a nested repository is listed."""
        files: list[str] = []
        nested: list[str] = []
        for dirpath, dirnames, filenames in os.walk(self.root / rel):
            here = Path(dirpath)
            if ".git" in dirnames or ".git" in filenames:
                nested.append(here.relative_to(self.root).as_posix())
                dirnames[:] = []
                continue
            names = filenames + [d for d in dirnames if (here / d).is_symlink()]
            files += [(here / n).relative_to(self.root).as_posix() for n in names]
        return files, sorted(nested)

    def _tree_files(self, ref: str | None, under: str | None = None) -> list[str]:
        """Files (and links) tracked at commit `ref`, or in the index when `ref` is None, optionally under a folder."""
        where = ["--", *_literal([under])] if under else []
        if ref is None:
            out = self._git("ls-files", "-z", *where).stdout
        else:
            out = self._git("ls-tree", "-r", "-z", "--name-only", ref, *where).stdout
        return [p for p in out.split("\0") if p]

    def _commit(self, message: str, paths: Sequence[str] | None, force: bool = False) -> tuple[str, list[str]]:
        if not message.strip():
            message = "checkpoint"
        head = self.resolve("HEAD")
        if head is not None:
            # the index holds exactly HEAD: a crash in an earlier commit cannot smuggle changes into this one
            self._git("reset", "-q")
        self._refresh_large()
        candidates = self._status_paths(paths)
        if force and paths is not None:  # files .gitignore ignores too, except under the session's own rules
            ignored = self._git("ls-files", "-z", "--others", "--ignored", "--exclude-standard", "--",
                                *_literal(paths)).stdout.split("\0")
            candidates += [p for p in ignored if p and not _own_rules_ignore(p)]
        large = [p for p in candidates if (self._size(p) or 0) > self.MAX_FILE_BYTES]
        # a nested repository shows as "folder/": git would store it as a bare commit id, or fail to add it
        stage = [p for p in candidates if p not in set(large) and not p.endswith("/")]
        if large:
            self._exclude_large(large)
            tracked = self._git("ls-files", "-z", "--", *_literal(large)).stdout.split("\0")
            tracked = [p for p in tracked if p]
            if tracked:
                self._git("rm", "-q", "--cached", "--pathspec-from-file=-", "--pathspec-file-nul",
                          input="\0".join(_literal(tracked)))
        if stage:
            self._git("add", "-A", *(["--force"] if force else []), "--pathspec-from-file=-",
                      "--pathspec-file-nul", input="\0".join(_literal(stage)))
        if head is not None and self._git("diff", "--cached", "--quiet", ok_codes=(0, 1)).returncode == 0:
            return head, large
        self._git("commit", "-q", "--no-verify", "--allow-empty", "--cleanup=verbatim", "-F", "-", input=message)
        return self.head(), large

    def tag(self, name: str, sha: str, message: str = "") -> None:
        """Mark commit `sha` with tag `name` (annotated when `message` is given). The same name on the same
        commit is left as it is; on another commit it is moved (a resumed session may redo a run)."""
        if not name or name.startswith("-") or self._git("check-ref-format", f"refs/tags/{name}",
                                                          ok_codes=(0, 1)).returncode != 0:
            raise GitError(f"{name!r} is not a valid tag name")
        target = self._commit_of(sha)
        if self.tags().get(name) == target:
            return
        args = ["tag", "-f"]
        if message:
            args += ["-a", "--cleanup=verbatim", "-F", "-"]
        self._git(*args, "--", name, target, input=message if message else None)

    def clear_stale_locks(self, older_than: float) -> list[str]:
        """Remove the lock files a git command leaves when it is killed mid-way (`index.lock`, `HEAD.lock`,
        `refs/**/*.lock`, ...): every later git command would fail on them. Call it only when no git command can
        be running on this repository (the session lock is held and the run's processes are stopped); only
        locks last modified before `older_than` (unix time) are removed. Returns the removed paths, relative to
        the repository's git folder."""
        removed = []
        candidates = [*self.git_dir.glob("*.lock"), *self.git_dir.glob("refs/**/*.lock")]
        for lock in sorted(candidates):
            if lock.is_file() and not lock.is_symlink() and lock.stat().st_mtime < older_than:
                lock.unlink()
                removed.append(lock.relative_to(self.git_dir).as_posix())
        return removed

    def reset_hard(self, ref: str) -> list[str]:
        """Make `ref` the current checkpoint and put its files back in the worktree, like `git reset --hard`, but
        without deleting or overwriting anything that is not in the history: untracked files (caches and outputs
        the experiment wrote, run folders, new files of a half-applied edit, files over the size limit) stay as
        they are, even where `ref` has a file of the same path, and so does any file over the size limit.
        Those paths of `ref` are left as they are on disk and returned (sorted); the next commit takes them as
        changes (a file over the limit leaves the repository, as any file that grew). Files tracked at the old
        checkpoint and absent at `ref` are removed (they stay in the history), with folders they leave empty."""
        target = self._commit_of(ref)
        self._git("reset", "-q")  # the index holds HEAD: files staged but never committed count as untracked
        tracked = set(self._tree_files(None))
        at_target = set(self._tree_files(target))
        kept = sorted(p for p in tracked | at_target if self._in_the_way(p, tracked))
        large = [p for p in kept if (self._size(p) or 0) > self.MAX_FILE_BYTES]
        if large:
            self._exclude_large(large)
        self._git("reset", "-q", target)  # HEAD and index move; the worktree is untouched so far
        restore = sorted(at_target - set(kept))
        if restore:
            self._git("checkout", "-q", target, "--pathspec-from-file=-", "--pathspec-file-nul",
                      input="\0".join(_literal(restore)))
        for rel in sorted(tracked - at_target - set(kept)):
            self._remove(rel)
        return kept

    def _in_the_way(self, rel: str, tracked: set[str]) -> bool:
        """Whether writing or removing `rel` would destroy data that is not in the history: something untracked
        at that path or in place of one of its folders, or a file over the size limit."""
        parent = self.root
        for part in Path(rel).parts[:-1]:
            parent = parent / part
            if os.path.lexists(parent) and (parent.is_symlink() or not parent.is_dir()):
                return True
        path = self.root / rel
        if not os.path.lexists(path):
            return False
        if rel not in tracked or (path.is_dir() and not path.is_symlink()):
            return True
        return (self._size(rel) or 0) > self.MAX_FILE_BYTES

    def _remove(self, rel: str) -> None:
        """Delete a worktree file and the folders it leaves empty (never the session folder itself)."""
        path = self.root / rel
        if not (path.is_symlink() or path.is_file()):  # gone already, or a folder: nothing of the history's
            return
        path.unlink()
        for folder in path.parents:
            if folder == self.root or not folder.is_relative_to(self.root):
                break
            try:
                folder.rmdir()
            except OSError:  # not empty, or already gone
                break

    def restore(self, ref: str, paths: Sequence[str], remove_absent: bool = False) -> list[str]:
        """Write the given files as they are at `ref` into the worktree (and the index). With `remove_absent`,
        given files that `ref` does not have are deleted, tracked or not (the new files of a half-applied edit),
        with folders they leave empty; without it such a path is a GitError. A file over the size limit on disk
        is never overwritten or deleted: those paths are left as they are and returned (sorted)."""
        if not paths:
            return []
        target = self._commit_of(ref)
        kept = sorted(p for p in paths if (self._size(p) or 0) > self.MAX_FILE_BYTES)
        todo = [p for p in paths if p not in set(kept)]
        if remove_absent:
            at_target = set(self._tree_files(target))
            absent = [p for p in todo if Path(p).as_posix() not in at_target]
            todo = [p for p in todo if p not in set(absent)]
            if absent:
                self._git("rm", "-q", "--cached", "--ignore-unmatch", "--pathspec-from-file=-",
                          "--pathspec-file-nul", input="\0".join(_literal(absent)))
                for p in absent:
                    self._remove(p)
        if todo:
            self._git("checkout", "-q", target, "--pathspec-from-file=-", "--pathspec-file-nul",
                      input="\0".join(_literal(todo)))
        return kept
