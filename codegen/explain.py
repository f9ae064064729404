"""``sparsify_fx.explain(model, example_inputs)``: what ``backend="sparsify"`` would do, without compiling.

Traces a copy of the model exactly as the backend does (dynamo, AOTAutograd with Inductor's
decompositions, min-cut partition, our rewrites, kernel swaps) but runs the graphs as Python instead of
lowering them with Inductor, so it takes seconds. The user's model and its caches are left untouched.
"""

from __future__ import annotations

import copy
import functools
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from sparsify_fx.codegen.backend import BackendOptions, GraphRecord, _compile, recording

__all__ = ["Explanation", "explain"]


@dataclass
class Explanation:
    """Per dynamo graph: its inputs (trainable/frozen parameters by FQN), the rewrites that fired and why, the
    kernel swaps, the fallbacks with their reasons and the graphs' text; plus dynamo's graph-break reasons."""

    graphs: list[GraphRecord] = field(default_factory=list)
    graph_breaks: list[str] = field(default_factory=list)

    @property
    def fired(self) -> list[str]:
        return [p.name for g in self.graphs for p in g.passes if p.changed]

    @property
    def fallbacks(self) -> list[str]:
        return [f for g in self.graphs for f in g.fallbacks]

    def to_html(self, path: str | os.PathLike | None = None, *, title: str = "sparsify_fx explain") -> str:
        """One self-contained HTML page: per graph the rewrites that fired and why, nodes removed or sliced,
        saved-activation bytes before/after and the graph text before/after side by side.

        Args:
            path: the ``.html`` file to write, or None to only return the text.
            title: the page title.

        Example::

            sparsify_fx.explain(model, (x,), verbose=False).to_html("explain.html")
        """
        from sparsify_fx.html import explanation_html

        return explanation_html(self, path, title=title)

    def __str__(self) -> str:
        lines = [f"sparsify: {len(self.graphs)} graph(s), {len(self.graph_breaks)} graph break(s)"]
        lines += [f"  graph break: {r}" for r in self.graph_breaks]
        for g in self.graphs:
            trainable = [i for i in g.inputs if i.endswith("(trainable)")]
            lines.append(f"graph {g.id}: {len(g.inputs)} inputs ({len(trainable)} trainable), kernels={g.kernels}")
            if g.saved_bytes_before is not None and g.saved_bytes_after is not None:
                lines.append(f"  saved for backward: {g.saved_bytes_before} -> {g.saved_bytes_after} bytes")
            for p in g.passes:
                lines.append("  " + str(p).replace("\n", "\n  "))
            if not g.passes and "forward.partitioned" not in g.graphs:
                lines.append("  no backward graph (inference or nothing trainable): rewrites do not apply")
            for s in g.swaps:
                lines.append(f"  kernel: {s}")
            for s in g.inlined:
                lines.append(f"  inline: {s}")
            for f in g.fallbacks:
                lines.append(f"  FALLBACK: {f}")
        return "\n".join(lines)


def explain(model: torch.nn.Module, example_inputs: Any, options: dict[str, Any] | None = None, *,
            verbose: bool = True) -> Explanation:
    """Print (when ``verbose``) and return what ``torch.compile(model, backend="sparsify", options=options)``
    would do on ``example_inputs`` (a tuple of positional args, a dict of keyword args or one tensor)."""
    opts = BackendOptions.from_options(options)
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, tuple | list):
        args, kwargs = tuple(example_inputs), {}
    else:
        args, kwargs = (example_inputs,), {}
    # a copy: the traced forward may update buffers (BatchNorm statistics), and the user's model stays as it was
    work = copy.deepcopy(model)
    backend = functools.partial(_compile, opts=opts, lower=False)
    breaks_before = Counter(torch._dynamo.utils.counters["graph_break"])
    with recording() as records, torch.enable_grad():
        out = torch.compile(work, backend=backend)(*args, **kwargs)
        # AOTAutograd compiles the backward at its first use: run it so its kernels are reported too
        diff = [t for t in torch.utils._pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor) and t.requires_grad and t.is_floating_point()]
        if diff:
            torch.autograd.backward([t.float().sum() for t in diff])
    breaks = torch._dynamo.utils.counters["graph_break"] - breaks_before
    result = Explanation(graphs=list(records), graph_breaks=sorted(breaks))
    if verbose:
        print(result)
    return result
