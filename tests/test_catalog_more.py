"""Issue 13, catalog types not investigated before (DeepSeek-V4, Inkling2, LED, Zaya): the ops and patterns that
pinned their heads, each in a tiny module analysed in float64 with every group permuted at random (outputs must
not move), then the group the pattern should give, or the pin it must keep."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from models import analyse_float64, kinds_of

TOL = 1e-9  # float64: a wrong permutation errs at O(1)


def analyse(model: nn.Module, inputs: tuple, *ops: str):
    return analyse_float64(model, inputs, *ops, tol=TOL)[2]


def pin_reasons(rep, fqn: str, dim: int) -> list[str]:
    return [r for p in rep.pinned if (fqn, dim) in p.members for r in p.reasons]


class Heads(nn.Module):
    """q/k/v/o projections around an attention whose key path is ``key_path`` (per test)."""

    def __init__(self, hidden: int = 32, heads: int = 4, head_dim: int = 8) -> None:
        super().__init__()
        self.h, self.d = heads, head_dim
        self.q = nn.Linear(hidden, heads * head_dim)
        self.k = nn.Linear(hidden, heads * head_dim)
        self.v = nn.Linear(hidden, heads * head_dim)
        self.o = nn.Linear(heads * head_dim, 3)

    def split(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, H * D] -> [B, H, T, D]
        return x.view(*x.shape[:2], self.h, self.d).transpose(1, 2)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        y = F.scaled_dot_product_attention(self.split(q), self.split(k), self.split(v))
        return self.o(y.transpose(1, 2).flatten(2))


# ---------------------------------------------------------------------- unfold (Inkling2's dynamic short conv)
class ShortConvKeys(Heads):
    """Keys through a causal short conv written with ``unfold`` over time, one tap vector per head (Inkling2's
    ``DynamicShortConvolution``): windows of past positions, flipped so tap 0 is the current token."""

    def __init__(self, taps: int = 3, **kw) -> None:
        super().__init__(**kw)
        self.taps = taps
        self.static = nn.Parameter(torch.randn(taps, self.h * self.d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        k = self.k(x).transpose(1, 2)  # [B, C, T]
        windows = F.pad(k, (self.taps - 1, 0)).unfold(-1, self.taps, 1).flip(-1).transpose(1, 2)  # [B, T, C, taps]
        weights = self.static.T.reshape(self.h, self.d, self.taps)
        k = (windows.reshape(b, t, self.h, self.d, self.taps) * weights).sum(-1).reshape(b, t, -1)
        return self.attend(self.q(x), k, self.v(x))


def test_unfold_over_time_keeps_the_channels_and_pins_positions() -> None:
    rep = analyse(ShortConvKeys(), (torch.randn(2, 6, 32),), "unfold")
    assert kinds_of(rep, "k.weight", 0) == {"attention_heads", "head_dim"}, rep.table()
    assert kinds_of(rep, "static", 1) == {"attention_heads", "head_dim"}  # the taps move with their channels
    assert any("unfold positions within a window" in r for r in pin_reasons(rep, "static", 0))


class UnfoldFeatures(nn.Module):
    """Overlapping windows over the features themselves: each window mixes neighbouring channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 12)
        self.b = nn.Linear(5 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).unfold(-1, 4, 2).flatten(-2))  # 12 features -> 5 windows of 4, overlapping


def test_unfold_over_channels_pins_them() -> None:
    rep = analyse(UnfoldFeatures(), (torch.randn(2, 8),), "unfold")
    assert not kinds_of(rep, "a.weight", 0), rep.table()
    assert any("unfold" in r for r in pin_reasons(rep, "a.weight", 0))


