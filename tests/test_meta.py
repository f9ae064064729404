"""Meta device (issue 12, item 6): a model built under ``torch.device("meta")`` gets the same coupling report and
the same S²FT plan as the same model with real weights, and tied weights are still found (by aliasing, not by
data address: every meta tensor has ``data_ptr() == 0``)."""

from __future__ import annotations

import models
import pytest
import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

import sparsify_fx
from sparsify_fx.errors import ConfigError
from sparsify_fx.frontend import tied_names, trace
from sparsify_fx.passes.s2ft import S2FTLinear, _linear_orientation, state_of

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
BUILDERS = {"llama": models.llama, "gpt2": models.gpt2, "bert": models.bert}


def _pair(name: str) -> tuple[nn.Module, nn.Module]:
    """The same config built on CPU (random weights, seed 0) and on meta."""
    torch.manual_seed(0)
    cpu = BUILDERS[name]()
    with torch.device("meta"):
        meta = BUILDERS[name]()
    assert all(p.is_meta for p in meta.parameters()) and not any(p.is_meta for p in cpu.parameters())
    return cpu, meta


def _groups(report) -> list[tuple]:
    return [
        (g.name, g.kind, g.num_units, g.unit_size, tuple((m.fqn, m.dim, m.size, m.role) for m in g.members))
        for g in report.groups
    ]


def _pinned(report) -> list[tuple]:
    return [(p.kind, p.size, tuple(p.members), tuple(p.reasons)) for p in report.pinned]


def _plan(model: nn.Module) -> tuple[list, list]:
    st = state_of(model)
    units = [(u.group.name, tuple(u.selected)) for u in st.units]
    slices = [(s.fqn, s.dim, s.start, s.length) for s in st.slices]
    return units, slices


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_meta_report_equals_cpu_report(name: str) -> None:
    cpu, meta = _pair(name)
    ref = sparsify_fx.analyze(cpu, (IDS,))
    assert ref.groups, "the CPU model must have groups for the comparison to mean anything"
    for ids in (IDS, IDS.to("meta")):  # a meta model's example inputs may be on CPU or on meta
        got = sparsify_fx.analyze(meta, (ids,))
        assert _groups(got) == _groups(ref)
        assert _pinned(got) == _pinned(ref)
        assert not any("do not factor" in r for p in got.pinned for r in p.reasons)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_meta_s2ft_plan_equals_cpu_plan(name: str) -> None:
    cpu, meta = _pair(name)

    def cfg() -> sparsify_fx.S2FTConfig:
        return sparsify_fx.S2FTConfig(attention_ratio=0.5, ffn_ratio=0.5, progress=False)

    sparsify_fx.s2ft(cpu, (IDS,), cfg())
    sparsify_fx.s2ft(meta, (IDS.to("meta"),), cfg())
    units, slices = _plan(cpu)
    assert units and slices
    assert _plan(meta) == (units, slices)
    swapped = {n: (m.transposed, m.param_dim, m.starts, m.lengths) for n, m in cpu.named_modules()
               if isinstance(m, S2FTLinear)}
    assert swapped == {n: (m.transposed, m.param_dim, m.starts, m.lengths) for n, m in meta.named_modules()
                       if isinstance(m, S2FTLinear)}
    # the trained blocks are meta too: nothing was materialised
    trained = [p for p in meta.parameters() if p.requires_grad]
    assert trained and all(p.is_meta for p in trained)
    assert sum(p.numel() for p in trained) == sum(p.numel() for p in cpu.parameters() if p.requires_grad)


def test_meta_s2ft_with_cpu_inputs_equals_meta_inputs() -> None:
    _, a = _pair("llama")
    _, b = _pair("llama")
    cfg = sparsify_fx.S2FTConfig(attention_ratio=0.5, ffn_ratio=0.5, progress=False)
    sparsify_fx.s2ft(a, (IDS,), cfg)
    sparsify_fx.s2ft(b, (IDS.to("meta"),), sparsify_fx.S2FTConfig(attention_ratio=0.5, ffn_ratio=0.5, progress=False))
    assert _plan(a) == _plan(b)


def test_gpt2_tied_embedding_recognised_on_meta() -> None:
    cpu, meta = _pair("gpt2")
    assert meta.lm_head.weight is meta.transformer.wte.weight
    tied = [["transformer.wte.weight", "lm_head.weight"]]
    assert trace(meta, (IDS,)).tied == tied
    assert trace(cpu, (IDS,)).tied == tied
    # the tie joins the embedding's columns with lm_head's (an untied alias would be an unread placeholder and drop
    # out of the report), and the vocab rows of both are pinned by the token-id lookup
    for model in (cpu, meta):
        report = sparsify_fx.analyze(model, (IDS,))
        hidden = [g for g in report.groups if ("lm_head.weight", 1) in [(m.fqn, m.dim) for m in g.members]]
        assert len(hidden) == 1 and hidden[0].kind == "hidden"
        assert ("transformer.wte.weight", 1) in [(m.fqn, m.dim) for m in hidden[0].members]
        vocab = [p for p in report.pinned if ("lm_head.weight", 0) in p.members]
        assert len(vocab) == 1 and ("transformer.wte.weight", 0) in vocab[0].members


