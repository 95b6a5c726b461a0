"""Every error hubmerge raises on purpose.

Each class inherits the builtin it resembles, so callers may catch either::

    HubmergeError(Exception)
     +-- RecipeError(ValueError)         the recipe is wrong: names the YAML path (``models.1.weight``)
     +-- SourceError(OSError)            a model cannot be read: missing, pickle, not a checkpoint
     |    +-- HeaderError                a safetensors header is corrupt or the file is truncated
     |    +-- HubError                   a Hub source failed: carries ``repo_id`` and ``revision``
     |         +-- RepoNotFoundError     repository missing or private without a valid token
     |         +-- RevisionNotFoundError
     |         +-- EntryNotFoundError    a file is missing in the repository
     |         +-- GatedRepoError        access must be requested on the Hub first
     |         +-- HubConnectionError    connection lost after retries
     +-- PlanError(ValueError)           the models do not fit together: missing tensor, shape, dtype
     +-- OutputError(OSError)            the output directory exists, or lies inside an input
     +-- MergeError(RuntimeError)        a merge failed while running (integer tensors disagree, ...)
     +-- PublishError(OSError)           the push to the Hub failed

Every message says what failed, where, what was expected and what was found; ``hint`` says what to do.
The CLI prints ``error: <message> (hint: <hint>)`` on one line.

``Terminated(KeyboardInterrupt)`` is SIGTERM or SIGHUP inside :func:`stop_signals`: a stop, not an error.
"""

from __future__ import annotations

import functools
import re
import signal
import threading
import types
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, ParamSpec, TypeVar


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``signum``), raised in the main thread where Ctrl-C raises KeyboardInterrupt, so
    that the same cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


_stops: list[int] = []  # stop signals received inside stop_signals(), the first first
_depth = [0]  # stop_signals() blocks open on the main thread: only the outermost sets handlers
_installed: list[int] = []  # the signals it set them for


def _stop(signum: int) -> KeyboardInterrupt:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def _on_stop(signum: int, frame: types.FrameType | None) -> None:
    _stops.append(signum)
    signal.signal(signum, signal.SIG_DFL)  # the same signal again ends the process at once
    if len(_stops) == 1 and not _in_finalizer(frame):  # another kind while the first one's cleanup runs
        raise _stop(
            signum
        )  # lets that cleanup run; in a finalizer it would be lost, with a traceback printed


def _in_finalizer(frame: types.FrameType | None) -> bool:
    """Whether the signal landed in a weakref finalizer (a buffer freed): Python would print its exception as
    ignored and drop it. The stop is raised again where the loop next calls :func:`raise_if_stopped`."""
    while frame is not None:
        if frame.f_code.co_filename == weakref.__file__:
            return True
        frame = frame.f_back
    return False


def raise_if_stopped() -> None:
    """Raise the stop a signal asked for again: where it landed (a finalizer, say) its exception was lost.

    Long loops call this between steps; it costs a list lookup. Outside :func:`stop_signals`, and on any
    thread but the main one (where the stop is raised), nothing.
    """
    if _stops and threading.current_thread() is threading.main_thread():  # only it changes _stops
        raise _stop(_stops[0])


def stop_handled() -> None:
    """The stop asked for is done (a server stopped as asked): :func:`raise_if_stopped` is quiet again, and
    a later signal stops again as the first did (it does not force)."""
    _stops.clear()
    if threading.current_thread() is threading.main_thread():
        for signum in _installed:
            signal.signal(signum, _on_stop)


@contextmanager
def stop_signals() -> Iterator[None]:
    """While inside, Ctrl-C, SIGTERM and SIGHUP stop the main thread (KeyboardInterrupt, :class:`Terminated`).

    By default SIGTERM and SIGHUP (``kill``, ``timeout``, a batch scheduler's time limit, a cancelled CI job,
    a closed terminal) end the process with no cleanup run: Hub scratch files would stay in the temporary
    folder. Here the first stop raises; another kind waits for its cleanup; any kind received a second time
    ends the process at once (a forced stop); and a stop whose exception was lost is raised again by
    :func:`raise_if_stopped`. A signal ignored when this starts (``nohup``, a background job) stays ignored.
    Blocks nest (the outermost holds the handlers); elsewhere than on the main thread this does nothing
    (only it may set handlers).
    """
    if threading.current_thread() is not threading.main_thread() or _depth[0]:  # not here, or nested
        yield
        return
    previous = {}
    for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # SIGHUP is not on Windows
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        handler = signal.getsignal(signum)
        if handler is not signal.SIG_IGN and (name != "SIGINT" or handler is signal.default_int_handler):
            previous[signum] = signal.signal(signum, _on_stop)
    _installed[:] = previous
    _depth[0] = 1
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        _stops.clear()
        _installed.clear()
        _depth[0] = 0


