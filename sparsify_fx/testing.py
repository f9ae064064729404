"""Test kit for backend developers: check a model transform, a graph pass or a kernel against a reference.

* :func:`assert_equivalent` — two models compute the same outputs and the same parameter/input gradients.
* :func:`check_pass` — a graph pass keeps the function (and its gradients) of a real traced model.
* :func:`check_kernel` — a kernel matches its reference on random inputs, per dtype (Triton interpreter on CPU).
* :func:`model_snapshot` / :func:`assert_unchanged` / :func:`fail_at_write` / :func:`count_writes` — a pass is a
  transaction: fail it at each of its writes and check the model is bit-identical afterwards.

See ``docs/testing_kit.md`` for a worked example of testing a new pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils import _pytree as pytree

__all__ = [
    "DEFAULT_TOLERANCES",
    "Equivalence",
    "PassCheck",
    "ModelSnapshot",
    "assert_equivalent",
    "assert_unchanged",
    "check_kernel",
    "check_pass",
    "count_writes",
    "fail_at_write",
    "model_snapshot",
]

# (rtol, atol) per dtype; atol is scaled by the reference's largest magnitude (at least 1)
DEFAULT_TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (5e-3, 5e-3),
}


# ---------------------------------------------------------------------------------------------------- equivalence


@dataclass
class Equivalence:
    """Largest absolute error seen per compared quantity (``"output[0]"``, ``"grad layers.0.weight"``...)."""

    errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)


def _as_call(inputs: Any) -> tuple[tuple, dict]:
    if isinstance(inputs, dict):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


def _fresh_inputs(args: tuple, kwargs: dict) -> tuple[tuple, dict, list[torch.Tensor]]:
    """Copies of the inputs; floating tensors that require grad become new leaves whose grads we compare."""
    leaves: list[torch.Tensor] = []

    def copy(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        c = t.detach().clone()
        for attr in ("_dynamo_dynamic_indices", "_dynamo_weak_dynamic_indices"):
            if hasattr(t, attr):  # keep torch._dynamo.mark_dynamic marks, so copies compile like the original
                setattr(c, attr, set(getattr(t, attr)))
        if t.requires_grad:
            c.requires_grad_(True)
            leaves.append(c)
        return c

    args2, kwargs2 = pytree.tree_map(copy, (args, kwargs))
    return args2, kwargs2, leaves


def _param_name(name: str) -> str:
    # torch.compile wraps the module: its parameters are seen under _orig_mod.
    return name.replace("_orig_mod.", "")


def _run(model: Callable, args: tuple, kwargs: dict, grads: bool, seed: int):
    args, kwargs, input_leaves = _fresh_inputs(args, kwargs)
    with torch.enable_grad() if grads else torch.no_grad():
        out = model(*args, **kwargs)
    leaves = [x for x in pytree.tree_leaves(out)]
    result: dict[str, Any] = {f"output[{i}]": x for i, x in enumerate(leaves)}
    if not grads:
        return result
    params = {}
    if isinstance(model, nn.Module):
        params = {_param_name(n): p for n, p in model.named_parameters() if p.requires_grad}
    diff = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad and x.is_floating_point()]
    if not diff:
        return result
    # a fixed random projection of every output, so each output element contributes to the gradients
    g = torch.Generator().manual_seed(seed)
    loss = sum(
        (x.float() * torch.randn(x.shape, generator=g).to(x.device)).sum() if x.dim() else x.float()
        for x in diff
    )
    wrt = list(params.values()) + input_leaves
    gs = torch.autograd.grad(loss, wrt, allow_unused=True)
    for name, gr in zip(params, gs[:len(params)]):
        result[f"grad {name}"] = gr
    for i, gr in enumerate(gs[len(params):]):
        result[f"grad input[{i}]"] = gr
    return result


def _compare(name: str, a: Any, b: Any, rtol: float | None, atol: float | None, report: Equivalence) -> None:
    if a is None or b is None:
        if (a is None) != (b is None):
            raise AssertionError(f"{name}: one model gives None, the other {type(a if b is None else b).__name__}")
        return
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        if isinstance(a, int | float | bool | str | torch.Tensor) or isinstance(b, int | float | bool | str):
            if a != b:
                raise AssertionError(f"{name}: {a!r} != {b!r}")
        elif type(a) is not type(b):  # opaque objects (an HF cache, say): same kind is all we can ask
            raise AssertionError(f"{name}: {type(a).__name__} vs {type(b).__name__}")
        return
    if a.shape != b.shape:
        raise AssertionError(f"{name}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    if not a.is_floating_point():
        if not torch.equal(a.cpu(), b.cpu()):
            raise AssertionError(f"{name}: integer tensors differ")
        report.errors[name] = 0.0
        return
    a32, b32 = a.detach().float().cpu(), b.detach().float().cpu()
    d_rtol, d_atol = DEFAULT_TOLERANCES.get(a.dtype, (1e-4, 1e-5))
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    scale = max(1.0, a32.abs().max().item() if a32.numel() else 1.0)
    err = (a32 - b32).abs()
    report.errors[name] = err.max().item() if err.numel() else 0.0
    torch.testing.assert_close(b32, a32, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


def assert_equivalent(model_a: Callable, model_b: Callable, inputs: Any, rtol: float | None = None,
                      atol: float | None = None, *, grads: bool = True, seed: int = 0) -> Equivalence:
    """Assert that ``model_a`` and ``model_b`` give the same outputs and gradients on ``inputs``.

    ``inputs`` is a tuple of positional arguments, a dict of keyword arguments or a single tensor. Outputs are
    compared leaf by leaf (any pytree: tuples, dicts, HF ``ModelOutput``). Gradients are taken of a fixed
    random projection of all floating outputs, for every trainable parameter (matched by name, so a
    ``torch.compile`` wrapper or a transformed copy can be compared with the original) and for every input
    that requires grad. No ``.grad`` is touched. ``atol`` is scaled by the reference's largest magnitude;
    defaults per dtype are in :data:`DEFAULT_TOLERANCES`. Returns the errors seen.
    """
    args, kwargs = _as_call(inputs)
    ra = _run(model_a, args, kwargs, grads, seed)
    rb = _run(model_b, args, kwargs, grads, seed)
    if set(ra) != set(rb):
        only_a, only_b = sorted(set(ra) - set(rb)), sorted(set(rb) - set(ra))
        raise AssertionError(
            f"the models differ in outputs or trainable parameters: only in model_a {only_a}, "
            f"only in model_b {only_b}"
        )
    report = Equivalence()
    for name in ra:
        _compare(name, ra[name], rb[name], rtol, atol, report)
    return report


# ---------------------------------------------------------------------------------------------------- passes


@dataclass
class PassCheck:
    """Outcome of :func:`check_pass`: per compiled graph the text before/after and the pass's own result."""

    before: list[dict[str, str]] = field(default_factory=list)
    after: list[dict[str, str]] = field(default_factory=list)
    results: list[Any] = field(default_factory=list)
    equivalence: Equivalence | None = None

    @property
    def changed(self) -> bool:
        return any(b != a for b, a in zip(self.before, self.after))


