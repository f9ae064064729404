"""S²FT as one call: select units, co-permute them to the front, train only dense slices.

``s2ft(model, example_inputs, S2FTConfig(...))`` analyses the model's coupled structures, picks a
few attention heads and FFN channels per layer, co-permutes every coupled weight so the picked
units are contiguous, and swaps each trained linear layer for :class:`S2FTLinear`, whose trainable
parameters are only those contiguous row or column blocks (views of the frozen weight by default,
so the forward costs what the original did). Its backward computes weight gradients for the blocks
only and keeps only the activations they read (``sparsify::s2ft_linear``).

``merge`` undoes the layout (original module types, original unit order, trained weights);
adapters in original coordinates live in :mod:`sparsify_fx.passes.adapter`.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn

import sparsify_fx.ops  # noqa: F401  (registers torch.ops.sparsify.*)
from sparsify_fx.analysis import CouplingReport, Group, Member, Occurrence, analyze
from sparsify_fx.errors import ConfigError, SparsifyWarning
from sparsify_fx.passes._config import (
    check_bool,
    check_calibration,
    check_choice,
    check_loss_fn,
    check_seed,
    is_int,
    is_real,
)
from sparsify_fx.passes.copermute import permute
from sparsify_fx.passes.hf import drop_checkpointing_grads, keep_checkpointing_grads
from sparsify_fx.passes.importance import (
    Calibration,
    Combine,
    Feed,
    FixedImportance,
    Importance,
    Units,
    UnitSlice,
    is_dtensor,
    option,
    resolve,
    select,
)
from sparsify_fx.passes.layers import layer_type
from sparsify_fx.passes.s2ft_blocks import S2FTBlocks, blocks_are_dense, separate_blocks
from sparsify_fx.passes.s2ft_conv import (
    CONV_PROJECTIONS,
    S2FTConv,
    conv_projections,
    drop_untrainable_convs,
    is_conv,
)
from sparsify_fx.passes.s2ft_experts import apply_experts, expert_numel, merge_experts, plan_experts
from sparsify_fx.passes.surgery import (
    Journal,
    Verb,
    get_module,
    require_composable,
    require_values,
    split_fqn,
    unwrap,
)
from sparsify_fx.passes.surgery import get_tensor as _tensor

if TYPE_CHECKING:
    from sparsify_fx.passes.reselect import Reselect

log = logging.getLogger("sparsify_fx")

# "qkv": a fused weight whose q, k and v rows interleave inside each head; they train together
ATTENTION_PROJECTIONS = ("q", "k", "v", "o", "qkv")
FFN_PROJECTIONS = ("gate", "up", "down")
Strategy = Literal["random", "magnitude", "gradient", "activation"]
STRATEGIES = ("random", "magnitude", "gradient", "activation")  # names from importance.IMPORTANCES


class FrozenWeightWarning(SparsifyWarning):
    """A weight of a selected unit cannot train through S²FT's linear (not a 2-D linear map): it stays frozen."""


class ZeroUnitsWarning(SparsifyWarning):
    """A ratio rounds to zero units of a kind somewhere: that kind trains nothing there."""


class SubstitutedProjectionWarning(SparsifyWarning):
    """The default projections do not exist as such in a model, so the closest ones train instead (see describe)."""


# the S²FT paper's choice; where v has no rows of its own per head, this default trains the closest projections
DEFAULT_ATTENTION = ("v", "o")
FFN_DEFAULT = ("up", "down")


