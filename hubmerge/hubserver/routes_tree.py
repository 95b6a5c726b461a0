"""Routes that list a revision's files: ``tree`` (paginated) and ``paths-info``."""

from __future__ import annotations

from urllib.parse import parse_qs, urlencode

from .context import HubContext, repo_id_of, resolve_revision
from .protocol import ApiError, Request, Response, is_true, json_response
from .repos import Commit
from .tree import TreeItem, is_folder, item_json, list_folder, normalize_path, path_fingerprint

TREE_PAGE_SIZE = 1000
TREE_PAGE_SIZE_EXPANDED = 50


def _last_commit(ctx: HubContext, repo_id: str, head: Commit, path: str) -> dict[str, str]:
    """The newest commit, at or before ``head``, that changed what is at ``path``."""
    fingerprint = path_fingerprint(head.files, path)
    last = head
    for commit in ctx.store.history(repo_id, head):
        if path_fingerprint(commit.files, path) != fingerprint:
            break
        last = commit
    return {"id": last.id, "title": last.title, "date": last.date}


def _describe(
    ctx: HubContext, repo_id: str, commit: Commit, item: TreeItem, expand: bool
) -> dict[str, object]:
    data = item_json(commit.files, item)
    if expand:
        data["lastCommit"] = _last_commit(ctx, repo_id, commit, item.path)
    return data


def list_tree(ctx: HubContext, req: Request) -> Response:
    """``GET /api/models/{ns}/{name}/tree/{rev}[/{path}]``: a folder's files and sub-folders.

    ``recursive=true`` lists everything below; ``expand=true`` adds ``lastCommit``. Pages hold
    :data:`TREE_PAGE_SIZE` items (:data:`TREE_PAGE_SIZE_EXPANDED` when expanded); the ``Link`` header points
    to the next one through an opaque ``cursor``.

    Args:
        ctx: Server state.
        req: The request.

    Returns:
        One page of items.

    Raises:
        ApiError: RepoNotFound, RevisionNotFound; EntryNotFound when ``path`` is not a folder.
    """
    repo_id = repo_id_of(req)
    meta = ctx.accounts.check_read(ctx.store.load(repo_id), repo_id, req.user)
    commit = resolve_revision(ctx, meta, req.params["rev"])
    path = req.params.get("path", "").strip("/")
    if path and not is_folder(commit.files, path):
        raise ApiError(
            404,
            f"{path!r} is not a folder in {repo_id} at {commit.id}",
            code="EntryNotFound",
            headers={"X-Repo-Commit": commit.id},
        )
    expand = req.flag("expand")
    items = list_folder(commit.files, path, recursive=req.flag("recursive"))
    cursor = req.arg("cursor", "0") or "0"
    if not cursor.isdigit():
        raise ApiError(400, f"invalid pagination cursor {cursor!r}")
    start = int(cursor)
    size = TREE_PAGE_SIZE_EXPANDED if expand else TREE_PAGE_SIZE
    page = [_describe(ctx, repo_id, commit, item, expand) for item in items[start : start + size]]
    headers = {}
    if start + size < len(items):
        query = [(k, v) for k, values in req.query.items() if k != "cursor" for v in values]
        query.append(("cursor", str(start + size)))
        headers["Link"] = f'<{req.base_url}{req.path}?{urlencode(query)}>; rel="next"'
    return json_response(page, headers=headers)


def _paths_request(req: Request) -> tuple[list[str], bool]:
    content_type = req.header("Content-Type") or ""
    if content_type.startswith("application/json"):
        payload = req.body.json()
        if not isinstance(payload, dict) or not isinstance(payload.get("paths", []), list):
            raise ApiError(400, 'expected a JSON object {"paths": [...], "expand": bool}')
        return [str(p) for p in payload.get("paths", [])], is_true(payload.get("expand"))
    form = parse_qs(req.body.read_all().decode("utf-8", errors="replace"), keep_blank_values=True)
    return form.get("paths", []) + form.get("paths[]", []), is_true((form.get("expand") or ["false"])[0])


def paths_info(ctx: HubContext, req: Request) -> Response:
    """``POST /api/models/{ns}/{name}/paths-info/{rev}``: describe given paths; missing ones are left out.

    Accepts a form body (``paths=a&paths=b&expand=false``, what huggingface_hub sends) or JSON.

    Args:
        ctx: Server state.
        req: The request.

    Returns:
        A list of file and folder descriptions.

    Raises:
        ApiError: RepoNotFound, RevisionNotFound.
    """
    repo_id = repo_id_of(req)
    meta = ctx.accounts.check_read(ctx.store.load(repo_id), repo_id, req.user)
    commit = resolve_revision(ctx, meta, req.params["rev"])
    paths, expand = _paths_request(req)
    answer: list[dict[str, object]] = []
    for raw in dict.fromkeys(paths):
        try:
            path = normalize_path(raw)
        except ValueError:
            continue
        if path in commit.files:
            answer.append(_describe(ctx, repo_id, commit, TreeItem(path, commit.files[path]), expand))
        elif is_folder(commit.files, path):
            answer.append(_describe(ctx, repo_id, commit, TreeItem(path, None), expand))
    return json_response(answer)
