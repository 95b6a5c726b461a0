"""The fused CPU kernels against the torch functions they replace: bit for bit, and the fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import hubmerge
from hubmerge import kernels
from hubmerge.methods import METHODS
from hubmerge.methods.basic import weighted_sum
from hubmerge.methods.blocks import (
    SLERP_PASSES,
    STOCK_PASSES,
    TIES_PASSES,
    slerp_block,
    slerp_kernel,
    ties_block,
)

from .util import save_model

pytestmark = pytest.mark.skipif(
    os.environ.get("HUBMERGE_KERNELS") == "0", reason="kernels turned off by HUBMERGE_KERNELS=0"
)

SIZES = (1, 7, 256, 1000, 65_537)
DTYPES = (torch.bfloat16, torch.float32)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32)


def _models(
    n: int, dtype: torch.dtype, count: int = 3, seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    xs = [(base + 0.02 * (k + 1) * torch.randn(n, generator=g)).to(dtype) for k in range(count)]
    base = base.to(dtype)
    xs[1][: n // 3] = base[: n // 3]  # zero task vectors: signs 0, ties at the threshold
    return base, xs


def _f32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float32))


def test_kernels_are_built() -> None:
    """`make` builds the extension; a missing compiler would silently cost the fast path, so say it here."""
    assert kernels.available(), (
        "hubmerge._kernels is not built: reinstall with a C compiler (pip install -e .)"
    )
    assert kernels.variant() in ("avx2+fma", "baseline")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize(
    ("coefficients", "divisor"),
    [([0.5, 0.5], 1.0), ([1 / 6, 2 / 6, 3 / 6], 1.0), ([0.3, -0.7, 1.4, 2.0], 1.0), ([1.0, 1.0, 1.0], 3.0)],
)
def test_weighted_sum_is_bit_equal_to_torch(
    n: int, dtype: torch.dtype, out_dtype: torch.dtype, coefficients: list[float], divisor: float
) -> None:
    base, xs = _models(n, dtype, count=3)
    inputs = [base, *xs][: len(coefficients)]
    out = torch.full((n,), float("nan"), dtype=out_dtype)
    assert kernels.weighted_sum(inputs, coefficients, out, divisor)
    expected = weighted_sum([t.float() for t in inputs], coefficients)
    if divisor != 1.0:
        expected = expected.div_(divisor)
    assert torch.equal(_bits(out), _bits(expected.to(out_dtype)))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", [0, 1])
def test_ties_histograms_equal_the_torch_pass(n: int, dtype: torch.dtype, level: int) -> None:
    base, xs = _models(n, dtype)
    # Level 1 looks inside the top-16-bit bucket of each model's median magnitude: a populated one.
    magnitudes = [(x.float() - base.float()).abs() for x in xs]
    prefixes = [int(m.median().view(torch.int32)) >> 16 for m in magnitudes]
    skip = [False, True, False]
    kwargs = {"_ties_prefixes": prefixes, "_ties_done": skip}
    fused = kernels.ties_hist(xs, base, level, prefixes, skip)
    expected = TIES_PASSES[level].step([x.float() for x in xs], base.float(), kwargs)
    assert fused is not None
    assert torch.equal(fused, expected)
    assert int(fused[1].sum()) == 0  # skipped
    if level == 0:
        assert int(fused[0].sum()) == n


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize(
    ("thresholds", "weights", "lambda_", "normalize"),
    [
        ([0.01, 0.02, 0.03], [1.0, 1.0, 1.0], 1.0, True),
        ([0.01, float("nan"), 0.0], [0.3, 1.7, 1.1], 0.8, True),  # keep none, keep all
        ([0.001, 0.003, 0.0], [0.5, 0.5, 2.0], 1.3, False),
    ],
)
def test_ties_merge_is_bit_equal_to_ties_block(
    n: int,
    dtype: torch.dtype,
    out_dtype: torch.dtype,
    thresholds: list[float],
    weights: list[float],
    lambda_: float,
    normalize: bool,
) -> None:
    base, xs = _models(n, dtype)
    out = torch.full((n,), float("nan"), dtype=out_dtype)
    assert kernels.ties_merge(
        xs, base, out, thresholds=thresholds, weights=weights, lambda_=lambda_, normalize=normalize
    )
    expected = ties_block(
        [x.float() for x in xs],
        base=base.float(),
        thresholds=[_f32(t) for t in thresholds],
        weights=weights,
        lambda_=lambda_,
        normalize=normalize,
    )
    assert torch.equal(_bits(out), _bits(expected.to(out_dtype)))


def test_ties_merge_elects_plus_where_the_sum_is_zero_as_ties_block() -> None:
    """Entries that cancel exactly elect + in the kernel as in the torch path (and mergekit, PEFT)."""
    n = 1000
    base = torch.zeros(n)
    xs = [torch.full((n,), -2.0), torch.full((n,), 4.0), torch.zeros(n)]
    xs[0][::2] = 0.0  # half the entries: one model alone, the sum positive
    out = torch.empty(n)
    kwargs: dict[str, Any] = {"thresholds": [0.0] * 3, "weights": [1.0, 0.5, 1.0], "lambda_": 1.0}
    assert kernels.ties_merge(xs, base, out, normalize=True, **kwargs)
    expected = ties_block(xs, base=base, normalize=True, **kwargs)
    assert torch.equal(out, expected) and torch.equal(out, torch.full((n,), 4.0))


def test_kernels_decline_what_they_do_not_handle() -> None:
    base, xs = _models(1000, torch.float32)
    out = torch.empty(1000)
    assert not kernels.weighted_sum([x.half() for x in xs], [1.0, 1.0, 1.0], out)  # float16
    assert not kernels.weighted_sum([x.double() for x in xs], [1.0, 1.0, 1.0], out)  # float64
    strided = torch.randn(2000)[::2]
    assert not kernels.weighted_sum([strided, xs[0]], [0.5, 0.5], out)  # not contiguous
    assert not kernels.weighted_sum([xs[0]] * 17, [1.0] * 17, out)  # more models than the kernels hold
    assert not kernels.weighted_sum([xs[0], xs[1][:10]], [0.5, 0.5], out)  # lengths differ
    assert not kernels.weighted_sum(xs[:2], [float("inf"), 0.5], out)
    assert kernels.ties_hist([x.half() for x in xs], base.half(), 0, [0] * 3, [False] * 3) is None
    assert kernels.ties_hist(xs, base, 2, [0] * 3, [False] * 3) is None  # float64 levels


def test_slerp_kernel_mixes_on_the_arc_and_leaves_the_linear_fallback_to_torch() -> None:
    _, xs = _models(70_000, torch.bfloat16)
    a, b = xs[0], xs[1]
    out = torch.full((70_000,), 7.0)
    assert slerp_kernel([a, b], None, out, {"t": 0.3, "coefficients": (0.8, 0.35)})
    expected = slerp_block([a.float(), b.float()], t=0.3, coefficients=(0.8, 0.35))
    assert torch.equal(_bits(out), _bits(expected))
    # Nearly parallel models interpolate linearly (lerp, rounded unlike the weighted sum): not fused.
    out.fill_(7.0)
    assert not slerp_kernel([a, b], None, out, {"t": 0.3, "coefficients": None})
    assert bool((out == 7.0).all())


def _gram64(ds: list[torch.Tensor]) -> torch.Tensor:
    """The upper triangle of the Gram matrix of ``ds``, by hand: float64 products and sums."""
    m = len(ds)
    gram = torch.zeros((m, m), dtype=torch.float64)
    for i in range(m):
        for j in range(i, m):
            gram[i, j] = sum(float(p) for p in (ds[i].double() * ds[j].double()).reshape(-1).tolist())
    return gram


@pytest.mark.parametrize("n", (1, 255, 1000, 65_537))
@pytest.mark.parametrize("with_base", (True, False))
def test_gram_is_the_float64_gram_matrix_of_the_task_vectors(n: int, with_base: bool) -> None:
    base, xs = _models(n, torch.bfloat16, count=4, seed=n)
    xs[2] = xs[2].float()  # a float32 model among bfloat16 ones
    gram = kernels.gram(xs, base if with_base else None)
    assert gram is not None
    # d = x - base in float32 first, as torch subtracts; then exact products, summed in float64.
    ds = [x.float() - base.float() if with_base else x.float() for x in xs]
    torch.testing.assert_close(gram, _gram64(ds), rtol=1e-13, atol=1e-12)
    assert bool((gram.tril(-1) == 0).all())


def test_gram_holds_every_model_the_kernels_take_and_refuses_what_they_cannot() -> None:
    n = 3001
    base, _ = _models(n, torch.float32)
    g = torch.Generator().manual_seed(5)
    xs = [torch.randn(n, generator=g).bfloat16() for _ in range(16)]
    gram = kernels.gram(xs, base)
    assert gram is not None
    torch.testing.assert_close(gram, _gram64([x.float() - base for x in xs]), rtol=1e-13, atol=1e-12)
    assert kernels.gram([*xs, xs[0]], base) is None  # more models than the kernels hold
    assert kernels.gram([x.half() for x in xs[:2]], None) is None
    assert kernels.gram([xs[0], xs[1][:-1]], None) is None  # different lengths
    wide = torch.randn(20, 30, generator=g)
    assert kernels.gram([wide[:, :10], wide[:, 10:20]], None) is None  # not contiguous


@pytest.mark.parametrize("method", ["slerp", "model_stock"])
def test_angle_passes_sum_in_the_kernel_as_the_torch_steps_do(method: str) -> None:
    """The pass kernels give the torch steps' sums (both in float64) over a span of stored bfloat16 rows."""
    base, xs = _models(40_000, torch.bfloat16, count=3, seed=9)
    p = SLERP_PASSES[0] if method == "slerp" else STOCK_PASSES[0]
    tensors = xs[:2] if method == "slerp" else xs
    fused = p.kernel(tensors, base, {}) if p.kernel is not None else None
    assert fused is not None
    step = p.step([t.float() for t in tensors], base.float(), {})
    torch.testing.assert_close(fused, step, rtol=1e-13, atol=1e-12)
    assert p.finish(fused, 40_000, torch.float32, {"t": 0.3}) == p.finish(
        step, 40_000, torch.float32, {"t": 0.3}
    )


