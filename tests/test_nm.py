"""N:M and block sparsity: exact patterns, equivalence to the dense model on masked weights, training keeps the
mask, Progressive Gradient Flow's formula, bad input, compact export round trip, the ops' opcheck.

Tolerances: the masked model multiplies by a 0/1 mask weights that are already zero where pruned, so its outputs
equal the dense model's on the masked weights up to fp32 rounding (rtol 1e-6); weight gradients differ only in
summation order of the same GEMM (rtol 1e-6, atol 1e-6 x gradient scale).
"""

from __future__ import annotations

import copy
import glob
import math
import os

import models
import pytest
import torch
import torch.nn as nn

import sparsify_fx
from sparsify_fx import BlockConfig, ConfigError, NMConfig, sparsify
from sparsify_fx.passes import nm
from sparsify_fx.passes.nm import MaskedConv1D, MaskedLinear, export_sparse, load_sparse

torch.manual_seed(0)


def _llama():
    torch.manual_seed(0)
    return models.llama().eval()


def _mlp(d_in=16):
    torch.manual_seed(0)
    return models.MLP(d_in=d_in, widths=(32, 24), d_out=8)


def _ids(batch=2, seq=7, seed=1):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _masked(model):
    return {name: mod for name, mod in model.named_modules() if isinstance(mod, (MaskedLinear, MaskedConv1D))}


def _dense_twin(original, sparse):
    """``original``'s architecture with plain linears holding the sparse model's masked weights."""
    dense = copy.deepcopy(original)
    with torch.no_grad():
        for name, mod in _masked(sparse).items():
            dense.get_submodule(name).weight.copy_(mod.weight * mod.mask)
            if mod.bias is not None:
                dense.get_submodule(name).bias.copy_(mod.bias)
    return dense


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _bit_identical(a, b):
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].view(torch.uint8) if a[k].is_floating_point() else a[k],
                        b[k].view(torch.uint8) if b[k].is_floating_point() else b[k])
        for k in a
    )


# --------------------------------------------------------------------------------------------------------------
# patterns
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8)])
def test_nm_mask_exact_on_llama(n, m):
    model = _llama()
    sparsify(model, NMConfig(n=n, m=m, skip=["lm_head"], progress=False))
    layers = _masked(model)
    assert len(layers) == 2 * 7  # q k v o gate up down per block
    assert type(model.lm_head) is nn.Linear
    for name, mod in layers.items():
        groups = mod.mask.reshape(mod.out_features, -1, m).sum(-1)
        assert bool((groups == n).all()), name
        assert bool((mod.weight[~mod.mask] == 0).all()), name
        assert mod.pattern == ("nm", n, m)


def test_nm_keeps_largest_magnitudes():
    lin = nn.Linear(8, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -5.0, 3.0, 0.5, 2.0, 2.5, -0.1, 9.0],
                                       [-7.0, 0.0, 0.2, 6.0, 1.0, 1.0, 1.5, -1.2]]))
    model = nn.Sequential(lin)
    sparsify(model, NMConfig(n=2, m=4, progress=False))
    want = torch.tensor([[0, 1, 1, 0, 0, 1, 0, 1], [1, 0, 0, 1, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(model[0].mask, want)


@pytest.mark.parametrize("density", [0.25, 0.5, 0.8, 1.0])
def test_block_mask_whole_tiles_at_density(density):
    model = _llama()
    sparsify(model, BlockConfig(block=(16, 16), density=density, skip=["lm_head"], progress=False))
    for name, mod in _masked(model).items():
        out, in_ = mod.weight.shape
        tiles = mod.mask.reshape(out // 16, 16, in_ // 16, 16).permute(0, 2, 1, 3).reshape(-1, 256)
        kept = tiles.all(1)
        assert bool((kept | ~tiles.any(1)).all()), f"{name}: a partial tile"
        n_tiles = tiles.shape[0]
        assert abs(int(kept.sum()) - density * n_tiles) <= 1, name
        assert bool((mod.weight[~mod.mask] == 0).all())


def test_block_keeps_highest_mean_tiles():
    lin = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 1, 9, 9], [1, 1, 9, 9], [5, 5, 0, 0], [5, 5, 0, 0]]))
    model = nn.Sequential(lin)
    sparsify(model, BlockConfig(block=(2, 2), density=0.5, progress=False))
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[:2, 2:] = True
    want[2:, :2] = True
    assert torch.equal(model[0].mask, want)


