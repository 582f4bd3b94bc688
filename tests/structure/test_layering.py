"""The package layering, read from the source with ``ast`` (imports under
``TYPE_CHECKING`` count too: a type is a dependence).

- devices/, io/, swap/ and tiers/ are the lower floors: they never import vm/ or pager/.
- vm/ defines what it asks of pagers (vm/pagerops.py, vm/kernel.py); pager/
  depends on that, and nothing in vm/ but the wiring (vm/system.py) imports pager/.
- pager/ never imports the VM's public class or its private parts (vm/system.py,
  the fault path, the daemon, the batched calls, swapctl, invariants).
- nbd/ reaches vm/ only through nbd/vmdisk.py.
- Nothing calls an underscore attribute that its own package does not define.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "vmpager"

#: The lower floors: devices, I/O, the swap space and the tiers between it and devices.
LOWER = {"devices", "io", "swap", "tiers"}

#: vm/ modules pagers must not use: the public face, the fault path, the daemon, ...
VM_PRIVATE = {"system", "fault", "batch", "pageout", "shadow", "swapctl", "invariants"}


def _package(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> set[str]:
    """Every ``vmpager.*`` module ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("vmpager"))
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                base = path.relative_to(SRC.parent).with_suffix("").parts[: -node.level]
                module = ".".join((*base, node.module))
            else:
                module = node.module
            if module.startswith("vmpager"):
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names)
    return found


def _sources() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def _violations(rule: str) -> list[str]:
    bad = []
    for path in _sources():
        pkg = _package(path)
        rel = str(path.relative_to(SRC))
        for module in _imports(path):
            parts = module.split(".")
            target = parts[1] if len(parts) > 1 else ""
            sub = parts[2] if len(parts) > 2 else ""
            if rule == "lower" and pkg in LOWER and target in ("vm", "pager"):
                bad.append(f"{rel} imports {module}")
            if rule == "vm" and pkg == "vm" and path.name != "system.py" and target == "pager":
                bad.append(f"{rel} imports {module}")
            if rule == "pager" and pkg == "pager" and target == "vm" and sub in VM_PRIVATE:
                bad.append(f"{rel} imports {module}")
            if (
                rule == "nbd"
                and pkg == "nbd"
                and path.name != "vmdisk.py"
                and target in ("vm", "pager")
            ):
                bad.append(f"{rel} imports {module}")
    return bad


@pytest.mark.parametrize("rule", ["lower", "vm", "pager", "nbd"])
def test_import_direction(rule: str) -> None:
    assert _violations(rule) == []


def _defined_private_names() -> dict[str, set[str]]:
    """Per package, the underscore names it defines (functions, methods, attributes)."""
    names: dict[str, set[str]] = defaultdict(set)
    for path in _sources():
        pkg = _package(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names[pkg].add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names[pkg].add(node.attr)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names[pkg].add(node.id)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                names[pkg].add(node.target.id)
    return names


def test_no_private_access_across_packages() -> None:
    defined = _defined_private_names()
    bad = []
    for path in _sources():
        pkg = _package(path)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Attribute):
                continue
            attr = node.attr
            if not attr.startswith("_") or attr.startswith("__"):
                continue
            value = node.value
            if isinstance(value, ast.Name) and value.id in ("self", "cls"):
                continue
            if isinstance(value, ast.Call) and ast.unparse(value.func) == "super":
                continue
            if attr in defined[pkg]:
                continue
            if attr in ("_replace", "_fields", "_asdict", "_missing_"):  # namedtuple / enum API
                continue
            rel = path.relative_to(SRC)
            bad.append(f"{rel}:{node.lineno}: {ast.unparse(node)}")
    assert bad == []


def test_the_reader_sees_imports() -> None:
    """The rules above can fail: the wiring's imports of pagers are seen (it alone
    is exempt), and so are imports under TYPE_CHECKING."""
    assert "vmpager.pager.swap" in _imports(SRC / "vm" / "system.py")
    assert "vmpager.vm.kernel" in _imports(SRC / "pager" / "swap.py")  # TYPE_CHECKING only
