"""N:M and block sparsity: fixed masks on linear layers, kept through training, exported compactly.

``sparsify(model, NMConfig(n=2, m=4))`` scores each selected ``nn.Linear`` weight (magnitude, or Wanda's
``|W| * ||X_col||_2`` from calibration inputs), picks a mask matching the pattern exactly, zeroes the pruned weights
and swaps the layer for a :class:`MaskedLinear` that calls one ``sparsify::nm_linear`` /
``sparsify::block_sparse_linear`` op (one graph node under torch.compile; the ``"triton"`` kernel family lowers it
to the sparse kernels in :mod:`sparsify_fx.codegen.kernels`). The weight stays the same ``Parameter`` object, so an
optimizer created before keeps working. transformers' ``Conv1D`` (GPT-2; weight stored ``[in, out]``) is handled
the same way and becomes a :class:`MaskedConv1D` whose weight and mask keep that layout.

Patterns: N:M groups run along the input dim (each output row keeps ``n`` of every ``m`` consecutive input
columns); block sparsity keeps the top-scoring ``block`` tiles (score: mean ``|score|`` over the tile) until the
kept count is ``round(density * n_tiles)`` (at least one).
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn as nn
from torch import Tensor

from sparsify_fx._io import save_safetensors_atomic
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes import nm_ops  # noqa: F401  (registers the sparsify:: ops)
from sparsify_fx.passes._batch import calibrate
from sparsify_fx.passes._config import check_bool, check_calibration, check_choice, is_int, is_real
from sparsify_fx.passes.layers import Conv1DType, LinearType, layer_type, register_layer
from sparsify_fx.passes.surgery import Journal, Verb, require_composable, require_values, unwrap

__all__ = [
    "BlockConfig",
    "MaskedConv1D",
    "MaskedLinear",
    "NMConfig",
    "block_mask",
    "compress_nm",
    "decompress_nm",
    "export_sparse",
    "load_sparse",
    "nm_mask",
    "pack_positions",
    "pgf_scale",
    "sparsify",
    "to_bsr",
    "unpack_positions",
]

FORMAT = "sparsify_fx.sparse"
VERSION = 1
MAX_M = 256  # positions within a group are stored as uint8


# --------------------------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Common:
    """Fields shared by both patterns.

    * ``include``: FQN globs of the layers to sparsify (``None``: every ``nn.Linear`` and
      transformers ``Conv1D``); ``skip``: globs to leave dense (e.g. ``["lm_head"]``). A single string is
      one glob, not a list of one-letter globs.
    * ``score``: ``"magnitude"`` (``|W|``) or ``"wanda"`` (``|W| * ||X_col||_2``; needs ``calibration``, an
      iterable of example inputs: tensors, tuples of positional args, or dicts of keyword args).
    * ``padding``: ``"none"`` (shapes must divide) or ``"zero"`` (pad the weight with zeros to whole groups/tiles;
      pads are never kept when a real weight can be).
    * ``pgf_decay_steps`` / ``pgf_start``: Progressive Gradient Flow. At training step ``t`` (the count of
      training-mode forward calls with grad enabled, per layer) the gradient of a pruned weight is
      ``s(t) * dW_dense`` with ``s(t) = pgf_start * max(0, 1 - t / pgf_decay_steps)``; kept weights get ``dW_dense``.
      ``pgf_decay_steps=0`` (default) disables it: pruned weights get exactly zero gradient. The mask never
      changes, and the forward always uses ``W ∘ M``, so regrown values have no effect until exported/merged.
      Under torch.compile the factor is a constant of the graph: expect one recompile per step during the decay.
    """

    include: Sequence[str] | None = None
    skip: Sequence[str] = ()
    score: Literal["magnitude", "wanda"] = "magnitude"
    calibration: Iterable[Any] | None = field(default=None, repr=False)
    padding: Literal["none", "zero"] = "none"
    pgf_decay_steps: int = 0
    pgf_start: float = 1.0
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.include, str):
            self.include = [self.include]
        if isinstance(self.skip, str):
            self.skip = [self.skip]


@dataclass
class NMConfig(_Common):
    """Keep ``n`` of every ``m`` consecutive input weights per output row (2:4 by default)."""

    n: int = 2
    m: int = 4


@dataclass
class BlockConfig(_Common):
    """Keep whole ``block = (rows, cols)`` weight tiles, ``density`` of them (in ``(0, 1]``).

    ``block=16`` means square ``(16, 16)`` tiles, as ``kernel_size`` does for convolutions."""

    block: tuple[int, int] | int = (16, 16)
    density: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.block, int) and not isinstance(self.block, bool):
            self.block = (self.block, self.block)
        elif isinstance(self.block, list):
            self.block = tuple(self.block)


def pgf_scale(step: int, decay_steps: int, start: float = 1.0) -> float:
    """Progressive Gradient Flow factor ``start * max(0, 1 - step / decay_steps)`` (0 when disabled)."""
    if decay_steps <= 0:
        return 0.0
    return float(start) * max(0.0, 1.0 - step / decay_steps)


def _check_config(cfg: NMConfig | BlockConfig) -> None:
    for name in ("include", "skip"):
        globs = getattr(cfg, name)
        if globs is not None and (not isinstance(globs, Iterable) or not all(isinstance(g, str) for g in globs)):
            raise ConfigError(f"sparsify: {name} must be a list of FQN globs (strings), got {globs!r}.")
    check_choice("sparsify: ", "score", cfg.score, ("magnitude", "wanda"))
    if cfg.score == "wanda" and cfg.calibration is None:
        raise ConfigError("sparsify: score='wanda' needs calibration=[example inputs]; or use score='magnitude'.")
    check_choice("sparsify: ", "padding", cfg.padding, ("none", "zero"))
    if (not is_int(cfg.pgf_decay_steps) or not is_real(cfg.pgf_start) or cfg.pgf_decay_steps < 0
            or not 0.0 <= cfg.pgf_start <= 1.0):
        raise ConfigError(
            f"sparsify: need pgf_decay_steps >= 0 and 0 <= pgf_start <= 1, got {cfg.pgf_decay_steps}, "
            f"{cfg.pgf_start}."
        )
    check_bool("sparsify: ", "progress", cfg.progress)
    check_calibration("sparsify: ", cfg.calibration, what="example inputs")
    if isinstance(cfg, NMConfig):
        if not (is_int(cfg.n) and is_int(cfg.m)) or cfg.n <= 0 or cfg.n > cfg.m:
            raise ConfigError(f"sparsify: N:M needs integers 0 < n <= m, got n={cfg.n!r}, m={cfg.m!r}.")
        if cfg.m > MAX_M:
            # the compact export stores a position within its group in one byte
            raise ConfigError(
                f"sparsify: m={cfg.m} exceeds {MAX_M} (positions are stored as uint8); pick m <= {MAX_M}."
            )
    else:
        block = cfg.block
        if not isinstance(block, tuple) or len(block) != 2 or any(not is_int(b) or b <= 0 for b in block):
            raise ConfigError(
                f"sparsify: block must be two positive ints (rows, cols) or one for square tiles, got {block!r}."
            )
        if not is_real(cfg.density) or not 0.0 < cfg.density <= 1.0:
            raise ConfigError(f"sparsify: density must lie in (0, 1], got {cfg.density}.")


# --------------------------------------------------------------------------------------------------------------
# masks
# --------------------------------------------------------------------------------------------------------------


def _longest(size: int, padding: str) -> int:
    """The longest group or tile side a weight dim of ``size`` takes: the dim itself, or with zero padding less than
    twice it (pads fewer than the real weights). Checked before any allocation: m=2**40 would allocate 140 TB."""
    return 2 * size - 1 if padding == "zero" else size


def _check_nm_shape(in_: int, m: int, padding: str) -> None:
    if m > _longest(in_, padding):
        raise ConfigError(
            f"sparsify: m={m} is too large for in_features={in_} (padding={padding!r} allows groups up to "
            f"{_longest(in_, padding)}: more would be mostly padding); pick m <= {in_} or skip the layer (skip=[...])."
        )
    if in_ % m and padding != "zero":
        raise ConfigError(
            f"sparsify: in_features={in_} is not a multiple of m={m}; pick m dividing it, skip the layer, "
            "or pass padding='zero'."
        )


def _check_block_shape(out: int, in_: int, block: Sequence[int], padding: str) -> None:
    if block[0] > _longest(out, padding) or block[1] > _longest(in_, padding):
        raise ConfigError(
            f"sparsify: block {tuple(block)} is too large for weight ({out}, {in_}) (padding={padding!r} allows "
            f"tiles up to ({_longest(out, padding)}, {_longest(in_, padding)}): more would be mostly padding); pick "
            f"a block of at most ({out}, {in_}) or skip the layer (skip=[...])."
        )
    if (out % block[0] or in_ % block[1]) and padding != "zero":
        raise ConfigError(
            f"sparsify: block {tuple(block)} does not tile weight ({out}, {in_}); pick a block dividing both "
            "dims, skip the layer, or pass padding='zero'."
        )


def nm_mask(score: Tensor, n: int, m: int, padding: str = "none") -> Tensor:
    """Bool mask keeping the ``n`` largest scores of every ``m`` consecutive columns of each row."""
    out, in_ = score.shape
    _check_nm_shape(in_, m, padding)
    if in_ % m:
        # pads score -inf: kept only when a short group has fewer than n real columns
        score = torch.cat([score, score.new_full((out, m - in_ % m), -math.inf)], dim=1)
    groups = score.float().reshape(out, -1, m)
    top = groups.topk(n, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(out, -1)[:, :in_].contiguous()


def _tile_grid(shape: Sequence[int], block: Sequence[int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def block_mask(score: Tensor, block: Sequence[int], density: float, padding: str = "none") -> Tensor:
    """Bool mask of whole tiles: the ``round(density * tiles)`` tiles of highest mean ``|score|``."""
    out, in_ = score.shape
    br, bc = block
    _check_block_shape(out, in_, block, padding)
    gr, gc = _tile_grid((out, in_), block)
    padded = score.new_zeros((gr * br, gc * bc), dtype=torch.float32)
    padded[:out, :in_] = score.float().abs()
    counts = torch.zeros_like(padded)
    counts[:out, :in_] = 1.0
    tile_sum = padded.reshape(gr, br, gc, bc).sum((1, 3))
    tile_score = tile_sum / counts.reshape(gr, br, gc, bc).sum((1, 3))
    k = max(1, min(gr * gc, round(density * gr * gc)))
    keep = torch.zeros(gr * gc, dtype=torch.bool, device=score.device)
    # stable order so ties (e.g. all-zero tiles) resolve the same way every time
    keep[torch.sort(tile_score.flatten(), descending=True, stable=True).indices[:k]] = True
    full = keep.reshape(gr, gc).repeat_interleave(br, 0).repeat_interleave(bc, 1)
    return full[:out, :in_].contiguous()


# --------------------------------------------------------------------------------------------------------------
# the module
# --------------------------------------------------------------------------------------------------------------


class _MaskedMixin:
    """Forward and PGF bookkeeping shared by the masked layer types (``weight_oi``/``mask_oi``: ``[out, in]`` views)."""

    # the mask is laid out like the weight: a co-permutation of the weight (S²FT's merge) moves it too
    sparsify_companions = {"weight": ("mask",)}

    def _init_mask(self, mask_oi: Tensor, pattern: tuple[str, int, int], pgf_decay_steps: int,
                   pgf_start: float) -> None:
        mask = mask_oi.to(device=self.weight.device, dtype=torch.bool)
        self.register_buffer("mask", mask if not self._transposed else mask.t().contiguous())
        self.pattern = tuple(pattern)
        self.pgf_decay_steps = int(pgf_decay_steps)
        self.pgf_start = float(pgf_start)
        self.pgf_step = 0

    def weight_oi(self) -> Tensor:
        return self.weight.t() if self._transposed else self.weight

    def mask_oi(self) -> Tensor:
        return self.mask.t() if self._transposed else self.mask

    @property
    def pruned_grad_scale(self) -> float:
        return pgf_scale(self.pgf_step, self.pgf_decay_steps, self.pgf_start)

    def masked_weight(self) -> Tensor:
        """The effective weight ``W ∘ M`` in the layer's own layout."""
        return self.weight * self.mask.to(self.weight.dtype)

    def forward(self, x: Tensor) -> Tensor:
        scale = 0.0
        if self.training and self.pgf_decay_steps and torch.is_grad_enabled():
            scale = self.pruned_grad_scale
            self.pgf_step += 1
        kind, a, b = self.pattern
        w, mk = self.weight_oi(), self.mask_oi()
        if kind == "nm":
            return torch.ops.sparsify.nm_linear(x, w, mk, self.bias, a, b, scale)
        return torch.ops.sparsify.block_sparse_linear(x, w, mk, self.bias, a, b, scale)

    def _pattern_repr(self) -> str:
        kind, a, b = self.pattern
        pat = f"{a}:{b}" if kind == "nm" else f"block=({a}, {b})"
        return f"{pat}, density={self.mask.float().mean().item():.3f}"


