"""The package's shape, checked from the source: layers import downwards only, Ray only in the sweep layer.

Every `import laray...` counts, at the top of a module or inside a function, so that a lazy import cannot
hide a cycle. The layers and why they are in this order: docs/architecture.md.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "laray"
# Lowest first. A module may import from its own layer and the layers before it, never after.
LAYERS = [
    ("errors", "score_names", "filelock", "interrupt", "checkpoint", "threads"),  # foundations: the top-level modules
    ("data",),
    ("settings",),
    ("method",),
    ("scoring",),
    ("training",),
    ("results",),
    ("sweep",),
    ("cli",),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if p.name not in ("__init__.py", "__main__.py"))


def part(path_or_dotted) -> str:
    """The layer name of a module: its subpackage, or itself for a top-level module."""
    if isinstance(path_or_dotted, Path):
        relative = path_or_dotted.relative_to(PACKAGE).with_suffix("")
        return relative.parts[0]
    return path_or_dotted.split(".")[1]


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in a file, wherever it is."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "laray":  # from laray import x: x is the module or a public name
                found += [(node.lineno, f"laray.{alias.name}") for alias in node.names]
    return found


def test_every_module_belongs_to_a_layer():
    assert modules(), "no modules found"
    assert {part(p) for p in modules()} <= set(RANK), sorted({part(p) for p in modules()} - set(RANK))


def test_imports_point_down_the_layers_only():
    upward = []
    for path in modules():
        own = RANK[part(path)]
        for line, name in imports(path):
            if name.startswith("laray.") and name.split(".")[1] in RANK and RANK[name.split(".")[1]] > own:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {name}")
    assert upward == []


@pytest.mark.parametrize("library", ["ray", "optuna"])
def test_ray_and_optuna_are_imported_only_by_the_sweep_layer_and_the_results_reader(library):
    # Optuna's study is also read after a sweep by `laray analyze` (results.scores): no Ray there.
    allowed = {"ray": {"sweep"}, "optuna": {"sweep", "results"}}[library]
    outside = [
        f"{path.relative_to(PACKAGE.parent)}:{line}"
        for path in modules()
        for line, name in imports(path)
        if name.split(".")[0] == library and part(path) not in allowed
    ]
    assert outside == []


def heavy_modules_after_importing(*names: str) -> list[str]:
    import subprocess
    import sys

    code = f"import sys, {', '.join(names)}; print(' '.join(sorted({{'torch', 'ray', 'optuna'}} & set(sys.modules))))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_the_cli_and_the_settings_load_without_torch_or_ray():
    # so that a usage or settings error is reported before torch is paid for
    assert (
        heavy_modules_after_importing("laray", "laray.cli.main", "laray.settings.defaults", "laray.data.sources") == []
    )


def test_importing_the_sweep_driver_does_not_load_ray():
    # Ray reads RAY_DISABLE_FAILURE_SIGNAL_HANDLER and friends when imported: ray_init sets them first.
    assert "ray" not in heavy_modules_after_importing("laray.sweep.driver")


def test_no_two_test_modules_share_a_name():
    """The test folders are not packages: pytest imports each test module by its file name alone, and a second
    module of the same name stops the whole suite's collection ("import file mismatch")."""
    names = [path.name for path in Path(__file__).parent.rglob("test_*.py")]
    assert sorted({n for n in names if names.count(n) > 1}) == []
