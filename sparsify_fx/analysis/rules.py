"""The op registry: one rule per ATen op, saying how channel spaces flow through it.

A rule receives a :class:`RuleContext` and returns the output's dims (a list of dims for a tensor,
a list of such lists for a tuple). It states *equalities* (``ctx.unify``) for dims that must be
permuted together, *structure* through reshape/split/cat (done by the space table), and *pins* for
anything it cannot prove equivariant. Ops without a rule are pinned wholesale by the engine, with
the op's name as the reason: sound before clever.

Rules are keyed by ATen overload packet (``aten.linear``), so the same rule serves the
``torch.export`` graphs (high-level ops) and AOTAutograd graphs (decomposed ops) alike.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch

from sparsify_fx.analysis.context import RuleContext, Value
from sparsify_fx.analysis.spaces import Dim, SpaceTable, as_size
from sparsify_fx.errors import AnalysisError

aten = torch.ops.aten
Rule = Callable[[RuleContext], Value]

RULES: dict[Any, Rule] = {}


# alias packet -> canonical packet (aten.multiply -> aten.mul): an alias computes exactly what its canonical op
# does, with the same argument names, so it is looked up under the canonical op's rule and never has its own
ALIASES: dict[Any, Any] = {}


def register(*ops: Any) -> Callable[[Rule], Rule]:
    """Register a rule for ATen overload packets (all overloads) or single overloads.

    Args:
        *ops: overload packets (``aten.linear``) or single overloads (``aten.max.dim``). An alias
            (``aten.multiply``) is refused: register its canonical op, the alias resolves to it.

    Example::

        @register(aten.my_pointwise)
        def _mine(ctx: RuleContext) -> Value:
            return list(ctx.dims(ctx.arg("self")))
    """

    def deco(fn: Rule) -> Rule:
        for op in ops:
            packet = getattr(op, "overloadpacket", op)
            if packet in ALIASES:
                raise AnalysisError(
                    f"cannot register a rule for {packet}: it is an alias of {ALIASES[packet]}, whose rule it uses; "
                    f"register {ALIASES[packet]} instead"
                )
            RULES[op] = fn
        return fn

    return deco


# Custom ops (torch.library, other libraries' namespaces) by qualified schema name: their OpOverload objects may
# not exist when the rule is registered (the library registers them on import), so they are keyed by name.
CUSTOM_RULES: dict[str, Rule] = {}


def register_custom(*names: str) -> Callable[[Rule], Rule]:
    """Register a rule for custom ops by qualified name (``"transformers::grouped_mm_fallback"``).

    Args:
        *names: ``namespace::op`` schema names; a name without ``::`` or registered twice is refused.

    Example::

        @register_custom("mylib::fused_mlp")
        def _fused_mlp(ctx: RuleContext) -> Value: ...
    """

    def deco(fn: Rule) -> Rule:
        for name in names:
            if "::" not in name or name in CUSTOM_RULES:
                raise AnalysisError(f"custom-op rule name {name!r} must be 'namespace::op' and registered once")
            CUSTOM_RULES[name] = fn
        return fn

    return deco


def register_alias(alias: str, canonical: str) -> None:
    """Make ``aten.<alias>`` use the rule of ``aten.<canonical>``; checked when registered.

    An alias this torch build lacks is skipped (older and newer releases differ); a canonical op
    that does not exist or has no rule, or an alias that has a rule of its own, raises at import,
    so a typo in the table never silently pins an op.

    Args:
        alias: the alias's ATen name (``"multiply"``).
        canonical: the ATen name of the op it stands for (``"mul"``), which must have a rule.

    Example::

        register_alias("multiply", "mul")
        assert rule_for(torch.ops.aten.multiply.Tensor) is rule_for(torch.ops.aten.mul.Tensor)
    """
    target = getattr(aten, canonical, None)
    if target is None or target not in RULES:
        missing = "has no rule" if target is not None else "does not exist"
        raise AnalysisError(
            f"alias aten.{alias} names aten.{canonical}, which {missing}; "
            f"register a rule for aten.{canonical} first or fix the alias table"
        )
    if not hasattr(aten, alias):
        return
    packet = getattr(aten, alias)
    if packet in RULES:
        raise AnalysisError(
            f"aten.{alias} has a rule of its own and is listed as an alias of aten.{canonical}: keep one"
        )
    ALIASES[packet] = target


def rule_for(target: Any) -> Rule | None:
    """The rule for an op: its overload's, its packet's, its functional form's (``add_`` -> ``add``),
    each through the alias table (``multiply_`` -> ``multiply`` -> ``mul``); None if it has none.

    Args:
        target: an FX node's target (an ``OpOverload``, or a Python callable such as ``operator.getitem``).

    Example::

        assert rule_for(torch.ops.aten.multiply_.Tensor) is rule_for(torch.ops.aten.mul.Tensor)
    """
    if target in RULES:
        return RULES[target]
    packet = getattr(target, "overloadpacket", None)
    if packet is None:
        return None
    for p in (packet, _functional(packet)):
        p = ALIASES.get(p, p)
        if p in RULES:
            return RULES[p]
    schema = getattr(target, "_schema", None)
    return CUSTOM_RULES.get(schema.name) if schema is not None else None


def _functional(packet: Any) -> Any:
    """The functional form of an in-place packet (add_ -> add), which moves spaces exactly as it
    does; any other packet is returned as is."""
    name = getattr(packet, "__name__", "")
    if name.endswith("_") and not name.startswith("_") and hasattr(aten, name[:-1]):
        return getattr(aten, name[:-1])
    return packet


def _packets(*names: str) -> list[Any]:
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


def _norm_dim(d: int, rank: int) -> int:
    return d + rank if d < 0 else d


def _dim_list(dim: int | Sequence[int], rank: int) -> list[int]:
    """A dim argument (one int or a list) as non-negative dims."""
    return [_norm_dim(d, rank) for d in (dim if isinstance(dim, list | tuple) else [dim])]


def _dim_arg(ctx: RuleContext, rank: int) -> int:
    """The op's single ``dim`` argument, non-negative."""
    return _norm_dim(ctx.arg("dim", 0), rank)


def _dims_acted_on(ctx: RuleContext, rank: int) -> set[int]:
    """The dims a reduction or order-dependent op acts along (its ``dim``, ``dims`` or ``axis``
    argument). None given, or an empty list, means every dim: ``sum(x)``, ``argmax(x)`` and
    ``roll(x, 1)`` act on the whole tensor."""
    dim = next((v for v in (ctx.arg(k) for k in ("dim", "dims", "axis")) if v is not None), None)
    if dim is None or dim == [] or dim == ():
        return set(range(rank))
    return set(_dim_list(dim, rank))


# ---------------------------------------------------------------------- pointwise
ACTIVATION_NAMES = (
    "relu",
    "gelu",
    "silu",
    "sigmoid",
    "tanh",
    "hardtanh",
    "leaky_relu",
    "elu",
    "softplus",
    "mish",
    "hardswish",
    "hardsigmoid",
    "relu6",
    "celu",
    "selu",
    "log_sigmoid",
)
ACTIVATIONS = set(_packets(*ACTIVATION_NAMES))
# One tensor in, same dims out. In-place forms (relu_) reach this rule through rule_for; ops that
# may take a second tensor (pow, clamp) are BINARY.
UNARY = _packets(
    *ACTIVATION_NAMES,
    "exp",
    "expm1",
    "log",
    "log1p",
    "neg",
    "abs",
    "sqrt",
    "rsqrt",
    "reciprocal",
    "cos",
    "sin",
    "erf",
    "square",
    "sign",
    "logit",
    "clamp_min",
    "clamp_max",
    "clone",
    "contiguous",
    "alias",
    "detach",
    "lift_fresh_copy",
    "to",
    "_to_copy",
    "type_as",
    "dropout",
    "feature_dropout",
    "alpha_dropout",
    "bitwise_not",
    "logical_not",
    "isnan",
    "isinf",
    "nan_to_num",
    "round",
    "floor",
    "ceil",
    "trunc",
    "frac",
    "sgn",
    "fill",
    "_conj",
    "positive",
    "threshold",
    "tan",
    "acos",
    "asin",
    "atan",
    "sinh",
    "cosh",
    "asinh",
    "acosh",
    "atanh",
)
# Softmax normalises over a dim: equivariant under any permutation of it, so it moves spaces as a
# pointwise op does.
SOFTMAX = _packets("softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax")


_DTYPE_FROM = set(_packets("type_as", "to"))


@register(*UNARY)
def _unary(ctx: RuleContext) -> Value:
    tensors = ctx.tensor_args()
    if len(tensors) > 1 and getattr(ctx.node.target, "overloadpacket", None) in _DTYPE_FROM:
        # type_as(x, other), x.to(other): only other's dtype (and device) is read, the values are x's, so other's
        # dims are not the output's (a [B, T, 1, 1] mask cast to a [B, T, H, D] query's dtype stays [B, T, 1, 1])
        return list(ctx.dims(tensors[0]) or [])
    if len(tensors) != 1:  # e.g. fill(Tensor, Tensor), clamp_min(Tensor, Tensor): broadcasting
        return _broadcast(ctx)
    x = ctx.dims(tensors[0])
    if _functional(getattr(ctx.node.target, "overloadpacket", None)) in ACTIVATIONS and x:
        # object tags survive unions: lets passes tell a gate projection from an up projection
        ctx.table.tag(x[-1], "act")
    return list(x)  # type: ignore[arg-type]


