"""Serving many S²FT adapters on one base model at once: mixed-adapter batches and adapter fusion.

:func:`attach_adapters` leaves the base weights as they are and hooks every adapted layer. The model's forward
(and ``generate``) then takes ``adapter_names=[one name per batch row]``, ``"__base__"`` for a row without an
adapter, as PEFT's mixed-adapter batches do. A forward pre-hook on the model takes the row -> adapter names once
per call; each adapted layer runs its own GEMM once for the whole batch and a hook adds every row's own adapter
delta in two or three ATen ops. Whatever depends only on which row uses which adapter (slot maps, index tensors)
is built once per batch layout and kept for the next call with the same ``adapter_names`` (a decode step):

* selected output features (a Linear's rows, a GPT-2 ``Conv1D``'s columns): ``y[rows][..., sel] += x[rows] @ D``;
* selected input features (a Linear's columns, a ``Conv1D``'s rows): ``y[rows] += x[rows][..., sel] @ D``.

``D`` is the adapter's delta. Each layer keeps its adapters' deltas stacked per placement (one tensor with a zero
slot for rows without an adapter there), built when an adapter comes or goes, never per call: serving an adapter
costs its compact size twice (its own tensors and the stack), never a copy of a weight. Adapters come and go while
serving (:func:`add_served_adapter`, :func:`remove_served_adapter`); :func:`detach_adapters` gives the plain model
back bit for bit. Every change goes through a :class:`~sparsify_fx.passes.surgery.Journal`, so a failed call leaves
the model as it was.

:func:`combine` fuses adapters of one base into one (weighted sum of the deltas, union of the indices).

Example::

    served = sparsify_fx.attach_adapters(base, {"math": math_adapter, "code": code_adapter})
    logits = served(input_ids, adapter_names=["math", "__base__", "code"]).logits
    out = served.generate(input_ids, adapter_names=["math", "__base__", "code"], max_new_tokens=16)
    sparsify_fx.detach_adapters(served)  # the plain base again

Not thread-safe: the grouping of the current batch is kept on the model for the duration of one forward.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from sparsify_fx.errors import AdapterError, ConfigError
from sparsify_fx.oplib import define_op
from sparsify_fx.passes import adapter as _adapter
from sparsify_fx.passes.adapter import Adapter, AdapterEntry
from sparsify_fx.passes.layers import layer_type
from sparsify_fx.passes.surgery import Journal, Verb, get_module, require_composable, split_fqn, unwrap

__all__ = [
    "BASE",
    "Placement",
    "Segments",
    "ServedDelta",
    "add_served_adapter",
    "attach_adapters",
    "combine",
    "detach_adapters",
    "remove_served_adapter",
    "served_adapters",
    "served_linear",
    "sparse_delta",
]

BASE = "__base__"  # the adapter name of a batch row served by the base model alone
_STATE_ATTR = "_sparsify_serving"
_KWARG = "adapter_names"
# the forward-hook tables a hook id can sit in (register_forward_hook / register_forward_pre_hook)
_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")


class Placement(enum.Enum):
    """Where an adapter's selected units sit in a layer ``y = x @ W_io`` (``W_io`` the weight as ``[in, out]``)."""

    OUTPUT = "output"  # selected output features: y[rows][..., sel] += x[rows] @ D, D [in, n]
    INPUT = "input"  # selected input features: y[rows] += x[rows][..., sel] @ D, D [n, out]


@dataclass(frozen=True)
class ServedDelta:
    """One adapter's delta on one layer, in the form the serving hook multiplies by.

    Args:
        placement: whether ``index`` selects the layer's output or input features.
        index: long ``[n]``, the selected features, on the weight's device.
        matrix: ``[in, n]`` (OUTPUT) or ``[n, out]`` (INPUT): the adapter's delta (a view when the weight's
            device and dtype match, otherwise its cast), never a copy of the weight.
    """

    placement: Placement
    index: Tensor
    matrix: Tensor


@dataclass(frozen=True)
class Segments:
    """The rows of one batch grouped by adapter, computed once per forward by the model's pre-hook.

    Args:
        batch: the batch size every adapted layer's input must lead with.
        rows: long ``[m]``, the batch rows served by an adapter, grouped by adapter (``"__base__"`` rows are absent).
        bounds: adapter name -> ``(start, end)``: its rows are ``rows[start:end]``.
    """

    batch: int
    rows: Tensor
    bounds: dict[str, tuple[int, int]]

    @staticmethod
    def group(names: Sequence[str], device: torch.device | str | None = None) -> Segments:
        """Group ``names`` (one adapter name per batch row) by adapter: a stable counting sort, O(batch).

        Example:
            >>> s = Segments.group(["a", "__base__", "b", "a"])
            >>> s.rows.tolist(), s.bounds
            ([0, 3, 2], {'a': (0, 2), 'b': (2, 3)})
        """
        by_name: dict[str, list[int]] = {}
        for i, name in enumerate(names):
            if name != BASE:
                by_name.setdefault(name, []).append(i)
        rows: list[int] = []
        bounds: dict[str, tuple[int, int]] = {}
        for name, idx in by_name.items():
            bounds[name] = (len(rows), len(rows) + len(idx))
            rows += idx
        return Segments(len(names), torch.tensor(rows, dtype=torch.long, device=device), bounds)


