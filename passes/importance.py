"""Scoring and selection of coupled units, shared by every pass that ranks them (``s2ft``, ``prune``).

A pass describes what it ranks as a list of :class:`Units` (one per coupled group: the weight slices each unit
owns, the consumer inputs where its features can be observed, and how the pass reads a score), hands it to an
:class:`Importance` with a :class:`Calibration` (batches, loss, and how errors name the option), and turns the
per-unit scores into a choice with :func:`select`. Config fields take a name from :data:`IMPORTANCES` or any
:class:`Importance` instance, so users can plug their own::

    class L1(Importance):
        def score(self, model, units, calib):
            return {u.name: sum(s.view(model).abs().sum(1) for s in u.weights) for u in units}

    sparsify_fx.prune(model, inputs, PruneConfig(score=L1()))
"""

from __future__ import annotations

import dataclasses
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, ClassVar

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from sparsify_fx.analysis import Occurrence
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes._batch import batch_loss, calibrate
from sparsify_fx.passes.surgery import get_tensor

log = logging.getLogger("sparsify_fx")


class Combine(Enum):
    """How the slices of one unit add up to its magnitude."""

    SUM = "sum"  # slices that all train (S²FT): the unit's weight is their sum
    PRODUCT = "product"  # modules in series (pruning): a unit zero in any module is dead; scores in log space


