"""The import graph of the two packages, read from their source with `ast` (nothing is imported):
no module of kernels/ imports jaxmoe or flax, and neither package has an import cycle.

An edge goes from a module to each module it imports anywhere in its source (lazy imports inside
functions included: a cycle that only a deferred import keeps from failing is still a cycle).
`from pkg import name` is an edge to pkg.name when that is a module, else to pkg itself.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules(package: str) -> dict[str, str]:
  """{dotted module name: file path} of every .py file under the package."""
  out = {}
  for dirpath, _, files in os.walk(os.path.join(ROOT, package)):
    for f in files:
      if f.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, f), ROOT)[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        out[".".join(rel)] = os.path.join(dirpath, f)
  return out


MODULES = {**_modules("kernels"), **_modules("jaxmoe")}


def _imports(path: str) -> set[str]:
  """Dotted names of everything the file imports (absolute imports; module or package level)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      for a in node.names:
        full = f"{node.module}.{a.name}"
        names.add(full if full in MODULES else node.module)
  return names


def _graph(prefix: str) -> dict[str, set[str]]:
  """Edges between the modules whose names start with `prefix` (and within both packages)."""
  return {m: {i for i in _imports(p) if i in MODULES}
          for m, p in MODULES.items() if m == prefix or m.startswith(prefix + ".")}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (or a self-import): Tarjan."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in graph:
        continue
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1 or v in graph.get(v, ()):
        found.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_cycle_finder_finds_a_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b"}, "b": set()}) == []


def test_kernels_import_neither_jaxmoe_nor_flax():
  bad = {m: sorted(i for i in _imports(p) if i.split(".")[0] in ("jaxmoe", "flax"))
         for m, p in MODULES.items() if m.split(".")[0] == "kernels"}
  assert not {m: v for m, v in bad.items() if v}


def test_kernels_have_no_import_cycle():
  assert len(_graph("kernels")) > 20
  assert _cycles(_graph("kernels")) == []


def test_jaxmoe_has_no_import_cycle():
  assert _cycles(_graph("jaxmoe")) == []
