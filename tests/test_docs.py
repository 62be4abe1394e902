"""Every ```python block of README.md and docs/*.md runs as written; the version is in one place.

The convention the blocks follow (written down in README.md, under "Documentation"):

- a ```python block is a complete program: paste it into a file and run it;
- a block that needs a server starts one itself (``rpcstream.serve(app)``
  listens on 127.0.0.1 and a free port), or, when it shows a client on its own,
  connects to ``RPCSTREAM_URL`` (default ``ws://127.0.0.1:8765``, where
  ``rpcstream serve`` listens): this test serves the built-in demo app there;
- a block that needs Redis connects to ``REDIS_URL`` (default
  ``redis://127.0.0.1:6379/0``): this test starts a private redis-server;
- code that is not a program (an excerpt of the library in a benchmark report)
  is fenced as ``text``, not ``python``.

Each block runs in a subprocess, in a fresh temporary directory, with a timeout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis_server import RedisServer, require_redis_server

import rpcstream
from tests.test_cli import serving

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def blocks() -> list[pytest.ParameterSet]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in _BLOCK.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            name = f"{path.relative_to(ROOT)}:{line}"
            found.append(pytest.param(match.group(1), id=name))
    return found


@pytest.fixture(scope="module")
def demo_url() -> Iterator[str]:
    """``rpcstream serve`` (the demo app, memory store) on a free port."""
    with serving("serve", "--store", "memory") as url:
        yield url


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_redis_server()
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server.url


@pytest.mark.parametrize("code", blocks())
def test_every_python_block_in_the_docs_runs_as_written(
    code: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # Start only the servers a block asks for.
    if "RPCSTREAM_URL" in code:
        env["RPCSTREAM_URL"] = request.getfixturevalue("demo_url")
    if "REDIS_URL" in code:
        env["REDIS_URL"] = request.getfixturevalue("redis_url")
    program = tmp_path / "snippet.py"
    program.write_text(code)
    result = subprocess.run(
        [sys.executable, str(program)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr


def test_the_docs_have_python_blocks_to_run() -> None:
    # A change of fence or path must not leave the test above with nothing to check.
    assert len(blocks()) >= 15


def test_the_version_is_written_once_and_the_changelog_has_it() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert "version" in project["project"]["dynamic"]
    dynamic = project["tool"]["setuptools"]["dynamic"]["version"]
    assert dynamic == {"attr": "rpcstream.__version__"}
    changelog = (ROOT / "CHANGELOG.md").read_text()
    releases = re.findall(r"^## \[?(\d+\.\d+\.\d+)", changelog, re.MULTILINE)
    assert releases and releases[0] == rpcstream.__version__


def test_the_license_file_matches_the_declared_license() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
