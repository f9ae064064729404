"""Base GEMM plus sparse-row / sparse-column weight deltas in one launch: serve an S²FT adapter without merging.

``y = x @ W.T + b``, then for rows ``R`` with delta ``D_r [|R|, in]``: ``y[:, R] += x @ D_r.T``, and for columns
``C`` with delta ``D_c [out, |C|]``: ``y += x[:, C] @ D_c.T``. ``R`` and ``C`` are arbitrary, unsorted indices in the
weight's original coordinates (so the base ``W`` stays unpermuted and untouched).

How: the deltas are folded into the ``W`` tile in registers, ``W_eff[o, i] = W[o, i] + D_r[pos_r[o], i] +
D_c[o, pos_c[i]]``, via dense position maps (``pos = -1`` where no delta; built once per adapter by
:func:`index_map`), then one ``tl.dot`` per K step. So the flops are the base GEMM's, not base + delta; the price is
that the folded tile is rounded to the input dtype before the dot, which is exactly what merging ``W + D`` in that
dtype would give (fp32 inputs: no rounding beyond fp32). With ``replace=True`` the deltas *replace* the rows or
columns instead of adding to them (what the S²FT forward needs: the trained blocks are the new values).

Expected GPU bound (``T`` tokens, ``e`` bytes/element): flops ``2*T*in*out`` (as the plain GEMM). Bytes:
``T*in*e`` (x) + ``out*in*e`` (W, once per token tile) + ``T*out*e`` (y) + ``(|R|*in + out*|C|)*e_d`` (deltas,
gathered by masked loads, once per token tile). Compute-bound like the base GEMM for large ``T`` (prefill,
training); for decoding (``T`` small) memory-bound on ``W``, with the deltas adding only
``|R|/out + |C|/in`` to the bytes — versus a second GEMM launch that would re-read x and y.

Imports without triton (``HAS_TRITON`` False; the launcher then raises). Importing it registers
``sparsify::s2ft_linear_triton`` and ``sparsify::s2ft_input_grad_triton`` as the ``"triton"`` lowerings of
``sparsify::s2ft_linear`` and ``sparsify::s2ft_input_grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsify_fx.codegen.kernels._gemm import gemm_launch_options
from sparsify_fx.codegen.lowering import import_triton, register_twin, require_triton
from sparsify_fx.errors import ConfigError
from sparsify_fx.ops import blocks_in_place, validate_tensors

triton, tl = import_triton()
HAS_TRITON = triton is not None

__all__ = ["HAS_TRITON", "delta_gemm", "delta_gemm_reference", "index_map"]


if HAS_TRITON:
    from sparsify_fx.codegen.kernels._gemm import dot_folded, store_tile

    @triton.jit
    def _delta_gemm_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, dr_ptr, rpos_ptr, dc_ptr, cpos_ptr,
        T, IN, OUT,
        stride_xt, stride_xi, stride_wo, stride_wi, stride_yt, stride_yo,
        stride_dr0, stride_dr1, stride_dc0, stride_dc1,
        HAS_BIAS: tl.constexpr, HAS_ROWS: tl.constexpr, HAS_COLS: tl.constexpr, REPLACE: tl.constexpr,
        UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # tokens
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # output features
        mask_m = rm < T
        mask_n = rn < OUT
        if HAS_ROWS:
            rpos = tl.load(rpos_ptr + rn, mask=mask_n, other=-1)
            has_row = rpos >= 0
            # most tiles of a sparse adapter hold no delta row: skip their gathers entirely
            tile_has_rows = tl.max(rpos, axis=0) >= 0
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < IN
            x = tl.load(x_ptr + rm[:, None] * stride_xt + rk[None, :] * stride_xi,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            # W tile transposed: w[k, n] = W[n, k]
            w = tl.load(w_ptr + rn[None, :] * stride_wo + rk[:, None] * stride_wi,
                        mask=mask_n[None, :] & mask_k[:, None], other=0.0).to(tl.float32)
            if HAS_ROWS:
                if tile_has_rows:
                    dmask = has_row[None, :] & mask_k[:, None]
                    dr = tl.load(dr_ptr + rpos[None, :] * stride_dr0 + rk[:, None] * stride_dr1,
                                 mask=dmask, other=0.0).to(tl.float32)
                    if REPLACE:
                        w = tl.where(dmask, dr, w)
                    else:
                        w = w + dr
            if HAS_COLS:
                cpos = tl.load(cpos_ptr + rk, mask=mask_k, other=-1)
                dmask = (cpos >= 0)[:, None] & mask_n[None, :]
                dc = tl.load(dc_ptr + rn[None, :] * stride_dc0 + cpos[:, None] * stride_dc1,
                             mask=dmask, other=0.0).to(tl.float32)
                if REPLACE:
                    w = tl.where(dmask, dc, w)
                else:
                    w = w + dc
            acc = dot_folded(acc, x, w, x_ptr, UPCAST, INPUT_PRECISION)
        store_tile(y_ptr, b_ptr, acc, rm, rn, mask_m, mask_n, stride_yt, stride_yo, HAS_BIAS)


def index_map(indices: Tensor, size: int) -> Tensor:
    """Dense int32 map ``pos[j] = i`` where ``indices[i] == j``, else -1. Raises on out-of-range or repeated indices."""
    indices = indices.reshape(-1).to(torch.int64)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise ConfigError(
            f"delta_gemm: indices must lie in [0, {size}), got range [{int(indices.min())}, {int(indices.max())}]."
        )
    if indices.unique().numel() != indices.numel():
        raise ConfigError("delta_gemm: indices repeat; give each row/column one delta (sum duplicates first).")
    pos = torch.full((size,), -1, dtype=torch.int32, device=indices.device)
    pos[indices] = torch.arange(indices.numel(), dtype=torch.int32, device=indices.device)
    return pos


def _check(x: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor | None, row_delta: Tensor | None,
           cols: Tensor | None, col_delta: Tensor | None) -> None:
    out, in_ = weight.shape
    if x.shape[-1] != in_:
        raise ConfigError(f"delta_gemm: x {tuple(x.shape)} does not match weight {tuple(weight.shape)} (in={in_}).")
    if bias is not None and tuple(bias.shape) != (out,):
        raise ConfigError(f"delta_gemm: bias must be ({out},), got {tuple(bias.shape)}.")
    if (rows is None) != (row_delta is None) or (cols is None) != (col_delta is None):
        raise ConfigError("delta_gemm: pass rows with row_delta and cols with col_delta (both or neither).")
    if rows is not None and tuple(row_delta.shape) != (rows.numel(), in_):
        raise ConfigError(f"delta_gemm: row_delta must be ({rows.numel()}, {in_}), got {tuple(row_delta.shape)}.")
    if cols is not None and tuple(col_delta.shape) != (out, cols.numel()):
        raise ConfigError(f"delta_gemm: col_delta must be ({out}, {cols.numel()}), got {tuple(col_delta.shape)}.")


def delta_gemm_reference(x: Tensor, weight: Tensor, bias: Tensor | None = None, rows: Tensor | None = None,
                         row_delta: Tensor | None = None, cols: Tensor | None = None,
                         col_delta: Tensor | None = None, *, replace: bool = False) -> Tensor:
    """PyTorch reference of :func:`delta_gemm` in fp32 (two extra small GEMMs instead of folding)."""
    _check(x, weight, bias, rows, row_delta, cols, col_delta)
    xf, wf = x.float(), weight.float()
    if replace:
        w = wf.clone()
        if rows is not None:
            w[rows.long()] = row_delta.float()
        if cols is not None:
            w[:, cols.long()] = col_delta.float()
        wf, rows, cols = w, None, None
    y = xf @ wf.t()
    if bias is not None:
        y = y + bias.float()
    if rows is not None:
        y[..., rows.long()] += xf @ row_delta.float().t()
    if cols is not None:
        y = y + xf[..., cols.long()] @ col_delta.float().t()
    return y


def delta_gemm(x: Tensor, weight: Tensor, bias: Tensor | None = None, rows: Tensor | None = None,
               row_delta: Tensor | None = None, cols: Tensor | None = None, col_delta: Tensor | None = None, *,
               replace: bool = False, row_pos: Tensor | None = None, col_pos: Tensor | None = None,
               tf32: bool = False) -> Tensor:
    """``x @ (W + deltas).T + b`` in one kernel; ``x [..., in]`` → ``y [..., out]`` in ``x``'s dtype.

    ``rows``/``cols`` are index tensors in ``W``'s coordinates; ``row_pos``/``col_pos`` (from :func:`index_map`)
    may be passed instead of being rebuilt per call. ``replace=True`` makes the deltas the new rows/columns (only
    one of rows/cols then). Any strides for ``weight`` and the deltas (e.g. ``W.t()``); ``tf32`` as in
    :func:`~sparsify_fx.codegen.kernels.sliced_wgrad.sliced_wgrad`.
    """
    require_triton("delta_gemm", HAS_TRITON, x.device)
    _check(x, weight, bias, rows, row_delta, cols, col_delta)
    if replace and rows is not None and cols is not None:
        raise ConfigError("delta_gemm: replace=True takes rows or cols, not both (their overlap would be ambiguous).")
    out, in_ = weight.shape
    x2 = x.reshape(-1, in_)
    T = x2.shape[0]
    y = torch.empty((T, out), dtype=x.dtype, device=x.device)
    if T == 0 or out == 0:
        return y.reshape(*x.shape[:-1], out)
    dummy_f = weight
    dummy_i = torch.empty(1, dtype=torch.int32, device=x.device)
    has_rows = rows is not None and rows.numel() > 0
    has_cols = cols is not None and cols.numel() > 0
    if has_rows and row_pos is None:
        row_pos = index_map(rows, out)
    if has_cols and col_pos is None:
        col_pos = index_map(cols, in_)
    dr = row_delta if has_rows else dummy_f
    dc = col_delta if has_cols else dummy_f
    opts = gemm_launch_options(x.device, tf32)
    grid = (triton.cdiv(T, opts["BLOCK_M"]), triton.cdiv(out, opts["BLOCK_N"]))
    _delta_gemm_kernel[grid](
        x2, weight, bias if bias is not None else dummy_f, y, dr, row_pos if has_rows else dummy_i,
        dc, col_pos if has_cols else dummy_i,
        T, in_, out,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        dr.stride(0), dr.stride(1), dc.stride(0), dc.stride(1),
        HAS_BIAS=bias is not None, HAS_ROWS=has_rows, HAS_COLS=has_cols, REPLACE=replace, **opts,
    )
    return y.reshape(*x.shape[:-1], out)


# --------------------------------------------------------------------------------------------------------------
# triton twins of the S²FT forward and input-gradient ops (the blocks *replace* rows/columns of the frozen weight)
# --------------------------------------------------------------------------------------------------------------


def _replaced_gemm(x: Tensor, weight: Tensor, bias: Tensor | None, blocks: list[Tensor], dim: int,
                   starts: list[int]) -> Tensor:
    """``x @ W.T (+ bias)`` in one launch, ``W`` being ``weight`` with the blocks read in place of its rows/columns."""
    if blocks_in_place(weight, blocks, dim, starts):
        return delta_gemm(x, weight, bias)
    idx = torch.cat([torch.arange(s, s + b.size(dim), device=weight.device) for b, s in zip(blocks, starts)])
    # one block: its own strides, no copy; several: one small copy of the trained units
    stacked = blocks[0] if len(blocks) == 1 else torch.cat(list(blocks), dim=dim)
    if dim == 0:
        return delta_gemm(x, weight, bias, rows=idx, row_delta=stacked, replace=True)
    return delta_gemm(x, weight, bias, cols=idx, col_delta=stacked, replace=True)


def _s2ft_linear_triton(x: Tensor, weight: Tensor, bias: Tensor | None, blocks: list[Tensor], dim: int,
                        starts: list[int]) -> Tensor:
    """Triton twin of ``sparsify::s2ft_linear``: one GEMM launch, blocks read in place of their rows/columns."""
    validate_tensors(x, weight, bias, blocks, dim, starts)
    return _replaced_gemm(x, weight, bias, blocks, dim, starts)


def _s2ft_input_grad_triton(grad_y: Tensor, weight: Tensor, blocks: list[Tensor], dim: int,
                            starts: list[int]) -> Tensor:
    """Triton twin of ``sparsify::s2ft_input_grad``: ``grad_y @ W`` is the same GEMM on ``W.T`` (a strided view),
    where row blocks of ``W`` become replaced columns of ``W.T`` and vice versa."""
    validate_tensors(None, weight, None, blocks, dim, starts)
    return _replaced_gemm(grad_y, weight.t(), None, [b.t() for b in blocks], 1 - dim, starts)


# The twins share the aten ops' autograd, so they also work eagerly (the backend swaps them in after AOT has split
# forward and backward, where no autograd is needed).
s2ft_linear_triton = register_twin(torch.ops.sparsify.s2ft_linear, "s2ft_linear_triton", _s2ft_linear_triton,
                                   lower=HAS_TRITON)
s2ft_input_grad_triton = register_twin(torch.ops.sparsify.s2ft_input_grad, "s2ft_input_grad_triton",
                                       _s2ft_input_grad_triton, lower=HAS_TRITON)
