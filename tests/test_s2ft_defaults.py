"""Issue 13: the default S2FTConfig works on every model it can analyse.

Each model is built small from its transformers config (random weights) and transformed with ``S2FTConfig()``:
the transform keeps outputs, one optimizer step changes only the trained blocks, and merge gives the plain model
back (bit for bit before training, the trained function after).
"""

from __future__ import annotations

import copy
import warnings

import models
import pytest
import torch
from models import output_tensor as _out
from models import rel_err
from torch import nn

import sparsify_fx
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes.s2ft import (
    FrozenWeightWarning,
    S2FTConfig,
    S2FTLinear,
    SubstitutedProjectionWarning,
    ZeroUnitsWarning,
    describe,
    merge,
    s2ft,
    state_of,
)

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
PIXELS = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _neox() -> nn.Module:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=128, max_position_embeddings=128)
    return GPTNeoXForCausalLM(cfg)


def _swinv2() -> nn.Module:
    from transformers import Swinv2Config, Swinv2Model

    cfg = Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4)
    return Swinv2Model(cfg)


def _funnel() -> nn.Module:
    from transformers import FunnelConfig, FunnelModel

    cfg = FunnelConfig(vocab_size=128, block_sizes=[1, 1], d_model=64, n_head=4, d_head=16, d_inner=128,
                       num_decoder_layers=1)
    return FunnelModel(cfg)