def check_pass(pass_fn: Callable, model_or_gm: Callable, inputs: Any, *, on: str = "pair",
               rtol: float | None = None, atol: float | None = None, expect_change: bool | None = None,
               dynamic: bool | None = False) -> PassCheck:
    """Trace ``model_or_gm`` the way the ``"sparsify"`` backend does (dynamo → AOTAutograd with Inductor's
    decompositions → min-cut partition), apply ``pass_fn``, run the rewritten graphs (as Python, no
    Inductor) and assert they compute what the eager model computes, outputs and gradients.

    ``on`` picks what ``pass_fn`` receives: ``"pair"`` a
    :class:`sparsify_fx.codegen.rewrites.PartitionedGraphs` (edit in place), ``"forward"`` / ``"backward"``
    one ``GraphModule`` (edit in place) or ``"joint"`` the joint graph before partitioning (edit in place or
    return a new one). ``expect_change=True`` also asserts that the pass changed some graph (a pass that
    silently stops matching is a regression too); ``False`` asserts it did not.

    Resets dynamo's caches first, so repeated checks on one model class never hit the recompile limit.
    """
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._dynamo.backends.common import aot_autograd
    from torch._inductor.decomposition import select_decomp_table

    from sparsify_fx.codegen import rewrites as rw
    from sparsify_fx.codegen.dump import graph_text
    from sparsify_fx.frontend.graph import InputInfo, TracedGraph

    if on not in ("pair", "forward", "backward", "joint"):
        raise ValueError(f"check_pass: on={on!r}; choose 'pair', 'forward', 'backward' or 'joint'.")
    check = PassCheck()

    def backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
        infos = list(TracedGraph.from_dynamo(gm).inputs.values())
        requires_grad = [bool(getattr(t, "requires_grad", False)) for t in example_inputs]

        def texts(fw, bw, joint=None) -> dict[str, str]:
            out = {"forward": graph_text(fw), "backward": graph_text(bw)}
            if joint is not None:
                out["joint"] = joint
            return out

        def partition(joint: torch.fx.GraphModule, joint_inputs, **kwargs):
            kwargs.setdefault("compiler", "inductor")
            joint.recompile()  # so before/after texts come from the same code generator
            joint_before = graph_text(joint)
            if on == "joint":
                r = pass_fn(joint)
                if isinstance(r, torch.fx.GraphModule):
                    joint = r
                joint.graph.lint()
                joint.recompile()
                check.results.append(r)
                check.before.append({"joint": joint_before})
                check.after.append({"joint": graph_text(joint)})  # before the partitioner edits it
            fw, bw = min_cut_rematerialization_partition(joint, joint_inputs, **kwargs)
            n_ph = sum(1 for n in fw.graph.nodes if n.op == "placeholder")
            pair = rw.PartitionedGraphs(fw, bw, kwargs["num_fwd_outputs"],
                                        infos if len(infos) == n_ph else [InputInfo("input")] * n_ph,
                                        requires_grad if len(requires_grad) == n_ph else [])
            if on == "joint":
                return fw, bw
            before = texts(fw, bw)
            if on == "pair":
                check.results.append(pass_fn(pair))
            else:
                check.results.append(pass_fn(fw if on == "forward" else bw))
            pair.recompile()
            check.before.append(before)
            check.after.append(texts(pair.fw, pair.bw))
            return pair.fw, pair.bw

        def boxed(gm, _inputs):
            return make_boxed_func(gm.forward)

        return aot_autograd(fw_compiler=boxed, bw_compiler=boxed, partition_fn=partition,
                            decompositions=select_decomp_table())(gm, example_inputs)

    torch._dynamo.reset()
    compiled = torch.compile(model_or_gm, backend=backend, dynamic=dynamic)
    try:
        check.equivalence = assert_equivalent(model_or_gm, compiled, inputs, rtol, atol)
    finally:
        torch._dynamo.reset()
    if not check.before:
        raise AssertionError(
            "check_pass: no graph with a backward was compiled; the model needs a trainable parameter or an input "
            "that requires grad, and no graph break before its first op."
        )
    if expect_change is True and not check.changed:
        raise AssertionError(f"check_pass: {getattr(pass_fn, '__name__', pass_fn)} did not change any graph")
    if expect_change is False and check.changed:
        raise AssertionError(f"check_pass: {getattr(pass_fn, '__name__', pass_fn)} changed a graph")
    return check


