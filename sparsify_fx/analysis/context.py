"""What an op rule sees: its node's arguments as channel-space dims, and the space table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from sparsify_fx.analysis.spaces import Dim, Size, SpaceTable, as_size

# A node's value in the analysis: dims of a tensor, a tuple of values, or None (not a tensor).
Value = Any


@dataclass
class Provenance:
    """A node that is a parameter seen through layout-only ops: which param dim is each node dim."""

    fqn: str
    axes: tuple[int | None, ...]


@dataclass
class AnalysisState:
    table: SpaceTable = field(default_factory=SpaceTable)
    env: dict[torch.fx.Node, Value] = field(default_factory=dict)
    provenance: dict[torch.fx.Node, Provenance] = field(default_factory=dict)
    roles: dict[tuple[str, int], set[str]] = field(default_factory=dict)  # (fqn, dim) -> {"in", "out", ...}
    unruled: dict[str, int] = field(default_factory=dict)  # op name -> count of nodes pinned for lack of rule
    # grouped GEMMs of stacked expert weights: node -> its offs node (rows [offs[e-1], offs[e]) use expert e)
    expert_products: dict[torch.fx.Node, torch.fx.Node] = field(default_factory=dict)


class RuleContext:
    """Arguments of one node, bound to its schema, with helpers every rule needs."""

    def __init__(self, state: AnalysisState, node: torch.fx.Node) -> None:
        self.state = state
        self.table = state.table
        self.node = node
        self._bound: dict[str, Any] | None = None

    # ------------------------------------------------------------------ arguments
    def bound(self) -> dict[str, Any]:
        if self._bound is None:
            target = self.node.target
            schema = getattr(target, "_schema", None)
            out: dict[str, Any] = {}
            if schema is None:
                for i, a in enumerate(self.node.args):
                    out[str(i)] = a
                out.update(self.node.kwargs)
            else:
                for i, a in enumerate(schema.arguments):
                    if i < len(self.node.args):
                        out[a.name] = self.node.args[i]
                    elif a.name in self.node.kwargs:
                        out[a.name] = self.node.kwargs[a.name]
                    else:
                        out[a.name] = a.default_value if a.has_default_value() else None
            self._bound = out
        return self._bound

    def arg(self, name: str, default: Any = None) -> Any:
        v = self.bound().get(name, default)
        return default if v is None else v

    def dims(self, x: Any) -> list[Dim] | None:
        """Dims of a tensor argument (None for scalars and non-tensors)."""
        if isinstance(x, torch.fx.Node):
            v = self.state.env.get(x)
            return v if isinstance(v, list) else None
        return None

    def tensor_args(self) -> list[torch.fx.Node]:
        out = []
        for a in list(self.node.args) + list(self.node.kwargs.values()):
            for x in a if isinstance(a, list | tuple) else [a]:
                if isinstance(x, torch.fx.Node) and isinstance(self.state.env.get(x), list):
                    out.append(x)
        return out

    # ------------------------------------------------------------------ shapes
    def shape_of(self, x: Any) -> list[Size]:
        val = x.meta.get("val") if isinstance(x, torch.fx.Node) else x
        return [as_size(s) for s in val.shape]

    def out_val(self) -> Any:
        return self.node.meta.get("val")

    def out_shape(self) -> list[Size]:
        return self.shape_of(self.out_val())

    def fresh(self, shape: Sequence[Any], pin: str | None = None) -> list[Dim]:
        """Fresh dims for a shape (ints or SymInts)."""
        return [self.table.fresh_dim(as_size(s), pin) for s in shape]

    def fresh_like(self, val: Any, pin: str | None = None) -> Value:
        """Fresh dims for a tensor or a tuple of them; None for anything else."""
        return fresh_value(self.table, val, pin)

    def fresh_like_output(self, pin: str | None = None) -> Value:
        return self.fresh_like(self.out_val(), pin)

    # ------------------------------------------------------------------ facts
    def unify(self, a: Dim, b: Dim) -> None:
        self.table.unify(a, b)

    def pin_inputs(self, reason: str) -> None:
        for x in self.tensor_args():
            self.table.pin_dims(self.dims(x) or [], reason)

    def param_axis(self, x: Any, axis: int) -> tuple[str, int] | None:
        p = self.state.provenance.get(x) if isinstance(x, torch.fx.Node) else None
        if p is None or axis >= len(p.axes) or p.axes[axis] is None:
            return None
        return p.fqn, p.axes[axis]  # type: ignore[return-value]

    def role(self, x: Any, axis: int, role: str) -> None:
        """Record that dim ``axis`` of argument ``x`` (if it is a parameter) plays ``role``."""
        key = self.param_axis(x, axis)
        if key is not None:
            self.state.roles.setdefault(key, set()).add(role)

    def is_state(self, x: Any) -> bool:
        return isinstance(x, torch.fx.Node) and x in self.state.provenance

    def op_name(self) -> str:
        return op_name(self.node.target)


def op_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        return f"{target.namespace}.{target._schema.name.split('::')[-1]}.{target._overloadname}"
    return getattr(target, "__name__", None) or str(target)


def fresh_value(table: SpaceTable, val: Any, pin: str | None) -> Value:
    if isinstance(val, torch.Tensor):
        return [table.fresh_dim(as_size(s), pin) for s in val.shape]
    if isinstance(val, list | tuple):
        return [fresh_value(table, v, pin) for v in val] if _is_tuple_value(val) else None
    return None


def _is_tuple_value(val: Any) -> bool:
    return any(isinstance(v, torch.Tensor | list | tuple) for v in val)
