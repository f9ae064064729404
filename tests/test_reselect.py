"""Adaptive S²FT selection (issue 16, item 2): a re-selection swaps units in place without changing the function,
keeps the optimizer state of the units that stay, leaves frozen weights alone outside the units that ever trained,
and the exported adapter covers every unit that ever trained (also those that left)."""

from __future__ import annotations

import copy
import functools

import models
import pytest
import torch
from models import rel_err
from transformers import Trainer, TrainingArguments

import sparsify_fx
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes.reselect import GrowScore, Reselect, ReselectCallback, Reselector
from sparsify_fx.passes.s2ft import state_of
from sparsify_fx.testing import InjectedFault, assert_unchanged, fail_at_write, model_snapshot

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
CONFIG = dict(attention_ratio=0.5, ffn_ratio=0.25, progress=False)


@functools.cache
def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    return models.llama().eval()  # no dropout: the same function every call


def _setup(fused: bool = False, **cfg):
    """An S²FT copy of the base, its AdamW over the blocks (built once, as a user would) and a Reselector."""
    model = sparsify_fx.s2ft(copy.deepcopy(_base()), (IDS,), sparsify_fx.S2FTConfig(**{**CONFIG, **cfg}))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, fused=fused)
    return model, opt, Reselector(model, opt, Reselect(every=1000, fraction=0.5))


def _train(model, opt, steps: int = 3) -> None:
    for _ in range(steps):
        model(IDS, labels=IDS).loss.backward()
        opt.step()
        opt.zero_grad()


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_reselection_keeps_the_function_and_updates_the_state():
    model, opt, r = _setup()
    _train(model, opt)
    st = state_of(model)
    before, selected = _logits(model), {u.group.name: list(u.selected) for u in st.units}
    swaps = r.reselect()
    assert swaps, "trained groups with unselected units must swap some"
    assert rel_err(_logits(model), before) <= 1e-5
    for s in swaps:
        u = next(u for u in st.units if u.group.name == s.group)
        assert s.left in selected[s.group] and s.left not in u.selected
        assert s.entered not in selected[s.group] and s.entered in u.selected
        # selected units (original coordinates) are the leading positions of the composed permutation
        assert u.selected == st.perms[s.group][: len(u.selected)].tolist()


def test_frozen_weights_are_bit_identical_outside_ever_selected_units():
    model, opt, r = _setup()
    ever = {u.group.name: set(u.selected) for u in state_of(model).units}
    for _ in range(2):
        _train(model, opt)
        for s in r.reselect():
            ever[s.group].add(s.entered)
    _train(model, opt)
    st = state_of(model)
    allowed: dict[str, tuple[int, set[int]]] = {}  # weight -> (dim, original indices of ever-trained units)
    for u in st.units:
        for proj, pairs in u.projections.items():
            for m, occ in pairs:
                off, n = u.part(proj, m, occ) or (0, occ.inner)
                idx = {b + x * occ.inner + off + i for b in occ.offsets for x in ever[u.group.name] for i in range(n)}
                allowed.setdefault(m.fqn, (m.dim, set()))[1].update(idx)
    merged = dict(sparsify_fx.merge(model).named_parameters())
    for name, p in _base().named_parameters():
        q = merged[name].detach()
        if name not in allowed:
            assert torch.equal(q, p), name
            continue
        dim, ok = allowed[name]
        changed = torch.nonzero((q != p).movedim(dim, 0).flatten(1).any(1)).flatten().tolist()
        assert changed and set(changed) <= ok, (name, sorted(set(changed) - ok)[:8])
        outside = torch.tensor(sorted(set(range(p.shape[dim])) - ok), dtype=torch.long)
        assert torch.equal(q.index_select(dim, outside), p.index_select(dim, outside)), name


