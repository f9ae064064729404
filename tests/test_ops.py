"""S²FT custom ops: schema/fake/autograd registration (opcheck), exact forward and gradients against autograd through
F.linear, what backward keeps alive, autocast, and one-node tracing under torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import sparsify_fx.ops as ops
from sparsify_fx.errors import ConfigError

s2ft_linear = torch.ops.sparsify.s2ft_linear
s2ft_weight_grad = torch.ops.sparsify.s2ft_weight_grad

# (out, in, leading dims of x, [(start, length), ...]) for dim 0 (rows of out) and dim 1 (columns of in)
CASES = {
    0: [(7, 5, (3,), [(2, 3)]), (9, 6, (2, 3), [(6, 2), (0, 3)]), (4, 8, (), [(0, 4)])],
    1: [(7, 5, (3,), [(1, 2)]), (6, 9, (2, 3), [(7, 2), (0, 3)]), (5, 4, (), [(3, 1)])],
}


def _make(out, in_, lead, spans, dim, *, bias, views, x_grad=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out, in_, generator=g, dtype=dtype)
    b = torch.randn(out, generator=g, dtype=dtype) if bias else None
    x = torch.randn(*lead, in_, generator=g, dtype=dtype).requires_grad_(x_grad)
    starts = [s for s, _ in spans]
    if views:
        # like nn.Parameter(W.data[s:s+k]): a leaf sharing W's storage, so W already holds the block's values
        blocks = [weight.narrow(dim, s, k).detach().requires_grad_() for s, k in spans]
    else:
        blocks = [(weight.narrow(dim, s, k) + 0.5 * torch.randn(weight.narrow(dim, s, k).shape, generator=g,
                                                                dtype=dtype)).requires_grad_() for s, k in spans]
    return x, weight, b, blocks, starts


def _assembled(weight, blocks, dim, starts):
    full = weight.detach().clone()
    for blk, s in zip(blocks, starts):
        full.narrow(dim, s, blk.size(dim)).copy_(blk.detach())
    return full


def _all_cases():
    for dim, cases in CASES.items():
        for case in cases:
            yield dim, case


CASE_IDS = [f"dim{d}-{c[0]}x{c[1]}-lead{len(c[2])}-{len(c[3])}blk" for d, c in _all_cases()]


@pytest.mark.parametrize("dim,case", list(_all_cases()), ids=CASE_IDS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("views", [True, False], ids=["view", "separate"])
def test_opcheck_s2ft_linear(dim, case, bias, views):
    out, in_, lead, spans = case
    x, weight, b, blocks, starts = _make(out, in_, lead, spans, dim, bias=bias, views=views)
    torch.library.opcheck(s2ft_linear, (x, weight, b, blocks, dim, starts))


@pytest.mark.parametrize(
    "dim,x_cols,starts,lengths,sliced",
    [(0, 5, [5, 0], [2, 3], False), (1, 5, [3, 0], [2, 2], False), (1, 4, [3, 0], [2, 2], True)],
    ids=["rows", "cols", "cols-packed"],
)
def test_opcheck_weight_and_input_grad(dim, x_cols, starts, lengths, sliced):
    g = torch.Generator().manual_seed(1)
    grad_y = torch.randn(2, 3, 7, generator=g)
    x = torch.randn(2, 3, x_cols, generator=g)
    torch.library.opcheck(s2ft_weight_grad, (grad_y, x, dim, starts, lengths, sliced))
    weight = torch.randn(7, 5, generator=g)
    blocks = [torch.randn(2, 5, generator=g)] if dim == 0 else [torch.randn(7, 2, generator=g)]
    torch.library.opcheck(torch.ops.sparsify.s2ft_input_grad, (grad_y, weight, blocks, dim, [1]))


def test_weight_grad_packed_equals_unpacked():
    g = torch.Generator().manual_seed(2)
    grad_y, x = torch.randn(4, 7, generator=g), torch.randn(4, 9, generator=g)
    full = s2ft_weight_grad(grad_y, x, 1, [6, 1], [3, 2], False)
    packed = s2ft_weight_grad(grad_y, torch.cat([x[:, 6:9], x[:, 1:3]], 1), 1, [6, 1], [3, 2], True)
    ref = ops.s2ft_weight_grad_reference(grad_y, x, 1, [6, 1], [3, 2])
    for a, b, r in zip(full, packed, ref):
        torch.testing.assert_close(a, r, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(b, r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dim,case", list(_all_cases()), ids=CASE_IDS)
@pytest.mark.parametrize("views", [True, False], ids=["view", "separate"])
def test_forward_and_grads_match_full_linear(dim, case, views):
    out, in_, lead, spans = case
    x, weight, b, blocks, starts = _make(out, in_, lead, spans, dim, bias=True, views=views, seed=3)
    y = s2ft_linear(x, weight, b, blocks, dim, starts)

    full = _assembled(weight, blocks, dim, starts).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = F.linear(x_ref, full, b)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)

    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(4))
    y.backward(grad_y)
    y_ref.backward(grad_y)

    def rel(a, b):
        return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()

    assert rel(x.grad, x_ref.grad) <= 1e-5
    for blk, s in zip(blocks, starts):
        assert rel(blk.grad, full.grad.narrow(dim, s, blk.size(dim))) <= 1e-5
    # the reference agrees too (it is what other tests lean on)
    torch.testing.assert_close(ops.s2ft_linear_reference(x, weight, b, blocks, dim, starts), y_ref,
                               rtol=1e-6, atol=1e-6)


def test_view_blocks_take_zero_copy_path_and_separate_blocks_do_not():
    x, weight, b, blocks, starts = _make(6, 5, (2,), [(1, 2)], 0, bias=False, views=True)
    assert ops.assemble_weight(weight, blocks, 0, starts) is weight
    # same storage but the wrong place (a view of rows 2:4 declared at start 1) must not be mistaken for in place
    shifted = [weight.narrow(0, 2, 2).detach()]
    assert ops.assemble_weight(weight, shifted, 0, [1]) is not weight
    torch.testing.assert_close(ops.assemble_weight(weight, shifted, 0, [1]), _assembled(weight, shifted, 0, [1]))
    x, weight, b, blocks, starts = _make(6, 5, (2,), [(1, 2)], 1, bias=False, views=False)
    assert ops.assemble_weight(weight, blocks, 1, starts) is not weight


def test_weight_and_bias_get_no_grad():
    x, weight, b, blocks, starts = _make(6, 5, (2,), [(1, 2)], 0, bias=True, views=False)
    weight.requires_grad_()
    b.requires_grad_()
    s2ft_linear(x, weight, b, blocks, 0, starts).sum().backward()
    assert weight.grad is None and b.grad is None
    assert blocks[0].grad is not None and x.grad is not None


def test_no_blocks_is_plain_linear():
    x, weight, b, _, _ = _make(6, 5, (2,), [], 0, bias=True, views=False)
    y = s2ft_linear(x, weight, b, [], 0, [])
    torch.testing.assert_close(y, F.linear(x, weight, b), rtol=1e-6, atol=1e-6)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(2, 6) @ weight)


def _saved_during_forward(fn):
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn()
    return y, saved


def _same_memory(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


@pytest.mark.parametrize("x_grad", [True, False])
def test_column_blocks_save_only_the_x_slices(x_grad):
    x, weight, b, blocks, starts = _make(6, 9, (2, 3), [(7, 2), (0, 3)], 1, bias=True, views=False, x_grad=x_grad)
    y, saved = _saved_during_forward(lambda: s2ft_linear(x, weight, b, blocks, 1, starts))
    assert not any(_same_memory(t, x) for t in saved), "x itself must not be kept alive"
    assert not any(t.shape == x.shape for t in saved), "no copy of the full x either"
    packed = [t for t in saved if t.shape == (2, 3, 5)]
    assert len(packed) == 1 and packed[0].is_contiguous()
    torch.testing.assert_close(packed[0], torch.cat([x[..., 7:9], x[..., 0:3]], -1).detach())
    # with x frozen, nothing but the packed slice is needed (no weight, no blocks)
    if not x_grad:
        assert len(saved) == 1
    y.sum().backward()
    assert blocks[0].grad is not None


def test_row_blocks_save_x_and_frozen_blocks_save_nothing_of_x():
    x, weight, b, blocks, starts = _make(6, 5, (4,), [(1, 2)], 0, bias=False, views=False, x_grad=False)
    _, saved = _saved_during_forward(lambda: s2ft_linear(x, weight, b, blocks, 0, starts))
    assert len(saved) == 1 and saved[0] is x
    for blk in blocks:
        blk.requires_grad_(False)
    x.requires_grad_()
    _, saved = _saved_during_forward(lambda: s2ft_linear(x, weight, b, blocks, 0, starts))
    assert not any(t is x or t.shape == x.shape for t in saved)
    xs, weight, b, blocks, starts = _make(6, 5, (4,), [(1, 2)], 1, bias=False, views=False)
    for blk in blocks:
        blk.requires_grad_(False)
    _, saved = _saved_during_forward(lambda: s2ft_linear(xs, weight, b, blocks, 1, starts))
    assert not any(t.shape[:-1] == xs.shape[:-1] for t in saved), "no x slice when no block trains"


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dim", [0, 1])
def test_no_input_grad_computed_for_frozen_x(dim):
    x, weight, b, blocks, starts = _make(6, 5, (4,), [(1, 2)], dim, bias=True, views=False, x_grad=False)
    y = s2ft_linear(x, weight, b, blocks, dim, starts)
    with _OpLog() as log:
        y.sum().backward()
    assert "sparsify.s2ft_weight_grad.default" in log.ops
    assert not any("s2ft_input_grad" in name for name in log.ops)
    assert x.grad is None
    # and with x trainable, the input grad is one op
    x.requires_grad_()
    y = s2ft_linear(x, weight, b, blocks, dim, starts)
    with _OpLog() as log:
        y.sum().backward()
    assert log.ops.count("sparsify.s2ft_input_grad.default") == 1


@pytest.mark.parametrize("dim", [0, 1])
def test_bf16_autocast_close_to_fp32(dim):
    spans = [(1, 3)] if dim == 0 else [(2, 4)]
    x, weight, b, blocks, starts = _make(16, 24, (2, 8), spans, dim, bias=True, views=False, seed=7)
    y32 = s2ft_linear(x, weight, b, blocks, dim, starts)
    y32.sum().backward()
    g32 = [x.grad.clone(), blocks[0].grad.clone()]
    x.grad = None
    blocks[0].grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y16 = s2ft_linear(x, weight, b, blocks, dim, starts)
    assert y16.dtype == torch.bfloat16
    y16.float().sum().backward()
    # bf16 keeps 8 mantissa bits: a 24-term dot product lands within ~2% of its scale
    tol = dict(rtol=3e-2, atol=3e-2 * y32.abs().max().item())
    torch.testing.assert_close(y16.float(), y32, **tol)
    assert blocks[0].grad.dtype == torch.float32 and x.grad.dtype == torch.float32
    for got, want in zip([x.grad, blocks[0].grad], g32):
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


def test_compile_aot_traces_single_nodes():
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def keep(name):
        def compiler(gm, _inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    backend = aot_autograd(fw_compiler=keep("fw"), bw_compiler=keep("bw"))
    x, weight, b, blocks, starts = _make(6, 5, (3,), [(1, 2)], 1, bias=True, views=False)

    def f(x, blk):
        return torch.ops.sparsify.s2ft_linear(x, weight, b, [blk], 1, starts).relu()

    torch._dynamo.reset()
    y = torch.compile(f, backend=backend, fullgraph=True)(x, blocks[0])
    y.sum().backward()
    fw_targets = [str(n.target) for n in graphs["fw"].graph.nodes if n.op == "call_function"]
    bw_targets = [str(n.target) for n in graphs["bw"].graph.nodes if n.op == "call_function"]
    assert fw_targets.count("sparsify.s2ft_linear.default") == 1
    assert not any("mm" in t or "addmm" in t for t in fw_targets), "the linear must stay one opaque node"
    assert bw_targets.count("sparsify.s2ft_weight_grad.default") == 1
    assert bw_targets.count("sparsify.s2ft_input_grad.default") == 1

    x_ref = x.detach().clone().requires_grad_()
    blk_ref = blocks[0].detach().clone().requires_grad_()
    ops.s2ft_linear_reference(x_ref, weight, b, [blk_ref], 1, starts).relu().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blocks[0].grad, blk_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "shapes,dim,starts,match",
    [
        ([(2, 5), (2, 5)], 0, [1, 2], "overlap"),
        ([(2, 4)], 0, [0], "must have size 5"),
        ([(5, 2)], 1, [0], "must have size 6"),
        ([(2, 5)], 0, [5], "outside"),
        ([(2, 5)], 0, [-1], "outside"),
        ([(2, 5)], 2, [0], "dim must be"),
        ([(2, 5)], 0, [0, 3], "starts"),
    ],
)
def test_bad_blocks_raise_config_error(shapes, dim, starts, match):
    weight = torch.randn(6, 5)
    blocks = [torch.randn(s) for s in shapes]
    x = torch.randn(3, 5)
    with pytest.raises(ConfigError, match=match) as info:
        s2ft_linear(x, weight, None, blocks, dim, starts)
    assert isinstance(info.value, ValueError)


def test_bad_x_bias_and_dtype_raise_config_error():
    weight = torch.randn(6, 5)
    blk = [torch.randn(2, 5)]
    with pytest.raises(ConfigError, match="in_features"):
        s2ft_linear(torch.randn(3, 4), weight, None, blk, 0, [0])
    with pytest.raises(ConfigError, match="bias"):
        s2ft_linear(torch.randn(3, 5), weight, torch.randn(5), blk, 0, [0])
    with pytest.raises(ConfigError, match="dtype"):
        s2ft_linear(torch.randn(3, 5), weight, None, [blk[0].double()], 0, [0])
    # the fake kernel validates too, so tracing fails with the same message rather than a shape error later
    with torch._subclasses.fake_tensor.FakeTensorMode():
        with pytest.raises(ConfigError, match="overlap"):
            s2ft_linear(torch.randn(3, 5), torch.randn(6, 5), None, [torch.randn(2, 5)] * 2, 0, [0, 1])


def test_ops_never_import_triton_and_kernels_import_without_it():
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import sys
        import sparsify_fx.ops
        assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules), "ops.py imported triton"
        sys.modules["triton"] = None  # from here on `import triton` raises ImportError
        import torch
        from sparsify_fx.codegen.kernels import delta_gemm, sliced_wgrad
        from sparsify_fx.codegen.lowering import lowering_for
        from sparsify_fx.errors import ConfigError
        assert not sliced_wgrad.HAS_TRITON and not delta_gemm.HAS_TRITON
        assert lowering_for(torch.ops.sparsify.s2ft_weight_grad.default, "triton") is None
        assert lowering_for(torch.ops.sparsify.s2ft_linear.default, "triton") is None
        try:
            sliced_wgrad.sliced_wgrad(torch.randn(3, 4), torch.randn(3, 5), 0, 0, 2)
        except ConfigError as e:
            assert "needs triton" in str(e)
        else:
            raise AssertionError("no error without triton")
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
