"""The table of layer types (sparsify_fx.passes.layers): every registered type's dims checked numerically against
the module's own forward, size fields checked against a module built at the new size, lookup order, registration
errors, and a user-registered type picked up by ``sparsify`` (N:M) and by ``prune``'s size fields.

Tolerances: ``weight_oi`` products are the module's GEMM in another summation order (fp32, rtol 1e-5, atol 1e-6).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

import sparsify_fx
from sparsify_fx import ConfigError, NMConfig, PruneConfig
from sparsify_fx.passes.layers import (
    BatchNormType,
    Conv1DType,
    ConvType,
    EmbeddingType,
    GroupNormType,
    LayerType,
    LinearType,
    NormalizedShapeType,
    layer_type,
    register_layer,
)
from sparsify_fx.passes.nm import MaskedConv1D, MaskedLinear

GEN = torch.Generator().manual_seed(0)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------- dims, checked by the module's forward
@pytest.mark.parametrize("make", [lambda: nn.Linear(6, 5), lambda: Conv1D(5, 6)], ids=["linear", "conv1d"])
def test_linear_types_weight_oi_reproduces_the_output(make) -> None:
    torch.manual_seed(0)
    mod = make()
    lt = layer_type(mod)
    assert lt.is_linear and lt.input_axis(mod) == -1
    w = lt.weight_oi(mod)
    assert w.shape == (5, 6) and w.data_ptr() == mod.weight.data_ptr()  # a view, no copy
    assert mod.weight.shape[lt.in_dim(mod)] == 6 and mod.weight.shape[lt.out_dim(mod)] == 5 == mod.bias.shape[0]
    x = torch.randn(3, 4, 6, generator=GEN)
    _close(x @ w.T + mod.bias, mod(x))


def test_conv_weight_oi_is_the_im2col_matrix() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3)
    lt = layer_type(conv)
    assert isinstance(lt, ConvType) and not lt.is_linear
    x = torch.randn(2, 4, 5, 5, generator=GEN)
    cols = F.unfold(x, 3)  # [N, C*k*k, L]
    y = (lt.weight_oi(conv) @ cols + conv.bias[:, None]).reshape(2, 6, 3, 3)
    _close(y, conv(x))
    # the weight's in dim indexes the input's channel axis one to one
    assert conv.weight.shape[lt.in_dim(conv)] == x.shape[lt.input_axis(conv)] == 4
    assert conv.weight.shape[lt.out_dim(conv)] == 6
    # grouped: weight dim 1 holds in/groups channels, so no input axis; transposed: weight [in, out/groups, *k]
    grouped, tconv = nn.Conv2d(4, 6, 3, groups=2), nn.ConvTranspose2d(4, 6, 3, groups=2)
    assert lt.input_axis(grouped) is None and lt.weight_oi(tconv) is None
    assert tconv.weight.shape[lt.in_dim(tconv)] == 4 and tconv.weight.shape[lt.out_dim(tconv)] == 6 // 2


def test_embedding_weight_oi_is_the_one_hot_map() -> None:
    emb = nn.Embedding(10, 4)
    lt = layer_type(emb)
    assert isinstance(lt, EmbeddingType) and lt.input_axis(emb) is None
    idx = torch.tensor([[1, 7, 7, 0]])
    assert torch.equal(F.one_hot(idx, 10).float() @ lt.weight_oi(emb).T, emb(idx))
    assert emb.weight.shape[lt.in_dim(emb)] == 10 and emb.weight.shape[lt.out_dim(emb)] == 4


@pytest.mark.parametrize(
    "big,small,kind",
    [
        (nn.Linear(8, 6), nn.Linear(5, 4), LinearType),
        (Conv1D(6, 8), Conv1D(4, 5), Conv1DType),
        (nn.Conv2d(8, 6, 3), nn.Conv2d(5, 4, 3), ConvType),
        (nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(6, 6, 3, groups=6), ConvType),  # depthwise: groups follow
        (nn.Conv2d(8, 6, 3, groups=2), nn.Conv2d(8, 4, 3, groups=2), ConvType),
        (nn.ConvTranspose2d(8, 6, 3), nn.ConvTranspose2d(5, 4, 3), ConvType),
        (nn.ConvTranspose2d(8, 6, 3, groups=2), nn.ConvTranspose2d(6, 4, 3, groups=2), ConvType),
        (nn.BatchNorm2d(8), nn.BatchNorm2d(5), BatchNormType),
        (nn.BatchNorm1d(8, affine=False), nn.BatchNorm1d(5, affine=False), BatchNormType),
        (nn.GroupNorm(2, 8), nn.GroupNorm(2, 6), GroupNormType),
        (nn.LayerNorm(8), nn.LayerNorm(5), NormalizedShapeType),
        (nn.RMSNorm([3, 8]), nn.RMSNorm([3, 5]), NormalizedShapeType),
        (nn.Embedding(10, 8), nn.Embedding(7, 5), EmbeddingType),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "",
)
def test_size_fields_are_those_of_a_module_built_at_the_new_size(big, small, kind) -> None:
    lt = layer_type(big)
    assert type(lt) is kind
    weight = small._parameters.get("weight")
    if weight is None:  # affine=False: the size is read from the (already resized) buffers
        big.running_mean = small.running_mean
    fields = lt.size_fields(big, weight)
    assert fields, "a resized weight must move some field"
    for name, value in fields:
        assert value == getattr(small, name), name
    # the new module is described exactly: every field that differs between the two sizes is in the list
    differ = {k for k, v in vars(small).items() if not k.startswith("_") and getattr(big, k) != v}
    assert differ <= {name for name, _ in fields}


def test_lookup_order_subclass_exact_and_predicates() -> None:
    out_proj = nn.MultiheadAttention(8, 2).out_proj  # a Linear subclass: found through the MRO
    assert type(out_proj) is not nn.Linear and isinstance(layer_type(out_proj), LinearType)
    assert layer_type(out_proj, exact=True) is None  # a subclass may override forward
    # masked layers have their own entries: same dims, but not a plain linear map of their weight
    masked = MaskedLinear(nn.Linear(8, 4), torch.ones(4, 8, dtype=torch.bool), ("nm", 2, 4))
    mconv = MaskedConv1D(Conv1D(4, 8), torch.ones(4, 8, dtype=torch.bool), ("nm", 2, 4))
    assert not layer_type(masked).is_linear and layer_type(masked).in_dim(masked) == 1
    assert not layer_type(mconv).is_linear and layer_type(mconv).in_dim(mconv) == 0
    assert torch.equal(layer_type(mconv).weight_oi(mconv), mconv.weight_oi())
    assert layer_type(nn.ReLU()) is None and layer_type(nn.Module()) is None

    class Norm(nn.Module):  # a LayerNorm look-alike: matched by its normalized_shape field
        def __init__(self) -> None:
            super().__init__()
            self.normalized_shape = (8,)
            self.weight = nn.Parameter(torch.ones(8))

    assert isinstance(layer_type(Norm()), NormalizedShapeType)

    class NotConv1D(nn.Module):  # the name alone does not make a Conv1D
        nf = 3

    NotConv1D.__name__ = "Conv1D"
    assert layer_type(NotConv1D()) is None


# ---------------------------------------------------------------------- registration errors
def test_registration_errors_are_raised_at_registration() -> None:
    class Fresh(nn.Module):
        pass

    with pytest.raises(ConfigError, match="is not a class"):
        register_layer("Linear")
    with pytest.raises(ConfigError, match="is not a class"):
        register_layer(nn.Linear(2, 2))
    # one taken class refuses the whole registration: Fresh is not registered either
    with pytest.raises(ConfigError, match=r"Linear \(by LinearType\).*already registered"):
        register_layer(Fresh, nn.Linear)
    with pytest.raises(ConfigError, match="already registered"):
        register_layer(Fresh, Fresh)
    with pytest.raises(ConfigError, match="predicate must be callable"):
        register_layer(predicate="Conv1D")
    with pytest.raises(ConfigError, match="at least one module class or a predicate"):
        register_layer()
    with pytest.raises(ConfigError, match="decorates LayerType subclasses"):
        register_layer(Fresh)(lambda m: m)
    assert layer_type(Fresh()) is None

    def pred(m: nn.Module) -> bool:
        return isinstance(m, Fresh)

    @register_layer(predicate=pred)
    class FreshType(LayerType):
        pass

    assert isinstance(layer_type(Fresh()), FreshType)
    with pytest.raises(ConfigError, match="predicate .* already registered"):
        register_layer(predicate=pred)


# ---------------------------------------------------------------------- a user's layer type, used by the passes
def _proj_init(self: nn.Module, n_in: int, n_out: int) -> None:
    nn.Module.__init__(self)
    self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
    self.bias = nn.Parameter(torch.randn(n_out) * 0.1)
    self.in_features, self.out_features = n_in, n_out  # what a masked linear copies
    self.width_in, self.width_out = n_in, n_out


def _proj_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, self.weight, self.bias)


class _Proj(nn.Module):
    """A user's projection: ``y = x @ W.T + b`` with size fields of its own names."""

    __init__ = _proj_init
    forward = _proj_forward


