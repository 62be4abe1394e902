"""The one error tree: errors.py draws every exception rpcstream defines, as it is, and
every exception it exports is raised somewhere in the package."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import rpcstream
from rpcstream import errors

PACKAGE = Path(rpcstream.__file__).parent
GUIDE = PACKAGE.parent / "docs" / "guide.md"
_LINE = re.compile(r"^(?P<indent>[ │]*)(?:[├└]── )?(?P<name>[A-Z]\w+)")


def drawn_tree(text: str) -> dict[str, str | None]:
    """``{class name: the name it hangs from}`` as the drawing shows it."""
    parents: dict[str, str | None] = {}
    stack: list[tuple[int, str]] = []
    for line in text.splitlines():
        m = _LINE.match(line)
        if m is None:
            continue
        depth = len(m.group("indent")) // 4 + (1 if "── " in line else 0)
        while stack and stack[-1][0] >= depth:
            stack.pop()
        parents[m.group("name")] = stack[-1][1] if stack else None
        stack.append((depth, m.group("name")))
    return parents


def defined_errors() -> dict[str, type[BaseException]]:
    return {
        name: cls
        for name, cls in vars(errors).items()
        if inspect.isclass(cls)
        and issubclass(cls, errors.RpcStreamError)
        and cls.__module__ == errors.__name__
        and not name.startswith("_")
    }


def _drawing(doc: str) -> str:
    start = doc.index("RpcStreamError\n")
    return doc[start : doc.index("\n\n", start)]


def test_the_drawing_in_errors_py_is_the_class_tree() -> None:
    assert errors.__doc__ is not None
    drawn = drawn_tree(_drawing(errors.__doc__))
    classes = defined_errors()
    assert set(drawn) == set(classes)
    for name, parent in drawn.items():
        cls = classes[name]
        if parent is None:
            assert cls is errors.RpcStreamError
            continue
        ours = [
            b for b in cls.__mro__[1:] if b.__module__ == errors.__name__ and b.__name__[0] != "_"
        ]
        assert ours[0].__name__ == parent, (
            f"{name} hangs from {ours[0].__name__}, drawn under {parent}"
        )


def test_no_module_outside_errors_py_defines_an_rpcstream_error() -> None:
    outside = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "errors.py" and path.parent == PACKAGE:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Name) and b.id in defined_errors() for b in node.bases
            ):
                outside.append(f"{path.relative_to(PACKAGE)}: {node.name}")
    assert outside == []


@pytest.mark.parametrize("name", sorted(defined_errors()))
def test_every_exported_error_is_raised_or_rebuilt_somewhere(name: str) -> None:
    assert name in errors.__all__ and name in rpcstream.__all__
    if name in {"RpcStreamError", "RemoteError", "Refused"}:
        return  # the roots callers catch, and what an authenticate hook raises
    cls = defined_errors()[name]
    code = getattr(cls, "code_default", None)
    rebuilt = code is not None and errors.RemoteError.from_wire(code, "m").__class__ is cls
    sources = [p.read_text() for p in PACKAGE.rglob("*.py") if p.name != "errors.py"]
    raised = any(re.search(rf"\b{name}\(", text) for text in sources)
    assert raised or rebuilt, f"{name} is exported but nothing raises it"


def test_the_guide_draws_the_same_tree() -> None:
    assert errors.__doc__ is not None
    guide = GUIDE.read_text()
    assert drawn_tree(_drawing(guide)) == drawn_tree(_drawing(errors.__doc__))