class _Chain(nn.Module):
    """A VGG/AlexNet-style classifier: Linear, ReLU, Linear, ReLU, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.classifier = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x)


def _loss(model: nn.Module, inputs: tuple) -> torch.Tensor:
    out = _out(model(*inputs))
    w = torch.linspace(-1, 1, out.shape[-1])
    return (out * w).pow(2).mean()


def _trained_index(mod: S2FTLinear) -> torch.Tensor:
    mask = torch.zeros(mod.weight.shape[mod.param_dim], dtype=torch.bool)
    for s, n in zip(mod.starts, mod.lengths):
        mask[s:s + n] = True
    return mask


def _default_roundtrip(make, inputs: tuple) -> tuple[nn.Module, list[warnings.WarningMessage]]:
    """s2ft with the default config, then the checks every model must pass; returns the trained model."""
    torch.manual_seed(0)
    base = make().eval()
    model = copy.deepcopy(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s2ft(model, inputs, S2FTConfig())
    with torch.no_grad():
        assert rel_err(_out(model(*inputs)), _out(base(*inputs))) <= 1e-5

    # merge before training is the base, bit for bit
    plain = merge(model)
    assert not any(isinstance(m, S2FTLinear) for m in plain.modules())
    ref = base.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in plain.state_dict().items())

    # one step changes only the trained blocks
    blocks = {id(b) for m in model.modules() if isinstance(m, S2FTLinear) for b in m.blocks}
    # by identity, not name: Swin's own modules are called "blocks" too
    before = {n: p.detach().clone() for n, p in model.named_parameters() if id(p) not in blocks}
    trained = [p for p in model.parameters() if p.requires_grad]
    assert trained, "the default config trains something"
    _loss(model, inputs).backward()
    assert all(p.grad is not None for p in trained)
    torch.optim.SGD(trained, lr=10.0).step()
    swapped = {name: mod for name, mod in model.named_modules() if isinstance(mod, S2FTLinear)}
    moved = 0
    for n, p in model.named_parameters():
        if n not in before:
            continue
        mod = swapped.get(n.rpartition(".")[0])
        if mod is None or p is not mod.weight:
            assert torch.equal(p, before[n]), f"{n} is frozen but changed"
            continue
        changed = (p.detach() != before[n]).movedim(mod.param_dim, 0).reshape(p.shape[mod.param_dim], -1).any(1)
        assert not (changed & ~_trained_index(mod)).any(), f"{n} changed outside its blocks"
        moved += int(changed.any())
    assert moved > 0

    # merge after training: the plain model computes what the trained one does
    with torch.no_grad():
        trained_out = _out(model(*inputs))
        assert rel_err(_out(merge(model)(*inputs)), trained_out) <= 1e-5
    return model, caught


def _messages(caught: list[warnings.WarningMessage], cls: type[Warning]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, cls)]


def test_gpt_neox_default_trains_v_rows_inside_the_fused_qkv_weight():
    model, caught = _default_roundtrip(_neox, (IDS,))
    assert not _messages(caught, SubstitutedProjectionWarning)
    st = state_of(model)
    for layer in model.gpt_neox.layers:
        qkv = layer.attention.query_key_value
        assert isinstance(qkv, S2FTLinear) and qkv.param_dim == 0
        # rows are [head][q|k|v][16]: one 16-row block per selected head, at v's offset 32 inside its 48 rows
        assert qkv.lengths == [16] * len(qkv.starts) and all(s % 48 == 32 for s in qkv.starts)
        assert isinstance(layer.attention.dense, S2FTLinear) and layer.attention.dense.param_dim == 1
    heads = [u for u in st.units if u.kind == "attention"]
    assert [len(u.selected) for u in heads] == [1, 1]  # 0.1 of 4 heads rounds to 0: min_units=1 trains one
    assert all(set(u.projections) == {"v", "o"} for u in heads)
    assert "inside the fused q/k/v weight" in describe(model)


def test_multi_query_default_trains_q_and_o_heads_and_says_so():
    model, caught = _default_roundtrip(lambda: models.mistral(kv_heads=1), (IDS,))
    (msg,) = _messages(caught, SubstitutedProjectionWarning)
    assert "multi-query" in msg and "q+o heads train in place of v+o" in msg
    heads = [u for u in state_of(model).units if u.kind == "attention"]
    assert len(heads) == 2 and all(set(u.projections) == {"q", "o"} for u in heads)
    assert "multi-query" in describe(model)
    # an explicit (v, o) other than the default spelling is still taken literally
    with pytest.raises(ConfigError, match=r"\['v'\] of kind 'attention' do not exist.*multi-query"):
        s2ft(models.mistral(kv_heads=1), (IDS,), S2FTConfig(attention=("o", "v")))


def test_default_ratios_select_one_unit_per_layer_of_four_heads():
    model, caught = _default_roundtrip(lambda: models.llama(heads=4, kv_heads=4), (IDS,))
    assert not _messages(caught, ZeroUnitsWarning)
    heads = [u for u in state_of(model).units if u.kind == "attention"]
    assert [len(u.selected) for u in heads] == [1, 1]  # round(0.1 * 4) = 0, lifted to min_units=1


def test_min_units_zero_keeps_the_zero_units_warning():
    model = models.llama(heads=4, kv_heads=4).eval()
    with pytest.warns(ZeroUnitsWarning, match=r"attention_ratio 0.1 selects 0 of 4 heads per layer"):
        s2ft(model, (IDS,), S2FTConfig(min_units=0))
    assert {u.kind for u in state_of(model).units} == {"ffn"}


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_min_units_is_validated(bad):
    with pytest.raises(ConfigError, match=r"min_units must be a non-negative int"):
        S2FTConfig(min_units=bad).validate()


def test_swinv2_backward_through_in_place_edits_of_the_output():
    model, _ = _default_roundtrip(_swinv2, (PIXELS,))
    assert any(isinstance(m, S2FTLinear) for m in model.modules())


def test_s2ft_linear_never_returns_a_view():
    # F.linear with a bias on a 3-D input returns a view of its addmm result; the op must return a fresh tensor
    w = torch.randn(6, 4)
    block = w.narrow(0, 2, 2).clone().requires_grad_(True)
    for x in (torch.randn(2, 3, 4), torch.randn(4), torch.randn(3, 4), torch.randn(2, 4, 3).transpose(1, 2)):
        for bias in (torch.randn(6), None):
            y = torch.ops.sparsify.s2ft_linear(x.requires_grad_(True), w, bias, [block], 0, [2])
            assert y._base is None
            ref = torch.nn.functional.linear(x, torch.cat([w[:2], block, w[4:]]), bias)
            assert torch.equal(y, ref)
            y.add_(1.0)  # what Swin V2 does to its attention output
            y.sum().backward()
            assert torch.equal(block.grad, torch.ones(*x.shape[:-1], 2).reshape(-1, 2).t() @ x.reshape(-1, 4))
            block.grad = None


def test_chained_linears_train_one_side_of_each_weight():
    model, _ = _default_roundtrip(_Chain, (torch.randn(4, 32, generator=torch.Generator().manual_seed(1)),))
    fc1, fc2, fc3 = (model.classifier[i] for i in (0, 2, 4))
    assert all(isinstance(m, S2FTLinear) for m in (fc1, fc2, fc3))
    # the middle weight consumes the first group and produces the second: it trains as the producer (rows)
    assert (fc1.param_dim, fc2.param_dim, fc3.param_dim) == (0, 0, 1)
    assert "trains on its output side" in describe(model)


def test_funnel_einsum_attention_trains_whole_heads():
    """Funnel's attention is an einsum of two activations: its heads are found like bmm attention's, so the
    default trains the v rows of whole selected heads (one block of 16-row heads), not channels inside heads."""
    model, _ = _default_roundtrip(_funnel, (IDS,))
    v = model.decoder.layers[0].attention.v_head
    assert isinstance(v, S2FTLinear)
    assert len(v.starts) == 1 and v.starts[0] == 0 and v.lengths[0] % 16 == 0 and v.lengths[0] > 0


class _TanhMix(nn.Module):
    """A layer with a 2-D weight that is not a plain linear map (tanh inside), like a quantised or gated linear."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d, d) / d**0.5)

    def forward(self, x):
        return torch.tanh(x @ self.weight.t())


