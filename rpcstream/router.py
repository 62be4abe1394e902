"""The method registry: names to handlers, and parameters converted by msgspec.

A handler is an ``async def`` (unary: its return value is the result), an
``async def`` generator (streaming: each ``yield`` is an item), or a plain
``def`` for quick work that never waits (unary: it runs at once, where the call
arrives, with no task of its own, which makes it the cheapest kind of call). Its annotations
say what the parameters are: each wire value is converted to its parameter's
type by msgspec, so a handler never sees a ``str`` where it declared ``int``.
A parameter annotated ``AsyncIterator[T]`` (or ``AsyncIterable[T]``) receives a
stream the caller sends, its items converted to ``T``.

Types may be anything msgspec converts (Structs, dataclasses, TypedDicts, attrs
classes, builtins) and, when pydantic 2 is installed, pydantic models and
containers of them (see :mod:`rpcstream.models`). A type no value could convert
to (a plain class) is refused when the handler is registered.
"""

from __future__ import annotations

import collections.abc
import inspect
import typing
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

import msgspec

from . import models
from .errors import InvalidParams
from .messages import Codec

__all__ = ["Method", "Router"]

F = TypeVar("F", bound=Callable[..., Any])

_STREAM_ORIGINS = (collections.abc.AsyncIterator, collections.abc.AsyncIterable)
_RAW_LIST = list[msgspec.Raw]
_RAW_DICT = dict[str, msgspec.Raw]


class _Param:
    __slots__ = ("default", "kind", "name", "stream_item", "type")

    def __init__(self, p: inspect.Parameter, hint: Any) -> None:
        self.name = p.name
        self.kind = p.kind
        self.default = p.default
        # No annotation, or one left as a string (unresolvable): no conversion.
        self.type = Any if hint is inspect.Parameter.empty or isinstance(hint, str) else hint
        origin = typing.get_origin(self.type)
        self.stream_item: Any = None
        if origin in _STREAM_ORIGINS:
            args = typing.get_args(self.type)
            self.stream_item = args[0] if args else Any


def _may_be_async_iterable(hint: Any) -> bool:
    """Whether a return annotation admits an async iterable (unknown ones do)."""
    origin = typing.get_origin(hint) or hint
    if not isinstance(origin, type) or origin in (inspect.Signature.empty, Any, object):
        return True  # no annotation, a string, Any, a Union...: we cannot tell
    return issubclass(origin, collections.abc.AsyncIterable)