@dataclass(frozen=True)
class UnitSlice:
    """The part of one tensor each unit owns: ``index[u]`` are unit ``u``'s positions along ``dim``."""

    fqn: str
    dim: int
    index: torch.Tensor  # [units, k] long
    role: str | None = None  # the member's role: "in" (the group is contracted here), "out", or None
    # a stacked expert weight ([E, ...]): the slice lies inside ``t[expert]`` only (``dim`` counts the full tensor's
    # dims), so each expert's units are scored on its own values
    expert: int | None = None

    @classmethod
    def span(cls, fqn: str, dim: int, occ: Occurrence, role: str | None = None,
             expert: int | None = None) -> UnitSlice:
        """The slice of one occurrence's first block: unit ``u`` owns ``[b + u * inner, b + (u + 1) * inner)``."""
        index = occ.offsets[0] + torch.arange(occ.units * occ.inner).view(occ.units, occ.inner)
        return cls(fqn, dim, index, role, expert)

    @property
    def module(self) -> str:
        return self.fqn.rpartition(".")[0]

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """``[units, rest]``: row ``u`` holds every element of ``t`` (this slice's tensor) that unit ``u`` owns."""
        t, dim = self._own(t)
        return t.movedim(dim, 0)[self.index.to(t.device)].reshape(self.index.shape[0], -1)

    def per_index(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over every dim but ``dim``: one value per position along ``dim``."""
        t, dim = self._own(t)
        return t.movedim(dim, 0).reshape(t.shape[dim], -1).sum(1)

    def _own(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The part of ``t`` the slice lies in (one expert's slice of a stacked weight) and its dim there."""
        return (t, self.dim) if self.expert is None else (t[self.expert], self.dim - 1)


@dataclass(frozen=True)
class Feed:
    """Where a group's units enter a consumer module as input features (``axis`` of its first input).

    ``weigh``: score a unit by the energy of its contribution, ``E[x_j^2] |W[:, j]|^2`` over its features ``j``
    (pruning keeps the consumer's columns, so that energy is what removal loses); without it, by ``E[x_j^2]`` alone
    (S²FT retrains those columns, so their current norm says little)."""

    module: str
    axis: int
    weight: UnitSlice  # the consumer weight's slice that reads these features (same positions as the features)
    weigh: bool = True


@dataclass
class Units:
    """One group's rankable units, as a pass describes them to an :class:`Importance`."""

    name: str  # the group's name: the key of the returned scores
    num_units: int
    weights: list[UnitSlice]  # what magnitude and gradient scores read
    feeds: list[Feed] = dataclasses.field(default_factory=list)  # where activation scores observe the units
    combine: Combine = Combine.SUM
    dtype: torch.dtype = torch.float32  # scores are computed and returned in it


@dataclass
class Stats:
    """Per input feature of a consumer, over calibration rows: sum of x, sum of x^2, row count."""

    s1: torch.Tensor
    s2: torch.Tensor
    n: int = 0


@dataclass
class Calibration:
    """What a data-driven importance runs on, and how its errors name the pass option that chose it.

    Args:
        batches: calibration batches (a mapping is keyword inputs, a tuple positional ones), or None.
        loss_fn: ``loss_fn(model, batch) -> scalar``; None uses the model's own ``.loss``.
        option: how messages name the choice, e.g. ``"score='taylor'"``.
        field: the config field, for the fallback advice (``"use score='magnitude'"``).
        where: the pass, prefixed to messages and progress bars (``"prune"``), or ``""``.
        progress: show a progress bar over the batches.
        distributed: when ``torch.distributed`` is initialised with more than one process, sum the statistics
            over ``process_group`` so that every rank ranks the same units from its own calibration shard (see
            :func:`reduce_group`); False scores each rank's batches alone (FSDP2-sharded gradients are averaged
            by FSDP itself either way).
        process_group: the group to reduce over; None is the default (world) group.

    Example:
        >>> Calibration([ids], option="score='activation'", field="score", where="prune").label
        "prune: score='activation'"
    """

    batches: Sequence[Any] | None = None
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None
    option: str = "importance"
    field: str = "score"
    where: str = ""
    progress: bool = False
    distributed: bool = True
    process_group: Any = None
    _stats: dict[tuple[tuple[str, int], ...], dict[str, Stats]] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return f"{self.where}: {self.option}" if self.where else self.option

    @property
    def group(self) -> Any:
        """The process group statistics are reduced over, or None when this process scores alone."""
        return reduce_group(self.process_group) if self.distributed else None

    def require_batches(self) -> Sequence[Any]:
        if not self.batches:
            raise ConfigError(f"{self.label} needs at least one calibration batch; pass calibration=[batch, ...].")
        return self.batches

    def feature_stats(self, model: nn.Module, inputs: Mapping[str, int], dtype: torch.dtype, why: str
                      ) -> dict[str, Stats]:
        """Per-feature sums at each feed's module over the batches (one pass, cached: prune's bias compensation
        reuses the activation score's pass). Non-finite inputs raise, naming the batch and the module.

        Args:
            model: the model the feeds' modules belong to.
            inputs: module FQN -> the axis of its first input that holds the features.
            dtype: accumulation dtype.
            why: what the statistics are for, completing "so ... cannot ..." in the error.

        Example:
            >>> stats = calib.feature_stats(model, {"mlp.down_proj": -1}, torch.float64, "they cannot rank units")
        """
        key = tuple(sorted(inputs.items()))
        if key in self._stats:
            return self._stats[key]
        stats: dict[str, Stats] = {}
        batch_no = [-1]

        def count(_mod: nn.Module, _args: tuple) -> None:
            # the model's own pre-hook fires once per batch, before any inner module's
            batch_no[0] += 1

        def hook(name: str, axis: int) -> Callable[[nn.Module, tuple], None]:
            def fn(_mod: nn.Module, args: tuple) -> None:
                x = args[0].detach().to(dtype)
                x = x.movedim(axis, -1).reshape(-1, x.shape[axis])
                if not torch.isfinite(x).all():
                    # NaN statistics would rank units arbitrarily (and NaN compensated biases)
                    raise ConfigError(
                        f"{self.label}: calibration batch {batch_no[0]} gives non-finite activations (NaN/inf) at "
                        f"the input of {name}, so {why}; drop or fix that batch, or use {self.field}='magnitude'."
                    )
                st = stats.get(name)
                if st is None:
                    st = stats[name] = Stats(x.new_zeros(x.shape[1]), x.new_zeros(x.shape[1]))
                st.s1 += x.sum(0)
                st.s2 += x.pow(2).sum(0)
                st.n += x.shape[0]

            return fn

        hooks = [(model, count)] + [(model.get_submodule(m), hook(m, a)) for m, a in inputs.items()]
        calibrate(model, hooks, self.require_batches(), f"{self.where or 'calibration'} ({self.option})",
                  self.progress)
        if self.group is not None:
            _all_reduce_stats(stats, list(inputs), self.group)
        self._stats[key] = stats
        return stats


class Importance(ABC):
    """Scores the units of each group: higher means more important (kept by ``prune``, trained by ``s2ft``).

    Subclasses implement :meth:`score`; calling the object checks that every group got ``num_units`` finite
    scores and returns them on the CPU in each :class:`Units`' dtype. ``needs_batches`` / ``needs_loss`` let a
    pass refuse a config without calibration data before it reads the model; ``needs_values`` False lets it plan
    on the meta device.

    Example:
        >>> scores = MagnitudeImportance()(model, units)   # {group name: tensor [num_units]}
    """

    needs_batches: ClassVar[bool] = False
    needs_loss: ClassVar[bool] = False
    needs_values: ClassVar[bool] = True  # reads weights or runs the model, so a meta-device model cannot be scored
    fixed_name: ClassVar[str | None] = None  # the name when it does not depend on the object's settings

    @property
    def name(self) -> str:
        """How messages and configs name this scoring: :attr:`fixed_name`, else the class name; subclasses whose
        name depends on their settings override it."""
        return self.fixed_name or type(self).__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    def __call__(self, model: nn.Module, units: Sequence[Units], calib: Calibration | None = None
                 ) -> dict[str, torch.Tensor]:
        calib = calib if calib is not None else Calibration(option=self.name)
        scores = self.score(model, units, calib)
        out = {}
        for u in units:
            s = scores.get(u.name) if isinstance(scores, Mapping) else None
            if not isinstance(s, torch.Tensor) or tuple(s.shape) != (u.num_units,):
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ConfigError(
                    f"{calib.label}: {self!r} must return a tensor of {u.num_units} scores for group {u.name!r}, "
                    f"got {got}."
                )
            s = s.detach().to(device="cpu", dtype=u.dtype)
            if not torch.isfinite(s).all():
                raise ConfigError(
                    f"{calib.label}: {self!r} gives non-finite scores for group {u.name!r}, so its units cannot be "
                    f"ranked; fix the importance or use {calib.field}='random'."
                )
            out[u.name] = s
        return out

    @abstractmethod
    def score(self, model: nn.Module, units: Sequence[Units], calib: Calibration) -> dict[str, torch.Tensor]:
        """``{units.name: tensor [units.num_units]}`` for every entry of ``units``."""


class RandomImportance(Importance):
    """Seeded uniform scores, one draw per group in order (a control, and S²FT's default).

    Args:
        seed: the generator's seed; the same seed and groups give the same scores.

    Example:
        >>> RandomImportance(0)(model, units)
    """

    needs_values = False
    fixed_name = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def __repr__(self) -> str:
        return f"RandomImportance(seed={self.seed})"

    def score(self, model: nn.Module, units: Sequence[Units], calib: Calibration) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed)
        return {u.name: torch.rand(u.num_units, generator=g, dtype=u.dtype) for u in units}


