"""The served model's cached delta stacks (issue 15, decode latency): both per-layer paths (embedding_bag for few
tokens a row, bmm for many) give each row its adapter applied alone, the stacks follow add/remove, and the per-call
path (sparse_delta) agrees with the dense definition on both sides of the path threshold."""

from __future__ import annotations

import copy

import models
import pytest
import torch
from models import output_tensor as _out
from models import rel_err

import sparsify_fx
from sparsify_fx.passes import serving
from sparsify_fx.testing import InjectedFault, count_writes, fail_at_write

BASE = serving.BASE
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
# two s2ft runs with different widths on the FFN (0.25 and 0.125 of the channels) and attention adapters: stacks
# with padded slots, both placements, and layers only some adapters touch
CONFIGS = [
    sparsify_fx.S2FTConfig(attention=(), ffn=("up", "gate", "down"), ffn_ratio=0.25, seed=2, progress=False),
    sparsify_fx.S2FTConfig(attention=(), ffn=("up", "down"), ffn_ratio=0.125, seed=5, progress=False),
    sparsify_fx.S2FTConfig(attention=("q", "v", "o"), ffn=(), attention_ratio=0.25, seed=1, progress=False),
]


def _adapter(base, config, seed):
    model = sparsify_fx.s2ft(copy.deepcopy(base), (IDS,), config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    out = _out(model(IDS))
    (out - torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))).pow(2).mean().backward()
    torch.optim.SGD(trainable, lr=2.0).step()
    return sparsify_fx.export_adapter(model)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    base = models.llama().eval()
    return base, {f"a{i}": _adapter(base, c, i) for i, c in enumerate(CONFIGS)}


def _alone(base, adapter, x):
    model = copy.deepcopy(base)
    if adapter is not None:
        sparsify_fx.apply_adapter(model, adapter)
    with torch.no_grad():
        return _out(model(x))


