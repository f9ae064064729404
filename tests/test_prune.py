"""Structured pruning: parameter counts by arithmetic, zeroed units removed without changing outputs,
bias compensation, GQA head bookkeeping, tied weights, and atomic failure."""

from __future__ import annotations

import copy

import models
import pytest
import torch
import torch.nn as nn
from models import output_tensor as _out
from models import rel_err

import sparsify_fx
from sparsify_fx import ConfigError, PruneConfig

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
IMG = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))




def n_params(model):
    return sum(p.numel() for p in model.parameters())


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snap):
    sd, types = snap
    now = model.state_dict()
    assert list(now) == list(sd)
    for k, v in sd.items():
        assert now[k].shape == v.shape and torch.equal(now[k], v), k
    assert [type(m) for m in model.modules()] == types


def make(name):
    torch.manual_seed(0)
    if name == "llama":
        m, inp = models.llama(layers=2, heads=8, kv_heads=2, hidden=64, inter=128), (IDS,)
    elif name == "gpt2":
        m, inp = models.gpt2(layers=2, heads=4, hidden=64), (IDS,)
    elif name == "bert":
        m, inp = models.bert(layers=2, heads=4, hidden=64, inter=128), (IDS,)
    else:
        m, inp = models.SmallCNN(), (IMG,)
        models.randomize_norm_stats(m)
    return m.eval(), inp


RATIO = {
    "llama": {"attention_heads": 0.25, "ffn_channels": 0.25},
    "gpt2": {"attention_heads": 0.25, "ffn_channels": 0.25},
    "bert": {"attention_heads": 0.25, "ffn_channels": 0.25},
    "cnn": {"conv_channels": 0.25},
}


def expected_params(name, model):
    """Parameter count after removing 25% of heads and FFN (or conv) channels, by hand."""
    n = n_params(model)
    if name == "llama":
        # 8 query heads in 2 kv groups of 4 -> one query head per kv group goes: 2 heads x 8 dims
        h, gone_q, gone_f = 64, 2 * 8, 32
        return n - 2 * (2 * h * gone_q + 3 * h * gone_f)
    if name == "gpt2":
        h, gone_q, gone_f = 64, 16, 64  # one of 4 heads (16 dims); 64 of 256 channels
        attn = 3 * gone_q * (h + 1) + gone_q * h  # c_attn q/k/v columns + bias, c_proj rows
        mlp = gone_f * (h + 1) + gone_f * h
        return n - 2 * (attn + mlp)
    if name == "bert":
        h, gone_q, gone_f = 64, 16, 32
        attn = 3 * gone_q * (h + 1) + gone_q * h
        mlp = gone_f * (h + 1) + gone_f * h
        return n - 2 * (attn + mlp)
    # cnn: conv1 8->6, conv2 16->12
    return (6 * 3 * 9 + 6) + 2 * 6 + (12 * 6 * 9 + 12) + 2 * 12 + (10 * 12 + 10)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "cnn"])
def test_param_count_matches_arithmetic_and_model_runs_and_retraces(name):
    model, inp = make(name)
    expected = expected_params(name, model)
    types = [type(m) for m in model.modules()]
    out_shape = _out(model(*inp)).shape
    sparsify_fx.prune(model, inp, PruneConfig(ratio=RATIO[name]))
    assert n_params(model) == expected
    assert [type(m) for m in model.modules()] == types
    with torch.no_grad():
        assert _out(model(*inp)).shape == out_shape
    report = sparsify_fx.analyze(model, inp)
    units = {g.kind: g.num_units for g in report.groups if g.layer in (0, None) and g.kind != "head_dim"}
    if name == "llama":
        attn = model.model.layers[0].self_attn
        assert units["attention_heads"] == 3 and units["kv_heads"] == 2 and units["ffn_channels"] == 96
        assert attn.num_key_value_groups == 3 and attn.q_proj.out_features == 48 and attn.o_proj.in_features == 48
        assert model.config.num_attention_heads == 6 and model.config.num_key_value_heads == 2
        assert model.config.intermediate_size == 96 and model.config.hidden_size == 64
    elif name == "gpt2":
        attn = model.transformer.h[0].attn
        assert units["attention_heads"] == 3 and units["ffn_channels"] == 192
        assert attn.num_heads == 3 and attn.split_size == 48 and attn.c_attn.nf == 144 and attn.c_proj.nx == 48
        assert model.config.n_head == 3 and model.config.n_embd == 64
    elif name == "bert":
        attn = model.encoder.layer[0].attention.self
        assert units["attention_heads"] == 3 and units["ffn_channels"] == 96
        assert attn.num_attention_heads == 3 and attn.all_head_size == 48
        assert model.config.intermediate_size == 96 and model.config.hidden_size == 64
    else:
        assert [g.num_units for g in report.groups] == [6, 12]
        assert model.conv2.in_channels == 6 and model.bn1.num_features == 6 and model.fc.in_features == 12