class _TwoConsumerAttention(nn.Module):
    """Heads read by two consumers: the output projection and a non-linear mix (both are 'o' of the head group)."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.h = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.mix = _TanhMix(d)

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        y = torch.nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        y = y.transpose(1, 2).reshape(b, t, d)
        return self.o(y) + self.mix(y)


def test_a_weight_that_is_not_a_linear_map_stays_frozen_and_the_rest_trains():
    torch.manual_seed(0)
    model, x = _TwoConsumerAttention(), torch.randn(2, 5, 32)
    ref = model(x).detach()
    cfg = sparsify_fx.S2FTConfig(attention_ratio=0.5, progress=False)
    with pytest.warns(FrozenWeightWarning, match="mix.weight"):
        sparsify_fx.s2ft(model, (x,), cfg)
    assert isinstance(model.v, S2FTLinear) and isinstance(model.o, S2FTLinear)
    assert isinstance(model.mix, _TanhMix) and not model.mix.weight.requires_grad
    assert rel_err(model(x).detach(), ref) < 1e-5


class _NoOutputProjection(nn.Module):
    """Heads with q/k/v projections but no output projection of their own (JetMoE's o is an expert weight; here
    the heads are summed into the stream): the default ("v", "o") trains v and says o is missing."""

    def __init__(self, d: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.h = heads
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))

    def forward(self, x):
        b, t, d = x.shape
        split = lambda y: y.view(b, t, self.h, d // self.h).transpose(1, 2)  # noqa: E731
        y = torch.nn.functional.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return y.sum(1)  # heads summed: no o weight consumes them


def test_default_config_trains_the_default_projections_that_exist():
    torch.manual_seed(0)
    model, x = _NoOutputProjection(), torch.randn(2, 5, 32)
    ref = model(x).detach()
    with pytest.warns(SubstitutedProjectionWarning, match=r"\['o'\] missing"):
        sparsify_fx.s2ft(model, (x,), S2FTConfig(attention_ratio=0.5, progress=False))
    assert isinstance(model.v, S2FTLinear) and not isinstance(model.q, S2FTLinear)
    assert rel_err(model(x).detach(), ref) < 1e-5
    with pytest.raises(ConfigError, match="do not exist"):  # an explicit list is taken literally
        sparsify_fx.s2ft(_NoOutputProjection(), (x,), S2FTConfig(attention=("v", "o", "q"), progress=False))


def _bart() -> nn.Module:
    from transformers import BartConfig, BartModel

    cfg = BartConfig(vocab_size=128, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=32)
    torch.manual_seed(0)
    return BartModel(cfg).eval()


def test_every_attention_of_a_layer_index_trains_encoder_decoder_self_and_cross():
    # one layer index holds three attentions here (encoder self, decoder self, decoder cross): each trains its
    # heads. Before, one head group per layer index was taken, so only the decoder's cross-attention trained
    model = _bart()
    inputs = {"input_ids": IDS, "decoder_input_ids": IDS}
    ref = model(**inputs).last_hidden_state
    tuned = s2ft(copy.deepcopy(model), inputs, S2FTConfig(ffn=()))
    assert rel_err(tuned(**inputs).last_hidden_state, ref) <= 1e-5
    trained = {n.rsplit(".", 3)[0] for n, p in tuned.named_parameters() if p.requires_grad}
    expected = {f"{side}.layers.{i}.{attn}" for i in range(2)
                for side, attn in (("encoder", "self_attn"), ("decoder", "self_attn"), ("decoder", "encoder_attn"))}
    assert trained == expected, sorted(trained)


def test_every_stage_of_a_multi_stage_vision_model_trains_its_heads():
    from transformers import SegformerConfig, SegformerModel

    cfg = SegformerConfig(num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16],
                          patch_sizes=[3, 3], strides=[2, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2])
    torch.manual_seed(0)
    model = SegformerModel(cfg).eval()
    tuned = s2ft(copy.deepcopy(model), (PIXELS,), S2FTConfig(ffn=()))
    assert rel_err(tuned(PIXELS).last_hidden_state, model(PIXELS).last_hidden_state) <= 1e-5
    trained = {n.split(".attention.")[0] for n, p in tuned.named_parameters() if p.requires_grad}
    assert trained == {"stages.0.blocks.0", "stages.1.blocks.0"}, sorted(trained)
