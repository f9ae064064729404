"""Structured pruning of coupled groups: remove whole heads, FFN channels or conv channels.

``prune(model, example_inputs, PruneConfig(...))`` analyses the model's coupled structures
(:func:`sparsify_fx.analyze`), scores the units of each group, and removes the lowest-scoring ones
from *every* member of the group at once, so the result is a physically smaller model of the same
module types that computes what the original computes with those units' contributions cut.

Grouped-query attention: a ``kv_heads`` group removes kv heads together with all their query
heads. The ``attention_heads`` group of a GQA layer holds the query heads *within* a kv group, with
one shared unit index across all kv groups, so pruning it removes the same query-head slot from
every kv group: every kv head keeps the same number of query heads and the model stays a valid GQA
model. A float ratio prunes ``attention_heads`` (query heads) only; name ``kv_heads`` to remove kv
heads.

The pass plans everything (scores, kept indices, new tensors, attribute updates) before it writes
anything; writes go through a journal that is rolled back if anything fails, including the final
check that the pruned model runs and matches the original with the removed contributions zeroed.
"""

from __future__ import annotations

import contextlib
import linecache
import logging
import math
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn

from sparsify_fx.analysis import CouplingReport, Group, Member, analyze
from sparsify_fx.errors import ConfigError, SparsifyError, SparsifyWarning
from sparsify_fx.passes._batch import run_batch
from sparsify_fx.passes._config import (
    check_bool,
    check_calibration,
    check_choice,
    check_loss_fn,
    check_seed,
    is_int,
    is_real,
)
from sparsify_fx.passes.hf import warn_if_not_pretrained
from sparsify_fx.passes.importance import (
    Calibration,
    Combine,
    Feed,
    Importance,
    Stats,
    Units,
    UnitSlice,
    option,
    resolve,
    select,
)
from sparsify_fx.passes.layers import layer_type
from sparsify_fx.passes.surgery import Journal, Verb, get_module, require_composable, require_values, unwrap
from sparsify_fx.passes.surgery import get_tensor as _get
from sparsify_fx.passes.surgery import split_fqn as _split

log = logging.getLogger("sparsify_fx")

KINDS = ("attention_heads", "kv_heads", "head_dim", "ffn_channels", "conv_channels", "channels", "hidden")
# what a single float ratio prunes (hidden only with prune_hidden=True; kv_heads only when named)
DEFAULT_KINDS = ("attention_heads", "ffn_channels", "conv_channels", "channels")
Score = Literal["magnitude", "activation", "taylor", "random"]
SCORES = ("magnitude", "activation", "taylor", "random")  # names from importance.IMPORTANCES


@dataclass
class PruneConfig:
    """What to remove and how units are ranked.

    - ``ratio``: fraction of units removed, one float for every prunable kind present
      (attention_heads, ffn_channels, conv_channels, channels, and hidden when ``prune_hidden``), or
      a dict per kind, e.g. ``{"attention_heads": 0.25, "ffn_channels": 0.25}``. Per group,
      ``round(ratio * units)`` units go (half rounds up).
    - ``scope``: ``"per_layer"`` removes that fraction from every group; ``"global"`` ranks all units
      of a kind across groups (each group keeps at least ``keep_min``).
    - ``score``: ``magnitude`` (product over the group's modules of each unit's weight norm, so a
      unit whose consumer columns or norm affine are zero scores 0), ``activation`` (energy of each
      unit's contribution at its consumers, ``sum_j |W[:, j]|^2 E[x_j^2]``, from one pass over
      ``calibration``), ``taylor`` (``(sum gradient * weight)^2`` over the unit's consumer weights,
      per batch, summed; loss from ``loss_fn(model, batch)`` or the model's ``.loss``), ``random``
      (seeded control), or any :class:`~sparsify_fx.passes.importance.Importance` (shared with ``s2ft``).
    - ``bias_compensation``: FLAP-style, add the mean contribution of the removed units (measured on
      ``calibration``) to each consumer's bias, creating the bias where the consumer has none.
    - ``prune_hidden``: the residual stream (``hidden`` group) is pruned only when this is set, and
      then in every layer consistently. The same holds for any group a norm or another reduction reads
      whole (``Group.normalized``: a LayerNorm/RMSNorm/GroupNorm, a mean, variance, softmax or sum over the
      features, e.g. ALBERT's factorised embedding, OLMo 2's q/k norm over all heads, BitNet's sub-norms):
      removing units there changes the reduction, which zeroing them at their consumers does not.
    - ``verify``: after pruning, run ``example_inputs`` through the model and compare with the
      original whose removed units were zeroed at their consumers (skipped for hidden, whose norms
      change); on failure the model is restored and ``ConfigError`` raised.
    """

    ratio: float | Mapping[str, float] = 0.25
    scope: Literal["per_layer", "global"] = "per_layer"
    score: Score | Importance = "magnitude"
    bias_compensation: bool = False
    prune_hidden: bool = False
    keep_min: int = 1
    seed: int = 0
    calibration: Iterable[Any] | None = field(default=None, repr=False)
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = field(default=None, repr=False)
    verify: bool = True
    progress: bool = True

    def validate(self) -> None:
        check_choice("PruneConfig.", "scope", self.scope, ("per_layer", "global"))
        if not isinstance(self.score, Importance) and (not isinstance(self.score, str) or self.score not in SCORES):
            raise ConfigError(
                f"PruneConfig.score must be magnitude, activation, taylor or random, got {self.score!r}; or pass an "
                "Importance (sparsify_fx.passes.importance) to rank units your way."
            )
        if not is_int(self.keep_min) or self.keep_min < 1:
            raise ConfigError(f"PruneConfig.keep_min must be an int >= 1, got {self.keep_min!r}.")
        check_seed("PruneConfig.", self.seed)
        for name in ("bias_compensation", "prune_hidden", "verify", "progress"):
            check_bool("PruneConfig.", name, getattr(self, name))
        check_calibration("PruneConfig.", self.calibration)
        check_loss_fn("PruneConfig.", self.loss_fn)
        if not isinstance(self.ratio, int | float | Mapping) or isinstance(self.ratio, bool):
            raise ConfigError(
                f"PruneConfig.ratio must be a float in [0, 1) or a dict kind -> float, got {self.ratio!r}."
            )
        ratios = self.ratio.values() if isinstance(self.ratio, Mapping) else [self.ratio]
        for r in ratios:
            if not is_real(r) or not (0 <= r < 1):
                raise ConfigError(
                    f"PruneConfig.ratio must be in [0, 1) (a ratio of 1 would remove every unit), got {r!r}."
                )
        if isinstance(self.ratio, Mapping):
            unknown = [k for k in self.ratio if k not in KINDS]
            if unknown:
                raise ConfigError(f"PruneConfig.ratio names unknown kind(s) {unknown}; kinds are {list(KINDS)}.")
            if "head_dim" in self.ratio:
                raise ConfigError(
                    "head_dim cannot be pruned: attention modules reshape q, k and v with one shared head "
                    "size, and RoPE couples head_dim across layers; prune attention_heads instead."
                )
            if "hidden" in self.ratio and not self.prune_hidden:
                raise ConfigError("ratio names 'hidden' but prune_hidden=False; set prune_hidden=True to prune it.")
        imp = resolve(self.score)
        if (imp.needs_batches or self.bias_compensation) and self.calibration is None:
            what = option("score", self.score) if imp.needs_batches else "bias_compensation=True"
            raise ConfigError(f"{what} needs calibration batches: pass PruneConfig(calibration=[batch, ...]).")
        if imp.needs_loss and self.calibration is None and self.loss_fn is None:
            raise ConfigError(
                f"{option('score', self.score)} needs a loss: pass loss_fn=lambda model, batch: ... and/or calibration "
                "batches for which the model returns .loss (e.g. with labels)."
            )


