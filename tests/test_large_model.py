"""The large-model flow (issue 14): plan S²FT on a meta-device model, materialise, load the Hugging Face checkpoint
shard by shard with ``load_base`` (co-permuted on the fly), train, export; with FSDP2 on 2 gloo processes too."""

from __future__ import annotations

import json
import os
import shutil

import dist_worker
import large_worker
import models
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import LlamaForCausalLM

import sparsify_fx
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes.s2ft import S2FTLinear, state_of
from sparsify_fx.testing import assert_unchanged, model_snapshot

IDS = large_worker.batch()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    """A 4-layer Llama saved by save_pretrained in at least 3 safetensors shards."""
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    models.llama(layers=large_worker.LAYERS).save_pretrained(path, max_shard_size="200KB")
    shards = [f for f in os.listdir(path) if f.startswith("model-") and f.endswith(".safetensors")]
    assert len(shards) >= 3 and (path / "model.safetensors.index.json").is_file()
    return str(path)


def _reference(ckpt: str, layout: str) -> LlamaForCausalLM:
    """What a user does today when the model fits: from_pretrained, then s2ft."""
    ref = LlamaForCausalLM.from_pretrained(ckpt)
    sparsify_fx.s2ft(ref, (IDS[:1],), large_worker.config(layout))
    return ref


def _loaded(ckpt: str, layout: str) -> torch.nn.Module:
    model = large_worker.meta_model(layout)
    model.to_empty(device="cpu")
    sparsify_fx.load_base(model, ckpt)
    return model


def _assert_same_adapter(got: sparsify_fx.Adapter, ref: sparsify_fx.Adapter, rel: float) -> None:
    assert got.entries.keys() == ref.entries.keys() and ref.entries
    for k, e in ref.entries.items():
        g = got.entries[k]
        assert (g.dim, g.shape) == (e.dim, e.shape) and torch.equal(g.index, e.index), k
        assert models.rel_err(g.delta, e.delta) <= rel, k


@pytest.mark.parametrize("layout", ["view", "separate"])
def test_meta_plan_then_load_base_equals_s2ft_of_from_pretrained(ckpt: str, layout: str) -> None:
    ref, model = _reference(ckpt, layout), _loaded(ckpt, layout)
    a, b = ref.state_dict(), model.state_dict()
    assert a.keys() == b.keys()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # inv_freq is in no checkpoint: recomputed as from_pretrained does
    buffers = dict(model.named_buffers())
    assert {k for k in buffers if "inv_freq" in k}
    assert all(torch.equal(v, buffers[k]) for k, v in ref.named_buffers())
    for mod in model.modules():
        if isinstance(mod, S2FTLinear):
            same_storage = [b.untyped_storage().data_ptr() == mod.weight.untyped_storage().data_ptr()
                            for b in mod.blocks]
            # after to_empty the view blocks had storage of their own: load_base binds them to the weight again
            assert all(same_storage) if layout == "view" else not any(same_storage)
    st_ref, st = state_of(ref), state_of(model)
    assert st.base_blocks.keys() == st_ref.base_blocks.keys()
    assert all(torch.equal(st.base_blocks[k], v) for k, v in st_ref.base_blocks.items())
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref(IDS).logits)
    assert large_worker.train(model.train(), IDS) == large_worker.train(ref.train(), IDS)
    got, want = sparsify_fx.export_adapter(model), sparsify_fx.export_adapter(ref)
    _assert_same_adapter(got, want, 0.0)
    assert got.fingerprint == want.fingerprint


def test_single_file_checkpoint_into_a_plain_meta_model(tmp_path, ckpt: str) -> None:
    ref = LlamaForCausalLM.from_pretrained(ckpt)
    ref.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    with torch.device("meta"):
        model = models.llama(layers=large_worker.LAYERS)
    model.to_empty(device="cpu")
    for path in (tmp_path, tmp_path / "model.safetensors"):  # a directory or the file itself
        sparsify_fx.load_base(model, str(path))
        a = ref.state_dict()
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in a.items())
        with torch.no_grad():
            assert torch.equal(model(IDS).logits, ref(IDS).logits)


@pytest.mark.parametrize("layout", ["view", "separate"])
def test_save_merged_equals_merge(tmp_path, ckpt: str, layout: str) -> None:
    model = _loaded(ckpt, layout)
    large_worker.train(model.train(), IDS)
    sparsify_fx.save_merged(model, tmp_path, max_shard_size=200_000)
    assert len([f for f in os.listdir(tmp_path) if f.startswith("model-")]) >= 3
    assert (tmp_path / "config.json").is_file()
    want = sparsify_fx.merge(model).state_dict()
    got = LlamaForCausalLM.from_pretrained(tmp_path).state_dict()
    assert got.keys() == want.keys()
    assert [k for k in want if not torch.equal(got[k], want[k])] == []
    with pytest.raises(ConfigError, match="max_shard_size"):
        sparsify_fx.save_merged(model, tmp_path / "x", max_shard_size=0)