class MaskedLinear(_MaskedMixin, nn.Linear):
    """``nn.Linear`` with a fixed bool ``mask`` buffer: ``y = x @ (W ∘ M).T + b`` through one custom op.

    ``pattern`` is ``("nm", n, m)`` or ``("block", rows, cols)``. The weight and bias are the original
    ``Parameter`` objects. ``pgf_step`` counts the training forwards that applied Progressive Gradient Flow.
    """

    _transposed = False

    def __init__(self, linear: nn.Linear, mask: Tensor, pattern: tuple[str, int, int], *, pgf_decay_steps: int = 0,
                 pgf_start: float = 1.0) -> None:
        nn.Module.__init__(self)
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self._init_mask(mask, pattern, pgf_decay_steps, pgf_start)

    def extra_repr(self) -> str:
        return f"{nn.Linear.extra_repr(self)}, {self._pattern_repr()}"


class MaskedConv1D(_MaskedMixin, nn.Module):
    """transformers ``Conv1D`` (``y = x @ W + b``, ``W [in, out]``) with a fixed mask in the same ``[in, out]``
    layout. Patterns are defined on ``W.T`` (N:M groups run along the input dim, as for linears)."""

    _transposed = True

    def __init__(self, conv: nn.Module, mask: Tensor, pattern: tuple[str, int, int], *, pgf_decay_steps: int = 0,
                 pgf_start: float = 1.0) -> None:
        super().__init__()
        self.nf = conv.nf
        self.weight = conv.weight
        self.bias = conv.bias
        self._init_mask(mask, pattern, pgf_decay_steps, pgf_start)

    @property
    def in_features(self) -> int:
        return self.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.weight.shape[1]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self._pattern_repr()}"


