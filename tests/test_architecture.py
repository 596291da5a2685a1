"""The package's import graph: no cycle, and no module reaches into another's private names.

Every `import` counts, at module level, inside functions and under `TYPE_CHECKING`
alike: an import hidden in a function is still a dependency (docs/architecture.md).
"""
import ast
import os

import kd_jax

PACKAGE = os.path.dirname(kd_jax.__file__)


def _modules() -> dict[str, str]:
  """{dotted module name: file path} of every module of kd_jax (configs excluded)."""
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for file in files:
      if not file.endswith(".py"):
        continue
      path = os.path.join(folder, file)
      parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      found[".".join(parts)] = path
  return found


def _imports(name: str, path: str, modules) -> list[tuple[str, str, int]]:
  """(kd_jax module, name used from it or '', line) for each import in a module.

  Names used as attributes of an imported module (`experiment._model`) count as
  imported from it.
  """
  tree = ast.parse(open(path).read(), path)
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
  out, aliases = [], {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith("kd_jax"):
          out.append((alias.name, "", node.lineno))
          if alias.asname:
            aliases[alias.asname] = alias.name
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                        + ([base] if base else []))
      if not base.startswith("kd_jax"):
        continue
      for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in modules:
          out.append((sub, "", node.lineno))
          aliases[alias.asname or alias.name] = sub
        else:
          out.append((base, alias.name, node.lineno))
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        and node.value.id in aliases):
      out.append((aliases[node.value.id], node.attr, node.lineno))
  return out


def _graph():
  modules = _modules()
  return modules, {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return found


def test_cycle_finder_finds_a_cycle_and_passes_a_tree():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
  assert _cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_among_kd_jax_modules():
  modules, imports = _graph()
  edges = {name: {target for target, _, _ in found if target in modules and target != name}
           for name, found in imports.items()}
  assert _cycles(edges) == []


def test_no_module_imports_a_private_name_of_another():
  _, imports = _graph()
  offending = [f"{name}:{line} imports {target}" + (f".{attr}" if attr else "")
               for name, found in imports.items() for target, attr, line in found
               if _private(name, target, attr)]
  assert offending == []


def _private(importer: str, target: str, attr: str) -> bool:
  """An underscore name of another module, or a private module of another package.

  A package's own private modules (optax style: `losses/_logit.py`) are its own.
  """
  if attr.startswith("_"):
    return True
  parent, _, leaf = target.rpartition(".")
  return leaf.startswith("_") and not (importer == parent
                                       or importer.startswith(parent + "."))
