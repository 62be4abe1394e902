"""A chat over one bidirectional stream: the client streams lines, the bot streams replies.

The server's ``chat`` method takes the client's lines as an ``AsyncIterator[str]``
and is itself an async generator: each ``yield`` is a reply, sent while the
client is still typing. When the client ends its stream, the bot says goodbye
and the call ends. Self-contained (the server listens on a port picked by the
OS) and finishes by itself::

    python examples/chat.py [--loop asyncio|trio]
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import anyio

import rpcstream

router = rpcstream.Router()


@router.method
async def chat(lines: AsyncIterator[str]) -> AsyncIterator[str]:
    """A very small bot: one reply per line, and a farewell when the lines end."""
    name = ""
    count = 0
    async for line in lines:
        count += 1
        text = line.strip()
        lowered = text.lower()
        if lowered.split()[:1] in (["hello"], ["hi"], ["hey"]):
            yield "Hello! What's your name?"
        elif lowered.startswith("my name is "):
            name = text[len("my name is ") :].strip(" .!")
            yield f"Nice to meet you, {name}."
        elif text.endswith("?"):
            yield "Good question. All I know is how to stream."
        else:
            yield f"You said {len(text.split())} words: {text[::-1]!r} backwards."
    yield f"Bye{', ' + name if name else ''}! We exchanged {count} lines."


SCRIPT = [
    "Hello there",
    "My name is Ada.",
    "Streams go both ways on one connection",
    "Can you hear me?",
]


async def main() -> None:
    async with (
        rpcstream.serve(router, "127.0.0.1", 0) as server,
        rpcstream.connect(server.url) as peer,
    ):
        # The lines travel as a stream argument; we feed it one line at a time, each
        # after the reply to the previous one, like someone typing.
        send, receive = anyio.create_memory_object_stream[str]()

        async def typed() -> AsyncIterator[str]:
            async with receive:
                async for line in receive:
                    yield line

        replies = peer.stream("chat", typed(), item_type=str)
        async with send:
            for line in SCRIPT:
                print(f"you> {line}")
                await send.send(line)
                print(f"bot> {await anext(replies)}")
        # Our stream of lines has ended: the bot has its last word.
        async for reply in replies:
            print(f"bot> {reply}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loop", choices=["asyncio", "trio"], default="asyncio")
    anyio.run(main, backend=parser.parse_args().loop)
