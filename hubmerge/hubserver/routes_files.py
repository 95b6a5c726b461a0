"""File downloads: ``HEAD``/``GET /{ns}/{name}/resolve/{rev}/{path}``, with byte ranges.

Files are served directly (no redirect to a CDN): huggingface_hub accepts that, reading the LFS etag and size
from ``X-Linked-Etag`` / ``X-Linked-Size``. The body is streamed from the blob store, never held in memory.
"""

from __future__ import annotations

from urllib.parse import quote

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
    headers["Content-Type"] = "application/octet-stream"
    headers["Content-Disposition"] = f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"
    try:
        span = parse_range(req.header("Range"), entry.size)
    except RangeNotSatisfiable:
        headers["Content-Range"] = f"bytes */{entry.size}"
        raise ApiError(
            416,
            f"Requested range {req.header('Range')} not satisfiable: {path!r} has {entry.size} bytes",
            headers=headers,
        ) from None
    stats_key = f"{repo_id}/{path}"
    if span is None:
        return Response(200, headers, file=FileBody(blob, 0, entry.size), stats_key=stats_key)
    start, end = span
    headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
    return Response(206, headers, file=FileBody(blob, start, end - start), stats_key=stats_key)
