"""Bad input gets the library's own error, naming the field, the value and the fix, before the model is touched
(issue 12, item 7): config fields, ratios that round to zero units, NaN/inf calibration scores, sparse and adapter
file headers, and how files are written (mode, symlinks, fsync)."""

from __future__ import annotations

import copy
import json
import math
import os
import stat

import models
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import sparsify_fx
from sparsify_fx._io import save_safetensors_atomic, write_text_atomic
from sparsify_fx.errors import AdapterError, ConfigError
from sparsify_fx.passes.nm import BlockConfig, MaskedLinear, NMConfig, export_sparse, load_sparse, sparsify
from sparsify_fx.passes.prune import PruneConfig, prune
from sparsify_fx.passes.s2ft import S2FTConfig, ZeroUnitsWarning, s2ft, state_of

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
NAN_EMBEDS = {"inputs_embeds": torch.full((2, 8, 64), math.nan)}


def _llama(layers: int = 2, heads: int = 4, kv_heads: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return models.llama(layers=layers, heads=heads, kv_heads=kv_heads).eval()


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return _llama()


def _snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    # bit patterns, so NaN weights compare equal to themselves
    return t.reshape(-1).view(torch.uint8) if t.is_floating_point() else t


def _assert_untouched(model: torch.nn.Module, before: dict) -> None:
    now = _snapshot(model)
    assert now["types"] == before["types"]
    assert now["grad"] == before["grad"]
    assert now["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        assert v.dtype == now["state"][k].dtype and torch.equal(_bits(v), _bits(now["state"][k])), k
    assert getattr(model, "_sparsify_s2ft", None) is None


def _assert_refused(base: torch.nn.Module, match: str, run, poison: bool = False) -> None:
    """``run`` on a copy of ``base`` (its o_proj weights made NaN first when ``poison``) raises the library's
    ConfigError matching ``match`` and leaves the copy untouched."""
    model = copy.deepcopy(base)
    if poison:
        _poison_o_proj(model)
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=match):
        run(model)
    _assert_untouched(model, before)


# ---------------------------------------------------------------------------------------------------- S2FTConfig
S2FT_BAD = [
    ({"layers": 5}, r"layers must be a list of layer indices or None, got 5"),
    ({"layers": "0"}, r"layers must be a list of layer indices or None, got '0'"),
    ({"layers": [0, 0]}, r"names layer\(s\) \[0\] more than once"),
    ({"layers": [0.5]}, r"non-negative int layer indices, got \[0.5\]"),
    ({"layers": [True]}, r"non-negative int layer indices, got \[True\]"),
    ({"layers": [-1]}, r"non-negative int layer indices, got \[-1\]"),
    ({"attention": None}, r"attention must be a tuple of projection names, got None.*\(\) to leave"),
    ({"ffn": None}, r"ffn must be a tuple of projection names, got None.*\(\) to leave"),
    ({"attention": (1,)}, r"attention has unknown projection\(s\) \[1\]"),
    ({"seed": "abc"}, r"seed must be an int, got 'abc'"),
    ({"seed": 1.5}, r"seed must be an int, got 1.5"),
    ({"seed": True}, r"seed must be an int, got True"),
    ({"strategy": 3}, r"strategy must be random, magnitude, gradient or activation, got 3"),
    ({"layout": None}, r"layout must be 'view' or 'separate', got None"),
    ({"progress": "yes"}, r"progress must be True or False, got 'yes'"),
    ({"budget": 1.5}, r"budget must be a positive int .* got 1.5"),
    ({"budget": True}, r"budget must be a positive int .* got True"),
    ({"attention_ratio": math.nan}, r"attention_ratio must be a finite number in \(0, 1\], got nan"),
    ({"ffn_ratio": math.inf}, r"ffn_ratio must be a finite number in \(0, 1\], got inf"),
    ({"ffn_ratio": "0.1"}, r"ffn_ratio must be a finite number in \(0, 1\], got '0.1'"),
    ({"scope": None}, r"scope must be 'per_layer' or 'global', got None"),
    ({"calibration": 5}, r"calibration must be an iterable of batches .* got int"),
    ({"strategy": "gradient", "calibration": [IDS], "loss_fn": 3}, r"loss_fn must be a callable .* got 3"),
    ({"layers": [7]}, r"layers names layers \[7\] that the model does not have: \[0, 1\]"),  # bounded by the model
]


@pytest.mark.parametrize("kwargs,match", S2FT_BAD, ids=[str(k) for k, _ in S2FT_BAD])
def test_s2ft_config_refused_before_the_model_is_touched(base, kwargs, match):
    _assert_refused(base, match, lambda model: s2ft(model, (IDS,), S2FTConfig(**kwargs)))


def test_s2ft_config_list_of_projections_is_a_tuple():
    assert S2FTConfig(attention=["v", "o"]).attention == ("v", "o")


# ------------------------------------------------------------------------------------- ratios that select nothing
def test_default_ratio_rounding_to_zero_heads_warns_with_the_ratio_that_selects_one():
    model = _llama(heads=4, kv_heads=4)  # round(0.1 * 4) = 0 heads per layer
    # min_units=0: ratios may round to nothing (the default min_units=1 trains one head: test_s2ft_defaults.py)
    with pytest.warns(ZeroUnitsWarning, match=r"attention_ratio 0.1 selects 0 of 4 heads per layer.*0.25 or more "
                                              r"selects one"):
        s2ft(model, (IDS,), S2FTConfig(progress=False, min_units=0))
    kinds = {u.kind for u in state_of(model).units}
    assert kinds == {"ffn"}  # what the warning says: no attention trains


def test_ratio_that_selects_no_unit_anywhere_is_an_error_with_the_hint(base):
    model = copy.deepcopy(base)  # GQA: v travels with the 2 kv heads
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=r"select no unit at all.*attention_ratio 0.1 selects 0 of 2 heads per "
                                          r"layer.*0.5 or more selects one"):
        s2ft(model, (IDS,), S2FTConfig(ffn=(), attention_ratio=0.1, progress=False, min_units=0))
    _assert_untouched(model, before)