# ---------------------------------------------------------------------- the per-layer delta
# Every path adds deltas the same way: the adapters of one placement on a layer are stacked into one tensor with a
# zero slot at the end, and a fixed handful of ATen ops serves every row with its own adapter's delta (rows without
# an adapter here take the zero slot), whatever the adapter count. Measured per layer on the serving benchmark's
# shapes (Llama h512 up/down, 41 units, 16 rows, 16 adapters, stacks cold as in a forward, 1 / 2 CPU threads):
# - prefill (16 x 128): one bmm with each row's delta (BGMV-style: index_select the rows' deltas, bmm, scatter_add_
#   or gather + baddbmm_) took 0.6-1.0 ms against 0.9-6.5 ms for an mm per adapter group;
# - decode (<= _BAG_MAX_TOKENS tokens a row): the delta is a few hundred KB read once per row, and copying each
#   row's delta for the bmm doubles the bytes; embedding_bag reads it in place (a bag per token over the stack's
#   rows, weighted by the input): 0.057 / 0.040 ms against the bmm's 0.071 / 0.090 ms at 16 adapters, 0.024 vs
#   0.048 ms at one; at 16 tokens the two tie and the bmm wins from there.
# A decode step's delta costs more in a forward than alone (its small index tensors and the stack are cold), so the
# step runs only the ops that read x: a _Route holds everything that depends on the rows' adapters alone, built once
# per batch layout; flat int32 positions let index_add_ / index_select replace scatter_add_ / gather on a 1-D view.
# Per layer, warm, 16 rows, 1 / 2 threads, up (OUTPUT) then down (INPUT): 17.7 / 15.2 and 19.2 / 17.8 us at 1
# adapter, 24.4 / 19.1 and 26.4 / 20.6 us at 16, against 30.6 / 27.8, 31.5 / 29.9, 39.6 / 33.8 and 41.6 / 35.0 us
# with the indices built per call; in a whole decode step (1 thread, median CPU time of the step, loaded machine)
# the delta went from +1.33 / +1.80 ms (1 / 16 adapters) to +0.57 / +0.93 ms.
# The served model keeps its stacks between calls (:class:`_State`); the per-call ops stack on the fly.
_BAG_MAX_TOKENS = 8
_KEEP_BATCHES = 8  # batch layouts a served model remembers (a server's decode loop reuses one)
_INT32_LIMIT = 2**31  # the embedding_bag path's indices are int32 below this many positions, else int64


@dataclass(frozen=True)
class _Stack:
    """The deltas of several adapters on one layer and placement, stacked once for every row of a batch.

    Slot ``a < len(names)`` holds adapter ``names[a]``; the last slot is zeros. Adapters narrower than the widest
    are padded with zero deltas at feature 0 (they add +0).

    Args:
        placement: whether ``index`` selects output or input features.
        names: the adapters in slot order.
        index: long ``[A + 1, k]``.
        matrix: ``[A + 1, in, k]`` (OUTPUT) or ``[A + 1, k, out]`` (INPUT): :class:`ServedDelta`'s layouts.
    """

    placement: Placement
    names: tuple[str, ...]
    index: Tensor
    matrix: Tensor

    @staticmethod
    def build(placement: Placement, names: Sequence[str], index: Sequence[Tensor],
              matrix: Sequence[Tensor]) -> _Stack:
        """Stack ``matrix[i]`` (a :class:`ServedDelta`'s ``[in, n]`` / ``[n, out]``) and ``index[i]``: one copy."""
        width = max(i.numel() for i in index)
        dtype = functools.reduce(torch.promote_types, [d.dtype for d in matrix])
        shape = (matrix[0].shape[0], width) if placement is Placement.OUTPUT else (width, matrix[0].shape[1])
        device = matrix[0].device
        stacked = torch.zeros(len(matrix) + 1, *shape, dtype=dtype, device=device)
        stacked_index = torch.zeros(len(matrix) + 1, width, dtype=torch.long, device=device)
        for a, (idx, d) in enumerate(zip(index, matrix)):
            if placement is Placement.OUTPUT:
                stacked[a, :, : idx.numel()] = d
            else:
                stacked[a, : idx.numel()] = d
            stacked_index[a, : idx.numel()] = idx
        return _Stack(placement, tuple(names), stacked_index, stacked)


@dataclass(frozen=True)
class _Route:
    """How one stack serves one batch layout (an adapter per row, ``tokens`` tokens a row): everything that depends
    only on the rows' adapters, built once per batch and reused by every call with the same ``adapter_names`` and
    token count (each decode step of a batch), so a call runs only the ops that read ``x`` and write ``y``.

    Args:
        output: the stack's placement is :attr:`Placement.OUTPUT`.
        matrix: embedding_bag path: the stack as ``[(A + 1) * size, cols]`` (``size`` rows per slot); bmm path: the
            stack itself.
        index: row ``b``'s selected features. embedding_bag path: flat positions ``[batch * tokens * k]`` in ``y``
            (OUTPUT) or ``x`` (INPUT) seen as 1-D, int32 where they fit (half the bytes of a cold read per step);
            bmm path: long ``[batch, tokens, k]``.
        slot: long ``[batch]``, row ``b``'s slot (the bmm path's index_select).
        bags: embedding_bag path only, ``[batch * tokens * size]`` (``index``'s dtype): token ``t`` of row ``b``
            sums the ``size`` rows of slot ``slot[b]``, weighted by the input.
        offsets: embedding_bag path only, ``[batch * tokens]``: where each token's bag starts in ``bags``.
    """

    output: bool
    matrix: Tensor
    index: Tensor
    slot: Tensor
    bags: Tensor | None = None
    offsets: Tensor | None = None

    @staticmethod
    def build(stack: _Stack, slot: Tensor, tokens: int, width: int, shared: dict | None = None) -> _Route:
        """The route of ``stack`` for rows using slots ``slot``. ``width``: the layer's output features (OUTPUT) or
        input features (INPUT). ``shared`` keeps the embedding_bag indices for the next stack of the same layout
        (one dict per batch: every layer of a model usually shares them)."""
        m, batch = stack.matrix, slot.numel()
        output = stack.placement is Placement.OUTPUT
        index = stack.index.index_select(0, slot)  # [batch, k]
        if tokens > _BAG_MAX_TOKENS:
            return _Route(output, m, index[:, None, :].expand(batch, tokens, -1), slot)
        size, rows = m.shape[1], batch * tokens
        small = max(rows * width, m.shape[0] * size) < _INT32_LIMIT
        dtype = torch.int32 if small else torch.long
        key = (stack.names, size, tokens, slot.device, dtype)
        if shared is not None and key in shared:
            bags, offsets = shared[key]
        else:
            first = slot.repeat_interleave(tokens) if tokens > 1 else slot
            bags = (first[:, None] * size + torch.arange(size, device=slot.device)).reshape(-1).to(dtype)
            offsets = torch.arange(0, rows * size, size, device=slot.device, dtype=dtype)
            if shared is not None:
                shared[key] = bags, offsets
        if tokens > 1:
            index = index.repeat_interleave(tokens, 0)
        flat = index + torch.arange(0, rows * width, width, device=slot.device)[:, None]
        return _Route(output, m.view(-1, m.shape[2]), flat.reshape(-1).to(dtype), slot, bags, offsets)

    def add(self, x: Tensor, y: Tensor) -> None:
        """Add each row's delta to ``y`` ``[batch, ..., out]`` (contiguous, written in place); ``x`` is the layer's
        input ``[batch, ..., in]``."""
        m = self.matrix
        if self.bags is not None:  # decode: each row's delta read in place, one bag per token
            x1 = x.reshape(-1)
            if x1.dtype != m.dtype:
                x1 = x1.to(m.dtype)
            if self.output:  # c[b, t] = sum_i x[b, t, i] * m[slot[b], i]
                c = torch.embedding_bag(m, self.bags, self.offsets, False, 0, False, x1)[0]
                y.view(-1).index_add_(0, self.index, c.view(-1) if c.dtype == y.dtype else c.view(-1).to(y.dtype))
            else:  # y[b, t] += sum_j x[b, t, index[j]] * m[slot[b], j]
                c = torch.embedding_bag(m, self.bags, self.offsets, False, 0, False, x1.index_select(0, self.index))[0]
                y.view(c.shape).add_(c)
            return
        batch = y.shape[0]
        xb = x.reshape(batch, -1, x.shape[-1])
        yb = y.view(batch, -1, y.shape[-1])
        d = m.index_select(0, self.slot)  # [batch, in, k] / [batch, k, out]: each row's own delta
        if self.output:
            yb.scatter_add_(2, self.index, torch.bmm(xb.to(d.dtype), d).to(yb.dtype))
        elif d.dtype == yb.dtype:
            yb.baddbmm_(torch.gather(xb, 2, self.index).to(d.dtype), d)
        else:
            yb.add_(torch.bmm(torch.gather(xb, 2, self.index).to(d.dtype), d).to(yb.dtype))


