"""Small real models shared by the tests: transformers configs with random weights, a CNN, an MLP,
and a random-architecture generator for property tests. Imported by path (tests are not a package)."""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*token_id.*")


def output_tensor(y):
    """The tensor a model's output stands for: transformers' logits or last hidden state, else itself."""
    for name in ("logits", "last_hidden_state"):
        if hasattr(y, name):
            return getattr(y, name)
    return y


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: the relative error every equivalence test states its tolerance in."""
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def random_perm(n: int, g: torch.Generator) -> torch.Tensor:
    """A random permutation of ``n`` units that moves something (the identity tests nothing) when ``n > 1``."""
    if n < 2:
        return torch.arange(n)
    while True:
        p = torch.randperm(n, generator=g)
        if not torch.equal(p, torch.arange(n)):
            return p


def check_groups_are_symmetries(model, inputs, report, grad_input=None, seed=0, tol=1e-5):
    """Permute each reported group at random in a copy of ``model``: the output (and, where ``grad_input`` is
    given, the input gradient it computes; not for ``hidden``) must stay within ``tol`` relative error (1e-5 fits
    fp32; a wrong permutation errs at O(1))."""
    from sparsify_fx.passes import permute

    model.eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ref = output_tensor(model(*inputs))
    for grp in report.groups:
        m2 = copy.deepcopy(model)
        permute(m2, grp, random_perm(grp.num_units, g))
        with torch.no_grad():
            out = output_tensor(m2(*inputs))
        assert rel_err(out, ref) <= tol, f"{grp.name} ({grp.kind}) changed the output: {rel_err(out, ref):.2e}"
        if grad_input is not None and grp.kind != "hidden":
            ga, gb = grad_input(model), grad_input(m2)
            assert rel_err(gb, ga) <= tol, f"{grp.name} changed the input gradient"


def ops_in_graph(model: nn.Module, inputs: tuple) -> set[str]:
    """ATen packet names the exported graph calls: a test of a rule must reach that rule."""
    from sparsify_fx.frontend.trace import trace

    tg = trace(model, inputs)
    return {
        n.target.overloadpacket.__name__
        for n in tg.graph.nodes
        if n.op == "call_function" and hasattr(n.target, "overloadpacket")
    }


def analyse_float64(model: nn.Module, inputs: tuple, *ops: str, tol: float = 1e-9):
    """Analyse ``model`` in float64 (in place) after checking that the graph reaches the rules under test (``ops``);
    no op may lack a rule, and every group, permuted at random, must leave the outputs within ``tol`` (float64: a
    wrong permutation errs at O(1)). Returns ``(model, inputs, report)`` in float64."""
    import sparsify_fx

    model = model.double().eval()
    inputs = tuple(x.double() if x.is_floating_point() else x for x in inputs)
    if ops:
        present = ops_in_graph(model, inputs)
        for op in ops:
            assert op in present, f"aten.{op} is not in the exported graph: the test misses its rule"
    rep = sparsify_fx.analyze(model, inputs)
    assert not rep.unruled_ops, rep.unruled_ops
    check_groups_are_symmetries(model, inputs, rep, tol=tol)
    return model, inputs, rep


def kinds_of(rep, fqn: str, dim: int) -> set[str]:
    """The kinds of the groups ``(fqn, dim)`` is a member of."""
    return {g.kind for g in rep.groups for m in g.members if (m.fqn, m.dim) == (fqn, dim)}


def load_catalog():
    """``benchmarks/catalog.py`` as a module (benchmarks are scripts, not a package), loaded once per process."""
    import importlib.util
    import sys
    from pathlib import Path

    name = "sparsify_catalog"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "benchmarks" / "catalog.py"
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod  # dataclasses look their module up while the class is made
        spec.loader.exec_module(mod)
    return sys.modules[name]


def llama(layers: int = 2, heads: int = 4, kv_heads: int = 2, hidden: int = 64, inter: int = 128, vocab: int = 128):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(cfg)


def mistral(layers: int = 2, heads: int = 4, kv_heads: int = 1, hidden: int = 64, inter: int = 128, vocab: int = 128):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        max_position_embeddings=128,
        sliding_window=None,
    )
    return MistralForCausalLM(cfg)


def falcon(layers: int = 2, heads: int = 4, hidden: int = 64, vocab: int = 128):
    """Falcon's default architecture: multi-query attention in one fused query_key_value, rotary, parallel MLP."""
    from transformers import FalconConfig, FalconForCausalLM

    cfg = FalconConfig(vocab_size=vocab, num_hidden_layers=layers, num_attention_heads=heads, hidden_size=hidden)
    return FalconForCausalLM(cfg)


