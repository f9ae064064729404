"""Dumps of what the ``"sparsify"`` backend did, one folder per compiled graph.

Layout under the dump directory::

    index.json, index.txt             every graph: passes that fired and why, fallbacks, files
    graph_000/dynamo.txt              the graph dynamo handed to the backend
    graph_000/forward.00_partitioned.txt, backward.00_partitioned.txt
    graph_000/forward.01_<pass>.txt   after each pass that changed the graph, with a .diff beside it
    graph_000/forward.inductor.py     Inductor's generated code (wrapper + kernels)
    graph_000/kernels/<module>.py     source of the Triton kernels swapped in

Text only, so ``diff -r`` of two dumps shows what a change to a pass did.
"""

from __future__ import annotations

import difflib
import json
import os
import threading
from pathlib import Path

import torch.fx

__all__ = ["Dumper", "graph_text"]

_LOCK = threading.Lock()


def graph_text(gm: torch.fx.GraphModule) -> str:
    """Readable graph: Python code with each node's shape/dtype annotated."""
    try:
        return gm.print_readable(print_output=False)
    except Exception:  # noqa: BLE001 - printing must never fail a compile
        return gm.code


class Dumper:
    """Writes one graph's files under ``root/graph_NNN`` and keeps ``index.json`` / ``index.txt`` current."""

    def __init__(self, root: str | os.PathLike, graph_id: int) -> None:
        self.root = Path(root)
        self.graph_id = graph_id
        self.dir = self.root / f"graph_{graph_id:03d}"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._last: dict[str, str] = {}
        self._step: dict[str, int] = {}

    def write(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return path

    def graph(self, role: str, stage: str, gm: torch.fx.GraphModule, *, changed: bool = True) -> None:
        """Write ``role`` ("forward"/"backward"/...) at ``stage``; unchanged stages are skipped, changed ones
        also get a unified diff against the previous stage."""
        text = graph_text(gm)
        prev = self._last.get(role)
        if prev is not None and (not changed or prev == text):
            return
        step = self._step.get(role, 0)
        self._step[role] = step + 1
        fname = f"{role}.{step:02d}_{stage}"
        self.write(fname + ".txt", text)
        if prev is not None:
            diff = difflib.unified_diff(prev.splitlines(True), text.splitlines(True),
                                        fromfile=f"{role} before {stage}", tofile=f"{role} after {stage}")
            self.write(fname + ".diff", "".join(diff))
        self._last[role] = text

    def update_index(self, record: dict) -> None:
        """Merge this graph's record into ``index.json`` and rewrite ``index.txt``."""
        with _LOCK:
            index_path = self.root / "index.json"
            try:
                index = json.loads(index_path.read_text())
            except (OSError, ValueError):
                index = {"graphs": []}
            graphs = [g for g in index.get("graphs", []) if g.get("id") != self.graph_id]
            record = dict(record)
            record["dir"] = self.dir.name
            record["files"] = sorted(str(p.relative_to(self.dir)) for p in self.dir.rglob("*") if p.is_file())
            graphs.append(record)
            graphs.sort(key=lambda g: g.get("id", 0))
            index["graphs"] = graphs
            index_path.write_text(json.dumps(index, indent=2, default=str))
            (self.root / "index.txt").write_text(_index_text(graphs))


def _index_text(graphs: list[dict]) -> str:
    lines = []
    for g in graphs:
        lines.append(f"graph {g.get('id')} ({g.get('dir')}): kernels={g.get('kernels')}")
        for p in g.get("passes", []):
            lines.append(f"  {p['name']}: {'fired' if p['changed'] else 'no change'}")
            lines.extend(f"    - {n}" for n in p.get("notes", []))
        for s in g.get("swaps", []):
            lines.append(f"  kernel: {s}")
        for f in g.get("fallbacks", []):
            lines.append(f"  FALLBACK: {f}")
        for f in g.get("files", []):
            lines.append(f"  file: {f}")
    return "\n".join(lines) + "\n"