@pytest.mark.parametrize("tokens", [1, serving._BAG_MAX_TOKENS, serving._BAG_MAX_TOKENS + 1, 24])
def test_each_row_equals_its_adapter_alone_on_both_paths(setup, tokens):
    base, adapters = setup
    served = sparsify_fx.attach_adapters(copy.deepcopy(base), adapters)
    names = ["a2", BASE, "a0", "a1", "a0", "a2", BASE, "a1"]
    x = torch.randint(0, 128, (len(names), tokens), generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        y = _out(served(x, adapter_names=names))
    for name in set(names):
        ref = _alone(base, adapters.get(name), x)
        for i in [i for i, n in enumerate(names) if n == name]:
            assert rel_err(y[i], ref[i]) <= 1e-5, (tokens, i, name)
    with torch.no_grad():  # the rows differ from the base where an adapter applies (the test can fail)
        assert rel_err(y[2], _alone(base, None, x)[2]) > 1e-4


def test_stacks_follow_add_and_remove(setup):
    base, adapters = setup
    served = sparsify_fx.attach_adapters(copy.deepcopy(base), {"a0": adapters["a0"], "a1": adapters["a1"]})
    state = served._sparsify_serving
    up = next(m for m in state.stacks if m.endswith("mlp.up_proj"))
    (stack,) = state.stacks[up]
    assert stack.names == ("a0", "a1") and stack.placement is serving.Placement.OUTPUT
    assert stack.matrix.shape[0] == 3 and not stack.matrix[-1].any()  # the zero slot
    widths = [adapters[n].entries[f"{up}.weight"].index.numel() for n in ("a0", "a1")]
    assert widths[0] != widths[1] and stack.index.shape[1] == max(widths)  # the narrower one is padded
    sparsify_fx.add_served_adapter(served, "a2", adapters["a2"])
    assert state.stacks[up][0].names == ("a0", "a1")  # a2 does not touch the FFN
    assert any(s.names == ("a2",) for s in state.stacks[next(m for m in state.stacks if m.endswith("v_proj"))])
    sparsify_fx.remove_served_adapter(served, "a0")
    assert state.stacks[up][0].names == ("a1",)
    x = torch.randint(0, 128, (3, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = _out(served(x, adapter_names=["a1", BASE, "a2"]))
    for i, name in enumerate(["a1", BASE, "a2"]):
        assert rel_err(y[i], _alone(base, adapters.get(name), x)[i]) <= 1e-5
    sparsify_fx.remove_served_adapter(served, "a1")
    assert up not in state.stacks  # no adapter left on the layer: no stack, no hook
    sparsify_fx.detach_adapters(served)
    assert not state.stacks


@pytest.mark.parametrize("tokens", [1, serving._BAG_MAX_TOKENS + 3])
def test_sparse_delta_matches_the_dense_definition(tokens):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(6, tokens, 10, generator=g)
    y = torch.randn(6, tokens, 7, generator=g)
    adapters = {  # two widths per placement: padded stacks on the per-call path too
        "a": serving.ServedDelta(serving.Placement.OUTPUT, torch.tensor([0, 4, 6]), torch.randn(10, 3, generator=g)),
        "b": serving.ServedDelta(serving.Placement.OUTPUT, torch.tensor([5]), torch.randn(10, 1, generator=g)),
        "c": serving.ServedDelta(serving.Placement.INPUT, torch.tensor([1, 2, 9]), torch.randn(3, 7, generator=g)),
        "d": serving.ServedDelta(serving.Placement.INPUT, torch.tensor([3, 8]), torch.randn(2, 7, generator=g)),
    }
    names = ["c", "a", BASE, "d", "b", "a"]
    got = serving.sparse_delta(x, y.clone(), serving.Segments.group(names), adapters)
    expect = y.clone()
    for r, name in enumerate(names):
        if name == BASE:
            continue
        d, full = adapters[name], torch.zeros(10, 7)
        if d.placement is serving.Placement.OUTPUT:
            full[:, d.index] = d.matrix
        else:
            full[d.index] = d.matrix
        expect[r] += x[r] @ full
    assert rel_err(got, expect) <= 1e-6
    assert torch.equal(got[2], y[2])  # the base row is untouched


def test_decode_steps_reuse_the_batch_and_forget_it_when_adapters_change(setup):
    """The decode steps of one batch reuse its routes; a changed adapter under the same name is served, not the
    remembered one."""
    base, adapters = setup
    served = sparsify_fx.attach_adapters(copy.deepcopy(base), {"a0": adapters["a0"], "a1": adapters["a1"]})
    state = served._sparsify_serving
    names = ["a0", BASE, "a1", "a0"]
    x = torch.randint(0, 128, (len(names), 1), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        first = _out(served(x, adapter_names=names))
        (batch,) = state.batches.values()
        routes = dict(batch.routes)
        second = _out(served(x, adapter_names=list(names)))
    assert list(state.batches.values()) == [batch] and all(batch.routes[k] is r for k, r in routes.items())
    assert torch.equal(first, second)
    # same s2ft units as a0, another target: the same stack layout and name, other deltas
    other = _adapter(base, CONFIGS[0], 7)
    sparsify_fx.remove_served_adapter(served, "a0")
    sparsify_fx.add_served_adapter(served, "a0", other)
    assert not state.batches
    with torch.no_grad():
        y = _out(served(x, adapter_names=names))
    ref = _alone(base, other, x)
    for i in (0, 3):
        assert rel_err(y[i], ref[i]) <= 1e-5
        assert rel_err(y[i], first[i]) > 1e-4


def test_a_failed_add_keeps_the_remembered_batches_right(setup):
    """A rolled-back add_served_adapter leaves the remembered batch serving exactly what it served before."""
    base, adapters = setup
    served = sparsify_fx.attach_adapters(copy.deepcopy(base), {"a0": adapters["a0"], "a2": adapters["a2"]})
    names = ["a2", "a0", BASE]
    x = torch.randint(0, 128, (len(names), 2), generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        before = _out(served(x, adapter_names=names))
    with count_writes() as n:
        sparsify_fx.add_served_adapter(copy.deepcopy(served), "a1", adapters["a1"])
    for k in range(n[0]):
        with pytest.raises(InjectedFault), fail_at_write(k):
            sparsify_fx.add_served_adapter(served, "a1", adapters["a1"])
        with torch.no_grad():
            assert torch.equal(_out(served(x, adapter_names=names)), before), k
    sparsify_fx.add_served_adapter(served, "a1", adapters["a1"])
    with torch.no_grad():
        y = _out(served(x, adapter_names=["a1", "a0", BASE]))
    for i, name in enumerate(["a1", "a0", BASE]):
        assert rel_err(y[i], _alone(base, adapters.get(name), x)[i]) <= 1e-5


def test_the_batches_a_model_remembers_are_bounded(setup):
    base, adapters = setup
    served = sparsify_fx.attach_adapters(copy.deepcopy(base), {"a0": adapters["a0"]})
    x = torch.randint(0, 128, (4, 1), generator=torch.Generator().manual_seed(13))
    with torch.no_grad():
        for i in range(3 * serving._KEEP_BATCHES):
            served(x, adapter_names=[("a0" if (i >> b) & 1 else BASE) for b in range(4)])
    assert 0 < len(served._sparsify_serving.batches) <= serving._KEEP_BATCHES


def test_int64_indices_above_the_int32_limit(setup, monkeypatch):
    """The embedding_bag path's flat positions fall back to int64 where int32 could overflow; same result."""
    base, adapters = setup
    names = ["a1", BASE, "a0", "a1"]
    x = torch.randint(0, 128, (len(names), 3), generator=torch.Generator().manual_seed(14))
    out = {}
    for limit in (serving._INT32_LIMIT, 64):
        monkeypatch.setattr(serving, "_INT32_LIMIT", limit)
        served = sparsify_fx.attach_adapters(copy.deepcopy(base), {"a0": adapters["a0"], "a1": adapters["a1"]})
        with torch.no_grad():
            out[limit] = _out(served(x, adapter_names=names))
        (batch,) = served._sparsify_serving.batches.values()
        dtypes = {r.index.dtype for routes in batch.routes.values() for r in routes}
        assert dtypes == ({torch.int32} if limit > 64 else {torch.long}), limit
    assert rel_err(out[64], out[serving._INT32_LIMIT]) <= 1e-6
