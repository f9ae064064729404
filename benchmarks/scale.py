"""Planning cost at scale (issue 14, item 5): trace + analyze + S²FT plan of Llama-3-shaped models on the meta device.

Each configuration runs in a fresh process (so its peak RSS is its own): build the model under
``torch.device("meta")``, then time separately

- ``trace``: :func:`sparsify_fx.frontend.trace` (torch.export, non-strict, in eval mode as ``analyze`` does),
- ``analyze``: :func:`sparsify_fx.analysis.analyze_graph` (propagation + report),
- ``plan``: what :func:`sparsify_fx.s2ft` does after the analysis with ``strategy="random"`` (choose units,
  co-permute every group, swap in ``S2FTLinear``; value-free on meta),

and, on a second meta model in the same process, the public ``sparsify_fx.s2ft`` call end to end (``s2ft()``
column: what a user waits for, first-call warm-up included). Wall and CPU seconds are both reported: on a shared
machine the wall time includes waiting for a core, the CPU time does not.

Configurations: the Llama-3-8B shape (h4096, GQA 32/8, i14336, vocab 128256) at 8, 16 and 32 layers (the per-layer
growth is the least-squares slope over them) and the Llama-3-70B shape (h8192, GQA 64/8, i28672) at 80 layers.

    /work/main/.venv/bin/python benchmarks/scale.py            # about 1-2 minutes on 2 cores
    /work/main/.venv/bin/python benchmarks/scale.py --quick    # 2 and 4 layers of the 8B shape, writes no JSON
    /work/main/.venv/bin/python benchmarks/scale.py --only-load   # the loading section alone (~1.5 min)

Loading (issue 14, item 2): a 311 M-parameter Llama saved in 300 MB shards, loaded by ``from_pretrained`` and by
meta → ``s2ft`` → ``fully_shard`` → ``to_empty`` → ``load_base`` on 1, 2 and 4 gloo ranks, one process each; peak
RSS (VmHWM) above the RSS after imports (model classes included), RSS after each phase, the tensor meter over
``load_base``, and the target ≤ (1/world + 10 %) of the single-process peak.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "scale.json")

SHAPES: dict[str, dict[str, int]] = {
    # Llama-3-8B and Llama-3-70B, as in their config.json
    "8B": {"hidden": 4096, "heads": 32, "kv_heads": 8, "inter": 14336, "vocab": 128256},
    "70B": {"hidden": 8192, "heads": 64, "kv_heads": 8, "inter": 28672, "vocab": 128256},
}
TARGETS_S = {("8B", 32): 10.0, ("70B", 80): 20.0}
TARGET_RSS_MB = 2048.0


def meta_llama(shape: str, layers: int) -> Any:
    """A ``LlamaForCausalLM`` of the named shape built on the meta device (no memory for weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=layers,
                      num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                      max_position_embeddings=256)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


class _Clock:
    """Wall and CPU seconds of one phase."""

    def __enter__(self) -> _Clock:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall0, time.process_time() - self.cpu0


def plan_child(shape: str, layers: int) -> dict[str, Any]:
    """One configuration, in this process: phase times, end-to-end s2ft() time, peak RSS."""
    import torch

    import sparsify_fx
    from sparsify_fx.analysis import analyze_graph
    from sparsify_fx.frontend import trace
    from sparsify_fx.passes import s2ft as s2ft_mod
    from sparsify_fx.passes.surgery import Journal

    warnings.filterwarnings("ignore")
    ids = torch.zeros(1, 8, dtype=torch.long, device="meta")
    cfg = sparsify_fx.S2FTConfig(strategy="random", progress=False)

    # the public call first, on its own model: it pays the first-trace warm-up a user pays
    model = meta_llama(shape, layers)
    with _Clock() as total:
        sparsify_fx.s2ft(model, (ids,), cfg)
    del model

    model = meta_llama(shape, layers).eval()
    with _Clock() as t_trace:
        tg = trace(model, (ids,))
    with _Clock() as t_analyze:
        report = analyze_graph(tg)
    with _Clock() as t_plan:  # the body of s2ft() after analyze()
        units = s2ft_mod._plan(report, model, cfg)
        s2ft_mod._select(units, s2ft_mod._score(model, units, cfg), cfg)
        units = [u for u in units if u.selected]
        swaps = s2ft_mod._swap_plan(model, units)
        with Journal(model) as j:
            s2ft_mod._apply(model, units, swaps, cfg, j)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "shape": shape,
        "layers": layers,
        **{f"{k}_wall_s": c.wall for k, c in (("trace", t_trace), ("analyze", t_analyze), ("plan", t_plan))},
        **{f"{k}_cpu_s": c.cpu for k, c in (("trace", t_trace), ("analyze", t_analyze), ("plan", t_plan))},
        "phases_wall_s": t_trace.wall + t_analyze.wall + t_plan.wall,
        "s2ft_wall_s": total.wall,
        "s2ft_cpu_s": total.cpu,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux: KiB
        "graph_nodes": len(tg.graph.nodes),
        "groups": len(report.groups),
        "units": len(units),
        "trainable_params": trained,
    }


