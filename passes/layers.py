"""One table of layer types: what a pass may assume about a Linear, a Conv1D, a conv, a norm or an embedding.

Each entry is a :class:`LayerType` registered for module classes (``@register_layer(nn.Linear)``) or for a
predicate (transformers' ``Conv1D`` is matched by name and attributes, so transformers is never imported). It says
where the weight's input and output dims are, gives the weight as an ``[out, in]`` view, whether the module is a
plain linear map of its input, and which size fields must follow a resized weight. Passes ask
:func:`layer_type` instead of testing types themselves, so a new layer type is one registration, not an edit of
every pass.

Lookup order: the module's exact type, then its base classes (MRO, nearest first), then predicates in
registration order. An unregistered module gives ``None``; the caller decides what that means.

Example::

    @register_layer(MyProjection)
    class MyProjectionType(LinearType):
        def size_fields(self, module, weight):
            return [("d_out", weight.shape[0]), ("d_in", weight.shape[1])]

    layer_type(model.proj).in_dim(model.proj)  # 1
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch.nn as nn
from torch import Tensor

from sparsify_fx.errors import ConfigError

__all__ = [
    "BatchNormType",
    "Conv1DType",
    "ConvType",
    "EmbeddingType",
    "GroupNormType",
    "LayerType",
    "LinearType",
    "NormalizedShapeType",
    "layer_type",
    "register_layer",
]

Predicate = Callable[[nn.Module], bool]
L = TypeVar("L", bound="type[LayerType]")


class LayerType:
    """What passes need to know about one kind of layer. Subclass it and register the subclass.

    The defaults describe a layer with no weight structure the passes can use: every answer is ``None`` or empty.

    * ``is_linear``: the module computes ``x @ weight_oi(module).T + bias`` over its input's last dim, nothing
      else (N:M masks it; S²FT on meta trusts the orientation). Trusted for subclasses found through the MRO as
      ``isinstance`` was; :func:`layer_type` with ``exact=True`` skips the MRO where a subclass that overrides
      ``forward`` must not pass.
    """

    is_linear: bool = False

    def in_dim(self, module: nn.Module) -> int | None:
        """The weight dim that contracts (or indexes) the module's input features, or None."""
        return None

    def out_dim(self, module: nn.Module) -> int | None:
        """The weight dim that indexes the module's output features (its bias entries), or None."""
        return None

    def input_axis(self, module: nn.Module) -> int | None:
        """The axis of the module's input tensor that ``in_dim`` indexes one to one, or None (no such axis, or the
        mapping is not one weight index per input channel)."""
        return None

    def weight_oi(self, module: nn.Module) -> Tensor | None:
        """The weight as an ``[out, in]`` view (no copy), or None when it is not one matrix."""
        return None

    def size_fields(self, module: nn.Module, weight: Tensor | None) -> list[tuple[str, Any]]:
        """The ``(attribute, value)`` pairs that must follow a resized ``weight`` (the module's new weight, or None
        when it has none)."""
        return []

    def resize_error(self, module: nn.Module, tensor: str, kept: Mapping[int, int]) -> str | None:
        """Why ``module.<tensor>`` cannot keep ``kept[dim]`` entries along each ``dim`` (None: it can)."""
        return None

    def keep_error(self, module: nn.Module, tensor: str, keep: Mapping[int, Tensor]) -> str | None:
        """Why ``module.<tensor>`` cannot keep the entries ``keep[dim]`` (boolean masks) marks along each ``dim``
        (None: it can). By default only the counts matter (:meth:`resize_error`); a type whose constraint is on
        which entries stay (a grouped conv's per-group counts) overrides this."""
        return self.resize_error(module, tensor, {d: int(mk.sum()) for d, mk in keep.items()})


# ---------------------------------------------------------------------- registry
_BY_TYPE: dict[type, LayerType] = {}
_PREDICATES: list[tuple[Predicate, LayerType]] = []
_MRO_CACHE: dict[type, LayerType | None] = {}  # lookups by base class; cleared on every registration


def register_layer(*types: type, predicate: Predicate | None = None) -> Callable[[L], L]:
    """Class decorator: register a :class:`LayerType` subclass for module ``types`` and/or a ``predicate``.

    Args:
        types: module classes this entry describes (their subclasses too, unless one has its own entry).
        predicate: ``module -> bool`` for layers matched by shape rather than class (consulted after the types).

    Raises:
        ConfigError: at registration, for a non-class in ``types``, a class already registered, a predicate that
            is not callable or already registered, nothing to register for, or a decorated object that is not a
            ``LayerType`` subclass.

    Example::

        @register_layer(nn.Linear)
        class LinearType(LayerType): ...
    """
    bad = [t for t in types if not isinstance(t, type)]
    if bad:
        raise ConfigError(f"register_layer: {bad!r} is not a class; pass module classes, or predicate=fn.")
    if predicate is not None and not callable(predicate):
        raise ConfigError(f"register_layer: predicate must be callable (module -> bool), got {predicate!r}.")
    if not types and predicate is None:
        raise ConfigError("register_layer: name at least one module class or a predicate.")
    taken = [f"{t.__qualname__} (by {type(_BY_TYPE[t]).__name__})" for t in types if t in _BY_TYPE]
    if taken or len(set(types)) != len(types):
        raise ConfigError(
            f"register_layer: {taken or list(types)} already registered; one class has one entry (subclass the "
            "module class, or extend the existing LayerType)."
        )
    if predicate is not None and any(p is predicate for p, _ in _PREDICATES):
        raise ConfigError(f"register_layer: predicate {predicate!r} is already registered.")

    def deco(cls: L) -> L:
        if not (isinstance(cls, type) and issubclass(cls, LayerType)):
            raise ConfigError(f"register_layer decorates LayerType subclasses, got {cls!r}.")
        entry = cls()
        for t in types:
            _BY_TYPE[t] = entry
        if predicate is not None:
            _PREDICATES.append((predicate, entry))
        _MRO_CACHE.clear()
        return cls

    return deco


