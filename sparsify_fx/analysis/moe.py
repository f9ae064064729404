"""Mixture-of-experts: rules for routed grouped GEMMs and the routing histogram, and the proof that
lets each expert's channels be permuted on their own.

transformers (5.x) stacks the experts of a layer into 3-D parameters (``gate_up_proj [E, H, 2I]`` or
``[E, 2I, H]``, ``down_proj [E, I, H]`` or ``[E, H, I]``), sorts the routed token rows by expert, counts
them with ``aten.histc``, and multiplies with a grouped GEMM (``transformers::grouped_mm_fallback`` or
``aten._grouped_mm``): rows ``[offs[e-1], offs[e])`` of the input use ``weight[e]``.

The grouped-GEMM rule states what holds for every routing: the contracted dim is the weight's dim 1,
the output features are its dim 2, rows keep their positions, and the expert dim is tied to ``offs``
(and pinned: which rows use which expert is data). That alone gives one group for the channels of all
experts together (one permutation for every expert). :func:`per_expert_classes` then proves, for each
such class, that expert ``e``'s slice may take a permutation of its own: every tensor that carries the
class is either a stacked expert weight (the class outside dim 0, the experts' class at dim 0) or an
activation whose dim 0 is the routed rows of grouped GEMMs with one ``offs``, reached only through
row-wise ops (pointwise, split along features, the grouped GEMMs themselves). A row then only ever meets
the slice of the expert it was routed to, so a different permutation per expert cancels row by row.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx

from sparsify_fx.analysis.context import AnalysisState, RuleContext, Value
from sparsify_fx.analysis.rules import BINARY, UNARY, register, register_custom
from sparsify_fx.analysis.spaces import Atom, Dim, SpaceTable

aten = torch.ops.aten

# custom ops are keyed by qualified name: the op object exists only once its library is imported
GROUPED_MM_CUSTOM = ("transformers::grouped_mm_fallback",)


def _qualified(target: Any) -> str | None:
    schema = getattr(target, "_schema", None)
    return schema.name if schema is not None else None


def is_grouped_mm(target: Any) -> bool:
    packet = getattr(target, "overloadpacket", None)
    return _qualified(target) in GROUPED_MM_CUSTOM or packet in _GROUPED_MM_ATEN


def _grouped_mm(ctx: RuleContext) -> Value:
    """``out[s] = input[s] @ weight[e(s)]`` with ``e(s)`` given by ``offs``: a batched product whose
    batch (experts) is selected by row ranges."""
    args = ctx.node.args
    x, w = args[0], args[1]
    offs = args[2] if len(args) > 2 else ctx.node.kwargs.get("offs")
    xd, wd = ctx.dims(x), ctx.dims(w)
    od = ctx.dims(offs)
    bias = ctx.node.kwargs.get("bias", args[3] if len(args) > 3 else None)
    if xd is None or wd is None or od is None or len(xd) != 2 or len(wd) != 3 or len(od) != 1 or bias is not None:
        raise NotImplementedError("only 2-D input x stacked 3-D weight with offs and no bias")
    ctx.unify(xd[1], wd[1])
    ctx.unify(wd[0], od[0])
    # which rows use which expert is routing data: neither rows nor experts may be reordered alone
    ctx.table.pin(wd[0], "experts are selected by routed row ranges (offs)")
    ctx.table.pin(xd[0], "routed rows are grouped by expert (offs)")
    ctx.role(w, 1, "in")
    ctx.role(w, 2, "out")
    ctx.state.expert_products[ctx.node] = offs
    return [xd[0], wd[2]]


_GROUPED_MM_ATEN = {getattr(aten, n) for n in ("_grouped_mm", "grouped_mm") if hasattr(aten, n)}
register(*_GROUPED_MM_ATEN)(_grouped_mm)
register_custom(*GROUPED_MM_CUSTOM)(_grouped_mm)


@register(aten.histc)
def _histc(ctx: RuleContext) -> Value:
    """A histogram of values (routing counts per expert): every input position feeds every bin, so
    what it reads is pinned; the bins are a fresh space (their order is fixed by ``min``/``max``)."""
    ctx.pin_inputs("histc counts values over every position")
    return ctx.fresh_like_output()


# ---------------------------------------------------------------------- per-expert proof
@dataclass
class _Candidate:
    experts: tuple[Atom, ...]
    rows: tuple[Atom, ...] | None
    offs: torch.fx.Node
    ok: bool = True


_ROW_WISE = {*UNARY, *BINARY} | {
    getattr(aten, n)
    for n in ("split", "split_with_sizes", "chunk", "unsafe_split", "unsafe_chunk", "_assert_tensor_metadata",
              "slice", "add_", "sub_", "mul_", "div_")  # rows keep dim 0 (checked on every value): row by row
    if hasattr(aten, n)
}


def leaf_roots(t: SpaceTable, d: Dim) -> set[Atom]:
    """Every leaf class inside a dim, through products and sums."""
    out: set[Atom] = set()

    def walk(a: Atom) -> None:
        r = t.find(a)
        if r.ref is None:
            if r.size != 1:
                out.add(r)
            return
        for c in r.ref.children:
            walk(c)

    for a in d:
        walk(a)
    return out


def _tensors(v: Value) -> Iterable[list[Dim]]:
    """The dims lists of a value (a tensor, or a tuple of them)."""
    if not isinstance(v, list):
        return []
    if all(isinstance(d, tuple) for d in v):
        return [v]
    return [d for x in v for d in _tensors(x)]


def _layout(t: SpaceTable, d: Dim) -> tuple[Atom, ...] | None:
    """The classes a dim is the product of (rows are often a flattened batch x tokens x top-k); None
    for an empty product (a size-1 dim)."""
    leaves = tuple(t.find(a) for a in t.expand_dim(d))
    return leaves or None


def per_expert_classes(state: AnalysisState) -> dict[Atom, int]:
    """Leaf classes of stacked expert weights whose units may be permuted per expert: class root ->
    number of experts (grouped GEMMs, and experts looped over in Python: :func:`per_expert_loop_classes`)."""
    from sparsify_fx.analysis.propagate import _LAYOUT as LAYOUT_OPS

    t = state.table
    cands: dict[Atom, _Candidate] = {}
    for node, offs in state.expert_products.items():
        x, w = node.args[0], node.args[1]
        wd, xd = state.env.get(w), state.env.get(x)
        experts = _layout(t, wd[0])
        if experts is None or len(experts) != 1 or not isinstance(experts[0].size, int):
            continue
        rows = _layout(t, xd[0])
        for d in wd[1:]:
            for c in leaf_roots(t, d):
                new = _Candidate(experts, rows, offs)
                old = cands.setdefault(c, new)
                if (old.experts, old.rows, old.offs) != (new.experts, new.rows, new.offs):
                    old.ok = False
    loop = per_expert_loop_classes(state)
    if not cands:
        return loop
    # a per-row expert bias is indexed by the sorted expert ids, never unified with the weights' expert dim:
    # its dim 0 stands for the experts of the offs that the ids count
    gathered_experts: dict[Atom, torch.fx.Node] = {}
    for node in state.env:
        for offs in {id(o): o for o in state.expert_products.values()}.values():
            bias_dims = state.env.get(node.args[0]) if _is_routed_gather(node, offs) else None
            lead = _layout(t, bias_dims[0]) if isinstance(bias_dims, list) and bias_dims else None
            if lead is not None and len(lead) == 1:
                gathered_experts[lead[0]] = offs

    def check(op_node: torch.fx.Node, value_node: torch.fx.Node, dims: list[Dim]) -> None:
        """A value that carries a candidate class, as ``op_node`` produces or consumes it."""
        per_dim = [leaf_roots(t, d) for d in dims]
        for c in set().union(*per_dim) & cands.keys() if per_dim else ():
            cand = cands[c]
            lead = _layout(t, dims[0])
            is_weight = value_node in state.provenance  # a stacked weight, or a layout view of one
            if is_weight and lead is not None and len(lead) == 1 and gathered_experts.get(lead[0]) is cand.offs:
                lead = cand.experts if lead[0].size == cand.experts[0].size else lead
            if c in per_dim[0] or lead is None or lead != (cand.experts if is_weight else cand.rows):
                cand.ok = False
                continue
            packet = getattr(op_node.target, "overloadpacket", None)
            if op_node.op == "placeholder" or op_node.target is operator.getitem:
                continue
            if op_node in state.expert_products:
                cand.ok &= state.expert_products[op_node] is cand.offs
            elif _is_routed_gather(op_node, cand.offs):
                continue  # per-row expert biases: row s reads bias[e(s)], the expert offs gives it
            elif is_weight:
                cand.ok &= packet in LAYOUT_OPS
            else:
                cand.ok &= op_node.op == "call_function" and (op_node.target in _ROW_WISE or packet in _ROW_WISE)

    for node, v in list(state.env.items()):
        for dims in _tensors(v):
            check(node, node, dims)
        if node.op != "call_function":
            continue
        for a in _flat_nodes(list(node.args) + list(node.kwargs.values())):
            for dims in _tensors(state.env.get(a)):
                check(node, a, dims)
    grouped = {c: int(cand.experts[0].size) for c, cand in cands.items() if cand.ok}
    return {**{c: n for c, n in loop.items() if c not in cands}, **grouped}  # a class both ways: the grouped proof's


def _flat_nodes(x: Any) -> list[torch.fx.Node]:
    if isinstance(x, list | tuple):
        return [n for y in x for n in _flat_nodes(y)]
    return [x] if isinstance(x, torch.fx.Node) else []


# ops a routing count passes through between the sorted expert ids and ``offs`` (dtype casts, the histogram,
# its running sum)
_COUNT_OPS = {
    getattr(aten, n) for n in ("histc", "cumsum", "_to_copy", "to", "type_as", "_assert_tensor_metadata")
    if hasattr(aten, n)
}


def _packet(node: torch.fx.Node) -> Any:
    """The ATen overload packet a node calls (None for placeholders, getitem, Python callables)."""
    return getattr(node.target, "overloadpacket", None) if node.op == "call_function" else None


def _is_routed_gather(node: torch.fx.Node, offs: torch.fx.Node) -> bool:
    """``w[ids]`` (GPT-OSS's per-row expert biases) where ``ids`` are sorted expert ids whose histogram's running
    sum is ``offs``: sorted, row ``s`` lies in ``[offs[e-1], offs[e])`` exactly when ``ids[s] == e``, so the row
    reads the slice of the expert whose weight the grouped GEMM gives it."""
    if _packet(node) is not aten.index:
        return False
    indices = node.args[1] if len(node.args) > 1 else None
    if not isinstance(indices, list | tuple) or len(indices) != 1 or not isinstance(indices[0], torch.fx.Node):
        return False
    ids = indices[0]
    sort = ids.args[0] if ids.target is operator.getitem and ids.args[1] == 0 else None
    if not isinstance(sort, torch.fx.Node) or _packet(sort) is not aten.sort:
        return False
    stack, seen = [offs], set()
    while stack:  # offs must be computed from ids through counting ops only
        n = stack.pop()
        if n is ids:
            return True
        if n in seen or _packet(n) not in _COUNT_OPS:
            continue
        seen.add(n)
        if isinstance(n.args[0], torch.fx.Node):
            stack.append(n.args[0])
    return False


# ---------------------------------------------------------------------- experts looped over in Python
# The other way transformers-era MoE code runs stacked experts: a Python loop over experts multiplies each expert's
# routed rows by ``weight[e]`` (JetMoE: ``split`` by ``expert_size.tolist()``, a ``linear`` per expert and a
# ``cat``; GPT-OSS-style eager experts: ``hidden[token_idx] @ gate_up_proj[e]``), so the graph has one
# ``select(weight, 0, e)`` per expert and the rows each slice meets are visible row spaces.
_PRODUCTS = {aten.linear: (0, 1), aten.mm: (0, 1), aten.matmul: (0, 1), aten.addmm: (1, 2)}  # (rows, weight) args
_LOOP_ROW_WISE = _ROW_WISE | {aten.cat}


def _row_wise(node: torch.fx.Node) -> bool:
    packet = _packet(node)
    if packet in _LOOP_ROW_WISE or node.target in _LOOP_ROW_WISE:
        return True
    name = getattr(packet, "__name__", "")  # an in-place form (mul_) works row by row when its functional form does
    return name.endswith("_") and getattr(aten, name[:-1], None) in _LOOP_ROW_WISE


def _expert_slices(state: AnalysisState, layout: set[Any]) -> dict[torch.fx.Node, tuple[str, int, int]]:
    """Nodes that are one expert's slice of a stacked parameter: ``select(p, 0, e)`` of the parameter (or of a
    layout view keeping its dim 0 first), and layout views of such a slice -> (fqn, expert, number of experts)."""
    out: dict[torch.fx.Node, tuple[str, int, int]] = {}
    for node in state.env:
        if node.op != "call_function" or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        src, packet = node.args[0], _packet(node)
        if packet is aten.select and src not in out:
            prov = state.provenance.get(src)
            val = src.meta.get("val")
            dim, index = (list(node.args[1:3]) + [None, None])[:2]
            if (prov is None or not prov.axes or prov.axes[0] != 0 or dim != 0 or not isinstance(index, int)
                    or not isinstance(val, torch.Tensor) or val.dim() < 2 or not isinstance(val.shape[0], int)):
                continue
            n = int(val.shape[0])
            if -n <= index < n:
                out[node] = (prov.fqn, index % n, n)
        elif src in out and packet in layout and packet is not aten.select:
            out[node] = out[src]
    return out


def _rows(t: SpaceTable, v: Any) -> frozenset[Atom] | None:
    """Leaf classes of a tensor's dim 0 (its rows), None for a value that is not a tensor of rank >= 2."""
    if not isinstance(v, list) or len(v) < 2 or not all(isinstance(d, tuple) for d in v):
        return None
    return frozenset(leaf_roots(t, v[0]))


