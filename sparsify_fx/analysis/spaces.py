"""Channel spaces: union-find over index sets, refined by products (reshape) and sums (split/cat).

Every dimension of every tensor in a graph is a product of *atoms* (major to minor). Atoms are
union-find elements: unifying two atoms says "these index the same space, so one permutation must
act on both". An atom may later be *refined*:

- ``prod``: the space is a product ``A ⊗ B`` (index ``a * |B| + b``): a reshape ``[512] -> [8, 64]``.
- ``sum``: the space is a concatenation ``A ⊕ B`` (offsets): a split, slice or cat.

A refinement lives on the class root, so every tensor that shares the space sees it. A permutation is
offered only for *leaf* classes (never refined): permuting a leaf permutes the matching digit of
every dimension that contains it, at every place it occurs. Anything a rule cannot prove is *pinned*
(with a reason); pins flow down refinements at the end, so a pinned space never yields a group.

Sizes are Python ints or sympy expressions (symbolic batch and sequence sizes), so reshapes of
``[s0*s1, 512] <-> [s0, s1, 8, 64]`` factor without concrete shapes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Union

import sympy

Size = Union[int, sympy.Expr]  # noqa: UP007  (runtime alias)


def as_size(x: object) -> Size:
    """A concrete int, or a canonical sympy expression for a SymInt."""
    if isinstance(x, int):
        return x
    node = getattr(x, "node", None)
    if node is not None:  # torch.SymInt
        return _canon(node.expr)
    return _canon(sympy.sympify(x))


def _canon(e: sympy.Expr) -> Size:
    e = sympy.expand(e)
    return int(e) if e.is_Integer else e


def quotient(a: Size, b: Size) -> Size | None:
    """``a / b`` when ``b`` divides ``a`` exactly (symbolically), else None."""
    if b == 0:
        return None
    if isinstance(a, int) and isinstance(b, int):
        return a // b if a % b == 0 else None
    q = sympy.cancel(sympy.sympify(a) / sympy.sympify(b))
    num, den = sympy.fraction(q)
    if den != 1:
        return None
    q = _canon(q)
    if isinstance(q, int) and q <= 0:
        return None
    return q


def prod(sizes: Iterable[Size]) -> Size:
    out: Size = 1
    for s in sizes:
        out = out * s
    return _canon(sympy.sympify(out)) if not isinstance(out, int) else out


class Atom:
    """A union-find element standing for an index set of a given size."""

    __slots__ = ("id", "size", "parent", "rank", "ref", "pins", "marks", "tags")

    def __init__(self, id: int, size: Size) -> None:
        self.id = id
        self.size = size
        self.parent: Atom = self
        self.rank = 0
        self.ref: Refinement | None = None  # meaningful on roots only
        self.pins: list[str] = []  # class-level reasons (roots only)
        self.marks: set[str] = set()  # class-level facts (roots only): "head", "head_dim", ...
        self.tags: set[str] = set()  # object-level facts that survive unions: "q", "k", "v", "act"

    def __repr__(self) -> str:
        return f"Atom#{self.id}({self.size})"


@dataclass
class Refinement:
    kind: Literal["prod", "sum"]
    children: list[Atom]


Dim = tuple[Atom, ...]  # a tensor dimension: a product of atoms, major to minor


@dataclass
class SpaceTable:
    """All atoms of one analysis, with union, refinement and pinning."""

    atoms: list[Atom] = field(default_factory=list)
    where: str = ""  # the node being analysed, appended to pin reasons so users can find it

    # ------------------------------------------------------------------ basics
    def fresh(self, size: Size, pin: str | None = None) -> Atom:
        a = Atom(len(self.atoms), size)
        self.atoms.append(a)
        if pin:
            self.pin(a, pin)
        return a

    def fresh_dim(self, size: Size, pin: str | None = None) -> Dim:
        return (self.fresh(size, pin),)

    def find(self, a: Atom) -> Atom:
        root = a
        while root.parent is not root:
            root = root.parent
        while a.parent is not root:  # path compression
            a.parent, a = root, a.parent
        return root

    def size(self, d: Dim) -> Size:
        return prod(a.size for a in d)

    def expand(self, a: Atom) -> list[Atom]:
        """Leaf sequence of an atom through product refinements (sums stay opaque)."""
        r = self.find(a)
        if r.ref is not None and r.ref.kind == "prod":
            out: list[Atom] = []
            for c in r.ref.children:
                out.extend(self.expand(c))
            return out
        return [r]

    # ------------------------------------------------------------------ pins and marks
    def pin(self, atoms: Atom | Iterable[Atom], reason: str) -> None:
        if self.where and " at " not in reason:
            reason = f"{reason} at {self.where}"
        for a in [atoms] if isinstance(atoms, Atom) else atoms:
            r = self.find(a)
            if len(r.pins) < 4 and reason not in r.pins:
                r.pins.append(reason)

    def pin_dims(self, dims: Iterable[Dim], reason: str) -> None:
        for d in dims:
            self.pin(d, reason)

    def mark(self, atoms: Iterable[Atom], mark: str) -> None:
        for a in atoms:
            for leaf in self.expand(a):
                leaf.marks.add(mark)

    def has_mark(self, atoms: Iterable[Atom], mark: str) -> bool:
        """Whether any class in these atoms, or inside their refinements, carries ``mark``."""

        def walk(a: Atom) -> bool:
            r = self.find(a)
            return mark in r.marks or (r.ref is not None and any(walk(c) for c in r.ref.children))

        return any(walk(a) for a in atoms)

    def tag(self, atoms: Iterable[Atom], tag: str) -> None:
        for a in atoms:
            a.tags.add(tag)

    # ------------------------------------------------------------------ refinement
    def refine(self, a: Atom, kind: Literal["prod", "sum"], sizes: Sequence[Size]) -> list[Atom] | None:
        """Refine an unrefined class into children of the given sizes; None if impossible."""
        r = self.find(a)
        if r.ref is not None:
            if r.ref.kind == kind and [c.size for c in r.ref.children] == list(sizes):
                return list(r.ref.children)
            return None
        children = [self.fresh(s) for s in sizes]
        r.ref = Refinement(kind, children)
        return children

    # ------------------------------------------------------------------ unification
    def _link(self, ra: Atom, rb: Atom) -> Atom:
        if ra.rank < rb.rank:
            ra, rb = rb, ra
        rb.parent = ra
        if ra.rank == rb.rank:
            ra.rank += 1
        for p in rb.pins:
            if p not in ra.pins and len(ra.pins) < 4:
                ra.pins.append(p)
        ra.marks |= rb.marks
        return ra

    def unify_atoms(self, a: Atom, b: Atom) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra is rb:
            return
        if ra.size != rb.size:
            self.pin((ra, rb), f"size mismatch {ra.size} vs {rb.size}")
            return
        ref_a, ref_b = ra.ref, rb.ref
        r = self._link(ra, rb)
        r.ref = ref_a or ref_b
        other = rb if r is ra else ra
        other.ref = None
        if ref_a is None or ref_b is None:
            return
        if ref_a.kind == ref_b.kind == "prod":
            self.unify_seq(list(ref_a.children), list(ref_b.children))
        elif ref_a.kind == ref_b.kind == "sum" and [c.size for c in ref_a.children] == [c.size for c in ref_b.children]:
            for x, y in zip(ref_a.children, ref_b.children):
                self.unify_atoms(x, y)
        elif ref_a.kind == ref_b.kind == "sum":
            self._unify_sums(r, ref_a.children, ref_b.children)
        else:
            self.pin(r, "space is both split into parts and factored into units")

    def _unify_sums(self, r: Atom, xs: list[Atom], ys: list[Atom]) -> None:
        """Two concatenations with different boundaries: refine both to the common boundaries."""
        if not all(isinstance(c.size, int) for c in xs + ys):
            self.pin(r, "symbolic split boundaries")
            return
        xs, ys = list(xs), list(ys)
        i = j = 0
        while i < len(xs) and j < len(ys):
            x, y = self.find(xs[i]), self.find(ys[j])
            if x.size == y.size:
                self.unify_atoms(x, y)
                i, j = i + 1, j + 1
                continue
            big, small, seq, k = (x, y, xs, i) if x.size > y.size else (y, x, ys, j)
            parts = self.refine(big, "sum", [small.size, big.size - small.size])
            if parts is None:
                self.pin((r, big, small), "overlapping splits of one space")
                return
            seq[k : k + 1] = parts

    def unify_seq(self, xs: list[Atom], ys: list[Atom]) -> None:
        """Unify two products of atoms (major to minor), factoring atoms to align them."""
        xs, ys = self.expand_dim(xs), self.expand_dim(ys)
        i = j = 0
        while i < len(xs) and j < len(ys):
            x, y = self.find(xs[i]), self.find(ys[j])
            if x is y:
                i, j = i + 1, j + 1
                continue
            if x.size == y.size:
                self.unify_atoms(x, y)
                i, j = i + 1, j + 1
                continue
            q = quotient(x.size, y.size)
            if q is not None and x.ref is None:
                xs[i : i + 1] = self.refine(x, "prod", [y.size, q])  # type: ignore[assignment]
                continue
            q = quotient(y.size, x.size)
            if q is not None and y.ref is None:
                ys[j : j + 1] = self.refine(y, "prod", [x.size, q])  # type: ignore[assignment]
                continue
            self.pin(xs[i:] + ys[j:], "dimensions do not factor into each other")
            return
        if i < len(xs) or j < len(ys):
            self.pin(xs[i:] + ys[j:], "dimensions do not factor into each other")

    def unify(self, a: Dim, b: Dim) -> None:
        self.unify_seq(list(a), list(b))

    # ------------------------------------------------------------------ reshape
    def reshape(self, dims: Sequence[Dim], out_sizes: Sequence[Size]) -> list[Dim]:
        """Output dims of a reshape: the input's leaf sequence regrouped into ``out_sizes``."""
        seq = [a for d in dims for a in self.expand_dim(d)]
        out: list[Dim] = []
        k = 0
        for size in out_sizes:
            if size == 1:
                out.append((self.fresh(1),))
                continue
            taken: list[Atom] = []
            need: Size = size
            while need != 1:
                if k >= len(seq):
                    return self._opaque_reshape(dims, out_sizes)
                a = self.find(seq[k])  # never size 1: expand_dim drops those, a split leaves q > 1
                if a.size == need:
                    taken.append(a)
                    k += 1
                    need = 1
                    continue
                q = quotient(need, a.size)
                if q is not None:  # the atom is a whole factor of this output dim
                    taken.append(a)
                    k += 1
                    need = q
                    continue
                q = quotient(a.size, need)
                if q is not None and a.ref is None:  # split the atom: major part here, rest next
                    major, minor = self.refine(a, "prod", [need, q])  # type: ignore[misc]
                    taken.append(major)
                    seq[k] = minor
                    need = 1
                    continue
                return self._opaque_reshape(dims, out_sizes)
            out.append(tuple(taken))
        return out

    def expand_dim(self, d: Sequence[Atom]) -> list[Atom]:
        """Leaf sequence of a product of atoms, without the size-1 leaves (they index nothing)."""
        return [a for x in d for a in self.expand(x) if a.size != 1]

    def _opaque_reshape(self, dims: Sequence[Dim], out_sizes: Sequence[Size]) -> list[Dim]:
        """A reshape whose middle does not factor (XLNet's ``[b, n, i, j] -> [b, n, j, i]`` relative shift,
        Funnel's ``[b, n, t, 2t] -> [b, n, 2t, t]``). Row-major, a leading dim of the same size on both sides
        is indexed alike (its stride is the product of everything after it, equal on both sides), and so is
        a trailing one: those pass, only the dims between them are pinned."""
        reason = "reshape does not factor its dimensions"
        in_sizes = [self.size(d) for d in dims]
        lead = 0
        while lead < min(len(dims), len(out_sizes)) and in_sizes[lead] == out_sizes[lead]:
            lead += 1
        trail = 0
        while (
            trail < min(len(dims), len(out_sizes)) - lead
            and in_sizes[len(dims) - 1 - trail] == out_sizes[len(out_sizes) - 1 - trail]
        ):
            trail += 1
        mid_in, mid_out = dims[lead : len(dims) - trail], out_sizes[lead : len(out_sizes) - trail]
        self.pin_dims(mid_in, reason)
        middle = [self.fresh_dim(s, reason) for s in mid_out]
        return [*dims[:lead], *middle, *dims[len(dims) - trail :]]

    # ------------------------------------------------------------------ sum structure
    def slice(self, d: Dim, start: int, length: int, reason: str) -> Dim:
        """A contiguous range of a dimension, as its own space when it is a range of units."""
        total = self.size(d)
        if start == 0 and length == total:
            return d
        if length == 0:
            return self.fresh_dim(0)
        leaves = self.expand_dim(d)
        # the range must cut only the most major non-trivial leaf
        if not leaves or not all(isinstance(a.size, int) for a in leaves):
            self.pin(d, reason)
            return self.fresh_dim(length, reason)
        head, rest = leaves[0], leaves[1:]
        inner = prod(a.size for a in rest)
        if start % inner or length % inner:
            self.pin(d, reason)
            return self.fresh_dim(length, reason)
        part = self._sum_range(head, start // inner, length // inner, reason)
        return (part, *rest)

    def _sum_range(self, a: Atom, start: int, length: int, reason: str) -> Atom:
        r = self.find(a)
        if start == 0 and length == r.size:
            return r
        if r.ref is not None and r.ref.kind == "sum":
            off = 0
            picked = []
            for c in r.ref.children:
                cs = self.find(c).size
                if off + cs <= start or off >= start + length:
                    off += cs
                    continue
                if off >= start and off + cs <= start + length:
                    picked.append(c)
                else:  # range cuts this child: recurse into it
                    lo = max(start, off) - off
                    hi = min(start + length, off + cs) - off
                    picked.append(self._sum_range(c, lo, hi - lo, reason))
                off += cs
            if len(picked) == 1:
                return picked[0]
            whole = self.fresh(length)
            whole.ref = Refinement("sum", picked)
            return whole
        if r.ref is not None:
            self.pin(r, reason)
            return self.fresh(length, reason)
        sizes = [s for s in (start, length, r.size - start - length) if s > 0]
        children = self.refine(r, "sum", sizes)
        assert children is not None
        return children[1] if start > 0 else children[0]

    def concat(self, dims: Sequence[Dim], reason: str) -> Dim:
        """The concatenation of dimensions: a new space refined as their sum."""
        parts: list[Atom] = []
        for d in dims:
            size = self.size(d)
            if size == 0:
                continue  # an empty piece occupies no offsets
            leaves = self.expand_dim(d)
            if len(leaves) == 0:  # a size-1 piece still shifts every later offset by one
                parts.append(self.fresh(1))
            elif len(leaves) == 1:
                parts.append(leaves[0])
            else:  # a product as one part: wrap it in an atom refined by that product
                w = self.fresh(self.size(d))
                w.ref = Refinement("prod", list(leaves))
                parts.append(w)
        if len(parts) == 1:
            return (parts[0],)
        total: Size = 0
        for p in parts:
            total = total + p.size
        out = self.fresh(total if isinstance(total, int) else _canon(sympy.sympify(total)))
        out.ref = Refinement("sum", parts)
        return (out,)

    # ------------------------------------------------------------------ final state
    def finalize(self) -> None:
        """Push pins and marks of refined classes down to every class inside them."""
        # keyed by the facts themselves, not their hash: a hash collision would skip a pin
        seen: set[tuple[int, tuple[str, ...], tuple[str, ...]]] = set()

        def down(r: Atom, pins: list[str], marks: set[str]) -> None:
            key = (r.id, tuple(pins), tuple(sorted(marks)))
            if key in seen:
                return
            seen.add(key)
            for p in pins:
                if p not in r.pins and len(r.pins) < 4:
                    r.pins.append(p)
            r.marks |= marks
            if r.ref is not None:
                for c in r.ref.children:
                    down(self.find(c), list(r.pins), set(r.marks))

        for a in self.atoms:
            if a.parent is a and a.ref is not None and (a.pins or a.marks):
                down(a, list(a.pins), set(a.marks))
