"""One self-contained HTML file that shows a coupling report, an S²FT selection and what the compile backend did.

Everything is inline (CSS, a few lines of JS, SVG): the file opens from disk with no network. Rendering is
server-side, so the page reads the same with scripts off; the script only switches the coupling graph shown.

Sections:

* layers: one row per layer, each attention head and each FFN/conv channel a cell coloured by its group; the
  query heads of one kv head sit in one box (GQA); cells of units S²FT selected are marked (class ``sel``);
* pinned spaces with their reasons (the op and node that pinned them) and ops without a rule;
* the coupling graph of one group (its members: parameter, dim, slice) as SVG;
* after :func:`sparsify_fx.s2ft`: each group's co-permutation (original unit → new position);
* after ``torch.compile(..., backend="sparsify", options={"dump": DIR})`` or :func:`sparsify_fx.explain`: per graph,
  the rewrites that fired and why, nodes removed / sliced, saved-activation bytes before and after, and the graph
  text before and after side by side.
"""

from __future__ import annotations

import colorsys
import enum
import html
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch.nn as nn

    from sparsify_fx.analysis.report import CouplingReport, Group, Member
    from sparsify_fx.codegen.explain import Explanation

__all__ = ["CellKind", "CompiledGraph", "explanation_html", "graphs_from_dump", "render", "write"]

# graph text is kept whole up to this many characters per side; beyond, the page would stop being readable
_MAX_TEXT = 200_000
# coupling graphs drawn (one is shown at a time; the rest wait behind the selector)
_MAX_SVG = 200


class CellKind(str, enum.Enum):
    """What one cell of a layer row stands for (the ``data-kind`` attribute tests and scripts read)."""

    HEAD = "head"
    FFN = "ffn"
    CONV = "conv"


# group kinds drawn as cells, and the cell kind each becomes
_CELL_KINDS = {"ffn_channels": CellKind.FFN, "conv_channels": CellKind.CONV}
_HEAD_KINDS = ("attention_heads", "kv_heads")


@dataclass
class CompiledGraph:
    """What the backend did with one dynamo graph, from an :class:`Explanation` or a dump folder."""

    id: int
    kernels: str = "aten"
    passes: list[tuple[str, bool, list[str]]] = field(default_factory=list)  # name, fired, notes
    swaps: list[str] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    saved_bytes_before: int | None = None
    saved_bytes_after: int | None = None
    # role ("forward", "backward") -> (label before, text before, label after, text after)
    sides: dict[str, tuple[str, str, str, str]] = field(default_factory=dict)
    dynamo: str = ""


# ---------------------------------------------------------------------------------------------------- helpers
def _e(x: object) -> str:
    return html.escape(str(x), quote=True)


def _colour(i: int, light: float = 0.78) -> str:
    """A distinct pastel per index (golden-ratio hues), readable behind dark text."""
    r, g, b = colorsys.hls_to_rgb((i * 0.618034) % 1.0, light, 0.55)
    return f"#{int(r * 255):02x}{int(g * 255):02x}{int(b * 255):02x}"


def _slices(m: Member) -> str:
    """``[a:b]`` per unit span of every occurrence, and the unit size: where the group sits in this dim."""
    parts = []
    for o in m.occurrences:
        spans = [f"{b}:{b + o.units * o.inner}" for b in o.offsets[:4]]
        more = f" +{len(o.offsets) - 4}" if len(o.offsets) > 4 else ""
        parts.append(f"[{', '.join(spans)}{more}] {o.units}×{o.inner}")
    out = "; ".join(parts)
    if m.expert is not None:
        out = f"expert {m.expert}: {out}"
    return out


# ---------------------------------------------------------------------------------------------------- selection
def _selection(state: Any) -> tuple[dict[str, set[int]], dict[str, list[int]]]:
    """Selected original units per group name, and each permuted group's permutation (new u takes old perm[u])."""
    selected: dict[str, set[int]] = {}
    for u in state.units:
        selected.setdefault(u.group.name, set()).update(int(i) for i in u.selected)
    perms = {name: [int(x) for x in p.tolist()] for name, p in state.perms.items()}
    return selected, perms


def _state_of(model: nn.Module | None) -> Any:
    if model is None:
        return None
    from sparsify_fx.errors import ConfigError
    from sparsify_fx.passes.s2ft import state_of

    try:
        return state_of(model)
    except ConfigError:
        return None  # not an S²FT model: nothing selected


