"""No import cycles in the training and fine-tuning packages: each module's imports are read
from its source and walked. At module level there must be none anywhere in them; and among
their own modules there must be none even counting the imports inside functions (imports
placed inside functions to hide a cycle, as finetune/checkpoint <-> finetune/classify and
finetune/lora <-> finetune/trainable once were, count)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastgpt"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str], inside_functions: bool = False) -> set[str]:
    """fastgpt modules imported by `path` (at module level, or anywhere)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not inside_functions:
                continue
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:  # `from . import module` imports the module; else the names' module
                    found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
            else:
                visit(ast.iter_child_nodes(node))
    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in modules and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                connect(w)
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
                result.append(sorted(component))
    for v in graph:
        if v not in index:
            connect(v)
    return result


OURS = ("fastgpt.train", "fastgpt.finetune")


def test_training_and_finetuning_modules_import_without_cycles():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, modules) for p in paths}
    assert "fastgpt.finetune.lora" in graph["fastgpt.finetune.trainable"]  # the walker sees top-level imports
    assert [c for c in _cycles(graph) if any(m.startswith(OURS) for m in c)] == []


def test_no_cycle_among_them_hidden_inside_functions():
    paths = sorted(p for p in PACKAGE.rglob("*.py") if _module_name(p).startswith(OURS))
    modules = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, modules, inside_functions=True) for p in paths}
    assert _cycles(graph) == []


def test_the_walker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