# ---------------------------------------------------------------------- helpers
def _unit_index(m: Member, units: int) -> torch.Tensor:
    """[units, k]: the indices along ``m.dim`` that belong to each unit."""
    cols = []
    for occ in m.occurrences:
        if occ.units != units:
            raise ConfigError(f"member {m.fqn}[{m.dim}] has {occ.units} units where its group has {units}.")
        for b in occ.offsets:
            cols.append(b + torch.arange(units)[:, None] * occ.inner + torch.arange(occ.inner)[None, :])
    return torch.cat(cols, dim=1)


def _first_tensor(out: Any) -> torch.Tensor | None:
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        vals = list(out.values())
    elif isinstance(out, list | tuple):
        vals = list(out)
    elif hasattr(out, "to_tuple"):
        vals = list(out.to_tuple())
    else:
        return None
    for v in vals:
        t = _first_tensor(v)
        if t is not None and t.is_floating_point():
            return t
    return None


def _contracted_axis(mod: nn.Module, attr: str, dim: int) -> int | None:
    """Axis of the module's input that weight dim ``dim`` contracts, or None if unknown."""
    lt = layer_type(mod)
    if attr != "weight" or lt is None or lt.in_dim(mod) != dim:
        return None
    return lt.input_axis(mod)


def _out_dim(mod: nn.Module) -> int | None:
    """Weight dim that indexes the module's outputs (bias entries), for the consumers ``_contracted_axis`` found."""
    lt = layer_type(mod)
    return lt.out_dim(mod) if lt is not None else None


# ---------------------------------------------------------------------- plan
@dataclass
class _Consumer:
    """A module that contracts a group's units (a member with role "in")."""

    module: str
    attr: str
    axis: int  # input axis the units sit on
    dim: int  # weight dim


@dataclass
class _GroupPlan:
    group: Group
    removed: list[int]
    idx: dict[tuple[str, int], torch.Tensor]  # (fqn, dim) -> [units, k] indices


def _ranked(p: _GroupPlan, consumers: dict[str, _Consumer]) -> Units:
    """How prune describes a group to an importance: every slice of every member (modules in series, so a unit zero
    in one of them is dead), observed at its hooked consumers and weighed by their columns (which stay)."""
    weights = [UnitSlice(m.fqn, m.dim, p.idx[(m.fqn, m.dim)], m.role, m.expert) for m in p.group.members
               if not m.is_buffer]
    feeds = [Feed(c.module, c.axis, s) for s in weights
             if s.role == "in" and (c := consumers.get(s.fqn)) is not None and c.dim == s.dim]
    return Units(p.group.name, p.group.num_units, weights, feeds, Combine.PRODUCT, torch.float64)


def _stream_like(g: Group) -> bool:
    """The hidden stream, or any space a norm or another reduction reads whole (see the analysis's
    ``_mark_read_whole``): pruning it changes the function beyond removing the units' contributions, so it
    happens only with prune_hidden and is not checked against zeroing."""
    return g.kind == "hidden" or g.normalized


def _resolve_ratios(report: CouplingReport, cfg: PruneConfig) -> tuple[dict[str, float], list[Group]]:
    """The ratio per kind and the groups it prunes (hidden and normalised ones only with prune_hidden)."""
    present = {g.kind for g in report.groups}
    if isinstance(cfg.ratio, Mapping):
        absent = [k for k in cfg.ratio if k not in present]
        if absent:
            raise ConfigError(
                f"ratio names kind(s) {absent} that this model does not have; its groups are of kinds "
                f"{sorted(present)} (see sparsify_fx.analyze(model, inputs).summary())."
            )
        ratios = dict(cfg.ratio)
    else:
        kinds = [k for k in DEFAULT_KINDS if k in present]
        if cfg.prune_hidden and "hidden" in present:
            kinds.append("hidden")
        if not kinds:
            raise ConfigError(f"this model has no prunable groups (kinds present: {sorted(present)}).")
        ratios = dict.fromkeys(kinds, float(cfg.ratio))
    if cfg.prune_hidden:
        streams = [g for g in report.groups if _stream_like(g)]
        if not streams:
            raise ConfigError("prune_hidden=True but this model has no unpinned hidden or normalised group to prune.")
        if not any(g.kind in ratios for g in streams):
            named = sorted({g.kind for g in streams})
            raise ConfigError(f"prune_hidden=True but ratio names none of the kinds it enables ({named}); add one.")
    groups = [g for g in report.groups if g.kind in ratios and (cfg.prune_hidden or not _stream_like(g))]
    if isinstance(cfg.ratio, Mapping):
        for kind in ratios:
            if not any(g.kind == kind for g in groups):
                raise ConfigError(
                    f"every {kind} group of this model is normalised, read whole by a norm or another reduction "
                    "(LayerNorm, RMSNorm, GroupNorm, mean, softmax, ...): removing units changes its statistics, as "
                    "for the hidden stream; set prune_hidden=True to prune it anyway."
                )
    return ratios, groups


def _n_remove(ratio: float, units: int) -> int:
    return int(math.floor(ratio * units + 0.5))


