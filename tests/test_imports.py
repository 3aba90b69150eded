"""The layering, checked on the source (docs/architecture.md draws it):

* no import cycle between immagent's modules, function-level imports included;
* importing the store (the event log and its backends) loads no LLM or LiteLLM code;
* the store imports no client: only its package face names 0.1.2's ``Store``, loaded from
  the agent book on first use;
* a client (``immagent.clients``) imports no other client and no third-party SDK;
* an adapter (``immagent.integrations``) imports its SDK and exactly one client.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "immagent"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, modules: set[str], *, typing: bool = False) -> set[str]:
    """The immagent modules ``path`` imports, wherever the statement is (module level or
    inside a function), except under ``if TYPE_CHECKING:`` (never executed). ``from X
    import Y`` is an edge to X.Y when that is a module, else to X; ``importlib.
    import_module("immagent.…")`` with a constant counts too. A parent package is not an
    edge of its own: Python runs it first, but it cannot import a submodule's importer
    back unless one of these edges says so. With ``typing``, imports under ``if
    TYPE_CHECKING:`` count too (a dependency of the code's meaning, if not of its run)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not typing:
            for branch in node.orelse:
                visit(branch)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "import_module"):
            found.update(a.value for a in node.args if isinstance(a, ast.Constant)
                         and isinstance(a.value, str))
        elif (isinstance(node, ast.Dict) and me == "immagent"):
            # immagent/__init__'s table of lazily loaded modules (_LAZY).
            found.update(v.value for v in node.values if isinstance(v, ast.Constant)
                         and isinstance(v.value, str) and v.value.startswith("immagent."))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in modules and m != me}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    return {module_name(p): imports(p, modules) for p in files}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def external(path: Path) -> set[str]:
    """The third-party top-level packages ``path`` imports, anywhere in it."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found & SDKS


#: Third-party SDKs: the model and tool layers' and the integrations'.
SDKS = {"litellm", "openai", "mcp", "langgraph", "langchain_core", "agents", "pydantic_ai"}
#: What each adapter adapts.
ADAPTED = {"immagent.integrations.langgraph": {"langgraph", "langchain_core"},
           "immagent.integrations.langgraph_store": {"langgraph"},
           "immagent.integrations.openai_agents": {"agents"},
           "immagent.integrations.pydantic_ai": {"pydantic_ai"}}


def _modules(package: str) -> list[Path]:
    return sorted((PACKAGE / package).glob("*.py"))


def test_the_checker_sees_function_level_imports_and_finds_cycles() -> None:
    edges = graph()
    # The store package's face loads 0.1.2's Store on first use only, inside a function.
    assert "immagent.clients.agents" in edges["immagent.store"]
    assert "immagent.live" in edges["immagent.agent"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_importing_the_store_loads_no_llm_or_litellm_code() -> None:
    code = ("import immagent.store, immagent.store.log, immagent.store.backend, "
            "immagent.store.sqlite, immagent.store.memory, immagent.store.postgres, sys; "
            "print(sorted(m for m in sys.modules if m in ('immagent.llm', 'immagent.live', "
            "'immagent.advance', 'immagent.stream', 'immagent.mcp', 'immagent.offline') "
            "or m.split('.')[0] in ('litellm', 'openai', 'mcp')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_the_store_imports_no_client() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    outside = ("immagent.clients", "immagent.integrations", "immagent.agent",
               "immagent.registry")
    for path in _modules("store"):
        found = {m for m in imports(path, modules, typing=True) if m.startswith(outside)}
        if path.name == "__init__.py":  # 0.1.2's ``immagent.store.Store``, on first use
            assert found == {"immagent.clients.agents"}, found
        else:
            assert not found, (path.name, found)


def test_a_client_imports_no_other_client_and_no_sdk() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    clients = [p for p in _modules("clients") if p.name != "__init__.py"]
    assert {p.stem for p in clients} >= {"agents", "sessions", "checkpoints"}
    for path in clients:
        others = {m for m in imports(path, modules, typing=True)
                  if m.startswith("immagent.clients.")}
        assert not others, (path.name, others)
        assert not external(path), (path.name, external(path))
        # Nor through what it imports: loading it loads no SDK.
        code = (f"import {module_name(path)}, sys; print(sorted({{m.split('.')[0] for m in "
                f"sys.modules}} & set({sorted(SDKS)!r})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             check=True, cwd=ROOT)
        assert out.stdout.strip() == "[]", (path.name, out.stdout)


def test_an_adapter_imports_its_sdk_and_one_client() -> None:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in files}
    adapters = [p for p in _modules("integrations") if p.name != "__init__.py"]
    assert {module_name(p) for p in adapters} == set(ADAPTED)
    for path in adapters:
        clients = {m for m in imports(path, modules, typing=True)
                   if m.startswith("immagent.clients.")}
        assert len(clients) == 1, (path.name, clients)
        assert external(path) == ADAPTED[module_name(path)], (path.name, external(path))


def test_store_and_audit_modules_never_import_the_agent_or_llm_layers_at_module_level(
        ) -> None:
    upward = {"immagent.agent", "immagent.llm", "immagent.live", "immagent.advance",
              "immagent.simple", "immagent.mcp", "immagent.offline", "immagent.testing"}
    for path in [*_modules("store"), *_modules("audit")]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top |= {n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)}
        assert not top & upward, (path.name, top & upward)
