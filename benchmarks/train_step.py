"""Benchmark: one S²FT training step against full fine-tuning, LoRA and the backward-pass bound; adapter switching.

Competitors (same random-init Llama, same batch, same seed, AdamW, fp32, eager PyTorch):

- ``full``:  every parameter trains.
- ``lora``:  ``peft`` LoRA on the projections S²FT trains, rank chosen so its trainable count matches S²FT's.
- ``bound``: forward + input-gradient backward through every layer, no weight gradient, no optimizer (all weights
  frozen, the input embeddings require grad). No fine-tuning method can backpropagate through the model for less.
  It is a slightly pessimistic bound: it also computes layer 0's input gradient, which nothing that trains only
  weights needs, and which S²FT and LoRA both skip.
- ``s2ft``:  ``sparsify_fx.s2ft`` with a budget of 1 % of the parameters (per layer, random units).

Measured, in one process:

- workload A (speed): hidden 512, intermediate 1408, 4 layers, 8 heads (MHA), vocab 4000, batch 4×256. Median
  step time (forward, backward, ``optimizer.step``, ``zero_grad``) over ``--steps`` steps after ``--warmup`` steps;
  the competitors' steps are interleaved so a busy neighbour on a shared machine slows all of them alike.
- workload B (memory): hidden 1024, intermediate 2816, 8 layers, 16 heads, batch 1×256. Training memory above the
  weights = peak tensor memory created during one step (activations, gradients, optimizer temporaries), measured by
  :class:`memory.TensorMemoryMeter` after one warm-up step, plus the optimizer state that persists between steps.
  One competitor at a time, in runs separate from the timing (the meter slows every op).
- adapter switching on workload A's model: S²FT ``apply_adapter`` + ``remove_adapter`` on a plain base vs ``peft``
  LoRA ``merge_adapter`` + ``unmerge_adapter``, median of ``--reps`` repetitions.

Prints tables, PASS/MISS against the targets, a profile of S²FT vs the bound when S²FT misses a speed target, and
writes ``benchmarks/results/train_step.json``.

    python benchmarks/train_step.py            # ~5 minutes on 2 CPU cores
    python benchmarks/train_step.py --quick    # tiny shapes, a smoke run (~30 s); writes no JSON unless --json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import sparsify_fx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import TensorMemoryMeter, optimizer_state_bytes, self_check, storage_bytes  # noqa: E402

MIB = 1 << 20
LR = 1e-4
TRAINABLE_FRACTION = 0.01
LLAMA_NAMES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
               "down": "down_proj"}
METHODS = ("full", "lora", "bound", "s2ft")


@dataclass
class Workload:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    batch: int
    seq: int

    def describe(self) -> str:
        return (f"Llama hidden {self.hidden}, intermediate {self.intermediate}, {self.layers} layers, {self.heads} "
                f"heads (MHA), vocab {self.vocab}, batch {self.batch}x{self.seq}, fp32")


FULL = {"A": Workload(512, 1408, 4, 8, 4000, 4, 256), "B": Workload(1024, 2816, 8, 16, 4000, 1, 256)}
QUICK = {"A": Workload(128, 352, 2, 4, 500, 2, 64), "B": Workload(256, 704, 2, 4, 500, 1, 64)}


# ------------------------------------------------------------------------------------------------ competitors
def build_base(w: Workload) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=w.hidden, intermediate_size=w.intermediate, num_hidden_layers=w.layers,
                      num_attention_heads=w.heads, num_key_value_heads=w.heads, vocab_size=w.vocab,
                      max_position_embeddings=w.seq, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()  # eval: no dropout anywhere; gradients flow all the same


def batch(w: Workload) -> torch.Tensor:
    return torch.randint(0, w.vocab, (w.batch, w.seq), generator=torch.Generator().manual_seed(1))


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class Competitor:
    name: str
    model: nn.Module
    step: Callable[[], None]
    trainable: int
    opt: torch.optim.Optimizer | None = None
    note: str = ""


def _training_step(model: nn.Module, ids: torch.Tensor, opt: torch.optim.Optimizer) -> Callable[[], None]:
    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_full(w: Workload, ids: torch.Tensor) -> Competitor:
    model = build_base(w)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    return Competitor("full", model, _training_step(model, ids, opt), trainable(model), opt)


def make_bound(w: Workload, ids: torch.Tensor) -> Competitor:
    model = build_base(w)
    model.requires_grad_(False)
    embed = model.get_input_embeddings()

    def step() -> None:
        x = embed(ids).detach().requires_grad_(True)
        model(inputs_embeds=x, labels=ids).loss.backward()

    return Competitor("bound", model, step, 0, note="input grads only")


def make_s2ft(w: Workload, ids: torch.Tensor) -> Competitor:
    model = build_base(w)
    total = sum(p.numel() for p in model.parameters())
    cfg = sparsify_fx.S2FTConfig(budget=round(TRAINABLE_FRACTION * total), scope="per_layer", strategy="random",
                                 seed=0)
    sparsify_fx.s2ft(model, (ids[:1, : min(32, w.seq)],), cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    st = model._sparsify_s2ft
    projs = sorted({s.projection for s in st.slices})
    units = ", ".join(f"{len(u.selected)}/{u.group.num_units} {u.group.kind}" for u in st.units[:1])
    return Competitor("s2ft", model, _training_step(model, ids, opt), trainable(model), opt,
                      note=f"{'+'.join(projs)}; e.g. {units} per layer")


def make_lora(w: Workload, ids: torch.Tensor, match: int, projections: list[str]) -> Competitor:
    """LoRA on ``projections`` with the rank whose trainable count is nearest ``match``."""
    from peft import LoraConfig, get_peft_model

    model = build_base(w)
    targets = [LLAMA_NAMES[p] for p in projections]
    per_rank = sum(m.in_features + m.out_features for n, m in model.named_modules()
                   if isinstance(m, nn.Linear) and n.rpartition(".")[2] in targets)
    rank = max(1, round(match / per_rank))
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets, bias="none")
    model = get_peft_model(model, cfg)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    return Competitor("lora", model, _training_step(model, ids, opt), trainable(model), opt,
                      note=f"r={rank} on {'+'.join(targets)}")


def make_all(w: Workload, ids: torch.Tensor, which: tuple[str, ...] = METHODS):
    """Yield competitors one by one (S²FT first: LoRA matches its trainable count)."""
    s2 = make_s2ft(w, ids)
    projs = sorted({s.projection for s in s2.model._sparsify_s2ft.slices})
    count = s2.trainable
    makers = {"full": lambda: make_full(w, ids), "bound": lambda: make_bound(w, ids),
              "lora": lambda: make_lora(w, ids, count, projs)}
    for name in which:
        if name == "s2ft":
            yield s2
            s2 = None
        else:
            yield makers[name]()


# ------------------------------------------------------------------------------------------------ speed
def time_steps(comps: list[Competitor], warmup: int, steps: int) -> dict[str, list[float]]:
    for c in comps:
        for _ in range(warmup):
            c.step()
    times: dict[str, list[float]] = {c.name: [] for c in comps}
    gc.collect()
    gc.disable()
    try:
        for r in range(steps):
            # rotate the order each round: no method always runs right after the same neighbour
            for c in comps[r % len(comps):] + comps[: r % len(comps)]:
                t = time.perf_counter()
                c.step()
                times[c.name].append(time.perf_counter() - t)
    finally:
        gc.enable()
    return times


def profile_call(fn: Callable[[], None], rows: int = 12) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ------------------------------------------------------------------------------------------------ memory
def measure_memory(c: Competitor) -> dict:
    c.step()  # warm-up: optimizer state exists from here on
    gc.collect()
    with TensorMemoryMeter() as meter:
        c.step()
    gc.collect()
    opt_state = optimizer_state_bytes(c.opt) if c.opt is not None else 0
    grads = sum(p.numel() * p.element_size() for p in c.model.parameters() if p.requires_grad)
    weights = storage_bytes(c.model.parameters())
    return {"trainable": c.trainable, "step_peak_bytes": meter.peak, "optimizer_state_bytes": opt_state,
            "grad_bytes": grads, "total_above_weights_bytes": meter.peak + opt_state, "weight_bytes": weights,
            "allocations": meter.allocations, "note": c.note}


# ------------------------------------------------------------------------------------------------ switching
def _median_interleaved(fns: dict[str, Callable[[], None]], reps: int) -> dict[str, list[float]]:
    """Time each function ``reps`` times, alternating between them so machine noise hits all alike."""
    for fn in fns.values():
        for _ in range(max(2, reps // 10)):
            fn()
    ts: dict[str, list[float]] = {k: [] for k in fns}
    gc.collect()
    gc.disable()
    try:
        for _ in range(reps):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                ts[k].append(time.perf_counter() - t)
    finally:
        gc.enable()
    return ts


@torch.no_grad()
def bench_switch(s2: Competitor, lora: Competitor, w: Workload, reps: int) -> dict:
    """S²FT apply+remove on a plain base vs LoRA merge+unmerge, plus where S²FT's time goes."""
    adapter = sparsify_fx.export_adapter(s2.model)
    base = build_base(w)
    before = {k: v.detach().clone() for k, v in base.state_dict().items() if k in adapter.entries}
    peft_model = lora.model
    lora_weights = {n: m.base_layer.weight for n, m in peft_model.named_modules() if hasattr(m, "base_layer")
                    and isinstance(getattr(m.base_layer, "weight", None), torch.Tensor)}
    lora_before = {n: p.detach().clone() for n, p in lora_weights.items()}

    def s2ft_switch() -> None:
        sparsify_fx.apply_adapter(base, adapter)
        sparsify_fx.remove_adapter(base, adapter)

    def lora_switch() -> None:
        peft_model.merge_adapter()
        peft_model.unmerge_adapter()

    def s2ft_first_switch() -> None:
        # a copy of the adapter is new to the base: apply_adapter checks its fingerprint (O(touched)) and
        # gathers the base rows, which later switches of the same adapter on the unchanged base reuse
        fresh = copy.copy(adapter)
        sparsify_fx.apply_adapter(base, fresh)
        sparsify_fx.remove_adapter(base, fresh)

    fns: dict[str, Callable[[], None]] = {"s2ft": s2ft_switch, "lora": lora_switch, "s2ft_first": s2ft_first_switch}
    ts = _median_interleaved(fns, reps)
    out: dict = {k: {"median_s": statistics.median(v), "min_s": min(v), "reps": reps} for k, v in ts.items()}
    threads = torch.get_num_threads()
    if threads > 1:
        # These are small memory-bound ops: on a shared machine a second OpenMP thread can cost more than it gives
        # (each parallel region waits for both threads), so the single-thread numbers are recorded beside.
        torch.set_num_threads(1)
        try:
            ts1 = _median_interleaved({"s2ft": s2ft_switch, "lora": lora_switch}, reps)
        finally:
            torch.set_num_threads(threads)
        out["one_thread"] = {k: statistics.median(v) for k, v in ts1.items()}
        out["one_thread"]["speedup"] = out["one_thread"]["lora"] / out["one_thread"]["s2ft"]
    out["s2ft"]["restored_bit_identical"] = all(torch.equal(before[k], base.state_dict()[k]) for k in before)
    out["s2ft"]["touched_values"] = adapter.num_parameters
    out["s2ft"]["entries"] = len(adapter.entries)
    out["lora"]["max_abs_drift_after_unmerge"] = max(
        (lora_weights[n] - lora_before[n]).abs().max().item() for n in lora_weights)
    out["lora"]["touched_values"] = sum(p.numel() for p in lora_weights.values())
    out["speedup"] = out["lora"]["median_s"] / out["s2ft"]["median_s"]
    if out["speedup"] < 10:
        # where the S²FT switch goes
        out["s2ft_profile"] = profile_call(lambda: [s2ft_switch() for _ in range(10)], rows=8)
    return out


