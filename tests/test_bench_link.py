"""The emulated link: its timing model on a fake clock, the proxy over loopback."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import anyio.abc
import pytest

from benchmarks.link import MIN_QUEUE, LinkModel, LinkParams, open_link

ROOT = Path(__file__).resolve().parent.parent

# -- the model, on a fake clock ----------------------------------------------------------


def test_params_default_to_a_queue_of_two_bandwidth_delay_products() -> None:
    params = LinkParams(rtt=0.020, rate=125e6)  # 20 ms, 1 Gbit/s
    assert params.queue_bytes == 5_000_000
    assert LinkParams(rtt=0.0, rate=125e6).queue_bytes == MIN_QUEUE
    assert LinkParams(rtt=0.020, rate=125e6, queue_bytes=1000).queue_bytes == 1000


@pytest.mark.parametrize(
    ("rtt", "rate", "queue"),
    [(-1.0, 1e6, 0), (float("nan"), 1e6, 0), (0.01, 0.0, 0), (0.01, float("inf"), 0), (0, 1, -1)],
)
def test_params_refuse_a_link_that_cannot_exist(rtt: float, rate: float, queue: int) -> None:
    with pytest.raises(ValueError, match="must be"):
        LinkParams(rtt=rtt, rate=rate, queue_bytes=queue)


def test_a_chunk_on_an_idle_link_arrives_after_its_serialisation_and_half_the_rtt() -> None:
    model = LinkModel(LinkParams(rtt=0.010, rate=1000.0, queue_bytes=10_000))
    assert model.admit_at(100, now=5.0) == 5.0
    assert model.send(100, now=5.0) == pytest.approx(5.0 + 0.1 + 0.005)
    assert model.backlog(5.0) == pytest.approx(100)
    assert model.backlog(5.05) == pytest.approx(50)
    assert model.backlog(5.2) == 0


def test_chunks_sent_together_queue_behind_each_other_in_order() -> None:
    model = LinkModel(LinkParams(rtt=0.0, rate=1000.0, queue_bytes=10_000))
    arrivals = [model.send(n, now=0.0) for n in (100, 300, 100)]
    assert arrivals == pytest.approx([0.1, 0.4, 0.5])


def test_an_idle_gap_is_not_credited_to_later_bytes() -> None:
    model = LinkModel(LinkParams(rtt=0.0, rate=1000.0, queue_bytes=10_000))
    model.send(100, now=0.0)  # done at 0.1
    assert model.send(100, now=1.0) == pytest.approx(1.1)


def test_a_full_queue_admits_bytes_only_as_it_drains() -> None:
    model = LinkModel(LinkParams(rtt=0.0, rate=1000.0, queue_bytes=500))
    model.send(500, now=0.0)
    assert model.admit_at(100, now=0.0) == pytest.approx(0.1)  # 100 bytes must leave first
    assert model.admit_at(500, now=0.2) == pytest.approx(0.5)
    assert model.admit_at(100, now=0.6) == 0.6
    with pytest.raises(ValueError, match="cannot enter"):
        model.admit_at(501, now=0.0)
    with pytest.raises(ValueError, match="cannot enter"):
        model.admit_at(0, now=0.0)


def test_a_sender_that_waits_for_admission_gets_the_bandwidth_and_never_overfills() -> None:
    params = LinkParams(rtt=0.020, rate=1e6)  # 20 ms, 8 Mbit/s: 2 BDP is 40 KB, under the floor
    model = LinkModel(params)
    rng = random.Random(7)
    now, total, last = 0.0, 0, 0.0
    for _ in range(2000):
        n = rng.randint(1, params.read_size)
        now = model.admit_at(n, now)  # a greedy sender: it sends the moment it may
        arrival = model.send(n, now)
        assert model.backlog(now) <= params.queue_bytes + 1e-6
        assert arrival >= last  # in order
        total, last = total + n, arrival
    # The link was never idle once full, so the last byte lands after total / rate + delay.
    assert last == pytest.approx(total / params.rate + params.rtt / 2)


# -- the proxy over loopback -------------------------------------------------------------


async def _echo(stream: anyio.abc.SocketStream) -> None:
    async with stream:
        try:
            async for chunk in stream:
                await stream.send(chunk)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return
        await stream.send_eof()


@pytest.mark.anyio
async def test_bytes_cross_the_link_intact_in_order_both_ways_and_eof_passes() -> None:
    payload = random.Random(1).randbytes(3 * 1024 * 1024 + 17)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    params = LinkParams(rtt=0.002, rate=500e6)
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, _echo)
        async with open_link(params, [("127.0.0.1", port)]) as proxy:
            client = await anyio.connect_tcp("127.0.0.1", proxy.ports[0])
            async with client:
                received = bytearray()

                async def read_all() -> None:
                    async for chunk in client:  # ends at the echo server's EOF, via the link
                        received.extend(chunk)

                async with anyio.create_task_group() as io:
                    io.start_soon(read_all)
                    view = memoryview(payload)
                    for at in range(0, len(payload), 10_000):
                        await client.send(view[at : at + 10_000])
                    await client.send_eof()
            assert bytes(received) == payload
            assert proxy.connections == 1
            assert all(d.peak_held <= params.max_held for d in proxy.directions)
        tg.cancel_scope.cancel()


def _blocks(total: int, size: int = 256 * 1024) -> list[bytes]:
    """``total`` bytes as ``size`` blocks cut from 1 MiB of random bytes, to save memory."""
    base = random.Random(2).randbytes(4 * size)
    return [base[(i % 4) * size : (i % 4 + 1) * size] for i in range(total // size)]


@pytest.mark.anyio
async def test_a_sink_that_stops_reading_back_pressures_the_sender_with_bounded_memory() -> None:
    # Far more than the link and the kernel's loopback buffers hold (receive buffers may
    # grow to tcp_rmem's maximum, 32 MiB on some kernels): a sender that got it all out
    # while the sink read nothing would have been buffered without bound somewhere.
    total = 128 * 1024 * 1024
    params = LinkParams(rtt=0.001, rate=1e9, queue_bytes=128 * 1024)
    reading, finished = anyio.Event(), anyio.Event()
    got, received = hashlib.sha256(), 0

    async def sink(stream: anyio.abc.SocketStream) -> None:
        nonlocal received
        async with stream:
            # One read first: anyio on asyncio reads a socket eagerly until the first
            # receive() pauses it, which would buffer everything here, not in the link.
            first = await stream.receive()
            got.update(first)
            received += len(first)
            await reading.wait()  # reads nothing more until told
            async for chunk in stream:
                got.update(chunk)
                received += len(chunk)
        finished.set()

    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    listener.extra(anyio.abc.SocketAttribute.raw_socket).setsockopt(
        socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024
    )
    port = listener.extra(anyio.abc.SocketAttribute.local_port)
    sent = 0
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, sink)
        async with open_link(params, [("127.0.0.1", port)]) as proxy:
            client = await anyio.connect_tcp("127.0.0.1", proxy.ports[0])
            client.extra(anyio.abc.SocketAttribute.raw_socket).setsockopt(
                socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024
            )

            async def send_all() -> None:
                nonlocal sent
                for block in _blocks(total):
                    await client.send(block)
                    sent += len(block)
                await client.send_eof()

            async with client, anyio.create_task_group() as io:
                io.start_soon(send_all)
                await proxy.carrying.wait()
                upstream = proxy.directions[0]
                await upstream.stalled.wait()
                # The proxy stopped reading at its bound; the sender is held by TCP.
                assert upstream.held <= params.max_held
                assert sent < total
                reading.set()
            # Nothing was dropped on the way: once the sink reads, everything arrives.
            await finished.wait()
        want = hashlib.sha256()
        for block in _blocks(total):
            want.update(block)
        assert (received, got.hexdigest()) == (total, want.hexdigest())
        assert upstream.peak_held <= params.max_held
        tg.cancel_scope.cancel()


def test_the_link_runs_as_its_own_process_and_stops_when_stdin_closes() -> None:
    argv = [sys.executable, "-m", "benchmarks.link", "--rtt-ms", "2", "--exit-on-stdin-eof"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with socket.create_server(("127.0.0.1", 0)) as server:
        argv += ["--target", f"127.0.0.1:{server.getsockname()[1]}"]
        pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
        with subprocess.Popen(argv, **pipes, text=True, env=env, cwd=ROOT) as proc:
            try:
                assert proc.stdout is not None and proc.stdin is not None
                info = json.loads(proc.stdout.readline())
                assert info["rtt_ms"] == 2 and info["queue_bytes"] == 500_000  # 2 x BDP
                with socket.create_connection(("127.0.0.1", info["ports"][0])) as client:
                    conn, _ = server.accept()
                    with conn:
                        client.sendall(b"ping")
                        assert conn.recv(4) == b"ping"
                        conn.sendall(b"pong")
                        assert client.recv(4) == b"pong"
                proc.stdin.close()
                assert proc.wait(timeout=30) == 0
            finally:
                if proc.poll() is None:
                    proc.kill()


def test_bad_link_parameters_are_a_usage_error_not_a_traceback() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.link", "--rtt-ms", "-5", "--target", "127.0.0.1:1"],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "rtt must be" in done.stderr and "Traceback" not in done.stderr
