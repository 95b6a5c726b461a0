"""The route table and the dispatcher that turns a :class:`Request` into a :class:`Response`.

Every endpoint is one row of :data:`ROUTES`: a name (used in request counters), the methods, a pattern on the
raw (still percent-encoded) URL path, and the handler. Pattern groups are decoded before the handler sees
them; a ``revpath`` group is split into ``rev`` and ``path``, because a revision may contain slashes
(``refs/pr/1``), percent-encoded or not.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

from . import routes_files, routes_refs, routes_repo, routes_tree, routes_upload
from .context import HubContext
from .protocol import ApiError, Request, Response

logger = logging.getLogger(__name__)

Handler = Callable[[HubContext, Request], Response]

_REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_API = rf"/api/models/{_REPO}"


@dataclass(frozen=True)
class Route:
    """One endpoint: ``name`` (for counters), accepted ``methods``, a full-match ``pattern``, ``handler``."""

    name: str
    methods: tuple[str, ...]
    pattern: re.Pattern[str]
    handler: Handler


def _route(name: str, methods: str, pattern: str, handler: Handler) -> Route:
    return Route(name, tuple(methods.split()), re.compile(pattern), handler)


ROUTES: tuple[Route, ...] = (
    _route("whoami", "GET", r"/api/whoami-v2", routes_repo.whoami),
    _route("create_repo", "POST", r"/api/repos/create", routes_repo.create_repo),
    _route("delete_repo", "DELETE", r"/api/repos/delete", routes_repo.delete_repo),
    _route("validate_yaml", "POST", r"/api/validate-yaml", routes_repo.validate_yaml),
    _route("lfs_upload", "PUT", r"/api/lfs-upload/(?P<oid>[0-9a-f]{64})", routes_upload.lfs_upload),
    _route("model_info", "GET", _API, routes_repo.model_info),
    _route("model_info", "GET", rf"{_API}/revision/(?P<rev>.+)", routes_repo.model_info),
    _route("settings", "PUT", rf"{_API}/settings", routes_repo.update_settings),
    _route("grant_access", "POST", rf"{_API}/user-access-request/grant", routes_repo.grant_access),
    _route("tree", "GET", rf"{_API}/tree/(?P<revpath>.+)", routes_tree.list_tree),
    _route("paths_info", "POST", rf"{_API}/paths-info/(?P<rev>.+)", routes_tree.paths_info),
    _route("refs", "GET", rf"{_API}/refs", routes_refs.list_refs),
    _route("commits", "GET", rf"{_API}/commits/(?P<rev>.+)", routes_refs.list_commits),
    _route("create_branch", "POST", rf"{_API}/branch/(?P<branch>.+)", routes_refs.create_branch),
    _route("delete_branch", "DELETE", rf"{_API}/branch/(?P<branch>.+)", routes_refs.delete_branch),
    _route("create_tag", "POST", rf"{_API}/tag/(?P<rev>.+)", routes_refs.create_tag),
    _route("delete_tag", "DELETE", rf"{_API}/tag/(?P<rev>.+)", routes_refs.delete_tag),
    _route("preupload", "POST", rf"{_API}/preupload/(?P<rev>.+)", routes_upload.preupload),
    _route("commit", "POST", rf"{_API}/commit/(?P<rev>.+)", routes_upload.commit),
    _route(
        "lfs_batch",
        "POST",
        r"/(?P<ns>[^/]+)/(?P<name>[^/]+?)\.git/info/lfs/objects/batch",
        routes_upload.lfs_batch,
    ),
    _route(
        "lfs_verify",
        "POST",
        r"/(?P<ns>[^/]+)/(?P<name>[^/]+?)\.git/info/lfs/objects/verify",
        routes_upload.lfs_verify,
    ),
    _route("resolve", "GET HEAD", rf"/{_REPO}/(?:resolve|raw)/(?P<revpath>.+)", routes_files.resolve_file),
    _route("cdn", "GET HEAD", r"/cdn/(?P<oid>[0-9a-f]{64})", routes_files.cdn_file),
)

_REF_NAMESPACES = ("heads", "tags", "pr", "convert")


def split_revision(raw: str) -> tuple[str, str]:
    """Split ``{revision}/{path}`` as found in a URL into a decoded revision and path.

    Args:
        raw: The percent-encoded remainder of the URL path.

    Returns:
        ``(revision, path)``; ``path`` is ``""`` when absent.
    """
    parts = raw.split("/")
    count = 3 if len(parts) >= 3 and parts[0] == "refs" and parts[1] in _REF_NAMESPACES else 1
    return unquote("/".join(parts[:count])), "/".join(unquote(part) for part in parts[count:])


def dispatch(ctx: HubContext, req: Request) -> Response:
    """Route a request to its handler.

    Args:
        ctx: Server state.
        req: The request (``user`` not yet set).

    Returns:
        The handler's response.

    Raises:
        ApiError: 404 for an unknown path, 405 for a known path with another method, 401 for a bad token, and
            whatever the handler raises.
    """
    allowed: list[str] = []
    for route in ROUTES:
        match = route.pattern.fullmatch(req.path)
        if match is None:
            continue
        if req.method not in route.methods:
            allowed.extend(route.methods)
            continue
        params = {key: unquote(value) for key, value in match.groupdict().items() if key != "revpath"}
        if "revpath" in match.groupdict():
            params["rev"], params["path"] = split_revision(match.group("revpath"))
        req.params = params
        req.user = ctx.accounts.user_for(req.header("Authorization"))
        ctx.stats.count_request(route.name)
        return route.handler(ctx, req)
    if allowed:
        raise ApiError(
            405,
            f"{req.method} is not allowed on {req.path} (allowed: {', '.join(allowed)})",
            headers={"Allow": ", ".join(allowed)},
        )
    raise ApiError(
        404,
        f"Not found: {req.method} {req.path} is not an endpoint of this Hub server "
        "(it serves model repositories only)",
    )
