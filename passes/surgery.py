"""Model surgery shared by every pass: tensors by FQN, module swaps that keep what users attached, and one
journal that makes a pass a transaction.

A pass is config → plan → apply. Planning reads the model and may fail freely; applying writes it, and every
write goes through a :class:`Journal`, which records how to undo it *before* making it. A pass runs its apply
phase inside ``with Journal(model) as j:``; any exception, ``KeyboardInterrupt`` included, rolls every recorded
write back in reverse order, so the model is bit-identical to what it was (values, tensor objects, module
objects and types, ``requires_grad``, hooks, train/eval mode, the state the passes keep on it).

Every write also passes one fault point (:func:`_fault_point`), which :mod:`sparsify_fx.testing` uses to fail a
pass at its k-th write and check the rollback, for every k.

Example::

    with Journal(model) as j:
        j.copy_(model.fc.weight, new_values)           # undone on any error below
        j.swap_module(model, "fc", MyLinear(model.fc))  # hooks, mode and user attributes carried over
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn as nn

from sparsify_fx.errors import ConfigError

# Per-module hook tables. The new module shares the old module's dict objects, so a RemovableHandle the user
# holds (it keeps a weak reference to the dict it was registered in) still removes its hook after the swap.
HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
# set with the hook tables by register_full_backward_hook / register_backward_hook
_HOOK_FLAGS = ("_is_full_backward_hook",)


# ---------------------------------------------------------------------- lookups
def unwrap(model: nn.Module) -> nn.Module:
    """The module a pass works on: the original module behind ``torch.compile``'s wrapper.

    ``torch.compile(model)`` returns an ``OptimizedModule`` whose parameters live on ``model``; passes keep
    their state on the inner module so that both the wrapper and the module itself can be merged or exported.
    """
    # _modules, not getattr: nn.Module.__getattr__ raising AttributeError costs microseconds on the switch path
    while type(model).__name__ == "OptimizedModule" and isinstance(model._modules.get("_orig_mod"), nn.Module):
        model = model._modules["_orig_mod"]
    return model


def split_fqn(fqn: str) -> tuple[str, str]:
    """``"a.b.weight"`` → ``("a.b", "weight")``."""
    mod, _, attr = fqn.rpartition(".")
    return mod, attr


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` ("" is the model), through the ``_modules`` dicts (no per-call checks, so
    hot paths such as adapter switching can use it). Raises :class:`ConfigError` naming the missing part."""
    mod = unwrap(model)
    if not name:
        return mod
    for part in name.split("."):
        child = mod._modules.get(part) if isinstance(mod, nn.Module) else None
        if child is None:
            raise ConfigError(f"{name!r} is not a submodule of this model ({part!r} is missing); was the name "
                              "taken from another model?")
        mod = child
    return mod


def get_tensor(model: nn.Module, fqn: str) -> torch.Tensor:
    """The parameter or buffer called ``fqn``. Raises :class:`ConfigError` if there is none."""
    mod_name, attr = split_fqn(fqn)
    try:
        mod = get_module(model, mod_name)
    except ConfigError:
        mod = None
    t = None
    if mod is not None:
        t = mod._parameters.get(attr)
        if t is None:
            t = mod._buffers.get(attr)
        if t is None:
            t = getattr(mod, attr, None)
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{fqn!r} is not a tensor of this model; was the name found on another model?")
    return t


def require_values(model: nn.Module, what: str, why: str) -> None:
    """Raise :class:`ConfigError` if ``model`` has parameters on the meta device (shapes without values).

    Analysis and the S²FT plan work on a meta model; anything that reads weight values does not.
    """
    meta = [n for n, p in unwrap(model).named_parameters() if p.is_meta]
    if meta:
        raise ConfigError(
            f"{what} reads weight values ({why}), but {len(meta)} parameter(s) of this model are on the meta device "
            f"(e.g. {meta[0]}). Materialise and load the weights first: model.to_empty(device='cpu') then "
            "load_state_dict(...) (or from_pretrained)."
        )


