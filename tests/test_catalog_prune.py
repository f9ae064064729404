"""prune on the catalog's failing patterns (issue 13, second round): sizes kept outside the group's owner or under
names that do not say what they count are followed; a module that still fails once pruned keeps that group kind
(HeadsKeptWarning / UnitsKeptWarning) while the rest is pruned; an empty group is skipped, not a raw error."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import sparsify_fx
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes.prune import HeadsKeptWarning
from sparsify_fx.testing import assert_unchanged, model_snapshot


def _count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


class _FFN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class WidthHeads(nn.Module):
    """BLIP-style: the head size is the input width // num_heads, which no stored attribute can express."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 4
        self.qkv = nn.Linear(64, 192)
        self.proj = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        o = torch.softmax(q @ k.transpose(-1, -2), -1) @ v
        return self.proj(o.transpose(1, 2).reshape(b, t, -1))


class BiasedHeads(nn.Module):
    """MPNet-style: a per-head relative bias (one column per head) and the context reshaped with all_head_size on the
    attention module, while q/k/v/o sit in a child module; the head group spans every layer sharing the bias."""

    def __init__(self, bias: nn.Embedding) -> None:
        super().__init__()
        self.num_attention_heads, self.attention_head_size, self.all_head_size = 4, 16, 64
        self.proj = nn.ModuleDict({n: nn.Linear(64, 64) for n in ("q", "k", "v", "o")})
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.num_attention_heads, self.attention_head_size).transpose(1, 2)

        q, k, v = (heads(self.proj[n](x)) for n in ("q", "k", "v"))
        rel = torch.arange(t)[:, None] - torch.arange(t)[None, :]
        pos = self.bias(rel.clamp(-3, 3) + 3).permute(2, 0, 1)  # [heads, t, t]
        o = torch.softmax(q @ k.transpose(-1, -2) + pos, -1) @ v
        return self.proj["o"](o.transpose(1, 2).contiguous().view(b, t, self.all_head_size))


class Latent(nn.Module):
    """MLA-style: one projection makes a latent and a rope part, split by sizes stored under names that say nothing
    about what they count (``rank``) and as a list (``sizes``)."""

    def __init__(self) -> None:
        super().__init__()
        self.rank, self.extra = 32, 8
        self.a = nn.Linear(64, 40)
        self.b = nn.Linear(32, 64)
        self.c = nn.Linear(8, 64)
        self.gate = nn.Linear(64, 48)
        self.sizes = [32, 16]
        self.out = nn.Linear(32, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lat, rope = torch.split(self.a(x), [self.rank, self.extra], dim=-1)
        g1, g2 = torch.split(self.gate(x), self.sizes, dim=-1)
        return self.b(torch.relu(lat)) + self.c(rope) + self.out(torch.relu(g1)) + g2.sum(-1, keepdim=True)


class Block(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn, self.ffn = attn, _FFN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        return x + self.ffn(x)


def _layers(make: type[nn.Module] | None = None, attn: list[nn.Module] | None = None) -> nn.Module:
    torch.manual_seed(0)
    mods = attn if attn is not None else [make() for _ in range(2)]  # type: ignore[misc]
    return nn.Sequential(*[Block(a) for a in mods]).eval()


def test_width_derived_heads_are_kept_with_a_warning_and_the_ffn_is_pruned() -> None:
    m = _layers(WidthHeads)
    x = torch.randn(2, 6, 64)
    with pytest.warns(HeadsKeptWarning, match=r"(?s)attention_heads group\(s\) of 0\.attn, 1\.attn.*failed to run.*"
                      r"It failed in 0\.attn \(WidthHeads\)"):
        sparsify_fx.prune(m, (x,), sparsify_fx.PruneConfig(ratio=0.25))
    for blk in m:
        assert blk.attn.qkv.weight.shape == (192, 64) and blk.attn.num_heads == 4
        assert blk.ffn.up.out_features == 96 and blk.ffn.down.weight.shape == (64, 96)
    assert m(x).shape == (2, 6, 64)


def test_heads_alone_that_cannot_run_are_refused_and_the_model_is_unchanged() -> None:
    m = _layers(WidthHeads)
    x = torch.randn(2, 6, 64)
    snap = model_snapshot(m)
    with pytest.raises(ConfigError, match=r"(?s)failed to run.*restored.*It failed in 0\.attn \(WidthHeads\).*"
                       r"c // self\.num_heads.*num_heads=3"):
        sparsify_fx.prune(m, (x,), sparsify_fx.PruneConfig(ratio={"attention_heads": 0.25}))
    assert_unchanged(m, snap)


def test_heads_with_a_per_head_bias_follow_all_head_size_on_the_attention_module() -> None:
    bias = nn.Embedding(7, 4)
    m = _layers(attn=[BiasedHeads(bias), BiasedHeads(bias)])
    x = torch.randn(2, 6, 64)
    before = _count(m)
    sparsify_fx.prune(m, (x,), sparsify_fx.PruneConfig(ratio={"attention_heads": 0.25}))  # verified against ablation
    assert bias.weight.shape == (7, 3)
    for blk in m:
        a = blk.attn
        assert (a.num_attention_heads, a.attention_head_size, a.all_head_size) == (3, 16, 48)
        assert a.proj["q"].weight.shape == (48, 64) and a.proj["o"].weight.shape == (64, 48)
    assert _count(m) < before and m(x).shape == (2, 6, 64)


def test_unnamed_counts_and_split_size_lists_follow_the_pruned_channels() -> None:
    m = _layers(Latent)
    x = torch.randn(2, 6, 64)
    report = sparsify_fx.analyze(m, (x,))
    latent = [g for g in report.groups if g.prefix.endswith("attn") and g.num_units == 32]
    assert latent, [(g.name, g.num_units) for g in report.groups]
    sparsify_fx.prune(m, (x,), sparsify_fx.PruneConfig(ratio=0.25))  # verified against ablation
    for blk in m:
        assert blk.attn.rank == 24 and blk.attn.extra == 6  # the rope part is a linear chain: a channel group too
        assert blk.attn.a.weight.shape == (30, 64) and blk.attn.b.weight.shape == (64, 24)
        assert blk.attn.sizes == [24, 16] and blk.attn.gate.weight.shape == (40, 64)
    assert m(x).shape == (2, 6, 64)


class Registers(nn.Module):
    """DINOv3-style embeddings with zero register tokens: a [1, 0, 64] parameter concatenated to the sequence."""

    def __init__(self) -> None:
        super().__init__()
        self.reg = nn.Parameter(torch.zeros(1, 0, 64))
        self.ffn = _FFN()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.reg.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.ffn(x)


def test_an_empty_group_is_skipped_not_a_raw_error() -> None:
    torch.manual_seed(0)
    m = Registers().eval()
    x = torch.randn(2, 6, 64)
    sparsify_fx.prune(m, (x,), sparsify_fx.PruneConfig(ratio=0.25))
    assert m.ffn.up.out_features == 96 and m.reg.shape == (1, 0, 64)
    assert m(x).shape == (2, 6, 64)
