"""Merge methods against hand-computed merges, their algebraic properties, and every row of METHODS."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from hubmerge.errors import RecipeError
from hubmerge.methods import METHODS, MethodSpec, get_method
from hubmerge.methods.basic import centroid, linear, weighted
from hubmerge.methods.geometric import dot64, model_stock, slerp
from hubmerge.methods.task_vectors import dare_linear, dare_ties, kth_largest_magnitude, task_arithmetic, ties

F64 = torch.float64
A = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
B = torch.tensor([[0.0, -2.0, 4.0], [1.0, 1.0, 1.0]], dtype=F64)
ONES = torch.ones(2, 3, dtype=F64)


def t64(rows: Sequence[Sequence[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=F64)


def randn(seed: int, shape: tuple[int, ...], count: int, dtype: torch.dtype = F64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=dtype) for _ in range(count)]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def call(spec: MethodSpec, tensors: list[torch.Tensor], base: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Call a registry row the way the engine does: every parameter at its default, ``t`` at 0.3."""
    kwargs: dict[str, object] = {}
    for p in spec.params:
        value = 0.3 if p.default is None else p.default
        kwargs[p.kwarg] = [value] * len(tensors) if p.per_model else value
    if spec.needs_base:
        kwargs["base"] = base
    if spec.random:
        kwargs["generator"] = gen(seed)
    return spec.fn(tensors, **kwargs)


def model_count(spec: MethodSpec) -> int:
    return spec.max_models if spec.max_models is not None else max(3, spec.min_models)


# --- hand-computed merges on 2x3 tensors ---------------------------------------------------------------


def test_linear_interpolates_and_extrapolates() -> None:
    assert_close(linear([A, B], t=0.25), t64([[0.75, 1.0, 3.25], [3.25, 4.0, 4.75]]))
    assert_close(linear([A, B], t=1.5), t64([[-0.5, -4.0, 4.5], [-0.5, -1.0, -1.5]]))


def test_weighted_with_and_without_normalize() -> None:
    assert_close(weighted([A, B], weights=[1.0, 3.0]), t64([[0.25, -1.0, 3.75], [1.75, 2.0, 2.25]]))
    expected = t64([[1.0, -4.0, 15.0], [7.0, 8.0, 9.0]])
    assert_close(weighted([A, B], weights=[1.0, 3.0], normalize=False), expected)


def test_weighted_rejects_zero_weight_sum_when_normalizing() -> None:
    with pytest.raises(ValueError, match="sum to 0"):
        weighted([A, B], weights=[1.0, -1.0])


def test_centroid_is_the_mean() -> None:
    c = t64([[2.0, 2.0, 2.0], [-5.0, 0.0, 3.0]])
    assert_close(centroid([A, B, c]), t64([[1.0, 2 / 3, 3.0], [0.0, 2.0, 10 / 3]]))


def test_task_arithmetic() -> None:
    base = t64([[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]])
    # task vectors: A - base = [[0,1,2],[2,3,4]], B - base = [[-1,-3,3],[-1,-1,-1]]
    got = task_arithmetic([A, B], base=base, weights=[1.0, 0.5], lambda_=2.0)
    assert_close(got, t64([[0.0, 0.0, 8.0], [5.0, 7.0, 9.0]]))
    got = task_arithmetic([A, B], base=base, weights=[1.0, 0.5], lambda_=2.0, normalize=True)
    assert_close(got, t64([[1 / 3, 1 / 3, 17 / 3], [4.0, 16 / 3, 20 / 3]]))


# Task vectors d1 = [[3,-1,.5],[-2,4,1]] and d2 = [[-1,-2,2.5],[4,3,-5]] on a base of ones. Density 0.5 keeps
# 3 of 6: [[3,0,0],[-2,4,0]] and [[0,0,0],[4,3,-5]]. With weights 1 and 2 the sum is [[3,0,0],[6,10,-10]], so
# the signs are [[+,0,0],[+,+,-]] and at (1,0) model 1's -2 disagrees and is dropped.
TIES_X = [ONES + t64([[3, -1, 0.5], [-2, 4, 1]]), ONES + t64([[-1, -2, 2.5], [4, 3, -5]])]


