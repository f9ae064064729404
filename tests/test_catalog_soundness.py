"""Issue 13, second round: the catalog sweep's soundness and prune self-check failures, as patterns.

- A reduction that reads a space whole (mean, var, softmax, sum over the features: OLMo 2's q/k norm over all
  heads, BitNet's sub-norms written as ``pow(2).mean(-1)``) makes the space *normalised*: permuting it is exact,
  removing units is not the same as zeroing them at their consumers, so default prune leaves it alone.
- A model that samples in its forward (ViT-MAE's masking noise) is compared by prune under the same draws.
- RWKV's attention channels (token shift, per-channel decay, the WKV recurrence) are a sound group: its
  recurrent state is a cache in the permuted layout, and the catalog compares the function the analysis traced.
"""

from __future__ import annotations

import copy
import warnings

import models
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import check_groups_are_symmetries, random_perm, rel_err

import sparsify_fx
from sparsify_fx.passes import permute
from sparsify_fx.passes.prune import NothingPrunedWarning


class ReadWhole(nn.Module):
    """Two FFNs side by side: ``a``'s channels are read whole by ``how`` (a reduction over them), ``b``'s only by
    their consumer, as a plain FFN's are."""

    def __init__(self, how: str, d: int = 8, f: int = 16) -> None:
        super().__init__()
        self.how = how
        self.a_up, self.a_down = nn.Linear(d, f), nn.Linear(f, d)
        self.b_up, self.b_down = nn.Linear(d, f), nn.Linear(f, d)
        self.scale = nn.Parameter(torch.rand(f) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a_up(x)
        if self.how == "rms":  # an RMSNorm written out, as most transformers models do
            h = self.scale * h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        elif self.how == "var":
            h = self.scale * (h - h.mean(-1, keepdim=True)) / (h.var(-1, keepdim=True) + 1e-5).sqrt()
        elif self.how == "softmax":
            h = self.scale * F.softmax(h, dim=-1)
        elif self.how == "sum":
            h = self.scale * h * h.sum(-1, keepdim=True).sigmoid()
        return x + self.a_down(h) + self.b_down(F.gelu(self.b_up(x)))


def _group(report, prefix: str):
    (g,) = [g for g in report.groups if g.kind == "ffn_channels" and g.members[0].fqn.startswith(prefix)]
    return g


@pytest.mark.parametrize("how", ["rms", "var", "softmax", "sum"])
def test_a_reduction_over_a_space_marks_it_read_whole(how):
    torch.manual_seed(0)
    model, x = ReadWhole(how).eval(), torch.randn(3, 5, 8)
    report = sparsify_fx.analyze(model, (x,))
    assert _group(report, "a_").normalized
    assert not _group(report, "b_").normalized
    check_groups_are_symmetries(model, (x,), report)  # marking changes no group: permutations stay exact


@pytest.mark.parametrize("how", ["rms", "softmax"])
def test_default_prune_keeps_spaces_read_whole_and_prunes_the_rest(how):
    torch.manual_seed(0)
    model, x = ReadWhole(how).eval(), torch.randn(3, 5, 8)
    # before: the reduced FFN was pruned and prune's own check refused the model ("differs from the original with
    # the removed units zeroed"); now it keeps it whole and removes a quarter of the plain FFN's channels
    small = sparsify_fx.prune(model, (x,), sparsify_fx.PruneConfig(ratio=0.25))
    assert small.a_up.out_features == 16 and small.a_down.in_features == 16
    assert small.b_up.out_features == 12 and small.b_down.in_features == 12


def test_prune_says_why_when_every_group_is_read_whole():
    class OnlyNormed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.up(x)
            return self.down(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))

    torch.manual_seed(0)
    model, x = OnlyNormed().eval(), torch.randn(2, 8)
    before = copy.deepcopy(model.state_dict())
    with pytest.warns(NothingPrunedWarning, match="read whole by a norm or another reduction"):
        sparsify_fx.prune(model, (x,), sparsify_fx.PruneConfig(ratio=0.25))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # prune_hidden opts in, as for the hidden stream
    small = sparsify_fx.prune(model, (x,), sparsify_fx.PruneConfig(ratio=0.25, prune_hidden=True))
    assert small.up.out_features == 12


