"""Rules for the ops the transformers catalog found without one (issue 13), ATen aliases resolved to
their canonical rule, and advanced indexing that pins only the dims its indices consume (Falcon)."""

from __future__ import annotations

import models
import pytest
import torch
import torch.nn.functional as F
from models import analyse_float64

from sparsify_fx.analysis.rules import ALIASES, RULES, register, register_alias, rule_for
from sparsify_fx.errors import AnalysisError

aten = torch.ops.aten
TOL = 1e-9  # float64: a wrong permutation errs at O(1)


def members_of(report) -> dict[tuple[str, int], str]:
    return {(m.fqn, m.dim): g.kind for g in report.groups for m in g.members}


def pinned_members(report) -> set[tuple[str, int]]:
    return {(f, d) for p in report.pinned for f, d in p.members}


def analyse(model: torch.nn.Module, inputs: tuple, op: str | None):
    return analyse_float64(model, inputs, *([op] if op else []), tol=TOL)


# ---------------------------------------------------------------------- aliases
@pytest.mark.parametrize(
    "alias, canonical",
    [
        (aten.multiply.Tensor, aten.mul.Tensor),
        (aten.multiply_.Tensor, aten.mul.Tensor),  # in place, then alias
        (aten.divide.Tensor_mode, aten.div.Tensor),
        (aten.true_divide.Tensor, aten.div.Tensor),
        (aten.subtract.Tensor, aten.sub.Tensor),
        (aten.greater.Tensor, aten.gt.Tensor),
        (aten.less_equal.Scalar, aten.le.Scalar),
        (aten.not_equal.Tensor, aten.ne.Tensor),
        (aten.clip.default, aten.clamp.default),
        (aten.concat.default, aten.cat.default),
        (aten.swapaxes.default, aten.transpose.int),
        (aten.moveaxis.int, aten.movedim.int),
        (aten.arctan2.default, aten.atan2.default),
        (aten.special_expit.default, aten.sigmoid.default),
    ],
)
def test_alias_resolves_to_its_canonical_rule(alias, canonical):
    assert rule_for(canonical) is not None
    assert rule_for(alias) is rule_for(canonical)


def test_alias_table_is_checked_at_registration():
    before_aliases, before_rules = dict(ALIASES), dict(RULES)
    with pytest.raises(AnalysisError, match=r"aten\.no_such_op, which does not exist"):
        register_alias("multiply", "no_such_op")
    with pytest.raises(AnalysisError, match=r"aten\.cholesky, which has no rule"):
        register_alias("linalg_cholesky", "cholesky")
    with pytest.raises(AnalysisError, match=r"aten\.sub has a rule of its own"):
        register_alias("sub", "mul")
    with pytest.raises(AnalysisError, match=r"alias of aten\.mul.*register aten\.mul instead"):
        register(aten.multiply)(lambda ctx: None)
    assert ALIASES == before_aliases and RULES == before_rules


class Aliases(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 8)
        self.c = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(16, 3)

    def forward(self, x):
        h = torch.multiply(self.a(x), torch.subtract(self.c(x), 1.0))
        h = torch.divide(torch.clip(h, -2.0, 2.0), 2.0) * torch.greater(h, 0).to(h.dtype)
        return self.b(torch.concat([h, torch.negative(h)], dim=-1))


def test_model_written_with_aliases_keeps_its_groups():
    _, _, rep = analyse(Aliases(), (torch.randn(3, 4),), None)
    kinds = members_of(rep)
    assert kinds[("a.weight", 0)] == kinds[("c.weight", 0)] == "ffn_channels", rep.table()


