"""Benchmark: serving many S²FT adapters on one base model: mixed-adapter batches vs the base, PEFT LoRA and switching.

Model: ``train_step.py``'s workload A (Llama hidden 512, intermediate 1408, 4 layers, 8 heads, vocab 4000, fp32,
eager, its ``build_base``). Adapters: 16 real S²FT adapters, ≈1 % of the parameters each (``train_step.py``'s
config: per-layer budget, random units): 4 ``s2ft`` runs (selection seeds 0-3) × 4 targets, each target a few SGD
steps from the base on its own random token data, then ``export_adapter``.

Batches: prefill 16 × 128 tokens, and one decode step of 16 rows on a 128-token KV cache (cropped back after each
step, outside the timer; 5 interleaved decode runs, reported as the median of their medians). 1, 4 or 16 adapters
in the batch: row ``i`` uses adapter ``i mod n``, rows shuffled (as a server's queue would mix them). Competitors,
interleaved round by round so a busy neighbour slows all alike:

- ``base``: the plain model, no adapter (the bound).
- ``lora``: PEFT LoRA on the projections S²FT trains, the rank whose trainable count is nearest S²FT's, 16 adapters
  (random non-zero B: the speed does not depend on training), mixed batch via ``adapter_names``.
- ``switch``: S²FT by switching: per adapter group ``apply_adapter``, forward on its rows, ``remove_adapter``.
- ``mixed``: S²FT mixed batch, ``attach_adapters`` + ``adapter_names``.

Targets: mixed ≤ 1.10 × base at 16 adapters; mixed's overhead (latency − base) ≤ 0.5 × LoRA's; mixed ahead of
switching whenever more than one adapter is in the batch. Prints a table of medians and ratios and PASS/MISS, and
writes ``benchmarks/results/serving.json``.

    python benchmarks/serving.py            # a few minutes on 2 CPU cores
    python benchmarks/serving.py --quick    # tiny shapes, smoke run; writes no JSON unless --json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import sparsify_fx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step  # noqa: E402

COUNTS = (1, 4, 16)
BATCH, PREFILL = 16, 128


def train_adapters(base: nn.Module, w: train_step.Workload, runs: int, per_run: int, steps: int):
    """``runs × per_run`` real S²FT adapters: one ``s2ft`` per selection seed, then per target a few SGD steps from
    the base on its own random tokens. Returns the adapters and the trainable count of one."""
    total = sum(p.numel() for p in base.parameters())
    adapters, count, projections = [], 0, set()
    for run in range(runs):
        model = copy.deepcopy(base)
        cfg = sparsify_fx.S2FTConfig(budget=round(train_step.TRAINABLE_FRACTION * total), scope="per_layer",
                                     strategy="random", seed=run, progress=False)
        probe = torch.randint(0, w.vocab, (1, 32), generator=torch.Generator().manual_seed(run))
        sparsify_fx.s2ft(model, (probe,), cfg)
        projections |= {s.projection for s in model._sparsify_s2ft.slices}
        trainable = [p for p in model.parameters() if p.requires_grad]
        count = sum(p.numel() for p in trainable)
        start = [p.detach().clone() for p in trainable]
        for t in range(per_run):
            with torch.no_grad():
                for p, s in zip(trainable, start):
                    p.copy_(s)
            g = torch.Generator().manual_seed(1000 * run + t)
            data = torch.randint(0, w.vocab, (2, 32), generator=g)
            opt = torch.optim.SGD(trainable, lr=0.5)
            for _ in range(steps):
                model(input_ids=data, labels=data).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            adapters.append(sparsify_fx.export_adapter(model))
    return adapters, count, sorted(projections)


def lora_model(base: nn.Module, match: int, projections: list[str], n: int) -> tuple[nn.Module, int]:
    """``n`` PEFT LoRA adapters (names ``l0``..) on ``projections``, the rank nearest ``match`` trainable values."""
    from peft import LoraConfig, get_peft_model

    targets = [train_step.LLAMA_NAMES[p] for p in projections]
    per_rank = sum(m.in_features + m.out_features for name, m in base.named_modules()
                   if isinstance(m, nn.Linear) and name.rpartition(".")[2] in targets)
    rank = max(1, round(match / per_rank))
    torch.manual_seed(5)
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, bias="none",
                     init_lora_weights=False)  # random B: the adapters really add something
    model = get_peft_model(copy.deepcopy(base), cfg, adapter_name="l0")
    for i in range(1, n):
        model.add_adapter(f"l{i}", cfg)
    return model.eval(), rank * per_rank


def names_for(count: int, prefix: str, seed: int) -> list[str]:
    names = [f"{prefix}{i % count}" for i in range(BATCH)]
    random.Random(seed).shuffle(names)
    return names


def groups(names: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        out.setdefault(n, []).append(i)
    return out


def interleaved(fns: dict[str, Callable[[], None]], warmup: int, reps: int) -> dict[str, list[float]]:
    for f in fns.values():
        for _ in range(warmup):
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    items = list(fns.items())
    gc.collect()
    gc.disable()
    try:
        for r in range(reps):
            for name, f in items[r % len(items):] + items[: r % len(items)]:
                t = time.perf_counter()
                f()
                times[name].append(time.perf_counter() - t)
    finally:
        gc.enable()
    return times


class Decoder:
    """One decode step of ``model`` on rows ``rows`` of a 128-token cache; the cache is cropped back after the
    timed step (``crop`` runs in ``reset``, outside the timer)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, **kw: object) -> None:
        self.model, self.kw = model, kw
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True, **kw)
        self.cache = out.past_key_values
        self.next = out.logits[:, -1:].argmax(-1)
        self.length = ids.shape[1]

    def step(self) -> None:
        with torch.no_grad():
            self.model(input_ids=self.next, past_key_values=self.cache, use_cache=True, **self.kw)
        self.cache.crop(-1)  # back to the prefill's length


