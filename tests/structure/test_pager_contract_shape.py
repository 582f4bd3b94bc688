"""The pager contract's shape, read from the source with ``ast``.

- A closed object's ``ObjectClosed`` is raised in one place, the dead pager
  (``vm/deadpager.py``); the VM's own "closed" is ``Kernel.check_open``.
  (``mapped/`` has objects of its own, outside the VM's pagers.)
- ``vm/`` never asks which pager an object has (``pager is ...``) and never
  compares a kind with a string: it calls pager methods or uses ``ObjectKind``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src" / "vmpager"


def _raises_object_closed(path: Path) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Raise) and node.exc is not None:
            exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(exc, ast.Name) and exc.id == "ObjectClosed":
                lines.append(node.lineno)
    return lines


def test_object_closed_is_raised_only_by_the_dead_pager_and_the_closed_vm() -> None:
    found = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = str(path.relative_to(SRC))
        if rel.startswith("mapped/"):
            continue
        lines = _raises_object_closed(path)
        if lines:
            found[rel] = len(lines)
    assert found == {"vm/deadpager.py": 1, "vm/kernel.py": 1}


def _pager_identity_tests(path: Path) -> list[str]:
    """``x is <...pager...>`` / ``x.kind == "..."`` comparisons in ``path``."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        operands = [node.left, *node.comparators]
        text = ast.unparse(node)
        names = [ast.unparse(o).split(".")[-1] for o in operands]
        # ``obj.pager is DEAD_PAGER`` is what "closed" means; ``pager is None`` is no test
        # of which pager; anything else ending in "pager" is.
        if (
            any(isinstance(op, (ast.Is, ast.IsNot)) for op in node.ops)
            and "DEAD_PAGER" not in names
            and "None" not in names
            and any(name.endswith("pager") for name in names)
        ):
            bad.append(f"{path.name}:{node.lineno}: {text}")
        kind_attribute = any(
            isinstance(o, ast.Attribute)
            and o.attr == "kind"
            and not ast.unparse(o.value).endswith("dtype")  # numpy's kind letters
            for o in operands
        )
        string = any(isinstance(o, ast.Constant) and isinstance(o.value, str) for o in operands)
        equality = any(isinstance(op, (ast.Eq, ast.NotEq)) for op in node.ops)
        if equality and kind_attribute and string:
            bad.append(f"{path.name}:{node.lineno}: {text}")
    return bad


def test_vm_asks_pagers_instead_of_testing_which_pager_or_kind_string() -> None:
    bad = []
    for path in sorted((SRC / "vm").glob("*.py")):
        bad += _pager_identity_tests(path)
    assert bad == []


def test_the_shape_checks_can_fail() -> None:
    sample = SRC.parent.parent / "tests" / "structure" / "_shape_sample.py"
    sample.write_text(
        "def f(obj, vm):\n"
        "    if obj.pager is vm.swap_pager:\n"
        "        raise ObjectClosed('x')\n"
        "    return obj.kind == 'anonymous'\n"
    )
    try:
        assert _raises_object_closed(sample) == [3]
        assert len(_pager_identity_tests(sample)) == 2
    finally:
        sample.unlink()
