"""The import graph of amd_jax holds its layers (docs/architecture.md) without hidden imports.

Read from the source with ast (nothing is imported): which amd_jax module imports which, at
module level and inside functions.
"""
from __future__ import annotations

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "amd_jax")

# Imports of amd_jax modules inside functions: allowed only here, each for its reason.
DEFERRED = {
    ("amd_jax.main", "amd_jax.train"): "flags (and --help, and config errors) first: JAX and the loop load after",
}

# Bottom layers and what they may import (besides themselves).
LOWER_LAYERS = {
    "amd_jax.errors": (),
    "amd_jax.paths": (),
    "amd_jax.config_base": (),
    "amd_jax.config_files": ("amd_jax.errors",),
    "amd_jax.models": ("amd_jax.errors",),
    "amd_jax.masking": ("amd_jax.errors",),
    "amd_jax.targets": ("amd_jax.errors",),
    "amd_jax.losses": ("amd_jax.errors",),
    "amd_jax.data": ("amd_jax.errors", "amd_jax.paths", "amd_jax.config_base", "amd_jax.config_files"),
    "amd_jax.convert": ("amd_jax.errors", "amd_jax.paths", "amd_jax.models", "amd_jax.progress"),
    "amd_jax.weights": ("amd_jax.errors", "amd_jax.paths", "amd_jax.models", "amd_jax.convert"),
}


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
  return rel[: -len(".__init__")] if rel.endswith(".__init__") else rel


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
  if not node.level:
    return node.module or ""
  base = module.split(".")
  base = base if is_package else base[:-1]
  base = base[: len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: str) -> list[tuple[str, bool]]:
  """(imported amd_jax module, inside a function?) for every import in a file."""
  module = _module_name(path)
  is_package = path.endswith("__init__.py")
  tree = ast.parse(open(path, encoding="utf-8").read(), path)
  found = []

  def visit(node, in_function: bool):
    for child in ast.iter_child_nodes(node):
      inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
      if isinstance(child, ast.Import):
        found.extend((a.name, in_function) for a in child.names if a.name.startswith("amd_jax"))
      elif isinstance(child, ast.ImportFrom):
        target = _resolve(child, module, is_package)
        if target.startswith("amd_jax"):
          for alias in child.names:   # `from amd_jax import x` may name a module
            candidate = f"{target}.{alias.name}"
            found.append((candidate if _exists(candidate) else target, in_function))
      visit(child, inside)

  visit(tree, False)
  return found


def _exists(module: str) -> bool:
  rel = os.path.join(os.path.dirname(PACKAGE), *module.split("."))
  return os.path.isfile(rel + ".py") or os.path.isfile(os.path.join(rel, "__init__.py"))


def all_modules() -> dict[str, str]:
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(root, f)
        out[_module_name(path)] = path
  return out


GRAPH = {name: imports_of(path) for name, path in all_modules().items()}


def _within(module: str, prefix: str) -> bool:
  return module == prefix or module.startswith(prefix + ".")


def test_no_hidden_imports_of_amd_jax_modules():
  hidden = [(m, t) for m, imports in GRAPH.items() for t, inside in imports if inside
            and not any(_within(m, a) and _within(t, b) for a, b in DEFERRED)]
  assert not hidden, "imports inside functions (a layering cycle dodged?): " + ", ".join(f"{m} -> {t}"
                                                                                        for m, t in hidden)


@pytest.mark.parametrize("layer", sorted(LOWER_LAYERS))
def test_lower_layers_import_nothing_above_them(layer):
  """A package's command line (`python -m amd_jax.convert`: its __main__) is an entry point, not a layer."""
  allowed = (layer,) + LOWER_LAYERS[layer]
  bad = sorted({(m, t) for m, imports in GRAPH.items() if _within(m, layer) and not m.endswith(".__main__")
                for t, _ in imports
                if t != "amd_jax" and not any(_within(t, a) for a in allowed)})
  assert not bad, f"{layer} imports above its layer: " + ", ".join(f"{m} -> {t}" for m, t in bad)


def test_methods_and_convert_never_import_train():
  bad = [(m, t) for m, imports in GRAPH.items() for t, _ in imports
         if (_within(m, "amd_jax.methods") or _within(m, "amd_jax.convert")) and _within(t, "amd_jax.train")]
  assert not bad, ", ".join(f"{m} -> {t}" for m, t in bad)


def test_module_graph_has_no_cycles():
  edges = {m: sorted({t for t, inside in imports if not inside and t in GRAPH and t != m})
           for m, imports in GRAPH.items()}
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for t in edges[m]:
      if state.get(t) == "open":
        cycles.append(stack[stack.index(t):] + [t])
      elif t not in state:
        visit(t)
    stack.pop()
    state[m] = "done"

  for m in sorted(edges):
    if m not in state:
      visit(m)
  assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
