"""The caller side of a peer: calls, notifications and stream calls to the other side.

Async iterables among the arguments travel as streams: each gets a stream id of
ours, pumped by :class:`~rpcstream.peer.streams.Senders`, and the call names
them in ``stream_args``.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import Any

import anyio
import msgspec

from ..errors import ConnectionClosed, DeadlineExceeded, InternalError, RemoteError
from ..messages import Error, Notify, Result, StreamCall, StreamId
from ..observe import hooks
from ..observe.outcomes import client_outcome, outcome_of
from .admission import PING, Admission
from .driver import ANSWER, Driver
from .streams import IncomingStream, Senders, deadline

__all__ = ["Caller"]


class Caller:
    """Makes calls on the other side; see :class:`~rpcstream.RpcPeer` for the API."""

    def __init__(self, driver: Driver, senders: Senders, max_waiting_calls: int) -> None:
        self._driver = driver
        self._senders = senders
        self.admission = Admission(max_waiting_calls)

    async def call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        result_type: Any,
    ) -> Any:
        """Call ``method`` and return its result (see :meth:`RpcPeer.call`)."""
        driver = self._driver
        driver.check_open()
        _check_method(method)
        if method == PING:  # answered without a handler: no slot to wait for
            return await self._call(method, args, kwargs, timeout, result_type)
        admission = self.admission
        if not admission.try_acquire():
            # Beyond the other side's limit: wait for a slot, within the deadline.
            until = deadline(timeout)
            await admission.acquire(until)
            if timeout is not None:
                timeout = max(0.0, until - anyio.current_time())
        try:
            return await self._call(method, args, kwargs, timeout, result_type)
        finally:
            admission.release()

    async def _call(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        result_type: Any,
    ) -> Any:
        driver = self._driver
        proto = driver.proto
        args_raw, kwargs_raw, stream_args, sids = self._encode_params(args, kwargs)
        obs = driver.observer  # observe
        call = None if obs is None else obs.call_sent(driver.owner, hooks.CALL, method)
        cid: int = driver.send_now(
            proto.send_call,
            method,
            args_raw,
            kwargs_raw,
            timeout,
            stream_args,
            None if call is None else call.meta,
        )
        event = driver.new_event()
        driver.waiters.add(ANSWER, cid, event.set)
        try:
            if timeout is None:
                await event.wait()
            else:
                with anyio.move_on_after(timeout):
                    await event.wait()
                if not event.is_set():
                    raise DeadlineExceeded(f"{method}: no answer within {timeout} s")
        except BaseException as exc:
            proto.take_answer(cid)  # no answer yet: the callee is told to stop
            self._senders.stop_unopened(sids)
            if call is not None:  # observe
                call.end(client_outcome(exc), exc)
            raise
        finally:
            driver.waiters.discard(ANSWER, cid)
        answer = proto.take_answer(cid)
        if type(answer) is Result:
            if call is not None:  # observe
                call.end("ok")
            try:
                return driver.codec.decode(answer.value, result_type)
            except msgspec.ValidationError as exc:
                raise InternalError(
                    f"{method}: result did not match {result_type!r}: {exc}"
                ) from None
        self._senders.stop_unopened(sids)
        if type(answer) is Error:
            error = RemoteError.from_wire(answer.code, answer.message, answer.data)
            if call is not None:  # observe
                call.end(outcome_of(error), error)
            raise error
        assert isinstance(answer, ConnectionClosed)
        if call is not None:  # observe
            call.end("connection_closed", answer)
        raise ConnectionClosed(answer.code, answer.reason)

    async def notify(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """Call ``method`` expecting no answer (see :meth:`RpcPeer.notify`)."""
        driver = self._driver
        driver.check_open()
        _check_method(method)
        args_raw, kwargs_raw, stream_args, _ = self._encode_params(args, kwargs)
        obs = driver.observer  # observe
        call = None if obs is None else obs.call_sent(driver.owner, hooks.NOTIFY, method)
        meta = None if call is None else call.meta
        driver.proto.send(Notify(method, args_raw, kwargs_raw, stream_args, meta))
        if call is not None:  # observe: a notification is done once it is sent
            call.end("ok")
        await anyio.lowlevel.checkpoint()

    def stream(
        self,
        method: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        timeout: float | None,
        item_type: Any,
        window_items: int | None,
        window_bytes: int | None,
    ) -> IncomingStream:
        """Call a streaming ``method`` (see :meth:`RpcPeer.stream`)."""
        driver = self._driver
        driver.check_open()
        _check_method(method)
        proto = driver.proto
        sid = proto.streams.next_stream_id()
        admission = self.admission

        def start() -> None:
            # Open our end first: if that fails, no handler is left waiting for credit.
            stream.open()
            try:
                args_raw, kwargs_raw, stream_args, _ = self._encode_params(args, kwargs)
            except BaseException:
                stream.close()
                raise
            obs = driver.observer  # observe: ended by the stream (see IncomingStream)
            call = None if obs is None else obs.call_sent(driver.owner, hooks.STREAM, method)
            meta = None if call is None else call.meta
            # A stream that waited for its slot sends the time it has left.
            left = None if timeout is None else max(0.0, stream.deadline - anyio.current_time())
            proto.send(StreamCall(sid, method, args_raw, kwargs_raw, left, stream_args, meta))
            stream._observation = call

        stream = IncomingStream(
            driver, sid, item_type, window_items, window_bytes, timeout, open_now=False
        )
        if admission.try_acquire():
            stream.hold_slot(admission.release)
            start()
        else:  # beyond the other side's limit: the first read waits for a slot
            stream.start_later(admission.acquire, start, admission.release)
        return stream

    def _encode_params(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[msgspec.Raw, msgspec.Raw, list[int | str], list[StreamId]]:
        codec = self._driver.codec
        stream_args: list[int | str] = []
        sids: list[StreamId] = []
        try:
            if any(isinstance(a, AsyncIterable) for a in args) or any(
                isinstance(v, AsyncIterable) for v in kwargs.values()
            ):
                start = self._senders.start
                new_args = list(args)
                for i, a in enumerate(args):
                    if isinstance(a, AsyncIterable):
                        new_args[i] = sid = start(a)
                        stream_args.append(i)
                        sids.append(sid)
                new_kwargs = dict(kwargs)
                for k, v in kwargs.items():
                    if isinstance(v, AsyncIterable):
                        new_kwargs[k] = sid = start(v)
                        stream_args.append(k)
                        sids.append(sid)
                args, kwargs = tuple(new_args), new_kwargs
            args_raw = codec.encode_raw(args) if args else codec.empty_array
            kwargs_raw = codec.encode_raw(kwargs) if kwargs else codec.empty_map
        except BaseException as exc:
            for sid in sids:  # the call will not be made: stop its streams
                self._senders.abort(sid)
            if isinstance(exc, TypeError):
                raise TypeError(f"parameters cannot be encoded: {exc}") from exc
            raise
        return args_raw, kwargs_raw, stream_args, sids


def _check_method(method: str) -> None:
    """A method name must be text the codecs can encode: refuse it here, where the
    caller can see why, not in the writer (which would have to end the connection)."""
    if not method.isascii():
        method.encode()  # UnicodeEncodeError (a ValueError) for a lone surrogate
