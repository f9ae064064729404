"""load_base's reader (issue 14, item 2): checkpoint values are read in bounded spans of rows straight from the file.

Each case compares against what safetensors' own ``get_tensor`` followed by ``index_select`` gives, bit for bit,
with the span size made small so that one tensor takes many spans (gaps skipped, gaps read through, a row larger
than a span). The memory test counts tensor storages created during ``load_base`` (the benchmarks' tensor meter):
no more than one span, where reading whole tensors needs the largest tensor.
"""

from __future__ import annotations

import importlib.util
from contextlib import ExitStack
from pathlib import Path

import models
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sparsify_fx
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes import checkpoint
from sparsify_fx.testing import assert_unchanged, model_snapshot


def _meter() -> type:
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "memory.py"
    spec = importlib.util.spec_from_file_location("bench_memory", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.TensorMemoryMeter


@pytest.fixture
def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "w": torch.randn(97, 13, generator=g),
        "b16": torch.randn(40, 6, generator=g).to(torch.bfloat16),
        "v": torch.randn(50, generator=g),
        "s": torch.tensor(3.5),
        "e": torch.randn(5, 3, 4, generator=g),
        "i": torch.randint(-9, 9, (31, 2), generator=g),
    }


def _reference(path: str, key: str, select: dict[int, torch.Tensor]) -> torch.Tensor:
    with safe_open(path, framework="pt") as f:
        t = f.get_tensor(key)
    for d, ix in select.items():
        t = t.index_select(d, ix)
    return t


@pytest.mark.parametrize("chunk", [4 * 13 * 3, 1, 2**20])
def test_read_equals_safetensors(tmp_path, tensors, monkeypatch, chunk: int) -> None:
    """Row subsets in any order (runs, scattered rows, repeats), column selections, 0-d/1-D/3-D, bf16 and ints."""
    monkeypatch.setattr(checkpoint, "_CHUNK_BYTES", chunk)  # 3 rows of "w" per span, or one row, or all
    path = str(tmp_path / "model.safetensors")
    save_file(tensors, path)
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(97, generator=g)
    cases: list[tuple[str, dict[int, torch.Tensor]]] = [
        ("w", {}),
        ("w", {0: perm}),  # every row, scattered
        ("w", {0: perm[:30]}),  # a rank's share of permuted rows: gaps skipped and read through
        ("w", {0: torch.cat([torch.arange(60, 90), torch.arange(0, 10)])}),  # two runs, out of order
        ("w", {0: torch.tensor([5, 5, 96, 0])}),  # repeats and both ends
        ("w", {0: perm[:40], 1: torch.randperm(13, generator=g)}),  # rows and columns (a co-permuted o_proj shard)
        ("w", {1: torch.tensor([12, 0, 3])}),
        ("w", {0: torch.tensor([], dtype=torch.long)}),
        ("b16", {0: torch.randperm(40, generator=g)[:17]}),
        ("v", {0: torch.randperm(50, generator=g)}),
        ("s", {}),
        ("e", {0: torch.tensor([4, 1]), 2: torch.tensor([3, 0])}),  # a row (3x4) larger than a 1-byte span
        ("i", {0: torch.arange(30, -1, -1)}),
    ]
    with ExitStack() as stack:
        ckpt = checkpoint._Checkpoint(path, stack)
        for key, select in cases:
            got = ckpt.read(key, select)
            ref = _reference(path, key, select)
            assert got.dtype == ref.dtype and torch.equal(got, ref), (key, select)
            # into a strided (transposed) destination, as a co-permuted view may be
            if got.dim() == 2:
                dst = torch.empty(got.shape[1], got.shape[0], dtype=got.dtype).t()
                ckpt.read_into(key, select, dst)
                assert torch.equal(dst, ref), (key, select)


def test_truncated_data_refused(tmp_path, tensors) -> None:
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    data = path.read_bytes()
    spans = checkpoint._data_spans(str(path))
    end = max(e for _, e in spans.values())
    assert end == len(data)
    lost = spans["w"][1] - 8
    with ExitStack() as stack:
        ckpt = checkpoint._Checkpoint(str(path), stack)
        path.write_bytes(data[:lost])  # the file shrinks after it was opened and checked
        with pytest.raises(ConfigError, match="truncated"):
            ckpt.read("w", {})


def test_load_base_holds_one_span_not_one_tensor(tmp_path, monkeypatch) -> None:
    """Tensor storages created during load_base stay under one span (plus RoPE's inv_freq), while the embedding alone
    is 16 spans: the values go from the file into the parameters, and nothing whole-tensor is made on the way."""
    chunk = 2**14
    monkeypatch.setattr(checkpoint, "_CHUNK_BYTES", chunk)
    torch.manual_seed(0)
    src = models.llama(vocab=1024)  # embedding and head 1024 x 64 fp32: 256 KiB each
    src.save_pretrained(tmp_path, max_shard_size="200KB")
    with torch.device("meta"):
        model = models.llama(vocab=1024)
    model.to_empty(device="cpu")
    meter = _meter()()
    with meter:
        sparsify_fx.load_base(model, str(tmp_path))
    inv_freq = model.model.rotary_emb.inv_freq
    assert 0 < meter.peak <= chunk + inv_freq.numel() * inv_freq.element_size(), meter.peak
    ids = torch.randint(0, 1024, (2, 8), generator=torch.Generator().manual_seed(0))
    src.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, src(ids).logits)
    for (n, p), q in zip(model.state_dict().items(), src.state_dict().values()):
        assert torch.equal(p, q), n


def test_header_spans_refuse_a_foreign_file(tmp_path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\xff" * 16)
    snapshot_model = models.llama()
    snap = model_snapshot(snapshot_model)
    with pytest.raises(ConfigError, match="safetensors"):
        sparsify_fx.load_base(snapshot_model, str(path))
    assert_unchanged(snapshot_model, snap)
