"""sparsify_fx: a sparsity compiler for PyTorch.

Pipeline, one folder per stage: ``frontend`` (trace to FX) → ``analysis`` (coupled channel
spaces) → ``passes`` (S²FT, pruning, N:M, adapters) → ``codegen`` (the ``"sparsify"``
torch.compile backend and its Triton kernels).

The public API is imported lazily so ``import sparsify_fx`` stays cheap (the compile backend's
entry point imports it).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from sparsify_fx.errors import AdapterError, AnalysisError, ConfigError, SparsifyError, SparsifyWarning, TraceError

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "FrozenWeightWarning": "sparsify_fx.passes.s2ft",
    "ZeroUnitsWarning": "sparsify_fx.passes.s2ft",
    "SubstitutedProjectionWarning": "sparsify_fx.passes.s2ft",
    "ExpertsSkippedWarning": "sparsify_fx.passes.s2ft",
    "NothingPrunedWarning": "sparsify_fx.passes.prune",
    "UnitsKeptWarning": "sparsify_fx.passes.prune",
    "HeadsKeptWarning": "sparsify_fx.passes.prune",
    "PretrainedMismatchWarning": "sparsify_fx.passes.hf",
    "TraceFallbackWarning": "sparsify_fx.frontend.trace",
    "trace": "sparsify_fx.frontend",
    "TracedGraph": "sparsify_fx.frontend",
    "analyze": "sparsify_fx.analysis",
    "analyze_graph": "sparsify_fx.analysis",
    "CouplingReport": "sparsify_fx.analysis",
    "Group": "sparsify_fx.analysis",
    "Member": "sparsify_fx.analysis",
    "S2FTConfig": "sparsify_fx.passes.s2ft",
    "s2ft": "sparsify_fx.passes.s2ft",
    "score_units": "sparsify_fx.passes.s2ft",
    "describe": "sparsify_fx.passes.s2ft",
    "merge": "sparsify_fx.passes.s2ft",
    "export_adapter": "sparsify_fx.passes.adapter",
    "load_adapter": "sparsify_fx.passes.adapter",
    "save_adapter": "sparsify_fx.passes.adapter",
    "apply_adapter": "sparsify_fx.passes.adapter",
    "remove_adapter": "sparsify_fx.passes.adapter",
    "Adapter": "sparsify_fx.passes.adapter",
    "PruneConfig": "sparsify_fx.passes.prune",
    "prune": "sparsify_fx.passes.prune",
    "NMConfig": "sparsify_fx.passes.nm",
    "BlockConfig": "sparsify_fx.passes.nm",
    "sparsify": "sparsify_fx.passes.nm",
    "export_sparse": "sparsify_fx.passes.nm",
    "load_sparse": "sparsify_fx.passes.nm",
    "explain": "sparsify_fx.codegen.explain",
    "permute": "sparsify_fx.passes.copermute",
    "Reselect": "sparsify_fx.passes.reselect",
    "Reselector": "sparsify_fx.passes.reselect",
    "ReselectCallback": "sparsify_fx.passes.reselect",
    "reselect_": "sparsify_fx.passes.reselect",
    "load_base": "sparsify_fx.passes.checkpoint",
    "save_merged": "sparsify_fx.passes.checkpoint",
    "attach_adapters": "sparsify_fx.passes.serving",
    "detach_adapters": "sparsify_fx.passes.serving",
    "add_served_adapter": "sparsify_fx.passes.serving",
    "remove_served_adapter": "sparsify_fx.passes.serving",
    "served_adapters": "sparsify_fx.passes.serving",
    "combine": "sparsify_fx.passes.serving",
}

__all__ = [
    "AdapterError",
    "AnalysisError",
    "ConfigError",
    "SparsifyError",
    "SparsifyWarning",
    "TraceError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name == "testing":
        return importlib.import_module("sparsify_fx.testing")
    raise AttributeError(f"module 'sparsify_fx' has no attribute {name!r}")


if TYPE_CHECKING:  # pragma: no cover
    from sparsify_fx.analysis import CouplingReport, Group, Member, analyze, analyze_graph  # noqa: F401
    from sparsify_fx.codegen.explain import explain  # noqa: F401
    from sparsify_fx.frontend import TracedGraph, trace  # noqa: F401
    from sparsify_fx.passes.adapter import (  # noqa: F401
        Adapter,
        apply_adapter,
        export_adapter,
        load_adapter,
        remove_adapter,
        save_adapter,
    )
    from sparsify_fx.passes.checkpoint import load_base, save_merged  # noqa: F401
    from sparsify_fx.passes.copermute import permute  # noqa: F401
    from sparsify_fx.passes.nm import BlockConfig, NMConfig, export_sparse, load_sparse, sparsify  # noqa: F401
    from sparsify_fx.passes.prune import PruneConfig, prune  # noqa: F401
    from sparsify_fx.passes.reselect import Reselect, ReselectCallback, Reselector, reselect_  # noqa: F401
    from sparsify_fx.passes.s2ft import S2FTConfig, describe, merge, s2ft, score_units  # noqa: F401
    from sparsify_fx.passes.serving import (  # noqa: F401
        add_served_adapter,
        attach_adapters,
        combine,
        detach_adapters,
        remove_served_adapter,
        served_adapters,
    )
