"""The Hub server against the unmodified huggingface_hub client, over real HTTP (``HF_ENDPOINT`` is it)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    HfFileSystem,
    ModelCard,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile, RepoFolder
from safetensors.torch import save_file

from hubmerge.hubserver import HubServer


def make_model(folder: Path, *, scale: float = 1.0, numel: int = 16) -> dict[str, bytes]:
    """Write a tiny checkpoint (safetensors + config.json) and return every file's bytes by name."""
    folder.mkdir(parents=True, exist_ok=True)
    weight = torch.arange(numel, dtype=torch.float32).reshape(-1, 4) * scale
    save_file({"layer.weight": weight, "layer.bias": torch.ones(4)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 4}))
    return {path.name: path.read_bytes() for path in folder.iterdir()}


@pytest.fixture
def api(hub_token: str) -> HfApi:
    return HfApi(token=hub_token)


@pytest.fixture
def model_repo(api: HfApi, repo_name: str, tmp_path: Path) -> tuple[str, dict[str, bytes]]:
    """A repository holding :func:`make_model` at ``main``; returns its id and the files' bytes."""
    api.create_repo(repo_name)
    files = make_model(tmp_path / "model")
    api.upload_folder(folder_path=tmp_path / "model", repo_id=repo_name)
    return repo_name, files


def test_whoami_names_the_token_user(api: HfApi, other_token: str) -> None:
    assert api.whoami()["name"] == "alice"
    assert api.whoami(token=other_token)["name"] == "bob"
    with pytest.raises(HfHubHTTPError, match="Invalid user token"):
        api.whoami(token="not-a-token")


def test_create_repo_conflict_exist_ok_and_foreign_namespace(
    api: HfApi, repo_name: str, hub: HubServer
) -> None:
    url = api.create_repo(repo_name)
    assert url == f"{hub.url}/{repo_name}" and url.repo_id == repo_name
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(repo_name)
    assert conflict.value.response.status_code == 409
    assert api.create_repo(repo_name, exist_ok=True).repo_id == repo_name
    with pytest.raises(HfHubHTTPError) as forbidden:
        api.create_repo(f"bob/{repo_name.split('/')[1]}")
    assert forbidden.value.response.status_code == 403
    # A new repository starts like on the Hub: one initial commit holding .gitattributes.
    assert api.list_repo_files(repo_name) == [".gitattributes"]


def test_upload_then_download_by_branch_tag_and_commit(
    api: HfApi, model_repo: tuple[str, dict[str, bytes]]
) -> None:
    repo_id, files = model_repo
    sha = api.model_info(repo_id).sha
    assert sha is not None
    api.create_tag(repo_id, tag="v1")
    api.create_branch(repo_id, branch="dev")
    for revision in (None, "main", "v1", "dev", sha, sha[:10]):
        for name, data in files.items():
            assert Path(hf_hub_download(repo_id, name, revision=revision)).read_bytes() == data
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "config.json", "model.safetensors"]


def test_commit_id_keeps_serving_old_bytes_after_the_branch_moves(
    api: HfApi, model_repo: tuple[str, dict[str, bytes]], tmp_path: Path
) -> None:
    repo_id, files = model_repo
    old_sha = api.model_info(repo_id).sha
    new_files = make_model(tmp_path / "v2", scale=2.0)
    api.upload_folder(folder_path=tmp_path / "v2", repo_id=repo_id, commit_message="v2")
    assert api.model_info(repo_id).sha != old_sha
    new = Path(hf_hub_download(repo_id, "model.safetensors", revision="main")).read_bytes()
    old = Path(hf_hub_download(repo_id, "model.safetensors", revision=old_sha)).read_bytes()
    assert (old, new) == (files["model.safetensors"], new_files["model.safetensors"])
    assert api.model_info(repo_id, revision=old_sha).sha == old_sha


def test_snapshot_download_gets_every_file(model_repo: tuple[str, dict[str, bytes]], tmp_path: Path) -> None:
    repo_id, files = model_repo
    folder = Path(snapshot_download(repo_id, local_dir=tmp_path / "snapshot"))
    for name, data in files.items():
        assert (folder / name).read_bytes() == data
    assert (folder / ".gitattributes").is_file()