# masked layers keep their type's dims and size fields, but their map is x @ (W ∘ M).T: not a target for a new mask
@register_layer(MaskedLinear)
class _MaskedLinearType(LinearType):
    is_linear = False


@register_layer(MaskedConv1D)
class _MaskedConv1DType(Conv1DType):
    is_linear = False


def _is_target(mod: nn.Module) -> bool:
    lt = layer_type(mod)
    return lt is not None and lt.is_linear


def _weight_oi(mod: nn.Module) -> Tensor:
    """The weight as ``[out, in]`` (a view for Conv1D), for targets and masked layers."""
    lt = layer_type(mod)
    w = lt.weight_oi(mod) if lt is not None else None
    if w is None:
        raise ConfigError(f"sparsify: {type(mod).__name__} has no [out, in] weight; register its layer type.")
    return w


def _wrap(mod: nn.Module, mask_oi: Tensor, pattern: tuple[str, int, int], **pgf: Any) -> nn.Module:
    # a weight stored [in, out] keeps that layout in the masked layer
    cls = MaskedConv1D if layer_type(mod).in_dim(mod) == 0 else MaskedLinear  # type: ignore[union-attr]
    new = cls(mod, mask_oi, pattern, **pgf)
    new.train(mod.training)
    return new


# --------------------------------------------------------------------------------------------------------------
# sparsify
# --------------------------------------------------------------------------------------------------------------


