"""Block-by-block forms of the methods that need whole-tensor quantities: TIES, SLERP and Model Stock.

Each method becomes one or more :class:`Pass` es that read the tensor in blocks and reduce it to a few numbers
(a histogram of magnitudes, norms and dot products), then an elementwise ``*_block`` function that merges
each block with them. Memory is then a few blocks whatever the tensor's size, and the result is the
whole-tensor function's: the TIES threshold is found exactly, the norms agree up to float rounding.

The TIES threshold, the ``k``-th largest ``|x - base|``, is found without sorting or holding the tensor:
non-negative IEEE floats order like their bit patterns read as integers, so a histogram of the top 16 bits
finds the 16-bit prefix of the threshold and the rank left inside it, a histogram of the next 16 bits among
the entries with that prefix refines it, and after ``bits / 16`` passes the prefix is the threshold itself.
Keys starting with ``_`` are the passes' working state and are not given to the block function.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

from hubmerge import kernels
from hubmerge._torch import torch
from hubmerge.methods.geometric import slerp_mix, stock_coefficients, stock_mix, stock_ratio
from hubmerge.methods.spec import Pass, check_count, check_densities, per_model
from hubmerge.methods.task_vectors import disjoint_merge, elect_sign, kept, prune_at_

LEVEL_BITS = 16


def _int_type(size: int) -> torch.dtype:
    """The signed integer dtype of ``size`` bytes."""
    return {2: torch.int16, 4: torch.int32, 8: torch.int64}[size]


def _magnitude_bits(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|x - base|`` as a flat tensor of integer bit patterns, which order like the magnitudes."""
    delta = torch.sub(x, base).abs_()
    return delta.view(_int_type(delta.element_size())).reshape(-1)


def _ties_step(level: int) -> Any:
    def step(
        tensors: Sequence[torch.Tensor], base: torch.Tensor | None, kwargs: Mapping[str, Any]
    ) -> torch.Tensor:
        """Per model, a histogram of the ``level``-th 16 bits of the magnitudes matching the prefix."""
        assert base is not None  # ties needs a base; the registry says so
        hist = torch.zeros((len(tensors), 1 << LEVEL_BITS), dtype=torch.int64, device=base.device)
        done = kwargs.get("_ties_done")
        for i, x in enumerate(tensors):
            if done is not None and done[i]:
                continue
            keys = _magnitude_bits(x, base)
            shift = keys.element_size() * 8 - LEVEL_BITS * (level + 1)
            if shift:
                keys.bitwise_right_shift_(shift)
            if level == 0:
                hist[i] += torch.bincount(keys, minlength=1 << LEVEL_BITS)
            else:
                # Entries with the prefix go to bins 1 to 2**16, the others to the spare bins at either end.
                keys.sub_((kwargs["_ties_prefixes"][i] << LEVEL_BITS) - 1).clamp_(0, (1 << LEVEL_BITS) + 1)
                hist[i] += torch.bincount(keys, minlength=(1 << LEVEL_BITS) + 2)[1:-1]
        return hist

    return step


def _ties_kernel(level: int) -> Any:
    def kernel(
        tensors: Sequence[torch.Tensor], base: torch.Tensor | None, kwargs: Mapping[str, Any]
    ) -> torch.Tensor | None:
        """``step`` on a span of stored rows, by the fused kernel (float32 magnitudes: levels 0 and 1)."""
        if base is None or level > 1:
            return None
        prefixes = kwargs.get("_ties_prefixes", [0] * len(tensors))
        done = kwargs.get("_ties_done", [False] * len(tensors))
        return kernels.ties_hist(tensors, base, level, prefixes, done)

    return kernel


