"""Block-sparse matmul over a BSR weight: ``y = x @ (W ∘ M).T + b`` reading only the kept tiles.

The weight arrives as by :func:`sparsify_fx.passes.nm.to_bsr`: ``values [nnz, br, bc]`` (kept tiles, edge tiles
zero-padded), ``crow [ceil(out/br)+1]`` and ``col [nnz]`` (int32; tile row ``r`` holds tiles
``crow[r]..crow[r+1]-1`` at tile columns ``col[...]``). Any tile shape works; non-power-of-two tiles are padded to
the next power of two (at least 16, the ``tl.dot`` minimum) in registers.

How: one program per (token tile, tile row of ``W``): it walks that row's kept tiles, loads the matching ``bc``
input columns of ``x`` and the tile, and accumulates ``x_cols @ tile.T``. Pruned tiles are never touched.

Expected GPU bound (``T`` tokens, ``e`` bytes/element, density ``d`` of kept tiles): flops ``2*T*in*out*d``. Bytes:
``T*in*e`` per tile row that reads it (``x`` columns are re-read once per kept tile, i.e. ``T*in*d*e*ceil(out/br)``
through L2) + ``out*in*d*e`` (tile values, once per token tile) + ``4*nnz`` (indices) + ``T*out*e`` (y). Decoding
is memory-bound on the weight, so it moves ``d`` of the dense bytes; large ``T`` is compute-bound at ``d`` of the
dense flops (tiles of 32+ keep the tensor cores busy; tiny tiles waste them on padding).

Imports without triton (``HAS_TRITON`` False; the launcher then raises). Importing it registers
``sparsify::block_sparse_linear_triton`` as the ``"triton"`` lowering of ``sparsify::block_sparse_linear``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sparsify_fx.codegen.lowering import import_triton, register_twin, require_triton
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes.nm import from_bsr, to_bsr
from sparsify_fx.passes.nm_ops import compact_cached, validate

triton, tl = import_triton()
HAS_TRITON = triton is not None

__all__ = ["HAS_TRITON", "block_sparse_linear_triton", "blocksparse_matmul", "blocksparse_matmul_reference"]


if HAS_TRITON:

    @triton.jit
    def _blocksparse_kernel(
        x_ptr, v_ptr, crow_ptr, col_ptr, b_ptr, y_ptr,
        T, IN, OUT,
        stride_xt, stride_xi, stride_yt, stride_yo,
        BR: tl.constexpr, BC: tl.constexpr, BRP: tl.constexpr, BCP: tl.constexpr,
        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        r = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        nl = tl.arange(0, BRP)  # output row within the tile
        kl = tl.arange(0, BCP)  # input column within the tile
        rn = r * BR + nl
        mask_m = rm < T
        mask_n = (nl < BR) & (rn < OUT)
        start = tl.load(crow_ptr + r)
        end = tl.load(crow_ptr + r + 1)
        acc = tl.zeros((BLOCK_M, BRP), dtype=tl.float32)
        for p in range(start, end):
            c = tl.load(col_ptr + p)
            rk = c * BC + kl
            mask_k = (kl < BC) & (rk < IN)
            x = tl.load(x_ptr + rm[:, None] * stride_xt + rk[None, :] * stride_xi,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            # tile transposed: w[k, o] = values[p, o, k]
            w = tl.load(v_ptr + p * (BR * BC) + nl[None, :] * BC + kl[:, None],
                        mask=(nl[None, :] < BR) & (kl[:, None] < BC), other=0.0)
            if UPCAST:
                # interpreter: its bf16 dot is not a float dot; bf16 values are exact in fp32, so dot there
                acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc, input_precision="ieee")
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_yt + rn[None, :] * stride_yo, acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


def _check(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, shape: tuple[int, int],
           bias: Tensor | None) -> tuple[int, int]:
    if values.dim() != 3:
        raise ConfigError(f"blocksparse_matmul: values must be [nnz, br, bc], got {tuple(values.shape)}.")
    br, bc = values.shape[1], values.shape[2]
    out, in_ = shape
    if crow.numel() != math.ceil(out / br) + 1 or col.numel() != values.shape[0]:
        raise ConfigError(
            f"blocksparse_matmul: need crow of {math.ceil(out / br) + 1} entries and col of {values.shape[0]}, "
            f"got {crow.numel()} and {col.numel()}; build them with sparsify_fx.passes.nm.to_bsr."
        )
    if x.shape[-1] != in_:
        raise ConfigError(f"blocksparse_matmul: x {tuple(x.shape)} does not have in_features={in_} columns.")
    if bias is not None and tuple(bias.shape) != (out,):
        raise ConfigError(f"blocksparse_matmul: bias must be ({out},), got {tuple(bias.shape)}.")
    return br, bc


def blocksparse_matmul_reference(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, shape: tuple[int, int],
                                 bias: Tensor | None = None) -> Tensor:
    """PyTorch reference of :func:`blocksparse_matmul` in fp32: densify, then a dense matmul."""
    br, bc = _check(x, values, crow, col, shape, bias)
    w, _ = from_bsr(values.float(), crow, col, (br, bc), shape)
    y = x.float() @ w.t()
    return y + bias.float() if bias is not None else y


def blocksparse_matmul(x: Tensor, values: Tensor, crow: Tensor, col: Tensor, shape: tuple[int, int],
                       bias: Tensor | None = None) -> Tensor:
    """``x [..., in] @ W.T + b`` for a BSR weight of dense ``shape = (out, in)``; ``y`` in ``x``'s dtype."""
    require_triton("blocksparse_matmul", HAS_TRITON, x.device)
    br, bc = _check(x, values, crow, col, shape, bias)
    out, in_ = shape
    x2 = x.reshape(-1, in_)
    T = x2.shape[0]
    y = torch.empty((T, out), dtype=x.dtype, device=x.device)
    if T == 0 or out == 0:
        return y.reshape(*x.shape[:-1], out)
    values = values.contiguous()
    block_m = 16 if x.device.type == "cpu" else 64
    grid = (triton.cdiv(T, block_m), math.ceil(out / br))
    _blocksparse_kernel[grid](
        x2, values, crow.to(torch.int32), col.to(torch.int32), bias if bias is not None else values, y,
        T, in_, out,
        x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        BR=br, BC=bc, BRP=max(16, triton.next_power_of_2(br)), BCP=max(16, triton.next_power_of_2(bc)),
        HAS_BIAS=bias is not None, UPCAST=x.device.type == "cpu", BLOCK_M=block_m,
    )
    return y.reshape(*x.shape[:-1], out)


def _block_sparse_linear_triton(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None, block_rows: int,
                                block_cols: int, pruned_grad_scale: float = 0.0) -> Tensor:
    """Triton twin of ``sparsify::block_sparse_linear``: BSR of ``weight ∘ mask`` (cached until either changes),
    then :func:`blocksparse_matmul`."""
    validate(x, weight, mask, bias)

    def build():
        values, crow, col = to_bsr(weight.detach(), mask, (block_rows, block_cols))
        return values.to(x.dtype), crow, col

    values, crow, col = compact_cached(weight, mask, ("block", block_rows, block_cols, x.dtype), build)
    return blocksparse_matmul(x, values, crow, col, tuple(weight.shape), bias)


block_sparse_linear_triton = register_twin(torch.ops.sparsify.block_sparse_linear, "block_sparse_linear_triton",
                                           _block_sparse_linear_triton, lower=HAS_TRITON)
