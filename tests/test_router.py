"""The method registry's binding of wire parameters, tested synchronously."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
import pytest

import rpcstream
from rpcstream.messages import MSGPACK
from rpcstream.router import Method


def no_streams(sid: int, item_type: Any) -> Any:
    raise AssertionError("no stream argument expected")


def bind(method: Method, *args: Any, **kwargs: Any) -> tuple[list[Any], dict[str, Any]]:
    return method.bind(
        MSGPACK, MSGPACK.encode_raw(list(args)), MSGPACK.encode_raw(kwargs), [], no_streams
    )


def test_constraints_in_annotated_parameters_are_enforced() -> None:
    # Annotated metadata must survive the reading of the handler's hints: without
    # include_extras, msgspec.Meta(gt=0) was dropped and 0 went through.
    async def pick(n: Annotated[int, msgspec.Meta(gt=0)], *, tag: str = "x") -> int:
        return n

    method = Method("pick", pick)
    assert bind(method, 3) == ([3], {})
    with pytest.raises(rpcstream.InvalidParams, match=r"argument 'n': Expected `int` >= 1"):
        bind(method, 0)