def test_zero_padding_policy():
    model = _mlp(d_in=10)  # 10 % 4 = 2: the last group of each row is short
    sparsify(model, NMConfig(n=2, m=4, padding="zero", include=["layers.0"], progress=False))
    mask = model.layers[0].mask
    assert torch.equal(mask.sum(1), torch.full((32,), 2 + 2 + 2))  # short group: both real columns kept
    assert bool((mask[:, :8].reshape(32, 2, 4).sum(-1) == 2).all())
    model = _mlp(d_in=12)  # 32 x 12 with 8 x 8 tiles: 4 x 2 tiles, the right column half-empty
    sparsify(model, BlockConfig(block=(8, 8), density=0.5, padding="zero", include=["layers.0"], progress=False))
    mask = model.layers[0].mask.reshape(4, 8, 12)
    for r in range(4):
        assert bool(mask[r, :, :8].all() or not mask[r, :, :8].any())
        assert bool(mask[r, :, 8:].all() or not mask[r, :, 8:].any())
    assert int(model.layers[0].mask.sum()) in (3 * 64 + 32 + 64, 4 * 64, 2 * 64 + 2 * 32, 3 * 64 + 32)


def test_include_and_skip_globs():
    model = _llama()
    sparsify(model, NMConfig(include=["*mlp*"], skip=["model.layers.1.*"], progress=False))
    assert sorted(_masked(model)) == ["model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj",
                                      "model.layers.0.mlp.up_proj"]


def test_string_glob_and_square_block_shorthands():
    # skip="lm_head" is one glob (iterated it would be the globs "l", "m", ...); block=8 is (8, 8)
    model = _llama()
    sparsify(model, BlockConfig(block=8, density=0.5, skip="lm_head", progress=False))
    masked = _masked(model)
    assert "lm_head" not in masked and "model.layers.0.mlp.up_proj" in masked
    assert all(mod.pattern == ("block", 8, 8) for mod in masked.values())


# --------------------------------------------------------------------------------------------------------------
# equivalence: outputs and gradients
# --------------------------------------------------------------------------------------------------------------


def _grads_equal(sparse, dense):
    for name, mod in _masked(sparse).items():
        ref = dense.get_submodule(name).weight.grad
        scale = ref.abs().max().item() + 1e-12
        torch.testing.assert_close(mod.weight.grad, ref * mod.mask, rtol=1e-6, atol=1e-6 * scale)
        assert bool((mod.weight.grad[~mod.mask] == 0).all())
        if mod.bias is not None:
            torch.testing.assert_close(mod.bias.grad, dense.get_submodule(name).bias.grad, rtol=1e-6,
                                       atol=1e-6 * scale)


@pytest.mark.parametrize("config", [NMConfig(n=2, m=4, skip=["lm_head"], progress=False),
                                    BlockConfig(block=(16, 16), density=0.4, progress=False)])
def test_llama_equals_dense_on_masked_weights(config):
    original = _llama()
    sparse = copy.deepcopy(original)
    sparsify(sparse, config)
    dense = _dense_twin(original, sparse)
    ids = _ids()
    y = sparse(ids).logits
    y_ref = dense(ids).logits
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6 * y_ref.abs().max().item())
    y.square().mean().backward()
    y_ref.square().mean().backward()
    _grads_equal(sparse, dense)


@pytest.mark.parametrize("config", [NMConfig(n=1, m=4, progress=False),
                                    BlockConfig(block=(8, 8), density=0.5, progress=False)])
