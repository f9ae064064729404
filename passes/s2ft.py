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
from typing import Any, Literal

import torch
import torch.nn as nn
from tqdm.auto import tqdm

import sparsify_fx.ops  # noqa: F401  (registers torch.ops.sparsify.*)
from sparsify_fx.analysis import CouplingReport, Group, Member, Occurrence, analyze
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes._batch import batch_loss, calibrate
from sparsify_fx.passes.permute import _tensor, permute

log = logging.getLogger("sparsify_fx")

# "qkv": a fused weight whose q, k and v rows interleave inside each head; they train together
ATTENTION_PROJECTIONS = ("q", "k", "v", "o", "qkv")
FFN_PROJECTIONS = ("gate", "up", "down")
Strategy = Literal["random", "magnitude", "gradient", "activation"]


@dataclass
class S2FTConfig:
    """What trains, how much, and how units are chosen.

    - ``attention`` / ``ffn``: the projections that train in the selected heads / channels. The
      S²FT default trains value+output heads and up+down channels; ``q``, ``k`` and ``gate`` can be
      added. An empty tuple leaves that kind frozen.
    - ``attention_ratio`` / ``ffn_ratio``: fraction of units selected, in (0, 1].
    - ``budget``: alternatively, the total number of trainable parameters; the ratios then only
      weigh the kinds against each other.
    - ``scope``: ``"per_layer"`` picks the fraction in every layer; ``"global"`` ranks units of a kind
      across layers (random scores make this uniform in expectation).
    - ``layers``: restrict training to these layer indices (others stay frozen).
    - ``strategy``: ``random`` (seeded, the paper's choice), ``magnitude`` (weight norms of the
      trained slices), ``gradient`` (Fisher: squared gradients on ``calibration`` batches, with
      ``loss_fn(model, batch) -> loss`` or the model's own ``.loss``), ``activation`` (norms of
      each unit's output on ``calibration`` batches).
    - ``layout``: ``"view"`` makes trainable blocks views of the frozen weight (zero-copy forward,
      in-place updates land in the weight); ``"separate"`` gives them their own storage (needed when
      parameters are sharded, e.g. FSDP2).
    - ``progress``: show a progress bar over the calibration batches.
    """

    attention: tuple[str, ...] = ("v", "o")
    ffn: tuple[str, ...] = ("up", "down")
    attention_ratio: float = 0.1
    ffn_ratio: float = 0.1
    budget: int | None = None
    scope: Literal["per_layer", "global"] = "per_layer"
    layers: Sequence[int] | None = None
    strategy: Strategy = "random"
    seed: int = 0
    calibration: Iterable[Any] | None = field(default=None, repr=False)
    loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = field(default=None, repr=False)
    layout: Literal["view", "separate"] = "view"
    progress: bool = True

    def __post_init__(self) -> None:
        # ffn="up" names one projection; iterated as a string it would be the projections "u" and "p"
        if isinstance(self.attention, str):
            self.attention = (self.attention,)
        if isinstance(self.ffn, str):
            self.ffn = (self.ffn,)

    def validate(self) -> None:
        for name, projs, known in (
            ("attention", self.attention, ATTENTION_PROJECTIONS),
            ("ffn", self.ffn, FFN_PROJECTIONS),
        ):
            bad = [p for p in projs if p not in known]
            if bad:
                raise ConfigError(f"S2FTConfig.{name} has unknown projection(s) {bad}; choose from {list(known)}.")
        for name in ("attention_ratio", "ffn_ratio"):
            r = getattr(self, name)
            if not isinstance(r, int | float) or isinstance(r, bool) or not (0 < r <= 1):
                raise ConfigError(f"S2FTConfig.{name} must be in (0, 1], got {r!r}.")
        if self.budget is not None and (not isinstance(self.budget, int) or isinstance(self.budget, bool)
                                        or self.budget <= 0):
            raise ConfigError(f"S2FTConfig.budget must be a positive number of parameters, got {self.budget!r}.")
        if self.scope not in ("per_layer", "global"):
            raise ConfigError(f"S2FTConfig.scope must be 'per_layer' or 'global', got {self.scope!r}.")
        if self.strategy not in ("random", "magnitude", "gradient", "activation"):
            raise ConfigError(
                f"S2FTConfig.strategy must be random, magnitude, gradient or activation, got {self.strategy!r}."
            )
        if self.strategy in ("gradient", "activation") and self.calibration is None:
            raise ConfigError(f"strategy={self.strategy!r} needs calibration batches: pass calibration=[...].")
        if self.layout not in ("view", "separate"):
            raise ConfigError(f"S2FTConfig.layout must be 'view' or 'separate', got {self.layout!r}.")
        if not self.attention and not self.ffn:
            raise ConfigError("S2FTConfig trains nothing: both attention and ffn projections are empty.")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("calibration")
        d.pop("loss_fn")
        d.pop("progress")  # how the transform ran, not what it trained
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


