"""S²FT on convolutions: a conv channel group trains the producing conv's output channels (weight rows) and the
consuming conv's input channels (weight columns, dim 1).

:class:`S2FTConv` is the conv counterpart of :class:`~sparsify_fx.passes.s2ft.S2FTLinear`: same attributes
(``weight``, ``bias``, ``param_dim``, ``starts``, ``lengths``, ``blocks``, ``layout``), so ``merge``,
``export_adapter`` and ``state_dict`` treat both alike. The forward is the wrapped conv's own computation on the
(frozen) weight, whose blocks are views by default; the backward (:class:`_ConvBlocks`) computes the input gradient
and weight gradients for the blocks only, each from the slice of the input and output gradient it reads.

Convs that are not plain zero-padded ``ConvNd`` keep their weights frozen (:func:`drop_untrainable_convs`); a
weight trained by rows in one group and by columns in another keeps its rows (``s2ft._one_side_per_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify_fx.analysis import Group, Member, Occurrence
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes.layers import ConvType, layer_type
from sparsify_fx.passes.s2ft_blocks import S2FTBlocks, separate_blocks
from sparsify_fx.passes.surgery import get_module, split_fqn

# projection names of a conv channel group: its producers' output channels and its consumers' input channels
CONV_PROJECTIONS = ("out", "in")

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def conv_projections(group: Group) -> dict[str, list[tuple[Member, Occurrence]]]:
    """Name each weight occurrence of a conv channel group: ``out`` where a layer produces the channels (its
    weight rows), ``in`` where one consumes them (its input-channel dim, or a linear layer's columns).

    Args:
        group: a ``conv_channels`` group of a :class:`~sparsify_fx.analysis.CouplingReport`.

    Example::

        projs = conv_projections(report.by_kind("conv_channels")[0])
        sorted(projs)  # ['in', 'out']
    """
    out: dict[str, list[tuple[Member, Occurrence]]] = {}
    for m in group.members:
        if m.is_buffer or m.role not in ("in", "out") or not m.fqn.endswith("weight"):
            continue
        for occ in m.occurrences:
            out.setdefault(m.role, []).append((m, occ))
    return out


def is_conv(module: nn.Module) -> bool:
    """Is ``module`` a convolution (any ``ConvNd``, per the layer table)?

    Example:
        >>> is_conv(nn.Conv2d(2, 2, 1)), is_conv(nn.Linear(2, 2))
        (True, False)
    """
    return isinstance(layer_type(module), ConvType)


def conv_trainable(module: nn.Module) -> str | None:
    """Why ``module``'s weight cannot train through :class:`S2FTConv` (None: it can).

    Args:
        module: a module whose weight a conv group would train.

    Example:
        >>> conv_trainable(nn.Conv2d(4, 4, 3, padding=1)) is None
        True
    """
    if not is_conv(module):
        return f"{type(module).__name__} is not a convolution"
    if module.transposed:
        return "transposed convolutions are not supported"
    if module.padding_mode != "zeros" or isinstance(module.padding, str):
        return f"padding={module.padding!r}, padding_mode={module.padding_mode!r} (S²FT needs numeric zero padding)"
    if type(module).forward not in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward):
        return f"{type(module).__name__} overrides forward"
    return None


def drop_untrainable_convs(units: list[Any], model: nn.Module) -> list[Any]:
    """Leave frozen the conv weights that :class:`S2FTConv` cannot train (transposed, padded by a mode or a string,
    a subclass with its own forward); a conv unit left with nothing to train is dropped. Each drop is noted on the
    unit, so :func:`~sparsify_fx.describe` shows it.

    Args:
        units: the planned S²FT units; only those of kind ``conv`` change.
        model: the model, to look modules up.

    Example::

        units = drop_untrainable_convs(units, model)
    """
    out = []
    for u in units:
        if u.kind != "conv":
            out.append(u)
            continue
        kept: dict[str, list[tuple[Member, Occurrence]]] = {}
        for proj, pairs in u.projections.items():
            for m, occ in pairs:
                mod = get_module(model, split_fqn(m.fqn)[0])
                why = conv_trainable(mod) if is_conv(mod) else None
                if why is not None:
                    u.notes.append(f"{m.fqn} stays frozen: {why}")
                    continue
                kept.setdefault(proj, []).append((m, occ))
        u.projections = kept
        if kept:
            out.append(u)
    return out


# ---------------------------------------------------------------------- the trainable module
@dataclass(frozen=True)
class _ConvSpec:
    """The conv's hyper-parameters and where its blocks are."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    dim: int
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    views: bool  # the blocks are views of the weight: it holds their current values


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev) \
        else None


