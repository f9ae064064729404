"""Issue 13, second round: routed MoE patterns the catalog sweep found short (index_add_ write-back of routed
rows, dynamo fallback pieces compiled for a submodule's frame)."""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import sparsify_fx

_spec = importlib.util.spec_from_file_location("models", Path(__file__).parent / "models.py")
models = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("models", models)
_spec.loader.exec_module(models)


class IndexAddMoE(nn.Module):
    """Expert-choice routing (fixed capacity, so it exports): each expert's linear pair reads its top-C rows and
    writes them back with ``index_add_``; the heads of an attention-like projection go through the write-back."""

    def __init__(self, hidden: int = 16, inter: int = 12, experts: int = 3, capacity: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.up = nn.ModuleList(nn.Linear(hidden, inter) for _ in range(experts))
        self.down = nn.ModuleList(nn.Linear(inter, hidden) for _ in range(experts))
        self.proj = nn.Linear(hidden, inter, bias=False)  # its rows reach `out` only through index_add_
        self.out = nn.Linear(inter, hidden, bias=False)
        self.capacity = capacity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        scores = self.router(flat).softmax(-1)
        y = torch.zeros_like(flat)
        mixed = flat.new_zeros(flat.shape[0], self.proj.out_features)
        for e, (up, down) in enumerate(zip(self.up, self.down)):
            w, rows = scores[:, e].topk(self.capacity)
            h = down(torch.relu(up(flat[rows]))) * w[:, None]
            y = y.index_add(0, rows, h)
            mixed = mixed.index_add(0, rows, self.proj(flat[rows]))
        return (flat + y + self.out(mixed)).reshape(x.shape)


def test_index_add_pins_only_the_routed_rows():
    torch.manual_seed(0)
    model, x = IndexAddMoE(), torch.randn(2, 5, 16)
    report = sparsify_fx.analyze(model, (x,))
    by_member = {(m.fqn, m.dim): g for g in report.groups for m in g.members}
    for e in range(3):  # each expert's channels: its up rows and down columns, a group of its own
        g = by_member[(f"up.{e}.weight", 0)]
        assert {(m.fqn, m.dim) for m in g.members} == {(f"up.{e}.weight", 0), (f"up.{e}.bias", 0),
                                                       (f"down.{e}.weight", 1)}
    # the written-back feature dim stays free: proj's rows and out's columns are one group through index_add
    g = by_member[("proj.weight", 0)]
    assert ("out.weight", 1) in {(m.fqn, m.dim) for m in g.members}
    models.check_groups_are_symmetries(model, (x,), report)


class Child(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        if h.sum() > 0:  # data-dependent Python branch: export fails, dynamo breaks the graph inside this frame
            h = h * 2
        return self.fc2(h)


class Outer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Child()
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.inner(x))


def test_dynamo_pieces_of_a_submodule_frame_keep_full_fqns():
    torch.manual_seed(0)
    model, x = Outer(), torch.randn(3, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = sparsify_fx.analyze(model, (x,))
    assert any("dynamo" in str(w.message) for w in caught)
    members = {m.fqn for g in report.groups for m in g.members} | {m[0] for p in report.pinned for m in p.members}
    # fc2 runs in the piece resumed inside Child.forward, whose guards spell `fc2.weight`
    assert {"inner.fc1.weight", "inner.fc2.weight", "head.weight"} <= members
    assert "fc2.weight" not in members
    models.check_groups_are_symmetries(model, (x,), report)


if __name__ == "__main__":
    pytest.main([__file__, "-q"])


class InterleavedGLU(nn.Module):
    """GPT-OSS's gate/up layout: one projection whose even columns are the gate and odd ones the up."""

    def __init__(self, hidden: int = 16, inter: int = 12) -> None:
        super().__init__()
        self.gate_up = nn.Linear(hidden, 2 * inter)
        self.down = nn.Linear(inter, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.gate_up(x)
        gate, up = gu[..., ::2], gu[..., 1::2]
        return x + self.down(torch.nn.functional.silu(gate) * (up + 1))


def test_strided_slice_keeps_the_interleaved_channels():
    torch.manual_seed(0)
    model, x = InterleavedGLU(), torch.randn(2, 5, 16)
    report = sparsify_fx.analyze(model, (x,))
    g = next(g for g in report.groups if any(m.fqn == "down.weight" and m.dim == 1 for m in g.members))
    # one unit is a (gate, up) column pair of gate_up and one column of down
    assert g.num_units == 12
    assert {(m.fqn, m.dim) for m in g.members} == {("gate_up.weight", 0), ("gate_up.bias", 0), ("down.weight", 1)}
    models.check_groups_are_symmetries(model, (x,), report)


def gpt_oss(layers: int = 2, hidden: int = 64, inter: int = 32, experts: int = 4):
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=experts, num_experts_per_tok=2,
                       vocab_size=128, max_position_embeddings=128, layer_types=["full_attention"] * layers)
    return GptOssForCausalLM(cfg).eval()


def test_gpt_oss_experts_get_a_group_each_with_their_biases():
    torch.manual_seed(0)
    model = gpt_oss()
    with torch.no_grad():  # random expert biases, so a bias left behind by the permutation shows
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_()
    x = torch.randint(0, 128, (2, 8))
    report = sparsify_fx.analyze(model, (x,))
    for layer in range(2):
        prefix = f"model.layers.{layer}."
        experts = [g for g in report.groups if g.kind == "ffn_channels" and g.prefix.startswith(prefix)]
        assert sorted(g.expert for g in experts) == [0, 1, 2, 3]
        for g in experts:
            assert {m.fqn.rsplit(".", 1)[1] for m in g.members} == {"gate_up_proj", "gate_up_proj_bias", "down_proj"}
    models.check_groups_are_symmetries(model, (x,), report, tol=1e-5)


def test_s2ft_trains_gpt_oss_channels_inside_each_expert():
    torch.manual_seed(0)
    model = gpt_oss()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias"):
                p.normal_()
    x = torch.randint(0, 128, (2, 8))
    with torch.no_grad():
        ref = model(x).logits
    tuned = sparsify_fx.s2ft(model, (x,), sparsify_fx.S2FTConfig(ffn_ratio=0.25, seed=0))
    out = tuned(x).logits
    assert models.rel_err(out.detach(), ref) <= 1e-5  # co-permuted experts (biases included) compute the same
    out.square().mean().backward()
    blocks = {n: p for n, p in tuned.named_parameters() if p.requires_grad and ".experts." in n}
    # one block per expert and layer; 8 of 32 channels, each a (gate, up) column pair of gate_up_proj
    assert sorted(tuple(p.shape) for n, p in blocks.items() if "gate_up_proj" in n) == [(64, 16)] * 8
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blocks.values())
