"""Shared fixtures. Hub fixtures first: a real Hub-compatible server (``hubmerge.hubserver``) on 127.0.0.1.

huggingface_hub reads ``HF_ENDPOINT`` once, when it is imported, so the session server is started and the
environment set at the top of this module, before any test module can import huggingface_hub or transformers.
``HF_HOME`` and ``HF_HUB_CACHE`` point to a temporary folder, so no real token or cache is ever used.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubmerge.hubserver import HubServer

HUB_TOKEN = "hm_test_alice_token"
OTHER_TOKEN = "hm_test_bob_token"

if "huggingface_hub" in sys.modules:  # pragma: no cover - a guard for whoever edits the imports above
    raise RuntimeError("huggingface_hub was imported before tests/conftest.py set HF_ENDPOINT: keep it lazy")

_HUB_TMP = Path(tempfile.mkdtemp(prefix="hubmerge-test-hub-"))
# As huggingface.co, LFS files redirect to signed URLs on another origin (the server's CDN port).
_HUB = HubServer(_HUB_TMP / "storage", tokens={HUB_TOKEN: "alice", OTHER_TOKEN: "bob"}, cdn_ttl=3600).start()
for _name in (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "HF_TOKEN_PATH",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
):
    os.environ.pop(_name, None)
os.environ.update(
    HF_ENDPOINT=_HUB.url,
    HF_HOME=str(_HUB_TMP / "hf_home"),
    HF_HUB_CACHE=str(_HUB_TMP / "hf_home" / "hub"),
    HF_HUB_DISABLE_XET="1",
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
)


@atexit.register
def _stop_session_hub() -> None:
    _HUB.stop()
    shutil.rmtree(_HUB_TMP, ignore_errors=True)


@pytest.fixture(scope="session")
def hub() -> HubServer:
    """The session's Hub server (``HF_ENDPOINT``). Users: alice (``hub_token``) and bob (``other_token``)."""
    return _HUB


@pytest.fixture(scope="session")
def hub_token() -> str:
    """Token of user ``alice``, who owns the ``alice/`` namespace."""
    return HUB_TOKEN


@pytest.fixture(scope="session")
def other_token() -> str:
    """Token of user ``bob``, who may not write to ``alice/`` repositories."""
    return OTHER_TOKEN


@pytest.fixture
def repo_name() -> str:
    """A repository id in alice's namespace, unique to the test (the repository is not created)."""
    return f"alice/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def fresh_hub(tmp_path: Path) -> Iterator[HubServer]:
    """A private server for one test (to stop it, or to count requests without neighbours), same tokens."""
    with HubServer(tmp_path / "hub-storage", tokens={HUB_TOKEN: "alice", OTHER_TOKEN: "bob"}) as server:
        yield server
