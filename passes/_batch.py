"""How the passes feed a user's calibration batch to a model (one convention for all of them)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from sparsify_fx.errors import ConfigError


def run_batch(model: nn.Module, batch: Any) -> Any:
    """A mapping is keyword arguments (a tokenizer's output), a tuple or list positional ones, anything else the
    single input."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, list | tuple):
        return model(*batch)
    return model(batch)


def batch_loss(
    model: nn.Module, batch: Any, loss_fn: Callable[[nn.Module, Any], Any] | None, what: str
) -> torch.Tensor:
    """The scalar loss of one calibration batch: ``loss_fn(model, batch)``, or the model's own ``.loss`` (a
    transformers model given labels). ``what`` names the option that needs it, for the error."""
    out = loss_fn(model, batch) if loss_fn is not None else run_batch(model, batch)
    loss = out if isinstance(out, torch.Tensor) else getattr(out, "loss", None)
    if loss is None or loss.dim() != 0:
        raise ConfigError(
            f"{what} needs a scalar loss: pass loss_fn=lambda model, batch: ... or calibration batches for which "
            "the model returns .loss (e.g. with labels)."
        )
    return loss


def calibrate(model: nn.Module, hooks: Sequence[tuple[nn.Module, Callable[[nn.Module, tuple], None]]],
              batches: Iterable[Any], desc: str, progress: bool = True) -> int:
    """Run ``batches`` through ``model`` with forward pre-hooks ``(module, fn)`` attached, in eval mode (no dropout:
    statistics of the function the user will keep) and without autograd. Hooks and the train/eval mode are
    restored whatever happens. Returns how many batches ran."""
    handles = [mod.register_forward_pre_hook(fn) for mod, fn in hooks]
    was_training = model.training
    model.eval()
    seen = 0
    try:
        with torch.no_grad():
            for batch in tqdm(batches, desc=desc, disable=not progress, leave=False):
                run_batch(model, batch)
                seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen
