"""The house rules of vrwkv_core's layout, checked statically (ast only, nothing imported).

- no import cycle at module level; imports point one way
  (cli -> serve/train/infer/eval/bench -> checkpoint -> model -> kernels);
- no file under model/ opens, reads or writes files (weights are checkpoint/'s job);
- model versions (and tower names) are told apart only in model/families.py (and the
  towers' own registry), never by comparing strings elsewhere;
- in-function imports of vrwkv_core modules only where the model hands over to checkpoint/.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "vrwkv_core"
VERSIONS = {"x060", "x070"}
TOWERS = {"dino", "siglip", "sam", "clip", "tiny"}
HANDOVER = "the one way into checkpoint/"  # the comment that marks the allowed lazy imports

# Layers, lowest first: a module may import its own layer and lower ones only.
LAYERS = [
    {"errors", "fsutil", "textio", "paths", "progress", "config", "recipe_schema", "tokenizer", "hub"},
    {"kernels"},
    {"model"},
    {"data"},
    {"checkpoint"},
    {"infer", "eval", "train", "bench", "serve", "env"},
]
FORBIDDEN = {  # on top of the layering: pairs of packages that never meet
    "infer": {"train"}, "eval": {"train"}, "serve": {"train"}, "bench": {"train"},
}  # fmt: skip


def _modules() -> dict[str, Path]:
    mods = {}
    for path in CORE.rglob("*.py"):
        parts = path.relative_to(CORE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


def _top_level_imports(tree: ast.Module) -> list[ast.ImportFrom | ast.Import]:
    """Imports run when the module is imported (TYPE_CHECKING blocks left out)."""
    found: list = []

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found.append(node)
            elif isinstance(node, ast.If) and "TYPE_CHECKING" not in ast.unparse(node.test):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)

    visit(tree.body)
    return found


def _targets(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def _graph() -> dict[str, set[str]]:
    """Module -> the vrwkv_core modules its import runs (parent packages included, except
    its own ancestors, which are always being imported already)."""
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for node in _top_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _targets(node):
                parts = target.split(".")
                for i in range(2, len(parts) + 1):
                    mod = ".".join(parts[:i])
                    if mod in MODULES and mod != name and not name.startswith(mod + "."):
                        deps.add(mod)
        graph[name] = deps
    return graph


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _layer(package: str) -> int:
    for i, layer in enumerate(LAYERS):
        if package in layer:
            return i
    raise AssertionError(f"vrwkv_core.{package} is in no layer of tests/test_architecture.py")


def test_no_module_level_import_cycle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    path: list[str] = []

    def visit(mod: str) -> None:
        state[mod] = 1
        path.append(mod)
        for dep in sorted(graph[mod]):
            if state.get(dep) == 1:
                cycle = path[path.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        path.pop()
        state[mod] = 2

    for mod in sorted(graph):
        if mod not in state:
            visit(mod)


def test_imports_point_one_way() -> None:
    bad = []
    for mod, deps in _graph().items():
        pkg = _package(mod)
        if not pkg:
            continue
        for dep in deps:
            dep_pkg = _package(dep)
            if dep_pkg and dep_pkg != pkg and (_layer(dep_pkg) > _layer(pkg) or dep_pkg in FORBIDDEN.get(pkg, ())):
                bad.append(f"{mod} imports {dep}")
    assert not bad, "\n".join(sorted(bad))


def test_core_never_imports_the_cli_or_typer() -> None:
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node):
                    assert not target.startswith(("vrwkv_cli", "typer")), f"{name} imports {target}"


FILE_CALLS = {"open", "read_text", "write_text", "read_bytes", "write_bytes", "load", "save", "save_file",
              "load_file", "safe_open", "atomic_path", "atomic_write_text", "mkdir", "unlink", "rename"}  # fmt: skip


@pytest.mark.parametrize("path", sorted((CORE / "model").rglob("*.py")), ids=lambda p: str(p.relative_to(CORE)))
def test_model_has_no_file_io(path: Path) -> None:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
            owner = ast.unparse(fn.value) if isinstance(fn, ast.Attribute) else ""
            if name in ("load", "save") and owner not in ("torch",):
                continue  # e.g. RWKVState.load: a method handing over to checkpoint/
            assert name not in FILE_CALLS, f"{path.name}:{node.lineno}: {ast.unparse(node)[:80]}"


def _string_comparisons(tree: ast.AST, values: set[str]) -> list[int]:
    """Lines comparing something with one of `values` (==, !=, in, not in a literal)."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Compare):
            continue
        for operand in (node.left, *node.comparators):
            consts = [operand] if isinstance(operand, ast.Constant) else list(getattr(operand, "elts", []))
            if any(isinstance(c, ast.Constant) and c.value in values for c in consts):
                lines.append(node.lineno)
    return lines


@pytest.mark.parametrize("what, values, allowed", [
    ("model versions", VERSIONS, {CORE / "model" / "families.py", CORE / "config.py"}),
    ("tower names", TOWERS, {CORE / "config.py"}),  # towers are told apart by the TOWERS registry's data
])  # fmt: skip
def test_families_and_towers_are_told_apart_only_by_their_registries(what: str, values: set, allowed: set) -> None:
    found = []
    for path in MODULES.values():
        if path not in allowed:
            found += [f"{path.relative_to(CORE)}:{ln}" for ln in _string_comparisons(ast.parse(path.read_text()), values)]
    assert not found, f"{what} compared as strings outside their registry: " + ", ".join(found)


def test_in_function_imports_of_the_core_only_hand_over_to_checkpoint() -> None:
    found = []
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        for node in ast.walk(ast.parse(text)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for sub in ast.walk(node):
                if isinstance(sub, ast.ImportFrom) and (sub.module or "").startswith("vrwkv_core"):
                    if HANDOVER not in lines[sub.lineno - 1]:
                        found.append(f"{path.relative_to(CORE)}:{sub.lineno} {sub.module}")
    assert not found, "in-function imports of vrwkv_core (move them to the top):\n" + "\n".join(sorted(set(found)))


def test_every_package_is_in_a_layer() -> None:
    for name in MODULES:
        if _package(name) and (CORE / _package(name)).is_dir():
            _layer(_package(name))
