"""S²FT inside stacked mixture-of-experts weights.

transformers stores a layer's experts as 3-D parameters (``experts.gate_up_proj [E, 2I, H]``,
``experts.down_proj [E, H, I]``) and computes them with its own grouped GEMM or per-expert loop, reading
``self.gate_up_proj``. The analysis gives each expert its own channel group, so after co-permutation the selected
channels of expert ``e`` lead *its* slice: rows ``[0, k)`` (and ``[I, I + k)``) of ``gate_up_proj[e]``, columns
``[0, k)`` of ``down_proj[e]``. Those per-expert blocks are what trains.

The experts module keeps its type's forward: its class becomes a subclass (:class:`S2FTExperts` in front of the
original class) whose trained weight names are properties. The Parameter stays in ``_parameters`` (same object,
same FQN, frozen); the property returns it through :class:`_ExpertBlocks`, an autograd function that is the
identity on the weight in the forward and hands each block its slice of the weight's gradient in the backward.
The blocks are Parameters under ``experts.blocks.<name>.<i>``: with ``layout="view"`` views of the weight's
memory (zero-copy forward; an in-place optimizer step lands in the weight), with ``"separate"`` their own storage
(the forward then builds the weight with the blocks written in).

Memory: a column block ``down_proj[e, :, 0:k]`` of a row-major ``[E, H, I]`` weight has gaps, and fused
optimizers walk a parameter's memory linearly, so a weight whose blocks run along its last dim is re-stored with
that dim before the middle one (``[E, I, H]`` in memory, same shape and values): every block is one dense span.

Cost: the grouped GEMM's backward computes the whole ``[E, ...]`` weight gradient and the blocks take slices of
it (the same FLOPs as full fine-tuning of the experts' weights, one weight-sized temporary per stacked weight);
what S²FT saves here is optimizer state and the gradient memory kept between steps. A backward that computes only
the blocks' gradients would need a grouped GEMM of our own (the per-expert row ranges are routing data).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from sparsify_fx.errors import ConfigError
from sparsify_fx.passes.s2ft_blocks import BlockList, contiguous_in_state_dict, separate_blocks
from sparsify_fx.passes.surgery import Journal, get_module, split_fqn


@dataclass
class ExpertBlocks:
    """Where one stacked weight of an experts module trains: block ``i`` is
    ``weight[experts[i]].narrow(dim - 1, starts[i], lengths[i])``."""

    dim: int  # the full tensor's dim the blocks run along (1 or 2; 0 is the expert dim)
    experts: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)

    def view(self, w: torch.Tensor, i: int) -> torch.Tensor:
        """Block ``i`` as a view of ``w``."""
        return w[self.experts[i]].narrow(self.dim - 1, self.starts[i], self.lengths[i])


@dataclass
class ExpertWeightPlan:
    """One stacked expert weight that trains: its module, parameter name and blocks (checked before writing)."""

    module: str
    attr: str
    blocks: ExpertBlocks
    slices: list[Any]  # s2ft.Slice, with ``expert`` set


def blocks_are_dense_per_expert(weight: torch.Tensor, dim: int) -> bool:
    """Is every block ``weight[e].narrow(dim - 1, s, n)`` of a stacked ``[E, A, B]`` weight one dense span?

    Args:
        weight: a 3-D stacked expert weight.
        dim: the dim (1 or 2) the blocks run along.

    Example:
        >>> blocks_are_dense_per_expert(torch.empty(4, 8, 6), 1), blocks_are_dense_per_expert(torch.empty(4, 8, 6), 2)
        (True, False)
    """
    return weight.movedim(dim, 1).is_contiguous()


def plan_experts(model: nn.Module, units: list[Any]) -> list[ExpertWeightPlan]:
    """The stacked weights per-expert units train and their blocks, in co-permuted coordinates.

    Each selected unit of expert ``e`` leads its slice after co-permutation, so one block per expert, occurrence
    (the gate and up halves of a fused ``gate_up_proj``) and base offset. Checks, before anything is written, that
    each weight is a 3-D Parameter of its module, trained along one dim other than the expert dim, and that the
    module has no ``blocks`` attribute of its own.

    Args:
        model: the model (co-permutation not yet applied).
        units: s2ft units of per-expert groups (``unit.group.expert`` set), with their selection.

    Example::

        plans = plan_experts(model, [u for u in units if u.group.expert is not None])
    """
    from sparsify_fx.passes.s2ft import Slice

    by_weight: dict[str, list[Slice]] = {}
    for u in units:
        k = len(u.selected)
        for proj, pairs in u.projections.items():
            for m, occ in pairs:
                by_weight.setdefault(m.fqn, []).extend(
                    Slice(m.fqn, m.dim, base, k * occ.inner, proj, occ, m.expert) for base in occ.offsets
                )
    plans = []
    for fqn, ss in by_weight.items():
        mod_name, attr = split_fqn(fqn)
        module = get_module(model, mod_name)
        w = module._parameters.get(attr)
        dims = {s.dim for s in ss}
        if w is None or w.dim() != 3 or len(dims) != 1 or 0 in dims:
            raise ConfigError(
                f"{fqn}: S²FT trains stacked expert weights as 3-D Parameters [experts, ...] along one dim other "
                f"than the expert dim; found {type(w).__name__} {tuple(w.shape) if w is not None else ''} trained "
                f"along dims {sorted(dims)}. Leave 'gate'/'up'/'down' out of S2FTConfig.ffn for this model."
            )
        if "blocks" in module.__dict__ or "blocks" in module._modules or hasattr(type(module), "blocks"):
            raise ConfigError(f"{mod_name} has an attribute 'blocks' of its own, where S²FT would put its trainable "
                              "expert blocks; rename it, or leave the expert projections out of S2FTConfig.ffn.")
        ss = sorted(ss, key=lambda s: (s.expert, s.start))
        spec = ExpertBlocks(ss[0].dim, [s.expert for s in ss], [s.start for s in ss], [s.length for s in ss])
        plans.append(ExpertWeightPlan(mod_name, attr, spec, ss))
    return plans


class _ExpertBlocks(torch.autograd.Function):
    """The stacked weight as the experts' forward reads it; gradients only for the trainable blocks.

    Forward: the weight itself (a view of it: zero-copy) when every block is a view of its memory, else a copy
    with the separate blocks written in. Backward: each block's gradient is its slice of the weight's gradient;
    the frozen weight gets none."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, spec: ExpertBlocks, *blocks: torch.Tensor) -> torch.Tensor:
        ctx.spec = spec
        if all(_is_view_of(b, weight) for b in blocks):
            return weight.view_as(weight)
        out = weight.clone()
        for i, b in enumerate(blocks):
            spec.view(out, i).copy_(b)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        spec: ExpertBlocks = ctx.spec
        return (None, None, *(spec.view(grad, i) for i in range(len(spec.starts))))


