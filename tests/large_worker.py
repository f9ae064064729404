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
        dist.destroy_process_group()
