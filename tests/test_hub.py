"""Hub in and out against the real Hub-compatible server over HTTP: stream sources, publish, resume."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, snapshot_download, try_to_load_from_cache
from safetensors.torch import load_file

import hubmerge
import hubmerge.sources.ranged
from hubmerge.directio import DirectReader
from hubmerge.errors import (
    GatedRepoError,
    PublishError,
    RecipeError,
    RepoNotFoundError,
    RevisionNotFoundError,
    SourceError,
)
from hubmerge.hubserver import HubServer
from hubmerge.hubserver.process import spawn
from hubmerge.publish import PushTarget
from hubmerge.sources.hub import HEADER_READ

from .util import default_sigint, random_tensors, save_model, tiny_llama

transformers = pytest.importorskip("transformers")

LICENSED = "---\nlicense: apache-2.0\n---\n# A fine-tune\n"


def _publish(api: HfApi, repo_id: str, directory: Path, *, private: bool = False) -> str:
    api.create_repo(repo_id, private=private)
    return api.upload_folder(folder_path=directory, repo_id=repo_id).oid


def _cli(*args: str, endpoint: str, token: str | None, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"HF_ENDPOINT": endpoint} | env
    if token is not None:
        environ["HF_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "hubmerge.cli", *args], capture_output=True, text=True, env=environ
    )


@pytest.fixture()
def sources(tmp_path: Path, hub: HubServer, hub_token: str, repo_name: str) -> dict[str, object]:
    api = HfApi(token=hub_token)
    local = [tiny_llama(i, tmp_path / f"ft{i}", card=LICENSED) for i in range(2)]
    ids = [f"{repo_name}-ft{i}" for i in range(2)]
    commits = [_publish(api, repo_id, path) for repo_id, path in zip(ids, local, strict=True)]
    return {"api": api, "local": local, "ids": ids, "commits": commits}


def _unpacked(sources: dict[str, object]) -> tuple[list[str], list[Path], list[str]]:
    """The ``sources`` fixture's repository ids, local folders and commits."""
    ids, local, commits = sources["ids"], sources["local"], sources["commits"]
    assert isinstance(ids, list) and isinstance(local, list) and isinstance(commits, list)
    return ids, local, commits


def test_merge_from_hub_and_push(
    tmp_path: Path, hub: HubServer, hub_token: str, repo_name: str, sources: dict[str, object]
) -> None:
    ids, local, commits = _unpacked(sources)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"method: linear\nmodels: [{ids[0]}, 'hf://{ids[1]}@main']\nparameters: {{t: 0.3}}\n"
        "output: {max_shard_size: 40KB}\n"
    )
    target = f"{repo_name}-merged"
    done = _cli(
        str(recipe), "--out", str(tmp_path / "out"), "--push", target, endpoint=hub.url, token=hub_token
    )
    assert done.returncode == 0, done.stderr
    assert f"pushed to {hub.url}/{target}/commit/" in done.stdout
    api = HfApi(token=hub_token)
    files = set(api.list_repo_files(target))
    assert {"model.safetensors.index.json", "config.json", "README.md", "hubmerge.json"} <= files
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 1 and len(api.list_repo_commits(target)) == 2  # the initial commit, then ONE commit
    merged = transformers.AutoModelForCausalLM.from_pretrained(target, token=hub_token)
    reference = hubmerge.merge(
        {"method": "linear", "models": [str(p) for p in local], "parameters": {"t": 0.3}}, tmp_path / "local"
    )
    expected = load_file(str(reference.out / "model.safetensors"))
    state = merged.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0)
    card = ModelCard.load(target, token=hub_token)
    assert card.data.base_model == ids and card.data.base_model_relation == "merge"
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-generation"
    assert {"merge", "hubmerge", "linear"} <= set(card.data.tags)
    assert all(commit in card.text for commit in commits) and f'from_pretrained("{target}")' in card.text
    manifest = json.loads(Path(api.hf_hub_download(target, "hubmerge.json")).read_text())
    assert [s["commit"] for s in manifest["sources"]] == commits
    # The stored recipe pins each source at its commit: rerun after the branch moved, it reads the same bytes.
    stored = (tmp_path / "out" / "recipe.yaml").read_text()
    assert f"{ids[0]}@{commits[0]}" in stored and f"{ids[1]}@{commits[1]}" in stored
    assert f"{ids[0]}@{commits[0]}" in card.text
    moved = {k: v + 1 for k, v in load_file(str(local[0] / "model.safetensors")).items()}
    save_model(tmp_path / "moved", moved)
    api.upload_file(
        path_or_fileobj=tmp_path / "moved" / "model.safetensors",
        path_in_repo="model.safetensors",
        repo_id=ids[0],
    )
    stored_recipe = str(tmp_path / "out" / "recipe.yaml")
    again = _cli(stored_recipe, "--out", str(tmp_path / "again"), endpoint=hub.url, token=hub_token)
    assert again.returncode == 0, again.stderr
    for shard in shards:
        assert (tmp_path / "again" / shard).read_bytes() == (tmp_path / "out" / shard).read_bytes()


def test_plan_reads_headers_only(
    tmp_path: Path, hub: HubServer, hub_token: str, repo_name: str, sources: dict[str, object]
) -> None:
    """Planning reads each shard's header with one request (its first HEADER_READ bytes), all shards at once;
    a header longer than that takes a second request for the rest, and no tensor bytes past it."""
    ids, local = sources["ids"], sources["local"]
    assert isinstance(ids, list) and isinstance(local, list)
    sizes = [(path / "model.safetensors").stat().st_size for path in local]
    assert min(sizes) > HEADER_READ  # so that reading the whole file would show
    hub.reset_stats()
    plan = hubmerge.plan({"method": "centroid", "models": ids})
    assert [s.commit for s in plan.sources] == sources["commits"]
    served = {k: v for k, v in hub.bytes_served_by_path.items() if k.endswith(".safetensors")}
    assert served == {f"{i}/model.safetensors": HEADER_READ for i in ids}
    # Many tensors (long names): the header is over HEADER_READ, and the second request stops where it ends.
    many = {f"model.layers.{i}.mlp.gate_proj.weight.with.a.long.name": torch.zeros(2000) for i in range(1500)}
    path = save_model(tmp_path / "many", many)
    raw = (path / "model.safetensors").read_bytes()
    header = 8 + struct.unpack("<Q", raw[:8])[0]
    assert header > HEADER_READ
    api = HfApi(token=hub_token)
    api.create_repo(f"{repo_name}-many")
    api.upload_folder(folder_path=path, repo_id=f"{repo_name}-many")
    hub.reset_stats()
    assert len(hubmerge.plan({"method": "centroid", "models": [f"{repo_name}-many"] * 2}).jobs) == len(many)
    served = {k: v for k, v in hub.bytes_served_by_path.items() if k.endswith(".safetensors")}
    assert served == {f"{repo_name}-many/model.safetensors": header}  # one source for both entries


def test_shard_transfer_and_pinned_revisions(
    tmp_path: Path, hub: HubServer, hub_token: str, sources: dict[str, object]
) -> None:
    ids, commits = sources["ids"], sources["commits"]
    assert isinstance(ids, list) and isinstance(commits, list)
    api = HfApi(token=hub_token)
    pinned = {"method": "centroid", "models": [f"{ids[0]}@{commits[0]}", ids[1]]}
    ranges = hubmerge.merge(pinned, tmp_path / "ranges")
    # The branch moves on; the pinned commit still serves the old bytes.
    api.upload_file(path_or_fileobj=b"moved", path_in_repo="note.txt", repo_id=ids[0])
    save_model(tmp_path / "other", random_tensors(0))
    shards = hubmerge.merge(pinned, tmp_path / "shards", transfer="shards")
    assert (ranges.out / "model.safetensors").read_bytes() == (shards.out / "model.safetensors").read_bytes()
    with pytest.raises(RevisionNotFoundError, match="revision 'nope' not found"):
        hubmerge.plan({"method": "centroid", "models": [f"{ids[0]}@nope"]})


