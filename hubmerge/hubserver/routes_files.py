"""File downloads: ``HEAD``/``GET /{ns}/{name}/resolve/{rev}/{path}``, with byte ranges.

By default files are served directly: huggingface_hub accepts that, reading the LFS etag and size from
``X-Linked-Etag`` / ``X-Linked-Size``. With ``cdn_ttl`` set (``hub serve --cdn-ttl``) an LFS file is
answered as huggingface.co answers it: a 302 carrying those headers, to a signed ``/cdn/{sha256}`` URL on
another origin (the server's second port) that serves the object (ranges too) without a token until it
expires, then 403. The body is streamed from the blob store, never held in memory.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote, urlsplit

from .context import HubContext, repo_id_of, resolve_revision
from .protocol import ApiError, FileBody, RangeNotSatisfiable, Request, Response, parse_range


def resolve_file(ctx: HubContext, req: Request) -> Response:
    """Serve one file of a revision, whole or a single byte range.

    Headers: ``X-Repo-Commit`` (the resolved commit), ``ETag`` (quoted git oid, or sha256 for LFS files),
    ``X-Linked-Etag`` and ``X-Linked-Size`` for LFS files, ``Content-Length``, ``Accept-Ranges: bytes``, and
    ``Content-Range`` on a 206.

    Args:
        ctx: Server state.
        req: The request (``HEAD`` or ``GET``, optional ``Range``).

    Returns:
        200 with the whole file, or 206 with the asked range.

    Raises:
        ApiError: RepoNotFound, GatedRepo, RevisionNotFound; EntryNotFound (carrying ``X-Repo-Commit``, so the
            client can cache the absence); 416 when the range lies outside the file.
    """
    repo_id = repo_id_of(req)
    meta = ctx.accounts.check_download(ctx.store.load(repo_id), repo_id, req.user)
    commit = resolve_revision(ctx, meta, req.params["rev"])
    path = req.params["path"]
    entry = commit.files.get(path)
    headers = {"X-Repo-Commit": commit.id, "Accept-Ranges": "bytes"}
    if entry is None:
        raise ApiError(
            404,
            f"Entry not found: {path!r} does not exist in {repo_id} at {commit.id}",
            code="EntryNotFound",
            headers=headers,
        )
    if entry.lfs is not None:
        blob = ctx.blobs.lfs_path(entry.lfs)
        headers.update(
            {"ETag": f'"{entry.lfs}"', "X-Linked-Etag": f'"{entry.lfs}"', "X-Linked-Size": str(entry.size)}
        )
    else:
        blob = ctx.blobs.regular_path(entry.oid)
        headers["ETag"] = f'"{entry.oid}"'
    stats_key = f"{repo_id}/{path}"
    if entry.lfs is not None and ctx.cdn_ttl > 0:
        headers["Location"] = (
            f"{_cdn_origin(ctx, req)}/cdn/{entry.lfs}?{ctx.sign_download(entry.lfs, stats_key)}"
        )
        return Response(302, headers)
    headers["Content-Disposition"] = f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"
    return _file(req, headers, blob, entry.size, stats_key)


def _cdn_origin(ctx: HubContext, req: Request) -> str:
    """The CDN port on the host the client reached the server by (its ``Host`` header)."""
    if not ctx.cdn_port:
        return req.base_url
    parts = urlsplit(req.base_url)
    host = parts.hostname or "127.0.0.1"
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}:{ctx.cdn_port}"


def cdn_file(ctx: HubContext, req: Request) -> Response:
    """Serve an LFS object by the signed URL a resolve redirected to, whole or a single byte range.

    Args:
        ctx: Server state.
        req: The request (``HEAD`` or ``GET``, optional ``Range``); no token needed, the URL is the key.

    Returns:
        200 with the whole object, or 206 with the asked range.

    Raises:
        ApiError: 403 when the signature is wrong or expired; 416 when the range lies outside the object.
    """
    oid = req.params["oid"]
    key = ctx.check_download(oid, req)
    size = ctx.blobs.lfs_size(oid)
    if size is None:
        raise ApiError(404, f"LFS object {oid} not found")
    headers = {"ETag": f'"{oid}"', "Accept-Ranges": "bytes"}
    return _file(req, headers, ctx.blobs.lfs_path(oid), size, key)


def _file(req: Request, headers: dict[str, str], blob: Path, size: int, stats_key: str) -> Response:
    """The answer serving ``blob`` (``size`` bytes), or the byte range the request asks for."""
    headers["Content-Type"] = "application/octet-stream"
    try:
        span = parse_range(req.header("Range"), size)
    except RangeNotSatisfiable:
        headers["Content-Range"] = f"bytes */{size}"
        raise ApiError(
            416,
            f"Requested range {req.header('Range')} not satisfiable: {stats_key!r} has {size} bytes",
            headers=headers,
        ) from None
    if span is None:
        return Response(200, headers, file=FileBody(blob, 0, size), stats_key=stats_key)
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    return Response(206, headers, file=FileBody(blob, start, end - start), stats_key=stats_key)
