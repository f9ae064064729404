"""A one-head attention is still a head: one unit whose members are exactly the ones two heads would have.

With ``num_heads == 1`` the view ``[B, T, D] -> [B, T, 1, D]`` has no head count to factor out, so before this
the analysis found only the within-head groups (q/k features, v/o features) and no ``attention_heads`` group:
S²FT had no head to select and the catalog counted the stage as uncovered (CvT, GLPN, PVT, PVT-v2, SegFormer).
Permuting a group of one unit is the identity, so soundness is not what can go wrong here: the members can.
Each test compares the one-head model with the same architecture at two heads, or checks what S²FT trains.
"""

from __future__ import annotations

import copy

import models
import pytest
import torch
from models import check_groups_are_symmetries

import sparsify_fx
from sparsify_fx.passes.s2ft import _projections_of

BASE = dict(depth=1, hidden=8, head_dim=4, ffn=6, fused_qkv=False, gated=False, bias=True, residual=True,
            norm="layer", attention="sdpa", rope=False, gqa_style="sdpa", act="relu", embed=False, causal=False)
VARIANTS = {
    "sdpa": {},
    "matmul": {"attention": "matmul"},
    "fused_qkv": {"fused_qkv": True},
    "fused_qkv_matmul": {"fused_qkv": True, "attention": "matmul"},
    "rope": {"rope": True},
    "rope_matmul_causal": {"rope": True, "attention": "matmul", "causal": True},
    "no_bias_rms": {"bias": False, "norm": "rms", "embed": True},
}


def random_transformer(heads: int, kv_heads: int | None = None, **kw) -> models.RandomTransformer:
    spec = models.ArchSpec(**{**BASE, **kw, "heads": heads, "kv_heads": kv_heads or heads})
    torch.manual_seed(0)
    return models.RandomTransformer(spec).eval()


def head_groups(report, layer=0):
    return [g for g in report.groups if g.kind in ("attention_heads", "kv_heads") and g.layer == layer]


def shape_of_members(group):
    """Member dims with the q/k/v tag of each place the head occurs: what two heads and one head must share."""
    return {(m.fqn, m.dim, m.role): sorted("".join(sorted(o.tags)) for o in m.occurrences) for m in group.members}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_head_is_one_unit_with_the_members_of_two_heads(variant):
    kw = VARIANTS[variant]
    one, two = random_transformer(1, **kw), random_transformer(2, **kw)
    x1, x2 = one.example_input(), two.example_input()
    rep1, rep2 = sparsify_fx.analyze(one, (x1,)), sparsify_fx.analyze(two, (x2,))
    [g1], [g2] = head_groups(rep1), head_groups(rep2)
    assert (g1.kind, g1.num_units, g1.unit_size) == ("attention_heads", 1, BASE["head_dim"]), rep1.table()
    assert (g2.kind, g2.num_units) == ("attention_heads", 2), rep2.table()
    assert shape_of_members(g1) == shape_of_members(g2), (rep1.table(), rep2.table())
    # the unit spans every index of each member dim it occurs in: the head is all of q, k, v's rows and o's columns
    for m in g1.members:
        assert sum(o.units * o.inner * len(o.offsets) for o in m.occurrences) == m.size, m
    # the within-head groups stay what they were
    assert sorted(g.kind for g in rep1.groups if g.kind == "head_dim") == sorted(
        g.kind for g in rep2.groups if g.kind == "head_dim"), (rep1.table(), rep2.table())
    check_groups_are_symmetries(one, (x1,), rep1)


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 1), (4, 2)])
def test_no_one_unit_head_where_there_are_several_heads(heads, kv_heads):
    # multi-query attention has one k/v head but four query heads: not a one-head attention
    model = random_transformer(heads, kv_heads, attention="matmul", gqa_style="expand")
    rep = sparsify_fx.analyze(model, (model.example_input(),))
    assert head_groups(rep), rep.table()
    assert all(g.num_units > 1 for g in head_groups(rep)), rep.table()


