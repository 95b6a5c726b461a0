"""The state every route handler works with, and the lookups they all need."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, urlencode

from .auth import Accounts
from .blobs import BlobStore, atomic_write
from .protocol import ApiError, Request
from .repos import Commit, RepoMeta, RepoStore, valid_repo_part

UPLOAD_URL_LIFETIME_S = 3600


class ServerStats:
    """Counters tests read to check what went over the wire.

    ``bytes_served_by_path`` is keyed by ``namespace/name/path/in/repo``; ``requests`` by route name
    (e.g. ``resolve``, ``lfs_upload``, ``commit``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.bytes_served = 0
        self.bytes_served_by_path: dict[str, int] = {}
        self.requests: Counter[str] = Counter()

    def add_bytes(self, key: str, count: int) -> None:
        """Record ``count`` file bytes sent for ``key``.

        Args:
            key: ``namespace/name/path``.
            count: Bytes written to the socket.
        """
        with self._lock:
            self.bytes_served += count
            self.bytes_served_by_path[key] = self.bytes_served_by_path.get(key, 0) + count

    def count_request(self, route: str) -> None:
        """Record one request to ``route``.

        Args:
            route: The route name.
        """
        with self._lock:
            self.requests[route] += 1

    def reset(self) -> None:
        """Set every counter back to zero."""
        with self._lock:
            self.bytes_served = 0
            self.bytes_served_by_path = {}
            self.requests = Counter()


@dataclass
class HubContext:
    """Storage, accounts and counters of one server."""

    root: Path
    accounts: Accounts
    store: RepoStore = field(init=False)
    blobs: BlobStore = field(init=False)
    stats: ServerStats = field(default_factory=ServerStats)
    # cdn_ttl > 0: LFS files redirect to a signed /cdn/ URL valid for this many seconds, as on the Hub, on
    # cdn_port (the server's second port: another origin, same host); 0 for the server's own port.
    cdn_ttl: int = 0
    cdn_port: int = 0
    secret: bytes = field(init=False)

    def __post_init__(self) -> None:
        self.store = RepoStore(self.root)
        self.blobs = BlobStore(self.root)
        self.secret = _upload_secret(self.root)

    def sign_upload(self, sha256: str, size: int, repo_id: str) -> str:
        """Query string authorising one LFS upload to ``repo_id`` (the client sends no token with the PUT, as
        to S3).

        Args:
            sha256: The object's sha256.
            size: The object's size.
            repo_id: The repository whose LFS batch endpoint asked for it.

        Returns:
            ``size=..&repo=..&expires=..&signature=..``.
        """
        expires = int(time.time()) + UPLOAD_URL_LIFETIME_S
        signature = self._signature(f"{sha256}:{repo_id}", size, expires)
        return f"size={size}&repo={quote(repo_id, safe='')}&expires={expires}&signature={signature}"

    def check_upload(self, sha256: str, req: Request) -> tuple[int, str]:
        """Verify the signed query string of an LFS upload.

        Args:
            sha256: The object's sha256, from the URL path.
            req: The PUT request.

        Returns:
            The announced size, and the repository the upload is for.

        Raises:
            ApiError: 403 when the signature is wrong or expired.
        """
        try:
            size, expires = int(req.arg("size") or ""), int(req.arg("expires") or "")
        except ValueError:
            raise ApiError(
                403, "upload URL is missing its size or expiry: ask the LFS batch endpoint again"
            ) from None
        repo_id, given = req.arg("repo") or "", req.arg("signature") or ""
        expected = self._signature(f"{sha256}:{repo_id}", size, expires)
        if expires < time.time() or not hmac.compare_digest(given, expected):
            raise ApiError(
                403, "upload URL signature is invalid or expired: ask the LFS batch endpoint again"
            )
        return size, repo_id

    def sign_download(self, sha256: str, key: str) -> str:
        """Query string of a CDN URL serving one LFS object for ``cdn_ttl`` seconds, to anyone who has it.

        Args:
            sha256: The object's sha256.
            key: ``namespace/name/path`` of the file it was asked as (what the byte counters count under).

        Returns:
            ``path=..&expires=..&signature=..``.
        """
        expires = int(time.time()) + self.cdn_ttl
        signature = self._mac(f"get:{sha256}:{key}:{expires}")
        return f"{urlencode({'path': key})}&expires={expires}&signature={signature}"

    def check_download(self, sha256: str, req: Request) -> str:
        """Verify the signed query string of a CDN URL.

        Args:
            sha256: The object's sha256, from the URL path.
            req: The request.

        Returns:
            The ``namespace/name/path`` the URL was signed for.

        Raises:
            ApiError: 403 when the signature is wrong or expired (ask the file's resolve URL again).
        """
        key, given = req.arg("path") or "", req.arg("signature") or ""
        try:
            expires = int(req.arg("expires") or "")
        except ValueError:
            expires = 0
        if expires < time.time() or not hmac.compare_digest(
            given, self._mac(f"get:{sha256}:{key}:{expires}")
        ):
            raise ApiError(403, "Request has expired or its signature is invalid: resolve the file again")
        return key

    def _signature(self, sha256: str, size: int, expires: int) -> str:
        return self._mac(f"{sha256}:{size}:{expires}")

    def _mac(self, text: str) -> str:
        return hmac.new(self.secret, text.encode(), hashlib.sha256).hexdigest()


def _upload_secret(root: Path) -> bytes:
    """The key signing upload URLs, kept with the storage so a restarted server honours URLs it handed out."""
    path = root / "upload-secret"
    if not path.exists():
        atomic_write(path, secrets.token_bytes(32), root / "tmp")
        path.chmod(0o600)
    return path.read_bytes()


def repo_id_of(req: Request) -> str:
    """The ``namespace/name`` a request's URL names.

    Args:
        req: A request whose route captured ``ns`` and ``name``.

    Returns:
        The repository id.
    """
    ns, name = req.params["ns"], req.params["name"]
    if not (valid_repo_part(ns) and valid_repo_part(name)):  # decoded %2F or .. must not walk the store
        raise ApiError(400, f"invalid repository id {ns}/{name!r}")
    return f"{ns}/{name}"


def resolve_revision(ctx: HubContext, meta: RepoMeta, revision: str) -> Commit:
    """The commit a revision names in a repository.

    Args:
        ctx: Server state.
        meta: The repository.
        revision: Branch, tag, ``refs/...`` or commit id.

    Returns:
        The commit.

    Raises:
        ApiError: 404 RevisionNotFound.
    """
    commit = ctx.store.resolve(meta, revision)
    if commit is None:
        raise ApiError(
            404,
            f"Invalid rev id: {revision} (no such branch, tag or commit in {meta.repo_id})",
            code="RevisionNotFound",
        )
    return commit
