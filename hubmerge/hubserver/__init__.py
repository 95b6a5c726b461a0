"""A Hub-compatible HTTP server for model repositories: tests, offline use and ``hubmerge hub serve``.

It speaks the subset of the Hugging Face Hub protocol that the unmodified ``huggingface_hub`` client uses to
create repositories, upload (regular files inline, large and binary files through git-lfs), list, download
(with byte ranges) and manage refs, so any code path that talks to the Hub can run against it::

    from hubmerge.hubserver import HubServer

    with HubServer(root, tokens={"my-token": "alice"}) as hub:
        ...  # set HF_ENDPOINT=hub.url before importing huggingface_hub, or pass endpoint=hub.url

Storage layout (under ``root``): ``blobs/`` (content-addressed files, see :mod:`.blobs`), ``repos/``
(settings, refs and commits, see :mod:`.repos`) and ``tmp/`` (partial writes).
"""

from __future__ import annotations

from .server import HubServer, serve_forever

__all__ = ["HubServer", "serve_forever"]