def test_safetensors_metadata_reads_only_the_head_of_the_file(
    api: HfApi, repo_name: str, tmp_path: Path, hub: HubServer
) -> None:
    api.create_repo(repo_name)
    make_model(tmp_path / "big", numel=64 * 1024)  # 256 KiB of weights behind a tiny header
    api.upload_folder(folder_path=tmp_path / "big", repo_id=repo_name)
    size = (tmp_path / "big" / "model.safetensors").stat().st_size
    hub.reset_stats()
    metadata = api.get_safetensors_metadata(repo_name)
    tensors = metadata.files_metadata["model.safetensors"].tensors
    assert tensors["layer.weight"].shape == [64 * 1024 // 4, 4] and tensors["layer.bias"].dtype == "F32"
    served = hub.bytes_served_by_path[f"{repo_name}/model.safetensors"]
    assert served == 100_001 < size  # the client's one ranged GET for the first 100 kB, not the file


def test_hf_file_system_seeks_and_reads_ranges(
    model_repo: tuple[str, dict[str, bytes]], hub_token: str, hub: HubServer
) -> None:
    repo_id, files = model_repo
    data = files["model.safetensors"]
    fs = HfFileSystem(token=hub_token, skip_instance_cache=True)
    hub.reset_stats()
    with fs.open(f"{repo_id}/model.safetensors", "rb", block_size=16) as handle:
        handle.seek(30)
        assert handle.read(20) == data[30:50]
        handle.seek(-8, 2)
        assert handle.read() == data[-8:]
    assert hub.bytes_served < len(data)
    assert fs.info(f"{repo_id}/model.safetensors")["size"] == len(data)


def test_model_card_push_load_and_card_data(api: HfApi, repo_name: str, hub_token: str) -> None:
    api.create_repo(repo_name)
    metadata = "license: mit\nbase_model: [a/b, c/d]\ntags: [merge]\nlibrary_name: transformers"
    text = f"---\n{metadata}\n---\n# Merged\n"
    ModelCard(text).push_to_hub(repo_name, token=hub_token)
    card = ModelCard.load(repo_name)
    assert (
        card.data.license == "mit"
        and card.data.base_model == ["a/b", "c/d"]
        and card.text.strip() == "# Merged"
    )
    info = api.model_info(repo_name)
    assert info.card_data is not None and info.card_data.license == "mit"
    assert {"merge", "transformers", "license:mit"} <= set(info.tags or [])
    with pytest.raises(ValueError, match="license"):
        ModelCard("---\nlicense: [mit, apache-2.0]\n---\ntext").push_to_hub(repo_name, token=hub_token)


def test_branches_and_tags(api: HfApi, model_repo: tuple[str, dict[str, bytes]]) -> None:
    repo_id, _ = model_repo
    sha = api.model_info(repo_id).sha
    api.create_branch(repo_id, branch="feature/x")
    api.create_tag(repo_id, tag="v1.0", tag_message="first", revision="feature/x")
    api.create_branch(repo_id, branch="feature/x", exist_ok=True)
    api.create_tag(repo_id, tag="v1.0", exist_ok=True)
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_branch(repo_id, branch="feature/x")
    assert conflict.value.response.status_code == 409
    refs = api.list_repo_refs(repo_id)
    assert {(b.name, b.target_commit) for b in refs.branches} == {("main", sha), ("feature/x", sha)}
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1.0", "refs/tags/v1.0", sha)]
    assert api.model_info(repo_id, revision="feature/x").sha == sha
    api.delete_branch(repo_id, branch="feature/x")
    api.delete_tag(repo_id, tag="v1.0")
    refs = api.list_repo_refs(repo_id)
    assert [b.name for b in refs.branches] == ["main"] and refs.tags == []
    with pytest.raises(RevisionNotFoundError):
        api.delete_branch(repo_id, branch="feature/x")


def test_list_repo_commits_newest_first_across_pages(api: HfApi, repo_name: str, hub: HubServer) -> None:
    api.create_repo(repo_name)
    for index in range(60):  # more than one page of 50
        operation = CommitOperationAdd(f"step-{index}.txt", f"{index}\n".encode())
        api.create_commit(repo_name, operations=[operation], commit_message=f"step {index}")
    hub.reset_stats()
    commits = api.list_repo_commits(repo_name)
    assert [c.title for c in commits] == [f"step {i}" for i in reversed(range(60))] + ["initial commit"]
    assert commits[0].commit_id == api.model_info(repo_name).sha and commits[0].authors == ["alice"]
    assert hub.stats.requests["commits"] == 2


def test_tree_listing_and_paths_info(api: HfApi, repo_name: str) -> None:
    api.create_repo(repo_name)
    first = api.upload_file(path_or_fileobj=b"a", path_in_repo="sub/dir/a.txt", repo_id=repo_name)
    api.upload_file(path_or_fileobj=b"b" * 10, path_in_repo="sub/b.bin", repo_id=repo_name)
    top = list(api.list_repo_tree(repo_name))
    assert [(type(e).__name__, e.path) for e in top] == [
        ("RepoFile", ".gitattributes"),
        ("RepoFolder", "sub"),
    ]
    nested = {e.path: e for e in api.list_repo_tree(repo_name, path_in_repo="sub", recursive=True)}
    assert sorted(nested) == ["sub/b.bin", "sub/dir", "sub/dir/a.txt"]
    binary = nested["sub/b.bin"]
    assert isinstance(binary, RepoFile) and binary.size == 10 and binary.lfs is not None
    assert binary.lfs.sha256 == hashlib.sha256(b"b" * 10).hexdigest()
    info = api.get_paths_info(repo_name, ["sub/dir/a.txt", "sub", "missing.txt"], expand=True)
    assert [(type(e), e.path) for e in info] == [(RepoFile, "sub/dir/a.txt"), (RepoFolder, "sub")]
    assert info[0].last_commit is not None and info[0].last_commit.oid == first.oid
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(repo_name, path_in_repo="nowhere"))


