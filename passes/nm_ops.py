"""Masked-linear custom ops: ``y = x @ (W ∘ M).T + b`` as one graph node, with a fixed 0/1 mask ``M``.

Ops (namespace ``sparsify``), all with the same ATen implementation (a dense matmul on the masked weight, the CPU
fast path) and the same autograd; they differ only in what a kernel family may assume about the mask:

* ``masked_linear(x, weight, mask, bias, pruned_grad_scale)``: any mask.
* ``nm_linear(x, weight, mask, bias, n, m, pruned_grad_scale)``: each group of ``m`` consecutive input columns of
  each output row keeps exactly ``n`` (the last group may be short when ``in % m != 0``).
* ``block_sparse_linear(x, weight, mask, bias, block_rows, block_cols, pruned_grad_scale)``: the mask is a union
  of whole ``block_rows x block_cols`` tiles (edge tiles may be partial).

Gradients: ``dx = dy @ (W ∘ M)``, ``db = sum(dy)``, and ``dW = (dy.T @ x) ∘ (M + s (1 - M))`` with
``s = pruned_grad_scale`` — so pruned weights get no gradient when ``s == 0`` and ``s`` times the dense gradient
otherwise (Progressive Gradient Flow, see :class:`sparsify_fx.passes.nm.NMConfig`). The mask gets no gradient.

This module must not import triton: the Triton lowerings live in ``sparsify_fx.codegen.kernels``.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsify_fx.errors import ConfigError
from sparsify_fx.oplib import define_op

__all__ = ["block_sparse_linear", "compact_cached", "masked_linear", "masked_linear_reference", "nm_linear",
           "validate"]


def validate(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None) -> None:
    """Shape checks shared by the real and fake kernels."""
    if weight.dim() != 2:
        raise ConfigError(f"masked_linear: weight must be 2-D [out, in], got shape {tuple(weight.shape)}.")
    if tuple(mask.shape) != tuple(weight.shape):
        raise ConfigError(
            f"masked_linear: mask {tuple(mask.shape)} must have the weight's shape {tuple(weight.shape)}."
        )
    if x.shape[-1] != weight.shape[1]:
        raise ConfigError(f"masked_linear: x {tuple(x.shape)} does not match weight {tuple(weight.shape)}.")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ConfigError(f"masked_linear: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}.")


_COMPACT: Any = None  # WeakIdKeyDictionary weight -> (key, compact form), created on first use


def compact_cached(weight: Tensor, mask: Tensor, tag: tuple, build: Callable[[], Any]) -> Any:
    """``build()`` (a compact form of ``weight ∘ mask``), reused while neither tensor changed.

    Kernels take compact weights, but the ops take the dense weight and mask (so training and the ATen path need
    nothing else); this keeps an inference loop from re-compressing every call. Validity is keyed on the tensors'
    identity, storage, version counters (bumped by every in-place write, e.g. an optimizer step) and ``tag``;
    entries die with the weight. Tensors without version counters (inference mode) are not cached.
    """
    global _COMPACT
    # views (Conv1D's weight.t()) are new objects per call: key on the base tensors, plus the views' geometry
    wbase = weight if weight._base is None else weight._base
    mbase = mask if mask._base is None else mask._base
    try:
        key = (weight.data_ptr(), tuple(weight.shape), weight.stride(), weight.dtype, wbase._version,
               mask.data_ptr(), mask.stride(), mbase._version, tag)
    except RuntimeError:
        return build()
    if _COMPACT is None:
        from torch.utils.weak import WeakIdKeyDictionary

        _COMPACT = WeakIdKeyDictionary()
    hit = _COMPACT.get(wbase)
    if hit is not None and hit[0] == key and hit[1]() is mbase:
        return hit[2]
    value = build()
    _COMPACT[wbase] = (key, weakref.ref(mbase), value)
    return value


def masked_linear_reference(x: Tensor, weight: Tensor, mask: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear`` on the masked weight (what every op computes)."""
    return F.linear(x, _apply(weight, mask), bias)


def _apply(weight: Tensor, mask: Tensor) -> Tensor:
    # a bool mask promotes inside the multiply's loop: no materialised float copy of the mask (half the time)
    return weight * (mask if mask.dtype == torch.bool else mask.to(weight.dtype))


def _setup_context(ctx, inputs, output) -> None:
    x, weight, mask, bias = inputs[:4]
    ctx.save_for_backward(x, weight, mask)
    ctx.has_bias = bias is not None
    ctx.scale = float(inputs[-1])
    ctx.n_extra = len(inputs) - 4  # pattern ints + scale: no gradient


def _backward(ctx, grad_y: Tensor):
    x, weight, mask, = ctx.saved_tensors
    wm = _apply(weight, mask)
    grad_x = grad_w = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_x = grad_y @ wm.to(grad_y.dtype)
    if ctx.needs_input_grad[1]:
        g = grad_y.reshape(-1, grad_y.shape[-1]).t() @ x.reshape(-1, x.shape[-1]).to(grad_y.dtype)
        keep = mask.to(torch.bool)
        grad_w = torch.where(keep, g, g * ctx.scale) if ctx.scale != 0.0 else g * keep
        grad_w = grad_w.to(weight.dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        grad_b = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
    return (grad_x, grad_w, None, grad_b, *([None] * ctx.n_extra))


# The three ops share the implementation, fake kernel and autograd; each checks its own pattern arguments.
def _check_nm(n: int, m: int) -> None:
    if not 0 < n <= m:
        raise ConfigError(f"nm_linear: need 0 < n <= m, got n={n}, m={m}.")


def _check_block(block_rows: int, block_cols: int) -> None:
    if block_rows <= 0 or block_cols <= 0:
        raise ConfigError(f"block_sparse_linear: block sizes must be positive, got ({block_rows}, {block_cols}).")


def _define(name: str, pattern: tuple[str, ...], check: Callable[..., None], doc: str) -> Any:
    # the dispatcher drops trailing arguments left at their default, so the scale may be missing from `rest`
    def impl(x, weight, mask, bias, *rest):
        check(*rest[:len(pattern)])
        validate(x, weight, mask, bias)
        return masked_linear_reference(x, weight, mask, bias)

    def fake(x, weight, mask, bias, *rest):
        check(*rest[:len(pattern)])
        validate(x, weight, mask, bias)
        return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=torch.promote_types(x.dtype, weight.dtype))

    impl.__name__, impl.__doc__ = name, doc
    args = "".join(f"SymInt {p}, " for p in pattern)
    schema = f"(Tensor x, Tensor weight, Tensor mask, Tensor? bias, {args}float pruned_grad_scale=0.) -> Tensor"
    return define_op(name, fake=fake, backward=_backward, setup_context=_setup_context, schema=schema)(impl)


masked_linear = _define("masked_linear", (), lambda: None,
                        "``x @ (weight ∘ mask).T + bias`` for any 0/1 mask (bool or the weight's dtype).")
nm_linear = _define("nm_linear", ("n", "m"), _check_nm,
                    "``masked_linear`` whose mask keeps ``n`` of every ``m`` consecutive input columns per output row.")
block_sparse_linear = _define("block_sparse_linear", ("block_rows", "block_cols"), _check_block,
                              "``masked_linear`` whose mask is a union of whole ``block_rows x block_cols`` tiles.")
