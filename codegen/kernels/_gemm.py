"""What the folded-delta GEMM kernels share (:mod:`delta_gemm`, :mod:`served_gemm`): the last steps of a K step and
of a tile, and the launch options.

Both kernels add adapter deltas to the fp32 ``W`` tile in registers, then round that tile to the input dtype before
the dot, which is what merging ``W + D`` in that dtype would give. :func:`dot_folded` does that rounding and the
dot (with the Triton interpreter's bf16 quirks handled), :func:`store_tile` adds the bias and writes the output
tile, and :func:`gemm_launch_options` picks the tile sizes and flags a launch passes. Imports without triton (the
jit helpers are then absent; the kernels' launchers refuse to run before they would be needed).
"""

from __future__ import annotations

from typing import Any

import torch

from sparsify_fx.codegen.lowering import import_triton

triton, tl = import_triton()


def gemm_launch_options(device: torch.device, tf32: bool = False) -> dict[str, Any]:
    """The constexpr options a folded-delta GEMM launch takes on ``device``: tile sizes (small tiles on the CPU
    interpreter, where a tile's cost is its element count), ``UPCAST`` (the interpreter's bf16 workarounds) and the
    dot's ``INPUT_PRECISION``.

    Args:
        device: where the launch's tensors live.
        tf32: let the dot use TF32 on fp32 inputs (GPU only).

    Example:
        >>> gemm_launch_options(torch.device("cpu"))["BLOCK_M"]
        32
    """
    cpu = device.type == "cpu"
    block_m, block_n, block_k = (32, 32, 32) if cpu else (64, 64, 32)
    return {"UPCAST": cpu, "INPUT_PRECISION": "tf32" if tf32 else "ieee",
            "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k}


if triton is not None:

    @triton.jit
    def dot_folded(acc, x, w, x_ptr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
        """``acc + x @ w`` for an fp32 tile ``w`` with deltas folded in: ``w`` is rounded to the input dtype
        (``x_ptr``'s element type) first, as merging the deltas in that dtype would."""
        if UPCAST:
            # Interpreter: its bf16 dot multiplies raw uint16 bits and its fp32->bf16 cast truncates. Round the
            # folded tile to nearest-even by hand (as the GPU cast does), then dot in fp32 (bf16*bf16 is exact).
            if x_ptr.dtype.element_ty == tl.bfloat16:
                bits = w.to(tl.uint32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
                w = bits.to(tl.float32, bitcast=True)
            else:
                w = w.to(x_ptr.dtype.element_ty).to(tl.float32)
            x = x.to(tl.float32)
        else:
            w = w.to(x_ptr.dtype.element_ty)
        return tl.dot(x, w, acc, input_precision=INPUT_PRECISION)

    @triton.jit
    def store_tile(y_ptr, b_ptr, acc, rows, rn, mask_m, mask_n, stride_yt, stride_yo, HAS_BIAS: tl.constexpr):
        """Write ``acc (+ bias[rn])`` to output rows ``rows`` and features ``rn`` in ``y``'s dtype."""
        if HAS_BIAS:
            acc = acc + tl.load(b_ptr + rn, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None] * stride_yt + rn[None, :] * stride_yo, acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])
