"""Sliced weight-gradient kernel (Triton interpreter on CPU) against its PyTorch reference and torch.optim.

Tolerances: fp32 inputs accumulate in fp32 like the reference, only the summation order differs: rtol 1e-5 and
atol 1e-5 x the result's scale. bf16 gradients are rounded once to bf16 on store (the interpreter truncates, so up
to one bf16 ulp): rtol 2^-7. A fused update is compared with torch.optim applied to the fp32 reference gradient.
"""

from __future__ import annotations

import pytest
import torch

from sparsify_fx.codegen.kernels import sliced_wgrad as sw
from sparsify_fx.codegen.lowering import lowering_for
from sparsify_fx.errors import ConfigError

pytestmark = pytest.mark.skipif(not sw.HAS_TRITON, reason="triton not installed")

# (tokens T, out, in): none a multiple of the 32-wide interpreter tiles, one spanning several tiles per dim
SHAPES = [(45, 17, 33), (7, 40, 9), (70, 5, 66)]


def _rand(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _slice_for(dim, out, in_, seed):
    size = out if dim == 0 else in_
    g = torch.Generator().manual_seed(seed)
    length = int(torch.randint(1, size + 1, (1,), generator=g))
    start = int(torch.randint(0, size - length + 1, (1,), generator=g))
    return start, length


def _close(got, want, dtype):
    scale = want.abs().max().item() + 1e-12
    if dtype == torch.float32:
        torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5 * scale)
    else:
        torch.testing.assert_close(got.float(), want, rtol=2**-7, atol=1e-5 * scale)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dim", [0, 1], ids=["rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gradient_matches_reference(shape, dim, dtype):
    T, out, in_ = shape
    seed = hash((shape, dim)) % 1000
    grad_y, x = _rand(T, out, seed=seed, dtype=dtype), _rand(T, in_, seed=seed + 1, dtype=dtype)
    start, length = _slice_for(dim, out, in_, seed + 2)
    got = sw.sliced_wgrad(grad_y, x, dim, start, length)
    assert got.shape == ((length, in_) if dim == 0 else (out, length)) and got.dtype == dtype
    want = sw.sliced_wgrad_reference(grad_y, x, dim, start, length)
    # the reference is the plain formula on the full matrices
    full = grad_y.float().t() @ x.float()
    torch.testing.assert_close(want, full.narrow(dim, start, length), rtol=1e-5, atol=1e-4)
    _close(got, want, dtype)


def test_strided_leading_dims_and_packed_x():
    # x is a transposed (non-contiguous) view with two leading dims; the slice is read through its strides
    grad_y = _rand(3, 5, 17, seed=10)
    x = _rand(3, 33, 5, seed=11).transpose(1, 2)
    want = sw.sliced_wgrad_reference(grad_y, x.reshape(15, 33), 1, 20, 13)
    _close(sw.sliced_wgrad(grad_y, x, 1, 20, 13), want, torch.float32)
    packed = torch.cat([x[..., 2:4], x[..., 20:33]], dim=-1)
    _close(sw.sliced_wgrad(grad_y, packed, 1, 2, 13), want, torch.float32)
    # no tokens: the gradient is zero
    assert torch.equal(sw.sliced_wgrad(grad_y[:0], x[:0], 1, 20, 13), torch.zeros(17, 13))
    # a row slice of a non-contiguous grad_y
    gy_t = _rand(17, 15, seed=12).t()
    _close(sw.sliced_wgrad(gy_t, x.reshape(15, 33), 0, 4, 9),
           sw.sliced_wgrad_reference(gy_t, x.reshape(15, 33), 0, 4, 9), torch.float32)


def _block_view(dim, out, in_, start, length, seed, dtype=torch.float32):
    """The trainable block as a view into a frozen W (non-contiguous for columns), plus W itself."""
    W = _rand(out, in_, seed=seed, dtype=dtype)
    return W, W.narrow(dim, start, length)


