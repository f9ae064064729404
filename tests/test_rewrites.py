"""Generic fw/bw rewrites of the sparsify backend, each checked with the test kit's ``check_pass`` on real traced
models (dynamo → AOTAutograd → min-cut partition), no Inductor: gradients and outputs must match eager."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify_fx.codegen import rewrites as rw
from sparsify_fx.testing import check_pass


class CatTrainable(nn.Module):
    """S²FT written in plain PyTorch: the trainable column blocks are concatenated with the frozen rest of W2
    (what ``sparsify_fx.ops.s2ft_linear_reference`` does). Eager autograd computes all of dW2, then slices it."""

    def __init__(self, spans=((8, 12),), d_in=16, hidden=32, d_out=24) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(hidden, d_in, generator=g) / 4, requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(d_out, hidden, generator=g) / 6, requires_grad=False)
        self.spans = spans
        self.blocks = nn.ParameterList(nn.Parameter(self.w2.data[:, s:e].clone()) for s, e in spans)

    def forward(self, x):
        h = F.gelu(F.linear(x, self.w1))
        pieces, pos = [], 0
        for (s, e), b in zip(self.spans, self.blocks):
            pieces += [self.w2[:, pos:s], b]
            pos = e
        pieces.append(self.w2[:, pos:])
        return F.linear(h, torch.cat(pieces, dim=1))


class RowTrainable(CatTrainable):
    """Same with a row block (dim 0): dW rows are a slice of the output-gradient's columns."""

    def forward(self, x):
        h = F.gelu(F.linear(x, self.w1))
        w = torch.cat([self.w2[:4], self.rows, self.w2[10:]], dim=0)
        return F.linear(h, w)

    def __init__(self) -> None:
        super().__init__(spans=())
        self.rows = nn.Parameter(self.w2.data[4:10].clone())


def _mm_shapes(text: str) -> list[str]:
    return re.findall(r'"(f32\[[\d, ]+\])" = torch\.ops\.aten\.mm\.default', text)


def _saved_shapes(text: str) -> list[str]:
    """Shapes of the backward's placeholders that are saved activations (not tangents)."""
    sig = text.split("def forward(self, ", 1)[1].split("):", 1)[0]
    return [shape for name, shape in re.findall(r'(\w+): "(f32\[[\d, ]*\])"', sig) if not name.startswith("tangents")]


X = (torch.randn(3, 5, 16),)


def test_dead_weight_grads_computes_only_the_trainable_columns():
    check = check_pass(rw.eliminate_dead_weight_grads, CatTrainable(), X, expect_change=True)
    (before,), (after,) = check.before, check.after
    assert "f32[24, 32]" in _mm_shapes(before["backward"])  # the full dW2 AOTAutograd leaves
    assert _mm_shapes(after["backward"]) == ["f32[24, 4]"]  # only the trainable block's gradient
    assert check.results[0].changed and "4/32 columns" in " ".join(check.results[0].notes)


def test_dead_weight_grads_row_block_pushes_slice_through_transposes():
    check = check_pass(rw.eliminate_dead_weight_grads, RowTrainable(), X, expect_change=True)
    assert _mm_shapes(check.after[0]["backward"]) == ["f32[6, 32]"]


def _pipeline(g: rw.PartitionedGraphs) -> list[rw.PassResult]:
    return [fn(g) for fn in rw.DEFAULT_PASSES.values()]


@pytest.mark.parametrize("spans", [((8, 12),), ((2, 5), (20, 29))], ids=["one-block", "two-blocks"])
def test_saved_activation_is_sliced_to_what_the_backward_reads(spans):
    model = CatTrainable(spans=spans)

    def pipeline(g):
        before = rw.saved_bytes(g)
        results = _pipeline(g)
        results.append(("bytes", before, rw.saved_bytes(g)))
        return results

    check = check_pass(pipeline, model, X, expect_change=True)
    results = check.results[0]
    assert results[1].name == "slice_saved_activations" and results[1].changed
    kept = sum(e - s for s, e in spans)
    # forward saves one [15, len] copy per block instead of the [15, 32] activation
    assert _saved_shapes(check.before[0]["backward"]) == ["f32[15, 32]"]
    assert sorted(_saved_shapes(check.after[0]["backward"])) == sorted(f"f32[15, {e - s}]" for s, e in spans)
    _, before, after = results[-1]
    assert after == before * kept // 32
    assert "aten.clone" in check.after[0]["forward"]  # a real copy: the full activation can be freed


