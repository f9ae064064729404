"""Any optimizer, any implementation (issue 12, item 2): for-loop, foreach and fused SGD/Adam/AdamW/Adagrad, with an
LR scheduler, gradient clipping and ``zero_grad(set_to_none=False)``, train an S²FT model in either layout without
touching one frozen value, for row-selected (v/up) and column-selected (o/down) weights alike.

Fused and foreach kernels walk a parameter's memory linearly; a column block of a row-major weight is a strided view
with gaps, so before the fix ``AdamW(fused=True)`` (transformers.Trainer's default) wrote into the frozen columns.
"""

from __future__ import annotations

import copy
import functools

import models
import pytest
import torch
from models import rel_err
from safetensors.torch import load_file, save_file
from torch import nn

import sparsify_fx
from sparsify_fx.errors import ConfigError
from sparsify_fx.ops import assemble_weight
from sparsify_fx.passes.s2ft import S2FTLinear, blocks_are_dense, state_of

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
STEPS = 3
OPTIMIZERS = {
    "sgd": lambda params, **kw: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01, **kw),
    "adam": lambda params, **kw: torch.optim.Adam(params, lr=1e-3, weight_decay=0.01, **kw),
    "adamw": lambda params, **kw: torch.optim.AdamW(params, lr=1e-3, **kw),
    "adagrad": lambda params, **kw: torch.optim.Adagrad(params, lr=1e-2, weight_decay=0.01, **kw),
}
IMPLEMENTATIONS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
LAYOUTS = ("view", "separate")


def _cfg(layout: str) -> sparsify_fx.S2FTConfig:
    return sparsify_fx.S2FTConfig(attention_ratio=0.5, ffn_ratio=0.25, layout=layout, progress=False)


@functools.cache
def _base() -> nn.Module:
    torch.manual_seed(0)
    return models.llama().eval()  # no dropout: every run sees the same function


