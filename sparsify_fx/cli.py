"""``sparsify-fx``: inspect, plan, prune and apply adapters from a shell, no Python needed.

MODEL is a Hugging Face model directory, its ``config.json`` (built on the meta device: no weights read), or
``package.module:factory`` (a callable returning a model or ``(model, example_inputs)``). Every command takes
``--json`` (one JSON object on stdout). Bad input prints one line naming the cause and exits 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import importlib
import json
import os
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from sparsify_fx.errors import SparsifyError

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

PROG = "sparsify-fx"
EXIT_BAD_INPUT = 2
EXIT_FAILED = 1
# bytes of optimizer state AdamW keeps per trained value: exp_avg and exp_avg_sq, both fp32
ADAMW_STATE_BYTES = 2 * 4
# S2FTConfig fields that cannot come from a command line (callables, data, process-group switches)
_NOT_ON_COMMAND_LINE = ("calibration", "loss_fn", "progress", "distributed")


class Command(str, enum.Enum):
    INSPECT = "inspect"
    PLAN = "plan"
    PRUNE = "prune"
    ADAPTER = "adapter"


class BadInput(Exception):
    """Input the user can fix (a path that is not a model, an unknown option, a value out of range): exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # one line naming the cause, not argparse's usage block: scripts grep it, people read it
        _fail(f"{self.prog}: {message} (see --help)", EXIT_BAD_INPUT)


def _fail(message: str, code: int) -> NoReturn:
    print(f"{PROG}: error: {' '.join(message.split())}", file=sys.stderr)
    raise SystemExit(code)


# ---------------------------------------------------------------------------------------------------- loading
@dataclasses.dataclass
class Loaded:
    model: nn.Module
    inputs: tuple[Any, ...]
    name: str
    on_meta: bool


def _ratio(text: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number in [0, 1), got {text!r}") from None
    if not 0 <= r < 1:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1) (1 would remove every unit), got {text}")
    return r


def _model_dir(spec: str) -> tuple[Path, Path | None]:
    """(directory, config file) for a model directory or a config.json path."""
    p = Path(spec)
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise BadInput(f"{spec} is not a model: the directory has no config.json (give a Hugging Face model "
                           "directory, a config.json, or package.module:factory)")
        return p, p / "config.json"
    if p.is_file():
        if p.suffix != ".json":
            raise BadInput(f"{spec} is not a model: expected a model directory or a config.json, got a "
                           f"{p.suffix or 'extension-less'} file")
        return p.parent, p
    raise BadInput(f"{spec} is not a model: no such file or directory (nor a package.module:factory)")


def _has_weights(directory: Path) -> bool:
    return any(directory.glob("*.safetensors")) or any(directory.glob("pytorch_model*.bin"))


def _model_class(config: Any) -> Any:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def _example_inputs(model: nn.Module, batch: int, seq: int) -> tuple[Any, ...]:
    """Inputs from the model's ``main_input_name``: token ids, pixels or audio, sized from its config."""
    import torch

    cfg = getattr(model, "config", None)
    name = getattr(model, "main_input_name", "input_ids")
    gen = torch.Generator().manual_seed(0)
    if name == "input_ids":
        vocab = int(getattr(cfg, "vocab_size", None) or 128)
        return (torch.randint(0, vocab, (batch, seq), generator=gen),)
    if name == "pixel_values":
        size = getattr(cfg, "image_size", 224)
        size = size if isinstance(size, int) else int(size[0])
        channels = int(getattr(cfg, "num_channels", 3))
        return (torch.randn(batch, channels, size, size, generator=gen),)
    if name == "input_values":
        return (torch.randn(batch, 16 * seq * 20, generator=gen),)
    raise BadInput(f"cannot build example inputs for main_input_name={name!r}; pass package.module:factory "
                   "returning (model, example_inputs)")


