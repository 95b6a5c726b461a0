"""The request body: read once, in chunks or lines, framed by ``Content-Length`` or chunked encoding.

Handlers read exactly what they need (a JSON object, NDJSON lines, a stream of upload chunks); the server then
drains what is left so the keep-alive connection can carry the next request.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

from .protocol import ApiError

CHUNK_SIZE = 1 << 20
"""File bodies are streamed in chunks of this size, in both directions."""

MAX_JSON_BODY = 64 << 20
"""Largest JSON body (and largest NDJSON line) accepted, in bytes."""


class Body:
    """A request body, read once, framed by ``Content-Length`` or ``Transfer-Encoding: chunked``.

    Args:
        stream: The connection's buffered reader, positioned at the start of the body.
        length: The ``Content-Length``, or ``None`` when absent.
        chunked: Whether the body uses chunked transfer encoding.
    """

    def __init__(self, stream: io.BufferedIOBase, length: int | None, chunked: bool) -> None:
        self._stream = stream
        self._chunked = chunked
        self._remaining = 0 if chunked else (length or 0)
        self._eof = not chunked and not length
        self._buffer = b""

    @property
    def exhausted(self) -> bool:
        """Whether every byte of the body has been consumed."""
        return self._eof and not self._buffer

    def _next_chunk_header(self) -> None:
        line = self._stream.readline(1024)
        try:
            size = int(line.split(b";")[0].strip(), 16)
        except ValueError:
            raise ApiError(400, f"malformed chunk header {line[:40]!r} in chunked request body") from None
        if size == 0:
            while self._stream.readline(1024) not in (b"\r\n", b"\n", b""):
                pass  # trailers carry nothing we use
            self._eof = True
        self._remaining = size

    def _ready(self) -> int:
        """Bytes of the current chunk (or of the whole body) left to read; 0 at the end of the body."""
        if self._eof:
            return 0
        if self._chunked and self._remaining == 0:
            self._next_chunk_header()
            if self._eof:
                return 0
        return self._remaining

    def _consumed(self, n: int) -> None:
        if not n:
            raise ApiError(400, "the request body ended before its announced length")
        self._remaining -= n
        if self._remaining == 0:
            if self._chunked:
                self._stream.readline(16)  # the CRLF that closes every chunk
            else:
                self._eof = True

    def _read_raw(self, size: int) -> bytes:
        if not (ready := self._ready()):
            return b""
        data = self._stream.read(min(size, ready))
        self._consumed(len(data))
        return data

    def _readinto_raw(self, buf: memoryview) -> int:
        if not (ready := self._ready()):
            return 0
        n = self._stream.readinto(buf[: min(len(buf), ready)]) or 0
        self._consumed(n)
        return n

    def read(self, size: int = CHUNK_SIZE) -> bytes:
        """Read up to ``size`` bytes; ``b""`` at the end of the body.

        Args:
            size: Maximum number of bytes to return.

        Returns:
            The next bytes of the body.
        """
        if self._buffer:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
            return data
        return self._read_raw(size)

    def iter_views(self) -> Iterator[memoryview]:
        """Yield the rest of the body in pieces of at most :data:`CHUNK_SIZE` bytes, read into one buffer.

        Each piece is a view of the same buffer, valid until the next is asked for: no allocation per
        piece (for a large upload, fresh 1 MiB chunks each cost page faults as well as the copy).

        Returns:
            An iterator over the pieces.
        """
        buf = memoryview(bytearray(CHUNK_SIZE))
        while True:
            if self._buffer:
                n = min(len(buf), len(self._buffer))
                buf[:n], self._buffer = self._buffer[:n], self._buffer[n:]
            else:
                n = self._readinto_raw(buf)
            if not n:
                return
            yield buf[:n]

    def iter_chunks(self) -> Iterator[bytes]:
        """Yield the rest of the body in chunks of at most :data:`CHUNK_SIZE` bytes.

        Returns:
            An iterator over the chunks.
        """
        while chunk := self.read(CHUNK_SIZE):
            yield chunk

    def readline(self, limit: int = MAX_JSON_BODY) -> bytes:
        """Read one line, newline included (the last line may lack it).

        Args:
            limit: Longest line accepted.

        Returns:
            The line, or ``b""`` at the end of the body.

        Raises:
            ApiError: 413 when the line is longer than ``limit``.
        """
        while b"\n" not in self._buffer and not self._eof:
            if len(self._buffer) > limit:
                raise ApiError(413, f"a line of the request body is longer than {limit} bytes")
            self._buffer += self._read_raw(CHUNK_SIZE)
        end = self._buffer.find(b"\n") + 1 or len(self._buffer)
        line, self._buffer = self._buffer[:end], self._buffer[end:]
        return line

    def read_all(self, limit: int = MAX_JSON_BODY) -> bytes:
        """Read the whole remaining body.

        Args:
            limit: Largest body accepted.

        Returns:
            The bytes.

        Raises:
            ApiError: 413 when the body is larger than ``limit``.
        """
        parts: list[bytes] = []
        total = 0
        for chunk in self.iter_chunks():
            total += len(chunk)
            if total > limit:
                raise ApiError(413, f"request body larger than {limit} bytes")
            parts.append(chunk)
        return b"".join(parts)

    def json(self) -> object:
        """Parse the body as JSON; an empty body reads as ``{}``.

        Returns:
            The decoded value.

        Raises:
            ApiError: 400 when the body is not valid JSON.
        """
        raw = self.read_all()
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"request body is not valid JSON: {exc}") from None

    def drain(self, limit: int) -> bool:
        """Discard what is left of the body, so the connection can carry the next request.

        Args:
            limit: Most bytes worth reading just to throw them away.

        Returns:
            True when the body was consumed, False when more than ``limit`` bytes remained (the
            connection must then be closed).
        """
        discarded = 0
        try:
            while discarded <= limit and (chunk := self.read(CHUNK_SIZE)):
                discarded += len(chunk)
        except (ApiError, OSError):
            return False
        return self.exhausted
