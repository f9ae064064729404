"""Issue 13, catalog coverage: graph breaks and experts looped over in Python.

- A model whose own code raises while it is traced (transformers' LongT5 and Switch Transformers skip their default
  attention mask when ``torch.compiler.is_compiling()``, then index it): dynamo runs those frames eagerly, so what
  one compiled block hands the next crossed a graph break and was pinned. The trace now records one eager run.
- Experts run by a Python loop over ``weight[e]`` of stacked weights (JetMoE's ``tolist`` splits, GPT-OSS-style
  loops over the experts hit): one channel group per expert, proved like the grouped-GEMM one; where dynamo ran
  such a loop outside its graphs (a data-dependent ``continue`` inside it), the eager recording sees it.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify_fx
from sparsify_fx.analysis import analyze_graph
from sparsify_fx.frontend.trace import TraceFallbackWarning, _trace_with_dynamo, trace
from sparsify_fx.testing import assert_unchanged, model_snapshot


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def analyze_quiet(model: nn.Module, inputs) -> sparsify_fx.CouplingReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TraceFallbackWarning)
        return sparsify_fx.analyze(model, inputs)


def expert_groups(report) -> list:
    return [g for g in report.groups if g.expert is not None]


# ---------------------------------------------------------------------- a model that raises only while traced
class MaskedBlock(nn.Module):
    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d_in, d_out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.fc(x) * mask[..., None]  # a None mask raises here


class CompileOnlyMask(nn.Module):
    """The default mask is made only when not compiling (as transformers' LongT5 stack does): traced, the mask is
    None and the blocks' own line raises. ``up``'s rows and ``down``'s columns are one group across the blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.up = MaskedBlock(8, 16)
        self.down = MaskedBlock(16, 8)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None and not torch.compiler.is_compiling():
            mask = torch.ones(x.shape[:-1], dtype=x.dtype)
        return self.down(torch.relu(self.up(x, mask)), mask)


def _hidden_group(report):
    return [g for g in report.groups if any(m.fqn == "up.fc.weight" and m.dim == 0 for m in g.members)]


def test_model_raising_under_tracing_is_recorded_eagerly_with_groups_across_blocks() -> None:
    torch.manual_seed(0)
    m = CompileOnlyMask().double().eval()
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    snap = model_snapshot(m)
    with pytest.warns(TraceFallbackWarning, match=r"(?s)TypeError.*own code raises.*one eager run"):
        tg = trace(m, (x,))
    assert tg.source == "eager"
    assert_unchanged(m, snap)
    assert sorted(tg.state_nodes()) == sorted(n for n, _ in m.named_parameters())
    # before: dynamo skips the raising frame and compiles each block alone, so `up`'s output crosses a break, pinned
    pieces_tg, pieces = _trace_with_dynamo(m, (x,), {})
    assert pieces == 2 and not _hidden_group(analyze_graph(pieces_tg))
    (g,) = _hidden_group(analyze_graph(tg))
    assert g.kind == "ffn_channels" and g.num_units == 16
    assert {(mb.fqn, mb.dim) for mb in g.members} == {("up.fc.weight", 0), ("up.fc.bias", 0), ("down.fc.weight", 1)}
    ref = m(x)
    sparsify_fx.permute(m, g, torch.randperm(16, generator=torch.Generator().manual_seed(1)))
    assert rel(m(x), ref) < 1e-12
    broken = dataclasses.replace(g, members=[mb for mb in g.members if mb.fqn.startswith("up.")])
    sparsify_fx.permute(m, broken, torch.roll(torch.arange(16), 1))
    assert rel(m(x), ref) > 1e-3  # the check can fail: rows moved without the columns change the output


def test_values_read_into_python_are_pinned_in_an_eager_recording() -> None:
    class ReadsRows(CompileOnlyMask):
        def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            h = torch.relu(self.up(x, mask if mask is not None or torch.compiler.is_compiling() else torch.ones(
                x.shape[:-1], dtype=x.dtype)))
            if h[0, 0].tolist()[0] > 0:  # reads h's features by position
                h = h * 2
            return self.down(h, torch.ones(x.shape[:-1], dtype=x.dtype))

    torch.manual_seed(0)
    m = ReadsRows().eval()
    report = analyze_quiet(m, (torch.randn(2, 3, 8),))
    assert report.source == "eager" and not _hidden_group(report)
    pinned = [p for p in report.pinned if ("up.fc.weight", 0) in p.members]
    assert pinned and any("read into Python" in r for p in pinned for r in p.reasons)


# ---------------------------------------------------------------------- experts looped over in Python
class SplitLoopExperts(nn.Module):
    """JetMoE's pattern: routed rows sorted by expert, split by ``expert_size.tolist()``, one ``linear`` per expert
    with ``weight[e]``, ``cat``, a gated activation, the same split again for the down projection."""

    def __init__(self, hidden: int = 8, inter: int = 6, experts: int = 3, top_k: int = 2,
                 bias: str | None = None) -> None:
        super().__init__()
        self.experts, self.top_k = experts, top_k
        self.router = nn.Linear(hidden, experts, bias=False)
        self.w_in = nn.Parameter(torch.randn(experts, 2 * inter, hidden) / hidden**0.5)
        self.w_out = nn.Parameter(torch.randn(experts, hidden, inter) / inter**0.5)
        # "shared": one bias for every expert; "shifted": expert e adds expert e+1's bias
        self.bias_kind = bias
        self.bias = nn.Parameter(torch.randn(*([experts] if bias == "shifted" else []), 2 * inter)) if bias else None

    def _bias(self, e: int) -> torch.Tensor | None:
        return self.bias[(e + 1) % self.experts] if self.bias_kind == "shifted" else self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        gates, idx = self.router(flat).softmax(-1).topk(self.top_k, dim=1)
        sizes = torch.zeros(flat.shape[0], self.experts, dtype=torch.long).scatter(1, idx, 1).sum(0).tolist()
        order = idx.flatten().sort(0)[1]
        rows = order.div(self.top_k, rounding_mode="trunc")
        pieces = flat[rows].split(sizes, dim=0)
        h = torch.cat([F.linear(pieces[e], self.w_in[e], self._bias(e)) for e in range(self.experts)])
        gate, up = h.chunk(2, dim=-1)
        pieces = (F.silu(gate) * up).split(sizes, dim=0)
        y = torch.cat([F.linear(pieces[e], self.w_out[e]) for e in range(self.experts)])
        y = y * gates.flatten()[order][:, None]
        return torch.zeros_like(flat).index_add(0, rows, y).view_as(x)


def test_split_loop_gives_one_ffn_group_per_expert_float64() -> None:
    torch.manual_seed(0)
    m = SplitLoopExperts().double().eval()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TraceFallbackWarning)  # it exports: no fallback involved
        report = sparsify_fx.analyze(m, (x,))
    groups = expert_groups(report)
    assert sorted(g.expert for g in groups) == [0, 1, 2]
    for g in groups:
        assert g.kind == "ffn_channels" and g.num_units == 6
        by = {mb.fqn: mb for mb in g.members}
        assert set(by) == {"w_in", "w_out"} and all(mb.expert == g.expert for mb in g.members)
        assert (by["w_in"].dim, by["w_in"].role, len(by["w_in"].occurrences)) == (1, "out", 2)  # gate and up halves
        assert (by["w_out"].dim, by["w_out"].role) == (2, "in")
    ref = m(x)
    gen = torch.Generator().manual_seed(2)
    before = m.w_in.detach().clone()
    for g in groups:  # a different permutation per expert
        sparsify_fx.permute(m, g, torch.randperm(6, generator=gen))
    assert all(not torch.equal(before[e], m.w_in[e]) for e in range(3))
    assert rel(m(x), ref) < 1e-12
    one = groups[1]
    sparsify_fx.permute(m, dataclasses.replace(one, members=[mb for mb in one.members if mb.fqn == "w_in"]),
                        torch.roll(torch.arange(6), 1))
    assert rel(m(x), ref) > 1e-3