def test_global_scope_rounding_to_zero_is_an_error_with_the_hint(base):
    model = copy.deepcopy(base)
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=r"ffn_ratio 0.001 selects 0 of 256 channels across layers "
                                          r"\(scope='global'\).*0.003906 or more selects one"):
        s2ft(model, (IDS,), S2FTConfig(attention=(), ffn_ratio=0.001, scope="global", progress=False, min_units=0))
    _assert_untouched(model, before)


# ------------------------------------------------------------------------------------ non-finite calibration scores
def _scaled_loss(model, batch):
    ids, scale = batch
    return model(ids).logits.float().pow(2).mean() * scale


def _poison_o_proj(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = math.nan
        model.model.layers[1].mlp.down_proj.weight[0, 0] = math.inf
    return model


S2FT_NAN = [
    ({"strategy": "gradient", "calibration": [(IDS, 1.0), (IDS, math.nan)], "loss_fn": _scaled_loss},
     r"strategy='gradient': calibration batch 1 gives a non-finite loss \(nan\)"),
    ({"strategy": "activation", "calibration": [{"input_ids": IDS}, NAN_EMBEDS]},
     r"strategy='activation': calibration batch 1 gives non-finite activations \(NaN/inf\) at the input of "
     r"model\.layers\.0\."),
    ({"strategy": "magnitude", "_poison": True}, r"strategy='magnitude': the weights of .* hold NaN/inf values"),
]


@pytest.mark.parametrize("kwargs,match", S2FT_NAN, ids=["gradient", "activation", "magnitude"])
def test_s2ft_non_finite_scores_refused(base, kwargs, match):
    kwargs = dict(kwargs)
    poison = kwargs.pop("_poison", False)
    cfg = {"attention_ratio": 0.5, "ffn_ratio": 0.25, "progress": False, **kwargs}
    _assert_refused(base, match, lambda model: s2ft(model, (IDS,), S2FTConfig(**cfg)), poison)


PRUNE_BAD = [
    ({"score": "taylor", "calibration": [(IDS, 1.0), (IDS, math.inf)], "loss_fn": _scaled_loss},
     r"score='taylor': calibration batch 1 gives a non-finite loss \(inf\)"),
    ({"score": "activation", "calibration": [{"input_ids": IDS}, NAN_EMBEDS]},
     r"calibration batch 1 gives non-finite activations \(NaN/inf\) at the input of model\.layers\.0\."),
    ({"score": "magnitude", "_poison": True}, r"score='magnitude': the weights of .* hold NaN/inf values"),
    ({"seed": "abc"}, r"PruneConfig.seed must be an int, got 'abc'"),
    ({"verify": "yes"}, r"PruneConfig.verify must be True or False, got 'yes'"),
    ({"progress": None}, r"PruneConfig.progress must be True or False, got None"),
    ({"calibration": 5, "score": "activation"}, r"PruneConfig.calibration must be an iterable .* got int"),
    ({"loss_fn": 3, "score": "taylor"}, r"PruneConfig.loss_fn must be a callable .* got 3"),
    ({"ratio": None}, r"PruneConfig.ratio must be a float in \[0, 1\) or a dict"),
    ({"ratio": math.nan}, r"PruneConfig.ratio must be in \[0, 1\) .* got nan"),
]


@pytest.mark.parametrize("kwargs,match", PRUNE_BAD, ids=[str(sorted(k)) + str(i) for i, (k, _) in enumerate(PRUNE_BAD)])
def test_prune_bad_input_refused(base, kwargs, match):
    kwargs = dict(kwargs)
    poison = kwargs.pop("_poison", False)
    cfg = {"progress": False, **kwargs}
    _assert_refused(base, match, lambda model: prune(model, (IDS,), PruneConfig(**cfg)), poison)


# ------------------------------------------------------------------------------------------------- NM / block
NM_BAD = [
    (NMConfig(n=2, m=2**40), r"m=1099511627776 exceeds 256"),
    (NMConfig(n=2, m=128, padding="zero"), r"m=128 is too large for in_features=64 \(padding='zero' allows groups "
                                           r"up to 127.*pick m <= 64"),
    (NMConfig(n=2, m=128), r"m=128 is too large for in_features=64 \(padding='none' allows groups up to 64"),
    (BlockConfig(block=(2**20, 16), padding="zero"), r"block \(1048576, 16\) is too large for weight \(64, 64\)"),
    (BlockConfig(block=(16, 1.5)), r"two positive ints"),
    (NMConfig(n=True, m=4), r"0 < n <= m, got n=True"),
    (NMConfig(n=2, m=4.0), r"0 < n <= m, got n=2, m=4.0"),
    (NMConfig(n="2", m=4), r"0 < n <= m, got n='2'"),
    (NMConfig(progress="yes"), r"progress must be True or False, got 'yes'"),
    (NMConfig(score="wanda", calibration=5), r"calibration must be an iterable of example inputs or None, got int"),
]


@pytest.mark.parametrize("config,match", NM_BAD, ids=[m[:24] for _, m in NM_BAD])
def test_sparsify_sizes_bounded_before_allocation(base, config, match):
    _assert_refused(base, match, lambda model: sparsify(model, config))


# ------------------------------------------------------------------------------------------------- sparse files
@pytest.fixture(scope="module")
def sparse_files(tmp_path_factory, base):
    d = tmp_path_factory.mktemp("sparse")
    out = {}
    for name, cfg in (("nm", NMConfig(n=2, m=4, progress=False)),
                      ("block", BlockConfig(block=(16, 16), density=0.5, progress=False))):
        model = copy.deepcopy(base)
        sparsify(model, cfg)
        export_sparse(model, d / f"{name}.safetensors")
        out[name] = (d / f"{name}.safetensors", model)
    return out


def _rewrite(src, dst, entry=None, meta=None, delta=None, entries="layers"):
    """Copy a saved file to ``dst`` with edits: ``entry`` edits the first item of the JSON list in header field
    ``entries`` (a sparse file's "layers", an adapter's "entries"), ``meta`` the header dict, and ``delta`` is
    written into the adapter's first delta."""
    with safe_open(str(src), framework="pt") as f:
        md = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if entry is not None:
        items = json.loads(md[entries])
        entry(items[0])
        md[entries] = json.dumps(items)
    if meta is not None:
        meta(md)
    if delta is not None:
        tensors["0.delta"] = tensors["0.delta"].clone()
        tensors["0.delta"].view(-1)[3] = delta
    save_file(tensors, str(dst), metadata=md)
    return dst


def _set(**kw):
    return lambda e: e.update(kw)


SPARSE_BAD = [
    ("nm", _set(m=0), None, r"layer entry 0 has m=0; expected an int in \[1, 127\] for in_features=64"),
    ("nm", _set(m=-4), None, r"layer entry 0 has m=-4"),
    ("nm", _set(m=2**40), None, r"layer entry 0 has m=1099511627776"),
    ("nm", _set(m="4"), None, r"layer entry 0 has m='4'"),
    ("nm", _set(n=1.5), None, r"layer entry 0 has n=1.5; expected an int in \[1, m=4\]"),
    ("nm", _set(packed="yes"), None, r"layer entry 0 has packed='yes'"),
    ("nm", _set(shape=[-1, 64]), None, r"layer entry 0 has shape=\[-1, 64\]; expected two positive ints"),
    ("nm", _set(shape=[2**40, 64]), None, r"is not an nn.Linear/Conv1D of \[out, in\] shape \[1099511627776, 64\]"),
    ("nm", _set(shape=["64", 64]), None, r"layer entry 0 has shape=\['64', 64\]"),
    ("nm", _set(kind="xyz"), None, r"layer entry 0 has kind='xyz'; expected 'nm' or 'block'"),
    ("nm", _set(fqn=3), None, r"layer entry 0 has fqn=3"),
    ("block", _set(block=[0, 16]), None, r"layer entry 0 has block=\[0, 16\]"),
    ("block", _set(block=[2**30, 16]), None, r"layer entry 0 has block=\[1073741824, 16\]"),
    ("nm", None, _set(version="abc"), r"not a sparsify_fx sparse export of version <= 1 .*version='abc'"),
    ("nm", None, _set(layers="{}"), r"header field 'layers' must be a non-empty list"),
]


@pytest.mark.parametrize("kind,entry,meta,match", SPARSE_BAD, ids=[m[:30] for *_, m in SPARSE_BAD])
def test_load_sparse_bad_header_refused(tmp_path, base, sparse_files, kind, entry, meta, match):
    path = _rewrite(sparse_files[kind][0], tmp_path / "bad.safetensors", entry, meta)
    model = copy.deepcopy(base)
    before = _snapshot(model)
    with pytest.raises(ConfigError, match=match) as err:
        load_sparse(model, path)
    assert str(err.value).startswith("load_sparse: ") and str(path) in str(err.value)  # names the file
    _assert_untouched(model, before)


def test_load_sparse_refuses_a_model_with_more_layers(sparse_files):
    bigger = _llama(layers=3)
    before = _snapshot(bigger)
    with pytest.raises(ConfigError, match=r"exported from another model \(15 linear layers there, 22 here\): this "
                                          r"model lacks \[\] and has \['model.layers.2.mlp.down_proj'"):
        load_sparse(bigger, sparse_files["nm"][0])
    _assert_untouched(bigger, before)


def test_load_sparse_refuses_masked_layers_the_file_does_not_cover(tmp_path, base):
    one = copy.deepcopy(base)
    sparsify(one, NMConfig(include=["model.layers.0.*"], progress=False))
    export_sparse(one, tmp_path / "l0.safetensors")
    other = copy.deepcopy(base)
    sparsify(other, NMConfig(include=["model.layers.1.*"], progress=False))
    before = _snapshot(other)
    with pytest.raises(ConfigError, match=r"masked layers \['model.layers.1.self_attn.q_proj'.* are not in"):
        load_sparse(other, tmp_path / "l0.safetensors")
    _assert_untouched(other, before)


def test_load_sparse_reads_files_without_the_layer_list(tmp_path, base, sparse_files):
    src, sparse = sparse_files["nm"]
    old = _rewrite(src, tmp_path / "old.safetensors", meta=lambda m: m.pop("linear_layers"))
    model = copy.deepcopy(base)
    load_sparse(model, old)
    assert isinstance(model.model.layers[0].self_attn.q_proj, MaskedLinear)
    for k, v in sparse.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


# ------------------------------------------------------------------------------------------------- adapter files
@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory, base):
    model = copy.deepcopy(base)
    s2ft(model, (IDS,), S2FTConfig(attention_ratio=0.5, ffn_ratio=0.25, progress=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    path = tmp_path_factory.mktemp("adapter") / "a.safetensors"
    sparsify_fx.export_adapter(model).save(path)
    return path


ADAPTER_BAD = [
    ({"meta": _set(version="abc")}, r"header field version='abc' is not a non-negative integer"),
    ({"meta": _set(fingerprint="")}, r"header field fingerprint='' is not a hash string"),
    ({"meta": _set(config="[1]")}, r"header field config=\[1\] is not a JSON object"),
    ({"meta": _set(entries="{not json")}, r"a header field is not JSON"),
    ({"entry": _set(dim=5)}, r"entry 0 \(.*\) field dim=5 is not a dim of its 2-D shape"),
    ({"entry": _set(dim=1.0)}, r"entry 0 \(.*\) field dim=1.0 is not a dim"),
    ({"entry": _set(dim=True)}, r"entry 0 \(.*\) field dim=True is not a dim"),
    ({"entry": _set(shape=[-64, 64])}, r"entry 0 \(.*\) field shape=\[-64, 64\] is not a list of positive ints"),
    ({"entry": _set(shape=[64.0, 64])}, r"entry 0 \(.*\) field shape=\[64.0, 64\] is not a list of positive ints"),
    ({"entry": _set(fqn=7)}, r"entry 0 field fqn=7 is not a parameter name"),
    ({"delta": math.nan}, r"entry 0 \(.*\): delta holds 1 NaN/inf values"),
    ({"delta": -math.inf}, r"entry 0 \(.*\): delta holds 1 NaN/inf values"),
]


@pytest.mark.parametrize("edit,match", ADAPTER_BAD, ids=[m[:30] for _, m in ADAPTER_BAD])
def test_load_adapter_bad_header_refused(tmp_path, adapter_file, edit, match):
    path = _rewrite(adapter_file, tmp_path / "bad.safetensors", entries="entries", **edit)
    with pytest.raises(AdapterError, match=r"bad\.safetensors.*" + match):
        sparsify_fx.load_adapter(path)


def test_load_adapter_good_file_still_loads(adapter_file, base):
    adapter = sparsify_fx.load_adapter(adapter_file)
    model = copy.deepcopy(base)
    before = _snapshot(model)
    sparsify_fx.apply_adapter(model, adapter)
    sparsify_fx.remove_adapter(model)
    _assert_untouched(model, before)


# ------------------------------------------------------------------------------------------------- file writing
# both writers share _io's temp-file/mode/symlink/fsync logic; each test runs on both
TENSORS = {"w": torch.arange(6, dtype=torch.float32)}
TEXT = '{"format": "t"}'


def _write(kind: str, path) -> None:
    if kind == "safetensors":
        save_safetensors_atomic(TENSORS, path, {"format": "t"}, prefix=".t-")
    else:
        write_text_atomic(TEXT, path, prefix=".t-")


def _holds_new(kind: str, path) -> bool:
    if kind == "text":
        return open(path, encoding="utf-8").read() == TEXT
    with safe_open(str(path), framework="pt") as f:
        return torch.equal(f.get_tensor("w"), TENSORS["w"])


WRITERS = ["safetensors", "text"]


@pytest.mark.parametrize("kind", WRITERS)
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_new_file_gets_the_umask_mode(tmp_path, umask, mode, kind):
    old = os.umask(umask)
    try:
        _write(kind, tmp_path / "f")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "f").st_mode) == mode


