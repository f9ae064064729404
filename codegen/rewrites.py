"""Generic rewrites of AOTAutograd's partitioned forward/backward graphs (no op-specific code).

They run inside the ``"sparsify"`` backend right after the min-cut partitioner, on the pair of graphs
at once, because a saved activation is one object seen from both sides: the forward decides what it
stores, the backward decides what it reads. Every pass takes a :class:`PartitionedGraphs`, edits it in
place and returns a :class:`PassResult` saying whether and why it fired.

1. :func:`eliminate_dead_weight_grads`: gradients of frozen parameters are never computed. For whole
   frozen inputs AOTAutograd already returns ``None`` (the pass asserts that and fixes any leftover);
   the real work is *partially* frozen weights: a gradient that is only read through a slice
   (``torch.cat([frozen, trainable, frozen])``, the plain-PyTorch way to write S²FT) is computed as a
   slice of a matmul. The pass pushes slices through ``permute``/``t`` into ``mm`` operands so only the
   trainable rows/columns of the gradient are computed.
2. :func:`prune_backward`: dead-code elimination of the backward below the lowest node that still feeds
   a gradient, then drops saved activations the backward no longer reads from the forward's outputs
   (AOTAutograd prunes by ``requires_grad`` at trace time; this catches what the rewrites above free).
3. :func:`slice_saved_activations`: a saved tensor the backward only reads through slices is saved as
   those slices (a contiguous copy, so the full activation's memory is released after the forward) —
   PockEngine-style sparse backprop decided at compile time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.fx
from torch.fx import GraphModule, Node

from sparsify_fx.frontend.graph import InputInfo

aten = torch.ops.aten

# slice_saved_activations only fires when the slices keep at most this fraction of the activation
MAX_KEPT_FRACTION = 0.5

__all__ = [
    "DEFAULT_PASSES",
    "MAX_KEPT_FRACTION",
    "PartitionedGraphs",
    "PassResult",
    "eliminate_dead_weight_grads",
    "prune_backward",
    "run_passes",
    "saved_bytes",
    "slice_saved_activations",
]


@dataclass
class PassResult:
    """What one pass did: ``changed`` and a human-readable line per edit (or why nothing was done)."""

    name: str
    changed: bool
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"{self.name}: {'fired' if self.changed else 'no change'}"
        return "\n".join([head, *("  - " + n for n in self.notes)])


@dataclass
class PartitionedGraphs:
    """AOTAutograd's forward and backward graphs of one compiled region, plus what their inputs are.

    Forward outputs are ``[*user outputs (num_fwd_outputs of them), *saved values]``; each saved value
    reaches the backward as the placeholder of the same name. The backward returns one gradient (or
    ``None``) per forward placeholder, in order.
    """

    fw: GraphModule
    bw: GraphModule
    num_fwd_outputs: int
    inputs: list[InputInfo] = field(default_factory=list)  # per forward placeholder, may be shorter
    requires_grad: list[bool] = field(default_factory=list)  # per forward placeholder, may be shorter

    # ------------------------------------------------------------------ views
    def fw_placeholders(self) -> list[Node]:
        return list(self.fw.graph.find_nodes(op="placeholder"))

    def fw_outputs(self) -> list:
        return list(self.fw.graph.output_node().args[0])

    def saved(self) -> list[Node]:
        """Forward nodes saved for the backward (tensors and symints), in order."""
        return [n for n in self.fw_outputs()[self.num_fwd_outputs:] if isinstance(n, Node)]

    def bw_placeholder(self, name: str) -> Node | None:
        for n in self.bw.graph.find_nodes(op="placeholder"):
            if n.name == name:
                return n
        return None

    def input_label(self, i: int) -> str:
        info = self.inputs[i] if i < len(self.inputs) else None
        if info is not None and info.target:
            return f"{info.kind} {info.target}"
        return f"input {i}"

    def recompile(self) -> None:
        for gm in (self.fw, self.bw):
            gm.graph.lint()
            gm.recompile()


Pass = Callable[[PartitionedGraphs], PassResult]


# ---------------------------------------------------------------------------------------------------- helpers


def _val(n: object):
    return n.meta.get("val") if isinstance(n, Node) else None


def _fake_mode(*graphs: torch.fx.Graph):
    from torch._guards import detect_fake_mode

    vals = [n.meta["val"] for g in graphs for n in g.nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    return detect_fake_mode(vals)


def _call(graph: torch.fx.Graph, fake_mode, target, args: tuple, kwargs: dict | None = None) -> Node:
    """Insert ``target(*args)`` at the graph's current insert point, with its fake value in ``meta['val']``."""
    node = graph.call_function(target, args, kwargs or {})
    fake_args = torch.fx.node.map_arg(args, lambda a: a.meta["val"])
    fake_kwargs = torch.fx.node.map_arg(kwargs or {}, lambda a: a.meta["val"])
    with fake_mode:
        node.meta["val"] = target(*fake_args, **fake_kwargs)
    return node


