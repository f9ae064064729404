"""Issue 13, second round: the text models of the catalog whose heads or FFN channels were not found in every
layer. Each test builds the op or pattern that blocked them in a tiny module, analyses it in float64 and
permutes every group at random (outputs must not move), then asserts the group the pattern should give."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from models import analyse_float64, kinds_of

TOL = 1e-9  # float64: a wrong permutation errs at O(1)


def analyse(model: nn.Module, inputs: tuple, *ops: str):
    return analyse_float64(model, inputs, *ops, tol=TOL)[2]


def pinned(rep) -> set[tuple[str, int]]:
    return {(f, d) for p in rep.pinned for f, d in p.members}


# ---------------------------------------------------------------------- complex RoPE (Llama 4)
class ComplexRopeAttention(nn.Module):
    """Llama 4's attention: q and k rotated as complex numbers (pairs of the head dim), then SDPA."""

    def __init__(self, hidden: int = 32, heads: int = 4, head_dim: int = 8) -> None:
        super().__init__()
        self.h, self.d = heads, head_dim
        self.q = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k = nn.Linear(hidden, heads * head_dim, bias=False)
        self.v = nn.Linear(hidden, heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, head_dim, 2).double() / head_dim))

    def rope(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        pos = torch.arange(t, dtype=x.dtype)
        freqs = torch.outer(pos, self.inv_freq.to(x.dtype))
        freqs_cis = torch.polar(torch.ones_like(freqs), freqs)
        q = self.rope(self.q(x).view(b, t, self.h, self.d), freqs_cis).transpose(1, 2)
        k = self.rope(self.k(x).view(b, t, self.h, self.d), freqs_cis).transpose(1, 2)
        v = self.v(x).view(b, t, self.h, self.d).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


def test_complex_rope_keeps_heads() -> None:
    torch.manual_seed(0)
    rep = analyse(ComplexRopeAttention(), (torch.randn(2, 5, 32),), "view_as_complex", "view_as_real", "polar")
    assert "attention_heads" in kinds_of(rep, "q.weight", 0)
    assert "attention_heads" in kinds_of(rep, "o.weight", 1)
    # the (real, imaginary) pair is pinned: swapping the parts is no symmetry
    pair = [p for p in rep.pinned if any("complex view" in r for r in p.reasons)]
    assert pair and all(p.size == 2 for p in pair)


# ---------------------------------------------------------------------- glu, linalg_norm, one_hot, item
class GluFFN(nn.Module):
    def __init__(self, hidden: int = 16, inter: int = 24) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, 2 * inter)
        self.down = nn.Linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.glu(self.up(x), dim=-1))


def test_glu_halves_move_together() -> None:
    torch.manual_seed(0)
    rep = analyse(GluFFN(), (torch.randn(3, 16),), "glu")
    (grp,) = [g for g in rep.groups if any(m.fqn == "down.weight" and m.dim == 1 for m in g.members)]
    assert grp.num_units == 24
    up = next(m for m in grp.members if m.fqn == "up.weight" and m.dim == 0)
    # one permutation moves both halves of the up rows: the value half and the gate half
    assert sorted(b for o in up.occurrences for b in o.offsets) == [0, 24]


class NormalisedFFN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        return self.fc2(h / torch.linalg.norm(h, dim=-1, keepdim=True)) * torch.linalg.norm(x)


def test_linalg_norm_is_a_reduction() -> None:
    torch.manual_seed(0)
    rep = analyse(NormalisedFFN(), (torch.randn(3, 16),), "linalg_norm")
    assert kinds_of(rep, "fc1.weight", 0) and kinds_of(rep, "fc1.weight", 0) == kinds_of(rep, "fc2.weight", 1)


class OneHotClassifier(nn.Module):
    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        self.classes = classes
        self.proj = nn.Linear(classes, 16)
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.proj(F.one_hot(ids, self.classes).double())
        return self.fc2(torch.relu(self.fc1(x)))


def test_one_hot_class_dim_is_pinned() -> None:
    torch.manual_seed(0)
    rep = analyse(OneHotClassifier(), (torch.tensor([[0, 3, 5], [1, 1, 2]]),), "one_hot")
    # the classes are named by the ids' values: permuting proj's columns would change the output
    assert ("proj.weight", 1) in pinned(rep)
    assert not kinds_of(rep, "proj.weight", 1)
    assert kinds_of(rep, "fc1.weight", 0)


class ScaledByItem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)) * self.scale.item())


def test_item_is_a_scalar() -> None:
    torch.manual_seed(0)
    rep = analyse(ScaledByItem(), (torch.randn(3, 16),))
    assert kinds_of(rep, "fc1.weight", 0)


