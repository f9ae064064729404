"""Worker side of tests/test_distributed.py. A plain module on sys.path (tests/), because spawned
processes re-import the target function by module name."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

import sparsify_fx
from sparsify_fx.passes.s2ft import S2FTLinear

STEPS = 3
WORLD = 2


def _build(layout: str):
    sys.path.insert(0, os.path.dirname(__file__))
    import models

    torch.manual_seed(0)
    model = models.llama(layers=2).eval()
    ids = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(1))
    cfg = sparsify_fx.S2FTConfig(attention_ratio=0.5, ffn_ratio=0.25, layout=layout)
    sparsify_fx.s2ft(model, (ids,), cfg)
    return model, ids


def _loss(model, ids):
    return model(ids, labels=ids).loss


def _blocks(model):
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, S2FTLinear):
            for i, b in enumerate(m.blocks):
                t = b.full_tensor() if hasattr(b, "full_tensor") else b
                out[f"{name}.{i}"] = t.detach().clone()
    return out


def single(layout: str):
    model, ids = _build(layout)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(STEPS):
        loss = _loss(model, ids)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return losses, _blocks(model)


def worker(rank: int, mode: str, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        model, ids = _build("view" if mode == "ddp" else "separate")
        shard = ids.chunk(WORLD)[rank]
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            wrapped = fully_shard(model)
        opt = torch.optim.AdamW(wrapped.parameters(), lr=1e-2)
        losses = []
        for _ in range(STEPS):
            loss = _loss(wrapped, shard)
            reported = loss.detach().clone()
            dist.all_reduce(reported)
            losses.append(reported.item() / WORLD)
            loss.backward()
            opt.step()
            opt.zero_grad()
        blocks = _blocks(model)
        if rank == 0:
            torch.save({"losses": losses, "blocks": blocks}, out_file)
    finally:
        _close()


def _close() -> None:
    """Leave the group together after a run that succeeded: a rank that exits while its peer still reads from the
    gloo pair makes the peer abort (SIGABRT, 'connection closed by peer'), a rare crash of the FSDP2 test. After a
    failure the barrier is skipped: the peer may be waiting in another collective and would never reach it."""
    if sys.exc_info()[0] is None:
        dist.barrier()
    dist.destroy_process_group()


def spawn(fn, nprocs: int, make_args) -> None:
    """``mp.spawn(fn, make_args(attempt), nprocs)``, run once more if a worker is killed by SIGABRT.

    gloo workers on this CPU-only machine occasionally die in C++ with "terminate called without an active
    exception" (2 of 16 runs of the FSDP2 test before any of this week's changes, and as often after): a crash of
    the transport, not a result. Any Python exception in a worker, a wrong result and a second crash still fail.
    ``make_args(attempt)`` gives fresh arguments per attempt (a new FileStore path: a used one cannot be reused).
    """
    import torch.multiprocessing as mp

    for attempt in range(2):
        try:
            mp.spawn(fn, args=make_args(attempt), nprocs=nprocs, join=True)
            return
        except mp.ProcessExitedException as exc:
            if attempt or exc.signal_name != "SIGABRT":
                raise
