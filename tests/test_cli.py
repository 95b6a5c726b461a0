"""The command line: one-line errors with exit code 2, plan and methods output, dry runs."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import hubmerge
from hubmerge import api
from hubmerge.cli import main
from hubmerge.errors import OutputError, RecipeError
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


def test_errors_name_flags_in_the_command_and_arguments_in_python(
    recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(recipe), "-q"]) == 0
    assert main([str(recipe), "-q"]) == 2
    said = capsys.readouterr().err
    assert "pass --force to replace it" in said and "force=True" not in said
    with pytest.raises(OutputError) as info:
        hubmerge.merge(recipe)
    assert info.value.hint == "pass force=True to replace it, or change `out`"
    assert "--" not in str(info.value) and str(info.value) == info.value.args[0] + f" ({info.value.hint})"
    with pytest.raises(RecipeError, match='device="cpu" or device="cuda"'):
        hubmerge.merge(recipe, device="tpu")
    with pytest.raises(RecipeError, match=r"pass `out`"):
        hubmerge.merge({"method": "centroid", "models": [str(recipe.parent / "a")]})
    named = recipe.parent / "runs--force"  # a flag's text inside a path is the path's
    named.mkdir()
    (named / "x").write_text("")
    with pytest.raises(OutputError) as info:
        hubmerge.merge(recipe, named)
    assert f"{named} already exists" in info.value.message
    from hubmerge.errors import python_words

    assert python_words("e.g. --push my-org/my-merge (no revision: use --branch)") == (
        'e.g. push="my-org/my-merge" (no revision: use PushTarget(branch=...))'
    )


def test_progress_in_a_log_is_plain_lines(recipe: Path) -> None:
    """Not a terminal (CI, `2> file`): whole lines, no carriage returns or cursor moves, and log lines stay
    lines of their own."""
    done = _run(str(recipe), "-v")
    assert done.returncode == 0, done.stderr
    assert "\r" not in done.stderr and "\x1b" not in done.stderr
    lines = done.stderr.splitlines()
    progress = [line for line in lines if line.startswith("merging: ")]
    assert progress and progress[-1].startswith("merging: 100% (") and "GB/s" in progress[-1], lines
    assert any(line.startswith("DEBUG hubmerge.run: arithmetic: ") for line in lines), lines
    resumed = _run(str(recipe), "--resume")  # a finished merge: nothing to resume
    assert resumed.returncode == 2 and "holds a finished merge: there is nothing to resume" in resumed.stderr


def test_quiet_is_warnings_and_errors_only(tmp_path: Path) -> None:
    """-q drops the plan, progress and summary, not a warning (here: a folder with both a single file and an
    index), and plan takes it too, before or after the command."""
    both = save_model(tmp_path / "both", random_tensors(0), shards=2)
    save_model(tmp_path / "single", random_tensors(1))
    (tmp_path / "single" / "model.safetensors").rename(both / "model.safetensors")
    recipe = write_recipe(tmp_path / "r.yaml", "method: centroid\nmodels: [both, both]\n")
    loud = _run("plan", str(recipe))
    assert loud.returncode == 0 and "WARNING" in loud.stderr and "holds both" in loud.stderr
    for args in (["plan", "-q", str(recipe)], ["-q", "plan", str(recipe)], [str(recipe), "-q", "--out", "o"]):
        quiet = _run(*args, cwd=tmp_path)
        assert quiet.returncode == 0, (args, quiet.stderr)
        lines = quiet.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("WARNING ") and "holds both" in lines[0], lines
    assert quiet.stdout == ""  # no summary
    assert (tmp_path / "o" / "model.safetensors").exists()


def test_log_progress_writes_a_line_per_tenth_at_most_every_few_seconds(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from hubmerge import cli

    clock = [100.0]
    monkeypatch.setattr(cli.time, "monotonic", lambda: clock[0])
    progress = cli._LogProgress(1000, every=5.0)
    for _ in range(10):  # a tenth a second: one line every 5 s, the last one always
        clock[0] += 1.0
        progress.update(100)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("%")[0] for line in lines] == ["merging: 50", "merging: 100"], lines
    assert lines[0] == "merging: 50% (500 B of 1000 B, 0.00 GB/s, 5 s)"
    progress = cli._LogProgress(0)  # nothing to read: no line (the summary follows)
    progress.update(0)
    assert capsys.readouterr().err == ""


def test_progress_on_a_terminal_is_a_bar_with_log_lines_above_it(recipe: Path) -> None:
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    run = subprocess.Popen(
        [sys.executable, "-m", "hubmerge.cli", str(recipe), "-v"],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert run.wait() == 0, seen
    text = seen.decode()
    assert "\rmerging: 100%|" in text and "merged 7 tensors" in text, text
    # tqdm clears the bar's line before a log line is written, so the line starts clean.
    debug = text.index("DEBUG hubmerge.run: arithmetic")
    assert text[debug - 1] in "\r\n", text[max(0, debug - 200) : debug + 50]


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
    assert "method   linear" in dry.stdout
    assert not (recipe.parent / "out").exists()
    hushed = _run(str(recipe), "--dry-run", "-q")  # -q: no plan; the exit status answers
    assert (hushed.returncode, hushed.stdout, hushed.stderr) == (0, "", "")


def test_a_bare_hubmerge_prints_its_help_not_an_error() -> None:
    bare = _run()
    assert bare.returncode == 2
    assert bare.stderr.startswith("Usage: hubmerge") and "error" not in bare.stderr
    assert "plan" in bare.stderr and "methods" in bare.stderr


def test_a_dry_run_refuses_what_the_merge_would_refuse(recipe: Path) -> None:
    (recipe.parent / "out").mkdir()
    (recipe.parent / "out" / "notes.txt").write_text("mine")
    exists = _run(str(recipe), "--dry-run")
    assert exists.returncode == 2 and "already exists" in exists.stderr and exists.stdout == ""
    inside = _run(str(recipe), "--dry-run", "--out", str(recipe.parent / "a" / "merged"))
    assert inside.returncode == 2 and "inside the input" in inside.stderr


def test_an_output_that_cannot_be_created_is_one_line(recipe: Path, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    done = _run(str(recipe), "--out", str(tmp_path / "afile" / "merged"))
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(
        "error: cannot create the output's folder"
    )
    assert "hint: choose an --out" in done.stderr and "Traceback" not in done.stderr


LINEAR = "method: linear\nmodels: [a, b]\nparameters: {t: 0.5}\n"


@pytest.mark.parametrize(
    ("text", "code", "said", "unsaid"),
    [
        (
            "method: weighted\nmodels: [{path: a, weight: 1}, {path: b, weight: -1}]\n",
            2,
            ["sum to 0", "normalize: false"],
            [],
        ),
        (
            LINEAR + "rules: [{tensors: 'hed.*', take: 0}]\n",
            2,
            [
                "rules.0 (hed.*) does not apply as written: its glob 'hed.*' matches no tensor",
                "mean 'head.*'?",
            ],
            [],
        ),
        (  # one glob of the rule matches: the other one is still a typo
            LINEAR + "rules: [{tensors: [head.weight, 'nrm.*'], take: 0}]\n",
            2,
            ["its glob 'nrm.*' matches no tensor", "did you mean 'norm.*'?"],
            [],
        ),
        (
            "method: weighted\nmodels: [a, b]\n"
            "rules: [{tensors: 'head.*', parameters: {weight: [0.3, -0.3000000001]}}]\n",
            2,
            ["recipe field 'rules.0.parameters.weight'", "sum to 0"],
            [],
        ),
        (
            LINEAR + "rules: [{tensors: 'head.*', skip: true}, {tensors: 'head.weight', take: 1}]\n",
            2,
            ["an earlier rule takes every tensor it matches", "reorder the rules"],
            ["did you mean"],
        ),
        (
            LINEAR + "rules: [{tensors: 'x.*', skip: true}]\n",
            0,
            ["rules.0 (x.*) skips less than it names: its glob 'x.*' matches no tensor"],
            [],
        ),
    ],
)
def test_problems_the_plan_can_see_fail_before_reading(
    recipe: Path, tmp_path: Path, text: str, code: int, said: list[str], unsaid: list[str]
) -> None:
    """Weights that cannot be normalized, a rule that does not apply as written: refused before any weight
    is read, not at the end of the merge with a full-size partial output left behind."""
    done = _run("plan", str(write_recipe(tmp_path / "case.yaml", text)))
    output = done.stdout + done.stderr
    assert done.returncode == code, output
    assert all(s in output for s in said) and not any(u in output for u in unsaid), output


def test_a_full_disk_an_unknown_dtype_or_device_fail_before_reading(recipe: Path, tmp_path: Path) -> None:
    plan = hubmerge.plan(recipe)
    huge = dataclasses.replace(plan.shards[0], size=1 << 60)  # more than any disk holds
    with pytest.raises(OutputError, match="not enough free space for the output in .* are free"):
        api.check_space(
            tmp_path / "o", dataclasses.replace(plan, shards=(huge,)), resume=False, delete_local=False
        )
    with pytest.raises(RecipeError, match="dtype 'fp16' is not one of"):
        hubmerge.plan(recipe, dtype="fp16")  # type: ignore[arg-type]
    with pytest.raises(RecipeError, match="device 'tpu' is not cpu or cuda"):
        hubmerge.merge(recipe, tmp_path / "o", device="tpu")


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="checks the refusal on a machine without CUDA"
)
def test_cuda_without_a_gpu_is_refused_before_any_output(recipe: Path, tmp_path: Path) -> None:
    dry = _run(str(recipe), "--dry-run", "--device", "cuda")
    assert dry.returncode == 2 and "torch sees no CUDA device" in dry.stderr
    with pytest.raises(hubmerge.HubmergeError, match="torch sees no CUDA device"):
        hubmerge.merge(recipe, tmp_path / "out", device="cuda")
    assert not (tmp_path / ".out.hubmerge-partial").exists() and not (tmp_path / "out").exists()
    assert hubmerge.PushTarget is __import__("hubmerge.publish").publish.PushTarget


def test_methods_lists_every_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name, spec in METHODS.items():
        assert name in text and spec.paper in text
    assert main(["methods", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) == set(METHODS)
    for name, spec in METHODS.items():  # the engine's seed where the method draws masks, as the table says
        assert ("seed" in doc[name]["parameters"]) == spec.random, name
        block = next(b for b in text.split("\n\n") if b.startswith(f"{name} "))
        assert ("\n    seed " in block) == spec.random, name


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


LOST_STOP = """
import os, signal, weakref
from hubmerge.errors import Terminated, raise_if_stopped, stop_signals

