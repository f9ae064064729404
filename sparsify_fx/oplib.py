"""The contract of every ``sparsify::`` custom op (schema, fake kernel, autograd, autocast), in one table.

Reference ops (:mod:`sparsify_fx.ops`, :mod:`sparsify_fx.passes.nm_ops`) register through :func:`define_op`;
kernel twins through :func:`sparsify_fx.codegen.lowering.register_twin`, which copies their reference's contract
from here. This module must not import triton.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch._library.custom_ops import CustomOpDef

from sparsify_fx.errors import ConfigError

__all__ = ["CONTRACTS", "NAMESPACE", "OpContract", "contract_of", "define_op"]

NAMESPACE = "sparsify"


@dataclass(frozen=True)
class OpContract:
    """What every implementation of ``sparsify::<name>`` shares; twins copy all of it from their reference."""

    name: str
    fake: Callable[..., Any]
    backward: Callable[..., Any] | None
    setup_context: Callable[..., Any] | None
    autocast: tuple[str, ...]

    @property
    def overload(self) -> torch._ops.OpOverload:
        return getattr(getattr(torch.ops, NAMESPACE), self.name).default

    @property
    def schema(self) -> str:
        """The schema without the op's name, e.g. ``(Tensor x, Tensor weight) -> Tensor``."""
        text = str(self.overload._schema)
        return text[text.index("("):]


_CONTRACTS: dict[str, OpContract] = {}
CONTRACTS = MappingProxyType(_CONTRACTS)  # op name -> contract, read-only


def define_op(name: str, *, fake: Callable[..., Any], backward: Callable[..., Any] | None = None,
              setup_context: Callable[..., Any] | None = None, autocast: Sequence[str] = ("cpu",),
              schema: str | None = None) -> Callable[[Callable[..., Any]], CustomOpDef]:
    """Decorator: register ``sparsify::<name>`` (functional, no mutated inputs) with its whole contract.

    Args:
        name: op name inside the ``sparsify`` namespace.
        fake: outputs of the right shapes and dtypes from input metadata, after the implementation's checks.
        backward: autograd formula, as for ``torch.library.register_autograd``; ``None`` for backward-only ops.
        setup_context: what the forward saves for ``backward``.
        autocast: device types whose autocast runs the op in bf16, inputs cast together (as for aten.linear);
            devices this build has no autocast for are skipped.
        schema: explicit schema (without the name); default inferred from the function's annotations.

    Example:
        >>> @define_op("twice_example", fake=lambda x: torch.empty_like(x))
        ... def twice(x: torch.Tensor) -> torch.Tensor:
        ...     return 2 * x
        >>> torch.ops.sparsify.twice_example(torch.ones(2)).tolist()
        [2.0, 2.0]
    """
    if name in _CONTRACTS:
        raise ConfigError(f"sparsify::{name} is already registered; give the new op another name.")

    def register(impl: Callable[..., Any]) -> CustomOpDef:
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=(), schema=schema)
        op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
        for device in autocast:
            if torch.amp.is_autocast_available(device):
                op.register_autocast(device, torch.bfloat16)
        _CONTRACTS[name] = OpContract(name, fake, backward, setup_context, tuple(autocast))
        return op

    return register


def contract_of(op: object) -> OpContract:
    """The contract of a ``sparsify::`` op given as a CustomOpDef, ``torch.ops`` packet or overload, or a name.

    Args:
        op: e.g. ``torch.ops.sparsify.nm_linear``, ``torch.ops.sparsify.nm_linear.default`` or ``"nm_linear"``.

    Example:
        >>> import sparsify_fx.passes.nm_ops
        >>> contract_of(torch.ops.sparsify.nm_linear).schema.startswith("(Tensor x")
        True
    """
    if isinstance(op, str):
        qualname = op if "::" in op else f"{NAMESPACE}::{op}"
    else:
        overload = getattr(op, "_opoverload", None) or getattr(op, "default", op)
        qualname = getattr(getattr(overload, "_schema", None), "name", repr(op))
    namespace, _, name = qualname.partition("::")
    if namespace != NAMESPACE or name not in _CONTRACTS:
        raise ConfigError(
            f"{qualname} is not a sparsify op defined with sparsify_fx.oplib.define_op; import the module that "
            f"defines it first (sparsify_fx.ops, sparsify_fx.passes.nm_ops), or define it with define_op."
        )
    return _CONTRACTS[name]