def load_model(spec: str, *, weights: bool, batch: int = 2, seq: int = 8) -> Loaded:
    """Build the model MODEL names (see the module docstring) and example inputs for it.

    Args:
        spec: a model directory, a config.json path or ``package.module:factory``.
        weights: read the checkpoint (``from_pretrained``); otherwise build on the meta device from the config.
        batch: example batch size.
        seq: example sequence length (token models).

    Example::

        loaded = load_model("runs/llama-tiny", weights=False)
        report = sparsify_fx.analyze(loaded.model, loaded.inputs)
    """
    if ":" in spec and not os.path.exists(spec):
        return _from_factory(spec, batch, seq)
    directory, config_file = _model_dir(spec)
    # torch and transformers load only once the input looks right: a typo fails in a tenth of a second
    import torch
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(config_file if not weights else directory))
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        raise BadInput(f"{spec} is not a model: its config.json does not load ({type(e).__name__}: {e})") from None
    cls = _model_class(config)
    if weights:
        if not _has_weights(directory):
            raise BadInput(f"{spec} has no weights (*.safetensors or pytorch_model*.bin); this command needs a "
                           "model directory with its checkpoint")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_pretrained(str(directory))
    else:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    model.eval()
    return Loaded(model, _example_inputs(model, batch, seq), type(model).__name__, not weights)


def _from_factory(spec: str, batch: int, seq: int) -> Loaded:
    import torch.nn as nn

    mod_name, _, fn_name = spec.rpartition(":")
    # the console script does not put the working directory on sys.path, `python -m` does: make both agree
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise BadInput(f"{spec} is not a model factory: {type(e).__name__}: {e}") from None
    out = factory()
    model, inputs = (out if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], nn.Module)
                     else (out, None))
    if not isinstance(model, nn.Module):
        raise BadInput(f"{spec} returned {type(model).__name__}, not an nn.Module or (model, example_inputs)")
    if inputs is None:
        inputs = _example_inputs(model, batch, seq)
    elif not isinstance(inputs, tuple | dict):
        inputs = (inputs,)
    on_meta = any(p.is_meta for p in model.parameters())
    return Loaded(model, inputs, type(model).__name__, on_meta)