def layer_type(module: nn.Module, *, exact: bool = False) -> LayerType | None:
    """The registered :class:`LayerType` of ``module``: by exact type, then base classes, then predicates.

    Args:
        module: any module.
        exact: skip the base-class step (a subclass may override ``forward``; predicates still apply).

    Returns:
        the entry, or None for a module type nobody registered.

    Example::

        lin = nn.Linear(4, 3)
        layer_type(lin).weight_oi(lin).shape  # torch.Size([3, 4])
    """
    cls = type(module)
    entry = _BY_TYPE.get(cls)
    if entry is None and not exact:
        if cls in _MRO_CACHE:
            entry = _MRO_CACHE[cls]
        else:
            entry = next((_BY_TYPE[b] for b in cls.__mro__[1:] if b in _BY_TYPE), None)
            _MRO_CACHE[cls] = entry
    if entry is not None:
        return entry
    return next((e for p, e in _PREDICATES if p(module)), None)


def _weight(module: nn.Module) -> Tensor | None:
    w = module._parameters.get("weight")
    return w if w is not None else getattr(module, "weight", None)


# ---------------------------------------------------------------------- built-in entries
@register_layer(nn.Linear)
class LinearType(LayerType):
    """``y = x @ W.T + b`` with ``W [out, in]``."""

    is_linear = True

    def in_dim(self, module: nn.Module) -> int | None:
        return 1

    def out_dim(self, module: nn.Module) -> int | None:
        return 0

    def input_axis(self, module: nn.Module) -> int | None:
        return -1

    def weight_oi(self, module: nn.Module) -> Tensor | None:
        w = _weight(module)
        if w is None:
            return None
        return w if self.in_dim(module) == 1 else w.t()

    def size_fields(self, module: nn.Module, weight: Tensor | None) -> list[tuple[str, Any]]:
        if weight is None:
            return []
        return [("out_features", weight.shape[0]), ("in_features", weight.shape[1])]


def _is_hf_conv1d(module: nn.Module) -> bool:
    # by name and fields, so transformers is never imported here
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(w, Tensor)
            and w.dim() == 2)


@register_layer(predicate=_is_hf_conv1d)
class Conv1DType(LinearType):
    """transformers' ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W [in, out]``; ``nf`` (and ``nx``) its sizes."""

    def in_dim(self, module: nn.Module) -> int | None:
        return 0

    def out_dim(self, module: nn.Module) -> int | None:
        return 1

    def size_fields(self, module: nn.Module, weight: Tensor | None) -> list[tuple[str, Any]]:
        if weight is None or weight.dim() != 2:
            return []
        return [("nf", weight.shape[1])] + ([("nx", weight.shape[0])] if hasattr(module, "nx") else [])