@pytest.mark.parametrize("bias", ["shared", "shifted"])
def test_a_bias_another_expert_also_reads_keeps_one_group_for_all(bias: str) -> None:
    """A bias added to every expert's rows, or expert e's rows getting expert e+1's bias slice: a permutation per
    expert would move the bias differently from the rows it meets, so the proof refuses and the channels stay one
    group (still a symmetry)."""
    torch.manual_seed(0)
    m = SplitLoopExperts(bias=bias).double().eval()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    report = sparsify_fx.analyze(m, (x,))
    assert not expert_groups(report)
    (g,) = [g for g in report.groups if any(mb.fqn == "bias" for mb in g.members)]
    ref = m(x)
    sparsify_fx.permute(m, g, torch.randperm(6, generator=torch.Generator().manual_seed(3)))
    assert rel(m(x), ref) < 1e-12
    # what a per-expert group would have claimed: expert 0's slices alone breaks it
    alone = dataclasses.replace(g, members=[dataclasses.replace(mb, expert=0) for mb in g.members
                                            if mb.fqn != "bias" or bias == "shifted"])
    sparsify_fx.permute(m, alone, torch.roll(torch.arange(6), 1))
    assert rel(m(x), ref) > 1e-3


class HitLoopExperts(nn.Module):
    """GPT-OSS-style eager experts (transformers' OpenAI privacy filter): a loop over the experts the routing hit,
    ``hidden[token_idx] @ gate_up_proj[e] + bias[e]``, with a data-dependent ``continue`` inside the loop."""

    def __init__(self, hidden: int = 8, inter: int = 5, experts: int = 4) -> None:
        super().__init__()
        self.experts = experts
        self.pre = nn.Linear(hidden, hidden)
        self.router = nn.Linear(hidden, experts)
        self.gate_up_proj = nn.Parameter(torch.randn(experts, hidden, 2 * inter) / hidden**0.5)
        self.gate_up_proj_bias = nn.Parameter(torch.randn(experts, 2 * inter))
        self.down_proj = nn.Parameter(torch.randn(experts, inter, hidden) / inter**0.5)
        self.down_proj_bias = nn.Parameter(torch.randn(experts, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre(x)
        weights, idx = self.router(x).softmax(-1).topk(2, dim=-1)
        out = torch.zeros_like(x)
        mask = F.one_hot(idx, self.experts).permute(2, 1, 0)
        for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero():
            e = e[0]
            if e == self.experts:
                continue
            pos, tok = torch.where(mask[e])
            gate, up = (x[tok] @ self.gate_up_proj[e] + self.gate_up_proj_bias[e]).chunk(2, dim=-1)
            y = (F.silu(gate) * up) @ self.down_proj[e] + self.down_proj_bias[e]
            out.index_add_(0, tok, y * weights[tok, pos, None])
        return out


def test_loop_dynamo_runs_outside_its_graphs_is_recorded_eagerly_per_expert_float64() -> None:
    torch.manual_seed(0)
    m = HitLoopExperts().double().eval()
    x = torch.randn(12, 8, dtype=torch.float64)
    with pytest.warns(TraceFallbackWarning, match=r"(?s)GuardOnDataDependentSymNode.*dynamo ran part of the model "
                                                  r"outside.*gate_up_proj.*one eager run"):
        report = sparsify_fx.analyze(m, (x,))
    assert report.source == "eager"
    groups = expert_groups(report)
    assert sorted(g.expert for g in groups) == [0, 1, 2, 3] and all(g.kind == "ffn_channels" for g in groups)
    assert {mb.fqn for mb in groups[0].members} == {"gate_up_proj", "gate_up_proj_bias", "down_proj"}
    ref = m(x)
    gen = torch.Generator().manual_seed(4)
    for g in groups:
        sparsify_fx.permute(m, g, torch.randperm(5, generator=gen))
    assert rel(m(x), ref) < 1e-12


# ---------------------------------------------------------------------- transformers models, built small
def test_longt5_traces_eagerly_with_heads_in_every_attention() -> None:
    from transformers import LongT5Config, LongT5Model

    cfg = LongT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                       local_radius=4, global_block_size=4, use_cache=False)
    torch.manual_seed(0)
    m = LongT5Model(cfg).double().eval()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    inputs = {"input_ids": ids, "decoder_input_ids": ids.flip(1)}
    with pytest.warns(TraceFallbackWarning, match=r"(?s)modeling_longt5\.py.*own code raises.*one eager run"):
        report = sparsify_fx.analyze(m, inputs)
    attention = {n for n, mod in m.named_modules() if isinstance(getattr(mod, "q", None), nn.Linear)}
    heads = {mb.fqn.rsplit(".", 2)[0] for g in report.groups if g.kind == "attention_heads" for mb in g.members}
    assert attention and attention <= heads
    ref = m(**inputs).last_hidden_state
    for g in report.by_kind("attention_heads"):
        sparsify_fx.permute(m, g, torch.randperm(g.num_units, generator=torch.Generator().manual_seed(5)))
    assert rel(m(**inputs).last_hidden_state, ref) < 1e-12


def test_jetmoe_has_ffn_groups_per_layer_and_expert() -> None:
    from transformers import JetMoeConfig, JetMoeModel

    cfg = JetMoeConfig(vocab_size=64, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                       num_key_value_heads=2, kv_channels=8, num_local_experts=3, num_experts_per_tok=2,
                       max_position_embeddings=64)
    torch.manual_seed(0)
    m = JetMoeModel(cfg).double().eval()
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    report = analyze_quiet(m, (ids,))
    found = {(g.layer, g.expert) for g in expert_groups(report) if g.kind == "ffn_channels" and ".mlp" in g.prefix}
    assert found == {(layer, e) for layer in range(2) for e in range(3)}
    ref = m(ids).last_hidden_state
    gen = torch.Generator().manual_seed(6)
    for g in expert_groups(report):
        sparsify_fx.permute(m, g, torch.randperm(g.num_units, generator=gen))
    assert rel(m(ids).last_hidden_state, ref) < 1e-12