def print_switch(sw: dict) -> None:
    s, lo = sw["s2ft"], sw["lora"]
    print(f"  s2ft apply_adapter+remove_adapter   {fmt_ms(s['median_s'])} ms  ({s['touched_values']:,d} values in "
          f"{s['entries']} weights; base restored bit-identically: {s['restored_bit_identical']})")
    if "s2ft_first" in sw:
        first = fmt_ms(sw["s2ft_first"]["median_s"])
        print(f"  s2ft first apply+remove of an adapter {first} ms  (checks the base-weight fingerprint once per "
              "adapter and base)")
    print(f"  LoRA merge_adapter+unmerge_adapter  {fmt_ms(lo['median_s'])} ms  ({lo['touched_values']:,d} values "
          f"touched; max drift after unmerge {lo['max_abs_drift_after_unmerge']:.1e})")
    print(f"  speedup {sw['speedup']:.1f}x", end="")
    if "one_thread" in sw:
        one = sw["one_thread"]
        print(f"   (1 thread: s2ft {1e3 * one['s2ft']:.1f} ms, LoRA {1e3 * one['lora']:.1f} ms, "
              f"speedup {one['speedup']:.1f}x)", end="")
    print()


# ------------------------------------------------------------------------------------------------ report
def fmt_ms(s: float) -> str:
    return f"{1e3 * s:9.1f}"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes and few steps: a smoke run")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per method (default 15; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps per method (default 2; quick 1)")
    ap.add_argument("--reps", type=int, default=None, help="adapter switch repetitions (default 100; quick 10)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", action="store_true", help="profile S²FT and the bound even if S²FT passes")
    ap.add_argument("--json", default=None, help="output path (default benchmarks/results/train_step.json; "
                    "--quick writes none unless given)")
    args = ap.parse_args()
    steps = args.steps or (3 if args.quick else 15)
    warmup = args.warmup or (1 if args.quick else 2)
    reps = args.reps or (10 if args.quick else 100)
    torch.set_num_threads(args.threads)
    loads = {"A": QUICK["A"] if args.quick else FULL["A"], "B": QUICK["B"] if args.quick else FULL["B"]}
    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    self_check()
    print(f"torch {torch.__version__}, {args.threads} threads, {platform.processor() or platform.machine()}, "
          f"load average at start {load_start:.1f}; memory meter self-check passed")

    # ---- A: speed
    wa = loads["A"]
    ids = batch(wa)
    comps = list(make_all(wa, ids))
    by = {c.name: c for c in comps}
    print(f"\nA (speed): {wa.describe()}, AdamW; median of {steps} steps after {warmup} warm-up, interleaved")
    times = time_steps(comps, warmup, steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    print(f"  {'method':7s} {'trainable':>11s} {'median ms':>9s} {'min ms':>9s} {'max ms':>9s}  {'/bound':>6s} "
          f"{'(min/min)':>9s}  note")
    for c in comps:
        print(f"  {c.name:7s} {c.trainable:11,d} {fmt_ms(med[c.name])} {fmt_ms(low[c.name])} "
              f"{fmt_ms(max(times[c.name]))}  {med[c.name] / med['bound']:6.3f} {low[c.name] / low['bound']:9.3f}  "
              f"{c.note}")
    spread = max(max(v) / min(v) for v in times.values())
    if spread > 1.5:
        print(f"  WARNING: step times vary {spread:.1f}x within one method: the machine is busy (load average "
              f"{os.getloadavg()[0]:.1f}), so medians are unreliable; rerun when it is idle")
    lora_mismatch = by["lora"].trainable / by["s2ft"].trainable - 1
    print(f"  trainable counts: s2ft {by['s2ft'].trainable:,d}, LoRA {by['lora'].trainable:,d} "
          f"({100 * lora_mismatch:+.1f} %)")
    methods = {c.name: {"trainable": c.trainable, "note": c.note} for c in comps}
    speed = {"s2ft_over_bound": med["s2ft"] / med["bound"], "s2ft_over_lora": med["s2ft"] / med["lora"],
             "s2ft_over_full": med["s2ft"] / med["full"]}

    # ---- switching on A's model (the trained S²FT and LoRA models from the timing run)
    print(f"\nAdapter switch on A's model, median of {reps}: apply+remove (S²FT) vs merge+unmerge (LoRA)")
    switch = bench_switch(by["s2ft"], by["lora"], wa, reps)
    print_switch(switch)
    if "s2ft_profile" in switch:
        print(f"  profile of 10 S²FT switches (A), by self CPU time:\n{switch['s2ft_profile']}")

    profiles = {}
    if args.profile or speed["s2ft_over_bound"] > 1.05 or speed["s2ft_over_lora"] > 1.0:
        for name in ("s2ft", "bound"):
            profiles[name] = profile_call(by[name].step)
            print(f"\nprofile of one {name} step (A), by self CPU time:\n{profiles[name]}")
    del comps, by
    gc.collect()

    # ---- B: memory, one competitor at a time
    wb = loads["B"]
    ids = batch(wb)
    print(f"\nB (memory): {wb.describe()}, AdamW; tensor memory above the weights (one step after a warm-up step)")
    mem: dict[str, dict] = {}
    keep: dict[str, Competitor] = {}
    for c in make_all(wb, ids, ("s2ft", "lora", "full", "bound")):
        mem[c.name] = measure_memory(c)
        if c.name in ("s2ft", "lora"):
            keep[c.name] = c  # for the switch on B; the meter counts only storages a step creates
        del c
        gc.collect()
    print(f"  {'method':7s} {'trainable':>11s} {'step peak':>10s} {'(grads)':>9s} {'opt state':>10s} "
          f"{'total MiB':>10s} {'/full':>6s}  (weights {mem['full']['weight_bytes'] / MIB:.0f} MiB)")
    for name in ("full", "lora", "bound", "s2ft"):
        m = mem[name]
        print(f"  {name:7s} {m['trainable']:11,d} {m['step_peak_bytes'] / MIB:10.1f} {m['grad_bytes'] / MIB:9.1f} "
              f"{m['optimizer_state_bytes'] / MIB:10.1f} {m['total_above_weights_bytes'] / MIB:10.1f} "
              f"{m['total_above_weights_bytes'] / mem['full']['total_above_weights_bytes']:6.3f}  {m['note']}")
    total = {k: v["total_above_weights_bytes"] for k, v in mem.items()}

    # switching cost grows with what a method touches: LoRA whole weights, S²FT its rows/columns (info, no target)
    reps_b = max(5, reps // 3)
    print(f"\nAdapter switch on B's model (for scale; no target), median of {reps_b}")
    switch_b = bench_switch(keep["s2ft"], keep["lora"], wb, reps_b)
    print_switch(switch_b)
    del keep
    gc.collect()
    memory = {"s2ft_over_full": total["s2ft"] / total["full"], "s2ft_over_lora": total["s2ft"] / total["lora"]}

    targets = {
        "A: s2ft step <= 1.05 x bound": speed["s2ft_over_bound"] <= 1.05,
        "A: s2ft step <= LoRA": speed["s2ft_over_lora"] <= 1.0,
        "B: s2ft memory <= 1/3 full FT": memory["s2ft_over_full"] <= 1 / 3,
        "B: s2ft memory <= LoRA": memory["s2ft_over_lora"] <= 1.0,
        "switch: s2ft >= 10x faster than LoRA": switch["speedup"] >= 10,
    }
    values = [speed["s2ft_over_bound"], speed["s2ft_over_lora"], memory["s2ft_over_full"], memory["s2ft_over_lora"],
              switch["speedup"]]
    print("\nSummary (ratios of medians)")
    for (what, ok), v in zip(targets.items(), values):
        print(f"  {verdict(ok)}  {what:40s} {v:7.3f}")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average at the end {os.getloadavg()[0]:.1f} "
          f"(other processes on this machine slow every method alike; steps are interleaved)")

    path = args.json or (None if args.quick else str(Path(__file__).resolve().parent / "results" / "train_step.json"))
    if path:
        result = {
            "quick": args.quick, "torch": torch.__version__, "threads": args.threads,
            "machine": platform.machine(), "load_average_start": load_start, "load_average_end": os.getloadavg()[0],
            "workloads": {k: asdict(v) for k, v in loads.items()}, "lr": LR, "trainable_fraction": TRAINABLE_FRACTION,
            "speed_A": {"median_s": med, "min_s": low, "max_spread": spread, "steps_s": times, "warmup": warmup,
                        "methods": methods, "lora_count_mismatch": lora_mismatch},
            "memory_B": mem, "switch_A": switch, "switch_B": switch_b,
            "ratios": {**{f"speed_{k}": v for k, v in speed.items()}, **{f"memory_{k}": v for k, v in memory.items()},
                       "switch_speedup": switch["speedup"]},
            "targets": {k: verdict(v) for k, v in targets.items()}, "profiles": profiles,
            "wall_s": time.perf_counter() - t0,
        }
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