def test_create_commit_with_create_pr_leaves_main_alone(
    api: HfApi, model_repo: tuple[str, dict[str, bytes]], other_token: str
) -> None:
    repo_id, files = model_repo
    main_sha = api.model_info(repo_id).sha
    new_config = b'{"model_type": "gpt2"}'
    operation = CommitOperationAdd("config.json", new_config)
    # Like on the Hub, a user without write access may open a pull request but not push to main.
    pr = HfApi(token=other_token).create_commit(repo_id, [operation], commit_message="PR", create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and pr.pr_num == 1 and pr.pr_url is not None
    assert api.model_info(repo_id).sha == main_sha
    assert Path(hf_hub_download(repo_id, "config.json", revision="refs/pr/1")).read_bytes() == new_config
    assert Path(hf_hub_download(repo_id, "config.json")).read_bytes() == files["config.json"]
    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    assert [(r.ref, r.target_commit) for r in refs.pull_requests or []] == [("refs/pr/1", pr.oid)]
    with pytest.raises(HfHubHTTPError) as forbidden:
        operation = CommitOperationAdd("config.json", new_config)
        HfApi(token=other_token).create_commit(repo_id, [operation], commit_message="push")
    assert forbidden.value.response.status_code == 403


def test_parent_commit_must_be_the_head(api: HfApi, model_repo: tuple[str, dict[str, bytes]]) -> None:
    repo_id, _ = model_repo
    old_sha = api.model_info(repo_id).sha
    api.upload_file(path_or_fileobj=b"1", path_in_repo="one.txt", repo_id=repo_id)
    with pytest.raises(HfHubHTTPError) as stale:
        api.upload_file(path_or_fileobj=b"2", path_in_repo="two.txt", repo_id=repo_id, parent_commit=old_sha)
    assert stale.value.response.status_code == 412
    head = api.model_info(repo_id).sha
    assert head is not None
    api.upload_file(path_or_fileobj=b"2", path_in_repo="two.txt", repo_id=repo_id, parent_commit=head[:7])


def test_delete_file_folder_and_missing_entries(api: HfApi, repo_name: str) -> None:
    api.create_repo(repo_name)
    api.create_commit(
        repo_name,
        [
            CommitOperationAdd("a/x.txt", b"x"),
            CommitOperationAdd("a/y.txt", b"y"),
            CommitOperationAdd("z", b"z"),
        ],
        commit_message="files",
    )
    api.delete_file("z", repo_name)
    api.delete_folder("a", repo_name)
    assert api.list_repo_files(repo_name) == [".gitattributes"]
    with pytest.raises(EntryNotFoundError):
        api.create_commit(repo_name, [CommitOperationDelete("z")], commit_message="again")


def test_delete_repo(api: HfApi, model_repo: tuple[str, dict[str, bytes]]) -> None:
    repo_id, _ = model_repo
    api.delete_repo(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo(repo_id)
    api.delete_repo(repo_id, missing_ok=True)
    assert not api.repo_exists(repo_id)


def test_private_repo_is_invisible_to_others(
    api: HfApi, repo_name: str, other_token: str, tmp_path: Path
) -> None:
    api.create_repo(repo_name, private=True)
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=repo_name)
    assert api.model_info(repo_name).private is True
    for token in (other_token, False):
        with pytest.raises(RepositoryNotFoundError) as hidden:
            HfApi(token=token).model_info(repo_name)
        assert not isinstance(hidden.value, GatedRepoError)
        with pytest.raises(RepositoryNotFoundError):
            hf_hub_download(repo_name, "s.txt", token=token, cache_dir=tmp_path / str(token))
        with pytest.raises(RepositoryNotFoundError):
            HfApi(token=token).list_repo_files(repo_name)
    api.update_repo_settings(repo_name, private=False)
    assert HfApi(token=other_token).model_info(repo_name).private is False


def test_gated_repo_needs_access(
    api: HfApi, model_repo: tuple[str, dict[str, bytes]], other_token: str
) -> None:
    repo_id, files = model_repo
    api.update_repo_settings(repo_id, gated="auto")
    bob = HfApi(token=other_token)
    assert bob.model_info(repo_id).gated == "auto"  # metadata stays public
    with pytest.raises(GatedRepoError):
        hf_hub_download(repo_id, "config.json", token=other_token)
    with pytest.raises(GatedRepoError):
        bob.file_exists(repo_id, "config.json")
    api.grant_access(repo_id, "bob")
    path = hf_hub_download(repo_id, "config.json", token=other_token)
    assert Path(path).read_bytes() == files["config.json"]


def test_missing_revision_and_missing_file(api: HfApi, model_repo: tuple[str, dict[str, bytes]]) -> None:
    repo_id, _ = model_repo
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, "config.json", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="0" * 40)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "no-such-file.json")
    assert not api.file_exists(repo_id, "no-such-file.json") and api.file_exists(repo_id, "config.json")