def _zero_units(model, report, kinds, n_per_group, seed=0):
    """Make n units of each group contribute nothing by zeroing them at their consumers."""
    g = torch.Generator().manual_seed(seed)
    picked = {}
    with torch.no_grad():
        for grp in report.groups:
            if grp.kind not in kinds:
                continue
            units = torch.randperm(grp.num_units, generator=g)[: n_per_group[grp.kind]]
            picked[grp.name] = sorted(units.tolist())
            consumers = [m for m in grp.members if m.role == "in"]
            for m in consumers:
                t = model.get_parameter(m.fqn)
                idx = m.index(torch.arange(grp.num_units))
                unit_of = torch.empty(m.size, dtype=torch.long)
                for occ in m.occurrences:
                    for b in occ.offsets:
                        unit_of[b : b + occ.units * occ.inner] = torch.arange(occ.units).repeat_interleave(occ.inner)
                cols = idx[torch.isin(unit_of, units)]
                t.index_fill_(m.dim, cols, 0.0)
    return picked


# every model by magnitude; the data-driven scores on a transformer and the CNN
ZEROED_CASES = [(n, "magnitude") for n in ("llama", "gpt2", "bert", "cnn")] + [
    (n, s) for n in ("llama", "cnn") for s in ("activation", "taylor")
]


@pytest.mark.parametrize(("name", "score"), ZEROED_CASES)
def test_zeroed_units_are_removed_without_changing_outputs(name, score):
    model, inp = make(name)
    report = sparsify_fx.analyze(model, inp)
    kinds = set(RATIO[name])
    n = {g.kind: round(0.25 * g.num_units + 1e-9) for g in report.groups if g.kind in kinds}
    _zero_units(model, report, kinds, n)
    with torch.no_grad():
        ref = _out(model(*inp)).clone()
    loss_fn = (lambda m, b: _out(m(*b)).pow(2).mean()) if score == "taylor" else None
    cfg = PruneConfig(ratio=RATIO[name], score=score, calibration=[inp], loss_fn=loss_fn, progress=False)
    sparsify_fx.prune(model, inp, cfg)
    with torch.no_grad():
        assert rel_err(_out(model(*inp)), ref) <= 1e-6


def test_zeroed_batchnorm_channels_are_removed_without_changing_outputs():
    model, inp = make("cnn")
    with torch.no_grad():
        model.bn1.weight[[1, 6]] = 0.0
        model.bn1.bias[[1, 6]] = 0.0
        model.bn2.weight[[0, 3, 9, 15]] = 0.0
        model.bn2.bias[[0, 3, 9, 15]] = 0.0
        ref = model(IMG)
    kept_fc = model.fc.weight[:, [i for i in range(16) if i not in (0, 3, 9, 15)]].clone()
    sparsify_fx.prune(model, inp, PruneConfig(ratio=0.25))
    assert model.conv1.out_channels == 6 and model.conv2.out_channels == 12
    assert torch.equal(model.fc.weight, kept_fc)  # exactly the zeroed channels went
    with torch.no_grad():
        assert rel_err(model(IMG), ref) <= 1e-6


