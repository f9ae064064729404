"""Vision and conv families (issue 13, item 3): ResNet, ConvNeXt, MobileNetV2, ViT and a hand-written block with
depthwise and grouped convolutions, squeeze-excitation and layer scale get their channel and head groups; S²FT with
the default config trains conv channels (S2FTConv); prune shrinks grouped convolutions evenly per group."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from models import output_tensor as _out
from models import rel_err

import sparsify_fx
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes import permute
from sparsify_fx.passes.s2ft_conv import S2FTConv

TOL = 1e-5


class SEBlock(nn.Module):
    """Inverted residual with a depthwise conv, squeeze-excitation, a grouped conv and a layer-scale residual."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.expand, self.bn1 = nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32)
        self.dw, self.bn2 = nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.BatchNorm2d(32)
        self.se_fc1, self.se_fc2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.grouped, self.bn3 = nn.Conv2d(32, 32, 3, padding=1, groups=4), nn.BatchNorm2d(32)
        self.reduce, self.bn4 = nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16)
        self.gamma = nn.Parameter(torch.full((16,), 0.1))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        h = F.relu6(self.bn1(self.expand(x)))
        h = F.relu6(self.bn2(self.dw(h)))
        h = h * torch.sigmoid(self.se_fc2(F.relu(self.se_fc1(F.adaptive_avg_pool2d(h, 1)))))
        h = F.relu(self.bn3(self.grouped(h)))
        x = x + self.gamma[:, None, None] * self.bn4(self.reduce(h))
        return self.head(x.mean((2, 3)))


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def _make(name: str) -> tuple[nn.Module, torch.Tensor]:
    import transformers as T

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    if name == "resnet":
        m = T.ResNetModel(T.ResNetConfig(embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                                         layer_type="bottleneck"))
    elif name == "convnext":
        m = T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2))
    elif name == "mobilenet_v2":
        m = T.MobileNetV2Model(T.MobileNetV2Config(image_size=32, depth_multiplier=0.25, min_depth=8))
    elif name == "vit":
        m = T.ViTModel(T.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=128, image_size=16, patch_size=8))
        x = torch.randn(2, 3, 16, 16)
    else:
        m = SEBlock()
    with torch.no_grad():
        _randomize_bn(m)
    return m.eval(), x


def _weights_in(g, role: str) -> set[str]:
    """Weights that produce (``out``) or consume (``in``) the group's channels."""
    return {m.fqn for m in g.members if m.role == role and not m.is_buffer}


@pytest.mark.parametrize("name", ["resnet", "convnext", "mobilenet_v2", "vit", "se_block"])
def test_groups_found_and_each_is_a_symmetry(name: str) -> None:
    model, x = _make(name)
    rep = sparsify_fx.analyze(model, (x,))
    assert not rep.unruled_ops, rep.unruled_ops
    conv = rep.by_kind("conv_channels")
    if name == "resnet":
        # every bottleneck's two inner channel spaces, through their BatchNorm (running stats included)
        assert len(conv) == 4, rep.table()
        for g in conv:
            fqns = {m.fqn for m in g.members}
            assert any(f.endswith("normalization.running_var") for f in fqns), g
            assert len(_weights_in(g, "out")) == 1 and len(_weights_in(g, "in")) == 1, g
    elif name == "mobilenet_v2":
        # expand rows, the depthwise conv's channels and the reduce conv's columns move together
        expanded = [g for g in conv if any(f.endswith("conv_3x3.convolution.weight") for f in _weights_in(g, "out"))
                    and any(f.endswith("reduce_1x1.convolution.weight") for f in _weights_in(g, "in"))]
        assert len(expanded) == 17, rep.table()
    elif name == "convnext":
        assert len(rep.by_kind("ffn_channels")) == 2, rep.table()
    elif name == "vit":
        assert len(rep.by_kind("attention_heads")) == 2 and len(rep.by_kind("ffn_channels")) == 2, rep.table()
    else:
        grouped = next(g for g in conv if "grouped.weight" in _weights_in(g, "out"))
        occ = next(m for m in grouped.members if m.fqn == "grouped.weight").occurrences[0]
        assert (grouped.num_units, occ.offsets) == (8, (0, 8, 16, 24))  # a position inside each of the 4 groups
        assert any(_weights_in(g, "out") == {"se_fc1.weight"} for g in conv), rep.table()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref = _out(model(x))
    for grp in rep.groups:
        m2 = copy.deepcopy(model)
        perm = torch.randperm(grp.num_units, generator=g)
        permute(m2, grp, perm)
        with torch.no_grad():
            assert rel_err(_out(m2(x)), ref) <= TOL, f"{grp.name} ({grp.kind}) changed the output"


