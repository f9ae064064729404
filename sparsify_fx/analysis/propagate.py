"""Walk a traced graph once, applying the op registry to every node."""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx

import sparsify_fx.analysis.moe  # noqa: F401  (registers the MoE rules)
from sparsify_fx.analysis.context import AnalysisState, Provenance, RuleContext, Value, fresh_value, op_name
from sparsify_fx.analysis.rules import rule_for
from sparsify_fx.frontend.graph import TracedGraph

log = logging.getLogger("sparsify_fx")
aten = torch.ops.aten

# Ops that only relabel or reorder a parameter's dims: a parameter seen through them keeps its
# provenance, so roles ("this weight dim is contracted") are recorded against the parameter itself.
_LAYOUT = {
    aten._to_copy,
    aten.to,
    aten.clone,
    aten.detach,
    aten.alias,
    aten.contiguous,
    aten.lift_fresh_copy,
    aten.type_as,
    # every spelling of a transpose: `x @ w.T` (Falcon's linear) exports as numpy_T, `w.mT` as mT
    aten.t,
    aten.numpy_T,
    aten.t_copy,
    aten.transpose,
    aten.transpose_copy,
    aten.swapaxes,
    aten.swapdims,
    aten.mT,
    aten.mH,
    aten.adjoint,
    aten.permute,
    aten.permute_copy,
    aten.movedim,
    # one index of a stacked weight (an expert's slice of [E, out, in], looped over in Python): the other dims
    # are the parameter's own, so the slice's roles are the parameter's
    aten.select,
}


def _new_axes(src: Value, out: Value, axes: tuple[int | None, ...]) -> tuple[int | None, ...] | None:
    """The parameter axis of each output dim: layout rules return the very Dim objects they move,
    so the rule's own result says where each axis went."""
    if not isinstance(src, list) or not isinstance(out, list):
        return None
    where: dict[int, int] = {}
    for i, d in enumerate(src):
        where.setdefault(id(d), i)
    return tuple(axes[where[id(d)]] if id(d) in where else None for d in out)


def _submodule(gm: torch.fx.GraphModule, node: Any) -> torch.fx.GraphModule | None:
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        mod = getattr(gm, str(node.target), None)
        return mod if isinstance(mod, torch.fx.GraphModule) else None
    return None


def propagate(tg: TracedGraph, state: AnalysisState) -> list[tuple[str, torch.fx.Node, bool]]:
    """Run the rules over ``tg``; returns (fqn, placeholder, is_buffer) for every state tensor."""
    t = state.table
    members: list[tuple[str, torch.fx.Node, bool]] = []
    for node in tg.graph.nodes:
        if node.op != "placeholder":
            continue
        info = tg.info(node)
        val = node.meta.get("val")
        if info is None or info.kind == "symint" or not isinstance(val, torch.Tensor):
            state.env[node] = None if not isinstance(val, torch.Tensor) else fresh_value(t, val, "model input")
            continue
        if info.kind in ("parameter", "buffer") and info.target:
            state.env[node] = fresh_value(t, val, None)
            state.provenance[node] = Provenance(info.target, tuple(range(val.dim())))
            members.append((info.target, node, info.kind == "buffer"))
        elif info.kind == "constant":
            state.env[node] = fresh_value(t, val, f"constant tensor {info.target}")
        else:
            state.env[node] = fresh_value(t, val, f"model input {node.name}")
    _unify_tied(tg, state)
    _run(tg.graph_module, tg.graph, state)
    state.table.where = ""
    _pin_outputs(tg, state)
    # a placeholder the graph never reads (the alias of a tied weight) takes no part in the function
    return [m for m in members if m[1].users or _tied_to_used(tg, m[0])]


def _tied_names(tg: TracedGraph, fqn: str) -> list[str]:
    return next((names for names in tg.tied if fqn in names), [fqn])


def _tied_to_used(tg: TracedGraph, fqn: str) -> bool:
    nodes = tg.state_nodes()
    return any(nodes[n].users for n in _tied_names(tg, fqn) if n in nodes)


def _unify_tied(tg: TracedGraph, state: AnalysisState) -> None:
    nodes = tg.state_nodes()
    for names in tg.tied:
        present = [nodes[n] for n in names if n in nodes and isinstance(state.env.get(nodes[n]), list)]
        for other in present[1:]:
            for a, b in zip(state.env[present[0]], state.env[other]):
                state.table.unify(a, b)