def gpt2(layers: int = 2, heads: int = 4, hidden: int = 64, vocab: int = 128):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=128, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(cfg)


def bert(layers: int = 2, heads: int = 4, hidden: int = 64, inter: int = 128, vocab: int = 128):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=inter,
        vocab_size=vocab,
        max_position_embeddings=128,
    )
    return BertModel(cfg)


def albert(layers: int = 2, heads: int = 4, embedding: int = 32, hidden: int = 64, inter: int = 128, vocab: int = 128):
    """Factorised embeddings: a LayerNorm-ed ``embedding``-wide space mapped to the ``hidden`` stream by a linear."""
    from transformers import AlbertConfig, AlbertModel

    cfg = AlbertConfig(vocab_size=vocab, embedding_size=embedding, hidden_size=hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, intermediate_size=inter)
    return AlbertModel(cfg)


def check_adapter_round_trip(served: nn.Module, adapter, inputs: tuple, expected: torch.Tensor,
                             tol: float = 1e-5) -> None:
    """Apply ``adapter`` to ``served``: its output (in fp32) is ``expected`` within ``tol`` relative error; remove
    it: every ``state_dict`` entry of ``served`` is bit for bit what it was before."""
    import sparsify_fx

    before = {k: v.detach().clone() for k, v in served.state_dict().items()}
    sparsify_fx.apply_adapter(served, adapter)
    with torch.no_grad():
        assert rel_err(output_tensor(served(*inputs)).float(), expected) <= tol
    sparsify_fx.remove_adapter(served, adapter)
    after = served.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