# ---------------------------------------------------------------------------------------- loading
# weights dominate: 4 layers of h2048 with a 32000 vocabulary, 311 M parameters, 1.24 GB in fp32
LOAD_SHAPE = {"hidden": 2048, "heads": 16, "kv_heads": 4, "inter": 5632, "vocab": 32000, "layers": 4}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rss_split_mb() -> dict[str, float]:
    """Resident memory now, anonymous (tensors) vs file-backed (mmap'ed safetensors pages, reclaimable)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("RssAnon", "RssFile"):
                out[f"{key.lower()}_end_mb"] = int(line.split()[1]) / 1024
    return out


def _load_llama(device: str | None = None) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    s = LOAD_SHAPE
    cfg = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                      max_position_embeddings=256)
    if device is None:
        return LlamaForCausalLM(cfg)
    import torch

    with torch.device(device):
        return LlamaForCausalLM(cfg)


def _vm_hwm_mb() -> float:
    """Peak resident memory so far (VmHWM: anonymous and file-backed pages, mapped checkpoint pages included)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_child(mode: str, ckpt: str, rank: int, world: int, init_file: str) -> dict[str, Any]:
    """One process of the load section: ``from_pretrained`` (then every weight read once, then copied once), or
    meta → s2ft → FSDP2 per layer → ``to_empty`` → ``load_base``; RSS after each phase and the tensor meter over
    ``load_base``. The meter's dispatch mode costs a little Python per op: ``load_base`` makes a few per 16 MiB."""
    import torch
    import torch.distributed as dist
    from memory import TensorMemoryMeter
    from torch.distributed.fsdp import fully_shard
    from transformers import LlamaForCausalLM

    import sparsify_fx

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    # every module the run uses is imported (transformers' Llama code alone is ~250 MB resident): what is left is
    # what loading costs
    base = _rss_mb()
    phases: dict[str, float] = {}
    times: dict[str, float] = {}
    meter_mb = None
    if mode == "from_pretrained":
        with _Clock() as clock:
            model = LlamaForCausalLM.from_pretrained(ckpt, torch_dtype=torch.float32)
        times["from_pretrained_s"] = clock.wall
        phases["from_pretrained"] = _rss_mb() - base
        # a fair comparison: the returned weights may be mapped lazily, so read every one once
        with _Clock() as touch, torch.no_grad():
            for p in model.parameters():
                p.sum()
        times["touch_s"] = touch.wall
        phases["touched"] = _rss_mb() - base
        total = clock.wall + touch.wall
        peak = _vm_hwm_mb()
        # the floor for a loader that writes into the model's own memory (load_base must: it permutes and shards):
        # one copy of every weight out of the page cache, each freed at once (taken after the peak is read)
        with _Clock() as copy, torch.no_grad():
            for p in model.parameters():
                p.clone()
        times.update(copy_s=copy.wall, from_pretrained_cpu_s=clock.cpu, touch_cpu_s=touch.cpu, copy_cpu_s=copy.cpu)
    else:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
        try:
            with _Clock() as plan:
                model = _load_llama("meta")
                sparsify_fx.s2ft(model, (torch.zeros(1, 8, dtype=torch.long),),
                                 sparsify_fx.S2FTConfig(layout="separate", progress=False))
            phases["planned"] = _rss_mb() - base
            with _Clock() as shard:
                for layer in model.model.layers:
                    fully_shard(layer)
                fully_shard(model)
                model.to_empty(device="cpu")
            phases["materialised"] = _rss_mb() - base
            with _Clock() as clock, TensorMemoryMeter() as meter:
                sparsify_fx.load_base(model, ckpt)
            meter_mb = meter.peak / 2**20
            phases["loaded"] = _rss_mb() - base
            dist.barrier()
        finally:
            dist.destroy_process_group()
        times.update(plan_s=plan.wall, shard_s=shard.wall, load_base_s=clock.wall, load_base_cpu_s=clock.cpu)
        total = plan.wall + shard.wall + clock.wall
        peak = _vm_hwm_mb()
    local = sum(getattr(p, "_local_tensor", p).numel() * p.element_size() for p in model.parameters()) / 2**20
    return {"mode": mode, "world": world, "rank": rank, "load_s": clock.wall, "total_s": total, **times,
            "peak_rss_mb": peak, "base_rss_mb": base, "peak_above_base_mb": peak - base,
            "rss_after_phase_above_base_mb": phases, "meter_peak_mb": meter_mb, "local_params_mb": local,
            **_rss_split_mb()}