@dataclass
class Unit:
    """A coupled group chosen for training, with its selected units in original indices."""

    group: Group
    kind: Literal["attention", "ffn"]
    projections: dict[str, list[tuple[Member, Occurrence]]]
    selected: list[int] = field(default_factory=list)

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # trained weights' shapes

    @property
    def cost_per_unit(self) -> int:
        """Trainable parameters one unit adds (its slices of every trained projection)."""
        return sum(
            occ.inner * len(occ.offsets) * _across(self.shapes[m.fqn], m.dim)
            for pairs in self.projections.values()
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
    return out


def _plan(report: CouplingReport, model: nn.Module, cfg: S2FTConfig) -> list[Unit]:
    units: list[Unit] = []
    found = {"attention": set(), "ffn": set()}
    by_layer: dict[int | None, list[Group]] = {}
    for g in report.groups:
        by_layer.setdefault(g.layer, []).append(g)
    for layer, groups in by_layer.items():
        if cfg.layers is not None and layer not in cfg.layers:
            continue
        heads = [g for g in groups if g.kind in ("attention_heads", "kv_heads")]
        # the head group that carries v (kv heads under GQA) moves q, k, v and o together
        heads.sort(key=lambda g: (g.kind != "kv_heads", g.name))
        for g in heads[:1]:
            projs = _projections_of(g)
            found["attention"] |= set(projs)
            if cfg.attention:
                chosen = {p: projs[p] for p in cfg.attention if p in projs}
                if chosen:
                    units.append(Unit(g, "attention", chosen))
        for g in (g for g in groups if g.kind == "ffn_channels"):
            projs = _projections_of(g)
            if "down" not in projs:
                continue
            found["ffn"] |= set(projs)
            if cfg.ffn:
                chosen = {p: projs[p] for p in cfg.ffn if p in projs}
                if chosen:
                    units.append(Unit(g, "ffn", chosen))
    for kind, wanted in (("attention", cfg.attention), ("ffn", cfg.ffn)):
        missing = [p for p in wanted if p not in found[kind]]
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
            kinds = ("attention_heads", "kv_heads") if kind == "attention" else ("ffn_channels",)
            reasons = sorted({r for p in report.pinned if p.kind in kinds for r in p.reasons})
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
            "S²FT found nothing to train: no attention-head or FFN-channel group with the requested projections."
            + (f" These spaces are pinned (not permutable), so they cannot be selected:{detail}" if pinned else "")
        )
    for u in units:
        u.shapes = {m.fqn: tuple(_tensor(model, m.fqn).shape) for pairs in u.projections.values() for m, _ in pairs}
        for name, pairs in u.projections.items():
            for m, occ in pairs:
                if len(occ.offsets) != 1:
                    raise ConfigError(
                        f"{m.fqn}: the {name} units of {u.group.name} are interleaved with other units and "
                        "cannot form one contiguous block; drop that projection from the config."
                    )
    return units


# ---------------------------------------------------------------------- scoring
def _unit_view(t: torch.Tensor, m: Member, occ: Occurrence) -> torch.Tensor:
    """[units, rest] view of a weight's occurrence: row u holds everything unit u owns."""
    base = occ.offsets[0]
    seg = t.narrow(m.dim, base, occ.units * occ.inner).movedim(m.dim, 0)
    return seg.reshape(occ.units, -1)


