"""S²FT under real torch.distributed: DDP and FSDP2 with 2 processes on gloo (CPU).

Each rank trains on its half of the global batch; losses and trained slices must match a
single-process run on the whole batch.
"""

from __future__ import annotations

import dist_worker
import pytest
import torch

WORLD = dist_worker.WORLD


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_distributed_matches_single_process(mode, tmp_path):
    out = tmp_path / "result.pt"
    dist_worker.spawn(dist_worker.worker, WORLD, lambda k: (mode, str(tmp_path / f"init{k}"), str(out)))
    got = torch.load(out)
    losses, blocks = dist_worker.single("view" if mode == "ddp" else "separate")
    for a, b in zip(got["losses"], losses):
        assert abs(a - b) <= 1e-5 * abs(b), f"{mode}: losses {got['losses']} vs {losses}"
    assert got["blocks"].keys() == blocks.keys() and blocks
    for k, v in blocks.items():
        err = ((got["blocks"][k] - v).norm() / v.norm()).item()
        assert err <= 1e-5, f"{mode}: trained slice {k} differs ({err:.2e})"