def test_shard_downloads_in_pieces_land_whole(
    tmp_path: Path, hub: HubServer, hub_token: str, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard is downloaded in pieces into one reused buffer and written around the page cache, then read
    back around the cache, whole tensors and row ranges: with pieces of an odd size (many of them, the last
    one short, none block-aligned) and reads of a few rows, the merge is the same."""
    from hubmerge import run
    from hubmerge.sources import hub as hub_source

    api = HfApi(token=hub_token)
    ids = []
    for i in range(2):
        tensors = random_tensors(i) | {
            "big.weight": torch.randn(1000, 300, generator=torch.Generator().manual_seed(i))
        }
        _publish(api, f"{repo_name}-{i}", save_model(tmp_path / f"m{i}", tensors, shards=2))
        ids.append(f"{repo_name}-{i}")
    recipe = {"method": "centroid", "models": ids}
    ranges = hubmerge.merge(recipe, tmp_path / "ranges")
    monkeypatch.setattr(hub_source, "SHARD_PIECE", 4099)
    monkeypatch.setattr(run, "READ_BYTES", 64 << 10)  # the large tensor is read a few rows at a time
    asked: list[tuple[int, int] | None] = []
    read = hub_source.HubSource.read

    def spy(self: hub_source.HubSource, info: Any, rows: tuple[int, int] | None = None) -> Any:
        asked.append(rows)
        return read(self, info, rows)

    monkeypatch.setattr(hub_source.HubSource, "read", spy)
    shards = hubmerge.merge(recipe, tmp_path / "shards", transfer="shards")
    assert any(r is not None and r[0] > 0 for r in asked)  # row ranges past the first
    out = sorted(p.name for p in ranges.out.glob("*.safetensors"))
    assert out == sorted(p.name for p in shards.out.glob("*.safetensors"))
    for name in out:
        assert (ranges.out / name).read_bytes() == (shards.out / name).read_bytes()


def test_private_source_needs_a_token(
    tmp_path: Path, hub: HubServer, hub_token: str, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = HfApi(token=hub_token)
    _publish(api, f"{repo_name}-private", tiny_llama(3, tmp_path / "p", card=LICENSED), private=True)
    with pytest.raises(RepoNotFoundError, match="private") as info:
        hubmerge.plan({"method": "centroid", "models": [f"{repo_name}-private"]})
    assert info.value.hint is not None and "HF_TOKEN" in info.value.hint
    cli = _cli("plan", "--json", "/dev/null", endpoint=hub.url, token=None)
    assert cli.returncode == 2
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: centroid\nmodels: [{repo_name}-private]\n")
    refused = _cli("plan", str(recipe), endpoint=hub.url, token=None)
    assert refused.returncode == 2 and "HF_TOKEN" in refused.stderr and "Traceback" not in refused.stderr
    monkeypatch.setenv("HF_TOKEN", hub_token)
    assert hubmerge.plan({"method": "centroid", "models": [f"{repo_name}-private"]}).jobs


@pytest.mark.parametrize("transfer", ["ranges", "shards"])
def test_a_token_passed_to_the_api_reads_and_pushes_without_hf_token(
    tmp_path: Path, hub_token: str, other_token: str, repo_name: str, transfer: str
) -> None:
    """A program holding its own token (several accounts, a secret store) passes it per call; HF_TOKEN is
    unset here, and bob's token neither reads alice's private model nor pushes into her namespace."""
    api = HfApi(token=hub_token)
    private = f"{repo_name}-private"
    _publish(api, private, tiny_llama(3, tmp_path / "p", card=LICENSED), private=True)
    local = tiny_llama(4, tmp_path / "q", card=LICENSED)
    recipe = {"method": "linear", "models": [private, str(local)], "parameters": {"t": 0.25}}
    assert "HF_TOKEN" not in os.environ
    with pytest.raises(RepoNotFoundError):
        hubmerge.plan(recipe)
    with pytest.raises(RepoNotFoundError) as info:
        hubmerge.plan(recipe, token=other_token)
    assert info.value.hint is not None and "pass a token= that can read it" in info.value.hint
    assert "HF_TOKEN" not in info.value.hint  # not read: the token passed was
    assert hubmerge.plan(recipe, token=hub_token).jobs
    with pytest.raises(PublishError, match="bob"):
        hubmerge.merge(
            {"method": "centroid", "models": [str(local)]},
            tmp_path / "bob",
            push=repo_name,
            token=other_token,
        )
    result = hubmerge.merge(
        recipe,
        tmp_path / "out",
        push=f"{repo_name}-merged",
        token=hub_token,
        transfer=transfer,  # type: ignore[arg-type]
    )
    assert result.commit_url is not None
    pushed = Path(api.snapshot_download(f"{repo_name}-merged"))
    merged = load_file(pushed / "model.safetensors")
    first = load_file(Path(api.snapshot_download(private)) / "model.safetensors")
    second = load_file(local / "model.safetensors")
    for name, value in merged.items():
        expected = 0.75 * first[name].double() + 0.25 * second[name].double()
        torch.testing.assert_close(value, expected.to(value.dtype))
    assert (pushed / "config.json").is_file()  # fetched from the private source with the token


def test_a_mistyped_local_path_is_named_when_the_hub_lacks_it_too(tmp_path: Path, hub: HubServer) -> None:
    """`ckpt/tweets` that does not exist here reads as a Hub id: when the Hub has no such repository (or
    cannot be reached), the error says there is no such local folder either, and no --resume for a plan."""
    save_model(tmp_path / "ckpt" / "movies", random_tensors(0))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: centroid\nmodels: [ckpt/movies, ckpt/tweets]\n")
    missing = _cli("plan", str(recipe), endpoint=hub.url, token=None)
    assert missing.returncode == 2, missing.stderr
    line = missing.stderr.strip().splitlines()[-1]
    assert (
        "repository ckpt/tweets not found" in line
        and f"no local folder {tmp_path / 'ckpt' / 'tweets'}" in line
    )
    assert "relative paths start at the recipe's folder" in line
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}"
    down = _cli("plan", str(recipe), endpoint=url, token=None, HUBMERGE_HUB_RETRIES="1")
    line = down.stderr.strip().splitlines()[-1]
    assert down.returncode == 2 and "lost the connection" in line and "no local folder" in line, line
    assert "--resume" not in line and "HF_HUB_OFFLINE=1" in line


def test_a_hub_host_that_does_not_resolve_fails_at_once(tmp_path: Path) -> None:
    """No network, or a mistyped HF_ENDPOINT: a host name that does not resolve is not retried (retries
    printed four warnings over 8 s before the same end): a mistyped local path fails at once, in a line."""
    save_model(tmp_path / "a", random_tensors(0))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: centroid\nmodels: [a, llama_zz/foo]\n")
    done = _cli("plan", str(recipe), endpoint="http://hubmerge-no-such-host.invalid", token=None)
    assert done.returncode == 2 and "retrying" not in done.stderr, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "the host name 'hubmerge-no-such-host.invalid' does not resolve" in line
    assert f"no local folder {tmp_path / 'llama_zz' / 'foo'} either" in line and "HF_ENDPOINT" in line


def test_a_name_resolution_failure_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the resolver words it where it has no server to ask (EAI_AGAIN), inside httpx's error, before the
    Hub has answered any request of the process."""
    import httpx2

    from hubmerge.errors import HubConnectionError
    from hubmerge.sources import hub as hub_module
    from hubmerge.sources.hub import hub_call

    monkeypatch.setattr(hub_module, "_ANSWERED", threading.Event())

    calls = []

    def lookup() -> None:
        calls.append(1)
        raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution")

    with pytest.raises(HubConnectionError, match="does not resolve"):
        hub_call(lookup, repo_id="org/x", revision=None, what="repository info", attempts=5)
    assert len(calls) == 1


def test_a_name_resolution_failure_after_the_hub_answered_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mid-merge, with the Hub reached before, a resolver's failure is a blip: retried as a lost link."""
    import httpx2

    from hubmerge.sources import hub as hub_module

    monkeypatch.setattr(hub_module, "_ANSWERED", threading.Event())
    hub_module.hub_call(lambda: None, repo_id="org/x", revision=None, what="repository info")
    answers = iter([httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"), None])

    def flaky() -> str:
        failure = next(answers)
        if failure is not None:
            raise failure
        return "bytes"

    monkeypatch.setattr(hub_module.time, "sleep", lambda _: None)
    assert hub_module.hub_call(flaky, repo_id="org/x", revision=None, what="a tensor", attempts=3) == "bytes"


def test_a_repo_the_hub_lacks_names_the_local_folder_of_that_name(
    tmp_path: Path, hub: HubServer, repo_name: str
) -> None:
    """`repo: org/llama_b` reads the Hub even where a folder org/llama_b exists; when the Hub lacks it, the
    error says that the folder is there and that `path:` reads it."""
    from hubmerge.refs import hub_ref
    from hubmerge.sources import open_source

    save_model(tmp_path / repo_name, random_tensors(0))
    ref = hub_ref(repo_name, field="models.1.repo", base_dir=tmp_path)
    with pytest.raises(RepoNotFoundError, match=f"repository {repo_name} not found") as info:
        open_source(ref, label="models.1")
    assert f"a local folder {tmp_path / repo_name} exists, which `repo:` does not read" in info.value.message
    assert (info.value.hint or "").startswith(f"to merge it write `path: {repo_name}` instead of `repo:`")


def test_differing_licenses_fail_at_plan_time(tmp_path: Path, hub_token: str, repo_name: str) -> None:
    api = HfApi(token=hub_token)
    mit = tiny_llama(4, tmp_path / "mit", card=LICENSED)
    (mit / "README.md").write_text("---\nlicense: mit\n---\n")
    ids = [f"{repo_name}-a", f"{repo_name}-b"]
    _publish(api, ids[0], tiny_llama(5, tmp_path / "apache", card=LICENSED))
    _publish(api, ids[1], mit)
    with pytest.raises(RecipeError, match=r"different licenses \(models.0: apache-2.0, models.1: mit\)"):
        hubmerge.plan({"method": "centroid", "models": ids})
    plan = hubmerge.plan({"method": "centroid", "models": ids, "card": {"license": "mit"}})
    assert plan.jobs


@pytest.mark.parametrize("direct", [True, False])
def test_push_hashes_shards_as_they_are_written(
    tmp_path: Path,
    hub: HubServer,
    hub_token: str,
    repo_name: str,
    monkeypatch: pytest.MonkeyPatch,
    direct: bool,
) -> None:
    """The uploader hashes each shard from the merged bytes: huggingface_hub never reads a shard to hash
    it, and the server, which checks every upload's sha256, accepts them all. Shards are read for their
    upload around the page cache (the LFS protocol, as here), or by path with direct I/O turned off."""
    from huggingface_hub import lfs

    from hubmerge import publish

    if not direct:
        monkeypatch.setenv("HUBMERGE_DIRECT_WRITE", "0")
    readers: list[DirectReader] = []

    class Spy(DirectReader):
        def __init__(self, path: Path, **kwargs: Any) -> None:
            super().__init__(path, **kwargs)
            self.served = 0
            readers.append(self)

        def read(self, size: int | None = -1) -> bytes:
            data = super().read(size)
            self.served += len(data)
            return data

    monkeypatch.setattr(publish, "DirectReader", Spy)

    hash_file = lfs.UploadInfo.from_path

    def no_rehash(path: str) -> lfs.UploadInfo:
        assert not path.endswith(".safetensors"), f"{path} was read again to hash it"
        return hash_file(path)

    monkeypatch.setattr(lfs.UploadInfo, "from_path", no_rehash)
    monkeypatch.setenv("HF_TOKEN", hub_token)
    bigger = [
        {k: v.repeat(64, 1) if v.dim() == 2 else v for k, v in random_tensors(i).items()} for i in range(2)
    ]
    models = [save_model(tmp_path / f"m{i}", tensors) for i, tensors in enumerate(bigger)]
    # A recipe of its own (its SHA-256 is in every shard's header): shards of the same bytes pushed by another
    # test would already be on the session's server, and would not be uploaded again.
    recipe = {
        "method": "centroid",
        "models": [str(m) for m in models],
        "output": {"max_shard_size": "20KB"},
        "card": {"description": repo_name},
    }
    hub.reset_stats()
    result = hubmerge.merge(recipe, tmp_path / "out", push=PushTarget(repo_name))
    shards = sorted(p.name for p in result.out.glob("model-*.safetensors"))
    assert len(shards) >= 3 and hub.stats.requests["lfs_upload"] == len(shards)
    api = HfApi(token=hub_token)
    for shard in shards:
        pushed = Path(api.hf_hub_download(repo_name, shard)).read_bytes()
        assert pushed == (result.out / shard).read_bytes()
    assert len(readers) == (len(shards) if direct else 0)
    assert all(r.closed for r in readers)
    total = sum((result.out / s).stat().st_size for s in shards)
    assert sum(r.served for r in readers) == (total if direct else 0)


def test_a_direct_upload_shows_its_progress(
    tmp_path: Path,
    hub: HubServer,
    hub_token: str,
    repo_name: str,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """huggingface_hub shows an upload's progress for paths only; the uploader's own bar stands in for it,
    and obeys huggingface_hub's switch, HF_HUB_DISABLE_PROGRESS_BARS (set by the tests' environment)."""
    import importlib

    from tqdm import tqdm

    bars = importlib.import_module("huggingface_hub.utils.tqdm")  # the module (`utils.tqdm` is the class)
    monkeypatch.setenv("HF_TOKEN", hub_token)
    bigger = [
        {k: v.repeat(64, 1) if v.dim() == 2 else v for k, v in random_tensors(i).items()} for i in range(2)
    ]
    models = [save_model(tmp_path / f"m{i}", tensors) for i, tensors in enumerate(bigger)]
    recipe = {"method": "centroid", "models": [str(m) for m in models], "output": {"max_shard_size": "20KB"}}
    hubmerge.merge(recipe, tmp_path / "quiet", push=PushTarget(repo_name))
    assert "safetensors" not in capfd.readouterr().err
    monkeypatch.setattr(bars, "HF_HUB_DISABLE_PROGRESS_BARS", None)
    recipe = recipe | {"method": "linear", "parameters": {"t": 0.3}}  # new bytes, so new uploads
    result = hubmerge.merge(recipe, tmp_path / "out", push=PushTarget(repo_name))
    err = capfd.readouterr().err
    shards = sorted(p for p in result.out.glob("model-*.safetensors"))
    assert len(shards) >= 2
    hubmerge.merge(recipe, tmp_path / "again", push=PushTarget(repo_name))  # the Hub has every shard
    assert "safetensors" not in capfd.readouterr().err  # nothing uploaded, no bar
    for shard in shards:
        size = tqdm.format_sizeof(shard.stat().st_size)  # the whole shard, as the bar writes it
        assert re.search(rf"{re.escape(shard.name)}: 100%\|[^|]*\| {re.escape(f'{size}/{size}')} ", err), err


def test_push_without_a_token_says_so(
    tmp_path: Path, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    models = [save_model(tmp_path / f"m{i}", random_tensors(i)) for i in range(2)]
    with pytest.raises(PublishError, match="whoami on .* needs a Hub token, and none is set") as info:
        hubmerge.merge(
            {"method": "centroid", "models": [str(m) for m in models]},
            tmp_path / "out",
            push=PushTarget(repo_name),
        )
    assert info.value.hint is not None and "set HF_TOKEN or run `hf auth login`" in info.value.hint


def test_interrupted_push_resumes_without_reuploading(tmp_path: Path, hub_token: str) -> None:
    """With --delete-local: the shards uploaded before the server died are gone locally, and the resumed
    push commits them from what the first run recorded, re-uploading nothing that the Hub has."""
    bigger = [
        {k: v.repeat(64, 1) if v.dim() == 2 else v for k, v in random_tensors(i).items()} for i in range(2)
    ]
    local = [save_model(tmp_path / f"m{i}", tensors) for i, tensors in enumerate(bigger)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"method: centroid\nmodels: [{local[0]}, {local[1]}]\noutput: {{max_shard_size: 20KB}}\n"
    )
    n_shards = len(hubmerge.plan(recipe).shards)
    assert n_shards >= 3
    storage, out = tmp_path / "hub-storage", tmp_path / "out"
    server, url = spawn(storage, {hub_token: "alice"})
    blobs = storage / "blobs" / "sha256"

    def kill_after_second_upload() -> None:
        deadline = time.monotonic() + 60
        while (
            not (blobs.exists() and sum(p.is_file() for p in blobs.rglob("*")) >= 2)
            and time.monotonic() < deadline
        ):
            time.sleep(0.001)
        server.send_signal(signal.SIGKILL)

    watcher = threading.Thread(target=kill_after_second_upload)
    watcher.start()
    failed = _cli(
        str(recipe),
        "--out",
        str(out),
        "--push",
        "alice/resumed",
        "--delete-local",
        endpoint=url,
        token=hub_token,
        HUBMERGE_HUB_RETRIES="2",
    )
    watcher.join()
    server.wait()
    assert failed.returncode == 2, failed.stderr
    assert "--resume" in failed.stderr and "Traceback" not in failed.stderr
    assert hub_token not in failed.stderr + failed.stdout
    # huggingface_hub logs each retried request with its URL (a signed one's signature cut out, below)
    assert "thrown while requesting" in failed.stderr and "signature=" not in failed.stderr
    # After the failed upload the next shards are not tried (each would wait out the retries again)
    assert failed.stderr.count("[Retry 5/5]") == 1, failed.stderr
    uploaded_before = len([p for p in blobs.rglob("*") if p.is_file()])
    assert 2 <= uploaded_before < n_shards
    partial = tmp_path / ".out.hubmerge-partial"
    assert not (partial / f"model-00001-of-{n_shards:05d}.safetensors").exists()  # uploaded, deleted
    recorded = json.loads((partial / ".hubmerge-progress" / "uploaded.json").read_text())
    with HubServer(storage, tokens={hub_token: "alice"}) as second:
        args = (str(recipe), "--out", str(out), "--push", "alice/resumed", "--resume", "--delete-local")
        done = _cli(*args, endpoint=second.url, token=hub_token)
        assert done.returncode == 0, done.stderr
        # Every shard the first run recorded is committed from its record, not uploaded again; one whose
        # upload the kill cut after its bytes were stored (not yet granted to the repository) may be.
        uploads = second.stats.requests["lfs_upload"]
        assert n_shards - uploaded_before <= uploads <= n_shards - len(recorded), (uploads, recorded)
        api = HfApi(endpoint=second.url, token=hub_token)
        shards = sorted(f for f in api.list_repo_files("alice/resumed") if f.startswith("model-"))
        assert len(shards) == n_shards
        merged: dict[str, torch.Tensor] = {}
        for shard in shards:
            merged |= load_file(api.hf_hub_download("alice/resumed", shard))
    assert (out / "model.safetensors.index.json").exists() and not list(out.glob("model-*.safetensors"))
    for name, value in bigger[0].items():
        expected = (value + bigger[1][name]) / 2 if value.is_floating_point() else value
        torch.testing.assert_close(merged[name], expected)


STOP_DURING_UPLOAD = """
import atexit, os, signal, sys, time
import hubmerge.publish as publish
reads = []
atexit.register(lambda: open(sys.argv[2], "w").write(str(len(reads))))
def update(self, n):  # the upload's progress, once per 64 KiB read: slowed down, as on a slow uplink
    reads.append(n)
    if len(reads) == 5:
        os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.02)
publish._UploadBar.update = update
from hubmerge.cli import main
sys.exit(main([sys.argv[1], "--out", sys.argv[3], "-q", "--push", sys.argv[4]]))
"""


def test_ctrl_c_stops_an_upload_under_way(tmp_path: Path, hub_token: str, repo_name: str) -> None:
    """Ctrl-C (or SIGTERM) during a push: the shard being uploaded stops at its next read instead of being
    sent to the end (minutes for a 5 GB shard on a slow uplink); the partial output is kept for --resume."""
    tensors = {"w": torch.randn(1024, 1024), "v": torch.randn(1024)}  # one 4 MiB shard: 64 reads of 64 KiB
    model = save_model(tmp_path / "m", tensors)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: weighted\nmodels: [{model}, {model}]\n")
    count, out = tmp_path / "reads.txt", tmp_path / "out"
    stopped = subprocess.run(
        [sys.executable, "-c", STOP_DURING_UPLOAD, str(recipe), str(count), str(out), repo_name],
        capture_output=True,
        text=True,
        env=os.environ | {"HF_TOKEN": hub_token},
        preexec_fn=default_sigint,
    )
    assert stopped.returncode == 130, stopped.stderr
    assert stopped.stderr.startswith("interrupted (hint: the finished tensors are kept in"), stopped.stderr
    assert 5 <= int(count.read_text()) <= 24  # of 64 reads of 20 ms: the upload stopped soon after the signal
    done = _cli(
        str(recipe),
        "--out",
        str(out),
        "--push",
        repo_name,
        "--resume",
        endpoint=os.environ["HF_ENDPOINT"],
        token=hub_token,
    )
    assert done.returncode == 0, done.stderr
    pushed = load_file(HfApi(token=hub_token).hf_hub_download(repo_name, "model.safetensors"))
    torch.testing.assert_close(pushed["w"], tensors["w"])


def test_delete_local_keeps_only_small_files(
    tmp_path: Path,
    hub: HubServer,
    hub_token: str,
    other_token: str,
    repo_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)  # the command turns them off in a log
    local = [save_model(tmp_path / f"m{i}", random_tensors(i)) for i in range(2)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"method: centroid\nmodels: [{local[0]}, {local[1]}]\noutput: {{max_shard_size: 300}}\n"
        f"push: {{repo: {repo_name}, private: true, delete_local: true}}\n"
    )
    done = _cli(str(recipe), "--out", str(tmp_path / "out"), endpoint=hub.url, token=hub_token)
    assert done.returncode == 0, done.stderr
    assert not list((tmp_path / "out").glob("*.safetensors"))
    api = HfApi(token=hub_token)
    assert api.model_info(repo_name).private
    n_shards = len([f for f in api.list_repo_files(repo_name) if f.endswith(".safetensors")])
    assert f" ({n_shards} shards deleted once uploaded)" in done.stdout, done.stdout
    # A log (text=True reads a bar's carriage returns as newlines): no upload bars either.
    assert not re.search(r"safetensors: +\d+%\|", done.stderr), done.stderr
    shards = [f for f in api.list_repo_files(repo_name) if f.endswith(".safetensors")]
    merged: dict[str, torch.Tensor] = {}
    for shard in shards:
        merged |= load_file(api.hf_hub_download(repo_name, shard))
    a, b = random_tensors(0), random_tensors(1)
    torch.testing.assert_close(merged["layer.0.weight"], (a["layer.0.weight"] + b["layer.0.weight"]) / 2)
    # The stored recipe leaves out where the merge went: a reader reruns it without pushing to this repo.
    stored = hubmerge.load_recipe(tmp_path / "out" / "recipe.yaml")
    assert stored.push is None and stored.output.dir is None and stored.output.max_shard_size == 300
    assert (
        f"hf download {repo_name} recipe.yaml --local-dir ." in (tmp_path / "out" / "README.md").read_text()
    )
    rerun = _cli(
        str(tmp_path / "out" / "recipe.yaml"),
        "--out",
        str(tmp_path / "again"),
        endpoint=hub.url,
        token=other_token,
    )
    assert rerun.returncode == 0, rerun.stderr
    assert {f.name for f in (tmp_path / "again").glob("*.safetensors")} == set(shards)


def test_reads_follow_the_cdn_redirect_once_per_file(
    tmp_path: Path, hub: HubServer, sources: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session server redirects LFS files to its CDN port, as huggingface.co does (conftest.py)."""
    ids = sources["ids"]
    assert isinstance(ids, list)
    recipe = {"method": "linear", "models": ids, "parameters": {"t": 0.3}}
    direct = tmp_path / "direct"
    with monkeypatch.context() as served:
        served.setattr(hub.context, "cdn_ttl", 0)
        hubmerge.merge(recipe, out=direct)  # also caches the small files (config, card) the merge fetches
    counts = []
    for ttl in (0.0, hubmerge.sources.ranged.LOCATION_TTL):
        monkeypatch.setattr(hubmerge.sources.ranged, "LOCATION_TTL", ttl)
        hub.reset_stats()
        out = hubmerge.merge(recipe, out=tmp_path / f"cdn-{ttl}").out
        assert (out / "model.safetensors").read_bytes() == (direct / "model.safetensors").read_bytes()
        counts.append((hub.stats.requests["resolve"], hub.stats.requests["cdn"]))
    (resolved_each, ranges), (resolved_once, ranges_again) = counts
    # Every range read is served by the CDN; asked of the Hub each time, or once per file when remembered.
    assert ranges == ranges_again >= 2 * len(ids) and resolved_each == ranges and resolved_once == len(ids)


def test_models_in_the_local_cache_are_read_there(
    tmp_path: Path, hub: HubServer, hub_token: str, sources: dict[str, object]
) -> None:
    ids, commits = sources["ids"], sources["commits"]
    assert isinstance(ids, list) and isinstance(commits, list)
    recipe = {"method": "linear", "models": ids, "parameters": {"t": 0.3}}

    def weights_served() -> dict[str, int]:
        return {k: v for k, v in hub.bytes_served_by_path.items() if k.endswith(".safetensors")}

    hub.reset_stats()
    streamed = hubmerge.merge(recipe, out=tmp_path / "streamed").out
    assert set(weights_served()) == {f"{i}/model.safetensors" for i in ids}
    # One model downloaded before (as `hf download` or from_pretrained do): its weights come from the cache at
    # the pinned commit, the other's from the Hub, and the bytes written are the same.
    snapshot_download(ids[0], token=hub_token)
    plan = hubmerge.plan(recipe)
    assert [(s.commit, s.cached) for s in plan.sources] == [(commits[0], True), (commits[1], False)]
    (tmp_path / "r.yaml").write_text(json.dumps(recipe))
    shown = _cli("plan", str(tmp_path / "r.yaml"), endpoint=hub.url, token=hub_token)
    assert f"models.0 {ids[0]}  @ {commits[0]}  (local Hugging Face cache)" in shown.stdout, shown.stderr
    assert f"models.1 {ids[1]}  @ {commits[1]}\n" in shown.stdout
    hub.reset_stats()
    hubmerge.merge(recipe, out=tmp_path / "cached")
    assert set(weights_served()) == {f"{ids[1]}/model.safetensors"}
    for name in sorted(p.name for p in streamed.glob("*.safetensors")):
        assert (tmp_path / "cached" / name).read_bytes() == (streamed / name).read_bytes()
    card = (tmp_path / "cached" / "README.md").read_text()
    assert commits[0] in card and commits[1] in card
    # A cached file that is not whole (its size differs from the Hub's) is not trusted: streamed again.
    cached = Path(try_to_load_from_cache(ids[0], "model.safetensors", revision=commits[0]))
    blob = cached.resolve()
    blob.write_bytes(blob.read_bytes()[:-8])
    hub.reset_stats()
    hubmerge.merge(recipe, out=tmp_path / "again")
    assert set(weights_served()) == {f"{i}/model.safetensors" for i in ids}
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == (
        streamed / "model.safetensors"
    ).read_bytes()


def test_offline_mode_reads_the_local_cache(
    tmp_path: Path, hub: HubServer, hub_token: str, repo_name: str, sources: dict[str, object]
) -> None:
    ids, local, commits = _unpacked(sources)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: centroid\nmodels: [{ids[0]}, {ids[1]}]\n")
    out = tmp_path / "out"

    def offline(*args: str) -> subprocess.CompletedProcess[str]:
        return _cli(*args, endpoint=hub.url, token=hub_token, HF_HUB_OFFLINE="1")

    # Not downloaded: one line naming the model and how to get it; no retry, nothing written.
    missing = offline(str(recipe), "--out", str(out))
    assert missing.returncode == 2, missing.stderr
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "HF_HUB_OFFLINE is set" in lines[0], lines
    assert "not in the local Hugging Face cache" in lines[0] and f"`hf download {ids[0]}`" in lines[0]
    assert not out.exists()
    # Downloaded as `hf download` does: the merge reads the cached snapshots, pinned to their commits, and
    # writes the bytes the merge streamed from the Hub wrote.
    online = _cli(str(recipe), "--out", str(tmp_path / "online"), endpoint=hub.url, token=hub_token)
    assert online.returncode == 0, online.stderr
    for repo_id in ids:
        snapshot_download(repo_id, token=hub_token)
    done = offline(str(recipe), "--out", str(out))
    assert done.returncode == 0, done.stderr
    shards = sorted(p.name for p in (tmp_path / "online").glob("*.safetensors"))
    assert shards and shards == sorted(p.name for p in out.glob("*.safetensors"))
    for name in shards:
        assert (out / name).read_bytes() == (tmp_path / "online" / name).read_bytes()
    card = (out / "README.md").read_text()
    assert all(f"{i}" in card and c in card for i, c in zip(ids, commits, strict=True)), card
    # A commit abbreviated as the Hub's pages show it reads the cached snapshot it names.
    short = tmp_path / "short.yaml"
    short.write_text(f"method: centroid\nmodels: [{ids[0]}@{commits[0][:7]}, {ids[1]}@{commits[1][:12]}]\n")
    abbreviated = offline(str(short), "--out", str(tmp_path / "short"))
    assert abbreviated.returncode == 0, abbreviated.stderr
    for name in shards:
        assert (tmp_path / "short" / name).read_bytes() == (out / name).read_bytes()
    # Partly downloaded (a config, no weights): named as such, with the same way out.
    api = HfApi(token=hub_token)
    partial_id = f"{repo_name}-partial"
    _publish(api, partial_id, tiny_llama(5, tmp_path / "partial", card=LICENSED))
    api.hf_hub_download(partial_id, "config.json")
    recipe.write_text(f"method: centroid\nmodels: [{ids[0]}, {partial_id}]\n")
    partial = offline(str(recipe), "--out", str(tmp_path / "p-out"))
    assert partial.returncode == 2 and len(partial.stderr.strip().splitlines()) == 1, partial.stderr
    assert "no model.safetensors" in partial.stderr and f"`hf download {partial_id}`" in partial.stderr
    # A push needs the Hub: it stops before merging, with the cause, and nothing is written.
    local_recipe = tmp_path / "l.yaml"
    local_recipe.write_text(f"method: centroid\nmodels: [{{path: {local[0]}}}, {{path: {local[1]}}}]\n")
    push = offline(str(local_recipe), "--out", str(tmp_path / "push-out"), "--push", "alice/offline")
    assert push.returncode == 2 and "HF_HUB_OFFLINE is set" in push.stderr, push.stderr
    assert "nothing was merged yet" in push.stderr and "retrying" not in push.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if "push-out" in p.name) == []  # no partial output


def test_gated_source_is_a_clear_error(
    tmp_path: Path, hub_token: str, other_token: str, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = HfApi(token=hub_token)
    _publish(api, repo_name, save_model(tmp_path / "g", random_tensors(0)))
    api.update_repo_settings(repo_name, gated="auto")
    monkeypatch.setenv("HF_TOKEN", other_token)
    with pytest.raises(GatedRepoError, match="is gated") as info:
        hubmerge.plan({"method": "centroid", "models": [repo_name]})
    assert info.value.hint is not None and "request access" in info.value.hint


def test_lost_source_connection_then_resume(tmp_path: Path, hub_token: str) -> None:
    # 75 MiB per model: far more than the reads kept in flight ahead of the merge (a few spans of
    # SPAN_BYTES), so killing the server after ten tensors leaves most of them unread.
    many = {
        f"layer.{i}.weight": torch.randn(256, 512, generator=torch.Generator().manual_seed(i))
        for i in range(150)
    }
    other = {name: value + 1 for name, value in many.items()}
    storage = tmp_path / "hub-storage"
    server, url = spawn(storage, {hub_token: "alice"})
    api = HfApi(endpoint=url, token=hub_token)
    for name, tensors in (("alice/one", many), ("alice/two", other)):
        api.create_repo(name)
        api.upload_folder(folder_path=save_model(tmp_path / name, tensors), repo_id=name)
    recipe = tmp_path / "r.yaml"
    # hf:// forces a Hub reference even though ./alice/one exists next to the recipe.
    recipe.write_text("method: linear\nmodels: ['hf://alice/one', 'hf://alice/two']\nparameters: {t: 0.25}\n")
    out = tmp_path / "out"
    journal = tmp_path / ".out.hubmerge-partial" / ".hubmerge-progress" / "journal"

    def kill_mid_merge() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if journal.exists() and journal.read_text().count("\n") >= 10:
                break
            time.sleep(0.001)
        server.send_signal(signal.SIGKILL)

    watcher = threading.Thread(target=kill_mid_merge)
    watcher.start()
    failed = _cli(str(recipe), "--out", str(out), endpoint=url, token=hub_token, HUBMERGE_HUB_RETRIES="2")
    watcher.join()
    server.wait()
    assert failed.returncode == 2, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert "lost the connection to the Hub" in last and "--resume" in last
    finished = journal.read_text().count("\n")
    assert 10 <= finished < len(many)
    with HubServer(storage, tokens={hub_token: "alice"}) as again:
        done = _cli(str(recipe), "--out", str(out), "--resume", endpoint=again.url, token=hub_token)
    assert done.returncode == 0, done.stderr
    assert f"{finished} tensors resumed" in done.stdout
    merged = load_file(str(out / "model.safetensors"))
    for name, value in many.items():
        torch.testing.assert_close(merged[name], 0.75 * value + 0.25 * other[name])


def test_push_to_a_branch_and_as_a_pull_request(
    tmp_path: Path, hub_token: str, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:

    monkeypatch.setenv("HF_TOKEN", hub_token)
    local = [str(save_model(tmp_path / f"m{i}", random_tensors(i), card=LICENSED)) for i in range(2)]
    recipe = {"method": "centroid", "models": local, "card": {"description": "Branch test."}}
    on_branch = hubmerge.merge(recipe, tmp_path / "a", push=PushTarget(repo_name, branch="dev"))
    api = HfApi(token=hub_token)
    assert on_branch.commit_url is not None
    assert "model.safetensors" in api.list_repo_files(repo_name, revision="dev")
    assert "model.safetensors" not in api.list_repo_files(repo_name)
    card = ModelCard.load(api.hf_hub_download(repo_name, "README.md", revision="dev"))
    assert card.data.license == "apache-2.0" and "Branch test." in card.text
    proposal = hubmerge.merge(recipe, tmp_path / "b", push=PushTarget(repo_name, create_pr=True))
    assert proposal.commit_url is not None and "/discussions/" in proposal.commit_url
    assert "model.safetensors" in api.list_repo_files(repo_name, revision="refs/pr/1")
    assert "model.safetensors" not in api.list_repo_files(repo_name)
    assert f'from_pretrained("{repo_name}", revision="dev")' in card.text  # the snippet loads the branch
    # The command says where a pull request's merge is until it is merged (the card loads the branch).
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"method: centroid\nmodels: [{local[0]}, {local[1]}]\n")
    args = (str(recipe_file), "--out", str(tmp_path / "c"), "--push", repo_name, "--create-pr")
    done = _cli(*args, endpoint=os.environ["HF_ENDPOINT"], token=hub_token)
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip().splitlines()[-1] == 'until it is merged, load the merge with revision="refs/pr/2"'
    )
    with pytest.raises(RecipeError, match="is a ref, not a branch name"):  # adding to a pull request
        PushTarget(repo_name, branch="refs/pr/1")


def test_a_push_into_a_sources_own_repository_says_it_replaces_it(
    tmp_path: Path,
    hub_token: str,
    sources: dict[str, object],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from hubmerge.plan import SourceInfo
    from hubmerge.refs import ModelRef

    ids, _, commits = _unpacked(sources)
    monkeypatch.setenv("HF_TOKEN", hub_token)
    with caplog.at_level("WARNING", logger="hubmerge"):
        hubmerge.merge({"method": "centroid", "models": ids}, tmp_path / "out", push=ids[1])
    said = [r.getMessage() for r in caplog.records if "replaces the model it read" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith(
        f"the push goes to models.1's repository and branch ({ids[1]})"
    )
    assert commits[1] in said[0]
    card = ModelCard((tmp_path / "out" / "README.md").read_text())
    assert card.data.base_model == [ids[0]]  # not a base model of itself; the sources table names it
    assert commits[1] in card.text
    # What a source is: its repository and commit, whatever revision named it (a resume may pin the commit).
    by_branch = SourceInfo("models.0", ModelRef(repo_id=ids[0], revision="main"), commits[0])
    by_commit = SourceInfo("models.0", ModelRef(repo_id=ids[0], revision=commits[0][:7]), commits[0])
    assert by_branch.identity() == by_commit.identity()


def test_models_open_together_and_the_first_failure_in_recipe_order_is_reported(
    hub: HubServer, repo_name: str, sources: dict[str, object]
) -> None:
    ids = sources["ids"]
    assert isinstance(ids, list)
    missing = [f"{repo_name}-missing-{i}" for i in range(2)]
    for order in (missing, missing[::-1]):
        with pytest.raises(RepoNotFoundError, match=f"repository {order[0]} not found"):
            hubmerge.plan({"method": "centroid", "models": [ids[0], *order, ids[1]]})
    plan = hubmerge.plan({"method": "centroid", "models": [ids[1], ids[0], ids[1]]})
    # One source per reference (opened once), labelled by position; the plan says the model counts twice.
    assert [s.label for s in plan.sources] == ["models.0", "models.1", "models.2"]
    assert any(n.startswith("models.2 is models.0 again") for n in plan.notices), plan.notices
    assert [s.commit for s in plan.sources] == [
        sources["commits"][1],
        sources["commits"][0],
        sources["commits"][1],
    ]


def test_shards_for_xet_are_written_through_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Xet reads files by path (through the page cache), so only LFS uploads get direct writes and reads."""
    import importlib.util

    from huggingface_hub import constants

    from hubmerge.publish import uploads_read_direct

    assert uploads_read_direct()  # the tests' server speaks LFS (HF_HUB_DISABLE_XET=1)
    monkeypatch.setenv("HUBMERGE_DIRECT_WRITE", "0")
    assert not uploads_read_direct()
    monkeypatch.delenv("HUBMERGE_DIRECT_WRITE")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", False)
    if importlib.util.find_spec("hf_xet") is None:
        pytest.skip("hf_xet is not installed")
    assert not uploads_read_direct()


def test_a_push_over_an_earlier_model_deletes_its_model_files(
    tmp_path: Path, hub_token: str, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_token)
    local = [str(tiny_llama(i, tmp_path / f"ft{i}", card=LICENSED)) for i in range(2)]
    recipe: dict[str, Any] = {"method": "linear", "models": local, "parameters": {"t": 0.3}}
    hubmerge.merge(recipe, tmp_path / "one", push=PushTarget(repo_name))
    api = HfApi(token=hub_token)
    assert "model.safetensors" in api.list_repo_files(repo_name)
    earlier = (
        "adapter_config.json",
        "special_tokens_map.json",
        "vocab.txt",
        "tokenizer.model.v3",
        "modules.json",
        "1_Pooling/config.json",
    )
    owners = (
        "notes.txt",
        "onnx/model.safetensors",
        "2024_eval/results.json",
        "tokenizer_notes.md",
        "train.model",
    )
    modules = (
        b'[{"idx": 0, "name": "0", "path": "", "type": "T"}, {"idx": 1, "name": "1", "path": "1_Pooling"}]'
    )
    for name in (*earlier, *owners):  # an earlier model's files; the repository owner's
        content = modules if name == "modules.json" else b"{}"
        api.upload_file(path_or_fileobj=content, path_in_repo=name, repo_id=repo_name)
    recipe |= {"parameters": {"t": 0.9}, "output": {"max_shard_size": "40KB"}}
    second = hubmerge.merge(recipe, tmp_path / "two", push=PushTarget(repo_name))
    files = set(api.list_repo_files(repo_name))
    shards = {f.name for f in second.out.glob("model-*.safetensors")}
    assert len(shards) > 1 and shards | {"model.safetensors.index.json"} <= files
    assert "model.safetensors" not in files and not set(earlier) & files
    assert set(owners) <= files  # not a model's files as a merge writes them
    merged = transformers.AutoModelForCausalLM.from_pretrained(repo_name, token=hub_token).state_dict()
    expected: dict[str, torch.Tensor] = {}
    for shard in shards:
        expected |= load_file(str(second.out / shard))
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=0, atol=0)


def test_private_push_to_a_public_repository_is_refused_before_merging(
    tmp_path: Path, hub_token: str, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_token)
    api = HfApi(token=hub_token)
    api.create_repo(repo_name)
    models = [str(save_model(tmp_path / f"m{i}", random_tensors(i))) for i in range(2)]
    with pytest.raises(PublishError, match=f"{repo_name} exists and is public") as info:
        hubmerge.merge(
            {"method": "centroid", "models": models},
            tmp_path / "out",
            push=PushTarget(repo_name, private=True),
        )
    assert info.value.hint is not None and "nothing was merged yet" in info.value.hint
    assert not api.model_info(repo_name).private and not (tmp_path / "out").exists()
    assert api.list_repo_files(repo_name) == [".gitattributes"]


def test_a_public_push_of_a_private_source_says_its_id_becomes_visible(
    tmp_path: Path,
    hub_token: str,
    repo_name: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_token)
    api = HfApi(token=hub_token)
    hidden = f"{repo_name}-hidden"
    _publish(api, hidden, tiny_llama(3, tmp_path / "p", card=LICENSED), private=True)
    _publish(api, f"{repo_name}-open", tiny_llama(4, tmp_path / "q", card=LICENSED))
    recipe = {"method": "centroid", "models": [f"{repo_name}-open", hidden]}
    with caplog.at_level("WARNING", logger="hubmerge"):
        hubmerge.merge(recipe, tmp_path / "open", push=PushTarget(f"{repo_name}-merged"))
    said = [r.getMessage() for r in caplog.records if "private model" in r.getMessage()]
    assert len(said) == 1 and f"private model {hidden} " in said[0] and f"{repo_name}-open" not in said[0]
    caplog.clear()
    with caplog.at_level("WARNING", logger="hubmerge"):
        hubmerge.merge(recipe, tmp_path / "closed", push=PushTarget(f"{repo_name}-closed", private=True))
    assert not [r for r in caplog.records if "private model" in r.getMessage()]


def test_the_api_pushes_as_the_recipe_says_and_a_repository_id_keeps_its_other_settings(
    tmp_path: Path, hub_token: str, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_token)
    api = HfApi(token=hub_token)
    models = [str(save_model(tmp_path / f"m{i}", random_tensors(i))) for i in range(2)]
    recipe = {
        "method": "centroid",
        "models": models,
        "push": {"repo": f"{repo_name}-recipe", "private": True},
    }
    by_recipe = hubmerge.merge(recipe, tmp_path / "a")
    assert by_recipe.commit_url is not None and api.model_info(f"{repo_name}-recipe").private
    by_id = hubmerge.merge(recipe, tmp_path / "b", push=f"{repo_name}-id")  # as --push: still private
    assert by_id.commit_url is not None and f"/{repo_name}-id/commit/" in by_id.commit_url
    assert api.model_info(f"{repo_name}-id").private


def test_a_push_through_xet_to_a_hub_without_it_says_how_to_upload(
    tmp_path: Path, hub: HubServer, hub_token: str, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hf_xet installed makes huggingface_hub upload through Xet, which `hub serve` (like other Hub
    servers) does not speak: one line that names the switch, not a lost connection."""
    pytest.importorskip("hf_xet")
    monkeypatch.delenv("HF_HUB_DISABLE_XET", raising=False)
    models = [save_model(tmp_path / f"m{i}", random_tensors(i)) for i in range(2)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: centroid\nmodels: [{models[0]}, {models[1]}]\n")
    done = _cli(
        str(recipe), "--out", str(tmp_path / "out"), "--push", repo_name, endpoint=hub.url, token=hub_token
    )
    assert done.returncode == 2, done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert "takes no Xet uploads" in line and "HF_HUB_DISABLE_XET=1" in line and "--resume" in line, line


def test_a_pushs_calls_are_retried_but_its_commit_is_not_repeated(
    tmp_path: Path,
    hub_token: str,
    repo_name: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A push's calls (whoami, create_repo, the card's check) are retried with backoff as reads are; its
    commit is not: after a lost answer it may have landed, and a second one would open another pull request
    (--resume finishes a push whose commit failed)."""
    monkeypatch.setenv("HF_TOKEN", hub_token)
    monkeypatch.setenv("HUBMERGE_HUB_RETRIES", "3")
    whoami, commit = HfApi.whoami, HfApi.create_commit
    failures = [OSError("connection reset by peer")]
    commits: list[str] = []

    def flaky(self: HfApi, *args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop()
        return whoami(self, *args, **kwargs)

    def lost(self: HfApi, *args: Any, **kwargs: Any) -> Any:
        commits.append("tried")
        commit(self, *args, **kwargs)
        raise OSError("connection reset by peer")  # the commit landed, its answer did not

    monkeypatch.setattr(HfApi, "whoami", flaky)
    monkeypatch.setattr(HfApi, "create_commit", lost)
    models = [str(save_model(tmp_path / f"m{i}", random_tensors(i))) for i in range(2)]
    recipe = {"method": "centroid", "models": models}
    with caplog.at_level("WARNING", logger="hubmerge"), pytest.raises(PublishError, match="commit"):
        hubmerge.merge(recipe, tmp_path / "out", push=PushTarget(repo_name, create_pr=True))
    assert not failures and any(
        "whoami on" in r.getMessage() and "retrying" in r.getMessage() for r in caplog.records
    )
    api = HfApi(token=hub_token)
    pulls = api.list_repo_refs(repo_name, include_pull_requests=True).pull_requests
    assert commits == ["tried"] and len(pulls) == 1  # one pull request, not two


def test_shard_downloads_into_a_full_temporary_folder_name_it(
    tmp_path: Path, hub: HubServer, hub_token: str, sources: dict[str, object]
) -> None:
    """--hub-transfer shards downloads a shard per model into TMPDIR: no room there is said so, with the
    way around it, not as a full output disk."""
    ids, _, _ = _unpacked(sources)
    small = tmp_path / "small-tmp"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(small)]).returncode != 0:
        pytest.skip("no tmpfs can be mounted here")
    try:
        recipe = tmp_path / "r.yaml"
        recipe.write_text(f"method: centroid\nmodels: [{ids[0]}, {ids[1]}]\n")
        args = (str(recipe), "--out", str(tmp_path / "out"), "--hub-transfer", "shards")
        done = _cli(*args, endpoint=hub.url, token=hub_token, TMPDIR=str(small))
        assert done.returncode == 2, done.stderr
        line = done.stderr.strip().splitlines()[-1]
        assert "no room for model.safetensors" in line and f"temporary folder {small}" in line, line
        assert "TMPDIR" in line and "--hub-transfer ranges" in line
    finally:
        subprocess.run(["umount", str(small)])


def test_a_push_to_a_bare_name_goes_to_the_users_namespace(
    tmp_path: Path, hub_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_token)
    name = f"bare-{os.getpid()}-{time.monotonic_ns()}"
    models = [str(save_model(tmp_path / f"m{i}", random_tensors(i))) for i in range(2)]
    result = hubmerge.merge({"method": "centroid", "models": models}, tmp_path / "out", push=PushTarget(name))
    assert result.commit_url is not None and f"/alice/{name}/commit/" in result.commit_url
    assert f'from_pretrained("alice/{name}")' in (result.out / "README.md").read_text()
    assert "model.safetensors" in HfApi(token=hub_token).list_repo_files(f"alice/{name}")


@pytest.mark.parametrize("bad", ["a/bad name", "alice/x@main", "a/b/c", "-lead"])
def test_a_push_target_that_is_no_repository_id_fails_before_planning(
    tmp_path: Path, hub: HubServer, hub_token: str, bad: str
) -> None:
    models = [str(save_model(tmp_path / f"m{i}", random_tensors(i))) for i in range(2)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: centroid\nmodels: {json.dumps(models)}\n")
    done = _cli(str(recipe), "--out", str(tmp_path / "out"), "--push", bad, endpoint=hub.url, token=hub_token)
    assert done.returncode == 2 and done.stdout == ""  # before the plan is printed
    assert done.stderr.count("\n") == 1 and f"push target {bad!r}" in done.stderr and "hint:" in done.stderr
    with pytest.raises(RecipeError, match="push.repo"):
        hubmerge.load_recipe({"method": "centroid", "models": models, "push": {"repo": bad}})


def test_an_invalid_token_is_one_line_that_names_it(
    tmp_path: Path, hub: HubServer, sources: dict[str, object]
) -> None:
    ids, _, _ = _unpacked(sources)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"method: linear\nmodels: {json.dumps(ids)}\nparameters: {{t: 0.5}}\n")
    done = _cli("plan", str(recipe), endpoint=hub.url, token="not-a-token")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "the Hub refused the token" in done.stderr and "HTTP 401" in done.stderr
    assert "HF_TOKEN" in done.stderr and "not-a-token" not in done.stderr


def test_a_resumed_push_refuses_shards_uploaded_to_another_repository(tmp_path: Path) -> None:
    from hubmerge.publish import UPLOADED, HubUploader
    from hubmerge.writer import PROGRESS_DIR

    (tmp_path / PROGRESS_DIR).mkdir()
    record = {"repo": "alice/first", "branch": None, "sha256": "00" * 32, "size": 1, "sample": ""}
    (tmp_path / PROGRESS_DIR / UPLOADED).write_text(json.dumps({"model-00001-of-00002.safetensors": record}))
    HubUploader(PushTarget("alice/first", delete_local=True), tmp_path)._check_recorded()  # same target: fine
    for target in (PushTarget("alice/second", delete_local=True), PushTarget("alice/first", branch="dev")):
        with pytest.raises(PublishError, match="was uploaded to alice/first by the interrupted run"):
            HubUploader(target, tmp_path)._check_recorded()


def test_a_sharded_repository_without_its_index_says_so(
    tmp_path: Path, hub_token: str, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_token)
    folder = save_model(tmp_path / "m", random_tensors(0), shards=2)
    (folder / "model.safetensors.index.json").unlink()
    _publish(HfApi(token=hub_token), repo_name, folder)
    with pytest.raises(
        SourceError, match=r"holds 2 .safetensors files .* but no model.safetensors.index.json"
    ):
        hubmerge.plan({"method": "centroid", "models": [repo_name, repo_name]})


def test_force_starts_over_and_a_resume_of_deleted_shards_needs_their_push(
    tmp_path: Path, hub_token: str, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An interrupted --delete-local push left shards only on the Hub: --force starts over whatever the new
    target, and a resume without a push would write an index of shards that are not there."""
    from hubmerge.errors import OutputError
    from hubmerge.publish import UPLOADED
    from hubmerge.writer import PROGRESS_DIR

    monkeypatch.setenv("HF_TOKEN", hub_token)
    models = [str(save_model(tmp_path / f"m{i}", random_tensors(i))) for i in range(2)]
    recipe = {"method": "centroid", "models": models}
    progress = tmp_path / ".out.hubmerge-partial" / PROGRESS_DIR
    progress.mkdir(parents=True)
    record = {"repo": "alice/elsewhere", "branch": None, "sha256": "00" * 32, "size": 1, "sample": ""}
    (progress / UPLOADED).write_text(json.dumps({"model.safetensors": record}))
    with pytest.raises(OutputError, match="pushed shards and deleted them here .* only the Hub has them"):
        hubmerge.merge(recipe, tmp_path / "out", resume=True)
    result = hubmerge.merge(
        recipe, tmp_path / "out", force=True, push=PushTarget(repo_name, delete_local=True)
    )
    assert result.commit_url is not None and not (tmp_path / ".out.hubmerge-partial").exists()


def test_a_push_the_token_cannot_make_is_refused_before_merging(
    tmp_path: Path, hub_token: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hubmerge.publish import _check_namespace

    monkeypatch.setenv("HF_TOKEN", hub_token)
    models = [str(save_model(tmp_path / f"m{i}", random_tensors(i))) for i in range(2)]
    with pytest.raises(PublishError, match="belongs to alice, who cannot write to the namespace bob") as info:
        hubmerge.merge({"method": "centroid", "models": models}, tmp_path / "out", push=PushTarget("bob/x"))
    assert info.value.hint is not None and "nothing was merged yet" in info.value.hint
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.hubmerge-partial").exists()
    member = {"name": "alice", "orgs": [{"name": "team"}], "auth": {"accessToken": {"role": "write"}}}
    _check_namespace("team/x", member)
    _check_namespace("alice/x", member)
    with pytest.raises(PublishError, match="is read-only"):
        _check_namespace("alice/x", member | {"auth": {"accessToken": {"role": "read"}}})


def test_huggingface_hub_log_lines_lose_url_signatures() -> None:
    """huggingface_hub logs each request it retries with its URL; a signed upload URL is a credential, and
    CI logs are often public."""
    import io
    import logging

    from hubmerge.sources.hub import _Unsigned, redact_hub_logs

    redact_hub_logs()
    redact_hub_logs()  # once is enough: no second filter
    handlers = [
        h for h in logging.getLogger("huggingface_hub").handlers if isinstance(h, logging.StreamHandler)
    ]
    assert handlers and all(sum(isinstance(f, _Unsigned) for f in h.filters) == 1 for h in handlers)
    streams = [io.StringIO() for _ in handlers]
    old = [h.setStream(stream) for h, stream in zip(handlers, streams, strict=True)]
    try:
        logging.getLogger("huggingface_hub.utils._http").warning(
            "'%s' thrown while requesting %s %s",
            "[Errno 111] Connection refused",
            "PUT",
            "http://127.0.0.1:9/api/lfs-upload/ab12?size=3&repo=a%2Fb&expires=9&signature=5ec2e7",
        )
    finally:
        for h, stream in zip(handlers, old, strict=True):
            h.setStream(stream)
    assert streams[0].getvalue() == (
        "'[Errno 111] Connection refused' thrown while requesting PUT http://127.0.0.1:9/api/lfs-upload/ab12?...\n"
    )
    assert all("signature" not in stream.getvalue() for stream in streams)


def test_a_failed_upload_stops_a_merge_that_deletes_its_shards(tmp_path: Path) -> None:
    """With --delete-local the disk holds a shard or two: once uploads have stopped (one failed), the next
    finished shard ends the merge with that error instead of filling the disk with the rest. Without it, the
    merge goes on (its files are kept for --resume)."""
    from hubmerge.publish import HubUploader

    failed = PublishError("push to alice/x failed: lost the connection", repo_id="alice/x")
    deleting = HubUploader(PushTarget("alice/x", delete_local=True), tmp_path)
    deleting._error = failed
    with pytest.raises(PublishError, match="lost the connection"):
        deleting.shard_done(0)
    keeping = HubUploader(PushTarget("alice/x"), tmp_path)
    keeping._error = failed
    with pytest.raises(AssertionError):  # past the check: no plan was begun in this test
        keeping.shard_done(0)


def test_a_push_whose_host_does_not_resolve_says_nothing_was_merged(tmp_path: Path) -> None:
    models = [str(save_model(tmp_path / f"m{i}", random_tensors(i))) for i in range(2)]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({"method": "centroid", "models": models}))
    done = _cli(
        str(recipe), "--out", str(tmp_path / "out"), "--push", "alice/x",
        endpoint="http://hubmerge-no-such-host.invalid", token="t",
    )  # fmt: skip
    assert done.returncode == 2 and "does not resolve" in done.stderr, done.stderr
    assert "--resume" not in done.stderr and "nothing was merged yet" in done.stderr
    assert not (tmp_path / "out").exists()


def test_an_unreadable_modules_json_leaves_module_folders_and_the_push_succeeds(
    tmp_path: Path,
    hub_token: str,
    repo_name: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_token)
    api = HfApi(token=hub_token)
    api.create_repo(repo_name)
    for name, content in (("modules.json", b"not json"), ("1_Pooling/config.json", b"{}")):
        api.upload_file(path_or_fileobj=content, path_in_repo=name, repo_id=repo_name)
    models = [str(save_model(tmp_path / f"m{i}", random_tensors(i))) for i in range(2)]
    with caplog.at_level("WARNING", logger="hubmerge"):
        hubmerge.merge({"method": "centroid", "models": models}, tmp_path / "out", push=repo_name)
    files = set(api.list_repo_files(repo_name))
    assert "model.safetensors" in files and "1_Pooling/config.json" in files and "modules.json" not in files
    assert "could not read the earlier model's modules.json" in caplog.text


def test_files_added_while_merging_are_refused_before_the_push_commits(
    tmp_path: Path, hub_token: str, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The push's commit cannot be taken back: a refusal after it, followed by its hint, pushed twice."""
    monkeypatch.setenv("HF_TOKEN", hub_token)
    models = [str(save_model(tmp_path / f"m{i}", random_tensors(i))) for i in range(2)]
    recipe = {"method": "centroid", "models": models}
    out = tmp_path / "out"
    hubmerge.merge(recipe, out)

    def add_a_file(plan: object) -> None:
        (out / "notes.txt").write_text("mine")

    with pytest.raises(hubmerge.OutputError, match="while merging, notes.txt appeared"):
        hubmerge.merge(recipe, out, force=True, push=repo_name, on_plan=add_a_file)
    api = HfApi(token=hub_token)
    assert not [f for f in api.list_repo_files(repo_name) if f.endswith(".safetensors")]  # nothing committed


def test_a_model_read_from_the_local_cache_releases_its_pages_too(
    tmp_path: Path, hub_token: str, repo_name: str
) -> None:
    from hubmerge.refs import ModelRef
    from hubmerge.sources import open_source

    from .test_inputs import _mapped_kib

    api = HfApi(token=hub_token)
    folder = save_model(tmp_path / "m", {"big": torch.randn(1024, 1024)})
    _publish(api, repo_name, folder)
    api.snapshot_download(repo_name)  # in the local cache: read there
    source = open_source(ModelRef(repo_id=repo_name), label="models.0")
    try:
        assert source.cached  # type: ignore[attr-defined]
        info = source.tensors["big"]
        file = Path(try_to_load_from_cache(repo_name, "model.safetensors")).resolve()  # type: ignore[arg-type]
        assert float(source.read(info).sum()) != 0.0
        assert _mapped_kib(file) >= 4000
        source.release([info])  # type: ignore[attr-defined]
        assert _mapped_kib(file) <= 8
    finally:
        source.close()


def test_an_output_written_to_while_merging_is_refused_before_the_push_commits(
    tmp_path: Path, hub_token: str, repo_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", hub_token)
    models = [str(save_model(tmp_path / f"m{i}", random_tensors(i))) for i in range(2)]
    out = tmp_path / "out"

    def someone_writes_there(plan: object) -> None:
        out.mkdir()
        (out / "x.txt").write_text("mine")

    target = PushTarget(repo_name, create_pr=True)
    with pytest.raises(hubmerge.OutputError, match="was created or written to while merging"):
        hubmerge.merge(
            {"method": "centroid", "models": models}, out, push=target, on_plan=someone_writes_there
        )
    api = HfApi(token=hub_token)
    assert api.list_repo_refs(repo_name, include_pull_requests=True).pull_requests == []
    assert not [f for f in api.list_repo_files(repo_name) if f.endswith(".safetensors")]
