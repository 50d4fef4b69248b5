"""The package's layers, as docs/design.md draws them: no import cycles, each layer
imports only from the layers below it (imports inside functions included), and no library
module imports the tools."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mctf_jax")

# What each layer may import from the package, besides itself.
ALLOWED = {
    "mctf_jax.fusion": ("mctf_jax.errors",),
    "mctf_jax.models": ("mctf_jax.errors", "mctf_jax.fusion"),
}


def _modules() -> dict[str, str]:
  found = {}
  for directory, _, files in os.walk(ROOT):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        module = os.path.relpath(path[:-3], os.path.dirname(ROOT)).replace(os.sep, ".")
        found[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
  return found


def _imports(module: str, path: str, known) -> set[str]:
  package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.Import):
      out |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parts + ([base] if base else []))
      for alias in node.names:
        full = f"{base}.{alias.name}"
        out.add(full if full in known else base)
  return {m for m in out if m in known and m != module}


def _graph():
  modules = _modules()
  return {m: _imports(m, p, modules) for m, p in modules.items()}


def test_each_layer_imports_only_the_layers_below():
  bad = []
  for module, imported in _graph().items():
    for layer, allowed in ALLOWED.items():
      if module == layer or module.startswith(layer + "."):
        bad += [f"{module} imports {m}" for m in imported
                if not (m == layer or m.startswith(layer + ".")
                        or any(m == a or m.startswith(a + ".") for a in allowed))]
  assert not bad, bad


def test_no_import_cycles():
  graph = _graph()
  # The package itself re-exports from its layers; importing it is not a dependency cycle.
  graph = {m: {d for d in deps if d != "mctf_jax"} for m, deps in graph.items()}
  cycles, state = [], {}

  def visit(module, path):
    state[module] = "open"
    for dep in sorted(graph[module]):
      if state.get(dep) == "open":
        cycles.append(path[path.index(dep):] + [dep])
      elif dep not in state:
        visit(dep, path + [dep])
    state[module] = "done"

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
  assert not cycles, cycles


def test_the_library_does_not_import_its_tools():
  """tools/ holds command lines over the library (the FLOP model itself is mctf_jax.cost):
  nothing below them imports them."""
  bad = [f"{module} imports {m}" for module, imported in _graph().items()
         if not module.startswith("mctf_jax.tools") for m in imported
         if m.startswith("mctf_jax.tools")]
  assert not bad, bad


def _function_level_imports(path: str):
  """(line number, text) of each import inside a function of the file at `path`, with
  whether it, a line of its run of consecutive import lines, or the line above that run
  carries a comment."""
  lines = open(path).read().splitlines()
  is_import = lambda text: text.lstrip().startswith(("import ", "from "))   # noqa: E731
  for function in ast.walk(ast.parse("\n".join(lines))):
    if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
      continue
    for node in ast.walk(function):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        first = last = node.lineno - 1
        while first > 0 and is_import(lines[first - 1]):
          first -= 1
        while last + 1 < len(lines) and is_import(lines[last + 1]):
          last += 1
        said = any("#" in lines[i] for i in range(max(first - 1, 0), last + 1))
        yield node.lineno, lines[node.lineno - 1].strip(), said


def test_imports_inside_functions_say_why():
  """An import inside a function hides an arrow of the dependency graph: the library, the
  entry points and the benchmarks make one only where it spares an import users feel
  (TensorFlow, matplotlib, an optional package), and say so in a comment beside it."""
  top = os.path.dirname(ROOT)
  paths = [os.path.join(top, name) for name in ("train.py", "eval.py")]
  for directory in (ROOT, os.path.join(top, "benchmarks")):
    paths += [os.path.join(d, f) for d, _, files in os.walk(directory) for f in files
              if f.endswith(".py")]
  silent = [f"{os.path.relpath(path, top)}:{line}: {text}" for path in sorted(paths)
            for line, text, said in _function_level_imports(path) if not said]
  assert not silent, "imports inside functions without a comment saying why:\n" + \
      "\n".join(silent)
