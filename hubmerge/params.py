"""Method parameters: checked against the method's spec at load time, resolved per tensor at plan time.

Precedence for a tensor: a matching rule's ``parameters`` > the model entry's own value > the recipe's
``parameters`` > the method's default. A per-model parameter given as a list has one value per model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .errors import RecipeError

if TYPE_CHECKING:
    from .methods import MethodSpec, ParamSpec
    from .recipe import ModelEntry, ParamValue, Recipe, Scalar

ENGINE_PARAMS = ("seed",)  # handled by the engine for every method, never passed to a method
SEED_DOC = "random seed (masks drawn per tensor name)"


def check_parameters(recipe: Recipe) -> None:
    """Check the method, model count, base, and every parameter of the recipe against the method's spec.

    Raises:
        RecipeError: naming the field (``parameters.t``, ``models.1.weight``, ``rules.0.take``).
    """
    from .methods import get_method

    spec = get_method(recipe.method)
    n = len(recipe.models)
    if n < spec.min_models or (spec.max_models is not None and n > spec.max_models):
        wanted = (
            f"exactly {spec.min_models}"
            if spec.min_models == spec.max_models
            else f"at least {spec.min_models}"
            if spec.max_models is None
            else f"{spec.min_models} to {spec.max_models}"
        )
        raise RecipeError(
            f"method '{spec.name}' merges {wanted} models, the recipe lists {n}",
            path="models",
            hint="`weighted` or `centroid` merge any number of models"
            if spec.max_models == 2 and n > 2
            else "`hubmerge methods` says how many models each method takes",
        )
    if spec.needs_base and recipe.base is None:
        raise RecipeError(
            f"method '{spec.name}' works on task vectors (model - base) and needs a base model",
            path="base",
            hint="add `base: <the model the fine-tunes started from>`",
        )
    _check_mapping(spec, recipe.parameters, n, "parameters")
    _check_base(spec, recipe)
    for i, entry in enumerate(recipe.models):
        for name, value, where in _own_params(entry, f"models.{i}"):
            if name in ENGINE_PARAMS:  # masks are drawn from (seed, tensor name): one seed per recipe
                raise _seed_not_here(spec, where, "not per model")
            param = _param(spec, name, where)
            if not param.per_model:
                raise RecipeError(
                    f"'{name}' applies to the whole merge, not to one model",
                    path=where,
                    hint=f"move it to the recipe's `parameters: {{{name}: ...}}`",
                )
            _coerce(param, value, where)
            if isinstance(recipe.parameters.get(name), list):  # which would win is no way to say it
                raise RecipeError(
                    f"'{name}' is given twice for model {i}: here and in the list `parameters.{name}`",
                    path=where,
                    hint=f"give it one way: on each model, or as the list `parameters: {{{name}: [...]}}`",
                )
    for r, rule in enumerate(recipe.rules):
        if isinstance(rule.take, int) and not 0 <= rule.take < n:
            raise RecipeError(
                f"take: {rule.take} but models are numbered 0 to {n - 1}",
                path=f"rules.{r}.take",
                hint="a model's number is its place in `models:`, counting from 0",
            )
        if rule.take == "base" and recipe.base is None:
            raise RecipeError(
                "take: base but the recipe has no base",
                path=f"rules.{r}.take",
                hint="add `base:`, or take a model by its number (`take: 0`)",
            )
        _check_mapping(spec, rule.parameters, n, f"rules.{r}.parameters")
    _check_normalizable(spec, resolve_params(recipe, spec, {}), _weights_field(recipe, {}, "parameters"))
    for r, rule in enumerate(recipe.rules):
        where = f"rules.{r}.parameters"
        _check_normalizable(
            spec,
            resolve_params(recipe, spec, rule.parameters, where=where),
            _weights_field(recipe, rule.parameters, where),
        )


def _own_params(entry: ModelEntry, where: str) -> list[tuple[str, Scalar, str]]:
    """A model entry's parameters as (name, value, YAML path): ``weight:``, ``parameters: {weight:}`` apart.

    Raises:
        RecipeError: a parameter given both ways (which would win is no way to say it).
    """
    own = [(name, value, f"{where}.parameters.{name}") for name, value in entry.parameters.items()]
    for name in ("weight", "density"):
        value = getattr(entry, name)
        if value is None:
            continue
        if name in entry.parameters:
            raise RecipeError(
                f"'{name}' is given twice: as `{name}:` and in `parameters:`",
                path=f"{where}.{name}",
                hint=f"give it one way: `{name}: {value}`, or in `parameters: {{{name}: ...}}`",
            )
        own.append((name, value, f"{where}.{name}"))
    return own


def _check_base(spec: MethodSpec, recipe: Recipe) -> None:
    """Refuse the base entry's weight, density and parameters: the base is no model of the weighted sum (a
    task-vector method subtracts it, the others take its config), so they would be ignored."""
    if recipe.base is None:
        return
    for name, _, where in _own_params(recipe.base, "base"):
        if name in ENGINE_PARAMS:
            raise _seed_not_here(spec, where, "not for the base")
        if name == "weight":
            raise RecipeError(
                "the base is not weighted: "
                + (
                    f"method '{spec.name}' weights the models' differences from it"
                    if spec.needs_base
                    else f"method '{spec.name}' merges only `models:` (the base gives the config)"
                ),
                path=where,
                hint="give the weights to the entries of `models:`, or remove it",
            )
        param = _param(spec, name, where)
        if param.per_model:
            raise RecipeError(
                f"'{name}' is set per model, and the base is no model of the merge",
                path=where,
                hint=f"give `{name}:` to the entries of `models:`, or remove it",
            )
        raise RecipeError(
            f"'{name}' applies to the whole merge, not to the base",
            path=where,
            hint=f"move it to the recipe's `parameters: {{{name}: ...}}`",
        )


def _seed_not_here(spec: MethodSpec, where: str, how: str) -> RecipeError:
    """A seed given per model, per rule or for the base: a random method's recipe has one (its masks differ
    per tensor name already); the other methods' recipes may set it, and it changes nothing."""
    if not spec.random:
        return RecipeError(
            f"method '{spec.name}' draws no random numbers: a seed changes nothing",
            path=where,
            hint="remove it",
        )
    return RecipeError(
        f"seed is set once, for the whole recipe, {how}",
        path=where,
        hint="move it to the recipe's `parameters: {seed: ...}`; each tensor's randomness already depends on "
        "its name",
    )


