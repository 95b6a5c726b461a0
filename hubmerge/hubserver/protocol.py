"""HTTP-level types the route handlers share: the request, the response and API errors.

Handlers never touch sockets: they get a :class:`Request` and return a :class:`Response` (or raise
:class:`ApiError`), and ``server.py`` turns that into bytes on the wire. Keeping the wire out of the handlers
is what lets every route be read top to bottom.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .body import Body


class ApiError(Exception):
    """An error answered to the client as ``{"error": message}``.

    Args:
        status: HTTP status code.
        message: Human-readable message; also sent in the ``X-Error-Message`` header.
        code: Value of the ``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``,
            ``GatedRepo``), which huggingface_hub maps to its typed exceptions.
        headers: Extra response headers (e.g. ``X-Repo-Commit`` on a missing file).
        extra: Extra keys merged into the JSON body (e.g. ``url`` on a 409 from repo creation).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})


@dataclass(frozen=True)
class FileBody:
    """A byte range of a file on disk, to be streamed as the response body."""

    path: Path
    start: int
    length: int


@dataclass
class Response:
    """What a route handler answers.

    ``stats_key`` marks a file download: the bytes of ``file`` actually sent are counted under that key.
    """

    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: FileBody | None = None
    stats_key: str | None = None

    @property
    def content_length(self) -> int:
        """Number of body bytes a GET answer carries."""
        return self.file.length if self.file is not None else len(self.body)


def json_response(data: object, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    """Build a JSON response.

    Args:
        data: Anything ``json.dumps`` accepts.
        status: HTTP status code.
        headers: Extra headers.

    Returns:
        The response, with ``Content-Type: application/json``.
    """
    all_headers = {"Content-Type": "application/json; charset=utf-8", **(headers or {})}
    return Response(status=status, headers=all_headers, body=json.dumps(data).encode())


def error_response(error: ApiError) -> Response:
    """Turn an :class:`ApiError` into the JSON response the Hub would send.

    Args:
        error: The error raised by a handler.

    Returns:
        A response with ``{"error": message}`` and the ``X-Error-Code`` / ``X-Error-Message`` headers.
    """
    headers = dict(error.headers)
    # Header values must be latin-1 and single-line; the JSON body keeps the exact message.
    text = error.message.encode("ascii", "replace").decode()
    headers["X-Error-Message"] = "".join(c if 32 <= ord(c) < 127 else " " for c in text)  # no CR, LF, ...
    if error.code is not None:
        headers["X-Error-Code"] = error.code
    return json_response({"error": error.message, **error.extra}, status=error.status, headers=headers)


@dataclass
class Request:
    """One parsed HTTP request, as route handlers see it.

    ``headers`` has lower-case names (read them with :meth:`header`); ``params`` holds the URL parts the route
    pattern captured, already percent-decoded; ``user`` is the authenticated user name, or ``None`` for an
    anonymous request.
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: Mapping[str, str]
    body: Body
    base_url: str
    user: str | None = None
    params: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        """A request header, by case-insensitive name.

        Args:
            name: Header name.

        Returns:
            Its value, or ``None`` when absent.
        """
        return self.headers.get(name.lower())

    def arg(self, name: str, default: str | None = None) -> str | None:
        """The first value of query parameter ``name`` (``name[]`` is accepted too).

        Args:
            name: Parameter name.
            default: Returned when the parameter is absent.

        Returns:
            The value, or ``default``.
        """
        values = self.query.get(name) or self.query.get(f"{name}[]")
        return values[0] if values else default

    def args(self, name: str) -> list[str]:
        """Every value of query parameter ``name``, including those sent as ``name[]``.

        Args:
            name: Parameter name.

        Returns:
            The values, possibly empty.
        """
        return [*self.query.get(name, []), *self.query.get(f"{name}[]", [])]

    def flag(self, name: str) -> bool:
        """Whether query parameter ``name`` is set to a true value (``1``, ``true``, ``yes``).

        Args:
            name: Parameter name.

        Returns:
            The boolean.
        """
        return is_true(self.arg(name))


def is_true(value: object) -> bool:
    """Read a loosely typed boolean as sent by clients (``True``, ``"true"``, ``"1"``...).

    Args:
        value: The raw value.

    Returns:
        The boolean.
    """
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class RangeNotSatisfiable(ValueError):
    """The ``Range`` header asks for bytes outside the file."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Interpret a ``Range`` request header against a file of ``size`` bytes.

    Supports one range of the forms ``bytes=a-b``, ``bytes=a-`` and ``bytes=-n``. Anything else (no header,
    another unit, several ranges, a malformed value) is ignored, as RFC 9110 allows: the whole file is served.

    Args:
        header: The header value, or ``None``.
        size: The file size.

    Returns:
        ``(start, end)`` with ``end`` exclusive, or ``None`` for the whole file.

    Raises:
        RangeNotSatisfiable: When the range starts at or beyond the end of the file, or asks for 0 bytes.
    """
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = (part.strip() for part in spec.partition("-"))
    malformed = (first and not first.isdigit()) or (last and not last.isdigit()) or not (first or last)
    if not dash or malformed:
        return None
    if not first:  # suffix range: the last n bytes
        length = int(last)
        if length == 0 or size == 0:
            raise RangeNotSatisfiable(header)
        return max(size - length, 0), size
    start = int(first)
    if last and int(last) < start:
        return None  # an invalid range is ignored, not refused
    if start >= size:
        raise RangeNotSatisfiable(header)
    return start, min(int(last) + 1, size) if last else size