# ---------------------------------------------------------------------- as_strided (LED / Longformer chunks)
class OverlappingChunks(Heads):
    """Longformer's ``_chunk``: heads folded into the batch, the sequence cut into chunks of ``2w`` that overlap by
    ``w`` with ``as_strided``; scores inside each chunk. ``seq_first`` keeps the hidden states ``[T, B, C]`` as
    Longformer does, so the folded heads have stride ``D`` and the chunks are read from a transposed layout."""

    def __init__(self, w: int = 2, seq_first: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.w, self.seq_first = w, seq_first

    def chunk(self, x: torch.Tensor) -> torch.Tensor:  # [B*H, T, D] -> [B*H, T/w - 1, 2w, D]
        n, t, d = x.shape
        size = [n, t // self.w - 1, 2 * self.w, d]
        stride = list(x.stride())
        return x.as_strided(size, [stride[0], self.w * stride[1], stride[1], stride[2]])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.seq_first:
            x = x.transpose(0, 1)  # [T, B, C]: every projection keeps that layout
        q, k, v = self.q(x), self.k(x), self.v(x)

        def fold(y: torch.Tensor) -> torch.Tensor:  # -> [B*H, T, D], a view where the layout allows it
            if self.seq_first:
                t, b, _ = y.shape
                return y.view(t, b, self.h, self.d).permute(1, 2, 0, 3).reshape(b * self.h, t, self.d)
            b, t, _ = y.shape
            return y.view(b, t, self.h, self.d).transpose(1, 2).reshape(b * self.h, t, self.d)

        qc, kc, vc = self.chunk(fold(q)), self.chunk(fold(k)), self.chunk(fold(v))
        probs = torch.einsum("bcxd,bcyd->bcxy", qc, kc).softmax(-1)
        ctx = torch.einsum("bcxy,bcyd->bcxd", probs, vc).mean(2)  # [B*H, chunks, D]
        b = x.shape[1] if self.seq_first else x.shape[0]
        return self.o(ctx.reshape(b, self.h, -1, self.d).transpose(1, 2).flatten(2))


def test_as_strided_chunks_keep_heads_and_head_dim() -> None:
    for seq_first in (False, True):
        model = OverlappingChunks(seq_first=seq_first)
        rep = analyse(model, (torch.randn(2, 8, 32),), "as_strided")
        assert kinds_of(rep, "q.weight", 0) == {"attention_heads", "head_dim"}, (seq_first, rep.table())
        assert kinds_of(rep, "o.weight", 1) == {"attention_heads", "head_dim"}


class StridedAcrossHeads(Heads):
    """A window that slides across the flattened ``H * D`` features: it reads half of one head and half of the
    next, so heads do not pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.v(x).contiguous()  # [B, T, H * D]
        b, t, c = v.shape
        half = self.d // 2
        win = v.as_strided((b, t, self.h - 1, self.d), (t * c, c, self.d, 1), half)  # starts mid-head
        return self.o(F.pad(win.flatten(2), (0, self.d)))


def test_as_strided_that_straddles_heads_pins_them() -> None:
    rep = analyse(StridedAcrossHeads(), (torch.randn(2, 5, 32),), "as_strided")
    assert not kinds_of(rep, "v.weight", 0), rep.table()
    assert any("as_strided" in r for r in pin_reasons(rep, "v.weight", 0))


class StridedPastTheEnd(nn.Module):
    """Reads a narrow slice of a wider tensor as if it were longer: the windows reach features of the base that
    are not the slice's, so nothing passes, even the batch dim whose size and stride match."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(2 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)[:, :4]  # [B, 4] of a [B, 8] storage: not dense
        return self.b(y.as_strided((y.shape[0], 2, 4), (8, 2, 1)).flatten(1))


def test_as_strided_of_a_non_dense_view_pins_everything() -> None:
    rep = analyse(StridedPastTheEnd(), (torch.randn(3, 6),), "as_strided")
    assert not kinds_of(rep, "a.weight", 0), rep.table()
    assert any("as_strided" in r for r in pin_reasons(rep, "a.weight", 0))


# ---------------------------------------------------------------------- type_as takes only the dtype (LED)
class MaskCastToQueries(Heads):
    """LED's ``(mask != 0)[:, :, None, None].type_as(query)``: a ``[B, T, 1, 1]`` mask cast to the dtype of the
    ``[B, T, H, D]`` queries; the queries' head dims are not the mask's."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.q(x).view(*x.shape[:2], self.h, self.d)
        scale = (mask != 0)[:, :, None, None].type_as(q)
        return self.attend((q * scale).flatten(2), self.k(x), self.v(x))


def test_type_as_does_not_tie_the_other_tensors_dims() -> None:
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]])
    rep = analyse(MaskCastToQueries(), (torch.randn(2, 5, 32), mask), "type_as")
    assert kinds_of(rep, "q.weight", 0) == {"attention_heads", "head_dim"}, rep.table()


# ---------------------------------------------------------------------- grouped conv over [q | k] (Zaya's CCA)
class ConvOverQK(nn.Module):
    """Zaya's compressed convolutional attention, reduced: ``cat([q, k])`` through a depthwise and a grouped causal
    conv1d with one group per head (query heads and key heads together), split back into q and k (GQA)."""

    def __init__(self, hidden: int = 32, heads: int = 4, kv_heads: int = 2, head_dim: int = 8,
                 conv_groups: int | None = None) -> None:
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, head_dim
        self.q = nn.Linear(hidden, heads * head_dim)
        self.k = nn.Linear(hidden, kv_heads * head_dim)
        self.v = nn.Linear(hidden, kv_heads * head_dim)
        self.o = nn.Linear(heads * head_dim, 3)
        c = (heads + kv_heads) * head_dim
        self.depthwise = nn.Conv1d(c, c, 2, groups=c)
        self.grouped = nn.Conv1d(c, c, 2, groups=heads + kv_heads if conv_groups is None else conv_groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x)
        qk = F.pad(torch.cat([q, self.k(x)], -1).transpose(1, 2), (2, 0))
        qk = self.grouped(self.depthwise(qk)).transpose(1, 2)
        n = q.shape[-1]
        q = qk[..., :n].reshape(b, t, self.h, self.d).transpose(1, 2)
        k = qk[..., n:].reshape(b, t, self.kv, self.d).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv, self.d).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(y.transpose(1, 2).flatten(2))


def test_grouped_conv_over_a_concatenation_keeps_each_parts_groups() -> None:
    rep = analyse(ConvOverQK(), (torch.randn(2, 6, 32),), "conv1d", "cat")
    assert kinds_of(rep, "q.weight", 0) >= {"kv_heads", "attention_heads"}, rep.table()
    assert kinds_of(rep, "k.weight", 0) >= {"kv_heads"}
    # the grouped conv's out-channels carry the same heads: its [q | k] groups move with q's and k's rows
    assert kinds_of(rep, "grouped.weight", 0) >= {"kv_heads", "attention_heads"}


def test_grouped_conv_whose_groups_straddle_the_parts_pins_them() -> None:
    # 4 groups of 12 channels over [q (32) | k (16)]: the third group holds q's last 8 channels and k's first 4,
    # so the parts are not whole groups and the conv's channels cannot be split per part
    rep = analyse(ConvOverQK(conv_groups=4), (torch.randn(2, 6, 32),), "conv1d")
    assert not kinds_of(rep, "k.weight", 0) & {"kv_heads", "attention_heads"}, rep.table()
    assert pin_reasons(rep, "k.weight", 0)
