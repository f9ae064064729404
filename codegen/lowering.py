"""Registry: custom op -> kernel implementation, per kernel family.

Kernel modules register themselves here, each with one :func:`register_twin` call per op; the backend swaps a
graph's custom-op nodes for the registered implementation of the family chosen by ``options={"kernels": ...}``.
One table, no op-specific code in the backend.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable
from typing import Any

import torch
from torch._library.custom_ops import CustomOpDef
from torch.utils import _pytree as pytree

from sparsify_fx.errors import ConfigError, KernelError
from sparsify_fx.oplib import OpContract, contract_of, define_op

# family -> {op overload: replacement op overload (itself a custom op, so it stays one graph node)}
_LOWERINGS: dict[str, dict[torch._ops.OpOverload, torch._ops.OpOverload]] = {"triton": {}, "aten": {}}


def register_lowering(op: torch._ops.OpOverload, family: str, impl: torch._ops.OpOverload) -> None:
    """Say that, under ``kernels=family``, nodes calling ``op`` should call ``impl`` instead."""
    _LOWERINGS.setdefault(family, {})[op] = impl


def lowering_for(op: object, family: str) -> torch._ops.OpOverload | None:
    return _LOWERINGS.get(family, {}).get(op)  # type: ignore[arg-type]


def registered(family: str) -> dict[torch._ops.OpOverload, torch._ops.OpOverload]:
    return dict(_LOWERINGS.get(family, {}))


def import_triton() -> tuple[Any, Any]:
    """``(triton, triton.language)``, or ``(None, None)`` without triton (the kernels' launchers then refuse to run).

    Example:
        >>> triton, tl = import_triton()
    """
    try:
        import triton
        import triton.language as tl
    except ImportError:  # pragma: no cover - exercised only where triton is absent
        return None, None
    return triton, tl


def require_triton(kernel: str, has_triton: bool, device: torch.device) -> None:
    """Raise :class:`ConfigError`, naming the fix, when ``kernel`` cannot launch on ``device``.

    Args:
        kernel: the launcher's name, for the message.
        has_triton: whether the kernel module imported triton.
        device: where the kernel's tensors live; CPU needs the Triton interpreter.

    Example:
        >>> require_triton("my_kernel", True, torch.device("cuda"))  # fine: nothing raised
    """
    if not has_triton:
        raise ConfigError(f"{kernel} needs triton; install sparsify-fx[triton] or use kernels='aten'.")
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise ConfigError(
            f"{kernel} got CPU tensors but triton is not in interpreter mode; set TRITON_INTERPRET=1 before "
            f"importing triton, move the tensors to a GPU, or use kernels='aten'."
        )


# Input signatures (shapes, dtypes, other arguments) a twin checks; later ones run unchecked, so varying sequence
# lengths stop costing anything after warm-up.
_MAX_CHECKED_SIGNATURES = 256


def register_twin(reference: object, name: str, impl: Callable[..., Any], *, family: str = "triton",
                  lower: bool = True) -> CustomOpDef:
    """Register ``sparsify::<name>``, computed by ``impl``, with ``reference``'s schema, fake kernel, autograd and
    autocast, and lower ``reference`` to it. The first call per input signature checks ``impl``'s outputs against the
    fake kernel: :class:`~sparsify_fx.errors.KernelError` on any shape or dtype difference.

    Args:
        reference: the reference op, e.g. ``torch.ops.sparsify.nm_linear`` (packet, overload or ``CustomOpDef``).
        name: the twin's name in the ``sparsify`` namespace.
        impl: the kernel launch, with the reference's arguments and outputs.
        family: the kernel family (``options={"kernels": family}``) whose nodes call the twin instead.
        lower: whether to register that lowering (kernel modules pass ``HAS_TRITON``).

    Example:
        >>> import sparsify_fx.passes.nm_ops
        >>> def eager(x, weight, mask, bias, n, m, pruned_grad_scale=0.0):
        ...     return torch.nn.functional.linear(x, weight * mask, bias)
        >>> twin = register_twin(torch.ops.sparsify.nm_linear, "nm_linear_doc_example", eager, lower=False)
        >>> twin(torch.ones(2, 4), torch.ones(3, 4), torch.ones(3, 4), None, 2, 4).shape
        torch.Size([2, 3])
    """
    contract = contract_of(reference)
    want = [a.name for a in contract.overload._schema.arguments]
    got = list(inspect.signature(impl).parameters)
    if got != want:
        raise KernelError(
            f"register_twin: {getattr(impl, '__name__', impl)} takes ({', '.join(got)}) but sparsify::{contract.name} "
            f"has ({', '.join(want)}); a twin takes its reference's arguments, same names, same order."
        )
    twin = define_op(name, fake=contract.fake, backward=contract.backward, setup_context=contract.setup_context,
                     autocast=contract.autocast, schema=contract.schema)(_checked(contract, name, impl))
    if lower:
        register_lowering(contract.overload, family, contract_of(name).overload)
    return twin


def _checked(contract: OpContract, name: str, impl: Callable[..., Any]) -> Callable[..., Any]:
    seen: set[tuple] = set()

    @functools.wraps(impl)  # backend dumps find the kernel's own source through __wrapped__
    def checked(*args: Any, **kwargs: Any) -> Any:
        out = impl(*args, **kwargs)
        if len(seen) < _MAX_CHECKED_SIGNATURES:
            key = _signature((args, tuple(kwargs.items())))
            if key not in seen:
                _verify(contract, name, impl, args, kwargs, out)
                seen.add(key)
        return out

    return checked


def _signature(v: Any) -> Any:
    # hand-rolled, not pytree: this runs on every call of a kernel and costs ~2 us this way, ~10 us through pytree
    if isinstance(v, torch.Tensor):
        return v.shape, v.dtype
    if isinstance(v, list | tuple):
        return tuple(_signature(u) for u in v)
    return v


def _verify(contract: OpContract, name: str, impl: Callable[..., Any], args: tuple, kwargs: dict, out: Any) -> None:
    outs = pytree.tree_leaves(out)
    if not all(type(t) is torch.Tensor for t in outs):
        return  # under a fake or tracing mode the fake kernel itself is what runs: nothing to compare
    meta = pytree.tree_map_only(
        torch.Tensor, lambda t: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta"), (args, kwargs)
    )
    got, promised = ([f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}" for t in ts]
                     for ts in (outs, pytree.tree_leaves(contract.fake(*meta[0], **meta[1]))))
    if got != promised:
        raise KernelError(
            f"sparsify::{name} returned {got} but sparsify::{contract.name}'s fake kernel promises {promised} for "
            f"the same inputs; a twin must return what its reference returns: fix "
            f"{getattr(impl, '__name__', 'the kernel')}'s output allocation."
        )