@functools.cache
def _transformed(layout: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """One S²FT model per layout, shared by the matrix (each test starts from its snapshot), and that snapshot."""
    model = sparsify_fx.s2ft(copy.deepcopy(_base()), (IDS,), _cfg(layout))
    return model, {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _fresh(layout: str) -> nn.Module:
    model, snap = _transformed(layout)
    with torch.no_grad():
        for k, v in model.state_dict(keep_vars=True).items():
            v.copy_(snap[k])  # in place: view blocks keep aliasing their weight
    for p in model.parameters():
        p.grad = None
    return model


def _wrapped(model: nn.Module) -> dict[str, S2FTLinear]:
    return {name: model.get_submodule(name) for name in state_of(model).modules}


def _trained_mask(mod: S2FTLinear) -> torch.Tensor:
    mask = torch.zeros(mod.weight.shape, dtype=torch.bool)
    for s, n in zip(mod.starts, mod.lengths):
        mask.narrow(mod.param_dim, s, n).fill_(True)
    return mask


def _train(model: nn.Module, make_opt, impl: dict[str, bool]) -> torch.optim.Optimizer:
    params = list(model.parameters())  # frozen ones included, as a user would pass them
    opt = make_opt(params, **impl)
    sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.5, total_iters=STEPS)
    for _ in range(STEPS):
        model(IDS, labels=IDS).loss.backward()
        torch.nn.utils.clip_grad_norm_(params, max_norm=0.5)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=False)
    return opt


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each trained weight with its blocks written in (the separate layout keeps them apart until merge)."""
    out = {}
    for name, mod in _wrapped(model).items():
        w = mod.weight.detach().clone()
        for s, n, b in zip(mod.starts, mod.lengths, mod.blocks):
            w.narrow(mod.param_dim, s, n).copy_(b.detach())
        out[name] = w
    return out


@functools.cache
def _reference(name: str) -> dict[str, torch.Tensor]:
    """The trained weights of the for-loop optimizer in the view layout: every combination must match them."""
    model = _fresh("view")
    _train(model, OPTIMIZERS[name], IMPLEMENTATIONS["for-loop"])
    return _weights(model)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_leaves_every_frozen_value_bit_identical(name, impl, layout):
    ref = _reference(name)  # before _fresh: both share the cached model of the view layout
    model = _fresh(layout)
    _, snap = _transformed(layout)
    wrapped = _wrapped(model)
    dims = {mod.param_dim for mod in wrapped.values()}
    assert dims == {0, 1}, "the config must train row- and column-selected weights"

    opt = _train(model, OPTIMIZERS[name], IMPLEMENTATIONS[impl])

    weight_keys = {f"{n}.weight" for n in wrapped}
    for key, v in model.state_dict(keep_vars=True).items():
        if ".blocks." in key:
            continue
        if key in weight_keys:
            mod = wrapped[key.rpartition(".")[0]]
            mask = _trained_mask(mod)
            assert torch.equal(v[~mask], snap[key][~mask]), f"frozen values of {key} changed"
            trained = torch.cat([b.detach().flatten() for b in mod.blocks])
            before = torch.cat([snap[key].narrow(mod.param_dim, s, n).flatten()
                                for s, n in zip(mod.starts, mod.lengths)])
            assert not torch.equal(trained, before), f"the blocks of {key} did not train"
        else:
            assert torch.equal(v, snap[key]), f"frozen {key} changed"
    # each block's gradient and optimizer state share its memory layout, which the fused kernels rely on
    for mod in wrapped.values():
        for b in mod.blocks:
            assert blocks_are_dense(b, 0) or blocks_are_dense(b, 1)
            assert b.grad.stride() == b.stride()
            for t in opt.state[b].values():
                if isinstance(t, torch.Tensor) and t.dim() == 2:
                    assert t.stride() == b.stride()
    # the same optimizer, any implementation, either layout: the same training (up to float rounding)
    got = _weights(model)
    assert got.keys() == ref.keys()
    for key, w in got.items():
        assert rel_err(w, ref[key]) <= 1e-6, key


@pytest.mark.parametrize("make", [models.llama, models.gpt2])  # nn.Linear [out, in]; Conv1D [in, out]
def test_view_blocks_are_dense_and_the_forward_stays_zero_copy(make):
    torch.manual_seed(0)
    model = sparsify_fx.s2ft(make().eval(), (IDS,), _cfg("view"))
    wrapped = _wrapped(model)
    assert {mod.param_dim for mod in wrapped.values()} == {0, 1}
    for mod in wrapped.values():
        assert blocks_are_dense(mod.weight, mod.param_dim)
        for s, b in zip(mod.starts, mod.blocks):
            assert b.data_ptr() == mod.weight.narrow(mod.param_dim, s, b.shape[mod.param_dim]).data_ptr()
        # the op's zero-copy check still recognises the blocks as the weight's own memory
        w = mod.weight.t() if mod.transposed else mod.weight
        blocks = [b.t() if mod.transposed else b for b in mod.blocks]
        assert assemble_weight(w, blocks, mod.logical_dim, mod.starts) is w


def test_gapped_view_blocks_are_refused_before_any_change():
    lin = nn.Linear(8, 4)
    before = lin.weight.detach().clone()
    with pytest.raises(ConfigError, match=r"would have gaps.*layout='separate'"):
        S2FTLinear(lin, lin.weight, lin.bias, False, param_dim=1, starts=[2], lengths=[3], layout="view")
    assert lin.weight.requires_grad and torch.equal(lin.weight, before) and lin.weight.is_contiguous()


def test_merge_gives_row_major_weights_back_with_the_trained_values():
    torch.manual_seed(0)
    model = sparsify_fx.s2ft(copy.deepcopy(_base()), (IDS,), _cfg("view"))
    params = {n: p for n, p in model.named_parameters() if ".blocks." not in n}
    assert any(not p.is_contiguous() for p in params.values()), "column blocks re-store their weight"
    _train(model, OPTIMIZERS["adamw"], IMPLEMENTATIONS["fused"])
    with torch.no_grad():
        want = model(IDS).logits
    trained = {k: v.detach().clone() for k, v in params.items()}
    sparsify_fx.merge(model, inplace=True)
    merged = dict(model.named_parameters())
    assert merged.keys() == params.keys()
    assert all(merged[n] is params[n] and merged[n].is_contiguous() for n in params)
    # merge only moves values (un-permutes): every weight holds the same multiset of values
    for n, p in merged.items():
        assert torch.equal(p.detach().flatten().sort().values, trained[n].flatten().sort().values), n
    with torch.no_grad():
        assert rel_err(model(IDS).logits, want) <= 1e-5


@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_saves_with_safetensors_and_loads_into_either_layout(layout, tmp_path):
    model = _fresh(layout)
    _train(model, OPTIMIZERS["adamw"], IMPLEMENTATIONS["fused"])
    kept = model.state_dict(keep_vars=True)
    assert all(kept[f"{n}.weight"] is mod.weight for n, mod in _wrapped(model).items())  # no copies asked for
    sd = model.state_dict()
    path = tmp_path / "s2ft.safetensors"
    save_file(sd, str(path))
    loaded = load_file(str(path))
    assert loaded.keys() == sd.keys() and all(torch.equal(loaded[k], v) for k, v in sd.items())
    trained = _weights(model)
    with torch.no_grad():
        want = model(IDS).logits
    for other in LAYOUTS:
        target = _fresh(other)  # the untrained snapshot of the same selection
        target.load_state_dict(loaded)
        got = _weights(target)
        assert all(torch.equal(got[k], w) for k, w in trained.items()), f"{layout} -> {other}"
        with torch.no_grad():
            assert rel_err(target(IDS).logits, want) <= 1e-6, f"{layout} -> {other}"
            assert rel_err(sparsify_fx.merge(target)(IDS).logits, want) <= 1e-5, f"{layout} -> {other}"


def test_save_pretrained_of_a_transformed_model(tmp_path):
    model = _fresh("view")
    _train(model, OPTIMIZERS["adamw"], IMPLEMENTATIONS["fused"])
    model.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / "model.safetensors"))
    sd = model.state_dict()
    for key in (f"{n}.weight" for n in _wrapped(model)):
        assert torch.equal(saved[key], sd[key])
