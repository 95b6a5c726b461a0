"""The Hub server at the HTTP level (ranges, headers, errors, keep-alive, uploads) and its pure parts."""

from __future__ import annotations

import hashlib
import http.client
import io
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote, urlsplit

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationCopy, HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError
from huggingface_hub.hf_api import RepoFile

import hubmerge.hubserver.context
import hubmerge.hubserver.server
from hubmerge.hubserver import HubServer
from hubmerge.hubserver.app import split_revision
from hubmerge.hubserver.body import Body
from hubmerge.hubserver.cards import front_matter, validate_card
from hubmerge.hubserver.protocol import RangeNotSatisfiable, parse_range
from hubmerge.hubserver.routes_upload import upload_mode

DATA = bytes(range(256)) * 40  # 10240 bytes, stored with LFS (binary)
TEXT = b'{"hello": "world"}\n'  # stored as a regular file

Reply = tuple[int, dict[str, str], bytes]


def connect(hub: HubServer) -> http.client.HTTPConnection:
    address = urlsplit(hub.url)
    return http.client.HTTPConnection(address.hostname or "", address.port, timeout=10)


def ask(
    conn: http.client.HTTPConnection,
    method: str,
    path: str,
    body: bytes | Iterable[bytes] | None = None,
    headers: dict[str, str] | None = None,
) -> Reply:
    conn.request(
        method, path, body=body, headers=headers or {}, encode_chunked=not isinstance(body, bytes | None)
    )
    response = conn.getresponse()
    data = response.read()
    return response.status, {name.lower(): value for name, value in response.getheaders()}, data


def call(
    hub: HubServer, method: str, path: str, body: bytes | None = None, token: str | None = None
) -> Reply:
    conn = connect(hub)
    try:
        return ask(conn, method, path, body, {"Authorization": f"Bearer {token}"} if token else {})
    finally:
        conn.close()


