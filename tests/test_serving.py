"""Serving many S²FT adapters at once (issue 15 items 1 and 3): every row of a mixed batch equals its adapter
applied alone, generate() with mixed adapters equals per-adapter generation, combine() adds deltas, bad input
leaves the served model unchanged, and detach gives the plain base back bit for bit."""

from __future__ import annotations

import copy
import random

import models
import pytest
import torch
from models import output_tensor as _out
from models import rel_err

import sparsify_fx
from sparsify_fx.passes import serving
from sparsify_fx.testing import assert_unchanged, count_writes, fail_at_write, model_snapshot

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
BASE = serving.BASE

# per family: model builder and two S²FT configs with different units (the second run trains other weights)
FAMILIES = {
    "llama": (models.llama, [
        sparsify_fx.S2FTConfig(attention=("q", "k", "v", "o"), ffn=(), attention_ratio=0.25, seed=1, progress=False),
        sparsify_fx.S2FTConfig(attention=(), ffn=("up", "gate", "down"), ffn_ratio=0.25, seed=2, progress=False),
    ]),
    "gpt2": (models.gpt2, [  # transformers Conv1D: [in, out] weights, fused c_attn
        sparsify_fx.S2FTConfig(attention=("q", "k", "v", "o"), ffn=("up", "down"), attention_ratio=0.25,
                               ffn_ratio=0.25, seed=1, progress=False),
        sparsify_fx.S2FTConfig(attention=("v", "o"), ffn=("up", "down"), attention_ratio=0.5, ffn_ratio=0.125,
                               strategy="magnitude", progress=False),
    ]),
    "bert": (models.bert, [
        sparsify_fx.S2FTConfig(attention=("q", "k", "v", "o"), ffn=("up", "down"), attention_ratio=0.25,
                               ffn_ratio=0.25, seed=3, progress=False),
        sparsify_fx.S2FTConfig(attention=("v", "o"), ffn=("up", "down"), attention_ratio=0.5, ffn_ratio=0.125,
                               seed=4, progress=False),
    ]),
}


def _train(base, config, targets: int, seed: int):
    """``targets`` real adapters from one s2ft run: one SGD step each on its own random target, from the base."""
    model = copy.deepcopy(base)
    sparsify_fx.s2ft(model, (IDS,), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in trainable]
    adapters = []
    for t in range(targets):
        with torch.no_grad():
            for p, s in zip(trainable, start):
                p.copy_(s)
        g = torch.Generator().manual_seed(seed * 100 + t)
        out = _out(model(IDS))
        loss = (out - torch.randn(out.shape, generator=g)).pow(2).mean()
        loss.backward()
        opt = torch.optim.SGD(trainable, lr=2.0)
        opt.step()
        opt.zero_grad()
        adapters.append(sparsify_fx.export_adapter(model))
    return adapters


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    """A base model (eval) and 8 adapters: 4 from each of two s2ft runs with different units."""
    build, configs = FAMILIES[request.param]
    torch.manual_seed(0)
    base = build().eval()
    adapters = [a for i, cfg in enumerate(configs) for a in _train(base, cfg, 4, i)]
    return request.param, base, {f"t{i}": a for i, a in enumerate(adapters)}


@pytest.fixture(scope="module")
def llama_family():
    torch.manual_seed(0)
    base = models.llama().eval()
    build, configs = FAMILIES["llama"]
    a = _train(base, configs[0], 2, 0)
    b = _train(base, configs[1], 2, 1)
    return base, {"q0": a[0], "q1": a[1], "f0": b[0], "f1": b[1]}


def _reference(base, adapter, x):
    """The adapter applied alone to a copy of the base (the switch path), its output on ``x``."""
    model = copy.deepcopy(base)
    if adapter is not None:
        sparsify_fx.apply_adapter(model, adapter)
    with torch.no_grad():
        return _out(model(x))