def test_olmo2_qk_norm_over_all_heads_keeps_heads_and_prunes_ffn():
    from transformers import Olmo2Config, Olmo2Model

    cfg = Olmo2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = Olmo2Model(cfg).eval()
    ids = torch.randint(0, 128, (2, 7))
    report = sparsify_fx.analyze(model, (ids,))
    heads = [g for g in report.groups if g.kind == "attention_heads"]
    assert len(heads) == 2 and all(g.normalized for g in heads)  # q_norm/k_norm: RMSNorm over heads x head_dim
    assert all(not g.normalized for g in report.groups if g.kind == "ffn_channels")
    small = sparsify_fx.prune(model, (ids,), sparsify_fx.PruneConfig(ratio=0.25))
    for layer in small.layers:
        assert layer.self_attn.q_proj.out_features == 64
        assert layer.mlp.up_proj.out_features == 96


class Noisy(nn.Module):
    """Draws noise in its forward even in eval mode, as ViT-MAE's random masking does."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + torch.randn_like(x)
        return self.down(F.relu(self.up(x)))


def test_prune_compares_a_sampling_model_under_the_same_draws():
    torch.manual_seed(0)
    model, x = Noisy().eval(), torch.randn(4, 8)
    state = torch.get_rng_state()
    small = sparsify_fx.prune(model, (x,), sparsify_fx.PruneConfig(ratio=0.25, score="magnitude"))
    assert small.up.out_features == 12
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is where it was


# ---------------------------------------------------------------------- RWKV
def _rwkv():
    from transformers import RwkvConfig, RwkvModel

    cfg = RwkvConfig(vocab_size=64, context_length=16, hidden_size=32, attention_hidden_size=32,
                     intermediate_size=64, num_hidden_layers=2)
    torch.manual_seed(0)
    model = RwkvModel(cfg).eval().double()
    with torch.no_grad():  # the init leaves time_decay/time_first equal across channels in places: randomise
        for blk in model.blocks:
            blk.attention.time_decay.normal_()
            blk.attention.time_first.normal_()
    return model, torch.randint(0, 64, (2, 6))


def test_rwkv_channels_are_a_symmetry_and_the_state_is_a_permuted_cache():
    model, ids = _rwkv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = sparsify_fx.analyze(model, (ids,))
    attn = [g for g in report.groups if ".attention" in g.prefix]
    assert len(attn) == 2
    assert {m.fqn.rsplit(".", 1)[-1] for m in attn[0].members} >= {"time_decay", "time_first"}
    with torch.no_grad():
        ref = model(ids, use_cache=True)
    check_groups_are_symmetries(model, (ids,), report, tol=1e-9)

    g = torch.Generator().manual_seed(1)
    grp = attn[0]
    assert grp.prefix == "blocks.0.attention"
    perm = random_perm(grp.num_units, g)
    m2 = copy.deepcopy(model)
    permute(m2, grp, perm)
    with torch.no_grad():
        out = m2(ids, use_cache=True)
        # the state the permuted model returns is the original's with that layer's channels permuted ...
        for i in (2, 3, 4):
            expect = ref.state[i].clone()
            expect[:, :, 0] = ref.state[i][:, perm, 0]
            assert rel_err(out.state[i], expect) < 1e-12
        # ... and fed back to the permuted model it continues the sequence exactly as the original does
        nxt = torch.randint(0, 64, (2, 1))
        a = model(nxt, state=[s.clone() for s in ref.state], use_cache=True).last_hidden_state
        b = m2(nxt, state=[s.clone() for s in out.state], use_cache=True).last_hidden_state
    assert rel_err(b, a) < 1e-12
    assert rel_err(out.last_hidden_state, ref.last_hidden_state) < 1e-12




def test_catalog_symmetry_check_compares_the_analysed_function_on_rwkv():
    catalog = models.load_catalog()
    model, ids = _rwkv()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = sparsify_fx.analyze(model, (ids,))
    rec = catalog.Record(model_type="rwkv")
    # before: the cache (the recurrent state, a list of tensors) was compared too, and moved with the channels
    catalog._symmetry(lambda: copy.deepcopy(model), {"input_ids": ids}, report, rec, seed=0)
    assert rec.symmetry_dtype == "float64"
    assert rec.broken_groups == [] and rec.symmetry_max_err < 1e-12
