"""What every S²FT trainable module shares: contiguous blocks of a frozen weight as the trainable parameters.

:class:`~sparsify_fx.passes.s2ft.S2FTLinear` and :class:`~sparsify_fx.passes.s2ft_conv.S2FTConv` differ only in
their forward; both derive from :class:`S2FTBlocks`, which owns the block creation, ``sync_``, the state-dict
layout and the shared part of ``extra_repr``. The stacked expert weights of
:class:`~sparsify_fx.passes.s2ft_experts.S2FTExperts` hold several blocks per weight but write back and save
through the same helpers (:func:`separate_blocks`, :func:`contiguous_in_state_dict`, :class:`BlockList`).

This module imports nothing from the passes, so ``s2ft``, ``s2ft_conv`` and ``s2ft_experts`` can all import it
at module level.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn as nn

from sparsify_fx.errors import ConfigError


def blocks_are_dense(weight: torch.Tensor, dim: int) -> bool:
    """Is every ``weight.narrow(dim, s, n)`` one dense span of memory (``dim`` outermost, no gaps)?

    Args:
        weight: a 2-D weight.
        dim: the dim the blocks run along.

    Example:
        >>> blocks_are_dense(torch.empty(4, 8), 0), blocks_are_dense(torch.empty(4, 8), 1)
        (True, False)
    """
    return weight.movedim(dim, 0).is_contiguous()


def separate_blocks(slots: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The ``(weight slice, block)`` pairs whose block has storage of its own (``layout="separate"``): only there
    do the trained values have to be written back into the weight; a view block already is the weight.

    Args:
        slots: ``(slice of the weight's data, trainable block)`` pairs.

    Example:
        >>> w = torch.zeros(4, 2)
        >>> [tuple(b.shape) for _, b in separate_blocks([(w[:1], w[:1]), (w[2:], torch.ones(2, 2))])]
        [(2, 2)]
    """
    return ((dst, b) for dst, b in slots if dst.data_ptr() != b.data_ptr())


def contiguous_in_state_dict(destination: dict[str, Any], prefix: str, names: Iterable[str], keep_vars: bool) -> None:
    """Replace the strided weights ``names`` in a ``state_dict`` being built with contiguous copies.

    S²FT re-stores a column-trained weight with the trained dim outermost (so fused optimizers never write between
    blocks); saved, it must look like the plain layer's weight, and safetensors refuses strided tensors. With
    ``keep_vars`` the caller wants the Parameters themselves, to write through them, so nothing is replaced.

    Args:
        destination: the dict ``_save_to_state_dict`` fills.
        prefix: the module's key prefix.
        names: the module's weights that may be strided.
        keep_vars: ``_save_to_state_dict``'s flag.

    Example:
        >>> d = {"w": torch.zeros(3, 2).t()}
        >>> contiguous_in_state_dict(d, "", ["w"], keep_vars=False)
        >>> d["w"].is_contiguous()
        True
    """
    if keep_vars:
        return
    for name in names:
        w = destination.get(prefix + name)
        if isinstance(w, torch.Tensor) and not w.is_contiguous():
            destination[prefix + name] = w.contiguous()


class BlockList(nn.ParameterList):
    """The trainable blocks of an S²FT module. A view block shares its weight's memory, which safetensors refuses
    to save twice, so ``state_dict()`` holds a copy of it (blocks are the trained few percent, so the copies are
    small).

    Example:
        >>> w = torch.zeros(4, 2)
        >>> BlockList([nn.Parameter(w[:1])]).state_dict()["0"].untyped_storage().nbytes()
        8
    """

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if keep_vars:
            return
        for name in self._parameters:
            b = destination.get(prefix + name)
            # a view block's storage is its weight's, larger than the block itself
            if isinstance(b, torch.Tensor) and b.untyped_storage().nbytes() > b.numel() * b.element_size():
                destination[prefix + name] = b.clone(memory_format=torch.contiguous_format)