def _selected(model: nn.Module, cfg: NMConfig | BlockConfig) -> dict[str, nn.Module]:
    def match(name: str, globs: Iterable[str]) -> bool:
        return any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(name, f"*.{g}") for g in globs)

    picked = {}
    for name, mod in model.named_modules():
        if not _is_target(mod):
            continue
        if cfg.include is not None and not match(name, cfg.include):
            continue
        if match(name, cfg.skip):
            continue
        picked[name] = mod
    return picked


def _wanda_norms(model: nn.Module, layers: Mapping[str, nn.Module], calibration: Iterable[Any],
                 progress: bool) -> dict[str, Tensor]:
    """Per-input-column L2 norm of each layer's input over the calibration set (hooks removed afterwards)."""
    sq = {name: torch.zeros(_weight_oi(mod).shape[1], dtype=torch.float64, device=mod.weight.device)
          for name, mod in layers.items()}

    calls = dict.fromkeys(layers, 0)

    def hook(name):
        def fn(_mod, args):
            x = args[0].detach()
            sq[name] += x.reshape(-1, x.shape[-1]).double().pow(2).sum(0)
            calls[name] += 1
        return fn

    seen = calibrate(model, [(mod, hook(name)) for name, mod in layers.items()], calibration,
                     "sparsify: calibration", progress)
    if seen == 0:
        raise ConfigError("sparsify: the calibration iterable was empty; pass at least one example input.")
    unused = [name for name, c in calls.items() if c == 0]
    if unused:
        # all-zero norms would make the choice arbitrary: keep magnitude there, and say so
        warnings.warn(f"sparsify: layers {unused} never ran on the calibration inputs; they are pruned by magnitude.",
                      stacklevel=3)
    return {name: s.sqrt().float() for name, s in sq.items() if calls[name]}


def _shared_params(model: nn.Module, layers: Mapping[str, nn.Module]) -> None:
    owners: dict[int, list[str]] = {}
    for name, mod in model.named_modules():
        for pname, p in mod.named_parameters(recurse=False):
            owners.setdefault(id(p), []).append(f"{name}.{pname}" if name else pname)
    for name, mod in layers.items():
        users = owners.get(id(mod.weight), [])
        if len(users) > 1:
            raise ConfigError(
                f"sparsify: {name}.weight is shared with {[u for u in users if u != name + '.weight']} (tied "
                f"weights); pruning it would also prune those. Add {name!r} to skip=[...] or untie the weights."
            )