class CatTrainable(nn.Module):
    """S²FT written in plain PyTorch: trainable columns 8:12 of ``w2`` concatenated with its frozen rest (the
    partial training the ``"sparsify"`` backend's rewrites fire on)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(32, 16, generator=g) / 4, requires_grad=False)
        self.w2 = nn.Parameter(torch.randn(24, 32, generator=g) / 6, requires_grad=False)
        self.block = nn.Parameter(self.w2.data[:, 8:12].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(F.linear(x, self.w1))
        return F.linear(h, torch.cat([self.w2[:, :8], self.block, self.w2[:, 12:]], dim=1))


class SmallCNN(nn.Module):
    """conv -> BatchNorm -> ReLU -> conv -> BatchNorm -> ReLU -> pool -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class MLP(nn.Module):
    def __init__(self, d_in: int = 12, widths: tuple[int, ...] = (32, 24), d_out: int = 5) -> None:
        super().__init__()
        dims = [d_in, *widths, d_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return x


def randomize_norm_stats(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so a wrong permutation of them would show."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g))


# ---------------------------------------------------------------------- random architectures
@dataclass(frozen=True)
class ArchSpec:
    depth: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    fused_qkv: bool
    gated: bool
    bias: bool
    residual: bool
    norm: str  # "layer" | "rms" | "none"
    attention: str  # "sdpa" | "matmul"
    rope: bool
    gqa_style: str  # "repeat_interleave" | "expand" | "sdpa"
    act: str
    embed: bool
    causal: bool


class RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(d) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


class Block(nn.Module):
    def __init__(self, s: ArchSpec) -> None:
        super().__init__()
        self.s = s
        qd, kvd = s.heads * s.head_dim, s.kv_heads * s.head_dim
        if s.fused_qkv:
            self.qkv = nn.Linear(s.hidden, qd + 2 * kvd, bias=s.bias)
        else:
            self.q = nn.Linear(s.hidden, qd, bias=s.bias)
            self.k = nn.Linear(s.hidden, kvd, bias=s.bias)
            self.v = nn.Linear(s.hidden, kvd, bias=s.bias)
        self.o = nn.Linear(qd, s.hidden, bias=s.bias)
        self.up = nn.Linear(s.hidden, s.ffn, bias=s.bias)
        if s.gated:
            self.gate = nn.Linear(s.hidden, s.ffn, bias=s.bias)
        self.down = nn.Linear(s.ffn, s.hidden, bias=s.bias)
        norm = {"layer": lambda: nn.LayerNorm(s.hidden), "rms": lambda: RMSNorm(s.hidden), "none": nn.Identity}
        self.n1, self.n2 = norm[s.norm](), norm[s.norm]()
        if s.norm == "layer":
            for n in (self.n1, self.n2):
                n.weight.data.uniform_(0.5, 1.5)
                n.bias.data.normal_()

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None) -> torch.Tensor:
        s = self.s
        b, t, _ = x.shape
        h = self.n1(x)
        if s.fused_qkv:
            qd, kvd = s.heads * s.head_dim, s.kv_heads * s.head_dim
            q, k, v = self.qkv(h).split([qd, kvd, kvd], dim=-1)
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        q = q.view(b, t, s.heads, s.head_dim).transpose(1, 2)
        k = k.view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        v = v.view(b, t, s.kv_heads, s.head_dim).transpose(1, 2)
        if cos is not None:
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        g = s.heads // s.kv_heads
        if g > 1 and not (s.gqa_style == "sdpa" and s.attention == "sdpa"):
            if s.gqa_style == "expand":
                k = k[:, :, None].expand(b, s.kv_heads, g, t, s.head_dim).reshape(b, s.heads, t, s.head_dim)
                v = v[:, :, None].expand(b, s.kv_heads, g, t, s.head_dim).reshape(b, s.heads, t, s.head_dim)
            else:
                k = k.repeat_interleave(g, dim=1)
                v = v.repeat_interleave(g, dim=1)
        if s.attention == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=s.causal, enable_gqa=g > 1)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(s.head_dim)
            if s.causal:
                mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
                scores = scores.masked_fill(~mask, float("-inf"))
            a = scores.softmax(-1) @ v
        a = self.o(a.transpose(1, 2).reshape(b, t, s.heads * s.head_dim))
        x = x + a if s.residual else a
        h = self.n2(x)
        act = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[s.act]
        f = act(self.gate(h)) * self.up(h) if s.gated else act(self.up(h))
        f = self.down(f)
        return x + f if s.residual else f


class RandomTransformer(nn.Module):
    def __init__(self, s: ArchSpec, vocab: int = 20, d_in: int = 6, d_out: int = 7) -> None:
        super().__init__()
        self.s = s
        self.inp = nn.Embedding(vocab, s.hidden) if s.embed else nn.Linear(d_in, s.hidden)
        self.blocks = nn.ModuleList(Block(s) for _ in range(s.depth))
        self.head = nn.Linear(s.hidden, d_out)
        if s.rope:
            self.register_buffer("inv_freq", 1.0 / (100.0 ** (torch.arange(0, s.head_dim, 2).float() / s.head_dim)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        cos = sin = None
        if self.s.rope:
            pos = torch.arange(h.shape[1], device=h.device).float()
            freqs = pos[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos(), emb.sin()
        for blk in self.blocks:
            h = blk(h, cos, sin)
        return self.head(h)

    def example_input(self, batch: int = 2, seq: int = 5, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if self.s.embed:
            return torch.randint(0, 20, (batch, seq), generator=g)
        return torch.randn(batch, seq, 6, generator=g)
