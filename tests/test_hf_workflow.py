"""The Hugging Face workflow end to end (issue 12, item 3): Trainer with default arguments, activation
checkpointing, adapters saved as PEFT-style directories, pruned models through save_pretrained/from_pretrained."""

from __future__ import annotations

import copy
import json
import os
import warnings

import models
import pytest
import torch
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import sparsify_fx
from sparsify_fx.passes import adapter as adapter_mod
from sparsify_fx.passes.hf import PretrainedMismatchWarning, _InputsRequireGrad
from sparsify_fx.passes.s2ft import S2FTLinear

CONFIG = dict(attention_ratio=0.5, ffn_ratio=0.25, progress=False)
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def _pair(name: str | None = None):
    """A tiny Llama and an identical copy of its base (the copy stays plain)."""
    torch.manual_seed(0)
    model = models.llama()
    if name is not None:
        model.config._name_or_path = name
    base = copy.deepcopy(model)
    return model, base


def _dataset(n: int = 8, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(0, 128, (seq,), generator=g),
             "labels": torch.randint(0, 128, (seq,), generator=g)} for _ in range(n)]


def _args(tmp_path, **kw) -> TrainingArguments:
    # defaults otherwise: optim is adamw_torch_fused, the case that corrupted frozen weights
    return TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=2,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
                             disable_tqdm=True, **kw)


def _block_masks(model) -> dict[str, tuple[torch.Tensor, S2FTLinear]]:
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, S2FTLinear):
            mask = torch.zeros(mod.weight.shape, dtype=torch.bool)
            for s, n in zip(mod.starts, mod.lengths):
                mask.narrow(mod.param_dim, s, n).fill_(True)
            out[f"{name}.weight"] = (mask, mod)
    return out


def _logits(model, ids=IDS) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(ids).logits
    model.train(was)
    return out


# ---------------------------------------------------------------------- (a) Trainer, default arguments
def test_trainer_default_arguments_keep_frozen_weights_and_export_a_working_adapter(tmp_path):
    model, base = _pair()
    sparsify_fx.s2ft(model, (IDS,), sparsify_fx.S2FTConfig(**CONFIG))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if ".blocks." not in n}
    masks = _block_masks(model)
    args = _args(tmp_path)
    assert args.optim.value == "adamw_torch_fused"
    result = Trainer(model=model, args=args, train_dataset=_dataset()).train()

    assert torch.isfinite(torch.tensor(result.training_loss))
    for n, p in model.named_parameters():
        if ".blocks." in n:
            continue
        if n in masks:
            mask, _ = masks[n]
            assert torch.equal(p.detach()[~mask], frozen[n][~mask]), f"{n}: a frozen weight outside the blocks changed"
            assert not torch.equal(p.detach()[mask], frozen[n][mask]), f"{n}: the trained block did not change"
        else:
            assert torch.equal(p.detach(), frozen[n]), f"{n} is frozen but changed"

    adapter = sparsify_fx.export_adapter(model)
    sparsify_fx.apply_adapter(base, adapter)  # the fingerprint is accepted: the base is the true base
    assert models.rel_err(_logits(base), _logits(model)) <= 1e-5


# ---------------------------------------------------------------------- (b) activation checkpointing
def _loss_and_grads(model):
    model.train()
    model.zero_grad()
    out = model(IDS, labels=IDS)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["default", "reentrant", "reentrant_without_hf_hook"])
