"""pydantic v2 models as parameters, results, stream items and run event data (optional).

rpcstream never imports pydantic itself. A type can only be a pydantic model once
pydantic is imported (the model's own module did it), so every check here looks
in ``sys.modules``: without pydantic the hooks cost one dict lookup, and only for
values msgspec cannot handle on its own, which without pydantic are errors anyway.

Theory of operation: msgspec does the work and models are its *custom types*.

* **Decoding.** Every :class:`~rpcstream.messages.Codec` decoder is built with
  :func:`dec_hook`: msgspec decodes the part of a payload that stands for a model
  to plain values and calls the hook, which validates it with the model
  (``model_validate``, pydantic's validator compiled once per class). So
  ``User``, ``list[User]``, ``dict[str, User]``, ``User | None`` and Struct
  fields of model types all work, and msgspec adds the path of the failing
  value to pydantic's message (``- at `$[1]```).
* **What msgspec refuses.** A union of two models, of a model and another type, and
  an ``Annotated`` type carrying pydantic constraints (``Field(gt=0)``, which
  msgspec would ignore): a :class:`AdapterDecoder` decodes the payload to plain
  values and validates the whole of it with a ``TypeAdapter``, built once per
  annotation (:func:`adapter`).
* **Encoding.** :func:`enc_hook` dumps a model with
  ``model_dump(mode="json", by_alias=True)``: values every codec carries, under
  the names pydantic validates by default, so a model sent is the model received.

Both codecs validate in pydantic's Python mode on the values msgspec decoded
(``str``, ``int``, ``float``, ``bool``, ``None``, lists, dicts): the same input
gives the same outcome over msgpack and JSON. Lax models (the default) accept the
strings JSON carries for datetimes, UUIDs, enums...; strict ones refuse them.
"""

from __future__ import annotations

import sys
import typing
from types import ModuleType
from typing import Any, Final

import msgspec
import msgspec.inspect

__all__ = [
    "AdapterDecoder",
    "MAX_MESSAGE",
    "adapter",
    "build_decoder",
    "check_type",
    "convert",
    "dec_hook",
    "describe",
    "enc_hook",
    "encode_json",
    "is_model",
    "mentions_pydantic",
]

MAX_MESSAGE: Final = 400
"""The longest validation message sent to a caller: pydantic lists every error,
and a list of ten thousand bad items must not become a megabyte of text."""

_MAX_DEPTH: Final = 32  # nesting walked in an annotation; deeper is not a real one
_MAX_ADAPTERS: Final = 4096  # annotations are few (a program's own); bound them anyway
_adapters: dict[Any, Any] = {}


def _pydantic() -> ModuleType | None:
    # None also when an import of pydantic was blocked with sys.modules["pydantic"] = None.
    return sys.modules.get("pydantic")


def is_model(cls: Any) -> bool:
    """Whether ``cls`` is a pydantic v2 model class (never imports pydantic)."""
    pd = _pydantic()
    if pd is None or not isinstance(cls, type):
        return False
    base = getattr(pd, "BaseModel", None)
    # model_validate: pydantic 2 (a pydantic 1 BaseModel has parse_obj instead).
    return base is not None and issubclass(cls, base) and hasattr(cls, "model_validate")


def _is_pydantic_metadata(obj: Any) -> bool:
    """``Field(gt=0)`` or an ``annotated_types`` constraint inside ``Annotated``."""
    module = type(obj).__module__
    return module.startswith(("pydantic.", "annotated_types")) and _pydantic() is not None


def mentions_pydantic(hint: Any, _depth: int = 0) -> bool:
    """Whether an annotation holds a pydantic model or pydantic constraint anywhere in
    its arguments (``list[User]``, ``User | None``, ``Annotated[int, Field(gt=0)]``)."""
    if _pydantic() is None or _depth > _MAX_DEPTH:
        return False
    if is_model(hint) or _has_pydantic_metadata(hint):
        return True
    return any(mentions_pydantic(arg, _depth + 1) for arg in typing.get_args(hint))