def _select(plans: list[_GroupPlan], scores: dict[str, torch.Tensor], ratios: dict[str, float],
            cfg: PruneConfig) -> None:
    by_kind: dict[str, list[_GroupPlan]] = defaultdict(list)
    for p in plans:
        by_kind[p.group.kind].append(p)
    for kind, ps in by_kind.items():
        r = ratios[kind]
        kind_scores = [scores[p.group.name] for p in ps]
        if cfg.scope == "per_layer":
            counts = [_n_remove(r, p.group.num_units) for p in ps]
            # a group no larger than keep_min (a one-head stage) has nothing to give: it stays whole, and the
            # ratio applies to the groups that can meet it
            whole = [p.group.name for p, n in zip(ps, counts) if n and p.group.num_units <= cfg.keep_min]
            if whole:
                counts = [0 if p.group.name in whole else n for p, n in zip(ps, counts)]
                warnings.warn(
                    f"prune keeps the {kind} group(s) {whole[:4]}{' ...' if len(whole) > 4 else ''} whole: each has "
                    f"no more than keep_min={cfg.keep_min} unit(s). The other {kind} groups are pruned at ratio {r}.",
                    UnitsKeptWarning,
                    stacklevel=3,
                )
            for p, n in zip(ps, counts):
                if p.group.num_units - n < cfg.keep_min:
                    raise ConfigError(
                        f"group {p.group.name!r} has {p.group.num_units} units; ratio {r} would remove {n} and "
                        f"leave fewer than keep_min={cfg.keep_min}. Lower the ratio for {kind!r}."
                    )
            picks = select(kind_scores, counts, highest=False)
        else:
            n = _n_remove(r, sum(p.group.num_units for p in ps))
            picks = select(kind_scores, n, highest=False, admit=_keeps(ps, cfg.keep_min))
            if sum(map(len, picks)) < n and r > 0:
                raise ConfigError(
                    f"global ratio {r} for {kind!r} cannot be met while every group keeps keep_min={cfg.keep_min} "
                    "units; lower the ratio or keep_min."
                )
        for p, c in zip(ps, picks):
            p.removed = c


def _keeps(ps: list[_GroupPlan], keep_min: int) -> Callable[[int], bool]:
    """Admits one more removal from ``ps[i]`` while it keeps at least ``keep_min`` units."""
    left = [p.group.num_units for p in ps]

    def admit(i: int) -> bool:
        if left[i] - 1 < keep_min:
            return False
        left[i] -= 1
        return True

    return admit


# ---------------------------------------------------------------------- attribute discovery
_HIDDEN_NAMES = ("hidden_size", "n_embd", "n_embed", "d_model", "embed_dim", "hidden_dim", "dim")


def _category(name: str) -> str | None:
    """What a stored integer counts, judged by its name (generic conventions, no model names)."""
    n = name.lower()
    kv = "key_value" in n or re.search(r"(^|_)kv(_|$)", n) is not None
    if kv and ("group" in n or "per_kv" in n):
        return "groups"
    if "per_kv" in n or "queries_per" in n:
        return "groups"
    if kv and "head" in n and "dim" not in n and "size" not in n:
        return "kv_heads"
    if kv and ("dim" in n or "size" in n) and "head_dim" not in n:
        return "kv_space"
    if "head" in n and "dim" not in n and "size" not in n:
        return "heads"
    if "all_head_size" in n or "split_size" in n or n in ("embed_dim", "inner_dim", "proj_size", "attn_dim"):
        return "head_space"
    if any(k in n for k in ("intermediate", "ffn", "feedforward", "feed_forward", "n_inner", "mlp_dim")):
        return "ffn"
    if n in _HIDDEN_NAMES:
        return "hidden"
    if n in ("embedding_size", "embedding_dim", "embed_size", "emb_dim"):
        return "embedding"  # a factorised embedding's width (ALBERT, ELECTRA): a normalised channel space
    return None


@dataclass
class _AttrUpdate:
    obj: Any
    name: str
    old: Any  # an int, or a list/tuple of split sizes
    new: Any
    where: str


def _quantities(plans: list[_GroupPlan], report: CouplingReport) -> dict[str, dict[str, tuple[int, int]]]:
    """Per owner module prefix: category -> (old count, new count)."""
    by_name = {p.group.name: p for p in plans}
    q: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    attn_done: set[str] = set()
    for p in plans:
        g = p.group
        new = g.num_units - len(p.removed)
        if g.kind in ("attention_heads", "kv_heads"):
            if g.kind == "attention_heads" and g.kv_group is None:  # multi-head: one space for q, k, v
                d = _head_size(g)
                has_kv = any(t in m.tags for m in g.members for t in ("k", "v"))
                qq = q[_owner(g)]
                qq["heads"] = (g.num_units, new)
                qq["head_space"] = (g.num_units * d, new * d)
                if has_kv:
                    qq["kv_heads"] = (g.num_units, new)
                    qq["kv_space"] = (g.num_units * d, new * d)
                continue
            kvg = g if g.kind == "kv_heads" else (by_name[g.kv_group].group if g.kv_group in by_name else None)
            if kvg is None:
                try:
                    kvg = report.group(g.kv_group)  # type: ignore[arg-type]
                except KeyError:
                    continue
            if kvg.name in attn_done:
                continue
            attn_done.add(kvg.name)
            inner = next((x for x in report.groups if x.kv_group == kvg.name), None)
            k_old, gsz = kvg.num_units, kvg.group_size or 1
            k_new = k_old - len(by_name[kvg.name].removed) if kvg.name in by_name else k_old
            g_new = gsz
            if inner is not None and inner.name in by_name:
                g_new = gsz - len(by_name[inner.name].removed)
            d = kvg.unit_size
            qq = q[_owner(kvg)]
            qq["heads"] = (k_old * gsz, k_new * g_new)
            qq["kv_heads"] = (k_old, k_new)
            qq["groups"] = (gsz, g_new)
            qq["head_space"] = (k_old * gsz * d, k_new * g_new * d)
            qq["kv_space"] = (k_old * d, k_new * d)
        elif g.kind == "ffn_channels":
            q[_owner(g)]["ffn"] = (g.num_units, new)
            q[_owner(g)][f"count:{g.name}"] = (g.num_units, new)  # one per group: an owner may hold several
        elif g.kind == "hidden":
            q[""]["hidden"] = (g.num_units, new)
        elif g.kind == "channels" and g.normalized:
            q[g.prefix]["embedding"] = (g.num_units, new)
        elif g.kind in ("channels", "conv_channels"):
            q[_owner(g)][f"count:{g.name}"] = (g.num_units, new)  # one per group: an owner may hold several
    return q