class _UnknownProj(nn.Module):
    """The same layer with no entry in the table: the passes do not know it."""

    __init__ = _proj_init
    forward = _proj_forward


@register_layer(_Proj)
class _ProjType(LinearType):
    def size_fields(self, module: nn.Module, weight: torch.Tensor | None) -> list[tuple[str, int]]:
        return super().size_fields(module, weight) + [("width_out", weight.shape[0]), ("width_in", weight.shape[1])]


class _MLP(nn.Module):
    def __init__(self, proj: type[nn.Module]) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = proj(16, 32), proj(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


X = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))


def test_registered_layer_type_is_sparsified() -> None:
    with pytest.raises(ConfigError, match="no nn.Linear/Conv1D layer matches"):
        sparsify_fx.sparsify(_MLP(_UnknownProj), NMConfig(n=2, m=4))
    model = _MLP(_Proj)
    weights = {n: model.get_submodule(n).weight.detach().clone() for n in ("up", "down")}
    sparsify_fx.sparsify(model, NMConfig(n=2, m=4))
    for name, w in weights.items():
        mod = model.get_submodule(name)
        assert isinstance(mod, MaskedLinear)
        # kept weights are the largest two of each group of four, unchanged; the rest are zero
        top = w.abs().reshape(w.shape[0], -1, 4).topk(2, -1).indices
        want = torch.zeros_like(w).reshape(w.shape[0], -1, 4).scatter_(-1, top, 1.0).reshape_as(w).bool()
        assert torch.equal(mod.mask, want) and torch.equal(mod.weight.detach(), w * want)
    with torch.no_grad():
        ref = F.linear(torch.relu(F.linear(X, weights["up"] * model.up.mask, model.up.bias)),
                       weights["down"] * model.down.mask, model.down.bias)
        _close(model(X), ref)