def per_expert_loop_classes(state: AnalysisState) -> dict[Atom, int]:
    """Leaf classes of stacked expert weights, used one expert at a time through ``select(weight, 0, e)``, whose
    units may be permuted per expert: class root -> number of experts.

    The proof: the products ``rows @ weight[e]`` give every row class they read an owner, expert ``e`` (a row class
    two experts read is nobody's). Then every tensor that carries such a class is a slice of one expert (only
    ever selected, viewed, or multiplied by rows that expert owns, or combined row-wise with them), the stacked
    weight itself (read only by those selects, the class outside dim 0), or rows owned by experts: its dim 0 made
    of owned row classes, the class elsewhere, read only by row-wise ops (whose outputs keep rows among their
    inputs' rows), by the expert products, or by a ``cat``/``split`` along the rows. Row ``r`` then only ever
    meets the slices of its owner, so a different permutation per expert cancels row by row.
    """
    from sparsify_fx.analysis.propagate import _LAYOUT as LAYOUT_OPS

    t = state.table
    slices = _expert_slices(state, LAYOUT_OPS)
    if not slices:
        return {}
    cands: dict[Atom, int] = {}  # class -> experts
    bad: set[Atom] = set()
    for node, (_, _, n) in slices.items():
        for d in state.env.get(node) or []:
            for c in leaf_roots(t, d) if isinstance(d, tuple) else ():
                if cands.setdefault(c, n) != n:
                    bad.add(c)
    owner: dict[Atom, int | None] = {}
    products: dict[torch.fx.Node, int] = {}  # expert product -> its expert
    for node in state.env:
        where = _PRODUCTS.get(_packet(node))
        if where is None or len(node.args) <= where[1]:
            continue
        x, w = node.args[where[0]], node.args[where[1]]
        if w not in slices or x in slices:
            continue
        e = slices[w][1]
        products[node] = e
        for leaf in _rows(t, state.env.get(x)) or ():
            owner[leaf] = e if owner.get(leaf, e) == e else None

    def classes(v: Any) -> set[Atom]:
        return {c for dims in _tensors(v) for d in dims for c in leaf_roots(t, d)} & cands.keys()

    def experts_of(rows: frozenset[Atom] | None) -> set[int | None]:
        return {owner.get(r) for r in rows} if rows else {None}

    def stacked_view(node: torch.fx.Node) -> bool:  # the stacked weight itself, or a layout view with experts first
        prov = state.provenance.get(node)
        return node not in slices and prov is not None and bool(prov.axes) and prov.axes[0] == 0

    for node, v in state.env.items():
        carried = classes(v)
        if stacked_view(node) and carried and classes([v[0]]):
            bad |= carried  # the class is the experts dim itself
        if not carried or node in slices or stacked_view(node) or node.target is operator.getitem:
            continue
        for dims in _tensors(v):  # rows owned by experts, the class outside them
            rows = _rows(t, dims)
            if rows is None or None in experts_of(rows) or classes([dims[0]]):
                bad |= carried
    for node in state.env:
        if node.op != "call_function":
            continue
        args = _flat_nodes(list(node.args) + list(node.kwargs.values()))
        carried = set().union(*(classes(state.env.get(a)) for a in args)) if args else set()
        if not carried:
            continue
        if node in slices or stacked_view(node) or node.target is operator.getitem:
            continue
        if node in products:  # rows its expert owns; a bias beside them only that expert's slice
            e, (xi, wi) = products[node], _PRODUCTS[_packet(node)]
            others = [a for a in args if a is not node.args[xi] and a is not node.args[wi]]
            if experts_of(_rows(t, state.env.get(node.args[xi]))) != {e} or any(
                    classes(state.env.get(a)) and slices.get(a, (None, None))[1] != e for a in others):
                bad |= carried
            continue
        if not _row_wise(node):
            bad |= carried
            continue
        # row-wise: slices only with rows their expert owns; every output row class among the inputs' row classes
        slice_experts = {slices[a][1] for a in args if a in slices}
        act_rows = [_rows(t, state.env.get(a)) for a in args if a not in slices and classes(state.env.get(a))]
        in_rows = frozenset().union(*(r for r in act_rows if r))
        act_experts = set().union(*(experts_of(r) for r in act_rows)) if act_rows else set()
        out_rows = [_rows(t, dims) for dims in _tensors(state.env.get(node))]
        if (None in act_experts or len(slice_experts) > 1 or (slice_experts and act_experts != slice_experts)
                or not act_rows or any(r is None or not r <= in_rows for r in out_rows)):
            bad |= carried
    return {c: n for c, n in cands.items() if c not in bad}