def _owner(g: Group) -> str:
    """The innermost module holding every member of ``g`` and its reported prefix: where the code that reshapes the
    group's space keeps its sizes (the analysis may name one projection as the prefix, e.g. ``...attn.project_q``).

    Example::

        _owner(group)  # 'encoder.layers.0.self_attention' for its q/k/v/out projections
    """
    paths = [g.prefix.split(".") if g.prefix else []] + [_split(m.fqn)[0].split(".") for m in g.members]
    common: list[str] = []
    for parts in zip(*paths):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    return ".".join(common)  # '' for a group spanning top-level modules (a bias table shared by every layer)


def _head_size(g: Group) -> int:
    """Width of one head where the heads are concatenated: the per-unit extent of the output projection's columns
    (what ``context.view(..., all_head_size)`` reshapes), else the widest weight extent. A per-head constant such as
    a relative-position bias column makes the group's ``unit_size`` 1, so that cannot be used."""
    ins = [o.inner for m in g.members if m.role == "in" and not m.is_buffer for o in m.occurrences]
    inners = ins or [o.inner for m in g.members if not m.is_buffer for o in m.occurrences]
    return max([g.unit_size, *inners])


def _int_attrs(obj: Any) -> list[tuple[str, int]]:
    return [(k, v) for k, v in vars(obj).items() if type(v) is int and not k.startswith("_")]


def _size_lists(obj: Any) -> list[tuple[str, list[int] | tuple[int, ...]]]:
    """List/tuple attributes of ints (split sizes such as ``[q_size, kv_size, kv_size]``)."""
    return [(k, v) for k, v in vars(obj).items() if isinstance(v, list | tuple) and v and not k.startswith("_")
            and all(type(x) is int for x in v)]


def _up_to_layer(model: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    """The ancestors of module ``prefix``, innermost first, up to and including the repeated layer that holds it
    (the first one indexed in a ModuleList, e.g. ``layers.3``); never the root model."""
    parts = prefix.split(".") if prefix else []
    out = []
    for n in range(len(parts) - 1, 0, -1):
        name = ".".join(parts[:n])
        out.append((name, model.get_submodule(name)))
        if parts[n - 1].isdigit():
            break
    return out


def _attr_updates(model: nn.Module, plans: list[_GroupPlan], report: CouplingReport) -> list[_AttrUpdate]:
    q = _quantities(plans, report)
    ups: list[_AttrUpdate] = []
    head_owners = {p for p, c in q.items() if "heads" in c}
    config_cats = ("heads", "kv_heads", "ffn", "hidden", "embedding")
    # module attributes: on the module owning the group and its submodules
    for prefix, cats in q.items():
        owner = model.get_submodule(prefix)  # the root for a group spanning the whole model
        for sub_name, sub in owner.named_modules():
            for k, v in _int_attrs(sub):
                cat = _category(k)
                if cat in cats and cat not in ("hidden",):
                    old, new = cats[cat]
                    if v == old and old != new:
                        ups.append(_AttrUpdate(sub, k, v, new, f"{prefix}.{sub_name}".strip(".")))
        ups.extend(_followed_elsewhere(model, prefix, owner, cats))
    if "" in q and "hidden" in q[""]:
        old, new = q[""]["hidden"]
        for name, mod in model.named_modules():
            if any(name == h or name.startswith(h + ".") for h in head_owners):
                continue  # there embed_dim-like names may mean the head space
            for k, v in _int_attrs(mod):
                if _category(k) == "hidden" and k != "dim" and v == old and old != new:
                    ups.append(_AttrUpdate(mod, k, v, new, name))
    # per-model configs: only where every owner agrees on the new value
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None
               and not isinstance(c, nn.Module) and hasattr(c, "__dict__")}
    for cfg in configs.values():
        for k, v in _int_attrs(cfg):
            cat = _category(k)
            if cat not in config_cats:
                continue
            news = {cats[cat][1] for cats in q.values() if cat in cats and cats[cat][0] == v}
            if not news:
                continue
            if len(news) > 1:
                warnings.warn(
                    f"config.{k}={v}: layers were pruned to different sizes {sorted(news)}; the config keeps the "
                    "original value and no longer describes every layer (save the pruned model's state_dict "
                    "with its module structure, not via the config).",
                    stacklevel=3,
                )
                continue
            (new,) = news
            if new != v:
                ups.append(_AttrUpdate(cfg, k, v, new, "config"))
    # one attribute reached from two owners (a shared layer ancestor) is written once; conflicting guesses not at all
    seen: dict[tuple[int, str], list[_AttrUpdate]] = defaultdict(list)
    for u in ups:
        seen[(id(u.obj), u.name)].append(u)
    return [us[0] for us in seen.values() if len({repr(u.new) for u in us}) == 1]


def _followed_elsewhere(model: nn.Module, prefix: str, owner: nn.Module,
                        cats: dict[str, tuple[int, int]]) -> list[_AttrUpdate]:
    """Sizes kept outside the owning module's subtree or under names that do not say what they count.

    * attributes named by category on the owner's ancestors up to its layer (a block that reshapes with
      ``self.num_heads`` while the analysis names an inner projection as the owner);
    * an integer whose name says nothing (``kv_lora_rank``, ``time_step_rank``) equal to a non-head group's old
      count, on the owner or those ancestors, followed only when it is the single such attribute there;
    * lists/tuples of sizes (split sizes) with exactly one entry equal to an old count.
    The pass runs the pruned model afterwards, so a wrong guess is caught and the group kept whole.

    Args:
        model: the model.
        prefix: the owner's name.
        owner: the module owning the group(s).
        cats: category -> (old count, new count) for the groups owned there.

    Example::

        _followed_elsewhere(model, "layers.0.self_attn", attn, {"count:g": (512, 384)})  # kv_lora_rank 512 -> 384
    """
    ups: list[_AttrUpdate] = []
    places = [(prefix, owner), *_up_to_layer(model, prefix)]
    for where, mod in places[1:]:
        for k, v in _int_attrs(mod):
            cat = _category(k)
            if cat in cats and cat != "hidden" and v == cats[cat][0] != cats[cat][1]:
                ups.append(_AttrUpdate(mod, k, v, cats[cat][1], where))
    for old, new in (c for cat, c in cats.items() if cat.startswith("count:") and c[0] != c[1]):
        hits = [(where, mod, k) for where, mod in places if layer_type(mod) is None
                for k, v in _int_attrs(mod) if v == old and _category(k) is None]
        if len(hits) == 1:
            where, mod, k = hits[0]
            ups.append(_AttrUpdate(mod, k, old, new, where))
    news: dict[int, set[int]] = defaultdict(set)
    for cat, (o, n) in cats.items():
        if cat != "hidden":  # the stream's width is followed by name only (it equals many unrelated sizes)
            news[o].add(n)
    olds = {o: next(iter(n)) for o, n in news.items() if len(n) == 1 and o not in n}  # unambiguous changes only
    if olds:
        for where, mod in places:
            for k, v in _size_lists(mod):
                hit = [i for i, x in enumerate(v) if x in olds]
                if len(hit) == 1:
                    nv = list(v)
                    nv[hit[0]] = olds[v[hit[0]]]
                    ups.append(_AttrUpdate(mod, k, v, type(v)(nv), where))  # type: ignore[arg-type]
    return ups