def _is_view_of(b: torch.Tensor, w: torch.Tensor) -> bool:
    return b.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()


class S2FTExperts(nn.Module):
    """Put in front of an experts module's own class (a subclass made per class and trained names): its trained
    stacked weights read through :class:`_ExpertBlocks`, so only ``blocks`` get gradients while the forward stays
    the experts' own (grouped GEMM or loop). ``_s2ft_experts`` maps each trained parameter name to its
    :class:`ExpertBlocks`; ``blocks[name][i]`` is block ``i``.

    Example::

        model = sparsify_fx.s2ft(mixtral, (ids,))
        experts = model.model.layers[0].mlp.experts
        [n for n, p in experts.named_parameters() if p.requires_grad]   # ['blocks.gate_up_proj.0', ...]
    """

    _s2ft_experts: dict[str, ExpertBlocks]

    def s2ft_weight(self, name: str) -> torch.Tensor:
        """Stacked weight ``name`` as the forward should see it (trained blocks in, gradients to the blocks)."""
        w = self._parameters[name]
        blocks = list(self._modules["blocks"][name])  # type: ignore[index]
        if not torch.is_grad_enabled() or not any(b.requires_grad for b in blocks):
            if all(_is_view_of(b, w) for b in blocks):
                return w
        return _ExpertBlocks.apply(w, self._s2ft_experts[name], *blocks)

    def block_slots(self, name: str) -> list[tuple[torch.Tensor, nn.Parameter]]:
        """``(slice of the weight's data, block)`` per block of trained weight ``name``."""
        w, spec = self._parameters[name], self._s2ft_experts[name]
        return [(spec.view(w.data, i), b) for i, b in enumerate(self._modules["blocks"][name])]  # type: ignore[index]

    @torch.no_grad()
    def sync_(self) -> None:
        """Write separate-storage blocks back into their weights (views need nothing)."""
        for name in self._s2ft_experts:
            for dst, b in separate_blocks(self.block_slots(name)):
                dst.copy_(b.data)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        # a weight re-stored for dense column blocks is saved row-major, as the plain module would be
        super()._save_to_state_dict(destination, prefix, keep_vars)
        contiguous_in_state_dict(destination, prefix, self._s2ft_experts, keep_vars)


