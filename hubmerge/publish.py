"""Publishing a merge to the Hub: each shard is uploaded as soon as it is written, then ONE commit.

Uploads use the Hub's LFS pre-upload, so they run while the merge goes on; the final commit adds the shards,
index, config and tokenizer files, card and manifest at once. A rerun (``--resume``) asks the Hub which blobs
it already has and uploads only the rest. The token comes from ``HF_TOKEN`` or ``hf auth login`` and is never
printed, logged or written anywhere.

An LFS upload names a file by its sha256, which huggingface_hub would compute by reading the finished shard
once more (about 1 s per 1.7 GB, after the merge); this sink hashes each shard's bytes as the merge hands
them over instead.

Where the upload goes through the LFS protocol, the shards are written around the page cache and read back
for their upload the same way, a thread reading ahead (``directio.DirectReader``): through the cache every
byte would first be copied into a fresh cache page on the merge's own cores (measured in bench/RESULTS.md,
item 16).
"""

from __future__ import annotations

import fnmatch
import hashlib
import importlib.util
import json
import logging
import re
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from . import directio
from .directio import DirectReader
from .errors import HubError, PublishError, RecipeError, spoken_to_python
from .refs import is_repo_id
from .sources.hub import hub_call, unsigned
from .writer import PROGRESS_DIR, batch_offset, tensor_bytes, write_json

if TYPE_CHECKING:
    import torch
    from huggingface_hub import CommitOperationAdd

    from .plan import Job, MergePlan

log = logging.getLogger(__name__)

UPLOADED = (
    "uploaded.json"  # shards uploaded and deleted locally (--delete-local): name -> sha256, size, sample
)


@dataclass(frozen=True)
class PushTarget:
    """Where the merge goes on the Hub."""

    repo_id: str
    private: bool = False
    branch: str | None = None
    create_pr: bool = False
    delete_local: bool = False
    commit_message: str | None = None

    @spoken_to_python  # a program's PushTarget(...) is told of arguments, the command's of flags
    def __post_init__(self) -> None:
        if not is_repo_id(self.repo_id):
            raise RecipeError(
                f"push target {self.repo_id!r} (--push or push.repo) is not a Hub repository id",
                hint="write namespace/name, e.g. --push my-org/my-merge (no revision: use --branch)",
            )
        if self.branch is not None and self.branch.startswith("refs/"):  # refs/pr/N, refs/heads/x, ...
            raise RecipeError(
                f"branch {self.branch!r} (--branch or push.branch) is a ref, not a branch name",
                hint="give a branch name (created if missing); a pull request of its own: --create-pr "
                "(adding to an existing one is not supported)",
            )


