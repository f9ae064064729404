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
