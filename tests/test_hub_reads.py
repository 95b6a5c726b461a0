"""Ranged reads of Hub files: the direct client against real HTTP servers on 127.0.0.1, and the Hub source's
read-ahead against the real Hub server (every byte requested once; the same merge as the session's reads)."""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import re
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import textwrap
import threading
import time
import weakref
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file

import hubmerge
import hubmerge.run
import hubmerge.sources.hub
import hubmerge.sources.ranged
from hubmerge.hubserver import HubServer
from hubmerge.sources.buffers import buffer, writable
from hubmerge.sources.header import TensorInfo
from hubmerge.sources.hub import HEADER_READ
from hubmerge.sources.ranged import Fallback, RangeClient
from hubmerge.sources.tensors import view_bytes

from .util import kill_after_script, save_model

DATA = bytes(range(256)) * 4096  # 1 MiB


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    mode = "ok"
    redirect_to = ""
    signature = ""  # when set, /data answers 403 unless asked with ?sig=<signature> (a signed CDN URL)
    connections = 0
    seen: list[dict[str, str]]
    stalled: threading.Event  # mode "stall": set once half a body is sent; the rest waits for ``release``
    release: threading.Event

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that drop a connection are what several tests play; a traceback on stderr is noise.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Files(BaseHTTPRequestHandler):
    """Serves DATA at /data with Range support; ``server.mode`` picks a misbehaviour."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def setup(self) -> None:
        super().setup()
        self.server.connections += 1

    def do_GET(self) -> None:
        self.server.seen.append({k.lower(): v for k, v in self.headers.items()})
        mode = self.server.mode
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", self.server.redirect_to or "/data")
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"moved")
            return
        path, _, query = self.path.partition("?")
        refused = 403 if self.server.signature and query != f"sig={self.server.signature}" else 0
        if path != "/data" or refused:
            self.send_response(refused or 404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        match = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range", ""))
        assert match is not None
        a, b = int(match[1]), int(match[2]) + 1
        if mode == "ignore-range":
            a, b = 0, len(DATA)
            self.send_response(200)
        else:
            self.send_response(206)
            shown = a + 1 if mode == "wrong-range" else a
            self.send_header("Content-Range", f"bytes {shown}-{shown + b - a - 1}/{len(DATA)}")
        if mode == "gzip":
            self.send_header("Content-Encoding", "gzip")
        if mode == "close":
            self.send_header("Connection", "close")
            self.close_connection = True
        self.send_header("Content-Length", str(b - a))
        self.end_headers()
        if mode == "short":
            self.wfile.write(DATA[a : a + (b - a) // 2])
            self.close_connection = True
            return
        if mode == "stall":  # a connection that goes silent halfway through a body
            self.wfile.write(DATA[a : a + (b - a) // 2])
            self.wfile.flush()
            self.server.stalled.set()
            self.server.release.wait(30)
            self.close_connection = True
            return
        self.wfile.write(DATA[a:b])
        if mode == "drop-idle":  # closes the kept-alive connection without saying so
            self.close_connection = True


@pytest.fixture
def files() -> Iterator[_Server]:
    yield from _serve()


@pytest.fixture
def other() -> Iterator[_Server]:
    yield from _serve()


def _serve() -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _Files)
    server.seen = []
    server.stalled, server.release = threading.Event(), threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.release.set()
    server.shutdown()
    server.server_close()


def _url(server: _Server, path: str = "/data") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


def _read(client: RangeClient, url: str, start: int, length: int) -> bytes:
    out = bytearray(length)
    client.read_into(url, start, memoryview(out))
    return bytes(out)


def test_reads_ranges_on_one_kept_alive_connection(files: _Server) -> None:
    client = RangeClient({"User-Agent": "hubmerge-test"}, timeout=10)
    for start, length in ((0, 10), (1000, 70_000), (len(DATA) - 5, 5), (12_345, 1)):
        assert _read(client, _url(files), start, length) == DATA[start : start + length]
    assert files.connections == 1
    assert all(h["user-agent"] == "hubmerge-test" and h["accept-encoding"] == "identity" for h in files.seen)
    client.close()


@pytest.mark.parametrize("mode", ["close", "drop-idle"])
def test_a_closed_connection_is_opened_again(files: _Server, mode: str) -> None:
    files.mode = mode
    client = RangeClient({}, timeout=10)
    for start in (0, 100, 200):
        assert _read(client, _url(files), start, 50) == DATA[start : start + 50]
    assert files.connections == 3


@pytest.mark.parametrize("name", ["authorization", "Authorization"])  # huggingface_hub sends the first
def test_redirects_drop_the_token_across_origins(files: _Server, other: _Server, name: str) -> None:
    client = RangeClient({name: "Bearer secret"}, timeout=10)
    assert _read(client, _url(files, "/redirect"), 10, 20) == DATA[10:30]  # same origin: token kept
    assert [h.get("authorization") for h in files.seen] == ["Bearer secret"] * 2
    files.redirect_to = _url(other)
    client = RangeClient({name: "Bearer secret"}, timeout=10)  # one that has not seen /redirect yet
    for start in (
        40,
        70,
    ):  # the second read goes straight to the target it remembers, still without the token
        assert _read(client, _url(files, "/redirect"), start, 20) == DATA[start : start + 20]
    assert files.seen[-1]["authorization"] == "Bearer secret"
    assert len(other.seen) == 2 and not any("authorization" in h for h in other.seen)


def test_redirect_targets_are_remembered_until_they_expire(
    files: _Server, other: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = RangeClient({"authorization": "Bearer secret"}, timeout=10)
    files.redirect_to, other.signature = _url(other, "/data?sig=1"), "1"
    for start in (0, 100, 5000):
        assert _read(client, _url(files, "/redirect"), start, 50) == DATA[start : start + 50]
    assert len(files.seen) == 1 and len(other.seen) == 3  # one round trip to the Hub, then the CDN only
    # The signature expires (the CDN answers 403): the next read asks the Hub for a new target, once.
    files.redirect_to, other.signature = _url(other, "/data?sig=2"), "2"
    for start in (200, 300):
        assert _read(client, _url(files, "/redirect"), start, 50) == DATA[start : start + 50]
    assert len(files.seen) == 2 and len(other.seen) == 6  # the refused try, the new target, one more read
    assert not any("authorization" in h for h in other.seen)
    # A target is only trusted for LOCATION_TTL seconds after the Hub gave it.
    monkeypatch.setattr(hubmerge.sources.ranged, "LOCATION_TTL", 0.0)
    assert _read(client, _url(files, "/redirect"), 400, 50) == DATA[400:450]
    assert len(files.seen) == 3 and len(other.seen) == 7
    client.close()


@pytest.mark.parametrize(
    ("mode", "path", "why"),
    [
        ("ignore-range", "/data", "HTTP 200"),
        ("gzip", "/data", "gzip-encoded"),
        ("wrong-range", "/data", "Content-Range"),
        ("ok", "/missing", "HTTP 404"),
    ],
)
def test_answers_it_does_not_handle_go_to_the_session(files: _Server, mode: str, path: str, why: str) -> None:
    files.mode = mode
    client = RangeClient({}, timeout=10)
    with pytest.raises(Fallback, match=why):
        _read(client, _url(files, path), 100, 10)
    files.mode = "ok"  # and the client still works
    assert _read(client, _url(files), 100, 10) == DATA[100:110]


def test_a_whole_file_answer_serves_a_read_from_its_start(files: _Server) -> None:
    files.mode = "ignore-range"
    assert _read(RangeClient({}, timeout=10), _url(files), 0, len(DATA)) == DATA


def test_a_short_body_is_a_connection_error(files: _Server) -> None:
    files.mode = "short"
    with pytest.raises(ConnectionError, match="short read|IncompleteRead"):
        _read(RangeClient({}, timeout=10), _url(files), 0, 4096)


def test_closing_the_client_ends_a_stalled_read_at_once(files: _Server) -> None:
    """What a stopped merge relies on to clean up promptly: close() on another thread wakes a read that
    waits on a silent server (closing the socket alone would leave it waiting out the 60 s timeout)."""
    files.mode = "stall"
    client = RangeClient({}, timeout=60)
    failed: list[BaseException] = []

    def read() -> None:
        try:
            _read(client, _url(files), 0, 256 << 10)
        except BaseException as exc:
            failed.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert files.stalled.wait(10)
    time.sleep(0.2)  # the reader is now waiting in recv on the silent connection
    closer = threading.Thread(target=client.close, daemon=True)  # close() itself once waited on the read
    closer.start()
    closer.join(5)
    reader.join(5)
    assert not closer.is_alive() and not reader.is_alive()
    assert len(failed) == 1 and isinstance(failed[0], ConnectionError)
    with pytest.raises(ConnectionError, match="closed"):
        _read(client, _url(files), 0, 10)


def test_a_closed_client_opens_no_connection_again(files: _Server) -> None:
    # A read already past read_into's check, or the next hop of a redirect, on a thread whose kept-alive
    # connection close() closed: http.client would quietly connect again, untracked, past close().
    client = RangeClient({}, timeout=10)
    assert _read(client, _url(files), 0, 10) == DATA[:10]  # a kept-alive connection on this thread
    client.close()
    with pytest.raises(ConnectionError, match="closed"):
        client._read_into(_url(files), _url(files), 0, memoryview(bytearray(10)))
    assert files.connections == 1


def test_close_closes_a_connection_the_server_reset() -> None:
    # A kept-alive connection the server reset (an idle CDN connection): shutting it down fails (ENOTCONN),
    # and close() must still close it, not leave its descriptor open and untracked.
    client = RangeClient({}, timeout=10)
    with socket.create_server(("127.0.0.1", 0)) as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.getsockname()[1], timeout=10)
        conn.connect()
        client._all.append(conn)  # as _connect tracks the connections it opens
        peer, _ = server.accept()
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # a reset
        sock = conn.sock
        assert sock is not None
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # until the reset has arrived
            try:
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the reset never arrived")
        client.close()
        assert conn.sock is None and sock.fileno() == -1


def test_a_closing_source_stops_retrying(monkeypatch: pytest.MonkeyPatch) -> None:
    """hub_call with ``cancelled`` set: the failed attempt is the last, and no backoff is slept."""
    calls = []

    def lost() -> bytes:
        calls.append(1)
        raise ConnectionError("reset")

    monkeypatch.setattr(time, "sleep", lambda s: pytest.fail("slept"))
    cancelled = threading.Event()
    cancelled.set()
    with pytest.raises(hubmerge.errors.HubConnectionError, match="stopped: the source was closed"):
        hubmerge.sources.hub.hub_call(lost, repo_id="a/b", revision="c" * 40, what="x", cancelled=cancelled)
    assert calls == [1]


def test_a_proxy_leaves_the_request_to_the_session(files: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    with pytest.raises(Fallback, match="proxy"):
        _read(RangeClient({}, timeout=10), _url(files), 0, 10)
    assert files.seen == []


def test_tensor_buffers_view_without_copying_and_copy_when_misaligned() -> None:
    values = torch.arange(6, dtype=torch.float16)
    raw = b"\x00\x00" + bytes(values.view(torch.uint8).tolist())
    buf = buffer(len(raw))
    writable(buf)[:] = raw
    misaligned = view_bytes(buf, TensorInfo("x", "F16", (2, 3), "f", 1, len(raw) - 1), None)
    aligned = view_bytes(buf, TensorInfo("x", "F16", (2, 3), "f", 2, len(raw)), (1, 2))
    torch.testing.assert_close(aligned, values.view(2, 3)[1:2], rtol=0, atol=0)
    assert aligned.data_ptr() == ctypes.addressof(buf) + 2 + 6  # a view of the buffer, row 1 on
    writable(buf)[8:10] = bytes(torch.tensor([9.0], dtype=torch.float16).view(torch.uint8).tolist())
    assert aligned[0, 0].item() == 9.0  # no copy: the view sees the write
    assert misaligned.data_ptr() != ctypes.addressof(buf) + 1  # odd offset for 2-byte floats: copied
    # The buffer lives as long as a tensor views it, and goes with the last one.
    alive = weakref.ref(buf)
    del buf
    assert alive() is not None
    del aligned
    assert alive() is None
    assert len(writable(bytearray(3))) == 3 and len(writable(buffer(0))) == 0


def _models(tmp_path: Path) -> list[Path]:
    g = torch.Generator().manual_seed(7)
    dirs = []
    for i in range(2):
        tensors = {
            "embed.weight": torch.randn(1024, 96, generator=g),  # 384 KiB: read in row ranges below
            "layer.0.weight": torch.randn(64, 96, generator=g),
            "layer.0.bias": torch.randn(96, generator=g),
            "head.weight": torch.randn(700, 96, generator=g).to(torch.bfloat16),
            "positions": torch.arange(8192).view(1024, 8),  # 64 KiB of int64: copied, batch by batch
        }
        dirs.append(save_model(tmp_path / f"m{i}", tensors))
    return dirs


def _scale_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read grid scaled down: the tests' tensors of a few hundred KiB take the paths large ones take."""
    monkeypatch.setattr(hubmerge.sources.hub, "PREFETCH_LIMIT", 32 << 10)
    monkeypatch.setattr(hubmerge.run, "BLOCK", 1024)
    monkeypatch.setattr(hubmerge.run, "BATCH_BYTES", 8 << 10)
    monkeypatch.setattr(hubmerge.run, "READ_BYTES", 48 << 10)


