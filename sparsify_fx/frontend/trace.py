"""Trace a model to an ATen-level FX graph with torch.export (non-strict)."""

from __future__ import annotations

import contextlib
import logging
import os
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from sparsify_fx.errors import TraceError
from sparsify_fx.frontend.graph import TracedGraph


def _split_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, list | tuple):
        return tuple(example_inputs), {}
    raise TraceError(
        f"example_inputs must be a tensor, a tuple of positional inputs or a dict of keyword "
        f"inputs, got {type(example_inputs).__name__}."
    )


@contextlib.contextmanager
def tracing_friendly(model: torch.nn.Module) -> Iterator[None]:
    """Switch off what blocks tracing in transformers models (the KV cache), then restore it.

    A cache object is mutable Python state that torch.export cannot lift into a graph; the
    fine-tuning and analysis graphs never need it.
    """
    saved = []
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and getattr(cfg, "use_cache", None) is True:
            saved.append(cfg)
            cfg.use_cache = False
    try:
        yield
    finally:
        for cfg in saved:
            cfg.use_cache = True


@contextlib.contextmanager
def _quiet_fake_tensor_errors() -> Iterator[None]:
    # On a failing op, FakeTensor logs the whole traceback at ERROR before raising; we re-raise it as a
    # TraceError naming the cause and the user's line, so the log would only repeat it, louder.
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _dynamic_shapes(args: tuple, kwargs: dict, dynamic: bool | Any) -> Any:
    if dynamic is False or dynamic is None:
        return None
    if dynamic is not True:
        return dynamic  # the user's own torch.export dynamic_shapes spec

    def spec(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            # batch and sequence: the two leading dims of every tensor input
            return {d: torch.export.Dim.AUTO for d in range(min(x.dim(), 2))}
        return None

    return (
        (tuple(spec(a) for a in args), {k: spec(v) for k, v in kwargs.items()})
        if kwargs
        else tuple(spec(a) for a in args)
    )


def _user_frame(exc: BaseException) -> str:
    """The innermost traceback frame outside torch: where in the user's model tracing failed."""
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(os.path.dirname(__file__))
    frames = [
        f
        for f in traceback.extract_tb(exc.__traceback__)
        if not f.filename.startswith(torch_dir) and not f.filename.startswith(here)
    ]
    if not frames:
        return ""
    f = frames[-1]
    return f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}"


def trace(
    model: torch.nn.Module,
    example_inputs: Any,
    *,
    dynamic: bool | Any = False,
) -> TracedGraph:
    """Trace ``model`` to an ATen-level FX graph with parameters known by FQN.

    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of keyword inputs.
    ``dynamic=True`` marks the batch and sequence dims (the first two of every tensor input)
    dynamic; any torch.export ``dynamic_shapes`` spec is also accepted. transformers models have
    their KV cache switched off for the trace (and restored afterwards). The model is not modified.

    A model built under ``torch.device("meta")`` traces like one with real weights (torch.export runs on
    fake tensors, so only shapes and dtypes matter): pass its example inputs on CPU or on meta, either
    works. Parameters are known by FQN; tied weights are found by aliasing (one tensor under two names, or
    one storage object), never by data address, which is 0 for every meta tensor.

    Raises :class:`TraceError` naming the failing op or source line.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"trace() needs an nn.Module, got {type(model).__name__}.")
    args, kwargs = _split_inputs(example_inputs)
    try:
        with tracing_friendly(model), _quiet_fake_tensor_errors():
            ep = torch.export.export(
                model, args, kwargs or None, dynamic_shapes=_dynamic_shapes(args, kwargs, dynamic), strict=False
            )
    except Exception as exc:  # torch raises many types; all mean "not traceable"
        where = _user_frame(exc)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(
            f"could not trace {type(model).__name__} with torch.export: {type(exc).__name__}: {first}"
            + (f"\n  failing line: {where}" if where else "")
            + "\n  fix: make that code traceable (no data-dependent Python control flow on tensor "
            "values, no untraceable Python objects as inputs), or pass inputs that avoid it."
        ) from exc
    return TracedGraph.from_exported(ep)
