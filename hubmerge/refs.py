"""Model references: ``./path``, ``org/name``, ``org/name@rev``, ``hf://org/name@rev`` -> :class:`ModelRef`.

A reference that names an existing file or directory (relative to the recipe's directory) is local; one that
starts with ``./``, ``../``, ``/`` or ``~`` is always local; otherwise it must look like a Hub repository id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import RecipeError

# The Hub's own rule for repository ids: an optional namespace, then a name of letters, digits, "-", "_", ".".
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from: a local path, or a Hub repository at a revision (None = default branch)."""

    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    # A Hub id that could have been a local path, for errors to name when the Hub does not have the
    # repository: a shorthand's (``ckpt/tweets``), which does not exist, or the folder a ``repo:`` key's id
    # also names, which does (``path:`` reads it). Not part of what the model is.
    local: Path | None = field(default=None, compare=False)

    @property
    def is_hub(self) -> bool:
        return self.repo_id is not None

    def __str__(self) -> str:
        if self.repo_id is not None:
            return f"{self.repo_id}@{self.revision}" if self.revision else self.repo_id
        return str(self.path)

    def shown(self) -> str:
        """As written into what a merge stores and may publish: a local path under the home directory as
        ``~/...`` (:func:`home_relative`); what the model *is* (fingerprints, resume) stays ``str(ref)``."""
        return home_relative(self.path) if self.path is not None else str(self)


def home_relative(path: Path) -> str:
    """``path`` as text, ``~/...`` where it lies in the home directory.

    How local paths are written into what a merge stores and may publish (the pinned ``recipe.yaml``, the
    card, ``hubmerge.json``): the same text reads the same files on this machine, without the user's name.
    """
    try:
        home = Path.home()
    except RuntimeError:  # no home directory (some service accounts)
        return str(path)
    for prefix in dict.fromkeys((home, home.resolve())):  # paths are resolved; $HOME may be a symlink
        if prefix == Path(prefix.anchor):  # a home of "/" would turn every path into ~/...
            continue
        try:
            rest = path.relative_to(prefix)
        except ValueError:
            continue
        return "~" if rest == Path() else f"~/{rest.as_posix()}"
    return str(path)


def is_repo_id(text: str) -> bool:
    """Whether ``text`` is a valid Hub repository id, ``name`` or ``namespace/name`` (no revision)."""
    return bool(_REPO_ID.match(text)) and ".." not in text and "--" not in text


def parse_ref(text: str, *, base_dir: Path, field: str, revision: str | None = None) -> ModelRef:
    """Turn the text of a recipe's model reference into a :class:`ModelRef`.

    Args:
        text: the reference as written in the recipe.
        base_dir: directory that relative local paths are resolved against (the recipe's directory).
        field: YAML path of the field, for error messages.
        revision: a revision given separately (the long form's ``revision:`` key).

    Returns:
        The parsed reference.

    Raises:
        RecipeError: the text is neither an existing path nor a valid Hub repository id.
    """
    text = text.strip()
    if not text:
        raise RecipeError(
            "empty model reference", path=field, hint="give a local path or a Hub repository id"
        )
    if text.startswith("hf://"):
        return _hub(text[len("hf://") :], field=field, revision=revision)
    local = Path(text).expanduser()
    local = local if local.is_absolute() else base_dir / local
    if _looks_local(text) or local.exists():
        if revision is not None:
            raise RecipeError(
                f"a revision ({revision!r}) was given for the local path {text!r}",
                path=field,
                hint="revisions apply to Hub repositories only; remove `revision`",
            )
        return ModelRef(path=local.resolve())
    if not is_repo_id(text.partition("@")[0]):  # no Hub id either: say where the path was looked for
        raise RecipeError(
            f"{text!r} is neither an existing local path (there is no {local}) nor a Hub repository id",
            path=field,
            hint=f"relative paths start at {base_dir} (a recipe file's folder, else the working directory); "
            "check the path, or use org/name[@revision] for the Hub",
        )
    return replace(_hub(text, field=field, revision=revision), local=local)


def _looks_local(text: str) -> bool:
    """Whether ``text`` is written as a path, never a repository id: ``./x``, ``../x``, ``/x``, ``~/x``."""
    return text.startswith(("./", "../", "/", "~", ".\\")) or text in (".", "..")


def hub_ref(text: str, *, field: str, revision: str | None = None, base_dir: Path | None = None) -> ModelRef:
    """Parse the value of a recipe's ``repo:`` key, ``org/name`` or ``org/name@rev``, into a Hub
    :class:`ModelRef`.

    ``repo:`` names a Hub repository even where a local folder has that name (telling the two apart is what
    it is for); that folder, given ``base_dir``, is kept for the error to name if the Hub lacks the
    repository.

    Args:
        text: the value as written in the recipe.
        field: YAML path of the key, for error messages.
        revision: a revision given separately (the ``revision:`` key).
        base_dir: the recipe's directory, where relative local paths start.

    Raises:
        RecipeError: a local path (``repo:`` takes repository ids only), not a valid repository id, or two
            revisions given.
    """
    text = text.strip()
    repo_id = text.partition("@")[0]
    local = Path(repo_id).expanduser()
    if base_dir is not None and not local.is_absolute():
        local = base_dir / local
    exists = base_dir is not None and bool(repo_id) and local.exists()
    if _looks_local(text) or (exists and not is_repo_id(repo_id)):
        raise RecipeError(
            f"`repo:` takes a Hub repository id, and {text!r} is a local path",
            path=field,
            hint=f"for a local folder or file write `path: {text}` instead of `repo:`",
        )
    if not is_repo_id(repo_id):
        raise RecipeError(
            f"`repo:` takes a Hub repository id (name or namespace/name[@revision]), and {text!r} is not one",
            path=field,
            hint="check the id; for a local folder or file write `path:` instead of `repo:`",
        )
    ref = _hub(text, field=field, revision=revision)
    return replace(ref, local=local) if exists else ref


def _hub(text: str, *, field: str, revision: str | None = None) -> ModelRef:
    """Parse ``org/name`` or ``org/name@rev`` (a shorthand reference, or what follows ``hf://``).

    Raises:
        RecipeError: not a valid repository id, or two revisions given.
    """
    repo_id, sep, rev = text.partition("@")
    if sep and revision is not None and rev != revision:
        raise RecipeError(
            f"{text!r} names revision {rev!r} but `revision` says {revision!r}",
            path=field,
            hint="give the revision once",
        )
    if sep and not rev:
        raise RecipeError(
            f"{text!r} ends with '@' but names no revision", path=field, hint="write org/name@rev"
        )
    if not is_repo_id(repo_id):
        raise RecipeError(
            f"{text!r} is neither an existing local path nor a Hub repository id",
            path=field,
            hint="check the path (write ./dir for a local directory) or use org/name[@revision]",
        )
    return ModelRef(repo_id=repo_id, revision=rev if sep else revision)