def parent_of(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, child = split_fqn(name)
    return get_module(model, parent_name), child


# ---------------------------------------------------------------------- module swap
def carry_over(old: nn.Module, new: nn.Module, attributes: bool = True) -> None:
    """Give ``new`` what users and libraries attached to ``old``: every hook table (shared, so existing handles
    still remove their hooks), the train/eval mode, and (with ``attributes``) public attributes ``new`` does not
    define itself (e.g. a flag a training script set). A pass that swaps its own wrapper back for the module it
    wrapped passes ``attributes=False``: the wrapper's fields are not the user's."""
    for table in HOOK_TABLES:
        if hasattr(old, table):
            object.__setattr__(new, table, getattr(old, table))
    for flag in _HOOK_FLAGS:
        if flag in old.__dict__:
            object.__setattr__(new, flag, old.__dict__[flag])
    new.train(old.training)
    if not attributes:
        return
    for k, v in old.__dict__.items():
        if k.startswith("_") or k == "training" or k in new.__dict__ or hasattr(type(new), k):
            continue
        object.__setattr__(new, k, v)


# ---------------------------------------------------------------------- what a model already carries
class Verb(enum.Enum):
    """The passes that change a model, for the composition table."""

    S2FT = "s2ft"
    PRUNE = "prune"
    SPARSIFY = "sparsify"
    APPLY_ADAPTER = "apply_adapter"
    SERVE = "attach_adapters"


class Mark(enum.Enum):
    """What an earlier pass left on a model that a later one must respect."""

    S2FT = "S²FT-transformed"
    ADAPTER = "an adapter applied"
    MASKED = "N:M/block masks"
    SERVED = "adapters attached for serving"


def marks(model: nn.Module) -> set[Mark]:
    model = unwrap(model)
    out = set()
    if getattr(model, "_sparsify_s2ft", None) is not None:
        out.add(Mark.S2FT)
    adapters = getattr(model, "_sparsify_adapters", None)
    if adapters is not None and adapters[0]:
        out.add(Mark.ADAPTER)
    if any(getattr(type(m), "sparsify_companions", None) for m in model.modules()):
        out.add(Mark.MASKED)
    if model.__dict__.get("_sparsify_serving") is not None:
        out.add(Mark.SERVED)
    return out


# (verb, mark) -> why the verb cannot run on such a model, and the fix. Pairs not listed compose exactly:
# merge() moves masks with the weights, sparsify() leaves S²FT's trained layers dense, and an adapter's
# fingerprint covers the whole base, masks included.
CONFLICTS: dict[tuple[Verb, Mark], str] = {
    (Verb.S2FT, Mark.S2FT): "the model is already S²FT-transformed; merge() it first to transform it again.",
    (Verb.S2FT, Mark.ADAPTER): (
        "an adapter is applied to this model: s2ft would co-permute the weights under it, so remove_adapter() "
        "could no longer restore the base. Call remove_adapter(model) first (or keep the adapted weights for good "
        "with remove_adapter(model, discard=True))."
    ),
    (Verb.S2FT, Mark.MASKED): (
        "the model has N:M/block masks (sparsify): S²FT trains dense blocks, which the masks would cut, and its "
        "analysis does not see through the masked layers. Run s2ft first, then sparsify() the layers it does not "
        "train."
    ),
    (Verb.APPLY_ADAPTER, Mark.S2FT): (
        "apply_adapter needs a plain base model, and this one trains its own S²FT blocks; merge() it first (or "
        "apply the adapter to a fresh copy of the base)."
    ),
    (Verb.PRUNE, Mark.S2FT): "prune removes units from the weights S²FT is training; merge() the model first.",
    (Verb.PRUNE, Mark.ADAPTER): (
        "an adapter is applied to this model: pruning would change the shapes under it, so remove_adapter() could "
        "no longer restore the base. Call remove_adapter(model) first."
    ),
    (Verb.PRUNE, Mark.MASKED): (
        "the model has N:M/block masks: removing units changes the groups of M the masks are defined on. Prune "
        "first, then sparsify()."
    ),
    (Verb.SPARSIFY, Mark.ADAPTER): (
        "an adapter is applied to this model: masks would zero part of its delta, and remove_adapter() could no "
        "longer restore the base. Call remove_adapter(model) first."
    ),
}


_SERVED = (
    "adapters are attached to this model for serving (attach_adapters): their deltas are indexed against the "
    "current weights. detach_adapters(model) first."
)
CONFLICTS.update({(verb, Mark.SERVED): _SERVED for verb in Verb if verb is not Verb.SERVE})
CONFLICTS[Verb.SERVE, Mark.S2FT] = (
    "serving needs a plain base model, and this one trains its own S²FT blocks; merge() it first (or attach the "
    "adapters to a fresh copy of the base)."
)
CONFLICTS[Verb.SERVE, Mark.ADAPTER] = (
    "an adapter is applied to this model with apply_adapter: served deltas are indexed against the base. Call "
    "remove_adapter(model) first."
)


def require_composable(model: nn.Module, verb: Verb) -> None:
    """Raise :class:`ConfigError` if ``verb`` cannot run on what earlier passes left on ``model``."""
    for mark in sorted(marks(model), key=lambda m: m.name):
        why = CONFLICTS.get((verb, mark))
        if why is not None:
            raise ConfigError(f"{verb.value} on a model with {mark.value}: {why}")


# ---------------------------------------------------------------------- fault injection
_FAULT: Callable[[str], None] | None = None


def _fault_point(what: str) -> None:
    if _FAULT is not None:
        _FAULT(what)


@contextmanager
def fault_hook(fn: Callable[[str], None]) -> Iterator[None]:
    """Call ``fn(description)`` before every journaled write (testing only: ``fn`` may raise to fail the pass
    there). Use :func:`sparsify_fx.testing.fail_at_write` rather than this directly."""
    global _FAULT
    prev, _FAULT = _FAULT, fn
    try:
        yield
    finally:
        _FAULT = prev


# ---------------------------------------------------------------------- the journal
_MISSING = object()


class Journal:
    """An undo log for in-place model surgery; a context manager that rolls back on any exception.

    Every method records how to undo its write before making it. Journals nest: a pass that calls another
    (``merge`` calls ``permute``) passes its journal down, and one rollback undoes both.

    Args:
        model: the model being changed; its train/eval mode is restored on rollback too.
    """

    def __init__(self, model: nn.Module | None = None) -> None:
        self._undo: list[Callable[[], None]] = []
        self._model = model
        self._modes = {m: m.training for m in model.modules()} if model is not None else {}
        self.writes = 0

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.rollback()
        return False

    def _record(self, what: str, undo: Callable[[], None]) -> None:
        _fault_point(what)
        self.writes += 1
        self._undo.append(undo)

    def on_rollback(self, undo: Callable[[], None], what: str = "custom write") -> None:
        """Register ``undo`` for a write the caller makes right after this call."""
        self._record(what, undo)

    # tensors -------------------------------------------------------------------------------------------
    @torch.no_grad()
    def copy_(self, dst: torch.Tensor, src: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        """``dst.copy_(src)`` in place (same tensor object, same storage). ``src`` may be a callable, evaluated
        after the old values are saved (e.g. ``lambda: t.index_select(0, idx)`` for a permutation)."""
        saved = dst.detach().clone()
        self._record(f"copy into {tuple(dst.shape)}", lambda: dst.detach().copy_(saved))
        dst.detach().copy_(src() if callable(src) else src)

    @torch.no_grad()
    def write_rows(self, dst: torch.Tensor, dim: int, index: torch.Tensor, rows: torch.Tensor) -> None:
        """``dst.index_copy_(dim, index, rows)`` saving only the rows it overwrites."""
        saved = dst.detach().index_select(dim, index)
        self._record(f"rows of {tuple(dst.shape)}", lambda: dst.detach().index_copy_(dim, index, saved))
        dst.detach().index_copy_(dim, index, rows.to(dst.dtype))

    @torch.no_grad()
    def set_data(self, t: torch.Tensor, data: torch.Tensor) -> None:
        """``t.data = data``: new storage or memory layout, same tensor (``Parameter``) object."""
        old = t.data
        self._record(f"data of {tuple(t.shape)}", lambda: setattr(t, "data", old))
        t.data = data

    def requires_grad_(self, t: torch.Tensor, flag: bool) -> None:
        old = t.requires_grad
        if old == flag:
            return
        self._record("requires_grad", lambda: t.requires_grad_(old))
        t.requires_grad_(flag)

    def set_tensor(self, mod: nn.Module, name: str, value: torch.Tensor | None) -> None:
        """Replace the parameter or buffer ``name`` of ``mod`` by another object (e.g. a pruned, smaller one)."""
        table = mod._buffers if name in mod._buffers else mod._parameters
        had = name in table
        old = table.get(name)
        self._record(f"tensor {name}", lambda: table.__setitem__(name, old) if had else table.pop(name, None))
        table[name] = value  # type: ignore[assignment]

    # attributes and modules ----------------------------------------------------------------------------
    def setattr(self, obj: Any, name: str, value: Any, *, raw: bool = False) -> None:
        """``setattr(obj, name, value)``; ``raw`` bypasses ``nn.Module.__setattr__`` (state that must not be
        registered as a submodule, parameter or buffer)."""
        old = obj.__dict__.get(name, _MISSING) if raw else getattr(obj, name, _MISSING)
        set_ = object.__setattr__ if raw else setattr

        def undo() -> None:
            if old is _MISSING:
                if raw:
                    obj.__dict__.pop(name, None)
                else:
                    delattr(obj, name)
            else:
                set_(obj, name, old)

        self._record(f"attribute {name}", undo)
        set_(obj, name, value)

    def swap_module(self, model: nn.Module, name: str, new: nn.Module, *, attributes: bool = True) -> nn.Module:
        """Put ``new`` where submodule ``name`` is, carrying hooks, mode and attributes over
        (:func:`carry_over`); the old module keeps its hook tables too, so it works again if swapped back.
        Returns the old module."""
        parent, child = parent_of(model, name)
        old = parent._modules[child]
        carry_over(old, new, attributes)
        self._record(f"module {name}", lambda: parent._modules.__setitem__(child, old))
        parent._modules[child] = new
        return old

    # rollback -------------------------------------------------------------------------------------------
    def rollback(self) -> None:
        """Undo every recorded write, newest first. Restores the model's modes too."""
        with torch.no_grad():
            while self._undo:
                self._undo.pop()()
        for m, mode in self._modes.items():
            m.training = mode
