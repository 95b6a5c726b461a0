"""Who is asking, and what they may see or change.

The rules, kept as simple as the Hub's basics:

* a token maps to a user; a user owns the namespace of their name and of every organisation they belong to;
* a public repository is readable by anyone, a private one only by its namespace's members, and anyone else is
  told the repository does not exist (401 without a token, 404 with one), never that it is private;
* a gated repository's metadata is public but its files are not: only members and granted users download them;
* writing needs membership of the namespace.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .protocol import ApiError
from .repos import RepoMeta

INVALID_CREDENTIALS = "Invalid credentials in Authorization header"


def repo_not_found(repo_id: str, user: str | None) -> ApiError:
    """The error for a repository that is missing or that ``user`` may not see (the two look the same).

    Args:
        repo_id: ``namespace/name``.
        user: The caller, ``None`` when anonymous.

    Returns:
        A 401 (anonymous) or 404 error with ``X-Error-Code: RepoNotFound``.
    """
    hint = "" if user else " (no token was sent: if it is private, send a token with access)"
    return ApiError(
        401 if user is None else 404, f"Repository {repo_id} not found{hint}", code="RepoNotFound"
    )


@dataclass(frozen=True)
class Accounts:
    """Tokens, users and organisations.

    Args:
        tokens: Token -> user name.
        orgs: Organisation -> member user names.
    """

    tokens: Mapping[str, str]
    orgs: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def build(
        cls, tokens: Mapping[str, str] | None, orgs: Mapping[str, Iterable[str]] | None = None
    ) -> Accounts:
        """Create accounts from plain mappings.

        Args:
            tokens: Token -> user name.
            orgs: Organisation -> member user names.

        Returns:
            The accounts.
        """
        return cls(dict(tokens or {}), {org: frozenset(members) for org, members in (orgs or {}).items()})

    def user_for(self, authorization: str | None) -> str | None:
        """Authenticate a request from its ``Authorization`` header.

        Args:
            authorization: The header value, ``None`` when absent.

        Returns:
            The user name, or ``None`` for an anonymous request.

        Raises:
            ApiError: 401 when a token is sent but unknown (the Hub refuses those even on public repos).
        """
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise ApiError(401, INVALID_CREDENTIALS)
        return user

    def orgs_of(self, user: str) -> list[str]:
        """Organisations ``user`` belongs to.

        Args:
            user: A user name.

        Returns:
            Organisation names, sorted.
        """
        return sorted(org for org, members in self.orgs.items() if user in members)

    def is_member(self, user: str | None, namespace: str) -> bool:
        """Whether ``user`` owns ``namespace`` (their own name or one of their organisations).

        Args:
            user: A user name, or ``None``.
            namespace: A namespace.

        Returns:
            The answer.
        """
        return user is not None and (user == namespace or user in self.orgs.get(namespace, frozenset()))

    def check_read(self, meta: RepoMeta | None, repo_id: str, user: str | None) -> RepoMeta:
        """Require that ``user`` may see the repository (its metadata, refs and listings).

        Args:
            meta: The repository, ``None`` when it does not exist.
            repo_id: ``namespace/name``.
            user: The caller.

        Returns:
            ``meta``.

        Raises:
            ApiError: RepoNotFound when it does not exist or is private to someone else.
        """
        if meta is None or (meta.private and not self.is_member(user, meta.namespace)):
            raise repo_not_found(repo_id, user)
        return meta

    def check_download(self, meta: RepoMeta | None, repo_id: str, user: str | None) -> RepoMeta:
        """Require that ``user`` may download the repository's files.

        Args:
            meta: The repository, ``None`` when it does not exist.
            repo_id: ``namespace/name``.
            user: The caller.

        Returns:
            ``meta``.

        Raises:
            ApiError: RepoNotFound as for :meth:`check_read`; GatedRepo (401 anonymous, 403 otherwise) when
                it is gated and ``user`` is neither a member nor granted access.
        """
        meta = self.check_read(meta, repo_id, user)
        if meta.gated and not self.is_member(user, meta.namespace) and user not in meta.granted:
            message = (
                f"Access to model {repo_id} is restricted. You must have access to it and be authenticated"
            )
            raise ApiError(401 if user is None else 403, message, code="GatedRepo")
        return meta

    def check_write(self, meta: RepoMeta | None, repo_id: str, user: str | None) -> RepoMeta:
        """Require that ``user`` may change the repository.

        Args:
            meta: The repository, ``None`` when it does not exist.
            repo_id: ``namespace/name``.
            user: The caller.

        Returns:
            ``meta``.

        Raises:
            ApiError: RepoNotFound as for :meth:`check_read`; 403 when ``user`` may see it but not write.
        """
        meta = self.check_read(meta, repo_id, user)
        if not self.is_member(user, meta.namespace):
            raise ApiError(
                403,
                f"You don't have the rights to write to {repo_id}: only members of "
                f"'{meta.namespace}' can (authenticated as {user or 'nobody'})",
            )
        return meta

    def whoami(self, user: str) -> dict[str, object]:
        """The ``/api/whoami-v2`` answer for ``user``.

        Args:
            user: An authenticated user name.

        Returns:
            The JSON-able description.
        """
        return {
            "type": "user",
            "id": user,
            "name": user,
            "fullname": user,
            "email": None,
            "emailVerified": False,
            "isPro": False,
            "orgs": [
                {"type": "org", "name": org, "fullname": org, "roleInOrg": "write"}
                for org in self.orgs_of(user)
            ],
            "auth": {
                "type": "access_token",
                "accessToken": {"displayName": f"{user}-token", "role": "write"},
            },
        }
