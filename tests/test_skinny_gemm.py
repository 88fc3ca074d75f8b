"""The CPU few-row GEMM kernel (fasteagle/kernels/skinny_gemm.{cpp,py}) against its PyTorch reference.

Odd sizes on purpose: output features off the 16-column block (1, 15, 17, 33), input features of 1 and 577, row
counts off the kernel's row chunk (1..9, 17, 33), with and without a bias. Tolerance: the reference runs in fp64;
the kernel sums K fp32 products in order, so its error is bounded by ~K * 2^-24 * sum|x_k w_k|, checked as
1e-6 * K * (|x| |w| summed) per output. Row independence and thread independence are checked bit for bit: that is
what makes a decode step and a tree-verification row agree exactly."""
import subprocess

import pytest
import torch

from fasteagle.kernels import skinny_gemm
from fasteagle.kernels.skinny_gemm import (block, load, skinny_linear, skinny_linear_int8,
                                           skinny_linear_int8_reference, skinny_linear_reference)


@pytest.fixture(scope="module", autouse=True)
def kernel(tmp_path_factory):
    from fasteagle.download import cache_dir

    if skinny_gemm._compiler() is None:
        pytest.skip("no C++ compiler")
    assert load(cache_dir()), "the kernel did not build with the compiler present"


def check(x, w, b):
    y = skinny_linear(x, block(w), b, w.shape[0])
    ref = skinny_linear_reference(x.double(), w.double(), None if b is None else b.double())
    bound = 1e-6 * w.shape[1] * (x.double().abs() @ w.double().abs().T) + 1e-6
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert ((y.double() - ref).abs() <= bound).all(), (y.double() - ref).abs().max()


@pytest.mark.parametrize("N", [1, 15, 16, 17, 33, 100])
@pytest.mark.parametrize("K", [1, 7, 577])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_reference(N, K, bias):
    g = torch.Generator().manual_seed(N * 1000 + K)
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g) if bias else None
    for M in [1, 2, 3, 4, 5, 8, 9, 17, 33]:
        check(torch.randn(M, K, generator=g), w, b)


def test_leading_dims_and_noncontiguous_input():
    w, b = torch.randn(40, 24), torch.randn(40)
    x = torch.randn(1, 5, 48)[..., ::2]  # [1, 5, 24], strided
    y = skinny_linear(x, block(w), b, 40)
    assert y.shape == (1, 5, 40)
    torch.testing.assert_close(y, skinny_linear_reference(x, w, b), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("M", [2, 5, 8, 9, 32])
def test_rows_do_not_depend_on_each_other_or_on_threads(M):
    w, b = torch.randn(200, 576), torch.randn(200)
    x = torch.randn(M, 576)
    blocked = block(w)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        many = skinny_linear(x, blocked, b, 200)
        torch.set_num_threads(1)
        one_thread = skinny_linear(x, blocked, b, 200)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(many, one_thread)
    for m in range(M):
        assert torch.equal(many[m], skinny_linear(x[m:m + 1], blocked, b, 200)[0]), m


def test_block_layout():
    w = torch.randn(20, 3)
    blocked = block(w)
    assert blocked.shape == (2, 3, 16)
    assert torch.equal(blocked[1, :, 2], w[18]) and torch.equal(blocked[1, :, 4:], torch.zeros(3, 12))


def test_bad_blocked_weight_is_one_line_error():
    with pytest.raises(RuntimeError, match="bad blocked weight"):
        skinny_linear(torch.randn(2, 8), block(torch.randn(16, 8)), None, 40)


# --- int8 weights ------------------------------------------------------------------------------------------------


def int8_weight(N, K, g):
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    return q, torch.rand(N, generator=g) * 0.02 + 1e-3


@pytest.mark.parametrize("N", [1, 15, 16, 17, 33, 100])
@pytest.mark.parametrize("K", [1, 7, 577])
@pytest.mark.parametrize("bias", [False, True])
def test_int8_matches_reference(N, K, bias):
    """Any number of rows (the int8 variant also runs a quantized target's prefill); the same bound as fp32 (the
    int8 weights widen to fp32 exactly; the scale adds one rounding)."""
    g = torch.Generator().manual_seed(N * 1000 + K + 7)
    q, scale = int8_weight(N, K, g)
    b = torch.randn(N, generator=g) if bias else None
    for M in [1, 2, 3, 5, 8, 9, 17, 33, 70]:
        x = torch.randn(M, K, generator=g)
        y = skinny_linear_int8(x, block(q), scale, b, N)
        ref = skinny_linear_int8_reference(x.double(), q, scale.double(), None if b is None else b.double())
        w = q.double() * scale.double()[:, None]
        bound = 1e-6 * K * (x.double().abs() @ w.abs().T) + 1e-6
        assert y.dtype == torch.float32 and y.shape == ref.shape
        assert ((y.double() - ref).abs() <= bound).all(), (M, (y.double() - ref).abs().max())


@pytest.mark.parametrize("M", [2, 9, 40])
def test_int8_rows_do_not_depend_on_each_other_or_on_threads(M):
    g = torch.Generator().manual_seed(M)
    q, scale = int8_weight(200, 576, g)
    b, x = torch.randn(200, generator=g), torch.randn(M, 576, generator=g)
    blocked = block(q)
    assert blocked.dtype == torch.int8 and blocked.shape == (13, 576, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        many = skinny_linear_int8(x, blocked, scale, b, 200)
        torch.set_num_threads(1)
        one_thread = skinny_linear_int8(x, blocked, scale, b, 200)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(many, one_thread)
    for m in range(M):
        assert torch.equal(many[m], skinny_linear_int8(x[m:m + 1], blocked, scale, b, 200)[0]), m


def test_int8_bad_inputs_are_one_line_errors():
    q = torch.zeros(16, 8, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="bad scale"):
        skinny_linear_int8(torch.randn(2, 8), block(q), torch.ones(15), None, 16)
    with pytest.raises(RuntimeError, match="int8 weights only"):
        skinny_linear_int8(torch.randn(2, 8), block(q.float()), torch.ones(16), None, 16)
    with pytest.raises(RuntimeError, match="fp32 inputs only"):
        skinny_linear_int8(torch.randn(2, 8, dtype=torch.float64), block(q), torch.ones(16), None, 16)


def test_build_is_cached_and_failure_leaves_nothing(tmp_path, monkeypatch):
    calls = []
    real = subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or real(cmd, **kw))
    out = skinny_gemm.build(tmp_path)
    compiles = [c for c in calls if "-shared" in c]
    assert out.exists() and len(compiles) == 1
    assert skinny_gemm.build(tmp_path) == out and len([c for c in calls if "-shared" in c]) == 1
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]  # no temporary left

    monkeypatch.setenv("CXX", "false")  # a "compiler" that fails
    broken = tmp_path / "broken"
    with pytest.raises(RuntimeError, match="false failed"):
        skinny_gemm.build(broken)
    assert list((broken / "kernels").iterdir()) == []
    monkeypatch.setattr(skinny_gemm, "_loaded", {})
    with pytest.warns(UserWarning, match="kernel is unavailable"):
        assert not load(broken)