def _check_rows(served, base, adapters, names, x):
    with torch.no_grad():
        y = _out(served(x, adapter_names=names))
    for name in set(names):
        ref = _reference(base, adapters.get(name), x)
        for i in [i for i, n in enumerate(names) if n == name]:
            err = rel_err(y[i], ref[i])
            assert err <= 1e-5, f"row {i} ({name}): rel err {err:.2e}"


# ---------------------------------------------------------------------- 1. mixed batches
@pytest.mark.parametrize("count", [1, 3, 8])
def test_each_row_equals_its_adapter_applied_alone(family, count):
    name, base, adapters = family
    chosen = dict(random.Random(count).sample(sorted(adapters.items()), count))
    served = copy.deepcopy(base)
    weights = {k: v.detach().clone() for k, v in served.state_dict().items()}
    sparsify_fx.attach_adapters(served, chosen)
    assert sparsify_fx.served_adapters(served) == tuple(chosen)
    assert all(torch.equal(v, weights[k]) for k, v in served.state_dict().items())  # the base is not written
    names = [*chosen, *chosen, BASE, BASE]
    random.Random(count + 10).shuffle(names)  # rows in any order, adapters interleaved with base rows
    x = torch.randint(0, 128, (len(names), 7), generator=torch.Generator().manual_seed(count))
    _check_rows(served, base, chosen, names, x)
    with torch.no_grad():  # without adapter_names (or all rows "__base__") the model is the base, bit for bit
        plain = _out(base(x))
        assert torch.equal(_out(served(x)), plain)
        assert torch.equal(_out(served(x, adapter_names=[BASE] * len(names))), plain)


def test_served_adapters_share_the_adapters_tensors(family):
    """Memory grows by the compact adapter: the served deltas are the adapters' own tensors, no weight copied."""
    _, base, adapters = family
    served = sparsify_fx.attach_adapters(copy.deepcopy(base), adapters)
    state = served._sparsify_serving
    for name, adapter in adapters.items():
        layers = state.adapters[name].layers
        assert len(layers) == len(adapter.entries)
        for fqn, e in adapter.entries.items():
            d = layers[fqn.rpartition(".")[0]]
            assert d.matrix.untyped_storage().data_ptr() == e.delta.untyped_storage().data_ptr()
            assert d.matrix.numel() == e.delta.numel()


def test_detach_restores_the_plain_model_bit_for_bit(family):
    _, base, adapters = family
    served = copy.deepcopy(base)
    before = model_snapshot(served)
    sparsify_fx.attach_adapters(served, adapters)
    sparsify_fx.detach_adapters(served)
    assert_unchanged(served, before)
    assert "generate" not in served.__dict__ and sparsify_fx.served_adapters(served) == ()
    with torch.no_grad():
        assert torch.equal(_out(served(IDS)), _out(base(IDS)))
    with pytest.raises(sparsify_fx.AdapterError, match="serves no adapters"):
        sparsify_fx.detach_adapters(served)


def test_add_and_remove_while_serving(llama_family):
    base, adapters = llama_family
    served = sparsify_fx.attach_adapters(copy.deepcopy(base), {"q0": adapters["q0"]})
    hooked = set(served._sparsify_serving.layer_hooks)
    sparsify_fx.add_served_adapter(served, "f0", adapters["f0"])
    assert sparsify_fx.served_adapters(served) == ("q0", "f0")
    x = torch.randint(0, 128, (3, 6), generator=torch.Generator().manual_seed(5))
    _check_rows(served, base, adapters, ["f0", "q0", BASE], x)
    sparsify_fx.remove_served_adapter(served, "q0")
    assert sparsify_fx.served_adapters(served) == ("f0",)
    assert not hooked & set(served._sparsify_serving.layer_hooks)  # q0's layers lost their hooks
    _check_rows(served, base, adapters, [BASE, "f0", "f0"], x)
    with pytest.raises(sparsify_fx.AdapterError, match=r"\['q0'\], which this model does not serve"):
        served(x, adapter_names=["q0", "f0", BASE])
    with pytest.raises(sparsify_fx.AdapterError, match="serves no adapter named 'q0'"):
        sparsify_fx.remove_served_adapter(served, "q0")