def _has_pydantic_metadata(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Annotated and any(
        _is_pydantic_metadata(m) for m in hint.__metadata__
    )


def _needs_adapter(hint: Any, _depth: int = 0) -> bool:
    """Whether msgspec would silently drop a pydantic constraint of ``hint``."""
    if _depth > _MAX_DEPTH:
        return False
    if _has_pydantic_metadata(hint):
        return True
    return any(_needs_adapter(arg, _depth + 1) for arg in typing.get_args(hint))


def describe(exc: Exception) -> str:
    """pydantic's validation error as one bounded line: ``User: age: Input should be
    a valid integer; name: Field required``. Inputs are left out (they can be large,
    and the caller has them)."""
    errors = getattr(exc, "errors", None)
    if errors is None:
        text = str(exc)
    else:
        try:
            items = errors(include_url=False, include_input=False)
        except Exception:  # not pydantic's after all
            items = None
        if items is None:
            text = str(exc)
        else:
            parts = []
            for err in items:
                loc = ".".join(str(x) for x in err.get("loc", ())) or "value"
                parts.append(f"{loc}: {err.get('msg', '')}")
            title = getattr(exc, "title", "")
            text = f"{title}: " + "; ".join(parts) if title else "; ".join(parts)
    if len(text) > MAX_MESSAGE:
        text = text[: MAX_MESSAGE - 1] + "…"
    return text


def dec_hook(type_: Any, obj: Any) -> Any:
    """msgspec's hook for custom types: validate ``obj`` with a pydantic model.

    Anything else is refused with msgspec's own wording (``Expected `X`, got
    `dict```), which msgspec raises as a ``ValidationError`` with the path."""
    if isinstance(type_, type) and isinstance(obj, type_):
        # msgspec's own rule for a custom type when no hook is set (``object``
        # takes anything): with a hook, msgspec leaves even that to the hook.
        return obj
    if is_model(type_):
        try:
            return type_.model_validate(obj)
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            raise ValueError(describe(exc)) from None
    name = getattr(type_, "__qualname__", repr(type_))
    raise TypeError(f"Expected `{name}`, got `{type(obj).__name__}`")


def enc_hook(obj: Any) -> Any:
    """msgspec's hook for values it cannot encode: a pydantic model becomes its JSON
    form; anything else is refused as msgspec itself would (``TypeError``)."""
    pd = _pydantic()
    if pd is not None:
        base = getattr(pd, "BaseModel", None)
        if base is not None and isinstance(obj, base):
            try:
                return obj.model_dump(mode="json", by_alias=True)
            except ValueError as exc:  # PydanticSerializationError: a field it cannot dump
                # TypeError is what every encoding site expects of a value it cannot send.
                raise TypeError(f"{type(obj).__qualname__} cannot be dumped: {exc}") from exc
    raise TypeError(f"Encoding objects of type {type(obj).__qualname__} is unsupported")


encode_json = msgspec.json.Encoder(enc_hook=enc_hook).encode
"""JSON by msgspec, pydantic models as their JSON form: run event data as stored
(``rpcstream.runs.events.encode_data`` with models; that module imports only msgspec)."""


def adapter(hint: Any) -> Any:
    """pydantic's ``TypeAdapter`` for ``hint``, built once per annotation."""
    try:
        return _adapters[hint]
    except KeyError:
        pass
    except TypeError:  # unhashable annotation: built each time (rare, and still correct)
        return _new_adapter(hint)
    made = _new_adapter(hint)
    if len(_adapters) < _MAX_ADAPTERS:
        _adapters[hint] = made
    return made


def _new_adapter(hint: Any) -> Any:
    pd = _pydantic()
    if pd is None or not hasattr(pd, "TypeAdapter"):
        raise TypeError(f"{hint!r} needs pydantic 2 (pip install 'rpcstream[pydantic]')")
    return pd.TypeAdapter(hint)


class AdapterDecoder:
    """Decodes a payload to plain values, then validates the whole with a
    ``TypeAdapter``: for annotations msgspec cannot take (see the module docstring).
    Raises ``msgspec.ValidationError`` (and ``msgspec.DecodeError``) as msgspec's
    decoders do, so every caller handles both kinds alike."""

    __slots__ = ("_adapter", "_plain")

    def __init__(self, hint: Any, plain: Any) -> None:
        self._adapter = adapter(hint)
        self._plain = plain  # a msgspec decoder to Any

    def decode(self, raw: Any) -> Any:
        """Decode and validate one payload."""
        return _validate(self._adapter, self._plain.decode(raw))


def _validate(ad: Any, value: Any) -> Any:
    try:
        return ad.validate_python(value)
    except ValueError as exc:
        raise msgspec.ValidationError(describe(exc)) from None


def build_decoder(decoder_cls: Any, hint: Any) -> Any:
    """A decoder of ``decoder_cls`` (msgspec's msgpack or JSON ``Decoder``) for
    ``hint`` with :func:`dec_hook`, or an :class:`AdapterDecoder` where msgspec
    cannot (or would drop pydantic's constraints)."""
    if _pydantic() is not None and _needs_adapter(hint):
        return AdapterDecoder(hint, decoder_cls())
    try:
        return decoder_cls(hint, dec_hook=dec_hook)
    except TypeError:
        if not mentions_pydantic(hint):
            raise
        return AdapterDecoder(hint, decoder_cls())


def convert(value: Any, hint: Any) -> Any:
    """``msgspec.convert`` that also knows pydantic models (a dict becomes the model,
    a model instance is kept). Raises ``msgspec.ValidationError``."""
    if _pydantic() is not None and _needs_adapter(hint):
        return _validate(adapter(hint), value)
    try:
        return msgspec.convert(value, hint, dec_hook=dec_hook)
    except TypeError:  # msgspec refused the annotation itself
        if not mentions_pydantic(hint):
            raise
        return _validate(adapter(hint), value)


def _custom_classes(node: Any, seen: set[int]) -> typing.Iterator[type]:
    """The classes msgspec sees as custom types in a ``msgspec.inspect`` tree."""
    if id(node) in seen:  # recursive Structs make the tree a graph
        return
    seen.add(id(node))
    if isinstance(node, msgspec.inspect.CustomType):
        yield node.cls
    elif isinstance(node, msgspec.Struct):
        for name in node.__struct_fields__:
            yield from _custom_classes(getattr(node, name), seen)
    elif isinstance(node, tuple | list):
        for item in node:
            yield from _custom_classes(item, seen)


def check_type(hint: Any) -> None:
    """Refuse, when a handler is registered, a parameter type no value could ever
    convert to: a class that is neither one msgspec knows nor a pydantic 2 model
    (a model whose pydantic is missing, a pydantic v1 model, a plain class).
    Builds the ``TypeAdapter`` of an annotation that needs one, so a type pydantic
    cannot validate fails here too. Raises ``TypeError`` saying what to use."""
    if hint is Any or hint is object:
        return
    if mentions_pydantic(hint):
        if _needs_adapter(hint):
            adapter(hint)
            return
        try:
            msgspec.inspect.type_info(hint)
        except TypeError:  # a union msgspec refuses: pydantic validates it whole
            adapter(hint)
            return
    try:
        info = msgspec.inspect.type_info(hint)
    except TypeError as exc:
        raise TypeError(f"msgspec cannot convert to {hint!r}: {exc}") from None
    for cls in _custom_classes(info, set()):
        if cls is object or is_model(cls):
            continue
        hint_pd = (
            ""
            if _pydantic() is not None
            else "; for a pydantic model, install pydantic 2 (pip install 'rpcstream[pydantic]')"
        )
        raise TypeError(
            f"no value can convert to {cls.__qualname__}: use a msgspec Struct, a dataclass, "
            f"a TypedDict, an attrs class or a pydantic 2 model{hint_pd}"
        )
