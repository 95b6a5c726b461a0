"""The Hub path of the benchmark: merging from a Hub server, and merging + pushing, against the local merge.

A ``hubmerge hub serve`` process on 127.0.0.1 holds the three fine-tunes of a family, and redirects requests
for their weights to signed URLs on a second port, as huggingface.co redirects them to its CDN. Each round's
merge, a weighted average with weights new to the round, runs in turn from local files, from the Hub by ranged
reads, from the Hub one shard at a time, and from the Hub with ``--push`` to a new repository. Reported:
median and spread of wall time, the ratios to the local merge and to the Hub merge, peak anonymous memory, and
peak disk used while merging (the drop of free space on the output's file system, sampled every 20 ms) against
the output size plus one input shard per model.

    python bench/hub.py --data bench/data --family small --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import gen  # noqa: E402
import measure  # noqa: E402

from hubmerge.hubserver.process import spawn  # noqa: E402

TOKEN = "hubmerge-bench-token"
CDN_TTL = 3600  # seconds the server's signed CDN URLs stay valid (hub serve --cdn-ttl)
MARK_BEGIN, MARK_END = "<!-- hub:begin -->", "<!-- hub:end -->"


def upload(url: str, dirs: list[Path], env: dict[str, str]) -> list[str]:
    """Publish the model directories (in a subprocess, so this process never imports huggingface_hub)."""
    ids = [f"bench/{d.name}" for d in dirs]
    script = (
        "import sys\nfrom huggingface_hub import HfApi\napi = HfApi()\n"
        "for folder, repo in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    api.create_repo(repo, exist_ok=True)\n"
        "    api.upload_folder(folder_path=folder, repo_id=repo)\n"
    )
    args = [a for d, i in zip(dirs, ids, strict=True) for a in (str(d), i)]
    subprocess.run([sys.executable, "-c", script, *args], env=env, check=True)
    return ids


def stored_files(work: Path) -> list[Path]:
    """The files the server of :func:`serving` holds (regular files and LFS objects), in order."""
    return sorted(f for f in (work / "storage" / "blobs").rglob("*") if f.is_file())


@contextmanager
def serving(
    dirs: list[Path], work: Path, cdn_ttl: int = CDN_TTL
) -> Iterator[tuple[subprocess.Popen[bytes], dict[str, str], list[str]]]:
    """A ``hub serve`` process on ``work/storage`` holding ``dirs``, the files warm at both ends.

    Yields the server process, the environment a ``hubmerge`` run needs to use it, and the repository ids.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    scratch = work / "tmp"  # hubmerge's scratch files (shard downloads, spilled tensors) on the measured disk
    scratch.mkdir(parents=True, exist_ok=True)
    env |= {
        "TMPDIR": str(scratch),
        "HF_TOKEN": TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(work / "hf-home"),
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    # As huggingface.co serves weights: each file's URL redirects to a signed URL on another origin (its CDN).
    server, url = spawn(work / "storage", {TOKEN: "bench"}, cdn_ttl=cdn_ttl)
    env["HF_ENDPOINT"] = url
    try:
        ids = upload(url, dirs, env)
        # Warm at both ends, as for the local merge: the server stores uploads around the page cache, and
        # the first reads into fresh cache pages made the first Hub round 2.4x slower (RESULTS.md item 18).
        measure.warm([*dirs, *stored_files(work)])
        yield server, env, ids
    finally:
        server.terminate()
        server.wait()


def recipes(work: Path, dirs: list[Path], ids: list[str], round_: int, family: str) -> tuple[Path, Path]:
    """The round's weighted average of the models, from local files and from the Hub (JSON is YAML)."""
    weights = [1.0, 1.0, 1.0 + (round_ + 1) / 1000]
    shard_bytes = gen.model_bytes(gen.FAMILIES[family].config) // 4 + 1
    paths = []
    for name, models in (
        ("local", [{"path": str(d)} for d in dirs]),
        ("hub", [{"repo": i} for i in ids]),
    ):
        doc = {
            "method": "weighted",
            "models": [m | {"weight": w} for m, w in zip(models, weights, strict=True)],
            "dtype": "bfloat16",
            # Four output shards, as a 7B model has with the default 5GB: uploads then overlap the merge.
            "output": {"max_shard_size": shard_bytes},
        }
        paths.append(work / f"{name}-{round_}.json.yaml")
        paths[-1].write_text(json.dumps(doc))
    return paths[0], paths[1]


def timed(cmd: list[str], env: dict[str, str], watch: Path, server: int) -> tuple[measure.Sample, int, float]:
    """Run ``cmd`` with :func:`measure.run`, sampling the drop of free disk space where ``watch`` lives.

    Returns the sample, the largest drop of free space, and the CPU seconds the server (pid ``server``) used
    meanwhile: it runs on the same cores, so its share of the work shows in the wall time.
    """
    server_cpu = measure.process_cpu(server)
    start_free = shutil.disk_usage(watch).free
    lowest = [start_free]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            lowest[0] = min(lowest[0], shutil.disk_usage(watch).free)
            time.sleep(measure.INTERVAL)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = measure.run(cmd, env=env)
    finally:
        stop.set()
        sampler.join()
    return result, start_free - lowest[0], measure.process_cpu(server) - server_cpu


def main() -> None:
    """Run the Hub-path cases and write their table into bench/RESULTS.md."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("HUBMERGE_BENCH_DATA", Path(__file__).parent / "data")),
    )
    parser.add_argument("--family", default="small", choices=sorted(gen.FAMILIES))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "RESULTS.md")
    parser.add_argument("--no-results", action="store_true", help="print the table, do not touch RESULTS.md")
    args = parser.parse_args()
    dirs = [d.resolve() for d in gen.ensure(args.data, args.family)[1:4]]
    work = (args.data / "work" / "hub").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    with serving(dirs, work) as (server, env, ids):
        out = work / "out"
        base = [sys.executable, "-m", "hubmerge.cli"]
        flags = ["--out", str(out), "--force", "-q"]
        samples: dict[str, list[tuple[measure.Sample, int, float]]] = {
            name: [] for name in ("local", "hub (ranges)", "hub (shards)", "hub + push")
        }
        for round_ in range(args.runs):
            # Each round weighs the models a little differently: the pushed shard is then new to the server,
            # which would otherwise find it stored by an earlier round and skip the upload.
            local, hub = recipes(work, dirs, ids, round_, args.family)
            cases: dict[str, list[str]] = {
                "local": [*base, str(local), *flags],
                "hub (ranges)": [*base, str(hub), *flags],
                "hub (shards)": [*base, str(hub), *flags, "--hub-transfer", "shards"],
            }
            for name, cmd in cases.items():
                samples[name].append(timed(cmd, env, work, server.pid))
                shutil.rmtree(out, ignore_errors=True)
            push = [*cases["hub (ranges)"], "--push", f"bench/merged-{round_}"]
            samples["hub + push"].append(timed(push, env, work, server.pid))
            shutil.rmtree(out, ignore_errors=True)
            print(
                f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1][0].wall:.2f} s" for k, v in samples.items())
            )
    model_bytes = sum(f.stat().st_size for d in dirs for f in d.glob("*.safetensors"))
    # Each input's own largest shard: a sharded input's is much smaller than an unsharded one's whole file.
    shard_bytes = sum(max(f.stat().st_size for f in d.glob("*.safetensors")) for d in dirs)
    output_bytes = gen.model_bytes(gen.FAMILIES[args.family].config)
    write(args, samples, model_bytes, output_bytes, shard_bytes)
    shutil.rmtree(work, ignore_errors=True)


def write(
    args: argparse.Namespace,
    samples: dict[str, list[tuple[measure.Sample, int, float]]],
    model_bytes: int,
    output_bytes: int,
    shard_bytes: int,
) -> None:
    """The markdown table, between the hub markers of RESULTS.md (appended if absent; printed only with
    ``--no-results``)."""
    med = {k: statistics.median(s.wall for s, _, _ in v) for k, v in samples.items()}
    allowance = output_bytes + shard_bytes
    lines = [
        MARK_BEGIN,
        f"### Hub path: weighted average of 3 `{args.family}` models ({model_bytes / 1e9:.2f} GB in), "
        f"{args.runs} runs each",
        "",
        "| case | median s | spread s | GB/s in | x local | hubmerge CPU s | server CPU s | peak anon MiB "
        "| peak disk MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, runs in samples.items():
        walls = [s.wall for s, _, _ in runs]
        anon = max(s.peak_anon for s, _, _ in runs) / 2**20
        disk = max(d for _, d, _ in runs) / 2**20
        cpu = statistics.median(s.cpu for s, _, _ in runs)
        server_cpu = statistics.median(c for _, _, c in runs)
        lines.append(
            f"| {name} | {med[name]:.2f} | {min(walls):.2f}-{max(walls):.2f} "
            f"| {model_bytes / 1e9 / med[name]:.2f} | {med[name] / med['local']:.2f} "
            f"| {cpu:.2f} | {server_cpu:.2f} | {anon:.0f} | {disk:.0f} |"
        )
    ranges, shards, push = med["hub (ranges)"], med["hub (shards)"], med["hub + push"]
    worst_disk = max(d for name in ("hub (ranges)", "hub (shards)") for _, d, _ in samples[name])
    lines += [
        "",
        f"- merging from the Hub: {ranges / med['local']:.2f}x the local merge by ranged reads, "
        f"{shards / med['local']:.2f}x by shard downloads (target: at most 1.5x)",
        f"- merge + push: {push / ranges:.2f}x the Hub merge alone (target: at most 1.3x; the server runs on "
        "this machine, so its hashing and writing compete for the same 2 cores)",
        f"- peak disk while merging from the Hub (outputs and scratch files): {worst_disk / 2**20:.0f} MiB; "
        f"output + each input's largest shard: {allowance / 2**20:.0f} MiB (target: under it; the push runs "
        "also grow the server's storage and are not counted)",
        MARK_END,
    ]
    print("\n".join(lines))
    if args.no_results:
        return
    text = args.results.read_text() if args.results.exists() else "# Benchmark results\n"
    if MARK_BEGIN in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + "\n".join(lines) + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    args.results.write_text(text)


if __name__ == "__main__":
    main()