def _score(model: nn.Module, units: list[Unit], cfg: S2FTConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(cfg.seed)
    if cfg.strategy == "random":
        return {u.group.name: torch.rand(u.group.num_units, generator=g) for u in units}
    if cfg.strategy == "magnitude":
        out = {}
        for u in units:
            s = torch.zeros(u.group.num_units)
            for pairs in u.projections.values():
                for m, occ in pairs:
                    s += _unit_view(_tensor(model, m.fqn).detach().float(), m, occ).pow(2).sum(1)
            out[u.group.name] = s
        return out
    if cfg.strategy == "gradient":
        return _gradient_scores(model, units, cfg)
    return _activation_scores(model, units, cfg)


def _batches(cfg: S2FTConfig, what: str) -> list[Any]:
    batches = list(cfg.calibration or [])
    if not batches:
        raise ConfigError(f"strategy={cfg.strategy!r} needs at least one calibration batch for {what}.")
    return batches


def _gradient_scores(model: nn.Module, units: list[Unit], cfg: S2FTConfig) -> dict[str, torch.Tensor]:
    """Fisher information per unit: sum over batches of squared gradients of its weight slices."""
    params = {m.fqn: _tensor(model, m.fqn) for u in units for pairs in u.projections.values() for m, _ in pairs}
    saved = {n: (p.requires_grad, p.grad) for n, p in params.items()}
    scores = {u.group.name: torch.zeros(u.group.num_units) for u in units}
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        batches = _batches(cfg, "gradient scores")
        for batch in tqdm(batches, desc="s2ft calibration (gradient)", disable=not cfg.progress, leave=False):
            loss = batch_loss(model, batch, cfg.loss_fn, "strategy='gradient'")
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            by_name = dict(zip(params, grads))
            for u in units:
                for pairs in u.projections.values():
                    for m, occ in pairs:
                        gr = by_name[m.fqn]
                        if gr is not None:
                            scores[u.group.name] += _unit_view(gr.float(), m, occ).pow(2).sum(1)
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n][0])
            p.grad = saved[n][1]
    return scores


def _activation_scores(model: nn.Module, units: list[Unit], cfg: S2FTConfig) -> dict[str, torch.Tensor]:
    """Norm of each unit's output: the input a unit feeds into its consumer (o_proj / down_proj)."""
    scores = {u.group.name: torch.zeros(u.group.num_units) for u in units}
    hooks: list[tuple[nn.Module, Callable]] = []
    for u in units:
        consumer = next((m for m in u.group.members if m.role == "in" and not m.is_buffer), None)
        if consumer is None:
            continue
        mod = model.get_submodule(consumer.fqn.rpartition(".")[0])
        occ = consumer.occurrences[0]

        def hook(_mod, args, u=u, occ=occ):
            x = args[0].detach().float()
            seg = x.narrow(-1, occ.offsets[0], occ.units * occ.inner).reshape(-1, occ.units, occ.inner)
            scores[u.group.name] += seg.pow(2).sum(dim=(0, 2))

        hooks.append((mod, hook))
    calibrate(model, hooks, _batches(cfg, "activation scores"), "s2ft calibration (activation)", cfg.progress)
    return scores


def _select(units: list[Unit], scores: dict[str, torch.Tensor], cfg: S2FTConfig) -> None:
    ratio = {"attention": cfg.attention_ratio, "ffn": cfg.ffn_ratio}
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
        for u in units:
            k = _count(u, ratio[u.kind])
            u.selected = sorted(torch.argsort(scores[u.group.name], descending=True)[:k].tolist())
    else:
        for kind in ("attention", "ffn"):
            pool = [
                (s.item(), i, j)
                for i, u in enumerate(units)
                if u.kind == kind
                for j, s in enumerate(scores[u.group.name])
            ]
            total = sum(u.group.num_units for u in units if u.kind == kind)
            k = int(round(ratio[kind] * total)) if cfg.budget is None else None
            pool.sort(reverse=True)
            spent = 0
            picked: dict[int, list[int]] = {}
            for n, (_, i, j) in enumerate(pool):
                if k is not None and n >= k:
                    break
                if k is None:
                    c = units[i].cost_per_unit
                    if spent + c > cfg.budget * _share(units, kind, ratio):
                        continue
                    spent += c
                picked.setdefault(i, []).append(j)
            for i, u in enumerate(units):
                if u.kind == kind:
                    u.selected = sorted(picked.get(i, []))
    if not any(u.selected for u in units):
        raise ConfigError(
            "the ratios/budget select no unit at all; raise attention_ratio/ffn_ratio or the budget "
            f"(smallest unit costs {min(u.cost_per_unit for u in units)} parameters)."
        )


def _count(u: Unit, ratio: float) -> int:
    k = int(round(ratio * u.group.num_units))
    return min(u.group.num_units, k)