# ---------------------------------------------------------------------- S2FTConv against the plain conv
@pytest.mark.parametrize("groups,dim,starts,lengths", [
    (1, 0, [0, 5], [2, 3]), (1, 1, [1], [3]), (4, 0, [0], [4]), (4, 0, [1], [2]), (4, 0, [3], [3]),
    (4, 1, [0], [1]), (8, 0, [2], [3]),
])
@pytest.mark.parametrize("layout", ["view", "separate"])
def test_s2ft_conv_forward_is_the_conv_and_grads_are_the_blocks(groups, dim, starts, lengths, layout) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1, stride=2, groups=groups).double()
    ref = copy.deepcopy(conv)
    if dim == 1:
        conv.weight.data = conv.weight.data.movedim(1, 0).contiguous().movedim(0, 1)
    m = S2FTConv(conv, conv.weight, conv.bias, False, dim, starts, lengths, layout)
    x1 = torch.randn(2, 8, 9, 9, dtype=torch.double, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    y1, y2 = m(x1), ref(x2)
    assert torch.equal(y1, y2)
    gy = torch.randn_like(y1)
    y1.backward(gy)
    y2.backward(gy)
    torch.testing.assert_close(x1.grad, x2.grad)
    assert m.weight.grad is None
    for s, n, b in zip(starts, lengths, m.blocks):
        torch.testing.assert_close(b.grad, ref.weight.grad.narrow(dim, s, n))


def test_s2ft_conv_refuses_gapped_view_blocks() -> None:
    conv = nn.Conv2d(4, 4, 3)
    with pytest.raises(ConfigError, match="gaps"):
        S2FTConv(conv, conv.weight, conv.bias, False, 1, [0], [2], "view")


# ---------------------------------------------------------------------- s2ft with defaults on a conv net
def _trained_mask(adapter, fqn: str, shape: tuple[int, ...]) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    e = adapter.entries.get(fqn)
    if e is not None:
        mask.index_fill_(e.dim, e.index, True)
    return mask


def test_s2ft_defaults_train_conv_channels_on_resnet() -> None:
    model, x = _make("resnet")
    base = copy.deepcopy(model)
    with torch.no_grad():
        ref = model(x).last_hidden_state
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a conv net has no attention to warn about
        sparsify_fx.s2ft(model, (x,))
    convs = [m for m in model.modules() if isinstance(m, S2FTConv)]
    assert {c.param_dim for c in convs} == {0, 1} and len(convs) == 6
    text = sparsify_fx.describe(model)
    assert "conv_channels" in text and "trains on its output side" in text
    with torch.no_grad():
        assert rel_err(model(x).last_hidden_state, ref) <= TOL  # co-permuted, not changed
        # merged before training: the original model, bit for bit
        for (n, a), b in zip(sparsify_fx.merge(model).state_dict().items(), base.state_dict().values()):
            assert torch.equal(a, b), n
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(any(p is b for c in convs for b in c.blocks) for p in trainable)
    opt = torch.optim.AdamW(trainable, lr=1e-2, fused=True)
    model(x).last_hidden_state.pow(2).mean().backward()  # eval mode: BatchNorm statistics stay as they were
    opt.step()
    adapter = sparsify_fx.export_adapter(model)
    assert len(adapter.entries) == 6
    merged = sparsify_fx.merge(model)
    with torch.no_grad():
        torch.testing.assert_close(merged(x).last_hidden_state, model(x).last_hidden_state, rtol=1e-5, atol=1e-6)
    changed = 0
    for (n, a), b in zip(merged.state_dict().items(), base.state_dict().values()):
        mask = _trained_mask(adapter, n, tuple(a.shape))
        assert torch.equal(a[~mask], b[~mask]), f"{n} changed outside its trained channels (fused AdamW)"
        changed += int((a[mask] != b[mask]).sum())
    assert changed > 0
    # the adapter switches a plain base to the trained weights and back, bit for bit
    sparsify_fx.apply_adapter(base, adapter)
    for (n, a), b in zip(base.state_dict().items(), merged.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
    sparsify_fx.remove_adapter(base)
    plain, _ = _make("resnet")
    for (n, a), b in zip(base.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), n


def test_s2ft_grouped_and_depthwise_blocks_train_on_se_block() -> None:
    model, x = _make("se_block")
    sparsify_fx.s2ft(model, (x,), sparsify_fx.S2FTConfig(conv_ratio=0.25, layout="view"))
    swapped = {n: m for n, m in model.named_modules() if isinstance(m, S2FTConv)}
    # the grouped conv trains the same 2 of 8 output channels in each of its 4 groups: one block per group
    assert swapped["grouped"].starts == [0, 8, 16, 24] and swapped["grouped"].lengths == [2] * 4
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(x).pow(2).mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        if not p.requires_grad and ".blocks." not in n:
            trained = {(mn, s, ln) for mn, m in swapped.items() for s, ln in zip(m.starts, m.lengths)
                       if n == f"{mn}.weight"}
            mask = torch.ones_like(p, dtype=torch.bool)
            for _, s, ln in trained:
                mask.narrow(swapped[n.rpartition(".")[0]].param_dim, s, ln).fill_(False)
            assert torch.equal(p.detach()[mask], before[n][mask]), n


# ---------------------------------------------------------------------- prune
def test_prune_mobilenet_v2_depthwise() -> None:
    model, x = _make("mobilenet_v2")
    n0 = sum(p.numel() for p in model.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # from_pretrained cannot rebuild the pruned widths: said, not tested here
        sparsify_fx.prune(model, (x,), sparsify_fx.PruneConfig(ratio=0.25))
    dw = model.layer[0].conv_3x3.convolution
    assert dw.groups == dw.in_channels == dw.out_channels == 36  # 48 expanded channels, 25 % gone
    assert sum(p.numel() for p in model.parameters()) < n0
    with torch.no_grad():
        assert model(x).last_hidden_state.isfinite().all()


def test_prune_grouped_conv_removes_the_same_channels_in_every_group() -> None:
    model, x = _make("se_block")
    sparsify_fx.prune(model, (x,), sparsify_fx.PruneConfig(ratio=0.25))
    g = model.grouped
    assert (g.groups, g.out_channels, tuple(g.weight.shape)) == (4, 24, (24, 8, 3, 3))
    assert model.reduce.in_channels == 24 and model.bn3.num_features == 24
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_s2ft_conv_under_bf16_autocast_matches_the_conv() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, padding=1)
    ref = copy.deepcopy(conv)
    m = S2FTConv(conv, conv.weight, conv.bias, False, 0, [0], [3], "view")
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, y_ref = m(x), ref(x)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y_ref)
    y.float().pow(2).sum().backward()
    assert m.blocks[0].grad.dtype == torch.float32 and x.grad.dtype == torch.float32