@dataclass
class S2FTConfig:
    """What trains, how much, and how units are chosen.

    - ``attention`` / ``ffn``: the projections that train in the selected heads / channels. The
      S²FT default trains value+output heads and up+down channels; ``q``, ``k`` and ``gate`` can be
      added. An empty tuple leaves that kind frozen.
    - ``attention_ratio`` / ``ffn_ratio``: fraction of units selected, in (0, 1]. Mixture-of-experts layers with
      stacked expert weights (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj [E, H, I]``) have one FFN
      group per expert: ``ffn_ratio`` (and ``min_units``) apply per expert, so every expert trains its own
      channels (with ``scope="per_layer"``, round(ffn_ratio x I) of them, at least ``min_units``), inside the
      stacked weights (:mod:`sparsify_fx.passes.s2ft_experts`).
    - ``budget``: alternatively, the total number of trainable parameters; the ratios then only
      weigh the kinds against each other.
    - ``scope``: ``"per_layer"`` picks the fraction in every layer; ``"global"`` ranks units of a kind
      across layers (random scores make this uniform in expectation).
    - ``layers``: restrict training to these layer indices (others stay frozen).
    - ``strategy``: ``random`` (seeded, the paper's choice), ``magnitude`` (weight norms of the
      trained slices), ``gradient`` (Fisher: squared gradients on ``calibration`` batches, with
      ``loss_fn(model, batch) -> loss`` or the model's own ``.loss``), ``activation`` (norms of
      each unit's output on ``calibration`` batches), or any
      :class:`~sparsify_fx.passes.importance.Importance` (the same objects rank units for ``prune``).
    - ``layout``: ``"view"`` makes trainable blocks views of the frozen weight (zero-copy forward,
      in-place updates land in the weight); ``"separate"`` gives them their own storage (needed when
      parameters are sharded, e.g. FSDP2).
    - ``progress``: show a progress bar over the calibration batches.
    - ``min_units``: every layer trains at least this many units of each kind it has (when no ``budget`` is
      set), so a ratio that rounds to zero units in a small layer (0.1 of 4 heads) still trains one. ``0``
      lets ratios round to zero units (with a :class:`ZeroUnitsWarning`).
    - ``conv`` / ``conv_ratio``: conv channel groups (a conv's output channels, its BatchNorm, the next conv's
      input channels): ``out`` trains the producing convs' rows, ``in`` the consuming layers' input channels.
      Where one conv would train rows for one group and columns for another (a bottleneck's middle conv), its
      rows train and the columns are left out (:func:`describe` says so).
    - ``distributed``: with ``torch.distributed`` initialised (more than one process), data-based strategies sum
      their statistics over the default group so every rank picks the same units from its own calibration shard
      (:func:`~sparsify_fx.passes.importance.reduce_group` says exactly what equals what); False scores each
      rank's batches alone. A model already sharded by FSDP2 is scored with :func:`score_units`.
    - ``reselect``: adaptive selection while training (:class:`~sparsify_fx.passes.reselect.Reselect`): every
      ``every`` steps :func:`~sparsify_fx.reselect_` (or ``ReselectCallback`` in a Trainer) swaps the units that
      moved least for unselected units with the largest accumulated gradient.

    The default ``attention=("v", "o")`` trains the closest projections where v has no rows of its own:
    where q, k and v interleave inside each head (GPT-NeoX) the v rows of each selected head train inside
    the fused weight; where they cannot be located the whole heads train (``qkv``); under multi-query
    attention (one shared k/v head) q and o heads train. Each substitution warns
    (:class:`SubstitutedProjectionWarning`) and is shown by :func:`describe`. Other explicit projection
    lists are taken literally.
    """

    attention: tuple[str, ...] = DEFAULT_ATTENTION
    ffn: tuple[str, ...] = FFN_DEFAULT
    attention_ratio: float = 0.1
    ffn_ratio: float = 0.1
    budget: int | None = None
    scope: Literal["per_layer", "global"] = "per_layer"
    layers: Sequence[int] | None = None
    strategy: Strategy | Importance = "random"
    seed: int = 0
    calibration: Iterable[Any] | None = field(default=None, repr=False)
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = field(default=None, repr=False)
    layout: Literal["view", "separate"] = "view"
    progress: bool = True
    min_units: int = 1
    conv: tuple[str, ...] = CONV_PROJECTIONS
    conv_ratio: float = 0.1
    distributed: bool = True
    reselect: Reselect | None = None

    def __post_init__(self) -> None:
        # ffn="up" names one projection; iterated as a string it would be the projections "u" and "p"
        if isinstance(self.attention, str):
            self.attention = (self.attention,)
        if isinstance(self.ffn, str):
            self.ffn = (self.ffn,)
        # a list is as good as a tuple; anything else is left for validate() to name
        if isinstance(self.attention, list):
            self.attention = tuple(self.attention)
        if isinstance(self.ffn, list):
            self.ffn = tuple(self.ffn)
        if isinstance(self.conv, str | list):
            self.conv = (self.conv,) if isinstance(self.conv, str) else tuple(self.conv)

    def validate(self) -> None:
        """Check every field's type and range; raises :class:`ConfigError` naming the field, the value and the fix.

        Called by :func:`s2ft` before it reads the model, so a bad config never touches it. Sizes that depend on
        the model (layer indices, unit counts) are checked against it later, still before the first write.

        Example:
            >>> S2FTConfig(attention_ratio=0.25).validate()
        """
        for name, known in (("attention", ATTENTION_PROJECTIONS), ("ffn", FFN_PROJECTIONS),
                            ("conv", CONV_PROJECTIONS)):
            projs = getattr(self, name)
            if isinstance(projs, str) or not isinstance(projs, Sequence):
                raise ConfigError(
                    f"S2FTConfig.{name} must be a tuple of projection names, got {projs!r}; pass e.g. {known[:2]!r}, "
                    f"or () to leave every {name} unit frozen."
                )
            bad = [p for p in projs if not isinstance(p, str) or p not in known]
            if bad:
                raise ConfigError(f"S2FTConfig.{name} has unknown projection(s) {bad}; choose from {list(known)}.")
        for name in ("attention_ratio", "ffn_ratio", "conv_ratio"):
            r = getattr(self, name)
            if not is_real(r) or not math.isfinite(r) or not (0 < r <= 1):
                raise ConfigError(f"S2FTConfig.{name} must be a finite number in (0, 1], got {r!r}.")
        if self.budget is not None and (not is_int(self.budget) or self.budget <= 0):
            raise ConfigError(
                f"S2FTConfig.budget must be a positive int (a number of trainable parameters) or None, "
                f"got {self.budget!r}."
            )
        check_choice("S2FTConfig.", "scope", self.scope, ("per_layer", "global"))
        if self.layers is not None:
            # a str or a bare int is a common slip for [0]: `0 in "0"` raises TypeError, `in 5` too
            if isinstance(self.layers, str) or not isinstance(self.layers, Sequence):
                raise ConfigError(
                    f"S2FTConfig.layers must be a list of layer indices or None, got {self.layers!r}; "
                    f"e.g. layers=[0, 1]."
                )
            bad = [x for x in self.layers if not is_int(x) or x < 0]
            if bad:
                raise ConfigError(
                    f"S2FTConfig.layers must hold non-negative int layer indices, got {bad} in {list(self.layers)!r}."
                )
            repeated = sorted({x for x in self.layers if list(self.layers).count(x) > 1})
            if repeated:
                # most likely a typo for another layer; training a layer "twice" has no meaning
                raise ConfigError(
                    f"S2FTConfig.layers names layer(s) {repeated} more than once in {list(self.layers)!r}; "
                    "list each layer once."
                )
        if not isinstance(self.strategy, Importance) and (not isinstance(self.strategy, str)
                                                           or self.strategy not in STRATEGIES):
            raise ConfigError(
                f"S2FTConfig.strategy must be random, magnitude, gradient or activation, got {self.strategy!r}; "
                "or pass an Importance (sparsify_fx.passes.importance) to rank units your way."
            )
        check_seed("S2FTConfig.", self.seed)
        check_calibration("S2FTConfig.", self.calibration)
        check_loss_fn("S2FTConfig.", self.loss_fn)
        imp = resolve(self.strategy)
        if (imp.needs_batches or imp.needs_loss) and self.calibration is None:
            raise ConfigError(f"{option('strategy', self.strategy)} needs calibration batches: pass calibration=[...].")
        check_choice("S2FTConfig.", "layout", self.layout, ("view", "separate"))
        check_bool("S2FTConfig.", "progress", self.progress)
        check_bool("S2FTConfig.", "distributed", self.distributed)
        if not is_int(self.min_units) or self.min_units < 0:
            raise ConfigError(
                f"S2FTConfig.min_units must be a non-negative int (units per layer and kind), got "
                f"{self.min_units!r}; 1 trains at least one unit per layer, 0 lets ratios round to none."
            )
        if self.reselect is not None:
            from sparsify_fx.passes.reselect import Reselect  # lazily: reselect's functions import this module

            if not isinstance(self.reselect, Reselect):
                raise ConfigError(f"S2FTConfig.reselect must be a Reselect(every=..., fraction=...) or None, got "
                                  f"{self.reselect!r}.")
            self.reselect.validate()
        if not self.attention and not self.ffn and not self.conv:
            raise ConfigError("S2FTConfig trains nothing: the attention, ffn and conv projections are all empty.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("calibration")
        d.pop("loss_fn")
        d.pop("progress")  # how the transform ran, not what it trained
        d.pop("distributed")
        d["strategy"] = self.strategy if isinstance(self.strategy, str) else repr(self.strategy)  # JSON-safe
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d


# ---------------------------------------------------------------------- selection plan
@dataclass
class Slice:
    """One trained block of one weight: units [0:k) of an occurrence, in permuted coordinates."""

    fqn: str  # weight parameter
    dim: int  # parameter dim the block runs along
    start: int  # first index along dim (after co-permutation)
    length: int
    projection: str
    occurrence: Occurrence
    expert: int | None = None  # a block inside expert ``expert``'s slice of a stacked [E, ...] weight


@dataclass
class Unit:
    """A coupled group chosen for training, with its selected units in original indices."""

    group: Group
    kind: Literal["attention", "ffn", "conv"]
    projections: dict[str, list[tuple[Member, Occurrence]]]
    selected: list[int] = field(default_factory=list)

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # trained weights' shapes
    # (weight fqn, occurrence) -> (offset, length) inside each unit of the "v" projection: only that part of the
    # unit trains (the v rows of a head whose q, k and v rows interleave in one fused weight)
    parts: dict[tuple[str, Occurrence], tuple[int, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was trained in place of the config's choice, and why

    def part(self, proj: str, m: Member, occ: Occurrence) -> tuple[int, int] | None:
        """(offset, length) of the part of each unit that projection ``proj`` trains in ``occ``; None: all of it."""
        return self.parts.get((m.fqn, occ)) if proj == "v" else None

    @property
    def cost_per_unit(self) -> int:
        """Trainable parameters one unit adds (its slices of every trained projection)."""
        return sum(
            ((p[1] if (p := self.part(name, m, occ)) else occ.inner) * len(occ.offsets))
            * (_across(self.shapes[m.fqn], m.dim) if m.expert is None else expert_numel(self.shapes[m.fqn], m.dim))
            for name, pairs in self.projections.items()
            for m, occ in pairs
        )


def _across(shape: Sequence[int], dim: int) -> int:
    """Elements of a tensor of ``shape`` per index along ``dim``."""
    return math.prod(s for i, s in enumerate(shape) if i != dim)


def _projections_of(group: Group) -> dict[str, list[tuple[Member, Occurrence]]]:
    """Name each weight occurrence of a group by the projection it is (from structure, not names)."""
    out: dict[str, list[tuple[Member, Occurrence]]] = {}
    weights = [m for m in group.members if m.role in ("in", "out") and not m.is_buffer]
    if group.kind in ("attention_heads", "kv_heads"):
        for m in weights:
            for occ in m.occurrences:
                if m.role == "in":
                    out.setdefault("o", []).append((m, occ))
                    continue
                qkv = occ.tags & {"q", "k", "v"}
                if len(qkv) == 1:
                    out.setdefault(next(iter(qkv)), []).append((m, occ))
                elif qkv:
                    # q, k and v rows interleaved inside each head (GPT-NeoX): not separable
                    out.setdefault("qkv", []).append((m, occ))
    elif group.kind == "ffn_channels":
        # per occurrence, so a fused gate_up weight splits into its gate half and its up half
        produced = [occ for m in weights if m.role == "out" for occ in m.occurrences]
        gated = any("act" in o.tags for o in produced) and any("act" not in o.tags for o in produced)
        for m in weights:
            for occ in m.occurrences:
                if m.role == "in":
                    name = "down"
                elif gated and "act" in occ.tags:
                    name = "gate"
                else:
                    name = "up"
                out.setdefault(name, []).append((m, occ))
    elif group.kind == "conv_channels":
        return conv_projections(group)
    return out


class ExpertsSkippedWarning(SparsifyWarning):
    """Mixture-of-experts channels in stacked 3-D weights were left frozen."""


def _stacked_experts(model: nn.Module, g: Group) -> bool:
    """Whether a group is one space shared by every expert of stacked expert weights ([experts, ...]): it is
    skipped (a per-expert group, ``g.expert`` set, trains through :mod:`sparsify_fx.passes.s2ft_experts`)."""
    return g.expert is None and any(
        not m.is_buffer and m.role in ("in", "out") and _tensor(model, m.fqn).dim() > 2 and not _in_conv(model, m)
        for m in g.members
    )


def _in_conv(model: nn.Module, m: Member) -> bool:
    """Whether ``m`` is a convolution's parameter. In an FFN-channel group that is a depthwise conv between the
    projections (a Mix-FFN's 3x3): channel-wise like a norm's affine, its 4-D weight is no projection to train."""
    return is_conv(get_module(model, split_fqn(m.fqn)[0]))


def _one_head_group_per_attention(groups: list[Group]) -> list[Group]:
    """The head group each attention of one layer index trains through: the one that carries v (kv heads under
    GQA), which moves q, k, v and o together. One per attention, not per layer index: an index can hold several
    (every stage's block 0 of a multi-stage vision model; an encoder-decoder's self- and cross-attention). Two
    groups are the same attention when they share a projection dim (GQA's query heads inside its kv heads)."""
    heads = sorted((g for g in groups if g.kind in ("attention_heads", "kv_heads")),
                   key=lambda g: (g.kind != "kv_heads", g.name))
    chosen: list[Group] = []
    taken: set[tuple[str, int]] = set()
    for g in heads:
        dims = {(m.fqn, m.dim) for m in g.members if m.role in ("in", "out")}
        if dims & taken:
            continue
        chosen.append(g)
        taken |= dims
    return chosen


def _plan(report: CouplingReport, model: nn.Module, cfg: S2FTConfig) -> list[Unit]:
    units: list[Unit] = []
    found = {"attention": set(), "ffn": set(), "conv": set()}
    substituted: dict[str, list[int | None]] = {}  # note -> layers where the default trains something closer
    skipped_experts: list[str] = []
    by_layer: dict[int | None, list[Group]] = {}
    for g in report.groups:
        by_layer.setdefault(g.layer, []).append(g)
    for layer, groups in by_layer.items():
        if cfg.layers is not None and layer not in cfg.layers:
            continue
        for g in _one_head_group_per_attention(groups):
            projs = _projections_of(g)
            parts = _locate_fused_v(report, g, projs)
            if parts:
                projs["v"] = list(projs["qkv"])
            found["attention"] |= set(projs)
            if cfg.attention:
                wanted, note = _closest_attention(cfg.attention, projs)
                if note:
                    substituted.setdefault(note, []).append(layer)
                chosen = {p: projs[p] for p in wanted if p in projs}
                if chosen:
                    notes = [note] if note else []
                    if parts and "v" in chosen:
                        notes.append("v rows of each selected head train inside the fused q/k/v weight, one block "
                                     "per head")
                    units.append(Unit(g, "attention", chosen, parts=parts if "v" in chosen else {}, notes=notes))
        for g in (g for g in groups if g.kind == "ffn_channels"):
            if _stacked_experts(model, g):
                skipped_experts.append(g.name)
                continue
            projs = {name: kept for name, pairs in _projections_of(g).items()
                     if (kept := [(m, o) for m, o in pairs if not _in_conv(model, m)])}
            if "down" not in projs:
                continue
            found["ffn"] |= set(projs)
            if cfg.ffn:
                chosen = {p: projs[p] for p in cfg.ffn if p in projs}
                if chosen:
                    units.append(Unit(g, "ffn", chosen))
        for g in (g for g in groups if g.kind == "conv_channels"):
            projs = _projections_of(g)
            found["conv"] |= set(projs)
            chosen = {p: projs[p] for p in cfg.conv if p in projs}
            if chosen:
                units.append(Unit(g, "conv", chosen))
    for note, layers in substituted.items():
        warnings.warn(f"S²FT: {note} (layers {layers}).", SubstitutedProjectionWarning, stacklevel=3)
        found["attention"] |= set(DEFAULT_ATTENTION)  # the default is satisfied by its closest projections
    if skipped_experts and cfg.ffn:
        warnings.warn(
            f"S²FT: {len(skipped_experts)} expert channel group(s) live in stacked 3-D expert weights "
            f"({skipped_experts[0]}, ...), which S²FT cannot train yet; their experts stay frozen and the "
            "budget goes to the other groups. Train the attention (the default) or the shared experts.",
            ExpertsSkippedWarning,
            stacklevel=3,
        )
    # the default conv projections are whatever each group has (a group consumed by pooling has no columns)
    explicit_conv = (("conv", cfg.conv),) if tuple(cfg.conv) != CONV_PROJECTIONS else ()
    for kind, wanted in (("attention", cfg.attention), ("ffn", cfg.ffn), *explicit_conv):
        missing = [p for p in wanted if p not in found[kind]]
        defaults = {"attention": DEFAULT_ATTENTION, "ffn": FFN_DEFAULT}.get(kind)
        if missing and tuple(wanted) == defaults and set(wanted) & found[kind]:
            # a default config trains what exists (JetMoE's o projection is an expert weight) and says so
            warnings.warn(
                f"S²FT: the default {kind} projections {list(wanted)} are not all in this model ({missing} missing); "
                f"{sorted(set(wanted) & found[kind])} train. Name them in S2FTConfig.{kind} to silence this.",
                SubstitutedProjectionWarning,
                stacklevel=3,
            )
            continue
        if missing and found[kind]:
            hint = ""
            if kind == "attention" and "qkv" in found[kind]:
                hint = " (q, k and v rows interleave inside each head here: train them together as 'qkv')"
            elif kind == "attention" and not found[kind] & {"k", "v"}:
                hint = " (under multi-query attention one k/v head is shared, so only q and o heads can be selected)"
            raise ConfigError(
                f"projection(s) {missing} of kind {kind!r} do not exist in this model (found {sorted(found[kind])})"
                f"{hint}; set S2FTConfig.{kind} to a subset of what exists."
            )
        if wanted and not found[kind] and any(u.kind != kind for u in units):
            # the other kind trains: say what is left out rather than fail a default config
            kinds = {"attention": ("attention_heads", "kv_heads"), "ffn": ("ffn_channels",),
                     "conv": ("conv_channels",)}[kind]
            reasons = sorted({r for p in report.pinned if p.kind in kinds for r in p.reasons})
            if found["conv"] and not reasons:
                continue  # a conv net without attention (or FFN) layers: nothing is left out
            why = f": pinned by {'; '.join(reasons[:3])}" if reasons else ""
            warnings.warn(
                f"S²FT: this model has no {kind} unit that can be trained{why}. Only the other kind trains; "
                f"set S2FTConfig.{kind}=() to silence this.",
                stacklevel=3,
            )
    if cfg.layers is not None:
        layers = {g.layer for g in report.groups if g.layer is not None}
        bad = [layer for layer in cfg.layers if layer not in layers]
        if bad:
            raise ConfigError(f"S2FTConfig.layers names layers {bad} that the model does not have: {sorted(layers)}.")
    if not units:
        pinned = [p for p in report.pinned if any(f.endswith("weight") for f, _ in p.members)]
        detail = "".join(
            f"\n  pinned {p.kind} space of {', '.join(f'{f}[{d}]' for f, d in p.members[:3])}: {'; '.join(p.reasons)}"
            for p in pinned[:6]
        )
        raise ConfigError(
            "S²FT found nothing to train: no attention-head, FFN-channel or conv-channel group with the requested "
            "projections."
            + (f" These spaces are pinned (not permutable), so they cannot be selected:{detail}" if pinned else "")
        )
    units = _one_side_per_weight(drop_untrainable_convs(units, model))
    # a unit that recurs at several offsets of a weight (a within-head channel, once per head: CvT, Funnel) trains
    # one block per offset; _swap_plan lays them out
    for u in units:
        u.shapes = {m.fqn: tuple(_tensor(model, m.fqn).shape) for pairs in u.projections.values() for m, _ in pairs}
    return units


def _locate_fused_v(report: CouplingReport, heads: Group,
                    projs: dict[str, list[tuple[Member, Occurrence]]]) -> dict[tuple[str, Occurrence], tuple[int, int]]:
    """Where v's rows sit inside each head of a fused weight whose q, k and v rows interleave per head (GPT-NeoX).

    The attention output that ``o`` contracts is ``attention @ v``, so v's feature dims are the ones coupled with
    o's columns inside a head: another group of the report holds both (the within-head group). Its rows in the
    fused weight, relative to each head's base, give one (offset, length) that must be the same for every head
    and as long as o's per-head width; anything else (no such group, rows scattered or of another width) returns
    ``{}`` and the caller falls back to the closest projections.

    Args:
        report: the model's coupling report.
        heads: the head group (attention or kv heads).
        projs: ``_projections_of(heads)``.

    Example:
        >>> _locate_fused_v(report, group, _projections_of(group))  # doctest: +SKIP
        {('gpt_neox.layers.0.attention.query_key_value.weight', Occurrence((0,), 4, 48, ...)): (32, 16)}
    """
    fused, outs = projs.get("qkv", []), projs.get("o", [])
    if not fused or not outs or "v" in projs:
        return {}
    o_dims = {(m.fqn, m.dim) for m, _ in outs}
    o_width = {occ.inner for _, occ in outs}
    parts: dict[tuple[str, Occurrence], tuple[int, int]] = {}
    for m, occ in fused:
        if "v" not in occ.tags:
            return {}
        rows: set[int] = set()
        for g in report.groups:
            if g is heads or not any((x.fqn, x.dim) in o_dims for x in g.members):
                continue
            for x in g.member(m.fqn):
                if x.dim == m.dim:
                    rows.update(r for o in x.occurrences for b in o.offsets for r in range(b, b + o.units * o.inner))
        found = set()
        for base in occ.offsets:
            for u in range(occ.units):
                lo = base + u * occ.inner
                inside = sorted(r - lo for r in rows if lo <= r < lo + occ.inner)
                if not inside or inside[-1] - inside[0] + 1 != len(inside):
                    return {}
                found.add((inside[0], len(inside)))
        if len(found) != 1 or next(iter(found))[1] not in o_width:
            return {}
        parts[(m.fqn, occ)] = found.pop()
    return parts


def _lift_to_min_units(units: list[Unit], scores: dict[str, torch.Tensor], cfg: S2FTConfig) -> None:
    """Top every unit's selection up to ``cfg.min_units`` (or all its units) with its best-scored unselected ones.

    Ratios round per layer, so the default 0.1 selects no head of a 4-head layer; one head per layer is what
    a user of the default expects to train. A ``budget`` is a hard cap, so it is left alone there.

    Args:
        units: the planned units, after the ratio selection.
        scores: unit scores by group name (higher trains first).
        cfg: the config (``min_units``, ``budget``).

    Example:
        >>> _lift_to_min_units(units, scores, S2FTConfig())  # doctest: +SKIP
    """
    if cfg.budget is not None or cfg.min_units == 0:
        return
    for u in units:
        need = min(cfg.min_units, u.group.num_units)
        if len(u.selected) >= need:
            continue
        have = set(u.selected)
        ranked = torch.argsort(scores[u.group.name], descending=True, stable=True).tolist()
        extra = [i for i in ranked if i not in have][: need - len(have)]
        log.info("S²FT: %s selects %d of %d units by ratio; min_units=%d adds %s", u.group.name, len(have),
                 u.group.num_units, cfg.min_units, extra)
        u.selected = sorted(have | set(extra))


def _closest_attention(wanted: Sequence[str], projs: dict[str, list]) -> tuple[tuple[str, ...], str]:
    """The attention projections to train for ``wanted`` in a head group offering ``projs``, and a note when the
    default (v, o) trains something closer instead; explicit other choices are taken literally.

    Example:
        >>> _closest_attention(("v", "o"), {"q": [], "o": []})[0]
        ('q', 'o')
    """
    if tuple(wanted) != DEFAULT_ATTENTION or "v" in projs or "o" not in projs:
        return tuple(wanted), ""
    if "qkv" in projs:
        return ("qkv", "o"), ("q, k and v rows interleave inside each head and v's rows could not be located, so "
                              "the whole heads of the fused weight train (qkv+o) in place of v+o")
    if "q" in projs:
        return ("q", "o"), ("multi-query attention shares one k/v head among all query heads, so q+o heads train "
                            "in place of v+o")
    return ("o",), "no v rows per head here, so only o heads train in place of v+o"


def _one_side_per_weight(units: list[Unit]) -> list[Unit]:
    """Train each weight along one dim only: in a chain of linears (Linear, ReLU, Linear, ...) a middle weight is
    the consumer of one group (columns) and the producer of the next (rows), and S2FTLinear's blocks run along
    one dim. The weight trains as the producer (its rows; the other group keeps its other weights), so no
    model is refused for it; a unit left with nothing to train is dropped."""
    dims: dict[str, dict[int, str | None]] = {}
    for u in units:
        for pairs in u.projections.values():
            for m, _ in pairs:
                dims.setdefault(m.fqn, {})[m.dim] = m.role
    keep = {f: next((d for d, r in sorted(ds.items()) if r == "out"), min(ds)) for f, ds in dims.items()}
    out = []
    for u in units:
        dropped = sorted({m.fqn for pairs in u.projections.values() for m, _ in pairs if m.dim != keep[m.fqn]})
        if dropped:
            u.projections = {name: kept for name, pairs in u.projections.items()
                             if (kept := [(m, o) for m, o in pairs if m.dim == keep[m.fqn]])}
            u.notes.append(f"{', '.join(dropped)} trains on its output side with the group it produces, not on "
                           "its input side here (a weight trains along one dim)")
        if u.projections:
            out.append(u)
    return out


# ---------------------------------------------------------------------- scoring
def _ranked(u: Unit) -> Units:
    """How S²FT describes a unit to an importance: the slices it would train (summed), observed at its consumer's
    input (unweighted: S²FT retrains the consumer's columns)."""
    weights = [UnitSlice.span(m.fqn, m.dim, occ, m.role, m.expert) for pairs in u.projections.values()
               for m, occ in pairs]
    # an expert's channels are not features of its module's input: no feed (activation falls back to magnitude)
    consumer = next((m for m in u.group.members if m.role == "in" and not m.is_buffer and m.expert is None), None)
    axis = -1
    if u.kind == "conv":
        # a conv reads its channels along input axis 1; only a consumer whose shape the plan knows can say which
        consumer = next((m for m, _ in u.projections.get("in", [])), None)
        axis = 1 if consumer is not None and len(u.shapes.get(consumer.fqn, ())) > 2 else -1
    feeds = []
    if consumer is not None:
        sl = UnitSlice.span(consumer.fqn, consumer.dim, consumer.occurrences[0], "in")
        feeds.append(Feed(sl.module, axis, sl, weigh=False))
    return Units(u.group.name, u.group.num_units, weights, feeds, Combine.SUM, torch.float32)


def _score(model: nn.Module, units: list[Unit], cfg: S2FTConfig, process_group: Any = None
           ) -> dict[str, torch.Tensor]:
    calib = Calibration(list(cfg.calibration or []), cfg.loss_fn, option("strategy", cfg.strategy), "strategy",
                        progress=cfg.progress, distributed=cfg.distributed, process_group=process_group)
    return resolve(cfg.strategy, cfg.seed)(model, [_ranked(u) for u in units], calib)


def _select(units: list[Unit], scores: dict[str, torch.Tensor], cfg: S2FTConfig) -> None:
    ratio = {"attention": cfg.attention_ratio, "ffn": cfg.ffn_ratio, "conv": cfg.conv_ratio}
    if cfg.budget is not None:
        # one scale s on both ratios so that the trainable parameter count fits the budget
        def cost(scale: float) -> int:
            return sum(_count(u, ratio[u.kind] * scale) * u.cost_per_unit for u in units)

        lo, hi = 0.0, 1.0 / max(ratio.values())
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if cost(mid) <= cfg.budget else (lo, mid)
        ratio = {k: min(1.0, v * lo) for k, v in ratio.items()}
    if cfg.scope == "per_layer":
        picks = select([scores[u.group.name] for u in units], [_count(u, ratio[u.kind]) for u in units], highest=True)
        for u, p in zip(units, picks):
            u.selected = p
    else:
        for kind in ratio:
            of_kind = [u for u in units if u.kind == kind]
            k = int(round(ratio[kind] * sum(u.group.num_units for u in of_kind))) if cfg.budget is None else None
            admit = _within(of_kind, cfg.budget * _share(units, kind, ratio)) if cfg.budget is not None else None
            picks = select([scores[u.group.name] for u in of_kind], k, highest=True, admit=admit)
            for u, p in zip(of_kind, picks):
                u.selected = p
    _lift_to_min_units(units, scores, cfg)
    # with a budget the ratios only weigh the kinds, so a kind left out is the budget's choice, not a rounding slip;
    # with min_units no layer is left out
    hints = _zero_unit_hints(units, cfg) if cfg.budget is None and cfg.min_units == 0 else []
    if not any(u.selected for u in units):
        raise ConfigError(
            "the ratios/budget select no unit at all; raise attention_ratio/ffn_ratio/conv_ratio or the budget "
            f"(smallest unit costs {min(u.cost_per_unit for u in units)} parameters)."
            + "".join(f" {h}" for h in hints)
        )
    for h in hints:
        warnings.warn(f"S²FT: {h}", ZeroUnitsWarning, stacklevel=3)


def _within(units: list[Unit], cap: float) -> Callable[[int], bool]:
    """Admits ``units[i]`` while their parameter cost fits ``cap``; one that would overrun it is skipped, so a
    cheaper unit further down the ranking may still fit."""
    spent = [0]

    def admit(i: int) -> bool:
        if spent[0] + units[i].cost_per_unit > cap:
            return False
        spent[0] += units[i].cost_per_unit
        return True

    return admit


def _count(u: Unit, ratio: float) -> int:
    k = int(round(ratio * u.group.num_units))
    return min(u.group.num_units, k)


_UNIT_NAMES = {"attention": "heads", "ffn": "channels", "conv": "conv channels"}


def _zero_unit_hints(units: list[Unit], cfg: S2FTConfig) -> list[str]:
    """One sentence per kind whose ratio rounds to zero units somewhere, with the smallest ratio that selects one.

    ``round(r * n)`` is 1 at ``r = 1 / n`` (Python rounds 0.5 to even, i.e. to 0, so ``0.5 / n`` is not enough)."""
    hints = []
    for kind in ("attention", "ffn", "conv"):
        of_kind = [u for u in units if u.kind == kind]
        if not of_kind:
            continue
        field_name, ratio, what = f"{kind}_ratio", getattr(cfg, f"{kind}_ratio"), _UNIT_NAMES[kind]
        if cfg.scope == "per_layer":
            empty = [u for u in of_kind if _count(u, ratio) == 0]
            if not empty:
                continue
            sizes = sorted({u.group.num_units for u in empty})
            layers = sorted({u.group.layer for u in empty if u.group.layer is not None})
            where = f" (layers {layers})" if len(empty) < len(of_kind) and layers else ""
            hints.append(
                f"{field_name} {ratio:g} selects 0 of {'/'.join(map(str, sizes))} {what} per layer{where}, so no "
                f"{kind} unit trains there; {1 / sizes[0]:.4g} or more selects one."
            )
        else:
            total = sum(u.group.num_units for u in of_kind)
            if int(round(ratio * total)) == 0:
                hints.append(
                    f"{field_name} {ratio:g} selects 0 of {total} {what} across layers (scope='global'), so no "
                    f"{kind} unit trains; {1 / total:.4g} or more selects one."
                )
    return hints


def _share(units: list[Unit], kind: str, ratio: dict[str, float]) -> float:
    weights = {k: ratio[k] * sum(u.group.num_units * u.cost_per_unit for u in units if u.kind == k) for k in ratio}
    total = sum(weights.values())
    return weights[kind] / total if total else 0.0


# ---------------------------------------------------------------------- the trainable module
class S2FTLinear(S2FTBlocks):
    """A frozen linear layer whose selected contiguous row/column blocks are trainable parameters.

    ``weight`` keeps the wrapped module's parameter (and shape: ``[out, in]`` for ``nn.Linear``,
    ``[in, out]`` for transposed layers such as transformers' ``Conv1D``). ``blocks[i]`` is the
    trainable slice ``weight.narrow(param_dim, starts[i], lengths[i])``.

    With ``layout="view"`` every block is one dense span of memory: fused and foreach optimizers walk a
    parameter's memory linearly, and a column block of a row-major weight is a strided view with gaps, so
    ``AdamW(fused=True)`` would write the frozen columns between its rows. A weight whose blocks run along
    a dim that is not outermost in memory is therefore re-stored with that dim outermost (same Parameter
    object, shape and values; column-major for column blocks): :func:`s2ft` does it, and this constructor
    refuses a view layout whose blocks would have gaps. Autograd then hands each block a gradient with the
    block's strides and optimizers create state with them. ``merge`` makes the weight row-major again, and
    ``state_dict()`` emits contiguous copies of such a weight and of view blocks, so the dict saves with
    safetensors (which refuses strided and memory-sharing tensors) and loads back into either layout.

    Example:
        >>> lin = nn.Linear(8, 4)
        >>> lin.weight.data = lin.weight.data.t().contiguous().t()  # column blocks need columns outermost
        >>> m = S2FTLinear(lin, lin.weight, lin.bias, False, param_dim=1, starts=[2], lengths=[3], layout="view")
        >>> m.blocks[0].t().is_contiguous()
        True
    """

    @property
    def logical_dim(self) -> int:
        """Dim of the [out, in] weight the blocks run along."""
        return 1 - self.param_dim if self.transposed else self.param_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t() if self.transposed else self.weight
        blocks = [b.t() if self.transposed else b for b in self.blocks]
        return torch.ops.sparsify.s2ft_linear(x, w, self.bias, blocks, self.logical_dim, self.starts)

    def extra_repr(self) -> str:
        return (f"weight={tuple(self.weight.shape)}, "
                + self._trained_repr("rows" if self.logical_dim == 0 else "columns"))


def _linear_orientation(module: nn.Module, fqn: str, in_dim: int | None) -> bool:
    """Is ``module`` a linear layer y = x @ W.T + b (False) or y = x @ W + b (True)?

    With real weights it is checked numerically, so any module that computes a linear map of its last dim
    qualifies, whatever its type. A meta weight has no values to compare: the orientation is the same one the
    numeric check assumes (from the analysis' ``in_dim``), checked against the module type where that fixes it
    (``nn.Linear``; transformers' ``Conv1D``, weight ``[in, out]``) and otherwise by a run on meta that checks
    the output shape. So a meta model gets the same orientation, hence the same plan, as the same model on CPU;
    what meta cannot check is that a custom module's map is plain linear (a scaled or masked one passes).

    Args:
        module: the layer whose weight S²FT will train.
        fqn: the weight's FQN, for messages.
        in_dim: the weight dim the analysis saw contract the input, or None when it did not say.

    Example:
        >>> _linear_orientation(nn.Linear(4, 3), "fc.weight", 1)
        False
    """
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ConfigError(f"{fqn}: S²FT trains 2-D linear weights; this module's weight is not one.")
    if w.is_meta:
        return _meta_orientation(module, w, fqn, in_dim)
    transposed = in_dim == 0
    n_in = w.shape[0] if transposed else w.shape[1]
    x = torch.randn(3, n_in, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        try:
            # forward, not __call__: a user's hook on the layer (which the swap keeps) is not part of its map
            y = module.forward(x)
        except Exception as exc:
            raise ConfigError(f"{fqn}: cannot run {type(module).__name__} as a linear layer ({exc}).") from exc
        b = getattr(module, "bias", None)
        ref = x @ (w if transposed else w.t()) + (b if isinstance(b, torch.Tensor) else 0)
    if not isinstance(y, torch.Tensor) or y.shape != ref.shape or not torch.allclose(y, ref, rtol=1e-4, atol=1e-5):
        raise ConfigError(
            f"{fqn}: {type(module).__name__} does not compute a plain linear map of its input, so its weight "
            "cannot be trained through S²FT's sparse linear; leave that projection out of the config."
        )
    return transposed


def _meta_orientation(module: nn.Module, w: torch.Tensor, fqn: str, in_dim: int | None) -> bool:
    """:func:`_linear_orientation` for a meta weight: the same assumed orientation as the numeric check
    (``in_dim == 0``), checked against the module type where it is known, else by a shape-only run."""
    transposed = in_dim == 0
    # exact types: a subclass may override forward (a quantised or adapter-wrapped Linear)
    lt = layer_type(module, exact=True)
    known = lt.in_dim(module) == 0 if lt is not None and lt.is_linear else None
    if known is None and in_dim is None and w.shape[0] == w.shape[1]:
        raise ConfigError(
            f"{fqn}: on the meta device S²FT cannot tell whether {type(module).__name__} computes x @ W.T or "
            "x @ W (square weight, no values to compare, and the analysis saw no linear op read it); run s2ft "
            "on the model with real weights (e.g. model.to_empty(device='cpu')), or leave that projection out."
        )
    n_in, n_out = (w.shape[0], w.shape[1]) if transposed else (w.shape[1], w.shape[0])
    with torch.no_grad():
        try:
            y = module(torch.empty(3, n_in, dtype=w.dtype, device=w.device))
        except Exception as exc:
            raise ConfigError(f"{fqn}: cannot run {type(module).__name__} as a linear layer ({exc}).") from exc
    if known not in (None, transposed) or not isinstance(y, torch.Tensor) or tuple(y.shape) != (3, n_out):
        raise ConfigError(
            f"{fqn}: {type(module).__name__} does not compute a plain linear map of its input, so its weight "
            "cannot be trained through S²FT's sparse linear; leave that projection out of the config."
        )
    return transposed


# ---------------------------------------------------------------------- state kept on the model
@dataclass
class S2FTState:
    config: S2FTConfig
    units: list[Unit]
    perms: dict[str, torch.Tensor]  # group name -> permutation applied (new u = old perm[u])
    groups: dict[str, Group]
    slices: list[Slice]
    modules: dict[str, str]  # module FQN -> weight FQN of swapped modules
    base_blocks: dict[tuple[str, int], torch.Tensor]  # (weight fqn, start) -> initial values
    requires_grad: dict[str, bool] = field(default_factory=dict)  # flags before the transform
    # units that trained and left (adaptive re-selection, passes/reselect.py): weight fqn -> {index along its trained
    # dim in original coordinates: base values there}; their deltas stay in the frozen weight and export includes them
    retired: dict[str, dict[int, torch.Tensor]] = field(default_factory=dict)
    experts: dict[str, list[str]] = field(default_factory=dict)  # experts module FQN -> its trained stacked weights


STATE_ATTR = "_sparsify_s2ft"


def state_of(model: nn.Module) -> S2FTState:
    """The S²FT state of a transformed model (or of the module inside its ``torch.compile`` wrapper)."""
    st = getattr(unwrap(model), STATE_ATTR, None)
    if st is None:
        raise ConfigError("this model was not transformed by sparsify_fx.s2ft (nothing to describe/merge/export).")
    return st


# ---------------------------------------------------------------------- the transform
def s2ft(model: nn.Module, example_inputs: Any, config: S2FTConfig | None = None) -> nn.Module:
    """Transform ``model`` in place for structured sparse fine-tuning and return it.

    After the call only the selected blocks require grad; train with any optimizer on ``model.parameters()``.
    The call is a transaction: on any error, ``KeyboardInterrupt`` included, the model is left exactly as it was.

    Args:
        model: any ``nn.Module`` (or its ``torch.compile`` wrapper: the state goes on the module inside).
        example_inputs: a tuple of positional inputs (or a dict of keyword inputs) to trace the model with.
        config: what trains and how units are chosen; :class:`S2FTConfig` defaults if None.

    Example::

        model = sparsify_fx.s2ft(model, (input_ids,), sparsify_fx.S2FTConfig(attention_ratio=0.25))
        opt = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    """
    cfg = config or S2FTConfig()
    cfg.validate()
    target = unwrap(model)
    require_composable(target, Verb.S2FT)
    _refuse_sharded(target)
    if resolve(cfg.strategy).needs_values:
        require_values(target, f"S²FT strategy={cfg.strategy!r}", "it ranks units by weights, activations or "
                       "gradients; strategy='random' plans on the meta device")
    report = analyze(target, example_inputs)
    units = _plan(report, target, cfg)
    scores = _score(target, units, cfg)
    _select(units, scores, cfg)
    units = [u for u in units if u.selected]
    swaps = _swap_plan(target, [u for u in units if u.group.expert is None])
    experts = plan_experts(target, [u for u in units if u.group.expert is not None])
    with Journal(target) as j:
        _apply(target, units, swaps, cfg, j, experts)
    return model


# ---------------------------------------------------------------------- data-based selection on a sharded model
def score_units(model: nn.Module, example_inputs: Any, config: S2FTConfig | None = None, *,
                process_group: Any = None) -> FixedImportance:
    """Score the units ``config`` ranks on a loaded model (plain, replicated on every rank, or FSDP2-sharded) and
    return the scores as an importance with which :func:`s2ft` plans on the meta device.

    This is the large-model flow for data-based strategies: meta → load → score → plan → shard → load. ``s2ft``
    cannot transform a model FSDP2 has already sharded (``fully_shard`` manages only the parameters it saw; S²FT
    adds block parameters), and ranking by gradients or activations needs loaded weights, so the ranking runs on a
    loaded scoring model and the transform on a fresh meta model with ``strategy=`` the returned scores: it picks
    exactly the units the strategy picks on the loaded model, on every rank. The checkpoint is read twice; the peak
    stays one (sharded) model if the scoring model is freed first.

    The structure is analysed on a meta-device twin of a sharded model (``torch.export`` cannot trace through
    FSDP2's hooks and ``DTensor`` parameters), so nothing is gathered for it. Scoring is collective when
    ``torch.distributed`` is initialised and ``config.distributed`` holds: every rank passes its own calibration
    shard and gets the same scores (what equals what: :func:`~sparsify_fx.passes.importance.reduce_group`).

    Args:
        model: the loaded model; it is not changed (gradients and flags are restored).
        example_inputs: positional (tuple) or keyword (dict) inputs to trace the structure with.
        config: the S²FT config whose strategy and calibration rank the units.
        process_group: the group to reduce over; None is the default group.

    Example::

        scorer = build_on_meta(); shard(scorer); scorer.to_empty(device="cpu"); sparsify_fx.load_base(scorer, ckpt)
        cfg = S2FTConfig(strategy="gradient", calibration=[my_shard], layout="separate")
        scores = sparsify_fx.score_units(scorer, (ids,), cfg)   # collective: call it on every rank
        del scorer
        model = build_on_meta()
        sparsify_fx.s2ft(model, (ids,), dataclasses.replace(cfg, strategy=scores))
        shard(model); model.to_empty(device="cpu"); sparsify_fx.load_base(model, ckpt)
    """
    cfg = config or S2FTConfig()
    cfg.validate()
    target = unwrap(model)
    if resolve(cfg.strategy).needs_values:
        require_values(target, f"score_units with strategy={cfg.strategy!r}", "it ranks units by weights, "
                       "activations or gradients; load the checkpoint first")
    twin = _meta_twin(target) if _sharded_param(target) is not None else target
    units = _plan(analyze(twin, example_inputs), twin, cfg)
    scores = _score(target, units, cfg, process_group)
    return FixedImportance(scores, f"{option('strategy', cfg.strategy)} on {type(twin).__name__}")


def _sharded_param(model: nn.Module) -> str | None:
    return next((n for n, p in model.named_parameters() if is_dtensor(p)), None)


def _refuse_sharded(model: nn.Module) -> None:
    name = _sharded_param(model)
    if name is not None:
        raise ConfigError(
            f"s2ft cannot transform a model whose parameters are already sharded ({name} is a DTensor): FSDP2 "
            "manages only the parameters it saw and S²FT adds block parameters. Transform first, then shard: build "
            "on the meta device, s2ft, fully_shard, to_empty, load_base. For strategy='gradient'/'activation', rank "
            "the units on this loaded model with score_units(model, inputs, config) and pass strategy=<those scores> "
            "to s2ft on the meta model."
        )


def _meta_twin(model: nn.Module) -> nn.Module:
    """A structure-only copy of ``model`` on the meta device, for analysis: the same module classes (an FSDP2
    module's own class, FSDP's subclass dropped), names, global shapes and dtypes; no hooks, no values; tied
    tensors stay tied; plain attributes (a transformers config) are shared, read only."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover  (a torch built without distributed)
        FSDPModule = ()  # noqa: N806
    tensors: dict[int, torch.Tensor] = {}
    done: dict[int, nn.Module] = {}

    def meta(t: torch.Tensor, param: bool) -> torch.Tensor:
        if id(t) not in tensors:
            e = torch.empty(tuple(t.shape), dtype=t.dtype, device="meta")
            tensors[id(t)] = nn.Parameter(e, requires_grad=t.requires_grad) if param else e
        return tensors[id(t)]

    def clone(mod: nn.Module) -> nn.Module:
        if id(mod) in done:
            return done[id(mod)]
        cls = next(c for c in type(mod).__mro__ if not (FSDPModule and issubclass(c, FSDPModule)))
        new = object.__new__(cls)
        new.__dict__.update(mod.__dict__)
        for k, v in mod.__dict__.items():
            # FSDP2's gathering hooks (and anyone else's) would run on meta tensors
            if k.startswith("_") and "hooks" in k and isinstance(v, dict):
                new.__dict__[k] = type(v)()
        new.__dict__["_parameters"] = {n: None if p is None else meta(p, True) for n, p in mod._parameters.items()}
        new.__dict__["_buffers"] = {n: None if b is None else meta(b, False) for n, b in mod._buffers.items()}
        done[id(mod)] = new
        new.__dict__["_modules"] = {n: None if c is None else clone(c) for n, c in mod._modules.items()}
        return new

    return clone(model)


@dataclass
class _Swap:
    """One weight whose module becomes an :class:`S2FTLinear`: where its blocks are and how it computes."""

    module: str
    weight: str
    transposed: bool
    dim: int  # parameter dim the blocks run along
    slices: list[Slice]


def _swap_plan(model: nn.Module, units: list[Unit]) -> list[_Swap]:
    """Check every weight that will train (runs each module once as a linear map) before anything is written."""
    by_weight: dict[str, list[Slice]] = {}
    for u in units:
        for proj, pairs in u.projections.items():
            for m, occ in pairs:
                by_weight.setdefault(m.fqn, []).extend(_slices_of(u, proj, m, occ))
    swaps: list[_Swap] = []
    frozen: list[str] = []
    for wfqn, ss in by_weight.items():
        ss = _union(ss)
        dims = {s.dim for s in ss}
        if len(dims) != 1:
            raise ConfigError(f"{wfqn} would train rows and columns at once; select one side per weight.")
        mod_name, _ = split_fqn(wfqn)
        # the weight dim that contracts the layer's input: the member's dim where the group is consumed,
        # the other dim where it is produced
        role_in = next((m.dim for u in units for m in u.group.members if m.fqn == wfqn and m.role == "in"), None)
        pdim = ss[0].dim
        if is_conv(get_module(model, mod_name)):  # S2FTConv: the module's own conv, checked when planned
            swaps.append(_Swap(mod_name, wfqn, False, pdim, sorted(ss, key=lambda s: s.start)))
            continue
        in_dim = role_in if role_in is not None else (1 - pdim if _is_out(units, wfqn) else None)
        try:
            transposed = _linear_orientation(get_module(model, mod_name), wfqn, in_dim)
        except ConfigError as exc:
            frozen.append(str(exc))  # a bias-table projection, a quantised linear: that weight stays frozen
            continue
        swaps.append(_Swap(mod_name, wfqn, transposed, pdim, sorted(ss, key=lambda s: s.start)))
    if frozen and not swaps:
        raise ConfigError("S²FT has no weight it can train:\n  " + "\n  ".join(frozen))
    if frozen:
        warnings.warn(
            f"S²FT leaves {len(frozen)} weight(s) of the selected units frozen (the other projections of those "
            "units train): " + "; ".join(frozen[:3]) + (" ..." if len(frozen) > 3 else ""),
            FrozenWeightWarning,
            stacklevel=3,
        )
    return swaps


def _slices_of(u: Unit, proj: str, m: Member, occ: Occurrence) -> list[Slice]:
    """The blocks unit ``u`` trains in one occurrence, after co-permutation (the selected units lead it).

    One block per base offset of the occurrence (a within-head channel recurs once per head); with a part
    (v inside a fused q/k/v head) one block per selected unit and base offset, that part of the unit.
    """
    k = len(u.selected)
    part = u.part(proj, m, occ)
    if part is None:
        return [Slice(m.fqn, m.dim, base, k * occ.inner, proj, occ) for base in occ.offsets]
    off, n = part
    return [Slice(m.fqn, m.dim, base + i * occ.inner + off, n, proj, occ) for base in occ.offsets for i in range(k)]


def _union(slices: list[Slice]) -> list[Slice]:
    """Merge overlapping blocks of one weight (two groups that are different digits of one dim, e.g. the heads and
    the within-head channels of an attention that the analysis saw as two channel groups, both select indices
    there); blocks of one dim that only touch stay separate, so each keeps its projection's name."""
    out: list[Slice] = []
    for s in sorted(slices, key=lambda s: (s.dim, s.start)):
        last = out[-1] if out else None
        if last is not None and last.dim == s.dim and s.start < last.start + last.length:
            end = max(last.start + last.length, s.start + s.length)
            name = last.projection if s.projection == last.projection else f"{last.projection}+{s.projection}"
            out[-1] = Slice(last.fqn, last.dim, last.start, end - last.start, name, last.occurrence)
        else:
            out.append(s)
    return out


def _dense_block_layout(j: Journal, weight: nn.Parameter, dim: int) -> None:
    """Store ``weight`` so that a block along ``dim`` is one dense piece of memory.

    A column block of a row-major weight is a strided view with gaps; fused optimizers (``AdamW(fused=True)``,
    the Trainer's default) walk a parameter's memory as if it were contiguous and write into the gaps, i.e. into
    frozen weights. With ``dim`` outermost in memory every block is dense (AccumulateGrad gives ``.grad`` the
    parameter's strides and optimizer state copies them). Same Parameter object, same values; :func:`merge`
    restores the row-major layout.
    """
    # also re-stores a weight that is itself a strided view with gaps (rows of a wider buffer)
    if not blocks_are_dense(weight, dim):
        j.set_data(weight, weight.data.movedim(dim, 0).contiguous().movedim(0, dim))


def _apply(model: nn.Module, units: list[Unit], swaps: list[_Swap], cfg: S2FTConfig, j: Journal,
           experts: list[Any] | None = None) -> None:
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    perms: dict[str, torch.Tensor] = {}
    for u in units:
        chosen = set(u.selected)  # built once: a set per unit index was quadratic (8 s of 9 on an 8-layer 8B shape)
        rest = [i for i in range(u.group.num_units) if i not in chosen]
        perm = torch.tensor(u.selected + rest, dtype=torch.long)
        permute(model, u.group, perm, journal=j)
        perms[u.group.name] = perm
    for p in model.parameters():
        j.requires_grad_(p, False)
    modules: dict[str, str] = {}
    base_blocks: dict[tuple[str, int], torch.Tensor] = {}
    for sw in swaps:
        module = get_module(model, sw.module)
        if cfg.layout == "view":
            _dense_block_layout(j, module.weight, sw.dim)
        new = (S2FTConv if is_conv(module) else S2FTLinear)(
            module,
            module.weight,
            getattr(module, "bias", None),
            sw.transposed,
            sw.dim,
            [s.start for s in sw.slices],
            [s.length for s in sw.slices],
            cfg.layout,
        )
        for s in sw.slices:
            base_blocks[(sw.weight, s.start)] = module.weight.detach().narrow(sw.dim, s.start, s.length).clone()
        j.swap_module(model, sw.module, new)
        modules[sw.module] = sw.weight
    # stacked expert weights: per-expert blocks inside the experts module (s2ft_experts)
    expert_modules = apply_experts(model, experts or [], cfg.layout, j, base_blocks)
    groups = {u.group.name: u.group for u in units}
    slices = [s for sw in swaps for s in sw.slices] + [s for p in experts or [] for s in p.slices]
    state = S2FTState(cfg, units, perms, groups, slices, modules, base_blocks, flags,
                       experts=expert_modules)
    j.setattr(model, STATE_ATTR, state, raw=True)
    # the embeddings are frozen now: reentrant activation checkpointing needs their output to require grad
    j.on_rollback(lambda: drop_checkpointing_grads(model), "checkpointing input-grad hook")
    keep_checkpointing_grads(model)


def _is_out(units: list[Unit], wfqn: str) -> bool:
    return any(m.fqn == wfqn and m.role == "out" for u in units for m in u.group.members)


def describe(model: nn.Module) -> str:
    """Print and return, per layer, what trains and how many parameters."""
    st = state_of(model)
    lines = [f"S²FT ({st.config.strategy}, scope={st.config.scope}, layout={st.config.layout})"]
    # blocks are slices of their frozen weight: count each weight once
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if ".blocks." not in f".{n}")
    for u in st.units:
        n = sum(s.length * _per_index(tuple(_tensor(model, s.fqn).shape), s) for s in st.slices
                if s.fqn in _fqns(u) and s.expert == u.group.expert)
        projs = "+".join(u.projections)
        kind = u.group.kind if u.group.expert is None else f"{u.group.kind}[expert {u.group.expert}]"
        lines.append(
            f"  layer {u.group.layer if u.group.layer is not None else '-':>3}  {kind:15s} "
            f"{len(u.selected):>4}/{u.group.num_units:<4} units {str(u.selected[:8])[:-1]}"
            f"{', ...]' if len(u.selected) > 8 else ']'}  {projs:12s} {n:>10,d} params"
        )
        # what trains in place of the config's choice (closest projections, one side of a chain), and why
        lines.extend(f"        note: {note}" for note in u.notes)
    lines.append(f"  trainable {trainable:,d} of {total:,d} parameters ({100 * trainable / max(total, 1):.3f} %)")
    text = "\n".join(lines)
    print(text)
    return text


def _per_index(shape: tuple[int, ...], s: Slice) -> int:
    """Elements of a slice's tensor per index along its dim (inside one expert's slice for an expert block)."""
    return _across(shape, s.dim) if s.expert is None else expert_numel(shape, s.dim)


def _fqns(u: Unit) -> set[str]:
    return {m.fqn for pairs in u.projections.values() for m, _ in pairs}


def merge(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The plain model: original module types, original unit order, trained weights in place.

    Outputs equal the transformed model's. Everything laid out like a permuted weight moves back with it (N:M
    masks added by a later :func:`~sparsify_fx.sparsify`), hooks on the swapped modules stay, and the weights get
    their row-major layout back. The in-place merge is a transaction: on any error the model is unchanged.

    Args:
        model: a model returned by :func:`s2ft` (or its ``torch.compile`` wrapper).
        inplace: merge ``model`` itself; by default it is left as it is and a merged copy is returned.

    Example::

        plain = sparsify_fx.merge(model)   # a copy; model still trains
    """
    state_of(model)
    if not inplace:
        model = copy.deepcopy(model)
    target = unwrap(model)
    st = state_of(target)
    with Journal(target) as j:
        for mod_name in st.modules:
            wrapped = get_module(target, mod_name)
            w = wrapped.weight
            # separate layout: the trained values live in the blocks
            for dst, b in separate_blocks(wrapped.block_slots()):
                j.copy_(dst, b.detach())
            if not w.is_contiguous():
                j.set_data(w, w.data.contiguous())
            original = wrapped._original
            if original.weight is not w:
                j.setattr(original, "weight", w)
            if wrapped.bias is not None and getattr(original, "bias", None) is not wrapped.bias:
                j.setattr(original, "bias", wrapped.bias)
            j.swap_module(target, mod_name, original, attributes=False)
        merge_experts(target, st.experts, j)
        for name, perm in st.perms.items():
            permute(target, st.groups[name], torch.argsort(perm), journal=j)
        for n, p in target.named_parameters():
            j.requires_grad_(p, st.requires_grad.get(n, True))
        j.setattr(target, STATE_ATTR, None, raw=True)
    drop_checkpointing_grads(target)  # after the commit: a dict deletion, nothing left that can fail
    return model
