"""Worker side of tests/test_large_model.py: the large-model flow on real gloo processes. A plain module on
sys.path (tests/), because spawned processes re-import the target function by module name."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import sparsify_fx

STEPS = 3
LAYERS = 4


def _models():
    sys.path.insert(0, os.path.dirname(__file__))
    import models

    return models


def config(layout: str) -> sparsify_fx.S2FTConfig:
    return sparsify_fx.S2FTConfig(attention_ratio=0.5, ffn_ratio=0.25, layout=layout, progress=False)


def batch() -> torch.Tensor:
    return torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(1))


def meta_model(layout: str) -> torch.nn.Module:
    """The tiny Llama built on the meta device and S²FT-planned there (random strategy: no weights needed)."""
    with torch.device("meta"):
        model = _models().llama(layers=LAYERS)
    sparsify_fx.s2ft(model, (batch()[:1],), config(layout))
    return model


def train(model: torch.nn.Module, ids: torch.Tensor, world: int = 1) -> list[float]:
    """STEPS AdamW steps; with ``world`` > 1 each rank passes its shard and the reported loss is the mean."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = model(ids, labels=ids).loss
        reported = loss.detach().clone()
        if world > 1:
            dist.all_reduce(reported)
        losses.append(reported.item() / world)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return losses


def worker(rank: int, world: int, ckpt: str, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from torch.distributed.fsdp import fully_shard

        model = meta_model("separate")
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        model.to_empty(device="cpu")
        sparsify_fx.load_base(model, ckpt)
        ids = batch()
        losses = train(model.train(), ids.chunk(world)[rank], world)
        model.eval()
        with torch.no_grad():
            logits = model(ids).logits
        adapter = sparsify_fx.export_adapter(model)  # collective: every rank gathers the trained blocks
        sparsify_fx.save_merged(model, os.path.join(out_dir, "merged"), max_shard_size=200_000)  # collective too
        if rank == 0:
            adapter.save(os.path.join(out_dir, "adapter"))
            torch.save({"losses": losses, "logits": logits}, os.path.join(out_dir, "result.pt"))
    finally:
        _close()


def calibration(ids: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """One calibration batch whose ``.loss`` the gradient strategy differentiates."""
    return [{"input_ids": ids, "labels": ids}]


def _scores(fixed) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in fixed.scores.items()}


def selection_worker(rank: int, world: int, ckpt: str, init_file: str, out_dir: str) -> None:
    """Data-based selection across ranks (issue 14 item 3): each rank scores its own shard of the batch on an
    FSDP2-sharded loaded model, plans S²FT on meta with those scores, shards, loads and trains; also scores on a
    plain model replicated on every rank, with and without the cross-rank reduction."""
    import dataclasses

    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    from sparsify_fx.errors import ConfigError
    from sparsify_fx.passes.s2ft import state_of

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ids = batch()
        mine = ids.chunk(world)[rank]
        grad = dataclasses.replace(config("separate"), strategy="gradient", calibration=calibration(mine))
        act = dataclasses.replace(grad, strategy="activation")
        out: dict = {}

        def shard(model: torch.nn.Module) -> None:
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)

        with torch.device("meta"):
            scorer = _models().llama(layers=LAYERS)
        shard(scorer)
        scorer.to_empty(device="cpu")
        sparsify_fx.load_base(scorer, ckpt)
        try:
            sparsify_fx.s2ft(scorer, (ids[:1],), grad)
        except ConfigError as exc:
            out["refused"] = str(exc)
        fixed = sparsify_fx.score_units(scorer, (ids[:1],), grad)
        out["fsdp_gradient"] = _scores(fixed)
        out["fsdp_activation"] = _scores(sparsify_fx.score_units(scorer, (ids[:1],), act))
        del scorer

        plain = LlamaForCausalLM.from_pretrained(ckpt)
        out["plain_gradient"] = _scores(sparsify_fx.score_units(plain, (ids[:1],), grad))
        local = dataclasses.replace(grad, distributed=False)
        out["plain_gradient_local"] = _scores(sparsify_fx.score_units(plain, (ids[:1],), local))
        del plain

        with torch.device("meta"):
            model = _models().llama(layers=LAYERS)
        sparsify_fx.s2ft(model, (ids[:1],), dataclasses.replace(grad, strategy=fixed))
        shard(model)
        model.to_empty(device="cpu")
        sparsify_fx.load_base(model, ckpt)
        out["perms"] = dict(state_of(model).perms)
        out["losses"] = train(model.train(), mine, world)
        adapter = sparsify_fx.export_adapter(model)
        torch.save(out, os.path.join(out_dir, f"selection{rank}.pt"))
        if rank == 0:
            adapter.save(os.path.join(out_dir, "adapter"))
    finally:
        _close()


def _close() -> None:
    """Leave the group together after a run that succeeded: a rank that exits while its peer still reads from the
    gloo pair makes the peer abort (SIGABRT, 'connection closed by peer'), a rare crash of the FSDP2 test. After a
    failure the barrier is skipped: the peer may be waiting in another collective and would never reach it."""
    if sys.exc_info()[0] is None:
        dist.barrier()
    dist.destroy_process_group()