# ---------------------------------------------------------------------------------------------------- output
def _emit(args: argparse.Namespace, data: dict[str, Any], text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


def _group_json(g: Any) -> dict[str, Any]:
    from sparsify_fx.html import _slices

    return {
        "name": g.name, "kind": g.kind, "units": g.num_units, "unit_size": g.unit_size, "layer": g.layer,
        "group_size": g.group_size, "kv_group": g.kv_group,
        "members": [{"param": m.fqn, "dim": m.dim, "size": m.size, "role": m.role, "slice": _slices(m)}
                    for m in g.members],
    }


def _layers_text(report: Any) -> list[str]:
    by_layer: dict[int | None, list[Any]] = {}
    for g in report.groups:
        by_layer.setdefault(g.layer, []).append(g)
    lines = []
    for layer in sorted(by_layer, key=lambda x: (x is None, x or 0)):
        parts = []
        for g in by_layer[layer]:
            if g.kind == "attention_heads" and g.kv_group:
                continue  # shown inside its kv_heads group
            if g.kind == "kv_heads" and g.group_size:
                parts.append(f"heads {g.num_units * g.group_size} ({g.num_units} kv heads x {g.group_size})")
            else:
                parts.append(f"{g.kind} {g.num_units}" + (f"x{g.unit_size}" if g.unit_size != 1 else ""))
        lines.append(f"  {'layer ' + str(layer) if layer is not None else 'model':>9}: " + " | ".join(parts))
    return lines


# ---------------------------------------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> None:
    import sparsify_fx

    loaded = load_model(args.model, weights=False, batch=args.batch, seq=args.seq)
    report = sparsify_fx.analyze(loaded.model, loaded.inputs)
    if args.html:
        report.to_html(args.html, title=f"{loaded.name}: coupling report")
    lines = [f"{loaded.name}: {len(report.groups)} groups, {len(report.pinned)} pinned spaces", *_layers_text(report)]
    for p in report.pinned:
        members = ", ".join(f"{f}[{d}]" for f, d in p.members[:3]) + (" ..." if len(p.members) > 3 else "")
        lines.append(f"  pinned {p.kind} {p.size} ({members}): {'; '.join(p.reasons)}")
    if args.html:
        lines.append(f"report written to {args.html}")
    data = {
        "model": loaded.name, "groups": [_group_json(g) for g in report.groups],
        "pinned": [{"kind": p.kind, "size": p.size, "members": [list(m) for m in p.members], "reasons": p.reasons}
                   for p in report.pinned],
        "unruled_ops": report.unruled_ops, "html": args.html,
    }
    _emit(args, data, "\n".join(lines))


# ---------------------------------------------------------------------------------------------------- plan
def _parse_s2ft(text: str) -> dict[str, Any]:
    """``attention_ratio=0.1,ffn_ratio=0.05,attention=v+o`` -> S2FTConfig keyword arguments."""
    from sparsify_fx.passes.s2ft import S2FTConfig

    fields = {f.name: f for f in dataclasses.fields(S2FTConfig) if f.name not in _NOT_ON_COMMAND_LINE}
    out: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq:
            raise BadInput(f"--s2ft item {item!r} is not key=value (e.g. attention_ratio=0.1)")
        if key not in fields:
            raise BadInput(f"--s2ft has unknown option {key!r}; options are {', '.join(fields)}")
        value = value.strip()
        if key in ("attention", "ffn", "conv"):
            out[key] = tuple(v for v in value.split("+") if v)
        elif key == "layers":
            try:
                out[key] = [int(v) for v in value.split("+") if v]
            except ValueError:
                raise BadInput(f"--s2ft layers must be indices joined by '+' (layers=0+1), got {value!r}") from None
        elif key in ("attention_ratio", "ffn_ratio", "conv_ratio"):
            try:
                out[key] = float(value)
            except ValueError:
                raise BadInput(f"--s2ft {key} must be a number in (0, 1], got {value!r}") from None
        elif key in ("budget", "seed", "min_units"):
            try:
                out[key] = None if value == "none" and key == "budget" else int(value)
            except ValueError:
                raise BadInput(f"--s2ft {key} must be an integer, got {value!r}") from None
        else:
            out[key] = value
    return out


def _linears(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """Module FQN -> (in features, out features, weight dim that contracts the input) of every linear layer."""
    import torch

    from sparsify_fx.passes.layers import layer_type

    out = {}
    for name, mod in model.named_modules():
        lt = layer_type(mod)
        w = getattr(mod, "weight", None)
        if lt is None or not lt.is_linear or not isinstance(w, torch.Tensor) or w.dim() != 2:
            continue
        d_in = lt.in_dim(mod)
        if d_in is None:
            continue
        out[name] = (int(w.shape[d_in]), int(w.shape[1 - d_in]), d_in)
    return out


def plan_memory(linears: dict[str, tuple[int, int, int]], trained: dict[str, tuple[int, int]], total: int,
                trainable: int, tokens: int, value_bytes: int) -> dict[str, dict[str, int]]:
    """Training memory above the weights for full fine-tuning, S²FT and LoRA with the same trainable count.

    Formula (bytes): grads = trained values x ``value_bytes``; AdamW state = trained values x 8 (two fp32
    moments); saved activations = ``tokens`` x ``value_bytes`` x the features each trained linear keeps for its
    weight gradient: its whole input (full FT, and S²FT rows), only the selected input columns (S²FT columns),
    or its whole input plus the rank-r intermediate (LoRA). Activations that only carry the gradient through
    frozen layers are left out: they are the same for S²FT and LoRA.

    Args:
        linears: module -> (in features, out features, input weight dim) of every linear layer.
        trained: module -> (weight dim the S²FT blocks run along, selected count along it).
        total: parameters of the model; trainable: S²FT's trainable parameters.
        tokens: batch x sequence length the activations are estimated for.
        value_bytes: bytes per parameter value (4 for fp32).

    Example::

        plan_memory({"fc": (64, 128, 1)}, {"fc": (1, 8)}, 8192, 1024, 512, 4)["s2ft"]["total"]
    """
    full_act = sum(i for i, _, _ in linears.values())
    s2ft_act = sum((k if dim == linears[m][2] else linears[m][0]) for m, (dim, k) in trained.items() if m in linears)
    lora_dims = sum(linears[m][0] + linears[m][1] for m in trained if m in linears)
    rank = max(1, round(trainable / lora_dims)) if lora_dims else 0
    lora_params = rank * lora_dims
    lora_act = sum(linears[m][0] + rank for m in trained if m in linears)

    def row(params: int, act: int) -> dict[str, int]:
        grads, opt, saved = params * value_bytes, params * ADAMW_STATE_BYTES, tokens * act * value_bytes
        return {"trainable": params, "grads": grads, "optimizer": opt, "activations": saved,
                "total": grads + opt + saved}

    return {"full": row(total, full_act), "s2ft": row(trainable, s2ft_act),
            "lora": {**row(lora_params, lora_act), "rank": rank}}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.2f} MiB"


def cmd_plan(args: argparse.Namespace) -> None:
    import torch

    import sparsify_fx
    from sparsify_fx.passes.s2ft import S2FTConfig, state_of

    kwargs = _parse_s2ft(args.s2ft or "")
    cfg = S2FTConfig(**kwargs, progress=False)
    cfg.validate()
    loaded = load_model(args.model, weights=False, batch=args.batch, seq=args.seq)
    model = loaded.model
    linears = _linears(model)
    total = sum(p.numel() for p in model.parameters())
    value_bytes = next((p.element_size() for p in model.parameters() if p.is_floating_point()), 4)
    report = sparsify_fx.analyze(model, loaded.inputs) if args.html else None
    sparsify_fx.s2ft(model, loaded.inputs, cfg)
    st = state_of(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    rows = []
    for u in st.units:
        fqns = {m.fqn for pairs in u.projections.values() for m, _ in pairs}
        n = 0
        for s in st.slices:
            if s.fqn in fqns:
                shape = u.shapes.get(s.fqn)
                across = (shape and int(torch.Size(shape).numel() // shape[s.dim])) or 0
                n += s.length * across
        rows.append({"layer": u.group.layer, "group": u.group.name, "kind": u.group.kind,
                     "selected": len(u.selected), "units": u.group.num_units, "projections": list(u.projections),
                     "params": n, "notes": list(u.notes)})
    trained: dict[str, tuple[int, int]] = {}
    for s in st.slices:
        mod = s.fqn.rpartition(".")[0]
        dim, k = trained.get(mod, (s.dim, 0))
        trained[mod] = (dim, k + s.length)
    tokens = args.batch_train * args.seq_train
    memory = plan_memory(linears, trained, total, trainable, tokens, value_bytes)
    lines = [f"{loaded.name}: S²FT plan ({', '.join(f'{k}={v}' for k, v in kwargs.items()) or 'defaults'})",
             f"  {'layer':>5}  {'kind':15s} {'selected':>10}  {'projections':12s} {'params':>12}"]
    for r in rows:
        layer = "-" if r["layer"] is None else r["layer"]
        lines.append(f"  {layer:>5}  {r['kind']:15s} {r['selected']:>4}/{r['units']:<5}  "
                     f"{'+'.join(r['projections']):12s} {r['params']:>12,d}")
        lines.extend(f"         note: {note}" for note in r["notes"])
    lines.append(f"  trainable {trainable:,d} of {total:,d} parameters ({100 * trainable / max(total, 1):.3f} %)")
    lines.append(f"memory above the weights, batch {args.batch_train} x seq {args.seq_train}, AdamW "
                 f"(grads {value_bytes} B + optimizer 8 B per trained value; activations: inputs the trained "
                 "linears keep for their weight gradients):")
    lines.append(f"  {'':10s} {'trainable':>12} {'grads':>13} {'optimizer':>13} {'activations':>13} {'total':>13}")
    for key, label in (("full", "full FT"), ("s2ft", "S²FT"), ("lora", "LoRA")):
        m = memory[key]
        label = f"LoRA r={m['rank']}" if key == "lora" else label
        lines.append(f"  {label:10s} {m['trainable']:>12,d} {_mib(m['grads']):>13} {_mib(m['optimizer']):>13} "
                     f"{_mib(m['activations']):>13} {_mib(m['total']):>13}")
    if args.html and report is not None:
        names = {"full": "full fine-tuning", "s2ft": "S²FT", "lora": f"LoRA r={memory['lora']['rank']}"}
        table = "".join(f"<tr><td>{names[k]}</td>" + "".join(f"<td>{_mib(memory[k][c])}</td>" for c in
                        ("grads", "optimizer", "activations", "total")) + "</tr>" for k in names)
        extra = [f'<h2>Memory estimate</h2><table class="summary"><tr><th></th><th>grads</th><th>optimizer</th>'
                 f"<th>activations</th><th>total</th></tr>{table}</table>"]
        from sparsify_fx import html

        html.write(args.html, report, model=model, title=f"{loaded.name}: S²FT plan", extra=extra)
        lines.append(f"report written to {args.html}")
    data = {"model": loaded.name, "config": kwargs, "layers": rows, "trainable": trainable, "total": total,
            "memory": memory, "tokens": tokens, "html": args.html}
    _emit(args, data, "\n".join(lines))


# ---------------------------------------------------------------------------------------------------- prune
def _check_out(out: str) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise BadInput(f"--out {out} is a file; pass a directory to save the model in")


class CannotSave(Exception):
    """The result exists in memory but would not load back from what save_pretrained writes: exit 1."""


def _check_rebuilds(model: nn.Module) -> None:
    """Refuse, before writing, a pruned model that ``from_pretrained`` would rebuild with other shapes (a config
    that derives a size, e.g. GPT-2's head size ``n_embd / n_head``)."""
    import copy

    import torch

    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))
        want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    except Exception as e:  # noqa: BLE001 - any failure to rebuild means the checkpoint would not load
        want = {"": (f"{type(e).__name__}: {e}",)}
    have = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    bad = [k for k in have if want.get(k) != have[k]]
    if bad:
        first = bad[0]
        raise CannotSave(f"the pruned {type(model).__name__} would not load back: its config no longer rebuilds it "
                         f"({first}: pruned {have[first]}, config gives {want.get(first, want.get(''))}); prune "
                         "from Python and keep the model object (or save its state_dict)")


def cmd_prune(args: argparse.Namespace) -> None:
    import sparsify_fx

    _check_out(args.out)
    loaded = load_model(args.model, weights=True, batch=args.batch, seq=args.seq)
    if loaded.on_meta:
        raise BadInput(f"{args.model} gave a model on the meta device; prune needs weights")
    before = sum(p.numel() for p in loaded.model.parameters())
    cfg = sparsify_fx.PruneConfig(ratio=args.ratio, score=args.score, progress=False)
    model = sparsify_fx.prune(loaded.model, loaded.inputs, cfg)
    after = sum(p.numel() for p in model.parameters())
    if not hasattr(model, "save_pretrained"):
        raise BadInput(f"{loaded.name} has no save_pretrained; prune from Python and save it your way")
    _check_rebuilds(model)
    model.save_pretrained(args.out)
    data = {"model": loaded.name, "ratio": args.ratio, "params_before": before, "params_after": after,
            "out": args.out}
    _emit(args, data, f"{loaded.name}: pruned {args.ratio:g} of each group's units: {before:,d} -> {after:,d} "
                      f"parameters ({after / before:.3f}x), saved to {args.out}")


# ---------------------------------------------------------------------------------------------------- adapter
def cmd_adapter_info(args: argparse.Namespace) -> None:
    import sparsify_fx

    if not os.path.exists(args.file):
        raise BadInput(f"{args.file}: no such adapter file or directory")
    adapter = sparsify_fx.load_adapter(args.file)
    entries = [{"param": e.fqn, "dim": e.dim, "shape": list(e.shape), "count": int(e.index.numel()),
                "values": int(e.delta.numel())} for e in adapter.entries.values()]
    lines = [f"{args.file}: S²FT adapter, {adapter.num_parameters:,d} values in {len(entries)} tensors",
             f"  base model: {adapter.base_model or '(unnamed)'}"]
    if adapter.config:
        lines.append("  config: " + ", ".join(f"{k}={v}" for k, v in adapter.config.items()))
    for e in entries:
        lines.append(f"  {e['param']}  dim {e['dim']}: {e['count']} of {e['shape'][e['dim']]}  ({e['values']:,d} "
                     "values)")
    data = {"file": args.file, "base_model": adapter.base_model, "num_parameters": adapter.num_parameters,
            "config": adapter.config, "entries": entries, "fingerprint": adapter.fingerprint}
    _emit(args, data, "\n".join(lines))


def cmd_adapter_apply(args: argparse.Namespace) -> None:
    import sparsify_fx

    if not os.path.exists(args.file):
        raise BadInput(f"{args.file}: no such adapter file or directory")
    _check_out(args.out)
    adapter = sparsify_fx.load_adapter(args.file)
    loaded = load_model(args.base, weights=True)
    model = sparsify_fx.apply_adapter(loaded.model, adapter)
    if not hasattr(model, "save_pretrained"):
        raise BadInput(f"{loaded.name} has no save_pretrained; apply the adapter from Python")
    model.save_pretrained(args.out)
    data = {"file": args.file, "base": args.base, "num_parameters": adapter.num_parameters, "out": args.out}
    _emit(args, data, f"applied {args.file} ({adapter.num_parameters:,d} values) to {args.base}; saved to {args.out}")


# ---------------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """The ``sparsify-fx`` argument parser (its ``--help`` texts are the README's).

    Example::

        build_parser().parse_args(["inspect", "runs/llama", "--html", "report.html"])
    """
    model_help = "a Hugging Face model directory, its config.json, or package.module:factory"
    p = _Parser(prog=PROG, description="Coupled-structure inspection, S²FT planning, pruning and adapters.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    def shape(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--batch", type=int, default=2, help="example batch size traced (default 2)")
        sp.add_argument("--seq", type=int, default=8, help="example sequence length traced (default 8)")

    sp = sub.add_parser(Command.INSPECT.value, help="groups per layer, pinned spaces; --html writes the report",
                        description="Analyse MODEL (built on the meta device: no weights read) and print its "
                                    "coupled groups per layer and the pinned spaces with their reasons.")
    sp.add_argument("model", metavar="MODEL", help=model_help)
    sp.add_argument("--html", metavar="PATH", help="write the self-contained HTML report here")
    shape(sp)
    common(sp)
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser(Command.PLAN.value, help="what S²FT would train, parameter counts and a memory estimate",
                        description="Plan S²FT on MODEL (meta device) and print what trains per layer, parameter "
                                    "counts and training memory next to full fine-tuning and LoRA at the same "
                                    "count.")
    sp.add_argument("model", metavar="MODEL", help=model_help)
    sp.add_argument("--s2ft", metavar="K=V,...", default="",
                    help="S2FTConfig fields, e.g. attention_ratio=0.1,ffn_ratio=0.05 (lists joined by '+': "
                         "attention=v+o, layers=0+1)")
    sp.add_argument("--html", metavar="PATH", help="write the HTML report with the selected units marked")
    sp.add_argument("--batch-train", type=int, default=8, help="batch size of the activation estimate (default 8)")
    sp.add_argument("--seq-train", type=int, default=512, help="sequence length of the estimate (default 512)")
    shape(sp)
    common(sp)
    sp.set_defaults(func=cmd_plan)

    sp = sub.add_parser(Command.PRUNE.value, help="remove a fraction of heads and channels, save the smaller model",
                        description="Structured pruning of MODEL (a directory with weights); the result is "
                                    "written with save_pretrained.")
    sp.add_argument("model", metavar="MODEL", help="a Hugging Face model directory with weights, or "
                                                   "package.module:factory")
    sp.add_argument("--ratio", type=_ratio, required=True, help="fraction of each group's units removed, in [0, 1)")
    sp.add_argument("--score", default="magnitude", choices=("magnitude", "random"),
                    help="how units are ranked (default magnitude)")
    sp.add_argument("--out", required=True, metavar="DIR", help="directory to save the pruned model in")
    shape(sp)
    common(sp)
    sp.set_defaults(func=cmd_prune)

    sp = sub.add_parser(Command.ADAPTER.value, help="inspect or apply an S²FT adapter",
                        description="S²FT adapters: 'info' prints what one holds, 'apply' writes base + adapter.")
    asub = sp.add_subparsers(dest="action", required=True, metavar="ACTION")
    ap = asub.add_parser("info", help="what an adapter holds", description="Print an adapter's base model, "
                                                                            "config and tensors.")
    ap.add_argument("file", metavar="FILE|DIR", help="adapter .safetensors file or directory")
    common(ap)
    ap.set_defaults(func=cmd_adapter_info)
    ap = asub.add_parser("apply", help="apply an adapter to a base model and save the result",
                         description="Apply FILE to the base MODEL (a directory with weights) and save_pretrained "
                                     "the result in DIR.")
    ap.add_argument("file", metavar="FILE", help="adapter .safetensors file or directory")
    ap.add_argument("--base", required=True, metavar="MODEL", help="base model directory with weights")
    ap.add_argument("--out", required=True, metavar="DIR", help="directory to save the adapted model in")
    common(ap)
    ap.set_defaults(func=cmd_adapter_apply)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sparsify-fx`` with ``argv`` (default: the process's arguments); returns the exit code.

    Args:
        argv: the arguments after the program name.

    Example::

        main(["plan", "runs/llama/config.json", "--s2ft", "attention_ratio=0.1,ffn_ratio=0.05", "--json"])
    """
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BadInput as e:
        _fail(str(e), EXIT_BAD_INPUT)
    except CannotSave as e:
        _fail(str(e), EXIT_FAILED)
    except SparsifyError as e:  # the library's own errors name the cause and the fix: bad input, not a crash
        _fail(f"{type(e).__name__}: {e}", EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as e:  # noqa: BLE001 - one line for people; SPARSIFY_FX_DEBUG=1 shows the traceback
        if os.environ.get("SPARSIFY_FX_DEBUG"):
            raise
        _fail(f"{type(e).__name__}: {e}", EXIT_FAILED)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