class NothingPrunedWarning(SparsifyWarning):
    """prune found nothing to remove (no prunable group, or every ratio rounds to zero units): the model is
    returned unchanged, and the warning says which."""


class UnitsKeptWarning(SparsifyWarning):
    """Some groups keep all their units because the model did not run (or changed its function) with them pruned,
    e.g. a module that computes a size from a value the pass cannot update, or because a group has no more than
    ``keep_min`` units (a one-head attention stage); the rest of the model is pruned."""


class HeadsKeptWarning(UnitsKeptWarning):
    """Some attention modules keep all their heads because their code derives the head size from the input
    width (``nn.MultiheadAttention``, or any module whose pruned run failed on its heads); the rest is pruned."""


# module types whose forward computes head_dim = query width // num_heads: removing heads cannot be expressed in
# their attributes (the query width is the residual stream), so their head groups are left whole
_WIDTH_DERIVED_HEADS: tuple[type[nn.Module], ...] = (nn.MultiheadAttention,)


def _keep_width_derived_heads(model: nn.Module, plans: list[_GroupPlan]) -> None:
    """Un-remove the head groups of modules that read their head size off the input width, saying which."""
    kept = []
    for p in plans:
        g = p.group
        if not p.removed or g.kind not in ("attention_heads", "kv_heads"):
            continue
        owners = {_split(m.fqn)[0] for m in g.members}
        hit = sorted(o for o in owners if isinstance(get_module(model, o), _WIDTH_DERIVED_HEADS))
        if hit:
            p.removed = []
            kept.extend(hit)
    if kept:
        warnings.warn(
            f"prune keeps every head of {sorted(set(kept))}: nn.MultiheadAttention computes head_dim = "
            "embed_dim // num_heads from the query width (the residual stream), so fewer heads cannot be stored in "
            "its embed_dim/num_heads/head_dim; its FFN and other groups are pruned as asked. Replace it with an "
            "attention module with separate q/k/v projections to prune its heads.",
            HeadsKeptWarning,
            stacklevel=3,
        )


def _nothing_removed(plans: list[_GroupPlan], report: CouplingReport) -> str:
    """Why no unit was selected, for the warning (groups exist: _resolve_ratios refuses a model without any)."""
    if not plans:
        read = sorted({g.kind for g in report.groups if g.kind in DEFAULT_KINDS and _stream_like(g)})
        return (f"every {'/'.join(read) or 'prunable'} group is read whole by a norm or another reduction "
                "(LayerNorm, RMSNorm, mean, softmax over its units, ...), so removing units would change the "
                "function beyond their contributions; set prune_hidden=True to prune such groups anyway")
    small = sorted({f"{p.group.kind} ({p.group.num_units} units)" for p in plans})[:6]
    return (f"every ratio rounds to zero units in every group ({', '.join(small)}); raise "
            "the ratio or use scope='global'")


def _site_module(exc: BaseException, model: nn.Module) -> str | None:
    """Name of the innermost module of ``model`` whose forward was running when ``exc`` was raised, or None."""
    names = {id(m): n for n, m in model.named_modules()}
    tb, site = exc.__traceback__, None
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            site = names[id(owner)]
        tb = tb.tb_next
    return site


class _Mismatch(ConfigError):
    """The pruned model ran but its output is not the ablated original's (a stored size followed wrongly)."""


class _PrunedRunFailed(Exception):
    """The pruned model failed its check (the model is restored): ``refusal`` is the error prune raises if no group
    can be kept back to make it run; ``site`` the innermost failing module, if known."""

    def __init__(self, refusal: ConfigError, site: str | None) -> None:
        super().__init__(str(refusal))
        self.refusal, self.site = refusal, site


_HEAD_KINDS = ("attention_heads", "kv_heads")


def _related(prefix: str, site: str) -> bool:
    """``prefix`` (a group's owning module) is ``site``, contains it or lies inside it."""
    return bool(prefix) and (prefix == site or site.startswith(prefix + ".") or prefix.startswith(site + "."))


def _groups_to_keep(e: _PrunedRunFailed, active: list[_GroupPlan], model: nn.Module) -> list[_GroupPlan]:
    """The groups to prune no more after a failed run: the kind that failed, in every module of the failing type.

    The groups owned by (or around) the failing module name the kind, heads first (a head count is what module
    code most often re-derives from a width); every active group of that kind whose owner has the same module type
    is kept back, so one retry covers all layers built from the same code. Without a site (the output differed)
    the head groups go first. Returns [] when nothing fits, and prune refuses.

    Args:
        e: the failure, with the failing module's name when the traceback showed one.
        active: the groups that lost units in the failed attempt.
        model: the (restored) model, for the owners' types.

    Example::

        back = _groups_to_keep(failure, active, model)  # e.g. every BlipAttention's attention_heads group
    """
    near = [p for p in active if e.site is not None and _related(p.group.prefix, e.site)]
    pool = near or [p for p in active if p.group.kind in _HEAD_KINDS]
    if not pool:
        return []
    # one kind per retry, the ones module code most often re-derives first, so the rest stays pruned
    order = [*_HEAD_KINDS, "channels", "conv_channels", "ffn_channels"]
    kind = min((p.group.kind for p in pool), key=lambda k: order.index(k) if k in order else len(order))
    chosen = [p for p in pool if p.group.kind == kind]
    kinds = {kind}

    def owner_type(p: _GroupPlan) -> type | None:
        try:
            return type(get_module(model, p.group.prefix)) if p.group.prefix else None
        except (AttributeError, SparsifyError):
            return None

    types = {owner_type(p) for p in chosen}
    return [p for p in active if p.group.kind in kinds and (p in chosen or owner_type(p) in types)]