def test_mlp_equals_dense_on_masked_weights(config):
    original = _mlp()
    sparse = copy.deepcopy(original)
    sparsify(sparse, config)
    assert len(_masked(sparse)) == 3
    dense = _dense_twin(original, sparse)
    x = torch.randn(5, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = sparse(x), dense(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-7)
    gy = torch.randn_like(y)
    y.backward(gy)
    y_ref.backward(gy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-7)
    _grads_equal(sparse, dense)


# --------------------------------------------------------------------------------------------------------------
# Wanda
# --------------------------------------------------------------------------------------------------------------


def test_wanda_uses_activation_norms(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    scale = torch.tensor([100.0, 1, 1, 1, 0.01, 1, 1, 1])
    calib = [torch.randn(3, 8) * scale for _ in range(4)]
    x_sq = sum(c.double().pow(2).sum(0) for c in calib)
    h_sq = sum(torch.relu(model[0](c)).detach().double().pow(2).sum(0) for c in calib)
    w0, w2 = model[0].weight.detach().clone(), model[2].weight.detach().clone()
    before = _state(model)
    magnitude = copy.deepcopy(model)
    sparsify(magnitude, NMConfig(n=2, m=4, progress=False))
    sparsify(model, NMConfig(n=2, m=4, score="wanda", calibration=calib, progress=True))
    assert "calibration" in capsys.readouterr().err  # the tqdm bar
    assert torch.equal(model[0].mask, nm.nm_mask(w0.abs() * x_sq.sqrt().float(), 2, 4))
    assert torch.equal(model[2].mask, nm.nm_mask(w2.abs() * h_sq.sqrt().float(), 2, 4))
    assert not torch.equal(model[0].mask, magnitude[0].mask)  # the scaled columns change the choice
    assert bool(model[0].mask[:, 0].all()) and not bool(model[0].mask[:, 4].any())
    # no hook left behind; weights were only masked
    assert not model[0]._forward_pre_hooks and not model[2]._forward_pre_hooks
    assert torch.equal(model[0].weight, before["0.weight"] * model[0].mask)


def test_wanda_on_llama_with_kwargs_batches():
    model = _llama()
    calib = [{"input_ids": _ids(seed=s)} for s in range(3)]
    sparsify(model, NMConfig(score="wanda", calibration=calib, skip=["lm_head"], progress=False))
    for mod in _masked(model).values():
        assert bool((mod.mask.reshape(mod.out_features, -1, 4).sum(-1) == 2).all())


# --------------------------------------------------------------------------------------------------------------
# training keeps the mask; Progressive Gradient Flow
# --------------------------------------------------------------------------------------------------------------


def test_training_keeps_pruned_weights_zero():
    model = _llama().train()
    sparsify(model, NMConfig(skip=["lm_head"], progress=False))
    layers = _masked(model)
    start = {name: mod.weight.detach().clone() for name, mod in layers.items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    for step in range(4):
        out = model(_ids(seed=step), labels=_ids(seed=step))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    for name, mod in layers.items():
        assert bool((mod.weight[~mod.mask] == 0).all()), name
        assert not torch.equal(mod.weight[mod.mask], start[name][mod.mask]), name  # kept weights did train
        assert mod.pgf_step == 0


def test_pgf_formula():
    assert nm.pgf_scale(0, 4) == 1.0
    assert nm.pgf_scale(1, 4) == 0.75
    assert nm.pgf_scale(3, 4, start=0.5) == 0.125
    assert nm.pgf_scale(4, 4) == 0.0 and nm.pgf_scale(9, 4) == 0.0
    assert nm.pgf_scale(0, 0) == 0.0


def test_pgf_gradient_of_pruned_weights_decays():
    original = _mlp()
    sparse = copy.deepcopy(original).train()
    decay, start = 3, 0.8
    sparsify(sparse, NMConfig(n=2, m=4, pgf_decay_steps=decay, pgf_start=start, progress=False))
    opt = torch.optim.SGD(sparse.parameters(), lr=0.05)
    for t in range(decay + 2):
        dense = _dense_twin(original, sparse)
        x = torch.randn(6, 16, generator=torch.Generator().manual_seed(t))
        sparse(x).square().mean().backward()
        dense(x).square().mean().backward()
        s = start * max(0.0, 1 - t / decay)
        for name, mod in _masked(sparse).items():
            g = dense.get_submodule(name).weight.grad
            want = torch.where(mod.mask, g, s * g)
            torch.testing.assert_close(mod.weight.grad, want, rtol=1e-6, atol=1e-6 * g.abs().max().item())
            pruned = mod.weight.grad[~mod.mask]
            assert bool((pruned != 0).any()) == (s > 0), (t, name)
            assert mod.pgf_step == t + 1
        opt.step()
        opt.zero_grad()
    # pruned weights moved during the decay, yet the forward still uses W ∘ M
    layer = sparse.layers[0]
    assert bool((layer.weight[~layer.mask] != 0).any())
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), x @ (layer.weight * layer.mask).t() + layer.bias)


def test_pgf_off_in_eval_and_no_grad():
    model = _mlp()
    sparsify(model, NMConfig(pgf_decay_steps=5, progress=False))
    model.eval()
    model(torch.randn(2, 16)).sum().backward()
    assert model.layers[0].pgf_step == 0
    assert bool((model.layers[0].weight.grad[~model.layers[0].mask] == 0).all())


# --------------------------------------------------------------------------------------------------------------
# bad input leaves the model bit-identical
# --------------------------------------------------------------------------------------------------------------


BAD = [
    (NMConfig(n=5, m=4), "0 < n <= m"),
    (NMConfig(n=0, m=4), "0 < n <= m"),
    (NMConfig(n=-1, m=4), "0 < n <= m"),
    (NMConfig(n=2, m=5), "not a multiple of m=5"),
    (BlockConfig(block=(16, 24)), "does not tile"),
    (BlockConfig(block=(16, 16), density=0.0), r"density must lie in \(0, 1\]"),
    (BlockConfig(block=(16, 16), density=1.5), r"density must lie in \(0, 1\]"),
    (BlockConfig(block=(0, 16)), "two positive ints"),
    (NMConfig(score="wanda"), "needs calibration"),
    (NMConfig(padding="reflect"), "padding must be"),
    (NMConfig(include=["nothing.here"]), "no nn.Linear"),
    (NMConfig(pgf_decay_steps=-1), "pgf_decay_steps"),
    (NMConfig(pgf_start="1"), "pgf_start"),
    (NMConfig(n=True, m=4), "0 < n <= m"),  # a bool is an int to Python, not a group size
    (BlockConfig(block=(16,)), "two positive ints"),
    (BlockConfig(block=(16.0, 16.0)), "two positive ints"),
    (BlockConfig(density="0.5"), "density must lie"),
    (NMConfig(skip=[3]), "skip must be a list of FQN globs"),
]


@pytest.mark.parametrize("config,match", BAD)
def test_bad_config_leaves_model_unchanged(config, match):
    model = _llama()
    before = _state(model)
    types = [type(m) for m in model.modules()]
    with pytest.raises(ConfigError, match=match):
        sparsify(model, config)
    assert _bit_identical(before, model.state_dict())
    assert types == [type(m) for m in model.modules()]


def test_bad_layer_named_and_nothing_swapped():
    model = _mlp(d_in=10)  # only the first layer's in_features (10) is not a multiple of 4
    before = _state(model)
    with pytest.raises(ConfigError, match=r"padding='zero'.*layers\.0"):
        sparsify(model, NMConfig(n=2, m=4))
    assert _bit_identical(before, model.state_dict()) and not _masked(model)


def test_tied_weights_refused():
    model = _llama()
    model.lm_head.weight = model.model.embed_tokens.weight
    before = _state(model)
    with pytest.raises(ConfigError, match="tied"):
        sparsify(model, NMConfig(progress=False))
    assert _bit_identical(before, model.state_dict())


def test_empty_calibration_refused():
    model = _mlp()
    before = _state(model)
    with pytest.raises(ConfigError, match="empty"):
        sparsify(model, NMConfig(score="wanda", calibration=[], progress=False))
    assert _bit_identical(before, model.state_dict())


# --------------------------------------------------------------------------------------------------------------
# compact export
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [NMConfig(n=2, m=4, skip=["lm_head"], progress=False),
                                    NMConfig(n=1, m=3, padding="zero", progress=False),
                                    BlockConfig(block=(16, 16), density=0.3, progress=False),
                                    BlockConfig(block=(16, 24), density=0.5, padding="zero", progress=False)])
