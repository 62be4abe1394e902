"""Which modules may import what: the layering rules of ARCHITECTURE.md, read from
the package's source (its syntax tree, so no comment or string can fool it).
One test per rule."""

from __future__ import annotations

import ast
import sys
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


# The layers of ARCHITECTURE.md, bottom up: a unit imports only units of lower layers
# (and itself). Every unit of the package must be placed here, so a new module is
# placed on purpose.
LAYERS: list[set[str]] = [
    {"errors", "limits", "urls", "_tasks", "runs.events", "models", "__version__"},
    {"messages", "observe.hooks", "observe.logs"},
    {"observe.outcomes", "observe.__init__", "observe.otel"},
    {"protocol", "router", "transport", "store"},
    {"handshake", "peer", "runs.writer", "runs.fanout"},
    {"runs.flows"},
    {"client", "server", "runs.server", "observe.prometheus"},
    {"runs.client", "testing", "asgi"},
    {"demo"},
    {"cli"},
    {"__main__", "__init__", "runs.__init__"},
]
_SPLIT = {"runs", "observe"}  # packages whose modules are units of their own


def unit_of(name: str) -> str | None:
    """The unit of the package a dotted module name belongs to (None: not ours)."""
    parts = name.split(".")
    if parts[0] != "rpcstream":
        return None
    if len(parts) == 1:
        return "__init__"
    if parts[1] in _SPLIT:
        if len(parts) > 2 and (PACKAGE / parts[1] / f"{parts[2]}.py").exists():
            return f"{parts[1]}.{parts[2]}"
        return f"{parts[1]}.__init__"
    return parts[1]


def unit_of_path(path: Path) -> str:
    return unit_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)) or ""


def test_imports_point_down_the_layers() -> None:
    layer = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    unplaced, upward = set(), []
    for path in sorted(PACKAGE.rglob("*.py")):
        here = unit_of_path(path)
        if here not in layer:
            unplaced.add(here)
            continue
        for line, name in imports(path):
            there = unit_of(name)
            # "from . import x" also names the package itself, which every module
            # in it imports anyway: what it takes from there is checked as x.
            if there is None or there == here or name == "rpcstream":
                continue
            if there not in layer:
                unplaced.add(there)
            elif layer[there] >= layer[here]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {here} -> {there}")
    assert unplaced == set(), "place these units in LAYERS"
    assert upward == []


def test_the_sans_io_protocol_imports_no_io() -> None:
    allowed = {"msgspec", "rpcstream.errors", "rpcstream.messages"}
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {name}"
        for path in sorted((PACKAGE / "protocol").rglob("*.py"))
        for line, name in imports(path)
        if name.split(".")[0] not in sys.stdlib_module_names
        and not name.startswith("rpcstream.protocol")
        and not any(name == a or name.startswith(a + ".") for a in allowed)
    ]
    assert offenders == [], "protocol/ is Sans-I/O: the standard library, msgspec, errors, messages"
    banned = {"asyncio", "socket", "selectors", "threading"}
    io = [
        name
        for path in (PACKAGE / "protocol").rglob("*.py")
        for _, name in imports(path)
        if name.split(".")[0] in banned
    ]
    assert io == []


def test_a_store_never_imports_the_peer_the_servers_or_the_run_server() -> None:
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {name}"
        for path in sorted((PACKAGE / "store").rglob("*.py"))
        for line, name in imports(path)
        if unit_of(name)
        not in (None, "store", "errors", "messages", "runs.events", "_tasks", "observe.hooks")
    ]
    assert offenders == []
