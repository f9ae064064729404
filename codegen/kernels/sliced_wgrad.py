"""Sliced weight-gradient GEMM for S²FT blocks, optionally fused with the optimizer step.

A row-selected block (``dim=0``, rows ``[s:s+k]`` of ``W [out, in]``) has gradient
``grad_y[:, s:s+k].T @ x`` (``[k, in]``); a column-selected block (``dim=1``) has ``grad_y.T @ x[:, s:s+k]``
(``[out, k]``). Both are ``C[M, N] = A[T, M].T @ B[T, N]`` over tokens ``T`` where one operand is a column slice
read in place through its strides (no copy). Each program owns one ``C`` tile and finishes its whole reduction, so
the optimizer step can be applied to the tile in registers: SGD (momentum, dampening, nesterov, weight decay) or
AdamW update the selected slice of the parameter (and its state) in place and no gradient tensor ever exists.

Expected GPU bound (``e`` = input bytes/element, fp32 accumulation): flops ``2*T*k*F`` with ``F`` the full other
dim (``in`` for rows, ``out`` for columns). Bytes: the full operand once (``T*F*e``), the slice ``T*k*e`` once per
``BLOCK_N`` column tile of ``F`` (small for the small ``k`` of S²FT), plus the result ``k*F``: written once as a
gradient (``k*F*e``), or, fused, parameter read+write (``2*k*F*e_p``) and state read+write (SGD momentum
``2*k*F*4``, AdamW ``4*k*F*4``) instead. Arithmetic intensity is about ``k`` flops/byte for bf16, so below the
ridge point (~300 flops/byte on H100) the kernel is memory-bound on streaming ``x`` (rows) or ``grad_y``
(columns) once: time ≈ ``T*(F+k)*e / bandwidth``. No split-K: the fused update needs the finished tile, so for
tiny ``k*F`` with huge ``T`` occupancy is low (grid = ``ceil(M/BM)*ceil(N/BN)`` programs).

Imports without triton (``HAS_TRITON`` is then False and the launcher raises); ``sparsify_fx.ops`` never imports
this module. Importing it registers ``sparsify::s2ft_weight_grad_triton`` as the ``"triton"`` lowering of
``sparsify::s2ft_weight_grad``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sparsify_fx.codegen.lowering import import_triton, register_twin, require_triton
from sparsify_fx.errors import ConfigError
from sparsify_fx.ops import check_weight_grad_args, weight_grad_slices  # also defines the sparsify ops

triton, tl = import_triton()
HAS_TRITON = triton is not None

__all__ = ["HAS_TRITON", "AdamWUpdate", "SGDUpdate", "sliced_wgrad", "sliced_wgrad_reference"]


@dataclass
class SGDUpdate:
    """In-place SGD step on the block, matching ``torch.optim.SGD`` (no ``maximize``)."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    momentum_buffer: Tensor | None = None  # required when momentum != 0; same shape as the block
    first_step: bool = True  # the buffer holds nothing yet: like torch, this step stores the gradient itself


@dataclass
class AdamWUpdate:
    """In-place AdamW step on the block, matching ``torch.optim.AdamW`` (no ``amsgrad``/``maximize``).

    ``step`` is the step count *including* this update (1 on the first call), as torch's ``state["step"]``
    holds after its increment.
    """

    exp_avg: Tensor
    exp_avg_sq: Tensor
    step: int
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2


# kernel MODE values
_GRAD, _SGD, _SGD_MOMENTUM, _ADAMW = 0, 1, 2, 3


