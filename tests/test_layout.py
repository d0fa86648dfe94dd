"""The shape of the code base: modules import only downward (no cycles), files stay readable."""
import ast
import graphlib

from conftest import ROOT


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in ROOT.glob("*.py")}
    graph = {m: set() for m in modules}
    for m, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module.split(".")[0]]
            else:
                continue
            graph[m] |= {n for n in names if n in modules and n != m}   # imports inside functions count too
    return graph


def test_module_imports_have_no_cycle():
    order = list(graphlib.TopologicalSorter(import_graph()).static_order())   # raises CycleError on a cycle
    assert order.index("model") < order.index("gated_memory") < order.index("lift") < order.index("train")


def test_no_module_imports_an_entry_script():
    graph = import_graph()
    for entry in ("train", "eval"):
        assert not [m for m, deps in graph.items() if entry in deps and m != entry], entry


def test_model_holds_no_lift_code():
    assert import_graph()["model"] <= {"options"}


def test_every_module_is_under_350_lines():
    long = {p.name: n for p in ROOT.glob("*.py") if (n := len(p.read_text().splitlines())) > 350}
    assert not long, long
