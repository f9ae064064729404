"""Catalog sweep: every model type transformers registers, built small, through analyze / permute / s2ft / prune.

Per model type: build the config's defaults shrunk to a tiny size (hidden 64, 2 layers, 4 heads, vocab 256,
32x32 images), random weights, one eager forward on generated inputs, then

- ``sparsify_fx.analyze``: groups, pinned spaces and their reasons, ops without a rule;
- every group permuted at random with ``sparsify_fx.permute`` on a float64 copy: an output that moves is a
  *broken group* (a soundness bug in the analysis);
- ``sparsify_fx.s2ft`` with the default config, then one forward + backward;
- ``sparsify_fx.prune`` with ratio 0.25, then one forward.

Each model runs in a forked child with a wall-clock and an address-space cap; the results go to
``benchmarks/results/catalog.json`` and ``catalog.md`` (rewritten after every model, so a killed sweep keeps
what it finished; ``--resume`` continues it)::

    .venv/bin/python benchmarks/catalog.py                        # every type, 2 at a time
    .venv/bin/python benchmarks/catalog.py --only llama,gpt2 --jobs 1
    .venv/bin/python benchmarks/catalog.py --limit 50 --resume --timeout 120 --mem-gb 4
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import enum
import inspect
import json
import math
import multiprocessing as mp
import os
import re
import resource
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

RESULTS = Path(__file__).resolve().parent / "results"

# ---------------------------------------------------------------------- shrinking a config
HIDDEN, INTER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 64, 128, 2, 4, 2, 16
VOCAB, POSITIONS, IMAGE, PATCH, SEQ, BATCH = 256, 128, 32, 8, 8, 2

# The usual spellings of each size field; a field is set only where the default config has it.
GENERIC: dict[str, Any] = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "dim", "word_embed_proj_dim", "embedding_size"), HIDDEN),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "d_ff", "encoder_ffn_dim", "decoder_ffn_dim",
                     "hidden_dim", "n_inner", "ffn_hidden_size", "mlp_dim"), INTER),
    **dict.fromkeys(("moe_intermediate_size", "expert_intermediate_size"), INTER // 2),
    "shared_expert_intermediate_size": INTER,
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers", "encoder_layers", "decoder_layers",
                     "num_decoder_layers", "num_encoder_layers"), LAYERS),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "num_heads"), HEADS),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "n_kv_heads"), KV_HEADS),
    "head_dim": HEAD_DIM,
    **dict.fromkeys(("vocab_size", "n_vocab"), VOCAB),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx"), POSITIONS),
    "image_size": IMAGE,
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk", "top_k"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts"), 1),
    "first_k_dense_replace": 1,
    "max_source_positions": 16,  # Whisper-style encoders expect exactly 2 * max_source_positions frames
    "max_target_positions": POSITIONS,
}
# fields that name one layer of the stack by index (MiniCPM-V's vision merger goes after layer 6 of 27)
LAYER_INDEX_FIELDS = ("insert_layer_id",)

# Per-family corrections where the generic fields do not give a runnable small model.
OVERRIDES: dict[str, dict[str, Any]] = {
    "swin": {"embed_dim": 16, "depths": [1, 1], "num_heads": [2, 4], "window_size": 4, "patch_size": 4},
    "swinv2": {"embed_dim": 16, "depths": [1, 1], "num_heads": [2, 4], "window_size": 4, "patch_size": 4},
    "donut-swin": {"embed_dim": 16, "depths": [1, 1], "num_heads": [2, 4], "window_size": 4, "patch_size": 4},
    "convnext": {"hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2},
    "convnextv2": {"hidden_sizes": [16, 32], "depths": [1, 1], "num_stages": 2},
    "resnet": {"hidden_sizes": [16, 32], "depths": [1, 1], "embedding_size": 16},
    "mamba2": {"num_heads": 8},  # num_heads * head_dim must equal hidden_size * expand
    "qwen3_asr_encoder": {"output_dim": HIDDEN},  # the audio encoder projects into the (shrunk) text width
    # a Q-Former's cross-attention reads its encoder's width (1408 by default: BLIP-2's vision tower; Granite
    # Speech's conformer, whose width generic shrinking sets to 128 as an FFN-named "hidden_dim")
    "blip_2_qformer": {"encoder_hidden_size": HIDDEN},
    "granite_speech_encoder": {"hidden_dim": HIDDEN},
    "granite_speech_plus_encoder": {"hidden_dim": HIDDEN},
    # the grouped output projection reshapes the heads into o_groups blocks: 8 groups of 4 shrunk heads cut every
    # head in half (the reshape does not factor, heads pinned); 2 groups of 2 heads is the real model's layout.
    # The low ranks and indexer are 1024/64/128 by default, far above the shrunk hidden size
    "deepseek_v4": {"o_groups": 2, "o_lora_rank": 16, "q_lora_rank": 32, "index_n_heads": 4, "index_head_dim": 16},
    # a 512-token window pads the 8 sampled tokens to 512 in one chunk; a window of 4 runs the overlapping chunks
    "led": {"attention_window": 4},
    # to_dict lists each layer as (attention, "mlp") blocks with doubled counts, which the generic cut halves wrongly:
    # one input, one recurrent and one output layer, given in the constructor's own form
    "dory": {"num_hidden_layers": 3, "layer_types": ["sliding_attention", "sliding_attention", "full_attention"],
             "n_input_layers": 1, "n_recurrent_layers": 1, "n_output_layers": 1},
    # MiniCPM-o defaults to "4x" image tokens, which skips its vision tower's window-attention merger; "16x" (the
    # other mode its forward takes, MiniCPM-V 4.6's default) runs it, so that its heads are analysed too
    "minicpm_ocr": {"downsample_mode": "16x"},
    # the sliding layers have their own head fields (48 x 128 by default), and the relative bias a 1024-wide table
    "inkling2_text": {"swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16,
                      "rel_extent": 16, "sliding_window_size": 16},
    # as inkling2_text, with the looped layers (6..18 by default) inside the shrunk stack: layers 2-3 run twice
    "inkling2_loop_text": {"swa_num_attention_heads": 4, "swa_num_key_value_heads": 2, "swa_head_dim": 16,
                           "rel_extent": 16, "sliding_window_size": 16, "num_hidden_layers": 4,
                           "layer_types": ["hybrid_sliding", "hybrid", "hybrid_sliding", "hybrid"],
                           "n_layers_per_attn_res_block": 2, "loop_layer_index_start": 2, "loop_layer_index_end": 4,
                           "loop_num_passes": 2, "loop_gate_rank": 8},
}


class Outcome(str, enum.Enum):
    """What happened to one step of one model."""

    OK = "ok"
    NOOP = "removed nothing"
    ERROR = "error"
    SKIPPED = "skipped"
    TIMEOUT = "timeout"


def shrink_kwargs(config: Any) -> dict[str, Any]:
    """Keyword overrides that make ``config`` (a default ``PretrainedConfig``) tiny; recurses into sub-configs.

    Args:
        config: a config instance with its defaults, e.g. ``LlamaConfig()``.

    Example::

        kw = shrink_kwargs(LlamaConfig())   # {'hidden_size': 64, 'num_hidden_layers': 2, ...}
        small = LlamaConfig(**kw)
    """
    present = config.to_dict()
    kw: dict[str, Any] = {}
    for key, value in GENERIC.items():
        old = present.get(key)
        # only plain ints are sizes; lists are per-stage (hierarchical vision models keep theirs)
        if isinstance(old, int) and not isinstance(old, bool) and old > 0:
            kw[key] = min(value, old) if key in ("num_experts_per_tok", "moe_topk", "top_k") else value
    if isinstance(present.get("patch_size"), int):
        kw["patch_size"] = min(PATCH, present["patch_size"])
    if isinstance(present.get("depths"), list):  # one block per stage, same number of stages
        kw["depths"] = [1] * len(present["depths"])
    heads = next((present[k] for k in ("num_attention_heads", "n_head", "n_heads") if isinstance(present.get(k), int)),
                 None)
    for key in ("num_key_value_heads", "num_kv_heads", "n_kv_heads"):  # MQA stays MQA, MHA stays MHA
        if present.get(key) == 1:
            kw[key] = 1
        elif key in kw and present.get(key) == heads:
            kw[key] = HEADS
    if isinstance(present.get("rotary_dim"), int):  # partial rotary within the shrunk head
        kw["rotary_dim"] = min(present["rotary_dim"], HEAD_DIM)
    # a layer named by index must lie inside the shrunk stack, or it never runs; a composite config names it too
    # (MiniCPM-V copies its own insert_layer_id into the vision config), beside sub-configs shrunk to LAYERS
    layers = kw.get("num_hidden_layers", LAYERS)
    for key in LAYER_INDEX_FIELDS:
        if isinstance(layers, int) and isinstance(present.get(key), int) and present[key] >= layers:
            kw[key] = layers - 1
    if isinstance(present.get("layer_types"), list) and len(present["layer_types"]) > LAYERS:
        # hybrid stacks list every layer explicitly: keep the first ones, but with every kind of layer the full
        # stack has (OLMo-Hybrid's first layers are all linear attention, and its config refuses a stack without
        # a full-attention layer); a kind that does not fit replaces a repeated one, or adds a layer
        kinds = list(dict.fromkeys(map(str, present["layer_types"])))
        keep = list(present["layer_types"][:LAYERS])
        for kind in (k for k in kinds if k not in map(str, keep)):
            repeated = [i for i, t in enumerate(keep) if list(map(str, keep)).count(str(t)) > 1]
            if repeated:
                keep[repeated[-1]] = next(t for t in present["layer_types"] if str(t) == kind)
            else:
                keep.append(next(t for t in present["layer_types"] if str(t) == kind))
        kw["layer_types"] = keep
        for key in ("num_hidden_layers", "n_layer", "n_layers", "num_layers"):
            if key in kw:
                kw[key] = len(keep)
    vocab = kw.get("vocab_size", present.get("vocab_size"))
    if isinstance(vocab, int):
        for key, value in present.items():  # special token ids must index the shrunk vocabulary
            if key.endswith("token_id") and isinstance(value, int) and value >= vocab:
                kw[key] = vocab - 1
            elif key.endswith("token_id") and isinstance(value, list):
                kw[key] = [min(v, vocab - 1) if isinstance(v, int) else v for v in value]
    kw.update(OVERRIDES.get(getattr(config, "model_type", ""), {}))
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            kw[name] = {**shrink_kwargs(sub), "model_type": getattr(sub, "model_type", "")}
            if not kw[name]["model_type"]:
                del kw[name]["model_type"]
    return kw


def small_config(model_type: str) -> Any:
    """The default config of ``model_type``, shrunk with :func:`shrink_kwargs`.

    Args:
        model_type: a key of ``CONFIG_MAPPING_NAMES``, e.g. ``"llama"``.

    Example::

        cfg = small_config("qwen2_moe")
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    return cls(**shrink_kwargs(cls()))