class _ConvBlocks(torch.autograd.Function):
    """``conv(x, weight)`` whose backward gives the input gradient and the blocks' gradients, nothing else."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: _ConvSpec,
                *blocks: torch.Tensor) -> torch.Tensor:
        w = weight
        if not spec.views:
            w = weight.clone()
            for s, n, b in zip(spec.starts, spec.lengths, blocks):
                w.narrow(spec.dim, s, n).copy_(b)
        dt = _autocast_dtype(x)
        if dt is not None:  # what autocast would run the conv in; the backward must see the same dtypes
            x, w = x.to(dt), w.to(dt)
            bias = bias.to(dt) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            y = _CONV_FN[w.dim() - 2](x, w, bias, spec.stride, spec.padding, spec.dilation, spec.groups)
        # rows read the whole input of their groups; columns only their channels, so those are all that is kept
        saved = x if spec.dim == 0 else torch.cat([_in_channels(x, w, spec.groups, s, n) for s, n in
                                                   zip(spec.starts, spec.lengths)], 1)
        ctx.save_for_backward(saved, w)
        ctx.spec, ctx.x_shape = spec, x.shape
        ctx.block_dtypes = [b.dtype for b in blocks]
        return y

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved, w = ctx.saved_tensors
        spec: _ConvSpec = ctx.spec
        gy = gy.to(w.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            x_like = gy.new_empty(1).expand(ctx.x_shape)
            gx = _conv_backward(gy, x_like, w, spec, spec.groups, (True, False))[0]
        grads: list[torch.Tensor | None] = []
        at = 0  # column blocks: where block i's input channels start in the saved columns
        for i, (s, n) in enumerate(zip(spec.starts, spec.lengths)):
            if ctx.needs_input_grad[4 + i]:
                if spec.dim == 0:
                    g = _row_grad(gy, saved, w, spec, s, n)
                else:
                    xs = saved.narrow(1, at, n * spec.groups)
                    g = _conv_backward(gy, xs, w.narrow(1, s, n), spec, spec.groups, (False, True))[1]
                grads.append(g.to(ctx.block_dtypes[i]))
            else:
                grads.append(None)
            at += n * spec.groups
        return (gx, None, None, None, *grads)


def _in_channels(x: torch.Tensor, w: torch.Tensor, groups: int, s: int, n: int) -> torch.Tensor:
    """Input channels ``[s, s + n)`` of every group, as one tensor with ``groups * n`` channels."""
    per = w.shape[1]
    return x.unflatten(1, (groups, per)).narrow(2, s, n).flatten(1, 2).contiguous()


def _conv_backward(gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, spec: _ConvSpec, groups: int,
                   mask: tuple[bool, bool]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    nd = w.dim() - 2
    gx, gw, _ = torch.ops.aten.convolution_backward(
        gy, x, w, None, list(spec.stride), list(spec.padding), list(spec.dilation), False, [0] * nd, groups,
        [mask[0], mask[1], False],
    )
    return gx, gw


def _row_grad(gy: torch.Tensor, x: torch.Tensor, w: torch.Tensor, spec: _ConvSpec, s: int, n: int) -> torch.Tensor:
    """Weight gradient of output channels ``[s, s + n)``: from their own output gradient and the input channels of
    the groups they belong to."""
    per_out, per_in = w.shape[0] // spec.groups, w.shape[1]
    if s % per_out == 0 and n % per_out == 0:  # whole groups (every depthwise block)
        g0, ng = s // per_out, n // per_out
        xs, groups = x.narrow(1, g0 * per_in, ng * per_in), ng
    elif s // per_out == (s + n - 1) // per_out:  # inside one group
        xs, groups = x.narrow(1, (s // per_out) * per_in, per_in), 1
    else:  # across a group boundary without covering whole groups: the full gradient, sliced
        return _conv_backward(gy, x, w, spec, spec.groups, (False, True))[1].narrow(0, s, n)
    return _conv_backward(gy.narrow(1, s, n), xs, w.narrow(0, s, n), spec, groups, (False, True))[1]


class S2FTConv(S2FTBlocks):
    """A frozen ``ConvNd`` whose contiguous output-channel blocks (``param_dim=0``) or input-channel blocks
    (``param_dim=1``, the same channels of every group) are the trainable parameters.

    With ``layout="view"`` the blocks are views of ``weight`` (dense memory: :func:`~sparsify_fx.s2ft` stores a
    column-trained weight with dim 1 outermost, so fused optimizers never write between blocks) and the forward is
    the original convolution on ``weight``; ``"separate"`` gives the blocks their own storage and assembles the
    weight per forward. The backward computes weight gradients only for the blocks.

    Example:
        >>> conv = nn.Conv2d(4, 6, 3, padding=1)
        >>> m = S2FTConv(conv, conv.weight, conv.bias, False, param_dim=0, starts=[0], lengths=[2], layout="view")
        >>> [tuple(b.shape) for b in m.blocks]
        [(2, 4, 3, 3)]
    """

    def _refuse(self, original: nn.Module, transposed: bool, param_dim: int) -> None:
        why = conv_trainable(original)
        if why is not None:
            raise ConfigError(f"S2FTConv: cannot train {type(original).__name__}: {why}; leave it out of the config.")
        if param_dim not in (0, 1) or transposed:
            raise ConfigError(f"S2FTConv trains output (dim 0) or input (dim 1) channels, got dim {param_dim}.")

    def _adopt(self, original: nn.Module) -> None:
        self.stride, self.padding = tuple(original.stride), tuple(original.padding)
        self.dilation, self.groups = tuple(original.dilation), original.groups

    @property
    def logical_dim(self) -> int:
        """Dim of the weight the blocks run along (conv weights are never transposed here)."""
        return self.param_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        views = self.layout == "view" and not any(separate_blocks(self.block_slots()))
        spec = _ConvSpec(self.stride, self.padding, self.dilation, self.groups, self.param_dim, tuple(self.starts),
                         tuple(self.lengths), views)
        return _ConvBlocks.apply(x, self.weight, self.bias, spec, *self.blocks)

    def extra_repr(self) -> str:
        what = f"{'output' if self.param_dim == 0 else 'input'} channels"
        return f"weight={tuple(self.weight.shape)}, groups={self.groups}, " + self._trained_repr(what)
