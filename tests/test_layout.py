"""The package layout by role (docs/architecture.md section 2): module-level imports between packages go
one way only, and importing every package stays cheap (no torch)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "workbench"

# The layers of docs/architecture.md's table; a module may import its own layer or an earlier one at
# module level. Top-level modules other than these foundation ones are entry points (layer 9).
LAYERS = {
    "foundation": 0, "data": 1, "metrics": 2, "runtimes": 2, "lmeval": 3, "analysis": 3, "methods": 4,
    "planning": 5, "config": 6, "running": 7, "views": 8, "ui": 9, "entry": 9,
}
FOUNDATION = {"__init__", "errors", "paths", "environment", "cache", "process", "pathfield"}


def _unit(module: str) -> str:
    """The package a dotted module name belongs to: a subpackage, a foundation module or an entry point."""
    parts = module.split(".")
    if len(parts) == 1:
        return "foundation"
    if (ROOT / parts[1]).is_dir():
        return parts[1]
    return "foundation" if parts[1] in FOUNDATION else "entry"


def _module_level_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:  # only module level: imports inside functions load when they are used
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("workbench"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("workbench"))
    return found


def test_module_level_imports_follow_the_layers():
    upward = []
    for path in ROOT.rglob("*.py"):
        module = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        source = _unit(module)
        for target in _module_level_imports(path):
            if LAYERS[_unit(target)] > LAYERS[source]:
                upward.append(f"{module} imports {target}")
    assert not upward, "\n".join(sorted(upward))


def test_importing_every_package_loads_no_torch():
    code = ("import sys, workbench, workbench.data, workbench.analysis, workbench.methods, workbench.planning, "
            "workbench.config, workbench.running, workbench.views, workbench.runtimes, workbench.metrics; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_package_folder_ray_ships_is_the_whole_workbench_package() -> None:
    """Ray's py_modules must carry workbench/ itself (importable as `workbench` on a node), not one subfolder."""
    import workbench
    from workbench.running import scaleout

    assert scaleout.PACKAGE_DIR == Path(workbench.__file__).resolve().parent