def _warn_kept(model: nn.Module, kept: list[tuple[list[_GroupPlan], str]]) -> None:
    """Say which groups prune kept whole because the model did not run with them pruned, and why."""
    for back, why in kept:
        kinds = sorted({p.group.kind for p in back})
        owners = sorted({p.group.prefix for p in back})
        shown = ", ".join(owners[:4]) + (f" and {len(owners) - 4} more" if len(owners) > 4 else "")
        cls = HeadsKeptWarning if set(kinds) <= set(_HEAD_KINDS) else UnitsKeptWarning
        warnings.warn(
            f"prune keeps every unit of the {'/'.join(kinds)} group(s) of {shown}: with them pruned the model did "
            f"not run as before ({why}) The other groups are pruned as asked; to prune these, give the module a "
            "stored size the pass can update.",
            cls,
            stacklevel=3,
        )


def _failure_site(exc: BaseException, model: nn.Module) -> str:
    """The innermost module of ``model`` whose forward was running when ``exc`` was raised, with its line and the
    integer attributes it stores: where a size the pass did not update is read."""
    names = {id(m): n for n, m in model.named_modules()}
    tb, site = exc.__traceback__, ""
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            code = linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).strip()
            attrs = ", ".join(f"{k}={v}" for k, v in _int_attrs(owner)) or "none"
            site = (f"{names[id(owner)] or '(root)'} ({type(owner).__name__}) at "
                    f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}: `{code}`; its integer attributes: {attrs}")
        tb = tb.tb_next
    return site


# ---------------------------------------------------------------------- journaled writes
def _module_fields(j: Journal, mod: nn.Module) -> None:
    """Keep the size fields of standard module types in step with their new weights."""
    lt = layer_type(mod)
    for name, value in lt.size_fields(mod, mod._parameters.get("weight")) if lt is not None else ():
        j.setattr(mod, name, value)


