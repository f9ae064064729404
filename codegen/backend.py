"""The ``"sparsify"`` torch.compile backend: Inductor plus sparsity-aware graph rewrites and kernels.

``torch.compile(model, backend="sparsify", options={...})`` (the name comes from the package's
``torch_dynamo_backends`` entry point, so no import of sparsify_fx is needed first).

How it hooks in: we call Inductor's own ``compile_fx`` and plug into two of its official hooks rather
than driving ``aot_module_simplified`` ourselves. That way users keep everything Inductor does (its
decompositions, joint-graph passes, min-cut partitioner, post-grad passes, caches, cudagraphs,
dynamic shapes, ``mode=``) and we only add:

* ``config.custom_partitioner_fn``: runs Inductor's min-cut partitioner, then our generic rewrites
  (:mod:`sparsify_fx.codegen.rewrites`) on the forward and backward graphs *together* — saved
  activations are decided there, so this is the one place where both sides can be changed consistently.
* ``inner_compile``: sees each forward/backward/inference graph before Inductor lowers it; swaps
  ``sparsify::*`` nodes for the kernel family's registered lowering (:mod:`sparsify_fx.codegen.lowering`)
  and captures Inductor's output code for dumps.

Anything we cannot handle falls back to plain Inductor for that graph with a logged reason
(``logging.getLogger("sparsify_fx")``); ``options={"fallback": False}`` raises instead.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib
import inspect
import itertools
import logging
import os
import pkgutil
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch._inductor.custom_graph_pass import CustomPartitionerFn

from sparsify_fx.codegen import rewrites as _rw
from sparsify_fx.codegen.dump import Dumper, graph_text
from sparsify_fx.codegen.inline import inline_traceable_custom_ops
from sparsify_fx.codegen.lowering import lowering_for, registered
from sparsify_fx.errors import ConfigError
from sparsify_fx.frontend.graph import InputInfo, TracedGraph

log = logging.getLogger("sparsify_fx")

__all__ = ["BackendOptions", "GraphRecord", "sparsify_backend", "KERNEL_FAMILIES", "REWRITES"]

KERNEL_FAMILIES = ("auto", "aten", "triton")
REWRITES: dict[str, _rw.Pass] = dict(_rw.DEFAULT_PASSES)
_ENV_DUMP = "SPARSIFY_FX_DUMP"


# ---------------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class BackendOptions:
    """Options of ``backend="sparsify"`` (pass them as ``torch.compile(..., options={...})``).

    kernels: ``"auto"`` (Triton on GPU when available, ATen otherwise), ``"aten"`` (Inductor handles our custom
        ops as extern calls) or ``"triton"`` (swap them for their registered Triton lowerings).
    dump: directory for per-graph dumps (graphs before/after each pass, generated code); the environment
        variable ``SPARSIFY_FX_DUMP`` sets it too.
    rewrites: ``True`` (all generic passes), ``False`` (none), a list of pass names to run, or
        ``{name: bool}`` to switch single passes off.
    fallback: on an internal failure, compile the graph with plain Inductor (logged) instead of raising.
    inline_ops: with ATen kernels, replace ``sparsify::*`` op calls whose implementation traces to ATen by that
        trace, so Inductor sees (and fuses) the math instead of an opaque extern call.
    """

    kernels: str = "auto"
    dump: str | None = None
    rewrites: tuple[str, ...] = tuple(REWRITES)
    fallback: bool = True
    inline_ops: bool = True

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> BackendOptions:
        options = dict(options or {})
        valid = ("kernels", "dump", "rewrites", "fallback", "inline_ops")
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ConfigError(
                f"backend='sparsify': unknown option(s) {unknown}; valid keys are {list(valid)}. "
                f"Inductor settings go through torch._inductor.config.patch(...) around the call."
            )
        kernels = options.get("kernels", "auto")
        if kernels not in KERNEL_FAMILIES:
            raise ConfigError(f"backend='sparsify': kernels={kernels!r}; choose one of {list(KERNEL_FAMILIES)}.")
        dump = options.get("dump", os.environ.get(_ENV_DUMP) or None)
        if dump is not None and not isinstance(dump, str | os.PathLike):
            raise ConfigError(f"backend='sparsify': dump must be a directory path, got {type(dump).__name__}.")
        rewrites = _parse_rewrites(options.get("rewrites", True))
        fallback = options.get("fallback", True)
        if not isinstance(fallback, bool):
            raise ConfigError(f"backend='sparsify': fallback must be True or False, got {fallback!r}.")
        inline_ops = options.get("inline_ops", True)
        if not isinstance(inline_ops, bool):
            raise ConfigError(f"backend='sparsify': inline_ops must be True or False, got {inline_ops!r}.")
        return cls(kernels=kernels, dump=None if dump is None else os.fspath(dump), rewrites=rewrites,
                   fallback=fallback, inline_ops=inline_ops)


def _parse_rewrites(value: object) -> tuple[str, ...]:
    names = list(REWRITES)
    if value is True:
        return tuple(names)
    if value is False or value is None:
        return ()
    if isinstance(value, dict):
        bad = sorted(set(value) - set(names))
        chosen = [n for n in names if value.get(n, True)]
    elif isinstance(value, list | tuple | set | frozenset):
        bad = sorted(set(value) - set(names))
        chosen = [n for n in names if n in value]  # always in the pipeline's order
    else:
        raise ConfigError(
            f"backend='sparsify': rewrites must be a bool, a list of pass names or a dict, got {value!r}."
        )
    if bad:
        raise ConfigError(f"backend='sparsify': unknown rewrite(s) {bad}; available: {names}.")
    return tuple(chosen)


# ---------------------------------------------------------------------------------------------------- records


@dataclass
class GraphRecord:
    """What the backend did with one dynamo graph (what :func:`sparsify_fx.explain` reports)."""

    id: int
    kernels: str = "aten"
    inputs: list[str] = field(default_factory=list)  # "parameter fqn (trainable|frozen)" / "input i"
    passes: list[_rw.PassResult] = field(default_factory=list)
    swaps: list[str] = field(default_factory=list)
    inlined: list[str] = field(default_factory=list)  # custom ops traced into ATen (kernels="aten"), or why not
    fallbacks: list[str] = field(default_factory=list)
    graphs: dict[str, str] = field(default_factory=dict)  # "dynamo", "forward.partitioned", ... -> text
    saved_bytes_before: int | None = None
    saved_bytes_after: int | None = None
    inductor: bool = True
    keep_text: bool = False  # fill ``graphs`` (dumps and explain only: printing large graphs is slow)

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "kernels": self.kernels,
            "inputs": self.inputs,
            "passes": [{"name": p.name, "changed": p.changed, "notes": p.notes} for p in self.passes],
            "swaps": self.swaps,
            "inlined": self.inlined,
            "fallbacks": self.fallbacks,
            "saved_bytes_before": self.saved_bytes_before,
            "saved_bytes_after": self.saved_bytes_after,
        }


_IDS = itertools.count()
_recorders: list[list[GraphRecord]] = []
_recorder_lock = threading.Lock()


@contextlib.contextmanager
def recording() -> Iterator[list[GraphRecord]]:
    """Collect a :class:`GraphRecord` for every graph the backend compiles inside the block."""
    records: list[GraphRecord] = []
    with _recorder_lock:
        _recorders.append(records)
    try:
        yield records
    finally:
        with _recorder_lock:
            _recorders.remove(records)


def _fallback(rec: GraphRecord, opts: BackendOptions, what: str, err: BaseException) -> None:
    reason = f"{what}: {type(err).__name__}: {err}"
    if not opts.fallback:
        raise err
    rec.fallbacks.append(reason)
    log.warning("sparsify: graph %d: %s; using plain Inductor for it", rec.id, reason)
    log.debug("%s", "".join(traceback.format_exception(err)))


# ---------------------------------------------------------------------------------------------------- kernels


def _load_kernel_modules() -> list[str]:
    """Import every ``sparsify_fx.codegen.kernels`` module so their lowerings are registered; returns failures."""
    import sparsify_fx.codegen.kernels as pkg

    failures = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("test_") or info.name.startswith("_"):
            continue
        try:
            importlib.import_module(f"{pkg.__name__}.{info.name}")
        except Exception as e:  # noqa: BLE001 - a broken kernel module only disables its lowering
            failures.append(f"{info.name}: {type(e).__name__}: {e}")
    return failures


def _devices(example_inputs: Sequence[object]) -> set[str]:
    return {t.device.type for t in example_inputs if isinstance(t, torch.Tensor)}


def _triton_unusable(devices: set[str]) -> str | None:
    """Why Triton kernels cannot run on these devices, or None."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed (pip install triton)"
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if devices - {"cuda"} and not interpreting:
        return (f"Triton kernels need a GPU; inputs are on {sorted(devices)} (set TRITON_INTERPRET=1 before "
                f"importing triton to run them in the CPU interpreter)")
    return None


