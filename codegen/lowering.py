"""Registry: custom op -> kernel implementation, per kernel family.

Kernel modules register themselves here; the backend swaps a graph's custom-op nodes for the
registered implementation of the family chosen by ``options={"kernels": ...}``. One table, no
op-specific code in the backend.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# family -> {op overload: replacement op overload (itself a custom op, so it stays one graph node)}
_LOWERINGS: dict[str, dict[torch._ops.OpOverload, torch._ops.OpOverload]] = {"triton": {}, "aten": {}}


def register_lowering(op: torch._ops.OpOverload, family: str, impl: torch._ops.OpOverload) -> None:
    """Say that, under ``kernels=family``, nodes calling ``op`` should call ``impl`` instead."""
    _LOWERINGS.setdefault(family, {})[op] = impl


def lowering_for(op: object, family: str) -> torch._ops.OpOverload | None:
    return _LOWERINGS.get(family, {}).get(op)  # type: ignore[arg-type]


def registered(family: str) -> dict[torch._ops.OpOverload, torch._ops.OpOverload]:
    return dict(_LOWERINGS.get(family, {}))


def lowering(op: torch._ops.OpOverload, family: str) -> Callable[[torch._ops.OpOverload], torch._ops.OpOverload]:
    def deco(impl: torch._ops.OpOverload) -> torch._ops.OpOverload:
        register_lowering(op, family, impl)
        return impl

    return deco
