"""Load a Hugging Face checkpoint into a model that was transformed before it had weights.

The large-model flow: build on the meta device → :func:`~sparsify_fx.s2ft` (plan only, random strategy) →
``fully_shard`` (optional) → ``to_empty`` → :func:`load_base`. The checkpoint is read tensor by tensor; each
tensor gets the co-permutation the S²FT plan applied to its parameter, and goes wherever the model keeps it: a
plain tensor, a view-layout weight (its trainable blocks re-bound as views), a ``layout="separate"`` block, or an
FSDP2 ``DTensor`` shard, of which a rank reads only the rows it owns. Values go from the file into the parameter
through one staging span of at most 16 MiB (positioned reads, no memory map), so peak memory above the model is
that span plus the S²FT base blocks (the trained rows' base values, whole on every rank).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
import torch.nn as nn

from sparsify_fx.errors import ConfigError
from sparsify_fx.passes.importance import is_dtensor
from sparsify_fx.passes.s2ft import STATE_ATTR, S2FTLinear, S2FTState
from sparsify_fx.passes.surgery import Journal, get_module, unwrap

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors' dtype names (the header's "dtype" field)
_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}

Index = dict[int, torch.Tensor]  # dim -> for each position of the model's tensor, the checkpoint's position


# ---------------------------------------------------------------------- the checkpoint
class _Checkpoint:
    """The tensors of a checkpoint (one file, or shards named by an index), opened lazily through ``safe_open``.

    Every file is opened up front, so a truncated or foreign file is refused before the model is written.
    """

    def __init__(self, path: str, stack: ExitStack) -> None:
        from safetensors import safe_open

        self.path = path
        self.directory = path if os.path.isdir(path) else os.path.dirname(path)
        files = self._files(path)
        self._handles: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        self._spans: dict[str, tuple[int, int]] = {}  # key -> (first byte, end byte) of its data in its file
        self._files_open: dict[str, BinaryIO] = {}
        self._staging = torch.empty(0, dtype=torch.uint8)
        for file in files:
            try:
                handle = stack.enter_context(safe_open(file, framework="pt"))
            except Exception as exc:
                raise ConfigError(
                    f"{file!r} is not a readable safetensors file ({type(exc).__name__}: {exc}); it may be truncated: "
                    "download or save the checkpoint again."
                ) from exc
            self._handles[file] = handle
            for key in handle.keys():  # noqa: SIM118  (safe_open has no __iter__)
                self._where[key] = file
            # values are read with plain positioned reads, not through safe_open's memory map: pages of a mapped
            # file count in the process's resident memory until it is unmapped, so a mapped read of every tensor
            # made the whole checkpoint resident on every rank (the loader's peak was model + checkpoint)
            self._spans.update(_data_spans(file))
            self._files_open[file] = stack.enter_context(open(file, "rb", buffering=0))
        if self._index is not None:
            for key, file in self._index.items():
                if self._where.get(key) != file:
                    raise ConfigError(
                        f"{INDEX_FILE} places {key!r} in {os.path.basename(file)!r}, which does not hold it: the "
                        "shards and the index come from different saves; save the checkpoint again."
                    )

    def _files(self, path: str) -> list[str]:
        self._index: dict[str, str] | None = None
        if os.path.isfile(path):
            return [path]
        if not os.path.isdir(path):
            raise ConfigError(f"no checkpoint at {path!r}: pass a directory written by save_pretrained or a "
                              ".safetensors file.")
        index_path = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index_path):
            try:
                with open(index_path, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ConfigError(
                    f"{index_path!r} is not a safetensors index ({exc}); save the checkpoint again."
                ) from exc
            self._index = {k: os.path.join(path, v) for k, v in weight_map.items()}
            files = sorted(set(self._index.values()))
            missing = [f for f in files if not os.path.isfile(f)]
            if missing:
                raise ConfigError(f"{INDEX_FILE} names shard {os.path.basename(missing[0])!r}, which is not in "
                                  f"{path!r}: copy every shard of the checkpoint.")
            return files
        single = os.path.join(path, SINGLE_FILE)
        if os.path.isfile(single):
            return [single]
        raise ConfigError(f"{path!r} holds neither {SINGLE_FILE} nor {INDEX_FILE}: it is not a safetensors "
                          "checkpoint (save it with save_pretrained(..., safe_serialization=True)).")

    def keys(self) -> set[str]:
        return set(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handles[self._where[key]].get_slice(key).get_shape())

    def dtype(self, key: str) -> torch.dtype | str:
        name = self._handles[self._where[key]].get_slice(key).get_dtype()
        return _DTYPES.get(name, name)

    def read(self, key: str, select: Index) -> torch.Tensor:
        """The tensor ``key`` at positions ``select[d]`` along each dim ``d`` (all of a dim not in ``select``), as a
        new tensor of just that size (see :meth:`read_into`)."""
        shape = self.shape(key)
        out_shape = tuple(len(select[d]) if d in select else n for d, n in enumerate(shape))
        out = torch.empty(out_shape, dtype=self._torch_dtype(key))
        self.read_into(key, select, out)
        return out

    def read_into(self, key: str, select: Index, dst: torch.Tensor) -> None:
        """Write the tensor ``key`` at positions ``select[d]`` along each dim ``d`` into ``dst`` (of that shape).

        Only rows (dim 0) that ``select`` asks for are read, in spans of at most ``_CHUNK_BYTES`` that cover runs of
        wanted rows, so memory beyond ``dst`` is one span whatever the tensor's size; a span of consecutive rows
        that lands on consecutive rows of a contiguous CPU ``dst`` is read straight into it. Other dims are
        gathered per span.
        """
        shape = self.shape(key)
        dtype = self._torch_dtype(key)
        item = torch.empty((), dtype=dtype).element_size()
        begin, end = self._spans[key]
        numel = math.prod(shape)
        if end - begin != numel * item:
            raise ConfigError(f"checkpoint tensor {key!r} has {end - begin} bytes of data, its shape {shape} and "
                              f"dtype need {numel * item}: the file is corrupt; save the checkpoint again.")
        f = self._files_open[self._where[key]]
        if not shape:  # a 0-d tensor: one value
            buf = self._stage(item)
            _read_exact(f, begin, buf)
            dst.copy_(buf.view(dtype).reshape(()))
            return
        n0, row_shape = shape[0], shape[1:]
        row_bytes = math.prod(row_shape) * item
        if numel == 0:
            return
        rows = select.get(0)
        others = {d: ix for d, ix in select.items() if d != 0}
        direct = not others and dst.device.type == "cpu" and dst.is_contiguous()
        flat = dst.view(-1).view(torch.uint8) if direct else None
        for at, first, count in _spans(rows, n0, max(1, _CHUNK_BYTES // row_bytes)):
            # at: positions of dst (dim 0) that get rows first .. first+count-1 (None: consecutive from at)
            if flat is not None and isinstance(at, int):
                _read_exact(f, begin + first * row_bytes, flat[at * row_bytes : (at + count) * row_bytes])
                continue
            buf = self._stage(count * row_bytes)
            _read_exact(f, begin + first * row_bytes, buf)
            piece = buf.view(dtype).view(count, *row_shape)
            if not isinstance(at, int):
                piece = piece.index_select(0, at[1])
            for d, ix in others.items():
                piece = piece.index_select(d, ix)
            if isinstance(at, int):
                dst.narrow(0, at, piece.shape[0]).copy_(piece)
            else:
                dst.index_copy_(0, at[0].to(dst.device), piece.to(dst.device))

    def _stage(self, nbytes: int) -> torch.Tensor:
        """A reusable CPU byte buffer of ``nbytes`` (spans are at most ``_CHUNK_BYTES`` or one row)."""
        if self._staging.numel() < nbytes:
            self._staging = torch.empty(nbytes, dtype=torch.uint8)
        return self._staging[:nbytes]

    def _torch_dtype(self, key: str) -> torch.dtype:
        dt = self.dtype(key)
        if not isinstance(dt, torch.dtype):
            raise ConfigError(f"checkpoint tensor {key!r} has dtype {dt}, which this loader does not read.")
        return dt

    def config(self) -> dict[str, Any] | None:
        path = os.path.join(self.directory, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, ValueError):
            return None
        return cfg if isinstance(cfg, dict) else None


# ---------------------------------------------------------------------- reading spans of rows
_CHUNK_BYTES = 16 * 2**20  # at most this much is staged per read (or one row, if a row is larger)
_HEADER_MAX = 100 * 2**20  # safetensors' own bound on the JSON header


def _data_spans(file: str) -> dict[str, tuple[int, int]]:
    """Byte span of every tensor's data in a safetensors file (absolute offsets), from its header: an 8-byte
    little-endian header length, a JSON object of ``{"dtype", "shape", "data_offsets"}`` per tensor, then data."""
    with open(file, "rb") as f:
        head = f.read(8)
        size = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < size <= _HEADER_MAX:
            raise ConfigError(f"{file!r} has no valid safetensors header; save the checkpoint again.")
        try:
            header = json.loads(f.read(size))
        except ValueError as exc:
            raise ConfigError(f"{file!r} has no valid safetensors header ({exc}); save the checkpoint again.") from exc
    data = 8 + size
    return {k: (data + int(v["data_offsets"][0]), data + int(v["data_offsets"][1]))
            for k, v in header.items() if k != "__metadata__"}


def _read_exact(f: BinaryIO, offset: int, out: torch.Tensor) -> None:
    """Fill the contiguous byte tensor ``out`` from ``f`` at ``offset`` (reads may return short)."""
    view = memoryview(out.numpy()).cast("B")
    f.seek(offset)
    done = 0
    while done < len(view):
        got = f.readinto(view[done:])
        if not got:
            raise ConfigError(f"{getattr(f, 'name', 'the checkpoint')!r} ends before its tensor data does: the file "
                              "is truncated; download or save the checkpoint again.")
        done += got


def _spans(rows: torch.Tensor | None, n0: int,
           limit: int) -> Iterator[tuple[int | tuple[torch.Tensor, torch.Tensor], int, int]]:
    """Cover the wanted rows with spans of at most ``limit`` consecutive checkpoint rows.

    Yields ``(at, first, count)``: the span is checkpoint rows ``first .. first + count - 1``; ``at`` is the first
    destination position when the span maps onto consecutive positions in order, else ``(positions, offsets)``:
    the destination positions and, for each, its row's offset in the span. Rows nobody asked for are read only
    across short gaps between wanted ones (a sixteenth of a span at most), so a rank reads about its own rows.
    """
    if rows is None:
        for first in range(0, n0, limit):
            yield first, first, min(limit, n0 - first)
        return
    if rows.numel() == 0:
        return
    rows = rows.to(torch.long)
    order = torch.argsort(rows, stable=True)
    srt = rows[order]
    # a new span where the next wanted row would not fit in the current one, or lies more than ``gap`` rows past
    # the previous (reading through a short gap costs less than another read call; a long one is skipped)
    gap = max(1, limit // 16)
    starts = [0]
    first = prev = int(srt[0])
    for i, r in enumerate(srt.tolist()):
        if r - first >= limit or r - prev > gap:
            starts.append(i)
            first = r
        prev = r
    starts.append(len(srt))
    for a, b in zip(starts[:-1], starts[1:]):
        pos, got = order[a:b], srt[a:b]
        first, count = int(got[0]), int(got[-1]) - int(got[0]) + 1
        if count == b - a and int(pos[-1]) - int(pos[0]) == b - a - 1 and bool((pos.diff() == 1).all()):
            yield int(pos[0]), first, count
        else:
            yield (pos, got - first), first, count


# ---------------------------------------------------------------------- where each checkpoint value goes
def forward_index(model: nn.Module, st: S2FTState | None) -> dict[str, Index]:
    """Per parameter FQN and dim, the composed co-permutation of an S²FT plan: position ``p`` of the transformed
    tensor holds original position ``index[fqn][dim][p]``. Tied names are keyed by their first name.

    Args:
        model: the transformed model (tied parameters are recognised on it).
        st: its S²FT state, or None for a model that was not transformed (no permutation).

    Example:
        >>> idx = forward_index(model, state_of(model))
        >>> w_perm = w_orig.index_select(0, idx["model.layers.0.mlp.up_proj.weight"][0])
    """
    out: dict[str, Index] = {}
    if st is None:
        return out
    canonical = _canonical_names(model)
    for name, perm in st.perms.items():  # in the order s2ft applied them
        done: set[tuple[str, int]] = set()
        for m in st.groups[name].members:
            fqn = canonical.get(m.fqn, m.fqn)
            if (fqn, m.dim) in done:  # a tied tensor is permuted once
                continue
            done.add((fqn, m.dim))
            ix = m.index(perm)
            dims = out.setdefault(fqn, {})
            dims[m.dim] = dims[m.dim][ix] if m.dim in dims else ix
    return out


def _canonical_names(model: nn.Module) -> dict[str, str]:
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        out[n] = first.setdefault(id(t), n)
    return out


def _aliases(model: nn.Module) -> dict[str, list[str]]:
    """First name -> every name of that tensor (a tied weight has several; a checkpoint holds any one)."""
    out: dict[str, list[str]] = {}
    for n, first in _canonical_names(model).items():
        out.setdefault(first, []).append(n)
    return out


@dataclass
class _Target:
    """One write: checkpoint tensor ``key`` at ``index`` into the model tensor ``dst`` (``fqn``)."""

    fqn: str
    key: str
    dst: torch.Tensor
    index: Index


def _local(dst: torch.Tensor, index: Index, shape: tuple[int, ...]) -> tuple[torch.Tensor, Index]:
    """The tensor this process writes and the checkpoint positions of its elements: the local shard of a
    ``DTensor`` (its global offset from the placements), or the tensor itself."""
    if not is_dtensor(dst):
        return dst.detach(), index
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(dst.shape, dst.device_mesh, dst.placements)
    local = dst.to_local().detach()
    select: Index = {}
    for d, (n, off) in enumerate(zip(local_shape, offset)):
        full = index.get(d)
        if full is None and n == shape[d]:
            continue
        select[d] = full[off : off + n] if full is not None else torch.arange(off, off + n)
    return local, select


# ---------------------------------------------------------------------- non-persistent buffers
def _non_persistent(model: nn.Module) -> Iterator[tuple[str, nn.Module, str]]:
    for mod_name, mod in model.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            if mod._buffers.get(b) is not None:
                yield (f"{mod_name}.{b}" if mod_name else b), mod, b


def _init_buffers(model: nn.Module, j: Journal) -> list[str]:
    """Recompute the buffers no checkpoint holds (RoPE's ``inv_freq``) the way ``from_pretrained`` does: by the
    model's own ``_init_weights`` on the modules that own them, with their parameters flagged as initialised so
    that only the buffers are written. Returns the names it could not recompute (not a transformers model)."""
    init = getattr(model, "_init_weights", None)
    owners: dict[int, tuple[nn.Module, list[tuple[str, str]]]] = {}
    for name, mod, b in _non_persistent(model):
        owners.setdefault(id(mod), (mod, []))[1].append((name, b))
    left = []
    for mod, bufs in owners.values():
        if init is None:
            left += [name for name, b in bufs if mod._buffers[b].is_meta]
            continue
        # fresh tensors (the journal keeps the old ones), then one init of the module writes all of them in place
        for _, b in bufs:
            buf = mod._buffers[b]
            j.set_tensor(mod, b, torch.empty_like(buf, device="cpu" if buf.is_meta else buf.device))
        # transformers' init functions skip tensors flagged _is_hf_initialized: the module's parameters stay
        flagged = [p for p in mod.parameters(recurse=False) if not getattr(p, "_is_hf_initialized", False)]
        for p in flagged:
            p._is_hf_initialized = True
        try:
            init(mod)
        finally:
            for p in flagged:
                del p._is_hf_initialized
    return left


# ---------------------------------------------------------------------- load_base
@torch.no_grad()
def load_base(model: nn.Module, path: str | os.PathLike, *, strict: bool = True) -> nn.Module:
    """Load a Hugging Face safetensors checkpoint into ``model``, which may be S²FT-transformed and FSDP2-sharded.

    ``path`` is a directory written by ``save_pretrained`` (``model.safetensors``, or shards with
    ``model.safetensors.index.json``) or one ``.safetensors`` file. Each tensor is read on its own and permuted the
    way :func:`~sparsify_fx.s2ft` permuted the parameter, then written into the model's tensor: a plain
    tensor; a view-layout weight, whose trainable blocks are re-bound as views of it if they are not (after
    ``to_empty`` they have storage of their own); a ``layout="separate"`` block; or the local shard of an FSDP2
    ``DTensor``, for which only the rows this rank owns are read. The S²FT base blocks (what
    :func:`~sparsify_fx.export_adapter` subtracts) are the loaded values afterwards. Buffers that no checkpoint
    holds (rotary ``inv_freq``) are recomputed the way ``from_pretrained`` does, by the model's ``_init_weights``.

    Everything is checked before the first write: a missing tensor, a shape or dtype that differs from the
    model's, a tensor the model does not have (``strict``), or a ``config.json`` of another model type raise
    :class:`~sparsify_fx.errors.ConfigError` naming the tensor. The module changes (block re-binding, buffers,
    base blocks) are journaled; the weight values are not (keeping the old values would double the memory the
    loader exists to save), so an I/O error or an interrupt while writing leaves weights partly loaded: call
    ``load_base`` again.

    Args:
        model: the model, materialised (``model.to_empty(device=...)``), possibly transformed and sharded.
        path: the checkpoint directory or file.
        strict: refuse checkpoint tensors the model has no parameter or persistent buffer for.

    Example::

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(ckpt))
        sparsify_fx.s2ft(model, (ids,), sparsify_fx.S2FTConfig(layout="separate"))
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        model.to_empty(device="cpu")
        sparsify_fx.load_base(model, ckpt)
    """
    model = unwrap(model)
    st: S2FTState | None = getattr(model, STATE_ATTR, None)
    with ExitStack() as stack:
        ckpt = _Checkpoint(os.fspath(path), stack)
        targets, blocks = _plan(model, st, ckpt, strict)
        with Journal(model) as j:
            for lin, i, view in blocks["rebind"]:
                j.set_data(lin.blocks[i], view)
            for t in targets:
                local, select = _local(t.dst, t.index, ckpt.shape(t.key))
                ckpt.read_into(t.key, select, local)
            left = _init_buffers(model, j)
            if st is not None:
                j.setattr(st, "base_blocks", _base_blocks(model, st, ckpt, blocks["weights"]))
    if left:
        raise ConfigError(
            f"the weights are loaded, but buffer(s) {left[:3]} are in no checkpoint and still on the meta device, and "
            "this model has no _init_weights to recompute them: build them on a real device (register them after "
            "to_empty) or set them by hand."
        )
    return model


def _plan(model: nn.Module, st: S2FTState | None, ckpt: _Checkpoint,
          strict: bool) -> tuple[list[_Target], dict[str, Any]]:
    """Every write of the load, checked against the checkpoint's headers; raises before anything is written."""
    _check_config(model, ckpt)
    index = forward_index(model, st)
    swapped = dict(st.modules) if st is not None else {}
    block_prefixes = tuple(f"{m}.blocks." for m in swapped)
    non_persistent = {n for n, _, _ in _non_persistent(model)}
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update((n, b) for n, b in model.named_buffers(remove_duplicate=False) if n not in non_persistent)
    keys = ckpt.keys()
    targets: list[_Target] = []
    key_of: dict[str, str] = {}
    used: set[str] = set()
    for first, names in _aliases(model).items():
        names = [n for n in names if n in tensors and not n.startswith(block_prefixes)]
        if not names:
            continue
        found = [n for n in names if n in keys]
        if not found:
            raise ConfigError(
                f"the checkpoint at {ckpt.path!r} has no tensor {names[0]!r}"
                f"{f' (nor its tied names {names[1:]})' if len(names) > 1 else ''}: it is for another model or "
                "was saved without it; load the checkpoint of this architecture."
            )
        used.update(found)
        dst = tensors[names[0]]
        _check_header(ckpt, found[0], dst)
        if dst.device.type == "meta":
            raise ConfigError(
                f"{names[0]} is on the meta device: materialise the model first with model.to_empty(device='cpu') "
                "(or 'cuda'), after fully_shard if it is sharded, then load_base."
            )
        key_of[first] = found[0]
        targets.append(_Target(first, found[0], dst, index.get(first, {})))
    extra = sorted(keys - used - non_persistent - set(tensors))
    if strict and extra:
        raise ConfigError(
            f"the checkpoint at {ckpt.path!r} holds {len(extra)} tensor(s) this model does not have (e.g. "
            f"{extra[:3]}): it belongs to another architecture or config; load the matching checkpoint, or pass "
            "strict=False to ignore them."
        )
    canonical = _canonical_names(model)
    rebind: list[tuple[S2FTLinear, int, torch.Tensor]] = []
    weights: dict[tuple[str, int], tuple[str, Index]] = {}  # (weight fqn, start) -> checkpoint key, block index
    for mod_name, wfqn in swapped.items():
        lin = get_module(model, mod_name)
        if not isinstance(lin, S2FTLinear):
            continue
        first = canonical.get(wfqn, wfqn)
        key, w_index = key_of[first], index.get(first, {})
        for i, (s, n) in enumerate(zip(lin.starts, lin.lengths)):
            b_index = dict(w_index)
            along = w_index.get(lin.param_dim)
            b_index[lin.param_dim] = along[s : s + n] if along is not None else torch.arange(s, s + n)
            weights[(wfqn, s)] = (key, b_index)
            block = lin.blocks[i]
            if lin.layout == "view" and not is_dtensor(lin.weight):
                view = lin.weight.data.narrow(lin.param_dim, s, n)
                if block.untyped_storage().data_ptr() != view.untyped_storage().data_ptr() or (
                        block.data_ptr() != view.data_ptr() or block.stride() != view.stride()):
                    rebind.append((lin, i, view))
            else:
                if block.device.type == "meta":
                    raise ConfigError(f"{mod_name}.blocks.{i} is on the meta device: materialise the model first "
                                      "with model.to_empty(device='cpu').")
                targets.append(_Target(f"{mod_name}.blocks.{i}", key, block, b_index))
    return targets, {"rebind": rebind, "weights": weights}


