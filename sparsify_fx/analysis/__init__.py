"""Analysis: which parameter index sets can be permuted together without changing the function.

``analyze(model, example_inputs)`` traces the model and propagates channel spaces through every
node with the per-op rules in :mod:`sparsify_fx.analysis.rules`; ``analyze_graph`` does the same on
any :class:`~sparsify_fx.frontend.TracedGraph` (export, dynamo or AOTAutograd graphs).
"""

from __future__ import annotations

from typing import Any

import torch

from sparsify_fx.analysis.context import AnalysisState
from sparsify_fx.analysis.propagate import propagate
from sparsify_fx.analysis.report import CouplingReport, Group, Member, Occurrence, PinnedSpace, build_report
from sparsify_fx.analysis.rules import RULES, register, rule_for
from sparsify_fx.frontend import TracedGraph, trace

__all__ = [
    "RULES",
    "CouplingReport",
    "Group",
    "Member",
    "Occurrence",
    "PinnedSpace",
    "analyze",
    "analyze_graph",
    "register",
    "rule_for",
]


def analyze_graph(tg: TracedGraph) -> CouplingReport:
    """Coupling report of an already traced graph."""
    state = AnalysisState()
    members = propagate(tg, state)
    return build_report(state, members, tg.source)


def analyze(model: torch.nn.Module, example_inputs: Any, *, dynamic: bool = False) -> CouplingReport:
    """Find the groups of parameter dims that may be permuted together in ``model``.

    The model is traced in eval mode (dropout and batch-norm updates do not change the coupling)
    and restored to its mode afterwards; nothing else about it changes.
    """
    was_training = model.training
    model.eval()
    try:
        tg = trace(model, example_inputs, dynamic=dynamic)
    finally:
        model.train(was_training)
    return analyze_graph(tg)
