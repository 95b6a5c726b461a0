"""What to say about a rule's glob that matches no tensor: the glob meant, and what the tensors are named.

A rule's glob is matched with :func:`fnmatch.fnmatchcase`: ``*`` and ``?`` are wildcards, ``[...]`` a set of
characters. The plan refuses a glob that matches nothing, before the models are read, so its tensor names
cannot be seen in ``hubmerge plan --json``: the hint shows a few of them.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Sequence

_WILDCARDS = re.compile(r"[*?\[]")
_SHOWN = 3  # tensor names listed in a hint


def unmatched_glob_hint(glob: str, names: Sequence[str]) -> str:
    """A hint for ``glob``, which matches none of ``names`` (the models' tensors, in file order).

    Returns:
        The glob it may have meant, with its wildcards kept (``model.layer.*.mlp.*`` ->
        ``model.layers.*.mlp.*``, not one layer's), or how to write brackets that are part of a name; then a
        few tensor names like it.
    """
    shown = ", ".join(repr(n) for n in _like(glob, names))
    names_said = f"the models' tensors are named like {shown} ({len(names)} in all)"
    escaped = glob.replace("[", "[[]")
    if "[" in glob and any(fnmatch.fnmatchcase(n, escaped) for n in names):
        either = re.sub(r"[][]", "?", glob)
        return (
            f"`[...]` in a glob matches one of the characters inside: to match the brackets of a name, write "
            f"{escaped!r} (a `[` as `[[]`) or {either!r}"
        )
    missing = _missing_number(glob, names)
    if missing:  # a layer past the last: no other layer's glob is what was meant
        return f"{missing}; fix the glob, or remove the rule"
    meant = _meant(glob, names)
    return (f"did you mean {meant!r}? " if meant else "") + names_said + "; fix the glob, or remove the rule"


def _missing_number(glob: str, names: Sequence[str]) -> str | None:
    """Where ``glob`` names a number (a layer) past the last one the models have where another number would
    match: the last (``model.layers.12.*`` in a 12-layer model: ``model.layers.11``)."""
    parts = glob.split(".")
    for i, part in enumerate(parts):
        if not part.isdigit():
            continue
        wild = ".".join([*parts[:i], "*", *parts[i + 1 :]])
        numbers = sorted(
            {
                int(name.split(".")[i])
                for name in names
                if fnmatch.fnmatchcase(name, wild) and name.count(".") >= i and name.split(".")[i].isdigit()
            }
        )
        where = ".".join(parts[:i])
        if where and numbers and int(part) > numbers[-1]:  # past the last: within, a gap may be the model's
            return f"the models have no {where}.{part}: the last is {where}.{numbers[-1]}"
    return None


def _meant(glob: str, names: Sequence[str]) -> str | None:
    """The glob closest to ``glob`` that matches a tensor: its misspelt dotted parts corrected, else the
    closest name or dotted prefix (with numbered parts as ``*`` where ``glob`` has wildcards)."""
    words = {part for name in names for part in name.split(".")}
    parts = []
    for part in glob.split("."):
        known = part in words or _WILDCARDS.search(part)
        close = [part] if known else difflib.get_close_matches(part, words, 1)
        parts.append(close[0] if close else part)
    fixed = ".".join(parts)
    if fixed != glob and any(fnmatch.fnmatchcase(n, fixed) for n in names):
        return fixed
    general = bool(_WILDCARDS.search(glob))
    close = difflib.get_close_matches(glob, _candidates(names, general=general), 1, 0.75)
    return close[0] if close else None


def _candidates(names: Sequence[str], *, general: bool) -> list[str]:
    """Names and their dotted prefixes as globs (``head.*``, ``layers.0.*``); with ``general``, each numbered
    part (a layer's) as ``*``: a glob with wildcards means a set of tensors, and is offered one."""
    found = set()
    for name in names:
        parts = name.split(".")
        if general:
            parts = ["*" if p.isdigit() else p for p in parts]
        found.add(".".join(parts))
        found.update(".".join(parts[:k]) + ".*" for k in range(1, len(parts)))
    return sorted(found)


def _like(glob: str, names: Sequence[str]) -> list[str]:
    """A few of ``names``, those closest to ``glob`` first."""
    return difflib.get_close_matches(glob, names, _SHOWN, 0.0) or list(names[:_SHOWN])