class HubUploader:
    """A sink that uploads each finished shard in the background, and commits everything at the end.

    Args:
        target: where to push.
        directory: the folder the shards are written in.
        read_direct: read each shard for its upload around the page cache, with a thread reading ahead
            (``directio.DirectReader``): for shards written that way, see :func:`uploads_read_direct`.
        resume: the merge continues an interrupted one (whose uploads ``directory`` records).
        token: the Hub token to push with (default: huggingface_hub's, from ``HF_TOKEN`` or a login).
    """

    def __init__(
        self,
        target: PushTarget,
        directory: Path,
        *,
        read_direct: bool = False,
        resume: bool = False,
        token: str | None = None,
    ) -> None:
        from huggingface_hub import HfApi

        self.target, self.directory, self.resume = target, directory, resume
        self.api = HfApi(token=token)  # None: huggingface_hub's (HF_TOKEN, `hf auth login`)
        self._plan: MergePlan | None = None
        self._ops: dict[str, CommitOperationAdd] = {}
        self._uploads: list[Future[None]] = []
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="hubmerge-upload")
        self._digests: dict[int, _Digest] = {}
        self.read_direct = read_direct
        self._lock = threading.Lock()
        self._reading: DirectReader | None = None  # the shard being uploaded, if read by a DirectReader
        self._closing = False
        self._failed: str | None = None  # the first upload that failed: later ones are not tried
        self._error: PublishError | None = None  # its error
        self._committing = False  # commit() waits for the uploads: the merge is done

    def _call(self, fn: Any, what: str, *, merged: bool = True, attempts: int | None = None) -> Any:
        # Retried with backoff like every Hub call (hub_call), but for an upload (retried inside
        # huggingface_hub) and the commit (attempts=1 there).
        keep = (
            "the merged files are kept: rerun with --resume to finish the push"
            if merged
            else "nothing was merged yet"
        )
        try:
            return hub_call(
                fn, repo_id=self.target.repo_id, revision=self.target.branch, what=what, attempts=attempts
            )
        except HubError as exc:
            if "xet-write-token" in exc.message:  # hf_xet installed, and a Hub without Xet (hub serve)
                raise PublishError(
                    f"push to {self.target.repo_id} failed: the Hub at HF_ENDPOINT takes no Xet uploads, "
                    "which huggingface_hub uses when hf_xet is installed",
                    repo_id=self.target.repo_id,
                    hint=f"set HF_HUB_DISABLE_XET=1 to upload through LFS; {keep}",
                ) from None
            if exc.hint and "--resume" in exc.hint:
                if merged:  # one "rerun with --resume" is enough
                    keep = "the merged files are kept"
                else:  # nothing to resume: the rerun is a plain one
                    exc.hint = re.sub(
                        r",? then rerun with --resume to continue where it stopped"
                        r"| with --resume to continue",
                        "",
                        exc.hint,
                    )
            raise PublishError(
                f"push to {self.target.repo_id} failed: {exc.message}",
                repo_id=self.target.repo_id,
                hint=f"{exc.hint}; {keep}" if exc.hint else keep,
            ) from None
        except RuntimeError as exc:  # how huggingface_hub reports a failed LFS upload
            cause = exc.__cause__ or exc
            raise PublishError(
                f"push to {self.target.repo_id} failed during {what}: {type(cause).__name__}: "
                f"{unsigned(str(cause))}",
                repo_id=self.target.repo_id,
                hint=f"check the connection to the Hub; {keep}",
            ) from None

    def begin(self, plan: MergePlan) -> set[str]:
        self._plan = plan
        self._digests = {i: _Digest(shard.header, shard.size) for i, shard in enumerate(plan.shards)}
        user = self._call(lambda: self.api.whoami(), "whoami", merged=False)
        if "/" not in self.target.repo_id:  # the Hub creates `name` in the user's namespace: name it so
            self.target = replace(self.target, repo_id=f"{user['name']}/{self.target.repo_id}")
        target = self.target
        _check_namespace(target.repo_id, user)
        if self.resume:
            self._check_recorded()
        self._call(
            lambda: self.api.create_repo(target.repo_id, private=target.private, exist_ok=True),
            "create repository",
            merged=False,
        )
        for source in plan.sources:
            if source.ref.repo_id == target.repo_id and (source.ref.revision or "main") == (
                target.branch or "main"
            ):
                log.warning(
                    "the push goes to %s's repository and branch (%s): the merge replaces the model it read "
                    "there, and recipes that do not pin its commit (%s) will read the merge",
                    source.label,
                    target.repo_id,
                    source.commit,
                )
        hidden = list(dict.fromkeys(str(s.ref.repo_id) for s in plan.sources if s.private))
        if target.private or hidden:  # create_repo leaves an existing repository as it is
            info = self._call(lambda: self.api.model_info(target.repo_id), "repository info", merged=False)
            if not info.private and hidden:
                log.warning(
                    "%s is public, and its card names the private model%s %s (base_model, the sources and "
                    "the recipe): the id%s will be visible, not the files; push to a private repository to "
                    "keep %s hidden",
                    target.repo_id,
                    "s" if len(hidden) > 1 else "",
                    ", ".join(hidden),
                    "s" if len(hidden) > 1 else "",
                    "them" if len(hidden) > 1 else "it",
                )
            if target.private and not info.private:
                raise PublishError(
                    f"{target.repo_id} exists and is public: --private (push.private) does not change an "
                    "existing repository, and the merge would be published",
                    repo_id=target.repo_id,
                    hint="make it private first (its Settings page on the Hub, or "
                    f"`HfApi().update_repo_settings({target.repo_id!r}, private=True)`), "
                    "or push to a new repository; nothing was merged yet",
                )
        if target.branch:
            self._call(
                lambda: self.api.create_branch(target.repo_id, branch=target.branch, exist_ok=True),
                "branch",
                merged=False,
            )
        return set()

    def _check_recorded(self) -> None:
        """Refuse shards an earlier run uploaded elsewhere, then deleted (--delete-local): gone here."""
        target = self.target
        for name, record in sorted(self._recorded().items()):
            repo, branch = record.get("repo", target.repo_id), record.get("branch", target.branch)
            if (repo, branch or "main") != (target.repo_id, target.branch or "main"):
                where = f"{repo}" + (f" (branch {branch})" if branch else "")
                raise PublishError(
                    f"{name} was uploaded to {where} by the interrupted run and deleted here "
                    f"(--delete-local), but this run pushes to {target.repo_id}"
                    + (f" (branch {target.branch})" if target.branch else ""),
                    repo_id=target.repo_id,
                    hint="resume with the same push target, or merge again with --force instead of --resume",
                )

    def write(self, job: Job, row: int, data: torch.Tensor) -> None:
        digest = self._digests.get(job.shard)
        if digest is not None:
            digest.feed(batch_offset(job, row), tensor_bytes(data))

    def tensor_done(self, job: Job) -> None:
        pass

    def shard_done(self, shard: int) -> None:
        if self._error is not None and self.target.delete_local:
            # The disk was sized for a shard or two on their way (--delete-local), and no shard is uploaded
            # (and deleted) any more: stop here, with what is written kept for --resume.
            raise self._error
        assert self._plan is not None
        digest = self._digests.pop(shard, None)
        sha256 = digest.result() if digest is not None else None
        self._uploads.append(self._pool.submit(self._upload, self._plan.shards[shard].filename, sha256))

    def _upload(self, filename: str, sha256: bytes | None = None) -> None:
        from huggingface_hub import CommitOperationAdd

        recorded = self._recorded()
        path = self.directory / filename
        if filename in recorded and not path.exists():
            self._ops[filename] = _already_uploaded(filename, recorded[filename])
            return
        if (
            self._failed is not None
        ):  # the push has failed (commit() raises that error): --resume uploads this
            log.info("not uploading %s: the upload of %s failed", filename, self._failed)
            return
        if sha256 is not None:
            op = _hashed(filename, path, sha256)
        else:  # resumed: an earlier run wrote part of the shard, so huggingface_hub reads it whole to hash it
            op = CommitOperationAdd(path_in_repo=filename, path_or_fileobj=str(path))
        reader, bar = None, None
        if sha256 is not None and self.read_direct:
            # huggingface_hub takes a file object as it takes a path (read, seek, tell: io.BufferedIOBase),
            # but shows its upload progress bar for paths only: this one stands in for it.
            bar = _UploadBar(filename, path.stat().st_size)
            reader = DirectReader(path, on_read=bar.update)
            op.path_or_fileobj = cast("BinaryIO", reader)
            with self._lock:
                self._reading = reader
                if self._closing:
                    reader.abort()
        try:
            self._upload_call(
                filename,
                lambda: self.api.preupload_lfs_files(
                    self.target.repo_id,
                    additions=[op],
                    revision=self.target.branch,
                    create_pr=self.target.create_pr,
                    free_memory=False,
                ),
            )
        finally:
            if reader is not None:
                with self._lock:
                    self._reading = None
                reader.close()
                op.path_or_fileobj = str(path)
            if bar is not None:
                bar.close()
        self._ops[filename] = op
        log.info("uploaded %s", filename)
        if self.target.delete_local and op._upload_mode == "lfs":
            with open(path, "rb") as f:
                sample = f.read(512)
            recorded[filename] = {
                "repo": self.target.repo_id,
                "branch": self.target.branch,
                "sha256": op.upload_info.sha256.hex(),
                "size": op.upload_info.size,
                "sample": sample.hex(),
            }
            write_json(self.directory / PROGRESS_DIR / UPLOADED, recorded)  # whole or not at all
            path.unlink()

    def _upload_call(self, filename: str, fn: Any) -> None:
        """One shard's upload. If it fails, the merge goes on (its files are kept for ``--resume``), but
        the shards after it are not tried: each would wait out huggingface_hub's retries in turn."""
        try:
            # attempts=1: the shard's reader is used up; huggingface_hub retries the requests themselves
            self._call(fn, f"upload of {filename}", attempts=1)
        except PublishError as exc:
            self._failed, self._error = filename, exc
            if not (self._closing or self._committing or self.target.delete_local):  # still merging: say so
                log.warning(
                    "%s; the merge goes on without uploading, and `--resume` finishes the push",
                    exc.message,
                )
            raise

    def _recorded(self) -> dict[str, dict[str, Any]]:
        path = self.directory / PROGRESS_DIR / UPLOADED
        return json.loads(path.read_text()) if path.exists() else {}

    def commit(self, files: list[str]) -> str:
        """Wait for the shard uploads, then commit every file at once.

        Returns:
            The commit URL (or the pull request URL with ``create_pr``).

        Raises:
            PublishError: an upload or the commit failed; the local files are kept for a rerun.
        """
        from huggingface_hub import CommitOperationAdd, CommitOperationDelete

        assert self._plan is not None
        self._committing = True
        for future in self._uploads:
            future.result()
        self._pool.shutdown()
        ops: list[CommitOperationAdd | CommitOperationDelete] = []
        for name in files:
            if name in self._ops:
                ops.append(self._ops[name])
            else:
                ops.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(self.directory / name)))
        plan, target = self._plan, self.target
        ops += [CommitOperationDelete(path_in_repo=name) for name in self._stale(files)]
        if "README.md" in files:
            self._validate_card(self.directory / "README.md")
        summary = (
            target.commit_message or f"hubmerge: {plan.method} merge of {len(plan.recipe.models)} models"
        )
        sources = "\n".join(
            f"- {s.label}: {s.ref.shown()}" + (f" @ {s.commit}" if s.commit else "") for s in plan.sources
        )
        description = f"Merged with hubmerge.\n\n{sources}\n\nrecipe sha256: {plan.recipe_sha256}"
        info = self._call(
            lambda: self.api.create_commit(
                target.repo_id,
                operations=ops,
                commit_message=summary,
                commit_description=description,
                revision=target.branch,
                create_pr=target.create_pr,
            ),
            "commit",
            # Not repeated: after a lost answer the commit may have landed, and a second one would open
            # another pull request or fail deleting files already gone. --resume finishes it instead.
            attempts=1,
        )
        url = info.pr_url if target.create_pr and info.pr_url else info.commit_url
        return str(url)

    def _stale(self, files: list[str]) -> list[str]:
        """The target's model files (weights, config, tokenizer, modules) that this commit does not replace.

        Left there, a model pushed over an earlier one would keep the earlier weights beside the new ones,
        and from_pretrained could load those (``model.safetensors`` next to new shards, say), or the earlier
        model's tokenizer files (a BERT ``special_tokens_map.json`` beside a Llama tokenizer gave a pad token
        past the embeddings), or look like a sentence-transformers model still (``modules.json``).
        """
        target = self.target
        existing = self._call(
            lambda: self.api.list_repo_files(target.repo_id, revision=target.branch), "file list"
        )
        folders = self._module_dirs(existing) if "modules.json" in existing else []
        stale = sorted(name for name in existing if name not in files and _is_model_file(name, folders))
        if stale:
            log.warning(
                "%s: the commit deletes %d file(s) of the model it replaces: %s",
                target.repo_id,
                len(stale),
                ", ".join(stale),
            )
        return stale

    def _module_dirs(self, existing: list[str]) -> list[str]:
        """The module folders the earlier model's ``modules.json`` names (``1_Pooling``), whose files are the
        model's; none (their files are left, with a warning) where it cannot be read."""
        import tempfile

        target = self.target
        with tempfile.TemporaryDirectory(prefix="hubmerge-modules-") as scratch:  # not the shared cache
            try:
                path = self._call(
                    lambda: self.api.hf_hub_download(
                        target.repo_id, "modules.json", revision=target.branch, local_dir=scratch
                    ),
                    "modules.json",
                )
                modules = json.loads(Path(path).read_text(encoding="utf-8"))
            except (PublishError, OSError, ValueError) as exc:
                reason = exc.message.split(" failed: ", 1)[-1] if isinstance(exc, PublishError) else exc
                log.warning(
                    "%s: could not read the earlier model's modules.json (%s); the push goes on, and leaves "
                    "the folders of its modules",
                    target.repo_id,
                    reason,
                )
                return []
        if not isinstance(modules, list):
            return []
        return [
            str(m["path"]).strip("/")
            for m in modules
            if isinstance(m, dict) and isinstance(m.get("path"), str) and m["path"].strip("/")
        ]

    def _validate_card(self, path: Path) -> None:
        from huggingface_hub import ModelCard

        card = ModelCard(path.read_text(encoding="utf-8"))
        try:
            self._call(lambda: card.validate(repo_type="model"), "model card validation")
        except ValueError as exc:
            raise PublishError(
                f"the Hub rejects the model card's metadata: {exc}",
                repo_id=self.target.repo_id,
                hint="fix the `card:` section of the recipe",
            ) from None

    def close(self) -> None:
        """Stop: uploads not started are dropped, and one under way ends at its next read of the shard.

        After :meth:`commit` nothing is under way. Before it (an error, Ctrl-C, SIGTERM), waiting for a
        5 GB upload to finish could take minutes; a rerun with ``--resume`` uploads what the Hub lacks. An
        upload that huggingface_hub reads by path (through Xet) cannot be stopped midway.
        """
        with self._lock:
            self._closing = True
            if self._reading is not None:
                self._reading.abort()
        self._pool.shutdown(wait=True, cancel_futures=True)