class MagnitudeImportance(Importance):
    """Weight magnitude per unit: ``sum |w|^p`` over each slice it owns, combined as its :class:`Units` says
    (summed, or ``log prod_modules ||w||_p`` so that a unit zero in one module scores lowest).

    Args:
        p: the norm's order (> 0).

    Example:
        >>> MagnitudeImportance(p=1)(model, units)
    """

    def __init__(self, p: float = 2) -> None:
        if isinstance(p, bool) or not isinstance(p, int | float) or not (math.isfinite(p) and p > 0):
            raise ConfigError(f"MagnitudeImportance.p must be a finite number > 0, got {p!r}.")
        self.p = p

    @property
    def name(self) -> str:
        return "magnitude" if self.p == 2 else f"magnitude(p={self.p})"

    def __repr__(self) -> str:
        return f"MagnitudeImportance(p={self.p})"

    def score(self, model: nn.Module, units: Sequence[Units], calib: Calibration) -> dict[str, torch.Tensor]:
        return {u.name: self.of(model, u, calib) for u in units}

    def of(self, model: nn.Module, u: Units, calib: Calibration) -> torch.Tensor:
        """One group's scores."""
        parts: dict[str, torch.Tensor] = {}
        for s in u.weights:
            t = _whole(get_tensor(model, s.fqn)).to(u.dtype)
            e = s.view(t.abs() if self.p != 2 else t).pow(self.p).sum(1).cpu()
            if not torch.isfinite(e).all():
                raise ConfigError(
                    f"{calib.label}: the weights of {s.fqn} (group {u.name!r}) hold NaN/inf values (or overflow "
                    f"{u.dtype} raised to the power {self.p}), so its units cannot be ranked; repair the checkpoint "
                    f"or use {calib.field}='random'."
                )
            # summed: every slice adds to one total; product: one norm per module
            key = s.module if u.combine is Combine.PRODUCT else ""
            parts[key] = parts[key] + e if key in parts else e
        if u.combine is Combine.SUM:
            return parts.get("", torch.zeros(u.num_units, dtype=u.dtype))
        logs = torch.zeros(u.num_units, dtype=u.dtype)
        for e in parts.values():
            logs += torch.log(e.clamp_min(1e-300)) / self.p
        return logs