def _aliases(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    out: dict[int, list[tuple[nn.Module, str]]] = defaultdict(list)
    for _name, mod in model.named_modules(remove_duplicate=False):
        for k, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None and all(not (m is mod and n == k) for m, n in out[id(t)]):
                out[id(t)].append((mod, k))
    return out


def _write(j: Journal, model: nn.Module, new_tensors: dict[int, torch.Tensor], tensors: dict[int, torch.Tensor],
           aliases: dict[int, list[tuple[nn.Module, str]]], created: dict[str, torch.Tensor],
           attr_updates: list[_AttrUpdate]) -> None:
    """Put the smaller tensors in place, with the size fields and stored counts that follow them."""
    touched: dict[int, nn.Module] = {}
    for tid, nt in new_tensors.items():
        old = tensors[tid]
        new_obj = nn.Parameter(nt, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else nt
        for mod, name in aliases[tid]:  # tied tensors stay tied: one new object for every alias
            j.set_tensor(mod, name, new_obj)
            touched[id(mod)] = mod
    for mn, b in created.items():
        mod = get_module(model, mn)
        j.set_tensor(mod, "bias", nn.Parameter(b, requires_grad=mod.weight.requires_grad))
    for mod in touched.values():
        _module_fields(j, mod)
    for u in attr_updates:
        j.setattr(u.obj, u.name, u.new)


# ---------------------------------------------------------------------- the pass
def prune(model: nn.Module, example_inputs: Any, config: PruneConfig | None = None) -> nn.Module:
    """Remove the lowest-scoring units of each coupled group from ``model``, in place.

    Weights, biases, norm parameters and buffers of every member shrink together; module size
    fields (``in_features``, ``nf``, ``out_channels``, ``num_features``, ``normalized_shape``, ...)
    and stored counts (integer attributes on the group's owning module and on the model config
    whose name says what they count and whose value equals the old count, e.g. ``num_heads``,
    ``num_key_value_groups``, ``split_size``, ``intermediate_size``) follow. Returns the model.

    Everything is planned before the first write; on any error the model is restored exactly.
    """
    cfg = config if config is not None else PruneConfig()
    cfg.validate()
    wrapper, model = model, unwrap(model)
    require_composable(model, Verb.PRUNE)
    require_values(model, "prune", "it scores units and checks the pruned model's outputs")
    # read once: a generator would be spent by the first of taylor scoring and the statistics pass
    calibration = list(cfg.calibration) if cfg.calibration is not None else None
    imp = resolve(cfg.score, cfg.seed)
    uses_data = imp.needs_batches or imp.needs_loss or cfg.bias_compensation
    if uses_data and calibration is not None and not calibration:
        raise ConfigError("PruneConfig.calibration is empty; pass at least one batch.")
    report = analyze(model, example_inputs)
    ratios, groups = _resolve_ratios(report, cfg)

    # ---- indices of every unit in every member
    plans: list[_GroupPlan] = []
    for g in groups:
        if g.num_units == 0:
            continue  # an empty space (e.g. zero register tokens) has no unit to rank or remove
        idx = {}
        for m in g.members:
            t = _get(model, m.fqn)
            if t.dim() <= m.dim or t.shape[m.dim] != m.size:
                raise ConfigError(
                    f"{m.fqn} has shape {tuple(t.shape)}, group {g.name!r} expects {m.size} at dim {m.dim}."
                )
            idx[(m.fqn, m.dim)] = _unit_index(m, g.num_units)
        plans.append(_GroupPlan(g, [], idx))

    # ---- consumers and calibration statistics
    consumers: dict[str, _Consumer] = {}
    for g in groups:
        for m in g.members:
            if m.role != "in" or m.is_buffer:
                continue
            mod_name, attr = _split(m.fqn)
            axis = _contracted_axis(get_module(model, mod_name), attr, m.dim)
            if axis is not None:
                consumers[m.fqn] = _Consumer(mod_name, attr, axis, m.dim)
    # ---- scores (higher = keep); the activation score's statistics pass is reused by bias compensation
    calib = Calibration(calibration if calibration is not None else [example_inputs], cfg.loss_fn,
                        option("score", cfg.score), "score", "prune", cfg.progress)
    scores = imp(model, [_ranked(p, consumers) for p in plans], calib)
    stats: dict[str, Stats] = {}
    if cfg.bias_compensation:
        inputs = {c.module: c.axis for c in consumers.values()}
        stats = calib.feature_stats(model, inputs, torch.float64, "bias_compensation cannot use them")
    _select(plans, scores, ratios, cfg)
    _keep_width_derived_heads(model, plans)
    active = [p for p in plans if p.removed]
    if not active:
        warnings.warn(f"prune removed nothing: {_nothing_removed(plans, report)}. The model is unchanged.",
                      NothingPrunedWarning, stacklevel=2)
        return wrapper
    # a module whose code reads a size the pass cannot update fails to run once pruned: keep that module type's
    # units of the failing kind (heads first) and prune the rest, rather than refusing the whole model
    kept: list[tuple[list[_GroupPlan], str]] = []
    while True:
        try:
            _apply(model, example_inputs, active, report, consumers, stats, cfg)
            break
        except _PrunedRunFailed as e:
            back = _groups_to_keep(e, active, model)
            if not back or len(back) == len(active):
                raise e.refusal from e.__cause__
            for b in back:
                b.removed = []
            kept.append((back, e.refusal.args[0].split(" Updated counts:")[0]))
            active = [p for p in plans if p.removed]
    _warn_kept(model, kept)
    for p in active:
        log.info("prune: %s removed %d of %d units", p.group.name, len(p.removed), p.group.num_units)
    # said now, before the user saves: from_pretrained rebuilds every layer from one config value per size
    warn_if_not_pretrained(model, "prune", "prune every layer by the same amount (scope='per_layer', one ratio per "
                           "kind, no bias_compensation on bias-free layers)")
    return wrapper


def _apply(model: nn.Module, example_inputs: Any, active: list[_GroupPlan], report: CouplingReport,
           consumers: dict[str, _Consumer], stats: dict[str, Stats], cfg: PruneConfig) -> None:
    """Remove ``active``'s selected units in one journaled transaction and check the pruned model runs (and matches
    the ablated original); on a failed run the model is restored and :class:`_PrunedRunFailed` raised."""
    # ---- keep masks per tensor dim, in original coordinates
    aliases = _aliases(model)
    tensors: dict[int, torch.Tensor] = {}
    masks: dict[int, dict[int, torch.Tensor]] = defaultdict(dict)
    for p in active:
        rem = torch.tensor(p.removed, dtype=torch.long)
        for m in p.group.members:
            t = _get(model, m.fqn)
            tensors[id(t)] = t
            if m.expert is not None:  # one expert's slice of a stacked weight: a keep mask per expert ([E, size])
                mk = masks[id(t)].setdefault(m.dim, torch.ones(t.shape[0], t.shape[m.dim], dtype=torch.bool))
                mk[m.expert, p.idx[(m.fqn, m.dim)][rem].reshape(-1)] = False
                continue
            mk = masks[id(t)].setdefault(m.dim, torch.ones(t.shape[m.dim], dtype=torch.bool))
            mk[p.idx[(m.fqn, m.dim)][rem].reshape(-1)] = False
    _check_expert_widths(masks, tensors)
    _check_structure(model, masks, aliases)

    # ---- bias compensation: mean contribution of removed inputs, per consumer
    deltas: dict[str, torch.Tensor] = {}  # consumer module -> delta over its (original) outputs
    if cfg.bias_compensation:
        for p in active:
            if _stream_like(p.group):
                continue  # norms rescale the stream; a constant offset is not the removed contribution
            rem = torch.tensor(p.removed, dtype=torch.long)
            for m in p.group.members:
                c = consumers.get(m.fqn)
                if c is None or c.dim != m.dim or c.module not in stats or c.attr != "weight":
                    continue
                mod = get_module(model, c.module)
                if _out_dim(mod) is None:
                    continue
                st = stats[c.module]
                mean = (st.s1 / max(st.n, 1))
                cols = p.idx[(m.fqn, m.dim)][rem].reshape(-1).to(mean.device)
                w = mod.weight.detach().double()
                sel = w.index_select(m.dim, cols.to(w.device))
                mu = mean[cols].to(w.device)
                shape = [1] * w.dim()
                shape[m.dim] = -1
                contrib = (sel * mu.view(shape))
                od = _out_dim(mod)
                contrib = contrib.movedim(od, 0).reshape(w.shape[od], -1).sum(1)  # type: ignore[arg-type]
                deltas[c.module] = deltas.get(c.module, 0) + contrib  # type: ignore[operator]

    # ---- new tensors (nothing written yet)
    new_tensors: dict[int, torch.Tensor] = {}
    bias_of = {id(get_module(model, mn)._parameters.get("bias")): mn for mn in deltas
               if get_module(model, mn)._parameters.get("bias") is not None}
    for mn in deltas:  # existing consumer biases take the delta even when no group shrinks them
        b = get_module(model, mn)._parameters.get("bias")
        if b is not None:
            tensors.setdefault(id(b), b)
    for tid, t in tensors.items():
        base = t.detach()
        if tid in bias_of:
            base = base + deltas[bias_of[tid]].to(base.dtype)
        for dim, mk in masks.get(tid, {}).items():
            base = _keep(base, dim, mk)
        new_tensors[tid] = base.clone()
    created: dict[str, torch.Tensor] = {}
    for mn, d in deltas.items():
        mod = get_module(model, mn)
        if mod._parameters.get("bias") is not None:
            continue
        od = _out_dim(mod)
        b = d.to(mod.weight.dtype).to(mod.weight.device)
        mk = masks.get(id(mod.weight), {}).get(od)  # type: ignore[arg-type]
        if mk is not None:
            b = b[mk.to(b.device)]
        created[mn] = b.clone()
    attr_updates = _attr_updates(model, active, report)

    # ---- reference for the check: the original with removed units cut at their consumers
    checkable = cfg.verify and not any(_stream_like(p.group) for p in active)
    ref_out = None
    was_training = model.training
    if cfg.verify:
        model.eval()
    try:
        if checkable:
            ref_out = _ablated_output(model, example_inputs, active, aliases, deltas)
            if ref_out is None:
                checkable = False
        with Journal(model) as j:
            _write(j, model, new_tensors, tensors, aliases, created, attr_updates)
            if cfg.verify:
                try:
                    _verify(model, example_inputs, ref_out if checkable else None, attr_updates)
                except _Mismatch as e:
                    raise _PrunedRunFailed(e, None) from e
                except SparsifyError:
                    raise
                except Exception as e:
                    site = _failure_site(e, model)
                    changed = ", ".join(f"{u.where}.{u.name} {u.old}->{u.new}" for u in attr_updates) or "none"
                    raise _PrunedRunFailed(ConfigError(
                        f"the pruned model failed to run ({type(e).__name__}: {e}); the model was restored."
                        + (f" It failed in {site}." if site else "")
                        + f" Updated counts: {changed}. That module computes a size from a value the pass could "
                        "not update (e.g. head_dim = input width // num_heads): exclude its kind from the ratio "
                        "(e.g. ratio={'ffn_channels': 0.25}) or give the module a stored size the pass can update."
                    ), _site_module(e, model)) from e
    finally:
        model.train(was_training)


def _keep(t: torch.Tensor, dim: int, mask: torch.Tensor) -> torch.Tensor:
    """``t`` with only the kept positions along ``dim``: ``mask`` is ``[size]``, or ``[E, size]`` for a stacked expert
    weight, where each expert keeps its own positions (as many in every expert: :func:`_check_expert_widths`).

    Example:
        >>> _keep(torch.arange(8.).view(2, 1, 4), 2, torch.tensor([[1, 1, 0, 0], [0, 1, 0, 1]], dtype=torch.bool))
        tensor([[[0., 1.]],
        <BLANKLINE>
                [[5., 7.]]])
    """
    if mask.dim() == 1:
        return t.index_select(dim, mask.nonzero().flatten().to(t.device))
    kept = mask.nonzero()[:, 1].view(mask.shape[0], -1).to(t.device)  # row-major: expert by expert, in order
    return torch.stack([t[e].index_select(dim - 1, kept[e]) for e in range(mask.shape[0])])


def _check_expert_widths(masks: dict[int, dict[int, torch.Tensor]], tensors: dict[int, torch.Tensor]) -> None:
    """A stacked expert weight keeps one width: every expert must lose the same number of channels (its own
    ones). Per-layer ratios round per expert group, so they do; a global ranking may not, and is refused here,
    before anything is written."""
    for tid, dims in masks.items():
        for dim, mk in dims.items():
            if mk.dim() != 2:
                continue
            kept = mk.sum(1).tolist()
            if len(set(kept)) != 1 or kept[0] == 0:
                raise ConfigError(
                    f"a stacked expert weight of shape {tuple(tensors[tid].shape)} would keep {kept} channels per "
                    f"expert along dim {dim}; its experts share one tensor, so each must keep the same non-zero "
                    "number. Use scope='per_layer' (the ratio rounds per expert) or a smaller ratio for "
                    "ffn_channels."
                )


def _check_structure(model: nn.Module, masks: dict[int, dict[int, torch.Tensor]],
                     aliases: dict[int, list[tuple[nn.Module, str]]]) -> None:
    for tid, dims in masks.items():
        for mod, name in aliases[tid]:
            lt = layer_type(mod)
            why = lt.keep_error(mod, name, dims) if lt else None
            if why is not None:
                raise ConfigError(why)


def _ablated_output(model: nn.Module, example_inputs: Any, active: list[_GroupPlan],
                    aliases: dict[int, list[tuple[nn.Module, str]]], deltas: dict[str, torch.Tensor]
                    ) -> torch.Tensor | None:
    """Output of the original with removed units zeroed at their consumers (and compensated)."""
    j = Journal(model)
    try:
        zeroed: dict[int, torch.Tensor] = {}
        for p in active:
            ins = [m for m in p.group.members if m.role == "in" and not m.is_buffer]
            if not ins:
                return None
            rem = torch.tensor(p.removed, dtype=torch.long)
            for m in ins:
                t = _get(model, m.fqn)
                z = zeroed.get(id(t))
                if z is None:
                    z = zeroed[id(t)] = t.detach().clone()
                cols = p.idx[(m.fqn, m.dim)][rem].reshape(-1).to(z.device)
                if m.expert is not None:
                    z[m.expert].index_fill_(m.dim - 1, cols, 0)
                else:
                    z.index_fill_(m.dim, cols, 0)
        for tid, z in zeroed.items():
            obj = nn.Parameter(z, requires_grad=False)
            for mod, name in aliases[tid]:
                j.set_tensor(mod, name, obj)
        for mn, d in deltas.items():
            mod = get_module(model, mn)
            b = mod._parameters.get("bias")
            nb = (b.detach() if b is not None else torch.zeros_like(d, dtype=mod.weight.dtype)) + d.to(mod.weight.dtype)
            j.set_tensor(mod, "bias", nn.Parameter(nb.to(mod.weight.device), requires_grad=False))
        with torch.no_grad(), _same_draws(model):
            out = _first_tensor(run_batch(model, example_inputs))
        return None if out is None else out.detach().clone()
    finally:
        j.rollback()


def _same_draws(model: nn.Module) -> contextlib.AbstractContextManager[Any]:
    """The reference and the pruned forward draw the same random numbers: a model that samples in its forward
    even in eval mode (ViT-MAE's masking noise) otherwise differs between two runs of the same weights. The
    caller's generator state is restored afterwards."""
    cuda = sorted({t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"})
    return _seeded_fork(cuda)


@contextlib.contextmanager
def _seeded_fork(cuda_devices: list[int]) -> Iterator[None]:
    with torch.random.fork_rng(devices=cuda_devices):
        # seed only the generators fork_rng restores (torch.manual_seed would reseed every GPU's)
        torch.random.default_generator.manual_seed(0)
        for d in cuda_devices:
            torch.cuda.default_generators[d].manual_seed(0)
        yield


def _verify(model: nn.Module, example_inputs: Any, ref: torch.Tensor | None, ups: list[_AttrUpdate]) -> None:
    with torch.no_grad(), _same_draws(model):
        out = _first_tensor(run_batch(model, example_inputs))
    if ref is None or out is None:
        return
    if out.shape != ref.shape:
        raise _Mismatch(
            f"pruned model output has shape {tuple(out.shape)}, expected {tuple(ref.shape)}; model restored."
        )
    tol = 1e-4 if out.dtype in (torch.float32, torch.float64) else 3e-2
    err = ((out.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    if not err <= tol:
        changed = ", ".join(f"{u.where}.{u.name} {u.old}->{u.new}" for u in ups) or "none"
        raise _Mismatch(
            f"pruned model differs from the original with the removed units zeroed (rel err {err:.2e} > {tol}); "
            f"the model was restored. Updated counts: {changed}. A stored size the pass could not identify is "
            "the likely cause."
        )