def _resolve_family(opts: BackendOptions, example_inputs: Sequence[object], rec: GraphRecord) -> str:
    devices = _devices(example_inputs)
    if opts.kernels == "aten" or (opts.kernels == "auto" and devices != {"cuda"}):
        return "aten"
    failures = _load_kernel_modules()
    for f in failures:
        log.info("sparsify: kernel module not loaded: %s", f)
    reason = _triton_unusable(devices)
    if reason is None:
        return "triton"
    if opts.kernels == "triton":
        rec.fallbacks.append(f"kernels='triton' not possible: {reason}; using ATen kernels")
        log.warning("sparsify: graph %d: kernels='triton' not possible: %s; using ATen kernels", rec.id, reason)
    return "aten"


def _schema_key(op: torch._ops.OpOverload) -> tuple:
    s = op._schema
    return (tuple((a.name, str(a.type)) for a in s.arguments), tuple(str(r.type) for r in s.returns))


def swap_kernels(gm: torch.fx.GraphModule, family: str) -> list[str]:
    """Retarget every node whose op has a lowering registered for ``family`` (same schema required)."""
    swaps = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or not isinstance(n.target, torch._ops.OpOverload):
            continue
        impl = lowering_for(n.target, family)
        if impl is None or impl is n.target:
            continue
        if _schema_key(impl) != _schema_key(n.target):
            log.warning("sparsify: lowering %s of %s has a different schema; kept the original", impl, n.target)
            continue
        swaps.append(f"{n.name}: {n.target} -> {impl}")
        n.target = impl
    if swaps:
        gm.graph.lint()
        gm.recompile()
    return swaps