@register(*SOFTMAX)
def _softmax(ctx: RuleContext) -> Value:
    x = ctx.dims(ctx.tensor_args()[0])
    if x:  # its denominator reads the whole dim (see _mark_read_whole)
        _mark_read_whole(ctx, [x[_dim_arg(ctx, len(x))]])
    return _unary(ctx)


BINARY = _packets(
    "add",
    "sub",
    "mul",
    "div",
    "rsub",
    "maximum",
    "minimum",
    "pow",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "logical_and",
    "logical_or",
    "logical_xor",
    "__and__",
    "__or__",
    "__xor__",
    "bitwise_and",
    "bitwise_or",
    "bitwise_xor",
    "where",
    "masked_fill",
    "addcmul",
    "addcdiv",
    "lerp",
    "fmod",
    "remainder",
    "atan2",
    "copysign",
    "floor_divide",
    "hypot",
    "xlogy",
    "clamp",
    "_softmax_backward_data",
    "threshold_backward",
)


@register(*BINARY)
def _broadcast(ctx: RuleContext) -> Value:
    """Elementwise with broadcasting: aligned non-broadcast dims are one space."""
    out_shape = ctx.out_shape()
    out: list[Dim | None] = [None] * len(out_shape)
    for x in ctx.tensor_args():
        _broadcast_into(ctx, x, out, out_shape)
    return [d if d is not None else ctx.table.fresh_dim(s) for d, s in zip(out, out_shape)]


def _broadcast_into(ctx: RuleContext, x: Any, out: list[Dim | None], out_shape: list) -> None:
    """Align ``x``'s dims with the trailing dims of ``out``: each dim that is not broadcast is the
    space of its output dim (taken where that is still None, unified otherwise)."""
    dims = ctx.dims(x)
    if not dims:
        return
    shape = ctx.shape_of(x)
    for i, d in enumerate(dims):
        j = len(out) - len(dims) + i
        if j < 0 or (shape[i] == 1 and out_shape[j] != 1):
            continue  # broadcast: constant along this dim, so it carries no space
        if out[j] is None:
            out[j] = d
        else:
            ctx.unify(out[j], d)  # type: ignore[arg-type]


@register(*_packets("native_dropout"))
def _native_dropout(ctx: RuleContext) -> Value:
    x = ctx.dims(ctx.tensor_args()[0]) or []
    return [list(x), list(x)]


# ---------------------------------------------------------------------- constants
UNIFORM_FACTORIES = _packets(
    "zeros",
    "ones",
    "full",
    "empty",
    "new_zeros",
    "new_ones",
    "new_full",
    "new_empty",
    "zeros_like",
    "ones_like",
    "full_like",
    "empty_like",
    "scalar_tensor",
    "empty_strided",
    "new_empty_strided",
)


@register(*UNIFORM_FACTORIES)
def _uniform(ctx: RuleContext) -> Value:
    # Same value everywhere: invariant under any permutation, so fresh free spaces.
    return ctx.fresh(ctx.out_shape())


@register(
    *_packets(
        "arange",
        "rand",
        "randn",
        "randint",
        "rand_like",
        "randn_like",
        "randint_like",
        "bernoulli",
        "randperm",
        "linspace",
        "eye",
        "tril_indices",
        "triu_indices",
    )
)
def _varying_factory(ctx: RuleContext) -> Value:
    return ctx.fresh_like_output(f"values depend on position ({ctx.op_name()})")


@register(
    *_packets(
        "_assert_tensor_metadata",
        "sym_size",
        "sym_numel",
        "sym_stride",
        "_assert_scalar",
        "sym_constrain_range_for_size",
        "_assert_async",
        "sym_storage_offset",
    )
)
def _no_tensor(ctx: RuleContext) -> Value:
    return None


# ---------------------------------------------------------------------- reductions
def _mark_read_whole(ctx: RuleContext, dims: Sequence[Dim]) -> None:
    """A reduction (sum, mean, var, amax, softmax, ...) reads every unit of ``dims`` at once: permuting them is
    exact, removing units is not the same as zeroing their consumers' columns (the mean's count, the softmax's
    denominator, a q/k norm over all heads still see the removed units), so pruning must treat these spaces like
    the normalised hidden stream. Reductions over batch or sequence dims mark atoms no group is made of."""
    for d in dims:
        ctx.table.mark(d, "normalized")


@register(
    *_packets(
        "sum",
        "mean",
        "amax",
        "amin",
        "prod",
        "all",
        "any",
        "logsumexp",
        "var",
        "std",
        "norm",
        "linalg_vector_norm",
        "count_nonzero",
        "nansum",
        "nanmean",
        "aminmax",
    )
)
def _reduction(ctx: RuleContext) -> Value:
    # Reductions are invariant under permutations of the reduced dims.
    x = ctx.dims(ctx.tensor_args()[0]) or []
    reduced = _dims_acted_on(ctx, len(x))
    _mark_read_whole(ctx, [x[i] for i in reduced if i < len(x)])
    keep = bool(ctx.arg("keepdim", False))
    out = []
    for i, d in enumerate(x):
        if i not in reduced:
            out.append(d)
        elif keep:
            out.append(ctx.table.fresh_dim(1))
    val = ctx.out_val()
    return [list(out) for _ in val] if isinstance(val, list | tuple) else out  # aminmax: (min, max)


@register(*_packets("max", "min", "median", "mode", "kthvalue"))
def _reduction_with_indices(ctx: RuleContext) -> Value:
    val = ctx.out_val()
    x = ctx.dims(ctx.tensor_args()[0]) or []
    if isinstance(val, torch.Tensor) and len(ctx.tensor_args()) == 2:  # maximum-like overload
        return _broadcast(ctx)
    if isinstance(val, torch.Tensor) and val.dim() == 0:  # full reduction to a value
        return []
    dim = _dim_arg(ctx, len(x))
    # the indices output names positions in the reduced dim: not permutation invariant
    ctx.table.pin(x[dim], f"{ctx.op_name()} returns indices along this dim")
    keep = bool(ctx.arg("keepdim", False))
    out = [d if i != dim else ctx.table.fresh_dim(1) for i, d in enumerate(x) if i != dim or keep]
    return [out, list(out)] if isinstance(val, list | tuple) else out


@register(
    *_packets(
        "argmax",
        "argmin",
        "cumsum",
        "cumprod",
        "cummax",
        "cummin",
        "logcumsumexp",
        "sort",
        "argsort",
        "topk",
        "flip",
        "tril",
        "triu",
        "roll",
        "diff",
        "msort",
    )
)
def _order_dependent(ctx: RuleContext) -> Value:
    """Ops whose result depends on the order along some dims (all of them when no dim is given):
    those dims are pinned. They act on each slice along the other dims on its own, so every other
    dim passes to each output as the same space, whatever the acted dims become (topk's k, diff's
    n - 1, argmax dropping the dim)."""
    first, *joined = ctx.tensor_args()
    x, shape = ctx.dims(first) or [], ctx.shape_of(first)
    acted = _dims_acted_on(ctx, len(x))
    reason = f"{ctx.op_name()} depends on order along this dim"
    for d in acted:
        if d < len(x):
            ctx.table.pin(x[d], reason)
    kept = [j for j in range(len(x)) if j not in acted]
    for other in joined:  # diff's prepend/append: joined to the input along the acted dim
        od, oshape = ctx.dims(other) or [], ctx.shape_of(other)
        if len(od) != len(x) or any(oshape[j] != shape[j] for j in kept):
            ctx.table.pin_dims([*od, *x], f"{ctx.op_name()} joins tensors of unaligned shapes")
            continue
        for j in kept:
            ctx.unify(od[j], x[j])
        ctx.table.pin_dims([od[j] for j in acted], reason)

    def passed(v: Any) -> Value:
        if not isinstance(v, torch.Tensor):
            return None
        vshape = ctx.shape_of(v)
        src = range(len(x)) if len(vshape) == len(x) else kept if len(vshape) == len(kept) else None
        if src is None or any(vshape[i] != shape[j] for i, j in enumerate(src) if j not in acted):
            ctx.table.pin_dims(x, f"{ctx.op_name()} output of unexpected shape")
            return ctx.fresh(vshape, f"{ctx.op_name()} output")
        return [x[j] if vshape[i] == shape[j] else ctx.table.fresh_dim(vshape[i], reason) for i, j in enumerate(src)]

    val = ctx.out_val()
    return [passed(v) for v in val] if isinstance(val, list | tuple) else passed(val)


# ---------------------------------------------------------------------- linear algebra
@register(aten.linear)
def _linear(ctx: RuleContext) -> Value:
    x, w, b = ctx.arg("input"), ctx.arg("weight"), ctx.arg("bias")
    xd, wd = ctx.dims(x), ctx.dims(w)
    ctx.unify(xd[-1], wd[1])
    _weight_roles(ctx, w, 1, 0)
    if b is not None and ctx.dims(b):
        ctx.unify(ctx.dims(b)[0], wd[0])
    return list(xd[:-1]) + [wd[0]]


def _weight_roles(ctx: RuleContext, x: Any, contracted: int, free: int) -> None:
    ctx.role(x, contracted, "in")
    ctx.role(x, free, "out")


def _mm_core(ctx: RuleContext, a: Any, b: Any) -> list[Dim]:
    """[n, k] @ [k, m]: the contracted dims are one space."""
    ad, bd = ctx.dims(a), ctx.dims(b)
    ctx.unify(ad[1], bd[0])
    _weight_roles(ctx, a, 1, 0)
    _weight_roles(ctx, b, 0, 1)
    return [ad[0], bd[1]]


@register(aten.mm)
def _mm(ctx: RuleContext) -> Value:
    return _mm_core(ctx, ctx.arg("self"), ctx.arg("mat2"))


