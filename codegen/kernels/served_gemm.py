"""Mixed-adapter Linear in one launch: base GEMM plus each row's S²FT adapter delta, rows grouped by adapter (SGMV).

The Triton twin of ``sparsify::served_linear`` (:func:`sparsify_fx.passes.serving.served_linear`): ``y = x @ W.T +
b`` for a batch whose rows use different adapters, each adding its sparse delta on its rows only. The host groups
the batch's tokens into segments, one per adapter plus one for the rows served by the base alone, and cuts each
segment into tiles of ``BLOCK_M`` tokens; a program owns one tile of one segment times ``BLOCK_N`` output features.
So every program serves one adapter, and folds that adapter's delta into the ``W`` tile in registers before the
dot, as :mod:`delta_gemm` does for one adapter:

* selected output features (``scatter``): ``W_eff[o, :] = W[o, :] + D[:, pos[o]]`` for the tile's outputs ``o``;
* selected input features: ``W_eff[:, i] = W[:, i] + D[pos[i], :]`` for the K-step's inputs ``i``;

``pos`` being the segment's dense position map (-1 where its adapter selects nothing). The flops are the base
GEMM's (no second GEMM per adapter, no re-read of ``x`` or ``y``), and the folded tile is rounded to the input
dtype before the dot, as merging the adapter in that dtype would be.

Expected GPU bound (``M`` tokens, ``S`` segments present, ``e`` bytes/element, ``k_s`` units of adapter ``s``):
flops ``2*M*in*out``, the plain GEMM's. Bytes ``M*in*e`` (x) + ``M*out*e`` (y) + ``out*in*e`` per token tile (W,
L2-resident across tiles) + per token tile of segment ``s`` its delta, ``k_s*in`` or ``k_s*out`` values (masked
gathers; tiles whose outputs hold no selected feature skip them). Prefill (``M`` in the thousands): compute-bound
on an H100 like the base GEMM (arithmetic intensity ~``M``, far above the ~300 flop/byte ridge in bf16), the
deltas adding ``sum_s k_s/out`` (or ``/in``) to the W bytes, about 3 % per adapter at S²FT's 1 %. Decode (``M`` = a
few rows): memory-bound on reading W once per segment tile, so ``S`` adapters read W up to ``S`` times from L2
(HBM once); the unavoidable extra is reading each present adapter's delta once.

Host work per call (not in the kernel): the packed deltas (one small copy of the present adapters' values), the
position maps and the tile table, plus one device sync to find the base rows (``nonzero``). Imports without triton
(``HAS_TRITON`` False; the launcher then raises). Importing it registers ``sparsify::served_linear_triton`` as the
``"triton"`` lowering of ``sparsify::served_linear``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sparsify_fx.codegen.kernels._gemm import gemm_launch_options
from sparsify_fx.codegen.lowering import import_triton, register_twin, require_triton
from sparsify_fx.passes import serving

triton, tl = import_triton()
HAS_TRITON = triton is not None

__all__ = ["HAS_TRITON", "served_gemm"]

# segment kinds: what the segment's adapter selects
_BASE, _OUTPUT, _INPUT = 0, 1, 2


if HAS_TRITON:
    from sparsify_fx.codegen.kernels._gemm import dot_folded, store_tile

    @triton.jit
    def _served_gemm_kernel(
        x_ptr, w_ptr, b_ptr, y_ptr, d_ptr, pos_ptr, seg_rows_ptr,
        tile_seg_ptr, tile_off_ptr, seg_row0_ptr, seg_len_ptr, seg_kind_ptr, seg_doff_ptr,
        T, IN, OUT, POSW,
        stride_xt, stride_xi, stride_wo, stride_wi, stride_yt, stride_yo,
        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        seg = tl.load(tile_seg_ptr + pid_m)
        off = tl.load(tile_off_ptr + pid_m)
        row0 = tl.load(seg_row0_ptr + seg)
        length = tl.load(seg_len_ptr + seg)  # the segment's tokens
        kind = tl.load(seg_kind_ptr + seg)
        doff = tl.load(seg_doff_ptr + seg).to(tl.int64)
        j = off + tl.arange(0, BLOCK_M)  # token j of the segment: batch row seg_rows[row0 + j // T], token j % T
        mask_m = j < length
        brow = tl.load(seg_rows_ptr + row0 + j // T, mask=mask_m, other=0).to(tl.int64)
        tok = brow * T + j % T
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = rn < OUT
        opos = tl.load(pos_ptr + seg * POSW + rn, mask=mask_n, other=-1)
        opos = tl.where(kind == 1, opos, -1)  # an input-feature segment's map is over inputs
        tile_has_rows = tl.max(opos, axis=0) >= 0  # most output tiles hold no selected feature: skip the gathers
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, IN, BLOCK_K):
            rk = k0 + tl.arange(0, BLOCK_K)
            mask_k = rk < IN
            x = tl.load(x_ptr + tok[:, None] * stride_xt + rk[None, :] * stride_xi,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            w = tl.load(w_ptr + rn[None, :] * stride_wo + rk[:, None] * stride_wi,
                        mask=mask_n[None, :] & mask_k[:, None], other=0.0).to(tl.float32)  # w[k, n] = W[n, k]
            if tile_has_rows:  # output features: packed D as [k_s, IN]
                dmask = (opos >= 0)[None, :] & mask_k[:, None]
                w += tl.load(d_ptr + doff + opos[None, :] * IN + rk[:, None], mask=dmask, other=0.0)
            if kind == 2:  # input features: packed D as [k_s, OUT]
                ipos = tl.load(pos_ptr + seg * POSW + rk, mask=mask_k, other=-1)
                dmask = (ipos >= 0)[:, None] & mask_n[None, :]
                w += tl.load(d_ptr + doff + ipos[:, None] * OUT + rn[None, :], mask=dmask, other=0.0)
            acc = dot_folded(acc, x, w, x_ptr, UPCAST, INPUT_PRECISION)
        store_tile(y_ptr, b_ptr, acc, tok, rn, mask_m, mask_n, stride_yt, stride_yo, HAS_BIAS)


def served_gemm(x: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor, starts: list[int], ends: list[int],
                scatter: list[bool], index: list[Tensor], matrix: list[Tensor], *, tf32: bool = False) -> Tensor:
    """``sparsify::served_linear`` in one Triton launch; same arguments (see
    :func:`sparsify_fx.passes.serving.served_linear`), ``y`` in ``x``'s dtype.

    Args:
        x: ``[batch, ..., in]``.
        weight: ``[out, in]``, any strides.
        bias: ``[out]`` or None.
        rows, starts, ends, scatter, index, matrix: the batch rows grouped by adapter and each adapter's delta.
        tf32: let the dot use TF32 on fp32 inputs (GPU only).

    Example:
        >>> x, w = torch.ones(2, 3, 16), torch.zeros(20, 16)
        >>> y = served_gemm(x, w, None, torch.tensor([1]), [0], [1], [True], [torch.tensor([2])],
        ...                 [torch.ones(16, 1)])  # TRITON_INTERPRET=1 on CPU
        >>> y[1, 0, 2].item(), y[0].abs().sum().item()
        (16.0, 0.0)
    """
    require_triton("served_gemm", HAS_TRITON, x.device)
    serving._served_linear_check(x, weight, starts, ends, scatter, index, matrix)
    out, in_ = weight.shape
    batch = x.shape[0]
    x2 = x.reshape(-1, in_)
    tokens = x2.shape[0] // batch if batch else 0
    y = torch.empty((x2.shape[0], out), dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y.reshape(*x.shape[:-1], out)
    dev = x.device
    # segments: each adapter with rows in the batch, then the base rows (those no adapter claims)
    live = [i for i, (s, e) in enumerate(zip(starts, ends)) if e > s]
    claimed = torch.zeros(batch, dtype=torch.bool, device=dev)
    for i in live:
        claimed[rows[starts[i]:ends[i]]] = True
    base_rows = (~claimed).nonzero().flatten()
    seg_rows = torch.cat([rows[starts[i]:ends[i]] for i in live] + [base_rows]).to(torch.int32)
    counts = [ends[i] - starts[i] for i in live] + [int(base_rows.numel())]
    kinds = [_OUTPUT if scatter[i] else _INPUT for i in live] + [_BASE]
    # deltas packed in fp32 as [k, in] (output features) or [k, out] (input features), one offset per segment
    packed = [(matrix[i].t() if scatter[i] else matrix[i]).reshape(-1).float() for i in live]
    offsets, total = [], 0
    for p in packed:
        offsets.append(total)
        total += p.numel()
    d = torch.cat(packed) if packed else torch.zeros(1, dtype=torch.float32, device=dev)
    posw = max(in_, out)
    pos = torch.full((len(counts), posw), -1, dtype=torch.int32, device=dev)
    for s, i in enumerate(live):
        pos[s, index[i]] = torch.arange(index[i].numel(), dtype=torch.int32, device=dev)
    opts = gemm_launch_options(dev, tf32)
    block_m = opts["BLOCK_M"]
    tile_seg, tile_off, row0 = [], [], []
    first = 0
    for s, n in enumerate(counts):
        row0.append(first)
        first += n
        for off in range(0, n * tokens, block_m):
            tile_seg.append(s)
            tile_off.append(off)
    if not tile_seg:
        return y.reshape(*x.shape[:-1], out)

    def ints(v: list[int]) -> Tensor:
        return torch.tensor(v, dtype=torch.int32, device=dev)

    grid = (len(tile_seg), triton.cdiv(out, opts["BLOCK_N"]))
    _served_gemm_kernel[grid](
        x2, weight, bias if bias is not None else weight, y, d, pos, seg_rows,
        ints(tile_seg), ints(tile_off), ints(row0), ints([n * tokens for n in counts]), ints(kinds),
        ints(offsets + [0]),
        tokens, in_, out, posw,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, **opts,
    )
    return y.reshape(*x.shape[:-1], out)


def _served_linear_triton(x: Tensor, weight: Tensor, bias: Tensor | None, rows: Tensor, starts: list[int],
                          ends: list[int], scatter: list[bool], index: list[Tensor], matrix: list[Tensor]) -> Tensor:
    """Triton twin of ``sparsify::served_linear``: :func:`served_gemm`, one launch."""
    return served_gemm(x, weight, bias, rows, starts, ends, scatter, index, matrix)


served_linear_triton = register_twin(torch.ops.sparsify.served_linear, "served_linear_triton", _served_linear_triton,
                                     lower=HAS_TRITON)