def _ties_finish(level: int) -> Any:
    def finish(
        total: torch.Tensor, numel: int, dtype: torch.dtype, kwargs: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Narrow each threshold to the bucket holding its rank; set it once every bit is known."""
        n = total.shape[0]
        if level == 0:
            densities = per_model(kwargs.get("densities"), n, 0.5, "density")
            check_densities(densities)
            ranks = [kept(d, numel) for d in densities]
            prefixes = [0] * n
            thresholds: list[float | None] = [
                0.0 if k >= numel else float("nan") if k <= 0 else None for k in ranks
            ]
        else:
            ranks, prefixes = list(kwargs["_ties_ranks"]), list(kwargs["_ties_prefixes"])
            thresholds = list(kwargs["_ties_thresholds"])
        last = LEVEL_BITS * (level + 1) == torch.finfo(dtype).bits
        for i in range(n):
            if thresholds[i] is not None:
                continue
            at_least = total[i].flip(0).cumsum(0).flip(0)
            bucket = int((at_least >= ranks[i]).sum()) - 1
            above = int(at_least[bucket + 1]) if bucket + 1 < at_least.numel() else 0
            ranks[i] -= above
            prefixes[i] = (prefixes[i] << LEVEL_BITS) | bucket
            if last:
                bits = torch.tensor([prefixes[i]], dtype=_int_type(torch.finfo(dtype).bits // 8))
                thresholds[i] = float(bits.view(dtype))
        return _ties_state(ranks, prefixes, thresholds)

    return finish


def _ties_state(ranks: list[int], prefixes: list[int], thresholds: list[float | None]) -> dict[str, Any]:
    state: dict[str, Any] = {
        "_ties_ranks": ranks,
        "_ties_prefixes": prefixes,
        "_ties_thresholds": thresholds,
        "_ties_done": [t is not None for t in thresholds],
    }
    if all(t is not None for t in thresholds):
        state["thresholds"] = thresholds
    return state


def _ties_pending(kwargs: Mapping[str, Any]) -> bool:
    return "thresholds" not in kwargs


# Four passes cover float64; float32 needs two, and the others find the thresholds known already.
TIES_PASSES = tuple(
    Pass(_ties_step(level), _ties_finish(level), _ties_pending, _ties_kernel(level))
    for level in range(64 // LEVEL_BITS)
)


def ties_block(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    thresholds: Sequence[float],
    weights: Sequence[float] | None = None,
    densities: Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """TIES on one block, with each model's magnitude threshold found by :data:`TIES_PASSES`.

    Args:
        tensors: one block of each fine-tuned tensor.
        base: the same block of the base tensor.
        thresholds: per model, the smallest magnitude kept (NaN: none).
        weights: as for :func:`~hubmerge.methods.task_vectors.ties`.
        densities: unused here; they set the thresholds.
        lambda_: scale of the merged task vector.
        normalize: divide by the summed weights of the agreeing models.

    Returns:
        A new tensor.
    """
    check_count(tensors, "ties", 1)
    ws = per_model(weights, len(tensors), 1.0, "weight")
    scratch = torch.empty_like(base)
    deltas = [
        prune_at_(torch.sub(x, base), t, w, scratch) for x, w, t in zip(tensors, ws, thresholds, strict=True)
    ]
    merged = disjoint_merge(deltas, ws, elect_sign(deltas), normalize, scratch)
    return torch.add(base, merged, alpha=lambda_, out=merged)


def ties_kernel(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, out: torch.Tensor, kwargs: Mapping[str, Any]
) -> bool:
    """:func:`ties_block` on a span of stored rows, into ``out``, by the fused kernel; False if it cannot."""
    if base is None:
        return False
    return kernels.ties_merge(
        tensors,
        base,
        out,
        thresholds=kwargs["thresholds"],
        weights=per_model(kwargs.get("weights"), len(tensors), 1.0, "weight"),
        lambda_=kwargs.get("lambda_", 1.0),
        normalize=kwargs.get("normalize", True),
    )


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # In float64, where each product of two float32 values is exact: the fused kernel (kernels.gram) sums in
    # float64 too, so the two paths agree to the last bits of a float64 and give the same weights.
    return torch.dot(a.reshape(-1).double(), b.reshape(-1).double())


def _slerp_step(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, kwargs: Mapping[str, Any]
) -> torch.Tensor:
    a, b = tensors
    return torch.stack([_dot(a, a), _dot(b, b), _dot(a, b)])


def _slerp_finish(
    total: torch.Tensor, numel: int, dtype: torch.dtype, kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    from hubmerge.methods.geometric import slerp_coefficients

    aa, bb, ab = (float(v) for v in total)
    cos = None if aa == 0.0 or bb == 0.0 else min(1.0, max(-1.0, ab / (math.sqrt(aa) * math.sqrt(bb))))
    return {"coefficients": slerp_coefficients(cos, kwargs["t"], kwargs.get("eps", 5e-4))}


def _slerp_gram(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, kwargs: Mapping[str, Any]
) -> torch.Tensor | None:
    """:func:`_slerp_step`'s sum over a span by the fused Gram kernel; None where it cannot run."""
    gram = kernels.gram(tensors, None)
    return None if gram is None else torch.stack([gram[0, 0], gram[1, 1], gram[0, 1]])


SLERP_PASSES = (Pass(_slerp_step, _slerp_finish, kernel=_slerp_gram),)


def slerp_block(
    tensors: Sequence[torch.Tensor], *, t: float, coefficients: tuple[float, float] | None, eps: float = 5e-4
) -> torch.Tensor:
    """SLERP on one block, with the weights :data:`SLERP_PASSES` found from the whole tensors' angle.

    Args:
        tensors: one block of A and of B.
        t: position along the arc (used by the linear fallback).
        coefficients: the weights of A and B, None for linear interpolation.
        eps: unused here; it chose the fallback.

    Returns:
        A new tensor.
    """
    check_count(tensors, "slerp", 2, 2)
    return slerp_mix(tensors, coefficients, t)


def slerp_kernel(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, out: torch.Tensor, kwargs: Mapping[str, Any]
) -> bool:
    """:func:`slerp_block` into ``out`` by the fused weighted-sum kernel; False if it cannot run.

    Only SLERP's mix is fused, a weighted sum with the arc's two weights; the linear fallback (``lerp``,
    rounded differently) stays on the torch path.
    """
    coefficients = kwargs["coefficients"]
    return coefficients is not None and kernels.weighted_sum(tensors, list(coefficients), out)


def _stock_step(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, kwargs: Mapping[str, Any]
) -> torch.Tensor:
    """The Gram matrix of the task vectors' blocks: their squared norms and pairwise dot products."""
    assert base is not None  # model_stock needs a base; the registry says so
    deltas = [torch.sub(x, base).reshape(-1) for x in tensors]
    gram = torch.zeros((len(deltas), len(deltas)), dtype=torch.float64, device=base.device)
    for i, j in combinations(range(len(deltas)), 2):
        gram[i, j] = _dot(deltas[i], deltas[j])
    for i, d in enumerate(deltas):
        gram[i, i] = _dot(d, d)
    return gram


def _stock_finish(
    total: torch.Tensor, numel: int, dtype: torch.dtype, kwargs: Mapping[str, Any]
) -> dict[str, Any]:
    n = total.shape[0]
    norms = [float(total[i, i]) ** 0.5 for i in range(n)]
    dots = {(i, j): float(total[i, j]) for i, j in combinations(range(n), 2)}
    return {"ratio": stock_ratio(norms, dots)}


def _stock_gram(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, kwargs: Mapping[str, Any]
) -> torch.Tensor | None:
    """:func:`_stock_step`'s sum over a span by the fused Gram kernel; None where it cannot run."""
    return None if base is None else kernels.gram(tensors, base)


STOCK_PASSES = (Pass(_stock_step, _stock_finish, kernel=_stock_gram),)


def model_stock_block(tensors: Sequence[torch.Tensor], *, base: torch.Tensor, ratio: float) -> torch.Tensor:
    """Model Stock on one block, with the ratio :data:`STOCK_PASSES` found from the whole task vectors.

    Args:
        tensors: one block of each fine-tuned tensor.
        base: the same block of the base tensor.
        ratio: how far to move from the base toward the models' mean.

    Returns:
        A new tensor.
    """
    check_count(tensors, "model_stock", 2)
    return stock_mix(tensors, base, ratio)


def model_stock_kernel(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, out: torch.Tensor, kwargs: Mapping[str, Any]
) -> bool:
    """:func:`model_stock_block` into ``out`` by the fused weighted-sum kernel; False if it cannot run."""
    if base is None:
        return False
    return kernels.weighted_sum([base, *tensors], stock_coefficients(len(tensors), kwargs["ratio"]), out)