def test_gqa_kv_heads_go_with_their_query_heads():
    model, inp = make("llama")
    report = sparsify_fx.analyze(model, inp)
    # kv head 1 (query heads 4..7) contributes nothing: zero its o_proj columns
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 32:] = 0.0
        ref = _out(model(*inp)).clone()
    k_before = model.model.layers[0].self_attn.k_proj.weight[:8].clone()
    sparsify_fx.prune(model, inp, PruneConfig(ratio={"kv_heads": 0.5}))
    attn = model.model.layers[0].self_attn
    assert torch.equal(attn.k_proj.weight, k_before)
    assert attn.k_proj.out_features == 8 and attn.q_proj.out_features == 32 and attn.num_key_value_groups == 4
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 4
    with torch.no_grad():
        assert rel_err(_out(model(*inp)), ref) <= 1e-6
    assert any(g.kind == "attention_heads" and g.num_units == 4 for g in sparsify_fx.analyze(model, inp).groups)
    assert len(report.by_kind("kv_heads")) == 2


def test_gqa_query_heads_pruned_evenly_across_kv_groups():
    model, inp = make("llama")
    sparsify_fx.prune(model, inp, PruneConfig(ratio={"attention_heads": 0.5}, score="random", seed=3))
    report = sparsify_fx.analyze(model, inp)
    for g in report.by_kind("attention_heads"):
        assert g.num_units == 2 and g.kv_group is not None  # 2 query heads in each of 2 kv groups
    assert model.config.num_attention_heads == 4 and model.model.layers[1].self_attn.num_key_value_groups == 2


@pytest.mark.parametrize("name", ["cnn", "gpt2"])
def test_bias_compensation_reduces_output_error(name):
    base, inp = make(name)
    if name == "cnn":  # BN + ReLU then pooling: removed channels carry a large mean, compensation recovers it
        calib = [(torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(s)),) for s in range(4)]
        held = torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(99))
        ratio, bound = {"conv_channels": 0.5}, 0.5
    else:  # random-init GELU channels: small means, so only a modest gain is expected
        calib = [(torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(s)),) for s in range(4)]
        held = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(99))
        ratio, bound = {"ffn_channels": 0.5}, 1.0
    with torch.no_grad():
        ref = _out(base(held))
    errs = {}
    for comp in (False, True):
        m = copy.deepcopy(base)
        cfg = PruneConfig(ratio=ratio, bias_compensation=comp, calibration=calib, progress=False)
        sparsify_fx.prune(m, inp, cfg)
        with torch.no_grad():
            errs[comp] = rel_err(_out(m(held)), ref)
    assert errs[False] > 0.05  # the removed channels did matter
    assert errs[True] < bound * errs[False], errs


def test_bias_compensation_creates_missing_bias():
    model, inp = make("llama")
    assert model.model.layers[0].self_attn.o_proj.bias is None
    calib = [(torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(s)),) for s in range(2)]
    sparsify_fx.prune(model, inp, PruneConfig(ratio=0.25, bias_compensation=True, calibration=calib, progress=False))
    o = model.model.layers[0].self_attn.o_proj
    assert isinstance(o, nn.Linear) and isinstance(o.bias, nn.Parameter) and o.bias.shape == (64,)
    assert model.model.layers[0].mlp.down_proj.bias.abs().sum() > 0
    sparsify_fx.analyze(model, inp)


def test_generator_calibration_feeds_both_taylor_and_bias_compensation():
    # taylor scoring and the bias statistics each pass over the batches: a generator must be read once
    base, inp = make("llama")
    batches = [(torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(s)),) for s in range(3)]
    loss_fn = lambda m, b: _out(m(*b)).pow(2).mean()  # noqa: E731
    pruned = []
    for calib in (batches, (b for b in batches)):
        m = copy.deepcopy(base)
        cfg = PruneConfig(ratio=0.25, score="taylor", loss_fn=loss_fn, bias_compensation=True,
                          calibration=calib, progress=False)
        sparsify_fx.prune(m, inp, cfg)
        pruned.append(m.state_dict())
    assert pruned[0].keys() == pruned[1].keys()
    assert all(torch.equal(v, pruned[1][k]) for k, v in pruned[0].items())
    assert pruned[0]["model.layers.0.mlp.down_proj.bias"].abs().sum() > 0