def test_tied_names_by_alias_not_address() -> None:
    with torch.device("meta"):
        emb = nn.Embedding(8, 4)
        head = nn.Linear(4, 8, bias=False)
        other = nn.Linear(4, 8, bias=False)  # same shape, its own tensor: not tied
    head.weight = emb.weight
    shared = nn.Parameter(emb.weight.data)  # another Parameter over the same storage: one tensor for the analysis
    state = {"emb": emb.weight, "head": head.weight, "other": other.weight, "shared": shared, "n": 3}
    assert tied_names(state) == [["emb", "head", "shared"]]
    # zero-size tensors all have data_ptr() == 0 on CPU too; they are not one tensor
    assert tied_names({"a": torch.empty(0), "b": torch.empty(0)}) == []
    # a view at the same offset with another shape is not an alias of the whole
    w = torch.zeros(4, 4)
    assert tied_names({"w": w, "flat": w.view(16), "same": w}) == [["w", "same"]]


@pytest.mark.parametrize("in_dim", [1, None])
def test_orientation_on_meta_matches_cpu_for_linear(in_dim: int | None) -> None:
    lin = nn.Linear(6, 5)
    with torch.device("meta"):
        mlin = nn.Linear(6, 5)
    assert _linear_orientation(mlin, "fc.weight", in_dim) is _linear_orientation(lin, "fc.weight", in_dim) is False


def test_orientation_on_meta_matches_cpu_for_conv1d() -> None:
    conv = Conv1D(5, 6)  # weight [6, 5]: y = x @ W + b
    with torch.device("meta"):
        mconv = Conv1D(5, 6)
    assert _linear_orientation(mconv, "c.weight", 0) is _linear_orientation(conv, "c.weight", 0) is True
    # the analysis saying the other dim contracts the input contradicts the type: refused on both devices, also
    # where a square weight lets the module run
    sq = Conv1D(4, 4)
    with torch.device("meta"):
        msq = Conv1D(4, 4)
    for mod in (conv, mconv, sq, msq):
        with pytest.raises(ConfigError, match="plain linear map|cannot run"):
            _linear_orientation(mod, "c.weight", 1)
    for mod in (sq, msq):
        with pytest.raises(ConfigError, match="plain linear map"):
            _linear_orientation(mod, "c.weight", 1)


class _MatmulNoBias(nn.Module):
    """A custom linear x @ W (W [in, out]) that is neither nn.Linear nor Conv1D."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class _Pool(nn.Module):
    """Has a 2-D weight but maps [3, n] to [3, 1]: not a linear layer."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n, n + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.weight).sum(-1, keepdim=True)


def test_orientation_on_meta_custom_modules() -> None:
    with torch.device("meta"):
        mm = _MatmulNoBias(6, 5)
        square = _MatmulNoBias(4, 4)
        pool = _Pool(6)
    # the analysis' in_dim decides; the meta run checks the shape
    assert _linear_orientation(mm, "mm.weight", 0) is True
    with pytest.raises(ConfigError, match="plain linear map|cannot run"):
        _linear_orientation(mm, "mm.weight", 1)
    # square weight and no word from the analysis: no values to tell x @ W from x @ W.T
    with pytest.raises(ConfigError, match="meta device.*to_empty"):
        _linear_orientation(square, "sq.weight", None)
    assert _linear_orientation(square, "sq.weight", 0) is True
    with pytest.raises(ConfigError, match="plain linear map"):
        _linear_orientation(pool, "pool.weight", 0)


@pytest.mark.parametrize("run", [
    lambda m: sparsify_fx.s2ft(m, (IDS,), sparsify_fx.S2FTConfig(strategy="magnitude", progress=False)),
    lambda m: sparsify_fx.prune(m, (IDS,), sparsify_fx.PruneConfig(ratio=0.25, progress=False)),
    lambda m: sparsify_fx.sparsify(m, sparsify_fx.NMConfig(n=2, m=4, progress=False)),
], ids=["s2ft-magnitude", "prune", "sparsify"])
def test_passes_that_read_values_refuse_a_meta_model_with_the_fix(run) -> None:
    """Ranking by magnitude on meta would rank nothing (and prune's copy raised a raw NotImplementedError)."""
    _, meta = _pair("llama")
    before = {n: (type(m), m.training) for n, m in meta.named_modules()}
    with pytest.raises(ConfigError, match=r"meta device .*to_empty\(device='cpu'\)"):
        run(meta)
    assert {n: (type(m), m.training) for n, m in meta.named_modules()} == before
    assert not any(p.requires_grad is False for p in meta.parameters())


def test_meta_model_transformed_then_materialised_and_loaded_trains_like_cpu() -> None:
    """The large-model flow's first steps: plan on meta, materialise, load real weights, train; the result equals
    the same S²FT run on CPU (same seed, same plan)."""
    cpu, meta = _pair("llama")
    cfg = sparsify_fx.S2FTConfig(attention_ratio=0.5, ffn_ratio=0.25, progress=False)
    sparsify_fx.s2ft(meta, (IDS,), cfg)
    state = {k: v.clone() for k, v in cpu.state_dict().items()}
    sparsify_fx.s2ft(cpu, (IDS,), cfg)
    # the CPU base's weights, co-permuted the way the plan says: load them from the transformed CPU model
    meta.to_empty(device="cpu")
    meta.load_state_dict(cpu.state_dict())
    # non-persistent buffers (RoPE's inv_freq) are in no checkpoint: after to_empty they must be recomputed
    with torch.no_grad():
        for (name, b), (_, ref) in zip(meta.named_buffers(), cpu.named_buffers()):
            if name.endswith("inv_freq"):
                b.copy_(ref)
    with torch.no_grad():
        assert torch.equal(meta(IDS).logits, cpu(IDS).logits)
    for model in (cpu, meta):
        model.train()
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model(IDS, labels=IDS).loss.backward()
        opt.step()
    with torch.no_grad():
        assert torch.equal(meta(IDS).logits, cpu(IDS).logits)
    merged = sparsify_fx.merge(meta)
    assert set(merged.state_dict()) == set(state)