def _weights_field(recipe: Recipe, overrides: Mapping[str, ParamValue], where: str) -> str:
    """Where the weights resolved with ``overrides`` (a rule's parameters, at ``where``) were given."""
    if "weight" in overrides:
        return f"{where}.weight"
    if "normalize" in overrides:
        return f"{where}.normalize"
    if "weight" in recipe.parameters and not any(
        "weight" in entry.per_model_params() for entry in recipe.models
    ):
        return "parameters.weight"
    return "models"


# Methods that divide by the sum of the weights when `normalize` is on (TIES divides per entry instead).
_SUM_NORMALIZED = ("weighted", "task_arithmetic", "dare_linear")


def _check_normalizable(spec: MethodSpec, kwargs: Mapping[str, object], where: str) -> None:
    weights = kwargs.get("weights")
    if spec.name in _SUM_NORMALIZED and kwargs.get("normalize") and isinstance(weights, list):
        # Near 0 too: [0.1, 0.2, -0.3] sums to 5.6e-17 in floats, and dividing by it scales by 1.8e16.
        if abs(sum(weights)) <= 1e-6 * sum(abs(w) for w in weights):
            raise RecipeError(
                f"the weights {weights} sum to 0, and `normalize` divides by their sum",
                path=where,
                hint="change the weights, or set `normalize: false`",
            )


def _param(spec: MethodSpec, name: str, where: str) -> ParamSpec:
    for param in spec.params:
        if param.name == name:
            return param
    valid = [p.name for p in spec.params] + (["seed"] if spec.random else [])  # seed: where masks are drawn
    raise RecipeError(
        f"method '{spec.name}' takes no parameter '{name}'",
        path=where,
        hint=f"its parameters: {', '.join(valid)}; `hubmerge methods` describes them"
        if valid
        else f"'{spec.name}' takes no parameters: remove it",
    )


def _check_mapping(spec: MethodSpec, params: Mapping[str, ParamValue], n: int, where: str) -> None:
    for name, value in params.items():
        if name in ENGINE_PARAMS:
            if where != "parameters":  # masks are drawn from (seed, tensor name): one seed per recipe
                raise _seed_not_here(spec, f"{where}.{name}", "not per rule")
            if not isinstance(value, int) or isinstance(value, bool):
                raise RecipeError(
                    f"seed must be an integer, got {value!r}",
                    path=f"{where}.{name}",
                    hint="write e.g. `seed: 0`",
                )
            continue
        param = _param(spec, name, f"{where}.{name}")
        if isinstance(value, list):
            if not param.per_model:
                raise RecipeError(
                    f"'{name}' takes one value, got a list", path=f"{where}.{name}", hint=f"write {name}: 0.5"
                )
            if len(value) != n:
                raise RecipeError(
                    f"{len(value)} values for '{name}' but {n} models",
                    path=f"{where}.{name}",
                    hint="give one value per model, in the order of `models:`",
                )
            for i, item in enumerate(value):
                _coerce(param, item, f"{where}.{name}.{i}")
        else:
            _coerce(param, value, f"{where}.{name}")