def _check_header(ckpt: _Checkpoint, key: str, dst: torch.Tensor) -> None:
    shape, dtype = ckpt.shape(key), ckpt.dtype(key)
    if shape != tuple(dst.shape):
        raise ConfigError(
            f"checkpoint tensor {key!r} has shape {shape}, the model's has {tuple(dst.shape)}: the checkpoint is for "
            "another config (sizes) or architecture; load the checkpoint this model was built for."
        )
    if dtype != dst.dtype:
        raise ConfigError(
            f"checkpoint tensor {key!r} is {dtype}, the model's is {dst.dtype}: build the model in the checkpoint's "
            f"dtype (e.g. torch_dtype={dtype} in from_config, or model.to({dtype}) before s2ft), or convert the "
            "checkpoint."
        )


def _check_config(model: nn.Module, ckpt: _Checkpoint) -> None:
    cfg = ckpt.config()
    mine = getattr(getattr(model, "config", None), "model_type", None)
    theirs = cfg.get("model_type") if cfg else None
    if isinstance(mine, str) and isinstance(theirs, str) and mine != theirs:
        raise ConfigError(
            f"the checkpoint at {ckpt.path!r} is a {theirs!r} model (config.json), this model is {mine!r}: load the "
            "checkpoint of this architecture."
        )


