"""The run-event vocabulary has one home, rpcstream/runs/events.py, and everyone uses it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import anyio
import msgspec
import pytest

import rpcstream
from rpcstream.runs import events
from rpcstream.runs.events import TERMINAL_TYPES, ErrorData, EventType, RunStatus, StartedData
from rpcstream.runs.writer import RunWriter
from rpcstream.store import base

PACKAGE = Path(__file__).resolve().parent.parent / "rpcstream"

# Every word the framework gives meaning to in a run's events and statuses.
VOCABULARY = {t.value for t in EventType} | {s.value for s in RunStatus}


def test_the_terminal_types_are_the_event_types_that_end_a_run() -> None:
    assert {EventType.COMPLETE, EventType.ERROR, EventType.CANCELLED} == TERMINAL_TYPES
    assert EventType.STARTED not in TERMINAL_TYPES
    assert all(type(t) is str for t in TERMINAL_TYPES)  # plain strings, as stored


def test_a_finished_run_has_its_terminal_event_type_as_status() -> None:
    assert {s.value for s in RunStatus} == TERMINAL_TYPES | {"running", "cancelling"}
    assert base.RUNNING == RunStatus.RUNNING


def test_the_stores_take_the_terminal_types_from_the_vocabulary() -> None:
    assert base.TERMINAL_TYPES is events.TERMINAL_TYPES


def test_the_vocabulary_imports_only_msgspec_and_the_standard_library() -> None:
    # So the stores may import it without reaching the server or the peer.
    tree = ast.parse((PACKAGE / "runs" / "events.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module is not None, ast.dump(node)
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            assert top == "msgspec" or top in sys.stdlib_module_names, name


def test_no_other_runs_or_store_module_spells_the_vocabulary_out() -> None:
    # Copies drift; names from events.py do not.
    found = []
    for path in [*(PACKAGE / "runs").glob("*.py"), *(PACKAGE / "store").glob("*.py")]:
        if path.name == "events.py":
            continue
        tree = ast.parse(path.read_text())
        skip = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__slots__" for t in node.targets
            ):
                skip.update(id(n) for n in ast.walk(node.value))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in VOCABULARY and id(node) not in skip:
                found.append(f"{path.name}:{node.lineno}: {node.value!r}")
    assert found == []


def test_error_data_names_the_exception() -> None:
    data = ErrorData.from_exception(RuntimeError("model exploded"))
    assert msgspec.json.decode(events.encode_data(data)) == {
        "message": "model exploded",
        "type": "RuntimeError",
    }


async def _first_and_last(store: rpcstream.EventStore, run_id: str) -> tuple[object, object]:
    stored = await store.read(run_id, 0)
    first, last = stored[0], stored[-1]
    return (first.type, events.decode_data(first.data)), (last.type, last.data)


@pytest.mark.anyio
async def test_a_run_server_and_a_run_writer_begin_and_fail_runs_alike() -> None:
    store = rpcstream.MemoryStore()
    runs = rpcstream.RunServer(store=store)

    @runs.flow("fails")
    async def fails(ctx: rpcstream.RunContext) -> None:
        raise RuntimeError("it broke")

    async with runs:
        run_id = await runs.start("fails")
        with anyio.fail_after(10):
            async for _ in store.follow(run_id):
                pass
        writer = await RunWriter.create(store, "w", "fails")
        await writer.fail("it broke", error_type="RuntimeError")
        by_server = await _first_and_last(store, run_id)
        by_writer = await _first_and_last(store, "w")
    assert by_server == by_writer
    (started_type, started_data), (error_type, error_data) = by_server
    assert started_type == EventType.STARTED
    assert msgspec.convert(started_data, StartedData) == StartedData("fails")
    assert error_type == EventType.ERROR
    assert msgspec.json.decode(error_data, type=ErrorData) == ErrorData("it broke", "RuntimeError")


def test_the_protocol_documents_every_runs_method_and_the_whole_vocabulary() -> None:
    # docs/protocol.md must be enough for a client in another language.
    text = (PACKAGE.parent / "docs" / "protocol.md").read_text()
    section = text[text.index("## 13. Run streams") :]
    methods = [name for name in rpcstream.RunServer().router if name.startswith("runs.")]
    assert len(methods) == 5
    for name in methods:
        assert f"### `{name}(" in section, name
    for word in VOCABULARY:
        assert f"`{word}`" in section or f'"{word}"' in section, word
    assert "2^63 - 1" in section  # MAX_EVENT_ID
    assert events.MAX_EVENT_ID == 2**63 - 1
