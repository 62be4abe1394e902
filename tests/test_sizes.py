"""Size limits that keep one job per module: no module in rpcstream/ over 600 lines
(the browser modules included), no class over 400."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rpcstream"
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400


def test_no_module_is_over_600_lines() -> None:
    sources = [*PACKAGE.rglob("*.py"), *PACKAGE.rglob("*.js")]
    assert len(sources) > 20
    big = {
        str(path.relative_to(PACKAGE)): n
        for path in sources
        if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert big == {}


def test_no_class_is_over_400_lines() -> None:
    big = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_CLASS_LINES:
                    big[f"{path.relative_to(PACKAGE)}:{node.name}"] = lines
    assert big == {}
