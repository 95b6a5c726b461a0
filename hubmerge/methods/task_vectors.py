"""Merges of task vectors (``model - base``): task arithmetic, TIES and DARE.

TIES and DARE-TIES are composed from named primitives: sparsify each task vector (``magnitude_prune_``,
or ``keep_mask_`` and ``rescale``), ``elect_sign`` per element, then ``disjoint_merge`` the entries that
agree with it.
Functions ending in ``_`` write into tensors this module allocated itself, never into the inputs.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from hubmerge import kernels
from hubmerge._torch import torch
from hubmerge.methods.basic import weighted_sum
from hubmerge.methods.spec import check_count, check_densities, normalizer, per_model


def _radix(size: int) -> tuple[torch.dtype, int]:
    """The integer type of a float width, and the right shift that keeps its top 15 to 20 bits as a bucket."""
    return {2: (torch.int16, 0), 4: (torch.int32, 16), 8: (torch.int64, 44)}[size]


_LANES = 1 << 16  # values of one 16-bit lane of a random draw


def kth_largest_magnitude(values: torch.Tensor, k: int, scratch: torch.Tensor) -> torch.Tensor:
    """The k-th largest absolute value of a float tensor, without sorting it.

    Args:
        values: a float tensor.
        k: rank from the top, 1 <= k <= numel.
        scratch: a contiguous tensor like ``values`` to work in; overwritten.

    Returns:
        A 0-d tensor holding the magnitude.
    """
    int_dtype, shift = _radix(values.element_size())
    # Non-negative IEEE floats order like their bit patterns read as integers, so one histogram pass over
    # the top bits finds the bucket holding the k-th largest magnitude; only that small bucket is then
    # selected. kthvalue or topk over the whole tensor are several times slower on CPU.
    buckets = torch.abs(values, out=scratch).view(int_dtype).reshape(-1).bitwise_right_shift_(shift)
    at_least = torch.bincount(buckets).flip(0).cumsum(0).flip(0)
    bucket = int((at_least >= k).sum()) - 1
    above = int(at_least[bucket + 1]) if bucket + 1 < at_least.numel() else 0
    candidates = values.reshape(-1)[buckets == bucket].abs_()
    return torch.kthvalue(candidates, candidates.numel() - (k - above) + 1).values


def kept(density: float, numel: int) -> int:
    """How many entries of ``numel`` TIES keeps at ``density``: ``int(density * numel)``, at least one.

    mergekit's count (PEFT's too, but for the one), so a merge with no magnitudes tied at the threshold
    keeps the same entries; density 0 keeps none, density 1 all.
    """
    if density >= 1.0:
        return numel
    if density <= 0.0 or numel == 0:
        return 0
    return max(1, int(density * numel))


def magnitude_prune_(
    delta: torch.Tensor, density: float, scale: float, scratch: torch.Tensor
) -> torch.Tensor:
    """Keep the ``density`` fraction of entries largest in magnitude, zero the rest, multiply by ``scale``.

    :func:`kept` entries are kept; entries tied with the smallest kept magnitude are kept too.

    Args:
        delta: a task vector this module owns; overwritten.
        density: fraction of entries to keep, in [0, 1].
        scale: factor applied to the kept entries (folded in to save a pass).
        scratch: a contiguous tensor like ``delta`` to work in; overwritten.

    Returns:
        ``delta``.
    """
    n = delta.numel()
    k = kept(density, n)
    if k >= n:
        return delta.mul_(scale)
    if k <= 0:
        return delta.zero_()
    return prune_at_(delta, kth_largest_magnitude(delta, k, scratch), scale, scratch)


def prune_at_(
    delta: torch.Tensor, threshold: float | torch.Tensor, scale: float, scratch: torch.Tensor
) -> torch.Tensor:
    """Zero the entries of ``delta`` smaller in magnitude than ``threshold``, multiply the rest by ``scale``.

    Args:
        delta: a task vector (or block of one) this module owns; overwritten.
        threshold: the smallest magnitude kept; NaN keeps nothing.
        scale: factor applied to the kept entries.
        scratch: a contiguous tensor like ``delta`` to work in; overwritten.

    Returns:
        ``delta``.
    """
    if isinstance(threshold, float) and math.isnan(threshold):
        return delta.zero_()
    keep = torch.abs(delta, out=scratch).ge_(threshold)
    return delta.mul_(keep if scale == 1.0 else keep.mul_(scale))


def keep_mask_(scratch: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """DARE's random mask: 1.0 with probability ``density`` (rounded to a multiple of 2**-16), else 0.0.

    Each 64-bit draw from the generator gives four 16-bit lanes, each compared with the density's cut:
    a quarter of the draws of one uniform float per entry, and the random numbers are the slow part of DARE.

    Args:
        scratch: a contiguous tensor shaped like the task vector; overwritten with the mask.
        density: keep probability, in [0, 1].
        generator: the only source of randomness; ``ceil(numel / 4)`` 64-bit draws are taken from it.

    Returns:
        ``scratch``.
    """
    cut = round(density * _LANES)
    if cut >= _LANES:
        return scratch.fill_(1.0)
    if cut <= 0:
        return scratch.zero_()
    n = scratch.numel()
    draws = torch.empty((n + 3) // 4, dtype=torch.int64, device=scratch.device)
    lanes = draws.random_(-(2**63), None, generator=generator).view(torch.int16)[:n].view(scratch.shape)
    return torch.lt(lanes, cut - _LANES // 2, out=scratch)


def rescale(density: float) -> float:
    """DARE's factor for the entries that survive the drop: one over the probability they had to survive.

    That probability is the density rounded to 1/65536 (:func:`dare_mask` compares 16-bit lanes), so the
    kept entries' expected sum is the task vector's whatever the density; ``1 / density`` itself would
    overshoot at tiny densities (1.5x at 1e-5, where the cut rounds up to 1 in 65536).

    Args:
        density: keep probability, in [0, 1].

    Returns:
        ``65536 / cut`` for the mask's cut, 1 when every entry is kept, 0 when none is.
    """
    cut = min(round(density * _LANES), _LANES)
    return _LANES / cut if cut > 0 else 0.0


def elect_sign(weighted_deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per element, the elected sign: +1 where the weighted task vectors sum to >= 0, else -1 (0 for NaN).

    A sum of exactly 0 (opposite entries cancelling, common with bfloat16 inputs and weights like 0.5) elects
    +1, as mergekit and PEFT elect it, so that a mergekit TIES config merges to mergekit's numbers; entries
    that are 0 agree with no sign and are never summed.

    Args:
        weighted_deltas: one weighted, sparsified task vector per model.

    Returns:
        A new tensor of signs, in the deltas' dtype.
    """
    total = weighted_deltas[0].clone()
    for delta in weighted_deltas[1:]:
        total.add_(delta)
    negative = (total < 0).to(total.dtype)
    return total.ge_(0).sub_(negative)