def _static_slice(n: Node) -> tuple[Node, int, int, int] | None:
    """``(base, dim, start, end)`` of a step-1 ``aten.slice`` with static bounds, normalized to the base's size."""
    if n.op != "call_function" or n.target is not aten.slice.Tensor:
        return None
    base = n.args[0]
    if not isinstance(base, Node) or not isinstance(_val(base), torch.Tensor):
        return None
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    start = n.args[2] if len(n.args) > 2 else n.kwargs.get("start", None)
    end = n.args[3] if len(n.args) > 3 else n.kwargs.get("end", None)
    step = n.args[4] if len(n.args) > 4 else n.kwargs.get("step", 1)
    shape = _val(base).shape
    if not isinstance(dim, int) or step != 1:
        return None
    dim = dim % len(shape)
    size = shape[dim]
    if not isinstance(size, int):
        return None
    start = 0 if start is None else start
    end = size if end is None else end
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    start = max(0, start + size if start < 0 else start)
    end = min(size, end + size if end < 0 else end)
    if end <= start:
        return None
    return base, dim, start, end


def _perm_2d(n: Node) -> Node | None:
    """The input of a 2-D transpose (``permute [1, 0]``, ``t``, ``transpose(0, 1)``), else None."""
    if n.op != "call_function" or not isinstance(_val(n), torch.Tensor) or _val(n).dim() != 2:
        return None
    if n.target is aten.permute.default and list(n.args[1]) == [1, 0]:
        return n.args[0]
    if n.target is aten.t.default:
        return n.args[0]
    if n.target is aten.transpose.int and sorted(d % 2 for d in n.args[1:3]) == [0, 1]:
        return n.args[0]
    return None


def _fresh_name(base: str, *graphs: torch.fx.Graph) -> str:
    taken = {n.name for g in graphs for n in g.nodes}
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    return name


def _output_index_of_inputs(bw: GraphModule) -> list:
    return list(bw.graph.output_node().args[0])


# ---------------------------------------------------------------------------------------------------- pass 1


