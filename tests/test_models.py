"""pydantic v2 models as parameters, results, stream items and run events, over a real
WebSocket on asyncio and trio; and rpcstream with pydantic absent (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
import pydantic
import pytest

import rpcstream
from rpcstream import models
from rpcstream.messages import JSON, MSGPACK
from rpcstream.runs.writer import RunWriter

ROOT = Path(__file__).resolve().parent.parent


class User(pydantic.BaseModel):
    name: str
    age: int = pydantic.Field(ge=0)
    tags: list[str] = []


class Aliased(pydantic.BaseModel):
    user_name: str = pydantic.Field(alias="userName")


class Cat(pydantic.BaseModel):
    kind: Literal["cat"] = "cat"
    lives: int = 9


class Dog(pydantic.BaseModel):
    kind: Literal["dog"] = "dog"
    good: bool = True


class Token(pydantic.BaseModel):
    text: str
    index: int


class Point(msgspec.Struct):
    x: int
    y: int


def make_router() -> rpcstream.Router:
    router = rpcstream.Router()

    @router.method
    async def older(user: User, years: int) -> User:
        return user.model_copy(update={"age": user.age + years})

    @router.method
    async def team(lead: User, members: list[User], deputy: User | None = None) -> dict[str, Any]:
        # Containers of models arrive as models; returning them in a dict encodes them.
        return {"lead": lead, "members": members, "deputy": deputy, "n": len(members)}

    @router.method
    async def kinds(pets: list[Cat | Dog], n: Annotated[int, pydantic.Field(gt=0)]) -> list[str]:
        return [type(p).__name__ for p in pets] * n

    @router.method
    async def alias(a: Aliased) -> Aliased:
        return a

    @router.method
    async def point(p: Point) -> Point:  # a Struct beside models: msgspec as before
        return Point(p.y, p.x)

    @router.method
    def plain(u: User) -> str:  # a plain def handler binds models too
        return u.name

    @router.method
    async def users(n: int) -> AsyncIterator[User]:
        for i in range(n):
            yield User(name=f"u{i}", age=i)

    @router.method
    async def birthdays(people: AsyncIterator[User]) -> AsyncIterator[User]:
        async for u in people:
            yield User(name=u.name, age=u.age + 1)

    @router.method
    async def total_age(people: AsyncIterator[User]) -> int:
        return sum([u.age async for u in people])

    return router


async def send_users(n: int, bad_at: int = -1) -> AsyncIterator[Any]:
    for i in range(n):
        yield {"name": "x", "age": "old"} if i == bad_at else User(name=f"p{i}", age=i)


@pytest.fixture(params=["msgpack", "json"])
def codec(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.mark.anyio
async def test_model_parameters_and_results_round_trip_as_models(codec: str) -> None:
    async with (
        rpcstream.serve(make_router(), "127.0.0.1", 0) as server,
        rpcstream.connect(server.url, codec=codec) as peer,
    ):
        ann = User(name="ann", age=30, tags=["a"])
        assert await peer.call("older", ann, 2, result_type=User) == User(
            name="ann", age=32, tags=["a"]
        )
        # A dict converts to the model too; without result_type the caller gets the dict.
        assert await peer.call("older", {"name": "bob", "age": 1}, years=1) == {
            "name": "bob",
            "age": 2,
            "tags": [],
        }
        assert await peer.call("plain", {"name": "cy", "age": 3}) == "cy"
        assert await peer.call("alias", Aliased(userName="dee"), result_type=Aliased) == Aliased(
            userName="dee"
        )
        assert await peer.call("point", Point(1, 2), result_type=Point) == Point(2, 1)


@pytest.mark.anyio
async def test_containers_and_unions_of_models_convert(codec: str) -> None:
    async with (
        rpcstream.serve(make_router(), "127.0.0.1", 0) as server,
        rpcstream.connect(server.url, codec=codec) as peer,
    ):
        lead = User(name="lead", age=40)
        members = [User(name="m1", age=20), User(name="m2", age=21)]
        got = await peer.call("team", lead, members)
        assert got == {
            "lead": lead.model_dump(),
            "members": [m.model_dump() for m in members],
            "deputy": None,
            "n": 2,
        }
        typed = await peer.call("team", lead, [], deputy=members[0], result_type=dict[str, Any])
        assert typed["deputy"] == members[0].model_dump()
        assert await peer.call("kinds", [Cat(), {"kind": "dog"}], 2) == ["Cat", "Dog"] * 2


@pytest.mark.anyio
async def test_a_value_a_model_refuses_answers_invalid_params_with_pydantic_s_message(
    codec: str,
) -> None:
    async with (
        rpcstream.serve(make_router(), "127.0.0.1", 0) as server,
        rpcstream.connect(server.url, codec=codec) as peer,
    ):
        with pytest.raises(rpcstream.RemoteError) as bad:
            await peer.call("older", {"name": "ann", "age": -1}, 1)
        assert bad.value.code == rpcstream.ErrorCode.INVALID_PARAMS
        assert "argument 'user'" in bad.value.message
        assert "age: Input should be greater than or equal to 0" in bad.value.message
        assert "errors.pydantic.dev" not in bad.value.message  # one line, no links
        # A container: msgspec names the index; pydantic's constraint in Annotated holds.
        with pytest.raises(rpcstream.RemoteError) as in_list:
            await peer.call("team", {"name": "l", "age": 1}, [{"name": "m", "age": 1}, {}])
        assert in_list.value.code == rpcstream.ErrorCode.INVALID_PARAMS
        assert "name: Field required" in in_list.value.message
        assert "$[1]" in in_list.value.message
        with pytest.raises(rpcstream.RemoteError) as constrained:
            await peer.call("kinds", [], 0)
        assert constrained.value.code == rpcstream.ErrorCode.INVALID_PARAMS
        assert "greater than 0" in constrained.value.message
        # Ten thousand bad fields: the message stays bounded.
        huge = {"name": "x", "age": 1, "tags": list(range(10_000))}
        with pytest.raises(rpcstream.RemoteError) as big:
            await peer.call("older", huge, 1)
        assert big.value.code == rpcstream.ErrorCode.INVALID_PARAMS
        assert len(big.value.message) < models.MAX_MESSAGE + 100
        # The connection is fine after all that.
        assert await peer.call("plain", User(name="ok", age=0)) == "ok"


@pytest.mark.anyio
async def test_a_result_that_does_not_fit_result_type_is_a_clear_local_error() -> None:
    async with (
        rpcstream.serve(make_router(), "127.0.0.1", 0) as server,
        rpcstream.connect(server.url) as peer,
    ):
        with pytest.raises(rpcstream.InternalError, match="result did not match"):
            await peer.call("plain", User(name="n", age=1), result_type=User)


@pytest.mark.anyio
async def test_streams_of_models_flow_both_ways(codec: str) -> None:
    async with (
        rpcstream.serve(make_router(), "127.0.0.1", 0) as server,
        rpcstream.connect(server.url, codec=codec) as peer,
    ):
        got = [u async for u in peer.stream("users", 3, item_type=User)]
        assert got == [User(name=f"u{i}", age=i) for i in range(3)]
        older = [u async for u in peer.stream("birthdays", send_users(4), item_type=User)]
        assert older == [User(name=f"p{i}", age=i + 1) for i in range(4)]
        assert await peer.call("total_age", send_users(5)) == sum(range(5))


@pytest.mark.anyio
async def test_a_bad_item_in_a_stream_of_models_fails_the_handler_with_invalid_params() -> None:
    async with (
        rpcstream.serve(make_router(), "127.0.0.1", 0) as server,
        rpcstream.connect(server.url) as peer,
    ):
        with pytest.raises(rpcstream.RemoteError) as bad:
            await peer.call("total_age", send_users(5, bad_at=2))
        assert bad.value.code == rpcstream.ErrorCode.INVALID_PARAMS
        assert "age: Input should be a valid integer" in bad.value.message
        # On the caller's side, item_type=User refuses an item the same way.
        with pytest.raises(rpcstream.RemoteError) as local:
            async for _ in peer.stream("users", 2, item_type=Token):
                pass
        assert local.value.code == rpcstream.ErrorCode.INVALID_PARAMS
        assert "text: Field required" in local.value.message


def make_runs() -> rpcstream.RunServer:
    runs = rpcstream.RunServer()

    @runs.flow("generate", events={"token": Token, "pet": Cat | Dog})
    async def generate(ctx: rpcstream.RunContext, author: User, words: list[str]) -> User:
        for i, word in enumerate(words):
            # A model instance and a dict the model validates are both accepted.
            data: Any = Token(text=word, index=i) if i % 2 else {"text": word, "index": i}
            await ctx.client.send("token", data)
        await ctx.client.send("pet", {"kind": "dog"})
        try:
            await ctx.client.send("token", {"text": "bad", "index": "first"})
        except rpcstream.EventValidationError as exc:
            await ctx.client.send("rejected", str(exc))
        return author.model_copy(update={"age": author.age + 1})

    return runs


@pytest.mark.anyio
async def test_a_run_validates_and_streams_model_events(codec: str) -> None:
    async with (
        rpcstream.serve(make_runs(), "127.0.0.1", 0) as server,
        rpcstream.connect(server.url, codec=codec) as peer,
    ):
        author = User(name="ann", age=3)
        run = await peer.call("runs.start", "generate", {"author": author, "words": ["a", "b"]})
        events = [e async for e in peer.stream("runs.subscribe", run["run_id"])]
        by_type = [(e["type"], e["data"]) for e in events]
        assert by_type[1:4] == [
            ("token", {"text": "a", "index": 0}),
            ("token", {"text": "b", "index": 1}),
            ("pet", {"kind": "dog", "good": True}),
        ]
        assert by_type[4][0] == "rejected"
        assert "index: Input should be a valid integer" in by_type[4][1]
        assert by_type[5] == ("complete", {"name": "ann", "age": 4, "tags": []})
        with pytest.raises(rpcstream.RemoteError) as bad:
            await peer.call("runs.start", "generate", {"author": {"name": "x"}, "words": []})
        assert bad.value.code == rpcstream.ErrorCode.INVALID_PARAMS
        assert "age: Field required" in bad.value.message


@pytest.mark.anyio
async def test_a_run_writer_outside_the_server_stores_models_as_their_json_form() -> None:
    async with rpcstream.MemoryStore() as store:
        writer = await RunWriter.create(store, "job", "generate")
        await writer.send("token", Token(text="hi", index=0))
        await writer.send("complete", [User(name="ann", age=1)])
        stored = await store.read("job", after=1)
    assert [(e.type, msgspec.json.decode(e.data)) for e in stored] == [
        ("token", {"text": "hi", "index": 0}),
        ("complete", [{"name": "ann", "age": 1, "tags": []}]),
    ]


class Plain:
    """A class msgspec cannot build and pydantic does not own."""

    name: str


def test_registering_a_handler_whose_parameter_nothing_can_convert_to_fails_at_once() -> None:
    async def handler(p: Plain) -> None:
        pass

    with pytest.raises(TypeError, match=r"handler 'handler': parameter 'p': .*Plain.*pydantic"):
        rpcstream.Router().add(handler)

    async def in_stream(p: AsyncIterator[Plain]) -> None:
        pass

    with pytest.raises(TypeError, match="parameter 'p'"):
        rpcstream.Router().add(in_stream)
    with pytest.raises(TypeError, match="flow 'f': event 'e'"):
        rpcstream.RunServer().flow("f", events={"e": Plain})


def test_the_codecs_encode_models_and_refuse_other_unknown_objects_as_before() -> None:
    for codec in (MSGPACK, JSON):
        raw = codec.encode([User(name="a", age=1), Aliased(userName="b")])
        assert codec.decode(raw) == [
            {"name": "a", "age": 1, "tags": []},
            {"userName": "b"},
        ]
        with pytest.raises(TypeError, match="Encoding objects of type object is unsupported"):
            codec.encode(object())


def test_the_decoders_keep_msgspec_s_rule_for_other_classes() -> None:
    # With a dec_hook msgspec hands every custom type to it: `object` must still take
    # anything, and any other class still be refused with msgspec's wording.
    for codec in (MSGPACK, JSON):
        assert codec.decode(codec.encode({"a": [1, 2]}), object) == {"a": [1, 2]}
        with pytest.raises(msgspec.ValidationError, match="Expected `Plain`, got `dict`"):
            codec.decode(codec.encode({"name": "x"}), Plain)


class Loose(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)
    thing: Any


def test_a_model_pydantic_cannot_dump_is_a_type_error_as_for_any_unencodable_value() -> None:
    for codec in (MSGPACK, JSON):
        with pytest.raises(TypeError, match="Loose cannot be dumped"):
            codec.encode(Loose(thing=object()))


def test_validation_messages_are_one_bounded_line() -> None:
    try:
        User.model_validate({"name": 1, "age": "x" * 10_000})
    except pydantic.ValidationError as exc:
        text = models.describe(exc)
    assert text.startswith("User: name: Input should be a valid string; age:")
    assert len(text) <= models.MAX_MESSAGE
    assert "\n" not in text


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=50,
        env=env,
        cwd=ROOT,
    )


def test_importing_rpcstream_does_not_import_pydantic() -> None:
    proc = run_python(
        """
        import sys
        import rpcstream, rpcstream.runs, rpcstream.models
        assert "pydantic" not in sys.modules, "rpcstream imported pydantic"
        print("ok")
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def test_without_pydantic_plain_handlers_work_and_an_unknown_class_is_refused_clearly() -> None:
    proc = run_python(
        """
        import sys

        class NoPydantic:  # a meta path finder: "import pydantic" fails as if not installed
            def find_spec(self, name, path=None, target=None):
                if name == "pydantic" or name.startswith("pydantic."):
                    raise ModuleNotFoundError(f"No module named {name!r}")
                return None

        sys.meta_path.insert(0, NoPydantic())
        import anyio
        import msgspec
        import rpcstream

        class Point(msgspec.Struct):
            x: int

        class User:  # what a model is to msgspec: a class it cannot build
            name: str

        router = rpcstream.Router()

        @router.method
        async def add(a: int, p: Point) -> int:
            return a + p.x

        async def greet(user: User) -> str:
            return user.name

        try:
            router.add(greet)
        except TypeError as exc:
            print("refused:", exc)

        async def main() -> None:
            async with rpcstream.serve(router, "127.0.0.1", 0) as server:
                async with rpcstream.connect(server.url) as peer:
                    print("add:", await peer.call("add", 1, {"x": 2}))
                    try:
                        await peer.call("add", 1, object())
                    except TypeError as exc:
                        print("unencodable:", exc)

        anyio.run(main)
        assert "pydantic" not in sys.modules
        """
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("refused: handler 'greet': parameter 'user': no value can convert")
    assert "install pydantic 2 (pip install 'rpcstream[pydantic]')" in lines[0]
    assert lines[1] == "add: 3"
    assert lines[2].startswith("unencodable: parameters cannot be encoded")