def _sparse_delta_into(x: Tensor, y: Tensor, rows: Sequence[Tensor], placements: Sequence[Placement],
                       index: Sequence[Tensor], matrix: Sequence[Tensor]) -> Tensor:
    """Add every adapter's delta into ``y`` in place (``y`` must be contiguous): the per-call ATen path of
    ``sparse_delta``, ``sparsify::sparse_delta`` and ``sparsify::served_linear``. Stacks the adapters of each
    placement for this call (the served model's hooks keep theirs) and adds each placement's :class:`_Route`."""
    batch = x.shape[0]
    xb = x.reshape(batch, -1, x.shape[-1])
    yb = y.view(batch, -1, y.shape[-1])
    if xb.shape[1] == 0:
        return y
    for placement in Placement:
        members = [i for i, p in enumerate(placements) if p is placement and rows[i].numel()]
        if not members:
            continue
        stack = _Stack.build(placement, [str(i) for i in members], [index[i] for i in members],
                             [matrix[i] for i in members])
        slot = torch.full((batch,), len(members), dtype=torch.long, device=y.device)
        for a, i in enumerate(members):
            slot[rows[i].to(y.device)] = a
        width = yb.shape[2] if placement is Placement.OUTPUT else xb.shape[2]
        _Route.build(stack, slot, xb.shape[1], width).add(xb, yb)
    return y


def sparse_delta(x: Tensor, y: Tensor, segments: Segments, adapters: Mapping[str, ServedDelta]) -> Tensor:
    """Add to a layer's output ``y`` the delta of every adapter in ``adapters`` on that adapter's rows of the batch.

    The per-call form of what the serving hooks add (they keep their stacks between calls; this stacks
    ``adapters`` for the call): ``y`` (the layer's fresh output) is written in place and returned (a contiguous copy
    first if it is not contiguous). ``torch.ops.sparsify.sparse_delta`` is the same computation as a functional
    custom op (fake kernel, opcheck-tested) for graph capture and for a fused kernel to stand in for later.

    Args:
        x: the layer's input, ``[batch, ..., in]``.
        y: the layer's output ``x @ W_io (+ bias)``, ``[batch, ..., out]``.
        segments: the batch's rows grouped by adapter (:meth:`Segments.group`).
        adapters: adapter name -> its delta on this layer; adapters absent from the batch cost nothing.

    Example:
        >>> lin = torch.nn.Linear(4, 3)
        >>> d = ServedDelta(Placement.OUTPUT, torch.tensor([1]), torch.ones(4, 1))
        >>> x = torch.ones(2, 4)
        >>> sparse_delta(x, lin(x).detach(), Segments.group(["a", "__base__"]), {"a": d}).shape
        torch.Size([2, 3])
    """
    present = [(name, d) for name, d in adapters.items() if name in segments.bounds]
    if not present:
        return y
    if not y.is_contiguous():
        y = y.contiguous()
    rows = segments.rows.to(x.device)
    return _sparse_delta_into(
        x, y, [rows[slice(*segments.bounds[name])] for name, _ in present], [d.placement for _, d in present],
        [d.index for _, d in present], [d.matrix for _, d in present])


def _fake_sparse_delta(x: Tensor, y: Tensor, rows: Tensor, starts: list[int], ends: list[int],
                       scatter: list[bool], index: list[Tensor], matrix: list[Tensor]) -> Tensor:
    return torch.empty_like(y, memory_format=torch.contiguous_format)


