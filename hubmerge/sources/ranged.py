"""Ranged GETs read straight from the socket into the caller's buffer, over keep-alive connections per thread.

huggingface_hub's httpx session hands a body over in chunks, each one then copied into the read buffer: about
1 s of CPU per GB here, as much as the merge itself. ``http.client``'s ``readinto`` fills the buffer from the
socket with no chunk objects in between: about 0.3 s per GB. The Hub source reads tensor bytes this way and
hands any request this client does not handle to the session, whose errors huggingface_hub maps as for every
other request. Exceptions:

    Fallback              the request needs the session: a proxy, an answer other than 200/206, an encoded
                          body, a Content-Range other than the one asked for, TLS that does not set up
    ConnectionError       the connection was lost or the body came short (an OSError: the caller retries)
    TimeoutError          the server went silent for longer than the download timeout (also an OSError)

The Hub answers a file's URL with a redirect to a signed URL on its CDN. Where a read was redirected, the
next reads of that URL go straight to the target (for ``LOCATION_TTL`` seconds): one round trip per range
instead of two. A target that stops serving (its signature expired: any answer but 200/206) is forgotten,
and the read asks the Hub again.

Large bodies over plain HTTP are read with ``SO_RCVLOWAT`` at ``LOWAT``: the reading thread wakes once per
half MiB that has arrived instead of once per packet train, which saves about a quarter of the CPU a GB
costs at both ends (client 0.23 -> 0.19 s, local server 0.30 -> 0.21 s per GB over loopback). A silent
server then looks silent until ``LOWAT`` bytes have come, so a connection gets it only after a previous
body on it arrived at ``FAST`` or more: at that rate half a MiB takes 50 ms, far inside any timeout. TLS
connections never get it (the TLS library decides how much it asks the socket for).
"""

from __future__ import annotations

import http.client
import logging
import os
import re
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Mapping
from urllib.parse import urljoin, urlsplit

log = logging.getLogger(__name__)

REDIRECTS = 5
LOCATION_TTL = 600.0  # seconds a redirect's target serves later ranges of the same URL without asking again
LOWAT = 512 << 10  # SO_RCVLOWAT while most of a large body is still to come
FAST = 10e6  # bytes per second a connection's previous body must have arrived at to be read that way
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
Origin = tuple[str, str]  # (scheme, host[:port])


class Fallback(Exception):
    """This request must go through huggingface_hub's session; the message says why."""


class _Stale(Exception):
    """A remembered redirect target no longer serves the file (its signature expired): ask the Hub again."""


def enabled() -> bool:
    """Whether direct reads are on (``HUBMERGE_HUB_DIRECT=0`` turns them off)."""
    return os.environ.get("HUBMERGE_HUB_DIRECT", "1") != "0"


def _tls_context() -> ssl.SSLContext:
    # The CA bundle httpx uses: SSL_CERT_FILE if set, else certifi's (an httpx dependency), else the system's.
    cafile = os.environ.get("SSL_CERT_FILE")
    if not cafile:
        try:
            import certifi

            cafile = certifi.where()
        except ImportError:
            cafile = None
    return ssl.create_default_context(cafile=cafile)


