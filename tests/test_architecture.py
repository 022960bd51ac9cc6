"""The shape of the code: imports inside qwen/ form no circle (module-level or inside functions), and nothing in
qwen/ imports an entry-point script."""

import ast

from conftest import REPO

ENTRY_SCRIPTS = {path.stem for path in REPO.glob("*.py")} - {"qwen_generation_utils"}


def qwen_imports() -> dict[str, set[str]]:
    """module -> the qwen modules it imports anywhere in its body, as dotted names under `qwen`."""
    graph = {}
    for path in sorted((REPO / "qwen").rglob("*.py")):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
                targets |= {name for name in names if name.startswith("qwen") or name.split(".")[0] in ENTRY_SCRIPTS}
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("qwen") or a.name in ENTRY_SCRIPTS}
        graph[module] = targets
    return {module: {t for t in targets if t in graph or t in ENTRY_SCRIPTS} - {module}
            for module, targets in graph.items()}


def test_no_import_circle_in_qwen():
    graph = qwen_imports()
    graph = {m: {t for t in ts if t != "qwen"} for m, ts in graph.items()}  # `import qwen` only registers
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, ()):
            assert state.get(target) != 1, f"import circle: {' -> '.join([*path, module, target])}"
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])


def test_qwen_never_imports_an_entry_script():
    offenders = {m: ts & ENTRY_SCRIPTS for m, ts in qwen_imports().items() if ts & ENTRY_SCRIPTS}
    assert not offenders


def test_the_engine_is_constructed_in_one_place():
    """Every script gets its engine from chat_backend.chat_engine (context limit, padding guard): no other copy."""
    builders = set()
    for path in sorted((REPO / "qwen").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", None)
                if name == "Engine":
                    builders.add(path.relative_to(REPO).as_posix())
    assert builders == {"qwen/chat_backend.py"}


def test_the_api_schema_does_not_import_the_engine():
    """protocol.py (request and response shapes) reaches the sampler only through qwen.sampling, which does not
    import the engine either (checked through every module protocol.py imports)."""
    graph, reached, todo = qwen_imports(), set(), ["qwen.protocol"]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in reached:
                reached.add(target)
                todo.append(target)
    assert "qwen.sampling" in reached and not {t for t in reached if t.startswith("qwen.engine")}