def test_meta_model_refused_with_the_fix(ckpt: str) -> None:
    model = large_worker.meta_model("view")
    with pytest.raises(ConfigError, match=r"meta device.*to_empty"):
        sparsify_fx.load_base(model, ckpt)


def _tensors(ckpt: str) -> dict[str, torch.Tensor]:
    index = json.load(open(os.path.join(ckpt, "model.safetensors.index.json")))["weight_map"]
    out = {}
    for key, file in index.items():
        with safe_open(os.path.join(ckpt, file), framework="pt") as f:
            out[key] = f.get_tensor(key)
    return out


UP = "model.layers.2.mlp.up_proj.weight"


@pytest.mark.parametrize("case,match", [
    ("missing", rf"no tensor '{UP}'"),
    ("shape", rf"'{UP}' has shape \(128, 65\), the model's has \(128, 64\)"),
    ("dtype", rf"'{UP}' is torch.bfloat16, the model's is torch.float32"),
    ("extra", r"does not have \(e\.g\. \['model\.layers\.9\.mlp\.up_proj\.weight'\]\)"),
    ("architecture", r"is a 'gpt2' model .*this model is 'llama'"),
    ("truncated", r"not a readable safetensors file"),
])
def test_bad_checkpoint_refused_before_any_write(tmp_path, ckpt: str, case: str, match: str) -> None:
    tensors = _tensors(ckpt)
    if case == "missing":
        del tensors[UP]
    elif case == "shape":
        tensors[UP] = torch.zeros(128, 65)
    elif case == "dtype":
        tensors[UP] = tensors[UP].to(torch.bfloat16)
    elif case == "extra":
        tensors["model.layers.9.mlp.up_proj.weight"] = tensors[UP].clone()
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    shutil.copy(os.path.join(ckpt, "config.json"), tmp_path / "config.json")
    if case == "architecture":
        cfg = json.load(open(tmp_path / "config.json"))
        json.dump({**cfg, "model_type": "gpt2"}, open(tmp_path / "config.json", "w"))
    if case == "truncated":
        data = (tmp_path / "model.safetensors").read_bytes()
        (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    model = _loaded(ckpt, "view")  # a loaded model: a refused load must leave it as it is
    before = model_snapshot(model)
    with pytest.raises(ConfigError, match=match):
        sparsify_fx.load_base(model, str(tmp_path))
    assert_unchanged(model, before)


@pytest.mark.slow  # spawned processes importing torch and transformers: ~30 s (2) / ~60 s (4) on 2 cores
@pytest.mark.parametrize("world", [2, 4])
def test_fsdp2_processes_match_single_process(tmp_path, ckpt: str, world: int) -> None:
    """meta → s2ft → fully_shard per layer → to_empty → load_base (each rank reads its rows) → 3 AdamW steps →
    export_adapter (gathers the trained blocks only); equals the single-process run on the whole batch (each of the
    ``world`` ranks trains on its 4 / world rows)."""
    dist_worker.spawn(large_worker.worker, world, lambda k: (world, ckpt, str(tmp_path / f"init{k}"), str(tmp_path)))
    got = torch.load(tmp_path / "result.pt")
    ref = _reference(ckpt, "view")
    losses = large_worker.train(ref.train(), IDS)
    for a, b in zip(got["losses"], losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (got["losses"], losses)
    adapter = sparsify_fx.load_adapter(tmp_path / "adapter")
    _assert_same_adapter(adapter, sparsify_fx.export_adapter(ref), 1e-5)
    ref.eval()
    with torch.no_grad():
        trained = ref(IDS).logits
    assert models.rel_err(got["logits"], trained) <= 1e-5
    # the merged checkpoint, written tensor by tensor from the shards, is a plain from_pretrained directory
    merged = tmp_path / "merged"
    assert len([f for f in os.listdir(merged) if f.startswith("model-")]) >= 3
    with torch.no_grad():
        assert models.rel_err(LlamaForCausalLM.from_pretrained(merged).eval()(IDS).logits, trained) <= 1e-5
    # the adapter's fingerprint, sampled across the shards, recognises the plain base
    base = LlamaForCausalLM.from_pretrained(ckpt).eval()
    sparsify_fx.apply_adapter(base, adapter)
    with torch.no_grad():
        assert models.rel_err(base(IDS).logits, trained) <= 1e-5