@define_op("sparse_delta", fake=_fake_sparse_delta, autocast=())
def _sparse_delta_op(x: Tensor, y: Tensor, rows: Tensor, starts: list[int], ends: list[int], scatter: list[bool],
                     index: list[Tensor], matrix: list[Tensor]) -> Tensor:
    """``sparsify::sparse_delta``: ``y`` plus, per adapter ``i``, its delta on the batch rows
    ``rows[starts[i]:ends[i]]``; ``scatter[i]`` True for selected output features (Placement.OUTPUT). Functional
    (returns a new tensor); the eager hook uses :func:`sparse_delta`, which writes the layer's output in place."""
    if not len(starts) == len(ends) == len(scatter) == len(index) == len(matrix):
        raise ConfigError("sparsify::sparse_delta: starts, ends, scatter, index and matrix must have one entry per "
                          f"adapter; got lengths {len(starts)}, {len(ends)}, {len(scatter)}, {len(index)}, "
                          f"{len(matrix)}.")
    out = y.clone(memory_format=torch.contiguous_format)
    return _sparse_delta_into(
        x, out, [rows[s:e] for s, e in zip(starts, ends)],
        [Placement.OUTPUT if s else Placement.INPUT for s in scatter], list(index), list(matrix))


def _served_linear_check(x: Tensor, weight: Tensor, starts: list[int], ends: list[int], scatter: list[bool],
                         index: list[Tensor], matrix: list[Tensor]) -> None:
    if not len(starts) == len(ends) == len(scatter) == len(index) == len(matrix):
        raise ConfigError("sparsify::served_linear: starts, ends, scatter, index and matrix must have one entry per "
                          f"adapter; got lengths {len(starts)}, {len(ends)}, {len(scatter)}, {len(index)}, "
                          f"{len(matrix)}.")
    if weight.dim() != 2 or x.shape[-1] != weight.shape[1] or x.dim() < 2:
        raise ConfigError(f"sparsify::served_linear: x {tuple(x.shape)} must be [batch, ..., in] and weight "
                          f"{tuple(weight.shape)} [out, in] (a Linear's layout; pass a Conv1D's weight transposed).")
    out, in_ = weight.shape
    for i, (s, idx, d) in enumerate(zip(scatter, index, matrix)):
        want = (in_, idx.numel()) if s else (idx.numel(), out)
        if idx.dim() != 1 or tuple(d.shape) != want:
            raise ConfigError(f"sparsify::served_linear: adapter {i}'s matrix is {tuple(d.shape)} for "
                              f"{idx.numel()} {'output' if s else 'input'} features; it must be {want}.")


def _fake_served_linear(x: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor, starts: list[int],
                        ends: list[int], scatter: list[bool], index: list[Tensor], matrix: list[Tensor]) -> Tensor:
    _served_linear_check(x, weight, starts, ends, scatter, index, matrix)
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@define_op("served_linear", fake=_fake_served_linear, autocast=())
def served_linear(x: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor, starts: list[int], ends: list[int],
                  scatter: list[bool], index: list[Tensor], matrix: list[Tensor]) -> Tensor:
    """``sparsify::served_linear``: a Linear over a mixed-adapter batch, ``x @ weight.T + bias`` plus, per adapter
    ``i``, its sparse delta on the batch rows ``rows[starts[i]:ends[i]]`` (``scatter[i]`` True: ``matrix[i]``
    ``[in, k]`` adds to the output features ``index[i]``; False: ``[k, out]`` multiplies the input features
    ``index[i]``). The ATen reference (one GEMM, then :func:`sparse_delta`'s path on its fresh output); the fused
    Triton kernel ``sparsify::served_linear_triton`` (``codegen/kernels/served_gemm.py``) is its twin, lowered by
    ``backend="sparsify"`` with ``kernels="triton"``. Inference only (no autograd).

    Args:
        x: ``[batch, ..., in]``.
        weight: ``[out, in]``.
        bias: ``[out]`` or None.
        rows: long ``[m]``, batch rows grouped by adapter (:attr:`Segments.rows`).
        starts, ends: adapter ``i``'s rows are ``rows[starts[i]:ends[i]]``.
        scatter: per adapter, whether its index selects output features.
        index: per adapter, long ``[k]``.
        matrix: per adapter, its delta.

    Example:
        >>> x, w = torch.ones(2, 3, 4), torch.zeros(5, 4)
        >>> y = served_linear(x, w, None, torch.tensor([1]), [0], [1], [True], [torch.tensor([2])], [torch.ones(4, 1)])
        >>> y[1, 0].tolist(), y[0].abs().sum().item()
        ([0.0, 0.0, 4.0, 0.0, 0.0], 0.0)
    """
    _served_linear_check(x, weight, starts, ends, scatter, index, matrix)
    y = torch.nn.functional.linear(x, weight, bias).contiguous()
    return _sparse_delta_into(
        x, y, [rows[s:e] for s, e in zip(starts, ends)],
        [Placement.OUTPUT if s else Placement.INPUT for s in scatter], list(index), list(matrix))


# ---------------------------------------------------------------------- state on the served model
@dataclass
class _Served:
    adapter: Adapter
    layers: dict[str, ServedDelta]  # module name -> its delta there


class _Batch:
    """A batch layout: one adapter name per row, and what each layer needs to serve it, built by the first call
    that needs it. The served model keeps its recent batches (:attr:`_State.batches`), so the decode steps of one
    batch (same ``adapter_names``, one token a row) reuse the row -> slot maps, embedding_bag indices and index
    tensors of the first step: a step runs only the ops that read the layer's input."""

    __slots__ = ("bags", "names", "present", "routes", "slots")

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.present = frozenset(names) - {BASE}
        self.slots: dict[tuple[tuple[str, ...], torch.device], Tensor | None] = {}
        self.bags: dict[Any, tuple[Tensor, Tensor]] = {}  # embedding_bag indices and offsets, per stack layout
        self.routes: dict[tuple[str, int], tuple[_Route, ...]] = {}  # (module, tokens a row) -> its routes

    def slot(self, stack: _Stack) -> Tensor | None:
        """Row ``b``'s slot in ``stack`` (its zero slot where the row's adapter is not in it); None when no row's
        adapter is in it."""
        key = (stack.names, stack.index.device)
        if key not in self.slots:
            position = {name: a for a, name in enumerate(stack.names)}
            zero = len(stack.names)
            slot = [position.get(name, zero) for name in self.names]
            self.slots[key] = (torch.tensor(slot, dtype=torch.long, device=stack.index.device)
                               if any(a != zero for a in slot) else None)
        return self.slots[key]

    def route(self, module_name: str, stacks: tuple[_Stack, ...], tokens: int, in_features: int,
              out_features: int) -> tuple[_Route, ...]:
        """The routes of a layer serving ``stacks`` for this batch at ``tokens`` tokens a row (built once)."""
        key = (module_name, tokens)
        routes = self.routes.get(key)
        if routes is None:
            routes = tuple(
                _Route.build(stack, slot, tokens, out_features if stack.placement is Placement.OUTPUT else in_features,
                             self.bags)
                for stack in stacks if (slot := self.slot(stack)) is not None)
            self.routes[key] = routes
        return routes