class _Digest:
    """The sha256 of a shard, fed its bytes in file order: the header, then each batch the merge writes."""

    def __init__(self, header: bytes, size: int) -> None:
        self._hash: hashlib._Hash | None = hashlib.sha256(header)
        self._at, self._size = len(header), size

    def feed(self, offset: int, data: memoryview) -> None:
        if self._hash is None:
            return
        if offset != self._at:  # out of order (a resumed run skips what is written): give up on this shard
            self._hash = None
            return
        self._hash.update(data)
        self._at += len(data)

    def result(self) -> bytes | None:
        """The digest, if every byte of the shard went through :meth:`feed` in order."""
        return self._hash.digest() if self._hash is not None and self._at == self._size else None


class _UploadBar:
    """huggingface_hub's per-file upload bar, drawn from the first byte read (none for a skipped upload)."""

    def __init__(self, filename: str, size: int) -> None:
        self.filename, self.size = filename, size
        self._bar: Any = None

    def update(self, n: int) -> None:
        if self._bar is None:
            from huggingface_hub.utils.tqdm import are_progress_bars_disabled
            from tqdm import tqdm

            self._bar = tqdm(
                unit="B",
                unit_scale=True,
                total=self.size,
                desc=self.filename,
                disable=are_progress_bars_disabled(),
            )
        self._bar.update(n)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _check_namespace(repo_id: str, user: dict[str, Any]) -> None:
    """Refuse, before merging, a push into a namespace that is neither the token's user nor one of its orgs.

    The Hub would refuse the upload with 403 only once the merge is done. (A token limited to some
    repositories of its own namespace can still be refused then.)
    """
    token = (user.get("auth") or {}).get("accessToken") or {}
    if token.get("role") == "read":
        raise PublishError(
            f"the token ({token.get('displayName') or 'from HF_TOKEN'}) is read-only: "
            f"it cannot push to {repo_id}",
            repo_id=repo_id,
            hint="use a token with write access (HF_TOKEN or `hf auth login`); nothing was merged yet",
        )
    namespace = repo_id.split("/")[0]
    orgs = [o.get("name") if isinstance(o, dict) else o for o in user.get("orgs") or []]
    if namespace != user.get("name") and namespace not in orgs:
        raise PublishError(
            f"the token belongs to {user.get('name')}, who cannot write to the namespace {namespace} "
            f"(not the user, nor one of its organizations{': ' + ', '.join(map(str, orgs)) if orgs else ''})",
            repo_id=repo_id,
            hint="push to a repository of your own (--push NAME goes to your namespace), or use a token of "
            f"a member of {namespace}; nothing was merged yet",
        )