@pytest.mark.parametrize("beams", [1, 2])  # beam search repeats each row: the names are repeated with them
def test_generate_with_mixed_adapters_equals_per_adapter_generation(llama_family, beams):
    base, adapters = llama_family
    served = sparsify_fx.attach_adapters(copy.deepcopy(base), adapters)
    names = ["f1", BASE, "q0", "f0", "q1", "q0"]
    x = torch.randint(1, 128, (len(names), 5), generator=torch.Generator().manual_seed(7))
    kw = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "num_beams": beams}
    mixed = served.generate(x, adapter_names=names, **kw)
    for name in set(names):
        rows = [i for i, n in enumerate(names) if n == name]
        model = copy.deepcopy(base)
        if name != BASE:
            sparsify_fx.apply_adapter(model, adapters[name])
        alone = model.generate(x[rows], **kw)
        assert torch.equal(mixed[rows], alone), name
    assert served._sparsify_serving.generating is None and served._sparsify_serving.current is None


def test_sparse_delta_custom_op_matches_the_eager_path():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 3, 8, generator=g), torch.randn(6, 8, generator=g)
    y = x @ w.t()
    segments = serving.Segments.group(["b", "a", BASE, "a", "b"])
    adapters = {
        "a": serving.ServedDelta(serving.Placement.OUTPUT, torch.tensor([0, 4]), torch.randn(8, 2, generator=g)),
        "b": serving.ServedDelta(serving.Placement.INPUT, torch.tensor([1, 2, 7]), torch.randn(3, 6, generator=g)),
    }
    eager = serving.sparse_delta(x, y.clone(), segments, adapters)
    # the definition, dense: row r of adapter a adds x[r] @ (a's delta scattered into a full [in, out] matrix)
    expect = y.clone()
    for name, d in adapters.items():
        full = torch.zeros(8, 6)
        if d.placement is serving.Placement.OUTPUT:
            full[:, d.index] = d.matrix
        else:
            full[d.index] = d.matrix
        for r in segments.rows[slice(*segments.bounds[name])].tolist():
            expect[r] += x[r] @ full
    assert rel_err(eager, expect) <= 1e-6
    names = list(adapters)
    args = (x, y, segments.rows, [segments.bounds[n][0] for n in names], [segments.bounds[n][1] for n in names],
            [adapters[n].placement is serving.Placement.OUTPUT for n in names], [adapters[n].index for n in names],
            [adapters[n].matrix for n in names])
    assert torch.equal(torch.ops.sparsify.sparse_delta(*args), eager)
    torch.library.opcheck(torch.ops.sparsify.sparse_delta.default, args)


