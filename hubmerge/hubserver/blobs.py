"""Content-addressed file storage.

Two stores, one per kind of file the Hub knows::

    root/blobs/git/ab/ab12...     regular files, named by git blob oid (sha1 of "blob <size>\\0" + bytes)
    root/blobs/sha256/cd/cd34...  LFS objects, named by the sha256 of their bytes
    root/tmp/                     partial writes, renamed into place only once complete and verified

A blob never changes once written, so readers need no lock, and two uploads of the same bytes end as one file.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..directio import writing

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
GIT_OID_RE = re.compile(r"^[0-9a-f]{40}$")


def git_blob_oid(data: bytes) -> str:
    """The oid git gives a blob with these bytes.

    Args:
        data: File content.

    Returns:
        40 hex digits.
    """
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that stands in the git tree for an LFS object.

    Args:
        sha256: The object's sha256.
        size: The object's size in bytes.

    Returns:
        The pointer file bytes (its git oid is the file's ``blobId`` on the Hub).
    """
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def atomic_write(path: Path, data: bytes, tmp_dir: Path) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a partial one.

    Args:
        path: Destination.
        data: Bytes to write.
        tmp_dir: Folder for the temporary file, on the same filesystem as ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="write-")
    try:
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(data)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


class BlobMismatchError(ValueError):
    """Uploaded bytes do not match the announced sha256 or size."""


class BlobStore:
    """Regular files by git oid and LFS objects by sha256, under ``root/blobs``.

    Args:
        root: The server's storage root.
    """

    def __init__(self, root: Path) -> None:
        self.tmp_dir = root / "tmp"
        self._git = root / "blobs" / "git"
        self._lfs = root / "blobs" / "sha256"
        for folder in (self.tmp_dir, self._git, self._lfs):
            folder.mkdir(parents=True, exist_ok=True)

    def regular_path(self, oid: str) -> Path:
        """Where the regular file with git oid ``oid`` lives.

        Args:
            oid: 40 hex digits.

        Returns:
            The path (which may not exist).
        """
        if not GIT_OID_RE.match(oid):
            raise ValueError(f"not a git oid: {oid!r}")
        return self._git / oid[:2] / oid

    def lfs_path(self, sha256: str) -> Path:
        """Where the LFS object with this sha256 lives.

        Args:
            sha256: 64 hex digits.

        Returns:
            The path (which may not exist).
        """
        if not SHA256_RE.match(sha256):
            raise ValueError(f"not a sha256: {sha256!r}")
        return self._lfs / sha256[:2] / sha256

    def put_regular(self, data: bytes) -> str:
        """Store a regular file.

        Args:
            data: The file content.

        Returns:
            Its git oid.
        """
        oid = git_blob_oid(data)
        path = self.regular_path(oid)
        if not path.exists():
            atomic_write(path, data, self.tmp_dir)
        return oid

    def read_regular(self, oid: str) -> bytes:
        """Read a regular file back.

        Args:
            oid: Its git oid.

        Returns:
            The content.
        """
        return self.regular_path(oid).read_bytes()

    def lfs_size(self, sha256: str) -> int | None:
        """Size of a stored LFS object.

        Args:
            sha256: The object's sha256.

        Returns:
            Its size, or ``None`` when it is not stored.
        """
        try:
            return self.lfs_path(sha256).stat().st_size
        except (FileNotFoundError, ValueError):
            return None

    def put_lfs(self, chunks: Iterable[bytes | memoryview], sha256: str, size: int) -> None:
        """Stream an LFS object into the store, checking its sha256 and size before it becomes visible.

        Args:
            chunks: The object's bytes, in order.
            sha256: The announced sha256.
            size: The announced size.

        Raises:
            BlobMismatchError: When the bytes do not hash to ``sha256`` or do not add up to ``size``.
        """
        destination = self.lfs_path(sha256)
        digest = hashlib.sha256()
        received = 0
        fd, tmp_name = tempfile.mkstemp(dir=self.tmp_dir, prefix="lfs-")
        # Around the page cache where the file system allows (hubmerge/directio.py): an upload of gigabytes
        # would otherwise be copied into fresh cache pages, most of the server's CPU for a push.
        try:
            try:
                with writing(fd, tmp_name) as tmp:
                    for chunk in chunks:
                        digest.update(chunk)
                        if received + len(chunk) > size:
                            too_long = f"LFS object {sha256}: more than the announced {size} bytes"
                            raise BlobMismatchError(too_long)
                        tmp.write(memoryview(chunk), received)
                        received += len(chunk)
            finally:
                os.close(fd)
            if received != size:
                raise BlobMismatchError(f"LFS object {sha256}: expected {size} bytes, received {received}")
            if digest.hexdigest() != sha256:
                raise BlobMismatchError(
                    f"LFS object {sha256}: the uploaded bytes hash to {digest.hexdigest()} instead"
                )
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp_name, destination)
        finally:
            Path(tmp_name).unlink(missing_ok=True)