def eliminate_dead_weight_grads(g: PartitionedGraphs) -> PassResult:
    """Never compute gradients of frozen weights: whole frozen inputs get ``None``; gradients read only
    through a slice are computed only for that slice (slices pushed through transposes into ``mm``)."""
    res = PassResult("eliminate_dead_weight_grads", False)
    outs = _output_index_of_inputs(g.bw)
    new_outs = list(outs)
    for i, rg in enumerate(g.requires_grad):
        if i < len(new_outs) and not rg and new_outs[i] is not None:
            new_outs[i] = None
            res.changed = True
            res.notes.append(f"gradient of frozen {g.input_label(i)} was computed: dropped")
    if res.changed:
        out_node = g.bw.graph.output_node()
        out_node.args = (tuple(new_outs),)
    whole = res.changed

    fake_mode = _fake_mode(g.bw.graph)
    graph = g.bw.graph
    pushed = 0
    changed = True
    while changed:
        changed = False
        for base in list(graph.nodes):
            if not base.users or not isinstance(_val(base), torch.Tensor) or _val(base).dim() != 2:
                continue
            slices = [_static_slice(u) for u in base.users]
            if any(s is None or s[0] is not base for s in slices):
                continue  # the full value is needed elsewhere: slicing earlier would not save the work
            inner = _perm_2d(base)
            is_mm = base.op == "call_function" and base.target is aten.mm.default
            if inner is None and not is_mm:
                continue
            if is_mm:
                dims = {s[1] for s in slices}
                size = _val(base).shape[slices[0][1]]
                kept = sum(e - s for s, e in {(s[2], s[3]) for s in slices})
                if len(dims) != 1 or kept >= size:
                    continue  # slices overlap or cover it all: one full matmul is cheaper
                what = "rows" if slices[0][1] == 0 else "columns"
                res.notes.append(f"{base.name}: only {kept}/{size} {what} of the matmul are read; computing just those")
            for user, (_, dim, start, end) in zip(list(base.users), slices):
                with graph.inserting_before(user):
                    if inner is not None:
                        s = _call(graph, fake_mode, aten.slice.Tensor, (inner, 1 - dim, start, end))
                        new = _call(graph, fake_mode, aten.permute.default, (s, [1, 0]))
                    else:
                        a, b = base.args
                        if dim == 0:
                            s = _call(graph, fake_mode, aten.slice.Tensor, (a, 0, start, end))
                            new = _call(graph, fake_mode, aten.mm.default, (s, b))
                        else:
                            s = _call(graph, fake_mode, aten.slice.Tensor, (b, 1, start, end))
                            new = _call(graph, fake_mode, aten.mm.default, (a, s))
                user.replace_all_uses_with(new)
                graph.erase_node(user)
                pushed += 1
            graph.erase_node(base)
            changed = True
            break
    if pushed:
        res.changed = True
        graph.eliminate_dead_code()
    if not res.changed:
        res.notes.append("no frozen gradient left to drop (AOTAutograd already skips inputs without requires_grad)")
    elif pushed and not whole:
        res.notes.append(f"{pushed} slices moved towards the matmuls that produce them")
    return res


# ---------------------------------------------------------------------------------------------------- pass 2


def prune_backward(g: PartitionedGraphs) -> PassResult:
    """Drop backward work that feeds no gradient, then the saved activations nobody reads any more."""
    res = PassResult("prune_backward", False)
    before = len(g.bw.graph.nodes)
    g.bw.graph.eliminate_dead_code()
    removed = before - len(g.bw.graph.nodes)
    if removed:
        res.changed = True
        res.notes.append(f"removed {removed} backward nodes that feed no gradient")

    unused = [p for p in g.bw.graph.find_nodes(op="placeholder")
              if not p.users and not p.name.startswith("tangents") and isinstance(_val(p), torch.Tensor)]
    saved_names = {n.name for n in g.saved()}
    unused = [p for p in unused if p.name in saved_names]
    if unused:
        names = {p.name for p in unused}
        outs = g.fw_outputs()
        kept = outs[:g.num_fwd_outputs] + [n for n in outs[g.num_fwd_outputs:]
                                            if not (isinstance(n, Node) and n.name in names)]
        g.fw.graph.output_node().args = (tuple(kept),)
        for p in unused:
            g.bw.graph.erase_node(p)
        g.fw.graph.eliminate_dead_code()
        res.changed = True
        res.notes.append(f"no longer saved for backward: {', '.join(sorted(names))}")
    if not res.changed:
        res.notes.append("nothing dead: AOTAutograd already pruned the backward by requires_grad")
    return res


# ---------------------------------------------------------------------------------------------------- pass 3


