"""Run a command as a subprocess and measure it from the parent: wall time, peak RSS, peak anonymous memory.

Memory is sampled from ``/proc/PID/status`` (``VmRSS``, ``RssAnon``, ``RssShmem``) every ``interval`` seconds,
summed over the process and all its descendants, so tools that fork workers are charged for them. Anonymous
memory is the honest number for a merge tool: page-cache pages of memory-mapped inputs count in RSS but are
shared, reclaimable and free; anonymous pages are what the tool really allocates, private (``RssAnon``) or
shared (``RssShmem``: an anonymous ``mmap`` such as hubmerge's direct-I/O staging buffers).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

INTERVAL = 0.02


@dataclass(frozen=True)
class Sample:
    """One run of one command."""

    wall: float
    peak_rss: int  # bytes, sampled, process tree
    peak_anon: int  # bytes, sampled, process tree
    max_rss: int  # bytes, the kernel's high-water mark of the main process (ru_maxrss)
    load: float  # 1-minute load average when the run ended, to spot a busy machine
    cpu: float = 0.0  # seconds of CPU, user + system, of the command and its children


@dataclass(frozen=True)
class Summary:
    """Median and spread of several runs."""

    runs: int
    median: float
    low: float
    high: float
    peak_rss: int
    peak_anon: int

    @classmethod
    def of(cls, samples: Sequence[Sample]) -> Summary:
        walls = [s.wall for s in samples]
        return cls(
            runs=len(samples),
            median=statistics.median(walls),
            low=min(walls),
            high=max(walls),
            peak_rss=max(s.peak_rss for s in samples),
            peak_anon=max(s.peak_anon for s in samples),
        )


class CommandFailed(RuntimeError):
    """The measured command exited non-zero; the message carries the end of its stderr."""


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return found


def tree_memory(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon + RssShmem) in bytes summed over ``pid`` and its descendants; 0 for processes gone."""
    rss = anon = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith(("RssAnon:", "RssShmem:")):
                        anon += int(line.split()[1]) * 1024
        except OSError:
            continue
        todo += _children(p)
    return rss, anon


def run(
    cmd: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    interval: float = INTERVAL,
    on_sample: Callable[[int], None] | None = None,
) -> Sample:
    """Run ``cmd`` to completion, sampling its memory; raise :class:`CommandFailed` on a non-zero exit.

    Args:
        cmd: the command line.
        env: the environment (default: this process's).
        interval: seconds between memory samples.
        on_sample: called with the process id at every sample, while the process runs.

    Returns:
        The measured sample.
    """
    with tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(list(cmd), env=env, stdout=subprocess.DEVNULL, stderr=err)
        peak_rss = peak_anon = 0
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                wall = time.perf_counter() - start
                break
            rss, anon = tree_memory(proc.pid)
            peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
            if on_sample is not None:
                on_sample(proc.pid)
            time.sleep(interval)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-3000:]
            raise CommandFailed(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    cpu = usage.ru_utime + usage.ru_stime
    return Sample(wall, peak_rss, peak_anon, usage.ru_maxrss * 1024, os.getloadavg()[0], cpu)


def process_cpu(pid: int) -> float:
    """Seconds of CPU (user + system, all threads) that process ``pid`` has used so far; 0 if gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def warm(paths: Sequence[Path]) -> int:
    """Read every file under ``paths`` once so the timed runs find them in the page cache; return bytes."""
    total = 0
    buf = bytearray(16 << 20)
    for root in paths:
        for file in sorted(root.rglob("*.safetensors")) if root.is_dir() else [root]:
            with open(file, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
    return total
