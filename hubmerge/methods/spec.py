"""The two frozen dataclasses that describe a merge method as data, and checks shared by the methods."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hubmerge._torch import torch


@dataclass(frozen=True)
class ParamSpec:
    """One recipe parameter of a merge method.

    ``default`` None means the recipe must set it. A ``per_model`` parameter may be set per model
    (``models[i].weight``) and reaches the function as a list with one value per model, in model order.
    """

    name: str
    kwarg: str
    type: type
    default: object
    per_model: bool
    doc: str
    low: float | None = None  # inclusive bounds, checked when the recipe is loaded
    high: float | None = None


def _always(kwargs: Mapping[str, Any]) -> bool:
    return True


@dataclass(frozen=True)
class Pass:
    """A read over a whole tensor, block by block, for a method whose result needs whole-tensor statistics.

    ``step(tensors, base, kwargs)`` maps one block of the inputs (in the compute dtype) to a tensor of
    statistics, int64 or float64 and of one shape for every block; the engine sums them over the blocks in
    order, then ``finish(total, numel, dtype, kwargs)`` turns the sum into new keyword arguments
    (``numel``: the whole tensor's, ``dtype``: the compute dtype). ``kwargs`` holds the method's parameters
    and what earlier passes found; ``active(kwargs)`` says whether this pass is needed at all.

    ``kernel(tensors, base, kwargs)``, when set, computes ``step``'s sum over a whole span of rows straight
    from the stored inputs (bfloat16 or float32, not yet cast) with a fused CPU kernel, or returns None when
    it cannot, and the engine falls back to ``step``.
    """

    step: Callable[[Sequence[torch.Tensor], torch.Tensor | None, Mapping[str, Any]], torch.Tensor]
    finish: Callable[[torch.Tensor, int, torch.dtype, Mapping[str, Any]], dict[str, Any]]
    active: Callable[[Mapping[str, Any]], bool] = _always
    kernel: (
        Callable[[Sequence[torch.Tensor], torch.Tensor | None, Mapping[str, Any]], torch.Tensor | None] | None
    ) = None


@dataclass(frozen=True)
class MethodSpec:
    """One merge method: its function and everything the engine needs to call it.

    The engine calls ``fn(tensors, **kwargs)`` with the models' tensors in the compute dtype, every
    parameter under its ``kwarg``, plus ``base=`` when ``needs_base`` and ``generator=`` when ``random``.
    ``elementwise`` means ``result[i]`` depends only on the inputs at ``i``, so rows may be merged in chunks.

    A method that is not elementwise may still be merged block by block in bounded memory: its ``passes`` read
    the tensor first and derive whole-tensor quantities (a magnitude threshold, norms and angles), then
    ``block_fn(tensors, **kwargs, **derived)`` is elementwise. ``fn`` stays the reference on whole tensors;
    for any blocking the two agree up to float rounding of the derived quantities.

    ``kernel(tensors, base, out, kwargs)``, when set, merges a span of rows of the stored inputs into ``out``
    with a fused CPU kernel (float32 arithmetic, the same operations as ``block_fn`` or ``fn``) and returns
    True, or returns False when it cannot (see :mod:`hubmerge.kernels`).
    """

    name: str
    fn: Callable[..., torch.Tensor]
    params: tuple[ParamSpec, ...]
    min_models: int
    max_models: int | None
    needs_base: bool
    elementwise: bool
    random: bool
    paper: str
    summary: str
    passes: tuple[Pass, ...] = ()
    block_fn: Callable[..., torch.Tensor] | None = None
    kernel: (
        Callable[[Sequence[torch.Tensor], torch.Tensor | None, torch.Tensor, Mapping[str, Any]], bool] | None
    ) = None

    @property
    def blockwise(self) -> bool:
        """Whether the engine may merge a tensor block by block (directly, or after ``passes``)."""
        return self.elementwise or self.block_fn is not None


def check_count(tensors: Sequence[torch.Tensor], method: str, low: int, high: int | None = None) -> None:
    """Check how many model tensors a method got.

    Args:
        tensors: the models' tensors.
        method: method name, for the message.
        low: fewest models allowed.
        high: most models allowed, None for no limit.

    Raises:
        ValueError: too few or too many tensors.
    """
    n = len(tensors)
    if n < low or (high is not None and n > high):
        wanted = (
            f"exactly {low}" if low == high else f"at least {low}" if high is None else f"{low} to {high}"
        )
        raise ValueError(f"{method} merges {wanted} models, got {n}")


def per_model(values: Sequence[float] | None, n: int, default: float, name: str) -> list[float]:
    """Resolve a per-model parameter to one float per model.

    Args:
        values: one value per model, or None to use ``default`` for every model.
        n: number of models.
        default: value used when ``values`` is None.
        name: parameter name, for the message.

    Returns:
        A list of ``n`` floats.

    Raises:
        ValueError: ``values`` does not have one entry per model.
    """
    if values is None:
        return [default] * n
    if len(values) != n:
        raise ValueError(f"'{name}' needs one value per model ({n}), got {len(values)}")
    return [float(v) for v in values]


def check_densities(densities: Sequence[float]) -> None:
    """Check that every density is a fraction.

    Args:
        densities: one density per model.

    Raises:
        ValueError: a density lies outside [0, 1].
    """
    for i, density in enumerate(densities):
        if not 0.0 <= density <= 1.0:
            raise ValueError(f"density of model {i} must lie in [0, 1], got {density}")


def normalizer(weights: Sequence[float], method: str) -> float:
    """Sum of the weights, for methods that divide by it.

    Args:
        weights: one weight per model.
        method: method name, for the message.

    Returns:
        The sum of ``weights``.

    Raises:
        ValueError: the weights sum to zero, so they cannot be normalized.
    """
    total = float(sum(weights))
    if total == 0.0:
        raise ValueError(
            f"{method}: weights {list(weights)} sum to 0 and cannot be normalized; "
            "change the weights or set normalize: false"
        )
    return total