def test_angle_passes_use_the_kernel_in_a_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SLERP and Model Stock read their statistics with the Gram kernel, not the torch steps."""
    dirs = []
    for m in range(3):
        g = torch.Generator().manual_seed(30 + m)
        dirs.append(save_model(tmp_path / f"m{m}", {"w": torch.randn(1500, 700, generator=g).bfloat16()}))
    calls = []
    real = kernels.gram
    monkeypatch.setattr(kernels, "gram", lambda *args: calls.append(len(args[0])) or real(*args))
    models = [str(d) for d in dirs[1:]]
    hubmerge.merge({"method": "slerp", "models": models, "parameters": {"t": 0.3}}, tmp_path / "slerp")
    assert calls and set(calls) == {2}
    calls.clear()
    hubmerge.merge({"method": "model_stock", "models": models, "base": str(dirs[0])}, tmp_path / "stock")
    assert calls and set(calls) == {2}


def test_environment_variable_turns_kernels_off() -> None:
    code = "from hubmerge import kernels; print(kernels.available(), kernels.variant())"
    env = {**os.environ, "HUBMERGE_KERNELS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "off"]


KERNEL_METHODS = sorted(name for name, spec in METHODS.items() if spec.kernel is not None)


def test_kernel_methods() -> None:
    assert KERNEL_METHODS == [
        "centroid",
        "dare_linear",
        "dare_ties",
        "linear",
        "model_stock",
        "slerp",
        "task_arithmetic",
        "ties",
        "weighted",
    ]


@pytest.mark.parametrize("method", KERNEL_METHODS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_engine_gives_the_same_bytes_with_and_without_kernels(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, dtype: str
) -> None:
    """The fused path and the torch path write identical files, for tensors of one block and of many."""
    shapes = {"big.weight": (1500, 700), "odd": (3, 100_003), "vec": (300_001,), "small": (7, 9)}
    dirs = []
    for m in range(4):
        g = torch.Generator().manual_seed(10 + m)
        sd = {n: torch.randn(s, generator=g).bfloat16() for n, s in shapes.items()}
        if m == 2:
            sd = {n: t.float() for n, t in sd.items()}  # a float32 model among bfloat16 ones
        dirs.append(save_model(tmp_path / f"m{m}", sd))
    spec = METHODS[method]
    n = spec.max_models or 3
    recipe: dict[str, object] = {"method": method, "dtype": dtype, "parameters": {}}
    recipe["models"] = [{"path": str(d), "weight": 0.5 + k} for k, d in enumerate(dirs[1 : 1 + n])]
    if method in ("linear", "centroid", "slerp", "model_stock"):
        recipe["models"] = [str(d) for d in dirs[1 : 1 + n]]
    if method in ("linear", "slerp"):
        recipe["parameters"] = {"t": 0.3}
    if spec.needs_base:
        recipe["base"] = str(dirs[0])
    if method in ("ties", "task_arithmetic"):
        recipe["parameters"] = {"lambda": 0.9}
    fused = hubmerge.merge(recipe, tmp_path / "fused")
    monkeypatch.setattr(kernels, "_K", None)
    plain = hubmerge.merge(recipe, tmp_path / "plain")
    for shard in fused.plan.shards:
        assert (fused.out / shard.filename).read_bytes() == (plain.out / shard.filename).read_bytes()


def test_a_stale_build_is_not_used(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A stale build (from another _kernels.c) is not used, and the log says to rebuild."""
    from hubmerge import _kernels  # type: ignore[attr-defined]

    monkeypatch.setattr(_kernels, "ABI", kernels._ABI + 1)
    assert kernels._load() == (None, "not built")
    assert "stale" in caplog.text
    monkeypatch.undo()
    assert kernels._load()[0] is _kernels


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize(
    ("densities", "normalize"),
    [([0.5, 0.5, 0.5], True), ([1.0, 0.0, 0.3], True), ([0.9, 0.25, 0.7], False)],
)
def test_dare_kernels_draw_and_merge_as_the_torch_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, method: str, densities: list[float], normalize: bool
) -> None:
    """Same bytes with and without the kernel: the same random lanes per block, the same float32 steps."""
    shapes = {"big.weight": (1500, 700), "odd": (3, 100_003), "small": (7, 9)}
    dirs = []
    for m in range(4):
        g = torch.Generator().manual_seed(20 + m)
        dirs.append(
            save_model(tmp_path / f"m{m}", {n: torch.randn(s, generator=g) for n, s in shapes.items()})
        )
    recipe = {
        "method": method,
        "base": str(dirs[0]),
        "models": [
            {"path": str(d), "weight": 0.5 + k, "density": p}
            for k, (d, p) in enumerate(zip(dirs[1:], densities, strict=True))
        ],
        "parameters": {"lambda": 0.8, "normalize": normalize, "seed": 7},
        "dtype": "bfloat16",
    }
    calls = []
    name = "ties_merge" if method == "dare_ties" else "dare_sum"
    real = getattr(kernels, name)

    def counted(*args: object, **kw: object) -> bool:
        calls.append(kw.get("lanes"))
        return bool(real(*args, **kw))

    monkeypatch.setattr(kernels, name, counted)
    fused = hubmerge.merge(recipe, tmp_path / "fused")
    assert calls and all(lanes is not None for lanes in calls)  # the kernel merged every large tensor
    monkeypatch.setattr(kernels, "_K", None)
    plain = hubmerge.merge(recipe, tmp_path / "plain")
    for shard in fused.plan.shards:
        assert (fused.out / shard.filename).read_bytes() == (plain.out / shard.filename).read_bytes()