class ActivationImportance(Importance):
    """Per unit, from one pass over the calibration batches: at each :class:`Feed`, ``sum_j E[x_j^2]`` over the
    unit's input features ``j`` at that consumer, each weighted by its column energy ``|W[:, j]|^2`` where the feed
    says ``weigh``. A group with no observable feed falls back to its magnitude (logged).

    Example:
        >>> ActivationImportance()(model, units, Calibration(batches))
    """

    needs_batches = True
    fixed_name = "activation"

    def score(self, model: nn.Module, units: Sequence[Units], calib: Calibration) -> dict[str, torch.Tensor]:
        inputs = {f.module: f.axis for u in units for f in u.feeds}
        dtype = units[0].dtype if units else torch.float32
        stats = calib.feature_stats(model, inputs, dtype, "they cannot rank units") if inputs else {}
        out = {}
        for u in units:
            s = torch.zeros(u.num_units, dtype=u.dtype)
            found = False
            for f in u.feeds:
                st = stats.get(f.module)
                if st is None:
                    continue  # the module never ran on these batches
                e = (st.s2 / max(st.n, 1)).to(u.dtype).cpu()
                if f.weigh:
                    t = _whole(get_tensor(model, f.weight.fqn)).to(u.dtype)
                    e = f.weight.per_index(t.pow(2)).cpu() * e
                s += e[f.weight.index].sum(1)
                found = True
            if not found:
                log.warning("%s: group %s has no hooked consumer; ranking it by magnitude", calib.where or "score",
                            u.name)
                s = MagnitudeImportance().of(model, u, calib)
                s = s.exp() if u.combine is Combine.PRODUCT else s
            out[u.name] = s
        return out


class GradientKind(Enum):
    FISHER = "fisher"  # sum over batches of squared gradients of the unit's weights
    TAYLOR = "taylor"  # sum over batches of (sum of gradient * weight over the unit's consumer weights)^2