@register_layer(nn.modules.conv._ConvNd)
class ConvType(LayerType):
    """``ConvNd`` and ``ConvTransposeNd``, grouped included. Weight ``[out, in/groups, *k]``, transposed
    ``[in, out/groups, *k]``."""

    def in_dim(self, module: nn.Module) -> int | None:
        return 0 if module.transposed else 1

    def out_dim(self, module: nn.Module) -> int | None:
        return 1 if module.transposed else 0

    def input_axis(self, module: nn.Module) -> int | None:
        # input statistics per channel match the weight's in dim only without groups; transposed convs are not
        # among prune's calibrated consumers (kept as before the table)
        return 1 if not module.transposed and module.groups == 1 else None

    def weight_oi(self, module: nn.Module) -> Tensor | None:
        # the im2col matrix [out, in/groups * prod(kernel)]; a transposed conv's col2im map is not one product
        w = _weight(module)
        return None if w is None or module.transposed else w.flatten(1)

    def size_fields(self, module: nn.Module, weight: Tensor | None) -> list[tuple[str, Any]]:
        if weight is None:
            return []
        t = module.transposed
        out, in_ = (weight.shape[1], weight.shape[0]) if t else (weight.shape[0], weight.shape[1])
        groups = module.groups
        fields: list[tuple[str, Any]] = []
        if groups > 1 and in_ == 1 and not t:  # depthwise: the groups follow the channels
            groups = out
            fields.append(("groups", groups))
        fields.append(("out_channels", out * groups if t else out))
        fields.append(("in_channels", weight.shape[0] if t else in_ * groups))
        return fields

    def keep_error(self, module: nn.Module, tensor: str, keep: Mapping[int, Tensor]) -> str | None:
        # the analysis couples a grouped conv's channels as groups x per-group digits, so a conv-channel unit is a
        # position inside every conv group and the ratio rounds per conv group: the masks must agree group by group
        # (a group of whole conv groups, e.g. with prune_hidden, would change `groups`, which prune does not do)
        w, out_keep = _weight(module), keep.get(0)
        depthwise = _depthwise(module, w) and module.groups == w.shape[0]
        if tensor == "weight" and out_keep is not None and module.groups > 1 and not depthwise:
            inner = keep.get(1)
            if inner is not None and int(inner.sum()) == 1 < inner.numel():
                # one input channel per group would read as a depthwise conv when the sizes are rewritten
                return (f"{type(module).__name__} with groups={module.groups} would keep 1 of {inner.numel()} "
                        "channels per group; use a smaller ratio for conv_channels.")
            per = out_keep.view(module.groups, -1).sum(1).tolist()
            if len(set(per)) != 1 or per[0] == 0:
                return (f"{type(module).__name__} with groups={module.groups} would keep {per} channels per group; "
                        "a grouped convolution must keep the same non-zero number in every group. Exclude the "
                        "group that removes whole conv groups (prune_hidden=False, the default) or its kind's ratio.")
        return super().keep_error(module, tensor, keep)

    def resize_error(self, module: nn.Module, tensor: str, kept: Mapping[int, int]) -> str | None:
        w = _weight(module)
        depthwise = _depthwise(module, w)
        # prune keeps `groups` and checks the per-group counts from its masks; a count alone can only be uneven
        if tensor == "weight" and module.groups > 1 and not depthwise and kept.get(0, 0) % module.groups:
            return (f"{type(module).__name__} with groups={module.groups} cannot keep {kept[0]} channels (not the "
                    "same number in every group); exclude its group (ratio 0 for conv_channels) or use "
                    "groups=1/depthwise convolutions.")
        return None


class _ElementwiseType(LayerType):
    """A per-channel layer (norms): weight dim 0 is both the input and the output channel."""

    def out_dim(self, module: nn.Module) -> int | None:
        return 0


@register_layer(nn.modules.batchnorm._NormBase)
class BatchNormType(_ElementwiseType):
    """BatchNorm / InstanceNorm (``_NormBase``): ``num_features``, from the weight or the running mean."""

    def size_fields(self, module: nn.Module, weight: Tensor | None) -> list[tuple[str, Any]]:
        ref = weight if weight is not None else module._buffers.get("running_mean")
        return [] if ref is None else [("num_features", ref.shape[0])]


@register_layer(nn.GroupNorm)
class GroupNormType(_ElementwiseType):
    """``GroupNorm``: ``num_channels``; it can only keep a multiple of ``num_groups`` channels."""

    def size_fields(self, module: nn.Module, weight: Tensor | None) -> list[tuple[str, Any]]:
        return [] if weight is None else [("num_channels", weight.shape[0])]

    def resize_error(self, module: nn.Module, tensor: str, kept: Mapping[int, int]) -> str | None:
        n = kept.get(0)
        if tensor == "weight" and n is not None and n % module.num_groups:
            return (f"GroupNorm with {module.num_groups} groups cannot keep {n} channels; choose a ratio that leaves "
                    f"a multiple of {module.num_groups}.")
        return None


def _depthwise(module: nn.Module, w: Tensor | None) -> bool:
    """A conv whose every channel is its own group (``groups`` follows the channels when they are resized)."""
    return w is not None and w.shape[1] == 1 and not module.transposed


def _has_normalized_shape(module: nn.Module) -> bool:
    return isinstance(getattr(module, "normalized_shape", None), tuple)


@register_layer(nn.LayerNorm, nn.RMSNorm, predicate=_has_normalized_shape)
class NormalizedShapeType(_ElementwiseType):
    """LayerNorm, RMSNorm and look-alikes that store ``normalized_shape`` (a tuple of the weight's last dims)."""

    def size_fields(self, module: nn.Module, weight: Tensor | None) -> list[tuple[str, Any]]:
        shape = getattr(module, "normalized_shape", None)
        if weight is None or not isinstance(shape, tuple):
            return []
        return [("normalized_shape", tuple(weight.shape[-len(shape):]))]


@register_layer(nn.Embedding)
class EmbeddingType(LayerType):
    """``Embedding``: ``y = onehot(x) @ W`` with ``W [num_embeddings, embedding_dim]``; the input is indices."""

    def in_dim(self, module: nn.Module) -> int | None:
        return 0

    def out_dim(self, module: nn.Module) -> int | None:
        return 1

    def weight_oi(self, module: nn.Module) -> Tensor | None:
        w = _weight(module)
        return None if w is None else w.t()

    def size_fields(self, module: nn.Module, weight: Tensor | None) -> list[tuple[str, Any]]:
        if weight is None:
            return []
        return [("num_embeddings", weight.shape[0]), ("embedding_dim", weight.shape[1])]