def _untouched(W, W0, dim, start, length):
    mask = torch.ones_like(W, dtype=torch.bool)
    mask.narrow(dim, start, length).fill_(False)
    assert torch.equal(W[mask], W0[mask]), "only the selected slice may change"


SGD_CASES = {
    "plain": dict(lr=0.1),
    "wd": dict(lr=0.05, weight_decay=0.1),
    "momentum-first": dict(lr=0.1, momentum=0.9, weight_decay=0.01),
    "momentum-dampened": dict(lr=0.1, momentum=0.8, dampening=0.3),
    "nesterov": dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.02),
}


@pytest.mark.parametrize("case", list(SGD_CASES))
@pytest.mark.parametrize("dim", [0, 1], ids=["rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_sgd_matches_torch_optim(case, dim, dtype):
    T, out, in_ = 45, 17, 33
    hp = SGD_CASES[case]
    seed = 100 + list(SGD_CASES).index(case) * 7 + dim
    grad_y, x = _rand(T, out, seed=seed, dtype=dtype), _rand(T, in_, seed=seed + 1, dtype=dtype)
    start, length = _slice_for(dim, out, in_, seed + 2)
    W, block = _block_view(dim, out, in_, start, length, seed + 3)
    W0 = W.clone()
    grad = sw.sliced_wgrad_reference(grad_y, x, dim, start, length)

    ref = block.detach().clone().requires_grad_()
    opt = torch.optim.SGD([ref], foreach=False, **hp)
    first = case != "momentum-dampened"
    buf = None
    if hp.get("momentum", 0):
        buf = torch.zeros_like(block) if first else _rand(*block.shape, seed=seed + 4)
        if not first:
            opt.state[ref]["momentum_buffer"] = buf.clone()
    ref.grad = grad.clone()
    opt.step()

    update = sw.SGDUpdate(momentum_buffer=buf, first_step=first, **hp)
    assert sw.sliced_wgrad(grad_y, x, dim, start, length, param=block, update=update) is None
    torch.testing.assert_close(block, ref.detach(), rtol=1e-5, atol=1e-6)
    if buf is not None:
        torch.testing.assert_close(buf, opt.state[ref]["momentum_buffer"], rtol=1e-5, atol=1e-6)
    _untouched(W, W0, dim, start, length)
    # the reference update agrees with torch.optim as well
    p2 = W0.narrow(dim, start, length).clone()
    buf2 = None if buf is None else (torch.zeros_like(p2) if first else _rand(*block.shape, seed=seed + 4))
    sw.sliced_wgrad_reference(grad_y, x, dim, start, length, param=p2,
                              update=sw.SGDUpdate(momentum_buffer=buf2, first_step=first, **hp))
    torch.testing.assert_close(p2, ref.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("step", [1, 5])
@pytest.mark.parametrize("dim", [0, 1], ids=["rows", "cols"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_adamw_matches_torch_optim(step, dim, dtype):
    T, out, in_ = 45, 17, 33
    hp = dict(lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05)
    seed = 200 + step * 3 + dim
    grad_y, x = _rand(T, out, seed=seed, dtype=dtype), _rand(T, in_, seed=seed + 1, dtype=dtype)
    start, length = _slice_for(dim, out, in_, seed + 2)
    W, block = _block_view(dim, out, in_, start, length, seed + 3)
    W0 = W.clone()
    if step == 1:
        m, v = torch.zeros_like(block), torch.zeros_like(block)
    else:  # state left by earlier steps
        m, v = _rand(*block.shape, seed=seed + 4), _rand(*block.shape, seed=seed + 5).square() * 10
    ref = block.detach().clone().requires_grad_()
    opt = torch.optim.AdamW([ref], foreach=False, **hp)
    if step > 1:
        opt.state[ref] = {"step": torch.tensor(float(step - 1)), "exp_avg": m.clone(), "exp_avg_sq": v.clone()}
    ref.grad = sw.sliced_wgrad_reference(grad_y, x, dim, start, length)
    opt.step()

    update = sw.AdamWUpdate(exp_avg=m, exp_avg_sq=v, step=step, **hp)
    sw.sliced_wgrad(grad_y, x, dim, start, length, param=block, update=update)
    torch.testing.assert_close(m, opt.state[ref]["exp_avg"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, opt.state[ref]["exp_avg_sq"], rtol=1e-5, atol=1e-5)
    # the step is lr-sized: compare the change against lr, not the parameter's magnitude
    torch.testing.assert_close(block - W0.narrow(dim, start, length), ref.detach() - W0.narrow(dim, start, length),
                               rtol=1e-4, atol=1e-5 * hp["lr"])
    _untouched(W, W0, dim, start, length)


def test_bf16_parameter_and_state():
    # bf16 param and state: the kernel updates in fp32 and rounds once on store; torch.optim on bf16 rounds at
    # every intermediate op, so compare with an fp32 optimizer and allow two bf16 ulps of the parameter
    T, out, in_ = 45, 17, 33
    grad_y, x = _rand(T, out, seed=300, dtype=torch.bfloat16), _rand(T, in_, seed=301, dtype=torch.bfloat16)
    W, block = _block_view(1, out, in_, 4, 11, seed=302, dtype=torch.bfloat16)
    m, v = torch.zeros_like(block), torch.zeros_like(block)
    ref = block.detach().float().clone().requires_grad_()
    opt = torch.optim.AdamW([ref], lr=1e-2, foreach=False)
    ref.grad = sw.sliced_wgrad_reference(grad_y, x, 1, 4, 11)
    opt.step()
    sw.sliced_wgrad(grad_y, x, 1, 4, 11, param=block, update=sw.AdamWUpdate(exp_avg=m, exp_avg_sq=v, step=1,
                                                                            lr=1e-2))
    torch.testing.assert_close(block.float(), ref.detach(), rtol=2**-7, atol=1e-3)
    torch.testing.assert_close(m.float(), opt.state[ref]["exp_avg"], rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize(
    "dim,x_cols,starts,lengths,sliced",
    [(0, 33, [10, 0], [7, 3], False), (1, 33, [30, 1], [3, 20], False), (1, 23, [30, 1], [3, 20], True)],
    ids=["rows", "cols", "cols-packed"],
)
def test_triton_op_matches_aten_op_and_is_registered(dim, x_cols, starts, lengths, sliced):
    grad_y, x = _rand(2, 9, 17, seed=400), _rand(2, 9, x_cols, seed=401)
    args = (grad_y, x, dim, starts, lengths, sliced)
    got = torch.ops.sparsify.s2ft_weight_grad_triton(*args)
    want = torch.ops.sparsify.s2ft_weight_grad(*args)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        _close(a, b, torch.float32)
    torch.library.opcheck(torch.ops.sparsify.s2ft_weight_grad_triton, args)
    assert (lowering_for(torch.ops.sparsify.s2ft_weight_grad.default, "triton")
            is torch.ops.sparsify.s2ft_weight_grad_triton.default)


def test_bad_arguments_raise_config_error():
    grad_y, x = _rand(5, 7, seed=500), _rand(5, 9, seed=501)
    with pytest.raises(ConfigError, match="outside"):
        sw.sliced_wgrad(grad_y, x, 0, 5, 3)
    with pytest.raises(ConfigError, match="tokens"):
        sw.sliced_wgrad(grad_y, x[:4], 1, 0, 3)
    with pytest.raises(ConfigError, match="momentum_buffer"):
        sw.sliced_wgrad(grad_y, x, 1, 0, 3, param=torch.zeros(7, 3), update=sw.SGDUpdate(lr=0.1, momentum=0.9))
    with pytest.raises(ConfigError, match="param"):
        sw.sliced_wgrad(grad_y, x, 1, 0, 3, param=torch.zeros(3, 7), update=sw.SGDUpdate(lr=0.1))
    with pytest.raises(ConfigError, match="step"):
        sw.sliced_wgrad(grad_y, x, 1, 0, 3, param=torch.zeros(7, 3),
                        update=sw.AdamWUpdate(exp_avg=torch.zeros(7, 3), exp_avg_sq=torch.zeros(7, 3), step=0))