# ---------------------------------------------------------------------------------------------------- kernels


def _kernel_device(device: str | torch.device | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    import sys

    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not interpreting:
        from sparsify_fx.errors import ConfigError

        hint = (" (triton is already imported: set it before the first import, e.g. in conftest.py)"
                if "triton" in sys.modules else "")
        raise ConfigError(
            "check_kernel: no GPU and TRITON_INTERPRET is not set; Triton kernels run on CPU only in the "
            f"interpreter: export TRITON_INTERPRET=1{hint}."
        )
    return torch.device("cpu")


def check_kernel(kernel: Callable, reference: Callable, shapes: Sequence[Sequence[Sequence[int]]],
                 dtypes: Sequence[torch.dtype] = (torch.float32,), *,
                 make_inputs: Callable[..., tuple] | None = None, rtol: float | None = None,
                 atol: float | None = None, device: str | torch.device | None = None,
                 seed: int = 0) -> list[tuple[Any, torch.dtype, float]]:
    """Run ``kernel`` and ``reference`` on random inputs for every case in ``shapes`` and dtype in ``dtypes``.

    Each case is a sequence of tensor shapes, one per positional argument; ``make_inputs(case, dtype, device,
    generator)`` may build the arguments instead (for non-tensor arguments or structured inputs). The
    reference runs on float32 copies of floating inputs (so it is the "exact" answer); the kernel's outputs
    are compared to it with per-dtype tolerances (:data:`DEFAULT_TOLERANCES`, ``atol`` scaled by the
    reference's magnitude). Runs on the GPU when there is one, else in the Triton interpreter on CPU
    (``TRITON_INTERPRET=1`` must be set before triton is imported). Returns ``(case, dtype, max_abs_error)``.
    """
    dev = _kernel_device(device)
    results = []
    for ci, case in enumerate(shapes):
        for dtype in dtypes:
            g = torch.Generator().manual_seed(seed + ci)
            if make_inputs is not None:
                args = tuple(make_inputs(case, dtype, dev, g))
            else:
                args = tuple(torch.randn(tuple(s), generator=g).to(dtype=dtype, device=dev) for s in case)
            ref_args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
            got = pytree.tree_leaves(kernel(*args))
            want = pytree.tree_leaves(reference(*ref_args))
            if len(got) != len(want):
                raise AssertionError(f"check_kernel: case {case} {dtype}: {len(got)} outputs, reference {len(want)}")
            d_rtol, d_atol = DEFAULT_TOLERANCES.get(dtype, (1e-4, 1e-5))
            worst = 0.0
            for i, (a, b) in enumerate(zip(got, want)):
                if not isinstance(a, torch.Tensor):
                    continue
                a32, b32 = a.detach().float().cpu(), b.detach().float().cpu()
                if a32.shape != b32.shape:
                    raise AssertionError(f"check_kernel: case {case} {dtype} output {i}: shape {tuple(a32.shape)}, "
                                         f"reference {tuple(b32.shape)}")
                scale = max(1.0, b32.abs().max().item() if b32.numel() else 1.0)
                r = d_rtol if rtol is None else rtol
                t = (d_atol if atol is None else atol) * scale
                where = f"check_kernel: case {case} {dtype} output {i}"
                torch.testing.assert_close(a32, b32, rtol=r, atol=t, msg=lambda m, w=where: f"{w}: {m}")
                if a32.numel():
                    worst = max(worst, (a32 - b32).abs().max().item())
            results.append((case, dtype, worst))
    return results


# ---------------------------------------------------------------------------------------------------- transactions


class InjectedFault(RuntimeError):
    """Raised by :func:`fail_at_write` at the chosen write."""


@dataclass
class ModelSnapshot:
    """Everything a failed pass must leave as it was: tensor values (by identity and by name), module objects and
    types, ``requires_grad``, hooks, modes and the state passes keep on modules."""

    tensors: dict[str, tuple[int, torch.Tensor, tuple[int, ...], bool]]
    modules: dict[str, tuple[int, str, bool, tuple[tuple[str, tuple[int, ...]], ...], tuple[str, ...]]]


def _hook_ids(mod: nn.Module) -> tuple[tuple[str, tuple[int, ...]], ...]:
    from sparsify_fx.passes.surgery import HOOK_TABLES

    return tuple((t, tuple(getattr(mod, t))) for t in HOOK_TABLES if getattr(mod, t, None))


def _state_keys(mod: nn.Module) -> tuple[str, ...]:
    return tuple(sorted(k for k in mod.__dict__ if k.startswith("_sparsify") and mod.__dict__[k] is not None))


def model_snapshot(model: nn.Module) -> ModelSnapshot:
    """Capture ``model`` for :func:`assert_unchanged` (a copy of every parameter and buffer)."""
    tensors = {}
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(
            remove_duplicate=False)):
        tensors[name] = (id(t), t.detach().clone(), tuple(t.stride()), t.requires_grad)
    modules = {
        name: (id(m), type(m).__qualname__, m.training, _hook_ids(m), _state_keys(m))
        for name, m in model.named_modules(remove_duplicate=False)
    }
    return ModelSnapshot(tensors, modules)


