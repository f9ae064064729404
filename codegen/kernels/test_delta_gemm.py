"""Delta GEMM kernel (Triton interpreter on CPU) against its PyTorch reference, and its S²FT op twins.

Tolerances: fp32 as the reference up to summation order (rtol 1e-5, atol 1e-5 x scale). bf16: the kernel folds the
deltas into the weight tile and rounds it to bf16 (as merging would), so it is compared with the reference on that
bf16-merged weight; the only remaining error is the bf16 rounding of y (interpreter truncates: one ulp, rtol 2^-7).
"""

from __future__ import annotations

import pytest
import torch

import sparsify_fx.ops  # noqa: F401
from sparsify_fx.codegen.kernels import delta_gemm as dg
from sparsify_fx.codegen.lowering import lowering_for
from sparsify_fx.errors import ConfigError

pytestmark = pytest.mark.skipif(not dg.HAS_TRITON, reason="triton not installed")

# (tokens, in, out): none a multiple of the 32-wide interpreter tiles
SHAPES = [(17, 45, 33), (5, 70, 9), (40, 8, 66)]
KINDS = ["base", "rows", "cols", "both"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _problem(shape, kind, dtype, seed, bias=True):
    T, in_, out = shape
    g = _gen(seed)
    x = torch.randn(T, in_, generator=g).to(dtype)
    W = torch.randn(out, in_, generator=g).to(dtype)
    b = torch.randn(out, generator=g).to(dtype) if bias else None
    kw = {}
    if kind in ("rows", "both"):
        rows = torch.randperm(out, generator=g)[: max(1, out // 3)]  # unsorted
        kw.update(rows=rows, row_delta=(0.1 * torch.randn(rows.numel(), in_, generator=g)).to(dtype))
    if kind in ("cols", "both"):
        cols = torch.randperm(in_, generator=g)[: max(1, in_ // 4)]
        kw.update(cols=cols, col_delta=(0.1 * torch.randn(out, cols.numel(), generator=g)).to(dtype))
    return x, W, b, kw


def _merged_reference(x, W, b, kw, replace=False):
    """Reference on the weight merged in fp32 then rounded to the input dtype (what the kernel's fold computes)."""
    w = W.float().clone()
    if "rows" in kw:
        r = kw["rows"].long()
        w[r] = kw["row_delta"].float() if replace else w[r] + kw["row_delta"].float()
    if "cols" in kw:
        c = kw["cols"].long()
        w[:, c] = kw["col_delta"].float() if replace else w[:, c] + kw["col_delta"].float()
    w = w.to(x.dtype).float()
    y = x.float() @ w.t()
    return y + b.float() if b is not None else y


def _close(got, want, dtype):
    scale = want.abs().max().item() + 1e-12
    rtol = 1e-5 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(got.float(), want, rtol=rtol, atol=1e-5 * scale)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_reference(shape, kind, dtype):
    seed = SHAPES.index(shape) * 10 + KINDS.index(kind)
    x, W, b, kw = _problem(shape, kind, dtype, seed, bias=seed % 2 == 0)
    y = dg.delta_gemm(x, W, b, **kw)
    assert y.shape == (shape[0], shape[2]) and y.dtype == dtype
    ref = dg.delta_gemm_reference(x, W, b, **kw)
    if dtype == torch.float32:
        _close(y, ref, dtype)
    else:
        _close(y, _merged_reference(x, W, b, kw), dtype)
        # and the bf16 fold stays near the exact fp32 answer (merge rounding ~ sqrt(in) * 2^-9 * |x||w|)
        torch.testing.assert_close(y.float(), ref, rtol=2**-6, atol=2**-6 * ref.abs().max().item())
    # deltas really act: without them the result differs
    if kind != "base":
        assert not torch.allclose(y.float(), dg.delta_gemm_reference(x, W, b), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_replace_mode(kind, dtype):
    x, W, b, kw = _problem((17, 45, 33), kind, dtype, seed=50)
    y = dg.delta_gemm(x, W, b, replace=True, **kw)
    _close(y, _merged_reference(x, W, b, kw, replace=True), dtype)
    if dtype == torch.float32:
        _close(y, dg.delta_gemm_reference(x, W, b, replace=True, **kw), dtype)


def test_strided_weight_leading_dims_and_cached_maps():
    x, W, b, kw = _problem((12, 45, 33), "both", torch.float32, seed=60)
    Wt_storage = W.t().contiguous()  # W as a transposed view: strides (1, out)
    Wv = Wt_storage.t()
    assert not Wv.is_contiguous()
    maps = dict(row_pos=dg.index_map(kw["rows"], 33), col_pos=dg.index_map(kw["cols"], 45))
    y = dg.delta_gemm(x.reshape(3, 4, 45), Wv, b, col_delta=kw["col_delta"].t().contiguous().t(),
                      rows=kw["rows"], row_delta=kw["row_delta"], cols=kw["cols"], **maps)
    assert y.shape == (3, 4, 33)
    _close(y.reshape(12, 33), dg.delta_gemm_reference(x, W, b, **kw), torch.float32)


def test_index_map_and_bad_arguments():
    pos = dg.index_map(torch.tensor([4, 0, 2]), 6)
    assert pos.tolist() == [1, -1, 2, -1, 0, -1]
    with pytest.raises(ConfigError, match="repeat"):
        dg.index_map(torch.tensor([1, 1]), 4)
    with pytest.raises(ConfigError, match="range"):
        dg.index_map(torch.tensor([4]), 4)
    x, W = torch.randn(3, 5), torch.randn(6, 5)
    with pytest.raises(ConfigError, match="row_delta must be"):
        dg.delta_gemm(x, W, rows=torch.tensor([1, 2]), row_delta=torch.randn(2, 4))
    with pytest.raises(ConfigError, match="both or neither"):
        dg.delta_gemm(x, W, rows=torch.tensor([1]))
    with pytest.raises(ConfigError, match="not both"):
        dg.delta_gemm(x, W, rows=torch.tensor([1]), row_delta=torch.randn(1, 5), cols=torch.tensor([0]),
                      col_delta=torch.randn(6, 1), replace=True)


# ---------------------------------------------------------------------------------------------------------------
# the S²FT op twins
# ---------------------------------------------------------------------------------------------------------------

TWIN_CASES = [(0, [(2, 3)], True), (0, [(6, 2), (0, 3)], False), (1, [(1, 4)], True), (1, [(7, 2), (0, 3)], False)]


def _s2ft_inputs(dim, spans, views, seed=70):
    g = _gen(seed)
    W = torch.randn(9, 10, generator=g)
    b = torch.randn(9, generator=g)
    x = torch.randn(2, 3, 10, generator=g, requires_grad=True)
    if views:
        blocks = [W.narrow(dim, s, k).detach().requires_grad_() for s, k in spans]
    else:
        blocks = [torch.randn(W.narrow(dim, s, k).shape, generator=g, requires_grad=True) for s, k in spans]
    return x, W, b, blocks, [s for s, _ in spans]


@pytest.mark.parametrize("dim,spans,views", TWIN_CASES)
def test_s2ft_linear_triton_matches_aten_op(dim, spans, views):
    x, W, b, blocks, starts = _s2ft_inputs(dim, spans, views)
    args = (x, W, b, blocks, dim, starts)
    y = torch.ops.sparsify.s2ft_linear_triton(*args)
    y_ref = torch.ops.sparsify.s2ft_linear(*args)
    _close(y, y_ref.detach(), torch.float32)
    gy = torch.randn(y.shape, generator=_gen(71))
    grads = torch.autograd.grad(y, [x, *blocks], gy)
    grads_ref = torch.autograd.grad(y_ref, [x, *blocks], gy)
    for a, r in zip(grads, grads_ref):
        _close(a, r, torch.float32)
    torch.library.opcheck(torch.ops.sparsify.s2ft_linear_triton, args)


@pytest.mark.parametrize("dim,spans,views", TWIN_CASES)
def test_s2ft_input_grad_triton_matches_aten_op(dim, spans, views):
    _, W, _, blocks, starts = _s2ft_inputs(dim, spans, views)
    blocks = [blk.detach() for blk in blocks]
    gy = torch.randn(2, 3, 9, generator=_gen(72))
    args = (gy, W, blocks, dim, starts)
    _close(torch.ops.sparsify.s2ft_input_grad_triton(*args), torch.ops.sparsify.s2ft_input_grad(*args),
           torch.float32)
    torch.library.opcheck(torch.ops.sparsify.s2ft_input_grad_triton, args)


def test_lowerings_registered():
    ops = torch.ops.sparsify
    assert lowering_for(ops.s2ft_linear.default, "triton") is ops.s2ft_linear_triton.default
    assert lowering_for(ops.s2ft_input_grad.default, "triton") is ops.s2ft_input_grad_triton.default
