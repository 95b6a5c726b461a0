"""The fused CPU kernels (hubmerge/_kernels.c) behind a typed, checked interface.

Each function returns False (or None) when it cannot take the job: the module is not built, kernels are
turned off with ``HUBMERGE_KERNELS=0``, a tensor is not a contiguous bfloat16 or float32 CPU tensor, or there
are more models than the kernels hold. The caller then runs the torch path, which computes the same float32
operations in the same order; tests/test_kernels.py holds the two to bit-equal results. :func:`gram` is the
exception: a float64 sum over a whole tensor, agreeing with the torch path's to the last bits of a float64.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from types import ModuleType

from hubmerge._torch import torch

log = logging.getLogger(__name__)

_ABI = 4  # the _kernels.c interface this module calls (its ABI constant)
_TYPES = {"torch.bfloat16": 0, "torch.float32": 1}  # by name: building this imports no torch


def _load() -> tuple[ModuleType | None, str]:
    if os.environ.get("HUBMERGE_KERNELS", "1").strip().lower() in ("0", "false", "no", "off"):
        return None, "off"
    try:
        from hubmerge import _kernels  # type: ignore[attr-defined]
    except ImportError:
        return None, "not built"
    if getattr(_kernels, "ABI", None) != _ABI:
        # A build left over from another version of _kernels.c (an editable install not rebuilt).
        log.warning("hubmerge: the compiled kernels are stale; rebuild them with `pip install -e .`")
        return None, "not built"
    return _kernels, str(_kernels.VARIANT)


_K, _VARIANT = _load()


def available() -> bool:
    """Whether the fused kernels are built and enabled."""
    return _K is not None


def variant() -> str:
    """Which kernels run: ``avx2+fma`` or ``baseline``; ``off`` (HUBMERGE_KERNELS=0) or ``not built``."""
    return _VARIANT if _K is not None else ("off" if _VARIANT == "off" else "not built")


def _fits(tensors: Sequence[torch.Tensor], numel: int) -> bool:
    return all(
        t.device.type == "cpu" and str(t.dtype) in _TYPES and t.is_contiguous() and t.numel() == numel
        for t in tensors
    )


def _addresses(tensors: Sequence[torch.Tensor]) -> tuple[list[int], list[int]]:
    """The tensors' data addresses and element-type codes, as the C functions take them."""
    return [t.data_ptr() for t in tensors], [_TYPES[str(t.dtype)] for t in tensors]


def _usable(inputs: Sequence[torch.Tensor], others: Sequence[torch.Tensor]) -> bool:
    if _K is None or not 1 <= len(inputs) <= _K.MAX_MODELS:
        return False
    return _fits([*inputs, *others], inputs[0].numel())


def _lanes_fit(lanes: Sequence[torch.Tensor | None], n: int) -> bool:
    return all(
        lane is None or (lane.dtype == torch.int16 and lane.is_contiguous() and lane.numel() == n)
        for lane in lanes
    )


def ties_hist(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    level: int,
    prefixes: Sequence[int],
    skip: Sequence[bool],
) -> torch.Tensor | None:
    """Per model, the 65536-bin histogram of one 16-bit level of ``|x - base|``'s float32 bit pattern.

    Level 0 counts the top 16 bits of every entry; level 1 the low 16 bits of the entries whose top 16 bits
    equal that model's prefix. The result is that of :func:`hubmerge.methods.blocks` ``_ties_step``.

    Args:
        tensors: one span of each model's tensor.
        base: the same span of the base tensor.
        level: 0 or 1.
        prefixes: per model, the top 16 bits that level 1 looks inside.
        skip: per model, leave its row zero (its threshold is known).

    Returns:
        An int64 tensor of shape (models, 65536), or None where the kernels cannot run.
    """
    if level not in (0, 1) or not _usable(tensors, [base]):
        return None
    assert _K is not None
    hist = torch.zeros((len(tensors), 1 << 16), dtype=torch.int64)
    _K.ties_hist(
        base.numel(),
        *_addresses(tensors),
        base.data_ptr(),
        _TYPES[str(base.dtype)],
        level,
        [int(p) for p in prefixes],
        [bool(s) for s in skip],
        hist.data_ptr(),
    )
    return hist