def test_export_round_trip_and_size(tmp_path, config):
    from safetensors import safe_open
    from safetensors.torch import save_file

    sparse = _llama()
    sparsify(sparse, config)
    path = tmp_path / "sparse.safetensors"
    export_sparse(sparse, path)
    assert glob.glob(str(tmp_path / ".sparse-*")) == []  # temp file renamed away
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == "sparsify_fx.sparse"
    dense_layers = {f"{n}.{k}": v.contiguous() for n, mod in _masked(sparse).items()
                    for k, v in (("weight", mod.weight.detach()), ("bias", mod.bias))
                    if v is not None}
    save_file(dense_layers, str(tmp_path / "dense.safetensors"))
    compact, dense_size = os.path.getsize(path), os.path.getsize(tmp_path / "dense.safetensors")
    assert compact < dense_size
    if isinstance(config, NMConfig) and config.m == 4:
        assert compact < 0.6 * dense_size  # values 1/2 + 4-bit positions 1/16 of fp32 bytes

    torch.manual_seed(123)
    fresh = models.llama().eval()  # other random weights
    load_sparse(fresh, path)
    for name, mod in _masked(sparse).items():
        got = fresh.get_submodule(name)
        assert isinstance(got, MaskedLinear) and got.pattern == mod.pattern
        assert torch.equal(got.mask, mod.mask)
        assert torch.equal(got.weight, mod.weight * mod.mask)
    # the rest of the model is the caller's (same weights here so the outputs can be compared)
    fresh.load_state_dict(sparse.state_dict())
    ids = _ids()
    torch.testing.assert_close(fresh(ids).logits, sparse(ids).logits, rtol=0, atol=0)


