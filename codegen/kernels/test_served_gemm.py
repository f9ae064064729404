"""Served GEMM kernel (Triton interpreter on CPU) against the ATen op ``sparsify::served_linear``.

Tolerances: fp32 as the ATen path up to summation order (rtol 1e-5, atol 1e-5 x scale). bf16: the kernel folds each
segment's delta into the weight tile and rounds it to bf16, the ATen path rounds the base GEMM and the delta GEMM
separately; both are compared with the fp32 answer at bf16 accuracy (rtol and atol 2^-6 x scale).
"""

from __future__ import annotations

import pytest
import torch

from sparsify_fx.codegen.kernels import served_gemm as sg
from sparsify_fx.codegen.lowering import lowering_for
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes import serving

pytestmark = pytest.mark.skipif(not sg.HAS_TRITON, reason="triton not installed")


def _problem(batch, tokens, in_, out, placements, dtype, seed, base_rows=1, bias=True):
    """Random Linear, batch and adapters: ``placements`` one per adapter (True: output features), rows shuffled,
    ``base_rows`` rows without an adapter."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, in_, generator=g).to(dtype)
    w = torch.randn(out, in_, generator=g).to(dtype)
    b = torch.randn(out, generator=g).to(dtype) if bias else None
    perm = torch.randperm(batch, generator=g)
    served = perm[: batch - base_rows]
    cuts = torch.linspace(0, served.numel(), len(placements) + 1).round().long().tolist()
    starts, ends = cuts[:-1], cuts[1:]
    index, matrix = [], []
    for i, scatter in enumerate(placements):
        k = 3 + 2 * i
        index.append(torch.randperm(out if scatter else in_, generator=g)[:k])  # unsorted
        shape = (in_, k) if scatter else (k, out)
        matrix.append((0.3 * torch.randn(shape, generator=g)).to(dtype))
    return (x, w, b, served, starts, ends, list(placements), index, matrix)


def _fp32(args):
    return tuple([t.float() for t in a] if isinstance(a, list) and a and isinstance(a[0], torch.Tensor)
                 and a[0].is_floating_point() else a.float() if isinstance(a, torch.Tensor)
                 and a.is_floating_point() else a for a in args)


CASES = {  # (batch, tokens, in, out, placements, base rows)
    "mixed": (6, 5, 45, 33, (True, False, True), 1),
    "input-only-decode": (5, 1, 70, 40, (False, False), 0),
    "one-adapter-many-base": (4, 9, 20, 50, (True,), 3),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_matches_the_aten_op(case, dtype):
    batch, tokens, in_, out, placements, base_rows = CASES[case]
    args = _problem(batch, tokens, in_, out, placements, dtype, seed=list(CASES).index(case), base_rows=base_rows,
                    bias=case != "input-only-decode")
    y = torch.ops.sparsify.served_linear_triton(*args)
    assert y.shape == (batch, tokens, out) and y.dtype == dtype
    ref = torch.ops.sparsify.served_linear(*args)
    if dtype == torch.float32:
        scale = ref.abs().max().item()
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5 * scale)
    else:
        exact = torch.ops.sparsify.served_linear(*_fp32(args))
        scale = exact.abs().max().item()
        for got in (y, ref):
            torch.testing.assert_close(got.float(), exact, rtol=2**-6, atol=2**-6 * scale)
    # the deltas act on their rows only: base rows equal the plain Linear, adapter rows differ from it
    x, w, b = args[:3]
    plain = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    served = set(args[3].tolist())
    for r in range(batch):
        same = torch.allclose(y[r].float(), plain[r], rtol=2**-6, atol=2**-6 * plain.abs().max().item())
        assert same == (r not in served), r


def test_opcheck_and_lowering():
    args = _problem(4, 3, 24, 18, (True, False), torch.float32, seed=9)
    torch.library.opcheck(torch.ops.sparsify.served_linear_triton, args)
    torch.library.opcheck(torch.ops.sparsify.served_linear, args)
    ops = torch.ops.sparsify
    assert lowering_for(ops.served_linear.default, "triton") is ops.served_linear_triton.default


def test_hooks_served_rows_equal_the_kernel():
    """What the serving hooks add to a Linear's output equals the kernel's one-pass answer (fp32)."""
    batch, tokens, in_, out = 6, 4, 32, 24
    x, w, b, rows, starts, ends, scatter, index, matrix = _problem(batch, tokens, in_, out, (True, False, True),
                                                                   torch.float32, seed=11)
    names = ["__base__"] * batch
    adapters = {}
    for i, (s, e) in enumerate(zip(starts, ends)):
        for r in rows[s:e].tolist():
            names[r] = f"a{i}"
        placement = serving.Placement.OUTPUT if scatter[i] else serving.Placement.INPUT
        adapters[f"a{i}"] = serving.ServedDelta(placement, index[i], matrix[i])
    segments = serving.Segments.group(names)
    hooked = serving.sparse_delta(x, torch.nn.functional.linear(x, w, b), segments, adapters)
    starts2 = [segments.bounds[f"a{i}"][0] for i in range(3)]
    ends2 = [segments.bounds[f"a{i}"][1] for i in range(3)]
    fused = sg.served_gemm(x, w, b, segments.rows, starts2, ends2, scatter, index, matrix)
    torch.testing.assert_close(fused, hooked, rtol=1e-5, atol=1e-5 * hooked.abs().max().item())


def test_bad_arguments_raise():
    x, w, b, rows, starts, ends, scatter, index, matrix = _problem(3, 2, 16, 12, (True,), torch.float32, seed=3)
    with pytest.raises(ConfigError, match="one entry per adapter"):
        sg.served_gemm(x, w, b, rows, starts, ends + [2], scatter, index, matrix)
    with pytest.raises(ConfigError, match="must be"):
        sg.served_gemm(x, w, b, rows, starts, ends, scatter, index, [matrix[0].t()])
    with pytest.raises(ConfigError, match=r"\[out, in\]"):
        sg.served_gemm(x, w.t(), b, rows, starts, ends, scatter, index, matrix)