@pytest.fixture(autouse=True)
def _served_directly(hub: HubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests read files at the HTTP level, from resolve itself; the session server redirects LFS files
    to its CDN port (conftest.py), which the CDN test turns back on."""
    monkeypatch.setattr(hub.context, "cdn_ttl", 0)


@pytest.fixture
def repo(hub: HubServer, hub_token: str, repo_name: str) -> str:
    api = HfApi(token=hub_token)
    api.create_repo(repo_name)
    operations = [CommitOperationAdd("data.bin", DATA), CommitOperationAdd("dir/hello.json", TEXT)]
    api.create_commit(repo_name, operations, commit_message="data")
    return repo_name


@pytest.mark.parametrize(
    ("header", "span"),
    [
        ("bytes=0-9", (0, 10)),
        ("bytes=10-", (10, len(DATA))),
        ("bytes=-16", (len(DATA) - 16, len(DATA))),
        ("bytes=100-99999999", (100, len(DATA))),
        ("bytes=-99999999", (0, len(DATA))),
    ],
)
def test_range_requests_answer_206(hub: HubServer, repo: str, header: str, span: tuple[int, int]) -> None:
    conn = connect(hub)
    try:
        status, headers, body = ask(conn, "GET", f"/{repo}/resolve/main/data.bin", headers={"Range": header})
    finally:
        conn.close()
    start, end = span
    assert (status, body) == (206, DATA[start:end])
    assert headers["content-range"] == f"bytes {start}-{end - 1}/{len(DATA)}"
    assert headers["content-length"] == str(end - start)


@pytest.mark.parametrize("header", ["bytes=10240-", "bytes=20000-20010", "bytes=-0"])
def test_unsatisfiable_range_answers_416(hub: HubServer, repo: str, header: str) -> None:
    conn = connect(hub)
    try:
        status, headers, _ = ask(conn, "GET", f"/{repo}/resolve/main/data.bin", headers={"Range": header})
    finally:
        conn.close()
    assert status == 416 and headers["content-range"] == f"bytes */{len(DATA)}"


def test_head_carries_what_hf_hub_download_needs(hub: HubServer, repo: str) -> None:
    sha = HfApi().model_info(repo).sha
    status, lfs, body = call(hub, "HEAD", f"/{repo}/resolve/main/data.bin")
    digest = hashlib.sha256(DATA).hexdigest()
    assert (status, body, lfs["x-repo-commit"], lfs["content-length"]) == (200, b"", sha, str(len(DATA)))
    assert lfs["etag"] == lfs["x-linked-etag"] == f'"{digest}"' and lfs["x-linked-size"] == str(len(DATA))
    assert lfs["accept-ranges"] == "bytes"
    status, regular, _ = call(hub, "HEAD", f"/{repo}/resolve/{sha}/dir%2Fhello.json")
    git_oid = hashlib.sha1(b"blob %d\0" % len(TEXT) + TEXT).hexdigest()
    assert (status, regular["etag"], regular["content-length"]) == (200, f'"{git_oid}"', str(len(TEXT)))
    assert "x-linked-etag" not in regular
    status, missing, _ = call(hub, "HEAD", f"/{repo}/resolve/main/nope.txt")
    assert (status, missing["x-error-code"], missing["x-repo-commit"]) == (404, "EntryNotFound", sha)


def test_cdn_mode_redirects_lfs_files_to_signed_urls(
    hub: HubServer, repo: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As huggingface.co: an LFS file resolves to a 302 with its metadata, to a URL needing no token."""
    monkeypatch.setattr(hub.context, "cdn_ttl", 60)
    sha = HfApi().model_info(repo).sha
    digest = hashlib.sha256(DATA).hexdigest()
    status, head, body = call(hub, "HEAD", f"/{repo}/resolve/main/data.bin")
    assert (status, body, head["x-repo-commit"], head["x-linked-size"]) == (302, b"", sha, str(len(DATA)))
    cdn = f"http://127.0.0.1:{hub.context.cdn_port}"
    assert cdn != hub.url and hub.url.startswith("http://127.0.0.1:")  # another port: another origin
    assert head["x-linked-etag"] == f'"{digest}"' and head["location"].startswith(f"{cdn}/cdn/{digest}?")
    signed = head["location"][len(cdn) :]
    # The CDN port on the host the client used (a server on 0.0.0.0 is reached by other names).
    conn = connect(hub)
    by_name = ask(conn, "HEAD", f"/{repo}/resolve/main/data.bin", headers={"Host": "localhost:1"})
    conn.close()
    assert by_name[1]["location"].startswith(f"http://localhost:{hub.context.cdn_port}/cdn/{digest}?")
    conn = http.client.HTTPConnection("127.0.0.1", urlsplit(cdn).port, timeout=10)
    try:
        status, headers, body = ask(conn, "GET", signed, headers={"Range": "bytes=100-199"})
        assert (status, body, headers["content-range"]) == (206, DATA[100:200], f"bytes 100-199/{len(DATA)}")
        assert ask(conn, "GET", signed)[::2] == (200, DATA)
        # A signature that does not match, or one past its time, is refused: the client resolves again.
        assert ask(conn, "GET", signed.replace("signature=", "signature=0"))[0] == 403
        assert ask(conn, "GET", signed.replace("data.bin", "other.bin"))[0] == 403
        later = time.time() + 61
        monkeypatch.setattr(hubmerge.hubserver.context, "time", SimpleNamespace(time=lambda: later))
        assert ask(conn, "GET", signed)[0] == 403
    finally:
        conn.close()
    monkeypatch.undo()
    monkeypatch.setattr(hub.context, "cdn_ttl", 60)
    assert hub.stats.bytes_served_by_path[f"{repo}/data.bin"] >= 100 + len(DATA)  # counted as the file
    # Regular files are still served as they are; huggingface_hub downloads LFS files through the redirect.
    assert call(hub, "GET", f"/{repo}/resolve/main/dir%2Fhello.json")[::2] == (200, TEXT)
    path = HfApi().hf_hub_download(repo, "data.bin", cache_dir=tmp_path / "cache")
    assert Path(path).read_bytes() == DATA


def test_errors_are_json_with_error_codes(hub: HubServer, repo: str, hub_token: str) -> None:
    status, headers, body = call(hub, "GET", "/api/models/alice/does-not-exist")
    assert (status, headers["x-error-code"]) == (401, "RepoNotFound") and "not found" in json.loads(body)[
        "error"
    ]
    status, headers, _ = call(hub, "GET", "/api/models/alice/does-not-exist", token=hub_token)
    assert (status, headers["x-error-code"]) == (404, "RepoNotFound")
    status, headers, _ = call(hub, "GET", f"/api/models/{repo}", token="forged")
    assert (status, headers["x-error-message"]) == (401, "Invalid credentials in Authorization header")
    status, headers, _ = call(hub, "GET", f"/api/models/{repo}/revision/nope")
    assert (status, headers["x-error-code"]) == (404, "RevisionNotFound")
    assert call(hub, "GET", "/api/datasets/alice/x")[0] == 404
    status, headers, _ = call(hub, "DELETE", f"/api/models/{repo}/refs")
    assert (status, headers["allow"]) == (405, "GET")


def test_keep_alive_survives_errors_and_unread_bodies(hub: HubServer, repo: str, hub_token: str) -> None:
    conn = connect(hub)
    auth = {"Authorization": f"Bearer {hub_token}"}
    try:
        for _ in range(3):
            assert ask(conn, "GET", f"/api/models/{repo}")[0] == 200
            # Refused before its body is read: the server must still consume it to keep the connection usable.
            assert ask(conn, "POST", "/api/models/alice/missing/commit/main", b"x" * 50_000, auth)[0] == 404
            status, _, body = ask(
                conn, "GET", f"/{repo}/resolve/main/data.bin", headers={"Range": "bytes=0-3"}
            )
            assert (status, body) == (206, DATA[:4])
    finally:
        conn.close()


def lfs_upload_url(hub: HubServer, repo: str, token: str, data: bytes) -> str | None:
    request = {
        "operation": "upload",
        "transfers": ["basic"],
        "ref": {"name": "main"},
        "objects": [{"oid": hashlib.sha256(data).hexdigest(), "size": len(data)}],
    }
    status, headers, body = call(
        hub, "POST", f"/{repo}.git/info/lfs/objects/batch", json.dumps(request).encode(), token
    )
    assert status == 200 and headers["content-type"] == "application/vnd.git-lfs+json"
    (answer,) = json.loads(body)["objects"]
    actions = answer.get("actions")
    return None if actions is None else str(actions["upload"]["href"])


def test_lfs_put_streams_chunked_bodies_and_checks_the_hash(
    hub: HubServer, repo: str, hub_token: str
) -> None:
    data = b"new object " * 50_000
    href = lfs_upload_url(hub, repo, hub_token, data)
    assert href is not None and href.startswith(hub.url)
    path = href[len(hub.url) :]
    conn = connect(hub)
    try:
        assert ask(conn, "PUT", path.replace("signature=", "signature=0"), data)[0] == 403
        assert ask(conn, "PUT", path, data[:-1] + b"!")[0] == 400  # wrong bytes: refused, not stored
        assert lfs_upload_url(hub, repo, hub_token, data) is not None
        chunks = (data[i : i + 7000] for i in range(0, len(data), 7000))
        assert ask(conn, "PUT", path, chunks)[0] == 200  # Transfer-Encoding: chunked
    finally:
        conn.close()
    assert lfs_upload_url(hub, repo, hub_token, data) is None  # stored: no upload action any more
    assert call(hub, "POST", f"/{repo}.git/info/lfs/objects/batch", b"{}", "forged")[0] == 401


def test_concurrent_commits_to_one_branch_all_land(hub: HubServer, repo_name: str, hub_token: str) -> None:
    api = HfApi(token=hub_token)
    api.create_repo(repo_name)

    def commit(index: int) -> str:
        operation = CommitOperationAdd(f"file-{index}.txt", f"{index}".encode())
        return api.create_commit(repo_name, [operation], commit_message=f"commit {index}").oid

    with ThreadPoolExecutor(8) as pool:
        oids = list(pool.map(commit, range(16)))
    history = [c.commit_id for c in api.list_repo_commits(repo_name)]
    assert len(set(oids)) == 16 and set(oids) <= set(history) and len(history) == 17
    assert sorted(api.list_repo_files(repo_name)) == sorted(
        [".gitattributes", *(f"file-{i}.txt" for i in range(16))]
    )


def test_module_entry_point_prints_the_url_and_serves(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "hubmerge.hubserver", "--root", str(tmp_path), "--token", "t0k=carol"]
    with subprocess.Popen(
        [*command, "--cdn-ttl", "30"], cwd=root, stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            address = urlsplit(url)
            conn = http.client.HTTPConnection(address.hostname or "", address.port, timeout=10)
            status, _, body = ask(conn, "GET", "/api/whoami-v2", headers={"Authorization": "Bearer t0k"})
            assert (status, json.loads(body)["name"]) == (200, "carol")
            api = HfApi(endpoint=url, token="t0k")
            api.create_repo("carol/cdn")
            api.create_commit("carol/cdn", [CommitOperationAdd("data.bin", DATA)], commit_message="data")
            status, headers, _ = ask(conn, "HEAD", "/carol/cdn/resolve/main/data.bin")
            conn.close()
            assert status == 302 and f":{address.port}/" not in headers["location"]  # --cdn-ttl: redirected
        finally:
            process.send_signal(2)  # SIGINT: the server stops cleanly
            process.wait(timeout=10)
    assert process.returncode == 0


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 10, None),
        ("bytes=0-0", 10, (0, 1)),
        ("bytes=2-", 10, (2, 10)),
        ("bytes=-3", 10, (7, 10)),
        ("bytes=5-2", 10, None),
        ("items=0-1", 10, None),
        ("bytes=0-1,4-5", 10, None),
        ("bytes=x-1", 10, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(("header", "size"), [("bytes=10-", 10), ("bytes=-0", 10), ("bytes=-5", 0)])
def test_parse_range_refuses_ranges_outside_the_file(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_range(header, size)


@pytest.mark.parametrize(
    ("card", "problem"),
    [
        ("no metadata at all", None),
        ("---\nlicense: mit\nbase_model: a/b\ntags: [x]\n---\ntext", None),
        ("---\n---\ntext", None),
        ("---\nbase_model: [a/b, c/d]\nbase_model_relation: merge\n---\n", None),
        ("---\nlicense: [mit]\n---\n", '"license" must be a string'),
        ("---\nbase_model: 3\n---\n", '"base_model" must be a string or a list of strings'),
        ("---\ntags: merge\n---\n", '"tags" must be a list of strings'),
        ("---\nbase_model_relation: merge\n---\n", '"base_model_relation" requires "base_model"'),
        ("---\nlicense: [unclosed\n---\n", "cannot be parsed"),
        ("---\n- a\n---\n", "must be a mapping"),
    ],
)
def test_validate_card(card: str, problem: str | None) -> None:
    errors = validate_card(card)
    assert (problem is None and errors == []) or (problem is not None and any(problem in e for e in errors))


def test_front_matter_is_read_from_the_top_only() -> None:
    assert front_matter("---\nlicense: mit\n---\n# Title\n---\nnot: yaml\n---\n") == {"license": "mit"}
    assert front_matter("# Title\n---\nlicense: mit\n---\n") is None


@pytest.mark.parametrize(
    ("path", "size", "sample", "mode"),
    [
        ("config.json", 20, b'{"a": 1}', "regular"),
        ("model.safetensors", 20, b"{}", "lfs"),
        ("big.txt", 20_000_000, b"text", "lfs"),
        ("blob", 20, b"\x00\x01", "lfs"),
        ("tok.model", 20, b"\xff\xfe", "lfs"),
        ("cut.txt", 3, "é".encode()[:1], "regular"),
    ],
)
def test_upload_mode(path: str, size: int, sample: bytes, mode: str) -> None:
    assert upload_mode(path, size, sample) == mode


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("main/a/b.txt", ("main", "a/b.txt")),
        ("refs%2Fpr%2F1/x", ("refs/pr/1", "x")),
        ("refs/pr/2/x/y", ("refs/pr/2", "x/y")),
        ("v1.0", ("v1.0", "")),
        ("main/a%2Fb%20c", ("main", "a/b c")),
    ],
)
def test_split_revision(raw: str, expected: tuple[str, str]) -> None:
    assert split_revision(raw) == expected


def test_body_decodes_chunked_encoding_and_lines() -> None:
    wire = b"5\r\nab\ncd\r\n3;ext=1\r\ne\nf\r\n0\r\nTrailer: x\r\n\r\nNEXT REQUEST"
    stream = io.BufferedReader(io.BytesIO(wire))
    body = Body(stream, None, chunked=True)
    assert [body.readline(), body.readline(), body.readline(), body.readline()] == [
        b"ab\n",
        b"cde\n",
        b"f",
        b"",
    ]
    assert body.exhausted and stream.read() == b"NEXT REQUEST"
    sized = Body(io.BufferedReader(io.BytesIO(b"0123456789rest")), 10, chunked=False)
    assert b"".join(sized.iter_chunks()) == b"0123456789" and sized.exhausted
    # Views of one reused buffer: what a line read left over, then the rest, chunk by chunk.
    mixed = Body(io.BufferedReader(io.BytesIO(b"5\r\nab\ncd\r\n3\r\nefg\r\n0\r\n\r\n")), None, chunked=True)
    assert mixed.readline() == b"ab\n"
    assert [bytes(view) for view in mixed.iter_views()] == [b"cd", b"efg"] and mixed.exhausted


def test_large_files_stream_whole_and_a_client_that_stops_reading_is_dropped(
    fresh_hub: HubServer, hub_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    big = hashlib.sha256(b"seed").digest() * (24 << 15)  # 24 MiB: far more than the socket buffers hold
    api = HfApi(endpoint=fresh_hub.url, token=hub_token)
    api.create_repo("alice/big")
    api.create_commit("alice/big", [CommitOperationAdd("big.bin", big)], commit_message="big")
    conn = connect(fresh_hub)
    status, _, body = ask(conn, "GET", "/alice/big/resolve/main/big.bin", headers={"Range": "bytes=5-"})
    assert status == 206 and body == big[5:]
    conn.close()
    # A client that asks and then stops reading: the send waits at most the idle timeout, then the
    # server ends the connection (instead of holding its thread for ever).
    monkeypatch.setattr(hubmerge.hubserver.server._Handler, "timeout", 1)
    address = urlsplit(fresh_hub.url)
    with socket.create_connection((address.hostname or "", address.port or 80)) as raw:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        raw.sendall(b"GET /alice/big/resolve/main/big.bin HTTP/1.1\r\nHost: hub\r\n\r\n")
        time.sleep(3)
        raw.settimeout(10)
        received = 0
        try:
            while chunk := raw.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
    assert 0 < received < len(big)


def test_stop_ends_idle_keep_alive_connections(fresh_hub: HubServer) -> None:
    conn = connect(fresh_hub)
    assert ask(conn, "GET", "/api/models/a/b")[0] == 401
    stopper = threading.Thread(target=fresh_hub.stop)  # must not wait for the idle connection to close
    stopper.start()
    stopper.join(timeout=5)
    conn.close()
    assert not stopper.is_alive()
    fresh_hub.stop()  # a second stop is harmless


def test_organisation_members_write_to_its_namespace(
    tmp_path: Path, hub_token: str, other_token: str
) -> None:
    tokens = {hub_token: "alice", other_token: "bob"}
    with HubServer(tmp_path, tokens=tokens, orgs={"team": ["alice"]}) as server:
        alice, bob = (
            HfApi(endpoint=server.url, token=hub_token),
            HfApi(endpoint=server.url, token=other_token),
        )
        assert [org["name"] for org in alice.whoami()["orgs"]] == ["team"] and bob.whoami()["orgs"] == []
        alice.create_repo("team/shared", private=True)
        alice.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="team/shared")
        with pytest.raises(RepositoryNotFoundError):
            bob.model_info("team/shared")
        with pytest.raises(HfHubHTTPError) as forbidden:
            bob.create_repo("team/other")
        assert forbidden.value.response.status_code == 403


def test_copy_inside_a_repository_reuses_the_lfs_object(hub: HubServer, repo: str, hub_token: str) -> None:
    api = HfApi(token=hub_token)
    hub.reset_stats()
    copy = CommitOperationCopy(src_path_in_repo="data.bin", path_in_repo="copies/data.bin")
    api.create_commit(repo, [copy], commit_message="copy")
    assert hub.stats.requests["lfs_upload"] == 0
    (entry,) = api.get_paths_info(repo, ["copies/data.bin"])
    assert isinstance(entry, RepoFile) and entry.lfs is not None
    assert entry.lfs.sha256 == hashlib.sha256(DATA).hexdigest() and entry.size == len(DATA)


def test_upload_urls_survive_a_restart_on_the_same_storage(tmp_path: Path, hub_token: str) -> None:
    data = b"survivor" * 1000
    with HubServer(tmp_path, tokens={hub_token: "alice"}) as first:
        HfApi(endpoint=first.url, token=hub_token).create_repo("alice/r")
        href = lfs_upload_url(first, "alice/r", hub_token, data)
        assert href is not None
        path = href[len(first.url) :]
    with HubServer(tmp_path, tokens={hub_token: "alice"}) as second:
        assert call(second, "PUT", path, data)[0] == 200
        assert lfs_upload_url(second, "alice/r", hub_token, data) is None


@pytest.mark.parametrize("entry", ["hubmerge.hubserver", "hubmerge.cli"])
def test_sigterm_stops_the_server_cleanly(tmp_path: Path, entry: str) -> None:
    """As `docker stop` or systemd stop it: the server shuts down (exit 0), it is not killed mid-write."""
    command = [sys.executable, "-m", entry, *(["hub", "serve"] if entry.endswith("cli") else [])]
    command += ["--root", str(tmp_path), "--port", "0"]  # `hub serve` would take 8765
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None and process.stderr is not None
        assert "http://127.0.0.1:" in process.stdout.readline()
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)
        assert process.returncode == 0, process.stderr.read()