def test_slice_saved_activations_alone_leaves_full_matmul_graphs_unchanged():
    # Without the slice pushdown the backward reads the whole saved activation (mm over all columns): no slice
    # to move, and the pass must say so instead of guessing.
    check = check_pass(rw.slice_saved_activations, CatTrainable(), X, expect_change=False)
    assert not check.results[0].changed


class TwoBranches(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = nn.Linear(8, 8, bias=False)

    def forward(self, x):
        return self.a(x).tanh() + self.b(x.sin())


def _capture(model, x) -> rw.PartitionedGraphs:
    """The real partitioned graphs of ``model`` (copied out of check_pass, which also checks them unchanged)."""
    captured = {}

    def grab(g):
        fw = torch.fx.GraphModule(g.fw, copy.deepcopy(g.fw.graph))
        bw = torch.fx.GraphModule(g.bw, copy.deepcopy(g.bw.graph))
        captured["g"] = rw.PartitionedGraphs(fw, bw, g.num_fwd_outputs, list(g.inputs), list(g.requires_grad))

    check_pass(grab, model, (x,), expect_change=False)
    return captured["g"]


def _run_pair(g: rw.PartitionedGraphs, model, x):
    args = [model.get_parameter(i.target) if i.kind == "parameter" else x for i in g.inputs]
    outs = g.fw(*args)
    user, saved = outs[:g.num_fwd_outputs], outs[g.num_fwd_outputs:]
    grads = g.bw(*saved, torch.ones_like(user[0]))
    return user[0], {i.target: gr for i, gr in zip(g.inputs, grads) if i.kind == "parameter"}, len(saved)


def test_prune_backward_drops_dead_gradient_work_and_unused_saved_tensors():
    # b trains while tracing, then a caller declares it frozen (as if requires_grad were False): pass 1 drops its
    # gradient and pass 2 removes the backward work and the saved activation (sin(x)) that only fed it.
    torch.manual_seed(0)
    model, x = TwoBranches(), torch.randn(4, 8)
    g = _capture(model, x)
    y0, grads0, n_saved0 = _run_pair(g, model, x)
    names = [i.target for i in g.inputs]
    g.requires_grad = [rg and names[i] != "b.weight" for i, rg in enumerate(g.requires_grad)]
    r1 = rw.eliminate_dead_weight_grads(g)
    g.recompile()
    r2 = rw.prune_backward(g)
    g.recompile()
    assert r1.changed and "b.weight" in " ".join(r1.notes)
    assert r2.changed and "no longer saved" in " ".join(r2.notes)
    y1, grads1, n_saved1 = _run_pair(g, model, x)
    assert n_saved1 < n_saved0
    assert grads1["b.weight"] is None and grads0["b.weight"] is not None
    torch.testing.assert_close(y1, y0)
    for name in ("a.weight", "a.bias"):
        torch.testing.assert_close(grads1[name], grads0[name])
    # and the untouched graphs match eager autograd
    model(x).sum().backward()
    torch.testing.assert_close(grads0["a.weight"], model.a.weight.grad)
    torch.testing.assert_close(grads0["b.weight"], model.b.weight.grad)


def test_prune_backward_is_a_no_op_on_aot_graphs():
    check = check_pass(rw.prune_backward, TwoBranches(), (torch.randn(4, 8),), expect_change=False)
    assert "already pruned" in " ".join(check.results[0].notes)


def test_aot_leaves_nothing_for_whole_frozen_parameters():
    # Measurement as a test: with whole frozen layers AOTAutograd already returns None for their gradients and
    # saves nothing for them, so pass 1 only reports.
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 4))
    model[0].requires_grad_(False)
    check = check_pass(rw.eliminate_dead_weight_grads, model, (torch.randn(3, 8),), expect_change=False)
    assert "AOTAutograd already" in " ".join(check.results[0].notes)
