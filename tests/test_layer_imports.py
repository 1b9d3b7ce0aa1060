"""The layer modules never import the parallel wing or the training package (they import the
layer, not the other way round): read from the sources, function-level imports included."""

from __future__ import annotations

import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The MoE layer and what it is built from; jaxmoe.parallel and jaxmoe.train import these.
LAYER_MODULES = ("moe", "experts", "router", "dispatch", "capacity", "config", "recompute",
                 "moa", "model")
ABOVE_THE_LAYER = ("jaxmoe.parallel", "jaxmoe.train")


def _imports(path: str) -> set[str]:
  """Every module named by an import statement of the file (anywhere in it)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


@pytest.mark.parametrize("name", LAYER_MODULES)
def test_layer_module_does_not_import_parallel_or_train(name):
  imports = _imports(os.path.join(ROOT, "jaxmoe", f"{name}.py"))
  bad = sorted(m for m in imports if m.startswith(ABOVE_THE_LAYER)
               or m in ("jaxmoe.parallel", "jaxmoe.train"))
  assert not bad, f"jaxmoe/{name}.py imports {bad}"


def test_the_rule_sees_a_violation(tmp_path):
  """The check reads function-level imports too (so a hidden one cannot slip through)."""
  path = tmp_path / "m.py"
  path.write_text("def f():\n  from jaxmoe.parallel import layer\n  return layer\n")
  assert "jaxmoe.parallel.layer" in _imports(str(path))
