"""Merges that average the models' weights directly: linear, weighted and centroid.

Each also has a ``*_kernel`` form for the engine: the same coefficients, handed to the fused CPU kernel
(:mod:`hubmerge.kernels`), which computes the same float32 operations straight from the stored inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hubmerge import kernels
from hubmerge._torch import torch
from hubmerge.methods.spec import check_count, normalizer, per_model


def weighted_sum(tensors: Sequence[torch.Tensor], coefficients: Sequence[float]) -> torch.Tensor:
    """``sum_i coefficients[i] * tensors[i]`` in a freshly allocated tensor, one pass per input.

    Args:
        tensors: at least one tensor, all of one shape and dtype.
        coefficients: one float per tensor.

    Returns:
        A new tensor; the inputs are untouched.
    """
    out = torch.mul(tensors[0], coefficients[0])
    for tensor, coefficient in zip(tensors[1:], coefficients[1:], strict=True):
        out.add_(tensor, alpha=coefficient)
    return out


def linear(tensors: Sequence[torch.Tensor], *, t: float) -> torch.Tensor:
    """Interpolate two models: ``(1 - t) * A + t * B``.

    Args:
        tensors: exactly two tensors, A then B.
        t: position between A (0) and B (1); outside [0, 1] extrapolates.

    Returns:
        A new tensor. ``t=0`` gives A and ``t=1`` gives B (up to the sign of zeros); the sum is rounded
        once, as a fused multiply-add.

    Raises:
        ValueError: not exactly two tensors.
    """
    check_count(tensors, "linear", 2, 2)
    return weighted_sum(tensors, [1.0 - t, t])


def linear_kernel(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, out: torch.Tensor, kwargs: Mapping[str, Any]
) -> bool:
    """:func:`linear` into ``out`` by the fused kernel; False if it cannot run."""
    t = kwargs["t"]
    return len(tensors) == 2 and kernels.weighted_sum(tensors, [1.0 - t, t], out)


def weighted(
    tensors: Sequence[torch.Tensor], *, weights: Sequence[float] | None = None, normalize: bool = True
) -> torch.Tensor:
    """Weighted sum of the models, divided by the sum of the weights when ``normalize``.

    Args:
        tensors: one or more tensors.
        weights: one weight per model; None means 1.0 each.
        normalize: divide by the sum of the weights.

    Returns:
        A new tensor.

    Raises:
        ValueError: no tensors, a wrong number of weights, or weights summing to 0 with ``normalize``.
    """
    check_count(tensors, "weighted", 1)
    return weighted_sum(tensors, _weighted_coefficients(len(tensors), weights, normalize))


def _weighted_coefficients(n: int, weights: Sequence[float] | None, normalize: bool) -> list[float]:
    ws = per_model(weights, n, 1.0, "weight")
    if normalize:
        total = normalizer(ws, "weighted")
        ws = [w / total for w in ws]
    return ws


def weighted_kernel(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, out: torch.Tensor, kwargs: Mapping[str, Any]
) -> bool:
    """:func:`weighted` into ``out`` by the fused kernel; False if it cannot run."""
    coefficients = _weighted_coefficients(len(tensors), kwargs.get("weights"), kwargs.get("normalize", True))
    return kernels.weighted_sum(tensors, coefficients, out)


def centroid(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Uniform mean of the models.

    Args:
        tensors: one or more tensors.

    Returns:
        A new tensor.

    Raises:
        ValueError: no tensors.
    """
    check_count(tensors, "centroid", 1)
    if len(tensors) == 1:
        return tensors[0].clone()
    # Summing first and dividing once rounds less than scaling each input by 1/n.
    out = torch.add(tensors[0], tensors[1])
    for tensor in tensors[2:]:
        out.add_(tensor)
    return out.div_(len(tensors))


def centroid_kernel(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, out: torch.Tensor, kwargs: Mapping[str, Any]
) -> bool:
    """:func:`centroid` into ``out`` by the fused kernel; False if it cannot run."""
    return len(tensors) > 1 and kernels.weighted_sum(tensors, [1.0] * len(tensors), out, len(tensors))