@dataclass
class _State:
    adapters: dict[str, _Served] = field(default_factory=dict)
    layers: dict[str, dict[str, ServedDelta]] = field(default_factory=dict)  # module -> adapter -> delta
    # module -> its adapters' deltas stacked per placement, rebuilt when an adapter on it comes or goes: a second
    # copy of the compact adapters (padded to the widest per layer), so no call re-stacks them
    stacks: dict[str, tuple[_Stack, ...]] = field(default_factory=dict)
    layer_hooks: dict[str, int] = field(default_factory=dict)  # module -> id of its forward hook
    model_hooks: list[int] = field(default_factory=list)  # the model's pre-hook and clearing hook
    current: _Batch | None = None  # the batch being run
    # (adapter_names, batch size, in generate) -> its _Batch, for the next call with the same rows (decode steps);
    # emptied whenever the stacks change
    batches: dict[tuple, _Batch] = field(default_factory=dict)
    generating: list[str] | None = None  # adapter_names of the generate() call in progress


def _state(model: nn.Module) -> _State | None:
    return model.__dict__.get(_STATE_ATTR)


def served_adapters(model: nn.Module) -> tuple[str, ...]:
    """The names of the adapters ``model`` serves, in the order they were attached (empty if it serves none).

    Args:
        model: a model :func:`attach_adapters` was called on, or any model.

    Example:
        >>> served_adapters(attach_adapters(base, {"a": adapter}))
        ('a',)
    """
    state = _state(unwrap(model))
    return tuple(state.adapters) if state is not None else ()


# ---------------------------------------------------------------------- hooks
def _batch_size(args: tuple, kwargs: dict) -> int:
    for key in ("input_ids", "inputs_embeds"):
        t = kwargs.get(key)
        if isinstance(t, Tensor) and t.dim() >= 1:
            return t.shape[0]
    for t in [*args, *kwargs.values()]:
        if isinstance(t, Tensor) and t.dim() >= 1:
            return t.shape[0]
    raise ConfigError(f"{_KWARG} was given, but the call has no tensor input to take the batch size from; pass "
                      "input_ids (or the model's first input) as a tensor.")


def _check_names(state: _State, names: Any, batch: int, expand: bool) -> list[str]:
    """``names`` as a list with one entry per batch row; ``expand`` allows generate()'s beam/sample expansion
    (each row repeated k times in a row, as transformers' ``_expand_inputs_for_generation`` does)."""
    if isinstance(names, str) or not isinstance(names, Sequence) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{_KWARG} must be a list of adapter names, one per batch row ({BASE!r} for the base "
                          f"model); got {names!r}.")
    unknown = sorted({n for n in names if n != BASE and n not in state.adapters})
    if unknown:
        raise AdapterError(f"{_KWARG} names {unknown}, which this model does not serve; it serves "
                           f"{sorted(state.adapters)} (and {BASE!r} for the base). Attach it first with "
                           "sparsify_fx.add_served_adapter(model, name, adapter).")
    names = list(names)
    if len(names) != batch:
        if expand and names and batch % len(names) == 0:
            k = batch // len(names)
            return [n for n in names for _ in range(k)]
        raise ConfigError(f"{_KWARG} has {len(names)} entries but the batch has {batch} rows; give one adapter name "
                          f"per row ({BASE!r} for the base model).")
    return names


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    state = _state(model)
    state.current = None
    names = kwargs.pop(_KWARG, None)
    generating = names is None and state.generating is not None
    if generating:
        names = state.generating
    if names is None:
        return args, kwargs
    batch = _batch_size(args, kwargs)
    key = (tuple(names), batch, generating) if isinstance(names, (list, tuple)) else None
    try:
        known = state.batches.get(key)
    except TypeError:  # an unhashable entry: _check_names says what is wrong
        key, known = None, None
    if known is None:
        known = _Batch(_check_names(state, names, batch, expand=generating))
        if key is not None:
            if len(state.batches) >= _KEEP_BATCHES:
                state.batches.clear()
            state.batches[key] = known
    state.current = known if known.present else None  # all "__base__": the base, bit for bit
    return args, kwargs


def _clear_hook(model: nn.Module, args: tuple, output: Any) -> None:
    state = _state(model)
    if state is not None:
        state.current = None


def _layer_hook(state: _State, name: str, module: nn.Module, args: tuple, output: Any) -> Any:
    batch = state.current
    if batch is None or not isinstance(output, Tensor):
        return None
    x = args[0]
    if x.shape[0] != len(batch.names):
        raise AdapterError(
            f"layer {name!r} got an input of batch size {x.shape[0]}, but {_KWARG} has {len(batch.names)} rows: "
            "this model reshapes the batch before the layer (e.g. flattens batch and tokens), so its rows cannot be "
            "matched to adapters; serve it one adapter per batch with apply_adapter instead.")
    tokens = x.numel() // max(1, x.shape[0] * x.shape[-1])
    routes = batch.route(name, state.stacks[name], tokens, x.shape[-1], output.shape[-1]) if tokens else ()
    if not routes:
        return None
    y = output if output.is_contiguous() else output.contiguous()
    for route in routes:
        route.add(x, y)
    return y if y is not output else None