def sparsify(model: nn.Module, config: NMConfig | BlockConfig) -> nn.Module:
    """Prune the selected linear layers of ``model`` to ``config``'s pattern, in place; returns ``model``.

    All masks are computed (and every shape checked) before anything changes, and the writes are one transaction:
    on any error, ``KeyboardInterrupt`` included, the model is exactly as it was. On an S²FT model the layers S²FT
    trains stay dense (their blocks train densely); the masks of the others move with their weights in ``merge``.

    Args:
        model: the model (or its ``torch.compile`` wrapper) whose ``nn.Linear``/``Conv1D`` layers to mask.
        config: :class:`NMConfig` (n of every m inputs) or :class:`BlockConfig` (dense tiles).

    Example::

        sparsify_fx.sparsify(model, sparsify_fx.NMConfig(n=2, m=4, skip=("lm_head",)))
    """
    if not isinstance(config, (NMConfig, BlockConfig)):
        raise ConfigError(f"sparsify: config must be NMConfig or BlockConfig, got {type(config).__name__}.")
    _check_config(config)
    wrapper, model = model, unwrap(model)
    require_composable(model, Verb.SPARSIFY)
    require_values(model, "sparsify", "masks keep the largest weights")
    layers = _selected(model, config)
    if not layers:
        raise ConfigError(
            "sparsify: no nn.Linear/Conv1D layer matches include/skip; check the globs against model.named_modules()."
        )
    _shared_params(model, layers)
    for name, mod in layers.items():  # shapes first: cheap, and before a long calibration pass
        try:
            out, in_ = _weight_oi(mod).shape
            if isinstance(config, NMConfig):
                _check_nm_shape(in_, config.m, config.padding)
            else:
                _check_block_shape(out, in_, config.block, config.padding)
        except ConfigError as e:
            raise ConfigError(f"{e} (layer {name!r})") from None
    norms = _wanda_norms(model, layers, config.calibration, config.progress) if config.score == "wanda" else {}
    masks = {}
    with torch.no_grad():
        for name, mod in layers.items():
            score = _weight_oi(mod).detach().abs().float()
            if name in norms:
                score = score * norms[name][None, :]
            masks[name] = _mask_for(score, config)
    pattern = (("nm", config.n, config.m) if isinstance(config, NMConfig)
               else ("block", config.block[0], config.block[1]))
    with Journal(model) as j:
        for name, mod in layers.items():
            w_oi, mask = _weight_oi(mod), masks[name].to(mod.weight.dtype)
            j.copy_(w_oi, lambda w_oi=w_oi, mask=mask: w_oi * mask)
            new = _wrap(mod, masks[name], pattern, pgf_decay_steps=config.pgf_decay_steps, pgf_start=config.pgf_start)
            j.swap_module(model, name, new)
    return wrapper


def _mask_for(score: Tensor, cfg: NMConfig | BlockConfig) -> Tensor:
    if isinstance(cfg, NMConfig):
        return nm_mask(score, cfg.n, cfg.m, cfg.padding)
    return block_mask(score, cfg.block, cfg.density, cfg.padding)


# --------------------------------------------------------------------------------------------------------------
# compact formats
# --------------------------------------------------------------------------------------------------------------


def compress_nm(weight: Tensor, mask: Tensor, n: int, m: int) -> tuple[Tensor, Tensor]:
    """N:M compact form: ``values [out, G*n]`` and ``positions [out, G*n]`` (uint8, ``0..m-1`` within each group;
    ``G = ceil(in / m)``), groups in order, kept positions ascending. Short last groups are padded with zeros.

    Requires exactly ``n`` kept per full group (``<= n`` allowed where the short last group or pads make up the
    rest), as :func:`nm_mask` produces.
    """
    out, in_ = weight.shape
    g = math.ceil(in_ / m)
    pad = g * m - in_
    w = torch.cat([weight * mask.to(weight.dtype), weight.new_zeros(out, pad)], 1) if pad else weight * mask
    real = torch.cat([mask.bool(), mask.new_zeros(out, pad, dtype=torch.bool)], 1) if pad else mask.bool()
    real = real.reshape(out, g, m)
    order = torch.arange(m, device=mask.device).expand(out, g, m)
    is_pad = order >= (in_ - torch.arange(g, device=mask.device) * m)[None, :, None]
    kept = real.sum(-1)
    if bool((kept > n).any()) or bool((kept + is_pad.sum(-1) < n).any()):
        raise ConfigError(f"compress_nm: the mask is not {n}:{m} (a group keeps more or fewer than n={n}).")
    # the kept positions first, then pad slots to fill a short last group (their values are zero)
    key = torch.where(real, order, torch.where(is_pad, order + m, order + 2 * m))
    pos = key.sort(-1).values[..., :n] % m
    values = w.reshape(out, g, m).gather(-1, pos).reshape(out, g * n)
    return values.contiguous(), pos.reshape(out, g * n).to(torch.uint8).contiguous()