_WEIGHTS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "flax_model*.msgpack",
    "flax_model.msgpack.index.json",
    "adapter_config.json",
)


def _is_weights(name: str) -> bool:
    """Whether a repository file is top-level weights (or their index, or a LoRA adapter's config)."""
    return "/" not in name and any(fnmatch.fnmatchcase(name, pattern) for pattern in _WEIGHTS)


# The files transformers, tokenizers and sentence-transformers read beside the weights, by name: a push over
# an earlier model deletes those the merge does not write. Files of other names are the repository owner's.
_MODEL_FILES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "tokenizer.model",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.jinja",
        "chat_template.json",
        "preprocessor_config.json",
        "processor_config.json",
        "modules.json",
        "sentence_bert_config.json",
        "config_sentence_transformers.json",
    }
)


# Tokenizer files known by their kind: mistral's tokenizer.model.v3, tiktoken ranks, sentencepiece models.
_TOKENIZER_PATTERNS = ("tokenizer.model.*", "*.tiktoken", "spm.model", "vocab.model", "sentencepiece*.model")


def _is_model_file(name: str, module_dirs: Iterable[str] = ()) -> bool:
    """Whether a repository file is part of a model as hubmerge writes one: weights, a file of
    :data:`_MODEL_FILES` or :data:`_TOKENIZER_PATTERNS`, or one in a sentence-transformers module folder the
    model's ``modules.json`` names (``module_dirs``)."""
    return (
        _is_weights(name)
        or name in _MODEL_FILES
        or ("/" not in name and any(fnmatch.fnmatchcase(name, p) for p in _TOKENIZER_PATTERNS))
        or any(name.startswith(f"{folder}/") for folder in module_dirs)
    )


