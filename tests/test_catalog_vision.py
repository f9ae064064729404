"""Issue 13, second round: patterns the catalog sweep found short on vision and audio models.

- a depthwise conv between two projections (SegFormer / PVTv2 / GLPN Mix-FFN) is channel-wise: the FFN channels
  pass through it and keep their kind, while a depthwise conv between two channel-mixing convs (MobileNet) stays
  a conv-channel space;
- attention written as ``einsum`` (CvT's ``bhlk,bhtk->bhlt``) has heads, as the same product written with matmul;
- the sweep's own inputs: raw audio long enough for wav2vec2-style SpecAugment masking in train mode, and hybrid
  ``layer_types`` that keep every kind of layer when the stack is shrunk.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from models import check_groups_are_symmetries, load_catalog

import sparsify_fx
from sparsify_fx.passes.s2ft import S2FTLinear

catalog = load_catalog()


class MixFFN(nn.Module):
    """A residual block whose FFN has a depthwise 3x3 conv between fc1 and fc2 over a 4x4 token grid."""

    def __init__(self, dim: int = 16, inter: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, inter), nn.Linear(inter, dim)
        self.dw = nn.Conv2d(inter, inter, 3, padding=1, groups=inter)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        h = self.fc1(self.norm(x))
        h = self.dw(h.transpose(1, 2).reshape(b, -1, 4, 4)).flatten(2).transpose(1, 2)
        return self.head(x + self.fc2(F.gelu(h)))


class InvertedResidual(nn.Module):
    """1x1 conv, depthwise 3x3, 1x1 conv: the expanded channels are conv channels."""

    def __init__(self) -> None:
        super().__init__()
        self.expand, self.dw, self.reduce = nn.Conv2d(8, 24, 1), nn.Conv2d(24, 24, 3, padding=1, groups=24), \
            nn.Conv2d(24, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + self.reduce(F.relu6(self.dw(F.relu6(self.expand(x)))))).mean((2, 3))


class EinsumAttention(nn.Module):
    """Multi-head attention whose two products are einsums, as CvT writes them."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (p(x).view(b, n, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = torch.einsum("bhlk,bhtk->bhlt", q, k) * (d // self.heads) ** -0.5
        ctx = torch.einsum("bhlt,bhtv->bhlv", scores.softmax(-1), v)
        return self.o(ctx.transpose(1, 2).reshape(b, n, d)).sum(1)


def _members(group) -> dict[str, str | None]:
    return {m.fqn: m.role for m in group.members if not m.is_buffer}


def test_depthwise_conv_passes_ffn_channels_through() -> None:
    torch.manual_seed(0)
    model, x = MixFFN().eval(), torch.randn(2, 16, 16)
    rep = sparsify_fx.analyze(model, (x,))
    ffn = rep.by_kind("ffn_channels")
    assert len(ffn) == 1 and not rep.by_kind("conv_channels"), rep.table()
    mem = _members(ffn[0])
    assert ffn[0].num_units == 32
    assert mem["fc1.weight"] == "out" and mem["fc2.weight"] == "in" and "dw.weight" in mem and "dw.bias" in mem
    check_groups_are_symmetries(model, (x,), rep)


def test_s2ft_defaults_train_the_mix_ffn_projections() -> None:
    torch.manual_seed(0)
    model, x = MixFFN().eval(), torch.randn(2, 16, 16)
    ref = model(x)
    sparsify_fx.s2ft(model, (x,), sparsify_fx.S2FTConfig(attention=(), ffn_ratio=0.25))
    swapped = {n for n, m in model.named_modules() if isinstance(m, S2FTLinear)}
    assert {"fc1", "fc2"} & swapped, swapped
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)  # the co-permutation keeps the function