# ---------------------------------------------------------------------- bad input leaves the model unchanged
def test_unknown_name_and_wrong_length_raise_and_change_nothing(llama_family):
    base, adapters = llama_family
    served = sparsify_fx.attach_adapters(copy.deepcopy(base), {"q0": adapters["q0"]})
    before = model_snapshot(served)
    x = IDS
    with pytest.raises(sparsify_fx.AdapterError, match=r"\['nope'\].*does not serve.*add_served_adapter"):
        served(x, adapter_names=["q0", "nope"])
    with pytest.raises(sparsify_fx.ConfigError, match="3 entries but the batch has 2 rows"):
        served(x, adapter_names=["q0", BASE, "q0"])
    with pytest.raises(sparsify_fx.ConfigError, match="must be a list of adapter names"):
        served(x, adapter_names="q0")
    with pytest.raises(sparsify_fx.ConfigError, match="1 entries but the batch has 2 rows"):
        served.generate(x, adapter_names=["q0"], max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert_unchanged(served, before)
    assert served._sparsify_serving.current is None
    _check_rows(served, base, adapters, ["q0", BASE], x)  # still serves


def test_foreign_adapter_and_name_in_use_raise_and_change_nothing(llama_family):
    base, adapters = llama_family
    torch.manual_seed(123)
    other = models.llama().eval()
    foreign = _train(other, FAMILIES["llama"][1][0], 1, 9)[0]
    plain = copy.deepcopy(base)
    before = model_snapshot(plain)
    with pytest.raises(sparsify_fx.AdapterError, match="'bad'.*different base model"):
        sparsify_fx.attach_adapters(plain, {"ok": adapters["q0"], "bad": foreign})
    assert_unchanged(plain, before)  # not even "ok" was attached
    served = sparsify_fx.attach_adapters(plain, {"q0": adapters["q0"]})
    before = model_snapshot(served)
    with pytest.raises(sparsify_fx.AdapterError, match="'bad'.*different base model"):
        sparsify_fx.add_served_adapter(served, "bad", foreign)
    with pytest.raises(sparsify_fx.AdapterError, match="already served under the name 'q0'"):
        sparsify_fx.add_served_adapter(served, "q0", adapters["q1"])
    with pytest.raises(sparsify_fx.ConfigError, match="'__base__' is not usable"):
        sparsify_fx.add_served_adapter(served, BASE, adapters["q1"])
    assert_unchanged(served, before)
    assert sparsify_fx.served_adapters(served) == ("q0",)


def test_s2ft_model_cannot_serve(llama_family):
    base, adapters = llama_family
    model = sparsify_fx.s2ft(copy.deepcopy(base), (IDS,), FAMILIES["llama"][1][0])
    before = model_snapshot(model)
    with pytest.raises(sparsify_fx.ConfigError, match="merge"):
        sparsify_fx.attach_adapters(model, {"q0": adapters["q0"]})
    assert_unchanged(model, before)


@pytest.mark.parametrize("step", ["attach", "add", "remove", "detach"])
def test_a_failure_at_any_write_rolls_back(llama_family, step):
    base, adapters = llama_family
    two = {"q0": adapters["q0"], "f0": adapters["f0"]}

    def setup():
        model = copy.deepcopy(base)
        if step != "attach":
            sparsify_fx.attach_adapters(model, {"q1": adapters["q1"], **({} if step == "add" else two)})
        return model

    def run(model):
        if step == "attach":
            sparsify_fx.attach_adapters(model, two)
        elif step == "add":
            sparsify_fx.add_served_adapter(model, "f0", adapters["f0"])
        elif step == "remove":
            sparsify_fx.remove_served_adapter(model, "f0")
        else:
            sparsify_fx.detach_adapters(model)

    model = setup()
    with count_writes() as n:
        run(model)
    assert n[0] > 3
    model = setup()
    served_before = sparsify_fx.served_adapters(model)
    for k in range(n[0]):
        before = model_snapshot(model)
        with pytest.raises(sparsify_fx.testing.InjectedFault), fail_at_write(k):
            run(model)
        assert_unchanged(model, before)
        assert sparsify_fx.served_adapters(model) == served_before
    run(model)  # and it still works after all those rollbacks
    if step != "detach":
        names = list(sparsify_fx.served_adapters(model))
        _check_rows(model, base, adapters, [*names, BASE], torch.randint(0, 128, (len(names) + 1, 5)))


# ---------------------------------------------------------------------- 3. fusion
def test_combine_one_adapter_with_weight_one_is_that_adapter(llama_family):
    base, adapters = llama_family
    a = adapters["q0"]
    c = sparsify_fx.combine([a], weights=[1.0])
    assert c.entries.keys() == a.entries.keys()
    for fqn, e in a.entries.items():
        assert c.entries[fqn].dim == e.dim and torch.equal(c.entries[fqn].index, e.index)
        assert torch.equal(c.entries[fqn].delta, e.delta)
    assert torch.equal(_reference(base, c, IDS), _reference(base, a, IDS))


def test_combine_of_disjoint_adapters_applies_both(llama_family, tmp_path):
    base, adapters = llama_family
    a, b = adapters["q0"], adapters["f0"]  # attention units and FFN units: no weight in common
    assert not a.entries.keys() & b.entries.keys()
    sparsify_fx.combine([a, b]).save(tmp_path / "both")  # a combined adapter saves and loads like any other
    both = copy.deepcopy(base)
    sparsify_fx.apply_adapter(both, sparsify_fx.load_adapter(tmp_path / "both"))
    expect = copy.deepcopy(base)
    with torch.no_grad():
        for e in [*a.entries.values(), *b.entries.values()]:
            expect.get_parameter(e.fqn).index_add_(e.dim, e.index, e.delta)
    assert all(torch.equal(v, expect.state_dict()[k]) for k, v in both.state_dict().items())
    sparsify_fx.remove_adapter(both)  # the combined adapter's base check and restore work as for any adapter
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in both.state_dict().items())