# ---------------------------------------------------------------------------------------------------- layers
def _head_cells(heads: Group | None, kv: Group | None, selected: dict[str, set[int]], colour: dict[str, str]) -> str:
    """Query-head cells; for GQA boxed per kv head (a kv head carries its query heads)."""
    if kv is not None and kv.group_size:
        g_size = kv.group_size
        inner_sel = selected.get(heads.name, set()) if heads is not None else set()
        boxes = []
        for k in range(kv.num_units):
            cells = []
            for q in range(g_size):
                h = k * g_size + q
                sel = k in selected.get(kv.name, set()) or q in inner_sel
                cells.append(_cell(CellKind.HEAD, kv.name, h, sel, colour[kv.name],
                                   f"head {h} (kv head {k}, query {q} of {g_size}) · {kv.name}", kv=k))
            boxes.append(f'<span class="kv" data-kv="{k}" title="kv head {k}"><b>kv{k}</b>{"".join(cells)}</span>')
        return "".join(boxes)
    if heads is None:
        return ""
    sel = selected.get(heads.name, set())
    return "".join(_cell(CellKind.HEAD, heads.name, h, h in sel, colour[heads.name], f"head {h} · {heads.name}")
                   for h in range(heads.num_units))


def _cell(kind: CellKind, group: str, unit: int, sel: bool, colour: str, title: str, kv: int | None = None) -> str:
    cls = f"cell {kind.value}" + (" sel" if sel else "")
    kv_attr = f' data-kv="{kv}"' if kv is not None else ""
    mark = " · selected" if sel else ""
    return (f'<span class="{cls}" data-kind="{kind.value}" data-group="{_e(group)}" data-unit="{unit}"{kv_attr} '
            f'data-selected="{int(sel)}" style="background-color:{colour}" title="{_e(title + mark)}"></span>')


