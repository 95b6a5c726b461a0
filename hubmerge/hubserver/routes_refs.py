"""Routes about refs and history: list refs, list commits, create and delete branches and tags."""

from __future__ import annotations

import html
from urllib.parse import quote, urlencode

from .context import HubContext, repo_id_of, resolve_revision
from .protocol import ApiError, Request, Response, json_response
from .repos import DEFAULT_BRANCH, Commit, RepoMeta

COMMITS_PAGE_SIZE = 50


def _ref_list(prefix: str, refs: dict[str, str]) -> list[dict[str, str]]:
    return [{"name": name, "ref": f"{prefix}{name}", "targetCommit": refs[name]} for name in sorted(refs)]


def list_refs(ctx: HubContext, req: Request) -> Response:
    """``GET /api/models/{ns}/{name}/refs``: branches, tags (and pull requests with ``include_prs=1``).

    Args:
        ctx: Server state.
        req: The request.

    Returns:
        ``{"branches", "converts", "tags", "pullRequests"?}``.

    Raises:
        ApiError: RepoNotFound.
    """
    repo_id = repo_id_of(req)
    meta = ctx.accounts.check_read(ctx.store.load(repo_id), repo_id, req.user)
    answer: dict[str, object] = {
        "branches": _ref_list("refs/heads/", meta.branches),
        "converts": [],
        "tags": _ref_list("refs/tags/", meta.tags),
    }
    if req.flag("include_prs"):
        pulls = sorted(meta.pulls, key=int)
        answer["pullRequests"] = [
            {"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": meta.pulls[n]} for n in pulls
        ]
    return json_response(answer)


def _commit_json(commit: Commit, formatted: bool) -> dict[str, object]:
    data: dict[str, object] = {
        "id": commit.id,
        "title": commit.title,
        "message": commit.message,
        "authors": [{"user": commit.author, "avatar": None}],
        "date": commit.date,
    }
    if formatted:
        data["formatted"] = {"title": html.escape(commit.title), "message": html.escape(commit.message)}
    return data


def list_commits(ctx: HubContext, req: Request) -> Response:
    """``GET /api/models/{ns}/{name}/commits/{rev}``: history, newest first, paginated through ``Link``.

    Pages hold :data:`COMMITS_PAGE_SIZE` commits; ``p`` is the page index.

    Args:
        ctx: Server state.
        req: The request.

    Returns:
        One page of commits.

    Raises:
        ApiError: RepoNotFound, RevisionNotFound; 400 on a bad page index.
    """
    repo_id = repo_id_of(req)
    meta = ctx.accounts.check_read(ctx.store.load(repo_id), repo_id, req.user)
    head = resolve_revision(ctx, meta, req.params["rev"])
    page_arg = req.arg("p", "0") or "0"
    if not page_arg.isdigit():
        raise ApiError(400, f"page index 'p' must be a non-negative integer, not {page_arg!r}")
    page = int(page_arg)
    formatted = "formatted" in req.args("expand")
    start = page * COMMITS_PAGE_SIZE
    commits: list[dict[str, object]] = []
    has_more = False
    for index, commit in enumerate(ctx.store.history(repo_id, head)):
        if index >= start + COMMITS_PAGE_SIZE:
            has_more = True
            break
        if index >= start:
            commits.append(_commit_json(commit, formatted))
    headers = {}
    if has_more:
        query = [(k, v) for k, values in req.query.items() if k != "p" for v in values] + [
            ("p", str(page + 1))
        ]
        headers["Link"] = f'<{req.base_url}{req.path}?{urlencode(query)}>; rel="next"'
    return json_response(commits, headers=headers)


def _valid_ref_name(name: str) -> bool:
    """git's rules for a ref name (``git check-ref-format``), as the Hub applies them."""
    parts = name.split("/")
    return (
        bool(name)
        and not name.startswith("refs/")
        and all(p and not p.startswith(".") and not p.endswith(".lock") for p in parts)
        and not name.endswith(".")
        and ".." not in name
        and name != "@"
        and "@{" not in name
        and not any(c in name for c in " ~^:?*[\\")
        and not any(ord(c) < 32 or ord(c) == 127 for c in name)
    )


