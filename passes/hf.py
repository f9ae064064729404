"""Hugging Face workflow glue: what the passes need so that transformers' own tools keep working.

Two things live here, each used by one pass:

- :func:`keep_checkpointing_grads` (``s2ft``): reentrant activation checkpointing needs the input of
  every checkpointed block to require grad, or the block's output does not either and its trained
  slices get no gradient. After ``s2ft`` freezes the embeddings nothing below the first block
  requires grad, so the embedding output is made to require it, only while checkpointing is on (the
  extra backward below the lowest trained layer costs nothing otherwise).
- :func:`pretrained_mismatches` (``prune``): whether ``from_pretrained`` can rebuild a pruned model
  from its config, found by building the model's class from that config on the meta device and
  comparing every tensor shape (no per-model knowledge of which config field sizes what).
"""

from __future__ import annotations

import copy
import logging
import warnings
from typing import Any

import torch
import torch.nn as nn

from sparsify_fx.errors import SparsifyWarning

log = logging.getLogger("sparsify_fx")


class _InputsRequireGrad:
    """Forward hook on an input embedding: its output requires grad while the model checkpoints activations.

    The hook holds the root module (not a weak reference) so that a deep copy of the model, hooks included,
    points at the copy.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)) or output.requires_grad:
            return
        if not self.root.training or not output.is_floating_point():
            return
        # transformers marks checkpointing with a `gradient_checkpointing` flag on the modules it wraps
        if any(getattr(m, "gradient_checkpointing", False) is True for m in self.root.modules()):
            output.requires_grad_(True)


def keep_checkpointing_grads(model: nn.Module) -> None:
    """Make ``model.gradient_checkpointing_enable()`` (reentrant or not) train the S²FT slices.

    transformers 5 already hooks the input embeddings when checkpointing is enabled; 4.x does so only
    for PEFT models, and ``disable_input_require_grads()`` removes its hook. This hook does the same
    and is a no-op when the output already requires grad. Models without ``get_input_embeddings`` get
    nothing (their checkpointing, if any, is not transformers').

    Args:
        model: the model ``s2ft`` transformed (the hook is removed by :func:`drop_checkpointing_grads`).

    Example:
        >>> keep_checkpointing_grads(model)   # called by s2ft; merge() calls drop_checkpointing_grads
    """
    get = getattr(model, "get_input_embeddings", None)
    if not callable(get):
        return
    try:
        emb = get()
    except (NotImplementedError, AttributeError):
        return
    if isinstance(emb, nn.Module) and not any(isinstance(h, _InputsRequireGrad) for h in emb._forward_hooks.values()):
        emb.register_forward_hook(_InputsRequireGrad(model))


def drop_checkpointing_grads(model: nn.Module) -> None:
    """Remove the hooks :func:`keep_checkpointing_grads` registered anywhere in ``model``.

    Args:
        model: a model (its modules' forward hooks of that kind go; other hooks stay).

    Example:
        >>> drop_checkpointing_grads(model)
    """
    for mod in model.modules():
        for key in [k for k, h in mod._forward_hooks.items() if isinstance(h, _InputsRequireGrad)]:
            del mod._forward_hooks[key]


def pretrained_mismatches(model: nn.Module) -> list[str]:
    """Tensors of ``model`` whose shape ``type(model).from_pretrained`` would not rebuild from ``model.config``.

    Empty when the model is not a transformers model or its class cannot be built from its config (then
    there is nothing to say about ``from_pretrained``).

    Args:
        model: a model after a shape-changing pass (e.g. ``prune``).

    Returns:
        ``"name: saved (a, b), config builds (c, d)"`` lines, one per differing or missing tensor.

    Example:
        >>> pretrained_mismatches(pruned_llama)   # [] when every layer was pruned to the same widths
    """
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(type(model), "from_pretrained", None)):
        return []
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(config))
    except Exception as exc:  # a config the class rejects: from_pretrained would fail the same way, loudly
        log.debug("pretrained_mismatches: cannot build %s from its config: %s", type(model).__name__, exc)
        return []
    built = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    out = []
    for name, t in model.state_dict().items():
        want = built.get(name, "no such tensor")
        if want != tuple(t.shape):
            # a missing tensor (e.g. a bias that bias compensation created) would be dropped on load
            out.append(f"{name}: saved {tuple(t.shape)}, config builds {want}")
    return out


class PretrainedMismatchWarning(SparsifyWarning):
    """A transformed model's shapes are not what ``from_pretrained`` rebuilds from its config."""


def warn_if_not_pretrained(model: nn.Module, what: str, fix: str, stacklevel: int = 3) -> list[str]:
    """Warn, naming the tensors, when ``save_pretrained``/``from_pretrained`` cannot round-trip ``model``.

    Said when the pass returns, i.e. before the user saves: ``from_pretrained`` would otherwise refuse the
    checkpoint (size mismatch) or, with ``ignore_mismatched_sizes=True``, re-initialise those weights.

    Args:
        model: the transformed model.
        what: the pass, for the message (e.g. ``"prune"``).
        fix: what the user can change in the pass's config to get a loadable model.
        stacklevel: passed to :func:`warnings.warn` (3 points at the pass's caller when the pass calls this).

    Returns:
        the mismatch lines (empty when nothing was said).

    Example:
        >>> warn_if_not_pretrained(model, "prune", "use one ratio per kind with scope='per_layer'")
    """
    bad = pretrained_mismatches(model)
    if bad:
        shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
        warnings.warn(
            f"{what}: from_pretrained cannot rebuild this model from its config (one config value per size, "
            f"but the layers now differ): {shown}. save_pretrained would write a checkpoint that "
            f"{type(model).__name__}.from_pretrained refuses (size mismatch) or, with ignore_mismatched_sizes=True, "
            f"re-initialises. To fix: {fix}; or keep this layout and save the whole module with "
            "torch.save(model) (or its state_dict with safetensors, plus code that rebuilds these shapes).",
            PretrainedMismatchWarning,
            stacklevel=stacklevel,
        )
    return bad
