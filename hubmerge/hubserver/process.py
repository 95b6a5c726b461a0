"""The Hub server in a process of its own: what a test or a benchmark kills to play a crashed server."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path


def spawn(
    root: Path, tokens: Mapping[str, str], *, timeout: float = 30.0, cdn_ttl: int = 0
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``hubmerge hub serve`` on a free port of 127.0.0.1 and wait until it accepts connections.

    Args:
        root: storage directory.
        tokens: token -> user name.
        timeout: seconds to wait for the server.
        cdn_ttl: when over 0, LFS files redirect to signed URLs valid this many seconds (``--cdn-ttl``).

    Returns:
        The process (terminate or kill it when done) and the server's URL.

    Raises:
        RuntimeError: the server did not start in time.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cmd = [sys.executable, "-m", "hubmerge.cli", "hub", "serve", "--root", str(root), "--port", str(port)]
    for token, user in tokens.items():
        cmd += ["--token", f"{token}={user}"]
    if cdn_ttl:
        cmd += ["--cdn-ttl", str(cdn_ttl)]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as client:
            if client.connect_ex(("127.0.0.1", port)) == 0:
                return process, f"http://127.0.0.1:{port}"
        time.sleep(0.05)
    process.kill()
    process.wait()
    raise RuntimeError(f"hubmerge hub serve did not start on port {port} within {timeout:.0f} s")
