"""Adaptive S²FT selection: every few steps, swap the selected units that moved least for unselected ones that
want to move most, in place, without rebuilding the optimizer.

The static selection of :func:`~sparsify_fx.s2ft` is fixed before training. Scaling sparse fine-tuning (SpIEL)
drops the trained entries whose deltas grew least and regrows entries by accumulated gradient; IST re-picks which
layers train. :class:`Reselector` does both at head/channel granularity on an S²FT model:

- **drop**: in every trained group, the selected units whose accumulated update ``|current - base|`` (summed over
  the unit's rows/columns of every trained weight, from ``S2FTState.base_blocks``) is smallest;
- **grow**: as many unselected units, ranked by accumulated squared gradient. Where the unit trains *rows* of some
  weight (v rows of a head, up rows of an FFN channel), the score is ``Σ grad_y²`` of those output rows, gathered by
  a hook on the layer output: the gradient of weight row ``i`` is ``grad_y[:, i]ᵀ x``, and every row of a layer
  shares ``x``, so the output-row energy ranks rows like their gradient norms without the GEMM over frozen rows that
  S²FT's backward exists to skip (cost: one square and a sum over the output, ~1/in_features of the layer's
  backward). Where the unit trains only *columns* (``ffn=("down",)``), a column's gradient needs that GEMM, so
  ``candidates`` unselected units are sampled per window and only their columns' exact gradient norms
  (``(grad_yᵀ x[:, cols])²``) are accumulated.
- **swap**: the leaving unit at position ``a`` (inside the trained blocks) and the entering unit at ``b`` trade
  places, a transposition applied to every member of the group. Only the two units' rows of each tensor are
  written (never a whole weight), through a :class:`~sparsify_fx.passes.surgery.Journal`, so any failure rolls the
  model and the optimizer state back. The blocks stay the same Parameter objects with the same shapes, so the
  optimizer built before training keeps working: the state of every kept unit is untouched and the state rows of
  position ``a`` (now the entering unit) are reset to zero.

The state follows: ``perms`` are composed with the transposition, ``Unit.selected`` holds the units now trained
(original coordinates), ``base_blocks`` at position ``a`` holds the entering unit's base values, and the leaving
unit's base values go to ``S2FTState.retired`` so :func:`~sparsify_fx.export_adapter` still exports its delta
(it stays in the frozen weight). A swap is an exact permutation, so the model computes the same function before
and after.

Layer-wise re-selection (``Reselect(layers=k)``): every window only ``k`` of the trained layers train (random, as in
IST); the others' blocks stop requiring grad, so their gradients are not computed and optimizers skip them.

Example::

    model = sparsify_fx.s2ft(model, (ids,), sparsify_fx.S2FTConfig(reselect=Reselect(every=50, fraction=0.25)))
    opt = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    for batch in loader:
        loss(model, batch).backward(); opt.step(); opt.zero_grad()
        sparsify_fx.reselect_(model, opt)   # every 50th call swaps a quarter of each group's units
"""

from __future__ import annotations

import enum
import math
import random
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from sparsify_fx.analysis import Group, Occurrence
from sparsify_fx.errors import ConfigError
from sparsify_fx.frontend.graph import alias_key
from sparsify_fx.passes.copermute import companions
from sparsify_fx.passes.surgery import Journal, get_module, get_tensor, split_fqn, unwrap

__all__ = ["GrowScore", "Reselect", "Reselector", "ReselectCallback", "Swap", "reselect_"]


class GrowScore(enum.Enum):
    """How an unselected unit's accumulated gradient is measured (chosen per group, see the module docstring)."""

    OUTPUT_ROWS = "output_rows"  # Σ grad_y² of the unit's output rows of a row-trained layer: every unit, cheap
    SAMPLED_COLUMNS = "sampled_columns"  # exact column-gradient norms of a few sampled candidate units