def test_ties_normalized() -> None:
    got = ties(TIES_X, base=ONES, weights=[1.0, 2.0], densities=[0.5, 0.5])
    assert_close(got, ONES + t64([[3.0, 0.0, 0.0], [8 / 2, 10 / 3, -10 / 2]]))


def test_ties_unnormalized_with_lambda() -> None:
    got = ties(TIES_X, base=ONES, weights=[1.0, 2.0], densities=[0.5, 0.5], lambda_=0.5, normalize=False)
    assert_close(got, ONES + 0.5 * t64([[3.0, 0.0, 0.0], [8.0, 10.0, -10.0]]))


def test_ties_elects_plus_where_the_weighted_sum_is_zero() -> None:
    """Opposite entries that cancel (bfloat16 inputs and weights like 0.5 make this common): the sign is +,
    as mergekit and PEFT elect it, so the positive entry is kept instead of both dropped."""
    base = torch.zeros(1, 3, dtype=F64)
    x = t64([[-2.0, -2.0, 0.0]])
    y = t64([[4.0, -6.0, 0.0]])
    got = ties([x, y], base=base, weights=[1.0, 0.5], densities=[1.0, 1.0])
    assert_close(got, t64([[2.0 / 0.5, (-2.0 - 3.0) / 1.5, 0.0]]))


def ties_reference(
    xs: list[torch.Tensor], base: torch.Tensor, weights: list[float], densities: list[float], normalize: bool
) -> torch.Tensor:
    """TIES element by element in plain Python, top-k by sorting."""
    flat_base = base.flatten().tolist()
    trimmed = []
    for x, w, density in zip(xs, weights, densities, strict=True):
        delta = [xv - bv for xv, bv in zip(x.flatten().tolist(), flat_base, strict=True)]
        n = len(delta)  # mergekit's count: int(density * n), at least one
        keep = n if density >= 1 else 0 if density <= 0 else max(1, int(density * n))
        cut = sorted((abs(v) for v in delta), reverse=True)[keep - 1] if keep else math.inf
        trimmed.append([w * v if abs(v) >= cut else 0.0 for v in delta])
    out = []
    for i, bv in enumerate(flat_base):
        total = sum(t[i] for t in trimmed)
        sign = 1 if total >= 0 else -1  # a tie elects +, as in mergekit and PEFT
        agreeing = [
            (t[i], w) for t, w in zip(trimmed, weights, strict=True) if (t[i] > 0) - (t[i] < 0) == sign
        ]
        merged = sum(v for v, _ in agreeing)
        divisor = sum(w for _, w in agreeing) if normalize else 1.0
        out.append(bv + (merged / divisor if divisor else 0.0))
    return torch.tensor(out, dtype=F64).reshape(base.shape)


@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_reference_on_random_tensors(normalize: bool) -> None:
    base, *xs = randn(3, (7, 9), 4)
    weights, densities = [0.5, 1.0, 2.0], [0.3, 0.7, 1.0]
    got = ties(xs, base=base, weights=weights, densities=densities, normalize=normalize)
    assert_close(got, ties_reference(xs, base, weights, densities, normalize))


@pytest.mark.parametrize(("numel", "density", "count"), [(128, 0.35, 44), (12288, 0.35, 4300), (7, 0.05, 1)])
def test_ties_keeps_as_many_entries_as_mergekit(numel: int, density: float, count: int) -> None:
    """int(density * numel), at least one: 0.35 of 128 is 44.8, and 44 are kept, not 45 (mergekit 0.1.5
    and PEFT count so); a positive density keeps one entry of a small tensor."""
    delta = torch.arange(1, numel + 1, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(numel)[:numel]
    base = torch.zeros(numel)
    got = ties([base + delta], base=base, weights=[1.0], densities=[density], normalize=False)
    assert int(torch.count_nonzero(got)) == count
    assert torch.equal(got.abs().topk(count).values, delta.abs().topk(count).values)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, F64])