def assert_unchanged(model: nn.Module, before: ModelSnapshot) -> None:
    """Assert ``model`` is bit-identical to the snapshot: the same tensor objects with the same values, strides
    and ``requires_grad``, the same module objects, types, modes and hooks."""
    after = model_snapshot(model)
    assert after.modules.keys() == before.modules.keys(), (
        f"module tree changed: {sorted(after.modules.keys() ^ before.modules.keys())[:6]}")
    for name, b in before.modules.items():
        assert after.modules[name] == b, f"module {name!r} changed: {b} -> {after.modules[name]}"
    assert after.tensors.keys() == before.tensors.keys(), (
        f"tensor names changed: {sorted(after.tensors.keys() ^ before.tensors.keys())[:6]}")
    for name, (tid, value, stride, rg) in before.tensors.items():
        tid2, value2, stride2, rg2 = after.tensors[name]
        assert tid2 == tid, f"{name} is another tensor object"
        assert value2.dtype == value.dtype and value2.shape == value.shape, f"{name} changed dtype or shape"
        assert torch.equal(value2, value) or (value.is_floating_point() and torch.equal(
            value2.isnan(), value.isnan()) and torch.equal(value2.nan_to_num(), value.nan_to_num())), (
            f"{name} values changed")
        assert stride2 == stride, f"{name} memory layout changed: {stride} -> {stride2}"
        assert rg2 == rg, f"{name}.requires_grad changed"


@contextmanager
def count_writes() -> Any:
    """Count the journaled writes a block makes: ``with count_writes() as n: prune(...)``; then ``n[0]``."""
    from sparsify_fx.passes.surgery import fault_hook

    box = [0]

    def tick(_what: str) -> None:
        box[0] += 1

    with fault_hook(tick):
        yield box


@contextmanager
def fail_at_write(k: int, exc: type[BaseException] = InjectedFault) -> Any:
    """Raise ``exc`` at the ``k``-th journaled write (0-based) inside the block; the pass must roll back."""
    from sparsify_fx.passes.surgery import fault_hook

    box = [0]

    def tick(what: str) -> None:
        if box[0] == k:
            box[0] += 1
            raise exc(f"injected at write {k} ({what})")
        box[0] += 1

    with fault_hook(tick):
        yield box