class Box:
    pass

def finalizer():  # the stop lands here, where an exception would be printed as ignored and dropped
    os.kill(os.getpid(), signal.SIGTERM)
    for _ in range(100_000):
        pass

with stop_signals():
    box = Box()
    weakref.finalize(box, finalizer)
    del box
    print("went on", flush=True)
    try:
        raise_if_stopped()
    except Terminated as stop:
        print("stopped by", stop.name, flush=True)
"""


def test_a_stop_that_lands_in_a_finalizer_is_raised_where_the_loop_looks() -> None:
    """A signal handled inside a finalizer (read buffers are freed by one) would raise into it, where Python
    prints the exception as ignored and drops it: it is kept instead, and raise_if_stopped, which the merge
    loop calls between batches, raises it."""
    ran = subprocess.run([sys.executable, "-c", LOST_STOP], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["went on", "stopped by SIGTERM"]
    assert "Exception ignored" not in ran.stderr, ran.stderr  # nothing raised where it would be lost


TWO_STOPS = """
import contextlib, os, signal, sys
from hubmerge.errors import Terminated, stop_signals

def send(name):
    os.kill(os.getpid(), getattr(signal, name))
    for _ in range(100_000):  # Python runs the handler between two of these
        pass

nested, force = sys.argv[1] == "nested", sys.argv[2]
with stop_signals():
    try:
        with stop_signals() if nested else contextlib.nullcontext():  # as `hub serve` inside the CLI
            send("SIGTERM")
    except Terminated:
        send("SIGHUP")  # systemd's SendSIGHUP, or a hang-up on top of a kill: the cleanup goes on
        print("cleanup finished", flush=True)
        send(force)  # a kind received before, again: a forced stop
        print("not reached", flush=True)