# ---------------------------------------------------------------------- building and inputs
def _model_class(model_type: str) -> type[nn.Module] | None:
    from transformers.models.auto import modeling_auto as ma

    # the base model first: what AutoModel builds, as a user would
    for mapping in ("MODEL_MAPPING", "MODEL_FOR_CAUSAL_LM_MAPPING", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING",
                    "MODEL_FOR_MASKED_LM_MAPPING", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING"):
        names = getattr(ma, mapping + "_NAMES", {})
        if model_type in names:
            name = names[model_type]
            name = name[0] if isinstance(name, list | tuple) else name
            return getattr(__import__("transformers"), name, None)
    return None


def waveform_length(config: Any) -> int:
    """Samples of raw audio that give a wav2vec2-style encoder enough frames to train on.

    In train mode these models mask spans of ``mask_time_length`` frames (SpecAugment) and refuse a sequence that
    is not longer; the conv feature extractor divides the length by the product of its strides, and SEW-style
    models squeeze the frames again. Twice the span plus two frames, after all of that, leaves room.

    Args:
        config: the model's config (``conv_stride``, ``mask_time_length``, ``squeeze_factor`` where it has them).

    Example::

        waveform_length(Wav2Vec2Config())   # 7680 samples: 23 frames after the 320x feature extractor
    """
    strides = getattr(config, "conv_stride", None)
    stride = math.prod(strides) if isinstance(strides, list | tuple) and strides else 320
    span = getattr(config, "mask_time_length", None)
    span = span if isinstance(span, int) and span > 0 else 10
    squeeze = getattr(config, "squeeze_factor", None)
    squeeze = squeeze if isinstance(squeeze, int) and squeeze > 0 else 1
    return stride * ((2 * span + 2) * squeeze + 2)


FEATURE_INPUTS = ("pixel_values", "input_features", "input_values")


def feature_tensor(name: str, config: Any, g: torch.Generator | None = None) -> torch.Tensor:
    """A generated batch for one of the :data:`FEATURE_INPUTS`, sized from ``config``.

    Args:
        name: ``"pixel_values"`` (images), ``"input_features"`` (mel spectrogram frames) or ``"input_values"``
            (a raw waveform, or AST-style spectrogram frames where the config has ``num_mel_bins``).
        config: the config of the model (or tower) that reads it; images use its ``vision_config`` where it has one.
        g: the random generator (a fixed seed if omitted).

    Example::

        x = feature_tensor("input_features", WhisperConfig())   # [2, 80, 3000]
    """
    g = g if g is not None else torch.Generator().manual_seed(1)
    if name == "pixel_values":
        vision = getattr(config, "vision_config", None) or config
        image = getattr(vision, "image_size", IMAGE)
        image = image if isinstance(image, int) else IMAGE
        channels = getattr(vision, "num_channels", 3)
        channels = channels if isinstance(channels, int) else 3
        return torch.randn(BATCH, channels, image, image, generator=g)
    if name == "input_features":
        bins = getattr(config, "num_mel_bins", None) or getattr(config, "feature_size", None)
        frames = 2 * getattr(config, "max_source_positions", 16)
        window = getattr(config, "n_window", None)
        if isinstance(window, int) and window > 0:  # Qwen-omni-style encoders cut the frames in 2 * n_window chunks
            frames = -(-frames // (2 * window)) * 2 * window
        if isinstance(getattr(config, "input_dim", None), int):
            # conformer encoders (Granite Speech) name the feature width input_dim and read [batch, frames, width]
            return torch.randn(BATCH, frames, config.input_dim, generator=g)
        return torch.randn(BATCH, bins or 80, frames, generator=g)
    if name == "input_values" and isinstance(getattr(config, "num_mel_bins", None), int):
        # spectrogram transformers (AST-style) take [batch, frames, mel bins]
        frames = getattr(config, "max_length", None) or 64
        return torch.randn(BATCH, frames, config.num_mel_bins, generator=g)
    if name == "input_values":  # raw waveform
        return torch.randn(BATCH, waveform_length(config), generator=g)
    raise ValueError(f"no generator for input {name!r}; generated inputs are {FEATURE_INPUTS} and token ids")


def make_inputs(model: nn.Module, config: Any) -> dict[str, torch.Tensor]:
    """Generated inputs for ``model``'s ``main_input_name`` (token ids, pixel values, audio features).

    Args:
        model: a transformers model.
        config: its config.

    Example::

        model(**make_inputs(model, model.config))
    """
    g = torch.Generator().manual_seed(1)
    main = getattr(model, "main_input_name", "input_ids")
    text = getattr(config, "text_config", None) or config
    vocab = getattr(text, "vocab_size", None) or VOCAB
    params = inspect.signature(model.forward).parameters
    ids = torch.randint(3, max(4, min(vocab, VOCAB)), (BATCH, SEQ), generator=g)
    inputs: dict[str, torch.Tensor] = {}
    inputs[main] = feature_tensor(main, config, g) if main in FEATURE_INPUTS else ids
    if "decoder_input_ids" in params and main != "decoder_input_ids":
        inputs["decoder_input_ids"] = ids
    if main == "input_ids" and "pixel_values" in params and getattr(config, "vision_config", None) is not None:
        inputs["pixel_values"] = feature_tensor("pixel_values", config, g)
    return inputs


def build(model_type: str, seed: int = 0, config: Any = None) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A tiny random-weight ``model_type`` model in eval mode and inputs it runs on.

    Args:
        model_type: a key of ``CONFIG_MAPPING_NAMES``.
        seed: ``torch.manual_seed`` before the weights are drawn (same seed, same weights).
        config: the config to build from (default: :func:`small_config` of ``model_type``).

    Example::

        model, inputs = build("llama"); model(**inputs)
    """
    cls = _model_class(model_type)
    if cls is None:
        raise LookupError(f"no model class registered for {model_type!r}")
    cfg = config if config is not None else small_config(model_type)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    return model, make_inputs(model, cfg)


def float_outputs(out: Any) -> list[torch.Tensor]:
    """Every floating tensor in a model output (ModelOutput, tuple, dict), depth first."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for v in out.values() for t in float_outputs(v)]
    if isinstance(out, list | tuple):
        return [t for v in out for t in float_outputs(v)]
    return []


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    a, b = a.double(), b.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return 0.0 if torch.equal(a.nan_to_num(), b.nan_to_num()) else math.inf
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    if len(a) != len(b):
        return math.inf
    return max((_rel(x, y) for x, y in zip(a, b)), default=0.0)


# ---------------------------------------------------------------------- layer coverage
_ATTN = re.compile(r"Attention", re.I)
_ATTN_WRAPPER = re.compile(r"(Layer|Block|Stage|Encoder|Decoder|Model)$")
_FFN = re.compile(r"MLP|FeedForward|FFN|FF$|Intermediate|Experts?$|MoE|Moe|DenseActDense|DenseGatedActDense", re.I)


# the family prefix of a model's classes: "Qwen2MoeModel" -> "Qwen2Moe", "JetMoeForCausalLM" -> "JetMoe"
_FAMILY = re.compile(r"^(\w+?)(Model|LMHeadModel|For[A-Z]\w*|Encoder|Decoder)$")


def _family(model: nn.Module) -> str:
    m = _FAMILY.match(type(model).__name__)
    return m.group(1) if m else ""


def _outermost(model: nn.Module, pattern: re.Pattern, exclude: re.Pattern | None = None,
               inside: list[str] | None = None) -> list[str]:
    """FQNs of the outermost modules whose class name matches and that hold a 2-D+ parameter. The family prefix
    is not part of the name matched: every class of NLLB-MoE starts "NllbMoe", which says nothing about the module
    (its word embedding and its decoder layers are no FFN)."""
    found: list[str] = []
    family = _family(model)
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if family and cls.startswith(family) and len(cls) > len(family):
            cls = cls[len(family):]
        if not name or not pattern.search(cls) or (exclude is not None and exclude.search(cls)):
            continue
        if any(name.startswith(p + ".") for p in found + (inside or [])):
            continue
        if any(p.dim() >= 2 for p in mod.parameters()):
            found.append(name)
    return found


class ModuleKind(str, enum.Enum):
    """The two kinds of module the coverage metric counts."""

    ATTENTION = "attention"
    FFN = "ffn"


_GROUP_KINDS = {ModuleKind.ATTENTION: {"attention_heads", "kv_heads"}, ModuleKind.FFN: {"ffn_channels"}}
# reshapes that can split a feature dim into (heads, head_dim); one whose output has more dims than its input does
_RESHAPES = {"aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.unflatten.int"}


@dataclass
class ModuleCoverage:
    """One attention or FFN module of the coverage metric, as one analysed graph saw it."""

    fqn: str
    kind: ModuleKind
    covered: bool  # a head group (attention) or FFN-channel group (FFN) has a member among its parameters
    reached: bool = True  # the analysed graph reads at least one of its parameters
    headless: bool = False  # attention whose traced ops split no tensor into more dims: no heads to group
    tower: str = ""  # the submodule analysed on its own that gave this entry ("" : the model's own graph)


def coverage_modules(model: nn.Module) -> list[tuple[str, ModuleKind]]:
    """The attention and FFN modules the coverage metric counts, outermost first, by class name.

    Attention modules are the outermost modules named ``*Attention*`` (not ``*Layer``/``*Block``); FFN modules
    the outermost ``*MLP*``/``*FeedForward*``/``*Intermediate``/``*Experts``/``*MoE*`` modules outside them; each
    holds a parameter of 2 or more dims.

    Args:
        model: a model.

    Example::

        coverage_modules(model)   # [('layers.0.self_attn', ModuleKind.ATTENTION), ...]
    """
    attn = _outermost(model, _ATTN, _ATTN_WRAPPER)
    ffn = _outermost(model, _FFN, inside=attn)
    return [(a, ModuleKind.ATTENTION) for a in attn] + [(f, ModuleKind.FFN) for f in ffn]


def read_parameters(tg: Any) -> set[str]:
    """FQNs of the parameters and buffers a traced graph reads (placeholders with users; tied names count too)."""
    read = {fqn for fqn, node in tg.state_nodes().items() if node.users}
    for names in tg.tied:
        if read.intersection(names):
            read.update(names)
    return read


def _scope_nodes(tg: Any, fqn: str) -> list[Any]:
    out = []
    for n in tg.graph.nodes:
        stack = n.meta.get("nn_module_stack") or {}
        if any(path == fqn or path.startswith(fqn + ".") for path, _ in stack.values()):
            out.append(n)
    return out


def _splits_a_dim(node: Any) -> bool:
    if str(node.target) not in _RESHAPES or not node.args or not hasattr(node.args[0], "meta"):
        return False
    src, out = node.args[0].meta.get("val"), node.meta.get("val")
    return isinstance(src, torch.Tensor) and isinstance(out, torch.Tensor) and out.dim() > src.dim()


def assess_modules(model: nn.Module, modules: list[tuple[str, ModuleKind]], report: Any,
                   tg: Any = None) -> list[ModuleCoverage]:
    """Coverage of each of ``modules`` in one analysed graph.

    A module is *covered* when a group of its kind has a member among its parameters; an FFN module whose weights
    are all convolutions (dims >= 3) is covered by a ``conv_channels`` group as well, the unit S²FT trains and
    prune removes there. With the traced graph, a module none of whose parameters the graph reads is *not reached*,
    and an attention module whose traced ops never reshape a tensor into more dims (no split of its features into
    heads, e.g. SwiftFormer's additive attention, GroupViT's assign attention) is *headless*.

    Args:
        model: the analysed model.
        modules: ``(fqn, kind)`` pairs, e.g. from :func:`coverage_modules`.
        report: the model's ``CouplingReport``.
        tg: its ``TracedGraph``; without it every module counts as reached and none as headless.

    Example::

        assess_modules(model, coverage_modules(model), report, tg)
    """
    members: dict[str, set[str]] = collections.defaultdict(set)  # group kind -> member FQNs
    for g in report.groups:
        members[g.kind].update(m.fqn for m in g.members)
    read = read_parameters(tg) if tg is not None else None
    out = []
    for fqn, kind in modules:
        mod = model.get_submodule(fqn)
        params = {f"{fqn}.{n}": p for n, p in mod.named_parameters()}
        kinds = set(_GROUP_KINDS[kind])
        weights = [p for p in params.values() if p.dim() >= 2]
        if kind == ModuleKind.FFN and weights and all(p.dim() >= 3 for p in weights):
            kinds.add("conv_channels")  # a conv FFN (1x1 / kernel convolutions): its channels are conv channels
        covered = any(f in members[k] for k in kinds for f in params)
        reached = read is None or any(f in read for f in params)
        headless = False
        if tg is not None and reached and kind == ModuleKind.ATTENTION:
            scope = _scope_nodes(tg, fqn)
            # no scope found (a graph without module stacks): it counts, as before
            headless = bool(scope) and not any(_splits_a_dim(n) for n in scope)
        out.append(ModuleCoverage(fqn, kind, covered, reached, headless))
    return out


def count_coverage(modules: list[ModuleCoverage]) -> dict[str, list[int]]:
    """``{"attention": [covered, counted], "ffn": [covered, counted]}``; headless attention modules do not count,
    unreached ones count as not covered.

    Args:
        modules: from :func:`assess_modules`.

    Example::

        count_coverage(assess_modules(model, coverage_modules(model), report, tg))   # {'attention': [2, 2], ...}
    """
    out = {}
    for kind in ModuleKind:
        counted = [m for m in modules if m.kind == kind and not m.headless]
        out[kind.value] = [sum(m.covered and m.reached for m in counted), len(counted)]
    return out


def layer_coverage(model: nn.Module, report: Any, tg: Any = None) -> dict[str, list[int]]:
    """Attention / FFN modules with at least one head / FFN-channel group among their parameters.

    See :func:`coverage_modules` for which modules count and :func:`assess_modules` for what covers them.

    Args:
        model: the analysed model.
        report: its ``CouplingReport``.
        tg: its ``TracedGraph`` (optional): unreached modules then count as not covered, headless attention not at
            all.

    Example::

        layer_coverage(model, sparsify_fx.analyze(model, inputs))   # {'attention': [2, 2], 'ffn': [2, 2]}
    """
    return count_coverage(assess_modules(model, coverage_modules(model), report, tg))


# ---------------------------------------------------------------------- towers the generic inputs do not reach
_PLACEHOLDER = re.compile(r"^(image|audio)_token_(id|index)$")
_MODALITY = {"pixel_values": "image", "input_features": "audio", "input_values": "audio"}
_MM_TOKEN_TYPE = {"image": 1}  # the processors' mm_token_type_ids: 0 text, 1 image, 2 video
_SUBCONFIG_WORDS = {"image": ("vision", "image"), "audio": ("audio",)}
_SUBCONFIG_FIELDS = {"image": ("image_size", "num_channels"), "audio": ("num_mel_bins", "feature_size", "input_dim")}


def _analyse(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[Any, Any]:
    """``sparsify_fx.analyze`` that also returns the traced graph (what it reads, its module scopes)."""
    from sparsify_fx.analysis import analyze_graph
    from sparsify_fx.frontend import trace

    was_training = model.training
    model.eval()
    try:
        tg = trace(model, inputs)
    finally:
        model.train(was_training)
    return tg, analyze_graph(tg)


def _special_ids(config: Any) -> set[int]:
    ids: set[int] = set()
    for c in (config, getattr(config, "text_config", None)):
        for key, value in (c.to_dict() if c is not None else {}).items():
            if key.endswith(("token_id", "token_index", "token_ids")):
                ids.update(v for v in (value if isinstance(value, list) else [value]) if isinstance(v, int))
    return ids


def placeholder_config(config: Any) -> tuple[Any, dict[str, int]]:
    """``config`` with every image/audio placeholder token id moved into the shrunk text vocabulary.

    The shrinker clamps token ids only next to a ``vocab_size``; a multimodal config keeps its placeholder ids
    (``audio_token_id`` 151669) at the top level, beside a ``text_config`` of 256 tokens, and some leave them unset.
    Each such id becomes the highest id of the text vocabulary that no other special token uses.

    Args:
        config: a shrunk config, e.g. ``small_config("qwen3_asr")``.

    Returns:
        ``(config or a patched deep copy, {attribute: new id})``.

    Example::

        cfg, moved = placeholder_config(small_config("qwen3_asr"))   # moved == {'audio_token_id': 254}
    """
    text = getattr(config, "text_config", None) or config
    vocab = getattr(text, "vocab_size", None)
    if not isinstance(vocab, int):
        return config, {}
    taken = _special_ids(config)
    moved: dict[str, int] = {}
    for key in sorted(k for k in config.to_dict() if _PLACEHOLDER.match(k)):
        value = getattr(config, key, None)
        if isinstance(value, int) and 0 <= value < vocab:
            continue
        free = next((i for i in range(vocab - 1, 2, -1) if i not in taken), None)
        if free is None:
            continue
        taken.add(free)
        moved[key] = free
    if not moved:
        return config, {}
    patched = copy.deepcopy(config)
    for key, value in moved.items():
        setattr(patched, key, value)
    return patched, moved


def _tower_config(config: Any, modality: str) -> Any:
    subs = [(n, getattr(config, n, None)) for n in getattr(config, "sub_configs", {}) or {}]
    subs = [(n, c) for n, c in subs if c is not None]
    for name, sub in subs:  # audio_config, vision_config, ...
        if any(w in name for w in _SUBCONFIG_WORDS[modality]):
            return sub
    for _, sub in subs:  # else the sub-config that sizes the input (Granite Speech's encoder_config has input_dim)
        if any(isinstance(getattr(sub, f, None), int) for f in _SUBCONFIG_FIELDS[modality]):
            return sub
    return config


def _feature_rows(out: Any) -> int:
    """Rows a ``get_<modality>_features`` result scatters into placeholder positions (all but the last dim)."""
    t = out
    pooled = getattr(out, "pooler_output", None)
    if isinstance(pooled, list | tuple) and pooled and all(isinstance(p, torch.Tensor) for p in pooled):
        # one tensor per image (MiniCPM-V's merger), concatenated before the scatter
        return sum(math.prod(p.shape[:-1]) for p in pooled)
    if not isinstance(t, torch.Tensor):
        for key in ("pooler_output", "last_hidden_state"):
            value = getattr(out, key, None)
            if isinstance(value, torch.Tensor):
                t = value
                break
        else:
            t = next((x for x in float_outputs(out)), None)
    if not isinstance(t, torch.Tensor) or t.dim() < 2:
        raise ValueError(f"cannot count feature rows in a {type(out).__name__}")
    return math.prod(t.shape[:-1])


def with_channel(inputs: dict[str, Any]) -> dict[str, Any] | None:
    """``inputs`` with each raw waveform (a 2-D float tensor, ``[batch, samples]``) given a channel dim,
    ``[batch, 1, samples]`` (what OmniASR and VibeVoice read); None where there is no such waveform."""
    out = dict(inputs)
    for key, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() == 2:
            out[key] = value.unsqueeze(1)
    return out if any(out[k] is not inputs[k] for k in inputs) else None


_STREAM = re.compile(r"^(?!decoder_)(\w+)_input_ids$")
# forward arguments giving each image's patch grid, (rows, cols), for NaViT-packed pixel_values
GRID_ARGS = ("target_sizes",)


def packed_patches(images: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """NaViT-packed patches of a batch of images and each image's patch grid.

    Args:
        images: ``[batch, channels, height, width]``.
        patch: the vision config's ``patch_size``.

    Returns:
        ``(packed, grid)``: ``[1, channels, patch, batch * rows * cols * patch]``, every patch side by side along the
        last dim (image-major, row-major), so a stride-``patch`` convolution reads one patch per column; and the
        ``[batch, 2]`` int32 grid ``(rows, cols)`` per image.

    Example::

        x, sizes = packed_patches(torch.randn(2, 3, 32, 32), 8)   # [1, 3, 8, 256], [[4, 4], [4, 4]]
    """
    if images.dim() != 4 or patch <= 0 or min(images.shape[-2:]) < patch:
        raise ValueError(f"cannot pack images of shape {tuple(images.shape)} into {patch}-pixel patches: pass "
                         "[batch, channels, height, width] with height and width at least the patch size")
    b, c, h, w = images.shape
    rows, cols = h // patch, w // patch
    x = images[:, :, :rows * patch, :cols * patch].reshape(b, c, rows, patch, cols, patch)
    packed = x.permute(1, 3, 0, 2, 4, 5).reshape(1, c, patch, b * rows * cols * patch)
    return packed, torch.tensor([[rows, cols]] * b, dtype=torch.int32)


def combined_inputs(model: nn.Module, config: Any, inputs: dict[str, torch.Tensor],
                    waveform_channel: bool = False) -> tuple[dict[str, Any], str]:
    """Token ids plus every feature input the model's forward also takes, so that its towers run.

    For each of :data:`FEATURE_INPUTS` that ``model.forward`` takes and ``inputs`` lacks: a batch generated by
    :func:`feature_tensor` for the tower's sub-config (``audio_config`` for audio, ``vision_config`` for images),
    and, where the config names a placeholder token for the modality (``audio_token_id``, ``image_token_index``,
    ...), as many placeholder tokens before the text as the model's own ``get_<modality>_features`` returns rows
    (called with all-ones masks where it requires them), so its placeholder check and scatter line up. A second
    token stream the forward takes (``protein_input_ids``) gets ids of its sub-config's vocabulary and an all-ones
    ``<stream>_attention_mask``. A forward that takes a patch grid (:data:`GRID_ARGS`, MiniCPM-V's ``target_sizes``)
    gets its images NaViT-packed (:func:`packed_patches`, also replacing generic ``pixel_values``) with their grid,
    and one that takes ``mm_token_type_ids`` gets the modality label of every token (1 on image placeholders).

    Args:
        model: a multimodal model built from ``config`` (placeholder ids inside the vocabulary: see
            :func:`placeholder_config`).
        config: its config.
        inputs: the generic inputs (``input_ids`` required).
        waveform_channel: give raw waveforms a channel dim (:func:`with_channel`).

    Returns:
        ``(inputs, note)``: the combined inputs and what was added.

    Raises:
        LookupError: the forward takes no feature input besides token ids, or a placeholder's rows cannot be
            counted (no ``get_<modality>_features``).

    Example::

        cfg, _ = placeholder_config(small_config("qwen3_asr")); model = build("qwen3_asr", config=cfg)[0]
        x, note = combined_inputs(model, cfg, {"input_ids": ids}); model(**x)
    """
    params = inspect.signature(model.forward).parameters
    grid = next((a for a in GRID_ARGS if a in params and a not in inputs), None)
    # generic pixel_values without the grid the forward needs to read them (MiniCPM-V) are made again, packed
    wanted = [n for n in FEATURE_INPUTS if n in params and (n not in inputs or (n == "pixel_values" and grid))]
    streams = [n for n in params if _STREAM.match(n) and n not in inputs]
    # a decoder built to sit on an encoder it does not own (TrOCR's) runs its cross-attention only on encoder states
    cross = "encoder_hidden_states" not in inputs and _takes_encoder_states(model)
    if "input_ids" not in inputs or not (wanted or streams or cross):
        raise LookupError("the forward takes no feature input (pixel_values, input_features, input_values), "
                          "second token stream or encoder_hidden_states besides token ids")
    g = torch.Generator().manual_seed(2)
    out: dict[str, Any] = dict(inputs)
    notes = []
    if cross:
        out["encoder_hidden_states"] = _encoder_states(config, g)
        notes.append("encoder_hidden_states")
    for name in streams:
        word = _STREAM.match(name).group(1)
        sub = next((getattr(config, n) for n in getattr(config, "sub_configs", {}) or {}
                    if word in n and getattr(config, n, None) is not None), config)
        vocab = getattr(sub, "vocab_size", None) or VOCAB
        out[name] = torch.randint(3, max(4, min(vocab, VOCAB)), (BATCH, SEQ), generator=g)
        added = [name]
        if f"{word}_attention_mask" in params:
            out[f"{word}_attention_mask"] = torch.ones(BATCH, SEQ, dtype=torch.long)
            added.append(f"{word}_attention_mask")
        notes.append(" + ".join(added))
    placeholders = sorted(k for k in config.to_dict() if _PLACEHOLDER.match(k) and isinstance(getattr(config, k), int))
    prefix: list[torch.Tensor] = []
    kinds: list[str] = []  # the modality of each prefix
    for name in wanted:
        modality = _MODALITY[name]
        x = feature_tensor(name, _tower_config(config, modality), g)
        if waveform_channel and name == "input_values" and x.dim() == 2:
            x = x.unsqueeze(1)
        added = [name]
        if name == "pixel_values" and grid:
            patch = getattr(_tower_config(config, modality), "patch_size", None)
            x, out[grid] = packed_patches(x, patch if isinstance(patch, int) else PATCH)
            added[0] = f"{name} (packed patches)"
            added.append(grid)
        out[name] = x
        key = next((k for k in placeholders if k.startswith(modality)), None)
        if key is not None:
            getter = getattr(model, f"get_{modality}_features", None)
            if getter is None:
                raise LookupError(f"config.{key} names a placeholder token, but the model has no "
                                  f"get_{modality}_features to count the rows it fills")
            accepted = inspect.signature(getter).parameters
            # a mask the counting call requires (AudioFlamingo3's input_features_mask, MOSS's padding_mask) is all
            # ones over the frames; an optional one stays unset (Granite Speech's masks the projected rows instead)
            for arg, spec in accepted.items():
                if arg.endswith("mask") and arg not in added and spec.default is inspect.Parameter.empty:
                    out[arg] = torch.ones(x.shape[0], x.shape[-1], dtype=torch.long)
                    added.append(arg)
            with torch.no_grad():
                rows = _feature_rows(getter(**{k: out[k] for k in [name, *added] if k in accepted}))
            if rows % BATCH:
                raise LookupError(f"get_{modality}_features returned {rows} rows for a batch of {BATCH}")
            token = getattr(config, key)
            prefix.append(torch.full((BATCH, rows // BATCH), token, dtype=torch.long))
            kinds.append(modality)
            added.append(f"{rows // BATCH} {key} placeholders per row")
        notes.append(" + ".join(added))
    if prefix:
        text = inputs["input_ids"].clone()
        used = {getattr(config, k) for k in placeholders}
        text[torch.isin(text, torch.tensor(sorted(used)))] = min(set(range(3, 3 + len(used) + 1)) - used)
        out["input_ids"] = torch.cat([*prefix, text], dim=1)
        types = [_MM_TOKEN_TYPE.get(k) for k in kinds]
        if "mm_token_type_ids" in params and "mm_token_type_ids" not in inputs and None not in types:
            # the processor's modality label per token; M-RoPE models (MiniCPM-V 4.7) lay out image positions by it
            out["mm_token_type_ids"] = torch.cat(
                [torch.full_like(p, t, dtype=torch.int32) for p, t in zip(prefix, types, strict=True)]
                + [torch.zeros_like(text, dtype=torch.int32)], dim=1)
            notes.append("mm_token_type_ids")
    return out, "; ".join(notes)


def tower_roots(model: nn.Module, read: set[str], unreached: list[str]) -> list[str]:
    """The outermost submodules that hold unreached coverage modules, none of whose parameters the graph read, and
    that are models of their own (a ``PreTrainedModel``, or any module with a ``config`` and ``main_input_name``).

    Args:
        model: the analysed model.
        read: parameter FQNs its graph read (:func:`read_parameters`).
        unreached: FQNs of its unreached attention/FFN modules.

    Example::

        tower_roots(model, read_parameters(tg), ["audio_tower.layers.0.self_attn"])   # ['audio_tower']
    """
    roots: list[str] = []
    for name, mod in model.named_modules():
        if not name or any(name.startswith(r + ".") for r in roots):
            continue
        if not any(u == name or u.startswith(name + ".") for u in unreached):
            continue
        params = [f"{name}.{n}" for n, _ in mod.named_parameters()]
        # a model the parent runs without encoder states (BLIP's text model under BlipModel) leaves exactly its
        # cross-attention unread: it counts as a tower too, run with encoder states (tower_inputs)
        if not params or (read.intersection(params) and not _takes_encoder_states(mod)):
            continue
        if hasattr(mod, "config") and hasattr(mod.config, "to_dict") and isinstance(
                getattr(mod, "main_input_name", None), str):
            roots.append(name)
    return roots


def _takes_encoder_states(mod: nn.Module) -> bool:
    """Whether ``mod`` is a decoder that reads encoder states it does not compute (a forward argument)."""
    config = getattr(mod, "config", None)
    return ("encoder_hidden_states" in inspect.signature(mod.forward).parameters
            and not getattr(config, "is_encoder_decoder", False))


def _encoder_states(config: Any, g: torch.Generator | None = None) -> torch.Tensor:
    """Random encoder states as wide as ``config``'s cross-attention reads (its own hidden size where unnamed)."""
    width = next((getattr(config, k) for k in ("encoder_hidden_size", "cross_attention_hidden_size", "hidden_size",
                                              "d_model") if isinstance(getattr(config, k, None), int)), HIDDEN)
    return torch.randn(BATCH, SEQ, width, generator=g if g is not None else torch.Generator().manual_seed(3))


def tower_inputs(tower: nn.Module) -> dict[str, torch.Tensor]:
    """Generated inputs for a tower analysed on its own: :func:`make_inputs` for its own config, the first of
    :data:`FEATURE_INPUTS` its forward takes where its ``main_input_name`` is not a forward argument, and an all-ones
    mask for each required ``*mask`` argument.

    Args:
        tower: a submodule with its own ``config`` (e.g. an audio encoder).

    Raises:
        LookupError: the forward requires an argument the generator does not make.

    Example::

        tower = model.audio_tower; tower(**tower_inputs(tower))
    """
    params = inspect.signature(tower.forward).parameters
    inputs = make_inputs(tower, tower.config)
    main = next(iter(inputs))
    if main not in params:
        alt = next((n for n in FEATURE_INPUTS if n in params), None)
        positional = [n for n, p in params.items() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if alt is not None:
            inputs = {alt: feature_tensor(alt, tower.config)}
            main = alt
        elif positional:  # main_input_name names the input, the forward calls it hidden_states (VibeVoice)
            inputs = {positional[0]: inputs[main]}
            main = positional[0]
        else:
            raise LookupError(f"{type(tower).__name__}.forward takes no {main} nor any of {FEATURE_INPUTS}")
    x = inputs[main]
    if _takes_encoder_states(tower):
        inputs["encoder_hidden_states"] = _encoder_states(tower.config)
    if f"{main}_mask" in params:  # optional in the signature, read unconditionally (AudioFlamingo3's encoder)
        inputs[f"{main}_mask"] = torch.ones(x.shape[0], x.shape[-1], dtype=torch.long)
    for name, p in params.items():
        if name in inputs or p.default is not inspect.Parameter.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if not name.endswith("mask"):
            raise LookupError(f"{type(tower).__name__}.forward requires {name!r}, which the generator does not make")
        inputs[name] = torch.ones(x.shape[0], x.shape[-1], dtype=torch.long)
    return inputs


def _combined_run(model_type: str, seed: int, config: Any, inputs: dict[str, torch.Tensor],
                  channel: bool) -> tuple[Any, ...]:
    cfg, moved = placeholder_config(config)
    model = build(model_type, seed, config=cfg)[0]
    combined, note = combined_inputs(model, cfg, inputs, waveform_channel=channel)
    if moved:
        note += " (" + ", ".join(f"{k} moved to {v}" for k, v in moved.items()) + ")"
    with torch.no_grad():
        model(**combined)
    return (cfg, model, combined, note, *_analyse(model, combined))


def _drive_towers(model_type: str, seed: int, model: nn.Module, inputs: dict[str, torch.Tensor],
                  modules: list[tuple[str, ModuleKind]], cov: list[ModuleCoverage]) -> tuple[Any, str]:
    """Try :func:`combined_inputs`; the new (model, inputs, make, tg, report, coverage) if they reach every module
    the generic inputs reached and more, else None; and a note saying what happened."""
    try:
        cfg, model2, inputs2, note, tg2, report2 = _combined_run(model_type, seed, model.config, inputs, False)
    except Exception as exc:  # noqa: BLE001 - recorded; the generic inputs stay
        if "input_values" not in inspect.signature(model.forward).parameters:
            return None, f"not used: {_err(exc)}"
        try:  # a raw waveform with a channel dim, [batch, 1, samples]
            cfg, model2, inputs2, note, tg2, report2 = _combined_run(model_type, seed, model.config, inputs, True)
        except Exception:  # noqa: BLE001 - the first error is the one that explains
            return None, f"not used: {_err(exc)}"
    cov2 = assess_modules(model2, modules, report2, tg2)
    before, after = ({m.fqn for m in c if m.reached} for c in (cov, cov2))
    if not before <= after:
        return None, f"not used: {note} reaches {len(after - before)} new modules but loses {len(before - after)}"
    if after == before:
        return None, f"not used: {note} reaches no new module"
    return (model2, inputs2, lambda: build(model_type, seed, config=cfg)[0], tg2, report2, cov2), (
        f"{note}: {len(after - before)} more modules reached")


def _analyse_towers(model: nn.Module, make: Any, tg: Any, cov: list[ModuleCoverage], rec: Any,
                    seed: int) -> list[ModuleCoverage]:
    """Analyse each tower (:func:`tower_roots`) as its own model; its modules' entries replace the unreached ones."""
    unreached = [m.fqn for m in cov if not m.reached]
    by_fqn = {m.fqn: m for m in cov}
    for root in tower_roots(model, read_parameters(tg), unreached):
        tower = model.get_submodule(root)
        inside = [m for m in cov if m.fqn.startswith(root + ".")]
        counts = count_coverage(inside)  # until its analysis says otherwise: every module unreached, uncovered
        entry: dict[str, Any] = {"module": root, "class": type(tower).__name__, "inputs": [], "groups": {},
                                 "attention": counts["attention"], "ffn": counts["ffn"], "unreached": len(inside),
                                 "error": ""}
        rec.towers.append(entry)
        try:
            t_inputs = tower_inputs(tower)
            try:
                with torch.no_grad():
                    tower(**t_inputs)
            except Exception as exc:
                channel = with_channel(t_inputs)  # a raw waveform with a channel dim, else the first error stands
                if channel is None:
                    raise
                try:
                    with torch.no_grad():
                        tower(**channel)
                except Exception:  # noqa: BLE001
                    raise exc from None
                t_inputs = channel
            entry["inputs"] = sorted(t_inputs)
            t_tg, t_report = _analyse(tower, t_inputs)
        except Exception as exc:  # noqa: BLE001 - recorded; its modules stay unreached
            entry["error"] = _err(exc)
            continue
        entry["groups"] = dict(collections.Counter(g.kind for g in t_report.groups))
        rel = [(m.fqn[len(root) + 1:], m.kind) for m in inside]
        for m in assess_modules(tower, rel, t_report, t_tg):
            by_fqn[f"{root}.{m.fqn}"] = dataclasses.replace(m, fqn=f"{root}.{m.fqn}", tower=root)
        counts = count_coverage([by_fqn[m.fqn] for m in inside])
        entry["attention"], entry["ffn"] = counts["attention"], counts["ffn"]
        entry["unreached"] = sum(not by_fqn[m.fqn].reached for m in inside)
        # the groups credited to the tower are checked like the model's: permuted at random on a fresh copy
        t_rec = Record(rec.model_type)
        _symmetry(lambda root=root: make().get_submodule(root), t_inputs, t_report, t_rec, seed)
        rec.broken_groups += [f"{root}: {b}" for b in t_rec.broken_groups]
        rec.symmetry_max_err = max(rec.symmetry_max_err, t_rec.symmetry_max_err)
        if t_rec.symmetry_note:
            entry["error"] = "symmetry: " + t_rec.symmetry_note
    return [by_fqn[m.fqn] for m in cov]


# ---------------------------------------------------------------------- one model
@dataclass
class Record:
    """What the sweep learned about one model type."""

    model_type: str
    built: bool = False
    skip: str = ""  # why it was not built or did not run eagerly
    model_class: str = ""
    params: int = 0
    analysed: bool = False
    analysis_error: str = ""
    groups: dict[str, int] = field(default_factory=dict)  # kind -> count
    attention_layers: list[int] = field(default_factory=lambda: [0, 0])  # [with head groups, modules]
    ffn_layers: list[int] = field(default_factory=lambda: [0, 0])  # [with FFN groups, modules]
    config_layers: int | None = None
    broken_groups: list[str] = field(default_factory=list)
    symmetry_dtype: str = ""
    symmetry_note: str = ""
    symmetry_max_err: float = 0.0  # largest output change over the sound groups: the margin below the tolerance
    symmetry_redrawn: str = ""  # the groups checked again with every parameter redrawn: "checked" or why not
    s2ft: str = Outcome.SKIPPED.value
    s2ft_error: str = ""
    s2ft_trainable: int = 0
    prune: str = Outcome.SKIPPED.value
    prune_error: str = ""
    prune_param_ratio: float | None = None
    unruled_ops: dict[str, int] = field(default_factory=dict)
    pinned_reasons: dict[str, int] = field(default_factory=dict)  # reason (trimmed) -> pinned spaces
    inputs: list[str] = field(default_factory=list)  # what the model was analysed, permuted, trained, pruned on
    combined_inputs: str = ""  # what driving the towers through the model's own forward gave ("": not tried)
    towers: list[dict[str, Any]] = field(default_factory=list)  # submodules analysed as models of their own
    unreached: list[str] = field(default_factory=list)  # attention/FFN modules no analysed graph reads
    headless_attention: list[str] = field(default_factory=list)  # attention modules not counted: no heads
    seconds: float = 0.0

    @property
    def traced(self) -> bool:
        return self.built and self.analysed

    @property
    def full_coverage(self) -> bool | None:
        """Every attention and FFN module has its groups; None where the model has neither."""
        (ha, na), (hf, nf) = self.attention_layers, self.ffn_layers
        if na + nf == 0:
            return None
        return ha == na and hf == nf


def _err(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def _reason_key(reason: str) -> str:
    # node names and sizes vary per model; the reason's text up to them is what repeats across the catalog
    return re.sub(r"\d+", "N", reason.split(" (node")[0])[:120]


def _symmetry(make: Any, inputs: dict[str, torch.Tensor], report: Any, rec: Record, seed: int) -> None:
    """Permute every group at random (then back); record the groups whose permutation moves an output."""
    from sparsify_fx.frontend.trace import tracing_friendly

    model = make()
    # the function compared is the one analysed: the trace switches the cache off (tracing_friendly), and a cache
    # returned as plain tensors (RWKV's recurrent state, per channel) is in the permuted layout, as a KV cache is
    # per head; it is the same model's input on the next step, so the permutation is a symmetry of the recurrence
    # float64 makes a permuted sum exact to ~1e-16; models that compute a part in float32 anyway (RoPE tables under
    # autocast(enabled=False)) leave ~1e-7. A wrong group moves outputs by O(1), so 1e-5 separates the two
    for dtype in (torch.float64, torch.float32):
        tol = 1e-5 if dtype == torch.float64 else 1e-3
        try:
            m = model.to(dtype)
            x = {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}
            with torch.no_grad(), tracing_friendly(m):
                ref, again = float_outputs(m(**x)), float_outputs(m(**x))
            break
        except Exception as exc:  # noqa: BLE001 - some models hard-code float32; fall back to it
            rec.symmetry_note = f"float64 failed ({_err(exc)})"
            model = make()
    else:
        rec.symmetry_note += "; no dtype ran"
        return
    rec.symmetry_dtype = str(dtype).removeprefix("torch.")
    if _max_rel(ref, again) > tol:
        rec.symmetry_note = "outputs differ between two identical runs; symmetry not checked"
        return
    g = torch.Generator().manual_seed(seed)
    m = _check_groups(m, x, ref, report, tol, rec, g, lambda: make().to(dtype), "")
    # At init some parameters are zero or one (gates, residual scales, sinks, norm temperatures) and switch parts of
    # the model off, so a wrong group there moves nothing: check every group again with every parameter redrawn
    # (seeded), a function the analysis must hold for as well
    redraw_parameters(m, seed)
    with torch.no_grad(), tracing_friendly(m):
        ref, again = float_outputs(m(**x)), float_outputs(m(**x))
    if not all(torch.isfinite(t).all() for t in ref) or _max_rel(ref, again) > tol:
        rec.symmetry_redrawn = "not checked: the outputs with redrawn parameters are not finite or not repeatable"
        return
    # a float64 model that still computes parts in float32 (norms, softmax or RoPE upcast with .float(): the sound
    # groups moved outputs by more than float64 rounding at init) has that float32 rounding amplified by the redrawn
    # parameters (Dory: 2.8e-5 on a sound head_dim group): there the float32 tolerance applies
    mixed = dtype == torch.float64 and rec.symmetry_max_err > 1e-12
    tol2 = 1e-3 if mixed else tol
    _check_groups(m, x, ref, report, tol2, rec, g, lambda: redraw_parameters(make().to(dtype), seed), " (redrawn)")
    rec.symmetry_redrawn = f"checked (tolerance {tol2:g}{': parts run in float32' if mixed else ''})"


def redraw_parameters(model: nn.Module, seed: int) -> nn.Module:
    """Every floating parameter drawn anew, in place (seeded): weights of 2+ dims ~ N(0, 1/fan_in), vectors ~
    N(1, 0.25) for names ending in ``weight``/``scale``/``gamma`` (norm gains) and N(0, 0.25) otherwise (biases,
    gates, sinks), so nothing is left at an init value that happens to switch a path off. Returns ``model``."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not p.is_floating_point() or p.numel() == 0:
                continue
            z = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if p.dim() >= 2:
                z /= math.sqrt(max(p[0].numel(), 1))
            elif re.search(r"(weight|scale|gamma)$", name):
                z = 1 + 0.5 * z
            else:
                z = 0.5 * z
            p.copy_(z.to(p.dtype))
    return model


def _check_groups(m: nn.Module, x: dict[str, torch.Tensor], ref: list[torch.Tensor], report: Any, tol: float,
                  rec: Record, g: torch.Generator, remake: Any, label: str) -> nn.Module:
    """Permute each group at random, run, permute back: a group whose permutation moves ``ref`` beyond ``tol`` is
    recorded broken. Returns the model (remade where a permutation raised)."""
    from sparsify_fx import permute
    from sparsify_fx.frontend.trace import tracing_friendly

    for grp in report.groups:
        perm = torch.randperm(grp.num_units, generator=g)
        try:
            permute(m, grp, perm)
            with torch.no_grad(), tracing_friendly(m):
                out = float_outputs(m(**x))
            permute(m, grp, torch.argsort(perm))
        except Exception as exc:  # noqa: BLE001 - a group that cannot even be applied is broken too
            rec.broken_groups.append(f"{grp.name}{label}: {_err(exc)}")
            m = remake()
            continue
        err = _max_rel(out, ref)
        if err > tol:
            rec.broken_groups.append(f"{grp.name} ({grp.kind}){label}: rel err {err:.1e}")
        else:
            rec.symmetry_max_err = max(rec.symmetry_max_err, err)
    return m


def _s2ft(make: Any, inputs: dict[str, torch.Tensor], rec: Record) -> None:
    import sparsify_fx

    model = make()
    try:
        sparsify_fx.s2ft(model, inputs, sparsify_fx.S2FTConfig())
        rec.s2ft_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        model.train()
        outs = float_outputs(model(**inputs))
        loss = sum(o.float().pow(2).mean() for o in outs if o.requires_grad)
        if not isinstance(loss, torch.Tensor):
            raise RuntimeError("no output depends on a trained parameter")
        try:
            loss.backward()
        except Exception as exc:  # noqa: BLE001
            raise RuntimeError(f"backward: {_err(exc)}") from exc
        rec.s2ft = Outcome.OK.value
    except Exception as exc:  # noqa: BLE001 - the sweep records every failure and goes on
        rec.s2ft, rec.s2ft_error = Outcome.ERROR.value, _err(exc)


def _prune(make: Any, inputs: dict[str, torch.Tensor], rec: Record) -> None:
    import sparsify_fx

    model = make()
    before = sum(p.numel() for p in model.parameters())
    try:
        sparsify_fx.prune(model, inputs, sparsify_fx.PruneConfig(ratio=0.25, progress=False))
        with torch.no_grad():
            model(**inputs)
        after = sum(p.numel() for p in model.parameters())
        rec.prune_param_ratio = round(after / before, 4)
        rec.prune = (Outcome.OK if after < before else Outcome.NOOP).value
    except Exception as exc:  # noqa: BLE001
        rec.prune, rec.prune_error = Outcome.ERROR.value, _err(exc)


def run_model(model_type: str, seed: int = 0) -> Record:
    """Build, analyse, permute, S²FT and prune one model type; never raises (failures are recorded).

    Args:
        model_type: a key of ``CONFIG_MAPPING_NAMES``.
        seed: seeds the weights and the random permutations.

    Example::

        rec = run_model("llama"); assert rec.analysed and not rec.broken_groups
    """
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    rec = Record(model_type)
    try:
        model, inputs = build(model_type, seed)
        rec.model_class = type(model).__name__
        rec.params = sum(p.numel() for p in model.parameters())
        rec.config_layers = next((getattr(model.config, k) for k in ("num_hidden_layers", "num_layers", "n_layer")
                                  if isinstance(getattr(model.config, k, None), int)), None)
        with torch.no_grad():
            model(**inputs)
        rec.built = True
    except Exception as exc:  # noqa: BLE001
        rec.skip = _err(exc)
        rec.seconds = round(time.perf_counter() - start, 2)
        return rec

    def make() -> nn.Module:
        return build(model_type, seed)[0]

    try:
        tg, report = _analyse(model, inputs)
        rec.analysed = True
    except Exception as exc:  # noqa: BLE001
        rec.analysis_error = _err(exc)
        rec.seconds = round(time.perf_counter() - start, 2)
        return rec
    modules = coverage_modules(model)
    cov = assess_modules(model, modules, report, tg)
    if any(not m.reached for m in cov):  # towers the generic inputs do not drive: through the model's forward first
        driven, rec.combined_inputs = _drive_towers(model_type, seed, model, inputs, modules, cov)
        if driven is not None:
            model, inputs, make, tg, report, cov = driven
        del driven
    rec.inputs = list(inputs)
    rec.groups = dict(collections.Counter(g.kind for g in report.groups))
    if any(not m.reached for m in cov):  # then each tower on its own
        cov = _analyse_towers(model, make, tg, cov, rec, seed)
    del tg, model  # the exported program and the eager model: the steps below build their own copies
    rec.unreached = [m.fqn for m in cov if not m.reached]
    rec.headless_attention = [m.fqn for m in cov if m.headless]
    counts = count_coverage(cov)
    rec.attention_layers, rec.ffn_layers = counts["attention"], counts["ffn"]
    rec.unruled_ops = dict(report.unruled_ops)
    reasons = collections.Counter(_reason_key(r) for p in report.pinned for r in p.reasons)
    rec.pinned_reasons = dict(reasons.most_common(8))
    _symmetry(make, inputs, report, rec, seed)
    _s2ft(make, inputs, rec)
    _prune(make, inputs, rec)
    rec.seconds = round(time.perf_counter() - start, 2)
    return rec


# ---------------------------------------------------------------------- the sweep
def model_types() -> list[str]:
    """Every model type transformers registers a config for, sorted."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return sorted(CONFIG_MAPPING_NAMES)


def _child(model_type: str, seed: int, mem_bytes: int, conn: Any) -> None:
    # forked: the parent's imports are shared; one thread (OpenMP after fork is only safe that way)
    torch.set_num_threads(1)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
    if mem_bytes:
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + mem_bytes, vm + mem_bytes))
    try:
        rec = run_model(model_type, seed)
        conn.send(asdict(rec))
    except BaseException:  # noqa: BLE001 - MemoryError and friends: say what happened
        with contextlib.suppress(Exception):
            conn.send({**asdict(Record(model_type)), "skip": "crashed: " + traceback.format_exc(limit=1)[-300:]})
    finally:
        conn.close()


def _start(model_type: str, seed: int, mem_gb: float) -> tuple[Any, Any, float]:
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(model_type, seed, int(mem_gb * 2**30), child), daemon=True)
    proc.start()
    child.close()
    return proc, parent, time.perf_counter()


def _finish(model_type: str, proc: Any, conn: Any, start: float, timed_out: bool) -> Record:
    data = None
    if not timed_out:
        with contextlib.suppress(EOFError, OSError):
            data = conn.recv()
    proc.join(1)
    if proc.is_alive():
        proc.kill()
        proc.join()
    conn.close()
    if data is None:
        why = Outcome.TIMEOUT.value if timed_out else f"died (exit code {proc.exitcode})"
        return Record(model_type, skip=why, seconds=round(time.perf_counter() - start, 2))
    return record_from_dict(data)


def sweep(types: list[str], *, jobs: int = 2, timeout: float = 60.0, mem_gb: float = 4.0, seed: int = 0) -> Any:
    """Yield a :class:`Record` per model type as each finishes, ``jobs`` forked children at a time.

    Children are forked from this (single) thread only: a fork while another thread holds a lock (an import
    lock, a logging lock) leaves that lock held forever in the child.

    Args:
        types: model types to run.
        jobs: children at once.
        timeout: wall-clock seconds per model; past it the child is killed and the record says ``timeout``.
        mem_gb: address space each child may add to what it inherits (0: no cap).
        seed: as for :func:`run_model`.

    Example::

        for rec in sweep(["llama", "gpt2"], jobs=1):
            print(rec.model_type, rec.s2ft)
    """
    from multiprocessing.connection import wait

    pending = list(types)
    running: dict[Any, tuple[str, Any, float]] = {}  # pipe -> (model type, process, start)
    while pending or running:
        while pending and len(running) < max(1, jobs):
            t = pending.pop(0)
            proc, conn, start = _start(t, seed, mem_gb)
            running[conn] = (t, proc, start)
        now = time.perf_counter()
        deadline = min(start + timeout for _, _, start in running.values())
        ready = wait(list(running), timeout=max(0.0, deadline - now))
        now = time.perf_counter()
        for conn in list(running):
            t, proc, start = running[conn]
            if conn in ready or now - start >= timeout:
                del running[conn]
                yield _finish(t, proc, conn, start, timed_out=conn not in ready)


def run_isolated(model_type: str, *, timeout: float = 60.0, mem_gb: float = 4.0, seed: int = 0) -> Record:
    """:func:`run_model` in a forked child capped at ``timeout`` seconds and ``mem_gb`` GB more address space.

    Args:
        model_type: a key of ``CONFIG_MAPPING_NAMES``.
        timeout: wall-clock limit; past it the child is killed and the record says ``timeout``.
        mem_gb: address space the child may add to what it inherits (0: no cap).
        seed: as for :func:`run_model`.

    Example::

        rec = run_isolated("llama", timeout=60, mem_gb=4)
    """
    return next(sweep([model_type], jobs=1, timeout=timeout, mem_gb=mem_gb, seed=seed))


def record_from_dict(data: dict[str, Any]) -> Record:
    """A :class:`Record` from its JSON form (unknown keys ignored)."""
    names = set(Record.__dataclass_fields__)
    return Record(**{k: v for k, v in data.items() if k in names})


def _pct(n: int, d: int) -> str:
    return f"{n}/{d} ({100 * n / d:.0f} %)" if d else "0/0"


def summarize(records: list[Record]) -> dict[str, Any]:
    """The issue's coverage metrics and the most common blocking reasons.

    Args:
        records: one per model type.

    Example::

        summarize([run_model("llama")])["s2ft_ok"]   # [1, 1]
    """
    traced = [r for r in records if r.traced]
    with_layers = [r for r in traced if r.full_coverage is not None]
    unruled: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()
    s2ft_err: collections.Counter[str] = collections.Counter()
    prune_err: collections.Counter[str] = collections.Counter()
    trace_err: collections.Counter[str] = collections.Counter()
    for r in records:
        unruled.update(r.unruled_ops.keys())  # models an op blocks, not its node count
        reasons.update(r.pinned_reasons.keys())
        if r.s2ft == Outcome.ERROR.value:
            s2ft_err[r.s2ft_error[:120]] += 1
        if r.prune == Outcome.ERROR.value:
            prune_err[r.prune_error[:120]] += 1
        if r.built and not r.analysed:
            trace_err[r.analysis_error[:120]] += 1
    return {
        "model_types": len(records),
        "built": sum(r.built for r in records),
        "traced": len(traced),
        "timeouts": sum(r.skip == Outcome.TIMEOUT.value for r in records),
        "full_coverage": [sum(bool(r.full_coverage) for r in with_layers), len(with_layers)],
        "no_attention_or_ffn_modules": len(traced) - len(with_layers),
        "s2ft_ok": [sum(r.s2ft == Outcome.OK.value for r in traced), len(traced)],
        "prune_ok": [sum(r.prune == Outcome.OK.value for r in traced), len(traced)],
        "prune_removed_nothing": sum(r.prune == Outcome.NOOP.value for r in traced),
        "broken_groups": sum(len(r.broken_groups) for r in records),
        # [modules, models]: what the headline metric counts as not covered because no analysed graph reads them
        "unreached_modules": [sum(len(r.unreached) for r in traced), sum(bool(r.unreached) for r in traced)],
        "towers_analysed_apart": [sum(len(r.towers) for r in traced), sum(bool(r.towers) for r in traced)],
        "combined_inputs_used": sum(bool(r.combined_inputs) and not r.combined_inputs.startswith("not used")
                                    for r in traced),
        "headless_attention_modules": [sum(len(r.headless_attention) for r in traced),
                                       sum(bool(r.headless_attention) for r in traced)],
        "models_with_broken_groups": [r.model_type for r in records if r.broken_groups],
        "top_unruled_ops": unruled.most_common(15),
        "top_pinned_reasons": reasons.most_common(15),
        "top_s2ft_errors": s2ft_err.most_common(10),
        "top_prune_errors": prune_err.most_common(10),
        "top_trace_errors": trace_err.most_common(10),
    }


def _cell(text: str, n: int = 70) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= n else text[: n - 1] + "…"


def to_markdown(records: list[Record], summary: dict[str, Any]) -> str:
    """The sweep as Markdown: the summary metrics, the blocking reasons, then one row per model type."""
    s = summary
    lines = [
        "# Catalog sweep",
        "",
        f"{s['model_types']} model types: {s['built']} built and ran eagerly, {s['traced']} built and traced "
        f"({s['timeouts']} timed out).",
        "",
        "| of the models that build and trace | |",
        "| --- | --- |",
        f"| every attention and FFN module has its head / FFN groups | {_pct(*s['full_coverage'])} "
        f"(+{s['no_attention_or_ffn_modules']} with neither) |",
        f"| `s2ft` default config ok (forward + backward) | {_pct(*s['s2ft_ok'])} |",
        f"| `prune` ratio 0.25 ok (and removed something) | {_pct(*s['prune_ok'])} "
        f"({s['prune_removed_nothing']} removed nothing) |",
        f"| broken groups (permuting one changed an output) | {s['broken_groups']} |",
        f"| models run on combined inputs (token ids + their towers' features) | {s['combined_inputs_used']} |",
        f"| towers analysed as models of their own | {s['towers_analysed_apart'][0]} in "
        f"{s['towers_analysed_apart'][1]} models |",
        f"| attention/FFN modules no analysed graph reads (count as not covered) | {s['unreached_modules'][0]} in "
        f"{s['unreached_modules'][1]} models |",
        f"| attention modules without heads (not counted) | {s['headless_attention_modules'][0]} in "
        f"{s['headless_attention_modules'][1]} models |",
        "",
    ]
    for title, key in (("Ops without a rule (models)", "top_unruled_ops"),
                       ("Pinned reasons (models)", "top_pinned_reasons"),
                       ("s2ft errors", "top_s2ft_errors"), ("prune errors", "top_prune_errors"),
                       ("trace errors", "top_trace_errors")):
        if s[key]:
            lines += [f"**{title}**", ""] + [f"- {n} × `{_cell(k, 150)}`" for k, n in s[key]] + [""]
    lines += ["| model type | built | heads | FFN | towers apart | unreached | groups | broken | s2ft | prune | "
              "unruled ops | top pinned reason |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        if not r.built:
            lines.append(f"| {r.model_type} | {_cell(r.skip or 'no')} | | | | | | | | | | |")
            continue
        if not r.analysed:
            lines.append(f"| {r.model_type} | yes | trace failed: {_cell(r.analysis_error)} | | | | | | | | | |")
            continue
        s2 = r.s2ft if r.s2ft != Outcome.ERROR.value else _cell(r.s2ft_error)
        pr = r.prune if r.prune != Outcome.ERROR.value else _cell(r.prune_error)
        groups = ", ".join(f"{k} {v}" for k, v in sorted(r.groups.items()))
        top = next(iter(r.pinned_reasons), "")
        heads = f"{r.attention_layers[0]}/{r.attention_layers[1]}"
        if r.headless_attention:
            heads += f" (+{len(r.headless_attention)} without heads)"
        apart = ", ".join(t["module"] for t in r.towers)
        lines.append(
            f"| {r.model_type} | yes | {heads} | {r.ffn_layers[0]}/{r.ffn_layers[1]} | {_cell(apart)} | "
            f"{len(r.unreached) or ''} | {groups} | {len(r.broken_groups) or ''} | {s2} | {pr} | "
            f"{_cell(', '.join(sorted(r.unruled_ops)))} | {_cell(top)} |"
        )
    lines += _towers_markdown(records)
    return "\n".join(lines) + "\n"


def _towers_markdown(records: list[Record]) -> list[str]:
    """Per model whose generic inputs left modules unreached: what drove them, each tower, what is still unread."""
    shown = [r for r in records if r.traced and (r.combined_inputs or r.towers or r.unreached or r.headless_attention)]
    if not shown:
        return []
    lines = ["", "## Towers, combined inputs, unreached and headless modules", ""]
    for r in shown:
        lines.append(f"**{r.model_type}** (inputs: {', '.join(r.inputs)})")
        if r.combined_inputs:
            lines.append(f"- combined inputs: {_cell(r.combined_inputs, 300)}")
        for t in r.towers:
            state = f"error: {_cell(t['error'], 200)}" if t["error"] else "analysed"
            lines.append(f"- tower `{t['module']}` ({t['class']}, inputs {', '.join(t['inputs']) or '-'}): {state}; "
                         f"heads {t['attention'][0]}/{t['attention'][1]}, FFN {t['ffn'][0]}/{t['ffn'][1]}, "
                         f"unreached {t['unreached']}")
        if r.unreached:
            names = ", ".join(f"`{u}`" for u in r.unreached[:6]) + (" ..." if len(r.unreached) > 6 else "")
            lines.append(f"- unreached ({len(r.unreached)}): {names}")
        if r.headless_attention:
            lines.append(f"- attention without heads, not counted ({len(r.headless_attention)}): "
                         + ", ".join(f"`{h}`" for h in r.headless_attention[:4])
                         + (" ..." if len(r.headless_attention) > 4 else ""))
        lines.append("")
    return lines


def write_results(records: list[Record], out: Path) -> dict[str, Any]:
    """Write ``catalog.json`` and ``catalog.md`` under ``out``; returns the summary.

    Args:
        records: one per model type, in sweep order.
        out: a directory (created if missing).

    Example::

        write_results([run_model("llama")], Path("benchmarks/results"))
    """
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    payload = {"summary": summary, "versions": {"torch": torch.__version__,
                                                "transformers": __import__("transformers").__version__},
               "models": [asdict(r) for r in records]}
    for name, text in (("catalog.json", json.dumps(payload, indent=1)), ("catalog.md", to_markdown(records, summary))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)  # a reader never sees half a file
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma-separated model types")
    ap.add_argument("--limit", type=int, default=0, help="only the first N model types")
    ap.add_argument("--jobs", type=int, default=2, help="models run at once (each in its own process)")
    ap.add_argument("--timeout", type=float, default=60.0, help="seconds per model")
    ap.add_argument("--mem-gb", type=float, default=4.0, help="extra address space per model (0: no cap)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--resume", action="store_true", help="keep the records already in OUT/catalog.json")
    ap.add_argument("--rerun", default="", help="comma-separated model types to run again even if --resume kept them")
    ap.add_argument("--shuffle", type=int, default=None, metavar="SEED",
                    help="run in a seeded random order, so a sweep cut short is a fair sample, not the a-to-c types")
    args = ap.parse_args(argv)

    import transformers  # noqa: F401 - imported once here, shared by every forked child

    import sparsify_fx.passes.prune  # noqa: F401
    import sparsify_fx.passes.s2ft  # noqa: F401

    types = [t for t in args.only.split(",") if t] if args.only else model_types()
    if args.limit:
        types = types[: args.limit]
    done: dict[str, Record] = {}
    if args.resume and (args.out / "catalog.json").exists():
        for d in json.loads((args.out / "catalog.json").read_text())["models"]:
            done[d["model_type"]] = record_from_dict(d)
    rerun = {t for t in args.rerun.split(",") if t}
    todo = [t for t in types if t not in done or t in rerun] + [t for t in rerun if t not in types]
    if args.shuffle is not None:
        import random

        random.Random(args.shuffle).shuffle(todo)
    print(f"{len(todo)} model types to run ({len(done)} kept), {args.jobs} at a time", flush=True)
    order = {t: k for k, t in enumerate(model_types())}
    summary: dict[str, Any] = {}
    for i, rec in enumerate(sweep(todo, jobs=args.jobs, timeout=args.timeout, mem_gb=args.mem_gb), 1):
        done[rec.model_type] = rec
        state = rec.skip[:60] if not rec.built else ("traced" if rec.analysed else "trace failed")
        print(f"[{i}/{len(todo)}] {rec.model_type}: {state}, s2ft {rec.s2ft}, prune {rec.prune}, "
              f"broken {len(rec.broken_groups)} ({rec.seconds:.0f} s)", flush=True)
        summary = write_results(sorted(done.values(), key=lambda r: order.get(r.model_type, -1)), args.out)
    if not todo:
        summary = write_results(list(done.values()), args.out)
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("top_")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
