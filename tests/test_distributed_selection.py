"""Data-based S²FT selection across ranks (issue 14 item 3): scores are reduced over the process group so every
rank picks the same units from its own calibration shard, and a model already sharded by FSDP2 is scored with
``score_units`` and planned on meta with the scores (``FixedImportance``).

What equals what (``importance.reduce_group``): step ``b`` scores the gradient of the mean of the ranks' losses on
their batch ``b``, i.e. one process on batch ``b`` of every rank concatenated (equal-size shards, a mean loss)."""

from __future__ import annotations

import dataclasses
import os

import dist_worker
import large_worker
import models
import pytest
import torch
from transformers import LlamaForCausalLM

import sparsify_fx
from sparsify_fx.errors import ConfigError
from sparsify_fx.passes.importance import FixedImportance
from sparsify_fx.passes.s2ft import state_of
from sparsify_fx.testing import assert_unchanged, model_snapshot

IDS = large_worker.batch()


def _config(strategy: str) -> sparsify_fx.S2FTConfig:
    return dataclasses.replace(large_worker.config("separate"), strategy=strategy,
                               calibration=large_worker.calibration(IDS))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("llama")
    torch.manual_seed(0)
    models.llama(layers=large_worker.LAYERS).save_pretrained(path, max_shard_size="200KB")
    return str(path)


@pytest.mark.parametrize("strategy", ["gradient", "activation"])
def test_scores_plan_on_meta_the_units_the_strategy_picks_on_the_loaded_model(ckpt: str, strategy: str) -> None:
    cfg = _config(strategy)
    scorer = LlamaForCausalLM.from_pretrained(ckpt)
    before = model_snapshot(scorer)
    fixed = sparsify_fx.score_units(scorer, (IDS[:1],), cfg)
    assert_unchanged(scorer, before)  # scoring restores grads and flags
    assert isinstance(fixed, FixedImportance) and not fixed.needs_values
    ref = sparsify_fx.s2ft(LlamaForCausalLM.from_pretrained(ckpt), (IDS[:1],), cfg)
    with torch.device("meta"):
        meta = models.llama(layers=large_worker.LAYERS)
    sparsify_fx.s2ft(meta, (IDS[:1],), dataclasses.replace(cfg, strategy=fixed))
    want, got = state_of(ref), state_of(meta)
    assert got.perms.keys() == want.perms.keys() and want.perms
    assert all(torch.equal(got.perms[k], p) for k, p in want.perms.items())
    # the plan is data-driven, not the identity or random's: some group keeps units other than the first ones
    random_plan = state_of(large_worker.meta_model("separate")).perms
    assert any(not torch.equal(p, random_plan[k]) for k, p in want.perms.items())
    meta.to_empty(device="cpu")
    sparsify_fx.load_base(meta, ckpt)
    assert large_worker.train(meta.train(), IDS) == large_worker.train(ref.train(), IDS)


def test_scores_of_another_architecture_are_refused_before_any_write(ckpt: str) -> None:
    fixed = sparsify_fx.score_units(LlamaForCausalLM.from_pretrained(ckpt), (IDS[:1],), _config("gradient"))
    cfg = large_worker.config("separate")
    deeper = models.llama(layers=large_worker.LAYERS + 1)
    before = model_snapshot(deeper)
    with pytest.raises(ConfigError, match=r"no score for group\(s\) \['.*'\].*another architecture"):
        sparsify_fx.s2ft(deeper, (IDS[:1],), dataclasses.replace(cfg, strategy=fixed))
    assert_unchanged(deeper, before)
    wider = models.llama(layers=large_worker.LAYERS, inter=192)
    before = model_snapshot(wider)
    with pytest.raises(ConfigError, match=r"must return a tensor of 192 scores for group .*got \(128,\)"):
        sparsify_fx.s2ft(wider, (IDS[:1],), dataclasses.replace(cfg, strategy=fixed))
    assert_unchanged(wider, before)
    with pytest.raises(ConfigError, match="1-D tensors"):
        FixedImportance({"g": torch.zeros(2, 2)})
    with pytest.raises(ConfigError, match="distributed must be True or False"):
        dataclasses.replace(cfg, distributed=1).validate()


@pytest.mark.slow  # two spawned processes importing torch and transformers
def test_gradient_selection_on_two_ranks_equals_one_process_on_the_whole_batch(tmp_path, ckpt: str) -> None:
    """Each rank scores half the batch on an FSDP2-sharded loaded model: the scores, hence the units, are those of
    one process on the whole batch; then the meta-planned, sharded, loaded model trains like that process."""
    world = 2
    dist_worker.spawn(large_worker.selection_worker, world,
                      lambda k: (world, ckpt, str(tmp_path / f"init{k}"), str(tmp_path)))
    ranks = [torch.load(tmp_path / f"selection{r}.pt") for r in range(world)]
    grad, act = _config("gradient"), _config("activation")
    plain = LlamaForCausalLM.from_pretrained(ckpt)
    want = {"gradient": sparsify_fx.score_units(plain, (IDS[:1],), grad).scores,
            "activation": sparsify_fx.score_units(plain, (IDS[:1],), act).scores}
    ref = sparsify_fx.s2ft(LlamaForCausalLM.from_pretrained(ckpt), (IDS[:1],), grad)
    for out in ranks:
        assert "already sharded" in out["refused"] and "score_units" in out["refused"]
        for key, kind in (("fsdp_gradient", "gradient"), ("plain_gradient", "gradient"),
                          ("fsdp_activation", "activation")):
            assert out[key].keys() == want[kind].keys(), key
            for g, w in want[kind].items():
                assert models.rel_err(out[key][g], w) <= 1e-5, (key, g)
        # every rank picks the units one process picks on the whole batch
        assert out["perms"].keys() == state_of(ref).perms.keys()
        assert all(torch.equal(out["perms"][k], p) for k, p in state_of(ref).perms.items())
    # without the reduction each rank ranks by its own half: the scores differ from the whole batch's and per rank
    local = [out["plain_gradient_local"] for out in ranks]
    assert max(models.rel_err(local[0][g], w) for g, w in want["gradient"].items()) > 1e-2
    assert max(models.rel_err(local[0][g], local[1][g]) for g in local[0]) > 1e-2
    losses = large_worker.train(ref.train(), IDS)
    for a, b in zip(ranks[0]["losses"], losses, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (ranks[0]["losses"], losses)
    got, exp = sparsify_fx.load_adapter(tmp_path / "adapter"), sparsify_fx.export_adapter(ref)
    assert got.entries.keys() == exp.entries.keys() and exp.entries
    for k, e in exp.entries.items():
        assert torch.equal(got.entries[k].index, e.index) and models.rel_err(got.entries[k].delta, e.delta) <= 1e-5
    assert os.path.isdir(tmp_path / "adapter")
