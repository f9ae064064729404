"""Mixture-of-experts FFNs: the grouped-GEMM and histc rules, one channel group per expert of stacked expert
weights (proved per expert), and what s2ft and prune do with them. Tiny Mixtral and Qwen2-MoE from configs."""

from __future__ import annotations

import copy
import dataclasses
import warnings

import pytest
import torch
import torch.nn as nn

import sparsify_fx
from sparsify_fx.analysis.moe import GROUPED_MM_CUSTOM
from sparsify_fx.passes.s2ft import ExpertsSkippedWarning

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


def analysed_float64(arch):
    """The arch's model in float64 (so a wrong permutation shows far above rounding), an input, its report, and its
    logits with the experts run eagerly, as permutation tests compare them."""
    _, model = arch
    model = model.double()
    x = ids()
    report = sparsify_fx.analyze(model, (x,))
    eager_experts(model)
    return model, x, report, logits(model, x)


def test_each_expert_permutes_on_its_own_float64(arch):
    model, x, report, ref = analysed_float64(arch)
    gen = torch.Generator().manual_seed(1)
    for g in expert_groups(report):
        sparsify_fx.permute(model, g, torch.randperm(g.num_units, generator=gen))
    out = logits(model, x)
    assert ((out - ref).norm() / ref.norm()).item() < 1e-12


def test_expert_permutations_differ_per_expert_and_a_wrong_one_breaks(arch):
    """The permutation really is per slice (experts differ), and the test can fail: moving only expert 1's
    gate/up rows without its down columns changes the output."""
    model, x, report, ref = analysed_float64(arch)
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


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def expert_units(model: nn.Module):
    from sparsify_fx.passes.s2ft import state_of

    return [u for u in state_of(model).units if u.group.expert is not None]


def stacked(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))
            and ".experts." in n}


