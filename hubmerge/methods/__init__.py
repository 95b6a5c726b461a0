"""Every merge method, as one row of data in ``METHODS``.

A method is a pure function ``fn(tensors, **kwargs) -> Tensor`` (see ``MethodSpec`` for the call
convention); a variant is a new row here, not new code in the engine.
"""

from __future__ import annotations

from hubmerge.errors import RecipeError
from hubmerge.methods.basic import centroid, centroid_kernel, linear, linear_kernel, weighted, weighted_kernel
from hubmerge.methods.blocks import (
    SLERP_PASSES,
    STOCK_PASSES,
    TIES_PASSES,
    model_stock_block,
    model_stock_kernel,
    slerp_block,
    slerp_kernel,
    ties_block,
    ties_kernel,
)
from hubmerge.methods.geometric import model_stock, slerp
from hubmerge.methods.spec import MethodSpec, ParamSpec, Pass
from hubmerge.methods.task_vectors import (
    dare_linear,
    dare_linear_kernel,
    dare_ties,
    dare_ties_kernel,
    task_arithmetic,
    task_arithmetic_kernel,
    ties,
)

__all__ = ["METHODS", "MethodSpec", "ParamSpec", "Pass", "get_method"]

_T = ParamSpec("t", "t", float, None, False, "interpolation factor: 0 gives the first model, 1 the second")
_WEIGHT = ParamSpec("weight", "weights", float, 1.0, True, "weight of each model")
_DENSITY = ParamSpec(
    "density", "densities", float, 0.5, True, "fraction of each task vector kept, 0..1", 0.0, 1.0
)
_LAMBDA = ParamSpec("lambda", "lambda_", float, 1.0, False, "scale of the merged task vector")


def _normalize(default: bool, doc: str) -> ParamSpec:
    return ParamSpec("normalize", "normalize", bool, default, False, doc)


_BY_WEIGHT_SUM = "divide by the sum of the weights"
_BY_AGREEING = "divide each element by the summed weights of the models agreeing with its elected sign"

METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            name="linear",
            fn=linear,
            params=(_T,),
            min_models=2,
            max_models=2,
            needs_base=False,
            elementwise=True,
            random=False,
            paper="https://arxiv.org/abs/2211.12092",
            summary="(1 - t) * A + t * B; t outside [0, 1] extrapolates",
            kernel=linear_kernel,
        ),
        MethodSpec(
            name="weighted",
            fn=weighted,
            params=(_WEIGHT, _normalize(True, _BY_WEIGHT_SUM)),
            min_models=1,
            max_models=None,
            needs_base=False,
            elementwise=True,
            random=False,
            paper="https://arxiv.org/abs/2203.05482",
            summary="weighted average of the models (model soup)",
            kernel=weighted_kernel,
        ),
        MethodSpec(
            name="centroid",
            fn=centroid,
            params=(),
            min_models=1,
            max_models=None,
            needs_base=False,
            elementwise=True,
            random=False,
            paper="https://arxiv.org/abs/2302.04863",
            summary="uniform mean of the models",
            kernel=centroid_kernel,
        ),
        MethodSpec(
            name="task_arithmetic",
            fn=task_arithmetic,
            params=(_WEIGHT, _LAMBDA, _normalize(False, _BY_WEIGHT_SUM)),
            min_models=1,
            max_models=None,
            needs_base=True,
            elementwise=True,
            random=False,
            paper="https://arxiv.org/abs/2212.04089",
            summary="base + lambda * weighted sum of task vectors (model - base)",
            kernel=task_arithmetic_kernel,
        ),
        MethodSpec(
            name="ties",
            fn=ties,
            params=(_WEIGHT, _DENSITY, _LAMBDA, _normalize(True, _BY_AGREEING)),
            min_models=1,
            max_models=None,
            needs_base=True,
            elementwise=False,
            random=False,
            paper="https://arxiv.org/abs/2306.01708",
            summary="trim task vectors by magnitude, elect a sign per element, merge the agreeing entries",
            passes=TIES_PASSES,
            block_fn=ties_block,
            kernel=ties_kernel,
        ),
        MethodSpec(
            name="dare_linear",
            fn=dare_linear,
            params=(_WEIGHT, _DENSITY, _LAMBDA, _normalize(False, _BY_WEIGHT_SUM)),
            min_models=1,
            max_models=None,
            needs_base=True,
            elementwise=True,
            random=True,
            kernel=dare_linear_kernel,
            paper="https://arxiv.org/abs/2311.03099",
            summary="randomly drop task-vector entries, rescale by 1/density, add like task arithmetic",
        ),
        MethodSpec(
            name="dare_ties",
            fn=dare_ties,
            params=(_WEIGHT, _DENSITY, _LAMBDA, _normalize(True, _BY_AGREEING)),
            min_models=1,
            max_models=None,
            needs_base=True,
            elementwise=True,
            random=True,
            kernel=dare_ties_kernel,
            paper="https://arxiv.org/abs/2311.03099",
            summary="DARE random drop and rescale, then TIES sign election and disjoint merge",
        ),
        MethodSpec(
            name="slerp",
            fn=slerp,
            params=(
                _T,
                ParamSpec(
                    "eps",
                    "eps",
                    float,
                    5e-4,
                    False,
                    "interpolate linearly when 1 - |cos| is below",
                    low=0.0,
                    high=1.0,
                ),
            ),
            min_models=2,
            max_models=2,
            needs_base=False,
            elementwise=False,
            random=False,
            paper="https://arxiv.org/abs/2403.13257",
            summary="spherical interpolation between two models along the arc joining them",
            passes=SLERP_PASSES,
            block_fn=slerp_block,
            kernel=slerp_kernel,
        ),
        MethodSpec(
            name="model_stock",
            fn=model_stock,
            params=(),
            min_models=2,
            max_models=None,
            needs_base=True,
            elementwise=False,
            random=False,
            paper="https://arxiv.org/abs/2403.19522",
            summary="move from the base toward the models' mean by a ratio set by their task vectors' angle",
            passes=STOCK_PASSES,
            block_fn=model_stock_block,
            kernel=model_stock_kernel,
        ),
    )
}


def get_method(name: str) -> MethodSpec:
    """Look up a merge method by its recipe name.

    Args:
        name: the recipe's ``method`` field.

    Returns:
        The method's spec.

    Raises:
        RecipeError: no method has that name; the hint lists the valid ones.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise RecipeError(
            f"unknown method '{name}'", path="method", hint=f"valid methods: {', '.join(sorted(METHODS))}"
        ) from None
