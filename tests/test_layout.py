"""The shape of the house (docs/code-map.md): imports point down, no module too big to read, a README a newcomer
reads in two minutes."""

import ast
import inspect
import re

from conftest import ROOT

PACKAGE = ROOT / "ddpm_lightning"


def imports() -> dict[str, set[str]]:
    """Each module of the package and the package modules it imports (lazy imports inside functions included)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ddpm_lightning"):
                found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("ddpm_lightning")}
        graph[name] = found
    return {m: {i for i in found if i in graph and i != m} for m, found in graph.items()}


def test_no_import_cycle_among_the_package_modules():
    graph = imports()
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}  # a package's own __init__
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", f"import cycle: {' -> '.join(path + [m])}"
        state[m] = "open"
        for dep in sorted(graph[m]):
            visit(dep, path + [m])
        state[m] = "done"

    for m in sorted(graph):
        visit(m, [])


def test_the_method_knows_nothing_of_lightning_hydra_or_files():
    for path in (PACKAGE / "diffusion").glob("*.py"):
        text = path.read_text()
        assert not re.search(
            r"^(import|from) (lightning|hydra|omegaconf)|ddpm_lightning\.(files|module|callbacks)", text, re.M
        ), path


def test_no_module_of_metrics_is_over_300_lines_and_diffusion_module_is_small():
    assert (PACKAGE / "metrics" / "__init__.py").is_file()
    for path in (PACKAGE / "metrics").glob("*.py"):
        assert len(path.read_text().splitlines()) <= 300, path
    from ddpm_lightning.module import DiffusionModule

    assert len(inspect.getsource(DiffusionModule).splitlines()) <= 140


def test_the_readme_is_short_and_names_no_path_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 180
    assert "../" not in text and "shared/" not in text
    for link in re.findall(r"\]\(([^)#]+)\)", text):
        assert (ROOT / link).exists(), link
