"""The ``hubmerge`` command: ``hubmerge RECIPE``, ``plan``, ``methods`` and ``hub serve``.

Errors print one line and exit 2; ``--verbose`` adds the traceback. Ctrl-C, SIGTERM (``kill``, ``timeout``, a
batch scheduler's time limit, a cancelled CI job) and SIGHUP (a closed terminal) stop a run the same way,
with the same cleanup: Hub scratch files deleted, the partial output closed for ``--resume``; one line, exit
128 + the signal's number (130, 143, 129).
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import gc
import json
import logging
import os
import re
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

import click

from . import __version__
from .errors import CLI_WORDS, HubmergeError, Terminated, raise_if_stopped, stop_signals

DTYPES = click.Choice(["float32", "float16", "bfloat16", "float64"])


class Stopped(HubmergeError):
    """A merge stopped by Ctrl-C, SIGTERM or SIGHUP; ``code`` is the exit status, 128 + the signal number."""

    def __init__(self, message: str, *, code: int, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code


def _stopped(exc: BaseException | None, partial: Path | None = None, *, force: bool = False) -> Stopped:
    """What to say when ``exc`` (Ctrl-C, SIGTERM, SIGHUP) stopped a run; ``partial``: a partial output
    (``force``: of a run that replaces an earlier output, which its resume needs to be told again)."""
    if isinstance(exc, Terminated):
        message, code = f"terminated ({exc.name})", 128 + exc.signum
    else:
        message, code = "interrupted", 128 + signal.SIGINT
    hint = None
    if partial is not None and partial.exists():
        flags = "--resume --force" if force else "--resume"
        hint = f"the finished tensors are kept in {partial}: rerun with {flags} to continue"
    return Stopped(message, code=code, hint=hint)


class _DefaultToMerge(click.Group):
    """``hubmerge RECIPE ...`` means ``hubmerge merge RECIPE ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        # `hubmerge -q plan R` as `hubmerge plan -q R`: the flags both commands take, before the command.
        lead = 0
        while lead < len(args) and (
            args[lead] in ("--quiet", "--verbose") or re.fullmatch(r"-[qv]+", args[lead])
        ):
            lead += 1
        if 0 < lead < len(args) and args[lead] in ("plan", "merge"):
            args = [args[lead], *args[:lead], *args[lead + 1 :]]
        if args and args[0] == "help":
            args = ["--help"]
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            close = difflib.get_close_matches(args[0], list(self.commands), n=1, cutoff=0.7)
            word = re.fullmatch(r"[A-Za-z][\w-]*", args[0]) is not None  # not `merge.yml`, `r/plan`
            if close and word and not Path(args[0]).exists():  # `hubmerge methdos`: a mistyped command
                raise click.UsageError(
                    f"no command {args[0]!r}, and no recipe file of that name (did you mean `hubmerge "
                    f"{close[0]}`?)"
                )
            args = ["merge", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToMerge, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hubmerge")
def cli() -> None:
    """Merge fine-tuned models tensor by tensor: `hubmerge RECIPE.yaml` (or .json, or a mergekit config).

    `hubmerge RECIPE` is `hubmerge merge RECIPE` and takes its options (`hubmerge merge --help`): --out,
    --push, --resume, --force, --dry-run, -q (quiet), -v (verbose), and more.
    """


def _setup_logging(verbose: bool, quiet: bool, *, info: bool = True) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if info and not (verbose or quiet):
        logging.getLogger("hubmerge").setLevel(logging.INFO)
    # huggingface_hub prints its warnings through a handler of its own: not a second time through ours.
    logging.getLogger("huggingface_hub").propagate = False


class _LogProgress:
    """Progress for a log rather than a terminal (CI, ``2> file``): a plain line as each tenth of the bytes is
    read, at most one every ``every`` seconds, and none of a bar's carriage returns or cursor moves."""

    def __init__(self, total: int, *, every: float = 5.0, initial: int = 0) -> None:
        self.total, self.every = total, every
        self.done, self.tenths = initial, min(10, 10 * initial // total) if total else 0
        self.initial = initial  # an earlier run's bytes (--resume): not in the rate
        self.start = self.last = time.monotonic()

    def update(self, n: int) -> None:
        from .report import human_bytes

        self.done += n
        if not self.total:  # nothing to read: the summary says what was done
            return
        tenths = min(10, 10 * self.done // self.total)
        now = time.monotonic()
        if tenths > self.tenths and (now - self.last >= self.every or tenths == 10):
            self.tenths, self.last = tenths, now
            rate = (self.done - self.initial) / max(now - self.start, 1e-9) / 1e9
            click.echo(
                f"merging: {100 * self.done // max(self.total, 1)}% ({human_bytes(self.done)} of "
                f"{human_bytes(self.total)}, {rate:.2f} GB/s, {now - self.start:.0f} s)",
                err=True,
            )

    def close(self) -> None:
        pass


def _catch_sigbus() -> None:
    """A bus error (a memory-mapped input that shrank under the merge) reported in one line, where the C
    kernels are built (``_kernels.catch_sigbus``); else the process ends as the kernel ends it."""
    try:
        from . import _kernels  # type: ignore[attr-defined]
    except ImportError:
        return
    catch = getattr(_kernels, "catch_sigbus", None)
    if catch is not None:
        catch()


def _no_hub_bars() -> None:
    """Turn huggingface_hub's upload bars off for this process (with -q, or in a log, where their cursor
    moves are noise): read when huggingface_hub is imported, which would slow a local merge's start here."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _progress_bar(total: int, initial: int = 0) -> Any:
    """A tqdm bar on a terminal; plain lines (:class:`_LogProgress`) in a log. ``initial``: the bytes an
    earlier run merged (``--resume``), shown as done but not counted in the rate."""
    if not sys.stderr.isatty():
        return _LogProgress(total, initial=initial)
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        unit="iB",  # with unit_scale: MiB, GiB and GiB/s, as the plan and the summary give sizes
        unit_scale=True,
        unit_divisor=1024,
        desc="merging",
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
    )


@cli.command("merge")
@click.argument("recipe", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory, from the working directory (overrides the recipe's output.dir).",
)
@click.option("--dtype", type=DTYPES, help="Output dtype (overrides the recipe; default: the first model's).")
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="Where to merge (cuda: the first GPU torch sees).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted merge into the same output.")
@click.option("--force", is_flag=True, help="Replace an existing output directory (never an input).")
@click.option("--dry-run", is_flag=True, help="Plan and check, read no weights, write nothing.")
@click.option("--push", "push_repo", metavar="REPO", help="Publish the merge to this Hub repository.")
@click.option("--private", is_flag=True, default=None, help="Create the Hub repository as private.")
@click.option("--branch", help="Commit to this branch of the Hub repository (created if missing).")
@click.option("--create-pr", is_flag=True, default=None, help="Open a pull request instead of committing.")
@click.option("--delete-local", is_flag=True, default=None, help="Delete each shard once uploaded.")
@click.option(
    "--hub-transfer",
    type=click.Choice(["ranges", "shards"]),
    default="ranges",
    show_default=True,
    help="Read Hub sources by ranged requests per tensor, or one downloaded shard per model at a time.",
)
@click.option("--verbose", "-v", is_flag=True, help="Debug logging; tracebacks on errors.")
@click.option("--quiet", "-q", is_flag=True, help="No plan, progress or summary: warnings and errors only.")
def merge_command(
    recipe: Path,
    out: Path | None,
    dtype: Any,
    device: str,
    resume: bool,
    force: bool,
    dry_run: bool,
    push_repo: str | None,
    private: bool | None,
    branch: str | None,
    create_pr: bool | None,
    delete_local: bool | None,
    hub_transfer: Any,
    verbose: bool,
    quiet: bool,
) -> None:
    """Merge the models of RECIPE (a file, or - for its text on stdin)."""
    from .api import check_device, check_space, check_target, merge, plan
    from .publish import PushTarget
    from .recipe import load_recipe
    from .report import human_bytes, plan_summary
    from .sources import buffers

    _setup_logging(verbose, quiet)
    if buffers.OWN_PROCESS:  # the command's own process (cli.run): a bus error is the merge's to report
        _catch_sigbus()
    loaded = load_recipe(_recipe_source(recipe))
    wanted: dict[str, Any] = loaded.push.model_dump() if loaded.push is not None else {}
    overrides = {
        "repo": push_repo,
        "private": private,
        "branch": branch,
        "create_pr": create_pr,
        "delete_local": delete_local,
    }
    wanted |= {k: v for k, v in overrides.items() if v is not None}
    target = PushTarget(repo_id=wanted.pop("repo"), **wanted) if "repo" in wanted else None
    if target is None and any(v is not None for k, v in overrides.items() if k != "repo"):
        raise HubmergeError(
            "--private, --branch, --create-pr and --delete-local need a push target",
            hint="add --push REPO or a `push:` section to the recipe",
        )
    if dry_run:  # the checks the merge makes before reading, but those that ask the Hub to push
        target_dir = check_target(loaded, out, force=force, resume=resume)
        check_device(device)
        planned = plan(loaded, dtype=dtype)
        check_space(
            target_dir,
            planned,
            resume=resume,
            force=force,
            delete_local=bool(target and target.delete_local),
        )
        if not quiet:  # -q: the exit status says whether the merge would start
            click.echo(plan_summary(planned))
            click.echo("dry run: nothing read, nothing written")
        return
    bar: Any = None
    total = 0

    def on_plan(p: Any) -> None:
        nonlocal bar, total
        if not quiet:
            click.echo(plan_summary(p), err=True)
            total = p.bytes_read
            if not resume:
                bar = _progress_bar(total)

    def advance(n: int) -> None:
        nonlocal bar
        if bar is None:  # a resume: its first call holds the bytes an earlier run merged (run.execute)
            bar = _progress_bar(total, initial=n)
        else:
            bar.update(n)

    # On a terminal, log lines go above the bar instead of onto it.
    redirect: Any = contextlib.nullcontext()
    if not quiet and sys.stderr.isatty():
        from tqdm.contrib.logging import logging_redirect_tqdm

        redirect = logging_redirect_tqdm()
    try:
        with redirect:
            result = merge(
                loaded,
                out,
                dtype=dtype,
                device=device,
                resume=resume,
                force=force,
                progress=advance if not quiet else None,
                on_plan=on_plan,
                push=target,
                transfer=hub_transfer,
            )
    except KeyboardInterrupt as exc:
        from .api import output_dir
        from .writer import partial_dir

        try:
            partial: Path | None = partial_dir(output_dir(loaded, out))
        except HubmergeError:
            partial = None
        raise _stopped(exc, partial, force=force) from None
    finally:
        if bar is not None:
            bar.close()
    if not quiet:
        resumed = f", {result.resumed_tensors} tensors resumed" if result.resumed_tensors else ""
        gone = sum(not (result.out / name).exists() for name in result.files)  # --delete-local
        deleted = f" ({gone} shard{'s' * (gone != 1)} deleted once uploaded)" if gone else ""
        click.echo(
            f"merged {len(result.plan.jobs)} tensors: read {human_bytes(result.bytes_read)} in "
            f"{result.seconds:.2f} s ({result.gb_per_s:.2f} GB/s){resumed}\n"
            f"wrote {len(result.files)} files to {result.out}{deleted}"
        )
    if result.commit_url:
        click.echo(f"pushed to {result.commit_url}")
        pull = re.search(r"/discussions/(\d+)$", result.commit_url)
        if pull:  # the card's snippets load the branch, which holds the merge once the pull request is merged
            click.echo(f'until it is merged, load the merge with revision="refs/pr/{pull.group(1)}"')


@cli.command("plan")
@click.argument("recipe", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--dtype", type=DTYPES, help="Output dtype (overrides the recipe; default: the first model's).")
@click.option("--verbose", "-v", is_flag=True, help="Debug logging; tracebacks on errors.")
@click.option("--quiet", "-q", is_flag=True, help="Accepted as the merge takes it (plan prints no progress).")
def plan_command(recipe: Path, as_json: bool, dtype: Any, verbose: bool, quiet: bool) -> None:
    """Check RECIPE (a file, or - for its text on stdin) and show the output layout, reading headers only."""
    from .api import plan
    from .report import plan_table

    _setup_logging(verbose, quiet, info=False)
    merge_plan = plan(_recipe_source(recipe), dtype=dtype)
    click.echo(json.dumps(merge_plan.to_json(), indent=2) if as_json else plan_table(merge_plan))


@cli.command("methods")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def methods_command(as_json: bool) -> None:
    """List merge methods and their parameters."""
    from .methods import METHODS
    from .params import SEED_DOC
    from .report import methods_table

    if as_json:
        doc = {
            name: {
                "summary": s.summary,
                "paper": s.paper,
                "min_models": s.min_models,
                "max_models": s.max_models,
                "needs_base": s.needs_base,
                "parameters": {
                    p.name: {
                        "type": p.type.__name__,
                        "default": p.default,
                        "per_model": p.per_model,
                        "doc": p.doc,
                    }
                    for p in s.params
                }
                | (  # the engine's, for the random methods (report.methods_table lists it too)
                    {"seed": {"type": "int", "default": 0, "per_model": False, "doc": SEED_DOC}}
                    if s.random
                    else {}
                ),
            }
            for name, s in METHODS.items()
        }
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(methods_table(), nl=False)


@cli.group("hub")
def hub_group() -> None:
    """A local Hub-compatible server."""


@hub_group.command("serve")
@click.option(
    "--root", type=click.Path(file_okay=False, path_type=Path), required=True, help="Storage directory."
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port (0: any free one)."
)
@click.option(
    "--token", "tokens", multiple=True, metavar="TOKEN=USER", help="Accept TOKEN as USER (repeatable)."
)
@click.option(
    "--org",
    "orgs",
    multiple=True,
    metavar="ORG=USER",
    help="USER is a member of organisation ORG (repeatable).",
)
@click.option(
    "--cdn-ttl",
    type=click.IntRange(min=0),
    default=0,
    metavar="SECONDS",
    help="Redirect LFS files to signed URLs valid SECONDS, as huggingface.co does (0: serve them).",
)
def hub_serve(
    root: Path, host: str, port: int, tokens: tuple[str, ...], orgs: tuple[str, ...], cdn_ttl: int
) -> None:
    """Serve model repositories from ROOT over the Hub's HTTP API."""
    from .hubserver import serve_forever

    users: dict[str, str] = {}
    members: dict[str, list[str]] = {}
    for option, items in (("--token", tokens), ("--org", orgs)):
        for item in items:
            key, sep, user = item.partition("=")
            if not sep or not key or not user:
                example = "mysecret=alice" if option == "--token" else "my-org=alice"
                raise HubmergeError(
                    f"{option} {item!r} is not {option[2:].upper()}=USER", hint=f"write {option} {example}"
                )
            if option == "--token":
                users[key] = user
            else:
                members.setdefault(key, []).append(user)
    try:
        serve_forever(
            root,
            host,
            port,
            users,
            members,
            on_ready=lambda url: click.echo(f"serving {root} at {url}"),
            cdn_ttl=cdn_ttl,
        )
    except OSError as exc:
        if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES):
            raise
        raise HubmergeError(
            f"cannot listen on {host}:{port}: {exc.strerror}",
            hint="pass another --port (0 picks a free one)"
            if exc.errno != errno.EADDRNOTAVAIL
            else "pass an address of this machine as --host",
        ) from None


def _recipe_source(recipe: Path) -> Path | str:
    """RECIPE as load_recipe takes it: ``-`` is the recipe's text on stdin (paths in it start at the working
    directory), anything else a file."""
    from .recipe import RecipeText

    return RecipeText(sys.stdin.read()) if str(recipe) == "-" else recipe


def _one_line(text: str) -> str:
    """A message whose parts came on several lines (a library's error, say), joined on one."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI, turn errors into one line and an exit code."""
    args = sys.argv[1:] if argv is None else argv
    # -v alone or among other short flags (-qv): click parses them after an error may already have come
    verbose = "--verbose" in args or any(re.fullmatch(r"-[a-z]*v[a-z]*", a) for a in args)
    spoken = CLI_WORDS.set(True)  # errors name this command's flags
    try:
        with stop_signals():
            cli.main(args=args, prog_name="hubmerge", standalone_mode=False)
            raise_if_stopped()  # a stop lost after the last check still ends with its status
    except Stopped as exc:
        click.echo(exc.message + (f" (hint: {exc.hint})" if exc.hint else ""), err=True)
        return exc.code
    except HubmergeError as exc:
        if verbose:
            traceback.print_exc()
        hint = f" (hint: {_one_line(exc.hint)})" if exc.hint else ""
        click.echo(f"error: {_one_line(exc.message)}{hint}", err=True)
        return 2
    except click.exceptions.Abort as exc:  # click's word for a KeyboardInterrupt outside a merge
        stop = _stopped(exc.__cause__ or exc.__context__)
        click.echo(stop.message, err=True)
        return stop.code
    except click.ClickException as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # a bare `hubmerge`: the help, not an error line
            click.echo(exc.format_message(), err=True)
        else:
            click.echo(f"error: {exc.format_message()}", err=True)
        return 2
    except KeyboardInterrupt as exc:
        stop = _stopped(exc)
        click.echo(stop.message, err=True)
        return stop.code
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _unexpected(exc, verbose)
        if verbose:
            traceback.print_exc()
        where = f" writing {exc.filename}" if exc.filename else ""
        click.echo(
            f"error: the disk is full{where} ({exc.strerror}) (hint: free some space, then rerun with "
            "--resume to continue)",
            err=True,
        )
        return 2
    except Exception as exc:  # anything unexpected still gets one line, unless --verbose
        return _unexpected(exc, verbose)
    finally:
        CLI_WORDS.reset(spoken)
    return 0


def _unexpected(exc: BaseException, verbose: bool) -> int:
    if verbose:
        traceback.print_exc()
    click.echo(
        f"error: {type(exc).__name__}: {_one_line(str(exc))} (rerun with --verbose for the traceback)",
        err=True,
    )
    return 1


def run() -> NoReturn:
    """The ``hubmerge`` command: :func:`main`, then exit.

    Interpreter shutdown runs garbage collections over every object still alive, and torch alone brings
    about 150k: half a second after every merge. Freezing them first skips that work; the process is ending,
    so there is no garbage worth finding. (Not done in :func:`main`, which tests and other programs call.)
    With -q, or with stderr not a terminal, huggingface_hub's upload bars are turned off for the process.
    """
    if not sys.stderr.isatty() or {"-q", "--quiet"} & set(sys.argv[1:]):
        _no_hub_bars()
    from .sources import buffers

    buffers.OWN_PROCESS = True  # the process is the command's: a merge may tune malloc and the collector
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