"""


@pytest.mark.parametrize("nested", ["nested", "flat"])
@pytest.mark.parametrize("force", ["SIGTERM", "SIGHUP"])
def test_a_second_stop_of_another_kind_lets_the_cleanup_finish_and_a_repeat_forces(
    nested: str, force: str
) -> None:
    import signal

    ran = subprocess.run([sys.executable, "-c", TWO_STOPS, nested, force], capture_output=True, text=True)
    assert ran.stdout.splitlines() == ["cleanup finished"], ran.stderr
    assert ran.returncode == -getattr(signal, force)


HANDLED = """
import os, signal
from hubmerge.errors import Terminated, raise_if_stopped, stop_handled, stop_signals

with stop_signals():
    for round in range(2):  # a server stopped, handled, then started and stopped again
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(100_000):
                pass
        except Terminated:
            stop_handled()
            raise_if_stopped()
            print("stopped and handled", round, flush=True)
"""


def test_a_handled_stop_leaves_the_next_signal_a_stop_again() -> None:
    ran = subprocess.run([sys.executable, "-c", HANDLED], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout.splitlines() == ["stopped and handled 0", "stopped and handled 1"]


def test_the_merge_loop_raises_a_stop_whose_signal_was_lost(tmp_path: Path) -> None:
    import signal

    import hubmerge
    from hubmerge import errors

    models = [save_model(tmp_path / f"m{i}", random_tensors(i)) for i in range(2)]
    errors._stops.append(signal.SIGTERM)  # what the signal handler records, its exception lost
    try:
        with pytest.raises(errors.Terminated):
            hubmerge.merge({"method": "centroid", "models": [str(m) for m in models]}, tmp_path / "out")
    finally:
        errors._stops.clear()
    assert not (tmp_path / "out").exists()
    assert (tmp_path / ".out.hubmerge-partial").exists()  # kept for --resume


def test_dry_run_refuses_an_output_it_could_not_write(recipe: Path, tmp_path: Path) -> None:
    """A read-only disk (or a folder without write permission) fails --dry-run as the merge would."""
    target = tmp_path / "ro"
    target.mkdir()
    target.chmod(0o555)
    mounted = False
    try:
        if os.access(target, os.W_OK):  # root ignores permissions: a read-only mount instead
            mounted = (
                subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(target)]).returncode
                == 0
            )
            if not mounted:
                pytest.skip("permissions do not apply to this user and no read-only mount can be made")
        for args in (
            [str(recipe), "--out", str(target / "merged"), "--dry-run"],
            [str(recipe), "--out", str(target / "a" / "b")],
        ):
            done = _run(*args)
            assert done.returncode == 2, done.stderr
            line = done.stderr.strip().splitlines()[-1]
            assert line.startswith(f"error: cannot create the output's folder {target}"), line
            assert f"{target} cannot be written" in line and "hint: choose an --out" in line
    finally:
        if mounted:
            subprocess.run(["umount", str(target)])
        target.chmod(0o755)


def test_an_input_that_shrinks_under_the_merge_is_one_line_not_a_bare_bus_error(tmp_path: Path) -> None:
    """Reading a mapped page past the end of a file that shrank raises SIGBUS, which Python cannot catch:
    the command's handler says what happened and exits as the signal would."""
    pytest.importorskip("hubmerge._kernels")
    script = textwrap.dedent(
        f"""
        import mmap, os
        from hubmerge.cli import _catch_sigbus
        _catch_sigbus()
        path = {str(tmp_path / "input.safetensors")!r}
        with open(path, "wb") as f:
            f.write(b"x" * 65536)
        with open(path, "r+b") as f:
            mapped = mmap.mmap(f.fileno(), 65536)
            os.truncate(path, 0)
            mapped[40000]
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 128 + 7, done.stderr  # SIGBUS is 7 on Linux
    assert done.stderr.startswith("error: an input file changed (shrank) while the merge read it (bus error)")
    assert "--resume" in done.stderr and len(done.stderr.splitlines()) == 1


def test_a_full_disk_anywhere_is_one_line_with_what_to_do(
    recipe: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ENOSPC from any write (a card, an index, a library's temporary file) says the disk is full."""
    import errno

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/README.md")

    monkeypatch.setattr("hubmerge.card.render_card", full)  # the card, written after the shards
    assert main([str(recipe), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    out = recipe.parent / "out"
    assert err == [
        f"error: writing the output {out} failed: No space left on device (/data/out/README.md) "
        "(hint: free some space, then rerun with --resume: the merged shards are kept)"
    ]
    monkeypatch.undo()
    assert main([str(recipe), "-q", "--resume"]) == 0 and (out / "README.md").exists()
    # Anywhere else (a library's temporary file, say): one line that says the disk is full.
    monkeypatch.setattr(api, "check_space", full)
    assert main([str(recipe), "-q", "--out", str(recipe.parent / "other")]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: the disk is full writing /data/out/README.md (No space left on device) "
        "(hint: free some space, then rerun with --resume to continue)"
    ]


def test_merge_refuses_arguments_of_the_wrong_kind_before_writing(recipe: Path) -> None:
    for kwargs, said in (
        ({"push": True}, "push is a repository id, a PushTarget or False, got True"),
        ({"out": 123}, "out is a directory path, got 123"),
        ({"progress": 5}, "progress is a function, got 5"),
        ({"on_plan": "print"}, "on_plan is a function, got 'print'"),
    ):
        with pytest.raises(RecipeError, match=said):
            hubmerge.merge(recipe, **kwargs)  # type: ignore[arg-type]
    assert not list(recipe.parent.glob("*out*"))


def test_verbose_among_short_flags_shows_the_traceback(tmp_path: Path) -> None:
    bad = write_recipe(tmp_path / "bad.yaml", "method: centroid\nmodels: [./nothing]\n")
    for args in (["-qv", "plan", str(bad)], ["plan", str(bad), "-vq"]):
        done = _run(*args)
        assert done.returncode == 2 and "Traceback" in done.stderr, args


def test_hub_serve_on_a_busy_port_is_one_line(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _run("hub", "serve", "--root", str(tmp_path / "hub"), "--port", str(port))
    assert done.returncode == 2
    assert done.stderr == (
        f"error: cannot listen on 127.0.0.1:{port}: Address already in use "
        "(hint: pass another --port (0 picks a free one))\n"
    )
    wrong = _run("hub", "serve", "--root", str(tmp_path / "hub"), "--port", "99999")
    assert wrong.returncode == 2 and "99999 is not in the range 0<=x<=65535" in wrong.stderr


def test_a_mistyped_command_is_named_not_read_as_a_recipe(tmp_path: Path) -> None:
    typo = _run("methdos")
    assert typo.returncode == 2
    assert typo.stderr == (
        "error: no command 'methdos', and no recipe file of that name (did you mean `hubmerge methods`?)\n"
    )
    missing = _run("merge.yml")  # a recipe's name, not a command's: the file is missing
    assert (
        missing.returncode == 2
        and missing.stderr == "error: recipe file merge.yml does not exist (hint: check the path)\n"
    )
    helped = _run("help")
    assert helped.returncode == 0 and "`hubmerge RECIPE` is `hubmerge merge RECIPE`" in helped.stdout
    (tmp_path / "plans").write_text("method: centroid\nmodels: [./nothing]\n")  # a recipe of that name: read
    recipe = _run("plans", cwd=tmp_path)
    assert recipe.returncode == 2 and "no output directory" in recipe.stderr  # read as a recipe


def test_a_short_dtype_name_passed_to_the_api_suggests_the_long_one(recipe: Path) -> None:
    with pytest.raises(RecipeError, match="dtype 'fp16' is not one of") as info:
        hubmerge.plan(recipe, dtype="fp16")  # type: ignore[arg-type]
    assert info.value.hint == "dtype='float16'"


def test_force_counts_the_interrupted_runs_shards_as_room(recipe: Path, tmp_path: Path) -> None:
    """--force deletes an interrupted run's partial output before writing: on a tight disk (a 70B merge), its
    blocks are room, as they are for --resume."""
    import shutil

    out = tmp_path / "o"
    partial = tmp_path / ".o.hubmerge-partial"
    partial.mkdir()
    (partial / "model-00001-of-00002.safetensors").write_bytes(os.urandom(32 << 20))  # real blocks
    plan = hubmerge.plan(recipe)
    tight = shutil.disk_usage(tmp_path).free + (16 << 20)  # fits only once the partial is gone
    plan = dataclasses.replace(plan, shards=(dataclasses.replace(plan.shards[0], size=tight),))
    with pytest.raises(OutputError, match="not enough free space"):
        api.check_space(out, plan, resume=False, delete_local=False)
    api.check_space(out, plan, resume=False, force=True, delete_local=False)


def test_a_recipe_on_stdin_with_paths_from_the_working_directory(recipe: Path) -> None:
    text = "method: linear\nmodels: [a, b]\nparameters: {t: 0.25}\n"
    for args in (["plan", "-", "--json"], ["-", "--out", "piped", "-q"]):
        done = subprocess.run(
            [sys.executable, "-m", "hubmerge.cli", *args],
            input=text,
            capture_output=True,
            text=True,
            cwd=recipe.parent,
        )
        assert done.returncode == 0, done.stderr
    for text, said in (("", "the recipe is empty"), ("r.yaml", "a recipe is a YAML mapping, got str")):
        done = subprocess.run(  # stdin's text is the recipe, never a file's name
            [sys.executable, "-m", "hubmerge.cli", "plan", "-"],
            input=text,
            capture_output=True,
            text=True,
            cwd=recipe.parent,
        )
        assert done.returncode == 2 and said in done.stderr, done.stderr
    merged = load_file(recipe.parent / "piped" / "model.safetensors")
    a, b = random_tensors(0), random_tensors(1)
    for name, value in merged.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, 0.75 * a[name] + 0.25 * b[name])