def disjoint_merge(
    weighted_deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    sign: torch.Tensor,
    normalize: bool,
    scratch: torch.Tensor,
) -> torch.Tensor:
    """Sum the entries whose sign agrees with ``sign``, optionally divided by the agreeing models' weights.

    Args:
        weighted_deltas: one weighted, sparsified task vector per model.
        weights: the weights already multiplied into ``weighted_deltas``.
        sign: the elected sign per element.
        normalize: divide each element by the sum of the weights of the models agreeing there.
        scratch: a tensor like ``sign`` to work in; overwritten.

    Returns:
        A new tensor.
    """
    out: torch.Tensor | None = None
    divisor: torch.Tensor | None = None
    for delta, weight in zip(weighted_deltas, weights, strict=True):
        agree = torch.sign(delta, out=scratch).eq_(sign)
        if out is None:
            out = torch.mul(delta, agree)
            divisor = torch.mul(agree, weight) if normalize else None
            continue
        out.addcmul_(delta, agree)
        if divisor is not None:
            divisor.add_(agree, alpha=weight)
    assert out is not None  # at least one model
    if divisor is not None:
        # Where no model agrees the sum is 0 already; dividing by 1 keeps it 0 instead of NaN.
        out.div_(divisor.add_(divisor == 0))
    return out