class RangeClient:
    """Reads byte ranges of URLs into buffers; one keep-alive connection per origin and thread.

    Args:
        headers: sent with every request (user agent, authorization); ``Authorization`` only to the origin of
            the first URL of a request, never across a redirect to another origin.
        timeout: seconds a connection may wait on the server before the read fails.
    """

    def __init__(self, headers: Mapping[str, str], timeout: float) -> None:
        self.headers = dict(headers)
        self.timeout = timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[http.client.HTTPConnection] = []
        self._direct: dict[Origin, bool] = {}
        self._tls: ssl.SSLContext | None = None
        # URL -> (where it last redirected to, when): the Hub answers a file's URL with a redirect to a signed
        # CDN URL, which serves every later range of it without that round trip to the Hub.
        self._located: dict[str, tuple[str, float]] = {}
        self._closed = False

    def read_into(self, url: str, start: int, buf: memoryview) -> None:
        """Fill ``buf`` with bytes ``[start, start + len(buf))`` of ``url``.

        Raises:
            Fallback: the request must go through huggingface_hub's session instead.
            ConnectionError: the connection was lost or the body came short; the caller may retry.
            TimeoutError: the server sent nothing for ``timeout`` seconds.
        """
        with self._lock:
            if self._closed:
                raise ConnectionError("the range client is closed")
            located, when = self._located.get(url, ("", 0.0))
        if located and time.monotonic() - when < LOCATION_TTL:
            try:
                self._read_into(url, located, start, buf)
                return
            except _Stale:
                with self._lock:
                    self._located.pop(url, None)
        self._read_into(url, url, start, buf)

    def _read_into(self, asked: str, url: str, start: int, buf: memoryview) -> None:
        """:meth:`read_into` of ``asked``, starting at ``url`` (``asked``, or where it last redirected to)."""
        headers = self.headers | {
            "Range": f"bytes={start}-{start + len(buf) - 1}",
            "Accept-Encoding": "identity",
        }
        first, remembered = _origin(asked), url != asked
        for _ in range(REDIRECTS + 1):
            origin = _origin(url)
            # The token is for the Hub's own host only (huggingface_hub spells the header in lower case).
            if origin != first:
                headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            response, conn = self._get(origin, url, headers)
            if response.status in (301, 302, 303, 307, 308) and response.getheader("Location"):
                location = response.getheader("Location", "")
                response.read(1 << 16)  # a redirect's body is a line of text; read it to keep the connection
                self._finish(response, conn)
                url = urljoin(url, location)
                continue
            if remembered and response.status not in (200, 206):
                self._drop(conn)
                raise _Stale(f"HTTP {response.status}")
            fast: set[http.client.HTTPConnection] = self._local.__dict__.setdefault("fast", set())
            began = time.perf_counter()
            try:
                self._check(response, start, len(buf))
                _fill(response, buf, conn.sock if conn in fast else None)
            except BaseException:
                self._drop(conn)
                raise
            if len(buf) >= 4 * LOWAT and not isinstance(conn.sock, ssl.SSLSocket):
                if len(buf) >= FAST * (time.perf_counter() - began):
                    fast.add(conn)
                else:
                    fast.discard(conn)
            self._finish(response, conn)
            if url != asked and not remembered:  # the age counts from when the Hub gave the target
                with self._lock:
                    self._located[asked] = (url, time.monotonic())
            return
        raise Fallback(f"more than {REDIRECTS} redirects")

    def close(self) -> None:
        """Close every connection this client opened, on any thread; later reads fail.

        A read under way on another thread fails at once with a ConnectionError, whatever the server does:
        each socket is shut down first (closing it alone leaves a ``recv`` waiting out the timeout).
        """
        with self._lock:
            conns, self._all, self._closed = self._all, [], True
        for conn in conns:
            conn.auto_open = 0  # http.client would connect again for the next request on it
            sock = conn.sock  # once: the thread using it may drop it meanwhile
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # not connected (any more): reset by the server, say
            try:
                conn.close()
            except OSError:
                pass

    def _get(
        self, origin: Origin, url: str, headers: dict[str, str]
    ) -> tuple[http.client.HTTPResponse, http.client.HTTPConnection]:
        """Send the request on this thread's connection to ``origin`` (or a new one); read the status line."""
        if self._closed:  # each request of a redirect chain, too
            raise ConnectionError("the range client is closed")
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        pool: dict[Origin, http.client.HTTPConnection] = self._local.__dict__.setdefault("pool", {})
        reused = origin in pool
        conn = pool.get(origin) or self._connect(origin)
        pool[origin] = conn
        try:
            conn.request("GET", target, headers=headers)
            response = conn.getresponse()
            if self._closed:  # closed while connecting (close() cannot wake a TLS handshake)
                response.close()
                raise ConnectionError("the range client is closed")
            return response, conn
        except ssl.SSLError as exc:
            self._drop(conn)
            raise Fallback(f"TLS: {exc}") from None
        except (ConnectionError, http.client.HTTPException) as exc:
            self._drop(conn)
            if reused:  # the server closed an idle keep-alive connection: once more on a new one
                return self._get(origin, url, headers)
            raise ConnectionError(f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            self._drop(conn)
            raise

    def _connect(self, origin: Origin) -> http.client.HTTPConnection:
        scheme, netloc = origin
        if origin not in self._direct:
            proxies = urllib.request.getproxies()
            host = urlsplit(f"{scheme}://{netloc}").hostname or ""
            self._direct[origin] = scheme not in proxies or bool(urllib.request.proxy_bypass(host))
        if not self._direct[origin]:
            raise Fallback(f"a proxy is set for {scheme}")
        conn: http.client.HTTPConnection
        if scheme == "https":
            if self._tls is None:
                self._tls = _tls_context()
            conn = http.client.HTTPSConnection(netloc, timeout=self.timeout, context=self._tls)
        elif scheme == "http":
            conn = http.client.HTTPConnection(netloc, timeout=self.timeout)
        else:
            raise Fallback(f"scheme {scheme!r}")
        with self._lock:
            if self._closed:
                raise ConnectionError("the range client is closed")
            self._all.append(conn)
        return conn

    def _check(self, response: http.client.HTTPResponse, start: int, length: int) -> None:
        encoding = response.getheader("Content-Encoding", "identity") or "identity"
        if encoding != "identity":
            raise Fallback(f"the body is {encoding}-encoded")
        if response.status == 206:
            match = _CONTENT_RANGE.fullmatch(response.getheader("Content-Range", "").strip())
            if match is None or int(match[1]) != start or int(match[2]) != start + length - 1:
                raise Fallback(f"Content-Range {response.getheader('Content-Range')!r}")
        elif not (response.status == 200 and start == 0 and response.length == length):
            raise Fallback(f"HTTP {response.status}")

    def _finish(self, response: http.client.HTTPResponse, conn: http.client.HTTPConnection) -> None:
        """Keep the connection if the response is read to its end and the server keeps it open."""
        if response.will_close or not response.isclosed():
            self._drop(conn)

    def _drop(self, conn: http.client.HTTPConnection) -> None:
        pool: dict[Origin, http.client.HTTPConnection] = self._local.__dict__.get("pool", {})
        for origin, held in list(pool.items()):
            if held is conn:
                del pool[origin]
        self._local.__dict__.get("fast", set()).discard(conn)
        with self._lock:
            if conn in self._all:
                self._all.remove(conn)
        conn.close()


def _origin(url: str) -> Origin:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _fill(response: http.client.HTTPResponse, buf: memoryview, sock: socket.socket | None = None) -> None:
    """Read the body into ``buf``; with ``sock``, most of a large one under ``SO_RCVLOWAT`` (see above)."""
    view, pos = memoryview(buf), 0
    try:
        if sock is not None and len(buf) >= 4 * LOWAT:
            # Up to 2 * LOWAT before the end only: every recv there (at most the rest plus the reader's 8 KiB
            # buffer) asks for bytes that are still to come, so none waits on bytes that never will.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, LOWAT)
            try:
                pos = _read(response, view, pos, len(buf) - 2 * LOWAT)
            finally:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                except OSError:
                    pass  # the connection is gone: it is dropped
        _read(response, view, pos, len(buf))
    except http.client.HTTPException as exc:
        raise ConnectionError(f"{type(exc).__name__}: {exc}") from None
    finally:
        view.release()


def _read(response: http.client.HTTPResponse, view: memoryview, pos: int, stop: int) -> int:
    while pos < stop:
        n = response.readinto(view[pos:stop])
        if not n:
            raise ConnectionError(f"short read: got {pos} of {len(view)} bytes")
        pos += n
    return pos
