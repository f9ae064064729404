"""prune on catalog architectures where the pruned model did not run (issue 13): nn.MultiheadAttention keeps its
heads and the rest is pruned; modules that derive head_dim from the input width (BLIP, AIMv2's pooling head) are
refused naming the module and its attributes with the model restored; a prune that removes nothing says why."""

from __future__ import annotations

import models
import pytest
import torch
import torch.nn as nn

import sparsify_fx
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes.prune import HeadsKeptWarning, NothingPrunedWarning
from sparsify_fx.testing import assert_unchanged, model_snapshot


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class MHABlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.norm = nn.LayerNorm(64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.norm(x + self.down(torch.relu(self.up(x))))


def test_multihead_attention_keeps_heads_and_the_rest_is_pruned() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(MHABlock(), MHABlock()).eval()
    x = torch.randn(2, 10, 64)
    before = _count(m)
    with pytest.warns(HeadsKeptWarning, match=r"\['0\.attn', '1\.attn'\].*head_dim = embed_dim // num_heads"):
        sparsify_fx.prune(m, (x,), sparsify_fx.PruneConfig(ratio=0.25))
    for blk in m:
        assert (blk.attn.embed_dim, blk.attn.num_heads, blk.attn.head_dim) == (64, 4, 16)
        assert blk.attn.in_proj_weight.shape == (192, 64)
        assert blk.up.out_features == 96 and blk.down.in_features == 96
    assert _count(m) < before
    assert m(x).shape == (2, 10, 64)


def _vision(kind: str) -> nn.Module:
    if kind == "blip":
        from transformers import BlipVisionConfig as C
        from transformers import BlipVisionModel as M
    else:
        from transformers import Aimv2VisionConfig as C
        from transformers import Aimv2VisionModel as M
    cfg = C(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
            patch_size=8)
    torch.manual_seed(0)
    return M(cfg).eval()


@pytest.mark.parametrize(("kind", "where"), [
    ("blip", r"encoder\.layers\.0\.self_attn \(BlipAttention\) at .*modeling_blip\.py:\d+: `.*self\.num_heads"),
    ("aimv2", r"head \(Aimv2AttentionPoolingHead\) at .*modeling_aimv2\.py:\d+: `.*hidden_dim // self\.num_heads"),
])
def test_head_size_derived_from_input_width_is_refused_naming_module_and_attribute(kind: str, where: str) -> None:
    m = _vision(kind)
    x = torch.randn(2, 3, 32, 32)
    snap = model_snapshot(m)
    ref = m(x).last_hidden_state
    if kind == "blip":  # every attention module is a BlipAttention: heads alone cannot be pruned
        with pytest.raises(ConfigError, match=rf"(?s)failed to run.*restored.*It failed in {where}.*num_heads=3"):
            sparsify_fx.prune(m, (x,), sparsify_fx.PruneConfig(ratio={"attention_heads": 0.25}))
        assert_unchanged(m, snap)
        assert torch.equal(m(x).last_hidden_state, ref)
    else:  # only the pooling head derives its head size: the encoder layers' heads are pruned
        m2 = _vision(kind)
        with pytest.warns(HeadsKeptWarning, match=rf"(?s)group\(s\) of head:.*It failed in {where}"):
            sparsify_fx.prune(m2, (x,), sparsify_fx.PruneConfig(ratio={"attention_heads": 0.25}))
        assert m2.encoder.layers[0].attention.q_proj.out_features == 48
        assert m2.head.num_heads == 4
    # with every kind asked, that module's heads are kept (saying where it failed) and FFN channels are pruned
    before = _count(m)
    with pytest.warns(HeadsKeptWarning, match=rf"(?s)attention_heads group.*It failed in {where}"):
        sparsify_fx.prune(m, (x,), sparsify_fx.PruneConfig(ratio=0.25))
    assert _count(m) < before
    assert m(x).last_hidden_state.shape == ref.shape


def test_ratio_rounding_to_zero_warns_and_leaves_model_unchanged() -> None:
    m = models.bert().eval()
    ids = torch.randint(0, 128, (2, 8))
    snap = model_snapshot(m)
    with pytest.warns(NothingPrunedWarning, match=r"removed nothing: every ratio rounds to zero.*attention_heads"):
        sparsify_fx.prune(m, (ids,), sparsify_fx.PruneConfig(ratio={"attention_heads": 0.1}))
    assert_unchanged(m, snap)

