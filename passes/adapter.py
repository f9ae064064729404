"""S²FT adapters: the trained delta in original coordinates, saved as safetensors + JSON.

An adapter is, per trained weight, the element indices along one dim (original unit order) and the
dense delta of those rows/columns. Applying it to a plain base model touches only those rows or
columns, so switching adapters costs a gather and a scatter of the trained slices — no GEMM, unlike
merging a low-rank adapter. The base rows an adapter overwrote are kept on the model so that
``remove_adapter`` restores the base bit for bit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from sparsify_fx._io import save_safetensors_atomic, write_text_atomic
from sparsify_fx.errors import AdapterError
from sparsify_fx.passes.importance import is_dtensor
from sparsify_fx.passes.s2ft import state_of
from sparsify_fx.passes.s2ft_experts import block_key
from sparsify_fx.passes.surgery import Journal, Verb, require_composable, unwrap
from sparsify_fx.passes.surgery import get_tensor as _tensor

FORMAT = "sparsify_fx.s2ft_adapter"
# 2: the fingerprint samples the whole base (_fingerprint). Version-1 files, whose fingerprint is a hash of the
# touched weights only, still load and apply (checked the old way, _legacy_fingerprint); a version-1 reader
# refuses a version-2 file ("upgrade sparsify_fx") instead of calling its base "a different base model".
VERSION = 2
SUFFIX = ".safetensors"
# not PEFT's adapter_config.json / adapter_model.safetensors: PEFT then refuses the directory instead of misreading it
CONFIG_FILE = "s2ft_config.json"
WEIGHTS_FILE = "s2ft_adapter.safetensors"
_SAMPLE_STRIDE = 997  # version-1 fingerprints: a strided sample of every touched weight
_BASE_SAMPLE = 64  # values the fingerprint samples from every parameter and buffer of the base
_TOUCHED_SAMPLE = 256  # and from the base values each entry replaces
_FP_PREFIX = "sfp2:"


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
    base_model: str | None = None  # the base's ``name_or_path`` (a hub id or a directory), when it had one

    @property
    def num_parameters(self) -> int:
        return sum(e.delta.numel() for e in self.entries.values())

    def save(self, path: str | os.PathLike) -> None:
        """Write the adapter: one ``.safetensors`` file, or a directory the way PEFT saves adapters.

        A path ending in ``.safetensors`` gets a single safetensors file with JSON metadata. Any other path is
        a directory (created if needed) holding ``s2ft_adapter.safetensors`` and ``s2ft_config.json`` (the
        :class:`S2FTConfig` as a dict, the base model's name, the format version, the fingerprint). PEFT's file
        names are not used, so ``PeftModel.from_pretrained`` refuses the directory (no ``adapter_config.json``)
        instead of misreading it. Each file is written to a temp file and renamed, the JSON last; both carry
        one save id, so a directory left by an interrupted save (new weights, old JSON) is refused on load
        rather than read as a mix. No pickle.

        Args:
            path: ``*.safetensors`` for one file, anything else for a directory.

        Example:
            >>> export_adapter(model).save("adapters/sentiment")    # reload: load_adapter("adapters/sentiment")
        """
        path = os.fspath(path)
        single = path.lower().endswith(SUFFIX) and not os.path.isdir(path)
        if not single and os.path.exists(path) and not os.path.isdir(path):
            raise AdapterError(
                f"{path!r} is a file, so the adapter directory cannot be created there; pass a directory path, or a "
                f"path ending in {SUFFIX} for a single file."
            )
        save_id = uuid.uuid4().hex
        tensors, metadata = self._payload(save_id if not single else None)
        if single:
            save_safetensors_atomic(tensors, path, metadata, prefix=".adapter-")
            return
        os.makedirs(path, exist_ok=True)
        save_safetensors_atomic(tensors, os.path.join(path, WEIGHTS_FILE), metadata, prefix=".adapter-")
        config = {
            "format": FORMAT,
            "version": VERSION,
            "base_model_name_or_path": self.base_model,
            "fingerprint": self.fingerprint,
            "s2ft_config": self.config,
            "weights": WEIGHTS_FILE,
            "num_parameters": self.num_parameters,
            "save_id": save_id,
        }
        # last: until this rename the directory's JSON still describes the old weights' save
        write_text_atomic(json.dumps(config, indent=2, default=str) + "\n", os.path.join(path, CONFIG_FILE),
                          prefix=".adapter-")

    def _payload(self, save_id: str | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
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
        if self.base_model:
            metadata["base_model"] = self.base_model
        if save_id is not None:
            metadata["save_id"] = save_id
        return tensors, metadata


def save_adapter(adapter: Adapter, path: str | os.PathLike) -> None:
    """Save ``adapter`` to ``path``: a directory (PEFT-style, JSON config beside the safetensors) or one file.

    Same as :meth:`Adapter.save`; the counterpart of :func:`load_adapter`.

    Args:
        adapter: from :func:`export_adapter` or :func:`load_adapter`.
        path: a directory, or a path ending in ``.safetensors`` for a single file.

    Example:
        >>> save_adapter(export_adapter(model), "adapters/sentiment")
    """
    adapter.save(path)


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read an adapter written by :meth:`Adapter.save`: a directory or a single ``.safetensors`` file.

    Corrupt or foreign files, a directory missing one of its two files, and a directory whose JSON and
    safetensors come from different saves raise :class:`AdapterError` naming the file.

    Args:
        path: the adapter directory or file.

    Example:
        >>> apply_adapter(base, load_adapter("adapters/sentiment"))
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if os.path.isdir(path):
        return _load_directory(path)
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
    adapter = _parse_adapter(path, metadata, tensors)
    adapter.base_model = metadata.get("base_model") or None
    return adapter


def _load_directory(directory: str) -> Adapter:
    """The directory branch of :func:`load_adapter`: the JSON config, then its safetensors, checked together."""
    from safetensors import safe_open

    config_path, weights_path = os.path.join(directory, CONFIG_FILE), os.path.join(directory, WEIGHTS_FILE)
    if not os.path.isfile(config_path):
        raise AdapterError(
            f"{config_path!r} is missing: {directory!r} is not a sparsify_fx adapter directory, or its save was "
            "interrupted before the config was written; save the adapter again with adapter.save(directory)."
        )
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{config_path!r} is not readable JSON ({exc}); save the adapter again.") from exc
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        found = config.get("format") if isinstance(config, dict) else type(config).__name__
        raise AdapterError(f"{config_path!r} is not a sparsify_fx S²FT adapter config (format={found!r}).")
    version = config.get("version")
    if not _is_int(version) or version < 0:
        raise AdapterError(f"{config_path!r} field version={version!r} is not a non-negative integer; save it again.")
    if version > VERSION:
        raise AdapterError(f"{config_path!r} has adapter format version {version}; upgrade sparsify_fx.")
    if not os.path.isfile(weights_path):
        raise AdapterError(
            f"{weights_path!r} is missing: the directory holds the config but not the weights; copy the whole "
            "directory, or save the adapter again."
        )
    adapter = load_adapter(weights_path)
    with safe_open(weights_path, framework="pt") as f:  # readable: load_adapter just read it
        save_id = (f.metadata() or {}).get("save_id")
    if config.get("fingerprint") != adapter.fingerprint:
        raise AdapterError(
            f"{config_path!r} and {weights_path!r} name different base models (fingerprint "
            f"{str(config.get('fingerprint'))[:12]}... vs {adapter.fingerprint[:12]}...): the files come from two "
            "different adapters; save the adapter again into an empty directory."
        )
    if config.get("save_id") != save_id:
        raise AdapterError(
            f"{config_path!r} and {weights_path!r} come from different saves (an interrupted save, or a file copied "
            "in from another directory); save the adapter again."
        )
    name = config.get("base_model_name_or_path")
    adapter.base_model = name if isinstance(name, str) and name else None
    return adapter


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
                idx = m.index(inv).to(t.device)
                if m.expert is None:
                    t = t.index_select(m.dim, idx)
                else:  # one expert's slice of a stacked weight
                    t = t.clone()
                    t[m.expert] = t[m.expert].index_select(m.dim - 1, idx)
    return t


def _legacy_fingerprint(entries: dict[str, tuple[int, torch.Tensor, torch.Tensor]]) -> str:
    """The version-1 fingerprint (kept to check version-1 files): a hash of each touched weight's shape and dtype,
    its values at the touched positions and a strided sample of all its values.

    ``entries`` maps a weight's FQN to ``(dim, weight, touched)``, ``touched`` being ``weight.index_select(dim,
    index)``.
    """
    h = hashlib.sha256()
    for fqn in sorted(entries):
        dim, base, touched = entries[fqn]
        h.update(f"{fqn}:{tuple(base.shape)}:{base.dtype}:{dim}".encode())
        h.update(_bytes(touched))
        h.update(_bytes(_strided(base, _SAMPLE_STRIDE)))
    return h.hexdigest()


def _is_legacy(fingerprint: str) -> bool:
    return re.fullmatch(r"[0-9a-f]{64}", fingerprint) is not None


@dataclass
class _BaseSample:
    """What the fingerprint records of a base, in original coordinates."""

    tensors: dict[str, tuple[tuple[int, ...], torch.dtype, torch.Tensor]]  # each parameter/buffer: shape, dtype, values
    touched: dict[str, torch.Tensor]  # weight FQN -> sample of the base values the adapter replaces


def _fingerprint(sample: _BaseSample) -> str:
    """The fingerprint of a base: every parameter's and buffer's FQN, shape, dtype and a sample of its values,
    plus a sample of the values each entry replaces, as ``sfp2:`` + JSON (values base64, bit-exact).

    Values rather than a hash, so that a mismatch can be named (which tensor, a shape, a dtype) and a base of
    another floating dtype can be compared after rounding (see :func:`_compare`). A few KiB per hundred tensors.
    """
    doc = {
        "tensors": [
            [f, list(shape), str(dtype).removeprefix("torch."), _encode(v)]
            for f, (shape, dtype, v) in sorted(sample.tensors.items())
        ],
        "touched": [[f, _encode(v)] for f, v in sorted(sample.touched.items())],
    }
    return _FP_PREFIX + json.dumps(doc, separators=(",", ":"))


def _parse_fingerprint(fingerprint: str) -> _BaseSample:
    """Inverse of :func:`_fingerprint`; a malformed string raises AdapterError."""
    try:
        if not fingerprint.startswith(_FP_PREFIX):
            raise ValueError("unknown fingerprint format")
        doc = json.loads(fingerprint[len(_FP_PREFIX) :])
        tensors = {}
        for fqn, shape, dtype_name, values in doc["tensors"]:
            dtype = getattr(torch, dtype_name, None)
            if not isinstance(dtype, torch.dtype):
                raise ValueError(f"{fqn}: unknown dtype {dtype_name!r}")
            tensors[str(fqn)] = (tuple(int(s) for s in shape), dtype, _decode(values, dtype))
        touched = {str(fqn): _decode(values, tensors[fqn][1]) for fqn, values in doc["touched"]}
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise AdapterError(
            f"the adapter's base fingerprint is malformed ({type(exc).__name__}: {exc}); re-export the adapter "
            "from its S²FT model with export_adapter(model)."
        ) from exc
    return _BaseSample(tensors, touched)


# same-size integer views: samples are stored and compared bit for bit (NaN equals itself, -0.0 is not 0.0)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    int_dtype = _INT_OF_SIZE.get(t.element_size())
    return t if int_dtype is None or t.dtype == int_dtype else t.view(int_dtype)


def _encode(t: torch.Tensor) -> str:
    return base64.b64encode(_bits(t.detach().contiguous().cpu()).numpy().tobytes()).decode("ascii")


def _decode(text: str, dtype: torch.dtype) -> torch.Tensor:
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    probe = torch.empty(0, dtype=dtype)
    if not raw:
        return probe
    return torch.frombuffer(bytearray(raw), dtype=_bits(probe).dtype).view(dtype)


def _sample_positions(numel: int, count: int) -> torch.Tensor:
    """Flat row-major positions of ``count`` values spread over ``numel``: evenly spaced, the k-th moved k along,
    since an even stride that is a multiple of a row's length would sample a single column."""
    if numel <= count:
        return torch.arange(numel)
    k = torch.arange(count)
    return (k * numel // count + k) % numel


def _sample(t: torch.Tensor, count: int, index: dict[int, torch.Tensor] | None = None) -> torch.Tensor:
    """``count`` values of ``t`` at :func:`_sample_positions`, on the CPU. ``index[d][i]`` is where original
    coordinate ``i`` of dim ``d`` sits in ``t`` (an S²FT model's weights are co-permuted). O(count), any strides."""
    t = t.detach()
    if t.dim() == 0:
        return t.reshape(1).cpu()
    coords = list(torch.unravel_index(_sample_positions(t.numel(), count), t.shape))
    for d, idx in (index or {}).items():
        coords[d] = idx[coords[d]]
    return t[tuple(c.to(t.device) for c in coords)].cpu()


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    # every name, tied ones included: the set is then the same whether or not a copy of the base ties them
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(model.named_buffers(remove_duplicate=False))
    return tensors


def _agree(recorded: torch.Tensor, here: torch.Tensor) -> bool:
    """Bit-exact comparison of two samples; of two floating dtypes, after rounding both to the less precise one.

    No tolerance is needed: ``model.to(dtype)`` rounds to nearest, so a base that is the adapter's base cast to
    another dtype matches exactly, and a base that is not differs at the sampled values as any other base does.
    """
    if recorded.dtype != here.dtype:
        if not (recorded.dtype.is_floating_point and here.dtype.is_floating_point):
            return False
        low = recorded.dtype if torch.finfo(recorded.dtype).eps >= torch.finfo(here.dtype).eps else here.dtype
        recorded, here = recorded.to(low), here.to(low)
    return recorded.shape == here.shape and torch.equal(_bits(recorded), _bits(here))


def _check_base(recorded: _BaseSample, here: _BaseSample, hint: str) -> None:
    """Raise AdapterError naming how the base ``here`` differs from the adapter's: tensors, shapes, dtypes, values."""

    def some(names: list[str]) -> str:
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    missing = sorted(set(recorded.tensors) - set(here.tensors))
    extra = sorted(set(here.tensors) - set(recorded.tensors))
    if missing or extra:
        what = [f"lacks {some(missing)}"] if missing else []
        what += [f"has {some(extra)}, which it had not"] if extra else []
        raise AdapterError(
            f"this model is not the adapter's base: compared with it, this model {' and '.join(what)}; it is for "
            f"another model{hint}. Apply it to the base it was exported from."
        )
    shapes = [f for f in sorted(recorded.tensors) if recorded.tensors[f][0] != tuple(here.tensors[f][0])]
    if shapes:
        f = shapes[0]
        raise AdapterError(
            f"this model is not the adapter's base: {f} has shape {tuple(here.tensors[f][0])} here, "
            f"{recorded.tensors[f][0]} in the adapter's base ({len(shapes)} tensor(s) differ in shape: "
            f"{some(shapes)}): another architecture or config. Apply it to the base it was exported from."
        )
    differ = [f for f in sorted(recorded.tensors) if not _agree(recorded.tensors[f][2], here.tensors[f][2])]
    differ += [f"{f} (the rows it replaces)" for f in sorted(recorded.touched)
               if f in here.touched and not _agree(recorded.touched[f], here.touched[f])]
    if not differ:
        return
    casts = sorted({(recorded.tensors[f][1], here.tensors[f][1]) for f in recorded.tensors
                    if recorded.tensors[f][1] != here.tensors[f][1]}, key=str)
    if casts:
        src, dst = casts[0]
        src_name, dst_name = str(src).removeprefix("torch."), str(dst).removeprefix("torch.")
        raise AdapterError(
            f"adapter was exported from a {src_name} base; this base is {dst_name}, and even rounded to the less "
            f"precise of the two its values are not the adapter base's ({len(differ)} tensor(s) differ: "
            f"{some(differ)}){hint}. Load the base checkpoint in {src_name} (from_pretrained(..., "
            f"torch_dtype=torch.{src_name})) or cast with model.to(torch.{src_name}), then apply."
        )
    raise AdapterError(
        f"adapter was trained on a different base model (weight fingerprint mismatch: {len(differ)} of "
        f"{len(recorded.tensors)} tensors differ: {some(differ)}){hint}; apply it to the base it was exported from."
    )


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


def _name_or_path(model: nn.Module) -> str | None:
    """The base model's hub id or directory, as transformers records it (``""`` for a model built from a config)."""
    for name in (getattr(getattr(model, "config", None), "_name_or_path", None), getattr(model, "name_or_path", None)):
        if isinstance(name, str) and name:
            return name
    return None


def _original_index(st: Any) -> dict[str, dict[int, torch.Tensor]]:
    """Per tensor FQN and dim, where each original coordinate sits in the co-permuted model: the composition
    of the gathers :func:`_unpermute` applies, so that a sample in original coordinates costs O(sample)."""
    index: dict[str, dict[int, torch.Tensor]] = {}
    for name in reversed(list(st.perms)):
        group, inv = st.groups[name], torch.argsort(st.perms[name])
        for m in group.members:
            if m.expert is not None:
                continue  # per-expert orders do not compose into one index per dim: export samples those unpermuted
            j = m.index(inv).cpu()
            dims = index.setdefault(m.fqn, {})
            dims[m.dim] = dims[m.dim][j] if m.dim in dims else j
    return index


@torch.no_grad()
def export_adapter(model: nn.Module) -> Adapter:
    """The trained delta of an S²FT model, in the original (un-permuted) coordinates.

    The adapter's fingerprint samples every parameter and buffer of the base (the model before training, in
    original coordinates), so :func:`apply_adapter` refuses a base that differs anywhere it samples, naming a
    missing tensor, a shape or a dtype as such.

    Args:
        model: a model transformed by :func:`sparsify_fx.s2ft` (and trained).

    Example:
        >>> adapter = export_adapter(model)
        >>> adapter.save("task.safetensors")
    """
    model = unwrap(model)
    st = state_of(model)
    if any(is_dtensor(p) for p in model.parameters()):
        if st.experts:
            raise AdapterError("export_adapter of an FSDP2-sharded model with trained stacked experts is not "
                               "supported yet; export it unsharded (or gathered on one rank).")
        return _export_sharded(model, st)
    for name in [*st.modules, *st.experts]:
        model.get_submodule(name).sync_()
    entries: dict[str, AdapterEntry] = {}
    touched: dict[str, torch.Tensor] = {}
    bases: dict[str, torch.Tensor] = {}  # trained weights with their base values back in the trained blocks
    by_weight: dict[str, list] = {}
    for s in st.slices:
        by_weight.setdefault(s.fqn, []).append(s)
    for fqn, slices in by_weight.items():
        w = _tensor(model, fqn).detach()
        dim = slices[0].dim
        base = w.clone()
        # one marker row per expert of a stacked weight (each expert trains its own positions); the entry holds
        # their union, with a zero delta where an expert did not train a position
        stacked = slices[0].expert is not None
        marker = torch.zeros(w.shape[0] if stacked else 1, w.shape[dim], dtype=torch.bool)
        for s in slices:
            dst = base[s.expert].narrow(dim - 1, s.start, s.length) if stacked else base.narrow(dim, s.start, s.length)
            dst.copy_(st.base_blocks[block_key(s)])
            marker[s.expert if stacked else 0, s.start : s.start + s.length] = True
        retired = st.retired.get(fqn, {})
        if retired:  # units that trained and left (adaptive re-selection): their delta stays in the frozen weight
            where = _original_index(st).get(fqn, {}).get(dim)
            for row, vals in retired.items():
                pos = int(where[row]) if where is not None else row
                base.narrow(dim, pos, 1).copy_(vals)
                marker[0, pos] = True
        base_orig = _unpermute(base, fqn, st)
        delta_orig = _unpermute(w - base, fqn, st)
        marker_orig = marker
        for name in reversed(list(st.perms)):
            group, inv = st.groups[name], torch.argsort(st.perms[name])
            for m in group.members:
                if m.fqn == fqn and m.dim == dim:
                    rows = slice(None) if m.expert is None else slice(m.expert, m.expert + 1)
                    marker_orig = marker_orig.clone()
                    marker_orig[rows] = marker_orig[rows][:, m.index(inv)]
        index = torch.nonzero(marker_orig.any(0)).flatten()
        entries[fqn] = AdapterEntry(fqn, dim, tuple(w.shape), index, delta_orig.index_select(dim, index).clone())
        touched[fqn] = _sample(base_orig.index_select(dim, index.to(base_orig.device)), _TOUCHED_SAMPLE)
        # a stacked expert weight is sampled in original coordinates (per-expert orders have no per-dim index)
        bases[fqn] = base_orig if stacked else base
    # the base's tensors: the S²FT model's, less the trainable blocks (views of, or copies synced into, weights)
    blocks = tuple(f"{name}.blocks." for name in [*st.modules, *st.experts])
    original = _original_index(st)
    for fqn in {m.fqn for g in st.groups.values() for m in g.members if m.expert is not None}:
        original.pop(fqn, None)
        if fqn not in bases:  # permuted per expert without training (e.g. gate_up_proj with ffn=("down",))
            bases[fqn] = _unpermute(_tensor(model, fqn).detach(), fqn, st)
    sample = _BaseSample(
        {
            f: (tuple(t.shape), t.dtype, _sample(bases.get(f, t), _BASE_SAMPLE, original.get(f)))
            for f, t in _named_tensors(model).items()
            if not f.startswith(blocks)
        },
        touched,
    )
    return Adapter(entries, _fingerprint(sample), st.config.to_dict(), _name_or_path(model))


# ---------------------------------------------------------------------- export from a sharded (FSDP2) model
@torch.no_grad()
def _export_sharded(model: nn.Module, st: Any) -> Adapter:
    """:func:`export_adapter` for a model whose parameters are ``DTensor`` shards (FSDP2): the same adapter as the
    single-process export, with only the trained blocks gathered (``full_tensor``), never a whole weight.

    Every rank must call it (the gathers are collectives) and gets the whole adapter; save it on one rank. The
    base fingerprint's samples are read on the rank that owns each value and summed as integers (bit-exact, one
    owner each). It needs the base blocks in full on every rank: :func:`~sparsify_fx.load_base` or ``s2ft`` on
    the unsharded model leave them there. Separate-layout weights hold the base (blocks are not synced into them).
    """
    from sparsify_fx.passes.checkpoint import _canonical_names, forward_index

    fwd, canonical = forward_index(model, st), _canonical_names(model)
    entries: dict[str, AdapterEntry] = {}
    touched: dict[str, torch.Tensor] = {}
    blocks_of: dict[str, tuple[int, list[tuple[int, int, torch.Tensor]]]] = {}  # weight -> dim, (start, n, base)
    for mod_name, fqn in st.modules.items():
        lin = model.get_submodule(mod_name)
        dim = lin.param_dim
        idx = fwd.get(canonical.get(fqn, fqn), {})
        trained, base, pos = [], [], []
        for s, n, b in zip(lin.starts, lin.lengths, lin.blocks):
            full = b.full_tensor() if is_dtensor(b) else b.detach()
            trained.append(full)
            base.append(st.base_blocks[(fqn, s)].to(device=full.device, dtype=full.dtype))
            pos.append(torch.arange(s, s + n))
        blocks_of[fqn] = (dim, [(s, n, bb.cpu()) for s, n, bb in zip(lin.starts, lin.lengths, base)])
        where = torch.cat(pos)
        orig = idx[dim][where] if dim in idx else where
        order = torch.argsort(orig)

        def to_original(t: torch.Tensor, dim: int = dim, order: torch.Tensor = order, idx: dict = idx) -> torch.Tensor:
            t = t.index_select(dim, order.to(t.device))
            for d, ix in idx.items():
                if d != dim:
                    t = t.index_select(d, torch.argsort(ix).to(t.device))
            return t

        base_rows = torch.cat(base, dim)
        delta = to_original(torch.cat(trained, dim) - base_rows)
        entries[fqn] = AdapterEntry(fqn, dim, tuple(lin.weight.shape), orig[order], delta.cpu().clone())
        touched[fqn] = _sample(to_original(base_rows), _TOUCHED_SAMPLE)
    prefixes = tuple(f"{name}.blocks." for name in st.modules)
    original = _original_index(st)
    tensors: dict[str, tuple[tuple[int, ...], torch.dtype, torch.Tensor]] = {}
    for f, t in _named_tensors(model).items():
        if f.startswith(prefixes):
            continue
        if not is_dtensor(t) and f not in blocks_of:
            tensors[f] = (tuple(t.shape), t.dtype, _sample(t, _BASE_SAMPLE, original.get(f)))
            continue
        # the positions _sample reads, in the co-permuted tensor
        coords = list(torch.unravel_index(_sample_positions(t.numel(), _BASE_SAMPLE), tuple(t.shape)))
        for d, ix in (original.get(f) or {}).items():
            coords[d] = ix[coords[d]]
        values = _values_at(t, coords)
        dim, blocks = blocks_of.get(f, (0, []))
        for s, n, bb in blocks:  # the base, not the trained values, where a block is
            inside = (coords[dim] >= s) & (coords[dim] < s + n)
            if inside.any():
                sub = [c[inside] for c in coords]
                sub[dim] = sub[dim] - s
                values[inside] = bb[tuple(sub)]
        tensors[f] = (tuple(t.shape), t.dtype, values)
    return Adapter(entries, _fingerprint(_BaseSample(tensors, touched)), st.config.to_dict(), _name_or_path(model))


def _values_at(t: torch.Tensor, coords: list[torch.Tensor]) -> torch.Tensor:
    """``t[coords]`` on the CPU, for a plain tensor or a ``DTensor`` sharded along its dims (each value read by
    the rank that holds it, then all-reduced as integers: exact, since every other rank adds 0)."""
    if not is_dtensor(t):
        return t.detach()[tuple(c.to(t.device) for c in coords)].cpu()
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if not all(isinstance(p, Shard) for p in t.placements) or t.device_mesh.ndim != 1:
        return t.full_tensor()[tuple(c.to(t.device) for c in coords)].cpu()
    import torch.distributed as dist

    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    local = t.to_local().detach()
    mine = torch.ones(coords[0].numel(), dtype=torch.bool)
    for c, n, off in zip(coords, shape, offset):
        mine &= (c >= off) & (c < off + n)
    acc = torch.zeros(coords[0].numel(), dtype=torch.int64)
    if mine.any():
        here = tuple((c[mine] - off).to(local.device) for c, off in zip(coords, offset))
        acc[mine] = _bits(local[here].cpu()).to(torch.int64)
    dist.all_reduce(acc, group=t.device_mesh.get_group())
    probe = torch.empty(0, dtype=t.dtype)
    return acc.to(_bits(probe).dtype).view(t.dtype)


# ---------------------------------------------------------------------- switching on a plain base
# Switching adapters on a served base is the hot path, so the work of a first apply is kept: once an
# adapter's fingerprint has been checked against a base (every tensor sampled), the base's values at its
# positions and the values with the delta added are cached on the model, and later applies are one scatter
# each way. The cache is trusted only while the weights hold what it says, and no cheaper signal says so:
# the version counter moves for load_state_dict, copy_, optimizers and our own scatters, but not for writes
# through ``.data``. So each apply compares the adapter's positions with the cached base rows and each remove
# compares them with the rows the apply wrote (a gather and a compare, O(touched), bitwise so NaN holds), and
# the version counters plus a strided spot check of the touched weights send a base that changed elsewhere
# (another checkpoint loaded) back to the full check. Our own restores are exact, so after a remove the cache
# entries that were valid before the matching apply are valid again.

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
    base_bits: dict[str, torch.Tensor]  # integer views of the two, for bitwise comparison
    new_bits: dict[str, torch.Tensor]

    def valid_for(self, params: dict[str, torch.Tensor]) -> bool:
        # one probe comparison for all weights: a switch is a few scatters, so per-weight op overhead shows
        return (
            all(_key(p) == self.keys[f] for f, p in params.items())
            and torch.equal(_probes(params), self.probe)
            and _hold(self, params, self.base_bits)
        )


def _hold(prepared: _Prepared, params: dict[str, torch.Tensor], bits: dict[str, torch.Tensor]) -> bool:
    """Do the adapter's positions of every weight hold exactly ``bits`` (the base rows, or the applied rows)?"""
    for fqn, p in params.items():
        dim, idx = prepared.index[fqn]
        if p.dtype != prepared.new_rows[fqn].dtype:
            return False
        try:
            if not torch.equal(_bits(_leading(p, dim)[idx]), bits[fqn]):
                return False
        except (IndexError, RuntimeError):  # the weight was replaced by one of another shape
            return False
    return True


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


_STATE_ATTR = "_sparsify_adapters"


def _state(model: nn.Module) -> tuple[list[_Applied], dict[int, _Prepared]]:
    """The applied stack and the switch cache; empty ones (not yet on the model) for a model never switched."""
    state = getattr(model, _STATE_ATTR, None)
    return state if state is not None else ([], {})


def _lookup(model: nn.Module, fqn: str) -> torch.Tensor:
    """``_tensor`` through the modules' dicts, for the switch hot path: ``get_tensor`` took 2.0 µs a lookup against
    0.7 µs here (timeit, Llama projections), mostly ``unwrap``'s ``_orig_mod`` probe through ``__getattr__``."""
    *path, attr = fqn.split(".")
    mod = model
    try:
        for name in path:
            mod = mod._modules[name]
        t = mod._parameters.get(attr)
    except (KeyError, AttributeError):
        t = None
    return t if t is not None else _tensor(model, fqn)


def _params_for(model: nn.Module, adapter: Adapter | _Prepared) -> dict[str, torch.Tensor]:
    """The weights an adapter (or an applied one's record) writes; AdapterError for a missing or reshaped one."""
    shapes = {f: e.shape for f, e in adapter.entries.items()} if isinstance(adapter, Adapter) else adapter.index
    params: dict[str, torch.Tensor] = {}
    for fqn, shape in shapes.items():
        try:
            p = _lookup(model, fqn)
        except Exception as exc:
            raise AdapterError(
                f"adapter entry {fqn!r} names no tensor of this model: it is for another model."
            ) from exc
        if isinstance(adapter, Adapter) and tuple(p.shape) != shape:
            raise AdapterError(
                f"adapter was exported from a base where {fqn} has shape {shape}; here its shape is "
                f"{tuple(p.shape)}: another architecture or config. Apply it to the base it was exported from."
            )
        params[fqn] = p
    return params


def _prepare(model: nn.Module, adapter: Adapter, params: dict[str, torch.Tensor]) -> _Prepared:
    """Check the fingerprint on the model's current weights, every tensor sampled, and build the cache entry."""
    index, base_rows = {}, {}
    for fqn, e in adapter.entries.items():
        p = params[fqn]
        if not p.is_floating_point():
            raise AdapterError(
                f"{fqn} is {p.dtype} here; an adapter adds its delta to floating-point weights (a quantized base?): "
                "apply it to the floating-point base it was exported from."
            )
        idx = e.index.to(p.device)
        index[fqn] = (e.dim, idx)
        base_rows[fqn] = p.detach().index_select(e.dim, idx)
    applied = len(_state(model)[0])
    hint = f" ({applied} adapter(s) already applied: remove_adapter first)" if applied else ""
    if _is_legacy(adapter.fingerprint):
        if _legacy_fingerprint({f: (e.dim, params[f], base_rows[f]) for f, e in adapter.entries.items()}) != (
            adapter.fingerprint
        ):
            raise AdapterError(
                f"adapter was trained on a different base model (weight fingerprint mismatch){hint}; apply it to the "
                "base it was exported from (a version-1 adapter: its fingerprint covers the weights it touches only, "
                "in their exported dtype)."
            )
    else:
        here = _BaseSample(
            {f: (tuple(t.shape), t.dtype, _sample(t, _BASE_SAMPLE)) for f, t in _named_tensors(model).items()},
            {f: _sample(t, _TOUCHED_SAMPLE) for f, t in base_rows.items()},
        )
        if _fingerprint(here) != adapter.fingerprint:
            _check_base(_parse_fingerprint(adapter.fingerprint), here, hint)  # accepts a base rounded to its dtype
    new_rows = {
        f: base_rows[f] + e.delta.to(device=base_rows[f].device, dtype=base_rows[f].dtype)
        for f, e in adapter.entries.items()
    }
    lead_base = {f: _leading(t, index[f][0]).contiguous() for f, t in base_rows.items()}
    lead_new = {f: _leading(t, index[f][0]).contiguous() for f, t in new_rows.items()}
    return _Prepared(
        adapter=weakref.ref(adapter),
        keys={f: _key(p) for f, p in params.items()},
        probe=_probes(params),
        index=index,
        base_rows=lead_base,
        new_rows=lead_new,
        base_bits={f: _bits(t) for f, t in lead_base.items()},
        new_bits={f: _bits(t) for f, t in lead_new.items()},
    )


@torch.no_grad()
def apply_adapter(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Add ``adapter``'s delta to a plain base model in place (only its rows/columns are touched).

    The base must be the one the adapter was exported from: the first apply of an adapter object to a
    model compares a sample of every parameter and buffer (FQN, shape, dtype, values) with the adapter's
    fingerprint and raises AdapterError, before writing anything, naming a missing or extra tensor, a
    shape, a dtype or different values. Dtype rule: a base in another floating dtype is accepted when its
    sampled values equal the adapter base's after rounding both to the less precise dtype (what
    ``model.to(dtype)`` of that base gives; no tolerance), and the delta is cast to the base's dtype;
    otherwise the error names the two dtypes.

    Applying the same adapter object again to the unchanged base is one scatter per weight, after
    checking the adapter's positions still hold the base rows it saved (a gather, O(adapter)): a write
    since (``load_state_dict``, ``copy_``, an optimizer, ``.data``) sends it back to the full check. For
    that the model keeps, per adapter object applied to it, the base values at the adapter's positions
    and the values with the delta added (twice the adapter's size); the entry goes at the first
    remove_adapter after the adapter object is freed.

    Args:
        model: a plain base model (not S²FT-transformed), e.g. ``merge(model)`` or a fresh copy of the base.
        adapter: from :func:`export_adapter` or :func:`load_adapter`.

    Example:
        >>> apply_adapter(base, load_adapter("task.safetensors"))
        >>> remove_adapter(base)  # the base again, bit for bit
    """
    wrapper, model = model, unwrap(model)
    require_composable(model, Verb.APPLY_ADAPTER)
    params = _params_for(model, adapter)
    applied, cache = _state(model)
    prepared = cache.get(id(adapter))
    if prepared is None or prepared.adapter() is not adapter or not prepared.valid_for(params):
        prepared = _prepare(model, adapter, params)  # raises before anything is written
    pre_keys = dict(prepared.keys)
    # A Journal without a model: no mode snapshot on the switch path. The rows an apply overwrites are the
    # prepared base rows (valid_for/_prepare just checked), so undoing a write is writing those back.
    with Journal() as j:
        if getattr(model, _STATE_ATTR, None) is None:
            j.setattr(model, _STATE_ATTR, (applied, cache), raw=True)
        cache[id(adapter)] = prepared
        for fqn, p in params.items():
            dim, idx = prepared.index[fqn]
            j.on_rollback(lambda p=p, dim=dim, idx=idx, fqn=fqn: _write(p, dim, idx, prepared.base_rows[fqn]),
                          f"adapter rows of {fqn}")
            _write(p, dim, idx, prepared.new_rows[fqn])
        j.on_rollback(applied.pop, "applied record")
        applied.append(_Applied(prepared, pre_keys, {f: _key(p) for f, p in params.items()}))
    return wrapper


@torch.no_grad()
def remove_adapter(model: nn.Module, adapter: Adapter | None = None, *, discard: bool = False) -> nn.Module:
    """Undo the last :func:`apply_adapter` (or check it was ``adapter``): the base is restored bit for bit.

    Only the adapter's positions are written, so writes elsewhere since the apply stay. If the adapter's
    positions no longer hold what the apply wrote (``load_state_dict`` of a new checkpoint, an optimizer
    step, a ``copy_`` or ``.data`` write), writing the saved base rows back would undo that write: it
    raises AdapterError and writes nothing. ``discard=True`` then forgets the applied adapter without
    writing anything (the weights stay as they are).

    Args:
        model: a model :func:`apply_adapter` was called on.
        adapter: if given, must be the last adapter applied (adapters come off in reverse order).
        discard: forget the last apply without restoring anything.

    Example:
        >>> apply_adapter(base, adapter)
        >>> base.load_state_dict(new_checkpoint)
        >>> remove_adapter(base, discard=True)  # keep the new checkpoint; the adapter is no longer recorded
    """
    wrapper, model = model, unwrap(model)
    applied, cache = _state(model)
    if not applied:
        raise AdapterError("no adapter is applied to this model.")
    last = applied[-1]
    if adapter is not None and last.prepared.adapter() is not adapter:
        raise AdapterError("that adapter is not the last one applied; remove adapters in reverse order.")
    prepared = last.prepared
    if discard:
        applied.pop()
        return wrapper
    params = _params_for(model, prepared)
    if not _hold(prepared, params, prepared.new_bits):
        written = [f for f in params if not _hold(prepared, {f: params[f]}, prepared.new_bits)]
        raise AdapterError(
            f"the weights this adapter wrote were written since apply_adapter ({', '.join(written[:3])}"
            f"{' ...' if len(written) > 3 else ''}): load_state_dict, an optimizer step, a cast, or a copy_/.data "
            "write changed them, and writing the saved base rows back would undo that. Nothing was written. "
            "remove_adapter(model, discard=True) forgets the adapter and keeps the weights as they are; to get the "
            "base back, load its weights again."
        )
    untouched = all(_key(p) == last.post_keys[f] for f, p in params.items())
    restored: dict[str, _Key] = {}
    with Journal() as j:  # the rows a remove overwrites are the applied ones (_hold just checked)
        for fqn, p in params.items():
            dim, idx = prepared.index[fqn]
            j.on_rollback(lambda p=p, dim=dim, idx=idx, fqn=fqn: _write(p, dim, idx, prepared.new_rows[fqn]),
                          f"adapter rows of {fqn}")
            _write(p, dim, idx, prepared.base_rows[fqn])
            restored[fqn] = _key(p)
        j.on_rollback(lambda: applied.append(last), "applied record")
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
    return wrapper
