"""Translate a mergekit config (``merge_method:``, ``models:``, ``base_model:``, ...) into a v1 recipe dict.

What mergekit calls ``linear`` is a normalized weighted average, our ``weighted``; its ``slerp`` takes the
base model as the t=0 end. For the task-vector methods a ``base_model`` also listed under ``models:`` is left
out of the models (mergekit skips it), and mergekit's defaults are written where ours differ (``density``
1.0, ``normalize`` per method), so a config merges as mergekit merges it. Features we do not support are
refused by name rather than silently dropped.
"""

from __future__ import annotations

import difflib
import os
from typing import Any, get_args

from .errors import RecipeError
from .recipe import Dtype, dtype_hint

METHOD_NAMES = {
    "linear": "weighted",
    "slerp": "slerp",
    "task_arithmetic": "task_arithmetic",
    "ties": "ties",
    "dare_ties": "dare_ties",
    "dare_linear": "dare_linear",
    "model_stock": "model_stock",
}
# key -> (feature, what to do instead)
UNSUPPORTED_KEYS = {
    "slices": ("layer slicing (`slices`)", "merge whole models with `models:`, or keep using mergekit"),
    "modules": ("per-module configs (`modules`)", "use hubmerge `rules:` with tensor globs per module"),
    "tokenizer": (
        "tokenizer merging (`tokenizer`)",
        "remove it: hubmerge copies the base model's tokenizer (`tokenizer: {source: base}` is accepted)",
    ),
    "chat_template": (
        "chat template selection (`chat_template`)",
        "remove it: hubmerge copies the base model's tokenizer files, chat template included",
    ),
}
# mergekit's memory options with no effect on the result: accepted (as a parameter too) and ignored.
IGNORED_FLAGS = {"int8_mask"}
# Methods that merge the models' differences from base_model: mergekit leaves the base out of `models:`,
# where its examples list it (with no parameters) so that every model is named in one list.
TASK_VECTOR_METHODS = {"task_arithmetic", "ties", "dare_ties", "dare_linear", "model_stock"}
# mergekit's own defaults where hubmerge's differ: `density` 1.0 (no trimming) for every task-vector
# method, and `normalize` per method (mergekit 0.1.x registry: true for ties, false for the others).
MERGEKIT_DEFAULTS: dict[str, dict[str, Any]] = {
    "task_arithmetic": {"normalize": False},
    "ties": {"normalize": True, "density": 1.0},
    "dare_ties": {"normalize": False, "density": 1.0},
    "dare_linear": {"normalize": False, "density": 1.0},
}
KNOWN_KEYS = {
    "merge_method",
    "models",
    "base_model",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "name",
    *IGNORED_FLAGS,
}


def translate_mergekit(doc: dict[str, Any]) -> dict[str, Any]:
    """Return the v1 recipe equivalent of a mergekit config.

    Raises:
        RecipeError: a mergekit feature hubmerge does not support, named.
    """
    doc = dict(doc)
    tokenizer = doc.get("tokenizer")
    if tokenizer == {"source": "base"}:  # the newer spelling of `tokenizer_source: base`
        doc.pop("tokenizer")
        doc.setdefault("tokenizer_source", "base")
    for key, (feature, instead) in UNSUPPORTED_KEYS.items():
        if key in doc:
            raise RecipeError(
                f"mergekit config uses {feature}, which hubmerge does not support", path=key, hint=instead
            )
    unknown = sorted(set(doc) - KNOWN_KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], sorted(KNOWN_KEYS), 1, 0.75)
        if unknown[0] in ("method", "output", "push", "card", "rules", "base", "compute_dtype", "version"):
            hint = (
                f"`{unknown[0]}` is a key of hubmerge's own recipes, not of mergekit configs: write the "
                "whole recipe in one format"
            )
        elif close:
            hint = f"did you mean `{close[0]}`?"
        else:
            hint = "remove it; a key that only holds a YAML anchor is named `x-...` (`x-common: &c {...}`)"
        raise RecipeError(f"unknown mergekit key '{unknown[0]}'", path=unknown[0], hint=hint)
    for flag in IGNORED_FLAGS & set(doc):
        _ignored_flag(doc[flag], flag)
    mk_method = doc["merge_method"]
    if mk_method not in METHOD_NAMES:
        raise RecipeError(
            f"mergekit merge_method '{mk_method}' is not supported",
            path="merge_method",
            hint=f"supported: {', '.join(METHOD_NAMES)}",
        )
    source = doc.get("tokenizer_source")
    if (
        isinstance(source, str)
        and isinstance(doc.get("base_model"), str)
        and _same(source, doc["base_model"])
    ):
        source = "base"  # the base model named by its path: the same as `base`
    if source not in (None, "base"):
        raise RecipeError(
            f"mergekit tokenizer_source: {source} is not supported; "
            "hubmerge copies the base model's tokenizer",
            path="tokenizer_source",
            hint="remove tokenizer_source (or set it to base)",
        )
    recipe: dict[str, Any] = {"method": METHOD_NAMES[mk_method]}
    base = doc.get("base_model")
    if base is not None:
        recipe["base"] = _model_ref(base, "base_model")
    models = []
    for i, item in enumerate(doc.get("models") or []):
        if not isinstance(item, dict) or "model" not in item:
            raise RecipeError("each mergekit model is a mapping with `model:`", path=f"models.{i}")
        extra = sorted(set(item) - {"model", "parameters"})
        if extra:  # mergekit 0.1.5 drops them without a word: a `weight:` here would be lost
            raise RecipeError(
                f"unknown key '{extra[0]}' in a mergekit model entry",
                path=f"models.{i}.{extra[0]}",
                hint=f"mergekit takes it under `parameters:` (`parameters: {{{extra[0]}: ...}}`)"
                if extra[0] in ("weight", "density", "t", "lambda", "epsilon")
                else "a mergekit model entry has `model:` and `parameters:`",
            )
        entry: dict[str, Any] = {"ref": _model_ref(item["model"], f"models.{i}.model")}
        params = _params(item.get("parameters") or {}, f"models.{i}.parameters", mk_method)
        if params:
            entry["parameters"] = params
        models.append(entry)
    if mk_method in TASK_VECTOR_METHODS and base is not None:
        models = [m for m in models if not _same(m["ref"], recipe["base"])]
    if mk_method == "slerp" and base is not None:
        # mergekit's slerp goes from base_model (t=0) to the other model (t=1); as the first model it gives
        # the output its config and tokenizer too, so no `base:` (slerp merges none).
        others = [m for m in models if not _same(m["ref"], recipe["base"])]
        models = [{"ref": recipe.pop("base")}, *others]
    recipe["models"] = models
    params = MERGEKIT_DEFAULTS.get(mk_method, {}) | _params(
        doc.get("parameters") or {}, "parameters", mk_method
    )
    if params:
        recipe["parameters"] = params
    key = "out_dtype" if doc.get("out_dtype") else "dtype"
    written = out_dtype = doc.get(key)
    if isinstance(out_dtype, str):
        out_dtype = out_dtype.removeprefix("torch.")  # mergekit takes torch's names too
    if out_dtype is not None:
        if out_dtype not in get_args(Dtype):
            raise RecipeError(
                f"got {written!r}; expected one of {', '.join(get_args(Dtype))}",
                path=key,
                hint=dtype_hint(out_dtype),
            )
        recipe["dtype"] = out_dtype
    return recipe