def _run(gm: torch.fx.GraphModule, graph: torch.fx.Graph, state: AnalysisState) -> list[Value]:
    outputs: list[Value] = []
    for node in graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            outputs = [state.env.get(x) if isinstance(x, torch.fx.Node) else None for x in _flat(node.args[0])]
            continue
        if node.op == "get_attr":
            attr = getattr(gm, str(node.target), None)
            state.env[node] = (
                fresh_value(state.table, attr, f"constant attribute {node.target}")
                if isinstance(attr, torch.Tensor)
                else None
            )
            continue
        state.table.where = f"{node.name} ({op_name(node.target)})"
        if node.op != "call_function":
            state.env[node] = _unruled(state, node, f"{node.op} {node.target}")
            continue
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            state.env[node] = _higher_order(gm, node, state)
            continue
        rule = rule_for(node.target)
        if rule is None and _scalar_only(state, node):
            state.env[node] = None  # no tensor in or out: no space passes, nothing to pin
            continue
        if rule is None:
            state.env[node] = _unruled(state, node, op_name(node.target))
            continue
        ctx = RuleContext(state, node)
        try:
            state.env[node] = rule(ctx)
        except Exception as exc:  # a rule that cannot handle this call is a missing rule, not a crash
            log.debug("rule for %s failed on %s: %s", op_name(node.target), node.format_node(), exc)
            state.env[node] = _unruled(state, node, f"{op_name(node.target)} (rule failed: {exc})", "no usable rule")
            continue
        src = next((a for a in node.args if isinstance(a, torch.fx.Node)), None)
        if src in state.provenance and getattr(node.target, "overloadpacket", None) in _LAYOUT:
            axes = _new_axes(state.env.get(src), state.env[node], state.provenance[src].axes)
            if axes is not None:
                state.provenance[node] = Provenance(state.provenance[src].fqn, axes)
    return outputs


def _scalar_only(state: AnalysisState, node: torch.fx.Node) -> bool:
    """Python arithmetic on sizes, such as export's checks of a data-dependent size (u0 >= 0)."""
    return not RuleContext(state, node).tensor_args() and not any(
        isinstance(v, torch.Tensor) for v in _flat(node.meta.get("val"))
    )


def _flat(x: Any) -> list[Any]:
    if isinstance(x, list | tuple):
        return [y for z in x for y in _flat(z)]
    if isinstance(x, dict):
        return [y for z in x.values() for y in _flat(z)]
    return [x]


def _unruled(state: AnalysisState, node: torch.fx.Node, name: str, why: str = "no rule") -> Value:
    """No rule: pin every dim in and out of the node. Sound, and the reason names the op."""
    reason = f"{why} for {name}"
    state.unruled[name] = state.unruled.get(name, 0) + 1
    ctx = RuleContext(state, node)
    ctx.pin_inputs(reason)
    return ctx.fresh_like_output(reason)


def _higher_order(gm: torch.fx.GraphModule, node: torch.fx.Node, state: AnalysisState) -> Value:
    """Wrappers such as ``wrap_with_set_grad_enabled``: analyse the body with its inputs bound."""
    sub = None
    operands: list[Any] = []
    for a in node.args:
        if sub is None:
            sub = _submodule(gm, a)
            continue
        operands.append(a)
    name = str(getattr(node.target, "__name__", node.target))
    if sub is None or name not in (
        "wrap_with_set_grad_enabled",
        "wrap_with_autocast",
        "wrap_activation_checkpoint",
        "tag_activation_checkpoint",
    ):
        return _unruled(state, node, f"higher-order op {name}")
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(operands):
        return _unruled(state, node, f"higher-order op {name} (arity)")
    for ph, a in zip(placeholders, operands):
        state.env[ph] = state.env.get(a) if isinstance(a, torch.fx.Node) else None
        if isinstance(a, torch.fx.Node) and a in state.provenance:
            state.provenance[ph] = state.provenance[a]
    return _run(sub, sub.graph, state)


def _pin_outputs(tg: TracedGraph, state: AnalysisState) -> None:
    out_node = next(n for n in reversed(tg.graph.nodes) if n.op == "output")
    flat = _flat(out_node.args[0])
    ep = tg.exported_program
    specs = ep.graph_signature.output_specs if ep is not None else None
    state_nodes = tg.state_nodes()
    for i, x in enumerate(flat):
        if not isinstance(x, torch.fx.Node):
            continue
        dims = state.env.get(x)
        if not isinstance(dims, list):
            continue
        if specs is not None and i < len(specs) and specs[i].kind.name == "BUFFER_MUTATION":
            # the new value of a buffer (BatchNorm running stats): same space as the buffer
            buf = state_nodes.get(specs[i].target)
            if buf is not None and isinstance(state.env.get(buf), list):
                for a, b in zip(state.env[buf], dims):
                    state.table.unify(a, b)
                continue
        if specs is None and tg.num_user_outputs is not None and i >= tg.num_user_outputs:
            continue  # saved activations of an AOT forward graph: internal, not observable
        state.table.pin_dims(dims, "model output")