class GradientImportance(Importance):
    """Gradient-based importance from ``calib.loss_fn`` (or the model's ``.loss``) per calibration batch, in eval
    mode (no dropout noise), with the weights' ``requires_grad`` and ``.grad`` restored afterwards.

    - ``"fisher"``: ``sum_b sum_{w in unit} g_w^2`` over every slice the unit owns (the diagonal Fisher).
    - ``"taylor"``: ``sum_b (sum_{w in unit} g_w w)^2`` over the unit's consumer slices (role ``"in"``; all its
      slices where it has none): the first-order change of the loss when the unit is removed.

    Args:
        kind: ``"fisher"`` or ``"taylor"``.

    Example:
        >>> GradientImportance("taylor")(model, units, Calibration(batches, loss_fn=lambda m, b: m(*b).pow(2).mean()))
    """

    needs_loss = True

    def __init__(self, kind: str | GradientKind = GradientKind.FISHER) -> None:
        try:
            self.kind = GradientKind(kind)
        except ValueError:
            raise ConfigError(f"GradientImportance kind must be 'fisher' or 'taylor', got {kind!r}.") from None

    @property
    def name(self) -> str:
        return "gradient" if self.kind is GradientKind.FISHER else "taylor"

    def __repr__(self) -> str:
        return f"GradientImportance({self.kind.value!r})"

    def _targets(self, u: Units) -> list[UnitSlice]:
        if self.kind is GradientKind.FISHER:
            return u.weights
        return [s for s in u.weights if s.role == "in"] or u.weights

    def score(self, model: nn.Module, units: Sequence[Units], calib: Calibration) -> dict[str, torch.Tensor]:
        batches = calib.require_batches()
        targets = {u.name: self._targets(u) for u in units}
        params = {s.fqn: get_tensor(model, s.fqn) for ts in targets.values() for s in ts}
        scores = {u.name: torch.zeros(u.num_units, dtype=u.dtype) for u in units}
        group = calib.group
        sharded = any(is_dtensor(p) for p in params.values())
        with _grad_enabled(model, params.values(), all_grads=sharded):
            desc = f"{calib.where or 'calibration'} ({self.name})"
            for b, batch in enumerate(tqdm(batches, desc=desc, disable=not calib.progress, leave=False)):
                loss = batch_loss(model, batch, calib.loss_fn, calib.option)
                # NaN scores sort arbitrarily: refuse rather than rank by noise (on every rank, or the others would
                # wait in the next collective)
                if _anywhere(not torch.isfinite(loss.detach()).all(), group):
                    raise ConfigError(
                        f"{calib.label}: calibration batch {b} gives a non-finite loss ({loss.item()}"
                        f"{' on some rank' if group is not None else ''}), so its gradients cannot rank units; drop or "
                        f"fix that batch (or the loss_fn), or use {calib.field}='magnitude'."
                    )
                grads = _gradients(model, loss, params, sharded, group)
                for u in units:
                    s = torch.zeros(u.num_units, dtype=u.dtype)
                    for sl in targets[u.name]:
                        g = grads[sl.fqn]
                        if g is None:
                            continue
                        g = g.detach().to(u.dtype)
                        if self.kind is GradientKind.FISHER:
                            part = sl.view(g).pow(2).sum(1).cpu()
                        else:
                            part = sl.view(g * _whole(params[sl.fqn]).to(u.dtype)).sum(1).cpu()
                        if not torch.isfinite(part).all():
                            raise ConfigError(
                                f"{calib.label}: calibration batch {b} gives non-finite gradients of {sl.fqn} "
                                f"(group {u.name!r}), so they cannot rank units; drop or fix that batch, or use "
                                f"{calib.field}='magnitude'."
                            )
                        s += part
                    scores[u.name] += s if self.kind is GradientKind.FISHER else s.pow(2)
        return scores


class _grad_enabled:  # noqa: N801  (used as a context manager)
    """Eval mode and ``requires_grad`` on ``params`` for the duration; flags, ``.grad`` and mode restored (of every
    parameter with ``all_grads``: ``backward`` writes them all)."""

    def __init__(self, model: nn.Module, params: Iterator[torch.Tensor] | Sequence[torch.Tensor],
                 all_grads: bool = False) -> None:
        self.model, self.params = model, list(params)
        if all_grads:
            known = {id(p) for p in self.params}
            self.params += [p for p in model.parameters() if id(p) not in known]

    def __enter__(self) -> None:
        self.saved = [(p.requires_grad, p.grad) for p in self.params]
        self.training = self.model.training
        self.model.eval()
        for p in self.params:
            p.requires_grad_(True)

    def __exit__(self, *exc: object) -> None:
        for p, (flag, grad) in zip(self.params, self.saved):
            p.requires_grad_(flag)
            p.grad = grad
        self.model.train(self.training)


class FixedImportance(Importance):
    """Scores computed beforehand, per group name: what :func:`~sparsify_fx.passes.s2ft.score_units` returns from
    a loaded (possibly FSDP2-sharded) model. It reads nothing from the model, so ``s2ft`` plans with it on the meta
    device and picks exactly the units the data-based strategy picked on the loaded model.

    Args:
        scores: group name -> one finite score per unit.
        origin: how messages name where the scores came from.

    Example:
        >>> fixed = FixedImportance({"g0": torch.tensor([0.1, 0.9])})
        >>> fixed(model, units)["g0"]
        tensor([0.1000, 0.9000])
    """

    needs_values = False
    fixed_name = "fixed"

    def __init__(self, scores: Mapping[str, torch.Tensor], origin: str = "given scores") -> None:
        if not isinstance(scores, Mapping):
            raise ConfigError(f"FixedImportance needs a mapping of group name -> scores, got {type(scores).__name__}.")
        bad = [k for k, v in scores.items()
               if not isinstance(k, str) or not isinstance(v, torch.Tensor) or v.dim() != 1]
        if bad:
            raise ConfigError(f"FixedImportance scores must map group names to 1-D tensors; {bad[:3]} do not.")
        self.scores = {k: v.detach().to("cpu").clone() for k, v in scores.items()}
        self.origin = origin

    def __repr__(self) -> str:
        return f"FixedImportance({self.origin}, {len(self.scores)} groups)"

    def score(self, model: nn.Module, units: Sequence[Units], calib: Calibration) -> dict[str, torch.Tensor]:
        missing = [u.name for u in units if u.name not in self.scores]
        if missing:
            raise ConfigError(
                f"{calib.label}: there is no score for group(s) {missing[:3]} (the scores hold e.g. "
                f"{sorted(self.scores)[:3]}): they were computed on another architecture or config; score this "
                "model's own structure (score_units on the same architecture)."
            )
        return {u.name: self.scores[u.name] for u in units}


