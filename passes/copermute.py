"""Co-permutation: apply one unit permutation to every member of a coupled group, in place."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn as nn

from sparsify_fx.analysis import Group, Member
from sparsify_fx.errors import ConfigError
from sparsify_fx.frontend.graph import alias_key
from sparsify_fx.passes.surgery import Journal, get_module, get_tensor, split_fqn, unwrap


def check_perm(group: Group, perm: Sequence[int] | torch.Tensor) -> torch.Tensor:
    p = torch.as_tensor(perm, dtype=torch.long).flatten()
    if p.numel() != group.num_units or not torch.equal(torch.sort(p).values, torch.arange(group.num_units)):
        raise ConfigError(
            f"perm must be a permutation of range({group.num_units}) for group {group.name!r} "
            f"({group.kind}, {group.num_units} units); got {p.tolist()[:16]}"
        )
    return p


def companions(model: nn.Module, fqn: str) -> list[torch.Tensor]:
    """Tensors laid out like parameter ``fqn`` that must move with it (an N:M mask beside its weight). A module
    type declares them in a class attribute ``sparsify_companions = {"weight": ("mask",)}``."""
    mod_name, attr = split_fqn(fqn)
    try:
        mod = get_module(model, mod_name)
    except ConfigError:
        return []
    names = getattr(type(mod), "sparsify_companions", {}).get(attr, ())
    return [t for n in names if isinstance(t := getattr(mod, n, None), torch.Tensor)]


@torch.no_grad()
def permute(model: nn.Module, group: Group, perm: Sequence[int] | torch.Tensor,
            journal: Journal | None = None) -> nn.Module:
    """Permute the units of ``group`` in place: new unit ``u`` is old unit ``perm[u]``, in every weight, bias,
    norm parameter and buffer of the group (and tensors laid out like them, such as N:M masks). The function of
    the model does not change.

    All members are validated before any is written, and the writes are journaled: a bad call, an error or a
    ``KeyboardInterrupt`` leaves the model unchanged.

    Args:
        model: the model the group was found on (or its ``torch.compile`` wrapper).
        group: a group of ``sparsify_fx.analyze(model, ...)``.
        perm: a permutation of ``range(group.num_units)``.
        journal: record the writes in this journal (a pass's transaction) instead of a new one.

    Example::

        report = sparsify_fx.analyze(model, (ids,))
        g = report.groups[0]
        sparsify_fx.permute(model, g, torch.randperm(g.num_units))
    """
    model_ = unwrap(model)
    p = check_perm(group, perm)
    tensors = []
    for m in group.members:
        t = get_tensor(model_, m.fqn)
        if t.dim() <= m.dim or t.shape[m.dim] != m.size:
            raise ConfigError(
                f"{m.fqn} has shape {tuple(t.shape)}, but group {group.name!r} expects size {m.size} "
                f"at dim {m.dim}; re-run analyze() on this model."
            )
        tensors.append((m, t))
        tensors.extend((m, c) for c in companions(model_, m.fqn))
    with nullcontext(journal) if journal is not None else Journal(model_) as j:
        done: set[tuple[int, ...]] = set()  # tied parameters appear once
        for m, t in tensors:
            key = (*alias_key(t), m.dim, m.expert)
            if key in done:
                continue
            done.add(key)
            idx = m.index(p).to(t.device)
            j.copy_(t, lambda t=t, m=m, idx=idx: _permuted(t, m, idx))
    return model


def _permuted(t: torch.Tensor, m: Member, idx: torch.Tensor) -> torch.Tensor:
    """``t`` with ``idx`` applied along ``m.dim``; for one expert of a stacked weight, to that slice only."""
    if m.expert is None:
        return t.index_select(m.dim, idx)
    out = t.clone()
    out[m.expert] = t[m.expert].index_select(m.dim - 1, idx)
    return out
