"""Mixture-of-experts FFNs: the grouped-GEMM and histc rules, one channel group per expert of stacked expert
weights (proved per expert), and what s2ft and prune do with them. Tiny Mixtral and Qwen2-MoE from configs."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn as nn

import sparsify_fx
from sparsify_fx.analysis.moe import GROUPED_MM_CUSTOM

E, HIDDEN, INTER = 4, 64, 32


def mixtral(heads: int = 8, kv_heads: int = 8):
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=2, num_attention_heads=heads,
                        num_key_value_heads=kv_heads, vocab_size=128, num_local_experts=E, num_experts_per_tok=2,
                        max_position_embeddings=128)
    return MixtralForCausalLM(cfg).eval()


def qwen2_moe(heads: int = 8, kv_heads: int = 8):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    cfg = Qwen2MoeConfig(hidden_size=HIDDEN, intermediate_size=64, moe_intermediate_size=INTER,
                         shared_expert_intermediate_size=48, num_hidden_layers=2, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=128, num_experts=E, num_experts_per_tok=2,
                         max_position_embeddings=128, decoder_sparse_step=1, mlp_only_layers=[])
    return Qwen2MoeForCausalLM(cfg).eval()


BUILDERS = {"mixtral": mixtral, "qwen2_moe": qwen2_moe}


def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def eager_experts(model: nn.Module) -> nn.Module:
    # torch._grouped_mm has no float64 CPU kernel; the per-expert loop computes the same function
    model.config._experts_implementation = "eager"
    return model


@pytest.fixture(params=sorted(BUILDERS))
def arch(request):
    torch.manual_seed(0)
    return request.param, BUILDERS[request.param]()


def expert_groups(report):
    return [g for g in report.groups if g.expert is not None]


def test_grouped_gemm_and_histc_have_rules(arch):
    _, model = arch
    report = sparsify_fx.analyze(model, (ids(),))
    assert not any("histc" in k or "grouped_mm" in k for k in report.unruled_ops), report.unruled_ops
    assert all(name.startswith("transformers::") for name in GROUPED_MM_CUSTOM)


def test_one_group_per_layer_and_expert(arch):
    name, model = arch
    report = sparsify_fx.analyze(model, (ids(),))
    found = {(g.layer, g.expert) for g in expert_groups(report)}
    assert found == {(layer, e) for layer in range(2) for e in range(E)}
    for g in expert_groups(report):
        assert g.kind == "ffn_channels" and g.num_units == INTER and g.unit_size == 1
        fqns = {m.fqn.rsplit(".", 1)[-1]: m for m in g.members}
        assert set(fqns) == {"gate_up_proj", "down_proj"} and all(m.expert == g.expert for m in g.members)
        # gate and up halves of the fused weight, and the down weight's contracted dim
        assert len(fqns["gate_up_proj"].occurrences) == 2 and fqns["gate_up_proj"].role == "out"
        assert fqns["down_proj"].role == "in"
    # the router's expert dim stays pinned (top-k reads its order); a shared expert is a group of its own
    assert any(f.endswith("mlp.gate.weight") for p in report.pinned for f, _ in p.members)
    shared = [g for g in report.groups if "shared_expert" in g.prefix and g.kind == "ffn_channels"]
    assert len(shared) == (2 if name == "qwen2_moe" else 0)
    assert all(g.expert is None and g.num_units == 48 for g in shared)


def test_each_expert_permutes_on_its_own_float64(arch):
    _, model = arch
    model = model.double()
    x = ids()
    report = sparsify_fx.analyze(model, (x,))
    eager_experts(model)
    ref = logits(model, x)
    gen = torch.Generator().manual_seed(1)
    for g in expert_groups(report):
        sparsify_fx.permute(model, g, torch.randperm(g.num_units, generator=gen))
    out = logits(model, x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-12


def test_expert_permutations_differ_per_expert_and_a_wrong_one_breaks(arch):
    """The permutation really is per slice (experts differ), and the test can fail: moving only expert 1's
    gate/up rows without its down columns changes the output."""
    _, model = arch
    model = model.double()
    x = ids()
    report = sparsify_fx.analyze(model, (x,))
    eager_experts(model)
    ref = logits(model, x)
    g = next(g for g in expert_groups(report) if g.layer == 0 and g.expert == 1)
    before = model.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    perm = torch.roll(torch.arange(g.num_units), 1)
    sparsify_fx.permute(model, g, perm)
    after = model.model.layers[0].mlp.experts.gate_up_proj.detach()
    assert [torch.equal(before[e], after[e]) for e in range(E)] == [True, False, True, True]
    assert ((logits(model, x) - ref).norm() / ref.norm()).item() < 1e-12
    broken = dataclasses.replace(g, members=[m for m in g.members if m.fqn.endswith("gate_up_proj")])
    sparsify_fx.permute(model, broken, perm)
    assert ((logits(model, x) - ref).norm() / ref.norm()).item() > 1e-3


def test_row_mixing_use_of_expert_channels_keeps_one_shared_group():
    """If an expert activation is reduced over routed rows, a per-expert permutation is no longer exact: the
    proof falls back to one permutation for all experts (still a group), never a per-expert one."""
    from transformers.integrations.moe import _grouped_mm_fallback  # noqa: F401  (registers the custom op)

    class Leaky(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.Parameter(torch.randn(E, 8, 6, dtype=torch.float64))
            self.down = nn.Parameter(torch.randn(E, 6, 8, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            offs = torch.tensor([2, 4, 6, 8], dtype=torch.int32)
            h = torch.ops.transformers.grouped_mm_fallback(x, self.up, offs)
            h = h - h.mean(0, keepdim=True)  # mixes rows routed to different experts
            return torch.ops.transformers.grouped_mm_fallback(torch.relu(h), self.down, offs)

    model = Leaky()
    x = torch.randn(8, 8, dtype=torch.float64)
    report = sparsify_fx.analyze(model, (x,))
    assert not expert_groups(report)
    channels = [g for g in report.groups if g.num_units == 6]
    assert len(channels) == 1 and {m.fqn for m in channels[0].members} == {"up", "down"}
    ref = model(x)
    sparsify_fx.permute(model, channels[0], torch.randperm(6))
    assert ((model(x) - ref).norm() / ref.norm()).item() < 1e-12


def test_s2ft_default_trains_attention_and_shared_experts_leaves_stacked_experts_frozen(arch):
    name, model = arch
    x = ids()
    ref = logits(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = sparsify_fx.s2ft(model, (x,))
    assert any("stacked 3-D expert weights" in str(w.message) for w in caught)
    assert torch.equal(logits(tuned, x), ref) or ((logits(tuned, x) - ref).norm() / ref.norm()).item() < 1e-6
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable and not any("experts." in n for n in trainable)
    assert any("self_attn" in n for n in trainable)
    assert any("shared_expert" in n for n in trainable) == (name == "qwen2_moe")
    loss = tuned(x, labels=x).loss
    loss.backward()
    assert all(p.grad is None for n, p in tuned.named_parameters() if "experts." in n)


def test_prune_quarter_of_every_expert(arch):
    _, model = arch
    x = ids()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = sparsify_fx.prune(model, (x,), sparsify_fx.PruneConfig(ratio=0.25))
    for layer in small.model.layers:
        assert tuple(layer.mlp.experts.gate_up_proj.shape) == (E, 2 * 24, HIDDEN)
        assert tuple(layer.mlp.experts.down_proj.shape) == (E, HIDDEN, 24)
    out = logits(small, x)
    assert out.shape == (2, 9, 128) and torch.isfinite(out).all()
