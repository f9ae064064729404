"""Frontend: models to ATen-level FX graphs whose parameters are known by FQN."""

from sparsify_fx.frontend.graph import InputInfo, TracedGraph, info_from_dynamo_source, tied_names
from sparsify_fx.frontend.trace import trace, tracing_friendly

__all__ = ["InputInfo", "TracedGraph", "info_from_dynamo_source", "tied_names", "trace", "tracing_friendly"]