def _layer_rows(report: CouplingReport, selected: dict[str, set[int]], colour: dict[str, str]) -> str:
    by_layer: dict[int | None, list[Group]] = {}
    for g in report.groups:
        by_layer.setdefault(g.layer, []).append(g)
    rows = []
    for layer in sorted(by_layer, key=lambda x: (x is None, x if x is not None else 0)):
        groups = by_layer[layer]
        names = {g.name: g for g in groups}
        kvs = [g for g in groups if g.kind == "kv_heads"]
        inner = {g.kv_group: g for g in groups if g.kind == "attention_heads" and g.kv_group}
        head_html = []
        for kv in kvs:
            head_html.append(_head_cells(inner.get(kv.name), kv, selected, colour))
        for g in groups:
            if g.kind == "attention_heads" and not (g.kv_group and g.kv_group in names):
                head_html.append(_head_cells(g, None, selected, colour))
        unit_html = []
        for g in groups:
            kind = _CELL_KINDS.get(g.kind)
            if kind is None:
                continue
            sel = selected.get(g.name, set())
            cells = "".join(_cell(kind, g.name, u, u in sel, colour[g.name], f"{kind.value} {u} · {g.name}")
                            for u in range(g.num_units))
            unit_html.append(f'<span class="units" data-group="{_e(g.name)}">{cells}</span>')
        chips = "".join(
            f'<span class="chip" style="border-color:{colour[g.name]}" title="{_e(g.name)}">'
            f"{_e(g.kind)} {g.num_units}×{g.unit_size}</span>"
            for g in groups if g.kind not in _HEAD_KINDS and g.kind not in _CELL_KINDS
        )
        n_heads = sum(kv.num_units * (kv.group_size or 1) for kv in kvs) + sum(
            g.num_units for g in groups if g.kind == "attention_heads" and not (g.kv_group and g.kv_group in names))
        n_units = sum(g.num_units for g in groups if g.kind in _CELL_KINDS)
        label = f"layer {layer}" if layer is not None else "model"
        rows.append(
            f'<tr class="layer" data-layer="{"" if layer is None else layer}" data-heads="{n_heads}" '
            f'data-units="{n_units}"><th>{_e(label)}</th>'
            f'<td class="heads">{"".join(head_html)}</td><td class="ffn">{"".join(unit_html)}</td>'
            f'<td class="other">{chips}</td></tr>'
        )
    return (
        '<table id="layers"><thead><tr><th></th><th>attention heads</th><th>FFN / conv channels</th>'
        "<th>other groups</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )


def _legend(report: CouplingReport, colour: dict[str, str]) -> str:
    items = "".join(
        f'<li><span class="swatch" style="background:{colour[g.name]}"></span>{_e(g.name)} '
        f'<small>{_e(g.kind)} {g.num_units}×{g.unit_size}'
        + (f", {g.group_size} query heads per kv head" if g.group_size else "")
        + "</small></li>"
        for g in report.groups
    )
    return f'<details><summary>{len(report.groups)} groups</summary><ul class="legend">{items}</ul></details>'


# ---------------------------------------------------------------------------------------------------- pinned
def _pinned(report: CouplingReport) -> str:
    rows = []
    for p in report.pinned:
        members = ", ".join(f"{f}[{d}]" for f, d in p.members)
        reasons = "".join(f"<li>{_e(r)}</li>" for r in p.reasons)
        rows.append(f'<tr class="pinned"><td>{_e(p.kind)}</td><td>{p.size}</td><td><code>{_e(members)}</code></td>'
                    f'<td><ul class="reasons">{reasons}</ul></td></tr>')
    unruled = ""
    if report.unruled_ops:
        ops = ", ".join(f"{k} ×{v}" for k, v in sorted(report.unruled_ops.items()))
        unruled = f'<p class="unruled">ops without a rule (their spaces are pinned): <code>{_e(ops)}</code></p>'
    if not rows:
        return "<p>nothing pinned</p>" + unruled
    return ('<table id="pinned"><thead><tr><th>kind</th><th>size</th><th>members</th><th>why (op / node)</th></tr>'
            "</thead><tbody>" + "".join(rows) + "</tbody></table>" + unruled)


# ---------------------------------------------------------------------------------------------------- coupling SVG
def _svg(g: Group, colour: str) -> str:
    """The group on the left, one row per member (parameter, dim, slice) on the right, an edge to each."""
    row_h, top = 30, 20
    height = max(80, top * 2 + row_h * len(g.members))
    width = 1200
    gy = height // 2
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" class="coupling" data-group="{_e(g.name)}" '
             f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">',
             f"<title>{_e(g.name)}</title>"]
    for i in range(len(g.members)):
        y = top + row_h * i + row_h // 2
        parts.append(f'<path d="M310,{gy} C350,{gy} 350,{y} 390,{y}" fill="none" stroke="#888"/>')
    parts.append(f'<rect x="10" y="{gy - 28}" width="300" height="56" rx="6" fill="{colour}" stroke="#333"/>')
    short = g.name if len(g.name) <= 44 else "…" + g.name[-43:]
    parts.append(f'<text x="20" y="{gy - 8}" class="gname">{_e(short)}</text>')
    parts.append(f'<text x="20" y="{gy + 14}">{_e(g.kind)} · {g.num_units} units × {g.unit_size}</text>')
    for i, m in enumerate(g.members):
        y = top + row_h * i + row_h // 2
        fill = "#fff8d0" if m.is_buffer else "#fff"
        role = f" ({m.role})" if m.role else ""
        parts.append(f'<rect x="390" y="{y - 12}" width="800" height="24" rx="4" fill="{fill}" stroke="#999"/>')
        parts.append(f'<text x="398" y="{y + 5}" class="member">{_e(m.fqn)} · dim {m.dim}{_e(role)} · '
                     f"{_e(_slices(m))}</text>")
    parts.append("</svg>")
    return "".join(parts)


def _coupling(report: CouplingReport, colour: dict[str, str], first: str | None) -> str:
    groups = report.groups[:_MAX_SVG]
    if not groups:
        return "<p>no groups</p>"
    shown = first if first in {g.name for g in groups} else groups[0].name
    options = "".join(f'<option value="{_e(g.name)}"{" selected" if g.name == shown else ""}>{_e(g.name)}</option>'
                      for g in groups)
    svgs = "".join(
        f'<div class="svgwrap" data-group="{_e(g.name)}"{"" if g.name == shown else " hidden"}>'
        f"{_svg(g, colour[g.name])}</div>"
        for g in groups
    )
    return f'<label>group <select id="groupsel">{options}</select></label>{svgs}'


