"""Block-sparse (BSR) matmul kernel (Triton interpreter on CPU) against its reference and the dense masked matmul.

Tolerances as in ``test_nm_matmul``: fp32 up to summation order (atol 1e-5 x output scale); bf16 one ulp of the
output (rtol 2^-7 of the output scale), since inputs and tiles are bf16 and accumulation is fp32.
"""

from __future__ import annotations

import pytest
import torch

from sparsify_fx.codegen.kernels import blocksparse as K
from sparsify_fx.codegen.lowering import lowering_for
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes.nm import block_mask, to_bsr
from sparsify_fx.testing import check_kernel

pytestmark = pytest.mark.skipif(not K.HAS_TRITON, reason="triton not installed")
# atol x the output's scale, rtol 0: fp32 up to summation order, bf16 one ulp of the output
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2.0**-7}

# (tokens, out, in, block, density): weights not multiples of the tiles, tiles not powers of two, an empty row
CASES = [
    (5, 45, 33, (8, 8), 0.5),
    (17, 30, 40, (16, 16), 0.3),
    (7, 64, 40, (32, 8), 0.5),
    (3, 20, 21, (3, 5), 0.4),
    (2, 16, 16, (16, 16), 1.0),
]


def _problem(case, dtype, seed, bias=True):
    T, out, in_, block, density = case
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, in_, generator=g)
    mask = block_mask(w.abs(), block, density, padding="zero")
    x = torch.randn(T, in_, generator=g).to(dtype)
    b = torch.randn(out, generator=g).to(dtype) if bias else None
    return x, w.to(dtype), mask, b


def _inputs(case, dtype, device, g):
    """check_kernel's input maker: activations, weight, its block mask, bias, and the block shape."""
    T, out, in_, block, density = case
    w = torch.randn(out, in_, generator=g)
    mask = block_mask(w.abs(), block, density, padding="zero")
    x = torch.randn(T, in_, generator=g).to(dtype)
    b = torch.randn(out, generator=g).to(dtype)
    return x.to(device), w.to(dtype).to(device), mask.to(device), b.to(device), block


def _kernel(x, w, mask, b, block):
    y = K.blocksparse_matmul(x, *to_bsr(w, mask, block), tuple(w.shape), b)
    assert y.dtype == x.dtype and y.shape == (x.shape[0], w.shape[0])
    return y


def _dense_masked(x, w, mask, b, block):
    return x @ (w * mask).t() + b


def _reference(x, w, mask, b, block):
    return K.blocksparse_matmul_reference(x, *to_bsr(w, mask, block), tuple(w.shape), b)


def _check(cases, dtype, reference=_dense_masked):
    check_kernel(_kernel, reference, cases, (dtype,), make_inputs=_inputs, rtol=0.0, atol=ATOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reference", [_dense_masked, _reference], ids=["dense", "reference"])
def test_matches_dense_masked_and_reference(dtype, reference):
    _check(CASES, dtype, reference)


def test_empty_tile_rows_give_bias():
    x, w, _, b = _problem((4, 32, 16, (8, 8), 0.5), torch.float32, seed=2)
    mask = torch.zeros(32, 16, dtype=torch.bool)
    mask[:8, 8:] = True  # one tile; tile rows 1..3 are empty
    values, crow, col = to_bsr(w, mask, (8, 8))
    assert values.shape[0] == 1
    y = K.blocksparse_matmul(x, values, crow, col, (32, 16), b)
    torch.testing.assert_close(y, x @ (w * mask).t() + b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[:, 8:], b[8:].expand(4, 24))


def test_bad_layout():
    x, w, mask, b = _problem((4, 16, 16, (8, 8), 0.5), torch.float32, seed=1)
    values, crow, col = to_bsr(w, mask, (8, 8))
    with pytest.raises(ConfigError, match="to_bsr"):
        K.blocksparse_matmul(x, values, crow[:-1], col, (16, 16), b)
    with pytest.raises(ConfigError, match="in_features"):
        K.blocksparse_matmul(x[:, :8], values, crow, col, (16, 16), b)


def test_op_twin_lowering_and_grads():
    op = torch.ops.sparsify.block_sparse_linear
    assert lowering_for(op.default, "triton") is torch.ops.sparsify.block_sparse_linear_triton.default
    x, w, mask, b = _problem((5, 24, 20, (8, 4), 0.5), torch.float32, seed=7)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = torch.ops.sparsify.block_sparse_linear_triton(x, w, mask, b, 8, 4, 0.0)
    ref_x = x.detach().clone().requires_grad_(True)
    ref_w = w.detach().clone().requires_grad_(True)
    ref = op(ref_x, ref_w, mask, b, 8, 4, 0.0)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    gy = torch.randn_like(y)
    y.backward(gy)
    ref.backward(gy)
    torch.testing.assert_close(x.grad, ref_x.grad)
    torch.testing.assert_close(w.grad, ref_w.grad)


def test_opcheck_twin():
    x, w, mask, b = _problem((3, 8, 8, (4, 4), 0.5), torch.float32, seed=9)
    torch.library.opcheck(torch.ops.sparsify.block_sparse_linear_triton.default,
                          (x, w.requires_grad_(True), mask, b, 4, 4, 0.0),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_twin_caches_bsr_until_mask_changes(monkeypatch):
    calls = []
    real = K.to_bsr
    monkeypatch.setattr(K, "to_bsr", lambda *a: calls.append(1) or real(*a))
    x, w, mask, b = _problem((4, 16, 16, (8, 8), 0.5), torch.float32, seed=5)
    op = torch.ops.sparsify.block_sparse_linear_triton
    op(x, w, mask, b, 8, 8, 0.0)
    op(x, w, mask, b, 8, 8, 0.0)
    assert len(calls) == 1
    other = ~mask  # a new mask object for the same weight
    y = op(x, w, other, b, 8, 8, 0.0)
    assert len(calls) == 2
    torch.testing.assert_close(y, x @ (w * other).t() + b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_shapes(dtype):
    g = torch.Generator().manual_seed(2024)
    cases = []
    for _ in range(6):
        T, out, in_ = (int(v) for v in torch.randint(1, 50, (3,), generator=g))
        block = tuple(int(v) for v in torch.randint(1, 20, (2,), generator=g))
        cases.append((T, out, in_, block, float(torch.rand(1, generator=g)) * 0.9 + 0.1))
    _check(cases, dtype)
