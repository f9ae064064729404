"""The graph adapter: export, dynamo and AOTAutograd graphs give the same FQNs and the same groups."""

from __future__ import annotations

import models
import torch
from torch._functorch.aot_autograd import aot_module_simplified

import sparsify_fx
from sparsify_fx.frontend import TracedGraph, info_from_dynamo_source

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def _groups(report):
    return sorted((g.kind, g.num_units, tuple(sorted((m.fqn, m.dim) for m in g.members))) for g in report.groups)


def _capture_aot(model, *args, **kwargs):
    """Compile once with a backend that hands the AOT forward graph to the analysis."""
    seen = {}

    def backend(gm, example_inputs):
        infos = [info_from_dynamo_source(n) for n in gm.graph.nodes if n.op == "placeholder"]
        seen["dynamo"] = TracedGraph.from_dynamo(gm)

        def fw(fw_gm, _inputs):
            # under no_grad AOT builds an inference graph: all outputs are the user's
            seen["aot"] = TracedGraph.from_aot(fw_gm, infos, num_user_outputs=None)
            return fw_gm

        return aot_module_simplified(gm, example_inputs, fw_compiler=fw)

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*args, **kwargs)
    return seen


def test_trace_maps_placeholders_to_fqns():
    model = models.llama(layers=1)
    tg = sparsify_fx.trace(model, (IDS,))
    fqns = set(tg.state_nodes())
    assert {n for n, _ in model.named_parameters()} <= fqns
    assert "model.rotary_emb.inv_freq" in fqns
    assert any(info.kind == "input" for info in tg.inputs.values())


def test_dynamo_placeholders_carry_fqns():
    model = models.gpt2(layers=1).eval()
    seen = _capture_aot(model, IDS)
    params = {info.target for info in seen["dynamo"].inputs.values() if info.kind == "parameter"}
    # tied wte/lm_head is one tensor: dynamo names it once
    assert params and params <= {n for n, _ in model.named_parameters(remove_duplicate=False)}


def test_analysis_on_aot_graph_matches_export(tmp_path):
    model = models.llama(layers=1).eval()
    # with the KV cache on, k and v are model outputs and rightly pinned; the export path turns it off
    seen = _capture_aot(model, IDS, use_cache=False)
    aot = sparsify_fx.analyze_graph(seen["aot"])
    exported = sparsify_fx.analyze(model, (IDS,))
    assert aot.source == "aot" and exported.source == "export"
    assert _groups(aot) == _groups(exported), aot.table() + "\n---\n" + exported.table()


def test_trace_error_names_the_line_once_without_torch_logging_the_traceback(caplog):
    """A shape error inside the model: one TraceError with the cause and the user's line; FakeTensor's own
    ERROR-level traceback (the same failure, logged before raising) is kept out of the user's log."""
    import logging

    import pytest

    model = models.MLP()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with caplog.at_level(logging.ERROR), pytest.raises(sparsify_fx.TraceError) as err:
        sparsify_fx.trace(model, (torch.randn(2, 16),))
    assert "must have same reduction dim" in str(err.value)
    assert "tests/models.py" in str(err.value) and "x = layer(x)" in str(err.value)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert logging.getLogger("torch._subclasses.fake_tensor").level == logging.NOTSET  # restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