def slice_saved_activations(g: PartitionedGraphs) -> PassResult:
    """Save only the slices of an activation that the backward reads, as contiguous copies."""
    res = PassResult("slice_saved_activations", False)
    fake_mode = _fake_mode(g.fw.graph, g.bw.graph)
    fw_graph, bw_graph = g.fw.graph, g.bw.graph
    for saved in g.saved():
        if saved.op == "placeholder" or saved.meta.get("saved_tensor_with_no_vc_check", False):
            continue  # graph inputs stay alive anyway: a sliced copy would only add memory
        val = _val(saved)
        if not isinstance(val, torch.Tensor):
            continue
        ph = g.bw_placeholder(saved.name)
        if ph is None or not ph.users:
            continue
        slices = [_static_slice(u) for u in ph.users]
        if any(s is None for s in slices):
            continue
        dims = {s[1] for s in slices}
        if len(dims) != 1:
            continue
        (dim,) = dims
        spans = sorted({(s[2], s[3]) for s in slices})
        kept = sum(e - s for s, e in spans)
        if kept > MAX_KEPT_FRACTION * val.shape[dim]:
            continue  # the copy would cost a kernel (and may split a fusion) to save little memory
        # forward: one contiguous copy per distinct slice, saved in place of the full activation
        outs = g.fw_outputs()
        pos = outs.index(saved, g.num_fwd_outputs)
        new_fw: list[Node] = []
        with fw_graph.inserting_after(saved):
            for s, e in reversed(spans):
                sl = _call(fw_graph, fake_mode, aten.slice.Tensor, (saved, dim, s, e))
                with fw_graph.inserting_after(sl):
                    cp = _call(fw_graph, fake_mode, aten.clone.default, (sl,),
                               {"memory_format": torch.contiguous_format})
                new_fw.insert(0, cp)
        outs[pos:pos + 1] = new_fw
        fw_graph.output_node().args = (tuple(outs),)
        # backward: one placeholder per slice, in the same order; each slice user reads its placeholder.
        # Saved values are matched to placeholders by name, so both sides get the same fresh name.
        new_ph: dict[tuple[int, int], Node] = {}
        anchor = ph
        for (s, e), cp in zip(spans, new_fw):
            name = _fresh_name(f"{saved.name}_{s}_{e}", fw_graph, bw_graph)
            cp._rename(name)
            with bw_graph.inserting_after(anchor):
                p = bw_graph.placeholder(name)
            p.meta["val"] = cp.meta["val"]
            new_ph[(s, e)] = p
            anchor = p
        for u in list(ph.users):
            _, _, s, e = _static_slice(u)
            u.replace_all_uses_with(new_ph[(s, e)])
            bw_graph.erase_node(u)
        bw_graph.erase_node(ph)
        full = val.numel() if all(isinstance(d, int) for d in val.shape) else None
        frac = f"{kept}/{val.shape[dim]} along dim {dim}"
        res.changed = True
        res.notes.append(
            f"{saved.name} {tuple(val.shape)} is read by the backward only through slices: saving {frac}"
            + (f" ({kept * full // val.shape[dim]} of {full} elements)" if full is not None else "")
        )
    if res.changed:
        fw_graph.eliminate_dead_code()
    else:
        res.notes.append("no saved activation is read only through slices")
    return res


# ---------------------------------------------------------------------------------------------------- driver

DEFAULT_PASSES: dict[str, Pass] = {
    "eliminate_dead_weight_grads": eliminate_dead_weight_grads,
    "slice_saved_activations": slice_saved_activations,
    "prune_backward": prune_backward,
}


def saved_bytes(g: PartitionedGraphs) -> int | None:
    """Bytes of the saved tensors (None when a shape is symbolic)."""
    total = 0
    for n in g.saved():
        v = _val(n)
        if isinstance(v, torch.Tensor):
            if not all(isinstance(d, int) for d in v.shape):
                return None
            total += v.numel() * v.element_size()
    return total


def run_passes(g: PartitionedGraphs, passes: Sequence[tuple[str, Pass]],
               on_step: Callable[[str, PassResult | None], None] | None = None) -> list[PassResult]:
    """Run ``passes`` in order, recompiling after each; ``on_step(name, result)`` sees the graphs in between
    (called once first with ``("partitioned", None)``)."""
    if on_step is not None:
        on_step("partitioned", None)
    results = []
    for name, fn in passes:
        r = fn(g)
        g.recompile()
        results.append(r)
        if on_step is not None:
            on_step(name, r)
    return results