def _kernel_source(op: object) -> tuple[str, str] | None:
    """(file name, source) of the module that defines a custom op, for dumps."""
    try:
        from torch._library.custom_ops import OPDEFS

        opdef = OPDEFS.get(f"{op.namespace}::{op._opname}")  # type: ignore[attr-defined]
        fn = getattr(opdef, "_init_fn", None)
        # a twin's implementation wraps the kernel module's launch (lowering.register_twin): show the kernel's file
        path = inspect.getsourcefile(inspect.unwrap(fn)) if fn is not None else None
        if path:
            return Path(path).name, Path(path).read_text()
    except Exception:  # noqa: BLE001 - dumping is best effort
        return None
    return None


# ---------------------------------------------------------------------------------------------------- compile


class SparsifyPartitioner(CustomPartitionerFn):
    """Inductor's min-cut partitioner followed by our rewrites on the forward/backward pair."""

    def __init__(self, opts: BackendOptions, rec: GraphRecord, infos: list[InputInfo],
                 requires_grad: list[bool], dumper: Dumper | None, fresh: bool) -> None:
        self.opts, self.rec, self.infos, self.dumper, self.fresh = opts, rec, infos, dumper, fresh
        self.requires_grad = requires_grad

    def __getstate__(self) -> dict:
        # Inductor pickles its config into cache keys: only our identity matters there
        return {"uuid": self.uuid()}

    def __call__(self, gm: torch.fx.GraphModule, joint_inputs: Sequence[object], **kwargs: Any):
        from functorch.compile import min_cut_rematerialization_partition

        kwargs.setdefault("compiler", "inductor")
        fw, bw = min_cut_rematerialization_partition(gm, joint_inputs, **kwargs)
        num_fwd = kwargs.get("num_fwd_outputs")
        n_placeholders = sum(1 for n in fw.graph.nodes if n.op == "placeholder")
        # the joint graph's fake primals do not carry requires_grad: take it from dynamo's inputs, and only
        # when they line up one to one with the forward's placeholders
        requires_grad = self.requires_grad if len(self.requires_grad) == n_placeholders else []
        self.rec.inputs = [
            _input_label(self.infos[i] if i < len(self.infos) else InputInfo("input"), i, rg)
            for i, rg in enumerate(requires_grad)
        ]
        if num_fwd is None:
            return fw, bw
        passes = [(name, REWRITES[name]) for name in self.opts.rewrites]
        try:
            fw2, bw2 = _copy_module(fw), _copy_module(bw)
            traced = TracedGraph.from_aot(fw2, self.infos, num_user_outputs=num_fwd)
            placeholders = [n for n in fw2.graph.nodes if n.op == "placeholder"]
            infos = [traced.inputs.get(p.name, InputInfo("input")) for p in placeholders]
            pair = _rw.PartitionedGraphs(fw2, bw2, num_fwd, infos, requires_grad)
            self.rec.saved_bytes_before = _rw.saved_bytes(pair)

            def on_step(stage: str, result: _rw.PassResult | None) -> None:
                changed = result is None or result.changed
                if changed and self.rec.keep_text:
                    self.rec.graphs[f"forward.{stage}"] = graph_text(pair.fw)
                    self.rec.graphs[f"backward.{stage}"] = graph_text(pair.bw)
                if self.dumper is not None:
                    self.dumper.graph("forward", stage, pair.fw, changed=changed)
                    self.dumper.graph("backward", stage, pair.bw, changed=changed)

            self.rec.passes = _rw.run_passes(pair, passes, on_step)
            self.rec.saved_bytes_after = _rw.saved_bytes(pair)
            for r in self.rec.passes:
                if r.changed:
                    log.info("sparsify: graph %d: %s", self.rec.id, r)
            return pair.fw, pair.bw
        except Exception as e:  # noqa: BLE001 - a failing rewrite must not fail the user's compile
            _fallback(self.rec, self.opts, "rewrites failed, graph left as partitioned", e)
            return fw, bw

    def uuid(self) -> str | None:
        # Inductor's caches key on this: our sources + options, or a fresh value when the caller wants to see
        # the passes run (dumps, explain) — a cache hit would skip them.
        h = hashlib.sha256()
        from sparsify_fx.codegen import inline

        for path in (_rw.__file__, inline.__file__, __file__):
            h.update(Path(path).read_bytes())
        passes = [f"{n}={getattr(REWRITES[n], '__qualname__', REWRITES[n])}" for n in self.opts.rewrites]
        h.update(repr((passes, self.opts.inline_ops, self.rec.kernels)).encode())
        if self.fresh:
            h.update(f"{os.getpid()}-{self.rec.id}-{id(self)}".encode())
        return h.hexdigest()