# ---------------------------------------------------------------------------------------------------- permutation
def _permutations(perms: dict[str, list[int]], selected: dict[str, set[int]]) -> str:
    if not perms:
        return ""
    blocks = []
    for name, perm in perms.items():
        new_of = {old: new for new, old in enumerate(perm)}
        sel = selected.get(name, set())
        pairs = " ".join(
            f'<span class="mv{" sel" if old in sel else ""}" data-old="{old}" data-new="{new_of[old]}">'
            f"{old}→{new_of[old]}</span>"
            for old in range(len(perm))
        )
        moved = sum(1 for old in range(len(perm)) if new_of[old] != old)
        blocks.append(f'<div class="perm" data-group="{_e(name)}"><h4>{_e(name)} <small>{len(perm)} units, '
                      f"{moved} moved, {len(sel)} selected (now at 0..{max(len(sel) - 1, 0)})</small></h4>"
                      f'<p class="pairs">{pairs}</p></div>')
    return ("<section id=\"permutation\"><h2>S²FT co-permutation (original unit → new position)</h2>"
            + "".join(blocks) + "</section>")


# ---------------------------------------------------------------------------------------------------- compile
_NODE = re.compile(r'^\s*(\w+)(?::\s*"([^"]*)")?\s*=\s*torch\.ops\.([\w.]+)\(', re.M)


def _nodes(text: str) -> dict[str, tuple[str, str]]:
    """Node name -> (shape annotation, op) from ``print_readable`` text."""
    return {m.group(1): (m.group(2) or "", m.group(3)) for m in _NODE.finditer(text)}


def _node_changes(before: str, after: str) -> tuple[list[str], list[str]]:
    """Nodes removed, and nodes sliced (a new slice/narrow op, or a node whose shape shrank)."""
    b, a = _nodes(before), _nodes(after)
    removed = [f"{n} ({b[n][1]} {b[n][0]})".replace(" )", ")") for n in b if n not in a]
    sliced = [f"{n} ({a[n][1]} {a[n][0]})" for n in a if n not in b and re.search(r"slice|narrow", a[n][1])]
    sliced += [f"{n} ({a[n][1]} {b[n][0]} → {a[n][0]})" for n in a if n in b and a[n][0] != b[n][0]]
    return removed, sliced


def _bytes(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n:,d} B ({n / 2**20:.2f} MiB)"


def _compiled(graphs: Sequence[CompiledGraph], breaks: Sequence[str] = ()) -> str:
    out = [f'<section id="compile"><h2>torch.compile backend="sparsify": {len(graphs)} graph(s)</h2>']
    out += [f'<p class="break">graph break: {_e(b)}</p>' for b in breaks]
    for g in graphs:
        fired = [p for p in g.passes if p[1]]
        items = "".join(
            f'<li class="{"fired" if ch else "idle"}"><b>{_e(name)}</b>: {"fired" if ch else "no change"}'
            + ("<ul>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>" if notes else "") + "</li>"
            for name, ch, notes in g.passes
        )
        saved = (f'<p class="saved">saved for backward: <b>{_bytes(g.saved_bytes_before)}</b> → '
                 f"<b>{_bytes(g.saved_bytes_after)}</b></p>")
        extra = "".join(f"<li>kernel: {_e(s)}</li>" for s in g.swaps)
        extra += "".join(f'<li class="fallback">FALLBACK: {_e(f)}</li>' for f in g.fallbacks)
        sides = []
        for role, (lb, tb, la, ta) in g.sides.items():
            removed, sliced = _node_changes(tb, ta)
            changes = (f'<p class="nodes">{role}: {len(removed)} node(s) removed, {len(sliced)} sliced</p>'
                       + (f"<details><summary>removed</summary><pre>{_e(chr(10).join(removed))}</pre></details>"
                          if removed else "")
                       + (f"<details><summary>sliced</summary><pre>{_e(chr(10).join(sliced))}</pre></details>"
                          if sliced else ""))
            sides.append(
                f'<div class="role" data-role="{_e(role)}">{changes}<div class="side">'
                f'<div><h4>{_e(lb)}</h4><pre class="before">{_e(tb[:_MAX_TEXT])}</pre></div>'
                f'<div><h4>{_e(la)}</h4><pre class="after">{_e(ta[:_MAX_TEXT])}</pre></div></div></div>'
            )
        if not g.sides and g.dynamo:
            sides.append(f'<details><summary>dynamo graph</summary><pre>{_e(g.dynamo[:_MAX_TEXT])}</pre></details>')
        out.append(
            f'<div class="graph" data-graph="{g.id}" data-fired="{len(fired)}"><h3>graph {g.id} '
            f"<small>kernels={_e(g.kernels)}, {len(fired)} rewrite(s) fired</small></h3>{saved}"
            f'<ul class="passes">{items}{extra}</ul>{"".join(sides)}</div>'
        )
    out.append("</section>")
    return "".join(out)


