"""The command line: one-line errors with exit code 2, plan and methods output, dry runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hubmerge.cli import main
from hubmerge.methods import METHODS

from .util import random_tensors, save_model, write_recipe


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hubmerge.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


@pytest.fixture()
def recipe(tmp_path: Path) -> Path:
    for i, name in enumerate("ab"):
        save_model(tmp_path / name, random_tensors(i))
    return write_recipe(
        tmp_path / "r.yaml", "method: linear\nmodels: [a, b]\nparameters: {t: 0.5}\noutput: {dir: out}\n"
    )


def test_merge_prints_plan_progress_and_summary(recipe: Path) -> None:
    done = _run(str(recipe))
    assert done.returncode == 0, done.stderr
    assert "method   linear" in done.stderr and "merging" in done.stderr
    assert "merged 7 tensors" in done.stdout and str(recipe.parent / "out") in done.stdout
    assert (recipe.parent / "out" / "model.safetensors").exists()
    again = _run(str(recipe))
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert lines[-1].startswith("error: output directory") and "--force" in lines[-1]
    assert "Traceback" not in again.stderr


def test_errors_are_one_line_and_verbose_shows_the_traceback(tmp_path: Path) -> None:
    bad = write_recipe(tmp_path / "bad.yaml", "method: avg\nmodels: [./nothing]\n")
    quiet = _run(str(bad))
    assert quiet.returncode == 2
    assert quiet.stderr.strip().count("\n") == 0
    assert "models.0" in quiet.stderr or "method" in quiet.stderr
    loud = _run(str(bad), "--verbose")
    assert loud.returncode == 2 and "Traceback" in loud.stderr
    missing = _run(str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_plan_json_and_dry_run(recipe: Path) -> None:
    plan = _run("plan", str(recipe), "--json")
    assert plan.returncode == 0, plan.stderr
    doc = json.loads(plan.stdout)
    assert doc["method"] == "linear"
    assert {t["name"] for t in doc["tensors"]} == set(random_tensors(0))
    assert doc["shards"][0]["file"] == "model.safetensors"
    table = _run("plan", str(recipe))
    assert "layer.0.weight" in table.stdout and "estimate" in table.stdout
    dry = _run(str(recipe), "--dry-run")
    assert dry.returncode == 0 and "nothing read, nothing written" in dry.stdout
    assert not (recipe.parent / "out").exists()


def test_methods_lists_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name, spec in METHODS.items():
        assert name in text and spec.paper in text
    assert main(["methods", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(METHODS)


def test_cli_flags_override_the_recipe(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "elsewhere"
    assert main([str(recipe), "--out", str(out), "--dtype", "bfloat16", "-q"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert main([str(recipe), "--out", str(out), "-q"]) == 2
    assert main([str(recipe), "--out", str(out), "--force", "-q"]) == 0


def test_planning_and_listing_methods_import_no_torch(recipe: Path) -> None:
    """`hubmerge plan` and `hubmerge methods` read headers and the method table: no torch import (1-2 s)."""
    code = textwrap.dedent(
        """
        import sys
        from hubmerge.cli import main
        for args in (["plan", sys.argv[1]], ["methods"]):
            try:
                main(args)
            except SystemExit as exit:
                assert not exit.code, exit.code
        assert "torch" not in sys.modules, "planning imported torch"
        import torch
        from hubmerge.methods import METHODS
        assert float(METHODS["centroid"].fn([torch.ones(4), torch.zeros(4)]).sum()) == 2.0
        """
    )
    done = subprocess.run([sys.executable, "-c", code, str(recipe)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