# ---------------------------------------------------------------------- across processes
def reduce_group(process_group: Any = None) -> Any:
    """The group scoring statistics are summed over: ``process_group`` (None: the default group) when
    ``torch.distributed`` is initialised and the group has more than one process, else None (nothing to reduce).

    What is reduced, so that every rank ranks the same units from its own calibration shard:

    - activation statistics (per-feature sums of ``x`` and ``x^2`` and the row count) are summed, so ``E[x^2]``
      is over the rows of every rank: exactly one process on the concatenation of the ranks' batches;
    - gradients are averaged per calibration step *before* they are squared (Fisher) or multiplied by the weights
      (Taylor): step ``b`` scores the gradient of ``mean_r loss(rank r's batch b)``, which is what one process
      computes on batch ``b`` of every rank concatenated when the loss is a mean over equal-size shards. (Summing
      each rank's squared gradient instead would equal one process that sees the ranks' batches one by one.)
      Plain parameters' gradients are all-reduced; FSDP2-sharded ones are averaged by FSDP's own reduce-scatter
      in backward and gathered whole (``full_tensor``, one tensor at a time).

    Args:
        process_group: the group, or None for the default one.

    Example:
        >>> reduce_group() is None   # a single process
        True
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = process_group if process_group is not None else dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor`` (e.g. an FSDP2-sharded parameter or gradient)."""
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "full_tensor")


