"""The custom-op contract: every sparsify op is registered through oplib.define_op, kernels import no private names,
and register_twin gives a kernel-backed op its reference's schema, fake kernel, autograd and autocast, lowers the
reference to it, and refuses an implementation whose arguments or outputs break the contract."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import sparsify_fx.ops  # noqa: F401  (registers the S²FT ops)
import sparsify_fx.passes.nm_ops  # noqa: F401  (registers the masked ops)
from sparsify_fx.codegen.lowering import lowering_for, register_twin
from sparsify_fx.errors import ConfigError, KernelError
from sparsify_fx.oplib import CONTRACTS, contract_of, define_op

KERNELS = Path(__file__).resolve().parents[1] / "codegen" / "kernels"
FAMILY = "oplib-test"  # a lowering family of its own, so these twins never reach the backend's triton table
_ids = itertools.count()


def _name(stem: str) -> str:
    return f"{stem}_{next(_ids)}"


def _masked_inputs(lead=(3,), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, 8, generator=g, requires_grad=True)
    w = torch.randn(6, 8, generator=g, requires_grad=True)
    mask = torch.rand(6, 8, generator=g) > 0.5
    b = torch.randn(6, generator=g, requires_grad=True)
    return x, w, mask, b


def test_every_sparsify_op_has_a_contract():
    from torch._library.custom_ops import OPDEFS

    import sparsify_fx.codegen.kernels.blocksparse  # noqa: F401
    import sparsify_fx.codegen.kernels.delta_gemm  # noqa: F401
    import sparsify_fx.codegen.kernels.nm_matmul  # noqa: F401
    import sparsify_fx.codegen.kernels.sliced_wgrad  # noqa: F401

    ours = {q.split("::")[1] for q in OPDEFS if q.startswith("sparsify::")}
    assert {"s2ft_linear", "s2ft_input_grad", "s2ft_weight_grad", "masked_linear", "nm_linear",
            "block_sparse_linear", "s2ft_linear_triton", "s2ft_input_grad_triton", "s2ft_weight_grad_triton",
            "nm_linear_triton", "block_sparse_linear_triton"} <= ours
    assert ours <= set(CONTRACTS), f"registered without define_op: {sorted(ours - set(CONTRACTS))}"
    # each kernel twin carries its reference's contract, object for object
    for twin, ref in [("nm_linear_triton", "nm_linear"), ("s2ft_linear_triton", "s2ft_linear"),
                      ("s2ft_weight_grad_triton", "s2ft_weight_grad")]:
        t, r = CONTRACTS[twin], CONTRACTS[ref]
        assert (t.fake, t.backward, t.setup_context, t.autocast, t.schema) == (
            r.fake, r.backward, r.setup_context, r.autocast, r.schema)


def test_kernels_import_no_private_names():
    for path in sorted(KERNELS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sparsify_fx"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{path.name} imports {private} from {node.module}"


def test_twin_shares_schema_fake_autograd_autocast_and_lowers_the_reference():
    seen_dtypes = []

    def masked_eager(x, weight, mask, bias, pruned_grad_scale=0.0):
        seen_dtypes.append(x.dtype)
        return F.linear(x, weight * mask, bias)

    name = _name("masked_linear_eager")
    ref = torch.ops.sparsify.masked_linear
    register_twin(ref, name, masked_eager, family=FAMILY)
    twin = getattr(torch.ops.sparsify, name)
    assert lowering_for(ref.default, FAMILY) is twin.default
    assert [(a.name, str(a.type)) for a in twin.default._schema.arguments] == [
        (a.name, str(a.type)) for a in ref.default._schema.arguments]

    x, w, mask, b = _masked_inputs()
    torch.library.opcheck(twin.default, (x, w, mask, b, 0.25))
    # the reference's autograd formula (Progressive Gradient Flow's scale), not autograd through the eager body
    y = twin(x, w, mask, b, 0.25)
    y_ref = ref(x, w, mask, b, 0.25)
    assert torch.equal(y, y_ref)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    grads = torch.autograd.grad(y, (x, w, b), gy)
    grads_ref = torch.autograd.grad(y_ref, (x, w, b), gy)
    assert all(torch.equal(g, r) for g, r in zip(grads, grads_ref))
    assert torch.count_nonzero(grads[1][~mask]) > 0  # the pruned weights got 0.25 of their gradient

    # the reference's autocast: the kernel itself receives bf16 inputs
    seen_dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert twin(x, w, mask, b, 0.0).dtype == torch.bfloat16
    assert seen_dtypes == [torch.bfloat16]


def test_twin_refuses_outputs_that_break_the_fake_kernel():
    def short_rows(x, weight, mask, bias, n, m, pruned_grad_scale=0.0):
        y = F.linear(x, weight * mask, bias)
        return y[..., :-1] if x.dim() == 3 else y  # wrong only for batched input

    def wrong_dtype(x, weight, mask, bias, n, m, pruned_grad_scale=0.0):
        return F.linear(x, weight * mask, bias).double()

    short = register_twin(torch.ops.sparsify.nm_linear, _name("nm_short"), short_rows, lower=False)
    wide = register_twin(torch.ops.sparsify.nm_linear, _name("nm_wide"), wrong_dtype, lower=False)
    x, w, mask, b = (t.detach() for t in _masked_inputs())
    assert torch.equal(short(x, w, mask, b, 2, 4), torch.ops.sparsify.nm_linear(x, w, mask, b, 2, 4))
    x3 = x.reshape(1, 3, 8)
    with pytest.raises(KernelError, match=r"returned \['float32\[1, 3, 5\]'\] .*promises \['float32\[1, 3, 6\]'\]"):
        short(x3, w, mask, b, 2, 4)
    with pytest.raises(KernelError, match=r"nm_wide_\d+ returned \['float64\[3, 6\]'\] but sparsify::nm_linear"):
        wide(x, w, mask, b, 2, 4)
    # the backend's inliner traces an op's implementation on fake tensors: that is no kernel run, so no check
    from torch._library.custom_ops import OPDEFS

    with torch._subclasses.fake_tensor.FakeTensorMode():
        traced = OPDEFS[wide._qualname]._init_fn(torch.empty(3, 8), torch.empty(6, 8), torch.empty(6, 8), None, 2, 4)
    assert traced.dtype == torch.float64


def test_twin_refuses_arguments_other_than_the_reference():
    def renamed(x, w, mask, bias, n, m, pruned_grad_scale=0.0):
        return F.linear(x, w * mask, bias)

    name = _name("nm_renamed")
    with pytest.raises(KernelError, match=r"takes \(x, w, mask.*has \(x, weight, mask"):
        register_twin(torch.ops.sparsify.nm_linear, name, renamed)
    assert not hasattr(torch.ops.sparsify, name) and name not in CONTRACTS


def test_contract_lookup_and_duplicate_definition_errors():
    assert contract_of("nm_linear") is contract_of(torch.ops.sparsify.nm_linear.default)
    assert contract_of(sparsify_fx.ops.s2ft_linear) is contract_of("sparsify::s2ft_linear")
    with pytest.raises(ConfigError, match="aten::mm is not a sparsify op"):
        contract_of(torch.ops.aten.mm)
    with pytest.raises(ConfigError, match="already registered"):
        define_op("nm_linear", fake=lambda x: x)