def test_hidden_is_pruned_only_when_asked_and_then_everywhere():
    model, inp = make("gpt2")
    sparsify_fx.prune(model, inp, PruneConfig(ratio=0.25))
    assert model.config.n_embd == 64 and model.transformer.wte.embedding_dim == 64
    model, inp = make("gpt2")
    sparsify_fx.prune(model, inp, PruneConfig(ratio={"hidden": 0.25}, prune_hidden=True))
    assert model.lm_head.weight is model.transformer.wte.weight  # tie kept
    assert model.transformer.wte.weight.shape == (128, 48) and model.transformer.wpe.embedding_dim == 48
    assert all(ln.normalized_shape == (48,) for ln in model.modules() if isinstance(ln, nn.LayerNorm))
    assert model.config.n_embd == 48
    with torch.no_grad():
        model(IDS)
    assert sparsify_fx.analyze(model, inp).by_kind("hidden")[0].num_units == 48


def test_global_scope_ranks_units_across_layers():
    model, inp = make("llama")
    with torch.no_grad():  # layer 0 gets 48 dead channels, layer 1 gets 16: 64 = 25% of 256
        model.model.layers[0].mlp.down_proj.weight[:, :48] = 0.0
        model.model.layers[1].mlp.down_proj.weight[:, 80:96] = 0.0
        ref = _out(model(IDS)).clone()
    with pytest.warns(UserWarning, match="intermediate_size"):
        sparsify_fx.prune(model, inp, PruneConfig(ratio={"ffn_channels": 0.25}, scope="global"))
    assert model.model.layers[0].mlp.up_proj.out_features == 80
    assert model.model.layers[1].mlp.up_proj.out_features == 112
    assert model.config.intermediate_size == 128  # non-uniform: config left alone (warned)
    with torch.no_grad():
        assert rel_err(_out(model(IDS)), ref) <= 1e-6


def test_random_score_is_seeded():
    a, inp = make("llama")
    b = copy.deepcopy(a)
    c = copy.deepcopy(a)
    sparsify_fx.prune(a, inp, PruneConfig(ratio=0.25, score="random", seed=1))
    sparsify_fx.prune(b, inp, PruneConfig(ratio=0.25, score="random", seed=1))
    sparsify_fx.prune(c, inp, PruneConfig(ratio=0.25, score="random", seed=2))
    sa, sc = a.state_dict(), c.state_dict()
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in sa.items())
    assert any(not torch.equal(v, sc[k]) for k, v in sa.items())


@pytest.mark.parametrize(
    "cfg, match",
    [
        (PruneConfig(ratio=1.0), "ratio"),
        (PruneConfig(ratio=-0.1), "ratio"),
        (PruneConfig(ratio={"attention_heads": 1.5}), "ratio"),
        (PruneConfig(ratio={"heads": 0.25}), "unknown kind"),
        (PruneConfig(ratio={"conv_channels": 0.25}), "does not have"),
        (PruneConfig(ratio={"hidden": 0.25}), "prune_hidden"),
        (PruneConfig(ratio={"head_dim": 0.25}), "head_dim"),
        (PruneConfig(ratio={"kv_heads": 0.75}), "keep_min"),  # 2 kv heads: round(1.5) = 2 would remove both
        (PruneConfig(ratio=0.25, keep_min=0), "keep_min"),
        (PruneConfig(ratio=0.25, score="activation"), "calibration"),
        (PruneConfig(ratio=0.25, score="activation", calibration=[]), "empty"),
        (PruneConfig(ratio=0.25, score="taylor"), "loss"),
        (PruneConfig(ratio=0.25, score="sum"), "score"),
        (PruneConfig(ratio=0.25, scope="layer"), "scope"),
    ],
)
def test_bad_config_raises_and_leaves_model_unchanged(cfg, match):
    model, inp = make("llama")
    snap = snapshot(model)
    with pytest.raises(ConfigError, match=match):
        sparsify_fx.prune(model, inp, cfg)
    assert_unchanged(model, snap)


