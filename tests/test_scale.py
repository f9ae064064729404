"""Planning cost at scale (issue 14, item 5): the faster planning path gives the plan the plain path gives.

What changed for speed: torch.export runs without recording a Python stack per op (``trace``), a unit
permutation's index is built with ``index_select`` (``Member.index``), and ``_apply`` builds the set of selected
units once per unit instead of once per index. Each test compares against the unoptimised computation, written
out here, on an 8-layer model; ``benchmarks/scale.py`` measures the cost.
"""

from __future__ import annotations

import models
import pytest
import torch
import torch.fx
from torch import nn

import sparsify_fx
from sparsify_fx.analysis import Member, Occurrence, analyze_graph
from sparsify_fx.frontend import TracedGraph, trace
from sparsify_fx.frontend.trace import tracing_friendly
from sparsify_fx.passes.s2ft import state_of
from sparsify_fx.passes.surgery import get_tensor

LAYERS = 8
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def _reference_index(m: Member, perm: torch.Tensor) -> torch.Tensor:
    """Member.index as it was written before (advanced indexing, one base offset at a time)."""
    new = torch.arange(m.size)
    for occ in m.occurrences:
        for base in occ.offsets:
            span = occ.units * occ.inner
            new[base : base + span] = new[base : base + span].view(occ.units, occ.inner)[perm].reshape(-1)
    return new


def _report_key(report: sparsify_fx.CouplingReport) -> tuple[list, list]:
    groups = [(g.name, g.kind, g.num_units, g.unit_size, g.group_size, g.kv_group,
               tuple((m.fqn, m.dim, m.size, m.occurrences, m.role) for m in g.members)) for g in report.groups]
    pinned = [(p.kind, p.size, tuple(p.members), tuple(p.reasons)) for p in report.pinned]
    return groups, pinned


def _meta_llama() -> nn.Module:
    with torch.device("meta"):
        return models.llama(layers=LAYERS)


@pytest.mark.parametrize(
    "occurrences",
    [
        [Occurrence((0,), 12, 1)],  # FFN channels
        [Occurrence((0,), 4, 6)],  # heads of 6 rows each
        [Occurrence(tuple(range(0, 24, 6)), 6, 1)],  # a within-head channel, once per head
        [Occurrence((0, 12), 3, 2), Occurrence((0,), 3, 8)],  # two digits of one dim (both permuted)
        [Occurrence((2,), 5, 2)],  # a part of a concatenation that does not start at 0
    ],
)
def test_member_index_equals_advanced_indexing(occurrences: list[Occurrence]) -> None:
    size = 24 if occurrences[0].offsets != (2,) else 14
    m = Member("w", 0, size, tuple(occurrences))
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        perm = torch.randperm(occurrences[0].units, generator=g)
        got = m.index(perm)
        assert torch.equal(got, _reference_index(m, perm))
        assert torch.equal(torch.sort(got).values, torch.arange(size))  # still a permutation of the dim
    assert torch.equal(m.index(list(range(occurrences[0].units))), torch.arange(size))  # a list works as before


def test_trace_without_stack_traces_gives_the_graph_and_report_with_them() -> None:
    model = _meta_llama().eval()
    fast = trace(model, (IDS,))
    assert torch.fx.config.do_not_emit_stack_traces is False  # restored after the trace
    assert not any(n.meta.get("stack_trace") for n in fast.graph.nodes)
    # the plain path: torch.export as before, recording a stack per node
    with tracing_friendly(model):
        ep = torch.export.export(model, (IDS,), strict=False)
    plain = TracedGraph.from_exported(ep)
    assert any(n.meta.get("stack_trace") for n in plain.graph.nodes), "the reference must record stacks"

    def nodes(tg: TracedGraph) -> list[tuple]:
        return [(n.op, str(n.target), tuple(getattr(n.meta.get("val"), "shape", ()))) for n in tg.graph.nodes]

    assert nodes(fast) == nodes(plain)
    assert fast.inputs == plain.inputs
    ref = analyze_graph(plain)
    assert len(ref.by_kind("kv_heads")) == LAYERS and len(ref.by_kind("ffn_channels")) == LAYERS
    assert _report_key(analyze_graph(fast)) == _report_key(ref)


def test_stack_trace_setting_restored_when_tracing_fails() -> None:
    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise ValueError("not traceable at all")

    with pytest.raises(sparsify_fx.TraceError):
        trace(Fails(), (torch.randn(2, 3),))
    assert torch.fx.config.do_not_emit_stack_traces is False


def test_meta_plan_of_8_layers_equals_the_plain_plan() -> None:
    """s2ft on an 8-layer meta Llama plans what s2ft on the same model with weights plans, every permutation is
    the selected units followed by the others in order, and the weights on CPU moved by the reference index."""
    torch.manual_seed(0)
    cpu = models.llama(layers=LAYERS)
    before = {k: v.clone() for k, v in cpu.state_dict().items()}
    meta = _meta_llama()

    def cfg() -> sparsify_fx.S2FTConfig:
        return sparsify_fx.S2FTConfig(attention_ratio=0.5, ffn_ratio=0.25, progress=False)

    sparsify_fx.s2ft(cpu, (IDS,), cfg())
    sparsify_fx.s2ft(meta, (IDS,), cfg())
    st_cpu, st_meta = state_of(cpu), state_of(meta)
    assert len(st_cpu.units) == 2 * LAYERS  # heads and FFN channels in every layer
    assert [(u.group.name, u.selected) for u in st_meta.units] == [(u.group.name, u.selected) for u in st_cpu.units]
    assert [(s.fqn, s.dim, s.start, s.length) for s in st_meta.slices] == [
        (s.fqn, s.dim, s.start, s.length) for s in st_cpu.slices
    ]
    moved: set[str] = set()
    for u in st_cpu.units:
        plain_perm = u.selected + [i for i in range(u.group.num_units) if i not in u.selected]
        assert torch.equal(st_cpu.perms[u.group.name], torch.tensor(plain_perm))
        assert torch.equal(st_meta.perms[u.group.name], torch.tensor(plain_perm))
        for m in u.group.members:
            ref = before[m.fqn].index_select(m.dim, _reference_index(m, torch.tensor(plain_perm)))
            assert torch.equal(get_tensor(cpu, m.fqn), ref), m.fqn
            moved.add(m.fqn)
    assert any("mlp.down_proj" in f for f in moved) and any("self_attn.o_proj" in f for f in moved)
