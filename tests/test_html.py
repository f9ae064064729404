"""The HTML report (issue 17) opened in a real headless Chromium: the DOM has one cell per head and FFN channel,
GQA kv boxes, the S²FT selection and co-permutation, pinned reasons; the compile section shows what fired."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import models
import pytest
import torch

import sparsify_fx
from sparsify_fx import html as report_html
from sparsify_fx.passes.s2ft import state_of
from sparsify_fx.testing import assert_unchanged, model_snapshot

IDS = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (make test installs Debian's package when it can)")
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1400,1000"]


def _browser(page: Path, screenshot: Path | None = None) -> str:
    """The DOM Chromium built from ``page`` (and a PNG of it when ``screenshot`` is given)."""
    assert CHROMIUM is not None
    url = page.resolve().as_uri()
    if screenshot is not None:
        subprocess.run([CHROMIUM, *_FLAGS, f"--screenshot={screenshot}", url], capture_output=True, timeout=120,
                       check=True)
        assert screenshot.stat().st_size > 10_000 and screenshot.read_bytes()[:4] == b"\x89PNG"
    out = subprocess.run([CHROMIUM, *_FLAGS, "--dump-dom", url], capture_output=True, text=True, timeout=120,
                         check=True)
    # the page's script ran: the browser, not a copy of the file, produced this DOM
    m = re.search(r'<html lang="en" data-cells="(\d+)">', out.stdout)
    assert m is not None, out.stderr[-2000:]
    assert int(m[1]) == out.stdout.count('<span class="cell ')
    return out.stdout


class _Cells(HTMLParser):
    """Per layer row: head and FFN cells (unit, selected, kv box); kv boxes; the texts of pinned rows."""

    def __init__(self) -> None:
        super().__init__()
        self.layers: dict[str, dict[str, list[tuple[int, bool, str | None]]]] = {}
        self.kv_boxes: dict[str, int] = {}
        self.moves: dict[str, dict[int, int]] = {}
        self.text: list[str] = []
        self._layer: str | None = None
        self._perm: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        cls = (a.get("class") or "").split()
        if tag == "tr" and "layer" in cls:
            self._layer = a.get("data-layer") or "model"
            self.layers[self._layer] = {"head": [], "ffn": []}
        elif tag == "span" and "cell" in cls and self._layer is not None:
            kind = a["data-kind"]
            assert ("sel" in cls) == (a["data-selected"] == "1")
            self.layers[self._layer].setdefault(kind, []).append((int(a["data-unit"]), "sel" in cls, a.get("data-kv")))
        elif tag == "span" and "kv" in cls and self._layer is not None:
            self.kv_boxes[self._layer] = self.kv_boxes.get(self._layer, 0) + 1
        elif tag == "div" and "perm" in cls:
            self._perm = a["data-group"]
            self.moves[self._perm] = {}
        elif tag == "span" and "mv" in cls and self._perm is not None:
            self.moves[self._perm][int(a["data-old"])] = int(a["data-new"])

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._layer = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(dom: str) -> _Cells:
    p = _Cells()
    p.feed(dom)
    return p


def _self_contained(text: str) -> None:
    # the only URL is the SVG namespace, which is a name, not a fetch
    assert "https://" not in text and text.count("http://") == text.count("http://www.w3.org/2000/svg")
    assert "<link" not in text and " src=" not in text


@needs_browser
def test_llama_report_in_chromium_has_a_cell_per_head_and_channel_and_marks_the_selection(tmp_path):
    torch.manual_seed(0)
    model = models.llama(heads=4, kv_heads=2, inter=128)
    report = sparsify_fx.analyze(model, (IDS,))
    sparsify_fx.s2ft(model, (IDS,), sparsify_fx.S2FTConfig(attention_ratio=0.5, ffn_ratio=0.1, progress=False))
    st = state_of(model)
    snap = model_snapshot(model)
    page = tmp_path / "llama.html"
    text = report.to_html(page, model=model, title="tiny llama")
    assert_unchanged(model, snap)  # rendering reads the model, never writes it
    assert page.read_text() == text
    _self_contained(text)

    dom = _parse(_browser(page, tmp_path / "llama.png"))
    for layer in ("0", "1"):
        cells = dom.layers[layer]
        assert [u for u, _, _ in cells["head"]] == [0, 1, 2, 3]  # 4 query heads
        assert [kv for _, _, kv in cells["head"]] == ["0", "0", "1", "1"]  # 2 per kv head
        assert dom.kv_boxes[layer] == 2
        assert [u for u, _, _ in cells["ffn"]] == list(range(128))
    for u in st.units:
        layer = str(u.group.layer)
        if u.group.kind == "kv_heads":  # a selected kv head trains v/o for each of its query heads
            want = {h for k in u.selected for h in range(2 * k, 2 * k + 2)}
            assert {h for h, sel, _ in dom.layers[layer]["head"] if sel} == want
        else:
            assert u.group.kind == "ffn_channels"
            assert {c for c, sel, _ in dom.layers[layer]["ffn"] if sel} == set(u.selected)
            assert len(u.selected) == round(0.1 * 128)
    # the co-permutation: original unit -> new position, the selected units moved to the front
    for name, perm in st.perms.items():
        assert dom.moves[name] == {int(old): new for new, old in enumerate(perm.tolist())}
        sel = next(u.selected for u in st.units if u.group.name == name)
        assert sorted(dom.moves[name][o] for o in sel) == list(range(len(sel)))
    body = " ".join(dom.text)
    assert "embedding rows are selected by data (token ids) at embedding (aten.embedding.default)" in body
    assert "model output" in body
    # the coupling graph shown first: the kv-head group with q, k, v and o as its members
    assert 'class="coupling"' in text and "model.layers.0.self_attn.k_proj.weight · dim 0" in text


@needs_browser
def test_gpt2_report_in_chromium_fused_qkv_heads_and_nothing_selected(tmp_path):
    model = models.gpt2(heads=4, hidden=64)
    report = sparsify_fx.analyze(model, (IDS,))
    page = tmp_path / "gpt2.html"
    report.to_html(page)
    dom = _parse(_browser(page, tmp_path / "gpt2.png"))
    for layer in ("0", "1"):
        assert len(dom.layers[layer]["head"]) == 4 and layer not in dom.kv_boxes  # MHA: no kv boxes
        assert len(dom.layers[layer]["ffn"]) == 4 * 64
        assert not any(sel for kind in ("head", "ffn") for _, sel, _ in dom.layers[layer][kind])
    assert not dom.moves  # no S²FT, no permutation section
    body = " ".join(dom.text)
    assert "transformer.wte.weight[0], lm_head.weight[0]" in body and "model output" in body
    # the fused c_attn: the head space occurs three times in one weight (q, k and v slices)
    assert "transformer.h.0.attn.c_attn.weight · dim 1 (out) · [0:64] 4×16; [64:128] 4×16; [128:192] 4×16" in (
        page.read_text())


def test_explain_to_html_shows_fired_rewrites_saved_bytes_and_graphs_side_by_side(tmp_path):
    torch._dynamo.reset()
    expl = sparsify_fx.explain(models.CatTrainable(), (torch.randn(3, 5, 16),), verbose=False)
    (g,) = expl.graphs
    page = tmp_path / "explain.html"
    text = expl.to_html(page)
    _self_contained(text)
    assert 'data-fired="2"' in text
    for name in ("eliminate_dead_weight_grads", "slice_saved_activations"):
        assert f"<b>{name}</b>: fired" in text
    assert f"<b>{g.saved_bytes_before:,d} B" in text and f"<b>{g.saved_bytes_after:,d} B" in text
    assert g.saved_bytes_after < g.saved_bytes_before
    # before/after text side by side: the partitioned backward and the one after the last rewrite
    assert '<div class="side"><div><h4>backward.partitioned</h4><pre class="before">' in text
    assert "<h4>backward.slice_saved_activations</h4>" in text or "<h4>backward.eliminate_dead_weight_grads" in text
    assert '"f32[24, 32]"' in g.graphs["backward.partitioned"]
    # the full weight gradient's mm is gone or shrunk: the backward lists a removed or sliced node
    m = re.search(r'<p class="nodes">backward: (\d+) node\(s\) removed, (\d+) sliced</p>', text)
    assert m is not None and int(m[1]) + int(m[2]) > 0


def test_dump_folder_renders_the_same_rewrites(tmp_path):
    """A dump written by a real torch.compile(..., backend="sparsify") run, read back into the page."""
    torch._dynamo.reset()
    model = models.CatTrainable()
    compiled = torch.compile(model, backend="sparsify", options={"dump": str(tmp_path / "dump")})
    compiled(torch.randn(3, 5, 16)).sum().backward()
    report = report_html.graphs_from_dump(tmp_path / "dump")
    (g,) = report
    assert {name for name, fired, _ in g.passes if fired} == {"eliminate_dead_weight_grads", "slice_saved_activations"}
    assert set(g.sides) == {"forward", "backward"} and g.sides["backward"][0] == "backward.00_partitioned"
    text = report_html.write(tmp_path / "dump.html", None, dump=tmp_path / "dump")
    assert "<b>eliminate_dead_weight_grads</b>: fired" in text and "saved for backward" in text
    with pytest.raises(sparsify_fx.ConfigError, match="not a sparsify dump folder"):
        report_html.graphs_from_dump(tmp_path)