def test_kth_largest_magnitude_matches_sorting(dtype: torch.dtype) -> None:
    values = torch.randn(1000, generator=gen(1)).to(dtype)
    values[:40] = 0.0
    values[40:60] = -values[60:80]  # ties in magnitude
    ranked = sorted(values.abs().tolist(), reverse=True)
    for k in (1, 2, 20, 500, 961, 1000):
        got = kth_largest_magnitude(values, k, torch.empty_like(values))
        assert float(got) == ranked[k - 1]


def test_dare_linear_keeps_or_drops_each_entry() -> None:
    base, x = randn(4, (50, 80), 2)
    got = dare_linear([x], base=base, generator=gen(0), weights=[2.0], densities=[0.25], lambda_=0.5)
    kept = got != base
    assert_close(got[kept], (base + 0.5 * 2.0 * (x - base) / 0.25)[kept])
    assert abs(kept.double().mean().item() - 0.25) < 0.03


def test_dare_linear_two_models_pick_one_of_four_outcomes() -> None:
    base, x, y = randn(5, (30, 30), 3)
    got = dare_linear([x, y], base=base, generator=gen(1), weights=[1.0, 3.0], densities=[0.5, 0.8])
    dx, dy = (x - base) / 0.5, 3.0 * (y - base) / _kept(0.8)
    outcomes = torch.stack([base, base + dx, base + dy, base + dx + dy])
    assert torch.isclose(outcomes, got, rtol=1e-12, atol=1e-12).any(dim=0).all()


def _kept(density: float) -> float:
    """The probability DARE's mask keeps an entry with: the density rounded to 1/65536 (16-bit lanes)."""
    return round(density * 65536) / 65536


@pytest.mark.parametrize("density", [1e-5, 3e-5, 0.1, 0.3, 0.8, 0.999999, 1.0])
def test_dare_rescales_by_the_probability_an_entry_is_kept(density: float) -> None:
    """Survivors scaled by exactly one over their chance: no bias, even where rounding to 1/65536 is
    large against the density (1e-5 keeps with probability 1/65536, 1.53 times as often)."""
    from hubmerge.methods.task_vectors import rescale

    assert rescale(density) * _kept(density) == pytest.approx(1.0, rel=1e-12)
    assert rescale(0.0) == 0.0 and rescale(1e-6) == 0.0  # rounds to a cut of 0: nothing is kept


def test_dare_rescale_preserves_the_expected_task_vector() -> None:
    base = torch.zeros(200_000, dtype=F64)
    got = dare_linear([base + 2.0], base=base, generator=gen(2), densities=[0.1])
    assert abs(got.mean().item() - 2.0) < 0.1


def test_dare_ties_two_models_pick_one_of_four_ties_outcomes() -> None:
    base, x, y = randn(6, (20, 20), 3)
    weights, density = [1.0, 2.0], 0.6
    got = dare_ties([x, y], base=base, generator=gen(3), weights=weights, densities=[density, density])
    flat_got, flat_base = got.flatten().tolist(), base.flatten().tolist()
    dx, dy = ((t - base).flatten().tolist() for t in (x, y))
    for g, b, u, v in zip(flat_got, flat_base, dx, dy, strict=True):
        candidates = []
        for keep_x in (0.0, 1.0):
            for keep_y in (0.0, 1.0):
                wd = [keep_x * weights[0] * u / _kept(density), keep_y * weights[1] * v / _kept(density)]
                sign = 1.0 if sum(wd) >= 0 else -1.0
                agree = [
                    (val, w)
                    for val, w in zip(wd, weights, strict=True)
                    if val and math.copysign(1, val) == sign
                ]
                divisor = sum(w for _, w in agree) or 1.0
                candidates.append(b + sum(val for val, _ in agree) / divisor)
        assert any(math.isclose(g, c, rel_tol=1e-12, abs_tol=1e-12) for c in candidates)