def uploads_read_direct() -> bool:
    """Whether pushed shards are best written and read back around the page cache (``directio.py``).

    True where huggingface_hub uploads through the LFS protocol, which reads a file object we hand it. With
    ``hf_xet`` installed and not turned off it uploads through Xet, which reads files by path (through the
    page cache) and would fall back to LFS for a file object; a shard for it is written through the cache.
    """
    if not directio.enabled():
        return False
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_DISABLE_XET", False):
        return True
    return importlib.util.find_spec("hf_xet") is None


def _hashed(filename: str, path: Path, sha256: bytes) -> CommitOperationAdd:
    """An upload of ``path`` whose sha256 is known: huggingface_hub then does not read the file to hash it."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.lfs import UploadInfo

    op = CommitOperationAdd(path_in_repo=filename, path_or_fileobj=b"")
    with open(path, "rb") as f:
        sample = f.read(512)
    op.path_or_fileobj = str(path)
    op.upload_info = UploadInfo(size=path.stat().st_size, sample=sample, sha256=sha256)
    return op


def _already_uploaded(filename: str, record: dict[str, Any]) -> CommitOperationAdd:
    """A commit operation for a shard uploaded by an earlier run, then deleted (--delete-local)."""
    from huggingface_hub import CommitOperationAdd
    from huggingface_hub.lfs import UploadInfo

    op = CommitOperationAdd(path_in_repo=filename, path_or_fileobj=b"")
    sample = bytes.fromhex(record["sample"])
    op.upload_info = UploadInfo(size=record["size"], sample=sample, sha256=bytes.fromhex(record["sha256"]))
    # The client's own markers for "already in LFS storage": the commit then only references the blob.
    op._upload_mode = "lfs"
    op._is_uploaded = True
    return op