def _copy_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A new GraphModule with a copy of the graph and the same attributes (tensors are shared, not copied:
    a deepcopy would copy weights, and fails on the fake tensors some graphs hold)."""
    new = torch.fx.GraphModule(gm, _copy_graph(gm.graph))
    new.meta.update(gm.meta)
    return new


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    # node metadata (fake values) is shared, not copied: the passes replace it, never mutate it
    return copy.deepcopy(graph)


def _input_label(info: InputInfo, i: int, requires_grad: bool) -> str:
    state = "trainable" if requires_grad else "frozen"
    if info.kind in ("parameter", "buffer") and info.target:
        return f"{info.kind} {info.target} ({state})"
    return f"{info.kind} {i} ({state})"


def _role(kwargs: dict) -> str:
    if kwargs.get("is_backward"):
        return "backward"
    return "inference" if kwargs.get("is_inference") else "forward"


def _make_inner(opts: BackendOptions, rec: GraphRecord, family: str, dumper: Dumper | None,
                lower: Callable | None = None) -> Callable:
    """Per-graph compiler: swap kernels, then lower with Inductor (``lower=None``) or ``lower(gm, inputs)``."""
    if lower is None:
        from torch._inductor.compile_fx import compile_fx_inner as lower_with_inductor
    else:
        lower_with_inductor = None

    inline_cache: dict = {}  # traces of custom ops, shared by this compile's forward and backward

    def inner(gm: torch.fx.GraphModule, example_inputs: Sequence[object], role: str | None = None,
              **kwargs: Any):
        role = role or _role(kwargs)
        ours = any(isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == "sparsify"
                   for n in gm.graph.nodes if n.op == "call_function")
        # only graphs we may edit here (kernel swaps, inlining) need a copy to fall back to
        original = _copy_module(gm) if ours and opts.fallback and lower_with_inductor is not None else None
        if registered(family):  # the registry decides; "aten" has no entries unless a module adds some
            try:
                before = graph_text(gm) if dumper is not None else ""
                swaps = swap_kernels(gm, family)
                rec.swaps += [f"{role} {s}" for s in swaps]
                if swaps and rec.keep_text:
                    rec.graphs[f"{role}.{family}_kernels"] = graph_text(gm)
                if swaps and dumper is not None:
                    dumper.graph(f"{role}_kernels", "before", _text_module(before), changed=True)
                    dumper.graph(f"{role}_kernels", f"{family}_kernels", gm, changed=True)
                    for impl in {n.target for n in gm.graph.nodes if n.op == "call_function"}:
                        src = _kernel_source(impl) if str(impl).startswith("sparsify.") else None
                        if src is not None:
                            dumper.write(f"kernels/{src[0]}", src[1])
            except Exception as e:  # noqa: BLE001
                _fallback(rec, opts, f"{role}: kernel swap failed", e)
        if family == "aten" and opts.inline_ops:
            try:
                before = graph_text(gm) if dumper is not None else ""
                notes = inline_traceable_custom_ops(gm, cache=inline_cache)
                rec.inlined += [f"{role} {n}" for n in notes]
                if dumper is not None and any(" inlined " in n for n in notes):
                    dumper.graph(f"{role}_kernels", "before", _text_module(before), changed=True)
                    dumper.graph(f"{role}_kernels", "inlined_ops", gm, changed=True)
            except Exception as e:  # noqa: BLE001
                _fallback(rec, opts, f"{role}: inlining custom ops failed", e)
        if role == "inference" and rec.keep_text:
            rec.graphs.setdefault("inference", graph_text(gm))
        if lower_with_inductor is not None:
            try:
                out = lower_with_inductor(gm, example_inputs, **kwargs)
            except Exception as e:  # noqa: BLE001
                if original is None or graph_text_equal(original, gm):
                    raise  # nothing of ours in this graph: Inductor's own error
                _fallback(rec, opts, f"{role}: Inductor failed on the graph with swapped/inlined ops", e)
                out = lower_with_inductor(original, example_inputs, **kwargs)
        else:
            out = lower(gm, example_inputs)
        if dumper is not None:
            code = getattr(out, "source_code", None)
            if code:
                dumper.write(f"{role}.inductor.py", code)
            dumper.update_index(rec.to_json())
        return out

    return inner


def graph_text_equal(a: torch.fx.GraphModule, b: torch.fx.GraphModule) -> bool:
    return a.code == b.code


class _text_module:  # noqa: N801 - quacks like a GraphModule for Dumper.graph
    def __init__(self, text: str) -> None:
        self.text = text

    def print_readable(self, print_output: bool = False) -> str:
        return self.text


def sparsify_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[object],
                     options: dict[str, Any] | None = None, mode: str | None = None, **kwargs: Any):
    """Dynamo backend: compile ``gm`` with Inductor plus sparsify_fx's rewrites and kernels.

    Registered as ``backend="sparsify"``; ``options`` are :class:`BackendOptions` fields, ``mode`` is
    Inductor's (``"max-autotune"`` etc.).
    """
    if kwargs:
        raise ConfigError(f"backend='sparsify': unexpected argument(s) {sorted(kwargs)}; use options={{...}}.")
    return _compile(gm, example_inputs, BackendOptions.from_options(options), mode=mode, lower=True)


def _compile(gm: torch.fx.GraphModule, example_inputs: Sequence[object], opts: BackendOptions, *,
             mode: str | None = None, lower: bool = True):
    """``lower=False`` runs everything but Inductor (graphs execute as Python): what explain() uses."""
    rec = GraphRecord(next(_IDS), inductor=lower)
    with _recorder_lock:
        recorders = list(_recorders)
    for r in recorders:
        r.append(rec)
    dumper = Dumper(opts.dump, rec.id) if opts.dump else None
    # printing big graphs costs seconds: only when someone will read them (dumps, explain)
    rec.keep_text = dumper is not None or not lower
    if rec.keep_text:
        rec.graphs["dynamo"] = graph_text(gm)
    if dumper is not None:
        dumper.write("dynamo.txt", rec.graphs["dynamo"])

    infos: list[InputInfo] = []
    try:
        infos = list(TracedGraph.from_dynamo(gm).inputs.values())
    except Exception as e:  # noqa: BLE001 - without FQNs the passes still work, only labels are lost
        log.info("sparsify: graph %d: parameter names unavailable: %s", rec.id, e)
    try:
        family = _resolve_family(opts, example_inputs, rec)
    except Exception as e:  # noqa: BLE001
        _fallback(rec, opts, "kernel selection failed", e)
        family = "aten"
    rec.kernels = family
    requires_grad = [bool(getattr(t, "requires_grad", False)) for t in example_inputs]
    partitioner = SparsifyPartitioner(opts, rec, infos, requires_grad, dumper, bool(dumper or recorders))

    if not lower:
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd
        from torch._inductor.decomposition import select_decomp_table

        def run_as_python(g: torch.fx.GraphModule, _inputs: Sequence[object]):
            return make_boxed_func(g.forward)

        inner = _make_inner(opts, rec, family, dumper, lower=run_as_python)
        return aot_autograd(
            fw_compiler=functools.partial(inner, role="forward"),
            bw_compiler=functools.partial(inner, role="backward"),
            inference_compiler=functools.partial(inner, role="inference"),
            partition_fn=partitioner,
            decompositions=select_decomp_table(),
        )(gm, example_inputs)

    from torch._inductor.compile_fx import compile_fx

    patches: dict[str, Any] = {}
    if mode is not None:
        from torch._inductor import list_mode_options

        patches.update(list_mode_options(mode))
    patches["custom_partitioner_fn"] = partitioner
    # compile_fx may mutate the graph it is given: keep the original for a plain-Inductor retry
    pristine = _copy_module(gm) if opts.fallback else None
    try:
        compiled = compile_fx(gm, example_inputs, inner_compile=_make_inner(opts, rec, family, dumper),
                              config_patches=patches)
    except Exception as e:  # noqa: BLE001
        _fallback(rec, opts, "compiling with sparsify's hooks failed", e)
        # the retry is plain Inductor: if it fails too, that error is the user's to see
        compiled = compile_fx(pristine, example_inputs,
                              config_patches={k: v for k, v in patches.items() if k != "custom_partitioner_fn"})
    if dumper is not None:
        dumper.update_index(rec.to_json())
    return compiled