def create_branch(ctx: HubContext, req: Request) -> Response:
    """``POST /api/models/{ns}/{name}/branch/{branch}``: branch off ``startingPoint`` (default: ``main``).

    Args:
        ctx: Server state.
        req: JSON body ``{"startingPoint"?: revision}``.

    Returns:
        An empty JSON object.

    Raises:
        ApiError: 400 on an invalid name; 409 when it exists; RepoNotFound; RevisionNotFound; 403.
    """
    repo_id, branch = repo_id_of(req), req.params["branch"]
    meta = ctx.accounts.check_write(ctx.store.load(repo_id), repo_id, req.user)
    if not _valid_ref_name(branch):
        raise ApiError(400, f"invalid branch name {branch!r}")
    payload = req.body.json()
    start = payload.get("startingPoint") if isinstance(payload, dict) else None
    commit = resolve_revision(ctx, meta, str(start or DEFAULT_BRANCH))

    def change(current: RepoMeta) -> None:
        if branch in current.branches:
            raise ApiError(409, f"Reference refs/heads/{branch} already exists in {repo_id}")
        current.branches[branch] = commit.id

    ctx.store.update(repo_id, change)
    return json_response({})


def delete_branch(ctx: HubContext, req: Request) -> Response:
    """``DELETE /api/models/{ns}/{name}/branch/{branch}``.

    Args:
        ctx: Server state.
        req: The request.

    Returns:
        An empty JSON object.

    Raises:
        ApiError: 403 for the default branch or without write access; 404 RevisionNotFound when missing.
    """
    repo_id, branch = repo_id_of(req), req.params["branch"]
    ctx.accounts.check_write(ctx.store.load(repo_id), repo_id, req.user)
    if branch == DEFAULT_BRANCH:
        raise ApiError(403, f"the default branch '{DEFAULT_BRANCH}' cannot be deleted")

    def change(current: RepoMeta) -> None:
        if current.branches.pop(branch, None) is None:
            raise ApiError(
                404, f"Invalid rev id: branch {branch!r} does not exist in {repo_id}", code="RevisionNotFound"
            )

    ctx.store.update(repo_id, change)
    return json_response({})


def create_tag(ctx: HubContext, req: Request) -> Response:
    """``POST /api/models/{ns}/{name}/tag/{rev}``: tag the commit ``rev`` names.

    Args:
        ctx: Server state.
        req: JSON body ``{"tag": name, "message"?: text}``.

    Returns:
        An empty JSON object.

    Raises:
        ApiError: 400 on an invalid name; 409 when it exists; RepoNotFound; RevisionNotFound; 403.
    """
    repo_id = repo_id_of(req)
    meta = ctx.accounts.check_write(ctx.store.load(repo_id), repo_id, req.user)
    payload = req.body.json()
    tag = payload.get("tag") if isinstance(payload, dict) else None
    if not isinstance(tag, str) or not _valid_ref_name(tag):
        raise ApiError(400, f"expected a JSON object with a valid 'tag' name, got {tag!r}")
    commit = resolve_revision(ctx, meta, req.params["rev"])

    def change(current: RepoMeta) -> None:
        if tag in current.tags:
            raise ApiError(409, f"Tag {tag} already exists in {repo_id}")
        current.tags[tag] = commit.id

    ctx.store.update(repo_id, change)
    return json_response({})


def delete_tag(ctx: HubContext, req: Request) -> Response:
    """``DELETE /api/models/{ns}/{name}/tag/{tag}``.

    Args:
        ctx: Server state.
        req: The request.

    Returns:
        An empty JSON object.

    Raises:
        ApiError: 404 RevisionNotFound when missing; RepoNotFound; 403.
    """
    repo_id, tag = repo_id_of(req), req.params["rev"]
    ctx.accounts.check_write(ctx.store.load(repo_id), repo_id, req.user)

    def change(current: RepoMeta) -> None:
        if current.tags.pop(tag, None) is None:
            raise ApiError(
                404, f"Invalid rev id: tag {tag!r} does not exist in {repo_id}", code="RevisionNotFound"
            )

    ctx.store.update(repo_id, change)
    return json_response({})


def commit_url(base_url: str, repo_id: str, commit_id: str) -> str:
    """Web URL of a commit, as the Hub reports it.

    Args:
        base_url: Server URL.
        repo_id: ``namespace/name``.
        commit_id: Commit id.

    Returns:
        ``{base_url}/{repo_id}/commit/{commit_id}``.
    """
    return f"{base_url}/{repo_id}/commit/{quote(commit_id)}"