class HubmergeError(Exception):
    """Base class. ``hint`` tells the user what to do next."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


# Set while the `hubmerge` command runs: errors name its flags. A program calling merge() or plan() reads
# the same advice in its own words (resume=True, not --resume).
CLI_WORDS: ContextVar[bool] = ContextVar("hubmerge_cli_words", default=False)

_PYTHON_WORDS = (
    (r"--resume --force", "resume=True, force=True"),
    (r"--resume", "resume=True"),
    (r"--force", "force=True"),
    (r"--out DIR", "`out`"),
    (r"--out", "`out`"),
    (r"--device ([\w:]+)", r'device="\1"'),
    (r"--dtype", "`dtype`"),
    (r"--hub-transfer (\w+)", r'transfer="\1"'),
    (r"--push ([\w.-]+/[\w-]+(?:\.[\w-]+)*|NAME)", r'push="\1"'),
    (r"--push", "`push`"),
    (r"--delete-local", "PushTarget(delete_local=True)"),
    (r"--private", "PushTarget(private=True)"),
    (r"--create-pr", "PushTarget(create_pr=True)"),
    (r"--branch", "PushTarget(branch=...)"),
)


def python_words(text: str) -> str:
    """``text`` with the command's flags named as the Python API's arguments: a flag as a word of its own,
    not inside a path or a name (``runs--force``, ``/data/--out``)."""
    for flag, argument in _PYTHON_WORDS:
        text = re.sub(r"(?<![\w/.~-])" + flag + r"(?![\w/-]|\.\w)", argument, text)
    return text


P = ParamSpec("P")
R = TypeVar("R")


def reworded(
    rewrite: Callable[[HubmergeError, dict[str, Any]], None],
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A decorator: an error from the function is passed to ``rewrite`` (with the call's keyword arguments),
    which may change its words, then raised."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except HubmergeError as exc:
                rewrite(exc, kwargs)
                exc.args = (exc.message, *exc.args[1:])
                raise

        return wrapper

    return decorate


def _in_python_words(exc: HubmergeError, kwargs: dict[str, Any]) -> None:
    if not CLI_WORDS.get():
        exc.message = python_words(exc.message)
        exc.hint = python_words(exc.hint) if exc.hint else exc.hint


# Errors name arguments, not the command's flags, unless the command called the function.
spoken_to_python = reworded(_in_python_words)


class RecipeError(HubmergeError, ValueError):
    """The recipe is invalid. ``path`` is the YAML path of the offending field, e.g. ``models.1.weight``."""

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None) -> None:
        super().__init__(f"recipe field '{path}': {message}" if path else message, hint=hint)
        self.path = path


class SourceError(HubmergeError, OSError):
    """A model source cannot be read. ``location`` is the file, directory or repository."""

    def __init__(self, message: str, *, location: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.location = location


class HeaderError(SourceError):
    """A safetensors file is truncated or its header is corrupt."""


class HubError(SourceError):
    """A Hub request failed. Carries ``repo_id`` and ``revision``."""

    def __init__(
        self,
        message: str,
        *,
        repo_id: str | None = None,
        revision: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, location=repo_id, hint=hint)
        self.repo_id = repo_id
        self.revision = revision


class RepoNotFoundError(HubError):
    """The repository does not exist, or it is private and the token sent (if any) cannot read it."""


class RevisionNotFoundError(HubError):
    """The branch, tag or commit does not exist in the repository."""


class EntryNotFoundError(HubError):
    """A file is missing from the repository at the pinned revision."""


class GatedRepoError(HubError):
    """The repository is gated: access must be requested on the Hub."""


class HubConnectionError(HubError):
    """The Hub could not be reached, after retries."""


class PlanError(HubmergeError, ValueError):
    """The models do not fit together. ``tensor`` names the tensor when one is to blame."""

    def __init__(self, message: str, *, tensor: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.tensor = tensor


class OutputError(HubmergeError, OSError):
    """The output location cannot be used."""

    def __init__(self, message: str, *, path: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.path = path


class MergeError(HubmergeError, RuntimeError):
    """A merge failed while running."""

    def __init__(self, message: str, *, tensor: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.tensor = tensor


class PublishError(HubmergeError, OSError):
    """Publishing to the Hub failed."""

    def __init__(self, message: str, *, repo_id: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.repo_id = repo_id
