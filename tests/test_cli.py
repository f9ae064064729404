"""``sparsify-fx`` run as a subprocess (issue 17): inspect, plan, prune, adapter info/apply on real tiny checkpoints
saved with ``save_pretrained``; --json output checked against the same calls made in Python; bad input gets one
line naming the cause and exit code 2, with nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import models
import pytest
import tomllib
import torch

import sparsify_fx

REPO = Path(__file__).resolve().parents[1]
IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run([sys.executable, "-m", "sparsify_fx", *args], capture_output=True, text=True, timeout=600,
                          cwd=cwd or REPO, env=env)


def _json(*args: str, cwd: Path | None = None) -> dict:
    out = _run(*args, "--json", cwd=cwd)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    models.llama(heads=4, kv_heads=2).save_pretrained(root / "llama")
    models.gpt2(heads=4).save_pretrained(root / "gpt2")
    (root / "config_only").mkdir()
    shutil.copy(root / "gpt2" / "config.json", root / "config_only" / "config.json")
    return {"llama": root / "llama", "gpt2": root / "gpt2", "config_only": root / "config_only"}


def test_inspect_llama_dir_json_groups_per_layer_and_html(ckpt, tmp_path):
    page = tmp_path / "r.html"
    data = _json("inspect", str(ckpt["llama"]), "--html", str(page))
    ref = sparsify_fx.analyze(models.llama(heads=4, kv_heads=2), (IDS,))
    assert [g["name"] for g in data["groups"]] == [g.name for g in ref.groups]
    kv = [g for g in data["groups"] if g["kind"] == "kv_heads"]
    assert [(g["layer"], g["units"], g["group_size"]) for g in kv] == [(0, 2, 2), (1, 2, 2)]
    assert [g["units"] for g in data["groups"] if g["kind"] == "ffn_channels"] == [128, 128]
    assert {r for p in data["pinned"] for r in p["reasons"]} == {r for p in ref.pinned for r in p.reasons}
    assert page.read_text().count('data-kind="head"') == 8 and page.read_text().count('data-kind="ffn"') == 256


def test_inspect_text_from_config_json_and_from_a_factory(ckpt, tmp_path):
    out = _run("inspect", str(ckpt["gpt2"] / "config.json"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "layer 0: attention_heads 4x16" in out.stdout and "ffn_channels 256" in out.stdout
    assert "pinned io_features 128 (transformer.wte.weight[0], lm_head.weight[0])" in out.stdout
    (tmp_path / "my_factory.py").write_text(
        "import torch, torch.nn as nn\n"
        "def make():\n"
        "    m = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))\n"
        "    return m, (torch.randn(2, 8),)\n"
    )
    data = _json("inspect", "my_factory:make", cwd=tmp_path)
    assert [(g["kind"], g["units"]) for g in data["groups"]] == [("ffn_channels", 32)]


def test_plan_matches_s2ft_in_python_and_states_the_memory_formula(ckpt):
    data = _json("plan", str(ckpt["gpt2"]), "--s2ft", "attention_ratio=0.25,ffn_ratio=0.05", "--seq-train", "128")
    model = models.gpt2(heads=4)
    total = sum(p.numel() for p in model.parameters())  # before: trained blocks are views that would count twice
    sparsify_fx.s2ft(model, (IDS,), sparsify_fx.S2FTConfig(attention_ratio=0.25, ffn_ratio=0.05, progress=False))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert data["trainable"] == trainable and data["total"] == total
    assert [(r["layer"], r["kind"], r["selected"], r["units"]) for r in data["layers"]] == [
        (0, "attention_heads", 1, 4), (0, "ffn_channels", 13, 256), (1, "attention_heads", 1, 4),
        (1, "ffn_channels", 13, 256)]
    assert sum(r["params"] for r in data["layers"]) == trainable
    mem, tokens = data["memory"], 8 * 128
    for key in ("full", "s2ft", "lora"):
        n = mem[key]["trainable"]
        assert mem[key]["grads"] == 4 * n and mem[key]["optimizer"] == 8 * n  # fp32 grads, AdamW's two fp32 moments
        assert mem[key]["total"] == mem[key]["grads"] + mem[key]["optimizer"] + mem[key]["activations"]
    # full FT keeps every linear's input: 2 layers x (c_attn 64 + c_proj 64 + c_fc 64 + mlp c_proj 256) + lm_head 64
    assert mem["full"]["activations"] == tokens * 4 * (2 * (64 + 64 + 64 + 256) + 64)
    # S²FT: c_attn (v rows) and c_fc (up rows) keep their whole input, c_proj / mlp.c_proj only the 16 / 13 columns
    assert mem["s2ft"]["activations"] == tokens * 4 * 2 * (64 + 16 + 64 + 13)
    # LoRA at (about) the same count on the same four modules keeps their inputs and the rank-r intermediate
    r = mem["lora"]["rank"]
    assert r == round(trainable / (2 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))))
    assert mem["lora"]["activations"] == tokens * 4 * 2 * (64 + 64 + 64 + 256 + 4 * r)
    assert mem["s2ft"]["total"] < mem["lora"]["total"] < mem["full"]["total"]


def test_prune_saves_what_prune_gives_in_python(ckpt, tmp_path):
    from transformers import LlamaForCausalLM

    out_dir = tmp_path / "pruned"
    data = _json("prune", str(ckpt["llama"]), "--ratio", "0.25", "--out", str(out_dir))
    ref = sparsify_fx.prune(LlamaForCausalLM.from_pretrained(ckpt["llama"]), (IDS,),
                            sparsify_fx.PruneConfig(ratio=0.25, progress=False))
    got = LlamaForCausalLM.from_pretrained(out_dir)
    assert data["params_after"] == sum(p.numel() for p in ref.parameters()) < data["params_before"]
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    assert all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    assert torch.equal(got(IDS).logits, ref(IDS).logits)


def test_adapter_info_and_apply_match_python(ckpt, tmp_path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(ckpt["llama"])
    sparsify_fx.s2ft(model, (IDS,), sparsify_fx.S2FTConfig(attention_ratio=0.5, ffn_ratio=0.1, progress=False))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    adapter = sparsify_fx.export_adapter(model)
    file = tmp_path / "task.safetensors"
    adapter.save(file)

    info = _json("adapter", "info", str(file))
    assert info["num_parameters"] == adapter.num_parameters
    assert {e["param"] for e in info["entries"]} == set(adapter.entries)

    out_dir = tmp_path / "adapted"
    _json("adapter", "apply", str(file), "--base", str(ckpt["llama"]), "--out", str(out_dir))
    ref = sparsify_fx.apply_adapter(LlamaForCausalLM.from_pretrained(ckpt["llama"]), sparsify_fx.load_adapter(file))
    got = LlamaForCausalLM.from_pretrained(out_dir)
    ref_sd, got_sd = ref.state_dict(), got.state_dict()
    assert all(torch.equal(ref_sd[k], got_sd[k]) for k in ref_sd)
    base = LlamaForCausalLM.from_pretrained(ckpt["llama"]).state_dict()
    assert not all(torch.equal(base[k], got_sd[k]) for k in base)  # the adapter did change something


def test_prune_refuses_a_result_its_config_cannot_rebuild(ckpt, tmp_path):
    # GPT-2 derives its head size from n_embd / n_head: with a head removed, from_pretrained would rebuild other
    # shapes, so the command says so and writes nothing
    out = _run("prune", str(ckpt["gpt2"]), "--ratio", "0.25", "--out", str(tmp_path / "out"))
    assert out.returncode == 1 and "its config no longer rebuilds it" in out.stderr, out.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def _bad(tmp: Path, ckpt: dict[str, Path]) -> list[tuple[list[str], str]]:
    llama, gpt2 = str(ckpt["llama"]), str(ckpt["gpt2"])
    return [
        (["inspect", str(tmp)], r"is not a model: the directory has no config\.json"),
        (["inspect", str(tmp / "nope")], r"is not a model: no such file or directory"),
        (["inspect", llama, "--frobnicate"], r"unrecognized arguments: --frobnicate"),
        (["inspect", "no_such_module_xyz:make"], r"is not a model factory: ModuleNotFoundError"),
        (["plan", llama, "--s2ft", "bogus=1"], r"unknown option 'bogus'; options are .*attention_ratio"),
        (["plan", llama, "--s2ft", "attention_ratio=1.5"], r"ConfigError: .*attention_ratio"),
        (["prune", llama, "--ratio", "1.5", "--out", str(tmp / "out")], r"ratio must be in \[0, 1\)"),
        (["prune", gpt2, "--ratio", "abc", "--out", str(tmp / "out")], r"ratio must be a number"),
        (["prune", str(ckpt["config_only"]), "--ratio", "0.25", "--out", str(tmp / "out")], r"has no weights"),
        (["adapter", "info", str(tmp / "missing.safetensors")], r"no such adapter file"),
    ]


def test_bad_input_one_line_exit_2_nothing_written(ckpt, tmp_path):
    import re

    for args, cause in _bad(tmp_path, ckpt):
        out = _run(*args)
        assert out.returncode == 2, (args, out.stderr[-2000:])
        lines = [line for line in out.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("sparsify-fx: error: "), (args, out.stderr)
        assert re.search(cause, lines[0]), (args, lines[0])
        assert out.stdout == ""
    assert not (tmp_path / "out").exists()


def test_help_texts_and_console_script():
    for args in ([], ["inspect"], ["plan"], ["prune"], ["adapter"], ["adapter", "info"], ["adapter", "apply"]):
        out = _run(*args, "--help")
        assert out.returncode == 0 and out.stdout.startswith("usage: sparsify-fx"), (args, out.stderr)
    assert "attention_ratio=0.1,ffn_ratio=0.05" in _run("plan", "--help").stdout
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"sparsify-fx": "sparsify_fx.cli:main"}
    exe = Path(sys.executable).with_name("sparsify-fx")
    if exe.exists():  # installed by `make setup` (pyproject.toml changes re-run the editable install)
        out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "inspect" in out.stdout