def _base_blocks(model: nn.Module, st: S2FTState, ckpt: _Checkpoint,
                 weights: dict[tuple[str, int], tuple[str, Index]]) -> dict[tuple[str, int], torch.Tensor]:
    """The base values of every trained block, whole (blocks are the few percent that train)."""
    out = dict(st.base_blocks)
    for (wfqn, s), (key, b_index) in weights.items():
        out[(wfqn, s)] = ckpt.read(key, b_index)
    return out



# ---------------------------------------------------------------------- save merged, shard by shard
@torch.no_grad()
def save_merged(model: nn.Module, path: str | os.PathLike, *, max_shard_size: int = 5 * 2**30) -> None:
    """Write the trained model as a plain Hugging Face checkpoint (original layout and names, trained weights in),
    tensor by tensor, so that no rank ever holds the whole model: what :func:`~sparsify_fx.merge` followed by
    ``save_pretrained`` gives, for a model that may not fit in one process.

    Each tensor is gathered whole (an FSDP2 ``DTensor``: ``full_tensor``, a collective, so every rank must call
    this), the trained blocks are written into it, the co-permutation is undone, and rank 0 collects it into the
    current shard; a shard is written as soon as it is full. Peak memory on rank 0: one shard plus one tensor.
    Shards are ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` (one
    ``model.safetensors`` if it all fits in one shard) and the model's ``config.json``, so ``from_pretrained``
    reads the directory. Tied tensors are saved once, under their first name, as ``save_pretrained`` does.

    Args:
        model: an S²FT model (possibly sharded) or a plain one.
        path: the directory to write (created if needed).
        max_shard_size: bytes per shard file at most (a single larger tensor gets a shard of its own).

    Example::

        sparsify_fx.save_merged(model, "out/merged", max_shard_size=2 * 2**30)   # on every rank
        plain = AutoModelForCausalLM.from_pretrained("out/merged")
    """
    from sparsify_fx._io import save_safetensors_atomic

    model = unwrap(model)
    if not isinstance(max_shard_size, int) or isinstance(max_shard_size, bool) or max_shard_size <= 0:
        raise ConfigError(f"max_shard_size must be a positive number of bytes, got {max_shard_size!r}.")
    st: S2FTState | None = getattr(model, STATE_ATTR, None)
    index = forward_index(model, st)
    blocks_of: dict[str, S2FTLinear] = {}
    if st is not None:
        for mod_name, wfqn in st.modules.items():
            blocks_of[wfqn] = get_module(model, mod_name)
    prefixes = tuple(f"{m}.blocks." for m in (st.modules if st is not None else ()))
    non_persistent = {n for n, _, _ in _non_persistent(model)}
    names: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if n.startswith(prefixes) or n in non_persistent or id(t) in seen:
            continue
        seen.add(id(t))
        names.append((n, t))
    # plan the shards from shapes alone, so the file names (…-of-n) are known before the first write
    shards: list[list[str]] = [[]]
    size = 0
    for n, t in names:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nbytes
    files = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    writer = _rank() == 0
    path = os.fspath(path)
    if writer:
        os.makedirs(path, exist_ok=True)
    tensors = dict(names)
    weight_map: dict[str, str] = {}
    total = 0
    for file, shard in zip(files, shards):
        out: dict[str, torch.Tensor] = {}
        for n in shard:
            t = _merged_tensor(n, tensors[n], blocks_of.get(n), index.get(n, {}))
            if writer:
                out[n] = t.cpu().contiguous()
                weight_map[n] = file
                total += t.numel() * t.element_size()
        if writer:
            save_safetensors_atomic(out, os.path.join(path, file), {"format": "pt"}, prefix=".merged-")
        del out
    if not writer:
        return
    if len(files) > 1:
        doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(path, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2, sort_keys=True)
    config = getattr(model, "config", None)
    if hasattr(config, "save_pretrained"):
        config.save_pretrained(path)


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _merged_tensor(fqn: str, t: torch.Tensor, lin: S2FTLinear | None, index: Index) -> torch.Tensor:
    """Tensor ``fqn`` whole, trained blocks written in, in original coordinates."""
    full = t.full_tensor() if is_dtensor(t) else t.detach()
    if lin is not None:
        full = full.clone()
        for s, n, b in zip(lin.starts, lin.lengths, lin.blocks):
            block = b.full_tensor() if is_dtensor(b) else b.detach()
            full.narrow(lin.param_dim, s, n).copy_(block)
    for d, ix in index.items():
        full = full.index_select(d, torch.argsort(ix).to(full.device))
    return full
