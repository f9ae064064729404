"""The catalog's coverage metric on multimodal models and conv FFNs (benchmarks/catalog.py): towers the generic
inputs do not reach are driven through the model's own forward (combined inputs) or analysed as models of their own,
whatever stays unread is listed as unreached and counts as not covered, conv FFNs count through their conv-channel
groups, and attention modules that never split features into heads are not counted."""

from __future__ import annotations

import models
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

catalog = models.load_catalog()


@pytest.fixture
def coverage_only(monkeypatch):
    # s2ft and prune are the sample's business (test_catalog.py); here only coverage and the towers' soundness count
    monkeypatch.setattr(catalog, "_s2ft", lambda *a, **k: None)
    monkeypatch.setattr(catalog, "_prune", lambda *a, **k: None)


# ---------------------------------------------------------------------- the metric on a toy model
class ToyAttention(nn.Module):
    def __init__(self, d: int = 16, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, t, d = x.shape

        def split(y):
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(b, t, d))


class AdditiveAttention(nn.Module):  # SwiftFormer's shape: one global query, no split into heads
    def __init__(self, d: int = 16):
        super().__init__()
        self.q, self.k, self.proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.w = nn.Parameter(torch.randn(d, 1))

    def forward(self, x):
        q, k = self.q(x), self.k(x)
        g = ((q @ self.w).softmax(dim=1) * q).sum(dim=1, keepdim=True)
        return self.proj(g * k) + q


class ConvFFN(nn.Module):  # VITS's shape: pointwise convolutions over [batch, channels, time]
    def __init__(self, d: int = 16, inner: int = 32):
        super().__init__()
        self.up, self.down = nn.Conv1d(d, inner, 1), nn.Conv1d(inner, d, 1)

    def forward(self, x):
        return self.down(F.gelu(self.up(x.transpose(1, 2)))).transpose(1, 2)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn, self.additive, self.ffn = ToyAttention(), AdditiveAttention(), ConvFFN()
        self.spare = ToyAttention()  # built, never called: a tower the inputs do not reach

    def forward(self, x):
        return self.ffn(self.additive(self.attn(x)))


def test_metric_counts_unreached_as_uncovered_conv_ffn_as_covered_and_skips_headless_attention():
    model = Toy().eval()
    tg, report = catalog._analyse(model, {"x": torch.randn(2, 5, 16)})
    cov = {m.fqn: m for m in catalog.assess_modules(model, catalog.coverage_modules(model), report, tg)}
    assert set(cov) == {"attn", "additive", "spare", "ffn"}
    assert cov["attn"].covered and cov["attn"].reached and not cov["attn"].headless
    assert cov["additive"].headless and not cov["additive"].covered  # no reshape into heads: not counted
    assert not cov["spare"].reached and not cov["spare"].covered
    assert cov["ffn"].covered  # its channels are a conv_channels group, not ffn_channels
    assert {g.kind for g in report.groups} >= {"attention_heads", "conv_channels"}
    assert "ffn_channels" not in {g.kind for g in report.groups}
    assert catalog.count_coverage(list(cov.values())) == {"attention": [1, 2], "ffn": [1, 1]}
    # without the graph (the old metric): the spare module counts as covered-or-not by its groups alone
    assert catalog.layer_coverage(model, report) == {"attention": [1, 3], "ffn": [1, 1]}


# ---------------------------------------------------------------------- catalog types
def test_audio_tower_without_a_feature_getter_is_analysed_as_its_own_model(coverage_only):
    # Qwen2-Audio's placeholder rows cannot be counted generically (no get_audio_features), so its audio encoder
    # (a PreTrainedModel, main input input_features) is analysed apart and its heads merge into the record
    rec = catalog.run_model("qwen2_audio")
    assert rec.analysed, rec.analysis_error
    assert rec.combined_inputs.startswith("not used: LookupError"), rec.combined_inputs
    assert [(t["module"], t["class"], t["inputs"], t["error"]) for t in rec.towers] == [
        ("audio_tower", "Qwen2AudioEncoder", ["input_features"], "")]
    assert rec.towers[0]["attention"] == [2, 2]
    assert rec.attention_layers == [4, 4] and rec.ffn_layers == [2, 2]
    assert rec.unreached == [] and rec.broken_groups == []  # the tower's groups were permuted too
    assert rec.full_coverage


def test_vision_tower_is_analysed_as_its_own_model(coverage_only):
    rec = catalog.run_model("t5gemma2")
    assert [(t["module"], t["class"], t["inputs"], t["error"]) for t in rec.towers] == [
        ("encoder.vision_tower", "SiglipVisionModel", ["pixel_values"], "")]
    assert rec.towers[0]["attention"] == [3, 3] and rec.towers[0]["ffn"] == [2, 2]
    assert rec.attention_layers == [7, 7] and rec.ffn_layers == [6, 6]
    assert rec.unreached == [] and rec.broken_groups == []


