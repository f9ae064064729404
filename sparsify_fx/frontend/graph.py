"""One view of a traced graph for every consumer: which placeholder is which parameter.

The analysis and the passes only ever ask a :class:`TracedGraph` "is this node a parameter, and
what is its FQN?". Three producers fill it in: ``torch.export`` (the model transform), dynamo
(``torch.compile`` before AOTAutograd) and AOTAutograd's forward graph (inside the backend), so the
same analysis runs on all of them, keyed by the same FQNs.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx

InputKind = Literal["parameter", "buffer", "constant", "input", "symint"]


@dataclass(frozen=True)
class InputInfo:
    """What a graph placeholder stands for."""

    kind: InputKind
    target: str | None = None  # FQN for parameters, buffers and constants


@dataclass
class TracedGraph:
    """An ATen-level FX graph plus the meaning of its placeholders."""

    graph_module: torch.fx.GraphModule
    inputs: dict[str, InputInfo]
    # "eager": one eager run recorded op by op (trace.py), where dynamo would lose part of the model
    source: Literal["export", "dynamo", "aot", "eager"]
    exported_program: torch.export.ExportedProgram | None = field(default=None, repr=False)
    # AOT forward graphs also return saved activations; only the first N outputs are the user's
    num_user_outputs: int | None = None
    # FQNs that name one shared tensor (tied embeddings): the analysis treats them as one
    tied: list[list[str]] = field(default_factory=list)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.graph_module.graph

    def info(self, node: torch.fx.Node) -> InputInfo | None:
        return self.inputs.get(node.name) if node.op == "placeholder" else None

    def fqn(self, node: torch.fx.Node) -> str | None:
        """FQN of the parameter or buffer a placeholder holds, else None."""
        info = self.info(node)
        return info.target if info is not None and info.kind in ("parameter", "buffer") else None

    def state_nodes(self) -> dict[str, torch.fx.Node]:
        """FQN -> placeholder for every parameter and buffer in the graph."""
        out = {}
        for n in self.graph.nodes:
            fqn = self.fqn(n)
            if fqn is not None:
                out[fqn] = n
        return out

    # ---------------------------------------------------------------- producers
    @classmethod
    def from_exported(cls, ep: torch.export.ExportedProgram) -> TracedGraph:
        kinds = {
            "PARAMETER": "parameter",
            "BUFFER": "buffer",
            "CONSTANT_TENSOR": "constant",
            "CUSTOM_OBJ": "constant",
            "USER_INPUT": "input",
            "TOKEN": "constant",
        }
        inputs: dict[str, InputInfo] = {}
        for spec in ep.graph_signature.input_specs:
            name = getattr(spec.arg, "name", None)
            if name is None:
                continue
            kind = kinds.get(spec.kind.name, "input")
            inputs[name] = InputInfo(kind, spec.target if kind != "input" else None)  # type: ignore[arg-type]
        return cls(ep.graph_module, inputs, "export", ep, tied=tied_names(ep.state_dict))

    @classmethod
    def from_dynamo(cls, gm: torch.fx.GraphModule) -> TracedGraph:
        """Dynamo graph: parameters arrive as inputs whose guard source spells their FQN."""
        inputs: dict[str, InputInfo] = {}
        for n in gm.graph.nodes:
            if n.op != "placeholder":
                continue
            inputs[n.name] = info_from_dynamo_source(n)
        return cls(gm, inputs, "dynamo")

    @classmethod
    def from_aot(
        cls, gm: torch.fx.GraphModule, flat_inputs: Sequence[InputInfo], num_user_outputs: int | None = None
    ) -> TracedGraph:
        """AOTAutograd forward graph: its placeholders are the dynamo inputs, in order."""
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        inputs = {}
        for i, n in enumerate(placeholders):
            inputs[n.name] = flat_inputs[i] if i < len(flat_inputs) else InputInfo("input")
        return cls(gm, inputs, "aot", num_user_outputs=num_user_outputs)


def alias_key(t: torch.Tensor) -> tuple[int, ...]:
    """What makes two tensors one: the same storage *object* at the same offset, shape and strides.

    Not the data address: every meta tensor (and every zero-size one) has ``data_ptr() == 0``, so
    address keys made all parameters of a ``torch.device("meta")`` model one tie. The storage object
    is the same for a parameter registered under two names (``lm_head.weight = wte.weight``) and for
    two Parameters sharing memory (``nn.Parameter(w.data)``), on every device.
    """
    try:
        storage = t.untyped_storage()._cdata  # the StorageImpl, unique while the tensor lives
    except (RuntimeError, NotImplementedError, AttributeError):
        return (id(t),)  # a wrapper subclass with no storage of its own: only the object itself aliases it
    return (storage, t.storage_offset(), *t.shape, -1, *t.stride())


def tied_names(state: Mapping[str, object]) -> list[list[str]]:
    """Groups of FQNs in ``state`` that name one tensor (tied weights), each in ``state``'s order.

    Args:
        state: FQN -> tensor, e.g. an ``ExportedProgram.state_dict`` or
            ``dict(model.named_parameters(remove_duplicate=False))``; non-tensors are skipped.

    Example:
        >>> emb = torch.nn.Embedding(8, 4)
        >>> head = torch.nn.Linear(4, 8, bias=False)
        >>> head.weight = emb.weight
        >>> tied_names({"emb.weight": emb.weight, "head.weight": head.weight, "head.bias": torch.zeros(8)})
        [['emb.weight', 'head.weight']]
    """
    by_alias: dict[tuple[int, ...], list[str]] = {}
    for fqn, t in state.items():
        if isinstance(t, torch.Tensor):
            by_alias.setdefault(alias_key(t), []).append(fqn)
    return [names for names in by_alias.values() if len(names) > 1]


_SOURCE_PART = re.compile(r"\._(modules|parameters|buffers)\['([^']+)'\]|\.([A-Za-z_][A-Za-z0-9_]*)")


def info_from_dynamo_source(node: torch.fx.Node) -> InputInfo:
    """Read FQN and kind off a dynamo placeholder's guard source, e.g.
    ``L['self']._modules['layers']._modules['0']._parameters['weight']`` -> ``layers.0.weight``."""
    val = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(val, torch.SymInt | int):
        return InputInfo("symint")
    grapharg = node.meta.get("grapharg")
    source = getattr(getattr(grapharg, "source", None), "name", None)
    if callable(source):  # older torch: a method
        source = source()
    if not isinstance(source, str) or "_parameters[" not in source and "_buffers[" not in source:
        return InputInfo("input")
    root_end = source.find("]") + 1  # strip L['self'] / L['model']
    parts, kind = [], "input"
    for m in _SOURCE_PART.finditer(source[root_end:]):
        if m.group(1):
            parts.append(m.group(2))
            if m.group(1) == "parameters":
                kind = "parameter"
            elif m.group(1) == "buffers":
                kind = "buffer"
        elif m.group(3):
            parts.append(m.group(3))
    return InputInfo(kind, ".".join(parts))  # type: ignore[arg-type]
