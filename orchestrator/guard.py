"""What a run must not change: the state of guarded paths before it, what differs after it, and the repair.

A run executes model-written code. Whatever the sandbox, the loop takes a `Snapshot` of the guarded paths just
before the run begins (protected files and what could shadow them, `.gitignore`, `.gitattributes`, all of
`.git/`, `.orchestrator/`, earlier run folders, the editable files) and compares after it ends. A file counts as
changed when its type, size, mode, inode, modification time or change time differ, or it appeared or vanished:
the change time (ctime) cannot be set back by a process, so rewriting a file and restoring its mtime still shows.

Files whose bytes are kept (git's control files, the orchestrator's records, protected and editable files) are put
back from the snapshot; earlier run folders from the session's last checkpoint; what neither can restore (git's
object store, a file too large to keep) is reported, and the loop then ends the session.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from orchestrator.atomic import write_bytes_atomic

if TYPE_CHECKING:
    from orchestrator.workspace import Workspace

KEEP_BYTES_MAX = 64 * 2**20  # larger kept-content files are only compared, not restorable from the snapshot
# No git command runs while a run does, so everything under .git/ is guarded; these are small and restorable from
# the snapshot. The rest (objects, logs) is only compared: a change there cannot be undone, and ends the session.
GIT_KEPT = (".git/config", ".git/HEAD", ".git/packed-refs", ".git/refs", ".git/info", ".git/hooks", ".git/index",
            ".git/ORIG_HEAD", ".git/COMMIT_EDITMSG", ".git/description")


@dataclass(frozen=True)
class FileState:
    kind: str  # "file" | "link" | "dir" | "other"
    signature: tuple[int, ...] = ()
    target: str = ""  # symlinks
    content: bytes | None = None  # kept for restorable files


@dataclass
class Snapshot:
    root: Path
    states: dict[str, FileState] = field(default_factory=dict)
    trees: list[str] = field(default_factory=list)  # folders whose new files count as changes
    kept: set[str] = field(default_factory=set)  # paths (and trees) whose bytes are kept
    shadow_parents: dict[str, str] = field(default_factory=dict)  # folder -> a protected module's name in it


def _state(path: Path, keep: bool) -> FileState | None:
    try:
        st = path.lstat()
    except OSError:
        return None
    sig = (st.st_mode, st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    if stat.S_ISLNK(st.st_mode):
        try:
            return FileState("link", sig, target=os.readlink(path))
        except OSError:
            return FileState("link", sig)
    if stat.S_ISDIR(st.st_mode):
        return FileState("dir", (st.st_mode,))
    if not stat.S_ISREG(st.st_mode):
        return FileState("other", sig)
    content = None
    if keep and st.st_size <= KEEP_BYTES_MAX:
        with contextlib.suppress(OSError):
            content = path.read_bytes()
    return FileState("file", sig, content=content)


def _walk(root: Path, rel: str) -> Iterable[str]:
    """Relative paths of everything under root/rel (folders included, symlinks not followed)."""
    stack = [rel]
    while stack:
        here = stack.pop()
        try:
            entries = list(os.scandir(root / here))
        except OSError:
            continue
        for entry in entries:
            sub = f"{here}/{entry.name}"
            yield sub
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    stack.append(sub)


def take(root: Path, files: Iterable[str], trees: Iterable[str], keep: Iterable[str]) -> Snapshot:
    """Snapshot `files` (relative paths; absent ones are recorded as absent) and everything under `trees`.
    Paths in `keep`, or under a tree in `keep`, have their bytes kept so `repair` can put them back."""
    snap = Snapshot(root=Path(root), trees=list(trees), kept=set(keep))
    paths = list(files)
    for rel in list(paths):  # a folder on the way swapped for a link would redirect the repair
        parent = Path(rel).parent
        while parent != Path("."):
            paths.append(parent.as_posix())
            parent = parent.parent
    for tree in snap.trees:
        paths.append(tree)
        paths += _walk(snap.root, tree)
    for rel in paths:
        state = _state(snap.root / rel, _kept(snap, rel))
        if state is not None:
            snap.states[rel] = state
        else:
            snap.states.setdefault(rel, FileState("absent"))
    return snap


def _kept(snap: Snapshot, rel: str) -> bool:
    return any(rel == k or rel.startswith(k + "/") for k in snap.kept)


def changes(snap: Snapshot) -> list[str]:
    """Guarded paths that differ from the snapshot (changed, removed, or new under a watched tree), sorted."""
    out = set()
    for rel, before in snap.states.items():
        now = _state(snap.root / rel, keep=False)
        if now is None:
            if before.kind != "absent":
                out.add(rel)
            continue
        if before.kind == "absent" or now.kind != before.kind:
            out.add(rel)
        elif now.signature != before.signature:  # folders: their mode (a folder made read-only breaks writes)
            out.add(rel)
    for tree in snap.trees:
        for rel in _walk(snap.root, tree):
            if rel not in snap.states:
                out.add(rel)
    for parent, stem in snap.shadow_parents.items():  # x/ or x.*.so appearing beside a protected x.py
        with contextlib.suppress(OSError):
            for entry in os.scandir(snap.root / parent):
                rel = (Path(parent) / entry.name).as_posix()
                if (entry.name == stem or entry.name.startswith(stem + ".")) and rel not in snap.states:
                    out.add(rel)
    return sorted(out)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def repair(snap: Snapshot, changed: Iterable[str]) -> tuple[list[str], list[str]]:
    """Put back what the snapshot can: new paths removed, kept files rewritten (same mode), folders and links
    re-made. Returns (repaired, left): `left` are the changed paths it cannot put back itself (no kept bytes).
    Whatever stands in the way goes first, shallowest first, and the folders above every snapshotted file are in
    the snapshot too, so a folder swapped for a link is removed before anything is written below it."""
    order = sorted(set(changed), key=lambda r: (r.count("/"), r))
    for rel in order:
        before, now = snap.states.get(rel), _state(snap.root / rel, keep=False)
        if now is not None and (before is None or before.kind in ("absent", "other") or now.kind != before.kind):
            _remove(snap.root / rel)
    repaired: list[str] = []
    left: list[str] = []
    for rel in order:
        path = snap.root / rel
        before = snap.states.get(rel)
        try:
            if before is None or before.kind == "absent":
                repaired.append(rel)
            elif before.kind == "dir":
                path.mkdir(parents=True, exist_ok=True)
                os.chmod(path, stat.S_IMODE(before.signature[0]))
                repaired.append(rel)
            elif before.kind == "file" and before.content is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_bytes_atomic(path, before.content)
                os.chmod(path, stat.S_IMODE(before.signature[0]))
                repaired.append(rel)
            elif before.kind == "link" and before.target:
                _remove(path)
                os.symlink(before.target, path)
                repaired.append(rel)
            else:
                left.append(rel)
        except OSError:
            left.append(rel)
    return repaired, left


# --------------------------------------------------------------------------------------------- around one run

META_DIR = ".orchestrator"
TREE_FILES = (".gitignore", ".gitattributes")


class Verdict(BaseModel):
    """What a run changed that it must not have, after the repair."""

    tampered: list[str] = Field(default_factory=list)  # guarded paths it changed (restored unless in `unrestored`)
    unrestored: list[str] = Field(default_factory=list)  # of those, what could not be put back
    discarded: list[str] = Field(default_factory=list)  # editable files it changed while running (put back)

    def message(self) -> str:
        if not self.tampered:
            return ""
        names = _some(self.tampered)
        if not self.unrestored:
            return f"tampered: the run changed {names}; restored, and its results do not count"
        if len(self.unrestored) == len(self.tampered):
            return f"tampered: the run changed {names}, which could not be restored; its results do not count"
        return (f"tampered: the run changed {names}; {_some(self.unrestored)} could not be restored, the rest was; "
                f"its results do not count")


def _some(paths: list[str], shown: int = 8) -> str:
    """The first `shown` paths, and how many more."""
    more = f" and {len(paths) - shown} more" if len(paths) > shown else ""
    return ", ".join(paths[:shown]) + more


def earlier_runs(root: Path, run_name: str) -> list[str]:
    """The run folders (run_N, plot_logs) other than the one `run_name` writes."""
    out = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(root):
            if entry.name != run_name and (entry.name.startswith("run_") or entry.name == "plot_logs") \
                    and entry.is_dir(follow_symlinks=False):
                out.append(entry.name)
    return sorted(out)


def shadows(root: Path, protected: Iterable[str]) -> list[str]:
    """Paths that would be imported instead of a protected module `x.py`: a package `x/`, an extension module
    `x.*.so`, byte code in `__pycache__/`. Those present are guarded like the module; absent ones must stay so."""
    out: list[str] = []
    for rel in protected:
        path = Path(rel)
        if path.suffix != ".py":
            continue
        parent = path.parent
        out += [(parent / path.stem).as_posix(), (parent / "__pycache__").as_posix()]
        with contextlib.suppress(OSError):
            out += [(parent / e.name).as_posix() for e in os.scandir(root / parent)
                    if e.name.startswith(path.stem + ".") and e.name != path.name]
    return out


def watch(root: Path, run_name: str, protected: Iterable[str], editable: Iterable[str]) -> Snapshot:
    """The snapshot taken just before a run begins."""
    editable, protected = list(editable), list(protected)
    files = [*TREE_FILES, *protected, *editable]
    trees = [".git", META_DIR, *earlier_runs(root, run_name), *shadows(root, protected)]
    snap = take(root, files, trees, keep=[*GIT_KEPT, META_DIR, *editable, *protected, *TREE_FILES])
    snap.shadow_parents = {Path(p).parent.as_posix(): Path(p).stem for p in protected if p.endswith(".py")}
    return snap


def settle(snap: Snapshot, ws: Workspace, editable: Iterable[str]) -> Verdict:
    """After the run: put back everything it changed among the guarded paths and say what that was."""
    changed = changes(snap)
    if not changed:
        return Verdict()
    editable = set(editable)
    repaired, left = repair(snap, changed)
    ws.repair_config()  # whatever the snapshot missed: git must be safe before it restores anything
    unrestored: list[str] = []
    if left:
        tracked = set(ws.tracked(left))
        unrestored = [p for p in left if p not in tracked]
        todo = [p for p in left if p in tracked]
        unrestored += ws.restore("HEAD", todo, remove_absent=True)
    return Verdict(tampered=[p for p in changed if p not in editable],
                   unrestored=sorted(set(unrestored)),
                   discarded=[p for p in changed if p in editable])
