"""File writing shared by the passes that save tensors (adapters, compact sparse weights)."""

from __future__ import annotations

import os
import tempfile

import torch


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str], prefix: str
) -> None:
    """Write safetensors to a temp file beside ``path``, then rename: a crash or a full disk never leaves a
    half-written file under the final name (readers see the old file or the new one)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
