"""Which modules may import what: the layering rules of ARCHITECTURE.md, read from
the package's source (its syntax tree, so no comment or string can fool it).
One test per rule."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rpcstream"


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in one module, relative
    imports resolved against the module's own package."""
    module = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = module[:-1]  # a package's __init__ is in the package itself
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield node.lineno, name
            for alias in node.names:  # "from . import trio_ws" names a module too
                yield node.lineno, f"{name}.{alias.name}"


def modules_outside(subpackage: str) -> Iterator[Path]:
    inside = PACKAGE / subpackage
    for path in sorted(PACKAGE.rglob("*.py")):
        if inside not in path.parents:
            yield path


def test_the_import_reader_sees_every_form_of_import() -> None:
    # The rules below are only as good as this reader: check it on each form.
    names = {name for _, name in imports(PACKAGE / "transport" / "websocket.py")}
    assert "websockets.exceptions" in names  # import a.b
    assert "websockets.http11.Response" in names  # from a.b import c
    assert "rpcstream.errors.ConnectionClosed" in names  # from ..x import y
    assert "rpcstream.transport.trio_ws" in names  # from . import x


def test_nothing_outside_transport_imports_websockets() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {name}"
        for path in modules_outside("transport")
        for line, name in imports(path)
        if name == "websockets" or name.startswith("websockets.")
    ]
    assert offenders == [], "websockets belongs in rpcstream/transport/ only"