def test_gradient_checkpointing_gives_the_same_loss_and_block_gradients(mode):
    """``reentrant_without_hf_hook`` is transformers 4.x: it did not hook the embeddings for non-PEFT models, so
    under reentrant checkpointing nothing entering a block required grad and backward failed."""
    model, _ = _pair()
    sparsify_fx.s2ft(model, (IDS,), sparsify_fx.S2FTConfig(**CONFIG))
    ckpt = copy.deepcopy(model)
    kwargs = None if mode == "default" else {"use_reentrant": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the method is renamed in transformers 5, still the common call
        ckpt.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    if mode == "reentrant_without_hf_hook":
        ckpt.disable_input_require_grads()
    loss, grads = _loss_and_grads(model)
    loss_ck, grads_ck = _loss_and_grads(ckpt)
    assert torch.isfinite(loss)
    assert models.rel_err(loss_ck, loss) <= 1e-5
    assert grads.keys() == grads_ck.keys() and grads
    for n in grads:
        assert grads[n].abs().sum() > 0
        assert models.rel_err(grads_ck[n], grads[n]) <= 1e-5, n


def test_checkpointing_hook_costs_nothing_without_checkpointing_and_merge_removes_it():
    model, _ = _pair()
    sparsify_fx.s2ft(model, (IDS,), sparsify_fx.S2FTConfig(**CONFIG))
    emb = model.get_input_embeddings()
    assert any(isinstance(h, _InputsRequireGrad) for h in emb._forward_hooks.values())
    seen = []
    emb.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    model.train()
    model(IDS)
    assert seen == [False]  # no checkpointing: no gradient below the lowest trained layer
    plain = sparsify_fx.merge(model)
    assert not any(isinstance(h, _InputsRequireGrad) for m in plain.modules() for h in m._forward_hooks.values())
    assert any(isinstance(h, _InputsRequireGrad) for h in emb._forward_hooks.values())  # merge copied: model keeps it


def test_trainer_with_gradient_checkpointing_trains_like_without(tmp_path):
    runs = []
    for checkpointing in (False, True):
        model, _ = _pair()
        sparsify_fx.s2ft(model, (IDS,), sparsify_fx.S2FTConfig(**CONFIG))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing in transformers 5
            args = _args(tmp_path, gradient_checkpointing=checkpointing)
        result = Trainer(model=model, args=args, train_dataset=_dataset()).train()
        blocks = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        runs.append((result.training_loss, blocks, model))
    (loss, blocks, _), (loss_ck, blocks_ck, model_ck) = runs
    assert model_ck.is_activation_checkpointing
    assert abs(loss_ck - loss) <= 1e-5 * abs(loss)
    for n in blocks:
        assert models.rel_err(blocks_ck[n], blocks[n]) <= 1e-5, n


# ---------------------------------------------------------------------- (c) adapter directories
def _trained_adapter(name: str | None = "org/tiny-llama", seed: int = 0, step: int = 0):
    """``seed`` picks the units, ``step`` the stand-in for training (same units: same fingerprint)."""
    model, base = _pair(name)
    sparsify_fx.s2ft(model, (IDS,), sparsify_fx.S2FTConfig(seed=seed, **CONFIG))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(step)) * 0.02)
    return sparsify_fx.export_adapter(model), base, _logits(model)


def test_adapter_directory_round_trip_and_single_file_still_works(tmp_path):
    adapter, base, trained = _trained_adapter()
    directory = tmp_path / "sentiment"
    sparsify_fx.save_adapter(adapter, directory)
    assert sorted(os.listdir(directory)) == ["s2ft_adapter.safetensors", "s2ft_config.json"]
    config = json.loads((directory / "s2ft_config.json").read_text())
    assert config["format"] == "sparsify_fx.s2ft_adapter" and config["version"] == adapter_mod.VERSION
    assert config["base_model_name_or_path"] == "org/tiny-llama"
    assert config["fingerprint"] == adapter.fingerprint
    as_json = json.loads(json.dumps(sparsify_fx.S2FTConfig(**CONFIG).to_dict()))  # tuples read back as lists
    assert config["s2ft_config"] == as_json

    loaded = sparsify_fx.load_adapter(directory)
    assert loaded.base_model == "org/tiny-llama" and loaded.config == as_json
    for fqn, e in adapter.entries.items():
        assert torch.equal(loaded.entries[fqn].index, e.index) and torch.equal(loaded.entries[fqn].delta, e.delta)
    sparsify_fx.apply_adapter(base, loaded)
    assert models.rel_err(_logits(base), trained) <= 1e-5
    sparsify_fx.remove_adapter(base, loaded)

    adapter.save(tmp_path / "one.safetensors")  # a file, as before
    assert (tmp_path / "one.safetensors").is_file()
    single = sparsify_fx.load_adapter(tmp_path / "one.safetensors")
    assert single.base_model == "org/tiny-llama"
    sparsify_fx.apply_adapter(base, single)
    assert models.rel_err(_logits(base), trained) <= 1e-5

    # a second save over the directory replaces both files and leaves no temp file
    other, _, _ = _trained_adapter(seed=1)
    other.save(directory)
    assert sorted(os.listdir(directory)) == ["s2ft_adapter.safetensors", "s2ft_config.json"]
    again = sparsify_fx.load_adapter(directory)
    assert all(torch.equal(again.entries[f].delta, e.delta) for f, e in other.entries.items())


def test_a_base_without_a_name_saves_null():
    adapter, _, _ = _trained_adapter(name=None)
    assert adapter.base_model is None


def test_peft_refuses_our_directory_with_a_clear_message(tmp_path):
    """PEFT looks for its own adapter_config.json; with our file names it says it is missing instead of
    misreading the files. Recorded message (peft 0.21): "Can't find 'adapter_config.json' at '<dir>'"."""
    from peft import PeftModel

    adapter, base, _ = _trained_adapter()
    adapter.save(tmp_path / "ours")
    before = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match="Can't find 'adapter_config.json'"):
        PeftModel.from_pretrained(base, str(tmp_path / "ours"))
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())