def test_identical_lfs_upload_skips_the_put(
    api: HfApi, model_repo: tuple[str, dict[str, bytes]], hub: HubServer, tmp_path: Path
) -> None:
    repo_id, files = model_repo
    commits_before = len(api.list_repo_commits(repo_id))
    hub.reset_stats()
    api.upload_folder(folder_path=tmp_path / "model", repo_id=repo_id)  # same files: no upload, no commit
    assert hub.stats.requests["lfs_upload"] == 0 and hub.stats.requests["commit"] == 0
    assert len(api.list_repo_commits(repo_id)) == commits_before
    # The same bytes under another name: the LFS batch says they are stored, so the client sends no PUT.
    api.upload_file(
        path_or_fileobj=files["model.safetensors"], path_in_repo="copy.safetensors", repo_id=repo_id
    )
    assert hub.stats.requests["commit"] == 1 and hub.stats.requests["lfs_upload"] == 0
    changed = tmp_path / "changed.safetensors"
    save_file({"w": torch.zeros(3)}, changed)
    api.upload_file(path_or_fileobj=changed, path_in_repo="copy.safetensors", repo_id=repo_id)
    assert hub.stats.requests["lfs_upload"] == 1
    assert Path(hf_hub_download(repo_id, "copy.safetensors")).read_bytes() == changed.read_bytes()


def test_transformers_loads_a_config(api: HfApi, repo_name: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2).save_pretrained(
        tmp_path
    )
    api.create_repo(repo_name)
    api.upload_folder(folder_path=tmp_path, repo_id=repo_name)
    config = transformers.AutoConfig.from_pretrained(repo_name)
    assert type(config).__name__ == "BertConfig" and config.hidden_size == 8


def test_restart_keeps_repositories_and_releases_the_port(tmp_path: Path, hub_token: str) -> None:
    storage = tmp_path / "storage"
    with HubServer(storage, tokens={hub_token: "alice"}) as first:
        api = HfApi(endpoint=first.url, token=hub_token)
        api.create_repo("alice/kept")
        commit = api.upload_file(path_or_fileobj=b"kept", path_in_repo="k.txt", repo_id="alice/kept")
        port = int(first.url.rsplit(":", 1)[1])
    with HubServer(storage, port=port, tokens={hub_token: "alice"}) as second:
        api = HfApi(endpoint=second.url, token=hub_token)
        assert api.model_info("alice/kept").sha == commit.oid
        path = hf_hub_download("alice/kept", "k.txt", endpoint=second.url, cache_dir=tmp_path / "cache")
        assert Path(path).read_bytes() == b"kept"
