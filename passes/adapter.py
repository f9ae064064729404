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
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from sparsify_fx._io import save_safetensors_atomic
from sparsify_fx.errors import AdapterError
from sparsify_fx.passes.s2ft import state_of
from sparsify_fx.passes.surgery import get_tensor as _tensor

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
        save_safetensors_atomic(tensors, path, metadata, prefix=".adapter-")


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
    return _parse_adapter(path, metadata, tensors)


def _parse_adapter(path: str, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> Adapter:
    """An :class:`Adapter` from a file's header and tensors, every field type- and range-checked first.

    Raises AdapterError naming the file, the entry and the field; NaN/inf deltas are refused here, since applying
    them would poison the base weights they touch (and remove_adapter restores only what the adapter wrote).
    """

    def bad(what: str) -> AdapterError:
        return AdapterError(f"{path!r} has inconsistent adapter contents: {what}; re-export it with "
                            "export_adapter(model).save(path).")

    if metadata.get("format") != FORMAT:
        raise AdapterError(f"{path!r} is not a sparsify_fx S²FT adapter (format={metadata.get('format')!r}).")
    version = metadata.get("version", "")
    if not version.isdigit():
        raise bad(f"header field version={version!r} is not a non-negative integer")
    if int(version) > VERSION:
        raise AdapterError(f"{path!r} has adapter format version {version}; upgrade sparsify_fx.")
    try:
        meta_entries = json.loads(metadata["entries"])
        config = json.loads(metadata.get("config", "{}"))
    except KeyError as exc:
        raise bad(f"header field {exc.args[0]!r} is missing") from exc
    except json.JSONDecodeError as exc:
        raise bad(f"a header field is not JSON ({exc})") from exc
    fingerprint = metadata.get("fingerprint")
    if not isinstance(fingerprint, str) or not fingerprint:
        raise bad(f"header field fingerprint={fingerprint!r} is not a hash string")
    if not isinstance(config, dict):
        raise bad(f"header field config={config!r} is not a JSON object")
    if not isinstance(meta_entries, list):
        raise bad(f"header field entries={meta_entries!r} is not a list")
    entries: dict[str, AdapterEntry] = {}
    for i, m in enumerate(meta_entries):
        if not isinstance(m, dict):
            raise bad(f"entry {i} is {m!r}, not a JSON object")
        fqn = m.get("fqn")
        if not isinstance(fqn, str) or not fqn:
            raise bad(f"entry {i} field fqn={fqn!r} is not a parameter name")
        if fqn in entries:
            raise bad(f"entry {i} repeats {fqn!r}")
        shape, dim = m.get("shape"), m.get("dim")
        # ints only: json gives 1.5 or true for a hand-edited header, and int() would quietly accept both
        if not isinstance(shape, list) or not shape or not all(_is_int(x) and x >= 1 for x in shape):
            raise bad(f"entry {i} ({fqn}) field shape={shape!r} is not a list of positive ints")
        if not _is_int(dim) or not 0 <= dim < len(shape):
            raise bad(f"entry {i} ({fqn}) field dim={dim!r} is not a dim of its {len(shape)}-D shape {shape}")
        index, delta = tensors.get(f"{i}.index"), tensors.get(f"{i}.delta")
        if index is None or delta is None:
            raise bad(f"entry {i} ({fqn}) has no tensor {i}.index or {i}.delta")
        expect = list(shape)
        expect[dim] = index.numel()
        if index.dtype != torch.int64 or index.dim() != 1 or list(delta.shape) != expect:
            raise bad(f"entry {i} ({fqn}): index/delta shapes do not match the recorded shape {shape} at dim {dim}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= shape[dim]):
            raise bad(f"entry {i} ({fqn}): index out of range [0, {shape[dim]})")
        if index.unique().numel() != index.numel():
            raise bad(f"entry {i} ({fqn}): index repeats a position")
        if not delta.is_floating_point():
            raise bad(f"entry {i} ({fqn}): delta has dtype {delta.dtype}, not a floating type")
        if not torch.isfinite(delta).all():
            raise bad(f"entry {i} ({fqn}): delta holds {int((~torch.isfinite(delta)).sum())} NaN/inf values")
        entries[fqn] = AdapterEntry(fqn, dim, tuple(shape), index, delta)
    return Adapter(entries, fingerprint, config)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


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
    and a strided sample of all its values. O(touched), so checking it keeps switching fast.

    ``entries`` maps a weight's FQN to ``(dim, weight, touched)``, ``touched`` being the weight's
    values at the adapter's positions (``weight.index_select(dim, index)``), which the caller
    gathers anyway to be able to restore them.
    """
    h = hashlib.sha256()
    for fqn in sorted(entries):
        dim, base, touched = entries[fqn]
        h.update(f"{fqn}:{tuple(base.shape)}:{base.dtype}:{dim}".encode())
        h.update(_bytes(touched))
        h.update(_bytes(_strided(base, _SAMPLE_STRIDE)))
    return h.hexdigest()


def _strided(w: torch.Tensor, step: int, count: int | None = None) -> torch.Tensor:
    """Every ``step``-th value of ``w`` in row-major order, at most ``count`` of them. Where ``w`` is contiguous
    this is one view op, which matters for the per-switch spot check (a switch is only a few scatters)."""
    n = -(-w.numel() // step)
    if count is not None:
        n = min(n, count)
    if w.is_contiguous():
        return torch.as_strided(w.detach(), (n,), (step,), w.storage_offset())
    return w.detach().reshape(-1)[::step][:n]


def _bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().float().contiguous().cpu().numpy()).cast("B")


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
        base_for_fp[fqn] = (dim, base_orig, base_orig.index_select(dim, index.to(base_orig.device)))
    return Adapter(entries, _fingerprint(base_for_fp), st.config.to_dict())


# ---------------------------------------------------------------------- switching on a plain base
# Switching adapters on a served base is the hot path, so the work of a first apply is kept: once an
# adapter's fingerprint has been checked against a base, the base's values at its positions and the
# values with the delta added are cached on the model, and later applies are one scatter each way.
# The cache is valid while the weight is the one it was checked against: same tensor, same storage,
# same version counter (every in-place write through autograd-visible tensors bumps it: optimizers,
# load_state_dict, our own scatters), plus a strided spot check of its values, which catches writes
# through ``.data`` that the counter does not see. Our own restores are exact, so after a remove the
# cache entries that were valid before the matching apply are valid again.

_Key = tuple[int, int, int]


def _key(p: torch.Tensor) -> _Key:
    return (id(p), p.data_ptr(), p._version)


@dataclass
class _Prepared:
    """An adapter checked against a base's weights, with the rows it writes and the rows it replaces."""

    adapter: weakref.ref
    keys: dict[str, _Key]  # the weights' state the cache is valid for
    probe: torch.Tensor  # strided samples of the weights at that state, concatenated
    index: dict[str, tuple[int, torch.Tensor]]  # dim and positions, on the weight's device
    base_rows: dict[str, torch.Tensor]  # with the indexed dim first (see _write)
    new_rows: dict[str, torch.Tensor]

    def valid_for(self, params: dict[str, torch.Tensor]) -> bool:
        # one comparison for all weights: a switch is a few scatters, so per-weight op overhead shows
        return all(_key(p) == self.keys[f] for f, p in params.items()) and torch.equal(_probes(params), self.probe)


def _probes(params: dict[str, torch.Tensor]) -> torch.Tensor:
    # 16 values a weight: each is a cache miss, and an overwrite of the weight (the case the version counter
    # misses) changes them all. cat promotes mixed dtypes exactly (bf16/fp16 into fp32), so equal is exact.
    return torch.cat([_strided(p, max(1, p.numel() // 16), 16) for p in params.values()])


@dataclass
class _Applied:
    prepared: _Prepared
    pre_keys: dict[str, _Key]  # the weights' state before the apply; a remove brings their values back
    post_keys: dict[str, _Key]  # and after it: a remove restores exactly only if nothing wrote in between


def _leading(t: torch.Tensor, dim: int) -> torch.Tensor:
    return t if dim == 0 else t.transpose(0, dim)


def _write(p: torch.Tensor, dim: int, idx: torch.Tensor, rows: torch.Tensor) -> None:
    # The scatter is the whole cost of a switch. Indexing the leading dim of a transposed view, with the
    # rows stored that way round, is faster for the columns of a row-major weight than p[:, idx]: 10 % with
    # caches cold after a LoRA merge, 25 % warm (4 x 512x1408 weights, 41 columns each), and p[:, idx] was
    # ~2x faster than index_copy_. ``rows`` has the indexed dim first.
    _leading(p, dim)[idx] = rows


def _state(model: nn.Module) -> tuple[list[_Applied], dict[int, _Prepared]]:
    state = getattr(model, "_sparsify_adapters", None)
    if state is None:
        state = ([], {})
        object.__setattr__(model, "_sparsify_adapters", state)
    return state


def _lookup(model: nn.Module, fqn: str) -> torch.Tensor:
    """``_tensor`` through the modules' dicts: get_submodule's checks cost more than a small scatter."""
    *path, attr = fqn.split(".")
    mod = model
    try:
        for name in path:
            mod = mod._modules[name]
        t = mod._parameters.get(attr)
    except (KeyError, AttributeError):
        t = None
    return t if t is not None else _tensor(model, fqn)


def _params_for(model: nn.Module, adapter: Adapter) -> dict[str, torch.Tensor]:
    params: dict[str, torch.Tensor] = {}
    for fqn, e in adapter.entries.items():
        try:
            p = _lookup(model, fqn)
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
    return params


def _prepare(model: nn.Module, adapter: Adapter, params: dict[str, torch.Tensor]) -> _Prepared:
    """Check the fingerprint on the model's current weights (O(touched)) and build the cache entry."""
    index, base_rows = {}, {}
    for fqn, e in adapter.entries.items():
        p = params[fqn]
        idx = e.index.to(p.device)
        index[fqn] = (e.dim, idx)
        base_rows[fqn] = p.detach().index_select(e.dim, idx)
    fp = _fingerprint({f: (e.dim, params[f], base_rows[f]) for f, e in adapter.entries.items()})
    if fp != adapter.fingerprint:
        applied = len(_state(model)[0])
        hint = f" ({applied} adapter(s) already applied: remove_adapter first)" if applied else ""
        raise AdapterError(
            f"adapter was trained on a different base model (weight fingerprint mismatch){hint}; apply it to the "
            "base it was exported from."
        )
    new_rows = {
        f: base_rows[f] + e.delta.to(device=base_rows[f].device, dtype=base_rows[f].dtype)
        for f, e in adapter.entries.items()
    }
    return _Prepared(
        adapter=weakref.ref(adapter),
        keys={f: _key(p) for f, p in params.items()},
        probe=_probes(params),
        index=index,
        base_rows={f: _leading(t, index[f][0]).contiguous() for f, t in base_rows.items()},
        new_rows={f: _leading(t, index[f][0]).contiguous() for f, t in new_rows.items()},
    )


@torch.no_grad()
def apply_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Add ``adapter``'s delta to a plain base model in place (only its rows/columns are touched).

    Refuses an adapter trained on another base (shape or fingerprint mismatch) before writing. The
    first apply to a base checks the fingerprint; applying it again to the unchanged base is one
    scatter per weight. For that the model keeps, per adapter object applied to it, the base values
    at the adapter's positions and the values with the delta added (twice the adapter's size); the
    entry goes at the first remove_adapter after the adapter object is freed.
    """
    if getattr(model, "_sparsify_s2ft", None) is not None:
        raise AdapterError("apply_adapter needs a plain base model; this one is S²FT-transformed (merge() it first).")
    params = _params_for(model, adapter)
    applied, cache = _state(model)
    prepared = cache.get(id(adapter))
    if prepared is None or prepared.adapter() is not adapter or not prepared.valid_for(params):
        prepared = _prepare(model, adapter, params)  # raises before anything is written
        cache[id(adapter)] = prepared
    pre_keys = dict(prepared.keys)
    for fqn, p in params.items():
        dim, idx = prepared.index[fqn]
        _write(p, dim, idx, prepared.new_rows[fqn])
    applied.append(_Applied(prepared, pre_keys, {f: _key(p) for f, p in params.items()}))
    return model


@torch.no_grad()
def remove_adapter(model: nn.Module, adapter: Adapter | None = None) -> nn.Module:
    """Undo the last :func:`apply_adapter` (or check it was ``adapter``): the base is restored bit for bit."""
    applied, cache = _state(model)
    if not applied:
        raise AdapterError("no adapter is applied to this model.")
    last = applied[-1]
    if adapter is not None and last.prepared.adapter() is not adapter:
        raise AdapterError("that adapter is not the last one applied; remove adapters in reverse order.")
    prepared = last.prepared
    params = {fqn: _lookup(model, fqn) for fqn in prepared.index}
    untouched = all(_key(p) == last.post_keys[f] for f, p in params.items())
    restored: dict[str, _Key] = {}
    for fqn, p in params.items():
        dim, idx = prepared.index[fqn]
        _write(p, dim, idx, prepared.base_rows[fqn])
        restored[fqn] = _key(p)
    applied.pop()
    for k in [k for k, v in cache.items() if v.adapter() is None]:
        del cache[k]
    if untouched:
        # The weights hold their pre-apply values again, so what was valid for them then is valid now:
        # cache entries, and the post-apply state of adapters applied below this one.
        for fqn, key in restored.items():
            for keys in [e.keys for e in cache.values()] + [a.post_keys for a in applied]:
                if keys.get(fqn) == last.pre_keys[fqn]:
                    keys[fqn] = key
    return model