LOAD_RUNS = (("from_pretrained", 1), ("load_base", 1), ("load_base", 2), ("load_base", 4))


def load_section(tmp: str) -> dict[str, Any]:
    """Peak memory per rank for 1, 2 and 4 gloo ranks loading with load_base, and load time vs from_pretrained.

    The checkpoint was just written, so every run reads it from the page cache (no disk in any number).
    """
    import torch

    torch.manual_seed(0)
    ckpt = os.path.join(tmp, "ckpt")
    model = _load_llama()
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(ckpt, max_shard_size="300MB")
    del model
    rows = []
    for mode, world in LOAD_RUNS:
        init = os.path.join(tmp, f"init-{mode}-{world}")
        procs = [subprocess.Popen([sys.executable, __file__, "--load-child", mode, ckpt, str(r), str(world), init],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
        for p in procs:
            out, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"{mode} world={world} failed:\n{err[-4000:]}")
            rows.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  loading: {mode} x{world} done", file=sys.stderr)
    single = next(r for r in rows if r["mode"] == "load_base" and r["world"] == 1)["peak_above_base_mb"]
    for r in rows:
        if r["mode"] == "load_base":
            r["target_mb"] = (1 / r["world"] + 0.10) * single
            r["meets_target"] = r["peak_above_base_mb"] <= r["target_mb"]
    return {"params": n_params, "checkpoint_mb": n_params * 4 / 2**20, "rows": rows}


def load_lines(loading: dict[str, Any]) -> list[str]:
    """The loading table."""
    lines = [f"loading a {loading['params'] / 1e6:.0f} M-parameter Llama ({loading['checkpoint_mb']:.0f} MiB fp32, "
             "300 MB shards, page cache warm); memory above the process's RSS after imports:"]
    head = ("method", "world", "rank", "load s", "load cpu s", "total s", "peak above MB", "meter MB", "params MB",
            "anon/file end MB", "target MB")
    lines.append("  ".join(f"{h:>14}" for h in head))
    for r in loading["rows"]:
        tgt = f"{r['target_mb']:.0f} {'met' if r['meets_target'] else 'MISSED'}" if "target_mb" in r else ""
        meter = "" if r.get("meter_peak_mb") is None else f"{r['meter_peak_mb']:.0f}"
        cpu = r.get("load_base_cpu_s", r.get("from_pretrained_cpu_s", 0.0))
        cells = (r["mode"], r["world"], r["rank"], f"{r['load_s']:.2f}", f"{cpu:.2f}", f"{r['total_s']:.2f}",
                 f"{r['peak_above_base_mb']:.0f}", meter, f"{r['local_params_mb']:.0f}",
                 f"{r['rssanon_end_mb']:.0f}/{r['rssfile_end_mb']:.0f}", tgt)
        lines.append("  ".join(f"{c!s:>14}" for c in cells))
    for r in loading["rows"]:
        if r["mode"] == "from_pretrained":
            lines.append(f"from_pretrained {r['from_pretrained_s']:.2f} s (weights mapped, not read), reading every "
                         f"weight once {r['touch_s']:.2f} s, copying every weight once {r['copy_s']:.2f} s "
                         f"({r['copy_cpu_s']:.2f} s CPU)")
    return lines


def run_child(shape: str, layers: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--child", shape, str(layers)], capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{shape}/{layers} layers failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 and 4 layers of the 8B shape; no JSON")
    ap.add_argument("--json", default=RESULTS)
    ap.add_argument("--no-load", action="store_true", help="skip the checkpoint-loading section")
    ap.add_argument("--only-load", action="store_true", help="run only the loading section; update its JSON key")
    ap.add_argument("--child", nargs=2, metavar=("SHAPE", "LAYERS"), help=argparse.SUPPRESS)
    ap.add_argument("--load-child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(plan_child(args.child[0], int(args.child[1]))))
        return
    if args.load_child:
        mode, ckpt, rank, world, init = args.load_child
        print(json.dumps(load_child(mode, ckpt, int(rank), int(world), init)))
        return
    if args.only_load:  # rerun the loading section alone; the planning results in the JSON stay as they are
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            loading = load_section(tmp)
        print("\n".join(load_lines(loading)))
        doc = {}
        if os.path.isfile(args.json):
            with open(args.json) as f:
                doc = json.load(f)
        doc["loading"] = loading
        doc["loading_load_average"] = os.getloadavg()[0]
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        print(f"wrote the loading section of {args.json}")
        return

    growth_layers = [2, 4] if args.quick else [8, 16, 32]
    configs = [("8B", n) for n in growth_layers] + ([] if args.quick else [("70B", 80)])
    rows = []
    for shape, layers in configs:
        r = run_child(shape, layers)
        target = TARGETS_S.get((shape, layers))
        r["target_s"] = target
        met = target is not None and r["s2ft_wall_s"] <= target and r["peak_rss_mb"] <= TARGET_RSS_MB
        r["meets_target"] = met if target is not None else None
        rows.append(r)
        print(f"  {shape} x{layers}: s2ft() {r['s2ft_wall_s']:.2f} s", file=sys.stderr)

    head = ("shape", "layers", "trace s", "analyze s", "plan s", "sum s", "s2ft() s", "cpu s", "peak RSS MB", "target")
    lines = ["  ".join(f"{h:>11}" for h in head)]
    for r in rows:
        tgt = "" if r["target_s"] is None else f"<= {r['target_s']:g} s: {'met' if r['meets_target'] else 'MISSED'}"
        cells = (r["shape"], r["layers"], f"{r['trace_wall_s']:.2f}", f"{r['analyze_wall_s']:.2f}",
                 f"{r['plan_wall_s']:.2f}", f"{r['phases_wall_s']:.2f}", f"{r['s2ft_wall_s']:.2f}",
                 f"{r['s2ft_cpu_s']:.2f}", f"{r['peak_rss_mb']:.0f}", tgt)
        lines.append("  ".join(f"{c!s:>11}" for c in cells))
    grown = [r for r in rows if r["shape"] == "8B"]
    xs = [float(r["layers"]) for r in grown]
    growth = {k: slope(xs, [r[f"{k}_wall_s"] for r in grown]) for k in ("trace", "analyze", "plan")}
    growth["total"] = slope(xs, [r["phases_wall_s"] for r in grown])
    growth_cpu = {k: slope(xs, [r[f"{k}_cpu_s"] for r in grown]) for k in ("trace", "analyze", "plan")}
    lines.append(
        "per-layer growth (8B shape, least squares over " + "/".join(str(int(x)) for x in xs) + " layers): "
        + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in growth.items())
        + " wall; " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in growth_cpu.items()) + " CPU"
    )
    loading = None
    if not args.quick and not args.no_load:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            loading = load_section(tmp)
        lines += load_lines(loading)
    load = os.getloadavg()[0]
    lines.append(f"load average at the end: {load:.1f} on {os.cpu_count()} cores")
    print("\n".join(lines))
    if not args.quick:
        os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"planning": rows, "per_layer_growth_s": growth, "per_layer_growth_cpu_s": growth_cpu,
                       "loading": loading, "load_average": load, "cpu_count": os.cpu_count()}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