def test_failure_after_writes_rolls_back():
    # the random transformer keeps its head count in a frozen dataclass the pass cannot update, so
    # the pruned model fails to run: every write must be undone
    spec = models.ArchSpec(depth=2, hidden=32, heads=4, kv_heads=4, head_dim=8, ffn=48, fused_qkv=False,
                           gated=True, bias=True, residual=True, norm="rms", attention="sdpa", rope=False,
                           gqa_style="sdpa", act="silu", embed=True, causal=True)
    torch.manual_seed(0)
    model = models.RandomTransformer(spec).eval()
    x = model.example_input()
    snap = snapshot(model)
    with pytest.raises(ConfigError, match="restored"):
        sparsify_fx.prune(model, (x,), PruneConfig(ratio={"attention_heads": 0.25}))
    assert_unchanged(model, snap)
    # ffn widths are not stored anywhere: the same model prunes its FFN channels fine
    with torch.no_grad():
        ref = model(x)
        model.blocks[0].down.weight[:, :12] = 0.0
        model.blocks[1].down.weight[:, 36:] = 0.0
        ref = model(x)
    sparsify_fx.prune(model, (x,), PruneConfig(ratio={"ffn_channels": 0.25}))
    assert model.blocks[0].gate.out_features == 36
    with torch.no_grad():
        assert rel_err(model(x), ref) <= 1e-6


def _albert():
    torch.manual_seed(0)
    return models.albert().eval()


def test_normalised_channel_space_is_pruned_only_when_asked():
    # ALBERT's 32-wide embedding space passes a LayerNorm: removing units changes its statistics, so a
    # default prune leaves it (and passes its zeroed-units check); prune_hidden=True prunes it like hidden
    model = _albert()
    (emb,) = [g for g in sparsify_fx.analyze(model, (IDS,)).groups if g.num_units == 32]
    assert emb.normalized and emb.kind == "channels"
    sparsify_fx.prune(model, (IDS,), PruneConfig(ratio=0.25, progress=False))
    assert model.embeddings.word_embeddings.embedding_dim == 32 and model.config.intermediate_size == 96

    model = _albert()
    snap = snapshot(model)
    with pytest.raises(ConfigError, match="normalised"):
        sparsify_fx.prune(model, (IDS,), PruneConfig(ratio={"channels": 0.25}, progress=False))
    assert_unchanged(model, snap)

    sparsify_fx.prune(model, (IDS,), PruneConfig(ratio=0.25, prune_hidden=True, progress=False))
    assert model.embeddings.word_embeddings.embedding_dim == 24 and model.config.embedding_size == 24
    assert model.embeddings.LayerNorm.normalized_shape == (24,)
    with torch.no_grad():
        assert _out(model(IDS)).shape == (2, 8, 64)
    sparsify_fx.analyze(model, (IDS,))


def test_a_group_no_larger_than_keep_min_stays_whole_and_the_others_prune():
    # a one-head stage (SegFormer's first) has no head to give at ratio 0.5: it stays whole with a warning instead
    # of failing the model; the two-head stage loses one
    from transformers import SegformerConfig, SegformerModel

    from sparsify_fx.passes.prune import UnitsKeptWarning

    cfg = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                          patch_sizes=[3, 3], strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2])
    torch.manual_seed(0)
    model = SegformerModel(cfg).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UnitsKeptWarning, match=r"stages\.0\.blocks\.0\.attention.*keep_min=1"):
        pruned = sparsify_fx.prune(copy.deepcopy(model), (x,), PruneConfig(ratio={"attention_heads": 0.5}))
    q = [pruned.get_submodule(f"stages.{i}.blocks.0.attention.q_proj").out_features for i in range(2)]
    assert q == [8, 8]  # stage 0 kept its one head of 8; stage 1 went from two heads of 8 to one
    assert pruned(x).last_hidden_state.shape == model(x).last_hidden_state.shape
