"""A commit's file tree as a flat ``{path: FileEntry}`` mapping, and the pure functions that read and edit it.

Folders are implicit: ``a/b`` exists as a folder when some file path starts with ``a/b/``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .blobs import git_blob_oid, lfs_pointer


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit.

    ``oid`` is the git blob oid (of the content for a regular file, of the LFS pointer for an LFS file);
    ``lfs`` is the sha256 of an LFS file's content, ``None`` for a regular file.
    """

    oid: str
    size: int
    lfs: str | None = None

    @classmethod
    def for_lfs(cls, sha256: str, size: int) -> FileEntry:
        """Entry of an LFS file.

        Args:
            sha256: Content sha256.
            size: Content size.

        Returns:
            The entry, whose ``oid`` is the git oid of the LFS pointer.
        """
        return cls(oid=git_blob_oid(lfs_pointer(sha256, size)), size=size, lfs=sha256)

    def to_json(self) -> dict[str, object]:
        """Plain-JSON form, as stored in commit files.

        Returns:
            ``{"oid", "size"}`` plus ``"lfs"`` for LFS files.
        """
        data: dict[str, object] = {"oid": self.oid, "size": self.size}
        if self.lfs is not None:
            data["lfs"] = self.lfs
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> FileEntry:
        """Inverse of :meth:`to_json`.

        Args:
            data: The stored form.

        Returns:
            The entry.
        """
        lfs = data.get("lfs")
        return cls(oid=str(data["oid"]), size=int(str(data["size"])), lfs=str(lfs) if lfs else None)

    def lfs_json(self) -> dict[str, object] | None:
        """The ``lfs`` object of the Hub's tree and paths-info answers.

        Returns:
            ``{"oid", "size", "pointerSize"}``, or ``None`` for a regular file.
        """
        if self.lfs is None:
            return None
        return {"oid": self.lfs, "size": self.size, "pointerSize": len(lfs_pointer(self.lfs, self.size))}


Files = Mapping[str, FileEntry]


@dataclass(frozen=True)
class AddFile:
    """Commit operation: create or replace a file."""

    path: str
    entry: FileEntry


@dataclass(frozen=True)
class DeletePath:
    """Commit operation: delete a file, or a whole folder when ``folder`` is true."""

    path: str
    folder: bool


Operation = AddFile | DeletePath


class OperationError(ValueError):
    """A commit operation cannot apply. ``missing`` tells a path-not-found error from a conflict."""

    def __init__(self, message: str, *, missing: bool) -> None:
        super().__init__(message)
        self.missing = missing


def normalize_path(path: str) -> str:
    """Check a path inside a repository and return its canonical form.

    Args:
        path: As sent by a client.

    Returns:
        The path without leading ``./`` or trailing ``/``.

    Raises:
        OperationError: When the path is empty, absolute, or contains ``..``, ``.``, empty parts or ``.git``.
    """
    cleaned = path.removeprefix("./").rstrip("/")
    parts = cleaned.split("/")
    if not cleaned or path.startswith("/") or any(part in ("", ".", "..", ".git") for part in parts):
        raise OperationError(f"invalid path in repository: {path!r}", missing=False)
    return cleaned


def is_folder(files: Files, path: str) -> bool:
    """Whether ``path`` is a folder of the tree (the root ``""`` always is).

    Args:
        files: The tree.
        path: Folder path without trailing slash.

    Returns:
        The answer.
    """
    prefix = f"{path}/" if path else ""
    return any(name.startswith(prefix) for name in files)


def apply_operations(files: Files, operations: Iterable[Operation]) -> dict[str, FileEntry]:
    """Apply commit operations in order to a tree.

    Args:
        files: The parent commit's tree.
        operations: Additions and deletions.

    Returns:
        The new tree.

    Raises:
        OperationError: When a deleted path does not exist, or a file would collide with a folder.
    """
    tree = dict(files)
    for operation in operations:
        path = operation.path
        if isinstance(operation, AddFile):
            if is_folder(tree, path):
                raise OperationError(f"cannot add file '{path}': a folder has this name", missing=False)
            parents = path.split("/")[:-1]
            for depth in range(1, len(parents) + 1):
                parent = "/".join(parents[:depth])
                if parent in tree:
                    raise OperationError(f"cannot add file '{path}': '{parent}' is a file", missing=False)
            tree[path] = operation.entry
        elif operation.folder:
            doomed = [name for name in tree if name.startswith(f"{path}/")]
            if not doomed:
                raise OperationError(f"A folder with this name doesn't exist: '{path}'", missing=True)
            for name in doomed:
                del tree[name]
        else:
            if path not in tree:
                raise OperationError(f"A file with this name doesn't exist: '{path}'", missing=True)
            del tree[path]
    return tree


def folder_oid(files: Files, path: str) -> str:
    """A stable identifier of a folder's content (stands in for git's tree oid).

    Args:
        files: The tree.
        path: Folder path, ``""`` for the root.

    Returns:
        40 hex digits that change whenever anything below the folder changes.
    """
    prefix = f"{path}/" if path else ""
    digest = hashlib.sha1(b"tree\0")
    for name in sorted(name for name in files if name.startswith(prefix)):
        digest.update(f"{name[len(prefix) :]}\0{files[name].oid}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class TreeItem:
    """A file (``entry`` set) or a folder (``entry`` is ``None``) at ``path``."""

    path: str
    entry: FileEntry | None


def list_folder(files: Files, path: str, *, recursive: bool) -> list[TreeItem]:
    """The items below a folder, sorted by path.

    Args:
        files: The tree.
        path: Folder path, ``""`` for the root.
        recursive: List everything below instead of direct children only.

    Returns:
        Files and folders; folders come before the files they contain.
    """
    prefix = f"{path}/" if path else ""
    folders: set[str] = set()
    items: list[TreeItem] = []
    for name in files:
        if not name.startswith(prefix):
            continue
        parts = name[len(prefix) :].split("/")
        depth = len(parts) - 1 if recursive else min(len(parts) - 1, 1)
        for level in range(1, depth + 1):
            folders.add(prefix + "/".join(parts[:level]))
        if recursive or len(parts) == 1:
            items.append(TreeItem(name, files[name]))
    items.extend(TreeItem(folder, None) for folder in folders)
    return sorted(items, key=lambda item: item.path)


def item_json(files: Files, item: TreeItem) -> dict[str, object]:
    """An item as the Hub's ``tree`` and ``paths-info`` endpoints describe it.

    Args:
        files: The tree (needed for folder oids).
        item: The item.

    Returns:
        ``{"type": "file", "oid", "size", "path", "lfs"?}``
        or ``{"type": "directory", "oid", "size": 0, "path"}``.
    """
    if item.entry is None:
        return {"type": "directory", "oid": folder_oid(files, item.path), "size": 0, "path": item.path}
    data: dict[str, object] = {
        "type": "file",
        "oid": item.entry.oid,
        "size": item.entry.size,
        "path": item.path,
    }
    lfs = item.entry.lfs_json()
    if lfs is not None:
        data["lfs"] = lfs
    return data


def path_fingerprint(files: Files, path: str) -> str | None:
    """What identifies the content at ``path``: a file's oid or a folder's oid.

    Args:
        files: The tree.
        path: File or folder path.

    Returns:
        The fingerprint, or ``None`` when nothing is at ``path``.
    """
    if path in files:
        return files[path].oid
    return folder_oid(files, path) if is_folder(files, path) else None