def test_depthwise_conv_between_channel_mixing_convs_stays_conv_channels() -> None:
    torch.manual_seed(0)
    model, x = InvertedResidual().eval(), torch.randn(2, 8, 6, 6)
    rep = sparsify_fx.analyze(model, (x,))
    expanded = [g for g in rep.by_kind("conv_channels") if _members(g).get("expand.weight") == "out"]
    assert len(expanded) == 1 and _members(expanded[0])["reduce.weight"] == "in", rep.table()
    assert "dw.weight" in _members(expanded[0])
    assert not rep.by_kind("ffn_channels"), rep.table()
    check_groups_are_symmetries(model, (x,), rep)


def test_einsum_attention_has_heads() -> None:
    torch.manual_seed(0)
    model, x = EinsumAttention().eval(), torch.randn(2, 5, 32)
    rep = sparsify_fx.analyze(model, (x,))
    heads = rep.by_kind("attention_heads")
    assert len(heads) == 1 and heads[0].num_units == 4, rep.table()
    assert {f for f, r in _members(heads[0]).items() if r == "out"} == {"q.weight", "k.weight", "v.weight"}
    assert _members(heads[0])["o.weight"] == "in"
    check_groups_are_symmetries(model, (x,), rep)


def test_einsum_with_a_parameter_operand_is_not_attention() -> None:
    # x @ W written as einsum: a projection, no heads, and the weight keeps no 'head' kind
    class Proj(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 8, 8))
            self.out = nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(torch.einsum("gnd,gde->gne", x, self.w).sum(0))

    model, x = Proj().eval(), torch.randn(3, 4, 8)
    rep = sparsify_fx.analyze(model, (x,))
    assert not rep.by_kind("attention_heads") and not rep.by_kind("kv_heads"), rep.table()
    check_groups_are_symmetries(model, (x,), rep)


def test_cvt_heads_and_segformer_mix_ffn_found_in_every_layer() -> None:
    import transformers as T

    torch.manual_seed(0)
    cvt = T.CvtModel(T.CvtConfig(embed_dim=[16, 32], num_heads=[2, 4], depth=[1, 2], num_stages=2,
                                 patch_sizes=[7, 3], patch_stride=[4, 2], patch_padding=[2, 1], mlp_ratio=[2.0, 2.0],
                                 attention_drop_rate=[0.0, 0.0], drop_rate=[0.0, 0.0], drop_path_rate=[0.0, 0.0],
                                 qkv_bias=[True, True], cls_token=[False, False], padding_kv=[1, 1],
                                 stride_kv=[2, 2], padding_q=[1, 1], stride_q=[1, 1], kernel_qkv=[3, 3],
                                 qkv_projection_method=["dw_bn", "dw_bn"])).eval()
    seg = T.SegformerModel(T.SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1],
                                             hidden_sizes=[16, 32], num_attention_heads=[2, 4], mlp_ratios=[2, 2],
                                             patch_sizes=[7, 3], strides=[4, 2])).eval()
    x = torch.randn(2, 3, 32, 32)
    # (CvT indexes its per-stage drop-path list by stage: stage 1 needs 2 layers)
    for model, heads, ffn in ((cvt, 3, 3), (seg, 2, 2)):
        rep = sparsify_fx.analyze(model, (x,))
        assert len(rep.by_kind("attention_heads")) == heads, rep.table()
        assert len(rep.by_kind("ffn_channels")) >= ffn and not rep.by_kind("conv_channels"), rep.table()
        check_groups_are_symmetries(model, (x,), rep)


def test_catalog_audio_input_is_long_enough_to_mask_in_train_mode() -> None:
    model, inputs = catalog.build("wav2vec2")
    frames = model._get_feat_extract_output_lengths(inputs["input_values"].shape[1])
    assert frames > model.config.mask_time_length
    model.train()
    out = model(**inputs)  # SpecAugment masks spans in train mode: refused when the sequence is too short
    assert out.last_hidden_state.shape[1] == frames


def test_catalog_layer_types_keep_every_kind_of_layer() -> None:
    cfg = catalog.small_config("olmo_hybrid")  # its config refuses a stack without a full-attention layer
    assert sorted(set(cfg.layer_types)) == ["full_attention", "linear_attention"]
    assert cfg.num_hidden_layers == len(cfg.layer_types) == 2
