"""Every I/O test runs on asyncio and on trio through anyio's own pytest plugin."""

from __future__ import annotations

import functools
import inspect
from typing import Any

import anyio
import pytest

# The store conformance suite lives in the package; rewrite its asserts so a
# failing check shows the values it compared. (Must run before it is imported.)
pytest.register_assert_rewrite(
    "rpcstream.testing.store_suite",
    "rpcstream.testing.store_suite_follow",
    "rpcstream.testing.store_suite_runs",
)


@pytest.fixture(
    params=[
        pytest.param("asyncio", id="asyncio"),
        pytest.param("trio", id="trio"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _timeout_of(item: pytest.Item) -> float | None:
    """The item's pytest-timeout limit: its ``timeout`` mark, else the command line's or ini's."""
    marker = item.get_closest_marker("timeout")
    if marker is not None:
        value = marker.args[0] if marker.args else marker.kwargs.get("timeout")
    else:
        value = item.config.getoption("timeout", None) or item.config.getini("timeout")
    return float(value) if value else None


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> object:
    """Bound every async test by a deadline of its own, inside its event loop.

    pytest-timeout's SIGALRM lands wherever the loop happens to be: on trio it
    left anyio's test runner waiting forever, so one hung test hung the whole run
    (and CI until its limit). A cancel scope at 80% of the limit fails the test
    where it waits, with its traceback, and the run goes on; pytest-timeout stays
    as the backstop for a hang no cancellation can reach.
    """
    func = pyfuncitem.obj
    limit = _timeout_of(pyfuncitem)
    if limit and inspect.iscoroutinefunction(func):

        @functools.wraps(func)
        async def bounded(*args: Any, **kwargs: Any) -> Any:
            with anyio.fail_after(0.8 * limit):
                return await func(*args, **kwargs)

        pyfuncitem.obj = bounded
    try:
        return (yield)
    finally:
        pyfuncitem.obj = func
