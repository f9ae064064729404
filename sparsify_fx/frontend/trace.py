"""Trace a model to an ATen-level FX graph with torch.export (non-strict)."""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import os
import sys
import threading
import traceback
import warnings
import weakref
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.fx
from torch.utils._python_dispatch import TorchDispatchMode

from sparsify_fx.errors import SparsifyWarning, TraceError
from sparsify_fx.frontend.graph import InputInfo, TracedGraph, tied_names
from sparsify_fx.oplib import define_op


class TraceFallbackWarning(SparsifyWarning):
    """torch.export failed and the graph was captured through dynamo instead (named cause, graph count)."""


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
    # On a failing op, FakeTensor logs the whole traceback at ERROR before raising, a data-dependent guard logs
    # a warning and export prints the partial graph to stderr; we re-raise it as a TraceError (or fall back)
    # naming the cause and the user's line, so all of that would only repeat it, louder. Whatever reached
    # stderr is passed on when the export succeeds.
    loggers = [logging.getLogger(n) for n in ("torch._subclasses.fake_tensor", "torch.fx.experimental.symbolic_shapes")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    buf = io.StringIO()
    failed = False
    try:
        with contextlib.redirect_stderr(buf):
            yield
    except BaseException:
        failed = True
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if not failed and buf.getvalue():
            sys.stderr.write(buf.getvalue())


@contextlib.contextmanager
def _without_stack_traces() -> Iterator[None]:
    # FX records the Python stack of every traced op (symbolised, each frame's source line read): about a third
    # of torch.export's time on a Llama, linear in the layers. Nothing downstream reads node.meta["stack_trace"];
    # a failure is still reported from the exception's own traceback (_user_frame).
    import torch.fx.config as fx_config

    saved = fx_config.do_not_emit_stack_traces
    fx_config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        fx_config.do_not_emit_stack_traces = saved


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


# ---------------------------------------------------------------------------------------- dynamo fallback
# One backend object for every capture, so dynamo's cache entries for a model are reused rather than piling up;
# graphs are recorded when they *run* (a cache hit records too), into the sink of the capture in progress.
_SINK = threading.local()


def _recording_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Any:
    # read the FQNs now: dynamo drops the placeholders' guard sources once the backend returns
    infos = list(TracedGraph.from_dynamo(gm).inputs.values())

    def run(*args: Any) -> Any:
        sink = getattr(_SINK, "graphs", None)
        if sink is not None:
            sink.append((gm, infos, args))
        return gm.forward(*args)

    return run


def _dynamo_graphs(model: torch.nn.Module, args: tuple, kwargs: dict
                   ) -> list[tuple[torch.fx.GraphModule, list[InputInfo], tuple]]:
    """Run ``model`` once through dynamo; the graphs it ran, in execution order, with their inputs' meaning and
    their flat inputs."""
    import torch._dynamo

    compiled = torch.compile(model, backend=_recording_backend, dynamic=False)  # wraps; the model is not changed
    _SINK.graphs = []
    try:
        # a silent eager fallback at dynamo's recompile limit would capture part of the model: fail instead
        with torch._dynamo.config.patch(recompile_limit=1 << 20, accumulated_recompile_limit=1 << 20,
                                        fail_on_recompile_limit_hit=True), torch.no_grad():
            compiled(*args, **kwargs)
        graphs = _SINK.graphs
    finally:
        _SINK.graphs = None
    if not graphs:
        raise TraceError("dynamo captured no graph (the forward ran entirely in Python)")
    return graphs


def _combine(parts: list[tuple[torch.export.ExportedProgram, list[InputInfo]]], model: torch.nn.Module,
             flats: list[tuple] | None = None) -> TracedGraph:
    """Several exported graph-break pieces as one graph: a parameter is one placeholder wherever it is read;
    every other piece input is a model input and every piece output a model output, so whatever crosses a
    graph break (through Python the analysis never saw) is pinned, which keeps every reported group sound."""
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    g = torch.fx.Graph()
    root = torch.nn.Module()
    inputs: dict[str, InputInfo] = {}
    shared: dict[str, torch.fx.Node] = {}
    maps: list[dict[torch.fx.Node, torch.fx.Node]] = []
    # a piece compiled for a submodule's frame (after a graph break) spells FQNs relative to that submodule:
    # the tensor object the piece received names the parameter in the whole model
    by_object = {id(t): fqn for fqn, t in reversed(list(state.items()))}
    for i, (ep, infos) in enumerate(parts):  # placeholders first, for all pieces
        val_map: dict[torch.fx.Node, torch.fx.Node] = {}
        nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        user = 0
        for spec in ep.graph_signature.input_specs:
            node = nodes.get(getattr(spec.arg, "name", None) or "")
            if node is None:
                continue
            if spec.kind.name == "USER_INPUT":
                info = infos[user] if user < len(infos) else InputInfo("input")
                arg = flats[i][user] if flats is not None and user < len(flats[i]) else None
                if info.kind in ("parameter", "buffer") and id(arg) in by_object:  # a relative name may collide
                    info = InputInfo(info.kind, by_object[id(arg)])
                user += 1
            else:  # a tensor the piece holds itself (a constant dynamo lifted): not a model FQN
                info = InputInfo("constant", f"graph {i}: {spec.target}")
            if info.kind in ("parameter", "buffer") and info.target in state:
                if info.target not in shared:
                    shared[info.target] = g.placeholder(info.target.replace(".", "_"))
                    shared[info.target].meta = dict(node.meta)
                    inputs[shared[info.target].name] = info
                val_map[node] = shared[info.target]
                continue
            if info.kind in ("parameter", "buffer"):
                info = InputInfo("constant", info.target)  # a source that is not one of the model's tensors
            ph = g.placeholder(f"g{i}_{node.name}")
            ph.meta = dict(node.meta)
            inputs[ph.name] = info
            val_map[node] = ph
        maps.append(val_map)
    outs: list[Any] = []
    for i, ((ep, _), val_map) in enumerate(zip(parts, maps)):
        look = val_map.__getitem__
        for node in ep.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                res = torch.fx.node.map_arg(node.args[0], look)
                outs.extend(res if isinstance(res, list | tuple) else [res])
                continue
            if node.op == "get_attr":
                name = f"g{i}_{str(node.target).replace('.', '_')}"
                setattr(root, name, operator.attrgetter(str(node.target))(ep.graph_module))
                new = g.get_attr(name)
                new.meta = dict(node.meta)
                val_map[node] = new
                continue
            val_map[node] = g.node_copy(node, look)
    g.output(tuple(outs))
    return TracedGraph(torch.fx.GraphModule(root, g), inputs, "dynamo", tied=tied_names(state))


def _trace_with_dynamo(model: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[TracedGraph, int]:
    """The ATen graph of every piece dynamo captures (each piece exported like a model), as one TracedGraph."""
    parts, flats = [], []
    for gm, infos, flat in _dynamo_graphs(model, args, kwargs):
        with torch.no_grad():
            ep = torch.export.export(gm, tuple(flat), strict=False)
        parts.append((ep, infos))
        flats.append(tuple(flat))
    return _combine(parts, model, flats), len(parts)


# ---------------------------------------------------------------------------------------- eager capture
@define_op("read_into_python", fake=lambda x: None, autocast=())
def read_into_python(x: torch.Tensor) -> None:
    """Stands, in an eagerly captured graph, for the model's Python reading a tensor's values (``tolist``,
    ``numpy``): nothing is computed; the analysis pins what was read, as for ``item``."""


def _meta(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    if isinstance(x, list | tuple):
        return type(x)(_meta(y) for y in x)
    return x


class _EagerRecorder(TorchDispatchMode):
    """Records every ATen op that one eager run dispatches into an FX graph; a tensor is known by the node that
    last produced it (an in-place op's node replaces its input's), by object identity (weakly held: an object id
    is trusted only while the object it named is alive)."""

    def __init__(self, graph: torch.fx.Graph, inputs: dict[str, InputInfo]) -> None:
        super().__init__()
        self.graph, self.inputs = graph, inputs
        self._nodes: dict[int, tuple[weakref.ref, torch.fx.Node]] = {}
        self._first_op: torch.fx.Node | None = None
        self._constants = 0

    def bind(self, t: torch.Tensor, node: torch.fx.Node) -> None:
        self._nodes[id(t)] = (weakref.ref(t), node)

    def placeholder(self, name: str, t: torch.Tensor, info: InputInfo) -> torch.fx.Node:
        ctx = self.graph.inserting_before(self._first_op) if self._first_op is not None else contextlib.nullcontext()
        with ctx:
            node = self.graph.placeholder(name)
        node.meta["val"] = _meta(t)
        self.inputs[node.name] = info
        self.bind(t, node)
        return node

    def node_of(self, t: torch.Tensor) -> torch.fx.Node:
        entry = self._nodes.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        # a tensor no recorded op produced (made before the run, or from Python data): a constant, pinned
        self._constants += 1
        return self.placeholder(f"eager_constant_{self._constants}", t,
                                InputInfo("constant", f"tensor made outside the captured ops #{self._constants}"))

    def _arg(self, x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return self.node_of(x)
        if isinstance(x, list | tuple):
            return type(x)(self._arg(y) for y in x)
        return x

    def record(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        node = self.graph.call_function(func, self._arg(tuple(args)), {k: self._arg(v) for k, v in kwargs.items()})
        if self._first_op is None:
            self._first_op = node
        node.meta["val"] = _meta(out)
        if isinstance(out, torch.Tensor):
            self.bind(out, node)
        elif isinstance(out, list | tuple):
            for i, o in enumerate(out):
                if isinstance(o, torch.Tensor):
                    item = self.graph.call_function(operator.getitem, (node, i))
                    item.meta["val"] = _meta(o)
                    self.bind(o, item)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.record(func, args, kwargs, out)
        return out


@contextlib.contextmanager
def _python_reads(rec: _EagerRecorder) -> Iterator[None]:
    # tolist() and numpy() read a tensor's memory without dispatching any op, so the recorder would not see the
    # model's Python decide on those values (JetMoE's expert sizes): they are marked here while the capture runs
    def wrap(name: str) -> Any:
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *a: Any, **kw: Any) -> Any:
            if self.numel() > 1:
                with torch.utils._python_dispatch._disable_current_modes():
                    rec.record(torch.ops.sparsify.read_into_python.default, (self,), {}, None)
            return original(self, *a, **kw)

        return read

    names = ("tolist", "numpy", "__array__")
    saved = {n: torch.Tensor.__dict__.get(n, _ABSENT) for n in names}
    try:
        for n in names:
            setattr(torch.Tensor, n, wrap(n))
        yield
    finally:
        for n, v in saved.items():
            if v is _ABSENT:
                delattr(torch.Tensor, n)
            else:
                setattr(torch.Tensor, n, v)


_ABSENT = object()


def _leaves(x: Any) -> list[Any]:
    if isinstance(x, Mapping):
        return [y for v in x.values() for y in _leaves(v)]
    if isinstance(x, list | tuple):
        return [y for v in x for y in _leaves(v)]
    return [x]


def _trace_eagerly(model: torch.nn.Module, args: tuple, kwargs: dict) -> TracedGraph:
    """One eager run of ``model`` recorded op by op (no grad): what the model computes for these inputs, with
    its Python's decisions (branches, loops, ``tolist`` splits) taken as they fell; values read into Python
    are pinned."""
    g = torch.fx.Graph()
    inputs: dict[str, InputInfo] = {}
    rec = _EagerRecorder(g, inputs)
    state = dict(model.named_parameters(remove_duplicate=False))
    params = set(state)
    state.update(model.named_buffers(remove_duplicate=False))
    seen: set[int] = set()
    for fqn, t in state.items():
        if isinstance(t, torch.Tensor) and id(t) not in seen:  # a tied tensor is one placeholder, first name
            seen.add(id(t))
            rec.placeholder(fqn.replace(".", "_"), t, InputInfo("parameter" if fqn in params else "buffer", fqn))
    for i, x in enumerate(_leaves((args, kwargs))):
        if isinstance(x, torch.Tensor):
            rec.placeholder(f"input_{i}", x, InputInfo("input"))
    with torch.no_grad(), _python_reads(rec), rec:
        out = model(*args, **kwargs)
    with torch.utils._python_dispatch._disable_current_modes():
        outs = [rec.node_of(t) for t in _leaves(out) if isinstance(t, torch.Tensor)]
    g.output(tuple(outs))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    return TracedGraph(gm, inputs, "eager", tied=tied_names(state))


def _raised_by_model(exc: BaseException) -> bool:
    """The failure is the model's own Python raising (its innermost frame is outside torch and sparsify_fx), not
    a tracer refusing an op or a data-dependent guard."""
    frames = traceback.extract_tb(exc.__traceback__)
    torch_dir = os.path.dirname(torch.__file__)
    here = os.path.dirname(os.path.dirname(__file__))
    return bool(frames) and not frames[-1].filename.startswith((torch_dir, here))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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

    Where torch.export fails (data-dependent Python branches, shapes export cannot prove), the model runs once
    through dynamo instead (``torch.compile`` with a recording backend; no grad, static shapes) and each graph
    it captures is exported on its own, parameters keeping their FQNs; a :class:`TraceFallbackWarning` names
    the export failure. With graph breaks the pieces become one graph in which what crosses a break is pinned.
    Where that would lose part of the model, one eager run is recorded op by op instead (``source == "eager"``;
    no grad, static shapes, the branches and loops these inputs take, values read into Python pinned): when the
    model's own code raises while traced (a branch taken only under ``torch.compiler.is_compiling()``, which dynamo
    takes too), and when dynamo ran code outside its graphs that reads parameters no graph reads (a graph break
    inside a loop, as in per-expert loops).

    Args:
        model: the module to trace; not modified (its KV cache setting is restored).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        dynamic: ``True`` for dynamic batch/sequence dims, or a torch.export ``dynamic_shapes`` spec.

    Example:
        >>> tg = trace(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
        >>> sorted(tg.state_nodes())
        ['bias', 'weight']

    Raises :class:`TraceError` naming the failing op or source line when neither torch.export nor dynamo can
    capture the model.
    """
    if not isinstance(model, torch.nn.Module):
        raise TraceError(f"trace() needs an nn.Module, got {type(model).__name__}.")
    args, kwargs = _split_inputs(example_inputs)
    try:
        with tracing_friendly(model), _quiet_fake_tensor_errors(), _without_stack_traces():
            ep = torch.export.export(
                model, args, kwargs or None, dynamic_shapes=_dynamic_shapes(args, kwargs, dynamic), strict=False
            )
    except Exception as exc:  # torch raises many types; all mean "not traceable"
        return _fallback(model, args, kwargs, exc)
    return TracedGraph.from_exported(ep)


def _fallback(model: torch.nn.Module, args: tuple, kwargs: dict, exc: Exception) -> TracedGraph:
    """torch.export failed: capture through dynamo (or one recorded eager run where dynamo would lose part of the
    model), or raise a TraceError naming the export failure's line."""
    where = _user_frame(exc)
    cause = f"{type(exc).__name__}: {_first_line(exc)}"
    failed = f"torch.export could not trace {type(model).__name__} ({cause}" + (f"; at {where}" if where else "")
    eager_note = ("The analysis holds for the branches these example inputs take, with static shapes; values the "
                  "model reads into Python are pinned.")
    if _raised_by_model(exc):
        # Dynamo would run the same compile-only branch (is_compiling() is true there as under export) and, where it
        # raises, run that frame eagerly outside every graph, so what it computes (LongT5's and Switch
        # Transformers' masks and position biases) would cross graph breaks pinned. One eager run records it all.
        eager = _try_eager(model, args, kwargs)
        if eager is not None:
            warnings.warn(f"{failed}): the model's own code raises while it is traced; captured it by recording one "
                          f"eager run instead (one graph). {eager_note}", TraceFallbackWarning, stacklevel=3)
            return eager
    try:
        with tracing_friendly(model), _quiet_fake_tensor_errors():
            tg, pieces = _trace_with_dynamo(model, args, kwargs)
    except Exception as dyn_exc:  # noqa: BLE001 - the export failure is the one to report; dynamo's is added
        raise TraceError(
            f"could not trace {type(model).__name__} with torch.export: {cause}"
            + (f"\n  failing line: {where}" if where else "")
            + f"\n  dynamo fallback failed too: {type(dyn_exc).__name__}: {_first_line(dyn_exc)}"
            + "\n  fix: make that code traceable (no data-dependent Python control flow on tensor "
            "values, no untraceable Python objects as inputs), or pass inputs that avoid it."
        ) from exc
    # Dynamo runs Python eagerly between graph breaks, and where it cannot resume (a break inside a loop, as in a
    # per-expert loop with a data-dependent `continue`) the rest of the frame too: the parameters read there reach no
    # graph, and the analysis would not see them at all. One recorded eager run sees every op.
    eager = _try_eager(model, args, kwargs)
    lost = sorted(_parameters_read(eager) - _parameters_read(tg)) if eager is not None else []
    if eager is not None and lost:
        warnings.warn(
            f"{failed}); dynamo ran part of the model outside its graph(s) (parameters such as "
            f"{', '.join(lost[:3])} reached none), so it was captured by recording one eager run instead "
            f"(one graph). {eager_note}",
            TraceFallbackWarning,
            stacklevel=3,
        )
        return eager
    warnings.warn(
        f"{failed}); captured it through dynamo instead, in {pieces} graph(s). The analysis holds for the branches "
        "these example inputs take, with static shapes"
        + ("; tensors crossing a graph break are pinned like model inputs and outputs." if pieces > 1 else "."),
        TraceFallbackWarning,
        stacklevel=3,
    )
    return tg


def _try_eager(model: torch.nn.Module, args: tuple, kwargs: dict) -> TracedGraph | None:
    try:
        with tracing_friendly(model):
            return _trace_eagerly(model, args, kwargs)
    except Exception:  # noqa: BLE001 - the caller falls back to dynamo, whose failure and the export's are reported
        return None


def _parameters_read(tg: TracedGraph) -> set[str]:
    """FQNs of the parameters some op of ``tg`` reads (tied names included)."""
    read = set()
    for n in tg.graph.nodes:
        info = tg.info(n)
        if n.users and info is not None and info.kind == "parameter" and info.target:
            read.add(info.target)
    return read | {name for names in tg.tied if read & set(names) for name in names}