_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def _subclass(cls: type, names: tuple[str, ...]) -> type:
    """``S2FT<cls>``: :class:`S2FTExperts` before ``cls``, each trained name a property (one class per pair)."""
    key = (cls, names)
    if key not in _CLASSES:
        props = {n: property(lambda self, n=n: self.s2ft_weight(n)) for n in names}
        _CLASSES[key] = type(f"S2FT{cls.__name__}", (S2FTExperts, cls), {**props, "__module__": __name__})
    return _CLASSES[key]


def apply_experts(model: nn.Module, plans: list[ExpertWeightPlan], layout: str, j: Journal,
                  base_blocks: dict[tuple, torch.Tensor]) -> dict[str, list[str]]:
    """Make each planned experts module train its blocks (weights already co-permuted and frozen); every write
    through ``j``. Records each block's initial values in ``base_blocks`` (key: :func:`block_key`).

    Args:
        model: the model being transformed.
        plans: :func:`plan_experts`' plans.
        layout: ``"view"`` (blocks are views of the weight) or ``"separate"``.
        j: the pass's journal.
        base_blocks: S²FT state's initial block values, filled here.

    Returns:
        experts module FQN -> its trained parameter names.

    Example::

        with Journal(model) as j:
            modules = apply_experts(model, plans, "view", j, base_blocks)
    """
    by_module: dict[str, list[ExpertWeightPlan]] = {}
    for p in plans:
        by_module.setdefault(p.module, []).append(p)
    out: dict[str, list[str]] = {}
    for mod_name, ps in by_module.items():
        module = get_module(model, mod_name)
        blocks = nn.ModuleDict()
        for p in ps:
            w = module._parameters[p.attr]
            if layout == "view" and not blocks_are_dense_per_expert(w, p.blocks.dim):
                j.set_data(w, w.data.movedim(p.blocks.dim, 1).contiguous().movedim(1, p.blocks.dim))
            params = []
            for i, s in enumerate(p.slices):
                view = p.blocks.view(w.data, i)
                base_blocks[block_key(s)] = view.clone()
                params.append(nn.Parameter(view if layout == "view" else view.clone(), requires_grad=True))
            blocks[p.attr] = BlockList(params)
        names = tuple(p.attr for p in ps)
        j.setattr(module, "__class__", _subclass(type(module), names))
        j.setattr(module, "_s2ft_experts", {p.attr: p.blocks for p in ps}, raw=True)
        j.setattr(module, "blocks", blocks)
        out[mod_name] = list(names)
    return out


def block_key(s: Any) -> tuple:
    """The key of a slice's initial values in ``S2FTState.base_blocks``: ``(fqn, start)``, plus the expert for a
    block inside one expert's slice (every expert's blocks start at the same offsets)."""
    return (s.fqn, s.start) if getattr(s, "expert", None) is None else (s.fqn, s.start, s.expert)


def merge_experts(model: nn.Module, modules: dict[str, list[str]], j: Journal) -> None:
    """Undo :func:`apply_experts`: trained values in the weights (separate layout), row-major weights, the
    module's own class, no ``blocks``; the co-permutation is undone by the caller.

    Args:
        model: the S²FT model being merged.
        modules: ``S2FTState.experts``.
        j: the merge's journal.

    Example::

        with Journal(model) as j:
            merge_experts(model, state.experts, j)
    """
    for mod_name in modules:
        module = get_module(model, mod_name)
        if not isinstance(module, S2FTExperts):
            raise ConfigError(f"{mod_name} is no longer an S²FT experts module ({type(module).__name__}); it was "
                              "replaced after s2ft, so it cannot be merged.")
        specs = module._s2ft_experts
        blocks = module._modules["blocks"]
        for name in specs:
            w = module._parameters[name]
            for dst, b in separate_blocks(module.block_slots(name)):
                j.copy_(dst, b.detach())
            if not w.is_contiguous():
                j.set_data(w, w.data.contiguous())
        original = next(c for c in type(module).__mro__[1:] if not issubclass(c, S2FTExperts))
        j.on_rollback(lambda m=module, b=blocks: m._modules.__setitem__("blocks", b), "experts blocks")
        del module._modules["blocks"]
        j.on_rollback(lambda m=module, sp=specs: m.__dict__.__setitem__("_s2ft_experts", sp), "experts spec")
        del module.__dict__["_s2ft_experts"]
        j.setattr(module, "__class__", original)


def expert_numel(shape: tuple[int, ...], dim: int) -> int:
    """Elements per index along ``dim`` inside one expert's slice of a stacked ``shape``.

    Example:
        >>> expert_numel((4, 64, 16), 2)
        64
    """
    return int(torch.Size(shape[1:]).numel() // shape[dim])