class S2FTBlocks(nn.Module):
    """A frozen ``weight`` (and ``bias``) whose contiguous blocks ``weight.narrow(param_dim, starts[i],
    lengths[i])`` are the trainable parameters ``blocks[i]``: views of the weight (``layout="view"``) or copies
    (``"separate"``). Subclasses give the forward; ``merge``, ``export_adapter`` and ``state_dict`` read the
    attributes set here, so they treat every subclass alike.

    Args:
        original: the wrapped module, restored by ``merge``; kept outside the module tree.
        weight: its weight Parameter (frozen here).
        bias: its bias, or None (frozen here if a Parameter).
        transposed: whether ``weight`` is stored ``[in, out]`` (transformers' ``Conv1D``).
        param_dim: the weight dim the blocks run along.
        starts, lengths: where the blocks are along ``param_dim``.
        layout: ``"view"`` or ``"separate"``.

    Example:
        >>> lin = nn.Linear(8, 4)
        >>> m = S2FTBlocks(lin, lin.weight, lin.bias, False, 0, [1], [2], "view")
        >>> m.blocks[0].data_ptr() == lin.weight[1].data_ptr(), m.weight.requires_grad
        (True, False)
    """

    def __init__(
        self,
        original: nn.Module,
        weight: nn.Parameter,
        bias: torch.Tensor | None,
        transposed: bool,
        param_dim: int,
        starts: list[int],
        lengths: list[int],
        layout: str,
    ) -> None:
        self._refuse(original, transposed, param_dim)
        if layout == "view" and not blocks_are_dense(weight, param_dim):
            # fused and foreach optimizers walk a parameter's memory linearly: a view block with gaps would have them
            # write the frozen values between its rows
            raise ConfigError(
                f"{type(self).__name__}: view blocks along dim {param_dim} of a weight with strides "
                f"{tuple(weight.stride())} would have gaps, and fused optimizers (AdamW(fused=True)) would write the "
                f"frozen values in them; store the weight with dim {param_dim} outermost first (sparsify_fx.s2ft "
                "does) or use layout='separate'."
            )
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.weight.requires_grad_(False)
        if isinstance(self.bias, nn.Parameter):
            self.bias.requires_grad_(False)
        self.transposed = transposed
        self.param_dim = param_dim
        self.starts = list(starts)
        self.lengths = list(lengths)
        self.layout = layout
        blocks = []
        for s, n in zip(starts, lengths):
            view = weight.data.narrow(param_dim, s, n)
            blocks.append(nn.Parameter(view if layout == "view" else view.clone(), requires_grad=True))
        self.blocks = BlockList(blocks)
        object.__setattr__(self, "_original", original)
        self._adopt(original)

    def _refuse(self, original: nn.Module, transposed: bool, param_dim: int) -> None:
        """Raise :class:`ConfigError` for a module this class cannot train, before anything is set (here: none)."""

    def _adopt(self, original: nn.Module) -> None:
        """Copy what the forward needs from ``original`` once the blocks exist (here: nothing)."""

    def block_slots(self) -> list[tuple[torch.Tensor, nn.Parameter]]:
        """``(slice of weight.data, block)`` per block: where each block's values belong in the weight."""
        return [(self.weight.data.narrow(self.param_dim, s, n), b)
                for s, n, b in zip(self.starts, self.lengths, self.blocks)]

    @torch.no_grad()
    def sync_(self) -> None:
        """Write separate-storage blocks back into ``weight`` (views need nothing)."""
        for dst, b in separate_blocks(self.block_slots()):
            dst.copy_(b.data)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        contiguous_in_state_dict(destination, prefix, ("weight",), keep_vars)

    def _trained_repr(self, what: str) -> str:
        """The ``extra_repr`` part every subclass shows: which ``what`` (rows, channels...) train, and the layout."""
        return f"trainable {what} {[(s, s + n) for s, n in zip(self.starts, self.lengths)]}, layout={self.layout}"