# ---------------------------------------------------------------------- reshape keeping its leading dims (XLNet)
class RelShiftAttention(nn.Module):
    """XLNet's relative attention: the position scores ``[b, n, i, j]`` are shifted by a reshape to
    ``[b, n, j, i]``, a slice and a reshape back; the batch and head dims lead unchanged through both."""

    def __init__(self, hidden: int = 32, heads: int = 4, head_dim: int = 8, klen: int = 5) -> None:
        super().__init__()
        self.h, self.d = heads, head_dim
        self.q = nn.Linear(hidden, heads * head_dim)
        self.k = nn.Linear(hidden, heads * head_dim)
        self.v = nn.Linear(hidden, heads * head_dim)
        self.r = nn.Parameter(torch.randn(2 * klen, heads, head_dim))
        self.o = nn.Linear(heads * head_dim, hidden)

    @staticmethod
    def rel_shift(x: torch.Tensor, klen: int) -> torch.Tensor:
        b, n, i, j = x.shape
        x = x.reshape(b, n, j, i)[:, :, 1:, :].reshape(b, n, i, j - 1)
        return x[..., :klen]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.h, self.d)
        k = self.k(x).view(b, t, self.h, self.d)
        v = self.v(x).view(b, t, self.h, self.d)
        ac = torch.einsum("bind,bjnd->bnij", q, k)
        bd = self.rel_shift(torch.einsum("bind,jnd->bnij", q, self.r), t)
        p = torch.softmax((ac + bd) / self.d**0.5, dim=-1)
        y = torch.einsum("bnij,bjnd->bind", p, v).reshape(b, t, -1)
        return self.o(y)


def test_reshape_passes_equal_leading_dims() -> None:
    torch.manual_seed(0)
    rep = analyse(RelShiftAttention(), (torch.randn(2, 5, 32),), "einsum")
    for fqn, dim in (("q.weight", 0), ("k.weight", 0), ("v.weight", 0), ("o.weight", 1), ("r", 1)):
        assert "attention_heads" in kinds_of(rep, fqn, dim), (fqn, kinds_of(rep, fqn, dim))
    # the shifted positions do not factor: they stay pinned
    assert any("reshape does not factor" in r for p in rep.pinned for r in p.reasons)


# ---------------------------------------------------------------------- einsum with an ellipsis (LongT5)
class BlockLocalAttention(nn.Module):
    """LongT5's local attention: positions split into blocks, scores and mixing spelled with ``...``."""

    def __init__(self, hidden: int = 32, heads: int = 4, head_dim: int = 8, block: int = 3) -> None:
        super().__init__()
        self.h, self.d, self.block = heads, head_dim, block
        self.q = nn.Linear(hidden, heads * head_dim, bias=False)
        self.k = nn.Linear(hidden, heads * head_dim, bias=False)
        self.v = nn.Linear(hidden, heads * head_dim, bias=False)
        self.o = nn.Linear(heads * head_dim, hidden, bias=False)
        self.bias = nn.Parameter(torch.randn(heads, block, block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        shape = (b, t // self.block, self.block, self.h, self.d)
        q, k, v = (p(x).view(shape) for p in (self.q, self.k, self.v))
        scores = torch.einsum("...qhd,...khd->...hqk", q, k) + self.bias
        y = torch.einsum("...hqk,...khd->...qhd", torch.softmax(scores, -1), v)
        return self.o(y.reshape(b, t, -1))


def test_einsum_ellipsis_keeps_heads() -> None:
    torch.manual_seed(0)
    rep = analyse(BlockLocalAttention(), (torch.randn(2, 6, 32),), "einsum")
    for fqn, dim in (("q.weight", 0), ("k.weight", 0), ("v.weight", 0), ("o.weight", 1), ("bias", 0)):
        assert "attention_heads" in kinds_of(rep, fqn, dim), (fqn, kinds_of(rep, fqn, dim))
    assert not any("ellipsis" in r for p in rep.pinned for r in p.reasons)


def test_einsum_ellipsis_broadcasts_from_the_right() -> None:
    from sparsify_fx.analysis.rules import _einsum_without_ellipsis

    assert _einsum_without_ellipsis("...qd,...kd->...qk", [4, 3]) == "\xc0\xc1qd,\xc1kd->\xc0\xc1qk"
    assert _einsum_without_ellipsis("ij,...j->...i", [2, 1]) == "ij,j->i"
    assert _einsum_without_ellipsis("...ij,j->...i", [1, 1]) == "...ij,j->...i"  # rank too small: unchanged
