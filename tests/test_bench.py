"""The benchmark itself (``bench/``), run on the ``tiny`` family: its checkpoints are real Llama models, its
floor computes the same merge as hubmerge (or its ratios would compare unlike work), and both scripts write
their tables."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import cases  # noqa: E402
import gen  # noqa: E402

HUBMERGE = [sys.executable, "-m", "hubmerge.cli"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    data = tmp_path_factory.mktemp("bench-data")
    return data, gen.ensure(data, "tiny")


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    found = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            found |= {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    return found


def test_families_are_seeded_llama_checkpoints(tiny: tuple[Path, list[Path]], tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    data, dirs = tiny
    config = gen.FAMILIES["tiny"].config
    assert [d.name for d in dirs] == ["base", "tune1", "tune2", "tune3"]
    # Odd models are sharded, even ones are not: the benchmark reads both layouts.
    assert (dirs[1] / "model.safetensors.index.json").is_file() and (dirs[0] / "model.safetensors").is_file()
    assert len(list(dirs[1].glob("model-*.safetensors"))) >= 2
    base = _tensors(dirs[0])
    assert {n: tuple(t.shape) for n, t in base.items()} == gen.tensor_shapes(config)
    assert sum(t.numel() * 2 for t in base.values()) == gen.model_bytes(config)
    # A fine-tune is the base plus a small seeded delta (norms start at one).
    tune = _tensors(dirs[1])
    delta = (tune["model.layers.0.mlp.up_proj.weight"] - base["model.layers.0.mlp.up_proj.weight"]).float()
    assert 0.5 * gen.TUNE_STD < delta.std().item() < 1.5 * gen.TUNE_STD
    torch.testing.assert_close(base["model.norm.weight"].float(), torch.ones(config["hidden_size"]))
    # The same seed writes the same bytes.
    again = gen.ensure(tmp_path, "tiny")
    for a, b in zip(dirs, again, strict=True):
        for file in sorted(a.glob("*.safetensors")):
            assert file.read_bytes() == (b / file.name).read_bytes(), file
    # transformers loads every model as the Llama its config names, and runs it.
    for directory in (dirs[0], dirs[1]):
        model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
        assert logits.shape == (1, 4, config["vocab_size"]) and torch.isfinite(logits).all()
        torch.testing.assert_close(
            model.model.embed_tokens.weight, _tensors(directory)["model.embed_tokens.weight"]
        )


@pytest.mark.parametrize("name", [m.name for m in cases.METHODS.values() if m.linear])
def test_floor_computes_the_merge_hubmerge_computes(
    tiny: tuple[Path, list[Path]], tmp_path: Path, name: str
) -> None:
    _, dirs = tiny
    method = cases.METHODS[name]
    cmds = cases.commands(method, dirs, tmp_path, source="local", device="cpu", mergekit=None)
    for tool in ("hubmerge", "floor"):
        cmd = HUBMERGE + cmds[tool][1:] if tool == "hubmerge" else cmds[tool]
        subprocess.run(cmd, check=True, capture_output=True)
    merged = _tensors(tmp_path / "hubmerge")
    floor = _tensors(tmp_path)  # floor.safetensors
    assert merged.keys() == floor.keys()
    # And both are the method by hand, in float32 from the inputs.
    models = [_tensors(d) for d in cases.inputs(method, dirs)]
    coefs = method.floor_coefficients()
    for tensor, value in merged.items():
        expected = sum(c * m[tensor].float() for c, m in zip(coefs, models, strict=True))
        torch.testing.assert_close(
            value.float(), expected, rtol=1e-2, atol=1e-4, msg=lambda m, t=tensor: f"{t}: {m}"
        )
        torch.testing.assert_close(floor[tensor], value, rtol=1e-2, atol=1e-4)


def _rows(text: str, header: str) -> list[list[str]]:
    """The cells of the markdown table whose header row starts with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_bench_script_writes_its_table(tiny: tuple[Path, list[Path]], tmp_path: Path) -> None:
    data, _ = tiny
    results = tmp_path / "RESULTS.md"
    results.write_text("# Notes kept\n\n<!-- bench:begin -->\nold\n<!-- bench:end -->\n\nmore notes\n")
    cmd = [sys.executable, str(BENCH / "bench.py"), "--data", str(data), "--work", str(tmp_path / "work")]
    cmd += ["--families", "tiny", "--methods", "weighted", "ties", "--tools", "hubmerge", "floor"]
    subprocess.run([*cmd, "--runs", "1", "--results", str(results)], check=True, capture_output=True)
    text = results.read_text()
    assert text.startswith("# Notes kept") and text.rstrip().endswith("more notes") and "\nold\n" not in text
    rows = _rows(text, "| models | method | tool |")
    assert [(r[1], r[2]) for r in rows] == [
        ("weighted", "hubmerge"),
        ("weighted", "floor"),
        ("ties", "hubmerge"),
        ("ties", "floor"),
    ]
    for row in rows:
        low, high = (float(x) for x in row[4].split("-"))
        assert 0 < low <= float(row[3]) <= high and float(row[7]) > 0  # wall time, peak anonymous memory
        if row[2] == "hubmerge":  # hubmerge/floor: both are measured, so the ratio is there
            assert float(row[8]) > 0
    assert "mergekit" not in {r[2] for r in rows}
    # A later run of one case merged into this one (--merge) keeps the others.
    again = [c for c in cmd if c != "ties"]
    subprocess.run(
        [*again, "--runs", "1", "--results", str(results), "--merge"], check=True, capture_output=True
    )
    merged = _rows(results.read_text(), "| models | method | tool |")
    assert sorted({r[1] for r in merged}) == ["ties", "weighted"]
    assert not (tmp_path / "work" / "results.partial.json").exists()