@register(aten.addmm)
def _addmm(ctx: RuleContext) -> Value:
    out = _mm_core(ctx, ctx.arg("mat1"), ctx.arg("mat2"))
    _broadcast_into(ctx, ctx.arg("self"), out, ctx.out_shape())  # type: ignore[arg-type]
    return out


def _bmm_core(ctx: RuleContext, a: Any, b: Any) -> list[Dim]:
    """[..., n, k] @ [..., k, m] with broadcasting batch dims."""
    ad, bd = ctx.dims(a), ctx.dims(b)
    ctx.unify(ad[-1], bd[-2])
    a_shape, b_shape = ctx.shape_of(a), ctx.shape_of(b)
    ab, bb = ad[:-2], bd[:-2]
    nb = max(len(ab), len(bb))
    batch: list[Dim] = []
    for j in range(nb):
        ia, ib = j - (nb - len(ab)), j - (nb - len(bb))
        da = ab[ia] if ia >= 0 and a_shape[ia] != 1 else None
        db = bb[ib] if ib >= 0 and b_shape[ib] != 1 else None
        if da is not None and db is not None:
            ctx.unify(da, db)
        d = da or db
        if d is None and ia >= 0 and ib >= 0 and a_shape[ia] == 1 == b_shape[ib]:
            d = _link_size_one(ctx, ab[ia], bb[ib])
        batch.append(d if d is not None else ctx.table.fresh_dim(1))
    if not ctx.is_state(a) and not ctx.is_state(b) and batch:
        _mark_attention_product(ctx, batch, ab, bb, [ad[-2]], [ad[-1]], [bd[-1]])
    return batch + [ad[-2], bd[-1]]


def _mark_attention_product(
    ctx: RuleContext,
    batch: Sequence[Dim],
    a_batch: Sequence[Dim],
    b_batch: Sequence[Dim],
    a_free: Sequence[Dim],
    contracted: Sequence[Dim],
    b_free: Sequence[Dim],
) -> None:
    """A batched product of two activations (attention scores, attention @ V, as bmm or einsum): batch dims are
    heads, and the rest are positions or dims within a head (q·kᵀ contracts the head dim, attn @ v yields it)."""
    t = ctx.table
    for d in batch:
        t.mark(d, "bmm_batch")
    if any(t.has_mark(d, "attn_key") for d in contracted):
        # probs @ v contracts the key positions of an earlier q·kᵀ: b is the values
        for d in b_batch:
            t.tag(d, "v")
        ones = [d for d in batch if t.size(d) == 1]
        # one head: every other batch dim is the batch itself (pinned: a model input), none a head of its own
        if ones and all(t.find(a).pins for d in batch if t.size(d) != 1 for a in t.expand_dim(d)):
            _one_head(ctx, ones, b_free)
    else:
        # q·kᵀ: name the operands' heads as SDPA does, so passes can tell q, k and v projections apart
        for d in a_batch:
            t.tag(d, "q")
        for d in b_batch:
            t.tag(d, "k")
        for d in b_free:
            t.mark(d, "attn_key")
    for d in (*a_free, *contracted, *b_free):
        t.mark(d, "head_dim")


ONE_HEAD = "one_head:"  # mark prefix of a one-head attention's head and value features, + the attention node's name


def _link_size_one(ctx: RuleContext, a: Dim, b: Dim) -> Dim | None:
    """Two size-1 dims that are one index of the same thing (both operands' head dim of a one-head attention): unify
    skips size-1 dims, which index nothing, so the atoms are linked directly to carry the head's tags and marks."""
    if len(a) != 1 or len(b) != 1:
        return None
    ctx.table.unify_atoms(a[0], b[0])
    return a


def _one_head(ctx: RuleContext, heads: Sequence[Dim], features: Sequence[Dim]) -> None:
    """Mark an attention with one head: its q, k and v head dims (size 1, linked) and the value features that its
    output carries to o. The report makes them one head unit: q/k/v rows hold the size-1 head (see
    ``_factor_one_head``), o's columns only the value features, as a merge ``[..., 1, D] -> [..., D]`` drops the 1.
    The mark names the node, so the head and the features of one attention pair up."""
    t = ctx.table
    atoms = [d[0] for d in heads if len(d) == 1]
    if not atoms:
        return
    for a in atoms[1:]:
        t.unify_atoms(atoms[0], a)
    mark = f"{ONE_HEAD}{ctx.node.name}"
    t.find(atoms[0]).marks.add(mark)
    for d in features:
        t.mark(d, mark)


@register(aten.bmm)
def _bmm(ctx: RuleContext) -> Value:
    return _bmm_core(ctx, ctx.arg("self"), ctx.arg("mat2"))


@register(aten.baddbmm)
def _baddbmm(ctx: RuleContext) -> Value:
    out = _bmm_core(ctx, ctx.arg("batch1"), ctx.arg("batch2"))
    _broadcast_into(ctx, ctx.arg("self"), out, ctx.out_shape())
    return out


@register(aten.matmul)
def _matmul(ctx: RuleContext) -> Value:
    a, b = ctx.arg("self"), ctx.arg("other")
    ad, bd = list(ctx.dims(a)), list(ctx.dims(b))
    if len(ad) == 1 and len(bd) == 1:
        ctx.unify(ad[0], bd[0])
        return []
    if len(bd) == 1:
        ctx.unify(ad[-1], bd[0])
        ctx.role(b, 0, "in")  # a vector operand has no free dim
        return ad[:-1]
    if len(ad) == 1:
        ctx.unify(ad[0], bd[-2])
        return bd[:-2] + [bd[-1]]
    if len(bd) == 2:
        _weight_roles(ctx, b, 0, 1)
    return _bmm_core(ctx, a, b)


def _einsum_without_ellipsis(eq: str, ranks: Sequence[int]) -> str:
    """The equation with each ``...`` spelled as letters of its own (LongT5's ``"...qhd,...khd->...hqk"``).

    The ellipsis dims broadcast as elementwise ops' do: aligned from the right, so an operand with fewer of
    them takes the last letters. The equation comes back unchanged where the ranks do not fit it.

    Args:
        eq: an explicit einsum equation without spaces.
        ranks: each operand's rank.

    Example::

        _einsum_without_ellipsis("...qd,...kd->...qk", [4, 3])   # "ÀÁqd,Ákd->ÀÁqk"
    """
    lhs, rhs = eq.split("->")
    specs = lhs.split(",")
    if len(specs) != len(ranks):
        return eq
    counts = [r - (len(s) - 3) if "..." in s else 0 for s, r in zip(specs, ranks)]
    if any(c < 0 for c in counts):
        return eq
    n = max(counts, default=0)
    # letters no equation uses (ATen's einsum accepts only [a-zA-Z]; this rule only needs distinct keys)
    fill = "".join(chr(0xC0 + k) for k in range(n))
    specs = [s.replace("...", fill[n - c :]) for s, c in zip(specs, counts)]
    return ",".join(specs) + "->" + rhs.replace("...", fill)


@register(aten.einsum)
def _einsum(ctx: RuleContext) -> Value:
    eq: str = ctx.arg("equation")
    operands = ctx.arg("tensors")
    if "..." in eq and "->" in eq:
        eq = _einsum_without_ellipsis(eq.replace(" ", ""), [len(ctx.shape_of(x)) for x in operands])
    if "..." in eq or "->" not in eq:
        ctx.pin_inputs("einsum with ellipsis or implicit output")
        return ctx.fresh_like_output("einsum with ellipsis or implicit output")
    lhs, rhs = eq.replace(" ", "").split("->")
    letters: dict[str, Dim] = {}
    used: list[dict[str, Dim]] = []  # per operand: its letters of size > 1
    ones: list[dict[str, Dim]] = []  # per operand: its letters of size 1
    for spec, x in zip(lhs.split(","), operands):
        dims, shape = ctx.dims(x) or [], ctx.shape_of(x)
        used.append({})
        ones.append({})
        for ch, d, s in zip(spec, dims, shape):
            if s == 1:
                ones[-1][ch] = d
                continue
            used[-1][ch] = d
            if ch in letters:
                ctx.unify(letters[ch], d)
            else:
                letters[ch] = d
    if len(used) == 2 and not any(ctx.is_state(x) for x in operands):
        # two activations multiplied with shared output letters is bmm spelled as einsum (CvT's
        # "bhlk,bhtk->bhlt" scores, "bhlt,bhtv->bhlv" mixing): the shared output letters are its heads
        a, b = used
        batch = [ch for ch in a if ch in b and ch in rhs]
        # a letter of size 1 in both operands and the output: a one-head attention's head (CvT's h)
        for ch, d in ones[0].items():
            if ch in ones[1] and ch in rhs and ch not in letters and (e := _link_size_one(ctx, d, ones[1][ch])):
                letters[ch] = e
                a[ch], b[ch] = d, ones[1][ch]
                batch.append(ch)
        if batch:
            _mark_attention_product(
                ctx, [letters[ch] for ch in batch], [a[ch] for ch in batch], [b[ch] for ch in batch],
                [d for ch, d in a.items() if ch not in b], [d for ch, d in a.items() if ch in b and ch not in rhs],
                [d for ch, d in b.items() if ch not in a],
            )
    return [letters[ch] if ch in letters else ctx.table.fresh_dim(1) for ch in rhs]


@register(*_packets("conv1d", "conv2d", "conv3d", "convolution", "_convolution"))
def _conv(ctx: RuleContext) -> Value:
    return _conv_core(ctx, bool(ctx.arg("transposed", False)))


@register(*_packets("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"))
def _conv_transpose(ctx: RuleContext) -> Value:
    return _conv_core(ctx, True)


