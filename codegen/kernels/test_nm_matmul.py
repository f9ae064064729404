"""N:M matmul kernel (Triton interpreter on CPU) against its PyTorch reference and the dense masked matmul.

Tolerances: fp32 as the dense reference up to summation order (atol 1e-5 x output scale). bf16: inputs and kept
values are bf16 and the kernel accumulates in fp32, so the only error is the rounding of y to bf16 (the interpreter
truncates: one ulp, rtol 2^-7 of the output scale).
"""

from __future__ import annotations

import pytest
import torch

from sparsify_fx.codegen.kernels import nm_matmul as K
from sparsify_fx.codegen.lowering import lowering_for
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes.nm import compress_nm, nm_mask, pack_positions
from sparsify_fx.testing import check_kernel

pytestmark = pytest.mark.skipif(not K.HAS_TRITON, reason="triton not installed")
# atol x the output's scale, rtol 0: fp32 up to summation order, bf16 one ulp of the output
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}

# (tokens, in, out, n, m): none a multiple of the interpreter tiles (16 x 32 x 32); some in % m != 0
CASES = [(5, 44, 33, 2, 4), (17, 30, 9, 1, 3), (3, 70, 40, 2, 4), (9, 37, 20, 4, 8), (1, 10, 7, 3, 4)]


def _problem(case, dtype, seed, bias=True):
    T, in_, out, n, m = case
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, in_, generator=g)
    mask = nm_mask(w.abs(), n, m, padding="zero")
    x = torch.randn(T, in_, generator=g).to(dtype)
    b = torch.randn(out, generator=g).to(dtype) if bias else None
    return x, w.to(dtype), mask, b


def _inputs(case, dtype, device, g):
    """check_kernel's input maker: activations, weight, its N:M mask, bias, n, m and whether positions pack."""
    T, in_, out, n, m, packed = case
    w = torch.randn(out, in_, generator=g)
    mask = nm_mask(w.abs(), n, m, padding="zero")
    x = torch.randn(T, in_, generator=g).to(dtype)
    b = torch.randn(out, generator=g).to(dtype)
    return x.to(device), w.to(dtype).to(device), mask.to(device), b.to(device), n, m, packed


def _compressed(w, mask, n, m, packed):
    values, positions = compress_nm(w, mask, n, m)
    return values, pack_positions(positions) if packed else positions


def _kernel(x, w, mask, b, n, m, packed):
    y = K.nm_matmul(x, *_compressed(w, mask, n, m, packed), n, m, w.shape[1], b, packed=packed)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w.shape[0])
    return y


def _dense_masked(x, w, mask, b, n, m, packed):
    return x @ (w * mask).t() + b


def _reference(x, w, mask, b, n, m, packed):
    return K.nm_matmul_reference(x, *_compressed(w, mask, n, m, packed), n, m, w.shape[1], b, packed=packed)


def _check(cases, dtype, reference=_dense_masked):
    check_kernel(_kernel, reference, cases, (dtype,), make_inputs=_inputs, rtol=0.0, atol=ATOL[dtype])


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reference", [_dense_masked, _reference], ids=["dense", "reference"])
def test_matches_dense_masked_and_reference(dtype, packed, reference):
    _check([(*case, packed) for case in CASES], dtype, reference)


def test_batched_input_no_bias():
    x, w, mask, _ = _problem((6, 24, 12, 2, 4), torch.float32, seed=3, bias=False)
    x = x.reshape(2, 3, 24)
    values, positions = compress_nm(w, mask, 2, 4)
    y = K.nm_matmul(x, values, positions, 2, 4, 24)
    torch.testing.assert_close(y, x @ (w * mask).t(), rtol=1e-5, atol=1e-5)


def test_bad_shapes():
    x, w, mask, b = _problem((4, 16, 8, 2, 4), torch.float32, seed=1)
    values, positions = compress_nm(w, mask, 2, 4)
    with pytest.raises(ConfigError, match="values must be"):
        K.nm_matmul(x, values[:, :-1], positions[:, :-1], 2, 4, 16, b)
    with pytest.raises(ConfigError, match="packed"):
        K.nm_matmul(x, values, positions, 2, 4, 16, b, packed=True)  # unpacked positions said to be packed
    with pytest.raises(ConfigError, match="in_features"):
        K.nm_matmul(x[:, :12], values, positions, 2, 4, 16, b)
    with pytest.raises(ConfigError, match="0 < n <= m"):
        K.nm_matmul(x, values, positions, 5, 4, 16, b)


def test_op_twin_lowering_and_grads():
    assert lowering_for(torch.ops.sparsify.nm_linear.default, "triton") is torch.ops.sparsify.nm_linear_triton.default
    x, w, mask, b = _problem((5, 20, 12, 2, 4), torch.float32, seed=7)
    x.requires_grad_(True)
    w = w.requires_grad_(True)
    y = torch.ops.sparsify.nm_linear_triton(x, w, mask, b, 2, 4, 0.0)
    ref_x = x.detach().clone().requires_grad_(True)
    ref_w = w.detach().clone().requires_grad_(True)
    ref = torch.ops.sparsify.nm_linear(ref_x, ref_w, mask, b, 2, 4, 0.0)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    y.backward(gy)
    ref.backward(gy)
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(w.grad, ref_w.grad)
    assert bool((w.grad[~mask] == 0).all())


def test_opcheck_twin():
    x, w, mask, b = _problem((3, 8, 4, 2, 4), torch.float32, seed=9)
    torch.library.opcheck(torch.ops.sparsify.nm_linear_triton.default,
                          (x, w.requires_grad_(True), mask, b, 2, 4, 0.0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_twin_caches_compact_weight_until_it_changes(monkeypatch):
    calls = []
    real = K.compress_nm
    monkeypatch.setattr(K, "compress_nm", lambda *a: calls.append(1) or real(*a))
    x, w, mask, b = _problem((4, 16, 8, 2, 4), torch.float32, seed=5)
    op = torch.ops.sparsify.nm_linear_triton
    y1 = op(x, w, mask, b, 2, 4, 0.0)
    y2 = op(x, w, mask, b, 2, 4, 0.0)
    assert len(calls) == 1 and torch.equal(y1, y2)
    with torch.no_grad():
        w.mul_(2.0)  # an optimizer step writes in place: the version counter moves
    y3 = op(x, w, mask, b, 2, 4, 0.0)
    assert len(calls) == 2
    torch.testing.assert_close(y3, x @ (w * mask).t() + b, rtol=1e-5, atol=1e-5)
    # Conv1D passes transposed views, new objects per call: still one compression
    wt, mt = w.t().contiguous(), mask.t().contiguous()
    op(x, wt.t(), mt.t(), b, 2, 4, 0.0)
    op(x, wt.t(), mt.t(), b, 2, 4, 0.0)
    assert len(calls) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_shapes(dtype):
    g = torch.Generator().manual_seed(2024)
    cases = []
    for _ in range(6):
        m = int(torch.randint(2, 9, (1,), generator=g))
        n = int(torch.randint(1, m + 1, (1,), generator=g))
        T, in_, out = (int(v) for v in torch.randint(1, 50, (3,), generator=g))
        cases.append((T, in_, out, n, m, bool(torch.rand(1, generator=g) < 0.5)))
    _check(cases, dtype)