def test_an_lfs_object_serves_only_the_repositories_it_was_uploaded_to(
    hub: HubServer, hub_token: str, other_token: str, repo_name: str
) -> None:
    """Anyone may read a gated repository's tree (sha256 and size of each file), as on the Hub; that must not
    let them commit the object into a repository of their own and download it, nor learn whether a private
    or deleted repository holds some content."""
    alice, bob = HfApi(token=hub_token), HfApi(token=other_token)
    secret = b"gated weights " * 1000
    oid = hashlib.sha256(secret).hexdigest()
    alice.create_repo(repo_name)
    alice.upload_file(path_or_fileobj=secret, path_in_repo="w.safetensors", repo_id=repo_name)
    alice.update_repo_settings(repo_name, gated="manual")
    stolen = f"bob/steal-{repo_name.split('-')[-1]}"
    bob.create_repo(stolen)
    lines = [
        {"key": "header", "value": {"summary": "steal"}},
        {
            "key": "lfsFile",
            "value": {"path": "w.safetensors", "algo": "sha256", "oid": oid, "size": len(secret)},
        },
    ]
    body = "\n".join(json.dumps(line) for line in lines).encode()
    status, _, answer = call(hub, "POST", f"/api/models/{stolen}/commit/main", body, other_token)
    assert status == 400 and b"was not uploaded to" in answer, answer
    assert call(hub, "GET", f"/{stolen}/resolve/main/w.safetensors", token=other_token)[0] == 404
    # The batch endpoint asks bob for the bytes: it does not tell him another repository holds them.
    batch = json.dumps(
        {"operation": "upload", "objects": [{"oid": oid, "size": len(secret)}], "ref": {"name": "main"}}
    )
    status, _, answer = call(
        hub, "POST", f"/{stolen}.git/info/lfs/objects/batch", batch.encode(), other_token
    )
    (item,) = json.loads(answer)["objects"]
    assert status == 200 and "upload" in item["actions"]
    # ... and an upload must be the bytes themselves.
    href = urlsplit(item["actions"]["upload"]["href"])
    status, _, answer = call(hub, "PUT", f"{href.path}?{href.query}", b"x" * len(secret))
    assert status == 400 and b"hash to" in answer
    # Alice, uploading to her own repository, is asked for nothing she already gave it.
    own = json.dumps(
        {"operation": "upload", "objects": [{"oid": oid, "size": len(secret)}], "ref": {"name": "main"}}
    )
    status, _, answer = call(hub, "POST", f"/{repo_name}.git/info/lfs/objects/batch", own.encode(), hub_token)
    assert status == 200 and "actions" not in json.loads(answer)["objects"][0]
    # A signed upload URL is for one repository: bob cannot move one of his to another.
    forged = href.query.replace(f"repo={stolen.replace('/', '%2F')}", f"repo={repo_name.replace('/', '%2F')}")
    assert call(hub, "PUT", f"{href.path}?{forged}", secret)[0] == 403