def _conv_core(ctx: RuleContext, transposed: bool) -> Value:
    x, w, b = ctx.arg("input"), ctx.arg("weight"), ctx.arg("bias")
    xd, wd = ctx.dims(x), ctx.dims(w)
    groups = int(ctx.arg("groups", 1))
    t = ctx.table
    # kernel taps are positions: never permutable
    t.pin_dims(wd[2:], "convolution kernel positions")
    cin_w, cout_w = (wd[0], wd[1]) if transposed else (wd[1], wd[0])
    ctx.role(w, 0 if transposed else 1, "in")
    ctx.role(w, 1 if transposed else 0, "out")
    out_shape = ctx.out_shape()
    if groups == 1:
        ctx.unify(xd[1], cin_w)
        cout = cout_w
    else:
        # the input channels are `groups` blocks; each block feeds only its own block of outputs
        g, cin_g = t.fresh(groups), t.fresh(t.size(xd[1]) // groups)
        parts = None if transposed else _grouped_parts(t, xd[1], groups)
        if parts is None:
            ctx.unify(xd[1], (g, cin_g))
        if transposed:  # weight [C_in, C_out / groups, ...]
            ctx.unify(cin_w, (g, cin_g))
            cout = (g, *cout_w)
        elif parts is not None:
            # the input channels are a concatenation whose parts are whole groups (Zaya's [q | k] into a conv
            # grouped per head): each part is its own groups x in-channels, the in-channels of every group are the
            # weight's one in-dim, and the outputs are the same concatenation of groups x out-channels
            cout_g = t.fresh(out_shape[1] // groups)
            ctx.unify((cin_g,), cin_w)
            outs: list[Dim] = []
            for part in parts:
                g_k = t.fresh(part.size // cin_g.size)
                ctx.unify((part,), (g_k, cin_g))
                outs.append((g_k, cout_g))
            cout = t.concat(outs, "grouped convolution outputs")
            ctx.unify(cout_w, cout)
        else:  # weight [C_out, C_in / groups, ...]
            ctx.unify((cin_g,), cin_w)
            cout = (g, t.fresh(out_shape[1] // groups))
            ctx.unify(cout_w, cout)
    if b is not None and ctx.dims(b):
        ctx.unify(ctx.dims(b)[0], cout)
    # a depthwise conv (one input channel per group, one output per group) is channel-wise like a norm's
    # affine: the channels of the projections around it (a Mix-FFN's fc1 rows and fc2 columns) pass through
    # it and keep their kind; only a conv that mixes channels makes a space conv channels
    depthwise = groups > 1 and groups == t.size(xd[1]) == out_shape[1]
    if not depthwise:
        for d in (xd[1], cout, cin_w, cout_w):
            t.mark(d, "conv")
    spatial = ctx.fresh(out_shape[2:], "convolution output positions")
    t.pin_dims(xd[2:], "convolution input positions")
    return [xd[0], cout, *spatial]


def _grouped_parts(t: Any, channels: Dim, groups: int) -> list[Any] | None:
    """The parts of a channel dim that is one concatenation whose every part is a whole number of a grouped conv's
    groups, or None (a product, a part that splits a group, symbolic sizes: the plain ``groups x in`` unification)."""
    leaves = t.expand_dim(channels)
    size = t.size(channels)
    if len(leaves) != 1 or not isinstance(size, int) or size // groups <= 1:
        return None
    parts = _sum_parts(t, (leaves[0],))
    if parts is None or not all(isinstance(p.size, int) and p.size % (size // groups) == 0 for p in parts):
        return None
    return parts


@register(aten.embedding)
def _embedding(ctx: RuleContext) -> Value:
    w, idx = ctx.arg("weight"), ctx.arg("indices")
    wd, idd = ctx.dims(w), ctx.dims(idx) or []
    ctx.table.pin(wd[0], "embedding rows are selected by data (token ids)")
    # a table lookup, not a projection: calling it 'out' made ALBERT's factorised embedding space look
    # like an FFN whose up projection is the embedding (S²FT then tried to run an Embedding as a linear)
    ctx.role(w, 1, "embed")
    return list(idd) + [wd[1]]


# ---------------------------------------------------------------------- normalisation
def _per_element(ctx: RuleContext, names: Sequence[str], dims: Sequence[Dim]) -> None:
    """Parameters applied element by element (affine weight and bias, running statistics) carry
    the dims they are applied along, in order."""
    for name in names:
        for pd, d in zip(ctx.dims(ctx.arg(name)) or [], dims):
            ctx.unify(pd, d)


@register(*_packets("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm"))
def _layer_norm(ctx: RuleContext) -> Value:
    x = ctx.arg("input")
    xd = ctx.dims(x)
    k = len(ctx.arg("normalized_shape"))
    # the normalisation reduces over the last k dims (permutation invariant, but not invariant to removing
    # units: the statistics change, which pruning must know)
    _per_element(ctx, ("weight", "bias"), xd[-k:])
    for d in xd[-k:]:
        ctx.table.mark(d, "normalized")
    out = list(xd)
    val = ctx.out_val()
    if isinstance(val, list | tuple):
        stats = [list(xd[:-k]) + [ctx.table.fresh_dim(1) for _ in range(k)] for _ in val[1:]]
        return [out, *stats]
    return out


@register(
    *_packets(
        "batch_norm",
        "native_batch_norm",
        "_native_batch_norm_legit",
        "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit_functional",
        "instance_norm",
        "cudnn_batch_norm",
        "_batch_norm_impl_index",
        "_batch_norm_no_update",
        "_batch_norm_with_update",
        "_batch_norm_with_update_functional",
    )
)
def _batch_norm(ctx: RuleContext) -> Value:
    # per-channel statistics and affine parameters all carry the channel dim (dim 1)
    x = ctx.arg("input")
    xd = ctx.dims(x)
    ch = xd[1]
    _per_element(ctx, ("weight", "bias", "running_mean", "running_var"), [ch])
    ctx.table.mark(ch, "norm_channel")
    val = ctx.out_val()
    if isinstance(val, list | tuple):
        c = val[0].shape[1]
        return [list(xd)] + [
            [ch]
            if isinstance(v, torch.Tensor) and v.shape == (c,)
            else ctx.fresh_like(v, "batch-norm auxiliary output")
            for v in val[1:]
        ]
    return list(xd)


@register(*_packets("group_norm", "native_group_norm"))
def _group_norm(ctx: RuleContext) -> Value:
    x = ctx.arg("input")
    xd = ctx.dims(x)
    groups = int(ctx.arg("num_groups", ctx.arg("group", 1)))
    c = ctx.shape_of(x)[1]
    g = ctx.table.fresh(groups)
    per = ctx.table.fresh(c // groups)
    ctx.unify(xd[1], (g, per))
    ctx.table.mark(xd[1], "normalized")
    _per_element(ctx, ("weight", "bias"), [xd[1]])
    val = ctx.out_val()
    if isinstance(val, list | tuple):
        return [list(xd)] + [ctx.fresh_like(v, "group-norm statistics") for v in val[1:]]
    return list(xd)


# ---------------------------------------------------------------------- attention
@register(
    *_packets(
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_attention_math",
    )
)
def _sdpa(ctx: RuleContext) -> Value:
    q, k, v = ctx.arg("query"), ctx.arg("key"), ctx.arg("value")
    qd, kd, vd = ctx.dims(q), ctx.dims(k), ctx.dims(v)
    t = ctx.table
    # q·kᵀ contracts the head dim E; attention @ v maps key positions S to the value dim Ev
    ctx.unify(qd[-1], kd[-1])
    ctx.unify(kd[-2], vd[-2])
    hq, hk = ctx.shape_of(q)[-3] if len(qd) >= 3 else 1, ctx.shape_of(k)[-3] if len(kd) >= 3 else 1
    # object tags first (they survive the unions below): passes use them to find q/k/v projections
    for d, tag in ((qd, "q"), (kd, "k"), (vd, "v")):
        if len(d) >= 3:
            t.tag(d[-3], tag)
    if len(qd) >= 3:
        ctx.unify(kd[-3], vd[-3])
        if hq == hk:
            ctx.unify(qd[-3], kd[-3])
        else:
            # grouped-query attention: query head h reads kv head h // (hq / hk)
            group = t.fresh(hq // hk)
            ctx.unify(qd[-3], tuple(kd[-3]) + (group,))
        for d in (qd[-3], kd[-3]):
            t.mark(d, "head")
        if hq == hk == 1:
            _one_head(ctx, [qd[-3], kd[-3], vd[-3]], [vd[-1]])
        # batch dims broadcast like elementwise ops
        for i in range(len(qd) - 3):
            ctx.unify(qd[i], kd[i])
            ctx.unify(kd[i], vd[i])
    t.mark(qd[-1], "head_dim")
    t.mark(vd[-1], "head_dim")
    l_dim, s_dim = qd[-2], kd[-2]
    if ctx.arg("is_causal", False):
        t.pin(l_dim, "causal attention orders positions")
        t.pin(s_dim, "causal attention orders positions")
    out = list(qd[:-1]) + [vd[-1]]
    scores = list(qd[:-1]) + [s_dim]
    # the mask (attn_bias in the fused kernels' schemas) and a dropout mask act elementwise on the scores
    for name in ("attn_mask", "attn_bias", "dropout_mask"):
        if ctx.dims(ctx.arg(name)):
            _broadcast_into(ctx, ctx.arg(name), scores, ctx.shape_of(q)[:-1] + [ctx.shape_of(k)[-2]])
    val = ctx.out_val()
    if isinstance(val, list | tuple):
        lse = len(qd) - 1 if len(qd) >= 3 else None  # the rank of logsumexp: [..., H, L]
        return [out] + [
            list(qd[:-1])
            if isinstance(x, torch.Tensor) and x.dim() == lse
            else ctx.fresh_like(x, "attention auxiliary output")
            for x in val[1:]
        ]
    return out


# ---------------------------------------------------------------------- layout
@register(
    *_packets("view", "reshape", "_unsafe_view", "flatten", "unflatten", "_reshape_alias", "view_copy", "_reshape_copy",
              "view_as", "reshape_as")
)
def _reshape(ctx: RuleContext) -> Value:
    x = ctx.tensor_args()[0]
    out = ctx.table.reshape(ctx.dims(x) or [], ctx.out_shape())
    _factor_one_head(ctx.table, out)
    return out


def _factor_one_head(t: SpaceTable, out: list[Dim]) -> None:
    """``[..., C] -> [..., 1, C]`` views C as one head of C features, as ``[..., 2C] -> [..., 2, C]`` views it as two
    heads: C becomes the product ``1 x C``. The size-1 factor is the object attention rules then tag (q, k, v) and
    mark as the head, so the rows of a one-head attention keep a head inside them as with any head count (without
    it q and k rows are one undivided space, and RoPE ties q's to k's). A size-1 space has only the identity
    permutation, so the factoring adds no constraint."""
    if len(out) < 2 or t.size(out[-2]) != 1 or len(out[-1]) != 1:
        return
    r = t.find(out[-1][0])
    if r.ref is not None or not isinstance(r.size, int) or r.size == 1:
        return
    head, inner = t.refine(r, "prod", [1, r.size])  # type: ignore[misc]
    out[-2], out[-1] = (head,), (inner,)


@register(*_packets("transpose", "transpose_copy"))
def _transpose(ctx: RuleContext) -> Value:
    x = ctx.tensor_args()[0]
    d = list(ctx.dims(x) or [])
    n = len(d)
    a = _norm_dim(ctx.arg("dim0", ctx.arg("axis0", 0)), n)
    b = _norm_dim(ctx.arg("dim1", ctx.arg("axis1", 0)), n)
    d[a], d[b] = d[b], d[a]
    return d


@register(*_packets("t", "numpy_T", "t_copy"))
def _t(ctx: RuleContext) -> Value:
    d = list(ctx.dims(ctx.tensor_args()[0]) or [])
    return d[::-1]


@register(*_packets("mT", "mH", "adjoint"))
def _swap_last_two(ctx: RuleContext) -> Value:
    d = list(ctx.dims(ctx.tensor_args()[0]) or [])
    if len(d) >= 2:
        d[-2], d[-1] = d[-1], d[-2]
    return d


@register(*_packets("permute", "permute_copy"))
def _permute(ctx: RuleContext) -> Value:
    d = ctx.dims(ctx.tensor_args()[0]) or []
    order = _dim_list(ctx.arg("dims"), len(d))
    return [d[i] for i in order]


@register(aten.movedim)
def _movedim(ctx: RuleContext) -> Value:
    d = list(ctx.dims(ctx.tensor_args()[0]) or [])
    src, dst = ctx.arg("source"), ctx.arg("destination")
    src, dst = _dim_list(src, len(d)), _dim_list(dst, len(d))
    rest = [x for i, x in enumerate(d) if i not in src]
    out: list[Dim | None] = [None] * len(d)
    for s, t in zip(src, dst):
        out[t] = d[s]
    it = iter(rest)
    return [x if x is not None else next(it) for x in out]


@register(aten.unsqueeze)
def _unsqueeze(ctx: RuleContext) -> Value:
    d = list(ctx.dims(ctx.tensor_args()[0]) or [])
    pos = _dim_arg(ctx, len(d) + 1)
    return d[:pos] + [ctx.table.fresh_dim(1)] + d[pos:]


@register(aten.squeeze)
def _squeeze(ctx: RuleContext) -> Value:
    x = ctx.tensor_args()[0]
    d, shape = ctx.dims(x) or [], ctx.shape_of(x)
    dim = ctx.arg("dim", None)
    if dim is None:
        drop = {i for i, s in enumerate(shape) if s == 1}
    else:
        drop = {i for i in _dim_list(dim, len(d)) if shape[i] == 1}
    return [x for i, x in enumerate(d) if i not in drop]


@register(*_packets("expand", "expand_copy", "broadcast_to", "expand_as"))
def _expand(ctx: RuleContext) -> Value:
    x = ctx.tensor_args()[0]
    d, shape = ctx.dims(x) or [], ctx.shape_of(x)
    out_shape = ctx.out_shape()
    lead = len(out_shape) - len(d)
    out = [ctx.table.fresh_dim(s) for s in out_shape[:lead]]
    for i, (dd, s) in enumerate(zip(d, shape)):
        # an expanded size-1 dim is constant along it: a fresh, free space (GQA's repeat_kv)
        out.append(ctx.table.fresh_dim(out_shape[lead + i]) if s == 1 and out_shape[lead + i] != 1 else dd)
    return out


@register(aten.repeat)
def _repeat(ctx: RuleContext) -> Value:
    x = ctx.tensor_args()[0]
    d = ctx.dims(x) or []
    return _repeat_core(ctx, d, list(ctx.arg("repeats")))


@register(aten.repeat_interleave)
def _repeat_interleave(ctx: RuleContext) -> Value:
    x = ctx.arg("self")
    reps = ctx.arg("repeats")
    dim = ctx.arg("dim")
    if not isinstance(x, torch.fx.Node) or not isinstance(reps, int) or dim is None:
        ctx.pin_inputs("repeat_interleave with tensor repeats")
        return ctx.fresh_like_output("repeat_interleave with tensor repeats")
    d = list(ctx.dims(x) or [])
    i = _norm_dim(dim, len(d))
    d[i] = (*d[i], ctx.table.fresh(reps))  # out index = i * r + copy
    return d


@register(aten.select)
def _select(ctx: RuleContext) -> Value:
    x = ctx.tensor_args()[0]
    d = list(ctx.dims(x) or [])
    i = _dim_arg(ctx, len(d))
    if ctx.shape_of(x)[i] != 1:
        ctx.table.pin(d[i], "select picks a fixed index along this dim")
    return d[:i] + d[i + 1 :]


@register(aten.unbind)
def _unbind(ctx: RuleContext) -> Value:
    x = ctx.tensor_args()[0]
    d = list(ctx.dims(x) or [])
    i = _dim_arg(ctx, len(d))
    ctx.table.pin(d[i], "unbind picks fixed indices along this dim")
    rest = d[:i] + d[i + 1 :]
    return [list(rest) for _ in ctx.out_val()]


@register(aten.slice, aten.narrow)
def _slice(ctx: RuleContext) -> Value:
    x = ctx.tensor_args()[0]
    d = list(ctx.dims(x) or [])
    shape = ctx.shape_of(x)
    i = _dim_arg(ctx, len(d))
    out_len = ctx.out_shape()[i]
    if out_len == shape[i]:
        return d
    step = ctx.arg("step", 1)
    start = ctx.arg("start", 0)
    n = shape[i]
    if (isinstance(start, int) and isinstance(n, int) and isinstance(step, int) and 0 <= start < step
            and n % step == 0 and out_len == n // step):
        # x[start::step] is x viewed as [n / step, step] at minor position `start` (GPT-OSS's interleaved gate/up
        # columns): the major digit keeps its units, only the minor one is fixed
        major, minor = ctx.table.reshape([d[i]], [n // step, step])
        ctx.table.pin_dims([minor], "strided slice picks a fixed position within each step")
        d[i] = major
        return d
    if not isinstance(start, int) or not isinstance(shape[i], int) or step != 1:
        ctx.table.pin(d[i], "slice with symbolic bounds or a step")
        d[i] = ctx.table.fresh_dim(out_len, "slice with symbolic bounds or a step")
        return d
    start = min(max(start + shape[i] if start < 0 else start, 0), shape[i])  # clamped as aten.slice does
    d[i] = ctx.table.slice(d[i], start, out_len, "slice cuts inside a unit")
    return d


@register(
    *_packets(
        "split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split", "unsafe_split_with_sizes", "unsafe_chunk"
    )
)
def _split(ctx: RuleContext) -> Value:
    x = ctx.tensor_args()[0]
    d = ctx.dims(x) or []
    i = _dim_arg(ctx, len(d))
    parts = _sum_parts(ctx.table, d[i]) if i < len(d) else None
    sizes = [as_size(v.shape[i]) for v in ctx.out_val()]
    if parts is not None and [p.size for p in parts] == sizes:
        # splitting a concatenation at its own seams (JetMoE splits the expert outputs it concatenated by the same
        # data-dependent expert sizes): each piece is the part it was, whatever the symbolic sizes are
        return [[*d[:i], (p,), *d[i + 1 :]] for p in parts]
    outs = []
    start = 0
    for v in ctx.out_val():
        n = as_size(v.shape[i])
        od = list(d)
        if isinstance(n, int):
            od[i] = ctx.table.slice(d[i], start, n, "split cuts inside a unit")
            start += n
        else:
            ctx.table.pin(d[i], "split with symbolic sizes")
            od[i] = ctx.table.fresh_dim(n, "split with symbolic sizes")
        outs.append(od)
    return outs


def _sum_parts(t: SpaceTable, d: Dim) -> list[Any] | None:
    """The parts of a dim that is one concatenated space (a single atom refined as a sum), else None."""
    if len(d) != 1:
        return None
    root = t.find(d[0])
    return [t.find(c) for c in root.ref.children] if root.ref is not None and root.ref.kind == "sum" else None


@register(aten.cat)
def _cat(ctx: RuleContext) -> Value:
    xs = [x for x in ctx.arg("tensors") if isinstance(x, torch.fx.Node)]
    xs = [x for x in xs if ctx.shape_of(x) != [0]]  # legacy empty tensors take no part
    dims = [ctx.dims(x) or [] for x in xs]
    rank = len(dims[0])
    i = _dim_arg(ctx, rank)
    for dd in dims[1:]:  # other dims are aligned
        for j in range(rank):
            if j != i:
                ctx.unify(dims[0][j], dd[j])
    out = list(dims[0])
    out[i] = ctx.table.concat([dd[i] for dd in dims], "cat")
    return out


@register(aten.stack)
def _stack(ctx: RuleContext) -> Value:
    xs = [x for x in ctx.arg("tensors") if isinstance(x, torch.fx.Node)]
    dims = [ctx.dims(x) or [] for x in xs]
    for dd in dims[1:]:
        for a, b in zip(dims[0], dd):
            ctx.unify(a, b)
    i = _dim_arg(ctx, len(dims[0]) + 1)
    new = ctx.table.fresh_dim(len(xs), "stack: position of each stacked tensor")
    return list(dims[0][:i]) + [new] + list(dims[0][i:])


@register(aten.index_select)
def _index_select(ctx: RuleContext) -> Value:
    x = ctx.arg("self")
    d = list(ctx.dims(x) or [])
    i = _dim_arg(ctx, len(d))
    index = ctx.arg("index")
    picked = _constant_pick(ctx, d[i], index) if d else None
    if picked is not None:
        d[i] = picked
        return d
    # which entries of dim i land where is the indices' values: dim i is pinned; the output's dim i is the
    # index's own (0-d: one entry), as advanced indexing's is
    ctx.table.pin(d[i], "index_select with data-dependent indices")
    idd = ctx.dims(index) or []
    d[i] = idd[0] if idd else ctx.table.fresh_dim(ctx.out_shape()[i])
    return d


@register(aten.gather)
def _gather(ctx: RuleContext) -> Value:
    x, idx = ctx.arg("self"), ctx.arg("index")
    xd, idd = ctx.dims(x) or [], ctx.dims(idx) or []
    i = _dim_arg(ctx, len(xd))
    ctx.table.pin(xd[i], "gather with data-dependent indices")
    xs, ids = ctx.shape_of(x), ctx.shape_of(idx)
    for j in range(len(xd)):
        if j == i:
            continue
        if xs[j] == ids[j]:
            ctx.unify(xd[j], idd[j])
        else:  # a narrower index reads a prefix of this dim: which entries land there depends on order
            ctx.table.pin(xd[j], "gather reads a prefix along this dim")
            ctx.table.pin(idd[j], "gather reads a prefix along this dim")
    return list(idd)


@register(aten.index)
def _index(ctx: RuleContext) -> Value:
    """Advanced indexing ``x[..., idx, ...]``: ``out[.., i, ..] = x[.., idx[i], ..]``.

    Only the dims the indices consume are order-dependent (which entry lands where is the indices'
    values): those are pinned. The index tensors' own dims flow to the output, as elementwise ops'
    do: permuting an index tensor along a dim permutes the output along the matching dim, so Falcon's
    ``cos[position_ids]`` moves with the positions and leaves every other dim of ``cos`` free. A
    constant 1-D integer index on one dim (``qkv[..., [-2], :]``) picks fixed units: it cuts the dim
    like a slice does instead of pinning all of it. Boolean masks yield a data-dependent count of
    elements in position order: every dim they cover is pinned, and so is their output."""
    x = ctx.arg("self")
    d = ctx.dims(x) or []
    positions: list[int] = []  # the dims of x that the index tensors consume
    integer: list[torch.fx.Node] = []
    masked = False
    j = 0
    for ix in ctx.arg("indices"):
        val = ix.meta.get("val") if isinstance(ix, torch.fx.Node) else None
        is_mask = isinstance(val, torch.Tensor) and val.dtype in (torch.bool, torch.uint8)
        # a boolean mask stands for one index tensor per mask dim: it consumes that many dims of x
        n = val.dim() if is_mask else 1
        if ix is not None:
            positions.extend(range(j, j + n))
            if is_mask:
                masked = True
                ctx.table.pin_dims(ctx.dims(ix) or [], "boolean mask indexing keeps elements in position order")
            else:
                integer.append(ix)
        j += n
    out_shape = ctx.out_shape()
    kept = [dd for j, dd in enumerate(d) if j not in positions]
    n_indexed = len(out_shape) - len(kept)  # dims of the index tensors' broadcast shape
    # adjacent index tensors put their dims where the indexed dims were; separated ones put them first
    at = positions[0] if positions == list(range(positions[0], positions[-1] + 1)) else 0
    picked = _constant_pick(ctx, d[positions[0]], integer[0]) if len(positions) == 1 and integer else None
    if picked is not None:
        return kept[:at] + [picked] + kept[at:]
    ctx.table.pin_dims([d[j] for j in positions], "advanced indexing with data-dependent indices")
    if masked:
        indexed = ctx.fresh(out_shape[at : at + n_indexed], "boolean mask indexing output")
    else:
        slots: list[Dim | None] = [None] * n_indexed
        for ix in integer:
            _broadcast_into(ctx, ix, slots, out_shape[at : at + n_indexed])
        indexed = [s or ctx.table.fresh_dim(n) for s, n in zip(slots, out_shape[at : at + n_indexed])]
    return kept[:at] + indexed + kept[at:]


def _constant_pick(ctx: RuleContext, d: Dim, ix: torch.fx.Node) -> Dim | None:
    """The units a constant 1-D integer index picks from ``d``, as the concatenation of those one-unit
    slices (one slice when they are a run); None when the index is not such a constant."""
    src = ix
    while isinstance(src, torch.fx.Node) and src.op == "call_function" and _functional(
        getattr(src.target, "overloadpacket", None)
    ) in (aten.lift_fresh_copy, aten.clone, aten._to_copy, aten.detach, aten.alias):
        src = src.args[0]
    # export keeps the value of a lifted constant on its fake tensor (FakeTensor.constant)
    value = getattr(src.meta.get("val"), "constant", None) if isinstance(src, torch.fx.Node) else None
    size = ctx.table.size(d)
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.is_floating_point() or value.numel() == 0:
        return None
    if value.dtype in (torch.bool, torch.uint8) or not isinstance(size, int):
        return None
    picks = [int(v) + size if int(v) < 0 else int(v) for v in value.tolist()]
    if any(not 0 <= v < size for v in picks):
        return None
    reason = "constant index picks inside a unit"
    if picks == list(range(picks[0], picks[0] + len(picks))):
        return ctx.table.slice(d, picks[0], len(picks), reason)
    return ctx.table.concat([ctx.table.slice(d, v, 1, reason) for v in picks], "constant index")


@register(
    *_packets(
        "constant_pad_nd", "pad", "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d"
    )
)
def _pad(ctx: RuleContext) -> Value:
    x = ctx.tensor_args()[0]
    d = list(ctx.dims(x) or [])
    in_shape, out_shape = ctx.shape_of(x), ctx.out_shape()
    pads = list(ctx.arg("pad", ctx.arg("padding", [])))  # (before, after) per dim, last dim first
    for j, (a, b) in enumerate(zip(in_shape, out_shape)):
        k = len(d) - 1 - j
        # pad (1, -1) keeps the size but shifts every index: the amounts decide, not the sizes
        if a != b or any(p != 0 for p in pads[2 * k : 2 * k + 2]):
            ctx.table.pin(d[j], "padding appends positions")
            d[j] = ctx.table.fresh_dim(b, "padding appends positions")
    return d


@register(*_packets("max_pool1d", "avg_pool1d", "adaptive_avg_pool1d"))
def _pool1d(ctx: RuleContext) -> Value:
    return _pool(ctx, 1)


@register(
    *_packets(
        "max_pool2d",
        "avg_pool2d",
        "adaptive_avg_pool2d",
        "adaptive_max_pool2d",
        "max_pool2d_with_indices",
        "_adaptive_avg_pool2d",
        "upsample_nearest2d",
        "upsample_bilinear2d",
    )
)
def _pool2d(ctx: RuleContext) -> Value:
    return _pool(ctx, 2)


def _pool(ctx: RuleContext, n_spatial: int) -> Value:
    """Pooling acts per channel over the last ``n_spatial`` dims: channels pass through, positions
    are pinned. Counted from the back, as the input may be unbatched."""
    x = ctx.tensor_args()[0]
    d = ctx.dims(x) or []
    ctx.table.pin_dims(d[-n_spatial:], "pooling over positions")
    val = ctx.out_val()
    first = val[0] if isinstance(val, list | tuple) else val
    out = list(d[:-n_spatial]) + ctx.fresh(first.shape[-n_spatial:], "pooled positions")
    if isinstance(val, list | tuple):
        # indices name a position inside their own channel's plane: they move with the channels
        return [out] + [list(out) if v.shape == first.shape else ctx.fresh_like(v, "pooling indices") for v in val[1:]]
    return out


@register(operator.getitem)
def _getitem(ctx: RuleContext) -> Value:
    src, idx = ctx.node.args
    v = ctx.state.env.get(src)
    # a tuple value is a list of (dims | None); a tensor value is a list of tuples
    if isinstance(v, list) and isinstance(idx, int) and idx < len(v) and (v[idx] is None or isinstance(v[idx], list)):
        return v[idx]
    return ctx.fresh_like_output("getitem of an unknown value")


@register(
    *_packets(
        "scatter",
        "scatter_add",
        "index_put",
        "masked_scatter",
        "scatter_reduce",
        "index_fill",
    )
)
def _scatter(ctx: RuleContext) -> Value:
    ctx.pin_inputs(f"{ctx.op_name()} writes at data-dependent positions")
    return ctx.fresh_like_output(f"{ctx.op_name()} writes at data-dependent positions")


@register(*_packets("index_add", "index_copy"))
def _index_add(ctx: RuleContext) -> Value:
    """``out = self; out.index_add_(dim, index, source)``: source slice ``i`` along ``dim`` lands at row
    ``index[i]``. Only ``dim`` is routed by data (routed MoE experts write their token rows back this way); every
    other dim of ``source`` is the same dim of ``self`` element for element, so its channels stay free."""
    x, src, index = ctx.arg("self"), ctx.arg("source"), ctx.arg("index")
    xd, sd = list(ctx.dims(x) or []), ctx.dims(src) or []
    reason = f"{ctx.op_name()} writes at data-dependent positions"
    if not xd or len(sd) != len(xd):  # a 0-d self, or a source broadcast by the op: nothing to line up
        ctx.pin_inputs(reason)
        return ctx.fresh_like_output(reason)
    i = _dim_arg(ctx, len(xd))
    ctx.table.pin_dims([xd[i], sd[i], *(ctx.dims(index) or [])], reason)
    for j in range(len(xd)):
        if j != i:
            ctx.unify(xd[j], sd[j])
    return xd


# ---------------------------------------------------------------------- ops the transformers catalog met
@register(*_packets("copy"))
def _copy(ctx: RuleContext) -> Value:
    """``copy(self, src)`` / ``self.copy_(src)``: the result is ``src`` broadcast to ``self``'s shape.

    In place, the destination node keeps being read after the copy (and, when it is a view, so is its
    base): its dims are unified with the source's rather than replaced, so every reader, before or after
    the write, sees one space. A dim along which ``src`` broadcasts holds equal values after the write:
    it keeps the destination's own space."""
    dst, *rest = ctx.tensor_args()
    out = list(ctx.dims(dst) or [])
    for src in rest:
        _broadcast_into(ctx, src, out, ctx.shape_of(dst))  # type: ignore[arg-type]
    return out


@register(*_packets("tile"))
def _tile(ctx: RuleContext) -> Value:
    # tile is repeat with the repeats left-padded by ones to the tensor's rank
    x = ctx.tensor_args()[0]
    d = ctx.dims(x) or []
    reps = list(ctx.arg("dims"))
    return _repeat_core(ctx, d, [1] * (len(d) - len(reps)) + reps)


def _repeat_core(ctx: RuleContext, d: Sequence[Dim], reps: Sequence[Any]) -> list[Dim]:
    lead = len(reps) - len(d)
    out = ctx.fresh(reps[:lead])
    for dd, r in zip(d, reps[lead:]):
        # out index = copy * n + i, and every copy is equal: the copies are a free major factor
        out.append(dd if r == 1 else (ctx.table.fresh(as_size(r)), *dd))
    return out


@register(*_packets("meshgrid"))
def _meshgrid(ctx: RuleContext) -> Value:
    """Every output has the dims ``[len(t0), len(t1), ...]`` (the first two swapped for ``xy``); output
    k varies along dim k only, so all of them carry input j's space on dim j: a permutation of
    ``t_j`` permutes output j along j and leaves the others, constant along j, unchanged."""
    xs = [x for x in ctx.arg("tensors") if isinstance(x, torch.fx.Node)]
    dims = [(ctx.dims(x) or [ctx.table.fresh_dim(1)])[0] for x in xs]  # 0-d inputs count as size 1
    if ctx.arg("indexing", "ij") == "xy" and len(dims) >= 2:
        dims[0], dims[1] = dims[1], dims[0]
    return [list(dims) for _ in ctx.out_val()]


@register(*_packets("log_sigmoid_forward"))
def _log_sigmoid_forward(ctx: RuleContext) -> Value:
    # decomposed log_sigmoid: (output, buffer); the buffer is elementwise when it has the input's shape
    x = ctx.tensor_args()[0]
    xd = ctx.dims(x) or []
    if xd:
        ctx.table.tag(xd[-1], "act")
    out, buf = ctx.out_val()
    same = list(buf.shape) == list(out.shape)
    return [list(xd), list(xd) if same else ctx.fresh_like(buf, "log_sigmoid buffer")]


@register(*_packets("upsample_linear1d", "upsample_nearest1d", "_upsample_nearest_exact1d"))
def _upsample1d(ctx: RuleContext) -> Value:
    return _pool(ctx, 1)


@register(
    *_packets("upsample_bicubic2d", "_upsample_nearest_exact2d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa")
)
def _upsample2d(ctx: RuleContext) -> Value:
    return _pool(ctx, 2)


@register(*_packets("upsample_trilinear3d", "upsample_nearest3d", "_upsample_nearest_exact3d"))
def _upsample3d(ctx: RuleContext) -> Value:
    # resampling interpolates along positions (pinned, fresh outside); channels pass as pooling's do
    return _pool(ctx, 3)


@register(*_packets("bucketize"))
def _bucketize(ctx: RuleContext) -> Value:
    """Each element of ``self`` is looked up on its own: its dims pass to the output. The result
    names a position in ``boundaries``, which must stay in its (sorted) order."""
    x, boundaries = ctx.arg("self"), ctx.arg("boundaries")
    ctx.table.pin_dims(ctx.dims(boundaries) or [], "bucketize boundaries are ordered")
    xd = ctx.dims(x)
    return list(xd) if xd is not None else ctx.fresh_like_output()


@register(*_packets("_weight_norm", "_weight_norm_interface"))
def _weight_norm(ctx: RuleContext) -> Value:
    """``w = g * v / ||v||`` with the norm over every dim of ``v`` but ``dim`` (over all of them when
    ``dim`` is -1): ``g`` (size 1 elsewhere) is per unit of that dim, and the norm, a reduction, is
    invariant under permutations of the dims it spans, so ``w`` has ``v``'s dims."""
    v, g = ctx.arg("v"), ctx.arg("g")
    vd, gd = ctx.dims(v) or [], ctx.dims(g) or []
    dim = ctx.arg("dim", 0)
    kept = {_norm_dim(dim, len(vd))} if dim != -1 and vd else set()
    for i, d in enumerate(vd):
        if i in kept:
            if i < len(gd):
                ctx.unify(gd[i], d)
        else:
            # removing units of a reduced dim changes the norm of every kept unit: pruning must know
            ctx.table.mark(d, "normalized")
    val = ctx.out_val()
    if isinstance(val, list | tuple):  # _weight_norm_interface: (w, norms shaped like g)
        return [list(vd), list(gd) if list(val[1].shape) == ctx.shape_of(g) else ctx.fresh_like(val[1], "norms")]
    return list(vd)


@register(*_packets("im2col"))
def _im2col(ctx: RuleContext) -> Value:
    """``[N, C, H, W] -> [N, C * kh * kw, L]``: channel-major, each channel's kernel taps minor. The
    channels pass as the major factor; taps and sliding positions are positions (pinned)."""
    x = ctx.tensor_args()[0]
    xd = ctx.dims(x) or []
    kh, kw = ctx.arg("kernel_size")
    ctx.table.pin_dims(xd[-2:], "im2col input positions")
    out_shape = ctx.out_shape()
    taps = ctx.table.fresh(kh * kw, "im2col kernel positions")
    return [*xd[:-3], (*xd[-3], taps), ctx.table.fresh_dim(out_shape[-1], "im2col sliding positions")]


@register(*_packets("col2im"))
def _col2im(ctx: RuleContext) -> Value:
    """The inverse of im2col: ``[N, C * kh * kw, L] -> [N, C, H, W]`` sums each channel's taps back into
    its own plane, so the major factor C passes."""
    x = ctx.tensor_args()[0]
    xd = ctx.dims(x) or []
    kh, kw = ctx.arg("kernel_size")
    out_shape = ctx.out_shape()
    c = ctx.table.fresh(out_shape[-3])
    ctx.unify(xd[-2], (c, ctx.table.fresh(kh * kw, "col2im kernel positions")))
    ctx.table.pin(xd[-1], "col2im sliding positions")
    return [*xd[:-2], (c,), *ctx.fresh(out_shape[-2:], "col2im output positions")]


@register(*_packets("unfold"))
def _unfold(ctx: RuleContext) -> Value:
    """``x.unfold(dim, size, step)``: overlapping windows along ``dim`` (a short causal conv's taps). Each window
    is a run of consecutive positions, so ``dim`` and the two it becomes (windows, taps) are positions (pinned);
    every other dim is read element by element and passes as the same space."""
    x = ctx.tensor_args()[0]
    xd = list(ctx.dims(x) or [])
    out_shape = ctx.out_shape()
    if not xd:  # a 0-d input unfolds into a 1-d window of itself
        return ctx.fresh(out_shape, "unfold window positions")
    d = _norm_dim(ctx.arg("dimension", 0), len(xd))
    ctx.table.pin(xd[d], "unfold reads overlapping windows of positions")
    xd[d] = ctx.table.fresh_dim(out_shape[d], "unfold window starts")
    return [*xd, ctx.table.fresh_dim(out_shape[-1], "unfold positions within a window")]


def _concrete_ints(values: Sequence[Any]) -> list[int] | None:
    """Plain ints, or None where any is symbolic (its value, hence the storage layout, is not known here)."""
    out = [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    return out if len(out) == len(values) else None


@register(*_packets("as_strided", "as_strided_copy"))
def _as_strided(ctx: RuleContext) -> Value:
    """``x.as_strided(size, stride, offset)`` reads ``x``'s storage at computed offsets (Longformer's overlapping
    chunks). With ``x`` dense, an offset names one element of ``x``, digit by digit in stride order. An output dim
    whose size and stride equal an input dim's is that dim, unchanged, when the other output dims (and the offset)
    never reach its digit: their contributions are multiples of the digit's whole span (``stride * size``) or sum
    to less than one step of it. Then output index ``j`` along it is input index ``j`` whatever the other indices
    are, and a permutation of the input dim is the same permutation of the output dim. Every other dim reads
    positions computed from several digits: pinned."""
    x = ctx.tensor_args()[0]
    xd = list(ctx.dims(x) or [])
    val = x.meta.get("val")
    out_shape = ctx.out_shape()
    reason = "as_strided reads the storage at computed positions"
    if val is None:
        _pin_storage(ctx, x, reason)
        return ctx.fresh(out_shape, reason)
    base = val.storage_offset()
    known = [_concrete_ints(v) for v in (list(val.shape), list(val.stride()), list(ctx.arg("size", [])),
                                         list(ctx.arg("stride", [])), [base, ctx.arg("storage_offset", base)])]
    in_sizes, in_strides, sizes, strides, offsets = (v or [] for v in known)
    shift = offsets[1] - offsets[0] if len(offsets) == 2 else -1
    # every offset read must be an element of x: below its start or past its end is another tensor's storage
    inside = shift >= 0 and all(s >= 0 for s in strides) and (
        0 in sizes or shift + sum((n - 1) * s for n, s in zip(sizes, strides)) < math.prod(in_sizes))
    if any(v is None for v in known) or len(xd) != len(in_sizes) or not _dense(in_sizes, in_strides) or not inside:
        _pin_storage(ctx, x, reason)
        return ctx.fresh(out_shape, reason)
    passed: dict[int, int] = {}  # output dim -> input dim
    for t, (n, s) in enumerate(zip(sizes, strides)):
        i = next((i for i, p in enumerate(zip(in_sizes, in_strides)) if p == (n, s) and i not in passed.values()), None)
        if n == 1 or i is None:
            continue
        span = n * s
        low = shift % span + sum((m - 1) * r for u, (m, r) in enumerate(zip(sizes, strides)) if u != t and r % span)
        if low < s:
            passed[t] = i
    ctx.table.pin_dims([d for i, d in enumerate(xd) if i not in passed.values()], reason)
    return [xd[passed[t]] if t in passed else ctx.table.fresh_dim(out_shape[t], reason) for t in range(len(out_shape))]


def _pin_storage(ctx: RuleContext, node: Any, reason: str) -> None:
    """Pin ``node`` and every tensor it is a view of, up to the one that owns the storage: a read of the storage
    beyond ``node``'s own elements reaches the base's (a slice's neighbours), and pinning the base pins each part."""
    while isinstance(node, torch.fx.Node):
        ctx.table.pin_dims(ctx.dims(node) or [], reason)
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.returns or schema.returns[0].alias_info is None:
            return
        node = node.args[0] if node.args else None


def _dense(sizes: Sequence[int], strides: Sequence[int]) -> bool:
    """Every element of the storage span is exactly one element of the tensor (a permuted contiguous layout)."""
    expected = 1
    for n, s in sorted(((n, s) for n, s in zip(sizes, strides) if n != 1), key=lambda p: p[1]):
        if s != expected:
            return False
        expected *= n
    return 0 not in sizes


# ------------------------------------------------------------------ complex views, gates, norms (catalog text models)
@register(*_packets("view_as_complex", "view_as_complex_copy"))
def _view_as_complex(ctx: RuleContext) -> Value:
    """``[..., n, 2]`` real -> ``[..., n]`` complex (Llama 4's RoPE): the trailing pair is one complex unit's
    real and imaginary parts, consumed by the view. Swapping them is not a symmetry (it conjugates and
    rotates), so that dim is pinned; every other dim, ``n`` included, passes unchanged."""
    xd = list(ctx.dims(ctx.tensor_args()[0]) or [])
    if xd:
        ctx.table.pin(xd[-1], "real and imaginary parts of a complex view")
    return xd[:-1]


@register(*_packets("view_as_real", "view_as_real_copy"))
def _view_as_real(ctx: RuleContext) -> Value:
    """``[..., n]`` complex -> ``[..., n, 2]`` real: each complex unit becomes its (real, imaginary) pair,
    minor to it, so a later flatten makes the real dim ``n ⊗ 2``; the pair itself is pinned."""
    xd = list(ctx.dims(ctx.tensor_args()[0]) or [])
    return xd + [ctx.table.fresh_dim(2, "real and imaginary parts of a complex view")]


# real/imag/angle read each complex element on its own; polar/complex build each from two aligned reals
register(*_packets("real", "imag", "angle", "conj", "conj_physical", "resolve_conj", "resolve_neg"))(_unary)
register(*_packets("polar", "complex"))(_broadcast)


@register(*_packets("glu"))
def _glu(ctx: RuleContext) -> Value:
    """``glu(x, dim) = a * sigmoid(b)`` with ``a, b`` the halves of ``dim``: unit ``i`` of the output reads unit
    ``i`` of both halves, so the halves are two parts of one space that must move together, as an FFN's gate
    and up rows do; the output carries that space."""
    x = ctx.arg("self")
    d = list(ctx.dims(x) or [])
    i = _norm_dim(ctx.arg("dim", -1), len(d))
    n = ctx.shape_of(x)[i]
    half = ctx.out_shape()[i]
    if not isinstance(n, int):
        ctx.table.pin(d[i], "glu over a symbolic size")
        d[i] = ctx.table.fresh_dim(half, "glu over a symbolic size")
        return d
    a = ctx.table.slice(d[i], 0, half, "glu halves cut inside a unit")
    b = ctx.table.slice(d[i], half, half, "glu halves cut inside a unit")
    ctx.unify(a, b)
    ctx.table.tag(b, "act")  # the sigmoid side, as an activation tags a gate projection
    d[i] = a
    return d


# matrix and vector norms are invariant under permutations of the dims they reduce, as sum is
register(*_packets("linalg_norm", "linalg_matrix_norm", "frobenius_norm", "nuclear_norm"))(_reduction)


@register(*_packets("one_hot"))
def _one_hot(ctx: RuleContext) -> Value:
    """``one_hot(ids, C)``: the ids' dims pass, the new class dim is named by the ids' values (data), so it is
    pinned as an embedding's rows are."""
    xd = list(ctx.dims(ctx.tensor_args()[0]) or [])
    return xd + [ctx.table.fresh_dim(ctx.out_shape()[-1], "one_hot classes are selected by data")]


@register(*_packets("outer", "ger"))
def _outer(ctx: RuleContext) -> Value:
    # out[i, j] = a[i] * b[j]: each operand's dim passes to its own output dim (RoPE's positions ⊗ inv_freq)
    a, b = ctx.arg("self"), ctx.arg("vec2")
    ad, bd = ctx.dims(a) or ctx.fresh(ctx.out_shape()[:1]), ctx.dims(b) or ctx.fresh(ctx.out_shape()[1:])
    return [ad[0], bd[0]]


@register(*_packets("item", "_local_scalar_dense"))
def _item(ctx: RuleContext) -> Value:
    # a Python scalar from a one-element tensor: no dim to carry
    return None


@register_custom("sparsify::read_into_python")
def _read_into_python(ctx: RuleContext) -> Value:
    """The model's Python read these values (``tolist``/``numpy`` in an eagerly captured graph) and may decide on
    them by position: every dim is pinned."""
    ctx.pin_inputs("values read into Python (tolist/numpy)")
    return None


@register(*_packets("nonzero", "argwhere"))
def _nonzero(ctx: RuleContext) -> Value:
    """The coordinates of the nonzero elements: each row names positions of the input along every dim (pinned);
    the rows are as many as the data makes them, the columns are the input's dims in order."""
    ctx.pin_inputs("nonzero returns positions along this dim")
    return ctx.fresh_like_output("nonzero coordinates")


# ---------------------------------------------------------------------- aliases
# ATen's aliases (native_functions.yaml states them only in comments, and torch keeps no table of them at
# runtime): each resolves to its canonical op's rule. Checked here, after every rule above is registered.
for _alias, _canonical in (
    ("multiply", "mul"),
    ("divide", "div"),
    ("true_divide", "div"),
    ("subtract", "sub"),
    ("greater", "gt"),
    ("greater_equal", "ge"),
    ("less", "lt"),
    ("less_equal", "le"),
    ("not_equal", "ne"),
    ("absolute", "abs"),
    ("negative", "neg"),
    ("fix", "trunc"),
    ("clip", "clamp"),
    ("arccos", "acos"),
    ("arcsin", "asin"),
    ("arctan", "atan"),
    ("arccosh", "acosh"),
    ("arcsinh", "asinh"),
    ("arctanh", "atanh"),
    ("arctan2", "atan2"),
    ("special_expit", "sigmoid"),
    ("special_logit", "logit"),
    ("special_expm1", "expm1"),
    ("special_log1p", "log1p"),
    ("special_erf", "erf"),
    ("special_round", "round"),
    ("special_softmax", "softmax"),
    ("special_log_softmax", "log_softmax"),
    ("special_xlogy", "xlogy"),
    ("concat", "cat"),
    ("concatenate", "cat"),
    ("swapaxes", "transpose"),
    ("swapdims", "transpose"),
    ("moveaxis", "movedim"),
    ("linalg_matmul", "matmul"),
):
    register_alias(_alias, _canonical)