def test_hub_script_writes_its_table(tiny: tuple[Path, list[Path]], tmp_path: Path) -> None:
    data, _ = tiny
    results = tmp_path / "RESULTS.md"
    results.write_text("# Notes kept\n")
    cmd = [sys.executable, str(BENCH / "hub.py"), "--data", str(data), "--family", "tiny", "--runs", "1"]
    # Every run is checked: a merge or push that fails fails the script (measure.run).
    done = subprocess.run([*cmd, "--results", str(results)], check=True, capture_output=True, text=True)
    assert "round 1: local" in done.stdout and "hub + push" in done.stdout
    text = results.read_text()
    assert text.startswith("# Notes kept")
    rows = _rows(text, "| case | median s |")
    assert [r[0] for r in rows] == ["local", "hub (ranges)", "hub (shards)", "hub + push"]
    assert float(rows[0][4]) == 1.0  # x local
    for row in rows:
        assert float(row[1]) > 0 and float(row[4]) > 0
    assert re.search(r"merge \+ push: \d+\.\d+x the Hub merge alone", text)
    assert not (data / "work" / "hub").exists()  # the script cleans up its server storage and outputs
    # The disk peak counts hubmerge's scratch files: the shard downloads land on the measured disk.
    assert float(rows[2][-1]) > 0
    printed = subprocess.run(
        [*cmd, "--results", str(results), "--no-results"], check=True, capture_output=True
    )
    assert results.read_text() == text and b"| hub + push |" in printed.stdout


def test_memory_counts_private_and_shared_anonymous_memory_of_the_tree() -> None:
    """hubmerge's direct-I/O buffers are an anonymous shared mmap (RssShmem, not RssAnon); a tool that
    forks is charged for its children."""
    import measure

    script = (
        "import mmap, subprocess, sys, time\n"
        "m = mmap.mmap(-1, 64 << 20)\n"
        "m.write(b'x' * (64 << 20))\n"
        "grow = 'b = bytearray(48 << 20)\\nfor i in range(0, len(b), 4096): b[i] = 1\\n'\n"
        "child = subprocess.Popen([sys.executable, '-c', grow + 'import time; time.sleep(30)'])\n"
        "time.sleep(30)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        anon = 0
        for _ in range(100):
            anon = max(anon, measure.tree_memory(proc.pid)[1])
            if anon >= 112 << 20:
                break
            time.sleep(0.05)
        assert anon >= 112 << 20, anon / 2**20
    finally:
        for child in measure._children(proc.pid):
            os.kill(child, 9)
        proc.kill()
        proc.wait()


def test_ab_script_alternates_cases_with_their_settings(tiny: tuple[Path, list[Path]]) -> None:
    data, _ = tiny
    cmd = [sys.executable, str(BENCH / "ab.py"), "--data", str(data), "--family", "tiny", "--runs", "2"]
    cases = ["local", "push HUBMERGE_DIRECT_WRITE=0"]
    done = subprocess.run([*cmd, "--timeline", *cases], check=True, capture_output=True, text=True)
    lines = done.stdout.splitlines()
    rounds = [line for line in lines if line.startswith("round ")]
    assert [r.split(":")[0] for r in rounds] == ["round 1", "round 2"]
    assert all(
        re.fullmatch(r"round \d: local \d+\.\d\d s, push HUBMERGE_DIRECT_WRITE=0 \d+\.\d\d s", r)
        for r in rounds
    )
    # One timeline per run: t:client/server/idle every 100 ms, the client busy at some point.
    timelines = [line.strip() for line in lines if line.startswith("  ")]
    assert len(timelines) == 4 and timelines[1].startswith("push HUBMERGE_DIRECT_WRITE=0: ")
    points = [tuple(map(float, re.split("[:/]", p))) for p in timelines[0].split(": ", 1)[1].split()]
    assert len(points) >= 3 and max(c for _, c, _, _ in points) > 0.3
    summary = [line for line in lines if line.startswith("push HUBMERGE_DIRECT_WRITE=0: median")]
    assert len(summary) == 1 and re.search(r"\d+\.\d\dx local; CPU hubmerge \d+\.\d\d s", summary[0])
    assert re.search(r"peak anon [1-9]\d* MB; uploaded 0\.[1-9] MB", summary[0])  # the tiny output: 0.3 MB
    assert not list(data.glob("ab-*"))  # server storage and outputs are removed

    # Two pushes in one round merge different weights: the second uploads too, instead of finding its
    # objects on the server already.
    pushes = subprocess.run([*cmd[:-1], "1", "push", "push"], check=True, capture_output=True, text=True)
    uploads = re.findall(r"uploaded (\d+\.\d) MB", pushes.stdout)
    assert len(uploads) == 2 and all(float(u) > 0 for u in uploads), pushes.stdout

    bad = subprocess.run([*cmd, "pull"], capture_output=True, text=True)
    assert bad.returncode != 0 and "the kind must be one of local, hub, shards, push" in bad.stderr
    # A case's settings reach its process: offline, a Hub merge has nothing to read, and the run fails.
    offline = subprocess.run([*cmd[:-1], "1", "hub HF_HUB_OFFLINE=1"], capture_output=True, text=True)
    assert offline.returncode != 0 and "exited 2" in offline.stderr, offline.stderr[-2000:]
    assert "HF_HUB_OFFLINE is set" in offline.stderr