def test_export_writes_masked_values_after_pgf(tmp_path):
    model = _mlp().train()
    sparsify(model, NMConfig(pgf_decay_steps=10, progress=False))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(4, 16)).sum().backward()
    opt.step()
    assert bool((model.layers[0].weight[~model.layers[0].mask] != 0).any())
    export_sparse(model, tmp_path / "s.safetensors")
    fresh = _mlp()
    load_sparse(fresh, tmp_path / "s.safetensors")
    for name, mod in _masked(model).items():
        assert torch.equal(fresh.get_submodule(name).weight, mod.weight * mod.mask)


def test_load_refuses_other_architecture(tmp_path):
    model = _mlp()
    sparsify(model, NMConfig(progress=False))
    export_sparse(model, tmp_path / "s.safetensors")
    other = models.MLP(d_in=16, widths=(32, 20), d_out=8)
    before = _state(other)
    with pytest.raises(ConfigError, match="shape"):
        load_sparse(other, tmp_path / "s.safetensors")
    assert _bit_identical(before, other.state_dict()) and not _masked(other)
    with pytest.raises(ConfigError, match="no masked layer"):
        export_sparse(_mlp(), tmp_path / "t.safetensors")


def _rewrite(src, dst, edit):
    """Copy a safetensors export with ``edit(tensors)`` applied, metadata kept."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors)
    save_file(tensors, str(dst), metadata=meta)


@pytest.mark.parametrize("edit", [
    lambda t: t.__setitem__("1.bias", t["1.bias"][:-1]),  # the second layer's bias is short
    lambda t: t.pop("1.positions"),  # a tensor is missing
    lambda t: t.__setitem__("1.values", t["1.values"][:, :-1].contiguous()),  # truncated values
    lambda t: t["1.positions"].zero_(),  # every kept position is the same one
])
def test_corrupt_export_is_refused_before_any_write(tmp_path, edit):
    model = _mlp()
    sparsify(model, NMConfig(progress=False))
    export_sparse(model, tmp_path / "s.safetensors")
    _rewrite(tmp_path / "s.safetensors", tmp_path / "bad.safetensors", edit)
    other = _mlp()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    before = _state(other)
    with pytest.raises(ConfigError, match="corrupt"):
        load_sparse(other, tmp_path / "bad.safetensors")
    assert _bit_identical(before, other.state_dict()) and not _masked(other)


def test_compress_nm_round_trip_and_pack():
    w = torch.randn(5, 11)
    mask = nm.nm_mask(w.abs(), 3, 4, padding="zero")
    values, pos = nm.compress_nm(w, mask, 3, 4)
    assert values.shape == (5, math.ceil(11 / 4) * 3) and pos.dtype == torch.uint8
    w2, m2 = nm.decompress_nm(values, pos, 3, 4, 11)
    assert torch.equal(m2, mask) and torch.equal(w2, w * mask)
    assert torch.equal(nm.unpack_positions(nm.pack_positions(pos), pos.shape[1]), pos)
    bad = mask.clone()
    bad[0, :4] = True
    with pytest.raises(ConfigError, match="not 3:4"):
        nm.compress_nm(w, bad, 3, 4)


# --------------------------------------------------------------------------------------------------------------
# ops
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op,extra", [(torch.ops.sparsify.masked_linear.default, ()),
                                      (torch.ops.sparsify.nm_linear.default, (2, 4)),
                                      (torch.ops.sparsify.block_sparse_linear.default, (4, 4))])
@pytest.mark.parametrize("scale", [0.0, 0.5])
def test_opcheck(op, extra, scale):
    w = torch.randn(8, 8, requires_grad=True)
    mask = nm.nm_mask(w.detach().abs(), 2, 4) if extra != (4, 4) else nm.block_mask(w.detach(), (4, 4), 0.5)
    for x, b in [(torch.randn(3, 8, requires_grad=True), torch.randn(8, requires_grad=True)),
                 (torch.randn(2, 3, 8), None)]:
        torch.library.opcheck(op, (x, w, mask, b, *extra, scale))


def test_masked_linear_grad_formula():
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(6, 8) > 0.5
    torch.autograd.gradcheck(lambda x, w: torch.ops.sparsify.masked_linear(x, w, mask, None, 0.0), (x, w))
    y = torch.ops.sparsify.masked_linear(x, w, mask, None, 0.25)
    gy = torch.randn_like(y)
    y.backward(gy)
    torch.testing.assert_close(w.grad, (gy.t() @ x.detach()) * torch.where(mask, 1.0, 0.25).double())


def test_one_graph_node_under_export():
    model = _mlp()
    sparsify(model, NMConfig(progress=False))
    ep = torch.export.export(model, (torch.randn(3, 16),))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.sparsify.nm_linear.default) == 3
    assert torch.ops.aten.linear.default not in targets and torch.ops.aten.mm.default not in targets


def test_public_names():
    assert sparsify_fx.sparsify is nm.sparsify
    assert sparsify_fx.NMConfig is NMConfig and sparsify_fx.BlockConfig is BlockConfig


def test_compile_lowers_to_triton_kernels():
    from sparsify_fx.codegen import backend as be

    torch._dynamo.reset()
    model = _mlp()
    sparsify(model, NMConfig(include=["layers.0", "layers.2"], progress=False))
    sparsify(model, BlockConfig(block=(8, 8), density=0.5, include=["layers.1"], progress=False))
    compiled = torch.compile(model, backend="sparsify", options={"kernels": "triton"})
    x = torch.randn(5, 16)
    with torch.no_grad(), be.recording() as records:
        y = compiled(x)
    swaps = sorted(s.split(": ")[1] for r in records for s in r.swaps)
    assert swaps == ["sparsify.block_sparse_linear.default -> sparsify.block_sparse_linear_triton.default",
                     *["sparsify.nm_linear.default -> sparsify.nm_linear_triton.default"] * 2]
    assert not any(r.fallbacks for r in records)
    torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_gpt2_conv1d_layers(tmp_path):
    torch.manual_seed(0)
    original = models.gpt2().eval()
    sparse = copy.deepcopy(original)
    with pytest.raises(ConfigError, match="tied"):  # lm_head shares the token embedding
        sparsify(sparse, NMConfig(progress=False))
    sparsify(sparse, NMConfig(n=2, m=4, skip=["lm_head"], progress=False))
    layers = _masked(sparse)
    assert len(layers) == 2 * 4 and all(isinstance(m, MaskedConv1D) for m in layers.values())
    for mod in layers.values():
        assert mod.mask.shape == mod.weight.shape  # Conv1D layout [in, out]
        assert bool((mod.mask.t().reshape(mod.out_features, -1, 4).sum(-1) == 2).all())  # groups along in
    dense = _dense_twin(original, sparse)
    ids = _ids()
    y, y_ref = sparse(ids).logits, dense(ids).logits
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6 * y_ref.abs().max().item())
    y.square().mean().backward()
    y_ref.square().mean().backward()
    _grads_equal(sparse, dense)
    export_sparse(sparse, tmp_path / "g.safetensors")
    fresh = copy.deepcopy(original)
    load_sparse(fresh, tmp_path / "g.safetensors")
    for name, mod in layers.items():
        got = fresh.get_submodule(name)
        assert isinstance(got, MaskedConv1D)
        assert torch.equal(got.mask, mod.mask) and torch.equal(got.weight, mod.weight * mod.mask)
    torch.testing.assert_close(fresh(ids).logits, y.detach(), rtol=0, atol=0)


def test_compiled_training_matches_eager():
    torch._dynamo.reset()
    model = _mlp()
    sparsify(model, NMConfig(progress=False))
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, backend="sparsify")
    for step in range(2):
        x = torch.randn(5, 16, generator=torch.Generator().manual_seed(step))
        compiled(x).square().sum().backward()
        ref(x).square().sum().backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=name)
            p.grad = q.grad = None
    torch._dynamo.reset()


@pytest.mark.parametrize("config", [NMConfig(n=2, m=4, progress=False),
                                    BlockConfig(block=(8, 8), density=0.5, progress=False)])
def test_bf16_model_equals_dense_on_masked_weights(config):
    original = _mlp().to(torch.bfloat16)
    sparse = copy.deepcopy(original)
    sparsify(sparse, config)
    dense = _dense_twin(original, sparse)
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    y, y_ref = sparse(x), dense(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)  # same bf16 GEMM on the same (already zeroed) weights
    y.float().square().sum().backward()
    y_ref.float().square().sum().backward()
    for name, mod in _masked(sparse).items():
        assert bool((mod.weight.grad[~mod.mask] == 0).all())
        ref = dense.get_submodule(name).weight.grad * mod.mask
        torch.testing.assert_close(mod.weight.grad, ref, rtol=2**-7, atol=2**-7 * ref.abs().max().item())


def test_wanda_layer_not_on_calibration_path_falls_back_to_magnitude():
    model = _mlp()
    model.extra = nn.Linear(16, 8)  # registered but never called by forward
    w = model.extra.weight.detach().clone()
    calib = [torch.randn(4, 16) for _ in range(2)]
    with pytest.warns(UserWarning, match="extra"):
        sparsify(model, NMConfig(score="wanda", calibration=calib, progress=False))
    assert torch.equal(model.extra.mask, nm.nm_mask(w.abs(), 2, 4))


def test_load_into_masked_model_and_corrupt_file(tmp_path):
    model = _mlp()
    sparsify(model, BlockConfig(block=(8, 8), density=0.5, progress=False))
    export_sparse(model, tmp_path / "s.safetensors")
    saved = {name: (mod.weight.detach().clone(), mod.mask.clone()) for name, mod in _masked(model).items()}
    other = _mlp()
    sparsify(other, NMConfig(progress=False))  # other pattern, other values
    load_sparse(other, tmp_path / "s.safetensors")
    for name, (w, mk) in saved.items():
        mod = other.get_submodule(name)
        assert mod.pattern == ("block", 8, 8) and torch.equal(mod.mask, mk) and torch.equal(mod.weight, w)
    (tmp_path / "bad.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    before = _state(other)
    with pytest.raises(ConfigError, match="not a readable safetensors"):
        load_sparse(other, tmp_path / "bad.safetensors")
    assert _bit_identical(before, other.state_dict())