@pytest.mark.parametrize("fn", [dare_linear, dare_ties])
def test_dare_is_deterministic_per_generator_seed(fn: Callable[..., torch.Tensor]) -> None:
    base, x, y = randn(7, (16, 16), 3, torch.float32)
    first = fn([x, y], base=base, generator=gen(11))
    assert torch.equal(first, fn([x, y], base=base, generator=gen(11)))
    assert not torch.equal(first, fn([x, y], base=base, generator=gen(12)))


def test_dare_density_zero_gives_the_base() -> None:
    base, x = randn(8, (4, 5), 2)
    assert_close(dare_linear([x], base=base, generator=gen(0), densities=[0.0]), base)
    assert_close(dare_ties([x], base=base, generator=gen(0), densities=[0.0]), base)


def test_slerp_on_known_angles() -> None:
    a = t64([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    b = t64([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])  # 90 degrees from a
    # t = 1/3: weights sin(60 deg) / sin(90 deg) and sin(30 deg) / sin(90 deg)
    assert_close(slerp([a, b], t=1 / 3), t64([[math.sqrt(3), 0.5, 0.0], [0.0, 0.0, 0.0]]))
    c = t64([[1.5, 1.5 * math.sqrt(3), 0.0], [0.0, 0.0, 0.0]])  # 60 degrees from a, norm 3
    # t = 1/2: both weights sin(30 deg) / sin(60 deg) = 1 / sqrt(3)
    assert_close(slerp([a, c], t=0.5), (a + c) / math.sqrt(3))


@pytest.mark.parametrize("cos_sign", [1.0, -1.0])
def test_slerp_with_eps_zero_interpolates_parallel_vectors_linearly(cos_sign: float) -> None:
    """|cos| 1 (a 1-element tensor always) has no arc: eps 0 must not divide by sin(0)."""
    a = torch.tensor([1.0, 2.0, 3.0], dtype=F64)
    b = cos_sign * 2 * a
    assert_close(slerp([a, b], t=0.25, eps=0.0), 0.75 * a + 0.25 * b)
    one = [torch.tensor([0.5], dtype=F64), torch.tensor([0.7], dtype=F64)]
    assert_close(slerp(one, t=0.5, eps=0.0), torch.tensor([0.6], dtype=F64))


def test_slerp_falls_back_to_linear() -> None:
    a, b = randn(9, (3, 4), 2)
    assert not torch.allclose(slerp([a, b], t=0.3), linear([a, b], t=0.3))
    assert_close(slerp([a, b], t=0.3, eps=2.0), linear([a, b], t=0.3))
    assert_close(slerp([a, -2.0 * a], t=0.3), linear([a, -2.0 * a], t=0.3))
    assert_close(slerp([torch.zeros_like(a), b], t=0.3), 0.3 * b)


def test_model_stock_two_and_three_models() -> None:
    e1 = t64([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    e2 = t64([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    cos = 1 / math.sqrt(2)  # between e1 and e1 + e2
    ratio = 2 * cos / (1 + cos)
    got = model_stock([ONES + e1, ONES + e1 + e2], base=ONES)
    assert_close(got, ONES + ratio * (e1 + 0.5 * e2))
    cos = (0.0 + 2 / math.sqrt(2)) / 3  # pairs (e1, e2), (e1, e1 + e2), (e2, e1 + e2)
    ratio = 3 * cos / (1 + 2 * cos)
    got = model_stock([ONES + e1, ONES + e2, ONES + e1 + e2], base=ONES)
    assert_close(got, ONES + ratio * (2 * e1 + 2 * e2) / 3)


def test_model_stock_opposed_or_zero_task_vectors_give_the_base() -> None:
    e1 = t64([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert_close(model_stock([ONES + e1, ONES - e1], base=ONES), ONES)
    assert_close(model_stock([ONES, ONES + e1], base=ONES), ONES)


# --- properties --------------------------------------------------------------------------------------------

SEEDS = st.integers(0, 2**31 - 1)
SHAPES = st.sampled_from([(1,), (7,), (3, 5), (2, 3, 4)])
COUNTS = st.integers(1, 4)
POSITIVE = st.floats(0.1, 10.0)
SETTINGS = settings(max_examples=25, deadline=None, database=None)


@SETTINGS
@given(SEEDS, SHAPES, COUNTS)
def test_centroid_of_identical_models_is_that_model(seed: int, shape: tuple[int, ...], n: int) -> None:
    (x,) = randn(seed, shape, 1)
    assert_close(centroid([x] * n), x)


@SETTINGS
@given(SEEDS, SHAPES)
def test_linear_and_slerp_endpoints_are_exact(seed: int, shape: tuple[int, ...]) -> None:
    a, b = randn(seed, shape, 2)
    for fn in (linear, slerp):
        assert torch.equal(fn([a, b], t=0.0), a)
        assert torch.equal(fn([a, b], t=1.0), b)


@SETTINGS
@given(SEEDS, SHAPES, st.floats(0.1, 10.0), st.floats(-1.0, 2.0))
def test_slerp_of_colinear_models_is_linear(
    seed: int, shape: tuple[int, ...], scale: float, t: float
) -> None:
    (a,) = randn(seed, shape, 1)
    assert_close(slerp([a, scale * a], t=t), linear([a, scale * a], t=t))


@SETTINGS
@given(SEEDS, SHAPES, st.lists(POSITIVE, min_size=1, max_size=4), st.floats(0.01, 100.0))
def test_weighted_normalize_ignores_weight_scale(
    seed: int, shape: tuple[int, ...], weights: list[float], scale: float
) -> None:
    xs = randn(seed, shape, len(weights))
    assert_close(weighted(xs, weights=weights), weighted(xs, weights=[scale * w for w in weights]))


@SETTINGS
@given(SEEDS, SHAPES, COUNTS)
def test_task_arithmetic_with_lambda_zero_is_the_base(seed: int, shape: tuple[int, ...], n: int) -> None:
    base, *xs = randn(seed, shape, n + 1)
    assert_close(task_arithmetic(xs, base=base, weights=[1.5] * n, lambda_=0.0), base)


@SETTINGS
@given(SEEDS, SHAPES, st.lists(POSITIVE, min_size=1, max_size=4), st.floats(0.0, 2.0))
def test_ties_without_trimming_or_conflict_is_normalized_task_arithmetic(
    seed: int, shape: tuple[int, ...], weights: list[float], lambda_: float
) -> None:
    base, signs, *noise = randn(seed, shape, len(weights) + 2)
    xs = [base + signs.sign() * (z.abs() + 0.1) for z in noise]
    got = ties(xs, base=base, weights=weights, densities=[1.0] * len(xs), lambda_=lambda_)
    assert_close(got, task_arithmetic(xs, base=base, weights=weights, lambda_=lambda_, normalize=True))


@SETTINGS
@given(SEEDS, SHAPES, st.lists(POSITIVE, min_size=1, max_size=4), st.booleans())
def test_dare_with_density_one_drops_nothing(
    seed: int, shape: tuple[int, ...], weights: list[float], normalize: bool
) -> None:
    base, *xs = randn(seed, shape, len(weights) + 1)
    full = [1.0] * len(xs)
    got = dare_linear(
        xs, base=base, generator=gen(seed), weights=weights, densities=full, normalize=normalize
    )
    assert_close(got, task_arithmetic(xs, base=base, weights=weights, normalize=normalize))
    got = dare_ties(xs, base=base, generator=gen(seed), weights=weights, densities=full, normalize=normalize)
    assert_close(got, ties(xs, base=base, weights=weights, densities=full, normalize=normalize))


@SETTINGS
@given(SEEDS, SHAPES, st.lists(POSITIVE, min_size=2, max_size=4))
def test_model_stock_of_parallel_task_vectors_is_the_mean(
    seed: int, shape: tuple[int, ...], scales: list[float]
) -> None:
    base, delta = randn(seed, shape, 2)
    xs = [base + s * delta for s in scales]
    assert_close(model_stock(xs, base=base), centroid(xs))


# --- every registry row ------------------------------------------------------------------------------------

ROWS = pytest.mark.parametrize("spec", list(METHODS.values()), ids=list(METHODS))


@ROWS
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_every_method_runs_with_its_defaults(spec: MethodSpec, dtype: torch.dtype) -> None:
    base, *xs = randn(20, (6, 10), model_count(spec) + 1, dtype)
    got = call(spec, xs, base)
    assert got.shape == base.shape and got.dtype == dtype
    assert torch.isfinite(got).all()


@ROWS
def test_no_method_mutates_its_inputs(spec: MethodSpec) -> None:
    base, *xs = randn(21, (6, 10), model_count(spec) + 1, torch.float32)
    before = [t.clone() for t in (base, *xs)]
    got = call(spec, xs, base)
    for original, tensor in zip(before, (base, *xs), strict=True):
        assert torch.equal(original, tensor)
        assert got.data_ptr() != tensor.data_ptr()


@pytest.mark.parametrize(
    "spec", [s for s in METHODS.values() if s.elementwise and not s.random], ids=lambda s: s.name
)
def test_elementwise_methods_merge_row_chunks_identically(spec: MethodSpec) -> None:
    base, *xs = randn(22, (6, 10), model_count(spec) + 1)
    chunks = [call(spec, [x[i : i + 2] for x in xs], base[i : i + 2]) for i in range(0, 6, 2)]
    assert_close(torch.cat(chunks), call(spec, xs, base))


@ROWS
def test_registry_row_matches_its_function(spec: MethodSpec) -> None:
    assert METHODS[spec.name] is spec and get_method(spec.name) is spec
    assert spec.paper.startswith("https://arxiv.org/abs/") and spec.summary
    signature = inspect.signature(spec.fn)
    keywords = {p.kwarg for p in spec.params}
    keywords |= {"base"} if spec.needs_base else set()
    keywords |= {"generator"} if spec.random else set()
    assert set(signature.parameters) - {"tensors"} == keywords
    for p in spec.params:
        assert p.type in (float, bool, int) and p.name != "seed" and p.doc
        python_default = signature.parameters[p.kwarg].default
        if not p.per_model and python_default is not inspect.Parameter.empty:
            assert python_default == p.default
    assert spec.min_models >= 1 and (spec.max_models is None or spec.max_models >= spec.min_models)


def test_unknown_method_lists_the_valid_ones() -> None:
    with pytest.raises(RecipeError) as info:
        get_method("nope")
    assert info.value.path == "method" and "unknown method 'nope'" in str(info.value)
    assert info.value.hint is not None
    for name in METHODS:
        assert name in info.value.hint


def test_wrong_model_count_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="exactly 2 models, got 3"):
        linear([A, A, A], t=0.5)
    with pytest.raises(ValueError, match="at least 2 models, got 1"):
        model_stock([A], base=A)
    with pytest.raises(ValueError, match="one value per model"):
        ties([A, B], base=ONES, weights=[1.0])
    with pytest.raises(ValueError, match="density of model 1"):
        ties([A, B], base=ONES, densities=[0.5, 1.5])


def test_dot64_sums_exact_products_in_float64_a_chunk_at_a_time() -> None:
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(50, 50, generator=g), torch.randn(2500, generator=g)
    exact = math.fsum(float(x) * float(y) for x, y in zip(a.reshape(-1).tolist(), b.tolist(), strict=True))
    for chunk in (1000, 1 << 20):  # three chunks, the last one short; one chunk
        assert dot64(a, b, chunk=chunk) == pytest.approx(exact, rel=1e-14, abs=1e-12)
    assert dot64(a, a) > 0.0 and dot64(torch.zeros(3), b[:3]) == 0.0
