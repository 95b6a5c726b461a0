"""The recipe: what to merge, how, and where the result goes. Validated once, at load time.

``load_recipe`` accepts a path to YAML, a YAML string or a dict; a mergekit config (``merge_method:``) is
translated first. Errors name the YAML path of the field (``models.1.weight``), what was wrong, and the fix.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializerFunctionWrapHandler,
    StrictFloat,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from .errors import RecipeError
from .refs import ModelRef, home_relative, is_repo_id, parse_ref

Dtype = Literal["float32", "float16", "bfloat16", "float64"]
Scalar = bool | int | float | str  # checked against the method's parameter types in params.py
ParamValue = Scalar | list[Scalar]

# A number (YAML 1.1 reads 1e9 as text: it is meant as a number of bytes), then an optional unit.
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?(?:e[+-]?\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | float | str) -> int:
    """``"5GB"`` -> 5_000_000_000, ``"2GiB"`` -> 2**31, ``"1e9"`` -> 10**9, numbers of bytes pass through.

    Raises:
        ValueError: not a size, or not a positive one.
    """
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"{value!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
        size, amount = int(value), float(value)
    else:
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"{value!r} is not a size; write e.g. 5GB, 500MB or 2GiB")
        amount = float(match.group(1))
        size = int(amount * _UNITS[(match.group(2) or "B").upper()])
    if size <= 0:
        raise ValueError(
            f"a shard holds at least 1 byte, got {value!r}"
            if amount > 0
            else f"size must be positive, got {value!r}"
        )
    return size


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    """One model: the shorthand string becomes ``ref``; the long form gives ``repo`` or ``path``."""

    ref: str | None = None
    repo: str | None = None
    path: str | None = None
    revision: str | None = None
    weight: float | None = None
    density: float | None = None
    parameters: dict[str, Scalar] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"ref": data}
        if isinstance(data, os.PathLike):  # a Path in a program: a local model, never a Hub id
            return {"path": os.fspath(data)}
        if isinstance(data, dict) and isinstance(data.get("path"), os.PathLike):
            return data | {"path": os.fspath(data["path"])}
        if not isinstance(data, dict | ModelEntry):
            raise RecipeError(
                f"a model is a path, a Hub id, or a mapping with `path:` or `repo:`, got {data!r}",
                hint="write e.g. `./my-model`, `org/name@v1` or `{path: ./my-model, weight: 2}`",
            )
        return data

    @field_validator("weight", "density", mode="before")
    @classmethod
    def _number(cls, value: Any, info: ValidationInfo) -> Any:
        if isinstance(value, bool):  # pydantic reads true as 1.0: `parameters:` refuses it, so here too
            example = 1.0 if info.field_name == "weight" else 0.5
            hint = f"give a number, such as {example}"
            raise RecipeError(f"'{info.field_name}' is a number, got {value!r}", hint=hint)
        return value

    @model_validator(mode="after")
    def _one_location(self) -> ModelEntry:
        given = [k for k in ("ref", "repo", "path") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of `repo:` (a Hub id) or `path:` (a local directory or file)")
        return self

    @model_serializer(mode="wrap")
    def _as_shorthand(self, handler: SerializerFunctionWrapHandler) -> Any:
        data = handler(self)
        if isinstance(data, dict) and set(data) == {"ref"}:
            return data["ref"]
        return data

    def per_model_params(self) -> dict[str, Scalar]:
        """Per-model parameters, from the shortcut keys and from ``parameters:``."""
        params = dict(self.parameters)
        for key in ("weight", "density"):
            if getattr(self, key) is not None:
                params[key] = getattr(self, key)
        return params


class Rule(_Strict):
    """Per-tensor rule; the first rule whose glob matches a tensor name wins."""

    tensors: str | list[str]
    take: StrictInt | Literal["base"] | None = None
    skip: bool = False
    parameters: dict[str, ParamValue] = Field(default_factory=dict)

    @field_validator("tensors", mode="before")
    @classmethod
    def _globs(cls, value: Any) -> Any:
        example = "write e.g. `tensors: 'model.layers.*.mlp.*'` or `tensors: ['lm_head.*', 'model.norm.*']`"
        globs = value if isinstance(value, list | tuple) else [value]
        if not all(isinstance(g, str) for g in globs):
            raise RecipeError(f"expected a glob or a list of globs, got {value!r}", hint=example)
        if not globs:
            raise RecipeError("an empty list of globs names no tensor", hint=example + ", or remove the rule")
        if not all(g.strip() for g in globs):
            raise RecipeError(f"an empty glob names no tensor, got {value!r}", hint=example)
        return value

    @model_validator(mode="after")
    def _one_action(self) -> Rule:
        actions = (self.take is not None) + self.skip + bool(self.parameters)
        if actions != 1:
            raise ValueError("a rule needs exactly one of `take: N`, `skip: true` or `parameters: {...}`")
        return self

    @property
    def globs(self) -> list[str]:
        return [self.tensors] if isinstance(self.tensors, str) else list(self.tensors)


class Output(_Strict):
    dir: str | None = None
    max_shard_size: StrictInt | StrictFloat | str = "5GB"

    @field_validator("dir", mode="before")
    @classmethod
    def _dir(cls, value: Any) -> Any:
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: int | float | str) -> int | float | str:
        try:
            parse_size(value)
        except ValueError as exc:
            hint = "give a number of bytes, or a size such as 5GB, 500MB or 2GiB"
            raise RecipeError(str(exc), hint=hint) from None
        return value


class Push(_Strict):
    repo: str
    private: bool = False
    branch: str | None = None
    create_pr: bool = False
    delete_local: bool = False
    commit_message: str | None = None

    @field_validator("repo")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        if not is_repo_id(value):
            raise ValueError(f"{value!r} is not a Hub repository id: write namespace/name (no revision)")
        return value


class Card(_Strict):
    license: str | None = None
    description: str | None = None
    tags: list[str] = Field(default_factory=list)
    language: str | list[str] | None = None


class Recipe(_Strict):
    """A validated v1 recipe. Build one in code with ``Recipe(method=..., models=[...])``."""

    version: Literal[1] = 1
    method: str
    base: ModelEntry | None = None
    models: list[ModelEntry] = Field(min_length=1)
    parameters: dict[str, ParamValue] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    dtype: Dtype | None = None
    compute_dtype: Literal["float32", "float64"] = "float32"
    output: Output = Field(default_factory=Output)
    push: Push | None = None
    card: Card = Field(default_factory=Card)
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    def __init__(self, /, **fields: Any) -> None:
        """The fields of a recipe file; ``models`` as paths, Hub ids or dicts (``{"path": p, "weight": 2}``).

        Raises:
            RecipeError: naming the field, as :func:`load_recipe` does (not pydantic's ValidationError).
        """
        try:
            super().__init__(**fields)
        except ValidationError as exc:
            raise _recipe_error(exc) from None

    @property
    def base_dir(self) -> Path:
        """Directory that relative paths in the recipe start from (the recipe file's directory)."""
        return self._base_dir

    def model_refs(self) -> list[ModelRef]:
        """The models' references, resolved against :attr:`base_dir`."""
        return [_ref(entry, self._base_dir, f"models.{i}") for i, entry in enumerate(self.models)]

    def base_ref(self) -> ModelRef | None:
        """The base model's reference, if any."""
        return None if self.base is None else _ref(self.base, self._base_dir, "base")

    def canonical_json(self) -> str:
        """The recipe as canonical JSON (sorted keys): what ``recipe_sha256`` hashes."""
        return json.dumps(self.model_dump(mode="json", exclude_defaults=True), sort_keys=True)

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json().encode()).hexdigest()

    def _with_entries(
        self, change: Callable[[ModelEntry, ModelRef | None, int], ModelEntry], **update: Any
    ) -> Recipe:
        """A copy whose model entries (then the base's) are ``change(entry, its reference, its index)``."""
        entries = [*self.models, *([self.base] if self.base is not None else [])]
        refs = [*self.model_refs(), *([self.base_ref()] if self.base is not None else [])]
        changed = [change(e, r, i) for i, (e, r) in enumerate(zip(entries, refs, strict=True))]
        n = len(self.models)
        update["models"] = changed[:n]
        if self.base is not None:
            update["base"] = changed[n]
        return self.model_copy(update=update)

    def pinned(self, commits: list[str | None]) -> Recipe:
        """This recipe with each Hub model (then the base) at the commit it resolved to, local paths absolute
        (``~/...`` in the home directory).

        ``commits`` holds one entry per model, then one for the base if there is one: a commit SHA, or None
        for a local model. What ``recipe_sha256`` hashes and the output's ``recipe.yaml`` holds: rerun from
        anywhere, it reads the same models, the same bytes from the Hub even after a branch moved. The push
        target and the output directory are left out: they change where the merge goes, not its bytes.
        """

        def pin(entry: ModelEntry, ref: ModelRef | None, i: int) -> ModelEntry:
            commit = commits[i]
            if ref is not None and ref.path is not None:  # absolute: the stored recipe is read elsewhere
                return entry.model_copy(
                    update={"ref" if entry.ref is not None else "path": home_relative(ref.path)}
                )
            if ref is None or ref.repo_id is None or commit is None:
                return entry
            if entry.ref is not None:
                return entry.model_copy(update={"ref": f"{ref.repo_id}@{commit}", "revision": None})
            return entry.model_copy(update={"revision": commit})

        if len(commits) != len(self.models) + (self.base is not None):
            raise ValueError(f"{len(commits)} commits for {len(self.models)} models and the base")
        # Where the output went is no part of what it is: a reader rerunning the stored recipe must not
        # push to (or be refused by) the author's repository, and writes where --out says.
        return self._with_entries(pin, push=None, output=self.output.model_copy(update={"dir": None}))

    def portable_sha256(self) -> str:
        """The SHA-256 of this recipe with each local model's path left out (``<local>``).

        What the shards' ``recipe_sha256`` records, for a pinned recipe: the same recipe and inputs give the
        same bytes from whatever folder they are run, the stored (absolute) recipe included.
        """

        def anonymous(entry: ModelEntry, ref: ModelRef | None, i: int) -> ModelEntry:
            if ref is None or ref.path is None:
                return entry
            return entry.model_copy(update={"ref" if entry.ref is not None else "path": "<local>"})

        return self._with_entries(anonymous).sha256()

    def to_yaml(self) -> str:
        """The recipe as YAML, defaults left out."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude_defaults=True), sort_keys=False)


def _ref(entry: ModelEntry, base_dir: Path, field: str) -> ModelRef:
    if entry.repo is not None:
        from .refs import hub_ref

        return hub_ref(entry.repo, field=f"{field}.repo", revision=entry.revision, base_dir=base_dir)
    if entry.path is not None:
        if not entry.path.strip():
            raise RecipeError("empty path", path=f"{field}.path", hint="give the model's folder or file")
        path = Path(entry.path).expanduser()
        return parse_ref(
            str(path if path.is_absolute() else base_dir / path),
            base_dir=base_dir,
            field=field,
            revision=entry.revision,  # refused there: a local path has no revisions
        )
    assert entry.ref is not None  # guaranteed by ModelEntry._one_location
    return parse_ref(entry.ref, base_dir=base_dir, field=field, revision=entry.revision)


def load_recipe(
    source: str | Path | dict[str, Any] | Recipe, *, base_dir: str | Path | None = None
) -> Recipe:
    """Load and validate a recipe.

    Args:
        source: a path to a YAML file, a YAML string, a dict, or a Recipe (returned as is).
        base_dir: directory for relative paths; default: the file's directory, else the working directory.

    Returns:
        The validated recipe, its model references checked and the method's parameters checked.

    Raises:
        RecipeError: naming the YAML path, what was wrong and how to fix it.
    """
    if base_dir is not None:
        base_dir = Path(base_dir)
    if isinstance(source, Recipe):  # built in code: pydantic checked the fields, not the method's rules
        _check(source)
        return source
    if isinstance(source, dict):
        doc: Any = source
    elif isinstance(source, (str, Path)):
        doc, base_dir = _read_yaml(source, base_dir)
    else:
        raise RecipeError(
            f"a recipe is a path, YAML text, a dict or a Recipe, got {type(source).__name__}",
            hint="pass the recipe file's path",
        )
    if doc is None:
        raise RecipeError("the recipe is empty", hint="see recipes/ for examples")
    if not isinstance(doc, dict):
        raise RecipeError(
            f"a recipe is a YAML mapping, got {type(doc).__name__}", hint="see recipes/ for examples"
        )
    for key in doc:
        if not isinstance(key, str):  # YAML reads `on:`, `yes:` and `1:` as a bool or a number
            raise RecipeError(
                f"unknown key {key!r} (not text)", path=str(key), hint="recipe keys are names like `models`"
            )
    # `x-common: &m {...}` holds a YAML anchor for the keys below it (as in docker compose): not the recipe's.
    doc = {k: v for k, v in doc.items() if not k.startswith("x-")}
    if "merge_method" in doc:
        from .mergekit import translate_mergekit

        doc = translate_mergekit(doc)
    elif "method" not in doc and any(
        isinstance(m, dict) and "model" in m for m in _listed(doc.get("models"))
    ):
        near = [str(k) for k in doc if str(k).startswith("merge")]  # not `methods`: hubmerge's `method`
        close = difflib.get_close_matches("merge_method", near, 1, 0.6)
        raise RecipeError(
            "the models are written as in a mergekit config (`- model: ...`), and no `merge_method:` says "
            "which merge it is",
            path=close[0] if close else "merge_method",
            hint=f"did you mean `merge_method` for `{close[0]}`?"
            if close
            else "add `merge_method:` (a mergekit config), or write hubmerge's `method:` and `- path: ...`",
        )
    try:
        recipe = Recipe.model_validate(doc)
    except ValidationError as exc:
        raise _recipe_error(exc) from None
    recipe._base_dir = (base_dir or Path.cwd()).resolve()
    _check(recipe)
    return recipe


def _check(recipe: Recipe) -> None:
    """What pydantic cannot check: the model references, finite numbers, the method's parameters."""
    from .params import check_parameters

    recipe.model_refs()
    recipe.base_ref()
    _check_finite(recipe)
    check_parameters(recipe)


def _check_finite(recipe: Recipe) -> None:
    """Refuse NaN and infinite numbers: they would pass every range check and write a model of NaNs."""
    found: list[tuple[str, object]] = []
    for i, entry in enumerate(recipe.models):  # the base's are refused in check_parameters: it takes none
        where = f"models.{i}"
        found += [(f"{where}.{k}", v) for k, v in (("weight", entry.weight), ("density", entry.density))]
        found += [(f"{where}.parameters.{k}", v) for k, v in entry.parameters.items()]
    found += [(f"parameters.{k}", v) for k, v in recipe.parameters.items()]
    for i, rule in enumerate(recipe.rules):
        found += [(f"rules.{i}.parameters.{k}", v) for k, v in rule.parameters.items()]
    for path, value in found:
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise RecipeError(
                    f"{item} is not a finite number",
                    path=path,
                    hint="give a finite value: NaN or infinity would fill the merge with NaN",
                )


class RecipeText(str):
    """A recipe's YAML text that is never read as a path, whatever it holds (``hubmerge -``: stdin)."""


def _is_file(name: str) -> bool:
    try:
        return Path(name).is_file()
    except (OSError, ValueError):  # a name too long for the file system, or with a NUL: text
        return False


def _read_yaml(source: str | Path, base_dir: Path | None) -> tuple[Any, Path | None]:
    text: str
    # One line that names a file, or that no mapping could be (no ':'), is a path; anything else is YAML.
    if not isinstance(source, RecipeText) and (
        isinstance(source, Path)
        or (
            "\n" not in source
            and (source.endswith((".yaml", ".yml", ".json")) or ":" not in source or _is_file(source))
        )
    ):
        path = Path(source)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RecipeError(f"recipe file {path} does not exist", hint="check the path") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise RecipeError(f"cannot read recipe file {path}: {exc}") from None
        base_dir = base_dir or path.parent
    else:
        text = source
    try:
        return _load_yaml(text), base_dir
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc
        raise RecipeError(f"recipe is not valid YAML{where}: {problem}", hint="fix the YAML syntax") from None


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load(text)``, but a key given twice in one mapping is refused: safe_load keeps the last.

    Raises:
        RecipeError: naming the key's path and both lines.
        yaml.YAMLError: the text is not YAML.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(loader, node, "", set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _refuse_duplicate_keys(loader: yaml.SafeLoader, node: yaml.Node, path: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias: its anchor was checked where it was defined (and may hold itself)
        return
    seen.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(loader, item, f"{path}.{i}" if path else str(i), seen)
    if not isinstance(node, yaml.MappingNode):
        return
    lines: dict[object, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:  # `<<: *anchor` gives defaults, which the mapping's own keys override
            merged = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for item in merged:
                _refuse_duplicate_keys(loader, item, path, seen)
            continue
        if not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node)  # `1` and `01` alike, as the mapping will hold them
        where = f"{path}.{key}" if path else str(key)
        line = key_node.start_mark.line + 1
        if key in lines:
            lines_said = f"lines {lines[key]} and {line}" if lines[key] != line else f"line {line}"
            raise RecipeError(
                f"given twice ({lines_said})",
                path=where,
                hint=f"keep one `{key}:`; YAML would silently use the last one",
            )
        lines[key] = line
        _refuse_duplicate_keys(loader, value_node, where, seen)


# Keys people bring from mergekit configs and model cards, and what hubmerge calls them.
_INSTEAD = {
    "model": "`path:` for a local directory or `repo:` for a Hub repository",
    "base_model": "`base:`",
    "merge_method": "`method:`",
    "out_dtype": "`dtype:`",
    "revision_id": "`revision:`",
}


def _listed(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _unknown_key_hint(key: str, path: str = "") -> str:
    """What to write instead of ``key``, among the keys of the section ``path`` points into."""
    section = path.split(".")[0] if "." in path else ""
    if section == "rules" and key in ("match", "path", "pattern", "name", "filter"):
        return "a rule names its tensors with `tensors:` (a glob, or a list of globs)"
    if key in _INSTEAD and section in ("", "models", "base"):
        return f"use {_INSTEAD[key]}"
    sections: dict[str, type[BaseModel]] = {
        "": Recipe, "models": ModelEntry, "base": ModelEntry, "rules": Rule, "output": Output, "push": Push,
        "card": Card,
    }  # fmt: skip
    cls = sections.get(section, Recipe)
    close = difflib.get_close_matches(key, sorted(cls.model_fields), n=1)
    if close:
        return f"did you mean `{close[0]}`?"
    keys = ", ".join(f"`{k}`" for k in cls.model_fields)
    where = f"`{section}:`" if section else "a recipe"
    if section in ("models", "base", "rules"):
        where = f"an entry of `{section}:`" if section != "base" else "`base:`"
    return f"the keys of {where} are {keys}" + (
        "; method parameters are listed by `hubmerge methods`" if section in ("", "models") else ""
    )


def _recipe_error(exc: ValidationError) -> RecipeError:
    errors = exc.errors()
    # An unknown key first: a misspelt `modles:` is also a missing `models:`, and the spelling is the cause.
    err = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    path = _path(err)
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, RecipeError):  # a validator's own (which knows the words), or Recipe.__init__'s
        return (
            cause
            if cause.path is not None
            else RecipeError(cause.message, path=path or None, hint=cause.hint)
        )
    kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
    got = repr(err.get("input"))
    if kind == "extra_forbidden":
        return RecipeError("unknown key", path=path, hint=_unknown_key_hint(str(err["loc"][-1]), path))
    if kind == "missing":
        return RecipeError("required field is missing", path=path, hint="add it to the recipe")
    if kind == "literal_error":
        hint = (
            "this hubmerge reads recipes of version 1: write `version: 1`, or leave it out"
            if path == "version"
            else dtype_hint(err.get("input"), ("float32", "float64") if path == "compute_dtype" else None)
            if path in ("dtype", "compute_dtype")
            else "give one of those values"
        )
        expected = msg.replace("Input should be ", "expected ")
        return RecipeError(f"got {err.get('input')!r}; {expected}", path=path, hint=hint)
    if re.fullmatch(r"rules\.\d+\.take", path):
        return RecipeError(
            f"expected a model's number or `base`, got {got}",
            path=path,
            hint="write `take: 0` (the first model of `models:`) or `take: base`",
        )
    if kind == "too_short" and path == "models":
        return RecipeError("no models listed", path=path, hint="list the models to merge under `models:`")
    if kind in ("model_type", "dict_type") and path in _SECTION_EXAMPLES:
        return RecipeError(
            f"`{path}:` is a mapping, got {got}", path=path, hint=f"write {_section_example(path, err)}"
        )
    if kind == "list_type" and path in ("models", "rules"):
        example = (
            "`models: [./a, org/b]`" if path == "models" else "`rules: [{tensors: 'lm_head.*', take: 0}]`"
        )
        return RecipeError(f"`{path}:` is a list, got {got}", path=path, hint=f"write e.g. {example}")
    kinds = [_kind(e["type"], path) for e in errors if _path(e) == path]
    if len(kinds) > 1 and all(kinds):  # a value that fits none of a union's types: say what all of them are
        wanted = list(dict.fromkeys(k for k in kinds if k))
        expected = ", ".join(wanted[:-1]) + f" or {wanted[-1]}" if len(wanted) > 1 else wanted[0]
        return RecipeError(f"expected {expected}, got {got}", path=path or None, hint=f"give {expected}")
    one = _kind(kind, path)
    if one:  # pydantic's "Input should be a valid ...", in the recipe's words
        return RecipeError(f"expected {one}, got {got}", path=path or None, hint=f"give {one}")
    return RecipeError(msg if got in msg else f"{msg} (got {got})", path=path or None)


# Sections written as one value where a mapping is wanted, and the mapping meant.
_SECTION_EXAMPLES = {"output": "dir", "push": "repo", "card": "license"}


def _section_example(section: str, err: Any) -> str:
    value = err.get("input")
    shown = value if isinstance(value, str) and value.strip() else "..."
    return f"`{section}: {{{_SECTION_EXAMPLES[section]}: {shown}}}`"


# What people write for a dtype, and hubmerge's (torch's) name for it.
_DTYPE_ALIASES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "fp64": "float64",
    "f64": "float64",
    "double": "float64",
}


def dtype_hint(value: object, names: tuple[str, ...] | None = None) -> str:
    """What to write instead of ``value``, not one of the dtype ``names`` (default: every output dtype):
    ``"bf16"`` -> ``write `bfloat16```."""
    names = names or get_args(Dtype)
    name = str(value).strip().lower().removeprefix("torch.")
    meant = _DTYPE_ALIASES.get(name, name)  # `Float16`, `torch.float16` too
    return f"write `{meant}`" if meant in names else f"give one of {', '.join(names)}"


_KINDS = {
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "int_type": "a number",
    "int_parsing": "a number",
    "int_from_float": "a number",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "text",
    "list_type": "a list",
}


def _kind(kind: str, path: str) -> str | None:
    """What an error of pydantic's ``kind`` at ``path`` wanted, in the recipe's words."""
    if kind == "list_type" and re.fullmatch(r"(rules\.\d+\.)?parameters\.[^.]+", path):
        return "a list (one value per model)"
    return _KINDS.get(kind)


def _path(err: Any) -> str:
    """An error's field path without pydantic's union and type steps (``parameters.t``)."""
    path = ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[", "union[")))
    return re.sub(r"\.(str|int|float|bool|list\[.*?\]|ModelEntry)(?=\.|$)", "", path)