def decompress_nm(values: Tensor, positions: Tensor, n: int, m: int, in_features: int) -> tuple[Tensor, Tensor]:
    """Dense ``(weight, mask)`` from :func:`compress_nm`'s output."""
    out = values.shape[0]
    g = math.ceil(in_features / m)
    pos = positions.long().reshape(out, g, n)
    w = values.new_zeros(out, g, m).scatter_(-1, pos, values.reshape(out, g, n))
    mk = torch.zeros(out, g, m, dtype=torch.bool, device=values.device).scatter_(-1, pos, True)
    return w.reshape(out, g * m)[:, :in_features].contiguous(), mk.reshape(out, g * m)[:, :in_features].contiguous()


def pack_positions(pos: Tensor) -> Tensor:
    """Two 4-bit positions per byte (low nibble first; ``m <= 16``); pads an odd count with 0. The N:M kernel reads
    this form too (2:4: 2 bits of information per kept value stored in 4)."""
    flat = pos.reshape(pos.shape[0], -1).to(torch.uint8)
    if flat.shape[1] % 2:
        flat = torch.cat([flat, flat.new_zeros(flat.shape[0], 1)], 1)
    return (flat[:, 0::2] | (flat[:, 1::2] << 4)).contiguous()


def unpack_positions(packed: Tensor, count: int) -> Tensor:
    """Inverse of :func:`pack_positions` (``count`` positions per row)."""
    lo, hi = packed & 0xF, packed >> 4
    return torch.stack([lo, hi], -1).reshape(packed.shape[0], -1)[:, :count].contiguous()


def to_bsr(weight: Tensor, mask: Tensor, block: Sequence[int]) -> tuple[Tensor, Tensor, Tensor]:
    """BSR form of a block mask: ``values [nnz_blocks, br, bc]`` (edge tiles zero-padded), ``crow [rows+1]``
    and ``col [nnz_blocks]`` (int32), tiles in row-major order. A tile counts as kept if any of its mask bits is set.
    """
    out, in_ = weight.shape
    br, bc = block
    gr, gc = _tile_grid((out, in_), block)
    w = weight.new_zeros(gr * br, gc * bc)
    w[:out, :in_] = weight * mask.to(weight.dtype)
    mk = torch.zeros(gr * br, gc * bc, dtype=torch.bool, device=mask.device)
    mk[:out, :in_] = mask.bool()
    tiles = w.reshape(gr, br, gc, bc).permute(0, 2, 1, 3)
    kept = mk.reshape(gr, br, gc, bc).any(3).any(1)
    rows, cols = kept.nonzero(as_tuple=True)
    values = tiles[rows, cols].contiguous()
    crow = torch.zeros(gr + 1, dtype=torch.int32, device=weight.device)
    crow[1:] = kept.sum(1).cumsum(0).to(torch.int32)
    return values, crow, cols.to(torch.int32).contiguous()