def test_combine_weights_add_on_shared_units_and_take_the_union(llama_family):
    base, adapters = llama_family
    a, b = adapters["q0"], adapters["q1"]  # one s2ft run: the same units
    c = sparsify_fx.combine([a, b], weights=[0.5, -2.0])
    for fqn, e in a.entries.items():
        assert torch.equal(c.entries[fqn].delta, 0.5 * e.delta + -2.0 * b.entries[fqn].delta)
    # a hand-shifted copy of b selecting other units of the same weights: the index is the union
    fqn = next(iter(a.entries))
    e = a.entries[fqn]
    free = torch.tensor(sorted(set(range(e.shape[e.dim])) - set(e.index.tolist()))[: e.index.numel()])
    moved = sparsify_fx.Adapter({fqn: serving.AdapterEntry(fqn, e.dim, e.shape, free, e.delta.clone())},
                                a.fingerprint)
    u = sparsify_fx.combine([a, moved]).entries[fqn]
    assert torch.equal(u.index, torch.unique(torch.cat([e.index, free])))
    pos = torch.searchsorted(u.index, free)
    assert torch.equal(u.delta.index_select(e.dim, pos), e.delta)
    # the grown index has no sample of the values it replaces; the whole-base check still accepts the base
    model = sparsify_fx.apply_adapter(copy.deepcopy(base), sparsify_fx.combine([a, moved]))
    assert torch.equal(model.get_parameter(fqn).index_select(e.dim, free),
                       base.get_parameter(fqn).index_select(e.dim, free) + e.delta)


def test_combine_refuses_other_bases_dims_and_bad_weights(llama_family):
    _, adapters = llama_family
    a = adapters["q0"]
    torch.manual_seed(123)
    foreign = _train(models.llama().eval(), FAMILIES["llama"][1][0], 1, 9)[0]
    with pytest.raises(sparsify_fx.AdapterError, match="different base models"):
        sparsify_fx.combine([a, foreign])
    fqn, e = next(iter(a.entries.items()))
    other_dim = 1 - e.dim
    shape = list(e.shape)
    shape[other_dim] = 2
    flipped = sparsify_fx.Adapter(
        {fqn: serving.AdapterEntry(fqn, other_dim, e.shape, torch.tensor([0, 1]), torch.zeros(shape))},
        a.fingerprint)
    with pytest.raises(sparsify_fx.AdapterError, match=f"different dims of {fqn}"):
        sparsify_fx.combine([a, flipped])
    with pytest.raises(sparsify_fx.ConfigError, match="2 adapters but 1 weights"):
        sparsify_fx.combine([a, a], weights=[1.0])
    with pytest.raises(sparsify_fx.ConfigError, match="finite"):
        sparsify_fx.combine([a], weights=[float("nan")])
    with pytest.raises(sparsify_fx.ConfigError, match="non-empty list"):
        sparsify_fx.combine([])
