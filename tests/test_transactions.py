"""Every pass is a transaction, keeps what users attached to the modules it swaps, and composes with the others.

- Rollback: each pass is failed at every one of its journaled writes (and once with KeyboardInterrupt); the model
  must be bit-identical afterwards (tensor objects, values, strides, requires_grad, module objects and types,
  hooks, modes, pass state).
- Hooks: forward, pre-forward and backward hooks on a swapped module keep firing, and their handles still remove
  them.
- Composition: every ordered pair of s2ft, prune, sparsify, merge and apply_adapter either works exactly or is
  refused before anything is written, with an error naming the conflict.
"""

from __future__ import annotations

import copy
import itertools

import models
import pytest
import torch
from models import output_tensor, rel_err

import sparsify_fx
from sparsify_fx.errors import AdapterError, ConfigError
from sparsify_fx.passes.nm import _MaskedMixin
from sparsify_fx.passes.s2ft import S2FTLinear
from sparsify_fx.testing import InjectedFault, assert_unchanged, fail_at_write, model_snapshot

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
S2FT = sparsify_fx.S2FTConfig(attention_ratio=0.5, ffn_ratio=0.25, progress=False)


def _llama(layers: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.llama(layers=layers).eval()


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return output_tensor(model(IDS)).clone()


def _hooked(model: torch.nn.Module) -> torch.nn.Module:
    """A model with hooks on modules the passes swap, so rollback must restore them too."""
    attn = model.model.layers[0].self_attn
    attn.o_proj.register_forward_hook(lambda m, a, y: y * 1.0)
    attn.q_proj.register_forward_pre_hook(lambda m, a: None)
    model.model.layers[0].mlp.down_proj.register_full_backward_hook(lambda m, gi, go: None)
    return model


def _s2ft(m):
    return sparsify_fx.s2ft(m, (IDS,), S2FT)


def _prune(m):
    return sparsify_fx.prune(m, (IDS,), sparsify_fx.PruneConfig(ratio=0.25, progress=False))


def _sparsify(m):
    return sparsify_fx.sparsify(m, sparsify_fx.NMConfig(n=2, m=4, skip=("lm_head",), progress=False))


def _merge_inplace(m):
    return sparsify_fx.merge(m, inplace=True)


def _permute(m):
    g = next(g for g in sparsify_fx.analyze(m, (IDS,)).groups if g.kind == "ffn_channels")
    return sparsify_fx.permute(m, g, torch.randperm(g.num_units, generator=torch.Generator().manual_seed(1)))


# (pass, how to bring a fresh model to the state the pass starts from)
TRANSACTIONS = {
    "s2ft": (_s2ft, lambda m: m),
    "merge": (_merge_inplace, _s2ft),
    "prune": (_prune, lambda m: m),
    "sparsify": (_sparsify, lambda m: m),
    "sparsify_after_s2ft": (_sparsify, _s2ft),
    "permute": (_permute, lambda m: m),
    "apply_adapter": (lambda m: _apply(m), lambda m: m),
    "remove_adapter": (lambda m: sparsify_fx.remove_adapter(m), lambda m: _apply(m)),
}


@pytest.mark.parametrize("name", list(TRANSACTIONS))
def test_a_failure_at_every_write_leaves_the_model_bit_identical(name):
    run, prepare = TRANSACTIONS[name]
    model = prepare(_hooked(_llama()))
    before = model_snapshot(model)
    reference = run(copy.deepcopy(model))
    # fail at write 0, 1, 2, ... until the pass gets through: that is every write it makes
    k = 0
    while True:
        with fail_at_write(k) as seen:
            try:
                run(model)
            except InjectedFault as e:
                assert f"write {k} " in str(e)
            else:
                break
        assert_unchanged(model, before)
        k += 1
        assert k < 500, f"{name} does not terminate under fault injection"
    assert k > 1 and seen[0] == k, f"{name} made {seen[0]} journaled writes; its writes bypass the journal"
    assert torch.equal(_out(model), _out(reference))
    # and once with the user pressing Ctrl-C half-way, on a fresh model
    model = prepare(_hooked(_llama()))
    before = model_snapshot(model)
    with fail_at_write(k // 2, KeyboardInterrupt), pytest.raises(KeyboardInterrupt):
        run(model)
    assert_unchanged(model, before)


def test_rollback_catches_an_unjournaled_change():
    """The snapshot check itself can fail: a pass that writes around the journal is caught."""
    model = _llama()
    before = model_snapshot(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1
    with pytest.raises(AssertionError, match="up_proj.weight values changed"):
        assert_unchanged(model, before)


@pytest.mark.parametrize("transform", ["s2ft", "sparsify"])
def test_hooks_on_swapped_modules_keep_firing_and_can_be_removed(transform):
    model = _llama()
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    calls = {"fwd": 0, "pre": 0, "bwd": 0}

    def fwd(_m, _a, y):
        calls["fwd"] += 1
        return y * 2.0  # changes the model's function: dropping it would be visible

    def pre(_m, _a):
        calls["pre"] += 1

    def bwd(_m, _gi, _go):
        calls["bwd"] += 1

    h_fwd = attn.o_proj.register_forward_hook(fwd)
    attn.o_proj.register_forward_pre_hook(pre)
    mlp.down_proj.register_full_backward_hook(bwd)
    attn.o_proj.note = "kept"  # a user attribute
    reference = _out(model)
    if transform == "s2ft":
        _s2ft(model)
        assert isinstance(model.model.layers[0].self_attn.o_proj, S2FTLinear)
    else:
        sparsify_fx.sparsify(model, sparsify_fx.NMConfig(n=4, m=4, progress=False))  # 4:4 keeps every weight
        assert isinstance(model.model.layers[0].self_attn.o_proj, _MaskedMixin)
    swapped = model.model.layers[0].self_attn.o_proj
    assert swapped.note == "kept"
    calls.update(fwd=0, pre=0)
    assert rel_err(_out(model), reference) < 1e-5
    assert calls["fwd"] == 1 and calls["pre"] == 1
    model.train()
    output_tensor(model(IDS)).sum().backward()
    assert calls["bwd"] == 1
    h_fwd.remove()  # the handle from before the swap still removes the hook from the new module
    assert not swapped._forward_hooks
    if transform == "s2ft":
        merged = sparsify_fx.merge(model, inplace=True)
        assert type(merged.model.layers[0].self_attn.o_proj) is torch.nn.Linear
        assert merged.model.layers[0].self_attn.o_proj._forward_pre_hooks  # the pre-hook survived the merge


def test_passes_on_a_torch_compiled_module_keep_their_state_on_the_module():
    model = _llama()
    reference = _out(model)
    compiled = torch.compile(model, backend="eager")
    assert sparsify_fx.s2ft(compiled, (IDS,), S2FT) is compiled
    assert getattr(model, "_sparsify_s2ft", None) is not None
    assert rel_err(output_tensor(compiled(IDS)).detach(), reference) < 1e-5
    adapter = sparsify_fx.export_adapter(compiled)
    assert adapter.num_parameters > 0
    assert sparsify_fx.export_adapter(model).fingerprint == adapter.fingerprint
    merged = sparsify_fx.merge(compiled)
    assert rel_err(_out(merged), reference) < 1e-5
    sparsify_fx.merge(model, inplace=True)
    assert type(model.model.layers[0].self_attn.o_proj) is torch.nn.Linear
    assert rel_err(_out(model), reference) < 1e-5


# ---------------------------------------------------------------------- composition
def _trained_adapter() -> sparsify_fx.Adapter:
    """An adapter trained on the base _llama() (one SGD step on random targets)."""
    model = _s2ft(_llama())
    model.train()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    output_tensor(model(IDS)).pow(2).mean().backward()
    opt.step()
    return sparsify_fx.export_adapter(model)


ADAPTER = None


def _apply(m):
    global ADAPTER
    if ADAPTER is None:
        ADAPTER = _trained_adapter()
    return sparsify_fx.apply_adapter(m, ADAPTER)


STEPS = {"s2ft": _s2ft, "prune": _prune, "sparsify": _sparsify, "merge": _merge_inplace, "apply_adapter": _apply}
# pairs refused up front, and a word the error must contain
REFUSED = {
    ("s2ft", "s2ft"): "already S²FT",
    ("s2ft", "prune"): "merge",
    ("s2ft", "apply_adapter"): "merge",
    ("sparsify", "s2ft"): "masks",
    ("sparsify", "prune"): "masks",
    ("sparsify", "merge"): "not transformed",
    ("sparsify", "sparsify"): "no nn.Linear/Conv1D layer matches",
    ("sparsify", "apply_adapter"): "not the adapter's base",
    ("prune", "merge"): "not transformed",
    ("prune", "apply_adapter"): "different base|shape",
    ("merge", "merge"): "not transformed",
    ("apply_adapter", "s2ft"): "remove_adapter",
    ("apply_adapter", "prune"): "remove_adapter",
    ("apply_adapter", "sparsify"): "remove_adapter",
    ("apply_adapter", "merge"): "not transformed",
    ("apply_adapter", "apply_adapter"): "already applied: remove_adapter first",
}


def _masks_hold(model: torch.nn.Module) -> None:
    for name, mod in model.named_modules():
        if isinstance(mod, _MaskedMixin):
            w = mod.weight_oi()
            assert torch.equal(w, w * mod.mask_oi().to(w.dtype)), f"{name}: masked-out weights are not zero"


# as a first step, "merge" is the merged copy of an S²FT model (merge of a plain model is only a refusal)
FIRST = {**STEPS, "merge": lambda m: _merge_inplace(_s2ft(m))}


@pytest.mark.parametrize("first,second", list(itertools.product(STEPS, repeat=2)))
def test_every_order_of_two_passes_works_or_is_refused_up_front(first, second):
    model = _llama()
    FIRST[first](model)
    before, out_before = model_snapshot(model), _out(model)
    if (first, second) in REFUSED:
        with pytest.raises((ConfigError, AdapterError), match=REFUSED[first, second]):
            STEPS[second](model)
        assert_unchanged(model, before)
        return
    STEPS[second](model)
    _masks_hold(model)
    if second in ("s2ft", "merge"):  # function-preserving passes
        assert rel_err(_out(model), out_before) < 1e-5


@pytest.mark.parametrize("order", [
    ("s2ft", "sparsify", "merge"),
    ("prune", "s2ft", "merge"),
    ("s2ft", "merge", "sparsify"),
    ("s2ft", "merge", "prune"),
    ("s2ft", "merge", "s2ft"),
    ("prune", "sparsify", "apply_adapter"),
])
def test_three_pass_orders(order):
    model = _llama()
    outs = []
    for step in order:
        if step == "apply_adapter":
            with pytest.raises(AdapterError, match="different base|shape"):
                _apply(model)
            continue
        STEPS[step](model)
        _masks_hold(model)
        outs.append((step, _out(model)))
    for (prev, a), (step, b) in itertools.pairwise(outs):
        if step in ("s2ft", "merge"):
            assert rel_err(b, a) < 1e-5, f"{step} after {prev} changed the function"


def test_merge_moves_the_masks_with_the_weights():
    """The issue's case: sparsify after s2ft, then merge: masked-out q_proj weights must stay zero."""
    model = _s2ft(_llama())
    _sparsify(model)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, _MaskedMixin)
    out = _out(model)
    merged = sparsify_fx.merge(model)
    _masks_hold(merged)
    assert int((merged.model.layers[0].self_attn.q_proj.weight == 0).sum()) >= q.weight.numel() // 2
    assert rel_err(_out(merged), out) < 1e-5