def test_names_that_would_break_headers_or_walk_the_store_are_refused(
    hub: HubServer, hub_token: str, repo: str
) -> None:
    for bad in ("evil\rname", "x.lock", "a/.hidden", "tail.", "at@{1}", "a..b", "@"):
        status, _, _ = call(
            hub, "POST", f"/api/models/{repo}/branch/{quote(bad, safe='/')}", b"{}", hub_token
        )
        assert status == 400, bad
    # Read raw: http.client would fold a line after a bare CR into the previous header and hide it.
    address = urlsplit(hub.url)
    with socket.create_connection((address.hostname or "", address.port or 80), timeout=10) as sock:
        target = f"/api/models/{repo}/revision/{quote('x' + chr(13) + chr(10) + 'X-Injected: 1')}"
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while b"\r\n\r\n" not in raw and (piece := sock.recv(65536)):
            raw += piece
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert head.startswith(b"HTTP/1.1 404") and b"\r" not in head.replace(b"\r\n", b"")
    ns, name = repo.split("/")
    assert call(hub, "GET", f"/api/models/{ns}/x%2F..%2F{name}", token=hub_token)[0] == 400
    status, _, _ = call(
        hub,
        "POST",
        f"/{repo}.git/info/lfs/objects/batch",
        b'{"operation": "upload", "objects": ["x"]}',
        hub_token,
    )
    assert status == 200  # a malformed object is answered per object (422), not a server error


