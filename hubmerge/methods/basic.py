"""Merges that average the models' weights directly: linear, weighted and centroid."""

from __future__ import annotations

from collections.abc import Sequence

import torch

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
        A new tensor. ``t=0`` gives A and ``t=1`` gives B exactly.

    Raises:
        ValueError: not exactly two tensors.
    """
    check_count(tensors, "linear", 2, 2)
    return torch.lerp(tensors[0], tensors[1], t)


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
    ws = per_model(weights, len(tensors), 1.0, "weight")
    if normalize:
        total = normalizer(ws, "weighted")
        ws = [w / total for w in ws]
    return weighted_sum(tensors, ws)


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