# ---------------------------------------------------------------------- rules, op by op
class CopyInto(torch.nn.Module):
    """Two projections written in place into halves of a zero buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 8)
        self.c = torch.nn.Linear(4, 6)
        self.b = torch.nn.Linear(14, 3)

    def forward(self, x):
        buf = torch.zeros(x.shape[0], 14, dtype=x.dtype)
        buf[:, :8].copy_(self.a(x))
        buf[:, 8:].copy_(torch.relu(self.c(x)))
        return self.b(buf)


def test_copy_in_place_gives_the_destination_the_source_space():
    _, _, rep = analyse(CopyInto(), (torch.randn(3, 4),), "copy_")
    kinds = members_of(rep)
    assert ("a.weight", 0) in kinds and ("c.weight", 0) in kinds, rep.table()
    a_group = next(g for g in rep.groups if g.member("a.weight"))
    assert not a_group.member("c.weight") and a_group.member("b.weight")[0].dim == 1


class Tile(torch.nn.Module):
    def __init__(self, reps: tuple[int, ...]) -> None:
        super().__init__()
        self.reps = reps
        self.a = torch.nn.Linear(4, 8)
        n = 8 * reps[-1] * (reps[-2] if len(reps) > 1 else 1)
        self.b = torch.nn.Linear(n, 3)

    def forward(self, x):
        return self.b(torch.tile(self.a(x), self.reps).reshape(x.shape[0], -1))


@pytest.mark.parametrize("reps", [(3,), (1, 2)], ids=["fewer_reps_than_dims", "per_dim"])
def test_tile_repeats_the_channels_as_a_minor_factor(reps):
    _, _, rep = analyse(Tile(reps), (torch.randn(3, 4),), "tile")
    grp = next(g for g in rep.groups if g.member("a.weight"))
    (cols,) = grp.member("b.weight")
    assert cols.dim == 1 and cols.size == 8 * reps[-1], rep.table()


class Meshgrid(torch.nn.Module):
    def __init__(self, indexing: str) -> None:
        super().__init__()
        self.indexing = indexing
        self.a = torch.nn.Linear(4, 8)
        self.c = torch.nn.Linear(4, 6)
        self.b = torch.nn.Linear(96, 3)

    def forward(self, x):
        gx, gy = torch.meshgrid(torch.tanh(self.a(x)), self.c(x), indexing=self.indexing)
        return self.b(torch.cat([gx * gy, gx - gy]).reshape(96))


@pytest.mark.parametrize("indexing", ["ij", "xy"])
def test_meshgrid_outputs_carry_every_input_space(indexing):
    _, _, rep = analyse(Meshgrid(indexing), (torch.randn(4),), "meshgrid")
    kinds = members_of(rep)
    assert ("a.weight", 0) in kinds and ("c.weight", 0) in kinds, rep.table()


class LogSigmoidGLU(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(4, 8)
        self.up = torch.nn.Linear(4, 8)
        self.down = torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.down(F.logsigmoid(self.gate(x)) * self.up(x))


def test_log_sigmoid_is_an_activation():
    _, _, rep = analyse(LogSigmoidGLU(), (torch.randn(3, 4),), "log_sigmoid")
    (grp,) = [g for g in rep.groups if g.member("down.weight")]
    assert grp.kind == "ffn_channels"
    assert "act" in grp.member("gate.weight")[0].tags and "act" not in grp.member("up.weight")[0].tags


class Upsample(torch.nn.Module):
    CONV = {1: torch.nn.Conv1d, 2: torch.nn.Conv2d, 3: torch.nn.Conv3d}

    def __init__(self, mode: str, n: int) -> None:
        super().__init__()
        self.mode = mode
        self.a = self.CONV[n](2, 6, 1)
        self.b = self.CONV[n](6, 3, 1)
        self.pos = torch.nn.Parameter(torch.randn(*([6] * n)))  # a bias per resampled position

    def forward(self, x):
        y = F.interpolate(self.a(x), scale_factor=2, mode=self.mode)
        return self.b(y + self.pos)


@pytest.mark.parametrize(
    "mode, n, op",
    [
        ("linear", 1, "upsample_linear1d"),
        ("nearest", 1, "upsample_nearest1d"),
        ("nearest-exact", 2, "_upsample_nearest_exact2d"),
        ("bicubic", 2, "upsample_bicubic2d"),
        ("trilinear", 3, "upsample_trilinear3d"),
    ],
)
def test_upsampling_passes_channels_and_pins_positions(mode, n, op):
    x = torch.randn(2, 2, *([3] * n))
    _, _, rep = analyse(Upsample(mode, n), (x,), op)
    grp = next(g for g in rep.groups if g.member("a.weight"))
    assert grp.member("b.weight")[0].dim == 1 and grp.num_units == 6, rep.table()
    assert {("pos", i) for i in range(n)} <= pinned_members(rep)


class Bucketize(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8, 3)
        self.edges = torch.nn.Parameter(torch.tensor([-1.0, -0.2, 0.0, 0.3, 1.0]), requires_grad=False)

    def forward(self, x):
        return self.b(torch.bucketize(self.a(x), self.edges).to(x.dtype))


def test_bucketize_passes_elements_and_pins_boundaries():
    _, _, rep = analyse(Bucketize(), (torch.randn(5, 4),), "bucketize")
    assert members_of(rep).get(("a.weight", 0)) == "ffn_channels", rep.table()
    assert ("edges", 0) in pinned_members(rep) and ("edges", 0) not in members_of(rep)


class WeightNorm(torch.nn.Module):
    def __init__(self, dim: int | None) -> None:
        super().__init__()
        self.a = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(4, 8), dim=dim)
        self.b = torch.nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_weight_norm_ties_g_and_v_along_its_dim():
    _, _, rep = analyse(WeightNorm(0), (torch.randn(3, 4),), "_weight_norm")
    grp = next(g for g in rep.groups if g.member("b.weight"))
    fqns = {(m.fqn, m.dim) for m in grp.members}
    g_, v_ = "a.parametrizations.weight.original0", "a.parametrizations.weight.original1"
    assert {(g_, 0), (v_, 0), ("a.bias", 0), ("b.weight", 1)} <= fqns, rep.table()


def test_weight_norm_over_the_whole_tensor_leaves_channels_free():
    # dim=None normalises by the norm of all of v: invariant under permuting its rows
    _, _, rep = analyse(WeightNorm(None), (torch.randn(3, 4),), "_weight_norm")
    grp = next(g for g in rep.groups if g.member("b.weight"))
    assert grp.member("a.parametrizations.weight.original1")[0].dim == 0, rep.table()


class Unfold(torch.nn.Module):
    def __init__(self, fold: bool) -> None:
        super().__init__()
        self.fold = fold
        self.a = torch.nn.Conv2d(2, 6, 1)
        self.b = torch.nn.Linear(6 * 4, 3)
        self.c = torch.nn.Conv2d(6, 3, 1)

    def forward(self, x):
        cols = F.unfold(self.a(x), kernel_size=2)  # [N, 6 * 4, L]: channel-major, taps minor
        if self.fold:
            return self.c(F.fold(cols, (4, 4), kernel_size=2))
        return self.b(cols.transpose(1, 2))


@pytest.mark.parametrize("fold, op", [(False, "im2col"), (True, "col2im")])
def test_im2col_keeps_channels_as_the_major_factor(fold, op):
    _, _, rep = analyse(Unfold(fold), (torch.randn(2, 2, 4, 4),), op)
    grp = next(g for g in rep.groups if g.member("a.weight"))
    assert grp.num_units == 6, rep.table()
    if not fold:
        (cols,) = grp.member("b.weight")
        assert cols.dim == 1 and cols.occurrences[0].inner == 4  # each channel's four taps move as one unit


# ---------------------------------------------------------------------- advanced indexing
class RotaryTable(torch.nn.Module):
    """Multi-query attention with a fused qkv, as transformers' Falcon was written before 4.45: a rotary
    table indexed by position ids (``cos[position_ids]``) and the key/value heads picked by constant
    list indices (``qkv[..., [-2], :]``)."""

    def __init__(self, heads: int = 4, head_dim: int = 8, positions: int = 16) -> None:
        super().__init__()
        self.h, self.d = heads, head_dim
        hidden = heads * head_dim
        self.qkv = torch.nn.Linear(hidden, hidden + 2 * head_dim)
        self.o = torch.nn.Linear(hidden, hidden)
        inv = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
        freqs = torch.outer(torch.arange(positions).float(), inv)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    @staticmethod
    def rotate_half(x):
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([-x2, x1], dim=-1)

    def forward(self, x, position_ids):
        b, t, _ = x.shape
        fused = self.qkv(x).view(b, t, self.h + 2, self.d)
        q, k, v = fused[..., :-2, :], fused[..., [-2], :], fused[..., [-1], :]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        cos = self.cos[position_ids].unsqueeze(1).to(x.dtype)
        sin = self.sin[position_ids].unsqueeze(1).to(x.dtype)
        q = q * cos + self.rotate_half(q) * sin
        k = k * cos + self.rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k.expand(b, self.h, t, self.d), v.expand(b, self.h, t, self.d))
        return self.o(y.transpose(1, 2).reshape(b, t, self.h * self.d))


def test_position_indexed_rotary_table_and_constant_head_picks_leave_the_heads_free():
    ids = torch.tensor([[0, 1, 2, 3, 4], [3, 4, 5, 6, 7]])
    x = torch.randn(2, 5, 32)
    model, inputs, rep = analyse(RotaryTable(), (x, ids), "index")
    heads = rep.by_kind("attention_heads")
    assert [g.num_units for g in heads] == [4], rep.table()
    assert {m.fqn for m in heads[0].members} >= {"qkv.weight", "o.weight"}
    # the table's rows are positions picked by the ids (never permuted); its columns are the head dims
    assert ("cos", 0) not in members_of(rep) and members_of(rep).get(("cos", 1)) == "head_dim", rep.table()


class IndexBroadcast(torch.nn.Module):
    """Two integer index tensors broadcast together: their dims flow to the output as elementwise ops' do."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(5, 7, 6))
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8 * 6, 3)

    def forward(self, x):
        rows = (self.a(x) > 0).long()  # [B, 8]: indices computed from a's channels
        cols = torch.tensor([2])  # broadcasts against rows
        picked = self.table[rows, cols]  # [B, 8, 6]
        return self.b(picked.reshape(x.shape[0], -1))


