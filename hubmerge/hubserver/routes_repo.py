"""Routes about whole repositories: identity, creation, deletion, settings, card validation and model info."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

from .blobs import git_blob_oid
from .cards import card_data, validate_card
from .context import HubContext, repo_id_of, resolve_revision
from .protocol import ApiError, Request, Response, is_true, json_response
from .repos import DEFAULT_BRANCH, Commit, RepoMeta, valid_repo_part
from .tree import FileEntry

# What the Hub writes in the initial commit of every new repository: which files git-lfs stores.
GITATTRIBUTES = "".join(
    f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n"
    for ext in (
        "bin",
        "ckpt",
        "gguf",
        "h5",
        "msgpack",
        "npy",
        "npz",
        "onnx",
        "ot",
        "pkl",
        "pt",
        "pth",
        "safetensors",
        "tar.gz",
        "tflite",
        "zip",
    )
).encode()


def whoami(ctx: HubContext, req: Request) -> Response:
    """``GET /api/whoami-v2``: the token's user.

    Args:
        ctx: Server state.
        req: The request.

    Returns:
        The user description.

    Raises:
        ApiError: 401 without a token.
    """
    if req.user is None:
        raise ApiError(401, "Invalid username or password: send a token in the Authorization header")
    return json_response(ctx.accounts.whoami(req.user))


def _target_repo(ctx: HubContext, req: Request) -> tuple[str, Mapping[str, object]]:
    payload = req.body.json()
    if not isinstance(payload, dict):
        raise ApiError(400, "expected a JSON object with 'name' and 'organization'")
    if payload.get("type", "model") not in ("model", None):
        raise ApiError(
            400, f"repository type {payload.get('type')!r} is not supported: this server hosts models only"
        )
    if req.user is None:
        raise ApiError(401, "You must be authenticated: send a token in the Authorization header")
    name = str(payload.get("name") or "")
    namespace = str(payload.get("organization") or req.user)
    if "/" in name:  # some clients send the full id as the name
        namespace, _, name = name.partition("/")
    if not (valid_repo_part(namespace) and valid_repo_part(name)):
        raise ApiError(
            400, f"invalid repository id '{namespace}/{name}': use letters, digits, '-', '_' and '.'"
        )
    return f"{namespace}/{name}", payload


def create_repo(ctx: HubContext, req: Request) -> Response:
    """``POST /api/repos/create``: create a model repository with an initial commit on ``main``.

    Args:
        ctx: Server state.
        req: JSON body ``{name, organization?, private? | visibility?, type?}``.

    Returns:
        ``{"url": ...}``.

    Raises:
        ApiError: 403 outside the user's namespaces; 409 (with ``url``) when it already exists.
    """
    repo_id, payload = _target_repo(ctx, req)
    url = f"{req.base_url}/{repo_id}"
    namespace = repo_id.split("/")[0]
    if not ctx.accounts.is_member(req.user, namespace):
        raise ApiError(
            403,
            f"You don't have the rights to create a model under the namespace '{namespace}' "
            f"(authenticated as {req.user})",
        )
    private = is_true(payload.get("private")) or payload.get("visibility") == "private"
    initial = {".gitattributes": FileEntry(git_blob_oid(GITATTRIBUTES), len(GITATTRIBUTES))}
    ctx.blobs.put_regular(GITATTRIBUTES)
    try:
        ctx.store.create(repo_id, private=private, author=str(req.user), initial_files=initial)
    except FileExistsError:
        raise ApiError(409, "You already created this model repo", extra={"url": url}) from None
    return json_response({"url": url, "name": repo_id, "id": repo_id})


def delete_repo(ctx: HubContext, req: Request) -> Response:
    """``DELETE /api/repos/delete``: delete a repository.

    Args:
        ctx: Server state.
        req: JSON body ``{name, organization?, type?}``.

    Returns:
        An empty JSON object.

    Raises:
        ApiError: RepoNotFound; 403 without write access.
    """
    repo_id, _ = _target_repo(ctx, req)
    ctx.accounts.check_write(ctx.store.load(repo_id), repo_id, req.user)
    ctx.store.delete(repo_id)
    return json_response({})


def update_settings(ctx: HubContext, req: Request) -> Response:
    """``PUT /api/models/{ns}/{name}/settings``: change ``private`` / ``visibility`` or ``gated``.

    Args:
        ctx: Server state.
        req: JSON body.

    Returns:
        An empty JSON object.

    Raises:
        ApiError: 400 on an unknown value; RepoNotFound; 403 without write access.
    """
    repo_id = repo_id_of(req)
    ctx.accounts.check_write(ctx.store.load(repo_id), repo_id, req.user)
    payload = req.body.json()
    if not isinstance(payload, dict):
        raise ApiError(400, "expected a JSON object")
    gated = payload.get("gated")
    if "gated" in payload and gated not in (False, "auto", "manual"):
        raise ApiError(400, f"'gated' must be false, 'auto' or 'manual', not {gated!r}")
    visibility = payload.get("visibility")
    if visibility is not None and visibility not in ("public", "private"):
        raise ApiError(400, f"'visibility' must be 'public' or 'private', not {visibility!r}")

    def change(meta: RepoMeta) -> None:
        if "private" in payload:
            meta.private = is_true(payload["private"])
        if visibility is not None:
            meta.private = visibility == "private"
        if "gated" in payload:
            meta.gated = gated if gated in ("auto", "manual") else False

    ctx.store.update(repo_id, change)
    return json_response({})


def grant_access(ctx: HubContext, req: Request) -> Response:
    """``POST /api/models/{ns}/{name}/user-access-request/grant``: let a user download a gated repository.

    Args:
        ctx: Server state.
        req: JSON body ``{"user": name}``.

    Returns:
        An empty JSON object.

    Raises:
        ApiError: 400 without a user; RepoNotFound; 403 without write access.
    """
    repo_id = repo_id_of(req)
    ctx.accounts.check_write(ctx.store.load(repo_id), repo_id, req.user)
    payload = req.body.json()
    user = payload.get("user") if isinstance(payload, dict) else None
    if not isinstance(user, str) or not user:
        raise ApiError(400, 'expected a JSON object {"user": name}')
    ctx.store.update(repo_id, lambda meta: None if user in meta.granted else meta.granted.append(user))
    return json_response({})


def validate_yaml(ctx: HubContext, req: Request) -> Response:
    """``POST /api/validate-yaml``: check a card's metadata.

    Args:
        ctx: Server state.
        req: JSON body ``{"content": card text, "repoType": ...}``.

    Returns:
        ``{}`` when valid.

    Raises:
        ApiError: 400 with ``errors: [{"message": ...}]`` when invalid.
    """
    payload = req.body.json()
    content = payload.get("content") if isinstance(payload, dict) else None
    if not isinstance(content, str):
        raise ApiError(400, "expected a JSON object with the card text in 'content'")
    errors = validate_card(content)
    if errors:
        message = "Invalid metadata in README.md: " + "; ".join(errors)
        raise ApiError(400, message, extra={"errors": [{"message": error} for error in errors]})
    return json_response({})


def _regular_text(ctx: HubContext, commit: Commit, path: str, limit: int = 1 << 20) -> str | None:
    entry = commit.files.get(path)
    if entry is None or entry.lfs is not None or entry.size > limit:
        return None
    return ctx.blobs.read_regular(entry.oid).decode("utf-8", errors="replace")


def _info(ctx: HubContext, meta: RepoMeta, commit: Commit, with_blobs: bool) -> dict[str, object]:
    readme = _regular_text(ctx, commit, "README.md")
    card = card_data(readme) if readme is not None else None
    config_text = _regular_text(ctx, commit, "config.json")
    config: object = None
    if config_text is not None:
        try:
            config = json.loads(config_text)
        except ValueError:
            config = None
    siblings: list[dict[str, object]] = []
    for path in sorted(commit.files):
        entry = commit.files[path]
        sibling: dict[str, object] = {"rfilename": path}
        if with_blobs:
            lfs = entry.lfs_json()
            sibling.update(size=entry.size, blobId=entry.oid)
            if lfs is not None:
                sibling["lfs"] = {
                    "sha256": lfs["oid"],
                    "size": lfs["size"],
                    "pointerSize": lfs["pointerSize"],
                }
        siblings.append(sibling)
    card = card or {}
    card_tags = card.get("tags")
    tags = [tag for tag in card_tags if isinstance(tag, str)] if isinstance(card_tags, list) else []
    if isinstance(card.get("library_name"), str):
        tags.append(str(card["library_name"]))
    if any(path.endswith(".safetensors") for path in commit.files):
        tags.append("safetensors")
    if isinstance(card.get("license"), str):
        tags.append(f"license:{card['license']}")
    info: dict[str, object] = {
        "_id": hashlib.sha1(meta.repo_id.encode()).hexdigest()[:24],
        "id": meta.repo_id,
        "modelId": meta.repo_id,
        "author": meta.namespace,
        "sha": commit.id,
        "lastModified": commit.date,
        "createdAt": meta.created_at,
        "private": meta.private,
        "gated": meta.gated,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": list(dict.fromkeys(tags)),
        "siblings": siblings,
        "spaces": [],
        "usedStorage": sum(entry.size for entry in commit.files.values()),
    }
    if card:
        info["cardData"] = card
        for key in ("library_name", "pipeline_tag"):
            if isinstance(card.get(key), str):
                info[key] = card[key]
    if isinstance(config, dict):
        info["config"] = {key: config[key] for key in ("architectures", "model_type") if key in config}
    return info


def model_info(ctx: HubContext, req: Request) -> Response:
    """``GET /api/models/{ns}/{name}[/revision/{rev}]``: what ``HfApi.model_info`` parses.

    ``blobs=true`` adds sizes, blob ids and LFS details to ``siblings``; ``expand=...`` (repeatable, also
    ``expand[]``) keeps only the listed properties.

    Args:
        ctx: Server state.
        req: The request.

    Returns:
        The model description.

    Raises:
        ApiError: RepoNotFound, RevisionNotFound.
    """
    repo_id = repo_id_of(req)
    meta = ctx.accounts.check_read(ctx.store.load(repo_id), repo_id, req.user)
    commit = resolve_revision(ctx, meta, req.params.get("rev") or DEFAULT_BRANCH)
    info = _info(ctx, meta, commit, with_blobs=req.flag("blobs"))
    expand = req.args("expand")
    if expand:
        info = {key: value for key, value in info.items() if key in ("_id", "id", *expand)}
    return json_response(info)
