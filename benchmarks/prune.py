"""Structured pruning benchmark (one process; prints tables, writes benchmarks/results/prune.json).

(a) CPU forward latency of a pruned Llama vs the original at 25% / 50% of heads + FFN channels,
    median of timed runs after warm-up, beside the FLOP reduction (torch.utils.flop_counter).
(b) Held-out loss / perplexity of a briefly trained tiny Llama on a synthetic second-order Markov language,
    before and after pruning, per scoring method (random is the control).

    /work/main/.venv/bin/python benchmarks/prune.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import sparsify_fx
from sparsify_fx import PruneConfig

warnings.filterwarnings("ignore")


def llama(hidden, inter, layers, heads, kv_heads, vocab, max_pos=256):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                      max_position_embeddings=max_pos)
    return LlamaForCausalLM(cfg)


def flops(model, ids):
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(ids)
    return fc.get_total_flops()


def median_latency(model, ids, reps, warmup=3):
    with torch.inference_mode():
        for _ in range(warmup):
            model(ids)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def latency_section(reps: int) -> list[dict]:
    torch.manual_seed(0)
    base = llama(512, 1408, 4, 8, 8, 1024).eval()
    ids = torch.randint(0, 1024, (4, 128))
    models = {"original": base}
    for r in (0.25, 0.5):
        m = copy.deepcopy(base)
        sparsify_fx.prune(m, (ids[:1, :16],), PruneConfig(ratio={"attention_heads": r, "ffn_channels": r}))
        models[f"pruned {int(r * 100)}%"] = m
    f0 = flops(base, ids)
    # interleave the models so drift on the shared machine hits all of them alike
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(3):
        for k, m in models.items():
            times[k].append(median_latency(m, ids, max(reps // 3, 4)))
    rows = []
    t0 = statistics.median(times["original"])
    for k, m in models.items():
        f = flops(m, ids)
        t = statistics.median(times[k])
        rows.append({
            "model": k, "params": sum(p.numel() for p in m.parameters()), "gflops": f / 1e9,
            "flop_reduction": f0 / f, "median_ms": t * 1e3, "speedup": t0 / t,
            "speedup_over_flop_reduction": (t0 / t) / (f0 / f),
        })
    return rows


# ---------------------------------------------------------------------- (b) quality
def markov_chain(vocab: int, seed: int) -> torch.Tensor:
    """Second-order Markov language: P[a, b] is the distribution of the token after (a, b), peaked on a
    few successors. Predicting it needs the previous two tokens, so attention has to work."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(vocab, vocab, vocab, generator=g) * 3.0
    return torch.softmax(logits, dim=-1)


def sample(P: torch.Tensor, batch: int, seq: int, g: torch.Generator) -> torch.Tensor:
    x = torch.empty(batch, seq, dtype=torch.long)
    x[:, :2] = torch.randint(0, P.shape[0], (batch, 2), generator=g)
    for t in range(2, seq):
        x[:, t] = torch.multinomial(P[x[:, t - 2], x[:, t - 1]], 1, generator=g).squeeze(1)
    return x


def lm_loss(model, ids):
    """Next-token loss on positions that have two tokens of context."""
    logits = model(ids).logits[:, 1:-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 2:].reshape(-1))


def true_loss(P, batches):
    return statistics.fmean(
        float(-P[b[:, :-2], b[:, 1:-1], b[:, 2:]].log().mean()) for b in batches
    )


def eval_loss(model, batches):
    model.eval()
    with torch.no_grad():
        return statistics.fmean(lm_loss(model, b).item() for b in batches)


def quality_section(steps: int) -> dict:
    torch.manual_seed(0)
    vocab, seq = 32, 64
    P = markov_chain(vocab, 0)
    model = llama(128, 384, 2, 8, 4, vocab, max_pos=seq)
    g = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = lm_loss(model, sample(P, 16, seq, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - t0
    model.eval()
    gh = torch.Generator().manual_seed(2)
    held = [sample(P, 16, seq, gh) for _ in range(4)]
    gc = torch.Generator().manual_seed(3)
    calib = [(sample(P, 8, seq, gc),) for _ in range(4)]
    example = (held[0][:1, :16],)
    floor = true_loss(P, held)  # the loss of the true process: the floor
    base_loss = eval_loss(model, held)
    rows = [{"method": "unpruned", "ratio": 0.0, "loss": base_loss, "ppl": math.exp(base_loss)}]
    methods = [
        ("random", dict(score="random")),
        ("magnitude", dict(score="magnitude")),
        ("activation", dict(score="activation", calibration=calib)),
        ("taylor", dict(score="taylor", calibration=calib, loss_fn=lambda m, b: lm_loss(m, b[0]))),
        ("activation+bias_comp", dict(score="activation", calibration=calib, bias_compensation=True)),
    ]
    for r in (0.25, 0.5):
        for name, kw in methods:
            m = copy.deepcopy(model)
            sparsify_fx.prune(m, example, PruneConfig(ratio={"attention_heads": r, "ffn_channels": r},
                                                      progress=False, **kw))
            loss = eval_loss(m, held)
            rows.append({"method": name, "ratio": r, "loss": loss, "ppl": math.exp(loss),
                         "params": sum(p.numel() for p in m.parameters())})
    return {"entropy_floor": floor, "uniform_loss": math.log(vocab), "train_steps": steps, "train_s": train_s,
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer reps and steps (smoke run)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    reps = 6 if args.quick else 12
    steps = 40 if args.quick else 250
    t_all = time.perf_counter()
    lat = latency_section(reps)
    print("\n(a) CPU forward latency, Llama hidden 512 / inter 1408 / 4 layers / 8 heads, batch 4x128, "
          f"{torch.get_num_threads()} threads, median")
    print(f"{'model':<12} {'params':>10} {'GFLOP':>8} {'FLOP red.':>9} {'ms':>8} {'speedup':>8} {'spd/FLOPred':>11}")
    for r in lat:
        print(f"{r['model']:<12} {r['params']:>10} {r['gflops']:>8.2f} {r['flop_reduction']:>8.2f}x "
              f"{r['median_ms']:>8.1f} {r['speedup']:>7.2f}x {r['speedup_over_flop_reduction']:>11.2f}")
    q = quality_section(steps)
    print(f"\n(b) tiny Llama on a second-order Markov language (vocab 32), {q['train_steps']} steps in "
          f"{q['train_s']:.0f} s; "
          f"loss floor {q['entropy_floor']:.3f}, uniform {q['uniform_loss']:.3f}")
    print(f"{'method':<22} {'ratio':>5} {'loss':>7} {'ppl':>8}")
    for r in q["rows"]:
        print(f"{r['method']:<22} {r['ratio']:>5.2f} {r['loss']:>7.3f} {r['ppl']:>8.2f}")
    total = time.perf_counter() - t_all
    print(f"\ntotal {total:.0f} s")
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    out = os.path.join(os.path.dirname(__file__), "results", "prune.json")
    with open(out, "w") as f:
        json.dump({"latency": lat, "quality": q, "threads": torch.get_num_threads(), "total_s": total,
                   "torch": torch.__version__}, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
