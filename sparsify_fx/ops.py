"""S²FT custom ops: a linear layer whose weight is frozen except for a few contiguous row or column blocks.

After co-permutation the trainable units of a weight ``W`` (layout ``[out, in]``, ``y = x @ W.T + b``) are
contiguous blocks along one dim: rows ``[s:s+k]`` (``dim=0``) or columns ``[s:s+k]`` (``dim=1``). The model keeps
``W`` frozen and each block is a separate trainable tensor, either a view into ``W``'s storage (zero-copy) or its own
storage (e.g. under FSDP).

Ops (namespace ``sparsify``), each one graph node under torch.compile so a backend can swap in a fused kernel
(see :mod:`sparsify_fx.codegen.lowering`):

* ``s2ft_linear(x, weight, bias, blocks, dim, starts)``: ``y = x @ W.T (+ bias)`` where ``W`` is ``weight`` with
  ``W.narrow(dim, starts[i], blocks[i].size(dim))`` replaced by ``blocks[i]``. Differentiable in ``x`` and
  ``blocks`` only.
* ``s2ft_input_grad(grad_y, weight, blocks, dim, starts)``: ``grad_y @ W`` (the backward's input gradient).
* ``s2ft_weight_grad(grad_y, x_saved, dim, starts, lengths, x_is_sliced)``: the block gradients, as one op.

This module must not import triton: the Triton variants live in ``sparsify_fx.codegen.kernels``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from sparsify_fx.errors import ConfigError
from sparsify_fx.oplib import define_op

__all__ = ["assemble_weight", "blocks_in_place", "check_weight_grad_args", "s2ft_input_grad", "s2ft_linear",
           "s2ft_linear_reference", "s2ft_weight_grad", "s2ft_weight_grad_reference", "validate_blocks",
           "validate_tensors", "weight_grad_slices"]


# --------------------------------------------------------------------------------------------------------------
# validation (shape-only, so the real and the fake kernels share it)
# --------------------------------------------------------------------------------------------------------------


def validate_blocks(weight_shape: Sequence[int], block_shapes: Sequence[Sequence[int]], dim: int,
                    starts: Sequence[int]) -> None:
    """Check that blocks fit ``weight`` along ``dim`` without overlapping; raise :class:`ConfigError` if not."""
    if dim not in (0, 1):
        raise ConfigError(f"s2ft: dim must be 0 (row-selected) or 1 (column-selected), got {dim}.")
    if len(weight_shape) != 2:
        raise ConfigError(f"s2ft: weight must be 2-D [out, in], got shape {tuple(weight_shape)}.")
    if len(block_shapes) != len(starts):
        raise ConfigError(
            f"s2ft: got {len(block_shapes)} blocks but {len(starts)} starts; pass one start per block."
        )
    other = 1 - dim
    spans = []
    for i, (shape, start) in enumerate(zip(block_shapes, starts)):
        if len(shape) != 2:
            raise ConfigError(f"s2ft: block {i} must be 2-D, got shape {tuple(shape)}.")
        if shape[other] != weight_shape[other]:
            raise ConfigError(
                f"s2ft: block {i} has shape {tuple(shape)} but a {'row' if dim == 0 else 'column'} block of "
                f"weight {tuple(weight_shape)} must have size {weight_shape[other]} along dim {other}; "
                f"slice the block as weight.narrow({dim}, start, k)."
            )
        length = shape[dim]
        if start < 0 or start + length > weight_shape[dim]:
            raise ConfigError(
                f"s2ft: block {i} covers [{start}, {start + length}) along dim {dim}, outside weight's "
                f"size {weight_shape[dim]}; fix its start or length."
            )
        spans.append((start, start + length, i))
    spans.sort()
    for (s0, e0, i0), (s1, e1, i1) in zip(spans, spans[1:]):
        if s1 < e0:
            raise ConfigError(
                f"s2ft: blocks {i0} [{s0}, {e0}) and {i1} [{s1}, {e1}) overlap along dim {dim}; "
                f"each weight unit may belong to one block only: merge them or move one."
            )


def validate_tensors(x: Tensor | None, weight: Tensor, bias: Tensor | None, blocks: Sequence[Tensor],
                     dim: int, starts: Sequence[int]) -> None:
    """Checks of ``s2ft_linear``'s arguments (``x``/``bias`` may be None), shared by every implementation."""
    validate_blocks(weight.shape, [b.shape for b in blocks], dim, starts)
    if x is not None and (x.dim() < 1 or x.shape[-1] != weight.shape[1]):
        raise ConfigError(
            f"s2ft_linear: x has shape {tuple(x.shape)} but weight is {tuple(weight.shape)}; x's last dim must "
            f"equal in_features={weight.shape[1]}."
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ConfigError(f"s2ft_linear: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}.")
    for i, b in enumerate(blocks):
        if b.dtype != weight.dtype or b.device != weight.device:
            raise ConfigError(
                f"s2ft: block {i} is {b.dtype} on {b.device} but weight is {weight.dtype} on {weight.device}; "
                f"keep blocks in the weight's dtype and device (autocast casts both together)."
            )


def blocks_in_place(weight: Tensor, blocks: Sequence[Tensor], dim: int, starts: Sequence[int]) -> bool:
    """True when every block is ``weight.narrow(dim, start, k)`` in memory, so ``weight`` already is ``W``.

    Args:
        weight: the frozen ``[out, in]`` weight.
        blocks, dim, starts: as for ``s2ft_linear``.

    Example:
        >>> w = torch.zeros(4, 3)
        >>> blocks_in_place(w, [w.narrow(0, 1, 2)], 0, [1]), blocks_in_place(w, [w[1:3].clone()], 0, [1])
        (True, False)
    """
    return all(_is_view_in_place(weight, b, dim, s) for b, s in zip(blocks, starts))


# --------------------------------------------------------------------------------------------------------------
# W assembly
# --------------------------------------------------------------------------------------------------------------


def _is_view_in_place(weight: Tensor, block: Tensor, dim: int, start: int) -> bool:
    """True when ``block`` *is* ``weight.narrow(dim, start, k)`` in memory, so ``weight`` already holds its values."""
    if block.device != weight.device or block.dtype != weight.dtype or block.numel() == 0:
        return False
    if block.device.type == "meta":
        return False
    if block.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
        return False
    if block.stride() != weight.stride():
        return False
    return block.data_ptr() == weight.data_ptr() + start * weight.stride(dim) * weight.element_size()


def assemble_weight(weight: Tensor, blocks: Sequence[Tensor], dim: int, starts: Sequence[int]) -> Tensor:
    """Return ``W``: ``weight`` with the blocks in place. Zero-copy when every block is already a view in place.

    Otherwise one ``torch.cat`` along ``dim`` (one read and one write of ``W``). Why not per-segment GEMMs that
    skip the copy: for ``dim=0`` they either recompute the selected output columns (k/out of the GEMM flops) or
    concatenate the output (``N*out`` elements, more than ``out*in`` as soon as tokens ``N > in``); for ``dim=1``
    they re-read ``x`` in slices and add partial outputs (``N*in + N*out`` extra traffic). And they split one GEMM
    into skinny ones far below peak. The ``out*in`` copy is independent of the token count and, at training batch
    sizes, a few percent of the GEMM; serving without a copy is :mod:`sparsify_fx.codegen.kernels.delta_gemm`'s job.
    """
    if blocks_in_place(weight, blocks, dim, starts):
        return weight
    pieces: list[Tensor] = []
    pos = 0
    for start, block in sorted(zip(starts, blocks), key=lambda p: p[0]):
        if start > pos:
            pieces.append(weight.narrow(dim, pos, start - pos))
        pieces.append(block)
        pos = start + block.size(dim)
    if pos < weight.size(dim):
        pieces.append(weight.narrow(dim, pos, weight.size(dim) - pos))
    return torch.cat(pieces, dim=dim)


def _fresh_matmul(x: Tensor, w: Tensor, bias: Tensor | None) -> Tensor:
    """``x @ w (+ bias)`` over ``x``'s last dim, returned in a tensor of its own (never a view of anything).

    A custom op with ``mutates_args=()`` must return fresh tensors: autograd marks a view output as created
    inside a custom Function and refuses any later in-place edit of it (Swin V2 adds into its attention
    output in place). ``F.linear`` with a bias on an input of 1 or 3+ dims returns a view of its 2-D ``addmm``
    result, so the GEMM writes straight into the output's storage instead (no copy).

    Args:
        x: input ``[..., k]``.
        w: ``[k, n]`` (``W.T`` for the forward, ``W`` for the input gradient).
        bias: ``[n]`` or None.

    Example:
        >>> y = _fresh_matmul(torch.ones(2, 3, 4), torch.ones(4, 5), torch.zeros(5))
        >>> y.shape, y._base is None
        (torch.Size([2, 3, 5]), True)
    """
    dtype = torch.promote_types(x.dtype, w.dtype)  # what the fake kernels promise
    out = torch.empty((*x.shape[:-1], w.shape[1]), dtype=dtype, device=x.device)
    x2 = x.reshape(-1, x.shape[-1]).to(dtype)
    w = w.to(dtype)
    if bias is None:
        torch.mm(x2, w, out=out.view(x2.shape[0], w.shape[1]))
    else:
        torch.addmm(bias.to(dtype), x2, w, out=out.view(x2.shape[0], w.shape[1]))
    return out


# --------------------------------------------------------------------------------------------------------------
# s2ft_weight_grad: the block gradients as one op
# --------------------------------------------------------------------------------------------------------------


def weight_grad_slices(dim: int, starts: Sequence[int], lengths: Sequence[int],
                       x_is_sliced: bool) -> list[tuple[int, int]]:
    """(offset, length) of each block along the sliced operand's last dim."""
    if x_is_sliced:
        offsets, pos = [], 0
        for n in lengths:
            offsets.append((pos, n))
            pos += n
        return offsets
    return list(zip(starts, lengths))


def check_weight_grad_args(grad_y: Tensor, x: Tensor, dim: int, starts: Sequence[int], lengths: Sequence[int],
                           x_is_sliced: bool) -> None:
    """Shape checks of ``s2ft_weight_grad`` (shared by every implementation and the fake kernel)."""
    if dim not in (0, 1):
        raise ConfigError(f"s2ft_weight_grad: dim must be 0 or 1, got {dim}.")
    if len(starts) != len(lengths):
        raise ConfigError(
            f"s2ft_weight_grad: {len(starts)} starts but {len(lengths)} lengths; pass one of each per block."
        )
    if x_is_sliced and dim != 1:
        raise ConfigError("s2ft_weight_grad: x_is_sliced only applies to column-selected blocks (dim=1).")
    if grad_y.shape[:-1] != x.shape[:-1]:
        raise ConfigError(
            f"s2ft_weight_grad: grad_y {tuple(grad_y.shape)} and x {tuple(x.shape)} must share leading dims."
        )
    limit = grad_y.shape[-1] if dim == 0 else x.shape[-1]
    for off, n in weight_grad_slices(dim, starts, lengths, x_is_sliced):
        if off < 0 or n < 0 or off + n > limit:
            raise ConfigError(f"s2ft_weight_grad: slice [{off}, {off + n}) out of range for size {limit}.")


def _fake_weight_grad(grad_y, x_saved, dim, starts, lengths, x_is_sliced):
    check_weight_grad_args(grad_y, x_saved, dim, starts, lengths, x_is_sliced)
    dtype = torch.promote_types(grad_y.dtype, x_saved.dtype)
    if dim == 0:
        return [grad_y.new_empty((n, x_saved.shape[-1]), dtype=dtype) for n in lengths]
    return [grad_y.new_empty((grad_y.shape[-1], n), dtype=dtype) for n in lengths]


@define_op("s2ft_weight_grad", fake=_fake_weight_grad, autocast=("cpu", "cuda"))
def s2ft_weight_grad(grad_y: Tensor, x_saved: Tensor, dim: int, starts: list[int], lengths: list[int],
                     x_is_sliced: bool) -> list[Tensor]:
    """Block gradients of an S²FT linear.

    ``dim=0``: ``grad_y[..., s:s+k].T @ x`` per block (``[k, in]``). ``dim=1``: ``grad_y.T @ x[..., s:s+k]``
    (``[out, k]``). Leading dims are flattened. With ``x_is_sliced`` (``dim=1`` only) ``x_saved`` holds just the
    selected columns packed in block order, so block ``i`` reads columns ``[sum(lengths[:i]), +lengths[i])``;
    ``starts`` then only records where the blocks sit in ``W``.
    """
    check_weight_grad_args(grad_y, x_saved, dim, starts, lengths, x_is_sliced)
    dtype = torch.promote_types(grad_y.dtype, x_saved.dtype)  # what the fake kernel promises
    g2 = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
    x2 = x_saved.reshape(-1, x_saved.shape[-1]).to(dtype)
    out = []
    for off, n in weight_grad_slices(dim, starts, lengths, x_is_sliced):
        if dim == 0:
            out.append(g2[:, off:off + n].t() @ x2)
        else:
            out.append(g2.t() @ x2[:, off:off + n])
    return out


def s2ft_weight_grad_reference(grad_y: Tensor, x: Tensor, dim: int, starts: Sequence[int],
                               lengths: Sequence[int]) -> list[Tensor]:
    """Plain-PyTorch block gradients from the full (unsliced) ``x``, in fp32 (for tests)."""
    g2 = grad_y.reshape(-1, grad_y.shape[-1]).float()
    x2 = x.reshape(-1, x.shape[-1]).float()
    if dim == 0:
        return [g2[:, s:s + n].t() @ x2 for s, n in zip(starts, lengths)]
    return [g2.t() @ x2[:, s:s + n] for s, n in zip(starts, lengths)]


# --------------------------------------------------------------------------------------------------------------
# s2ft_input_grad: grad_y @ W, a node of its own so the zero-copy check runs on real tensors, never on fakes
# --------------------------------------------------------------------------------------------------------------


def _fake_input_grad(grad_y, weight, blocks, dim, starts):
    validate_tensors(None, weight, None, blocks, dim, starts)
    dtype = torch.promote_types(grad_y.dtype, weight.dtype)
    return grad_y.new_empty((*grad_y.shape[:-1], weight.shape[1]), dtype=dtype)


@define_op("s2ft_input_grad", fake=_fake_input_grad, autocast=("cpu", "cuda"))
def s2ft_input_grad(grad_y: Tensor, weight: Tensor, blocks: list[Tensor], dim: int, starts: list[int]) -> Tensor:
    """``grad_y @ W`` with ``W`` assembled as in :func:`s2ft_linear` (zero-copy when blocks are views in place)."""
    validate_tensors(None, weight, None, blocks, dim, starts)
    return _fresh_matmul(grad_y, assemble_weight(weight, blocks, dim, starts), None)


# --------------------------------------------------------------------------------------------------------------
# s2ft_linear
# --------------------------------------------------------------------------------------------------------------


def _fake_linear(x, weight, bias, blocks, dim, starts):
    validate_tensors(x, weight, bias, blocks, dim, starts)
    dtype = torch.promote_types(x.dtype, weight.dtype)
    return x.new_empty((*x.shape[:-1], weight.shape[0]), dtype=dtype)


def _setup_context(ctx, inputs, output) -> None:
    x, weight, _bias, blocks, dim, starts = inputs
    ctx.dim = dim
    ctx.starts = list(starts)
    ctx.lengths = [b.size(dim) for b in blocks]
    ctx.n_blocks = len(blocks)
    ctx.x_needs_grad = x.requires_grad
    # Only the blocks that train get a gradient (and only their slice of x is kept).
    ctx.grad_blocks = [i for i, b in enumerate(blocks) if b.requires_grad]
    to_save: list[Tensor] = []
    if ctx.x_needs_grad:
        # weight and blocks are parameters that live anyway: saving them costs no memory.
        to_save += [weight, *blocks]
    ctx.x_is_sliced = False
    if ctx.grad_blocks:
        if dim == 0:
            to_save.append(x)  # every row's gradient reads all of x
        else:
            # Column blocks read only x[..., s:s+k]: keep those columns packed, not the whole activation.
            ctx.x_is_sliced = True
            to_save.append(torch.cat([x.narrow(-1, starts[i], ctx.lengths[i]) for i in ctx.grad_blocks], dim=-1))
    ctx.save_for_backward(*to_save)


def _backward(ctx, grad_y: Tensor):
    saved = list(ctx.saved_tensors)
    grad_x = None
    if ctx.x_needs_grad:
        weight, blocks = saved[0], saved[1:1 + ctx.n_blocks]
        saved = saved[1 + ctx.n_blocks:]
        grad_x = torch.ops.sparsify.s2ft_input_grad(grad_y, weight, blocks, ctx.dim, ctx.starts)
    grad_blocks: list[Tensor | None] = [None] * ctx.n_blocks
    if ctx.grad_blocks:
        (x_saved,) = saved
        idx = ctx.grad_blocks
        grads = torch.ops.sparsify.s2ft_weight_grad(
            grad_y, x_saved, ctx.dim, [ctx.starts[i] for i in idx], [ctx.lengths[i] for i in idx], ctx.x_is_sliced
        )
        for i, g in zip(idx, grads):
            grad_blocks[i] = g
    # An empty int list is an empty pytree node to autograd's tensor-list wrapper, so it wants [] back, not None.
    return grad_x, None, None, grad_blocks, None, [] if not ctx.starts else None


# Under autocast the op runs in bf16 like aten.linear does (x, weight, bias and blocks are cast together, which
# keeps the dtype check above satisfied).
@define_op("s2ft_linear", fake=_fake_linear, backward=_backward, setup_context=_setup_context,
           autocast=("cpu", "cuda"))
def s2ft_linear(x: Tensor, weight: Tensor, bias: Tensor | None, blocks: list[Tensor], dim: int,
                starts: list[int]) -> Tensor:
    """``y = x @ W.T (+ bias)`` with ``W`` = ``weight`` whose ``narrow(dim, starts[i], k_i)`` is ``blocks[i]``.

    Gradients flow to ``x`` and ``blocks`` only; ``weight`` and ``bias`` are frozen (their grads are ``None``).
    """
    validate_tensors(x, weight, bias, blocks, dim, starts)
    return _fresh_matmul(x, assemble_weight(weight, blocks, dim, starts).t(), bias)


# --------------------------------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------------------------------


def s2ft_linear_reference(x: Tensor, weight: Tensor, bias: Tensor | None, blocks: Sequence[Tensor], dim: int,
                          starts: Sequence[int]) -> Tensor:
    """Plain-PyTorch, differentiable S²FT linear: assemble ``W`` with ``torch.cat``, then ``F.linear``."""
    validate_tensors(x, weight, bias, blocks, dim, starts)
    pieces: list[Tensor] = []
    pos = 0
    for start, block in sorted(zip(starts, blocks), key=lambda p: p[0]):
        pieces.append(weight.detach().narrow(dim, pos, start - pos))
        pieces.append(block)
        pos = start + block.size(dim)
    pieces.append(weight.detach().narrow(dim, pos, weight.size(dim) - pos))
    bias = bias.detach() if bias is not None else None
    return F.linear(x, torch.cat(pieces, dim=dim), bias)