def test_combined_inputs_drive_the_audio_tower_through_the_model(coverage_only):
    # GLM-ASR's config names an audio placeholder token (moved into the shrunk vocabulary) and the model counts its
    # rows: the audio encoder runs inside the model's own forward, and no tower is analysed apart
    rec = catalog.run_model("glmasr")
    assert rec.inputs[:2] == ["input_ids", "input_features"], rec.combined_inputs
    assert "audio_token_id placeholders" in rec.combined_inputs and "more modules reached" in rec.combined_inputs
    assert rec.towers == [] and rec.unreached == []
    assert rec.attention_layers == [4, 4] and rec.ffn_layers == [4, 4]
    assert rec.broken_groups == []


def test_conv_ffn_and_additive_attention(coverage_only):
    rec = catalog.run_model("swiftformer")
    assert rec.ffn_layers == [4, 4] and rec.groups.get("ffn_channels", 0) == 0  # covered by conv_channels
    assert len(rec.headless_attention) == 4 and rec.attention_layers == [0, 0]
    assert rec.full_coverage and rec.broken_groups == []


def test_a_model_run_without_encoder_states_is_analysed_apart_with_them(coverage_only):
    # BlipModel never passes image states to its text model, whose self-attention runs and whose cross-attention
    # does not: the text model is analysed apart, with encoder states, and covers both
    rec = catalog.run_model("blip")
    assert [t["module"] for t in rec.towers] == ["text_model"], rec.towers
    assert "encoder_hidden_states" in rec.towers[0]["inputs"] and rec.towers[0]["unreached"] == 0
    assert rec.unreached == [] and rec.attention_layers == [6, 6] and rec.full_coverage
    assert rec.broken_groups == []


class GridTower(nn.Module):  # a vision tower of its own whose forward needs a patch grid nobody generates
    main_input_name = "pixel_values"

    def __init__(self):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig()
        self.attn = ToyAttention()

    def forward(self, pixel_values, grid):
        return self.attn(pixel_values.flatten(2).transpose(1, 2)[..., :16])


class ToyWithTower(Toy):
    def __init__(self):
        super().__init__()
        from transformers import PretrainedConfig

        self.config = PretrainedConfig()
        self.spare = GridTower()


def test_unreached_modules_are_listed_and_in_the_table(tmp_path, coverage_only, monkeypatch):
    # the tower analysed apart fails (its forward requires an argument the generator does not make), and its
    # modules are listed unreached, not dropped
    monkeypatch.setattr(catalog, "build", lambda model_type, seed=0, config=None: (
        ToyWithTower().eval(), {"x": torch.randn(2, 5, 16)}))
    rec = catalog.run_model("toy")
    assert rec.analysed, rec.analysis_error
    assert rec.combined_inputs.startswith("not used: LookupError"), rec.combined_inputs
    assert rec.unreached == ["spare.attn"]
    assert [(t["module"], t["class"]) for t in rec.towers] == [("spare", "GridTower")]
    assert "requires 'grid'" in rec.towers[0]["error"] and rec.towers[0]["unreached"] == 1
    assert not rec.full_coverage and rec.attention_layers == [1, 2] and rec.broken_groups == []
    summary = catalog.write_results([rec], tmp_path)
    assert summary["unreached_modules"] == [1, 1]
    md = (tmp_path / "catalog.md").read_text()
    assert "- unreached (1): `spare.attn`" in md


@pytest.mark.parametrize("model_type", ["minicpmv4_6", "minicpmv4_7"])
def test_packed_patches_drive_the_vision_tower_through_the_model(model_type, coverage_only):
    # MiniCPM-V's tower reads NaViT-packed patches with each image's grid (target_sizes); 4.7's M-RoPE also needs
    # mm_token_type_ids. Packed, the tower, its window merger and the model's merger all run in the model's forward
    rec = catalog.run_model(model_type)
    assert rec.inputs[:3] == ["input_ids", "pixel_values", "target_sizes"], rec.combined_inputs
    assert "packed patches" in rec.combined_inputs and "image_token_id placeholders" in rec.combined_inputs
    assert rec.towers == [] and rec.unreached == [] and rec.full_coverage
    assert rec.attention_layers == [4, 4] and rec.ffn_layers == [5, 5] and rec.broken_groups == []


def test_packed_patches_read_one_patch_per_column():
    images = torch.randn(2, 3, 16, 24)
    packed, grid = catalog.packed_patches(images, 8)
    assert packed.shape == (1, 3, 8, 2 * 2 * 3 * 8) and grid.tolist() == [[2, 3], [2, 3]]
    conv = nn.Conv2d(3, 5, 8, stride=8)
    expect = conv(images).flatten(2).transpose(1, 2).reshape(1, -1, 5)  # image-major, row-major patches
    torch.testing.assert_close(conv(packed).flatten(2).transpose(1, 2), expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="at least the patch size"):
        catalog.packed_patches(torch.randn(1, 3, 4, 4), 8)


def test_a_layer_index_past_the_shrunk_stack_moves_inside_it():
    cfg = catalog.small_config("minicpmv4_6")
    assert cfg.vision_config.num_hidden_layers == catalog.LAYERS
    assert cfg.insert_layer_id == cfg.vision_config.insert_layer_id == catalog.LAYERS - 1