def _generate(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """``model.generate`` while serving: takes ``adapter_names`` (transformers would refuse it as unused) and keeps
    it for every forward of the call."""
    names = kwargs.pop(_KWARG, None)
    original = type(model).generate
    if names is None:
        return original(model, *args, **kwargs)
    state = _state(model)
    inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
    if isinstance(inputs, Tensor):
        _check_names(state, names, inputs.shape[0], expand=False)
    state.generating = list(names)
    try:
        return original(model, *args, **kwargs)
    finally:
        state.generating = None
        state.current = None


# ---------------------------------------------------------------------- plan (reads only)
def _check_fingerprint(model: nn.Module, adapter: Adapter, params: dict[str, Tensor]) -> None:
    """Raise AdapterError unless ``model``'s weights are the base ``adapter`` was exported from (the check
    :func:`~sparsify_fx.apply_adapter` makes on a first apply, without building its switch cache)."""
    if _adapter._is_legacy(adapter.fingerprint):
        touched = {f: (e.dim, params[f], params[f].detach().index_select(e.dim, e.index.to(params[f].device)))
                   for f, e in adapter.entries.items()}
        if _adapter._legacy_fingerprint(touched) != adapter.fingerprint:
            raise AdapterError("adapter was trained on a different base model (weight fingerprint mismatch); serve "
                               "it on the base it was exported from.")
        return
    here = _adapter._BaseSample(
        {f: (tuple(t.shape), t.dtype, _adapter._sample(t, _adapter._BASE_SAMPLE))
         for f, t in _adapter._named_tensors(model).items()},
        {f: _adapter._sample(params[f].detach().index_select(e.dim, e.index.to(params[f].device)),
                             _adapter._TOUCHED_SAMPLE) for f, e in adapter.entries.items()},
    )
    if _adapter._fingerprint(here) != adapter.fingerprint:
        _adapter._check_base(_adapter._parse_fingerprint(adapter.fingerprint), here, "")


def _served_delta(model: nn.Module, entry: AdapterEntry, param: Tensor) -> tuple[str, ServedDelta]:
    module_name, attr = split_fqn(entry.fqn)
    module = get_module(model, module_name)
    lt = layer_type(module, exact=True)
    if attr != "weight" or lt is None or not lt.is_linear or param.dim() != 2:
        raise AdapterError(
            f"adapter entry {entry.fqn!r} is on a {type(module).__name__}.{attr}; mixed-adapter serving adds deltas "
            "to Linear and Conv1D weights only. Serve this adapter alone with apply_adapter.")
    in_dim, out_dim = lt.in_dim(module), lt.out_dim(module)
    delta = entry.delta.to(device=param.device, dtype=param.dtype)  # no copy when they already match
    index = entry.index.to(param.device)
    if entry.dim == out_dim:  # D [in, n]
        return module_name, ServedDelta(Placement.OUTPUT, index, delta if out_dim == 1 else delta.t())
    if entry.dim == in_dim:  # D [n, out]
        return module_name, ServedDelta(Placement.INPUT, index, delta if in_dim == 0 else delta.t())
    raise AdapterError(f"adapter entry {entry.fqn!r} selects dim {entry.dim} of a 2-D weight.")  # pragma: no cover


def _plan(model: nn.Module, state: _State | None, adapters: Mapping[str, Adapter]) -> dict[str, _Served]:
    """Check every adapter against the model and build what serving it needs; writes nothing."""
    if not isinstance(adapters, Mapping) or not adapters:
        raise ConfigError(f"adapters must be a non-empty dict of name -> Adapter; got {adapters!r}.")
    taken = set(state.adapters) if state is not None else set()
    plans: dict[str, _Served] = {}
    for name, adapter in adapters.items():
        if not isinstance(name, str) or not name or name == BASE:
            raise ConfigError(f"adapter name {name!r} is not usable: give a non-empty string other than {BASE!r}.")
        if not isinstance(adapter, Adapter):
            raise ConfigError(f"adapter {name!r} is a {type(adapter).__name__}, not an Adapter: pass the result of "
                              "export_adapter or load_adapter.")
        if name in taken:
            raise AdapterError(f"an adapter is already served under the name {name!r}; remove it first with "
                               f"remove_served_adapter(model, {name!r}), or choose another name.")
        params = _adapter._params_for(model, adapter)
        try:
            _check_fingerprint(model, adapter, params)
        except AdapterError as exc:
            raise AdapterError(f"adapter {name!r}: {exc}") from exc
        layers = dict(_served_delta(model, e, params[f]) for f, e in adapter.entries.items())
        plans[name] = _Served(adapter, layers)
    return plans


# ---------------------------------------------------------------------- journaled writes
def _hook(j: Journal, register: Callable[[], Any], what: str) -> int:
    box: list[Any] = []
    j.on_rollback(lambda: box[0].remove() if box else None, what)
    box.append(register())
    return box[0].id


def _unhook(j: Journal, module: nn.Module, hook_id: int) -> None:
    """Remove a hook id from every table it sits in; a rollback restores each table as it was, order included."""
    for table in _HOOK_TABLES:
        d = getattr(module, table)
        if hook_id in d:
            before = list(d.items())
            j.on_rollback(lambda d=d, before=before: (d.clear(), d.update(before)), f"hook table {table}")
            del d[hook_id]


def _set_item(j: Journal, d: dict, key: Any, value: Any) -> None:
    had, old = key in d, d.get(key)
    j.on_rollback(lambda: d.__setitem__(key, old) if had else d.pop(key, None), f"entry {key!r}")
    d[key] = value


def _del_item(j: Journal, d: dict, key: Any) -> None:
    before = list(d.items())  # restored with its order
    j.on_rollback(lambda: (d.clear(), d.update(before)), f"entry {key!r}")
    del d[key]


def _del_attr(j: Journal, obj: object, name: str) -> None:
    """Drop an instance attribute set with ``Journal.setattr(..., raw=True)``."""
    value = obj.__dict__[name]
    j.on_rollback(lambda: obj.__dict__.__setitem__(name, value), f"attribute {name}")
    del obj.__dict__[name]


def _install(j: Journal, model: nn.Module) -> _State:
    state = _State()
    j.setattr(model, _STATE_ATTR, state, raw=True)
    # prepend: adapter_names leaves the kwargs before any other pre-hook or the forward sees it
    state.model_hooks.append(_hook(j, lambda: model.register_forward_pre_hook(
        _pre_hook, with_kwargs=True, prepend=True), "serving pre-hook"))
    state.model_hooks.append(_hook(j, lambda: model.register_forward_hook(_clear_hook, always_call=True),
                                   "serving clear hook"))
    if callable(getattr(type(model), "generate", None)):
        j.setattr(model, "generate", functools.partial(_generate, model), raw=True)
    return state


def _add(j: Journal, model: nn.Module, state: _State, name: str, served: _Served) -> None:
    for module_name, delta in served.layers.items():
        if module_name not in state.layers:
            _set_item(j, state.layers, module_name, {})
            module = get_module(model, module_name)
            hook_id = _hook(j, lambda module=module, module_name=module_name: module.register_forward_hook(
                functools.partial(_layer_hook, state, module_name)), f"serving hook of {module_name}")
            _set_item(j, state.layer_hooks, module_name, hook_id)
        _set_item(j, state.layers[module_name], name, delta)
    _set_item(j, state.adapters, name, served)


def _drop(j: Journal, model: nn.Module, state: _State, name: str) -> None:
    for module_name in state.adapters[name].layers:
        _del_item(j, state.layers[module_name], name)
        if not state.layers[module_name]:
            _unhook(j, get_module(model, module_name), state.layer_hooks[module_name])
            _del_item(j, state.layer_hooks, module_name)
            _del_item(j, state.layers, module_name)
    _del_item(j, state.adapters, name)


def _restack(j: Journal, state: _State, module_names: Iterable[str]) -> None:
    """Rebuild the stacks of ``module_names`` from the adapters they serve now (once per attach/remove call, not per
    adapter); a layer that serves none loses its stacks. The batches the model remembers are forgotten (their
    routes index the old stacks, their names may be gone)."""
    j.setattr(state, "batches", {}, raw=True)
    for module_name in dict.fromkeys(module_names):
        deltas = state.layers.get(module_name)
        if not deltas:
            if module_name in state.stacks:
                _del_item(j, state.stacks, module_name)
            continue
        stacks = []
        for placement in Placement:
            members = [(n, d) for n, d in deltas.items() if d.placement is placement]
            if members:
                stacks.append(_Stack.build(placement, [n for n, _ in members], [d.index for _, d in members],
                                           [d.matrix for _, d in members]))
        _set_item(j, state.stacks, module_name, tuple(stacks))


# ---------------------------------------------------------------------- public API
def attach_adapters(model: nn.Module, adapters: Mapping[str, Adapter]) -> nn.Module:
    """Serve ``adapters`` on ``model`` at once: its forward and ``generate`` take ``adapter_names``, one per row.

    The weights are not touched (bit-identical); each adapted Linear/Conv1D gets a forward hook that adds, per
    adapter present in the batch, its sparse delta on its rows only, after the layer's one GEMM over the whole
    batch. Without ``adapter_names`` the model is the base. Rows named ``"__base__"`` get no delta. The model keeps
    each adapter's own delta tensors (cast only if the base's device or dtype differ) and one stacked copy of them
    per layer (padded to the layer's widest adapter), so no call re-stacks them: memory grows by twice the compact
    adapters, never by a weight. It also keeps the index tensors of its last 8 batch layouts (``adapter_names``
    seen, so decode steps build none; for a few tokens a row, about batch × tokens × in_features int32 values per
    distinct stack layout), dropped whenever an adapter comes or goes. Calling it on a model already serving adds
    to what it serves.

    Every adapter is checked against the model first (the fingerprint check of :func:`apply_adapter`, names free);
    an error raises before anything is installed, and any failure while installing rolls everything back.

    Args:
        model: a plain base model (not S²FT-transformed), the one the adapters were exported from.
        adapters: name -> adapter (from :func:`export_adapter` / :func:`load_adapter`).

    Returns:
        ``model`` itself.

    Raises:
        AdapterError: an adapter of another base, a name already served, an entry on a layer that is not a
            Linear/Conv1D.
        ConfigError: a bad name (empty, ``"__base__"``), a non-adapter value, an S²FT-transformed model.

    Example:
        >>> served = attach_adapters(base, {"a": adapter_a, "b": adapter_b})
        >>> served(ids, adapter_names=["a", "__base__", "b"])
        >>> served.generate(ids, adapter_names=["a", "__base__", "b"], max_new_tokens=8)
    """
    wrapper, model = model, unwrap(model)
    require_composable(model, Verb.SERVE)
    state = _state(model)
    plans = _plan(model, state, adapters)
    with Journal(model) as j:
        if state is None:
            state = _install(j, model)
        for name, served in plans.items():
            _add(j, model, state, name, served)
        _restack(j, state, [m for served in plans.values() for m in served.layers])
    return wrapper


def add_served_adapter(model: nn.Module, name: str, adapter: Adapter) -> nn.Module:
    """Serve one more adapter under ``name`` (``attach_adapters(model, {name: adapter})``).

    Args:
        model: a served model, or a plain base (then it starts serving).
        name: the name rows use in ``adapter_names``; must not be served already.
        adapter: an adapter exported from this base.

    Example:
        >>> add_served_adapter(served, "legal", load_adapter("adapters/legal"))
    """
    return attach_adapters(model, {name: adapter})


def remove_served_adapter(model: nn.Module, name: str) -> nn.Module:
    """Stop serving the adapter ``name``; layers no other served adapter touches lose their hook.

    Args:
        model: a served model.
        name: a name :func:`served_adapters` lists.

    Raises:
        AdapterError: ``model`` does not serve ``name``.

    Example:
        >>> remove_served_adapter(served, "legal")
    """
    wrapper, model = model, unwrap(model)
    state = _state(model)
    if state is None or name not in state.adapters:
        raise AdapterError(f"this model serves no adapter named {name!r}; it serves {list(served_adapters(model))}.")
    with Journal(model) as j:
        layers = list(state.adapters[name].layers)
        _drop(j, model, state, name)
        _restack(j, state, layers)
    return wrapper


def detach_adapters(model: nn.Module) -> nn.Module:
    """Stop serving: remove every served adapter, every hook and the ``generate`` override; the plain model again,
    bit for bit (the weights were never written).

    Args:
        model: a model :func:`attach_adapters` was called on.

    Raises:
        AdapterError: ``model`` serves nothing.

    Example:
        >>> plain = detach_adapters(served)
    """
    wrapper, model = model, unwrap(model)
    state = _state(model)
    if state is None:
        raise AdapterError("this model serves no adapters (attach_adapters was not called on it).")
    with Journal(model) as j:
        layers = list(state.layers)
        for name in list(state.adapters):
            _drop(j, model, state, name)
        _restack(j, state, layers)
        for hook_id in state.model_hooks:
            _unhook(j, model, hook_id)
        if "generate" in model.__dict__:  # the class's generate shows again
            _del_attr(j, model, "generate")
        _del_attr(j, model, _STATE_ATTR)
    return wrapper


# ---------------------------------------------------------------------- fusion
def _same_base(adapters: Sequence[Adapter]) -> _adapter._BaseSample:
    """The common base sample of ``adapters``; AdapterError if two were exported from different bases."""
    if any(_adapter._is_legacy(a.fingerprint) for a in adapters):
        raise AdapterError("combine needs version-2 adapters (their fingerprint samples the whole base); a version-1 "
                           "adapter's fingerprint covers only the weights it touches, so two bases cannot be "
                           "compared. Re-export it with export_adapter(model).")
    samples = [_adapter._parse_fingerprint(a.fingerprint) for a in adapters]
    first = samples[0]
    for i, s in enumerate(samples[1:], 1):
        same = s.tensors.keys() == first.tensors.keys() and all(
            s.tensors[f][:2] == first.tensors[f][:2] and _adapter._agree(first.tensors[f][2], s.tensors[f][2])
            for f in first.tensors)
        if not same:
            raise AdapterError(f"adapters 0 and {i} were exported from different base models (fingerprints differ); "
                               "combine only adapters of one base.")
    return first


def combine(adapters: Sequence[Adapter], weights: Sequence[float] | None = None) -> Adapter:
    """One adapter whose delta is ``sum_i weights[i] * adapters[i]`` (task arithmetic on S²FT adapters).

    Per weight, the result's index is the union of the adapters' indices (sorted); where several adapters select
    the same unit their weighted deltas add. All adapters must come from one base (their fingerprints' base samples
    agree) and select the same dim of any weight they share. The fingerprint keeps the whole-base sample; the
    sample of the replaced values is kept for weights whose index did not grow (it would need the base's values at
    the new units).

    Args:
        adapters: adapters exported from one base model.
        weights: one finite float per adapter (default: all 1).

    Raises:
        ConfigError: no adapters, a non-adapter, ``weights`` of another length or not finite.
        AdapterError: adapters of different bases, or selecting different dims of one weight.

    Example:
        >>> both = combine([math_adapter, code_adapter], weights=[0.5, 0.5])
        >>> apply_adapter(base, both)
    """
    adapters = list(adapters) if isinstance(adapters, Sequence) else []
    if not adapters or not all(isinstance(a, Adapter) for a in adapters):
        raise ConfigError("combine takes a non-empty list of Adapter objects (from export_adapter/load_adapter).")
    weights = [1.0] * len(adapters) if weights is None else list(weights)
    if len(weights) != len(adapters):
        raise ConfigError(f"combine got {len(adapters)} adapters but {len(weights)} weights; give one weight each.")
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in weights):
        raise ConfigError(f"combine weights must be finite numbers; got {weights}.")
    base = _same_base(adapters)
    by_fqn: dict[str, list[tuple[float, AdapterEntry]]] = {}
    for w, a in zip(weights, adapters):
        for fqn, e in a.entries.items():
            by_fqn.setdefault(fqn, []).append((float(w), e))
    entries: dict[str, AdapterEntry] = {}
    touched: dict[str, Tensor] = {}
    samples = [_adapter._parse_fingerprint(a.fingerprint).touched for a in adapters]
    for fqn, parts in by_fqn.items():
        dims = {e.dim for _, e in parts}
        if len(dims) != 1 or len({e.shape for _, e in parts}) != 1:
            raise AdapterError(f"the adapters select different dims of {fqn} ({sorted(dims)}): their units cannot be "
                               "added; combine adapters trained with the same S²FT projections.")
        first = parts[0][1]
        union = torch.unique(torch.cat([e.index.cpu() for _, e in parts]))
        dtype = functools.reduce(torch.promote_types, [e.delta.dtype for _, e in parts])
        shape = list(first.shape)
        shape[first.dim] = union.numel()
        delta = torch.zeros(shape, dtype=dtype)
        for w, e in parts:
            delta.index_add_(first.dim, torch.searchsorted(union, e.index.cpu()), e.delta.cpu().to(dtype), alpha=w)
        entries[fqn] = AdapterEntry(fqn, first.dim, first.shape, union, delta)
        kept = [s[fqn] for s in samples if fqn in s]
        if all(torch.equal(e.index.cpu(), union) for _, e in parts) and kept:
            touched[fqn] = kept[0]
    names = {a.base_model for a in adapters}
    fingerprint = _adapter._fingerprint(_adapter._BaseSample(base.tensors, touched))
    config = {"combine": {"weights": [float(w) for w in weights], "configs": [a.config for a in adapters]}}
    return Adapter(entries, fingerprint, config, names.pop() if len(names) == 1 else None)
