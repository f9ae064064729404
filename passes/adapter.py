"""S²FT adapters: the trained delta in original coordinates, saved as safetensors + JSON.

An adapter is, per trained weight, the element indices along one dim (original unit order) and the
dense delta of those rows/columns. Applying it to a plain base model touches only those rows or
columns, so switching adapters costs a gather and a scatter of the trained slices — no GEMM, unlike
merging a low-rank adapter. The base rows an adapter overwrote are kept on the model so that
``remove_adapter`` restores the base bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from sparsify_fx.errors import AdapterError
from sparsify_fx.passes.permute import _tensor
from sparsify_fx.passes.s2ft import state_of

FORMAT = "sparsify_fx.s2ft_adapter"
VERSION = 1
_SAMPLE_STRIDE = 997  # a strided sample of every touched weight joins the fingerprint


@dataclass
class AdapterEntry:
    fqn: str
    dim: int
    shape: tuple[int, ...]  # the base parameter's shape
    index: torch.Tensor  # long [n]: positions along `dim`, original coordinates
    delta: torch.Tensor  # base shape with size n at `dim`


@dataclass
class Adapter:
    """A trained S²FT delta that applies to any copy of its base model."""

    entries: dict[str, AdapterEntry]
    fingerprint: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def num_parameters(self) -> int:
        return sum(e.delta.numel() for e in self.entries.values())

    def save(self, path: str | os.PathLike) -> None:
        """Write safetensors with JSON metadata, atomically (temp file, then rename); no pickle."""
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        meta_entries = []
        for i, e in enumerate(self.entries.values()):
            tensors[f"{i}.index"] = e.index.contiguous().cpu()
            tensors[f"{i}.delta"] = e.delta.contiguous().cpu()
            meta_entries.append({"fqn": e.fqn, "dim": e.dim, "shape": list(e.shape)})
        metadata = {
            "format": FORMAT,
            "version": str(VERSION),
            "fingerprint": self.fingerprint,
            "entries": json.dumps(meta_entries),
            "config": json.dumps(self.config, default=str),
        }
        path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(prefix=".adapter-", suffix=".tmp", dir=directory)
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata=metadata)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read an adapter written by :meth:`Adapter.save`; corrupt or foreign files raise AdapterError."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise AdapterError(f"no adapter file at {path!r}.")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118  (safe_open has no __iter__)
    except Exception as exc:
        raise AdapterError(
            f"{path!r} is not a readable safetensors file ({type(exc).__name__}: {exc}); it may be truncated or "
            "corrupt: re-export it with export_adapter(model).save(path)."
        ) from exc
    if metadata.get("format") != FORMAT:
        raise AdapterError(f"{path!r} is not a sparsify_fx S²FT adapter (format={metadata.get('format')!r}).")
    if int(metadata.get("version", -1)) > VERSION:
        raise AdapterError(f"{path!r} has adapter format version {metadata['version']}; upgrade sparsify_fx.")
    try:
        meta_entries = json.loads(metadata["entries"])
        config = json.loads(metadata.get("config", "{}"))
        fingerprint = metadata["fingerprint"]
        entries = {}
        for i, m in enumerate(meta_entries):
            index, delta = tensors[f"{i}.index"], tensors[f"{i}.delta"]
            shape, dim = tuple(int(s) for s in m["shape"]), int(m["dim"])
            expect = list(shape)
            expect[dim] = index.numel()
            if index.dtype != torch.int64 or list(delta.shape) != expect or not 0 <= dim < len(shape):
                raise ValueError(f"entry {m['fqn']}: index/delta shapes do not match the recorded shape")
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= shape[dim]):
                raise ValueError(f"entry {m['fqn']}: index out of range")
            entries[m["fqn"]] = AdapterEntry(m["fqn"], dim, shape, index, delta)
    except (KeyError, ValueError, TypeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path!r} has inconsistent adapter contents: {exc}") from exc
    return Adapter(entries, fingerprint, config)


# ---------------------------------------------------------------------- export
def _unpermute(t: torch.Tensor, fqn: str, st: Any) -> torch.Tensor:
    """Bring a tensor of parameter ``fqn`` from the transformed layout back to original coordinates."""
    for name in reversed(list(st.perms)):
        group, inv = st.groups[name], torch.argsort(st.perms[name])
        for m in group.members:
            if m.fqn == fqn:
                t = t.index_select(m.dim, m.index(inv).to(t.device))
    return t


def _fingerprint(entries: dict[str, tuple[int, torch.Tensor, torch.Tensor]]) -> str:
    """Hash of the base: each touched weight's shape and dtype, its values at the touched positions,
    and a strided sample of all its values. O(touched), so checking it keeps switching fast."""
    h = hashlib.sha256()
    for fqn in sorted(entries):
        dim, index, base = entries[fqn]
        h.update(f"{fqn}:{tuple(base.shape)}:{base.dtype}:{dim}".encode())
        touched = base.detach().index_select(dim, index.to(base.device)).float().contiguous()
        sample = base.detach().reshape(-1)[::_SAMPLE_STRIDE].float().contiguous()
        h.update(touched.cpu().numpy().tobytes())
        h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()


@torch.no_grad()
def export_adapter(model: nn.Module) -> Adapter:
    """The trained delta of an S²FT model, in the original (un-permuted) coordinates."""
    st = state_of(model)
    for name in st.modules:
        model.get_submodule(name).sync_()
    entries: dict[str, AdapterEntry] = {}
    base_for_fp: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}
    by_weight: dict[str, list] = {}
    for s in st.slices:
        by_weight.setdefault(s.fqn, []).append(s)
    for fqn, slices in by_weight.items():
        w = _tensor(model, fqn).detach()
        dim = slices[0].dim
        base = w.clone()
        marker = torch.zeros(w.shape[dim], dtype=torch.bool)
        for s in slices:
            base.narrow(dim, s.start, s.length).copy_(st.base_blocks[(fqn, s.start)])
            marker[s.start : s.start + s.length] = True
        base_orig = _unpermute(base, fqn, st)
        delta_orig = _unpermute(w - base, fqn, st)
        marker_orig = marker
        for name in reversed(list(st.perms)):
            group, inv = st.groups[name], torch.argsort(st.perms[name])
            for m in group.members:
                if m.fqn == fqn and m.dim == dim:
                    marker_orig = marker_orig[m.index(inv)]
        index = torch.nonzero(marker_orig).flatten()
        entries[fqn] = AdapterEntry(fqn, dim, tuple(w.shape), index, delta_orig.index_select(dim, index).clone())
        base_for_fp[fqn] = (dim, index, base_orig)
    return Adapter(entries, _fingerprint(base_for_fp), st.config.to_dict())


# ---------------------------------------------------------------------- switching on a plain base
def _stack(model: nn.Module) -> list[tuple[int, dict[str, tuple[int, torch.Tensor, torch.Tensor]]]]:
    stack = getattr(model, "_sparsify_adapter_stack", None)
    if stack is None:
        stack = []
        object.__setattr__(model, "_sparsify_adapter_stack", stack)
    return stack


@torch.no_grad()
def apply_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Add ``adapter``'s delta to a plain base model in place (only its rows/columns are touched).

    Refuses an adapter trained on another base (shape or fingerprint mismatch) before writing.
    """
    if getattr(model, "_sparsify_s2ft", None) is not None:
        raise AdapterError("apply_adapter needs a plain base model; this one is S²FT-transformed (merge() it first).")
    params: dict[str, torch.Tensor] = {}
    for fqn, e in adapter.entries.items():
        try:
            p = _tensor(model, fqn)
        except Exception as exc:
            raise AdapterError(
                f"adapter entry {fqn!r} names no tensor of this model: it is for another model."
            ) from exc
        if tuple(p.shape) != e.shape:
            raise AdapterError(
                f"adapter was trained on a different base: {fqn} has shape {tuple(p.shape)} here, {e.shape} in "
                "the adapter."
            )
        params[fqn] = p
    fp = _fingerprint({f: (e.dim, e.index, params[f]) for f, e in adapter.entries.items()})
    if fp != adapter.fingerprint:
        applied = len(_stack(model))
        hint = f" ({applied} adapter(s) already applied: remove_adapter first)" if applied else ""
        raise AdapterError(
            f"adapter was trained on a different base model (weight fingerprint mismatch){hint}; apply it to the "
            "base it was exported from."
        )
    saved = {}
    for fqn, e in adapter.entries.items():
        p = params[fqn]
        idx = e.index.to(p.device)
        saved[fqn] = (e.dim, idx, p.index_select(e.dim, idx).clone())
        p.index_add_(e.dim, idx, e.delta.to(device=p.device, dtype=p.dtype))
    _stack(model).append((id(adapter), saved))
    return model


@torch.no_grad()
def remove_adapter(model: nn.Module, adapter: Adapter | None = None) -> nn.Module:
    """Undo the last :func:`apply_adapter` (or check it was ``adapter``): the base is restored bit for bit."""
    stack = _stack(model)
    if not stack:
        raise AdapterError("no adapter is applied to this model.")
    key, saved = stack[-1]
    if adapter is not None and key != id(adapter):
        raise AdapterError("that adapter is not the last one applied; remove adapters in reverse order.")
    for fqn, (dim, index, rows) in saved.items():
        _tensor(model, fqn).index_copy_(dim, index, rows)
    stack.pop()
    return model
