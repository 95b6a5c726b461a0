"""Repositories: settings, refs and immutable commits, stored as JSON next to each other::

    root/repos/{namespace}/{name}/repo.json            settings and refs (rewritten atomically under a lock)
    root/repos/{namespace}/{name}/commits/{id}.json    one file per commit, never modified
    root/repos/{namespace}/{name}/lfs/{sha256}         (empty) an LFS object uploaded to this repository

LFS objects are stored once for all repositories (blobs.py), but a commit may name only objects uploaded to
its own repository (or already in the tree it builds on): knowing an object's sha256 and size, which any
reader of a gated repository's tree sees, must not be enough to copy it into a repository of one's own.

A commit id is the sha1 of the commit's canonical JSON (parent, message, author, date, tree), so the same
change on the same parent at the same time always gets the same id.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from .blobs import atomic_write
from .tree import AddFile, FileEntry, Files, Operation, OperationError, apply_operations

DEFAULT_BRANCH = "main"
_NAME_RE = re.compile(r"^(?!.*(?:--|\.\.))[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")
_COMMIT_PREFIX_RE = re.compile(r"^[0-9a-f]{7,40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CACHE_SIZE = 512


def now_iso() -> str:
    """The current UTC time as the Hub writes dates (``2024-05-01T12:00:00.123Z``).

    Returns:
        The timestamp.
    """
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def valid_repo_part(part: str) -> bool:
    """Whether ``part`` is a valid namespace or repository name.

    Args:
        part: One half of ``namespace/name``.

    Returns:
        The answer.
    """
    return bool(_NAME_RE.match(part)) and not part.endswith(".git")


@dataclass(frozen=True)
class Commit:
    """An immutable commit: its tree and who made it when."""

    id: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: Files


@dataclass
class RepoMeta:
    """Mutable settings and refs of a repository (``pulls`` maps a pull-request number to its head)."""

    repo_id: str
    private: bool
    created_at: str
    gated: str | bool = False
    granted: list[str] = field(default_factory=list)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pulls: dict[str, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        """The owner: the part of ``repo_id`` before the slash."""
        return self.repo_id.split("/")[0]


class ParentMismatchError(ValueError):
    """The client asked to commit on top of a commit that is no longer the head of the branch."""


class RepoStore:
    """Every repository under ``root/repos``. Writes to refs and settings are serialised by one lock.

    Args:
        root: The server's storage root.
    """

    def __init__(self, root: Path) -> None:
        self._repos = root / "repos"
        self._tmp = root / "tmp"
        self._repos.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._cache: OrderedDict[tuple[str, str], Commit] = OrderedDict()
        self._cache_lock = threading.Lock()

    def _dir(self, repo_id: str) -> Path:
        return self._repos / repo_id

    def load(self, repo_id: str) -> RepoMeta | None:
        """Read a repository's settings and refs.

        Args:
            repo_id: ``namespace/name``.

        Returns:
            The metadata, or ``None`` when the repository does not exist.
        """
        try:
            data = json.loads((self._dir(repo_id) / "repo.json").read_text())
        except FileNotFoundError:
            return None
        return RepoMeta(**data)

    def _save(self, meta: RepoMeta) -> None:
        atomic_write(
            self._dir(meta.repo_id) / "repo.json", json.dumps(asdict(meta), indent=1).encode(), self._tmp
        )

    def create(self, repo_id: str, *, private: bool, author: str, initial_files: Files) -> RepoMeta:
        """Create a repository whose ``main`` branch holds one initial commit.

        Args:
            repo_id: ``namespace/name``.
            private: Whether only the namespace's members may see it.
            author: User creating it (author of the initial commit).
            initial_files: Tree of the initial commit (the Hub puts a ``.gitattributes`` there).

        Returns:
            The new repository's metadata.

        Raises:
            FileExistsError: When the repository exists.
        """
        with self._lock:
            if self.load(repo_id) is not None:
                raise FileExistsError(repo_id)
            date = now_iso()
            commit = self._write_commit(repo_id, None, "initial commit", "", author, date, initial_files)
            meta = RepoMeta(
                repo_id=repo_id, private=private, created_at=date, branches={DEFAULT_BRANCH: commit.id}
            )
            self._save(meta)
            return meta

    def delete(self, repo_id: str) -> bool:
        """Delete a repository (blobs stay: other repositories may share them).

        Args:
            repo_id: ``namespace/name``.

        Returns:
            False when it did not exist.
        """
        with self._lock:
            if self.load(repo_id) is None:
                return False
            trash = self._tmp / f"deleted-{uuid.uuid4().hex}"
            self._dir(repo_id).rename(trash)  # atomic: readers see the repository or nothing
            with self._cache_lock:  # a repository created later under this name must not see these commits
                for key in [key for key in self._cache if key[0] == repo_id]:
                    del self._cache[key]
        shutil.rmtree(trash, ignore_errors=True)
        return True

    def grant_lfs(self, repo_id: str, sha256: str) -> None:
        """Record that ``sha256`` was uploaded to ``repo_id`` (its commits may name it from now on)."""
        with self._lock:  # not while the repository is deleted (or re-created)
            if self.load(repo_id) is None:
                return
            self._grants(repo_id).joinpath(sha256).touch()

    def has_lfs(self, repo_id: str, sha256: str) -> bool:
        """Whether ``sha256`` was uploaded to ``repo_id`` (or is named by one of its commits)."""
        if not _SHA256_RE.match(sha256):
            return False
        try:
            return (self._grants(repo_id) / sha256).is_file()
        except FileNotFoundError:  # no such repository
            return False

    def _grants(self, repo_id: str) -> Path:
        """The repository's grant folder; for one stored before grants existed, filled from its commits."""
        folder = self._dir(repo_id) / "lfs"
        if folder.is_dir():
            return folder
        with self._lock:
            if not self._dir(repo_id).is_dir():
                raise FileNotFoundError(repo_id)
            if not folder.is_dir():
                staging = self._tmp / f"grants-{uuid.uuid4().hex}"
                staging.mkdir()
                for path in (self._dir(repo_id) / "commits").glob("*.json"):
                    for entry in json.loads(path.read_text()).get("files", {}).values():
                        if isinstance(entry, dict) and entry.get("lfs"):
                            staging.joinpath(str(entry["lfs"])).touch()
                staging.rename(folder)
        return folder

    def update(self, repo_id: str, change: Callable[[RepoMeta], None]) -> RepoMeta:
        """Change settings or refs under the lock and save them atomically.

        Args:
            repo_id: ``namespace/name``.
            change: Mutates the metadata in place; may raise to abort.

        Returns:
            The saved metadata.

        Raises:
            KeyError: When the repository does not exist.
        """
        with self._lock:
            meta = self.load(repo_id)
            if meta is None:
                raise KeyError(repo_id)
            change(meta)
            self._save(meta)
            return meta

    def _write_commit(
        self, repo_id: str, parent: str | None, title: str, message: str, author: str, date: str, files: Files
    ) -> Commit:
        tree = {path: files[path].to_json() for path in sorted(files)}
        content = {"parent": parent, "title": title, "message": message, "author": author, "date": date}
        canonical = json.dumps({**content, "files": tree}, sort_keys=True, separators=(",", ":")).encode()
        commit_id = hashlib.sha1(b"commit\0" + canonical).hexdigest()
        atomic_write(self._dir(repo_id) / "commits" / f"{commit_id}.json", canonical, self._tmp)
        return Commit(commit_id, parent, title, message, author, date, dict(files))

    def commit(self, repo_id: str, commit_id: str) -> Commit | None:
        """Read a commit (cached: commits never change).

        Args:
            repo_id: ``namespace/name``.
            commit_id: 40 hex digits.

        Returns:
            The commit, or ``None`` when the repository has no such commit.
        """
        key = (repo_id, commit_id)
        with self._cache_lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        try:
            data = json.loads((self._dir(repo_id) / "commits" / f"{commit_id}.json").read_text())
        except (FileNotFoundError, OSError):
            return None
        files = {path: FileEntry.from_json(entry) for path, entry in data.pop("files").items()}
        commit = Commit(id=commit_id, files=files, **data)
        with self._cache_lock:
            self._cache[key] = commit
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return commit

    def resolve(self, meta: RepoMeta, revision: str) -> Commit | None:
        """Find the commit a revision names: a branch, a tag, ``refs/heads|tags|pr/...``, or a commit id.

        Args:
            meta: The repository.
            revision: What the client asked for.

        Returns:
            The commit, or ``None`` when the revision does not exist.
        """
        refs = {f"refs/heads/{branch}": head for branch, head in meta.branches.items()}
        refs.update({f"refs/tags/{tag}": target for tag, target in meta.tags.items()})
        refs.update({f"refs/pr/{number}": head for number, head in meta.pulls.items()})
        commit_id = meta.branches.get(revision) or meta.tags.get(revision) or refs.get(revision)
        if commit_id is None and _COMMIT_PREFIX_RE.match(revision):
            if len(revision) == 40:
                commit_id = revision
            else:  # a short hash is accepted when it is unambiguous
                matches = [p.stem for p in (self._dir(meta.repo_id) / "commits").glob(f"{revision}*.json")]
                commit_id = matches[0] if len(matches) == 1 else None
        return self.commit(meta.repo_id, commit_id) if commit_id else None

    def history(self, repo_id: str, head: Commit) -> Iterator[Commit]:
        """Walk from ``head`` to the initial commit.

        Args:
            repo_id: ``namespace/name``.
            head: Where to start.

        Returns:
            An iterator over the commits, newest first.
        """
        commit: Commit | None = head
        while commit is not None:
            yield commit
            commit = self.commit(repo_id, commit.parent) if commit.parent else None

    def add_commit(
        self,
        repo_id: str,
        *,
        ref: str,
        operations: list[Operation],
        title: str,
        message: str,
        author: str,
        parent: str | None = None,
        create_pr: bool = False,
    ) -> tuple[Commit, int | None]:
        """Apply operations on top of a branch (or pull request) and move it, atomically.

        Args:
            repo_id: ``namespace/name``.
            ref: A branch name or ``refs/pr/N``.
            operations: What to change, applied in order to the current head's tree.
            title: Commit summary.
            message: Commit description.
            author: User making the commit.
            parent: When given, the commit id (or unique prefix) the client based its change on. Without
                ``create_pr`` it must be the current head; with ``create_pr`` the pull request starts from it.
            create_pr: Open a new pull request ``refs/pr/N`` instead of moving ``ref``.

        Returns:
            The new commit, and the pull-request number when one was opened.

        Raises:
            KeyError: When the repository or ``ref`` does not exist (``args[0]`` says which).
            ParentMismatchError: When ``parent`` is not the head of ``ref`` (or unknown).
            OperationError: When an operation cannot apply.
        """
        with self._lock:
            meta = self.load(repo_id)
            if meta is None:
                raise KeyError(repo_id)
            pulls = {f"refs/pr/{number}": head for number, head in meta.pulls.items()}
            head_id = meta.branches.get(ref.removeprefix("refs/heads/")) or pulls.get(ref)
            if head_id is None:
                raise KeyError(ref)
            base_id = head_id
            if parent is not None:
                based_on = self.resolve(meta, parent)
                if based_on is None or (not create_pr and based_on.id != head_id):
                    raise ParentMismatchError(
                        f"parent commit {parent} is not the head of '{ref}' ({head_id})"
                    )
                base_id = based_on.id
            base = self.commit(repo_id, base_id)
            if base is None:
                raise KeyError(base_id)
            present = {entry.lfs for entry in base.files.values() if entry.lfs}
            for op in operations:
                lfs = op.entry.lfs if isinstance(op, AddFile) else None
                if lfs and lfs not in present and not self.has_lfs(repo_id, lfs):
                    raise OperationError(
                        f"LFS object {lfs} for '{op.path}' was not uploaded to {repo_id}: "
                        "upload it through this repository's LFS batch endpoint first",
                        missing=False,
                    )
            files = apply_operations(base.files, operations)
            commit = self._write_commit(repo_id, base.id, title, message, author, now_iso(), files)
            number: int | None = None
            if create_pr:
                number = max((int(n) for n in meta.pulls), default=0) + 1
                meta.pulls[str(number)] = commit.id
            elif ref in pulls:
                meta.pulls[ref.removeprefix("refs/pr/")] = commit.id
            else:
                meta.branches[ref.removeprefix("refs/heads/")] = commit.id
            self._save(meta)
            return commit, number