_FLOAT32_MAX = 3.4028234663852886e38


def _coerce(param: ParamSpec, value: Scalar, where: str) -> Scalar:
    if param.type is bool:
        if not isinstance(value, bool):
            raise RecipeError(
                f"'{param.name}' is true or false, got {value!r}",
                path=where,
                hint=f"write `{param.name}: true`",
            )
        return value
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 as text (it wants 1.0e-3): a number is meant
        try:
            value = float(value.strip()) if param.type is float else int(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, int | float):  # true is no 1.0: refused everywhere
        raise RecipeError(
            f"'{param.name}' is a number, got {value!r}",
            path=where,
            hint=f"give a number, such as {param.default if param.default is not None else 0.5}",
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(
            f"{value} is not a finite number",
            path=where,
            hint="give a finite value: NaN or infinity would fill the merge with NaN",
        )
    try:
        number = int(value) if param.type is int else float(value)
    except OverflowError:
        raise RecipeError(
            f"'{param.name}' is too large, got {value!r}", path=where, hint="give a smaller value"
        ) from None
    if param.type is float and abs(number) > _FLOAT32_MAX:  # the merge computes in float32: inf there
        raise RecipeError(
            f"'{param.name}' is {value!r}, beyond the range of float32 (about 3.4e38), the merge's "
            "arithmetic",
            path=where,
            hint="give a smaller value",
        )
    if (param.low is not None and number < param.low) or (param.high is not None and number > param.high):
        raise RecipeError(
            f"'{param.name}' must lie in [{param.low}, {param.high}], got {value!r}",
            path=where,
            hint=f"give a value from {param.low} to {param.high}"
            if param.high is not None
            else f"give a value of at least {param.low}",
        )
    return number


def resolve_params(
    recipe: Recipe, spec: MethodSpec, overrides: Mapping[str, ParamValue], *, where: str = "parameters"
) -> dict[str, object]:
    """The keyword arguments for ``spec.fn`` for a tensor (without ``base`` and ``generator``).

    Raises:
        RecipeError: a required parameter is missing.
    """
    kwargs: dict[str, object] = {}
    for param in spec.params:
        if param.per_model:
            values: list[Scalar] = []
            for i, entry in enumerate(recipe.models):
                value = _pick(param.name, i, overrides, entry.per_model_params(), recipe.parameters)
                if value is None:
                    value = param.default  # type: ignore[assignment]
                if value is None:
                    raise _missing(spec, param, f"models.{i}.{param.name}", per_model=True)
                values.append(_coerce(param, value, f"models.{i}.{param.name}"))
            kwargs[param.kwarg] = values
        else:
            value = _pick(param.name, None, overrides, {}, recipe.parameters)
            if value is None:
                value = param.default  # type: ignore[assignment]
            if value is None:
                raise _missing(spec, param, f"{where}.{param.name}", per_model=False)
            kwargs[param.kwarg] = _coerce(param, value, f"{where}.{param.name}")
    return kwargs


def _pick(
    name: str,
    index: int | None,
    overrides: Mapping[str, ParamValue],
    own: Mapping[str, Scalar],
    recipe_params: Mapping[str, ParamValue],
) -> Scalar | None:
    for layer in (overrides, own, recipe_params):
        if name in layer:
            value = layer[name]
            if isinstance(value, list):
                return value[index] if index is not None else None
            return value
    return None


def _missing(spec: MethodSpec, param: ParamSpec, where: str, *, per_model: bool) -> RecipeError:
    example = f"parameters: {{{param.name}: 0.5}}"
    how = f"`{example}` for all models, or `{param.name}:` on each model" if per_model else f"`{example}`"
    return RecipeError(
        f"method '{spec.name}' needs parameter '{param.name}' ({param.doc})", path=where, hint=f"add {how}"
    )


def seed_of(recipe: Recipe) -> int:
    """The recipe's seed for random methods (default 0)."""
    value = recipe.parameters.get("seed", 0)
    return value if isinstance(value, int) else 0