def test_registered_layer_type_size_fields_follow_prune() -> None:
    model = _MLP(_Proj).eval()
    sparsify_fx.prune(model, (X,), PruneConfig(ratio=0.25, score="magnitude", progress=False))
    assert model.up.weight.shape == (24, 16) and model.down.weight.shape == (16, 24)
    assert (model.up.width_out, model.up.out_features, model.down.width_in, model.down.in_features) == (24,) * 4
    assert (model.up.width_in, model.down.width_out) == (16, 16)
    # the same layer unregistered: its weights shrink but its fields keep the old size
    stale = _MLP(_UnknownProj).eval()
    sparsify_fx.prune(stale, (X,), PruneConfig(ratio=0.25, score="magnitude", progress=False))
    assert stale.up.weight.shape == (24, 16) and stale.up.width_out == 32


def test_grouped_conv_keep_error_checks_each_group_of_the_masks():
    conv = nn.Conv2d(8, 8, 3, groups=4)  # weight [8, 2, 3, 3]: 2 output channels per group
    lt = layer_type(conv)
    even = torch.tensor([True, False] * 4)
    assert lt.keep_error(conv, "weight", {0: even}) is None
    uneven = torch.tensor([True, True, False, False, True, False, True, False])
    assert "would keep [2, 0, 1, 1] channels per group" in lt.keep_error(conv, "weight", {0: uneven})
    one_in = {0: torch.ones(8, dtype=torch.bool), 1: torch.tensor([True, False])}
    assert "would keep 1 of 2 channels per group" in lt.keep_error(conv, "weight", one_in)
    depthwise = nn.Conv2d(4, 4, 3, groups=4)  # every channel its own group: any subset keeps `groups` = channels
    assert lt.keep_error(depthwise, "weight", {0: torch.tensor([True, False, False, True])}) is None
    # the counts-only check still applies through the default
    assert "GroupNorm" in layer_type(nn.GroupNorm(2, 4)).keep_error(nn.GroupNorm(2, 4), "weight",
                                                                    {0: torch.tensor([True, True, True, False])})
