"""Every I/O test runs on asyncio and on trio through anyio's own pytest plugin."""

from __future__ import annotations

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
