"""Merges that use the angle between models: SLERP and Model Stock."""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import combinations

from hubmerge._torch import torch
from hubmerge.methods.basic import weighted_sum
from hubmerge.methods.spec import check_count


def dot64(a: torch.Tensor, b: torch.Tensor, chunk: int = 1 << 20) -> float:
    """``a . b`` read as flat vectors, with float64 products and sums (as the blocked engine's passes).

    Taken ``chunk`` elements at a time, so no float64 copy of a whole tensor is made.
    """
    a, b = a.reshape(-1), b.reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=a.device)
    for start in range(0, a.numel(), chunk):
        total += torch.dot(a[start : start + chunk].double(), b[start : start + chunk].double())
    return float(total)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Cosine of the angle between two tensors read as flat vectors.

    Args:
        a: a tensor.
        b: a tensor of the same shape and dtype.

    Returns:
        The cosine clamped to [-1, 1], or None when either vector is zero (no angle is defined).
        Products and sums are float64, as in the blocked engine's pass (``methods.blocks``).
    """
    aa, bb = dot64(a, a), dot64(b, b)
    if aa == 0.0 or bb == 0.0:
        return None
    return min(1.0, max(-1.0, dot64(a, b) / (math.sqrt(aa) * math.sqrt(bb))))


def slerp(tensors: Sequence[torch.Tensor], *, t: float, eps: float = 5e-4) -> torch.Tensor:
    """Spherical interpolation of two models, read as flat vectors.

    The angle comes from the normalized directions; the raw tensors are then mixed with the weights
    ``sin((1 - t) * theta) / sin(theta)`` and ``sin(t * theta) / sin(theta)``, so norms interpolate too.
    Nearly colinear (or antiparallel) pairs and zero tensors fall back to linear interpolation, where the
    sine ratios lose precision and the two results agree anyway.

    Args:
        tensors: exactly two tensors, A then B.
        t: position along the arc from A (0) to B (1); outside [0, 1] extrapolates.
        eps: fall back to linear interpolation when ``1 - |cos(theta)| < eps``.

    Returns:
        A new tensor. ``t=0`` gives A and ``t=1`` gives B exactly.

    Raises:
        ValueError: not exactly two tensors.
    """
    check_count(tensors, "slerp", 2, 2)
    return slerp_mix(tensors, slerp_coefficients(cosine(*tensors), t, eps), t)


def slerp_coefficients(cos: float | None, t: float, eps: float) -> tuple[float, float] | None:
    """SLERP's weights of A and B for the cosine of their angle; None where it falls back to linear.

    Args:
        cos: cosine of the angle between A and B, None when either is zero.
        t: position along the arc.
        eps: fall back when ``1 - |cos| < eps`` (and where ``|cos|`` is 1, even with ``eps`` 0).

    Returns:
        ``(sin((1 - t) * theta) / sin(theta), sin(t * theta) / sin(theta))``, or None.
    """
    # Parallel vectors (|cos| 1: a 1-element tensor always) have no arc to follow, whatever eps says.
    if cos is None or 1.0 - abs(cos) < eps or abs(cos) >= 1.0:
        return None
    theta = math.acos(cos)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def slerp_mix(
    tensors: Sequence[torch.Tensor], coefficients: tuple[float, float] | None, t: float
) -> torch.Tensor:
    """Mix A and B with SLERP's weights, or interpolate linearly when ``coefficients`` is None.

    Args:
        tensors: A and B, or the same block of each.
        coefficients: from :func:`slerp_coefficients`.
        t: position between A and B for the linear fallback.

    Returns:
        A new tensor.
    """
    if coefficients is None:
        return torch.lerp(tensors[0], tensors[1], t)
    return weighted_sum(tensors, list(coefficients))


def model_stock(tensors: Sequence[torch.Tensor], *, base: torch.Tensor) -> torch.Tensor:
    """Model Stock: move from the base toward the models' mean by a ratio set by their task vectors' angle.

    ``cos`` is the mean pairwise cosine between the task vectors ``x_i - base``, and the ratio is
    ``t = N * cos / (1 + (N - 1) * cos)``; the result is ``t * mean(x_i) + (1 - t) * base``.
    A zero task vector has no direction and counts as cosine 0. A negative mean cosine is clamped to 0
    (result: the base), since the formula has a pole at ``cos = -1 / (N - 1)`` and means nothing below 0.

    Args:
        tensors: two or more fine-tuned tensors.
        base: the base model's tensor.

    Returns:
        A new tensor.

    Raises:
        ValueError: fewer than two tensors.
    """
    check_count(tensors, "model_stock", 2)
    n = len(tensors)
    deltas = [torch.sub(x, base) for x in tensors]
    norms = [dot64(d, d) ** 0.5 for d in deltas]
    dots = {(i, j): dot64(deltas[i], deltas[j]) for i, j in combinations(range(n), 2)}
    del deltas  # free the task vectors before the result is allocated
    return stock_mix(tensors, base, stock_ratio(norms, dots))


def stock_ratio(norms: Sequence[float], dots: dict[tuple[int, int], float]) -> float:
    """Model Stock's ratio ``t = N * cos / (1 + (N - 1) * cos)`` from the task vectors' norms and dots.

    Args:
        norms: the norm of each task vector.
        dots: ``dots[i, j]`` is the dot product of task vectors ``i < j``.

    Returns:
        The ratio, in [0, 1].
    """
    n = len(norms)
    total = 0.0
    for i, j in combinations(range(n), 2):
        if norms[i] > 0.0 and norms[j] > 0.0:
            total += dots[i, j] / (norms[i] * norms[j])
    cos = min(1.0, max(0.0, total / (n * (n - 1) / 2)))
    return n * cos / (1.0 + (n - 1) * cos)


def stock_mix(tensors: Sequence[torch.Tensor], base: torch.Tensor, ratio: float) -> torch.Tensor:
    """``ratio * mean(tensors) + (1 - ratio) * base``.

    Args:
        tensors: the fine-tuned tensors, or the same block of each.
        base: the base tensor (or block).
        ratio: from :func:`stock_ratio`.

    Returns:
        A new tensor.
    """
    return weighted_sum([base, *tensors], stock_coefficients(len(tensors), ratio))


def stock_coefficients(n: int, ratio: float) -> list[float]:
    """The weights of the base and of each of ``n`` models in :func:`stock_mix`'s weighted sum."""
    return [1.0 - ratio, *([ratio / n] * n)]