@dataclass
class Reselect:
    """When and how much the S²FT selection adapts during training.

    - ``every``: re-select after every ``every`` optimizer steps (calls of :meth:`Reselector.step`).
    - ``fraction``: share of each group's selected units swapped at a re-selection (at least one where it is > 0
      and the group has unselected units with a gradient).
    - ``candidates``: unselected units sampled per group and window where the group trains only columns.
    - ``layers``: layer-wise re-selection: how many of the trained layers train in each window (None: all).
    - ``seed``: seeds the candidate and layer sampling.

    Example:
        >>> Reselect(every=100, fraction=0.25).validate()
    """

    every: int = 100
    fraction: float = 0.25
    candidates: int = 16
    layers: int | None = None
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the bad field and the fix."""
        for name in ("every", "candidates"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"Reselect.{name} must be a positive int, got {v!r}; e.g. Reselect(every=100).")
        f = self.fraction
        if not isinstance(f, int | float) or isinstance(f, bool) or not math.isfinite(f) or not 0 <= f <= 1:
            raise ConfigError(f"Reselect.fraction must be a number in [0, 1] (share of units swapped), got {f!r}.")
        if self.layers is not None and (not isinstance(self.layers, int) or isinstance(self.layers, bool)
                                        or self.layers < 1):
            raise ConfigError(f"Reselect.layers must be a positive int (layers trained per window) or None, got "
                              f"{self.layers!r}.")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"Reselect.seed must be an int, got {self.seed!r}.")


@dataclass
class Swap:
    """One re-selection move: in ``group``, original unit ``left`` stopped training and ``entered`` started."""

    group: str
    left: int
    entered: int


@dataclass
class _Trained:
    """One trained (weight, occurrence) of a unit: the module holding its blocks and where a unit sits in it."""

    module: nn.Module  # S2FTLinear / S2FTConv
    fqn: str
    dim: int
    occ: Occurrence
    part: tuple[int, int] | None

    def rows(self, pos: int) -> torch.Tensor:
        """Indices along ``dim`` of the unit at position ``pos`` (permuted coordinates)."""
        off, n = self.part if self.part is not None else (0, self.occ.inner)
        return torch.cat([torch.arange(b + pos * self.occ.inner + off, b + pos * self.occ.inner + off + n)
                          for b in self.occ.offsets])

    def per_unit(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` (one value per index along ``dim``) summed over each unit's indices: one value per position."""
        off, n = self.part if self.part is not None else (0, self.occ.inner)
        span = self.occ.units * self.occ.inner
        return sum(v[b : b + span].view(self.occ.units, self.occ.inner)[:, off : off + n].sum(1)
                   for b in self.occ.offsets)

    def block_of(self, rows: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The block holding ``rows`` and their indices inside it."""
        lo = int(rows.min())
        for i, (s, n) in enumerate(zip(self.module.starts, self.module.lengths)):
            if s <= lo < s + n:
                local = rows - s
                if int(local.max()) >= n:
                    break
                return i, local
        raise ConfigError(f"{self.fqn}: rows {rows.tolist()[:4]}... are not inside one trained block; the S²FT "
                          "layout was changed outside sparsify_fx.")


@dataclass
class _GroupPlan:
    unit: Any  # s2ft.Unit
    trained: list[_Trained]
    score: GrowScore
    candidates: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    @property
    def k(self) -> int:
        return len(self.unit.selected)


def _is_row_trained(t: _Trained) -> bool:
    from sparsify_fx.passes.s2ft_conv import is_conv

    # conv blocks run along output channels at param_dim 0; linears say it with logical_dim
    return t.module.param_dim == 0 if is_conv(t.module) or not hasattr(t.module, "logical_dim") \
        else t.module.logical_dim == 0


class Reselector:
    """Adapts an S²FT model's selection every ``config.every`` steps; call :meth:`step` after ``optimizer.step()``.

    Args:
        model: a model transformed by :func:`~sparsify_fx.s2ft` (``layout="view"``).
        optimizer: the optimizer over the model's trainable blocks (its state rows of swapped units are reset).
        config: how often and how much; default: ``S2FTConfig.reselect`` of the model, else ``Reselect()``.

    Example::

        r = Reselector(model, opt, Reselect(every=20, fraction=0.5))
        for batch in loader:
            loss_fn(model, batch).backward(); opt.step(); opt.zero_grad(); r.step()
        r.close()   # removes the gradient hooks
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 config: Reselect | None = None) -> None:
        from sparsify_fx.passes.s2ft import state_of

        self.model = unwrap(model)
        st = state_of(self.model)
        cfg = config or getattr(st.config, "reselect", None) or Reselect()
        if not isinstance(cfg, Reselect):
            raise ConfigError(f"Reselector config must be a Reselect, got {type(cfg).__name__}.")
        cfg.validate()
        if st.config.layout != "view":
            raise ConfigError("adaptive re-selection swaps units inside the weights the blocks view; this model uses "
                              "layout='separate' (blocks with their own storage). Transform it with layout='view'.")
        if any(hasattr(p, "device_mesh") for p in self.model.parameters()):
            raise ConfigError("adaptive re-selection does not run on sharded (FSDP2/DTensor) parameters yet; "
                              "re-select before sharding or train with a static selection.")
        self.config = cfg
        self.optimizer = optimizer
        self.steps = 0
        self.history: list[Swap] = []
        self._rng = random.Random(cfg.seed)
        self._plans = [self._plan(u) for u in st.units if u.selected and u.group.expert is None]
        # per module: Σ grad_y² per output index, or per sampled column
        self._rows: dict[nn.Module, torch.Tensor] = {}
        self._cols: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (columns, Σ grad²)
        self._handles: list[Any] = []
        self._install()
        self._active_layers: set[int | None] | None = None
        if cfg.layers is not None:
            self._pick_layers()

    # ------------------------------------------------------------------ plan
    def _plan(self, u: Any) -> _GroupPlan:
        trained = []
        for proj, pairs in u.projections.items():
            for m, occ in pairs:
                mod = get_module(self.model, split_fqn(m.fqn)[0])
                trained.append(_Trained(mod, m.fqn, m.dim, occ, u.part(proj, m, occ)))
        score = GrowScore.OUTPUT_ROWS if any(_is_row_trained(t) for t in trained) else GrowScore.SAMPLED_COLUMNS
        return _GroupPlan(u, trained, score)

    def _install(self) -> None:
        from sparsify_fx.passes.s2ft import S2FTLinear

        row_modules = {id(t.module): t.module for p in self._plans if p.score is GrowScore.OUTPUT_ROWS
                       for t in p.trained if _is_row_trained(t)}
        for mod in row_modules.values():
            self._handles.append(mod.register_forward_hook(self._row_hook))
        col_modules = {id(t.module): t.module for p in self._plans if p.score is GrowScore.SAMPLED_COLUMNS
                       for t in p.trained if isinstance(t.module, S2FTLinear)}
        for mod in col_modules.values():
            self._handles.append(mod.register_forward_hook(self._col_hook))
        self._sample_candidates()

    def _row_hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        if not isinstance(out, torch.Tensor) or not out.requires_grad or not torch.is_grad_enabled():
            return
        from sparsify_fx.passes.s2ft_conv import is_conv

        axis = 1 if is_conv(module) else out.dim() - 1

        def acc(g: torch.Tensor) -> None:
            dims = [d for d in range(g.dim()) if d != axis]
            s = g.detach().float().pow(2).sum(dims) if dims else g.detach().float().pow(2)
            have = self._rows.get(module)
            self._rows[module] = s if have is None else have + s

        out.register_hook(acc)

    def _col_hook(self, module: nn.Module, args: tuple, out: Any) -> None:
        cols = self._cols.get(module)
        if cols is None or not isinstance(out, torch.Tensor) or not out.requires_grad or not torch.is_grad_enabled():
            return
        x = args[0].detach()
        xc = x.index_select(x.dim() - 1, cols[0].to(x.device)).reshape(-1, cols[0].numel()).float()

        def acc(g: torch.Tensor) -> None:
            grad = g.detach().reshape(-1, g.shape[-1]).float().t() @ xc  # [out, candidates]: their exact gradient
            idx, total = self._cols[module]
            self._cols[module] = (idx, total + grad.pow(2).sum(0).to(total.device))

        out.register_hook(acc)

    def _sample_candidates(self) -> None:
        self._cols.clear()
        for p in self._plans:
            if p.score is not GrowScore.SAMPLED_COLUMNS:
                continue
            n, k = p.unit.group.num_units, p.k
            pool = list(range(k, n))
            p.candidates = torch.tensor(sorted(self._rng.sample(pool, min(self.config.candidates, len(pool)))),
                                        dtype=torch.long)
            for t in p.trained:
                if not hasattr(t.module, "logical_dim") or not p.candidates.numel():
                    continue
                cols = torch.cat([t.rows(int(c)) for c in p.candidates])
                have = self._cols.get(t.module)
                cols = cols if have is None else torch.cat([have[0], cols])
                self._cols[t.module] = (cols, torch.zeros(cols.numel()))

    def _pick_layers(self) -> None:
        layers = sorted({p.unit.group.layer for p in self._plans}, key=lambda x: (x is None, x or 0))
        k = min(self.config.layers or len(layers), len(layers))
        self._active_layers = set(self._rng.sample(layers, k))
        for p in self._plans:
            on = p.unit.group.layer in self._active_layers
            for t in p.trained:
                for b in t.module.blocks:
                    b.requires_grad_(on)

    # ------------------------------------------------------------------ scores
    def _updates(self, p: _GroupPlan) -> torch.Tensor:
        """Per selected position: ||current - base||² over the unit's trained rows, per trained element."""
        from sparsify_fx.passes.s2ft import state_of

        st = state_of(self.model)
        out = torch.zeros(p.k)
        for t in p.trained:
            for pos in range(p.k):
                i, local = t.block_of(t.rows(pos))
                block = t.module.blocks[i].detach()
                base = st.base_blocks[(t.fqn, t.module.starts[i])]
                d = block.index_select(t.dim, local.to(block.device)) - base.index_select(t.dim, local.to(base.device))
                out[pos] += d.float().pow(2).mean().cpu()
        return out

    def _grows(self, p: _GroupPlan) -> torch.Tensor:
        """Per unselected position (index ``pos - k``): the accumulated gradient score, -inf where not measured."""
        n = p.unit.group.num_units
        out = torch.full((n - p.k,), -math.inf)
        if p.score is GrowScore.OUTPUT_ROWS:
            rows = [t for t in p.trained if _is_row_trained(t) and t.module in self._rows]
            if not rows:
                return out
            return sum(t.per_unit(self._rows[t.module].cpu())[p.k:] for t in rows)
        for t in p.trained:
            entry = self._cols.get(t.module)
            if entry is None:
                continue
            cols, total = entry
            for c in p.candidates.tolist():
                mine = torch.isin(cols, t.rows(c))
                v = total[mine].sum()
                out[c - p.k] = v if out[c - p.k] == -math.inf else out[c - p.k] + v
        return out

    # ------------------------------------------------------------------ the step
    def step(self) -> list[Swap]:
        """Count one training step; every ``config.every`` steps re-select. Returns the swaps made (or ``[]``)."""
        self.steps += 1
        if self.steps % self.config.every:
            return []
        return self.reselect()

    def reselect(self) -> list[Swap]:
        """Re-select now: drop/grow in every group, then reset the accumulated gradients (a new window)."""
        moves: list[tuple[_GroupPlan, int, int]] = []
        for p in self._plans:
            if self._active_layers is not None and p.unit.group.layer not in self._active_layers:
                continue
            n_swap = min(int(round(self.config.fraction * p.k)) or (1 if self.config.fraction > 0 else 0),
                         p.unit.group.num_units - p.k)
            if n_swap <= 0:
                continue
            grow = self._grows(p)
            ok = torch.nonzero(grow > 0).flatten()
            n_swap = min(n_swap, ok.numel())
            if not n_swap:
                continue
            entering = (ok[torch.argsort(grow[ok], descending=True, stable=True)][:n_swap] + p.k).tolist()
            leaving = torch.argsort(self._updates(p), stable=True)[:n_swap].tolist()
            moves.extend((p, a, b) for a, b in zip(leaving, entering))
        swaps: list[Swap] = []
        if moves:
            with Journal(self.model) as j:
                for p, a, b in moves:
                    swaps.append(self._swap(p, a, b, j))
        self.history.extend(swaps)
        self._rows.clear()
        self._sample_candidates()
        if self.config.layers is not None:
            self._pick_layers()
        return swaps

    def _swap(self, p: _GroupPlan, a: int, b: int, j: Journal) -> Swap:
        """Trade the units at positions ``a`` (trained) and ``b`` (frozen) of ``p``'s group; see the module doc."""
        from sparsify_fx.passes.s2ft import state_of

        st = state_of(self.model)
        g = p.unit.group
        perm = st.perms[g.name]
        left, entered = int(perm[a]), int(perm[b])
        # the entering unit's base values, read before the swap: kept from when it trained before, else the
        # frozen values it has now (it never trained)
        entering_base: dict[tuple[str, int], torch.Tensor] = {}
        retire: list[tuple[str, int, torch.Tensor]] = []  # (weight fqn, original row along its trained dim, base)
        for t in p.trained:
            origin = _origin(st, t.fqn, t.dim)
            rows_a, rows_b = t.rows(a), t.rows(b)
            i, local = t.block_of(rows_a)
            base = st.base_blocks[(t.fqn, t.module.starts[i])]
            for r, lr in zip(rows_a.tolist(), local.tolist()):
                retire.append((t.fqn, int(origin[r]), base.narrow(t.dim, lr, 1).clone()))
            w = t.module.weight.detach()
            kept = st.retired.get(t.fqn, {})
            vals = [kept.get(int(origin[r]), None) for r in rows_b.tolist()]
            now = w.index_select(t.dim, rows_b.to(w.device))
            entering_base[(t.fqn, int(rows_a[0]))] = torch.cat(
                [v.to(now.device) if v is not None else now.narrow(t.dim, q, 1) for q, v in enumerate(vals)], t.dim)
        _transpose(self.model, g, a, b, j)
        for t in p.trained:
            rows_a = t.rows(a)
            i, local = t.block_of(rows_a)
            base = st.base_blocks[(t.fqn, t.module.starts[i])]
            j.write_rows(base, t.dim, local.to(base.device), entering_base[(t.fqn, int(rows_a[0]))])
            self._reset_optimizer_rows(t.module.blocks[i], t.dim, local, j)
        new_perm = perm.clone()
        new_perm[a], new_perm[b] = perm[b], perm[a]
        _set_item(j, st.perms, g.name, new_perm)
        _set_item(j, p.unit.__dict__, "selected", new_perm[: p.k].tolist())
        for fqn, row, vals in retire:
            if fqn not in st.retired:
                _set_item(j, st.retired, fqn, {})
            _set_item(j, st.retired[fqn], row, vals)
        for t in p.trained:
            rec = st.retired.get(t.fqn, {})
            origin = _origin(st, t.fqn, t.dim)
            for r in t.rows(a).tolist():  # the entering unit trains again: its base is in base_blocks now
                if int(origin[r]) in rec:
                    _pop_item(j, rec, int(origin[r]))
        return Swap(g.name, left, entered)

    def _reset_optimizer_rows(self, block: torch.Tensor, dim: int, local: torch.Tensor, j: Journal) -> None:
        """Zero the optimizer state (and the gradient) of a block's rows at ``local``: the unit there is new."""
        tensors = [block.grad] if block.grad is not None else []
        opt = _unwrap_optimizer(self.optimizer)
        if opt is not None:
            state = opt.state.get(block, {})
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor) and v.shape == block.shape]
        for v in tensors:
            j.write_rows(v, dim, local.to(v.device), torch.zeros_like(v.index_select(dim, local.to(v.device))))

    def close(self) -> None:
        """Remove the gradient hooks (also done when the model is merged; hooks then do nothing)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def _set_item(j: Journal, d: dict, key: Any, value: Any) -> None:
    had, old = key in d, d.get(key)
    j.on_rollback(lambda: d.__setitem__(key, old) if had else d.pop(key, None), f"state {key!r}")
    d[key] = value


def _pop_item(j: Journal, d: dict, key: Any) -> None:
    old = d[key]
    j.on_rollback(lambda: d.__setitem__(key, old), f"state {key!r}")
    del d[key]


def _unwrap_optimizer(opt: Any) -> torch.optim.Optimizer | None:
    # accelerate's AcceleratedOptimizer (the Trainer's) wraps the torch optimizer in .optimizer
    while opt is not None and not isinstance(opt, torch.optim.Optimizer):
        opt = getattr(opt, "optimizer", None)
    return opt


def _origin(st: Any, fqn: str, dim: int) -> torch.Tensor:
    """For parameter ``fqn`` along ``dim``: the original coordinate at each position of the co-permuted tensor."""
    idx: torch.Tensor | None = None
    for name, perm in st.perms.items():  # in the order they were applied: t_k = t_{k-1}[I_k]
        for m in st.groups[name].members:
            if m.fqn == fqn and m.dim == dim:
                step = m.index(perm)
                idx = step if idx is None else idx[step]
    if idx is None:
        idx = torch.arange(next(u.shapes[fqn][dim] for u in st.units if fqn in u.shapes))
    return idx


@torch.no_grad()
def _transpose(model: nn.Module, group: Group, a: int, b: int, j: Journal) -> None:
    """Swap units ``a`` and ``b`` of ``group`` in every member (and companion), writing only their indices."""
    t = torch.arange(group.num_units)
    t[a], t[b] = b, a
    done: set[tuple[int, ...]] = set()  # tied parameters move once
    for m in group.members:
        if m.expert is not None:
            raise ConfigError(f"{group.name}: re-selection does not move units of stacked expert weights.")
        tensor = get_tensor(model, m.fqn)
        idx = m.index(t)
        changed = torch.nonzero(idx != torch.arange(m.size)).flatten()
        for x in (tensor, *companions(model, m.fqn)):
            key = (*alias_key(x), m.dim)
            if key in done:
                continue
            done.add(key)
            src = idx[changed].to(x.device)
            j.write_rows(x, m.dim, changed.to(x.device), x.detach().index_select(m.dim, src))


# ---------------------------------------------------------------------- the functional and Trainer forms
_RESELECTORS: weakref.WeakKeyDictionary[nn.Module, Reselector] = weakref.WeakKeyDictionary()


def reselect_(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
              config: Reselect | None = None) -> list[Swap]:
    """Count one step of adaptive selection on ``model``; call it after every ``optimizer.step()``.

    The first call attaches a :class:`Reselector` to the model (gradients are accumulated from then on); every
    ``every``-th call swaps units. Uses ``S2FTConfig.reselect`` unless ``config`` is given.

    Args:
        model: an S²FT model (``layout="view"``).
        optimizer: the optimizer training its blocks (state rows of entering units are reset).
        config: overrides the model's ``S2FTConfig.reselect``.

    Example::

        loss.backward(); opt.step(); opt.zero_grad(); sparsify_fx.reselect_(model, opt)
    """
    key = unwrap(model)
    r = _RESELECTORS.get(key)
    if r is None:
        r = _RESELECTORS[key] = Reselector(key, optimizer, config)
    elif optimizer is not None:
        r.optimizer = optimizer
    return r.step()


def _trainer_callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:  # pragma: no cover - transformers is a dependency of the HF workflow only
        return object
    return TrainerCallback


class ReselectCallback(_trainer_callback_base()):  # type: ignore[misc]
    """``transformers.Trainer`` callback: adaptive selection every ``config.every`` optimizer steps.

    Args:
        config: overrides the model's ``S2FTConfig.reselect``.

    Example::

        trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[ReselectCallback()])
    """

    def __init__(self, config: Reselect | None = None) -> None:
        self.config = config
        self.reselector: Reselector | None = None
        self.swaps: list[Swap] = []

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        if model is not None and self.reselector is None:
            self.reselector = Reselector(model, optimizer, self.config)

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                    optimizer: Any = None, **kwargs: Any) -> None:
        if self.reselector is None:
            if model is None:
                return
            self.reselector = Reselector(model, optimizer, self.config)
        if optimizer is not None:
            self.reselector.optimizer = optimizer
        self.swaps.extend(self.reselector.step())

    def on_train_end(self, *args: Any, **kwargs: Any) -> None:
        if self.reselector is not None:
            self.reselector.close()
