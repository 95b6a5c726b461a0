"""The shard writer: the first sink. Lays out every shard up front and writes each tensor at its offset.

Output is built in a hidden sibling directory ``.NAME.hubmerge-partial`` and renamed into place on success, so
a failed run never leaves something that looks complete. A journal there lists finished tensors; ``resume``
continues a killed run, and because every byte is fixed by the plan the result is identical either way.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .directio import DirectFile, DirectIO, pwrite_all
from .errors import OutputError

if TYPE_CHECKING:
    import torch

    from .plan import Job, MergePlan

log = logging.getLogger(__name__)

PROGRESS_DIR = ".hubmerge-progress"
MANIFEST = "hubmerge.json"  # in every output: what --force may replace


class Sink(Protocol):
    """Receives merged tensors from the run loop. New uses of the loop are new sinks, not new loops."""

    def begin(self, plan: MergePlan) -> set[str]:
        """Prepare for ``plan``; return the names of the tensors already finished (resume)."""
        ...

    def write(self, job: Job, row: int, data: torch.Tensor) -> None:
        """Take ``data`` in the output dtype: the whole tensor (``row`` 0) or rows from ``row`` on."""
        ...

    def tensor_done(self, job: Job) -> None: ...

    def shard_done(self, shard: int) -> None: ...


class OverflowCheck:
    """A sink that counts the infinite values of merged float16 tensors: float16 ends at 65504, and larger
    merged values (a bfloat16 or float32 model's embeddings, say) are written as infinity, which the merge
    then reports (:meth:`report`) instead of leaving to the first NaN in someone's logits."""

    def __init__(self) -> None:
        self.found: dict[str, int] = {}

    def begin(self, plan: MergePlan) -> set[str]:
        return set()

    @staticmethod
    def applies(job: Job) -> bool:
        """Whether ``job`` writes float16 it computed or cast (not a float16 tensor copied as it is)."""
        return job.dtype == "F16" and (job.action == "merge" or any(i.dtype != "F16" for i in job.inputs))

    def write(self, job: Job, row: int, data: torch.Tensor) -> None:
        if not self.applies(job) or data.numel() == 0:
            return
        low, high = data.aminmax()  # one fast pass; the count only where something is infinite
        if math.isinf(float(low)) or math.isinf(float(high)):
            self.found[job.name] = self.found.get(job.name, 0) + int(data.isinf().sum())

    def tensor_done(self, job: Job) -> None:
        pass

    def shard_done(self, shard: int) -> None:
        pass

    def report(self) -> None:
        if self.found:
            worst = max(self.found, key=lambda name: self.found[name])
            log.warning(
                "%d values in %d float16 tensors are infinite (most in %s: %d): merged values beyond "
                "float16's range (65504) become infinite; merge into bfloat16 or float32 (--dtype) to keep "
                "them",
                sum(self.found.values()),
                len(self.found),
                worst,
                self.found[worst],
            )


def partial_dir(out: Path) -> Path:
    """Where the output is assembled before the final rename."""
    return out.parent / f".{out.name}.hubmerge-partial"


def old_dir(out: Path) -> Path:
    """Where a ``--force`` commit moves the earlier output while the new one takes its name."""
    return out.parent / f".{out.name}.hubmerge-old"


def recover_commit(out: Path) -> None:
    """Finish, or undo, a ``--force`` commit that a crash cut between its renames (call with the lock held).

    The commit moves the earlier output to :func:`old_dir`, the finished merge to ``out``, then deletes the
    earlier one. Cut after the first rename, ``out`` is missing: the finished merge (its journal already
    dropped) takes the name, else the earlier output gets it back. Cut while deleting, the rest is deleted.
    """
    old, tmp = old_dir(out), partial_dir(out)
    if not (old / MANIFEST).is_file():  # not an earlier merge moved aside: a folder of the user's, left alone
        return
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        return
    if (tmp / MANIFEST).is_file() and not (tmp / PROGRESS_DIR).exists():
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
        log.warning("%s: finished the commit of a run stopped while it replaced the earlier merge", out)
    else:
        os.rename(old, out)
        log.warning("%s: put back the earlier merge, which a run stopped while replacing it", out)


def lock_path(out: Path) -> Path:
    """The lock a merge holds on its output while it writes it (:func:`output_lock`)."""
    return out.parent / f".{out.name}.hubmerge-lock"


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out`` for one run: a second merge into the same output is refused while this one writes.

    Two runs would share one partial folder: the second deletes and recreates it under the first, which then
    renames a folder of zeroed or mixed shards into place and reports success. The lock is an ``flock`` on a
    hidden file beside the output, deleted when the run ends (the kernel releases it if the run is killed).
    Missing parent folders are created for it, and removed again if the run leaves them empty.

    Raises:
        OutputError: another run holds the lock, or the output's folder cannot be written.
    """
    out = out.resolve()
    missing = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    created: list[Path] = []
    writing = out.parent  # the folder written to when something fails: the one a new folder goes in
    try:
        for folder in reversed(missing):
            writing = folder.parent
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            created.append(folder)
        fd = _take_lock(lock_path(out), out)
    except OSError as exc:  # a read-only disk, a parent that is a file, no permission; or the lock is held
        for folder in reversed(created):
            _remove_if_empty(folder)
        if isinstance(exc, OutputError):
            raise
        raise OutputError(
            f"cannot create the output's folder {out}: {writing} cannot be written ({exc.strerror or exc})",
            path=str(out),
            hint="choose an --out on a disk and in a folder you can write to",
        ) from None
    try:
        yield
    finally:
        if fd is not None:
            try:
                os.unlink(
                    lock_path(out)
                )  # while still held: a run waiting on this file retries on the new one
            except OSError:
                pass
            os.close(fd)
        for folder in reversed(created):
            if not _remove_if_empty(folder):
                break


# flock answers these where the file system has no locks (Lustre without -o flock, some FUSE mounts).
_NO_LOCKS = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL}


def _take_lock(path: Path, out: Path) -> int | None:
    """The descriptor holding ``path``'s lock; None where the file system has no locks (a warning says so).

    Raises:
        OutputError: another process holds it.
        OSError: the lock file cannot be made or opened.
    """
    import fcntl

    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError:
            if not path.exists():  # the folder cannot be written: that is the error
                raise
            fd = os.open(path, os.O_RDONLY)  # left by another user's run that was killed: read-only locks too
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(
                f"another hubmerge run (pid {holder}) is writing {out}",
                path=str(out),
                hint="wait for it to finish, or write this merge elsewhere with --out",
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_LOCKS:
                raise
            log.warning("%s: the file system takes no locks; make sure no other run writes this output", out)
            return None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:  # the run that held it just ended and deleted it
            same = False
        if same:
            break
        os.close(fd)
    try:  # who holds it, for the message of a run refused; a lock without it still locks
        os.ftruncate(fd, 0)
        pwrite_all(fd, memoryview(f"{os.getpid()}\n".encode()), 0)
    except OSError:
        pass
    return fd


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _remove_if_empty(folder: Path) -> bool:
    try:
        folder.rmdir()
    except OSError:
        return False
    return True


def _not_merged(out: Path) -> list[str]:
    """What in ``out``, an earlier merge, that merge did not write (a `.git` of a cloned push, an evaluation,
    notes in a module folder), sorted; folders end in ``/``.

    The manifest lists the merge's files; one written before it did is judged by top-level name: its shards
    and the files a merge writes or copies (companions.COMPANION_GLOBS, sentence-transformers module folders).
    """
    from .companions import COMPANION_GLOBS

    try:
        manifest = json.loads((out / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    listed = manifest.get("files") if isinstance(manifest, dict) else None
    added = []
    if isinstance(listed, list):
        names = {str(f) for f in listed}
        folders = {name.rsplit("/", 1)[0] for name in names if "/" in name}
        folders |= {"/".join(f.split("/")[:i]) for f in folders for i in range(1, f.count("/") + 1)}
        for root, dirs, files in os.walk(out):
            here = Path(root).relative_to(out).as_posix()
            prefix = "" if here == "." else f"{here}/"
            for name in sorted(dirs):
                if f"{prefix}{name}" not in folders or (Path(root) / name).is_symlink():
                    added.append(f"{prefix}{name}/")
            dirs[:] = [d for d in dirs if f"{prefix}{d}" in folders and not (Path(root) / d).is_symlink()]
            added += [f"{prefix}{name}" for name in files if f"{prefix}{name}" not in names]
        return sorted(added)
    for entry in out.iterdir():
        name = entry.name
        if entry.is_dir():
            ours = re.fullmatch(r"\d+_[A-Za-z]\w*", name) is not None  # 1_Pooling, 2_Normalize
        else:
            ours = name in (MANIFEST, "README.md", "recipe.yaml", "model.safetensors.index.json") or any(
                fnmatch.fnmatchcase(name, g) for g in (*COMPANION_GLOBS, "model*.safetensors")
            )
        if not ours:
            added.append(f"{name}/" if entry.is_dir() else name)
    return sorted(added)


def _refuse_added(out: Path, added: list[str], *, finished: Path | None = None) -> None:
    """Refuse to replace ``out`` while it holds what the earlier merge did not write (:func:`_not_merged`)."""
    if not added:
        return
    shown = ", ".join(added[:4]) + (f" and {len(added) - 4} more" if len(added) > 4 else "")
    if finished is None:
        raise OutputError(
            f"output directory {out} holds an earlier merge and what it did not write: {shown}; "
            "--force would delete them with it",
            path=str(out),
            hint="move them out of that directory first, or choose another --out",
        )
    raise OutputError(
        f"while merging, {shown} appeared in {out}, which the finished merge replaces; --force would delete "
        "them with it",
        path=str(out),
        hint=f"move them out of that directory, then rerun with --resume --force (the finished merge is kept "
        f"in {finished})",
    )


def _empty(path: Path) -> bool:
    return path.is_dir() and next(path.iterdir(), None) is None


def check_place(out: Path, inputs: list[Path]) -> None:
    """Refuse an output that is, lies inside or contains an input, or is a file: what a run checks before it
    takes the output's lock (which creates the output's parent folders).

    Raises:
        OutputError: naming the input, or the file.
    """
    out = out.resolve()
    for src in inputs:
        src = src.resolve()
        # A model folder is the input; a single .safetensors file is, not the folder it lies in.
        if out.is_relative_to(src):
            raise OutputError(
                f"output directory {out} is or lies inside the input {src}",
                path=str(out),
                hint="write the merge somewhere else with --out",
            )
        if src.is_relative_to(out):
            raise OutputError(
                f"output directory {out} contains the input {src}; --force would delete it",
                path=str(out),
                hint="choose another --out",
            )
    try:
        here = Path.cwd().resolve()
    except OSError:  # the working directory was deleted: nothing to keep the shell in
        here = None
    if here is not None and here.is_relative_to(out):
        # The merge is written beside the output and renamed into place: the shell would be left in a
        # folder that no longer exists, showing none of the files.
        raise OutputError(
            f"output directory {out} is (or contains) the working directory, which the finished merge "
            "would replace",
            path=str(out),
            hint="give --out the name of a new folder, or run from another directory",
        )
    if out.exists() and not out.is_dir():
        raise OutputError(
            f"output {out} exists and is not a directory",
            path=str(out),
            hint="give --out a directory path (the merge writes several files)",
        )


def check_output(out: Path, inputs: list[Path], *, force: bool, resume: bool) -> None:
    """Refuse outputs that would overwrite without ``force`` or touch an input.

    An empty directory may take the output. ``force`` replaces an earlier merge (a directory holding
    ``hubmerge.json``), never anything else: a mistyped ``--out ~/project --force`` must not delete a project.

    Raises:
        OutputError: the output exists (without ``force``), is a file, or is not an earlier merge; is an
            input, lies inside one, or contains one; or a partial run exists and neither ``resume`` nor
            ``force`` was given.
    """
    out = out.resolve()
    check_place(out, inputs)
    if out.exists() and not _empty(out):
        if resume and not force and (out / MANIFEST).is_file():
            if partial_dir(out).exists():  # a --force run, stopped: it replaces the merge there
                raise OutputError(
                    f"the interrupted merge in {partial_dir(out)} replaces the earlier merge in {out}",
                    path=str(out),
                    hint="pass --resume --force to continue it, or change --out to keep both",
                )
            raise OutputError(
                f"output directory {out} holds a finished merge: there is nothing to resume",
                path=str(out),
                hint="pass --force to merge again into it, or change --out",
            )
        if not force and (out / MANIFEST).is_file():
            raise OutputError(
                f"output directory {out} already exists",
                path=str(out),
                hint="pass --force to replace it, or change --out",
            )
        if not force:  # --force would be refused below: no hint at it
            raise OutputError(
                f"output directory {out} already exists, and is not the output of a merge (it has no "
                f"{MANIFEST})",
                path=str(out),
                hint="choose another --out, or empty that directory yourself if nothing in it is needed",
            )
        if not (out / MANIFEST).is_file():
            raise OutputError(
                f"output directory {out} is not the output of a merge (it has no {MANIFEST}); "
                "--force replaces only an earlier merge or an empty directory",
                path=str(out),
                hint="choose another --out, or delete that directory yourself if nothing in it is needed",
            )
        _refuse_added(out, _not_merged(out))
    existing = next(p for p in out.parents if p.exists())  # where the partial folder is made
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):  # what --dry-run checks too
        raise OutputError(
            f"cannot create the output's folder {out}: {existing} cannot be written "
            f"({os.strerror(errno.EROFS) if _read_only(existing) else os.strerror(errno.EACCES)})",
            path=str(out),
            hint="choose an --out on a disk and in a folder you can write to",
        )
    if partial_dir(out).exists() and not (resume or force):
        raise OutputError(
            f"an interrupted merge into {out} left {partial_dir(out)}",
            path=str(out),
            hint="pass --resume to continue it, or --force to start over",
        )


class ShardWriter:
    """Writes shards with precomputed headers; journals finished tensors for resume.

    Args:
        out: the output directory.
        resume: continue an interrupted merge into ``out``.
        direct: write around the page cache where the file system allows (directio.py); False where the
            shards are read again at once by path (a push through Xet uploads each as it is finished), so
            they come from the cache.
    """

    def __init__(self, out: Path, *, resume: bool = False, direct: bool = True) -> None:
        self.out = out.resolve()
        self.direct = direct
        self.tmp = partial_dir(self.out)
        self.resume = resume
        self._fds: list[int] = []
        self._files: list[DirectFile | None] = []
        self._paths: list[Path] = []
        self._io: DirectIO | None = None
        # Per shard, finished tensors whose bytes may still be on their way: (end offset, name), file order.
        self._unjournaled: list[list[tuple[int, str]]] = []
        self._gone: set[str] = set()
        self._journal: int | None = None

    def begin(self, plan: MergePlan) -> set[str]:
        progress = self.tmp / PROGRESS_DIR
        fingerprint = plan.fingerprint()
        done: set[str] = set()
        if self.tmp.exists() and self.resume and (progress / "fingerprint").is_file():
            if (progress / "fingerprint").read_text(errors="replace") != fingerprint:
                raise OutputError(
                    f"{self.tmp} holds an interrupted merge of {_what_changed(progress, plan)}",
                    path=str(self.tmp),
                    hint="pass --force without --resume to start over",
                )
            journal_path = progress / "journal"
            # Bytes a crash left half-written name no tensor: read them as such, not as an error.
            journal = journal_path.read_text(errors="replace") if journal_path.exists() else ""
            # The last line may be cut short by a kill; only complete lines count.
            done = {line for line in journal.split("\n")[:-1] if line}
            uploaded_path = progress / "uploaded.json"
            uploaded = set(json.loads(uploaded_path.read_text())) if uploaded_path.exists() else set()
            for shard in plan.shards:
                path = self.tmp / shard.filename
                if path.exists() and path.stat().st_size != shard.size:  # cut short: trust none of it
                    done -= {plan.jobs[j].name for j in shard.jobs}
                elif not path.exists():
                    if shard.filename in uploaded:
                        self._gone.add(
                            shard.filename
                        )  # uploaded and deleted (--delete-local): nothing to write
                    else:
                        done -= {plan.jobs[j].name for j in shard.jobs}
            log.info("resuming: %d of %d tensors already written", len(done), len(plan.jobs))
        else:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            try:
                progress.mkdir(parents=True)
            except OSError as exc:  # a read-only disk, a parent that is a file, no permission
                raise OutputError(
                    f"cannot create the output's working folder {self.tmp}: {exc.strerror or exc}",
                    path=str(self.out),
                    hint="choose an --out on a disk and in a folder you can write to",
                ) from None
            (progress / "fingerprint").write_text(fingerprint)
            write_json(progress / "sources.json", _identities(plan))
        self._paths = [self.tmp / shard.filename for shard in plan.shards]
        for shard in plan.shards:
            path = self.tmp / shard.filename
            if shard.filename in self._gone:
                self._fds.append(-1)
                self._files.append(None)
                self._unjournaled.append([])
                continue
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            self._fds.append(fd)
            if os.fstat(fd).st_size != shard.size:
                os.ftruncate(fd, shard.size)
            pwrite_all(fd, memoryview(shard.header), 0)
            if self._io is None and self.direct:
                self._io = DirectIO()
            self._files.append(DirectFile(fd, path, self._io))
            self._unjournaled.append([])
        self._journal = os.open(progress / "journal", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        return done

    def write(self, job: Job, row: int, data: torch.Tensor) -> None:
        file = self._files[job.shard]
        assert file is not None
        with self._reporting(job.shard):
            file.write(tensor_bytes(data), batch_offset(job, row))
            self._journal_written(job.shard)

    def tensor_done(self, job: Job) -> None:
        self._unjournaled[job.shard].append((job.offset + job.nbytes, job.name))
        with self._reporting(job.shard):
            self._journal_written(job.shard)

    def shard_done(self, shard: int) -> None:
        # No fsync: the journal guards against crashes and kills of this process (the kernel keeps what
        # pwrite wrote); like save_pretrained, durability across power loss is left to the file system.
        # An fsync per shard cost about as much as the whole gap to the benchmark's floor.
        file = self._files[shard]
        if file is not None:
            with self._reporting(shard):
                file.flush()
                self._journal_written(shard)

    def _journal_written(self, shard: int) -> None:
        """Journal the finished tensors of ``shard`` whose bytes are all in the file (resume trusts it)."""
        pending, file = self._unjournaled[shard], self._files[shard]
        if not pending or file is None:
            return
        below = file.written_to()  # -1: every byte
        ready = "".join(f"{name}\n" for end, name in pending if below < 0 or end <= below)
        if ready:
            assert self._journal is not None
            pending[:] = [(end, name) for end, name in pending if 0 <= below < end]
            os.write(self._journal, ready.encode())

    def _journal_closed(self, shard: int) -> None:
        """Journal every finished tensor of ``shard``: its file has just closed, every byte written."""
        pending = self._unjournaled[shard] if shard < len(self._unjournaled) else []
        if pending and self._journal is not None:
            os.write(self._journal, "".join(f"{name}\n" for _, name in pending).encode())
            pending.clear()

    @contextmanager
    def _reporting(self, shard: int) -> Iterator[None]:
        """Report a failed write as an :class:`OutputError` naming the shard file, and what to do."""
        try:
            yield
        except OutputError:
            raise
        except OSError as exc:
            raise self._failed(shard, exc) from exc

    def _failed(self, shard: int, exc: OSError) -> OutputError:
        path = self._paths[shard]
        hint = "rerun with --resume once the cause is fixed"
        if exc.errno == errno.ENOSPC:
            hint = f"free space on that disk or write elsewhere with --out, then {hint}"
        return OutputError(f"writing {path} failed: {exc.strerror or exc}", path=str(path), hint=hint)

    def close(self) -> None:
        """Write what is still staged and close every file; a failed write is raised once all are closed.

        The finished tensors whose bytes were still staged are journaled once their file closes cleanly, so
        a run stopped by an error, Ctrl-C or SIGTERM resumes after every tensor it finished.
        """
        error: OSError | None = None
        for shard, file in enumerate(self._files):
            if file is not None:
                try:
                    file.close()
                except OutputError as exc:
                    error = error or exc
                except OSError as exc:
                    error = error or self._failed(shard, exc)
                else:
                    self._journal_closed(shard)
        self._files.clear()
        if self._io is not None:
            self._io.close()
            self._io = None
        for fd in self._fds:
            if fd >= 0:
                os.close(fd)
        self._fds.clear()
        if self._journal is not None:
            os.close(self._journal)
            self._journal = None
        if error is not None:
            raise error

    def check_replace(self, *, force: bool) -> None:
        """Refuse to take the output's name where that would lose something, as :meth:`commit` does and
        before a push's commit, which cannot be taken back: an earlier merge that now holds what it did not
        write (checked as the run began too), or an output created or written to while merging. The journal
        is kept: ``--resume`` finishes once the cause is gone."""
        if force and (self.out / MANIFEST).is_file():
            _refuse_added(self.out, _not_merged(self.out), finished=self.tmp)
        if self.out.exists() and not _empty(self.out):
            if not (self.out / MANIFEST).is_file():
                raise OutputError(
                    f"output directory {self.out} was created or written to while merging, and is not the "
                    f"output of a merge (it has no {MANIFEST})",
                    path=str(self.out),
                    hint=f"move it aside (or empty it), then rerun with --resume: the finished merge is kept "
                    f"in {self.tmp}",
                )
            if not force:
                raise OutputError(
                    f"output directory {self.out} was created while merging: an earlier merge is there",
                    path=str(self.out),
                    hint=f"rerun with --resume --force to replace it (the finished merge is kept in "
                    f"{self.tmp}), or move it aside and rerun with --resume",
                )

    def commit(self, *, force: bool) -> Path:
        """Close the shards, drop the journal and move the finished directory into place.

        Returns:
            The output directory.
        """
        self.close()
        self.check_replace(force=force)
        shutil.rmtree(self.tmp / PROGRESS_DIR)
        if _empty(self.out):
            self.out.rmdir()
        if self.out.exists():
            old = old_dir(self.out)
            if old.exists():
                shutil.rmtree(old)
            os.rename(self.out, old)
            os.rename(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)  # the merge is in place; a leftover goes on the next run
            if old.exists():
                log.warning("%s: could not delete the earlier merge, moved to %s", self.out, old)
        else:
            os.rename(self.tmp, self.out)
        return self.out


def _identities(plan: MergePlan) -> dict[str, Any]:
    sources = {s.label: {"ref": str(s.ref), "commit": s.commit, "stamp": s.stamp} for s in plan.sources}
    return {"recipe_sha256": plan.recipe_sha256, "sources": sources}


def _what_changed(progress: Path, plan: MergePlan) -> str:
    """What differs from the interrupted run, for its refusal: a source by name where one changed."""
    try:
        before = json.loads((progress / "sources.json").read_text())
        was = {label: dict(s) for label, s in before["sources"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return "a different recipe or different inputs"
    for label, now in _identities(plan)["sources"].items():
        old = was.get(label)
        if old is None:
            return f"a different recipe: it had no {label}"
        if old.get("ref") != now["ref"]:
            return f"a different recipe: {label} is now {now['ref']}, it was {old.get('ref')}"
        if old.get("commit") != now["commit"]:
            repo = str(now["ref"]).split("@")[0]
            return (
                f"different inputs: {label} ({now['ref']}) now resolves to commit {now['commit']}, "
                f"it was {old.get('commit')} (to resume, pin that commit: {repo}@{old.get('commit')})"
            )
        if old.get("stamp") != now["stamp"]:
            return (
                f"different inputs: {label} ({now['ref']}) changed, its weight files were rewritten since "
                "(sizes or modification times differ)"
            )
    if before.get("recipe_sha256") != plan.recipe_sha256:
        return "a different recipe"
    return "a different output layout"


def batch_offset(job: Job, row: int) -> int:
    """Where in its shard the batch of ``job`` starting at ``row`` goes."""
    return job.offset + (row * (job.nbytes // job.shape[0]) if row else 0)


def tensor_bytes(data: torch.Tensor) -> memoryview:
    """The bytes of ``data`` (made contiguous if needed), as a view."""
    import torch

    from .sources.buffers import writable

    return writable(data.contiguous().reshape(-1).view(torch.uint8))


def write_json(path: Path, doc: object) -> None:
    """Write JSON deterministically (sorted keys, trailing newline) through a temporary name."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
