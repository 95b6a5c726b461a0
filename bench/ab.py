"""A/B runs of the Hub path: cases alternating round by round on one Hub server, with a CPU timeline.

    python bench/ab.py --family mid --runs 5 local hub "hub HUBMERGE_HUB_DIRECT=0"
    python bench/ab.py --family mid --runs 3 --timeline push "push HUBMERGE_DIRECT_WRITE=0"

A case is a kind (``local``, ``hub``, ``shards``, ``push``) and ``VAR=VALUE`` settings for its process. The
fine-tunes are uploaded to a ``hubmerge hub serve`` on 127.0.0.1 once, and both ends' files read once so the
page cache is warm, as in ``bench/hub.py``. Each round then runs every case in turn, each run with weights
of its own, so that a slow drift of the machine hits all cases alike and every push uploads. Reported per
case: median and spread of wall time, the median CPU seconds of ``hubmerge`` and of the server (on the same
cores), the median peak anonymous memory of ``hubmerge``, and the median bytes the server stored (a push's
upload). With ``--timeline``, each run also prints one ``t:client/server/idle`` triple per 100 ms: the CPU
cores ``hubmerge`` and the server used in that interval, and the machine's idle cores (``/proc/stat``).
Nothing is written to RESULTS.md: this is the tool for trying a change (items 16-20 there were measured so).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import gen  # noqa: E402
import hub  # noqa: E402
import measure  # noqa: E402

KINDS = ("local", "hub", "shards", "push")
TICK = 0.1  # seconds between timeline points


@dataclass
class Case:
    """One case: what runs, with which settings, and what each of its runs measured."""

    label: str
    kind: str
    env: dict[str, str]
    walls: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)
    server_cpus: list[float] = field(default_factory=list)
    anons: list[int] = field(default_factory=list)
    uploaded: list[int] = field(default_factory=list)


def parse_case(text: str) -> Case:
    """``"push HUBMERGE_DIRECT_WRITE=0"`` -> a case of kind push with that variable set."""
    kind, *settings = text.split()
    if kind not in KINDS:
        raise SystemExit(f"ab.py: case {text!r}: the kind must be one of {', '.join(KINDS)}")
    env = {}
    for setting in settings:
        name, eq, value = setting.partition("=")
        if not eq or not name:
            raise SystemExit(f"ab.py: case {text!r}: {setting!r} is not VAR=VALUE")
        env[name] = value
    return Case(text, kind, env)


def idle_seconds() -> float:
    """Seconds all CPUs have spent idle or waiting for I/O since boot (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


class Timeline:
    """Every ``TICK`` seconds of a run: the cores the command, the server and nobody (idle) used."""

    def __init__(self, server: int) -> None:
        self.server = server
        self.points: list[tuple[float, float, float, float]] = []
        self._start = time.monotonic()
        self._last = (self._start, 0.0, measure.process_cpu(server), idle_seconds())

    def __call__(self, pid: int) -> None:
        now = time.monotonic()
        if now - self._last[0] < TICK:
            return
        cpu, server, idle = measure.process_cpu(pid), measure.process_cpu(self.server), idle_seconds()
        span = now - self._last[0]
        self.points.append(
            (
                now - self._start,
                (cpu - self._last[1]) / span,
                (server - self._last[2]) / span,
                (idle - self._last[3]) / span,
            )
        )
        self._last = (now, cpu, server, idle)

    def render(self) -> str:
        return " ".join(f"{t:.1f}:{c:.1f}/{s:.1f}/{i:.1f}" for t, c, s, i in self.points)


def stored_bytes(work: Path) -> int:
    """Bytes of the files the server holds: a push that uploads grows them by its output."""
    return sum(f.stat().st_size for f in hub.stored_files(work))


def run_rounds(
    args: argparse.Namespace,
    cases: list[Case],
    dirs: list[Path],
    work: Path,
    server: subprocess.Popen[bytes],
    env: dict[str, str],
    ids: list[str],
) -> None:
    """Each round, every case once, in turn; what each run measured goes into its case."""
    out = work / "out"
    for round_ in range(args.runs):
        for k, case in enumerate(cases):
            # Weights of its own for every run: a push of bytes the server already holds would upload nothing.
            local, remote = hub.recipes(work, dirs, ids, round_ * len(cases) + k, args.family)
            cmd = [sys.executable, "-m", "hubmerge.cli", str(local if case.kind == "local" else remote)]
            cmd += ["--out", str(out), "--force", "-q"]
            if case.kind == "shards":
                cmd += ["--hub-transfer", "shards"]
            if case.kind == "push":
                cmd += ["--push", f"bench/ab-{round_}-{k}"]
            timeline = Timeline(server.pid)
            server_before, stored = measure.process_cpu(server.pid), stored_bytes(work)
            sample = measure.run(cmd, env=env | case.env, on_sample=timeline)
            case.uploaded.append(stored_bytes(work) - stored)
            case.walls.append(sample.wall)
            case.cpus.append(sample.cpu)
            case.anons.append(sample.peak_anon)
            case.server_cpus.append(measure.process_cpu(server.pid) - server_before)
            shutil.rmtree(out, ignore_errors=True)
            if args.timeline:
                print(f"  {case.label}: {timeline.render()}")
        print(
            f"round {round_ + 1}: " + ", ".join(f"{c.label} {c.walls[-1]:.2f} s" for c in cases),
            flush=True,
        )


def main() -> None:
    """Run the cases, alternating, and print what they measured."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help='a kind and VAR=VALUE settings: "hub HUBMERGE_HUB_DIRECT=0"')
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("HUBMERGE_BENCH_DATA", Path(__file__).parent / "data")),
    )
    parser.add_argument("--family", default="mid", choices=sorted(gen.FAMILIES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeline", action="store_true", help="print each run's CPU use every 100 ms")
    parser.add_argument(
        "--cdn-ttl", type=int, default=hub.CDN_TTL, help="the server's --cdn-ttl (0: files served directly)"
    )
    args = parser.parse_args()
    cases = [parse_case(text) for text in args.cases]
    dirs = [d.resolve() for d in gen.ensure(args.data, args.family)[1:4]]
    work = Path(tempfile.mkdtemp(prefix="ab-", dir=args.data.resolve()))
    try:
        with hub.serving(dirs, work, args.cdn_ttl) as (server, env, ids):
            run_rounds(args, cases, dirs, work, server, env, ids)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = statistics.median(cases[0].walls)
    for case in cases:
        median = statistics.median(case.walls)
        print(
            f"{case.label}: median {median:.2f} s ({min(case.walls):.2f}-{max(case.walls):.2f}), "
            f"{median / first:.2f}x {cases[0].label}; CPU hubmerge {statistics.median(case.cpus):.2f} s, "
            f"server {statistics.median(case.server_cpus):.2f} s; "
            f"peak anon {statistics.median(case.anons) / 2**20:.0f} MB; "
            f"uploaded {statistics.median(case.uploaded) / 1e6:.1f} MB"
        )


if __name__ == "__main__":
    main()