def _ignored_flag(value: Any, where: str) -> None:
    """A memory option such as ``int8_mask``: true or false, and either merges the same."""
    if not isinstance(_loose_bool(value), bool):
        raise RecipeError(
            f"'{where.rsplit('.', 1)[-1]}' is true or false, got {value!r}",
            path=where,
            hint="hubmerge ignores it (it saves memory only): remove it, or write true or false",
        )


def _same(a: str, b: str) -> bool:
    """Whether two mergekit model references name the same model (``path`` and ``path/`` alike)."""
    return os.path.normpath(a.strip()) == os.path.normpath(b.strip())


def _model_ref(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise RecipeError("expected a model path or Hub id", path=where)
    if "+" in value:
        raise RecipeError(
            f"mergekit's model+LoRA syntax ({value!r}) is not supported",
            path=where,
            hint="merge the LoRA into its base first (peft's merge_and_unload, then save_pretrained), and "
            "list that folder",
        )
    return value


# mergekit's `rescale` (the kept entries scaled back to the task vector's size) as hubmerge merges: DARE
# always rescales (by 1/density), TIES never does, task_arithmetic keeps every entry (nothing to rescale).
RESCALES = {"dare_ties": True, "dare_linear": True, "ties": False}


def _loose_bool(value: Any) -> Any:
    """``value`` as mergekit reads a boolean (pydantic's lax bool: 1, 1.0, 'true', 'on', 'y'...); anything
    else as it is, for the caller to refuse."""
    from pydantic import TypeAdapter, ValidationError

    try:
        return TypeAdapter(bool).validate_python(value)
    except ValidationError:
        return value


def _params(params: Any, where: str, method: str) -> dict[str, Any]:
    if not isinstance(params, dict):
        raise RecipeError("parameters must be a mapping", path=where)
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name in IGNORED_FLAGS:
            _ignored_flag(value, f"{where}.{name}")
            continue
        if name == "rescale":
            value = _loose_bool(value)
            if not isinstance(value, bool):
                raise RecipeError(
                    f"'rescale' is true or false, got {value!r}",
                    path=f"{where}.{name}",
                    hint="write true or false",
                )
            merged = RESCALES.get(method)
            if merged is not None and value is not merged:
                raise RecipeError(
                    f"rescale: {str(value).lower()} is not how hubmerge merges {method}: "
                    + (
                        "its DARE always rescales the kept entries by 1/density"
                        if merged
                        else "its TIES keeps the trimmed entries as they are"
                    ),
                    path=f"{where}.{name}",
                    hint=f"remove rescale (hubmerge's {method} is rescale: {str(merged).lower()}), or keep "
                    "using mergekit for this merge",
                )
            continue
        if name == "normalize":
            value = _loose_bool(value)
        if name == "filter_wise":  # model_stock per row; mergekit's default is per tensor, as hubmerge's
            if _loose_bool(value) is not False:
                raise RecipeError(
                    "filter_wise: true (model_stock per row) is not supported; hubmerge merges per tensor",
                    path=f"{where}.{name}",
                    hint="remove filter_wise",
                )
            continue
        if isinstance(value, dict | list):
            raise RecipeError(
                f"mergekit per-layer or gradient parameter values ({name}: {value!r}) are not supported",
                path=f"{where}.{name}",
                hint="give one number, and use hubmerge `rules:` for per-tensor parameters",
            )
        out[name] = value
    return out