def _last_stage(graphs: dict[str, str], role: str) -> str | None:
    keys = [k for k in graphs if k.startswith(role + ".")]
    return keys[-1] if keys else None


def graphs_from_explanation(expl: Explanation) -> list[CompiledGraph]:
    """The :class:`CompiledGraph` view of an :func:`sparsify_fx.explain` result (graph text kept by explain)."""
    out = []
    for rec in expl.graphs:
        sides = {}
        for role in ("forward", "backward"):
            first = f"{role}.partitioned"
            last = _last_stage(rec.graphs, role)
            if first in rec.graphs and last is not None:
                sides[role] = (first, rec.graphs[first], last, rec.graphs[last])
        out.append(CompiledGraph(rec.id, rec.kernels, [(p.name, p.changed, list(p.notes)) for p in rec.passes],
                                 list(rec.swaps), list(rec.fallbacks), rec.saved_bytes_before,
                                 rec.saved_bytes_after, sides, rec.graphs.get("dynamo", "")))
    return out


def graphs_from_dump(directory: str | os.PathLike) -> list[CompiledGraph]:
    """The :class:`CompiledGraph` view of a ``options={"dump": directory}`` folder (its ``index.json``).

    Args:
        directory: the folder the backend dumped into.

    Example::

        torch.compile(model, backend="sparsify", options={"dump": "dump/"})(x).sum().backward()
        graphs = graphs_from_dump("dump/")
    """
    from sparsify_fx.errors import ConfigError

    root = Path(directory)
    try:
        index = json.loads((root / "index.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{root} is not a sparsify dump folder ({e}); pass the directory given as "
                          "options={'dump': ...} to torch.compile(..., backend='sparsify').") from None
    out = []
    for rec in index.get("graphs", []):
        gdir = root / rec.get("dir", f"graph_{rec.get('id', 0):03d}")
        sides = {}
        for role in ("forward", "backward"):
            stages = sorted(p for p in gdir.glob(f"{role}.[0-9][0-9]_*.txt"))
            if stages:
                sides[role] = (stages[0].stem, stages[0].read_text(), stages[-1].stem, stages[-1].read_text())
        dyn = gdir / "dynamo.txt"
        out.append(CompiledGraph(
            int(rec.get("id", 0)), str(rec.get("kernels", "aten")),
            [(p["name"], bool(p["changed"]), list(p.get("notes", []))) for p in rec.get("passes", [])],
            list(rec.get("swaps", [])), list(rec.get("fallbacks", [])),
            rec.get("saved_bytes_before"), rec.get("saved_bytes_after"), sides,
            dyn.read_text() if dyn.is_file() else "",
        ))
    return out


# ---------------------------------------------------------------------------------------------------- page
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#222;background:#fafafa}
h1{font-size:20px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse}td,th{border:1px solid #ddd;padding:4px 6px;vertical-align:top;text-align:left}
#layers th{white-space:nowrap}
.cell{display:inline-block;width:11px;height:16px;margin:1px;border:1px solid rgba(0,0,0,.25);border-radius:2px}
.cell.head{width:18px;height:22px}
.cell.sel{outline:2px solid #d00;outline-offset:0;border-color:#d00;background-image:
 repeating-linear-gradient(45deg,rgba(200,0,0,.55) 0 3px,transparent 3px 6px)}
.kv{display:inline-block;border:2px solid #555;border-radius:4px;padding:1px 3px;margin:1px 4px 1px 0}
.kv b{font-size:10px;margin-right:3px;vertical-align:top}
.units{display:inline-block;max-width:1100px;margin-right:8px}
.chip{display:inline-block;border:2px solid;border-radius:10px;padding:0 6px;margin:1px;font-size:12px}
.swatch{display:inline-block;width:12px;height:12px;margin-right:4px;border:1px solid #555}
.legend{columns:2;font-size:12px}
ul.reasons{margin:0;padding-left:16px}
.coupling text{font:12px monospace}.coupling .gname{font-weight:bold}
.mv{font:12px monospace;margin-right:6px}.mv.sel{color:#c00;font-weight:bold}
.side{display:grid;grid-template-columns:1fr 1fr;gap:8px}
pre{background:#fff;border:1px solid #ddd;padding:6px;overflow:auto;max-height:480px;font-size:11px}
li.fired b{color:#070}li.idle{color:#777}.fallback{color:#b00}
.summary td{text-align:right}.summary td:first-child{text-align:left}
"""

_JS = """
// what the browser laid out, for scripts reading the DOM (and the headless-browser test)
document.documentElement.dataset.cells = document.querySelectorAll('.cell').length;
document.getElementById('groupsel')?.addEventListener('change', e => {
  for (const d of document.querySelectorAll('.svgwrap')) d.hidden = d.dataset.group !== e.target.value;
});
"""


def render(report: CouplingReport | None = None, *, model: nn.Module | None = None, state: Any = None,
           graphs: Sequence[CompiledGraph] = (), graph_breaks: Sequence[str] = (), title: str = "sparsify_fx report",
           extra: Iterable[str] = ()) -> str:
    """The report page as a string (see :func:`write`)."""
    state = state if state is not None else _state_of(model)
    selected, perms = _selection(state) if state is not None else ({}, {})
    body = [f"<h1>{_e(title)}</h1>"]
    if report is not None:
        colour = {g.name: _colour(i) for i, g in enumerate(report.groups)}
        n_sel = sum(len(v) for v in selected.values())
        body.append(f'<p>{len(report.groups)} groups, {len(report.pinned)} pinned spaces, source: '
                    f'{_e(report.source)}{f", {n_sel} S²FT units selected (hatched, red outline)" if state else ""}'
                    "</p>")
        body.append("<h2>Layers</h2>" + _layer_rows(report, selected, colour) + _legend(report, colour))
        body.append("<h2>Pinned spaces</h2>" + _pinned(report))
        # the head group with the most members shows the most coupling (GQA: kv heads carry q, k, v and o)
        heads = [g for g in report.groups if g.kind in _HEAD_KINDS]
        first = max(heads, key=lambda g: len(g.members)).name if heads else None
        body.append("<h2>Coupling graph of one group</h2>" + _coupling(report, colour, first))
    body.extend(extra)
    body.append(_permutations(perms, selected))
    if graphs or graph_breaks:
        body.append(_compiled(graphs, graph_breaks))
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{_CSS}</style></head><body>{''.join(body)}<script>{_JS}</script></body></html>\n")


def write(path: str | os.PathLike | None, report: CouplingReport | None = None, *, model: nn.Module | None = None,
          dump: str | os.PathLike | None = None, explanation: Explanation | None = None,
          title: str = "sparsify_fx report", extra: Iterable[str] = ()) -> str:
    """Render the report page and write it to ``path`` (when given); return the HTML.

    Args:
        path: the ``.html`` file to write, or None to only return the text.
        report: a :class:`CouplingReport` (layers, pinned spaces, coupling graphs), or None.
        model: an S²FT-transformed model: its selected units are marked and its co-permutation listed.
        dump: a ``torch.compile(..., backend="sparsify", options={"dump": dump})`` folder to show.
        explanation: a :func:`sparsify_fx.explain` result to show.
        title: the page title.
        extra: HTML fragments inserted after the report's sections (the CLI's plan table).

    Example::

        report = sparsify_fx.analyze(model, (ids,))
        sparsify_fx.html.write("report.html", report, model=sparsify_fx.s2ft(model, (ids,)))
    """
    graphs: list[CompiledGraph] = []
    breaks: list[str] = []
    if dump is not None:
        graphs += graphs_from_dump(dump)
    if explanation is not None:
        graphs += graphs_from_explanation(explanation)
        breaks += list(explanation.graph_breaks)
    text = render(report, model=model, graphs=graphs, graph_breaks=breaks, title=title, extra=extra)
    if path is not None:
        from sparsify_fx._io import write_text_atomic

        write_text_atomic(text, os.fspath(path), prefix=".report-")
    return text


def explanation_html(expl: Explanation, path: str | os.PathLike | None = None, *,
                     title: str = "sparsify_fx explain") -> str:
    """:meth:`Explanation.to_html`: the compile section alone."""
    return write(path, None, explanation=expl, title=title)