def test_broken_directories_raise_adapter_error_naming_the_file(tmp_path):
    adapter, _, _ = _trained_adapter()
    torch.manual_seed(5)
    other_base = models.llama()  # another base: a different fingerprint
    sparsify_fx.s2ft(other_base, (IDS,), sparsify_fx.S2FTConfig(**CONFIG))
    foreign = sparsify_fx.export_adapter(other_base)

    no_json = tmp_path / "no_json"
    adapter.save(no_json)
    (no_json / "s2ft_config.json").unlink()
    with pytest.raises(sparsify_fx.AdapterError, match="s2ft_config.json' is missing"):
        sparsify_fx.load_adapter(no_json)

    no_weights = tmp_path / "no_weights"
    adapter.save(no_weights)
    (no_weights / "s2ft_adapter.safetensors").unlink()
    with pytest.raises(sparsify_fx.AdapterError, match="s2ft_adapter.safetensors' is missing"):
        sparsify_fx.load_adapter(no_weights)

    mixed = tmp_path / "mixed"
    adapter.save(mixed)
    foreign.save(tmp_path / "foreign")
    os.replace(tmp_path / "foreign" / "s2ft_adapter.safetensors", mixed / "s2ft_adapter.safetensors")
    with pytest.raises(sparsify_fx.AdapterError, match="s2ft_config.json.*different base models"):
        sparsify_fx.load_adapter(mixed)

    bad_json = tmp_path / "bad_json"
    adapter.save(bad_json)
    (bad_json / "s2ft_config.json").write_text("{not json")
    with pytest.raises(sparsify_fx.AdapterError, match="s2ft_config.json.*not readable JSON"):
        sparsify_fx.load_adapter(bad_json)

    (tmp_path / "a_file").write_text("x")
    with pytest.raises(sparsify_fx.AdapterError, match="is a file"):
        adapter.save(tmp_path / "a_file")
    assert (tmp_path / "a_file").read_text() == "x"


def test_a_save_interrupted_before_the_json_is_refused_not_mixed(tmp_path, monkeypatch):
    """Same base, so the fingerprints agree: only the save id tells the new weights from the old config."""
    old, base, _ = _trained_adapter(step=0)
    new, _, new_logits = _trained_adapter(step=1)
    directory = tmp_path / "adapter"
    old.save(directory)
    assert new.fingerprint == old.fingerprint

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(adapter_mod, "write_text_atomic", crash)
    with pytest.raises(KeyboardInterrupt):
        new.save(directory)
    monkeypatch.undo()
    assert not [p for p in os.listdir(directory) if p.startswith(".adapter-")], "temp file left behind"
    with pytest.raises(sparsify_fx.AdapterError, match="different saves"):
        sparsify_fx.load_adapter(directory)
    new.save(directory)  # saving again repairs it
    sparsify_fx.apply_adapter(base, sparsify_fx.load_adapter(directory))
    assert models.rel_err(_logits(base), new_logits) <= 1e-5


# ---------------------------------------------------------------------- (d) pruned models and from_pretrained
def test_uniform_prune_round_trips_through_save_pretrained(tmp_path):
    model, _ = _pair()
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PretrainedMismatchWarning)
        sparsify_fx.prune(model, (IDS,), sparsify_fx.PruneConfig(ratio=0.25, progress=False))
    assert model.config.intermediate_size == 96 and model.config.num_attention_heads == 2
    model.save_pretrained(tmp_path / "pruned")
    loaded = LlamaForCausalLM.from_pretrained(tmp_path / "pruned")
    assert models.rel_err(_logits(loaded), _logits(model)) <= 1e-6


@pytest.mark.parametrize("config", [
    sparsify_fx.PruneConfig(ratio=0.25, scope="global", progress=False),
    sparsify_fx.PruneConfig(ratio={"attention_heads": 0.25}, scope="global", progress=False),
], ids=["global", "global_heads_only"])
def test_non_uniform_prune_says_from_pretrained_cannot_rebuild_it(tmp_path, config):
    """``global_heads_only`` leaves one layer's heads and prunes the other's: the config says 2 heads for both."""
    model, _ = _pair()
    model.eval()
    with pytest.warns(PretrainedMismatchWarning, match=r"from_pretrained cannot rebuild.*q_proj.*torch\.save"):
        sparsify_fx.prune(model, (IDS,), config)
    model.save_pretrained(tmp_path / "pruned")
    with pytest.raises(RuntimeError, match="mismatch"):  # what the warning predicted
        LlamaForCausalLM.from_pretrained(tmp_path / "pruned")
