"""Direct (page-cache-bypassing) output writes: every byte lands where it was written, in any pattern."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import hubmerge
from hubmerge import directio
from hubmerge.directio import ALIGN, Aborted, DirectFile, DirectIO, DirectReader

from .util import kill_after_script, save_model, write_recipe

SIZE = 3 << 20


def _pattern(seed: int) -> list[tuple[int, int]]:
    """Writes as a merge makes them: runs of consecutive pieces of varied sizes, with jumps between runs."""
    rng = random.Random(seed)
    writes: list[tuple[int, int]] = []
    while len(writes) < 300:
        at = rng.randrange(0, SIZE - 1)
        for _ in range(rng.randrange(1, 40)):
            n = rng.choice([1, 7, ALIGN - 1, ALIGN, ALIGN + 5, 50_000, 70_000, 300_001])
            n = min(n, SIZE - at)
            if n <= 0:
                break
            writes.append((at, n))
            at += n
    return writes


def _write(path: Path, writes: list[tuple[int, int]], data: bytes) -> DirectFile:
    expected = bytearray(SIZE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, SIZE)
    io = DirectIO()
    file = DirectFile(fd, path, io)
    try:
        for at, n in writes:
            file.write(memoryview(data)[at : at + n], at)
            expected[at : at + n] = data[at : at + n]
            below = file.written_to()
            if below >= 0:  # what it reports as written is in the file already
                with open(path, "rb") as f:
                    assert f.read(below) == bytes(expected[:below])
        file.flush()
        assert file.written_to() == -1
        assert path.read_bytes() == bytes(expected)
    finally:
        file.close()
        io.close()
        os.close(fd)
    return file


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_byte_lands_where_it_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int
) -> None:
    # Small staging buffers: runs cross many of them and all DEPTH are on their way at once.
    monkeypatch.setattr(directio, "STAGE", 16 * ALIGN)
    data = random.Random(seed).randbytes(SIZE)
    file = _write(tmp_path / "out.bin", _pattern(seed), data)
    if not file.io.made:
        pytest.skip("this file system has no O_DIRECT")


def test_direct_writes_are_used_where_the_file_system_allows(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "probe", os.O_RDWR | os.O_CREAT, 0o644)
    io = DirectIO()
    file = DirectFile(fd, tmp_path / "probe", io)
    try:
        if not file.direct:
            pytest.skip("this file system has no O_DIRECT")
        data = os.urandom(5 * directio.STAGE + 123)
        file.write(memoryview(data), 10)
        assert 0 < file.written_to() <= 10 + 5 * directio.STAGE  # staged and flying bytes are not counted
        file.flush()
        assert (tmp_path / "probe").read_bytes() == bytes(10) + data
        assert io.made == directio.DEPTH  # staging memory stays bounded
    finally:
        file.close()
        io.close()
        os.close(fd)


def test_turned_off_writes_through_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HUBMERGE_DIRECT_WRITE", "0")
    data = random.Random(5).randbytes(SIZE)
    file = _write(tmp_path / "out.bin", _pattern(5), data)
    assert not file.direct and file.io.made == 0


def test_a_file_system_without_direct_io(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def refuse(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(directio.os, "open", refuse)
    data = random.Random(6).randbytes(SIZE)
    file = _write(tmp_path / "out.bin", _pattern(6), data)
    assert not file.direct


def test_a_device_that_refuses_the_alignment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The open succeeds, the first direct write fails with EINVAL: the rest goes through the cache.
    monkeypatch.setattr(directio, "STAGE", 16 * ALIGN)
    refused: list[int] = []
    real = directio.pwrite_all

    def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
        if _is_direct(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd, data, offset)

    monkeypatch.setattr(directio, "pwrite_all", pwrite_all)
    data = random.Random(7).randbytes(SIZE)
    file = _write(tmp_path / "out.bin", _pattern(7), data)
    if not refused:
        pytest.skip("this file system has no O_DIRECT")
    assert not file.direct


def _is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


def _reader_file(tmp_path: Path, size: int, seed: int) -> tuple[Path, bytes]:
    data = random.Random(seed).randbytes(size)
    path = tmp_path / "shard.bin"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize("size", [0, 1, ALIGN, 5 * 16 * ALIGN, 5 * 16 * ALIGN + 123])
def test_the_reader_gives_back_every_byte(tmp_path: Path, size: int) -> None:
    # As an HTTP client reads an upload: fixed-size reads front to back, then the length probe it starts with.
    path, data = _reader_file(tmp_path, size, size)
    with DirectReader(path, depth=3, block=16 * ALIGN) as reader:
        assert reader.seek(0, os.SEEK_END) == size
        assert reader.seek(0) == 0
        chunks = list(iter(lambda: reader.read(10_000), b""))
        assert b"".join(chunks) == data
        assert all(len(c) == 10_000 for c in chunks[:-1])
        assert reader.tell() == size and reader.read() == b"" and reader.read(5) == b""
        reader.seek(0)
        assert reader.read() == data  # a retried upload starts over


def test_the_reader_follows_seeks(tmp_path: Path) -> None:
    # A multipart upload reads slices from anywhere; a seek off the read-ahead's path starts it again there.
    size = 40 * 16 * ALIGN + 77
    path, data = _reader_file(tmp_path, size, 3)
    rng = random.Random(4)
    with DirectReader(path, depth=4, block=16 * ALIGN) as reader:
        for _ in range(300):
            at, n = rng.randrange(size + 10), rng.choice([1, ALIGN, 16 * ALIGN + 3, 200_000])
            reader.seek(at)
            got = reader.read(n) if rng.random() < 0.5 else _readinto(reader, n)
            assert got == data[at : at + n], (at, n)
            assert reader.tell() == (at if at >= size else min(at + n, size))
        assert reader.seek(-5, os.SEEK_END) == size - 5 and reader.read() == data[-5:]
        with pytest.raises(OSError):
            reader.seek(-1)
    with pytest.raises(ValueError):
        reader.read(1)


def test_an_aborted_reader_fails_every_later_read(tmp_path: Path) -> None:
    # abort() comes from another thread (a stopped run) while an upload reads: its next read fails, with an
    # error HTTP clients do not retry (they retry OSErrors).
    path, data = _reader_file(tmp_path, 3 * 16 * ALIGN, 5)
    with DirectReader(path, block=16 * ALIGN) as reader:
        assert reader.read(100) == data[:100]
        aborting = threading.Thread(target=reader.abort)
        aborting.start()
        aborting.join()
        for read in (lambda: reader.read(10), lambda: _readinto(reader, 10)):
            with pytest.raises(Aborted, match="aborted") as info:
                read()
            assert not isinstance(info.value, OSError)
        reader.seek(0)  # a retry's rewind does not bring it back
        with pytest.raises(Aborted):
            reader.read(1)


def _readinto(reader: DirectReader, n: int) -> bytes:
    buf = bytearray(n)
    return bytes(buf[: reader.readinto(buf)])


def test_the_reader_reads_around_the_cache_where_it_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = _reader_file(tmp_path, 3 * 16 * ALIGN + 1, 8)
    with DirectReader(path, block=16 * ALIGN) as reader:
        if not reader.direct:
            pytest.skip("this file system has no O_DIRECT")
        assert reader.read() == data
    monkeypatch.setenv("HUBMERGE_DIRECT_WRITE", "0")  # the same switch turns direct reads off
    with DirectReader(path, block=16 * ALIGN) as reader:
        assert not reader.direct and reader.read() == data


def test_the_reader_falls_back_when_the_device_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The O_DIRECT open succeeds, the reads fail with EINVAL (an alignment the device does not take).
    path, data = _reader_file(tmp_path, 7 * 16 * ALIGN + 9, 9)
    real = os.preadv
    refused: list[int] = []

    def preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        if _is_direct(fd):
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(directio.os, "preadv", preadv)
    with DirectReader(path, depth=2, block=16 * ALIGN) as reader:
        assert reader.read(100) == data[:100] and reader.read() == data[100:]
        assert not reader.direct
    if not refused:
        pytest.skip("this file system has no O_DIRECT")


# Small staging buffers: bytes stay staged or on their way across tensor ends.
KILL_AFTER = kill_after_script("import hubmerge.directio as d\nd.STAGE = 64 << 10")


def test_the_journal_names_only_tensors_whose_bytes_are_written(tmp_path: Path) -> None:
    shapes = {f"layer.{i}.weight": (300 + 37 * i, 129) for i in range(6)} | {"norm": (5,)}
    models = []
    for m in range(2):
        g = torch.Generator().manual_seed(m)
        models.append(
            save_model(tmp_path / f"m{m}", {n: torch.randn(s, generator=g) for n, s in shapes.items()})
        )
    recipe = write_recipe(
        tmp_path / "r.yaml", f"method: linear\nmodels: [{models[0]}, {models[1]}]\nparameters: {{t: 0.3}}\n"
    )
    out = tmp_path / "out"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AFTER, str(recipe), "5", str(out)], capture_output=True
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    partial = tmp_path / ".out.hubmerge-partial"
    journal = (partial / ".hubmerge-progress" / "journal").read_text().splitlines()
    fresh = hubmerge.merge(recipe, tmp_path / "fresh")
    written = (partial / "model.safetensors").read_bytes()
    expected = (fresh.out / "model.safetensors").read_bytes()
    jobs = {job.name: job for job in fresh.plan.jobs}
    assert journal, "some tensors were finished before the kill"
    for name in journal:
        job = jobs[name]
        assert written[job.offset : job.offset + job.nbytes] == expected[job.offset : job.offset + job.nbytes]
    resumed = subprocess.run(
        [sys.executable, "-m", "hubmerge.cli", str(recipe), "--out", str(out), "--resume", "-q"],
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert (out / "model.safetensors").read_bytes() == expected
    merged, a, b = (load_file(p / "model.safetensors") for p in (out, *models))
    for name in shapes:
        torch.testing.assert_close(merged[name], 0.7 * a[name] + 0.3 * b[name])


@pytest.mark.parametrize("direct", ["1", "0"])
def test_a_full_disk_names_the_shard_and_what_to_do(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, direct: str
) -> None:
    monkeypatch.setenv("HUBMERGE_DIRECT_WRITE", direct)
    shapes = {f"w{i}": (600, 700) for i in range(4)}
    models = []
    for m in range(2):
        g = torch.Generator().manual_seed(m)
        models.append(
            save_model(tmp_path / f"m{m}", {n: torch.randn(s, generator=g) for n, s in shapes.items()})
        )
    real = directio.pwrite_all
    written = [0]

    def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
        written[0] += len(data)
        if written[0] > 2_000_000:  # the disk fills up part way through the merge
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data, offset)

    monkeypatch.setattr(directio, "pwrite_all", pwrite_all)
    monkeypatch.setattr("hubmerge.writer.pwrite_all", pwrite_all)
    with pytest.raises(hubmerge.errors.OutputError) as failed:
        hubmerge.merge({"method": "centroid", "models": [str(m) for m in models]}, tmp_path / "out")
    message = str(failed.value)
    assert "model.safetensors failed: No space left on device" in message
    assert "free space" in message and "resume=True" in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("failing", [1, 3, 6, 9, 14, 19])
def test_after_a_failed_write_resume_redoes_every_tensor_it_touched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: int
) -> None:
    """A direct write that fails (a full disk) fails every later write, flush and close of its file, so the
    journal, written as tensors finish and when files close, lists none whose bytes may be missing: the
    resumed output equals a fresh merge, wherever the failure fell (64 KiB blocks, 12 tensors of 100 KiB)."""
    monkeypatch.setattr(directio, "STAGE", 64 << 10)
    monkeypatch.setattr(directio, "DEPTH", 2)
    g = torch.Generator().manual_seed(0)
    models = [
        save_model(tmp_path / f"m{m}", {f"t{k:02d}": torch.randn(100, 256, generator=g) for k in range(12)})
        for m in range(2)
    ]
    recipe = {"method": "linear", "models": [str(m) for m in models], "parameters": {"t": 0.3}}
    fresh = hubmerge.merge(recipe, tmp_path / "fresh")
    real, calls = directio.DirectFile._pwrite, [0]

    def pwrite(self: DirectFile, buf: Any, length: int, offset: int) -> None:
        calls[0] += 1
        if calls[0] == failing:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, buf, length, offset)

    monkeypatch.setattr(directio.DirectFile, "_pwrite", pwrite)
    with pytest.raises(hubmerge.errors.OutputError, match="No space left"):
        hubmerge.merge(recipe, tmp_path / "out")
    monkeypatch.setattr(directio.DirectFile, "_pwrite", real)
    resumed = hubmerge.merge(recipe, tmp_path / "out", resume=True)
    assert resumed.resumed_tensors < 12
    assert (resumed.out / "model.safetensors").read_bytes() == (fresh.out / "model.safetensors").read_bytes()
