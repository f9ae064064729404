"""N:M sparse matmul from the compact form: ``y = x @ W.T + b`` where ``W`` keeps ``n`` of every ``m`` inputs.

The weight arrives compressed as by :func:`sparsify_fx.passes.nm.compress_nm`: ``values [out, G*n]`` and
``positions [out, G*n]`` (uint8 offset ``0..m-1`` of each kept value inside its group; ``G = ceil(in/m)``), or,
with ``packed=True`` and ``m <= 16``, two 4-bit offsets per byte (:func:`sparsify_fx.passes.nm.pack_positions`, the
exported file's form). Any ``n <= m`` works (2:4 is the usual one), and ``in`` need not be a multiple of ``m``
(pads are zero values).

How: each program owns a ``BLOCK_M x BLOCK_N`` output tile. Per ``BLOCK_K`` slice of dense input columns it rebuilds
the dense weight tile in registers — dense column ``j`` lies in group ``j // m`` at offset ``j % m``, and
``W[o, j] = sum_s values[o, g*n+s] * (positions[o, g*n+s] == j % m)`` over the ``n`` slots of the group — then
does one ``tl.dot`` with the ``x`` tile. The compact entries of a tile are re-read ``m`` times, but from L1/L2:
global memory sees each once per token tile.

Expected GPU bound (``T`` tokens, ``e`` bytes/element): flops ``2*T*in*out`` (the decompressed tile goes through
the dense tensor-core dot; Triton has no access to the 2:4 sparse tensor cores that would halve it). Bytes:
``T*in*e`` (x) + ``out*in*(n/m)*(e+p)`` (values + positions, ``p`` = 1 byte, or 0.5 packed; once per token tile)
+ ``T*out*e`` (y). So for decoding (``T`` small, memory-bound on W) packed 2:4 moves ``(e+0.5)/(2e)`` of the dense
weight bytes — 0.625x in bf16, 0.5625x in fp32; for prefill/training it is compute-bound like the dense GEMM.

Imports without triton (``HAS_TRITON`` False; the launcher then raises). Importing it registers
``sparsify::nm_linear_triton`` as the ``"triton"`` lowering of ``sparsify::nm_linear``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sparsify_fx.codegen.lowering import import_triton, register_twin, require_triton
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes.nm import compress_nm, decompress_nm, pack_positions, unpack_positions
from sparsify_fx.passes.nm_ops import compact_cached, validate

triton, tl = import_triton()
HAS_TRITON = triton is not None

__all__ = ["HAS_TRITON", "nm_linear_triton", "nm_matmul", "nm_matmul_reference"]


if HAS_TRITON:

    @triton.jit
    def _nm_matmul_kernel(
        x_ptr, v_ptr, p_ptr, b_ptr, y_ptr,
        T, IN, OUT, KC,
        stride_xt, stride_xi, stride_vo, stride_vk, stride_po, stride_pk, stride_yt, stride_yo,
        N: tl.constexpr, M: tl.constexpr, PACKED: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = rm < T
        mask_n = rn < OUT
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < IN
            x = tl.load(x_ptr + rm[:, None] * stride_xt + rk[None, :] * stride_xi,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            group = rk // M
            offset = (rk % M).to(tl.uint8)
            wmask = mask_k[:, None] & mask_n[None, :]
            # w[k, o] = W[o, k], rebuilt from the n compact slots of column k's group
            w = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(N):
                c = group * N + s
                v = tl.load(v_ptr + rn[None, :] * stride_vo + c[:, None] * stride_vk, mask=wmask, other=0.0)
                if PACKED:
                    byte = tl.load(p_ptr + rn[None, :] * stride_po + (c // 2)[:, None] * stride_pk, mask=wmask,
                                   other=0)
                    p = ((byte >> ((c % 2) * 4).to(tl.uint8)[:, None]) & 0xF).to(tl.uint8)
                else:
                    p = tl.load(p_ptr + rn[None, :] * stride_po + c[:, None] * stride_pk, mask=wmask, other=M)
                w = tl.where(p == offset[:, None], v.to(tl.float32), w)
            if UPCAST:
                # interpreter: its bf16 dot is not a float dot; the values are exact in fp32, so dot there
                acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
            else:
                acc = tl.dot(x, w.to(x_ptr.dtype.element_ty), acc, input_precision="ieee")
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rm[:, None] * stride_yt + rn[None, :] * stride_yo, acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


def _check(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int, in_features: int,
           bias: Tensor | None, packed: bool) -> None:
    if not 0 < n <= m or m > (16 if packed else 255):
        raise ConfigError(f"nm_matmul: need 0 < n <= m <= {16 if packed else 255}, got n={n}, m={m}.")
    kc = math.ceil(in_features / m) * n
    pshape = (values.shape[0], (kc + 1) // 2 if packed else kc)
    if values.dim() != 2 or values.shape[1] != kc or tuple(positions.shape) != pshape:
        raise ConfigError(
            f"nm_matmul: values must be [out, {kc}] (ceil(in/m)*n for in={in_features}) and positions "
            f"{list(pshape)}{' (packed)' if packed else ''}, got {tuple(values.shape)} and {tuple(positions.shape)}."
        )
    if x.shape[-1] != in_features:
        raise ConfigError(f"nm_matmul: x {tuple(x.shape)} does not have in_features={in_features} columns.")
    if bias is not None and tuple(bias.shape) != (values.shape[0],):
        raise ConfigError(f"nm_matmul: bias must be ({values.shape[0]},), got {tuple(bias.shape)}.")


def nm_matmul_reference(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int, in_features: int,
                        bias: Tensor | None = None, *, packed: bool = False) -> Tensor:
    """PyTorch reference of :func:`nm_matmul` in fp32: decompress, then a dense matmul."""
    _check(x, values, positions, n, m, in_features, bias, packed)
    if packed:
        positions = unpack_positions(positions, values.shape[1])
    w, _ = decompress_nm(values.float(), positions, n, m, in_features)
    y = x.float() @ w.t()
    return y + bias.float() if bias is not None else y


def nm_matmul(x: Tensor, values: Tensor, positions: Tensor, n: int, m: int, in_features: int,
              bias: Tensor | None = None, *, packed: bool = False) -> Tensor:
    """``x [..., in] @ W.T + b`` with ``W`` given compactly (see the module docstring); ``y`` in ``x``'s dtype."""
    require_triton("nm_matmul", HAS_TRITON, x.device)
    _check(x, values, positions, n, m, in_features, bias, packed)
    out = values.shape[0]
    x2 = x.reshape(-1, in_features)
    T = x2.shape[0]
    y = torch.empty((T, out), dtype=x.dtype, device=x.device)
    if T == 0 or out == 0:
        return y.reshape(*x.shape[:-1], out)
    positions = positions.to(torch.uint8)
    block_m, block_n, block_k = (16, 32, 32) if x.device.type == "cpu" else (64, 64, 64)
    grid = (triton.cdiv(T, block_m), triton.cdiv(out, block_n))
    _nm_matmul_kernel[grid](
        x2, values, positions, bias if bias is not None else values, y,
        T, in_features, out, values.shape[1],
        x2.stride(0), x2.stride(1), values.stride(0), values.stride(1), positions.stride(0), positions.stride(1),
        y.stride(0), y.stride(1),
        N=n, M=m, PACKED=packed, HAS_BIAS=bias is not None, UPCAST=x.device.type == "cpu",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return y.reshape(*x.shape[:-1], out)


def _nm_linear_triton(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None, n: int, m: int,
                      pruned_grad_scale: float = 0.0) -> Tensor:
    """Triton twin of ``sparsify::nm_linear``: compress ``weight ∘ mask`` (cached until either changes), then
    :func:`nm_matmul`."""
    validate(x, weight, mask, bias)

    def build():
        values, positions = compress_nm(weight.detach(), mask, n, m)
        return values.to(x.dtype), pack_positions(positions) if m <= 16 else positions

    values, positions = compact_cached(weight, mask, ("nm", n, m, x.dtype), build)
    return nm_matmul(x, values, positions, n, m, weight.shape[1], bias, packed=m <= 16)


nm_linear_triton = register_twin(torch.ops.sparsify.nm_linear, "nm_linear_triton", _nm_linear_triton, lower=HAS_TRITON)