def _share(units: list[Unit], kind: str, ratio: dict[str, float]) -> float:
    weights = {k: ratio[k] * sum(u.group.num_units * u.cost_per_unit for u in units if u.kind == k) for k in ratio}
    total = sum(weights.values())
    return weights[kind] / total if total else 0.0


# ---------------------------------------------------------------------- the trainable module
class S2FTLinear(nn.Module):
    """A frozen linear layer whose selected contiguous row/column blocks are trainable parameters.

    ``weight`` keeps the wrapped module's parameter (and layout: ``[out, in]`` for ``nn.Linear``,
    ``[in, out]`` for transposed layers such as transformers' ``Conv1D``). ``blocks[i]`` is the
    trainable slice ``weight.narrow(param_dim, starts[i], lengths[i])``.
    """

    def __init__(
        self,
        original: nn.Module,
        weight: nn.Parameter,
        bias: torch.Tensor | None,
        transposed: bool,
        param_dim: int,
        starts: list[int],
        lengths: list[int],
        layout: str,
    ) -> None:
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.weight.requires_grad_(False)
        if isinstance(self.bias, nn.Parameter):
            self.bias.requires_grad_(False)
        self.transposed = transposed
        self.param_dim = param_dim
        self.starts = list(starts)
        self.lengths = list(lengths)
        self.layout = layout
        blocks = []
        for s, n in zip(starts, lengths):
            view = weight.data.narrow(param_dim, s, n)
            blocks.append(nn.Parameter(view if layout == "view" else view.clone(), requires_grad=True))
        self.blocks = nn.ParameterList(blocks)
        # the original module object, restored by merge(); kept outside the module tree
        object.__setattr__(self, "_original", original)

    @property
    def logical_dim(self) -> int:
        """Dim of the [out, in] weight the blocks run along."""
        return 1 - self.param_dim if self.transposed else self.param_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.t() if self.transposed else self.weight
        blocks = [b.t() if self.transposed else b for b in self.blocks]
        return torch.ops.sparsify.s2ft_linear(x, w, self.bias, blocks, self.logical_dim, self.starts)

    @torch.no_grad()
    def sync_(self) -> None:
        """Write separate-storage blocks back into ``weight`` (views need nothing)."""
        for s, n, b in zip(self.starts, self.lengths, self.blocks):
            dst = self.weight.data.narrow(self.param_dim, s, n)
            if dst.data_ptr() != b.data_ptr():
                dst.copy_(b.data)

    def extra_repr(self) -> str:
        return (
            f"weight={tuple(self.weight.shape)}, trainable {'rows' if self.logical_dim == 0 else 'columns'} "
            f"{[(s, s + n) for s, n in zip(self.starts, self.lengths)]}, layout={self.layout}"
        )