def _safetensors_served(hub: HubServer) -> dict[str, int]:
    return {k: v for k, v in hub.bytes_served_by_path.items() if k.endswith(".safetensors")}


def _each_byte_once(ids: list[str], dirs: list[Path]) -> dict[str, int]:
    """Bytes served per file if planning read the first HEADER_READ bytes and the merge each tensor once."""
    expected = {}
    for repo_id, directory in zip(ids, dirs, strict=True):
        raw = (directory / "model.safetensors").read_bytes()
        header = 8 + int.from_bytes(raw[:8], "little")
        expected[f"{repo_id}/model.safetensors"] = len(raw) + min(len(raw), HEADER_READ) - header
    return expected


@pytest.mark.parametrize("direct", ["1", "0"])
def test_large_tensors_are_read_ahead_and_every_byte_once(
    tmp_path: Path,
    hub: HubServer,
    hub_token: str,
    repo_name: str,
    monkeypatch: pytest.MonkeyPatch,
    direct: str,
) -> None:
    # Tensors over PREFETCH_LIMIT are read in the run's row ranges (READ_BYTES each), one range ahead. The
    # grid is scaled down so that the 384 KiB float32 embedding takes 9 reads, the 131 KiB bfloat16 head 3,
    # and the copied integer positions 8 (one per batch).
    _scale_down(monkeypatch)
    reads: list[tuple[str, tuple[int, int] | None]] = []
    real_read = hubmerge.sources.hub.HubSource.read

    def read(
        self: hubmerge.sources.hub.HubSource, info: TensorInfo, rows: tuple[int, int] | None = None
    ) -> torch.Tensor:
        reads.append((info.name, rows))
        return real_read(self, info, rows)

    monkeypatch.setattr(hubmerge.sources.hub.HubSource, "read", read)
    waited: list[tuple[str, int]] = []  # tensor bytes the merge loop read itself, waiting for them
    real_range = hubmerge.sources.hub.HubSource._range

    def range_(
        self: hubmerge.sources.hub.HubSource, file: str, start: int, end: int, into: Any = None
    ) -> Any:
        if into is not None and threading.current_thread() is threading.main_thread():
            waited.append((file, start))
        return real_range(self, file, start, end, into)

    monkeypatch.setattr(hubmerge.sources.hub.HubSource, "_range", range_)
    monkeypatch.setenv("HUBMERGE_HUB_DIRECT", direct)
    dirs = _models(tmp_path)
    ids = _upload(HfApi(token=hub_token), repo_name, dirs)
    hub.reset_stats()
    recipe = {"method": "linear", "models": ids, "parameters": {"t": 0.3}}
    merged = hubmerge.merge(recipe, tmp_path / "hub")
    served = _safetensors_served(hub)
    # Planning reads the first HEADER_READ bytes of each file (its header and the start of the data); the
    # merge then reads every tensor byte once.
    assert served == _each_byte_once(ids, dirs)
    assert sum(name == "embed.weight" for name, _ in reads) == 2 * 9
    assert sum(name == "head.weight" for name, _ in reads) == 2 * 3
    assert sum(name == "positions" for name, _ in reads) == 2 * 8
    assert waited == []  # every range was on its way before the merge asked for it
    local = hubmerge.merge({**recipe, "models": [str(d) for d in dirs]}, tmp_path / "local")
    expected = load_file(str(local.out / "model.safetensors"))
    result = load_file(str(merged.out / "model.safetensors"))
    assert result.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(result[name], value, rtol=0, atol=0)
    a, b = (load_file(str(d / "model.safetensors")) for d in dirs)
    torch.testing.assert_close(result["embed.weight"], 0.7 * a["embed.weight"] + 0.3 * b["embed.weight"])


