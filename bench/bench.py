"""The benchmark: hubmerge, mergekit and the floor script side by side, alternating, on synthetic Llamas.

    python bench/bench.py            # full mode (what `make bench` runs)
    python bench/bench.py --quick    # small models, linear and ties only

For every (family, method) case the page cache is warmed with the inputs, then each round runs every tool
once, in turn (hubmerge, floor, mergekit, hubmerge, floor, ...), so a slow drift of the machine hits all tools
alike. Outputs are deleted after each run. The table, the machine and the targets go to bench/RESULTS.md,
between the markers, and the raw samples to ``<work>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import cases  # noqa: E402
import gen  # noqa: E402
import measure  # noqa: E402
import report  # noqa: E402

QUICK = {"families": ["small"], "methods": ["linear", "ties"], "runs": 3}
FULL = {
    "families": ["small", "mid", "embed"],
    "methods": [*cases.MAIN_METHODS, "dare_linear", "slerp", "model_stock"],
    "runs": 3,
}
# mergekit runs only where it is compared: its ties on the 1 GB embedding alone takes minutes.
MERGEKIT_CASES = {
    "small": set(cases.MAIN_METHODS),
    "mid": set(cases.MAIN_METHODS),
    "embed": {"linear"},
}


def parse_args() -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(description="hubmerge vs mergekit vs the floor")
    parser.add_argument("--quick", action="store_true", help="small models, linear and ties, 3 runs")
    parser.add_argument("--families", nargs="+", choices=sorted(gen.FAMILIES))
    parser.add_argument("--methods", nargs="+", choices=sorted(cases.METHODS))
    parser.add_argument("--tools", nargs="+", default=["hubmerge", "floor", "mergekit"])
    parser.add_argument("--runs", type=int, help="rounds per case (default 3)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="hubmerge's and mergekit's")
    parser.add_argument(
        "--data", type=Path, default=Path(os.environ.get("HUBMERGE_BENCH_DATA", HERE / "data"))
    )
    parser.add_argument("--work", type=Path, help="scratch for outputs (default DATA/work)")
    parser.add_argument("--mergekit", type=Path, default=HERE / ".venv-mergekit" / "bin" / "mergekit-yaml")
    parser.add_argument("--results", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--no-results", action="store_true", help="do not touch RESULTS.md")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the previous run's samples (DATA/work/results.json) for cases and tools not rerun now",
    )
    args = parser.parse_args()
    mode = QUICK if args.quick else FULL
    args.families = args.families or mode["families"]
    args.methods = args.methods or mode["methods"]
    args.runs = args.runs or mode["runs"]
    args.data = args.data.resolve()
    args.work = (args.work or args.data / "work").resolve()
    args.mode = "quick" if args.quick else "full"
    return args


def machine(args: argparse.Namespace) -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        "?",
    )
    mem = next(line.split()[1] for line in open("/proc/meminfo") if line.startswith("MemTotal"))
    import torch

    info = {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": f"{int(mem) / 2**20:.1f} GiB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": args.device,
        "mode": args.mode,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load before": f"{os.getloadavg()[0]:.2f}",
    }
    try:
        info["hubmerge commit"] = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        if changed:  # the numbers are of code that no commit holds
            info["hubmerge commit"] += " (with uncommitted changes)"
    except OSError:
        pass
    if args.mergekit.exists():
        pip = args.mergekit.parent / "pip"
        out = subprocess.run([str(pip), "show", "mergekit"], capture_output=True, text=True).stdout
        info["mergekit"] = next((ln.split()[1] for ln in out.splitlines() if ln.startswith("Version")), "?")
    return info


def startup() -> dict[str, float | list[str]]:
    """Seconds for ``import hubmerge`` and ``hubmerge --version``; heavy modules the merge path adds."""
    py = sys.executable
    hub = shutil.which("hubmerge") or str(Path(py).parent / "hubmerge")
    probe = (  # beyond what torch itself imports (it takes numpy when installed; hubmerge does not need it)
        "import sys, torch; before = set(sys.modules); "
        "import hubmerge, hubmerge.cli, hubmerge.run, hubmerge.api; "
        "print(' '.join(sorted({m.split('.')[0] for m in set(sys.modules) - before} & "
        "{'transformers', 'peft', 'huggingface_hub', 'accelerate', 'numpy', 'pandas'})))"
    )
    heavy = subprocess.run([py, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    import statistics

    def best(cmd: list[str]) -> float:
        return statistics.median(measure.run(cmd).wall for _ in range(5))

    return {
        "import hubmerge": best([py, "-c", "import hubmerge"]),
        "import torch": best([py, "-c", "import torch"]),
        "hubmerge --version": best([hub, "--version"]),
        "heavy modules the merge path adds": heavy,
    }


def merge_results(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with the samples of ``new`` replacing those of the same case and tool, in ``old``'s order."""
    fresh = {(c["family"], c["method"]): c for c in new}
    merged = []
    for case in old:
        again = fresh.pop((case["family"], case["method"]), None)
        if again is not None:
            case = {**case, "samples": {**case["samples"], **again["samples"]}}
        merged.append(case)
    return merged + list(fresh.values())


