"""The test kit itself: each checker passes on correct code and fails, naming what differs, on wrong code."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sparsify_fx.codegen import rewrites as rw
from sparsify_fx.errors import ConfigError
from sparsify_fx.testing import assert_equivalent, check_kernel, check_pass


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)
        self.a.weight.requires_grad_(False)

    def forward(self, x, scale: float = 1.0):
        return {"y": self.b(F.silu(self.a(x))) * scale, "n": torch.tensor(3)}


X = torch.randn(4, 6)


# ---------------------------------------------------------------------------------------------------- assert_equivalent


def test_equivalent_models_pass_and_report_errors():
    torch.manual_seed(0)
    a = Net()
    b = copy.deepcopy(a)
    rep = assert_equivalent(a, b, (X,))
    assert set(rep.errors) == {"output[0]", "output[1]", "grad a.bias", "grad b.weight", "grad b.bias"}
    assert rep.max_error == 0.0
    # kwargs, and an input that requires grad gets its gradient compared too
    x = X.clone().requires_grad_()
    rep = assert_equivalent(a, b, {"x": x, "scale": 2.0})
    assert "grad input[0]" in rep.errors and x.grad is None  # no .grad is touched


def test_different_parameter_value_is_caught_by_name():
    torch.manual_seed(0)
    a = Net()
    b = copy.deepcopy(a)
    with torch.no_grad():
        b.b.bias[0] += 1e-2
    with pytest.raises(AssertionError, match=r"output\[0\]"):
        assert_equivalent(a, b, (X,))


def test_same_outputs_different_gradients_are_caught():
    torch.manual_seed(0)
    a = Net()

    class Detached(Net):
        def forward(self, x, scale: float = 1.0):
            h = F.silu(self.a(x))
            # same value, but the gradient of a.bias is cut off
            return {"y": self.b(h.detach() + 0 * h) * scale, "n": torch.tensor(3)}

    b = Detached()
    b.load_state_dict(a.state_dict())
    b.a.weight.requires_grad_(False)
    with pytest.raises(AssertionError, match="grad a.bias"):
        assert_equivalent(a, b, (X,))


def test_trainable_sets_must_match():
    torch.manual_seed(0)
    a = Net()
    b = copy.deepcopy(a)
    b.b.bias.requires_grad_(False)
    with pytest.raises(AssertionError, match=r"only in model_a \['grad b.bias'\]"):
        assert_equivalent(a, b, (X,))


def test_compiled_wrapper_parameters_match_by_name():
    torch.manual_seed(0)
    a = Net()
    torch._dynamo.reset()
    rep = assert_equivalent(a, torch.compile(a, backend="eager"), (X,))
    assert "grad b.weight" in rep.errors
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------- check_pass


def test_identity_pass_is_equivalent_and_unchanged():
    check = check_pass(lambda g: None, Net(), (X,), expect_change=False)
    assert len(check.before) == 1 and not check.changed
    assert "forward" in check.before[0] and "backward" in check.before[0]


def test_wrong_pass_is_caught():
    def double_the_first_gradient(g: rw.PartitionedGraphs) -> None:
        out = g.bw.graph.output_node()
        grads = list(out.args[0])
        i = next(i for i, n in enumerate(grads) if n is not None)
        with g.bw.graph.inserting_before(out):
            grads[i] = g.bw.graph.call_function(torch.ops.aten.mul.Tensor, (grads[i], 2.0))
        out.args = (tuple(grads),)

    with pytest.raises(AssertionError, match="grad"):
        check_pass(double_the_first_gradient, Net(), (X,))


def test_expect_change_catches_a_pass_that_stopped_matching():
    with pytest.raises(AssertionError, match="did not change any graph"):
        check_pass(lambda g: None, Net(), (X,), expect_change=True)


def test_forward_and_joint_passes():
    seen = []

    def count_joint_nodes(gm):
        # a joint-graph pass sees forward and backward in one graph, before partitioning
        seen.append(sum(1 for n in gm.graph.nodes if n.op == "call_function"))

    check = check_pass(count_joint_nodes, Net(), (X,), on="joint", expect_change=False)
    assert "joint" in check.before[0] and seen and seen[0] > 0

    def wrong_forward(gm):
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is torch.ops.aten.addmm.default:
                n.target = torch.ops.aten.mm.default  # forgets the bias
                n.args = n.args[1:]
                break
        gm.graph.lint()

    with pytest.raises(AssertionError):
        check_pass(wrong_forward, Net(), (X,), on="forward")
    with pytest.raises(ValueError, match="on="):
        check_pass(lambda g: None, Net(), (X,), on="sideways")


def test_no_backward_graph_is_an_error():
    frozen = Net().requires_grad_(False)
    with pytest.raises(AssertionError, match="no graph with a backward"):
        check_pass(lambda g: None, frozen, (X,))


# ---------------------------------------------------------------------------------------------------- check_kernel

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _scaled_add_kernel(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, (x + alpha * y).to(out_ptr.dtype.element_ty), mask=mask)


def scaled_add(x, y, alpha=0.5):
    out = torch.empty_like(x)
    n = x.numel()
    _scaled_add_kernel[(triton.cdiv(n, 16),)](x, y, out, n, alpha, BLOCK=16)
    return out


def test_check_kernel_accepts_a_correct_kernel_over_shapes_and_dtypes():
    shapes = [((5,), (5,)), ((3, 7), (3, 7)), ((33,), (33,))]  # 33: not a multiple of the block
    results = check_kernel(scaled_add, lambda x, y: x + 0.5 * y, shapes, dtypes=(torch.float32, torch.bfloat16))
    assert len(results) == 6
    assert all(err <= 1e-6 for _, dt, err in results if dt == torch.float32)


def test_check_kernel_rejects_a_wrong_kernel_and_custom_inputs():
    with pytest.raises(AssertionError, match=r"case \(\(33,\), \(33,\)\)"):
        check_kernel(lambda x, y: scaled_add(x, y, alpha=0.51), lambda x, y: x + 0.5 * y, [((33,), (33,))])

    def make(case, dtype, device, gen):
        (n,) = case
        return torch.randn(n, generator=gen).to(dtype=dtype, device=device), torch.ones(n, dtype=dtype, device=device)

    check_kernel(scaled_add, lambda x, y: x + 0.5 * y, [(9,)], make_inputs=make)


def test_check_kernel_without_gpu_or_interpreter_says_how_to_fix(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="TRITON_INTERPRET=1"):
        check_kernel(scaled_add, lambda x, y: x + 0.5 * y, [((4,), (4,))])


# ---------------------------------------------------------------------------------------------------- docs example


def drop_mul_by_one(g: rw.PartitionedGraphs) -> rw.PassResult:
    """The example pass of docs/testing_kit.md, kept here so the documented test keeps working."""
    res = rw.PassResult("drop_mul_by_one", False)
    for n in list(g.bw.graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten.mul.Tensor and n.args[1] == 1:
            x = n.args[0]
            if x.meta["val"].shape != n.meta["val"].shape:
                continue
            n.replace_all_uses_with(x)
            g.bw.graph.erase_node(n)
            res.changed = True
            res.notes.append(f"{n.name}: x * 1 removed")
    return res


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return (self.lin(x) * 1).tanh()


def test_docs_example_pass_fires_and_keeps_gradients():
    check = check_pass(drop_mul_by_one, Scaled(), (torch.randn(4, 8),), expect_change=True)
    before, after = check.before[0]["backward"], check.after[0]["backward"]
    assert after.count("aten.mul.Tensor") == before.count("aten.mul.Tensor") - 1
    assert check.results[0].changed


def test_docs_example_pass_leaves_broadcasting_multiplies_alone():
    class Broadcast(Scaled):
        def forward(self, x):
            return (self.lin(x) * torch.ones(3, 1, 1)).tanh()

    check_pass(drop_mul_by_one, Broadcast(), (torch.randn(4, 8),))


def test_check_kernel_on_a_repository_kernel():
    from sparsify_fx.codegen.kernels import delta_gemm as dg

    results = check_kernel(lambda x, w: dg.delta_gemm(x, w), lambda x, w: x @ w.T,
                           [((5, 12), (7, 12)), ((17, 9), (3, 9))], dtypes=(torch.float32, torch.bfloat16))
    assert len(results) == 4
