"""Tensor-memory meter: the peak bytes of tensor storages created while it is active.

Why not RSS: the CPU allocator keeps freed pages, glibc arenas fragment, and the interpreter, libraries and the
frozen weights are all in it, so RSS says little about what a training method needs. On CPU there is no
``torch.cuda.max_memory_allocated``, so this meter counts tensors itself.

Method (``TensorMemoryMeter``, a ``TorchDispatchMode``): every ATen / custom op call that reaches the dispatcher
while the mode is active passes through ``__torch_dispatch__``, forward and backward alike (the autograd engine
carries the mode into the backward). After the op runs, each output tensor's *storage* is inspected:

- a storage that one of the op's inputs already used (a view, an in-place op, ``detach``) is not new: skipped;
- a storage already registered is skipped (if an op resized it, the size change is counted);
- otherwise it is a fresh allocation: its ``nbytes`` is added to the running total (keyed by the StorageImpl
  pointer) and ``weakref.finalize`` is attached to the Python storage object. PyTorch preserves a storage's Python
  object for as long as the C++ StorageImpl lives (saved activations held only by autograd included), so the
  finaliser fires exactly when the memory is released and subtracts the bytes.

The peak of the running total is the answer. What it cannot see: scratch memory *inside* one op's kernel (e.g. a
GEMM's packing buffers, or the temporaries of a custom op's Python implementation, which runs below the mode) and
storages created before the mode was entered (weights, and optimizer state from an earlier step — report those
separately with :func:`storage_bytes`). Only op *outputs* are counted, so the result is a slight lower bound of
what an allocator would need, and the same kind of bound for every method it compares.

The mode costs Python work per op: measure memory in runs separate from timing.

    python benchmarks/memory.py      # self-check
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _storage_key(t: torch.Tensor) -> tuple[int, torch.UntypedStorage] | None:
    if t.device.type == "meta" or (type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter)):
        return None  # fake or subclass tensors own no memory of their own here
    st = t.untyped_storage()
    return st._cdata, st


class TensorMemoryMeter(TorchDispatchMode):
    """Tracks live bytes of tensor storages allocated while active; ``peak`` is their maximum.

    ``current`` and ``peak`` start at 0 when the mode is entered (tensors that exist before do not count).
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.allocations = 0
        self._live: dict[int, int] = {}

    def __enter__(self):
        self.current = self.peak = self.allocations = 0
        self._live.clear()
        return super().__enter__()

    def _freed(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def _register(self, t: torch.Tensor, inputs: set[int]) -> None:
        found = _storage_key(t)
        if found is None:
            return
        key, st = found
        if key in inputs:
            if key in self._live:  # an in-place op may have resized a storage we track
                self._resize(key, st)
            return
        if key in self._live:
            self._resize(key, st)
            return
        n = st.nbytes()
        if n == 0:
            return
        self._live[key] = n
        self.current += n
        self.allocations += 1
        self.peak = max(self.peak, self.current)
        weakref.finalize(st, self._freed, key)

    def _resize(self, key: int, st: torch.UntypedStorage) -> None:
        n = st.nbytes()
        if n != self._live[key]:
            self.current += n - self._live[key]
            self._live[key] = n
            self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat_in, _ = tree_flatten((args, kwargs))
        inputs = set()
        for a in flat_in:
            if isinstance(a, torch.Tensor):
                found = _storage_key(a)
                if found is not None:
                    inputs.add(found[0])
        out = func(*args, **kwargs)
        flat_out, _ = tree_flatten(out)
        for t in flat_out:
            if isinstance(t, torch.Tensor):
                self._register(t, inputs)
        return out


def storage_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st._cdata] = st.nbytes()
    return sum(seen.values())


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of an optimizer's state tensors (AdamW: exp_avg, exp_avg_sq, step)."""
    return storage_bytes(v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def self_check() -> None:
    """The meter sees a known allocation, ignores views, releases on free, and sees autograd's saved tensors."""
    mib = 1 << 20
    with TensorMemoryMeter() as m:
        a = torch.empty(mib // 4)  # exactly 1 MiB of fp32
        assert m.current == mib, m.current
        v = a[: mib // 8].view(-1, 2)  # views allocate nothing
        a.add_(1.0)  # neither does an in-place op
        assert m.current == mib, m.current
        del a
        assert m.current == mib, "a view keeps its storage alive"
        del v
        assert m.current == 0, f"freed storage still counted: {m.current}"
        assert m.peak == mib, m.peak
    # autograd: x @ w saves x (4 MiB) for w's gradient; the storage dies with the graph, not with the name
    w = torch.randn(256, 256, requires_grad=True)
    with TensorMemoryMeter() as m:
        x = torch.randn(4096, 256)  # 4 MiB
        y = (x @ w).sum()
        del x
        held = m.current
        y.backward()
        del y
        after = m.current
    assert held >= 4 * mib, f"the saved input was not counted: {held}"
    assert after == 256 * 256 * 4, f"only w.grad should remain, got {after} bytes"
    w.grad = None


if __name__ == "__main__":
    self_check()
    print("memory meter self-check passed")