class Method:
    """One registered handler and what is known of its signature."""

    __slots__ = (
        "_kw",
        "_positional",
        "_required",
        "_var_kw",
        "_var_pos",
        "func",
        "inline",
        "may_stream",
        "name",
        "streaming",
    )

    def __init__(self, name: str, func: Callable[..., Any]) -> None:
        if not callable(func):
            raise TypeError(f"handler {name!r} must be a function")
        # An object's own async __call__ counts as async, like a function's
        # (inspect sees through functools.partial by itself).
        forms = (func, type(func).__call__)
        if any(inspect.isgeneratorfunction(f) for f in forms):
            raise TypeError(f"handler {name!r}: a plain generator cannot stream; use async def")
        self.name = name
        self.func = func
        self.streaming = any(inspect.isasyncgenfunction(f) for f in forms)
        # A plain function: called where the call arrives, no task (see RpcPeer).
        self.inline = not (self.streaming or any(inspect.iscoroutinefunction(f) for f in forms))
        sig = inspect.signature(func)
        hints: dict[str, Any] = {}
        for f in forms:  # an object's hints are those of its __call__
            try:
                hints = typing.get_type_hints(f, include_extras=True)
                break
            except Exception:  # unresolvable forward references: no conversion
                continue
        # stream() may call a unary handler that returns an async iterable; one
        # whose annotation says it returns something else is refused unrun.
        self.may_stream = self.streaming or _may_be_async_iterable(
            hints.get("return", sig.return_annotation)
        )
        params = [_Param(p, hints.get(p.name, p.annotation)) for p in sig.parameters.values()]
        for p in params:
            try:
                models.check_type(p.type if p.stream_item is None else p.stream_item)
            except TypeError as exc:
                raise TypeError(f"handler {name!r}: parameter {p.name!r}: {exc}") from None
        P = inspect.Parameter
        self._positional = [
            p for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)
        ]
        self._kw = {
            p.name: p for p in params if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY)
        }
        self._var_pos = next((p for p in params if p.kind is P.VAR_POSITIONAL), None)
        self._var_kw = next((p for p in params if p.kind is P.VAR_KEYWORD), None)
        self._required = {
            p.name
            for p in params
            if p.default is P.empty and p.kind not in (P.VAR_POSITIONAL, P.VAR_KEYWORD)
        }

    def __repr__(self) -> str:
        return f"<Method {self.name} {'stream' if self.streaming else 'unary'}>"

    def bind(
        self,
        codec: Codec,
        args: msgspec.Raw,
        kwargs: msgspec.Raw,
        stream_args: list[int | str],
        open_stream: Callable[[int, Any], Any],
    ) -> tuple[list[Any], dict[str, Any]]:
        """Convert wire parameters to this handler's arguments.

        ``open_stream(stream_id, item_type)`` is called for each stream argument
        and its return value is passed to the handler. Raises
        :class:`InvalidParams` with msgspec's message when a value does not fit.
        """
        try:
            raw_args: list[msgspec.Raw] = codec.decode(args, _RAW_LIST)
            raw_kwargs: dict[str, msgspec.Raw] = codec.decode(kwargs, _RAW_DICT)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            raise InvalidParams(f"{self.name}: malformed parameters: {exc}") from None
        streams = set(stream_args)
        out_args: list[Any] = []
        out_kwargs: dict[str, Any] = {}
        seen: set[str] = set()
        positional = self._positional
        for i, raw in enumerate(raw_args):
            if i < len(positional):
                p = positional[i]
                seen.add(p.name)
            elif self._var_pos is not None:
                p = self._var_pos
            else:
                raise InvalidParams(
                    f"{self.name}() takes {len(positional)} positional arguments "
                    f"but {len(raw_args)} were given"
                )
            out_args.append(self._convert(codec, p, raw, i in streams, open_stream))
        for key, raw in raw_kwargs.items():
            p = self._kw.get(key)  # type: ignore[assignment]
            if p is None:
                if self._var_kw is None:
                    raise InvalidParams(f"{self.name}() got an unexpected keyword argument {key!r}")
                p = self._var_kw
            elif key in seen:
                raise InvalidParams(f"{self.name}() got multiple values for argument {key!r}")
            seen.add(key)
            out_kwargs[key] = self._convert(codec, p, raw, key in streams, open_stream)
        missing = self._required - seen
        if missing:
            names = ", ".join(repr(n) for n in sorted(missing))
            raise InvalidParams(f"{self.name}() missing required argument(s): {names}")
        return out_args, out_kwargs

    def _convert(
        self,
        codec: Codec,
        p: _Param,
        raw: msgspec.Raw,
        is_stream: bool,
        open_stream: Callable[[int, Any], Any],
    ) -> Any:
        if is_stream or p.stream_item is not None:
            if not is_stream:
                raise InvalidParams(f"{self.name}(): argument {p.name!r} must be a stream")
            try:
                sid = codec.decode(raw, int)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise InvalidParams(f"{self.name}(): stream id of {p.name!r}: {exc}") from None
            return open_stream(sid, Any if p.stream_item is None else p.stream_item)
        try:
            return codec.decode(raw, p.type)
        except (msgspec.ValidationError, msgspec.DecodeError) as exc:
            # DecodeError: a string that is not UTF-8, found only now that the
            # value itself is decoded. Bad input either way, not our failure.
            raise InvalidParams(f"{self.name}(): argument {p.name!r}: {exc}") from None


class Router:
    """A registry of handlers by wire name.

    >>> router = Router()
    >>> @router.method
    ... async def add(a: int, b: int) -> int:
    ...     return a + b
    """

    def __init__(self) -> None:
        self._methods: dict[str, Method] = {}

    @overload
    def method(self, func: F, /) -> F: ...
    @overload
    def method(self, name: str | None = None, /) -> Callable[[F], F]: ...

    def method(self, arg: Any = None, /) -> Any:
        """Register a handler: ``@router.method`` (wire name: the function's name) or
        ``@router.method("users.get")``."""
        if callable(arg):
            self.add(arg)
            return arg

        def decorator(func: F) -> F:
            self.add(func, arg)
            return func

        return decorator

    def add(
        self, func: Callable[..., Awaitable[Any]] | Callable[..., Any], name: str | None = None
    ) -> Method:
        """Register ``func`` under ``name`` (default: its ``__name__``)."""
        wire = name or func.__name__
        if wire in self._methods:
            raise ValueError(f"method {wire!r} is already registered")
        m = self._methods[wire] = Method(wire, func)
        return m

    def include(self, other: Router, prefix: str = "") -> None:
        """Register every method of ``other``, each name prefixed by ``prefix``."""
        for name, m in other._methods.items():
            self.add(m.func, prefix + name)

    def get(self, name: str) -> Method | None:
        """The method registered under ``name``, if any."""
        return self._methods.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._methods

    def __iter__(self) -> collections.abc.Iterator[str]:
        return iter(self._methods)

    def __len__(self) -> int:
        return len(self._methods)