def ties_merge(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    out: torch.Tensor,
    *,
    thresholds: Sequence[float],
    weights: Sequence[float],
    lambda_: float,
    normalize: bool,
    scales: Sequence[float] | None = None,
    lanes: Sequence[torch.Tensor | None] | None = None,
    cuts: Sequence[int] | None = None,
) -> bool:
    """TIES into ``out`` (bfloat16 or float32), as :func:`hubmerge.methods.blocks.ties_block`; with ``lanes``,
    DARE-TIES as :func:`hubmerge.methods.task_vectors.dare_ties`.

    Args:
        tensors: one span of each model's tensor.
        base: the same span of the base tensor.
        out: where the merged span goes, cast to its dtype.
        thresholds: per model, the smallest magnitude kept (NaN: none).
        weights: per model, what agreeing entries are divided by (``normalize``).
        lambda_: scale of the merged task vector.
        normalize: divide by the summed weights of the agreeing models.
        scales: per model, the factor of its kept entries; None: ``weights``.
        lanes: per model, None or an int16 tensor of one random lane per entry (DARE's drop).
        cuts: per model with lanes, the bound a lane must be below for its entry to be kept.

    Returns:
        Whether the kernel ran; if False ``out`` is untouched.
    """
    if not _usable(tensors, [base, out]):
        return False
    m, n = len(tensors), base.numel()
    lanes = lanes if lanes is not None else [None] * m
    if not _lanes_fit(lanes, n):
        return False
    assert _K is not None
    _K.ties_merge(
        n,
        *_addresses(tensors),
        base.data_ptr(),
        _TYPES[str(base.dtype)],
        [float(t) for t in thresholds],
        [float(w) for w in (scales if scales is not None else weights)],
        [0 if lane is None else lane.data_ptr() for lane in lanes],
        [int(c) for c in (cuts if cuts is not None else [0] * m)],
        [float(w) for w in weights],
        float(lambda_),
        bool(normalize),
        out.data_ptr(),
        _TYPES[str(out.dtype)],
    )
    return True


def weighted_sum(
    tensors: Sequence[torch.Tensor], coefficients: Sequence[float], out: torch.Tensor, divisor: float = 1.0
) -> bool:
    """``sum_i coefficients[i] * tensors[i] / divisor`` into ``out``, as
    :func:`hubmerge.methods.basic.weighted_sum` (then ``div_(divisor)`` unless it is 1).

    Args:
        tensors: one span of each input.
        coefficients: one finite float per input.
        out: where the sum goes, cast to its dtype.
        divisor: divides the sum (as float32) unless it is 1.

    Returns:
        Whether the kernel ran; if False ``out`` is untouched.
    """
    if not _usable(tensors, [out]) or not all(math.isfinite(c) for c in [*coefficients, divisor]):
        return False
    assert _K is not None
    _K.weighted_sum(
        out.numel(),
        *_addresses(tensors),
        [float(c) for c in coefficients],
        float(divisor),
        out.data_ptr(),
        _TYPES[str(out.dtype)],
    )
    return True


def dare_sum(
    tensors: Sequence[torch.Tensor],
    base: torch.Tensor,
    out: torch.Tensor,
    *,
    lanes: Sequence[torch.Tensor | None],
    cuts: Sequence[int],
    keeps: Sequence[float],
    values: Sequence[float],
) -> bool:
    """DARE-linear into ``out``, as :func:`hubmerge.methods.task_vectors.dare_linear`: ``base`` plus, per
    model, ``(value * (x - base)) * keep``.

    Args:
        tensors: one span of each model's tensor.
        base: the same span of the base tensor.
        out: where the sum goes, cast to its dtype.
        lanes: per model, None or an int16 tensor of one random lane per entry.
        cuts: per model with lanes, the bound a lane must be below for its entry to be kept.
        keeps: per model without lanes, the keep mask's one value (1 or 0).
        values: per model, the factor of its kept task vector.

    Returns:
        Whether the kernel ran; if False ``out`` is untouched.
    """
    n = base.numel()
    if not _usable(tensors, [base, out]) or not all(math.isfinite(v) for v in values):
        return False
    if not _lanes_fit(lanes, n):
        return False
    assert _K is not None
    _K.dare_sum(
        n,
        *_addresses(tensors),
        base.data_ptr(),
        _TYPES[str(base.dtype)],
        [0 if lane is None else lane.data_ptr() for lane in lanes],
        [int(c) for c in cuts],
        [float(k) for k in keeps],
        [float(v) for v in values],
        out.data_ptr(),
        _TYPES[str(out.dtype)],
    )
    return True


def gram(tensors: Sequence[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor | None:
    """The dot products ``d_i . d_j`` (``i <= j``) of ``d_k = x_k - base``, or of the ``x_k`` without a base.

    Each ``d_k`` is computed in float32 as torch subtracts; products and sums are float64. The statistics of
    :data:`hubmerge.methods.blocks.SLERP_PASSES` and ``STOCK_PASSES``.

    Args:
        tensors: one span of each model's tensor.
        base: the same span of the base tensor, or None.

    Returns:
        A float64 tensor of shape (models, models), the upper triangle and the diagonal filled and the rest
        zero, or None where the kernels cannot run.
    """
    if not _usable(tensors, [] if base is None else [base]):
        return None
    assert _K is not None
    out = torch.zeros((len(tensors), len(tensors)), dtype=torch.float64)
    _K.gram(
        tensors[0].numel(),
        *_addresses(tensors),
        0 if base is None else base.data_ptr(),
        0 if base is None else _TYPES[str(base.dtype)],
        out.data_ptr(),
    )
    return out
