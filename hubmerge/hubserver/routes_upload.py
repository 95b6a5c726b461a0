"""Uploads, in the three steps huggingface_hub takes:

1. ``POST /api/models/{ns}/{name}/preupload/{rev}``: per file, ``regular`` (inline in the commit) or ``lfs``;
2. ``POST /{ns}/{name}.git/info/lfs/objects/batch``: per LFS object, nothing when it is stored already,
   otherwise a signed ``PUT`` URL on this server (``PUT /api/lfs-upload/{sha256}``);
3. ``POST /api/models/{ns}/{name}/commit/{rev}``: NDJSON ``header`` / ``file`` / ``lfsFile`` /
   ``deletedFile`` / ``deletedFolder`` lines, applied in order to the branch head.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json

from .auth import repo_not_found
from .blobs import SHA256_RE, BlobMismatchError
from .context import HubContext, repo_id_of, resolve_revision
from .protocol import ApiError, Request, Response, json_response
from .repos import ParentMismatchError, RepoMeta
from .routes_refs import commit_url
from .tree import AddFile, DeletePath, FileEntry, Operation, OperationError, normalize_path

LFS_SUFFIXES = (
    ".bin",
    ".ckpt",
    ".gguf",
    ".h5",
    ".msgpack",
    ".npy",
    ".npz",
    ".onnx",
    ".ot",
    ".pkl",
    ".pt",
    ".pth",
    ".safetensors",
    ".tar.gz",
    ".tflite",
    ".zip",
)
"""Files stored with git-lfs whatever their size (the Hub's default ``.gitattributes``)."""

LFS_THRESHOLD = 10 * 1000 * 1000
"""Files larger than this go to LFS even when they are text."""


def upload_mode(path: str, size: int, sample: bytes) -> str:
    """Decide how a file is uploaded: ``lfs`` for weights, big files and binary files, ``regular`` otherwise.

    Args:
        path: Path in the repository.
        size: File size.
        sample: The file's first bytes (the client sends 512).

    Returns:
        ``"lfs"`` or ``"regular"``.
    """
    if path.endswith(LFS_SUFFIXES) or size > LFS_THRESHOLD or b"\0" in sample:
        return "lfs"
    try:  # not final: the sample may end in the middle of a multi-byte character
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        return "lfs"
    return "regular"


def _check_upload_rights(ctx: HubContext, req: Request, repo_id: str, *, create_pr: bool) -> RepoMeta:
    meta = ctx.store.load(repo_id)
    if req.user is None:
        ctx.accounts.check_read(meta, repo_id, req.user)
        raise ApiError(401, f"You must be authenticated to upload to {repo_id}: send a token")
    # A pull request only needs read access, like on the Hub; anything else needs write access.
    check = ctx.accounts.check_read if create_pr else ctx.accounts.check_write
    return check(meta, repo_id, req.user)


def preupload(ctx: HubContext, req: Request) -> Response:
    """Tell the client how to upload each file, and the ``oid`` of the file already at that path, if any.

    The ``oid`` is given in the form the client compares to: the sha256 for LFS files, the git oid for regular
    files; an unchanged file is then left out of the commit.

    Args:
        ctx: Server state.
        req: JSON body ``{"files": [{"path", "size", "sample"}]}``.

    Returns:
        ``{"files": [{"path", "uploadMode", "shouldIgnore", "oid"}], "commitOid"}``.

    Raises:
        ApiError: RepoNotFound, RevisionNotFound, 401/403, 400 on a malformed body.
    """
    repo_id = repo_id_of(req)
    meta = _check_upload_rights(ctx, req, repo_id, create_pr=req.flag("create_pr"))
    commit = resolve_revision(ctx, meta, req.params["rev"])
    payload = req.body.json()
    files = payload.get("files") if isinstance(payload, dict) else None
    if not isinstance(files, list):
        raise ApiError(400, 'expected a JSON object {"files": [{"path", "size", "sample"}]}')
    answer = []
    for item in files:
        try:
            path, size = str(item["path"]), int(item["size"])
            sample = base64.b64decode(item.get("sample") or "")
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise ApiError(400, f"malformed preupload entry {str(item)[:200]}") from None
        mode = upload_mode(path, size, sample)
        existing = commit.files.get(path)
        oid = None
        if existing is not None and (existing.lfs is not None) == (mode == "lfs"):
            oid = existing.lfs or existing.oid
        answer.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
    return json_response({"files": answer, "commitOid": commit.id})


def lfs_batch(ctx: HubContext, req: Request) -> Response:
    """git-lfs batch API, ``basic`` transfer, upload operation.

    Args:
        ctx: Server state.
        req: JSON body ``{"operation": "upload", "objects": [{"oid", "size"}], "ref"?: {"name"}}``.

    Returns:
        ``{"transfer": "basic", "objects": [...]}``; an object already stored has no ``actions``.

    Raises:
        ApiError: RepoNotFound, 401/403, 400 on a malformed body or another operation.
    """
    repo_id = repo_id_of(req)
    payload = req.body.json()
    if not isinstance(payload, dict) or payload.get("operation") != "upload":
        raise ApiError(400, "only the git-lfs 'upload' operation is supported by this endpoint")
    # Without a ref the client is preparing a pull request, which needs read access only.
    _check_upload_rights(ctx, req, repo_id, create_pr=payload.get("ref") is None)
    items = payload.get("objects") or []
    if not isinstance(items, list):
        raise ApiError(400, "'objects' must be a list of {oid, size}")
    objects = []
    for item in items:
        oid, size = (item.get("oid"), item.get("size")) if isinstance(item, dict) else (None, None)
        answer: dict[str, object] = {"oid": str(oid), "size": size if isinstance(size, int) else 0}
        if not (isinstance(oid, str) and SHA256_RE.match(oid) and isinstance(size, int) and size >= 0):
            answer["error"] = {
                "code": 422,
                "message": "oid must be a sha256 (64 hex digits) and size an integer",
            }
        # Present only if uploaded to this repository: whether another one holds it is not for us to tell.
        elif not (ctx.store.has_lfs(repo_id, oid) and ctx.blobs.lfs_size(oid) == size):
            signed = ctx.sign_upload(oid, size, repo_id)
            answer["authenticated"] = True
            answer["actions"] = {
                "upload": {"href": f"{req.base_url}/api/lfs-upload/{oid}?{signed}"},
                "verify": {"href": f"{req.base_url}/{repo_id}.git/info/lfs/objects/verify"},
            }
        objects.append(answer)
    return json_response(
        {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
        headers={"Content-Type": "application/vnd.git-lfs+json"},
    )


def lfs_verify(ctx: HubContext, req: Request) -> Response:
    """git-lfs verify callback: confirm an object is stored with the expected size.

    Args:
        ctx: Server state.
        req: JSON body ``{"oid", "size"}``.

    Returns:
        ``{}`` when stored.

    Raises:
        ApiError: 404 when the object is missing or has another size.
    """
    repo_id = repo_id_of(req)
    ctx.accounts.check_read(ctx.store.load(repo_id), repo_id, req.user)
    payload = req.body.json()
    oid = payload.get("oid") if isinstance(payload, dict) else None
    size = payload.get("size") if isinstance(payload, dict) else None
    if not isinstance(oid, str) or not ctx.store.has_lfs(repo_id, oid) or ctx.blobs.lfs_size(oid) != size:
        raise ApiError(404, f"LFS object {oid} of {size} bytes is not stored: upload it first")
    return json_response({})


def lfs_upload(ctx: HubContext, req: Request) -> Response:
    """``PUT /api/lfs-upload/{sha256}?size=..&expires=..&signature=..``: receive one LFS object.

    The body is streamed to a temporary file and renamed into the store only when its sha256 and size match.

    Args:
        ctx: Server state.
        req: The request; the URL comes from :func:`lfs_batch`.

    Returns:
        200 with an empty body.

    Raises:
        ApiError: 403 on a bad signature; 400 when the bytes do not match.
    """
    oid = req.params["oid"]
    size, repo_id = ctx.check_upload(oid, req)
    try:  # stored again if another repository has it: the bytes are checked either way
        ctx.blobs.put_lfs(req.body.iter_views(), oid, size)
    except BlobMismatchError as exc:
        raise ApiError(400, str(exc)) from None
    ctx.store.grant_lfs(repo_id, oid)
    return Response(200)


def _operation(ctx: HubContext, key: object, value: dict[str, object]) -> Operation:
    if not isinstance(value.get("path"), str):
        raise ApiError(400, f"commit line {key!r}: 'path' must be a string")
    path = normalize_path(str(value["path"]))
    if key == "file":
        if value.get("encoding", "base64") != "base64":
            return AddFile(path, _regular(ctx, str(value.get("content", "")).encode()))
        return AddFile(path, _regular(ctx, base64.b64decode(str(value.get("content", "")), validate=True)))
    if key == "lfsFile":
        oid = str(value.get("oid", ""))
        stored = ctx.blobs.lfs_size(oid)
        if stored is None or value.get("size", stored) != stored:
            raise ApiError(
                400,
                f"LFS object {oid} for '{path}' was not uploaded (or has another size): "
                "upload it through the LFS batch endpoint first",
            )
        return AddFile(path, FileEntry.for_lfs(oid, stored))
    if key in ("deletedFile", "deletedFolder"):
        return DeletePath(path, folder=key == "deletedFolder")
    raise ApiError(
        400, f"unknown commit operation {key!r}: expected file, lfsFile, deletedFile or deletedFolder"
    )


def _regular(ctx: HubContext, data: bytes) -> FileEntry:
    return FileEntry(ctx.blobs.put_regular(data), len(data))


def commit(ctx: HubContext, req: Request) -> Response:
    """Create a commit from an NDJSON body (``create_pr=1`` opens a pull request ``refs/pr/N`` instead).

    Args:
        ctx: Server state.
        req: The request.

    Returns:
        ``{"success", "commitOid", "commitUrl", "pullRequestUrl", ...}``.

    Raises:
        ApiError: RepoNotFound, RevisionNotFound (``rev`` is not a branch or pull request); EntryNotFound
            for a deleted path that does not exist; 412 when ``parentCommit`` is not the head; 400 on a
            bad body.
    """
    repo_id, create_pr = repo_id_of(req), req.flag("create_pr")
    _check_upload_rights(ctx, req, repo_id, create_pr=create_pr)
    header: dict[str, object] | None = None
    operations: list[Operation] = []
    while line := req.body.readline():
        if not line.strip():
            continue
        try:
            item = json.loads(line)
            key, value = item["key"], item["value"]
        except (ValueError, KeyError, TypeError):
            raise ApiError(400, f"malformed NDJSON line in commit body: {line[:200]!r}") from None
        if not isinstance(value, dict):
            raise ApiError(400, f"commit line {key!r}: 'value' must be an object")
        try:
            if key == "header":
                header = value
            else:
                operations.append(_operation(ctx, key, value))
        except (OperationError, binascii.Error) as exc:
            raise ApiError(400, f"commit line {key!r}: {exc}") from None
    if header is None or not isinstance(header.get("summary"), str) or not str(header["summary"]).strip():
        raise ApiError(400, "the commit needs a 'header' line with a non-empty 'summary'")
    summary = str(header["summary"])
    parent = header.get("parentCommit")
    try:
        new, number = ctx.store.add_commit(
            repo_id,
            ref=req.params["rev"],
            operations=operations,
            title=summary,
            message=str(header.get("description") or ""),
            author=str(req.user),
            parent=str(parent) if parent else None,
            create_pr=create_pr,
        )
    except KeyError as exc:
        if exc.args[0] == repo_id:
            raise repo_not_found(repo_id, req.user) from None
        raise ApiError(
            404,
            f"Invalid rev id: {req.params['rev']} is not a branch (or refs/pr/N) of {repo_id}",
            code="RevisionNotFound",
        ) from None
    except ParentMismatchError as exc:
        raise ApiError(412, f"A commit has happened since: {exc}. Refresh and try again") from None
    except OperationError as exc:
        raise ApiError(
            404 if exc.missing else 400, str(exc), code="EntryNotFound" if exc.missing else None
        ) from None
    return json_response(
        {
            "success": True,
            "commitOid": new.id,
            "commitUrl": commit_url(req.base_url, repo_id, new.id),
            "commitMessage": summary,
            "hookOutput": "",
            "pullRequestUrl": f"{req.base_url}/{repo_id}/discussions/{number}"
            if number is not None
            else None,
        }
    )
