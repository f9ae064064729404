"""The ``"sparsify"`` torch.compile backend: options, entry point, equivalence with eager (plain models and S²FT
training on tiny Llama / GPT-2, ATen and Triton kernels), graph breaks, dynamic shapes, fallback, dumps, explain.

Every torch.compile here costs seconds to tens of seconds on two cores, so each test compiles once or twice.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import models
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sparsify_fx
from sparsify_fx.codegen import backend as be
from sparsify_fx.errors import ConfigError
from sparsify_fx.testing import assert_equivalent

# ---------------------------------------------------------------------------------------------------- options


def test_unknown_option_names_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['kernel'\].*'kernels', 'dump', 'rewrites'"):
        be.BackendOptions.from_options({"kernel": "triton"})


@pytest.mark.parametrize(
    "options,match",
    [
        ({"kernels": "cuda"}, "kernels='cuda'"),
        ({"rewrites": ["no_such_pass"]}, r"unknown rewrite\(s\) \['no_such_pass'\]"),
        ({"rewrites": 3}, "rewrites must be"),
        ({"fallback": "yes"}, "fallback must be"),
        ({"dump": 5}, "dump must be a directory"),
        ({"inline_ops": 1}, "inline_ops must be"),
    ],
)
def test_bad_option_values_raise_config_error(options, match):
    with pytest.raises(ConfigError, match=match):
        be.BackendOptions.from_options(options)


def test_option_defaults_rewrite_selection_and_dump_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SPARSIFY_FX_DUMP", raising=False)
    opts = be.BackendOptions.from_options(None)
    assert opts.kernels == "auto" and opts.dump is None and opts.fallback
    assert opts.rewrites == tuple(be.REWRITES)
    assert be.BackendOptions.from_options({"rewrites": False}).rewrites == ()
    only = be.BackendOptions.from_options({"rewrites": ["prune_backward", "eliminate_dead_weight_grads"]})
    assert only.rewrites == ("eliminate_dead_weight_grads", "prune_backward")  # pipeline order
    assert "slice_saved_activations" not in be.BackendOptions.from_options(
        {"rewrites": {"slice_saved_activations": False}}).rewrites
    monkeypatch.setenv("SPARSIFY_FX_DUMP", str(tmp_path))
    assert be.BackendOptions.from_options(None).dump == str(tmp_path)
    assert be.BackendOptions.from_options({"dump": str(tmp_path / "x")}).dump == str(tmp_path / "x")


def test_compile_rejects_bad_options_before_compiling():
    with pytest.raises(Exception, match="unknown option"):
        torch.compile(nn.Linear(2, 2), backend="sparsify", options={"bogus": 1})(torch.randn(1, 2))


def test_triton_without_gpu_or_interpreter_falls_back_to_aten_with_reason(monkeypatch):
    be._load_kernel_modules()  # triton reads TRITON_INTERPRET when a kernel is defined: define them as the suite does
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    rec = be.GraphRecord(-1)
    opts = be.BackendOptions.from_options({"kernels": "triton"})
    assert be._resolve_family(opts, [torch.randn(2)], rec) == "aten"
    assert "TRITON_INTERPRET=1" in rec.fallbacks[0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    rec = be.GraphRecord(-1)
    assert be._resolve_family(opts, [torch.randn(2)], rec) == "triton" and not rec.fallbacks
    # "auto" picks ATen on CPU without a word
    assert be._resolve_family(be.BackendOptions(), [torch.randn(2)], rec) == "aten"


# ---------------------------------------------------------------------------------------------------- entry point


def test_backend_string_works_without_importing_sparsify_fx():
    code = (
        "import sys, torch\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "assert 'sparsify_fx' not in sys.modules\n"
        "fn = lookup_backend('sparsify')\n"
        "assert fn.__module__ == 'sparsify_fx.codegen.backend', fn.__module__\n"
        "f = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend='sparsify')\n"
        "x = torch.randn(8)\n"
        "torch.testing.assert_close(f(x), torch.sin(x) * 2 + 1)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                         cwd="/")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------------- plain models


def test_plain_model_matches_eager_and_dump_shows_the_rewrites(tmp_path):
    torch._dynamo.reset()
    model = models.CatTrainable()
    x = torch.randn(3, 5, 16)
    compiled = torch.compile(model, backend="sparsify", options={"dump": str(tmp_path)})
    assert_equivalent(model, compiled, (x,), rtol=1e-5, atol=1e-6)

    index = json.loads((tmp_path / "index.json").read_text())
    (graph,) = index["graphs"]
    fired = {p["name"] for p in graph["passes"] if p["changed"]}
    assert fired == {"eliminate_dead_weight_grads", "slice_saved_activations"}
    assert graph["saved_bytes_after"] < graph["saved_bytes_before"]
    gdir = tmp_path / graph["dir"]
    files = set(graph["files"])
    assert {"dynamo.txt", "forward.00_partitioned.txt", "backward.00_partitioned.txt",
            "forward.inductor.py", "backward.inductor.py"} <= files
    # the diff shows the full weight gradient replaced by the block's
    diff = (gdir / "backward.01_eliminate_dead_weight_grads.diff").read_text()
    removed = [line for line in diff.splitlines() if line.startswith("-") and "aten.mm" in line]
    added = [line for line in diff.splitlines() if line.startswith("+") and "aten.mm" in line]
    assert any('"f32[24, 32]"' in line for line in removed) and any('"f32[24, 4]"' in line for line in added)
    fdiff = (gdir / "forward.01_slice_saved_activations.diff").read_text()
    assert any(line.startswith("+") and "aten.clone" in line for line in fdiff.splitlines())
    assert "def call(" in (gdir / "backward.inductor.py").read_text()  # Inductor's generated wrapper
    assert "eliminate_dead_weight_grads: fired" in (tmp_path / "index.txt").read_text()


def test_graph_break_and_dynamic_batch_compile_once_and_match_eager():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(12, 16)
            self.b = nn.Linear(16, 4)
            self.a.requires_grad_(False)

        def forward(self, x):
            h = F.gelu(self.a(x))
            torch._dynamo.graph_break()
            return self.b(h).tanh()

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Broken()
    compiled = torch.compile(model, backend="sparsify")
    with be.recording() as records:
        for batch in (3, 5, 7):
            x = torch.randn(batch, 12, requires_grad=True)
            torch._dynamo.mark_dynamic(x, 0)
            assert_equivalent(model, compiled, (x,), rtol=1e-5, atol=1e-6)
    # one graph per side of the break, compiled once for all batch sizes
    assert len(records) == 2, [r.id for r in records]
    assert not any(r.fallbacks for r in records)


def test_failing_rewrite_falls_back_with_logged_reason(monkeypatch, caplog):
    def broken(g):
        raise RuntimeError("boom in a pass")

    monkeypatch.setitem(be.REWRITES, "slice_saved_activations", broken)
    torch._dynamo.reset()
    model = models.CatTrainable()
    x = torch.randn(2, 16)
    with caplog.at_level(logging.WARNING, logger="sparsify_fx"), be.recording() as records:
        assert_equivalent(model, torch.compile(model, backend="sparsify"), (x,), rtol=1e-5, atol=1e-6)
    assert "boom in a pass" in caplog.text and "plain Inductor" in caplog.text
    assert records[0].fallbacks and "boom in a pass" in records[0].fallbacks[0]

    torch._dynamo.reset()
    compiled = torch.compile(model, backend="sparsify", options={"fallback": False})
    with pytest.raises(Exception, match="boom in a pass"):
        compiled(x)
    torch._dynamo.reset()


def test_failure_inside_inductor_with_our_hooks_retries_plain_inductor(monkeypatch, caplog):
    def broken_inner(*args, **kwargs):
        def inner(gm, example_inputs, **kw):
            raise RuntimeError("lowering exploded")

        return inner

    monkeypatch.setattr(be, "_make_inner", broken_inner)
    torch._dynamo.reset()
    model = models.CatTrainable()
    with caplog.at_level(logging.WARNING, logger="sparsify_fx"), be.recording() as records:
        assert_equivalent(model, torch.compile(model, backend="sparsify"), (torch.randn(2, 16),), rtol=1e-5,
                          atol=1e-6)
    assert "lowering exploded" in records[0].fallbacks[0] and "plain Inductor" in caplog.text
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------- S²FT training


def _s2ft_model(name):
    torch.manual_seed(0)
    model = getattr(models, name)().eval()  # eval: no dropout, so eager and compiled draw no random numbers
    sparsify_fx.s2ft(model, (IDS,), sparsify_fx.S2FTConfig(attention_ratio=0.5, ffn_ratio=0.25))
    return model


IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def _train(model, steps=5):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses)


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("kernels", ["aten", "triton"])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_s2ft_training_matches_eager(name, kernels):
    torch._dynamo.reset()
    model = _s2ft_model(name)
    ref = _s2ft_model(name)  # built again, not deepcopied: a deepcopy would give the blocks their own storage
    assert _rel(next(iter(ref.state_dict().values())), next(iter(model.state_dict().values()))) == 0
    with be.recording() as records:
        compiled = torch.compile(model, backend="sparsify", options={"kernels": kernels})
        losses = _train(compiled)
    ref_losses = _train(ref)
    assert _rel(losses, ref_losses) <= 1e-4
    trained = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    assert trained
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert _rel(p.detach(), trained[n].detach()) <= 1e-4, n
    # the frozen weights moved exactly where their trained blocks are (views), nowhere else
    for (n, p), (_, q) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert _rel(p, q) <= 1e-4, n
    assert not any(r.fallbacks for r in records)
    ops = {s.split(" -> ")[-1] for r in records for s in r.swaps}
    inlined = [i for r in records for i in r.inlined if " inlined as " in i]
    if kernels == "triton":
        assert {"sparsify.s2ft_linear_triton.default", "sparsify.s2ft_weight_grad_triton.default"} <= ops
        assert not inlined
    else:
        assert not ops
        # the block-gradient op is plain ATen math and gets inlined; s2ft_linear checks data pointers (zero-copy
        # views), which does not trace, so it stays an extern call
        assert inlined and all("s2ft_weight_grad" in i for i in inlined)
        assert any("s2ft_linear" in i and "extern call" in i for r in records for i in r.inlined)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------- explain


def test_explain_reports_rewrites_and_leaves_the_model_alone(capsys):
    model = models.CatTrainable()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = sparsify_fx.explain(model, (torch.randn(3, 5, 16),))
    printed = capsys.readouterr().out
    assert report.fired == ["eliminate_dead_weight_grads", "slice_saved_activations"]
    assert "4/32 columns" in printed and "saved for backward" in printed
    (g,) = report.graphs
    assert "parameter block (trainable)" in g.inputs and "parameter w2 (frozen)" in g.inputs
    assert "forward.partitioned" in g.graphs and "backward.eliminate_dead_weight_grads" in g.graphs
    assert model.block.grad is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_explain_s2ft_llama_lists_triton_swaps_and_graph_breaks():
    model = _s2ft_model("llama")
    report = sparsify_fx.explain(model, {"input_ids": IDS, "labels": IDS}, {"kernels": "triton"}, verbose=False)
    swaps = [s for g in report.graphs for s in g.swaps]
    assert any("s2ft_linear_triton" in s for s in swaps) and any("s2ft_weight_grad_triton" in s for s in swaps)
    assert any("(trainable)" in i for g in report.graphs for i in g.inputs)
    assert not report.fallbacks
    assert "kernel: forward" in str(report)


def test_s2ft_llama_dynamic_batch_and_sequence_compile_once():
    torch._dynamo.reset()
    model = _s2ft_model("llama")
    compiled = torch.compile(model, backend="sparsify")
    with be.recording() as records:
        for batch, seq in [(2, 8), (3, 12), (4, 16)]:
            ids = torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(batch))
            torch._dynamo.mark_dynamic(ids, 0)
            torch._dynamo.mark_dynamic(ids, 1)
            assert_equivalent(model, compiled, {"input_ids": ids, "labels": ids})
    assert len(records) == 1 and not records[0].fallbacks
    torch._dynamo.reset()


def test_s2ft_llama_inference_with_triton_kernels_and_dump(tmp_path):
    torch._dynamo.reset()
    model = _s2ft_model("llama")
    compiled = torch.compile(model, backend="sparsify", options={"kernels": "triton", "dump": str(tmp_path)})
    with torch.no_grad(), be.recording() as records:
        assert_equivalent(model, compiled, {"input_ids": IDS}, grads=False)
    swaps = [s for r in records for s in r.swaps]
    assert swaps and all(s.startswith("inference ") and "_triton" in s for s in swaps)
    assert not any(r.fallbacks for r in records)
    gdir = tmp_path / json.loads((tmp_path / "index.json").read_text())["graphs"][0]["dir"]
    assert (gdir / "kernels" / "delta_gemm.py").read_text().count("@triton.jit") >= 1  # the Triton source used
    assert "s2ft_linear_triton" in (gdir / "inference.inductor.py").read_text()
    diff = (gdir / "inference_kernels.01_triton_kernels.diff").read_text()
    assert "+" in diff and "s2ft_linear_triton" in diff
    torch._dynamo.reset()