def from_bsr(values: Tensor, crow: Tensor, col: Tensor, block: Sequence[int],
             shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Dense ``(weight, mask)`` from :func:`to_bsr`'s output."""
    br, bc = block
    gr, gc = _tile_grid(shape, block)
    rows = torch.repeat_interleave(torch.arange(gr, device=values.device), (crow[1:] - crow[:-1]).long())
    tiles = values.new_zeros(gr, gc, br, bc)
    tiles[rows, col.long()] = values
    kept = torch.zeros(gr, gc, dtype=torch.bool, device=values.device)
    kept[rows, col.long()] = True
    w = tiles.permute(0, 2, 1, 3).reshape(gr * br, gc * bc)[: shape[0], : shape[1]].contiguous()
    mk = kept.repeat_interleave(br, 0).repeat_interleave(bc, 1)[: shape[0], : shape[1]].contiguous()
    return w, mk


def export_sparse(model: nn.Module, path: str | os.PathLike) -> None:
    """Write every masked layer's weight compactly to a safetensors file (atomic; JSON header, no pickle).

    N:M layers: ``values [out, ceil(in/m)*n]`` plus positions within each group (two 4-bit codes per byte when
    ``m <= 16``, else uint8). Block layers: BSR (tile values, int32 row pointers and column indices). Biases are
    stored dense. :func:`load_sparse` restores them.
    """

    tensors: dict[str, Tensor] = {}
    layers = []
    for name, mod in model.named_modules():
        if not isinstance(mod, _MaskedMixin):
            continue
        kind, a, b = mod.pattern
        w, mk = mod.weight_oi().detach(), mod.mask_oi()
        entry: dict[str, Any] = {"fqn": name, "kind": kind, "shape": list(w.shape), "dtype": str(w.dtype)}
        key = f"{len(layers)}"
        if kind == "nm":
            values, pos = compress_nm(w, mk, a, b)
            entry.update(n=a, m=b, packed=b <= 16)
            tensors[f"{key}.values"] = values
            tensors[f"{key}.positions"] = pack_positions(pos) if b <= 16 else pos
        else:
            values, crow, col = to_bsr(w, mk, (a, b))
            entry.update(block=[a, b])
            tensors[f"{key}.values"] = values
            tensors[f"{key}.crow"] = crow
            tensors[f"{key}.col"] = col
        if mod.bias is not None:
            tensors[f"{key}.bias"] = mod.bias.detach()
        layers.append(entry)
    if not layers:
        raise ConfigError("export_sparse: the model has no masked layer; call sparsify(model, config) first.")
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    # every layer sparsify could have touched, masked or not: load_sparse checks the whole model against it, so a
    # file from a 2-layer model does not half-load into a 3-layer one
    metadata = {"format": FORMAT, "version": str(VERSION), "layers": json.dumps(layers),
                "linear_layers": json.dumps(_linear_layers(model))}
    save_safetensors_atomic(tensors, path, metadata, prefix=".sparse-")


def _linear_layers(model: nn.Module) -> list[str]:
    """FQNs of every layer sparsify can mask (plain or already masked), in module order."""
    return [name for name, mod in model.named_modules() if _is_target(mod) or isinstance(mod, _MaskedMixin)]


def _check_entry(path: str, i: int, e: Any) -> None:
    """Types and ranges of one header entry, before any decoding allocates from them (m=0 divides by zero, a huge
    m or block allocates that much)."""

    def bad(field: str, value: Any, want: str) -> ConfigError:
        return ConfigError(
            f"load_sparse: {path!r} layer entry {i} has {field}={value!r}; {want}. The header is corrupt or "
            "hand-edited: export the model again."
        )

    if not isinstance(e, Mapping):
        raise bad("entry", e, "expected a JSON object")
    if not isinstance(e.get("fqn"), str):
        raise bad("fqn", e.get("fqn"), "expected a module name (string)")
    shape = e.get("shape")
    if not isinstance(shape, list) or len(shape) != 2 or not all(is_int(x) and x >= 1 for x in shape):
        raise bad("shape", shape, "expected two positive ints [out, in]")
    kind = e.get("kind")
    if kind == "nm":
        n, m, packed = e.get("n"), e.get("m"), e.get("packed")
        # sparsify's own bound (zero padding allows groups up to 2 * in - 1), so every file it writes loads
        longest = min(_longest(shape[1], "zero"), MAX_M)
        if not is_int(m) or not 1 <= m <= longest:
            raise bad("m", m, f"expected an int in [1, {longest}] for in_features={shape[1]}")
        if not is_int(n) or not 1 <= n <= m:
            raise bad("n", n, f"expected an int in [1, m={m}]")
        if not isinstance(packed, bool) or (packed and m > 16):
            raise bad("packed", packed, "expected true (only when m <= 16) or false")
    elif kind == "block":
        block = e.get("block")
        if (not isinstance(block, list) or len(block) != 2
                or not all(is_int(b) and 1 <= b <= _longest(d, "zero") for b, d in zip(block, shape))):
            raise bad("block", block, f"expected two ints [rows, cols] below twice the weight's shape {shape}")
    else:
        raise bad("kind", kind, "expected 'nm' or 'block'")


def _load_plan(model: nn.Module, i: int, e: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> tuple:
    """Decode layer ``i`` of a sparse export and check it fits ``model``, without writing anything."""
    try:
        mod = model.get_submodule(e["fqn"])
    except AttributeError:
        raise ConfigError(f"load_sparse: the model has no layer {e['fqn']!r}; load into the same model.") from None
    weight = _weight_oi(mod) if _is_target(mod) or isinstance(mod, _MaskedMixin) else None
    if weight is None or list(weight.shape) != e["shape"]:
        raise ConfigError(f"load_sparse: {e['fqn']!r} is not an nn.Linear/Conv1D of [out, in] shape {e['shape']}.")
    bias = tensors.get(f"{i}.bias")
    if (bias is not None) != (mod.bias is not None):
        raise ConfigError(f"load_sparse: {e['fqn']!r} bias presence differs from the file.")
    if e["kind"] == "nm":
        n, m = e["n"], e["m"]
        g = math.ceil(e["shape"][1] / m)
        pos = tensors[f"{i}.positions"]
        pos = unpack_positions(pos, g * n) if e["packed"] else pos
        if pos.numel() and pos.reshape(-1, g, n).long().sort(-1).values.diff(dim=-1).le(0).any():
            raise ConfigError(f"load_sparse: {e['fqn']!r} repeats a kept position within a group; the file is corrupt.")
        w, mk = decompress_nm(tensors[f"{i}.values"], pos, n, m, e["shape"][1])
        pattern = ("nm", n, m)
    else:
        w, mk = from_bsr(tensors[f"{i}.values"], tensors[f"{i}.crow"], tensors[f"{i}.col"], e["block"], e["shape"])
        pattern = ("block", *e["block"])
    if w.shape != weight.shape or mk.shape != weight.shape or (bias is not None and bias.shape != mod.bias.shape):
        raise ConfigError(f"load_sparse: {e['fqn']!r} decodes to other shapes than the layer's; the file is corrupt.")
    return e["fqn"], mod, w, mk, bias, pattern


def load_sparse(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Restore the layers written by :func:`export_sparse` into ``model`` (same architecture), in place.

    Plain ``nn.Linear`` / ``Conv1D`` layers become masked ones; masked ones get their weight and mask overwritten.
    Pruned weights come back as exact zeros. Everything is checked before the model is touched.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
    except Exception as exc:
        raise ConfigError(f"load_sparse: {path!r} is not a readable safetensors file ({exc}).") from exc
    version = metadata.get("version", "")
    if metadata.get("format") != FORMAT or not version.isdigit() or int(version) > VERSION:
        raise ConfigError(
            f"load_sparse: {path!r} is not a sparsify_fx sparse export of version <= {VERSION} "
            f"(format={metadata.get('format')!r}, version={version!r}); export it with export_sparse(model, path)."
        )
    try:
        layers = json.loads(metadata["layers"])
        if not isinstance(layers, list) or not layers:
            raise ConfigError(f"load_sparse: {path!r} header field 'layers' must be a non-empty list; export again.")
        for i, e in enumerate(layers):
            _check_entry(path, i, e)
        _check_coverage(model, path, [e["fqn"] for e in layers], metadata.get("linear_layers"))
        plan = [_load_plan(model, i, e, tensors) for i, e in enumerate(layers)]
    except ConfigError as exc:
        if path in str(exc):
            raise
        raise ConfigError(f"{exc} (file {path!r})") from None
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        # a truncated or hand-edited file: decoding fails before any weight is written
        raise ConfigError(f"load_sparse: {path!r} is corrupt ({type(exc).__name__}: {exc}); export it again.") from exc
    with Journal(model) as j:
        for fqn, mod, w, mk, bias, pattern in plan:
            j.copy_(_weight_oi(mod), w)
            if bias is not None:
                j.copy_(mod.bias, bias)
            if isinstance(mod, _MaskedMixin):
                j.copy_(mod.mask_oi(), mk)
                j.setattr(mod, "pattern", pattern)
            else:
                j.swap_module(model, fqn, _wrap(mod, mk, pattern))
    return model


def _check_coverage(model: nn.Module, path: str, fqns: list[str], recorded: str | None) -> None:
    """The file must describe this whole model: the same maskable layers as the model it came from (files written
    before that list was recorded skip this part), and every layer already masked here."""
    repeated = sorted({f for f in fqns if fqns.count(f) > 1})
    if repeated:
        raise ConfigError(f"load_sparse: {path!r} lists layers {repeated} more than once; the file is corrupt.")
    here = _linear_layers(model)
    if recorded is not None:
        there = json.loads(recorded)
        if not isinstance(there, list) or not all(isinstance(f, str) for f in there):
            raise ConfigError(f"load_sparse: {path!r} header field 'linear_layers' must be a list of names.")
        missing, extra = sorted(set(there) - set(here)), sorted(set(here) - set(there))
        if missing or extra:
            raise ConfigError(
                f"load_sparse: {path!r} was exported from another model ({len(there)} linear layers there, "
                f"{len(here)} here): this model lacks {missing[:6]} and has {extra[:6]} that the file does not "
                "cover; load it into the architecture it was exported from."
            )
    stale = [name for name, mod in model.named_modules() if isinstance(mod, _MaskedMixin) and name not in fqns]
    if stale:
        # they would keep their own masks beside the file's: a model that is neither
        raise ConfigError(
            f"load_sparse: this model's masked layers {stale[:6]} are not in {path!r}, so they would keep masks "
            "from another run; load the file into a model sparsified the same way (or a plain one)."
        )
