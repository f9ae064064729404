"""How the passes feed a user's calibration batch to a model (one convention for all of them)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn as nn


def run_batch(model: nn.Module, batch: Any) -> Any:
    """A mapping is keyword arguments (a tokenizer's output), a tuple or list positional ones, anything else the
    single input."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, list | tuple):
        return model(*batch)
    return model(batch)
