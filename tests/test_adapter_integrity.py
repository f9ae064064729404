"""The model is what it says (issue 12, item 5): the adapter switch cache never writes stale rows, the
fingerprint covers the whole base, and a dtype or shape mismatch is named as such."""

from __future__ import annotations

import copy

import models
import pytest
import torch
from models import output_tensor as _out
from models import rel_err

import sparsify_fx
from sparsify_fx.passes import adapter as adapter_mod

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
CFG = sparsify_fx.S2FTConfig(attention=("v", "o"), attention_ratio=0.5, ffn_ratio=0.25)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(model, snap) -> bool:
    state = model.state_dict()
    return state.keys() == snap.keys() and all(torch.equal(state[k], v) for k, v in snap.items())


@pytest.fixture(scope="module")
def trained():
    """A llama base, an adapter trained on it (one SGD step, so the delta is nonzero) and the trained outputs."""
    torch.manual_seed(0)
    base = models.llama().eval()
    model = copy.deepcopy(base)
    sparsify_fx.s2ft(model, (IDS,), CFG)
    out = _out(model(IDS))
    w = torch.linspace(-1, 1, out.shape[-1])
    (out * w).pow(2).mean().backward()
    torch.optim.SGD(model.parameters(), lr=1.0).step()
    with torch.no_grad():
        out = _out(model(IDS))
    return base, sparsify_fx.export_adapter(model), out


def _row_of(adapter, fqn):
    e = adapter.entries[fqn]
    return e.dim, int(e.index[1])


# ---------------------------------------------------------------------- 1. the switch cache
def test_remove_after_load_state_dict_refuses_to_write_old_rows(trained):
    base, adapter, _ = trained
    served = copy.deepcopy(base)
    sparsify_fx.apply_adapter(served, adapter)
    new_checkpoint = models.llama().eval().state_dict()
    served.load_state_dict(new_checkpoint)
    before = snapshot(served)
    with pytest.raises(sparsify_fx.AdapterError, match=r"written since apply_adapter.*discard=True"):
        sparsify_fx.remove_adapter(served, adapter)
    assert same(served, before)  # nothing written: the new checkpoint is intact
    sparsify_fx.remove_adapter(served, adapter, discard=True)
    assert same(served, new_checkpoint)
    with pytest.raises(sparsify_fx.AdapterError, match="no adapter is applied"):
        sparsify_fx.remove_adapter(served)
    # the cache knows nothing of the new weights: a full check refuses them
    with pytest.raises(sparsify_fx.AdapterError, match="different base"):
        sparsify_fx.apply_adapter(served, adapter)
    assert same(served, new_checkpoint)


def test_data_and_copy_writes_while_applied_refuse_remove(trained):
    base, adapter, _ = trained
    fqn = next(iter(adapter.entries))
    dim, row = _row_of(adapter, fqn)
    for write in ("data", "copy_"):
        served = copy.deepcopy(base)
        sparsify_fx.apply_adapter(served, adapter)
        p = served.get_parameter(fqn)
        with torch.no_grad():
            if write == "data":
                p.data.select(dim, row)[3] += 1  # the version counter does not see this
            else:
                p.select(dim, row).copy_(torch.zeros(p.shape[1 - dim]))
        before = snapshot(served)
        with pytest.raises(sparsify_fx.AdapterError, match=f"written since apply_adapter.*{fqn}"):
            sparsify_fx.remove_adapter(served, adapter)
        assert same(served, before)
        sparsify_fx.remove_adapter(served, discard=True)
        assert same(served, before)


def test_data_edit_between_two_switches_survives(trained):
    """The bug: apply, remove, ``.data[...] += 1`` on a row the adapter touches, apply again: the cache wrote the
    old base rows + delta and the next remove the old base rows, so the edit was lost."""
    base, adapter, _ = trained
    served = copy.deepcopy(base)
    sparsify_fx.apply_adapter(served, adapter)
    sparsify_fx.remove_adapter(served, adapter)  # the cache is warm
    fqn = next(f for f, e in adapter.entries.items() if e.dim == 0)
    dim, row = _row_of(adapter, fqn)
    p = served.get_parameter(fqn)
    # an element the fingerprint does not sample, so the base still passes as the adapter's: the edit must be
    # applied under the delta and survive the remove, not be overwritten with the cached rows
    rows = p.detach().index_select(dim, adapter.entries[fqn].index)
    sampled = set(adapter_mod._sample_positions(rows.numel(), adapter_mod._TOUCHED_SAMPLE).tolist())
    col = next(c for c in range(p.shape[1]) if p.shape[1] + c not in sampled)  # row is the entry's 2nd
    with torch.no_grad():
        p.data[row, col] += 1
    edited = snapshot(served)
    sparsify_fx.apply_adapter(served, adapter)
    e = adapter.entries[fqn]
    expect = edited[fqn].index_select(dim, e.index) + e.delta
    assert torch.equal(served.get_parameter(fqn).detach().index_select(dim, e.index), expect)
    sparsify_fx.remove_adapter(served, adapter)
    assert same(served, edited)
    # the cache now holds the edited rows: the next switch (cached) writes them again
    sparsify_fx.apply_adapter(served, adapter)
    assert torch.equal(served.get_parameter(fqn).detach().index_select(dim, e.index), expect)
    sparsify_fx.remove_adapter(served, adapter)
    assert same(served, edited)


def test_writes_outside_the_adapter_positions_survive_remove(trained):
    base, adapter, _ = trained
    served = copy.deepcopy(base)
    sparsify_fx.apply_adapter(served, adapter)
    fqn = next(iter(adapter.entries))
    e = adapter.entries[fqn]
    outside = next(i for i in range(e.shape[e.dim]) if i not in set(e.index.tolist()))
    expect = snapshot(base)
    with torch.no_grad():
        served.get_parameter(fqn).select(e.dim, outside).add_(1.0)  # autograd-visible write
        served.model.embed_tokens.weight.data[5] += 2.0  # .data write to a tensor the adapter does not touch
    expect[fqn].select(e.dim, outside).add_(1.0)
    expect["model.embed_tokens.weight"][5] += 2.0
    sparsify_fx.remove_adapter(served, adapter)
    assert same(served, expect)


# ---------------------------------------------------------------------- 2. the fingerprint covers the whole base
@pytest.mark.parametrize(
    "name",
    [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.self_attn.k_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.rotary_emb.inv_freq",  # a buffer
    ],
)
def test_a_base_differing_in_a_tensor_the_adapter_does_not_touch_is_refused(trained, name):
    base, adapter, _ = trained
    assert name not in adapter.entries
    other = copy.deepcopy(base)
    with torch.no_grad():
        t = dict(other.named_buffers()).get(name)
        t = other.get_parameter(name) if t is None else t
        t.mul_(1.5).add_(0.01)
    before = snapshot(other)
    with pytest.raises(sparsify_fx.AdapterError, match=rf"different base model.*{name}"):
        sparsify_fx.apply_adapter(other, adapter)
    assert same(other, before)


def test_a_base_with_other_tensors_or_shapes_is_named_as_such(trained):
    base, adapter, _ = trained
    bigger_vocab = models.llama(vocab=256).eval()  # every touched weight has the adapter's shape
    before = snapshot(bigger_vocab)
    with pytest.raises(sparsify_fx.AdapterError, match=r"has shape \(256, 64\) here, \(128, 64\).*embed_tokens"):
        sparsify_fx.apply_adapter(bigger_vocab, adapter)
    assert same(bigger_vocab, before)
    extra = copy.deepcopy(base)
    extra.register_buffer("scale", torch.ones(3))
    with pytest.raises(sparsify_fx.AdapterError, match=r"has scale, which it had not.*another model"):
        sparsify_fx.apply_adapter(extra, adapter)


def test_fingerprint_survives_save_and_load_and_a_version_1_adapter_still_applies(trained, tmp_path):
    base, adapter, out = trained
    adapter.save(tmp_path / "a.safetensors")
    loaded = sparsify_fx.load_adapter(tmp_path / "a.safetensors")
    assert loaded.fingerprint == adapter.fingerprint
    # a version-1 adapter: its fingerprint is the old hash of the touched weights only
    params = {f: base.get_parameter(f).detach() for f in adapter.entries}
    legacy = adapter_mod._legacy_fingerprint(
        {f: (e.dim, params[f], params[f].index_select(e.dim, e.index)) for f, e in adapter.entries.items()}
    )
    v1 = sparsify_fx.passes.adapter.Adapter(adapter.entries, legacy, adapter.config)
    models.check_adapter_round_trip(copy.deepcopy(base), v1, (IDS,), out, tol=1e-5)
    with pytest.raises(sparsify_fx.AdapterError, match="different base"):
        sparsify_fx.apply_adapter(models.llama().eval(), v1)


# ---------------------------------------------------------------------- 3. dtypes
def test_a_float32_adapter_applies_to_the_same_base_in_bfloat16(trained):
    """Rule: a base in another floating dtype is the adapter's base when its values are the adapter base's
    rounded to it; the delta is cast to the base dtype, and remove restores the bf16 base bit for bit."""
    base, adapter, out = trained
    served = copy.deepcopy(base).to(torch.bfloat16)
    before = snapshot(served)
    sparsify_fx.apply_adapter(served, adapter)
    for fqn, e in adapter.entries.items():
        rows = served.get_parameter(fqn).detach().index_select(e.dim, e.index)
        assert torch.equal(rows, before[fqn].index_select(e.dim, e.index) + e.delta.to(torch.bfloat16))
    with torch.no_grad():
        assert rel_err(_out(served(IDS)).float(), out) <= 5e-2  # bf16 weights and activations
    sparsify_fx.remove_adapter(served, adapter)
    assert same(served, before)


def test_a_bfloat16_base_of_other_weights_is_named_a_dtype_mismatch(trained):
    _, adapter, _ = trained
    other = models.llama().eval().to(torch.bfloat16)
    before = snapshot(other)
    with pytest.raises(
        sparsify_fx.AdapterError,
        match=r"exported from a float32 base; this base is bfloat16.*model.to\(torch.float32\)",
    ):
        sparsify_fx.apply_adapter(other, adapter)
    assert same(other, before)


def test_a_float64_base_of_the_same_weights_is_accepted_and_restored(trained):
    base, adapter, out = trained
    models.check_adapter_round_trip(copy.deepcopy(base).to(torch.float64), adapter, (IDS.clone(),), out, tol=1e-5)