def test_hub_serve_takes_organisation_members(tmp_path: Path, hub_token: str, other_token: str) -> None:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    cmd = [sys.executable, "-m", "hubmerge.cli", "hub", "serve", "--root", str(tmp_path / "root")]
    cmd += ["--port", str(number), "--token", f"{hub_token}=alice", "--token", f"{other_token}=bob"]
    server = subprocess.Popen([*cmd, "--org", "team=bob"], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None and "serving" in server.stdout.readline()
        bob = HfApi(endpoint=f"http://127.0.0.1:{number}", token=other_token)
        assert bob.create_repo("team/shared").repo_id == "team/shared"
        with pytest.raises(HfHubHTTPError):
            HfApi(endpoint=f"http://127.0.0.1:{number}", token=hub_token).create_repo("team/other")
    finally:
        server.terminate()
        server.wait()
    bad = subprocess.run([*cmd, "--org", "team"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--org 'team' is not ORG=USER" in bad.stderr


def test_repositories_stored_before_lfs_grants_keep_their_objects(
    hub: HubServer, hub_token: str, repo_name: str
) -> None:
    """A repository stored by an older server has no grant folder: the objects its commits name are its own,
    so a copy from an older revision works and the batch endpoint asks for nothing it holds."""
    api = HfApi(token=hub_token)
    api.create_repo(repo_name)
    data = b"an older upload " * 500
    first = api.upload_file(path_or_fileobj=data, path_in_repo="old.bin", repo_id=repo_name).oid
    api.delete_file("old.bin", repo_id=repo_name)
    shutil.rmtree(hub.root / "repos" / repo_name / "lfs")  # as an older server left it
    copy = CommitOperationCopy(src_path_in_repo="old.bin", path_in_repo="again.bin", src_revision=first)
    api.create_commit(repo_name, [copy], commit_message="copy from an older revision")
    oid = hashlib.sha256(data).hexdigest()
    objects = [{"oid": oid, "size": len(data)}]
    batch = json.dumps({"operation": "upload", "objects": objects, "ref": {"name": "main"}}).encode()
    status, _, answer = call(hub, "POST", f"/{repo_name}.git/info/lfs/objects/batch", batch, hub_token)
    assert status == 200 and "actions" not in json.loads(answer)["objects"][0]
