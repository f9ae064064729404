"""Inline custom ops whose own implementation traces to ATen, so Inductor can fuse around them.

Inductor runs a custom op as an opaque extern call: a Python round trip per call and no fusion of the
reshapes/transposes around its matmuls. Many of our ops are plain ATen math underneath; tracing the op's
own Python implementation (the function given to ``torch.library.custom_op``) with the graph's fake
tensors gives exactly that math as ATen nodes, which we splice in place of the op node.

Generic and conservative: an op is inlined only if its implementation traces on fake tensors. An
implementation that needs real data (say, a zero-copy check on ``data_ptr()``) fails to trace and the op
stays an extern call; so do ops with symbolic shapes (their checks would be specialised to one size).
"""

from __future__ import annotations

import logging
import operator
from collections.abc import Sequence

import torch
import torch.fx
from torch.utils import _pytree as pytree

log = logging.getLogger("sparsify_fx")

__all__ = ["inline_traceable_custom_ops"]


def _impl_of(op: torch._ops.OpOverload):
    from torch._library.custom_ops import OPDEFS

    opdef = OPDEFS.get(f"{op.namespace}::{op._schema.name.split('::')[-1]}")
    return getattr(opdef, "_init_fn", None)


def _symbolic(vals: Sequence[object]) -> bool:
    for v in pytree.tree_leaves(vals):
        if isinstance(v, torch.SymInt | torch.SymFloat | torch.SymBool):
            return True
        if isinstance(v, torch.Tensor) and any(not isinstance(d, int) for d in v.shape):
            return True
    return False


def _signature(op: object, flat: Sequence[object]) -> tuple:
    sig = []
    for v in flat:
        if isinstance(v, torch.Tensor):
            sig.append(("T", tuple(v.shape), tuple(v.stride()), v.dtype, v.device.type))
        else:
            sig.append(repr(v))
    return (op, tuple(sig))


def inline_traceable_custom_ops(gm: torch.fx.GraphModule, namespaces: Sequence[str] = ("sparsify",),
                                skip: Sequence[object] = (), cache: dict | None = None) -> list[str]:
    """Replace each call of a custom op in ``namespaces`` by the ATen trace of its implementation, where possible.

    ``cache`` (a dict, shared by the forward and backward graphs of one compile, which share a fake mode) keeps
    traces by op and argument metadata, and ops that did not trace by op alone: tracing costs ~0.1 s a call.
    Returns one line per node: what was inlined, or why not.
    """
    from torch._guards import detect_fake_mode
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    cache = {} if cache is None else cache
    notes: list[str] = []
    graph = gm.graph
    changed = False
    for node in list(graph.nodes):
        op = node.target
        if node.op != "call_function" or not isinstance(op, torch._ops.OpOverload) or op in skip:
            continue
        if op.namespace not in namespaces:
            continue
        if op._schema.is_mutable:
            notes.append(f"{node.name}: {op} kept as an extern call (it mutates its arguments)")
            continue
        impl = _impl_of(op)
        vals = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: a.meta.get("val"))
        if impl is None or _symbolic(vals):
            why = "no Python implementation" if impl is None else "symbolic shapes"
            notes.append(f"{node.name}: {op} kept as an extern call ({why})")
            continue
        flat, spec = pytree.tree_flatten(vals)
        tensor_pos = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor)]

        def fn(*tensors, flat=flat, spec=spec, tensor_pos=tensor_pos, impl=impl):
            full = list(flat)
            for i, t in zip(tensor_pos, tensors):
                full[i] = t
            args, kwargs = pytree.tree_unflatten(full, spec)
            return impl(*args, **kwargs)

        key = _signature(op, flat)
        traced = cache.get(key)
        if traced is None and ("failed", op) in cache:
            notes.append(f"{node.name}: {op} kept as an extern call ({cache[('failed', op)]})")
            continue
        if traced is None:
            fake_mode = detect_fake_mode([flat[i] for i in tensor_pos])
            try:
                with fake_mode:
                    traced = make_fx(fn, decomposition_table=select_decomp_table())(*[flat[i] for i in tensor_pos])
            except Exception as e:  # noqa: BLE001 - "needs real data" is an answer, not an error
                why = f"its implementation does not trace: {type(e).__name__}"
                cache[("failed", op)] = why
                notes.append(f"{node.name}: {op} kept as an extern call ({why})")
                continue
            cache[key] = traced
        if any(n.op == "get_attr" for n in traced.graph.nodes):
            notes.append(f"{node.name}: {op} kept as an extern call (its trace holds constants)")
            continue
        if isinstance(node.meta.get("val"), list | tuple) and any(
                u.op != "call_function" or u.target is not operator.getitem for u in node.users):
            notes.append(f"{node.name}: {op} kept as an extern call (its list output is used whole)")
            continue
        # the node's tensor arguments, in the same flattened order as the trace's placeholders
        arg_nodes_flat, _ = pytree.tree_flatten((node.args, node.kwargs))
        inputs = [arg_nodes_flat[i] for i in tensor_pos]
        placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
        val_map = dict(zip(placeholders, inputs))
        with graph.inserting_before(node):
            out = graph.graph_copy(traced.graph, val_map)
        outs = list(out) if isinstance(out, list | tuple) else [out]
        if isinstance(node.meta.get("val"), list | tuple):
            for user in list(node.users):
                user.replace_all_uses_with(outs[user.args[1]])
                graph.erase_node(user)
        else:
            node.replace_all_uses_with(outs[0])
        graph.erase_node(node)
        changed = True
        notes.append(f"{node.name}: {op} inlined as {sum(1 for n in traced.graph.nodes if n.op == 'call_function')} "
                     f"ATen ops")
    if changed:
        graph.eliminate_dead_code()
        graph.lint()
        gm.recompile()
    return notes