def _whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, a DTensor gathered whole (a collective: every rank calls it in the same order)."""
    return t.detach().full_tensor() if is_dtensor(t) else t.detach()


def _anywhere(flag: bool, group: Any) -> bool:
    """``flag`` on any rank of ``group`` (one tiny all-reduce), so that every rank raises together."""
    if group is None:
        return bool(flag)
    import torch.distributed as dist

    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


def _gradients(model: nn.Module, loss: torch.Tensor, params: dict[str, torch.Tensor], sharded: bool,
               group: Any) -> dict[str, torch.Tensor | None]:
    """The gradient of ``loss`` (averaged over ``group``'s ranks) for each of ``params``, whole."""
    import torch.distributed as dist

    if sharded:
        # FSDP2 computes with gathered copies and reduce-scatters (averages) into the shards' .grad in backward;
        # autograd.grad on the shards themselves would find them unused
        for p in model.parameters():
            p.grad = None
        loss.backward()
        got = {fqn: p.grad for fqn, p in params.items()}
    else:
        got = dict(zip(params, torch.autograd.grad(loss, list(params.values()), allow_unused=True)))
    out: dict[str, torch.Tensor | None] = {}
    for fqn, g in got.items():
        if g is not None and is_dtensor(g):
            out[fqn] = g.full_tensor()
            continue
        if group is not None:
            # a parameter unused on this rank's batch (an MoE expert) still takes part, with a zero gradient
            g = torch.zeros_like(params[fqn]) if g is None else g.detach().clone()
            dist.all_reduce(g, group=group)
            g /= dist.get_world_size(group)
        out[fqn] = g
    return out


def _all_reduce_stats(stats: dict[str, Stats], names: list[str], group: Any) -> None:
    """Sum every rank's feature statistics in place: one all-reduce of the sums, one of the row counts. A module
    that no batch of this rank reached takes part with zeros."""
    import torch.distributed as dist

    widths = torch.tensor([stats[n].s1.numel() if n in stats else 0 for n in names], dtype=torch.long)
    dist.all_reduce(widths, op=dist.ReduceOp.MAX, group=group)
    if not widths.any():
        return
    some = next(iter(stats.values()), None)
    dtype, device = (some.s1.dtype, some.s1.device) if some is not None else (torch.float32, torch.device("cpu"))
    present = [(n, w) for n, w in zip(names, widths.tolist()) if w]
    for n, w in present:
        st = stats.get(n)
        if st is None:
            stats[n] = Stats(torch.zeros(w, dtype=dtype, device=device), torch.zeros(w, dtype=dtype, device=device))
        elif st.s1.numel() != w:
            raise ConfigError(f"the input of {n} has {st.s1.numel()} features on this rank and {w} on another: every "
                              "rank must score the same model.")
    flat = torch.cat([t for n, _ in present for t in (stats[n].s1, stats[n].s2)])
    counts = torch.tensor([stats[n].n for n, _ in present], dtype=torch.long)
    dist.all_reduce(flat, group=group)
    dist.all_reduce(counts, group=group)
    at = 0
    for (n, w), c in zip(present, counts.tolist()):
        stats[n] = Stats(flat[at : at + w], flat[at + w : at + 2 * w], c)
        at += 2 * w


# one table from the names config fields accept to importance objects (each pass documents its subset)
IMPORTANCES: dict[str, Callable[[int], Importance]] = {
    "random": RandomImportance,
    "magnitude": lambda seed: MagnitudeImportance(),
    "activation": lambda seed: ActivationImportance(),
    "gradient": lambda seed: GradientImportance(GradientKind.FISHER),
    "taylor": lambda seed: GradientImportance(GradientKind.TAYLOR),
}


def resolve(spec: str | Importance, seed: int = 0) -> Importance:
    """The importance a config field names: an :class:`Importance` as given, a name through :data:`IMPORTANCES`.

    Args:
        spec: a name (``"magnitude"``) or an :class:`Importance`.
        seed: the config's seed, for ``"random"``.

    Example:
        >>> resolve("taylor")
        GradientImportance('taylor')
    """
    if isinstance(spec, Importance):
        return spec
    return IMPORTANCES[spec](seed)


def option(field_name: str, spec: str | Importance) -> str:
    """How messages name a config's choice: ``strategy='gradient'`` or ``strategy=MyImportance()``."""
    return f"{field_name}={spec!r}"


def select(scores: Sequence[torch.Tensor], count: int | Sequence[int] | None, *, highest: bool,
           admit: Callable[[int], bool] | None = None) -> list[list[int]]:
    """Pick units by score from several groups; returns each group's picks, sorted.

    ``count`` a sequence: that many units from each group on its own (stable order, so ties go to the lower index).
    ``count`` an int or None: one ranking of all units of all groups, ties by (group, unit) position, taken in order
    while ``admit(group)`` accepts, until ``count`` are taken (None: as many as admitted). ``admit`` is where the
    passes differ in substance: ``prune`` keeps ``keep_min`` units per group, ``s2ft`` a parameter budget per kind.
    ``highest`` picks the best first (``s2ft`` trains them) or the worst (``prune`` removes them); the ranking with
    ``highest`` is the exact reverse of the other, ties included.

    Args:
        scores: per group, one score per unit.
        count: per-group counts, a total, or None.
        highest: pick from the top (True) or the bottom.
        admit: for a ranking across groups, called with the group index of the next candidate; False skips it.

    Example:
        >>> select([torch.tensor([0.1, 0.9]), torch.tensor([0.5])], 2, highest=True)
        [[1], [0]]
    """
    if isinstance(count, Sequence):
        return [sorted(torch.argsort(s, descending=highest, stable=True)[:k].tolist()) for s, k in zip(scores, count)]
    pool = sorted((v, i, j) for i, s in enumerate(scores) for j, v in enumerate(s.tolist()))
    picked: list[list[int]] = [[] for _ in scores]
    taken = 0
    for _, i, j in reversed(pool) if highest else pool:
        if count is not None and taken >= count:
            break
        if admit is not None and not admit(i):
            continue
        picked[i].append(j)
        taken += 1
    return [sorted(p) for p in picked]