def main() -> None:
    """Run the benchmark and write the report."""
    args = parse_args()
    own = Path(sys.executable).parent / "hubmerge"  # this checkout's install, not another on PATH
    hub = str(own) if own.exists() else shutil.which("hubmerge") or str(own)
    mergekit = args.mergekit if "mergekit" in args.tools and args.mergekit.exists() else None
    if "mergekit" in args.tools and mergekit is None:
        print(f"warning: {args.mergekit} missing; run bench/run.sh to install mergekit", file=sys.stderr)
    info = machine(args)
    results: list[dict] = []
    for family in args.families:
        dirs = gen.ensure(args.data, family)
        size = gen.model_bytes(gen.FAMILIES[family].config)
        for name in args.methods:
            method = cases.METHODS[name]
            work = args.work / f"{family}-{name}"
            shutil.rmtree(work, ignore_errors=True)
            cmds = cases.commands(method, dirs, work, source="local", device=args.device, mergekit=mergekit)
            cmds["hubmerge"][0] = hub
            if name not in MERGEKIT_CASES.get(family, set()):
                cmds.pop("mergekit", None)
            tools = [t for t in args.tools if t in cmds]
            measure.warm(cases.inputs(method, dirs))
            samples: dict[str, list[measure.Sample]] = {t: [] for t in tools}
            for round_ in range(args.runs):
                # Each round starts with another tool: on a VM where fresh pages cost a host fault, the
                # first run after the warm-up or the one after a big write would otherwise always be one tool.
                for tool in tools[round_ % len(tools) :] + tools[: round_ % len(tools)]:
                    sample = measure.run(cmds[tool])
                    samples[tool].append(sample)
                    for out in ("hubmerge", "mergekit", "floor.safetensors"):
                        path = work / out
                        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(
                            missing_ok=True
                        )
                    print(
                        f"{family:6} {name:16} {tool:9} run {round_ + 1}: {sample.wall:7.2f} s  "
                        f"anon {sample.peak_anon / 2**20:6.0f} MiB  rss {sample.peak_rss / 2**30:5.2f} GiB  "
                        f"load {sample.load:.1f}",
                        flush=True,
                    )
            input_bytes = size * len(cases.inputs(method, dirs))
            results.append(
                {
                    "family": family,
                    "method": name,
                    "model_bytes": size,
                    "input_bytes": input_bytes,
                    "samples": {t: [asdict(s) for s in ss] for t, ss in samples.items()},
                }
            )
            shutil.rmtree(work, ignore_errors=True)
            args.work.mkdir(parents=True, exist_ok=True)  # kept as it goes: a later failure loses no case
            partial = {"machine": info, "startup": {}, "cases": results}
            (args.work / "results.partial.json").write_text(json.dumps(partial))
    info["load after"] = f"{os.getloadavg()[0]:.2f}"
    start = startup()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.merge and (args.work / "results.json").exists():
        results = merge_results(json.loads((args.work / "results.json").read_text())["cases"], results)
        info["mode"] += " (merged with the previous run)"
    (args.work / "results.json").write_text(json.dumps({"machine": info, "startup": start, "cases": results}))
    (args.work / "results.partial.json").unlink(missing_ok=True)
    text = report.render(info, start, results)
    print(text)
    if not args.no_results:
        report.update(args.results, text)
        print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