def trained_mask(name: str, shape: tuple[int, ...], selected: dict[tuple[int, int], list[int]], layer: int,
                 inter: int) -> torch.Tensor:
    """Where the experts of ``layer`` train in stacked weight ``name`` (original coordinates): the up rows and down
    columns of each expert's selected channels."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for (lay, e), sel in selected.items():
        if lay != layer:
            continue
        idx = torch.tensor(sel)
        if name.endswith("gate_up_proj"):
            mask[e, inter + idx, :] = True  # the up half; the gate half stays frozen (default ffn=("up", "down"))
        else:
            mask[e, :, idx] = True
    return mask


def test_s2ft_default_trains_channels_inside_each_expert(arch):
    name, model = arch
    x = ids()
    ref = logits(model, x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tuned = sparsify_fx.s2ft(model, (x,))
    assert not [w for w in caught if issubclass(w.category, ExpertsSkippedWarning)]
    # the forward is the experts' own, on the same values (only the down weights' memory layout changed)
    assert rel(logits(tuned, x), ref) < 1e-6
    units = expert_units(tuned)
    assert {(u.group.layer, u.group.expert) for u in units} == {(layer, e) for layer in range(2) for e in range(E)}
    # ffn_ratio 0.1 of 32 channels per expert: 3 each, chosen per expert (not one draw for all of them)
    assert all(len(u.selected) == 3 for u in units)
    assert len({tuple(u.selected) for u in units}) > 1
    trainable = {n for n, p in tuned.named_parameters() if p.requires_grad}
    assert any("self_attn" in n for n in trainable)
    assert any("shared_expert." in n for n in trainable) == (name == "qwen2_moe")
    experts = tuned.model.layers[0].mlp.experts
    assert type(experts).__name__.startswith("S2FT") and isinstance(experts, type(model.model.layers[1].mlp.experts))
    for w in ("gate_up_proj", "down_proj"):
        blocks = list(experts.blocks[w])
        assert len(blocks) == E and all(b.requires_grad for b in blocks)
        weight = experts._parameters[w]
        assert not weight.requires_grad
        for b in blocks:  # views of the frozen stacked weight, each one dense span (fused optimizers)
            assert b.untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
            assert b.is_contiguous() or b.t().is_contiguous()
    tuned(x, labels=x).loss.backward()
    grads = {n: p.grad for n, p in tuned.named_parameters()}
    assert all(grads[n] is None for n in grads if n.endswith(("experts.gate_up_proj", "experts.down_proj")))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".experts.blocks." in n)
    text = sparsify_fx.describe(tuned)
    assert "ffn_channels[expert 3]" in text and "up+down" in text


def test_fused_adamw_step_changes_only_the_selected_expert_blocks_and_merge_restores(arch):
    """One fused AdamW step on the S²FT model, merged back: in original coordinates every stacked-weight value
    outside the selected experts' up rows / down columns is bit-identical, those change, and the merged model
    (original class, row-major weights, no blocks) computes what the trained one does."""
    _, model = arch
    x = ids()
    before = stacked(model)
    names = [n for n, _ in model.named_parameters()]
    cls = type(model.model.layers[0].mlp.experts)
    tuned = sparsify_fx.s2ft(model, (x,))
    selected = {(u.group.layer, u.group.expert): u.selected for u in expert_units(tuned)}
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2, fused=True)
    tuned.train()
    tuned(x, labels=x).loss.backward()
    opt.step()
    tuned.eval()
    trained = logits(tuned, x)
    merged = sparsify_fx.merge(tuned)
    assert [n for n, _ in merged.named_parameters()] == names
    for layer_idx, layer in enumerate(merged.model.layers):
        experts = layer.mlp.experts
        assert type(experts) is cls and not hasattr(experts, "blocks") and "_s2ft_experts" not in experts.__dict__
        for w in ("gate_up_proj", "down_proj"):
            fqn = f"model.layers.{layer_idx}.mlp.experts.{w}"
            after = getattr(experts, w).detach()
            assert after.is_contiguous() and isinstance(getattr(experts, w), nn.Parameter)
            mask = trained_mask(w, tuple(after.shape), selected, layer_idx, INTER)
            assert torch.equal(after[~mask], before[fqn][~mask])
            # every expert's trained block moved (Adam's first step moves every element with a gradient)
            for e in range(E):
                assert not torch.equal(after[e][mask[e]], before[fqn][e][mask[e]])
    assert rel(logits(merged, x), trained) < 1e-5


def test_expert_block_gradients_are_the_full_gradient_at_their_positions(arch):
    """One SGD step on the S²FT model moves each selected expert channel by exactly -lr x the full fine-tuning
    gradient there (a wrong expert's or position's gradient fails this), and nothing else in the stacked weights."""
    _, model = arch
    x = ids()
    twin = copy.deepcopy(model)
    twin(x, labels=x).loss.backward()
    full = {n: p.grad.clone() for n, p in twin.named_parameters() if n.endswith(("gate_up_proj", "down_proj"))
            and ".experts." in n}
    before = stacked(model)
    tuned = sparsify_fx.s2ft(model, (x,))
    selected = {(u.group.layer, u.group.expert): u.selected for u in expert_units(tuned)}
    lr = 0.5
    opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=lr)
    tuned(x, labels=x).loss.backward()
    opt.step()
    after = stacked(sparsify_fx.merge(tuned))
    assert after.keys() == full.keys()
    for fqn, g in full.items():
        layer = int(fqn.split(".")[2])
        mask = trained_mask(fqn, tuple(g.shape), selected, layer, INTER)
        expected = torch.where(mask, before[fqn] - lr * g, before[fqn])
        assert torch.allclose(after[fqn], expected, rtol=0, atol=1e-6), fqn
        assert (g[mask].abs() > 0).any()


def test_separate_layout_trains_like_view(arch):
    _, model = arch
    x = ids()
    twin = copy.deepcopy(model)
    outs = []
    for m, layout in ((model, "view"), (twin, "separate")):
        tuned = sparsify_fx.s2ft(m, (x,), sparsify_fx.S2FTConfig(layout=layout))
        opt = torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.5)
        tuned(x, labels=x).loss.backward()
        opt.step()
        outs.append(logits(sparsify_fx.merge(tuned), x))
    assert rel(outs[1], outs[0]) < 1e-5


def test_adapter_round_trip_on_a_plain_base(arch, tmp_path):
    _, model = arch
    x = ids()
    base = copy.deepcopy(model)
    original = {k: v.clone() for k, v in base.state_dict().items()}
    tuned = sparsify_fx.s2ft(model, (x,))
    opt = torch.optim.AdamW([p for p in tuned.parameters() if p.requires_grad], lr=1e-2)
    tuned(x, labels=x).loss.backward()
    opt.step()
    merged = sparsify_fx.merge(tuned)
    adapter = sparsify_fx.export_adapter(tuned)
    adapter.save(tmp_path / "moe.safetensors")
    loaded = sparsify_fx.load_adapter(tmp_path / "moe.safetensors")
    # per-expert slices: one entry per stacked weight, the union of the experts' positions along the channel dim
    entry = loaded.entries["model.layers.0.mlp.experts.down_proj"]
    assert entry.dim == 2 and tuple(entry.delta.shape[:2]) == (E, HIDDEN)
    sparsify_fx.apply_adapter(base, loaded)
    assert rel(logits(base, x), logits(merged, x)) < 1e-5
    merged_sd = merged.state_dict()
    for k, v in base.state_dict().items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):
            untouched = torch.eq(merged_sd[k], original[k])
            assert torch.equal(v[untouched], original[k][untouched])  # zero deltas leave other experts' values
            assert torch.allclose(v, merged_sd[k], rtol=0, atol=1e-6)
    sparsify_fx.remove_adapter(base)
    assert all(torch.equal(original[k], v) for k, v in base.state_dict().items())


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


def test_prune_removes_each_experts_own_weakest_channels(arch):
    """Expert e's channels [8e, 8e + 8) are planted weak (gate/up rows and down columns scaled by 1e-3) in every
    layer: a per-expert magnitude score removes exactly those from expert e, so each expert loses different
    indices, the stacked tensors keep one width, and what each expert keeps is its original values, bit for bit."""
    name, model = arch
    x = ids()
    weak = {e: torch.arange(8 * e, 8 * e + 8) for e in range(E)}
    with torch.no_grad():
        for layer in model.model.layers:
            ex = layer.mlp.experts
            for e, idx in weak.items():
                ex.gate_up_proj[e, idx] *= 1e-3
                ex.gate_up_proj[e, INTER + idx] *= 1e-3
                ex.down_proj[e][:, idx] *= 1e-3
    before = stacked(model)
    ref = logits(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = sparsify_fx.prune(model, (x,), sparsify_fx.PruneConfig(ratio={"ffn_channels": 0.25}))
    for i, layer in enumerate(small.model.layers):
        ex = layer.mlp.experts
        assert tuple(ex.gate_up_proj.shape) == (E, 48, HIDDEN) and tuple(ex.down_proj.shape) == (E, HIDDEN, 24)
        for e in range(E):
            keep = torch.tensor([c for c in range(INTER) if c not in set(weak[e].tolist())])
            gate_up = before[f"model.layers.{i}.mlp.experts.gate_up_proj"][e]
            down = before[f"model.layers.{i}.mlp.experts.down_proj"][e]
            assert torch.equal(ex.gate_up_proj[e], torch.cat([gate_up[keep], gate_up[INTER + keep]]))
            assert torch.equal(ex.down_proj[e], down[:, keep])
    if name == "mixtral":  # only the planted channels' (tiny) contributions are gone (Qwen2-MoE's shared expert
        # loses channels too; prune's own check compares with those removed units zeroed)
        assert rel(logits(small, x), ref) < 1e-3


def test_prune_global_scope_that_would_unbalance_experts_is_refused_unchanged(arch):
    """A global ranking can take more channels from one expert than from another; a stacked tensor cannot hold
    that, so prune refuses before writing, naming the per-expert widths."""
    _, model = arch
    x = ids()
    with torch.no_grad():  # expert 0 of every layer is weak everywhere: a global ranking takes its channels first
        for layer in model.model.layers:
            layer.mlp.experts.gate_up_proj[0] *= 1e-3
            layer.mlp.experts.down_proj[0] *= 1e-3
    snap = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(sparsify_fx.errors.ConfigError, match="same non-zero number"):
        sparsify_fx.prune(model, (x,), sparsify_fx.PruneConfig(ratio={"ffn_channels": 0.25}, scope="global"))
    assert all(torch.equal(snap[k], v) for k, v in model.state_dict().items())


def test_failed_s2ft_and_merge_leave_the_moe_model_bit_identical():
    """Fault injection at the journaled writes that make the experts trainable (the last ones of s2ft: layout,
    class, blocks, state) and at every write of an in-place merge: each failure rolls the model back exactly."""
    from sparsify_fx.testing import InjectedFault, assert_unchanged, count_writes, fail_at_write, model_snapshot

    torch.manual_seed(0)
    model, x = mixtral(), ids()
    before = model_snapshot(model)
    with count_writes() as n:
        sparsify_fx.s2ft(copy.deepcopy(model), (x,))
    for k in range(n[0] - 6, n[0]):
        with fail_at_write(k), pytest.raises(InjectedFault):
            sparsify_fx.s2ft(model, (x,))
        assert_unchanged(model, before)
    tuned = sparsify_fx.s2ft(model, (x,))
    torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.1).zero_grad()
    tuned(x, labels=x).loss.backward()
    torch.optim.SGD([p for p in tuned.parameters() if p.requires_grad], lr=0.1).step()
    trained = model_snapshot(tuned)
    reference = logits(sparsify_fx.merge(tuned), x)
    k = 0
    while True:
        with fail_at_write(k) as seen:
            try:
                sparsify_fx.merge(tuned, inplace=True)
            except InjectedFault:
                pass
            else:
                break
        assert_unchanged(tuned, trained)
        k += 1
    assert k > 10 and seen[0] == k
    assert torch.equal(logits(tuned, x), reference)
