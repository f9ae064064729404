"""Co-permutation: apply one unit permutation to every member of a coupled group, in place."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sparsify_fx.analysis import Group
from sparsify_fx.errors import ConfigError


def _tensor(model: torch.nn.Module, fqn: str) -> torch.Tensor:
    mod_name, _, attr = fqn.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    t = getattr(mod, attr, None)
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"group member {fqn!r} is not a tensor of this model; was the group found on another model?")
    return t


def check_perm(group: Group, perm: Sequence[int] | torch.Tensor) -> torch.Tensor:
    p = torch.as_tensor(perm, dtype=torch.long).flatten()
    if p.numel() != group.num_units or not torch.equal(torch.sort(p).values, torch.arange(group.num_units)):
        raise ConfigError(
            f"perm must be a permutation of range({group.num_units}) for group {group.name!r} "
            f"({group.kind}, {group.num_units} units); got {p.tolist()[:16]}"
        )
    return p


@torch.no_grad()
def permute(model: torch.nn.Module, group: Group, perm: Sequence[int] | torch.Tensor) -> torch.nn.Module:
    """Permute the units of ``group`` by ``perm`` (new unit ``u`` = old unit ``perm[u]``) in every
    weight, bias, norm parameter and buffer of the group, in place. The function of the model does
    not change. Returns the model.

    All members are validated before any is written, so a bad call leaves the model unchanged.
    """
    p = check_perm(group, perm)
    tensors = []
    for m in group.members:
        t = _tensor(model, m.fqn)
        if t.dim() <= m.dim or t.shape[m.dim] != m.size:
            raise ConfigError(
                f"{m.fqn} has shape {tuple(t.shape)}, but group {group.name!r} expects size {m.size} "
                f"at dim {m.dim}; re-run analyze() on this model."
            )
        tensors.append((m, t))
    done: set[tuple[int, int, int]] = set()  # tied parameters appear once
    for m, t in tensors:
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), m.dim)
        if key in done:
            continue
        done.add(key)
        idx = m.index(p).to(t.device)
        t.copy_(t.index_select(m.dim, idx))
    return model
