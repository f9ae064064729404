"""Coupling report: the permutable groups of a model, and the spaces that are pinned and why."""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import networkx as nx
import torch

from sparsify_fx.analysis.context import AnalysisState
from sparsify_fx.analysis.moe import per_expert_classes
from sparsify_fx.analysis.rules import ONE_HEAD
from sparsify_fx.analysis.spaces import Atom, SpaceTable


@dataclass(frozen=True)
class Occurrence:
    """Where a group's units sit in one parameter dim: for each base offset ``b`` in ``offsets``,
    unit ``u`` is the index range ``[b + u * inner, b + (u + 1) * inner)``."""

    offsets: tuple[int, ...]
    units: int
    inner: int
    tags: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Member:
    """One parameter (or buffer) dim that a group's permutation moves."""

    fqn: str
    dim: int
    size: int
    occurrences: tuple[Occurrence, ...]
    role: str | None = None  # "in" (contracted by a linear/conv), "out" (produced by one), or None
    is_buffer: bool = False
    # a stacked expert weight ([E, ...]): only slice ``[expert]`` moves, and ``dim`` counts the full tensor's dims
    expert: int | None = None

    @property
    def tags(self) -> frozenset[str]:
        out: set[str] = set()
        for o in self.occurrences:
            out |= o.tags
        return frozenset(out)

    def index(self, perm: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Index along ``dim`` such that ``p.index_select(dim, index)`` applies the unit permutation
        (new unit ``u`` takes old unit ``perm[u]``)."""
        perm_t = torch.as_tensor(perm, dtype=torch.long)
        new = torch.arange(self.size)
        # each occurrence permutes the index left by the ones before: a space that is two digits of
        # one dim (an outer product flattened) must have both digits permuted
        for occ in self.occurrences:
            for base in occ.offsets:
                span = occ.units * occ.inner
                # index_select, not new[...][perm_t]: advanced indexing of a [units, 1] view costs 50x more on CPU
                # (3.5 ms vs 0.07 ms for 14336 FFN channels), and the co-permutation asks this for every member
                block = new[base : base + span]
                block.copy_(block.view(occ.units, occ.inner).index_select(0, perm_t).reshape(-1))
        return new


@dataclass
class Group:
    """A set of parameter dims that can be permuted together, unit by unit, without changing the
    model's function."""

    name: str
    kind: str
    num_units: int
    unit_size: int
    members: list[Member]
    layer: int | None = None
    prefix: str = ""
    # GQA: a kv_heads group holds `group_size` query heads per kv head; the attention_heads group
    # inside it (query heads within a kv group) names its kv_heads group in `kv_group`.
    group_size: int | None = None
    kv_group: str | None = None
    # a LayerNorm, RMSNorm or GroupNorm reduces over this space: permuting it is exact, removing units is not
    # (the statistics change), so pruning treats it like the hidden stream
    normalized: bool = False
    # mixture of experts: the channels of one expert of a stacked expert weight (its members are slices)
    expert: int | None = None

    def member(self, fqn: str) -> list[Member]:
        return [m for m in self.members if m.fqn == fqn]

    def query_to_kv(self) -> list[int] | None:
        """For a kv_heads group: query head h reads kv head h // group_size."""
        if self.kind != "kv_heads" or not self.group_size:
            return None
        return [h // self.group_size for h in range(self.num_units * self.group_size)]

    def __repr__(self) -> str:
        return f"Group({self.name!r}, {self.kind}, {self.num_units}x{self.unit_size}, {len(self.members)} members)"


@dataclass
class PinnedSpace:
    kind: str
    size: int
    members: list[tuple[str, int]]
    reasons: list[str]


@dataclass
class CouplingReport:
    groups: list[Group]
    pinned: list[PinnedSpace]
    unruled_ops: dict[str, int] = field(default_factory=dict)
    source: str = "export"

    def __iter__(self):  # noqa: ANN204
        return iter(self.groups)

    def __len__(self) -> int:
        return len(self.groups)

    def by_kind(self, kind: str) -> list[Group]:
        return [g for g in self.groups if g.kind == kind]

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(f"no group named {name!r}; groups: {[g.name for g in self.groups]}")

    def table(self) -> str:
        rows = [("group", "kind", "units x size", "members", "pinned reason")]
        for g in self.groups:
            mem = ", ".join(f"{m.fqn}[{m.dim}]" for m in g.members)
            rows.append((g.name, g.kind, f"{g.num_units} x {g.unit_size}", mem, ""))
        for p in self.pinned:
            mem = ", ".join(f"{f}[{d}]" for f, d in p.members[:4]) + (" ..." if len(p.members) > 4 else "")
            rows.append(("(pinned)", p.kind, f"{p.size}", mem, "; ".join(p.reasons)))
        widths = [min(60, max(len(r[i]) for r in rows)) for i in range(4)]
        lines = []
        for r in rows:
            cells = [r[i][: widths[i]].ljust(widths[i]) for i in range(4)] + [r[4]]
            lines.append("  ".join(cells).rstrip())
            if r is rows[0]:
                lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 13)
        if self.unruled_ops:
            lines.append(
                "ops without a rule (their spaces are pinned): "
                + ", ".join(f"{k} x{v}" for k, v in sorted(self.unruled_ops.items()))
            )
        return "\n".join(lines)

    def summary(self) -> str:
        """Print and return a table: group, kind, units x size, members, pinned reason."""
        text = self.table()
        print(text)
        return text

    def coupling_graph(self) -> nx.Graph:
        """Groups and pinned spaces linked to the parameters they move (networkx)."""
        g = nx.Graph()
        for grp in self.groups:
            g.add_node(grp.name, type="group", kind=grp.kind, units=grp.num_units, unit_size=grp.unit_size)
            for m in grp.members:
                g.add_node(m.fqn, type="buffer" if m.is_buffer else "parameter")
                g.add_edge(grp.name, m.fqn, dim=m.dim)
        for i, p in enumerate(self.pinned):
            name = f"pinned:{i}:{p.kind}"
            g.add_node(name, type="pinned", kind=p.kind, reasons="; ".join(p.reasons))
            for fqn, dim in p.members:
                g.add_node(fqn, type="parameter")
                g.add_edge(name, fqn, dim=dim)
        return g

    def to_html(self, path: str | os.PathLike | None = None, *, model: torch.nn.Module | None = None,
                dump: str | os.PathLike | None = None, explanation: object | None = None,
                title: str = "sparsify_fx report") -> str:
        """One self-contained HTML page (inline CSS/SVG, no network); written to ``path`` if given.

        Layers as rows of head and channel cells coloured by group (GQA: boxed per kv head), pinned spaces
        with their reasons, each group's coupling graph as SVG; with an S²FT ``model`` its selected units and
        co-permutation, with a ``dump`` folder or an ``explanation`` what the compile backend changed.

        Args:
            path: the ``.html`` file to write, or None.
            model: the S²FT-transformed model this report was made for (selection and permutation).
            dump: a ``torch.compile(..., backend="sparsify", options={"dump": ...})`` folder.
            explanation: a :func:`sparsify_fx.explain` result.
            title: the page title.

        Example::

            sparsify_fx.analyze(model, (ids,)).to_html("report.html")
        """
        from sparsify_fx import html

        return html.write(path, self, model=model, dump=dump, explanation=explanation,  # type: ignore[arg-type]
                          title=title)

    def to_dot(self, path: str | None = None) -> str:
        """Graphviz DOT of the coupling graph; written to ``path`` if given."""
        g = self.coupling_graph()
        ids = {n: f"n{i}" for i, n in enumerate(g.nodes)}
        shapes = {"group": "box", "pinned": "octagon", "parameter": "ellipse", "buffer": "ellipse"}
        colors = {"group": "lightblue", "pinned": "lightpink", "parameter": "white", "buffer": "lightyellow"}
        lines = ["graph coupling {", "  rankdir=LR;"]
        for n, data in g.nodes(data=True):
            typ = data.get("type", "parameter")
            label = n if typ != "group" else f"{n}\\n{data['kind']} {data['units']}x{data['unit_size']}"
            if typ == "pinned":
                label = f"{data['kind']} (pinned)\\n{data['reasons'][:60]}"
            label = label.replace('"', "'")
            lines.append(f'  {ids[n]} [label="{label}", shape={shapes[typ]}, style=filled, fillcolor={colors[typ]}];')
        for a, b, data in g.edges(data=True):
            lines.append(f'  {ids[a]} -- {ids[b]} [label="dim {data["dim"]}"];')
        lines.append("}")
        text = "\n".join(lines) + "\n"
        if path is not None:
            with open(path, "w") as f:
                f.write(text)
        return text


# ---------------------------------------------------------------------- building the report
def _occurrences(
    t: SpaceTable, dims: Sequence[Atom], keep: frozenset[int] = frozenset()
) -> list[tuple[Atom, Occurrence]]:
    """Every leaf class in a product of atoms, with where its units sit; a class in ``keep`` (root ids) is reported
    whole where it occurs, even if refined or of size 1, and not looked into."""
    sizes = [int(a.size) for a in dims]
    out: list[tuple[Atom, Occurrence]] = []
    for i, a in enumerate(dims):
        before, after = math.prod(sizes[:i]), math.prod(sizes[i + 1 :])
        for root, occ in _atom_occurrences(t, a, frozenset(), keep):
            offs = tuple(o * sizes[i] * after + off * after for o in range(before) for off in occ.offsets)
            out.append((root, Occurrence(offs, occ.units, occ.inner * after, occ.tags)))
    return out


def _atom_occurrences(
    t: SpaceTable, a: Atom, tags: frozenset[str], keep: frozenset[int] = frozenset()
) -> list[tuple[Atom, Occurrence]]:
    tags = tags | frozenset(a.tags)
    r = t.find(a)
    if r.id in keep:
        return [(r, Occurrence((0,), int(r.size), 1, tags))]
    if r.ref is None:
        return [(r, Occurrence((0,), int(r.size), 1, tags))] if r.size != 1 else []
    if r.ref.kind == "prod":
        return [
            (root, Occurrence(o.offsets, o.units, o.inner, o.tags | tags))
            for root, o in _occurrences(t, r.ref.children, keep)
        ]
    out = []
    off = 0
    for c in r.ref.children:
        for root, o in _atom_occurrences(t, c, tags, keep):
            out.append((root, Occurrence(tuple(x + off for x in o.offsets), o.units, o.inner, o.tags)))
        off += int(t.find(c).size)
    return out


def _layer_of(prefix: str) -> int | None:
    nums = [int(p) for p in prefix.split(".") if p.isdigit()]
    return nums[-1] if nums else None


def _common_prefix(fqns: Sequence[str]) -> str:
    parts = [f.split(".")[:-1] for f in fqns]
    if not parts:
        return ""
    common = parts[0]
    for p in parts[1:]:
        n = 0
        while n < min(len(common), len(p)) and common[n] == p[n]:
            n += 1
        common = common[:n]
    return ".".join(common)


# groups of one layer are listed heads first, the residual stream last
_KIND_ORDER = {
    "attention_heads": 0,
    "kv_heads": 0,
    "head_dim": 1,
    "ffn_channels": 2,
    "conv_channels": 2,
    "channels": 3,
    "hidden": 4,
}


def _one_heads(t: SpaceTable) -> dict[int, set[int]]:
    """The one-head attentions the rules marked (``rules._one_head``): head class (size 1) -> the classes of the value
    features its output carries to o. Read before ``finalize``, which copies marks into refinements: the marked
    classes themselves, not what they were later split into."""
    by_mark: dict[str, tuple[set[int], set[int]]] = defaultdict(lambda: (set(), set()))
    for a in t.atoms:
        if a.parent is a:
            for mark in a.marks:
                if mark.startswith(ONE_HEAD):
                    by_mark[mark][0 if a.size == 1 else 1].add(a.id)
    out: dict[int, set[int]] = defaultdict(set)
    for heads, features in by_mark.values():
        for h in heads:
            out[h] |= features
    return dict(out)


def _one_head_member(occs: list[tuple[Atom, Occurrence]], head: int, features: set[int]) -> tuple[Occurrence, ...]:
    """Where the one unit of a one-head attention sits in a parameter dim: each occurrence of the head (q/k/v rows:
    the head's one index spans its features), and each occurrence of the value features outside those (o's columns,
    which hold the features without the size-1 head)."""
    rows = [o for r, o in occs if r.id == head]
    spans = [(b, b + o.units * o.inner) for o in rows for b in o.offsets]
    cols = [o for r, o in occs if r.id in features
            and not any(lo < b + o.units * o.inner and b < hi for b in o.offsets for lo, hi in spans)]
    return tuple(Occurrence(o.offsets, 1, o.units * o.inner, o.tags) for o in rows + cols)


def build_report(state: AnalysisState, members: list[tuple[str, object, bool]], source: str) -> CouplingReport:
    t = state.table
    one_heads = _one_heads(t)
    keep = frozenset(one_heads) | frozenset(f for fs in one_heads.values() for f in fs)
    one_head_members: dict[int, list[Member]] = defaultdict(list)
    t.finalize()
    experts_of = {r.id: n for r, n in per_expert_classes(state).items()}
    by_class: dict[int, list[Member]] = defaultdict(list)
    roots: dict[int, Atom] = {}
    for fqn, node, is_buffer in members:
        dims = state.env.get(node)  # type: ignore[call-overload]
        if not isinstance(dims, list):
            continue
        for d, dim in enumerate(dims):
            if not all(isinstance(a.size, int) for a in dim):
                continue
            per_class: dict[int, list[Occurrence]] = defaultdict(list)
            for root, occ in _occurrences(t, dim):
                per_class[root.id].append(occ)
                roots[root.id] = root
            size = math.prod(int(a.size) for a in dim)
            role = state.roles.get((fqn, d))
            role_s = "in" if role and "in" in role else ("out" if role and "out" in role else None)
            for cid, occs in per_class.items():
                by_class[cid].append(Member(fqn, d, size, tuple(occs), role_s, is_buffer))
            if one_heads:
                kept = _occurrences(t, dim, keep)
                for head, features in one_heads.items():
                    if unit := _one_head_member(kept, head, features):
                        one_head_members[head].append(Member(fqn, d, size, unit, role_s, is_buffer))

    inner_heads: dict[int, int] = {}  # kv-head group's class -> class of the query heads inside it
    group_of: dict[int | tuple[int, int], Group] = {}
    pinned: list[PinnedSpace] = []
    placeholders = {fqn: node for fqn, node, _ in members}
    head_classes = {cid for cid, r in roots.items() if "head" in r.marks or "bmm_batch" in r.marks}
    for cid, mems in by_class.items():
        root = roots[cid]
        if root.size == 1 or all(m.is_buffer for m in mems):
            continue
        kind, group_size, inner_head = _classify(root, mems, head_classes, state, placeholders)
        if root.pins:
            io = ("model input", "model output", "embedding rows")
            if kind in ("ffn_channels", "channels", "conv_channels") and any(r.startswith(io) for r in root.pins):
                kind = "io_features"  # vocabulary, input features, output classes: fixed by the user
            pinned.append(PinnedSpace(kind, int(root.size), [(m.fqn, m.dim) for m in mems], list(root.pins)))
            continue
        unit = min((o.inner for m in mems for o in m.occurrences), default=1)
        prefix = _common_prefix([m.fqn for m in mems])
        if not prefix:  # no common module: name it after the layer that produces it
            producer = next((m.fqn for m in mems if m.role == "out" and not m.is_buffer), mems[0].fqn)
            prefix = producer.rpartition(".")[0]
        group_of[cid] = Group(
            "",
            kind,
            int(root.size),
            unit,
            sorted(mems, key=lambda m: (m.fqn, m.dim)),
            _layer_of(prefix),
            prefix,
            group_size,
            normalized="normalized" in root.marks,
        )
        if inner_head is not None:
            inner_heads[cid] = inner_head
        if cid in experts_of:  # one group per expert: each slice of the stacked weights permutes on its own
            shared = group_of.pop(cid)
            for e in range(experts_of[cid]):
                mems_e = [dataclasses.replace(m, expert=e) for m in shared.members]
                group_of[(cid, e)] = dataclasses.replace(shared, members=mems_e, expert=e)

    groups = list(group_of.values())
    for head, mems in one_head_members.items():
        _add_one_head(t.atoms[head], [t.find(t.atoms[f]) for f in one_heads[head]], mems, groups, pinned)
    _name_groups(groups)
    for cid, inner in inner_heads.items():
        if inner in group_of:
            group_of[inner].kv_group = group_of[cid].name
    # experts in numeric order (expert=10 after expert=9)
    groups.sort(key=lambda g: (g.layer if g.layer is not None else -1, _KIND_ORDER.get(g.kind, 5),
                               re.sub(r"\[expert=\d+\]", "", g.name), g.expert or 0, g.name))
    pinned.sort(key=lambda p: (p.kind, p.members[0] if p.members else ("", 0)))
    return CouplingReport(groups, pinned, dict(state.unruled), source)


def _add_one_head(head: Atom, features: list[Atom], mems: list[Member], groups: list[Group],
                  pinned: list[PinnedSpace]) -> None:
    """A one-head attention as a group of one unit: its q/k/v rows, o's columns and whatever else carries the head
    (biases, a norm over q's features). The only permutation of one unit is the identity, so it changes nothing:
    it is the head that S²FT selects and pruning counts, as with any head count."""
    if all(m.is_buffer for m in mems):
        return
    reasons = [r for a in (head, *features) for r in a.pins]
    if reasons:
        pinned.append(PinnedSpace("attention_heads", 1, [(m.fqn, m.dim) for m in mems], list(dict.fromkeys(reasons))))
        return
    prefix = _common_prefix([m.fqn for m in mems])
    if not prefix:  # no common module: name it after a projection that produces the head's rows
        prefix = next((m.fqn for m in mems if m.role == "out" and not m.is_buffer), mems[0].fqn).rpartition(".")[0]
    groups.append(Group("", "attention_heads", 1, min(o.inner for m in mems for o in m.occurrences),
                        sorted(mems, key=lambda m: (m.fqn, m.dim)), _layer_of(prefix), prefix,
                        normalized="normalized" in head.marks))


def _classify(
    root: Atom, mems: list[Member], head_classes: set[int], state: AnalysisState, placeholders: dict[str, object]
) -> tuple[str, int | None, int | None]:
    """Kind from structure alone: where the space sits in attention, convolutions and the stream."""
    t = state.table
    consumers = {m.fqn for m in mems if m.role == "in"}
    if root.id in head_classes:
        # a head class followed by another head class inside one parameter dim groups query heads:
        # it is the kv-head space of grouped-query attention
        for m in mems:
            dims = state.env.get(placeholders[m.fqn])  # type: ignore[call-overload]
            if not isinstance(dims, list):
                continue
            leaves = [t.find(x) for x in t.expand_dim(dims[m.dim])]
            for i, leaf in enumerate(leaves):
                if leaf is root:
                    later = [x for x in leaves[i + 1 :] if x.id in head_classes and x is not root]
                    if later:
                        return "kv_heads", int(later[0].size), later[0].id
        return "attention_heads", None, None
    if "head_dim" in root.marks:
        return "head_dim", None, None
    if len(consumers) >= 2:
        return "hidden", None, None
    if "conv" in root.marks:
        return "conv_channels", None, None
    if any(m.role == "out" for m in mems):
        return "ffn_channels", None, None
    return "channels", None, None


def _name_groups(groups: list[Group]) -> None:
    seen: dict[str, int] = {}
    for g in groups:
        base = f"{g.prefix}:{g.kind}" if g.prefix else g.kind
        if g.expert is not None:
            base = f"{base}[expert={g.expert}]"
        base = re.sub(r"\s+", "", base)
        n = seen.get(base, 0)
        seen[base] = n + 1
        g.name = base if n == 0 else f"{base}#{n}"
