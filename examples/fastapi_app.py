"""A FastAPI app with its own HTTP routes, and rpcstream mounted beside them at /rpc/.

pip install 'rpcstream[asgi]' fastapi
uvicorn examples.fastapi_app:app --port 8000
open http://127.0.0.1:8000/                  (a page that uses the browser module)
rpcstream call ws://127.0.0.1:8000/rpc/ add 1 2

One port, one process: FastAPI answers ``/`` and ``/api/status``; rpcstream
answers WebSockets at ``/rpc/`` (calls, streams, runs), its browser module at
``/rpc/rpcstream.js`` and its probes at ``/rpc/healthz`` and ``/rpc/readyz``.
A mounted app gets no lifespan events, so the app's own lifespan starts the
``RunServer`` (its store, and its runs on the way out).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import anyio
from fastapi import FastAPI
from fastapi.responses import HTMLResponse

import rpcstream
import rpcstream.asgi

router = rpcstream.Router()


@router.method
async def add(a: int, b: int) -> int:
    """A call."""
    return a + b


@router.method
async def count(n: int) -> AsyncIterator[int]:
    """A stream to the caller."""
    for i in range(n):
        yield i


runs = rpcstream.RunServer(router=router)


@runs.flow("countdown")
async def countdown(ctx: rpcstream.RunContext, start: int = 3, delay: float = 0.1) -> str:
    """A background run whose events survive the client's disconnects."""
    for i in range(start, 0, -1):
        await ctx.client.send("tick", i)
        await anyio.sleep(delay)
    return "liftoff"


TOKEN = os.environ.get("API_TOKEN")  # unset: anyone may connect


def authenticate(request: rpcstream.HandshakeRequest) -> str | None:
    """``Authorization: Bearer`` (or ``?access_token=`` from a browser); the
    principal is what handlers see as ``rpcstream.current_principal()``."""
    if TOKEN is None:
        return "anonymous"
    return "api-user" if request.bearer_token == TOKEN else None


rpc = rpcstream.asgi.app(runs, authenticate=authenticate)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with rpc.lifespan():  # mounted apps get no lifespan events of their own
        yield


app = FastAPI(lifespan=lifespan)

PAGE = """<!doctype html>
<title>rpcstream in FastAPI</title>
<pre id="out"></pre>
<script type="module">
  import { connect, RunClient } from "/rpc/rpcstream.js";
  const out = document.getElementById("out");
  const say = (line) => { out.textContent += line + "\\n"; };
  const peer = await connect("/rpc/");
  say("add(1, 2) = " + await peer.call("add", [1, 2]));
  for await (const i of peer.stream("count", [3])) say("count: " + i);
  await peer.close();
  const client = new RunClient(new URL("/rpc/", location.href.replace(/^http/, "ws")).href);
  const runId = await client.start("countdown", { start: 3 });
  for await (const event of client.subscribe(runId)) {
    say(event.type + " " + JSON.stringify(event.data));
  }
  await client.close();
</script>
"""


@app.get("/", response_class=HTMLResponse)
async def index() -> str:
    """A page that talks to rpcstream with the browser module."""
    return PAGE


@app.get("/api/status")
async def status() -> dict[str, int]:
    """An ordinary FastAPI route that reads rpcstream's counts."""
    return {"connections": rpc.server.stats["connections"], "runs": runs.running}


app.mount("/rpc", rpc)


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(app, host="127.0.0.1", port=8000)