def task_arithmetic(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    weights: Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """``base + lambda * sum_i w_i * (x_i - base)``, the sum divided by ``sum_i w_i`` when ``normalize``.

    Args:
        tensors: one or more fine-tuned tensors.
        base: the base model's tensor.
        weights: one weight per model; None means 1.0 each.
        lambda_: scale of the summed task vectors.
        normalize: divide the weighted sum by the sum of the weights.

    Returns:
        A new tensor.

    Raises:
        ValueError: no tensors, a wrong number of weights, or weights summing to 0 with ``normalize``.
    """
    check_count(tensors, "task_arithmetic", 1)
    return weighted_sum([base, *tensors], _task_coefficients(len(tensors), weights, lambda_, normalize))


def _task_coefficients(
    n: int, weights: Sequence[float] | None, lambda_: float, normalize: bool
) -> list[float]:
    """Coefficients of [base, x_1, ...]: task arithmetic expanded to ``(1 - sum c_i) * base + sum c_i * x_i``.

    One pass per model and no task-vector temporaries; the cancellation costs a few float32 ulps, below the
    precision of any half-precision output.
    """
    ws = per_model(weights, n, 1.0, "weight")
    scale = lambda_ / normalizer(ws, "task_arithmetic") if normalize else lambda_
    coefficients = [scale * w for w in ws]
    return [1.0 - sum(coefficients), *coefficients]


def task_arithmetic_kernel(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, out: torch.Tensor, kwargs: Mapping[str, Any]
) -> bool:
    """:func:`task_arithmetic` into ``out`` by the fused kernel; False if it cannot run."""
    if base is None:
        return False
    coefficients = _task_coefficients(
        len(tensors), kwargs.get("weights"), kwargs.get("lambda_", 1.0), kwargs.get("normalize", False)
    )
    return kernels.weighted_sum([base, *tensors], coefficients, out)


def ties(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    weights: Sequence[float] | None = None,
    densities: Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """TIES-merging: trim each task vector by magnitude, elect a sign per element, merge the agreeing entries.

    Args:
        tensors: one or more fine-tuned tensors.
        base: the base model's tensor.
        weights: one weight per model; None means 1.0 each. Signs are elected on the weighted task vectors.
        densities: fraction of each task vector kept, per model; None means 0.5 each.
        lambda_: scale of the merged task vector.
        normalize: divide each element by the sum of the weights of the models agreeing with its sign.

    Returns:
        A new tensor ``base + lambda * merged``.

    Raises:
        ValueError: no tensors, wrong number of weights or densities, or a density outside [0, 1].
    """
    check_count(tensors, "ties", 1)
    ws = per_model(weights, len(tensors), 1.0, "weight")
    ds = per_model(densities, len(tensors), 0.5, "density")
    check_densities(ds)
    scratch = torch.empty_like(base)
    deltas = [
        magnitude_prune_(torch.sub(x, base), d, w, scratch) for x, w, d in zip(tensors, ws, ds, strict=True)
    ]
    merged = disjoint_merge(deltas, ws, elect_sign(deltas), normalize, scratch)
    return torch.add(base, merged, alpha=lambda_, out=merged)


def dare_linear(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    generator: torch.Generator,
    weights: Sequence[float] | None = None,
    densities: Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = False,
) -> torch.Tensor:
    """DARE: randomly drop task-vector entries, rescale the survivors, then add them like task arithmetic.

    Args:
        tensors: one or more fine-tuned tensors.
        base: the base model's tensor.
        generator: source of the drop masks, drawn for model 0 first, then model 1, ...
        weights: one weight per model; None means 1.0 each.
        densities: keep probability per model; None means 0.5 each. Survivors are scaled by 1/density.
        lambda_: scale of the summed task vectors.
        normalize: divide the weighted sum by the sum of the weights.

    Returns:
        A new tensor.

    Raises:
        ValueError: no tensors, wrong number of weights or densities, a density outside [0, 1], or
            weights summing to 0 with ``normalize``.
    """
    check_count(tensors, "dare_linear", 1)
    ws = per_model(weights, len(tensors), 1.0, "weight")
    ds = per_model(densities, len(tensors), 0.5, "density")
    check_densities(ds)
    scale = lambda_ / normalizer(ws, "dare_linear") if normalize else lambda_
    out = base.clone()
    delta = torch.empty_like(base)
    scratch = torch.empty_like(base)
    for x, w, d in zip(tensors, ws, ds, strict=True):
        keep = keep_mask_(scratch, d, generator)
        out.addcmul_(torch.sub(x, base, out=delta), keep, value=scale * w * rescale(d))
    return out


def dare_ties(
    tensors: Sequence[torch.Tensor],
    *,
    base: torch.Tensor,
    generator: torch.Generator,
    weights: Sequence[float] | None = None,
    densities: Sequence[float] | None = None,
    lambda_: float = 1.0,
    normalize: bool = True,
) -> torch.Tensor:
    """DARE's random drop and rescale, then TIES sign election and disjoint merge.

    Args:
        tensors: one or more fine-tuned tensors.
        base: the base model's tensor.
        generator: source of the drop masks, drawn for model 0 first, then model 1, ...
        weights: one weight per model; None means 1.0 each.
        densities: keep probability per model; None means 0.5 each. Survivors are scaled by 1/density.
        lambda_: scale of the merged task vector.
        normalize: divide each element by the sum of the weights of the models agreeing with its sign.

    Returns:
        A new tensor ``base + lambda * merged``.

    Raises:
        ValueError: no tensors, wrong number of weights or densities, or a density outside [0, 1].
    """
    check_count(tensors, "dare_ties", 1)
    ws = per_model(weights, len(tensors), 1.0, "weight")
    ds = per_model(densities, len(tensors), 0.5, "density")
    check_densities(ds)
    scratch = torch.empty_like(base)
    deltas = []
    for x, w, d in zip(tensors, ws, ds, strict=True):
        keep = keep_mask_(scratch, d, generator)
        deltas.append(torch.sub(x, base).mul_(keep.mul_(w * rescale(d))))
    merged = disjoint_merge(deltas, ws, elect_sign(deltas), normalize, scratch)
    return torch.add(base, merged, alpha=lambda_, out=merged)


def _dare_blocks(
    base: torch.Tensor, cuts: Sequence[int], kwargs: Mapping[str, Any]
) -> Iterator[tuple[slice, list[torch.Tensor | None]]]:
    """Per block of the span a kernel merges: its rows and each model's random lanes (None: no draw).

    The run draws per block: ``_seeds`` holds one seed per block of ``_block`` rows. Each block's lanes come
    from a generator seeded with it, drawn model after model exactly as :func:`keep_mask_` draws them.
    """
    rows = kwargs["_block"]
    for i, seed in enumerate(kwargs["_seeds"]):
        span = slice(i * rows, (i + 1) * rows)
        generator = torch.Generator(device=base.device)
        generator.manual_seed(seed)
        numel = base[span].numel()
        lanes: list[torch.Tensor | None] = []
        for cut in cuts:
            if 0 < cut < _LANES:
                draws = torch.empty((numel + 3) // 4, dtype=torch.int64, device=base.device)
                lanes.append(draws.random_(-(2**63), None, generator=generator).view(torch.int16)[:numel])
            else:
                lanes.append(None)
        yield span, lanes


def _dare_setup(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, kwargs: Mapping[str, Any]
) -> tuple[list[float], list[float], list[int]] | None:
    """Weights, densities and lane cuts for a DARE kernel; None where the torch path must run."""
    if base is None or "_seeds" not in kwargs:
        return None
    ws = per_model(kwargs.get("weights"), len(tensors), 1.0, "weight")
    ds = per_model(kwargs.get("densities"), len(tensors), 0.5, "density")
    check_densities(ds)
    cuts = [round(d * _LANES) for d in ds]
    if any(cut <= 0 < d for cut, d in zip(cuts, ds, strict=True)):
        return None  # a density under half a lane keeps nothing, at 1/density: left to the torch path
    return ws, ds, cuts


def dare_ties_kernel(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, out: torch.Tensor, kwargs: Mapping[str, Any]
) -> bool:
    """:func:`dare_ties` on a span of stored rows, into ``out``, by the fused kernel; False if it cannot.

    Each block's masks are drawn as :func:`dare_ties` draws them (:func:`_dare_blocks`); the kernel does the
    rest in one pass with the same float32 operations.
    """
    setup = _dare_setup(tensors, base, kwargs)
    if setup is None:
        return False
    assert base is not None
    ws, ds, cuts = setup
    scales = [w * rescale(d) if cut > 0 else 0.0 for w, d, cut in zip(ws, ds, cuts, strict=True)]
    for span, lanes in _dare_blocks(base, cuts, kwargs):
        if not kernels.ties_merge(
            [x[span] for x in tensors],
            base[span],
            out[span],
            thresholds=[0.0] * len(tensors),  # every magnitude: DARE drops at random instead
            weights=ws,
            lambda_=kwargs.get("lambda_", 1.0),
            normalize=kwargs.get("normalize", True),
            scales=scales,
            lanes=lanes,
            cuts=[cut - _LANES // 2 for cut in cuts],
        ):
            return False  # the same checks fail on every block: this is the first
    return True


def dare_linear_kernel(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None, out: torch.Tensor, kwargs: Mapping[str, Any]
) -> bool:
    """:func:`dare_linear` on a span of stored rows, into ``out``, by the fused kernel; False if it cannot."""
    setup = _dare_setup(tensors, base, kwargs)
    if setup is None:
        return False
    assert base is not None
    ws, ds, cuts = setup
    normalize, lambda_ = kwargs.get("normalize", False), kwargs.get("lambda_", 1.0)
    scale = lambda_ / normalizer(ws, "dare_linear") if normalize else lambda_
    for span, lanes in _dare_blocks(base, cuts, kwargs):
        if not kernels.dare_sum(
            [x[span] for x in tensors],
            base[span],
            out[span],
            lanes=lanes,
            cuts=[cut - _LANES // 2 for cut in cuts],
            keeps=[1.0 if cut >= _LANES else 0.0 for cut in cuts],
            values=[scale * w * rescale(d) for w, d in zip(ws, ds, strict=True)],
        ):
            return False  # the same checks fail on every block: this is the first
    return True