@pytest.mark.parametrize("kind", WRITERS)
def test_existing_file_keeps_its_mode(tmp_path, kind):
    path = tmp_path / "f"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    _write(kind, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert _holds_new(kind, path)


@pytest.mark.parametrize("kind", WRITERS)
def test_symlink_is_written_through(tmp_path, kind):
    (tmp_path / "store").mkdir()
    target = tmp_path / "store" / "real"
    target.write_bytes(b"old")
    link = tmp_path / "link"
    os.symlink(target, link)
    _write(kind, link)
    assert os.path.islink(link) and os.readlink(link) == str(target)
    assert _holds_new(kind, target)
    assert sorted(os.listdir(tmp_path / "store")) == ["real"]  # no temp file left


@pytest.mark.parametrize("kind", WRITERS)
def test_fsync_before_rename_and_directory_after(tmp_path, monkeypatch, kind):
    events: list[tuple] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        st = os.fstat(fd)
        events.append(("fsync", stat.S_ISDIR(st.st_mode), st.st_ino))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace",))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    path = tmp_path / "f"
    _write(kind, path)
    assert events == [
        ("fsync", False, os.stat(path).st_ino),  # the data, under its temp name (same inode)
        ("replace",),
        ("fsync", True, os.stat(tmp_path).st_ino),  # the directory entry
    ]


@pytest.mark.parametrize("kind", WRITERS)
def test_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch, kind):
    path = tmp_path / "f"
    path.write_bytes(b"old")

    def refuse(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(KeyboardInterrupt):
        _write(kind, path)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f"]