def test_reads_over_tls_with_the_ca_bundle_httpx_would_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("needs the openssl command to make a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    server = _Server(("127.0.0.1", 0), _Files)
    server.seen = []
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}/data"
    try:
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))
        client = RangeClient({}, timeout=10)
        assert _read(client, url, 5, 100_000) == DATA[5:100_005]
        assert _read(client, url, 0, 10) == DATA[:10] and server.connections == 1
        # A certificate nobody vouches for: the request goes to huggingface_hub's session (which refuses it).
        monkeypatch.delenv("SSL_CERT_FILE")
        with pytest.raises(Fallback, match="TLS"):
            _read(RangeClient({}, timeout=10), url, 0, 10)
    finally:
        server.shutdown()
        server.server_close()


def test_the_first_reads_start_before_torch_is_imported(
    tmp_path: Path, hub: HubServer, hub_token: str, repo_name: str
) -> None:
    """api.merge calls run.start_reads before execute: the first tensors download while torch is imported."""
    dirs = _models(tmp_path)
    api = HfApi(token=hub_token)
    ids = [f"{repo_name}-{i}" for i in range(len(dirs))]
    for repo_id, directory in zip(ids, dirs, strict=True):
        api.create_repo(repo_id)
        api.upload_folder(folder_path=directory, repo_id=repo_id)
    code = textwrap.dedent(
        """
        import json, sys
        from concurrent.futures import wait
        from hubmerge.api import open_sources
        from hubmerge.plan import build_plan
        from hubmerge.recipe import load_recipe
        from hubmerge.run import start_reads
        recipe = load_recipe({"method": "linear", "models": sys.argv[1:], "parameters": {"t": 0.5}})
        with open_sources(recipe) as sources:
            plan = build_plan(recipe, sources)
            start_reads(plan, sources)
            first = zip(sources, plan.jobs[0].inputs)
            asked = [info.name in s._pending or info.name in s._ahead for s, info in first]
            reads = [span.future for s in sources for span in s._spans]
            reads += [future for s in sources for _, future in s._ahead.values()]
            wait(reads)
            print(json.dumps({"asked": asked, "torch": "torch" in sys.modules, "reads": len(reads),
                              "failed": [repr(f.exception()) for f in reads if f.exception()]}))
        """
    )
    hub.reset_stats()
    done = subprocess.run([sys.executable, "-c", code, *ids], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result == {"asked": [True, True], "torch": False, "reads": result["reads"], "failed": []}
    assert result["reads"] >= 2
    # Planning read the first HEADER_READ bytes; the early reads then fetched every tensor byte (these
    # models are far smaller than EARLY_READ_BYTES), and nothing twice.
    assert _safetensors_served(hub) == _each_byte_once(ids, dirs)


def _large(monkeypatch: pytest.MonkeyPatch, *, fast: float) -> list[int]:
    """Scale LOWAT down to 16 KiB so DATA (1 MiB) is a large body; record the SO_RCVLOWAT values set."""
    monkeypatch.setattr(hubmerge.sources.ranged, "LOWAT", 16 << 10)
    monkeypatch.setattr(hubmerge.sources.ranged, "FAST", fast)
    values: list[int] = []
    real = socket.socket.setsockopt

    def setsockopt(self: socket.socket, level: int, option: int, value: Any, *rest: Any) -> None:
        if level == socket.SOL_SOCKET and option == socket.SO_RCVLOWAT:
            values.append(value)
        real(self, level, option, value, *rest)

    monkeypatch.setattr(socket.socket, "setsockopt", setsockopt)
    return values


def test_large_bodies_on_a_fast_connection_are_read_under_a_low_water_mark(
    files: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    values = _large(monkeypatch, fast=0.0)
    client = RangeClient({}, timeout=10)
    assert _read(client, _url(files), 0, len(DATA)) == DATA  # the first body on a connection: plain reads
    assert values == []
    for start in (0, 4097):  # later ones: SO_RCVLOWAT until 32 KiB before the end, then back to 1
        assert _read(client, _url(files), start, len(DATA) - start) == DATA[start:]
    assert values == [16 << 10, 1] * 2
    assert _read(client, _url(files), 5, 60_000) == DATA[5:60_005]  # under 4 * LOWAT: plain reads
    assert values == [16 << 10, 1] * 2 and files.connections == 1
    sock = next(iter(client._local.fast)).sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
    files.mode = "short"  # a body that comes short still fails at once, not at the timeout
    began = time.perf_counter()
    with pytest.raises(ConnectionError, match="short read|IncompleteRead"):
        _read(client, _url(files), 0, len(DATA))
    assert time.perf_counter() - began < 5 and values == [16 << 10, 1] * 3
    assert client._local.fast == set()  # the dropped connection is forgotten


def test_slow_connections_are_read_packet_by_packet(files: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    values = _large(monkeypatch, fast=float("inf"))  # no body arrives fast enough
    client = RangeClient({}, timeout=10)
    for _ in range(3):
        assert _read(client, _url(files), 0, len(DATA)) == DATA
    assert values == [] and files.connections == 1


def test_early_reads_of_many_large_tensors_are_each_read_once(
    tmp_path: Path, hub: HubServer, hub_token: str, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Five tensors over PREFETCH_LIMIT come first: start_reads hints at all of them, the source takes two
    # (AHEAD_TENSORS), and no read it started is dropped and made again.
    monkeypatch.setattr(hubmerge.sources.hub, "PREFETCH_LIMIT", 16 << 10)
    monkeypatch.setattr(hubmerge.run, "BLOCK", 1024)  # each tensor is read in two row ranges of 16 KiB
    monkeypatch.setattr(hubmerge.run, "BATCH_BYTES", 8 << 10)
    monkeypatch.setattr(hubmerge.run, "READ_BYTES", 16 << 10)
    g = torch.Generator().manual_seed(3)
    dirs, ids = [], []
    api = HfApi(token=hub_token)
    for i in range(2):
        tensors = {f"big.{k}": torch.randn(128, 64, generator=g) for k in range(5)}  # 32 KiB each
        dirs.append(save_model(tmp_path / f"m{i}", tensors))
        ids.append(f"{repo_name}-{i}")
        api.create_repo(ids[-1])
        api.upload_folder(folder_path=dirs[-1], repo_id=ids[-1])
    hints: list[int] = []
    real_prefetch = hubmerge.sources.hub.HubSource.prefetch

    def prefetch(self: hubmerge.sources.hub.HubSource, infos: Any, rows: Any = None) -> None:
        real_prefetch(self, infos, rows)
        hints.append(len(self._ahead))

    monkeypatch.setattr(hubmerge.sources.hub.HubSource, "prefetch", prefetch)
    hub.reset_stats()
    merged = hubmerge.merge({"method": "linear", "models": ids, "parameters": {"t": 0.25}}, tmp_path / "out")
    assert max(hints) == 2
    assert _safetensors_served(hub) == _each_byte_once(ids, dirs)
    result = load_file(str(merged.out / "model.safetensors"))
    a, b = (load_file(str(d / "model.safetensors")) for d in dirs)
    for k in range(5):
        torch.testing.assert_close(result[f"big.{k}"], 0.75 * a[f"big.{k}"] + 0.25 * b[f"big.{k}"])


def _upload(api: HfApi, repo_name: str, dirs: list[Path]) -> list[str]:
    ids = []
    for i, directory in enumerate(dirs):
        ids.append(f"{repo_name}-{i}")
        api.create_repo(ids[-1])
        api.upload_folder(folder_path=directory, repo_id=ids[-1])
    return ids


def _pass_recipe(method: str, models: list[str]) -> dict[str, Any]:
    """A recipe of ``method`` over ``models`` (the first is the base where the method takes one)."""
    if method == "slerp":
        return {"method": "slerp", "models": models[1:], "parameters": {"t": 0.3}}
    if method == "ties":
        entries = [{"path" if Path(m).is_dir() else "repo": m, "density": 0.4} for m in models[1:]]
        return {"method": "ties", "base": models[0], "models": entries}
    return {"method": method, "base": models[0], "models": models[1:]}


@pytest.mark.parametrize("method", ["ties", "slerp", "model_stock"])
def test_statistics_passes_download_each_byte_once(
    tmp_path: Path,
    hub: HubServer,
    hub_token: str,
    repo_name: str,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
) -> None:
    """TIES reads every input three times, SLERP and Model Stock twice: the later passes read the bytes the
    first one downloaded (kept in memory for tensors read whole, in a scratch file for those read in row
    ranges), and the merge is the local one, bit for bit."""
    _scale_down(monkeypatch)
    monkeypatch.setattr(
        hubmerge.sources.hub, "SPAN_BYTES", 16 << 10
    )  # the head is not in the embedding's read
    spills: list[Path] = []
    real_spill = hubmerge.sources.hub._Spill.__init__

    def spill(self: Any, path: Path, size: int) -> None:
        spills.append(path)
        real_spill(self, path, size)

    monkeypatch.setattr(hubmerge.sources.hub._Spill, "__init__", spill)
    g = torch.Generator().manual_seed(11)
    base = {
        "embed.weight": torch.randn(1024, 96, generator=g),  # 384 KiB: row ranges, kept in a scratch file
        "layer.0.weight": torch.randn(64, 96, generator=g),  # 24 KiB: one read, kept in memory
        "head.weight": torch.randn(700, 96, generator=g).bfloat16(),  # 131 KiB: row ranges, a file too
        "norm.weight": torch.randn(96, generator=g),  # one block: a single read, no passes
    }
    dirs = [save_model(tmp_path / "m0", base)]
    for i in (1, 2):
        tuned = {
            n: (t.float() + 0.05 * torch.randn(t.shape, generator=g)).to(t.dtype) for n, t in base.items()
        }
        dirs.append(save_model(tmp_path / f"m{i}", tuned))
    read = dirs if method != "slerp" else dirs[1:]
    ids = _upload(HfApi(token=hub_token), repo_name, dirs)
    hub.reset_stats()
    merged = hubmerge.merge(_pass_recipe(method, ids), tmp_path / "hub")
    served = _safetensors_served(hub)
    assert served == _each_byte_once(ids[-len(read) :], read)
    assert len(set(spills)) == 2 * len(read)  # the embedding and the head of each model
    assert not any(path.exists() for path in spills)  # deleted once the merge is done with each tensor
    local = hubmerge.merge(_pass_recipe(method, [str(d) for d in dirs]), tmp_path / "local")
    _assert_same_tensors(merged.out, local.out)


@pytest.mark.parametrize("failing", ["_write", "__init__"])
def test_a_failed_spill_reads_the_hub_again(
    tmp_path: Path,
    hub: HubServer,
    hub_token: str,
    repo_name: str,
    monkeypatch: pytest.MonkeyPatch,
    failing: str,
) -> None:
    """A full disk (or no scratch folder) costs the download a scratch file would save, not the merge."""
    _scale_down(monkeypatch)

    def full(*args: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(hubmerge.sources.hub._Spill, failing, full)
    dirs = _models(tmp_path)
    ids = _upload(HfApi(token=hub_token), repo_name, dirs)
    hub.reset_stats()
    merged = hubmerge.merge({"method": "slerp", "models": ids, "parameters": {"t": 0.6}}, tmp_path / "hub")
    once = _each_byte_once(ids, dirs)
    served = _safetensors_served(hub)
    embed = 1024 * 96 * 4
    assert served == {k: v + embed for k, v in once.items()}  # the embedding twice, the rest once
    local = hubmerge.merge(
        {"method": "slerp", "models": [str(d) for d in dirs], "parameters": {"t": 0.6}}, tmp_path / "local"
    )
    _assert_same_tensors(merged.out, local.out)


def _assert_same_tensors(out: Path, expected_out: Path) -> None:
    """Every tensor bit for bit (the files' metadata names the models, which differ)."""
    result, expected = (load_file(str(d / "model.safetensors")) for d in (out, expected_out))
    assert result.keys() == expected.keys()
    for name, value in expected.items():
        torch.testing.assert_close(result[name], value, rtol=0, atol=0, msg=name)


def test_plan_counts_the_read_buffers_of_every_hub_input(
    tmp_path: Path, hub_token: str, repo_name: str
) -> None:
    """The estimate adds, per Hub input (the base too), the reads on their way, and for methods with passes a
    kept tensor: what the sources hold beyond a local merge."""
    from hubmerge.layout import READ_BYTES
    from hubmerge.sources.hub import AHEAD_BYTES, AHEAD_TENSORS, PREFETCH_LIMIT, SPAN_BYTES

    dirs = _models(tmp_path)
    dirs.append(shutil.copytree(dirs[0], tmp_path / "m2"))
    ids = _upload(HfApi(token=hub_token), repo_name, dirs)
    largest = 1024 * 96 * 4  # the embedding
    reads = (1 + AHEAD_TENSORS) * min(READ_BYTES, largest) + AHEAD_BYTES + SPAN_BYTES
    kept = min(PREFETCH_LIMIT, largest)
    for method, inputs, extra in (("ties", 3, reads + kept), ("weighted", 2, reads)):
        remote, local = (
            _pass_recipe(method, models) if method == "ties" else {"method": method, "models": models[:2]}
            for models in (ids, [str(d) for d in dirs])
        )
        assert hubmerge.plan(remote).peak_memory - hubmerge.plan(local).peak_memory == inputs * extra, method


@pytest.mark.parametrize("method", ["ties", "task_arithmetic"])
def test_a_base_also_listed_among_the_models_is_downloaded_once(
    tmp_path: Path,
    hub: HubServer,
    hub_token: str,
    repo_name: str,
    monkeypatch: pytest.MonkeyPatch,
    method: str,
) -> None:
    """mergekit's TIES examples list the base among the models too: one source, read once per tensor."""
    _scale_down(monkeypatch)
    monkeypatch.setattr(hubmerge.sources.hub, "SPAN_BYTES", 16 << 10)  # the head read in row ranges too
    dirs = _models(tmp_path)
    ids = _upload(HfApi(token=hub_token), repo_name, dirs)

    def recipe(refs: list[str]) -> dict[str, Any]:
        key = "repo" if refs == ids else "path"
        return {"method": method, "base": refs[0], "models": [{key: r, "weight": 0.5} for r in refs]}

    hub.reset_stats()
    merged = hubmerge.merge(recipe(ids), tmp_path / "hub")
    assert _safetensors_served(hub) == _each_byte_once(ids, dirs)
    local = hubmerge.merge(recipe([str(d) for d in dirs]), tmp_path / "local")
    _assert_same_tensors(merged.out, local.out)


def test_a_merge_that_fails_leaves_no_scratch_file(
    tmp_path: Path, hub_token: str, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A method failing halfway through a kept tensor: the error names it, and the scratch files are gone."""
    _scale_down(monkeypatch)
    spills: list[Path] = []
    real_spill = hubmerge.sources.hub._Spill.__init__

    def spill(self: Any, path: Path, size: int) -> None:
        spills.append(path)
        real_spill(self, path, size)

    def boom(*args: Any, **kwargs: Any) -> bool:
        raise RuntimeError("boom")

    monkeypatch.setattr(hubmerge.sources.hub._Spill, "__init__", spill)
    monkeypatch.setattr(hubmerge.kernels, "ties_merge", boom)  # the merge after the passes
    dirs = _models(tmp_path)
    dirs.append(shutil.copytree(dirs[0], tmp_path / "m2"))
    ids = _upload(HfApi(token=hub_token), repo_name, dirs)
    with pytest.raises(hubmerge.errors.MergeError, match="embed.weight.*boom|boom.*embed.weight"):
        hubmerge.merge(_pass_recipe("ties", ids), tmp_path / "hub")
    assert spills and not any(path.exists() for path in spills)
    assert not any(path.parent.exists() for path in spills)  # the scratch folders too


def test_sigterm_in_a_hub_merge_deletes_the_scratch_files(
    tmp_path: Path, hub_token: str, repo_name: str
) -> None:
    """SIGTERM while a shard downloaded to scratch is being merged: the scratch folder goes, the partial
    output stays, and --resume finishes the same merge as the local one."""
    dirs = _models(tmp_path)
    ids = _upload(HfApi(token=hub_token), repo_name, dirs)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"method": "linear", "models": ids, "parameters": {"t": 0.3}}))
    scratch, made = tmp_path / "scratch", tmp_path / "made.txt"
    scratch.mkdir()
    prelude = textwrap.dedent(
        f"""
        import hubmerge.sources.hub as h
        made = h.HubSource._scratch
        def _scratch(self):
            path = made(self)
            with open({str(made)!r}, "a") as f:
                f.write(f"{{path}}\\n")
            return path
        h.HubSource._scratch = _scratch
        """
    )
    stopped = subprocess.run(
        [sys.executable, "-c", kill_after_script(prelude, signal="SIGTERM"), str(recipe), "2"]
        + [str(tmp_path / "out"), "--hub-transfer", "shards"],
        capture_output=True,
        text=True,
        env={**os.environ, "TMPDIR": str(scratch)},
    )
    assert stopped.returncode == 143, stopped.stderr
    said = "terminated (SIGTERM) (hint: the finished tensors are kept in"
    assert stopped.stderr.startswith(said), stopped.stderr
    folders = {Path(line) for line in made.read_text().splitlines()}
    assert len(folders) == 2 and all(folder.parent == scratch for folder in folders), folders
    assert list(scratch.iterdir()) == [], stopped.stderr
    journal = tmp_path / ".out.hubmerge-partial" / ".hubmerge-progress" / "journal"
    assert len(journal.read_text().splitlines()) >= 2  # the one shard is unfinished: journaled on closing
    resumed = hubmerge.merge(recipe, tmp_path / "out", resume=True, transfer="shards")
    assert resumed.resumed_tensors >= 2
    local = {"method": "linear", "models": [str(d) for d in dirs], "parameters": {"t": 0.3}}
    _assert_same_tensors(resumed.out, hubmerge.merge(local, tmp_path / "local").out)