def test_index_tensor_dims_flow_to_the_output():
    _, _, rep = analyse(IndexBroadcast(), (torch.randn(3, 4),), "index")
    grp = next(g for g in rep.groups if g.member("a.weight"))
    assert grp.member("b.weight")[0].dim == 1, rep.table()
    # the table's two indexed dims are positions; its last dim passes through and moves with b's columns
    assert {("table", 0), ("table", 1)} <= pinned_members(rep)
    assert ("table", 2) in members_of(rep)


def test_falcon_default_config_heads_are_found_and_sound():
    torch.manual_seed(0)
    model = models.falcon()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model, inputs, rep = analyse(model, (ids,), None)
    for layer in range(2):
        o = f"transformer.h.{layer}.self_attention.dense.weight"
        assert any(g.kind == "attention_heads" and g.member(o) for g in rep.groups), rep.table()


class ConstantPicks(torch.nn.Module):
    """Fixed channels picked by constant indices: a run (a slice) and a scattered list (one-unit slices)."""

    def __init__(self, select: bool) -> None:
        super().__init__()
        self.select = select
        self.a = torch.nn.Linear(4, 10)
        self.b = torch.nn.Linear(3, 2)
        self.c = torch.nn.Linear(2, 2)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        if self.select:
            run, scattered = h.index_select(1, torch.tensor([2, 3, 4])), h.index_select(1, torch.tensor([9, 6]))
        else:
            run, scattered = h[:, [2, 3, 4]], h[:, [9, 6]]
        return self.b(run) + self.c(scattered)


@pytest.mark.parametrize("select", [False, True], ids=["index", "index_select"])
def test_constant_indices_cut_the_dim_instead_of_pinning_it(select):
    _, _, rep = analyse(ConstantPicks(select), (torch.randn(3, 4),), "index_select" if select else "index")
    # the picked run [2, 5) is a group with b's columns; channels nobody picks ([0, 2), 5, [7, 9)) stay free
    picked = next(g for g in rep.groups if g.member("b.weight"))
    assert picked.num_units == 3 and picked.member("a.weight")[0].occurrences[0].offsets == (2,), rep.table()
    assert sum(g.num_units for g in rep.groups if g.member("a.weight")) >= 3 + 2 + 2