def _trained(cfg: sparsify_fx.S2FTConfig) -> tuple[set[str], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """S²FT on the one-head model, one SGD step, merged back: which weights changed, old and new values."""
    model = random_transformer(1)
    x = model.example_input()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sparsify_fx.s2ft(model, (x,), cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1)
    model(x).pow(2).mean().backward()
    opt.step()
    after = sparsify_fx.merge(model).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    return changed, before, after


def test_s2ft_selecting_the_one_head_trains_the_whole_head_and_nothing_else():
    model = random_transformer(1)
    [group] = head_groups(sparsify_fx.analyze(model, (model.example_input(),)))
    assert sorted(_projections_of(group)) == ["k", "o", "q", "v"]
    weights = {m.fqn for m in group.members if m.role in ("in", "out")}
    assert weights == {f"blocks.0.{p}.weight" for p in "qkvo"}

    # ratio 0.1 of one head rounds to none; min_units=1 (the default) selects it: 1 of 1 heads
    changed, before, after = _trained(sparsify_fx.S2FTConfig(attention=("q", "k", "v", "o"), ffn=()))
    assert changed == weights
    for p in "qkv":  # every row of q, k, v and every column of o: the head is all of them
        w = f"blocks.0.{p}.weight"
        assert (before[w] != after[w]).any(dim=1).all(), p
    assert (before["blocks.0.o.weight"] != after["blocks.0.o.weight"]).any(dim=0).all()


def test_s2ft_default_trains_v_and_o_of_the_one_head():
    changed, before, after = _trained(sparsify_fx.S2FTConfig(ffn=()))
    assert changed == {"blocks.0.v.weight", "blocks.0.o.weight"}
    assert (before["blocks.0.v.weight"] != after["blocks.0.v.weight"]).any(dim=1).all()
    assert (before["blocks.0.o.weight"] != after["blocks.0.o.weight"]).any(dim=0).all()


def _segformer(heads: int, eager: bool):
    import transformers as T

    cfg = T.SegformerConfig(num_encoder_blocks=1, depths=[1], sr_ratios=[2], hidden_sizes=[16], patch_sizes=[3],
                            strides=[2], num_attention_heads=[heads], mlp_ratios=[2], num_channels=3)
    cfg._attn_implementation = "eager" if eager else "sdpa"
    torch.manual_seed(0)
    return T.SegformerModel(cfg).eval()


def _cvt(heads: int):
    import transformers as T

    cfg = T.CvtConfig(depth=[1], num_heads=[heads], embed_dim=[16], patch_sizes=[3], patch_stride=[2],
                      patch_padding=[1], mlp_ratio=[2.0], stride_kv=[2], cls_token=[False], qkv_bias=[True],
                      drop_path_rate=[0.0], attention_drop_rate=[0.0], drop_rate=[0.0], padding_q=[1],
                      padding_kv=[1], kernel_qkv=[3], stride_q=[1], qkv_projection_method=["dw_bn"])
    torch.manual_seed(0)
    return T.CvtModel(cfg).eval()


@pytest.mark.parametrize("make", [
    pytest.param(lambda h: _segformer(h, eager=False), id="segformer-sdpa"),
    pytest.param(lambda h: _segformer(h, eager=True), id="segformer-eager-matmul"),
    pytest.param(_cvt, id="cvt-einsum"),
])
def test_catalog_single_head_stages_match_their_two_head_version(make):
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    one, two = make(1), make(2)
    rep1, rep2 = sparsify_fx.analyze(one, (x,)), sparsify_fx.analyze(two, (x,))
    heads1 = [g for g in rep1.groups if g.kind == "attention_heads"]
    heads2 = [g for g in rep2.groups if g.kind == "attention_heads"]
    assert [g.num_units for g in heads1] == [1] and [g.num_units for g in heads2] == [2], (rep1.table(), rep2.table())
    assert shape_of_members(heads1[0]) == shape_of_members(heads2[0]), (rep1.table(), rep2.table())
    check_groups_are_symmetries(one, (x,), rep1)


def test_s2ft_on_a_one_head_stage_keeps_the_output_and_trains_the_head():
    model = _segformer(1, eager=True)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    ref = model(x).last_hidden_state
    tuned = sparsify_fx.s2ft(copy.deepcopy(model), (x,), sparsify_fx.S2FTConfig(ffn=()))
    torch.testing.assert_close(tuned(x).last_hidden_state, ref, rtol=1e-5, atol=1e-6)
    # the default v+o of the one head: all of v's rows and all of o's columns, as one block each
    trainable = {n: tuple(p.shape) for n, p in tuned.named_parameters() if p.requires_grad}
    attn = "stages.0.blocks.0.attention"
    assert trainable == {f"{attn}.v_proj.blocks.0": (16, 16), f"{attn}.o_proj.blocks.0": (16, 16)}, trainable


def _text_model(name: str, heads: int):
    import transformers as T

    c = dict(vocab_size=128, num_hidden_layers=1, intermediate_size=64)
    if name == "qwen3":  # RoPE, and q_norm/k_norm over each head's features: shared by the heads, so not members
        return T.Qwen3ForCausalLM(T.Qwen3Config(num_attention_heads=heads, num_key_value_heads=heads, head_dim=16,
                                                hidden_size=32, **c))
    if name == "gpt2":  # one fused Conv1D c_attn: the head occurs three times in its rows (q, k, v)
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_layer=1, n_embd=16 * heads, n_head=heads,
                                              bos_token_id=0, eos_token_id=0))
    # GPT-NeoX: q, k and v rows interleave inside each head of query_key_value
    return T.GPTNeoXForCausalLM(T.GPTNeoXConfig(num_attention_heads=heads, hidden_size=16 * heads, **c))


@pytest.mark.parametrize("name", ["qwen3", "gpt2", "gpt_neox"])
def test_text_models_with_one_head_match_their_two_head_version(name):
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    reps = []
    for heads in (1, 2):
        torch.manual_seed(0)
        reps.append(sparsify_fx.analyze(_text_model(name, heads).eval(), (ids,)))
    [g1], [g2] = (head_groups(r) for r in reps)
    assert (g1.num_units, g2.num_units) == (1, 2), (reps[0].table(), reps[1].table())
    assert shape_of_members(g1) == shape_of_members(g2), (reps[0].table(), reps[1].table())