def test_optimizer_state_of_kept_units_is_preserved_and_entering_rows_reset():
    model, opt, r = _setup()
    _train(model, opt)
    st = state_of(model)
    before = {id(b): opt.state[b]["exp_avg"].clone() for b in opt.state}
    positions = {}  # block -> rows of entering units, block-local
    swaps = r.reselect()
    for s in swaps:
        plan = next(p for p in r._plans if p.unit.group.name == s.group)
        pos = int(torch.nonzero(st.perms[s.group] == s.entered))
        for t in plan.trained:
            i, local = t.block_of(t.rows(pos))
            positions.setdefault(t.module.blocks[i], []).append(local)
    assert positions
    for b in opt.state:
        now, was = opt.state[b]["exp_avg"], before[id(b)]
        dim = next(t.dim for p in r._plans for t in p.trained if any(x is b for x in t.module.blocks))
        reset = torch.cat(positions.get(b, [torch.empty(0, dtype=torch.long)])).unique()
        kept = torch.tensor(sorted(set(range(b.shape[dim])) - set(reset.tolist())), dtype=torch.long)
        assert torch.equal(now.index_select(dim, kept), was.index_select(dim, kept))
        if reset.numel():
            assert not now.index_select(dim, reset).any()
            assert was.index_select(dim, reset).any()  # the state there was the leaving unit's, now gone


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "adamw-fused"])
def test_adapter_after_reselection_reproduces_the_trained_model(fused):
    model, opt, r = _setup(fused=fused)
    for _ in range(2):
        _train(model, opt)
        assert r.reselect()
    _train(model, opt)
    assert state_of(model).retired, "units that left must be recorded for export"
    adapter = sparsify_fx.export_adapter(model)
    fresh = copy.deepcopy(_base())
    sparsify_fx.apply_adapter(fresh, adapter)
    assert rel_err(_logits(fresh), _logits(model)) <= 1e-5
    # and the base comes back bit for bit
    sparsify_fx.remove_adapter(fresh)
    for (n, p), q in zip(fresh.named_parameters(), _base().parameters()):
        assert torch.equal(p, q), n


def test_columns_only_groups_grow_from_sampled_candidates():
    model, opt, _ = _setup(attention=("o",), ffn=("down",))
    r = Reselector(model, opt, Reselect(every=2, fraction=0.5, candidates=4))
    assert {p.score for p in r._plans} == {GrowScore.SAMPLED_COLUMNS}
    st = state_of(model)
    for _ in range(2):
        _train(model, opt, 1)
        # the candidates of this window, in original units: only they can enter
        sampled = {p.unit.group.name: {int(st.perms[p.unit.group.name][c]) for c in p.candidates} for p in r._plans}
        before = _logits(model)
        swaps = r.step()
    assert swaps and rel_err(_logits(model), before) <= 1e-5
    for s in swaps:
        assert s.entered in sampled[s.group]


def test_a_failed_reselection_leaves_model_and_optimizer_unchanged():
    model, opt, r = _setup()
    _train(model, opt)
    snap = model_snapshot(model)
    st = state_of(model)
    perms = {k: v.clone() for k, v in st.perms.items()}
    state = {id(b): {k: v.clone() for k, v in s.items()} for b, s in opt.state.items()}
    for k in (0, 7, 40):
        with pytest.raises(InjectedFault), fail_at_write(k):
            r.reselect()
        assert_unchanged(model, snap)
        assert all(torch.equal(st.perms[k2], v) for k2, v in perms.items()) and not st.retired
        for b, s in opt.state.items():
            assert all(torch.equal(v, state[id(b)][k2]) for k2, v in s.items())


def test_layerwise_reselection_trains_one_layer_per_window():
    model, opt, _ = _setup()
    r = Reselector(model, opt, Reselect(every=1, fraction=0.5, layers=1))
    for _ in range(2):
        trained = {p.unit.group.layer for p in r._plans if all(b.requires_grad for t in p.trained
                                                                for b in t.module.blocks)}
        assert len(trained) == 1
        _train(model, opt, 1)
        r.step()


def test_trainer_callback_reselects(tmp_path):
    model = sparsify_fx.s2ft(copy.deepcopy(_base()), (IDS,), sparsify_fx.S2FTConfig(
        **CONFIG, reselect=Reselect(every=1, fraction=0.5)))
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 128, (8,), generator=g), "labels": torch.randint(0, 128, (8,), generator=g)}
            for _ in range(6)]
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    cb = ReselectCallback()
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    assert cb.reselector.steps == 3 and len({s.group for s in cb.swaps}) >= 2
    model.eval()
    adapter = sparsify_fx.export_adapter(model)
    fresh = copy.deepcopy(_base())
    sparsify_fx.apply_adapter(fresh, adapter)
    assert rel_err(_logits(fresh), _logits(model)) <= 1e-5


@pytest.mark.parametrize("bad, match", [
    (dict(every=0), "Reselect.every"),
    (dict(fraction=1.5), "Reselect.fraction"),
    (dict(layers=0), "Reselect.layers"),
])
def test_bad_reselect_config_is_refused(bad, match):
    with pytest.raises(ConfigError, match=match):
        sparsify_fx.S2FTConfig(reselect=Reselect(**bad)).validate()
    with pytest.raises(ConfigError, match="S2FTConfig.reselect"):
        sparsify_fx.S2FTConfig(reselect=5).validate()


def test_separate_layout_is_refused_before_anything_changes():
    model = sparsify_fx.s2ft(copy.deepcopy(_base()), (IDS,), sparsify_fx.S2FTConfig(**CONFIG, layout="separate"))
    snap = model_snapshot(model)
    with pytest.raises(ConfigError, match="layout='view'"):
        Reselector(model)
    assert_unchanged(model, snap)
