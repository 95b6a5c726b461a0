"""The HTTP server: one thread per connection, HTTP/1.1 keep-alive, ``TCP_NODELAY``.

Why ``TCP_NODELAY``: ``http.server`` writes the headers and the body of a response in separate ``send`` calls.
On a reused connection, Nagle's algorithm then holds the body back until the client's delayed ACK for the
headers arrives, about 40 ms per request. Disabling Nagle makes a small API call take about 1 ms.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import parse_qs, urlsplit

from ..errors import stop_handled, stop_signals
from .app import dispatch
from .auth import Accounts
from .body import Body
from .context import HubContext, ServerStats
from .protocol import ApiError, Request, Response, error_response, json_response

logger = logging.getLogger(__name__)

_DRAIN_LIMIT = 1 << 20
_IDLE_TIMEOUT_S = 300


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hubmerge-hubserver"
    timeout = _IDLE_TIMEOUT_S
    server: _Server

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _serve(self) -> None:
        url = urlsplit(self.path)
        headers = {name.lower(): value for name, value in self.headers.items()}
        length = headers.get("content-length", "")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        body = Body(self.rfile, int(length) if length.isdigit() else None, chunked)
        host = headers.get("host") or f"{self.server.server_name}:{self.server.server_port}"  # HTTP/1.0
        try:
            request = Request(
                self.command,
                url.path,
                parse_qs(url.query, keep_blank_values=True),
                headers,
                body,
                base_url=f"http://{host}",
            )
            response = dispatch(self.server.context, request)
        except ApiError as exc:
            response = error_response(exc)
        except Exception:
            logger.exception("hub server: %s %s failed", self.command, self.path)
            response = json_response({"error": "internal server error (see the server log)"}, status=500)
        if not body.drain(_DRAIN_LIMIT):
            self.close_connection = True
        self._send(response)

    def _send(self, response: Response) -> None:
        source, start = None, 0
        if response.file is not None and self.command != "HEAD":
            try:  # opened before the status line goes out, so a missing blob still gets a proper error
                source, start = response.file.path.open("rb"), response.file.start
            except OSError:
                logger.exception("hub server: cannot open %s for %s", response.file.path, self.path)
                response = json_response({"error": "stored file is missing (see the server log)"}, status=500)
        self.send_response(response.status)
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(response.content_length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if source is None:
            if self.command != "HEAD":
                self.wfile.write(response.body)
            return
        with source:
            self._stream(source, start, response.content_length, response.stats_key)

    def _stream(self, source: BinaryIO, start: int, length: int, stats_key: str | None) -> None:
        """Send ``length`` bytes of ``source`` from ``start`` by ``sendfile``: no copy through Python."""
        if stats_key is not None:
            # Counted before the send: once the client has the last byte, the count is complete.
            self.server.context.stats.add_bytes(stats_key, length)
        try:
            sent = self.connection.sendfile(source, offset=start, count=length)
        except OSError:
            self.close_connection = True  # the client went away: end the connection
            raise
        if sent != length:
            self.close_connection = True
            raise OSError(f"{source.name} is shorter than its recorded size")

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("hub server: " + format, *args)


class _Server(ThreadingHTTPServer):
    """Tracks its connections so that :meth:`close_connections` can end idle keep-alive ones on shutdown."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], context: HubContext) -> None:
        self.context = context
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._connections_lock:
            self._connections.add(connection)
        return connection, address

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("hub server: connection from %s ended with an error", client_address, exc_info=True)

    def close_connections(self) -> None:
        """Shut down every open connection; their threads then see end-of-stream and close them."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by its thread


class HubServer:
    """A Hub-compatible HTTP server over a storage folder, run in a background thread.

    Args:
        root: Storage folder (created if missing); repositories persist there across restarts.
        host: Interface to listen on.
        port: Port; 0 picks a free one (read it back from :attr:`url`).
        tokens: Token -> user name.
        orgs: Organisation -> member user names (members may write to the organisation's namespace).
        cdn_ttl: When over 0, LFS files are answered with a redirect to a signed URL valid this many seconds,
            as huggingface.co redirects them to its CDN (``routes_files``); 0 serves them directly.

    Example::

        with HubServer(tmp_path, tokens={"tok": "alice"}) as hub:
            HfApi(endpoint=hub.url, token="tok").create_repo("alice/demo")
    """

    def __init__(
        self,
        root: Path | str,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: Mapping[str, str] | None = None,
        orgs: Mapping[str, Iterable[str]] | None = None,
        cdn_ttl: int = 0,
    ) -> None:
        self.root = Path(root)
        self.host = host
        self.port = port
        self.context = HubContext(self.root, Accounts.build(tokens, orgs), cdn_ttl=cdn_ttl)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._cdn: _Server | None = None
        self._cdn_thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL clients use as ``HF_ENDPOINT``, e.g. ``http://127.0.0.1:43817``.

        Raises:
            RuntimeError: Before :meth:`start`.
        """
        if self._server is None:
            raise RuntimeError("HubServer.url is known once the server is started: call start() first")
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(self.host, self.host)
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"http://{host}:{self._server.server_address[1]}"

    def start(self) -> HubServer:
        """Bind the port and serve in a daemon thread.

        Returns:
            The server itself.

        Raises:
            RuntimeError: When already started.
            OSError: When the port cannot be bound.
        """
        if self._server is not None:
            raise RuntimeError("HubServer is already running")
        self._server = _Server((self.host, self.port), self.context)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"hubserver-{self.url}", daemon=True
        )
        self._thread.start()
        if self.context.cdn_ttl > 0:
            # The "CDN" LFS files redirect to: another port, so another origin, as on the Hub (clients keep
            # the token from it, and do not follow a HEAD's redirect to it).
            self._cdn = _Server((self.host, 0), self.context)
            self.context.cdn_port = self._cdn.server_address[1]
            self._cdn_thread = threading.Thread(
                target=self._cdn.serve_forever, name="hubserver-cdn", daemon=True
            )
            self._cdn_thread.start()
        logger.info("hub server listening on %s (storage: %s)", self.url, self.root)
        return self

    def stop(self) -> None:
        """Stop serving, end open connections and release the ports. Safe to call twice."""
        for server, thread in ((self._server, self._thread), (self._cdn, self._cdn_thread)):
            if server is None or thread is None:
                continue
            server.shutdown()
            thread.join()
            server.close_connections()
            server.server_close()
        self._server = self._thread = self._cdn = self._cdn_thread = None

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def stats(self) -> ServerStats:
        """Counters of bytes served and requests per route."""
        return self.context.stats

    @property
    def bytes_served(self) -> int:
        """File bytes sent by ``resolve`` since the start or the last :meth:`reset_stats`."""
        return self.context.stats.bytes_served

    @property
    def bytes_served_by_path(self) -> dict[str, int]:
        """File bytes sent, per ``namespace/name/path``."""
        return dict(self.context.stats.bytes_served_by_path)

    def reset_stats(self) -> None:
        """Set the counters back to zero."""
        self.context.stats.reset()


def serve_forever(
    root: Path | str,
    host: str = "127.0.0.1",
    port: int = 0,
    tokens: Mapping[str, str] | None = None,
    orgs: Mapping[str, Iterable[str]] | None = None,
    on_ready: Callable[[str], None] | None = None,
    cdn_ttl: int = 0,
) -> None:
    """Serve in the foreground until interrupted (Ctrl-C or SIGTERM); backs ``hubmerge hub serve``.

    Args:
        root: Storage folder.
        host: Interface to listen on.
        port: Port; 0 picks a free one.
        tokens: Token -> user name.
        orgs: Organisation -> member user names.
        on_ready: Called with the server URL once it listens (e.g. to print it).
        cdn_ttl: When over 0, LFS files redirect to signed URLs valid this many seconds, as on huggingface.co.
    """
    hub = HubServer(root, host=host, port=port, tokens=tokens, orgs=orgs, cdn_ttl=cdn_ttl)
    with stop_signals():
        hub.start()
        try:
            if on_ready is not None:
                on_ready(hub.url)
            threading.Event().wait()
        except KeyboardInterrupt:  # Terminated (SIGTERM, SIGHUP) too
            pass
        finally:
            hub.stop()
        stop_handled()  # stopping is how a server ends: exit 0