def bench(base: nn.Module, served: nn.Module, lora: nn.Module, adapters: list, ids: torch.Tensor, warmup: int,
          reps: int, decode_reps: int, decode_runs: int) -> dict:
    """Prefill: one interleaved measurement of ``reps`` rounds. Decode: ``decode_runs`` interleaved measurements of
    ``decode_reps`` rounds each (a decode step is ~10 ms, so a busy neighbour moves one run's median; the table
    reports the median over runs of each run's median)."""
    fns: dict[str, Callable[[], None]] = {}
    dec: dict[str, Callable[[], None]] = {}
    decoders = []

    def nograd(f: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                f()
        return run

    fns["base"] = nograd(lambda: base(input_ids=ids))
    d = Decoder(base, ids)
    decoders.append(d)
    dec["base"] = d.step
    for n in COUNTS:
        s_names, l_names = names_for(n, "s", n), names_for(n, "l", n)
        fns[f"lora/{n}"] = nograd(lambda l_names=l_names: lora(input_ids=ids, adapter_names=l_names))
        fns[f"mixed/{n}"] = nograd(lambda s_names=s_names: served(input_ids=ids, adapter_names=s_names))
        by = {int(k[1:]): torch.tensor(v) for k, v in groups(s_names).items()}

        def switch(by: dict = by, sub: Callable[[torch.Tensor], object] = lambda r: base(input_ids=ids[r])) -> None:
            with torch.no_grad():
                for a, r in by.items():
                    sparsify_fx.apply_adapter(base, adapters[a])
                    sub(r)
                    sparsify_fx.remove_adapter(base)
        fns[f"switch/{n}"] = switch
        d = Decoder(lora, ids, adapter_names=l_names)
        dec[f"lora/{n}"] = d.step
        d = Decoder(served, ids, adapter_names=s_names)
        dec[f"mixed/{n}"] = d.step
        per_group = {a: Decoder(base, ids[r]) for a, r in by.items()}  # each group's own cache

        def switch_decode(per_group: dict = per_group) -> None:
            for a, g in per_group.items():
                sparsify_fx.apply_adapter(base, adapters[a])
                g.step()
                sparsify_fx.remove_adapter(base)
        dec[f"switch/{n}"] = switch_decode
    t = time.perf_counter()
    prefill = interleaved(fns, warmup, reps)
    print(f"  prefill timed in {time.perf_counter() - t:.0f} s")
    decode, loads = [], []
    for _ in range(decode_runs):
        loads.append(os.getloadavg()[0])  # which runs a busy neighbour shared the 2 cores with
        decode.append(interleaved(dec, 2 * warmup, decode_reps))
    return {"prefill": [prefill], "decode": decode}, loads


def check_rows(base: nn.Module, served: nn.Module, adapters: list, ids: torch.Tensor) -> float:
    """Max relative error of the mixed batch's logits against each row's adapter applied alone (16 adapters)."""
    names = names_for(16, "s", 16)
    with torch.no_grad():
        mixed = served(input_ids=ids, adapter_names=names).logits
        worst = 0.0
        for name, rows in groups(names).items():
            sparsify_fx.apply_adapter(base, adapters[int(name[1:])])
            ref = base(input_ids=ids[rows]).logits
            sparsify_fx.remove_adapter(base)
            worst = max(worst, ((mixed[rows] - ref).norm() / ref.norm()).item())
    return worst


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, smoke run")
    ap.add_argument("--reps", type=int, default=None, help="prefill rounds (default 5; quick 2)")
    ap.add_argument("--decode-reps", type=int, default=None, help="decode rounds per run (default 30; quick 5)")
    ap.add_argument("--decode-runs", type=int, default=None,
                    help="decode measurements, reported as the median of their medians (default 5; quick 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/serving.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    w = (train_step.QUICK if args.quick else train_step.FULL)["A"]
    reps = args.reps or (2 if args.quick else 5)
    decode_reps = args.decode_reps or (5 if args.quick else 30)
    decode_runs = args.decode_runs or (1 if args.quick else 5)
    print(f"{w.describe().split(', batch')[0]}; batch {BATCH}x{PREFILL} prefill and {BATCH}-row decode, "
          f"{args.threads} threads")
    base = train_step.build_base(w)
    t = time.perf_counter()
    adapters, count, projections = train_adapters(base, w, runs=4, per_run=4, steps=1 if args.quick else 2)
    print(f"  16 S²FT adapters trained in {time.perf_counter() - t:.0f} s: {count:,d} values each "
          f"({100 * count / sum(p.numel() for p in base.parameters()):.2f} %) on {'+'.join(projections)}")
    served = sparsify_fx.attach_adapters(copy.deepcopy(base), {f"s{i}": a for i, a in enumerate(adapters)})
    lora, lora_count = lora_model(base, count, projections, 16)
    print(f"  PEFT LoRA: 16 adapters of {lora_count:,d} values each")
    ids = torch.randint(0, w.vocab, (BATCH, PREFILL if not args.quick else 32),
                        generator=torch.Generator().manual_seed(1))
    # both per-layer paths: the bmm (128-token rows) and embedding_bag (4-token rows, as in decode)
    err = max(check_rows(base, served, adapters, ids), check_rows(base, served, adapters, ids[:, :4]))
    print(f"  mixed batch vs each adapter applied alone (128- and 4-token rows): max rel. err of the logits {err:.1e}")
    times, decode_loads = bench(base, served, lora, adapters, ids, warmup=1, reps=reps, decode_reps=decode_reps,
                                decode_runs=decode_runs)

    results: dict = {"rows_rel_err": err, "adapter_values": count, "lora_values": lora_count, "phases": {}}
    checks: dict[str, bool] = {}
    for phase, runs in times.items():
        per_run = [{k: statistics.median(v) for k, v in ts.items()} for ts in runs]
        med = {k: statistics.median(r[k] for r in per_run) for k in per_run[0]}
        b = med["base"]
        what = (f"median of {len(runs[0]['base'])} rounds" if len(runs) == 1 else
                f"median of {len(runs)} runs' medians of {len(runs[0]['base'])} rounds")
        # the fastest round of each method over all runs: what a quiet machine gives, the noise's floor
        low = {k: min(x for ts in runs for x in ts[k]) for k in runs[0]}
        bl = low["base"]
        print(f"\n{phase}: {what} (ms), ratio to base, overhead = latency - base; min: the fastest round of all runs")
        print(f"  {'adapters':>8}  {'method':>7}  {'ms':>9}  {'x base':>7}  {'overhead ms':>11}  {'/ lora ovh':>10}"
              f"  {'min ms':>8}  {'min x':>6}  {'min / lora':>10}")
        print(f"  {'-':>8}  {'base':>7}  {1e3 * b:9.2f}  {1.0:7.3f}  {'':>11}  {'':>10}  {1e3 * bl:8.2f}  {1.0:6.3f}")
        rows = {"base_s": b, "base_min_s": bl}
        for n in COUNTS:
            lo, lo_low = med[f"lora/{n}"] - b, low[f"lora/{n}"] - bl
            for m in ("lora", "switch", "mixed"):
                v, vl = med[f"{m}/{n}"], low[f"{m}/{n}"]
                ratio = (v - b) / lo if lo > 0 else float("nan")
                ratio_low = (vl - bl) / lo_low if lo_low > 0 else float("nan")
                print(f"  {n:>8}  {m:>7}  {1e3 * v:9.2f}  {v / b:7.3f}  {1e3 * (v - b):11.2f}  {ratio:10.2f}"
                      f"  {1e3 * vl:8.2f}  {vl / bl:6.3f}  {ratio_low:10.2f}")
                rows[f"{m}/{n}"] = {"median_s": v, "x_base": v / b, "overhead_s": v - b, "overhead_x_lora": ratio,
                                    "min_s": vl, "min_x_base": vl / bl, "min_overhead_x_lora": ratio_low}
            mixed = med[f"mixed/{n}"]
            checks[f"{phase} {n} adapters: mixed overhead <= 0.5 x LoRA's"] = mixed - b <= 0.5 * lo
            if n > 1:
                checks[f"{phase} {n} adapters: mixed ahead of switching"] = mixed < med[f"switch/{n}"]
        checks[f"{phase} 16 adapters: mixed <= 1.10 x base"] = med["mixed/16"] <= 1.10 * b
        rows["run_medians_s"] = per_run
        if phase == "decode":
            rows["run_load_avg"] = decode_loads
        rows["all_s"] = runs if len(runs) > 1 else runs[0]
        results["phases"][phase] = rows
    print("\ntargets")
    for k, ok in checks.items():
        print(f"  {'PASS' if ok else 'MISS'}  {k}")
    results["targets"] = checks
    results["env"] = {"torch": torch.__version__, "threads": args.threads, "machine": platform.machine(),
                      "quick": args.quick, "load_avg": os.getloadavg()}
    if not args.quick or args.json:
        path = Path(args.json or Path(__file__).resolve().parent / "results" / "serving.json")
        path.write_text(json.dumps(results, indent=1) + "\n")
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
