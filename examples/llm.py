"""A token-streaming "LLM" served as a run stream.

rpcstream serve examples.llm:runs --store sqlite:runs.db --port 8765
rpcstream call ws://127.0.0.1:8765 runs.start ml-inference '{"prompt": "hi"}'
rpcstream tail ws://127.0.0.1:8765 RUN_ID
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import anyio
import msgspec

import rpcstream


class Token(msgspec.Struct):
    token: str
    index: int


class Complete(msgspec.Struct):
    total_tokens: int
    duration: float


def fake_model(prompt: str, n: int) -> Iterator[str]:
    """Stands in for a model: echoes the prompt's words, then counts."""
    words = prompt.split() or ["..."]
    for i in range(n):
        yield words[i % len(words)] if i < len(words) else f"token{i}"


runs = rpcstream.RunServer(store=rpcstream.SQLiteStore("runs.db"))


@runs.flow("ml-inference", events={"token": Token, "complete": Complete})
async def ml_inference(
    ctx: rpcstream.RunContext, prompt: str, model: str = "small", tokens: int = 20
) -> None:
    started = time.perf_counter()
    stop = anyio.Event()

    @ctx.client.on("stop")  # a client's "stop" button: runs.send(run_id, "stop")
    async def on_stop(data: object) -> None:
        stop.set()

    await ctx.client.send("status", {"status": "generating", "model": model})
    count = 0
    for i, word in enumerate(fake_model(prompt, tokens)):
        if stop.is_set():
            break
        await anyio.sleep(0.05)  # the model thinking
        await ctx.client.send("token", Token(word, i))
        count += 1
    await ctx.client.send(
        "complete", Complete(total_tokens=count, duration=time.perf_counter() - started)
    )