def _linear_orientation(module: nn.Module, fqn: str, in_dim: int | None) -> bool:
    """Is ``module`` a linear layer y = x @ W.T + b (False) or y = x @ W + b (True)? Checked
    numerically, so any module that computes a linear map of its last dim qualifies, whatever its type."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ConfigError(f"{fqn}: S²FT trains 2-D linear weights; this module's weight is not one.")
    transposed = in_dim == 0
    n_in = w.shape[0] if transposed else w.shape[1]
    x = torch.randn(3, n_in, dtype=w.dtype, device=w.device)
    with torch.no_grad():
        try:
            y = module(x)
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


def state_of(model: nn.Module) -> S2FTState:
    st = getattr(model, "_sparsify_s2ft", None)
    if st is None:
        raise ConfigError("this model was not transformed by sparsify_fx.s2ft (nothing to describe/merge/export).")
    return st


# ---------------------------------------------------------------------- the transform
def s2ft(model: nn.Module, example_inputs: Any, config: S2FTConfig | None = None) -> nn.Module:
    """Transform ``model`` in place for structured sparse fine-tuning and return it.

    After the call only the selected blocks require grad; train with any optimizer on
    ``model.parameters()``. On any error the model is left exactly as it was.
    """
    cfg = config or S2FTConfig()
    cfg.validate()
    if getattr(model, "_sparsify_s2ft", None) is not None:
        raise ConfigError("model is already S²FT-transformed; merge() it first to transform again.")
    report = analyze(model, example_inputs)
    units = _plan(report, model, cfg)
    scores = _score(model, units, cfg)
    _select(units, scores, cfg)
    units = [u for u in units if u.selected]

    # everything that can fail on the user's input has run; mutate under a snapshot
    snapshot = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        perms: dict[str, torch.Tensor] = {}
        for u in units:
            rest = [i for i in range(u.group.num_units) if i not in set(u.selected)]
            perm = torch.tensor(u.selected + rest, dtype=torch.long)
            permute(model, u.group, perm)
            perms[u.group.name] = perm
        slices = [
            Slice(m.fqn, m.dim, occ.offsets[0], len(u.selected) * occ.inner, proj, occ)
            for u in units
            for proj, pairs in u.projections.items()
            for m, occ in pairs
        ]
        for p in model.parameters():
            p.requires_grad_(False)
        modules: dict[str, str] = {}
        base_blocks: dict[tuple[str, int], torch.Tensor] = {}
        by_weight: dict[str, list[Slice]] = {}
        for s in slices:
            by_weight.setdefault(s.fqn, []).append(s)
        for wfqn, ss in by_weight.items():
            dims = {s.dim for s in ss}
            if len(dims) != 1:
                raise ConfigError(f"{wfqn} would train rows and columns at once; select one side per weight.")
            mod_name = wfqn.rpartition(".")[0]
            module = model.get_submodule(mod_name)
            # the weight dim that contracts the layer's input: the member's dim where the group is consumed,
            # the other dim where it is produced
            role_in = next((m.dim for u in units for m in u.group.members if m.fqn == wfqn and m.role == "in"), None)
            pdim = ss[0].dim
            in_dim = role_in if role_in is not None else (1 - pdim if _is_out(units, wfqn) else None)
            transposed = _linear_orientation(module, wfqn, in_dim)
            ss.sort(key=lambda s: s.start)
            new = S2FTLinear(
                module,
                module.weight,
                getattr(module, "bias", None),
                transposed,
                pdim,
                [s.start for s in ss],
                [s.length for s in ss],
                cfg.layout,
            )
            for s in ss:
                base_blocks[(wfqn, s.start)] = module.weight.detach().narrow(pdim, s.start, s.length).clone()
            parent_name, _, child = mod_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, new)
            swapped.append((parent, child, module))
            modules[mod_name] = wfqn
        groups = {u.group.name: u.group for u in units}
        state = S2FTState(cfg, units, perms, groups, slices, modules, base_blocks, flags)
        object.__setattr__(model, "_sparsify_s2ft", state)
    except Exception:
        for parent, child, module in reversed(swapped):
            setattr(parent, child, module)
        with torch.no_grad():
            current = model.state_dict(keep_vars=True)
            for k, v in snapshot.items():
                current[k].data.copy_(v)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        raise
    return model


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
        n = sum(s.length * _across(_tensor(model, s.fqn).shape, s.dim) for s in st.slices if s.fqn in _fqns(u))
        projs = "+".join(u.projections)
        lines.append(
            f"  layer {u.group.layer if u.group.layer is not None else '-':>3}  {u.group.kind:15s} "
            f"{len(u.selected):>4}/{u.group.num_units:<4} units {str(u.selected[:8])[:-1]}"
            f"{', ...]' if len(u.selected) > 8 else ']'}  {projs:12s} {n:>10,d} params"
        )
    lines.append(f"  trainable {trainable:,d} of {total:,d} parameters ({100 * trainable / max(total, 1):.3f} %)")
    text = "\n".join(lines)
    print(text)
    return text


def _fqns(u: Unit) -> set[str]:
    return {m.fqn for pairs in u.projections.values() for m, _ in pairs}


def merge(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """The plain model: original module types, original unit order, trained weights in place.

    Outputs equal the transformed model's. With ``inplace=False`` (default) the transformed model
    is left as it is and a merged copy is returned.
    """
    state_of(model)
    if not inplace:
        model = copy.deepcopy(model)
    st = state_of(model)
    with torch.no_grad():
        for mod_name in st.modules:
            parent_name, _, child = mod_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            wrapped = getattr(parent, child)
            wrapped.sync_()
            original = wrapped._original
            original.weight = wrapped.weight
            if wrapped.bias is not None:
                original.bias = wrapped.bias
            setattr(parent, child, original)
        for name, perm in st.perms.items():
            permute(model, st.groups[name], torch.argsort(perm))
    for n, p in model.named_parameters():
        p.requires_grad_(st.requires_grad.get(n, True))
    object.__setattr__(model, "_sparsify_s2ft", None)
    del model._sparsify_s2ft
    return model