if HAS_TRITON:

    @triton.jit
    def _sliced_wgrad_kernel(
        a_ptr, b_ptr, p_ptr, s1_ptr, s2_ptr,
        M, N, T,
        stride_at, stride_am, stride_bt, stride_bn,
        stride_pm, stride_pn, stride_s1m, stride_s1n, stride_s2m, stride_s2n,
        lr, decay, c1, c2, c3, c4,
        MODE: tl.constexpr, FIRST: tl.constexpr, NESTEROV: tl.constexpr, UPCAST: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # C[M, N] = A[T, M].T @ B[T, N]; then MODE 0 stores C to p, else updates p (and state) with C as the grad.
        # Scalars: SGD: decay=weight_decay, c1=momentum, c2=1-dampening.
        #          AdamW: decay=1-lr*wd, c1=beta1, c2=beta2, c3=eps, c4=sqrt(1-beta2^step); lr=lr/(1-beta1^step).
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        mask_m = rm < M
        mask_n = rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for t0 in range(0, T, BLOCK_K):
            rt = t0 + rk
            mask_t = rt < T
            a = tl.load(a_ptr + rt[:, None] * stride_at + rm[None, :] * stride_am,
                        mask=mask_t[:, None] & mask_m[None, :], other=0.0)
            b = tl.load(b_ptr + rt[:, None] * stride_bt + rn[None, :] * stride_bn,
                        mask=mask_t[:, None] & mask_n[None, :], other=0.0)
            if UPCAST:
                # The interpreter multiplies bf16 as raw uint16 bits; bf16*bf16 is exact in fp32, so the result is
                # what the tensor cores would accumulate.
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(tl.trans(a), b, acc, input_precision=INPUT_PRECISION)

        mask = mask_m[:, None] & mask_n[None, :]
        p_ptrs = p_ptr + rm[:, None] * stride_pm + rn[None, :] * stride_pn
        if MODE == 0:
            tl.store(p_ptrs, acc.to(p_ptr.dtype.element_ty), mask=mask)
        else:
            p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
            g = acc
            if MODE == 1 or MODE == 2:
                g = g + decay * p
                if MODE == 2:
                    s1_ptrs = s1_ptr + rm[:, None] * stride_s1m + rn[None, :] * stride_s1n
                    if FIRST:
                        buf = g
                    else:
                        buf = c1 * tl.load(s1_ptrs, mask=mask, other=0.0).to(tl.float32) + c2 * g
                    tl.store(s1_ptrs, buf.to(s1_ptr.dtype.element_ty), mask=mask)
                    if NESTEROV:
                        g = g + c1 * buf
                    else:
                        g = buf
                p = p - lr * g
            else:
                s1_ptrs = s1_ptr + rm[:, None] * stride_s1m + rn[None, :] * stride_s1n
                s2_ptrs = s2_ptr + rm[:, None] * stride_s2m + rn[None, :] * stride_s2n
                m = tl.load(s1_ptrs, mask=mask, other=0.0).to(tl.float32)
                v = tl.load(s2_ptrs, mask=mask, other=0.0).to(tl.float32)
                p = p * decay
                m = m + (1.0 - c1) * (g - m)
                v = v * c2 + (1.0 - c2) * g * g
                tl.store(s1_ptrs, m.to(s1_ptr.dtype.element_ty), mask=mask)
                tl.store(s2_ptrs, v.to(s2_ptr.dtype.element_ty), mask=mask)
                p = p - lr * (m / (tl.sqrt(v) / c4 + c3))
            tl.store(p_ptrs, p.to(p_ptr.dtype.element_ty), mask=mask)


def _operands(grad_y: Tensor, x: Tensor, dim: int, start: int, length: int) -> tuple[Tensor, Tensor]:
    """(A [T, M], B [T, N]) as strided views: the slice is never copied."""
    if dim not in (0, 1):
        raise ConfigError(f"sliced_wgrad: dim must be 0 (rows) or 1 (columns), got {dim}.")
    g2 = grad_y.reshape(-1, grad_y.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    if g2.shape[0] != x2.shape[0]:
        raise ConfigError(f"sliced_wgrad: grad_y {tuple(grad_y.shape)} and x {tuple(x.shape)} differ in tokens.")
    sliced = g2 if dim == 0 else x2
    if start < 0 or length < 0 or start + length > sliced.shape[1]:
        raise ConfigError(f"sliced_wgrad: slice [{start}, {start + length}) outside size {sliced.shape[1]}.")
    if dim == 0:
        return g2.narrow(1, start, length), x2
    return g2, x2.narrow(1, start, length)


def sliced_wgrad_reference(grad_y: Tensor, x: Tensor, dim: int, start: int, length: int, *,
                           param: Tensor | None = None,
                           update: SGDUpdate | AdamWUpdate | None = None) -> Tensor | None:
    """PyTorch reference of :func:`sliced_wgrad` (same arguments, same in-place effects), computed in fp32."""
    a, b = _operands(grad_y, x, dim, start, length)
    grad = a.float().t() @ b.float()
    if update is None:
        return grad
    if param is None:
        raise ConfigError("sliced_wgrad_reference: an update needs the block's `param`.")
    p = param.float()
    if isinstance(update, SGDUpdate):
        g = grad + update.weight_decay * p
        if update.momentum != 0:
            buf_t = update.momentum_buffer
            if update.first_step:
                buf = g
            else:
                buf = update.momentum * buf_t.float() + (1 - update.dampening) * g
            buf_t.copy_(buf)
            g = g + update.momentum * buf if update.nesterov else buf
        param.copy_(p - update.lr * g)
    else:
        b1, b2 = update.betas
        p = p * (1 - update.lr * update.weight_decay)
        m = update.exp_avg.float().lerp(grad, 1 - b1)
        v = update.exp_avg_sq.float() * b2 + (1 - b2) * grad * grad
        update.exp_avg.copy_(m)
        update.exp_avg_sq.copy_(v)
        denom = v.sqrt() / (1 - b2**update.step) ** 0.5 + update.eps
        param.copy_(p - update.lr / (1 - b1**update.step) * m / denom)
    return None


def _check_state(name: str, t: Tensor | None, shape: Sequence[int], device: torch.device) -> Tensor:
    if t is None:
        raise ConfigError(f"sliced_wgrad: the update needs `{name}` (a tensor shaped like the block {tuple(shape)}).")
    if tuple(t.shape) != tuple(shape) or t.device != device:
        raise ConfigError(
            f"sliced_wgrad: `{name}` is {tuple(t.shape)} on {t.device}; expected {tuple(shape)} on {device}."
        )
    return t


def sliced_wgrad(grad_y: Tensor, x: Tensor, dim: int, start: int, length: int, *,
                 param: Tensor | None = None, update: SGDUpdate | AdamWUpdate | None = None,
                 out_dtype: torch.dtype | None = None, tf32: bool = False) -> Tensor | None:
    """Gradient of one S²FT block, or (with ``update``) that gradient applied to ``param`` in place.

    ``grad_y [..., out]`` and ``x [..., in]`` share leading dims. ``dim=0``: rows ``[start, start+length)`` of
    ``grad_y``'s last dim, result ``[length, in]``; ``dim=1``: columns of ``x``'s last dim, result ``[out, length]``
    (``x`` may be a packed slice tensor: then ``start`` is the offset inside it). Without ``update`` returns the
    gradient (dtype ``out_dtype``, default the promoted input dtype); with it updates ``param`` (any strides, e.g. a
    view into the frozen ``W``) and the optimizer state in place and returns ``None``. ``tf32`` lets fp32 inputs use
    TF32 tensor cores on GPU (faster, ~1e-3 relative error); off by default so fp32 stays fp32.
    """
    require_triton("sliced_wgrad", HAS_TRITON, grad_y.device)
    a, b = _operands(grad_y, x, dim, start, length)
    T, M = a.shape
    N = b.shape[1]
    in_dtype = torch.promote_types(a.dtype, b.dtype)
    if a.dtype != in_dtype:
        a = a.to(in_dtype)
    if b.dtype != in_dtype:
        b = b.to(in_dtype)
    dummy = a  # never dereferenced in modes that do not use state
    s1 = s2 = dummy
    scalars = (0.0, 0.0, 0.0, 0.0, 0.0, 0.0)
    first = nesterov = False
    if update is None:
        mode = _GRAD
        result = torch.empty((M, N), dtype=out_dtype or in_dtype, device=a.device)
        target = result
    else:
        target = _check_state("param", param, (M, N), a.device)
        result = None
        if isinstance(update, SGDUpdate):
            if update.momentum != 0:
                mode = _SGD_MOMENTUM
                s1 = _check_state("momentum_buffer", update.momentum_buffer, (M, N), a.device)
                first, nesterov = update.first_step, update.nesterov
            else:
                mode = _SGD
            scalars = (update.lr, update.weight_decay, update.momentum, 1.0 - update.dampening, 0.0, 0.0)
        elif isinstance(update, AdamWUpdate):
            if update.step < 1:
                raise ConfigError(f"sliced_wgrad: AdamW step counts from 1 (this update included), got {update.step}.")
            mode = _ADAMW
            s1 = _check_state("exp_avg", update.exp_avg, (M, N), a.device)
            s2 = _check_state("exp_avg_sq", update.exp_avg_sq, (M, N), a.device)
            b1, b2 = update.betas
            scalars = (update.lr / (1 - b1**update.step), 1 - update.lr * update.weight_decay, b1, b2, update.eps,
                       (1 - b2**update.step) ** 0.5)
        else:
            raise ConfigError(f"sliced_wgrad: update must be SGDUpdate or AdamWUpdate, got {type(update).__name__}.")
    if M == 0 or N == 0:
        return result
    upcast = a.device.type == "cpu" and in_dtype != torch.float32
    block_m, block_n, block_k = (32, 32, 32) if a.device.type == "cpu" else (64, 64, 32)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    if T == 0:
        a = b = torch.zeros((1, 1), dtype=in_dtype, device=a.device)  # masked out entirely; keeps pointers valid
    _sliced_wgrad_kernel[grid](
        a, b, target, s1, s2,
        M, N, T,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1),
        target.stride(0), target.stride(1), s1.stride(0), s1.stride(1), s2.stride(0), s2.stride(1),
        *scalars,
        MODE=mode, FIRST=first, NESTEROV=nesterov, UPCAST=upcast,
        INPUT_PRECISION="tf32" if tf32 else "ieee",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return result


# --------------------------------------------------------------------------------------------------------------
# the custom op the compile backend swaps in for sparsify::s2ft_weight_grad
# --------------------------------------------------------------------------------------------------------------


def _s2ft_weight_grad_triton(grad_y: Tensor, x_saved: Tensor, dim: int, starts: list[int], lengths: list[int],
                             x_is_sliced: bool) -> list[Tensor]:
    """Triton twin of ``sparsify::s2ft_weight_grad`` (same schema and result), one kernel launch per block."""
    check_weight_grad_args(grad_y, x_saved, dim, starts, lengths, x_is_sliced)
    return [sliced_wgrad(grad_y, x_saved, dim, off, n)
            for off, n in weight_grad_slices(dim, starts, lengths, x_is_sliced)]


s2ft_weight_grad_triton = register_twin(torch.ops.sparsify.s2ft_weight_grad, "s2ft_weight_grad_triton",
                                        _s2ft_weight_grad_triton, lower=HAS_TRITON)
