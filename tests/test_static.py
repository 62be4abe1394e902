"""The browser module (rpcstream/static/) agrees with the Python package, and is served.

The JavaScript copies of the wire vocabulary (error codes, frame tags, run event
types) are read out of the module sources and compared with Python's, so neither
side can drift alone. The reading is strict on purpose: a table written in a
form this file cannot read fails the test, it never passes or skips unread.
"""

from __future__ import annotations

import inspect
import re
import typing
from pathlib import Path

import pytest

from rpcstream import RpcPeer, errors, messages
from rpcstream.handshake import STATIC_DIR, builtin_routes
from rpcstream.peer import PING, admission
from rpcstream.runs.events import TERMINAL_TYPES, EventType

ENTRY = STATIC_DIR / "rpcstream.js"
MODULES = STATIC_DIR / "rpcstream"
JS = "text/javascript; charset=utf-8"

_ENTRY_LINE = re.compile(r'([A-Z][A-Z0-9_]*): (\d+|"[^"\\]*"),(?:\s*//.*)?')


class UnreadableJS(AssertionError):
    """A constant is missing from the sources or written in a form not read here."""


def sources() -> dict[str, str]:
    """Every module of the browser client, by file name (the entry point included)."""
    found = {path.name: path.read_text("utf-8") for path in sorted(MODULES.glob("*.js"))}
    found["rpcstream.js"] = ENTRY.read_text("utf-8")
    return found


def definition(files: dict[str, str], name: str) -> tuple[str, int]:
    """The file and line index of the one declaration of ``name`` in ``files``."""
    declared = re.compile(rf"^\s*(?:export\s+)?(?:const|let|var|class|function)\s+{name}\b")
    places = [
        (file, i)
        for file, text in files.items()
        for i, line in enumerate(text.splitlines())
        if declared.match(line)
    ]
    if len(places) != 1:
        raise UnreadableJS(f"{name} must be declared exactly once, found at {places}")
    return places[0]


def frozen_table(files: dict[str, str], name: str) -> dict[str, int | str]:
    """The entries of ``export const NAME = Object.freeze({ ... });``, one
    ``KEY: value,`` per line (a number or a plain string literal)."""
    file, start = definition(files, name)
    lines = files[file].splitlines()
    if lines[start] != f"export const {name} = Object.freeze({{":
        raise UnreadableJS(f"{file}:{start + 1}: {name} is not written as a frozen table")
    table: dict[str, int | str] = {}
    for i in range(start + 1, len(lines)):
        line = lines[i].strip()
        if line == "});":
            if not table:
                raise UnreadableJS(f"{file}: {name} is empty")
            return table
        if not line or line.startswith("//"):
            continue
        entry = _ENTRY_LINE.fullmatch(line)
        if entry is None:
            raise UnreadableJS(f"{file}:{i + 1}: cannot read this entry of {name}: {line!r}")
        key, value = entry[1], entry[2]
        if key in table:
            raise UnreadableJS(f"{file}:{i + 1}: {name}.{key} appears twice")
        table[key] = value[1:-1] if value.startswith('"') else int(value)
    raise UnreadableJS(f"{file}: {name} never ends with a '}});' line")


def constant(files: dict[str, str], name: str) -> int | str:
    """The value of ``export const NAME = value;``: an integer or a plain string literal."""
    file, start = definition(files, name)
    line = files[file].splitlines()[start]
    found = re.fullmatch(rf'export const {name} = (\d+|"[^"\\]*");(?:\s*//.*)?', line)
    if found is None:
        raise UnreadableJS(f"{file}:{start + 1}: {name} is not a plain number or string")
    value = found[1]
    return value[1:-1] if value.startswith('"') else int(value)


def frozen_set(files: dict[str, str], name: str, refs: dict[str, dict[str, int | str]]) -> set[str]:
    """The members of ``export const NAME = Object.freeze(new Set([...]));``: string
    literals, or ``TABLE.KEY`` for a table in ``refs``."""
    file, start = definition(files, name)
    text = "\n".join(files[file].splitlines()[start:])
    statement = re.match(
        rf"export const {name} = Object\.freeze\(\s*new Set\(\[([^\]]*)\]\),?\s*\);", text
    )
    if statement is None:
        raise UnreadableJS(f"{file}:{start + 1}: {name} is not written as a frozen Set")
    members: set[str] = set()
    for item in (part.strip() for part in statement[1].split(",")):
        if not item:
            continue
        literal = re.fullmatch(r'"([^"\\]*)"', item)
        ref = re.fullmatch(r"([A-Za-z]+)\.([A-Z][A-Z0-9_]*)", item)
        if literal is not None:
            members.add(literal[1])
        elif ref is not None and ref[2] in refs.get(ref[1], {}):
            members.add(str(refs[ref[1]][ref[2]]))
        else:
            raise UnreadableJS(f"{file}: cannot read this member of {name}: {item!r}")
    return members


def upper_snake(name: str) -> str:
    """``StreamCall`` -> ``STREAM_CALL``."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper()


def python_frame_tags() -> dict[str, int]:
    frames = typing.get_args(messages.Frame)
    assert frames, "messages.Frame is no longer a union of Structs"
    return {upper_snake(cls.__name__): cls.__struct_config__.tag for cls in frames}


def python_coded_errors() -> dict[str, int]:
    """Every RemoteError subclass with its own code, by class name."""
    return {
        cls.__name__: int(cls.code_default)
        for cls in vars(errors).values()
        if isinstance(cls, type)
        and issubclass(cls, errors.RemoteError)
        and cls is not errors.RemoteError
        and "code_default" in cls.__dict__
        and not cls.__name__.startswith("_")
    }


def entry_exports() -> set[str]:
    """The names ``rpcstream.js`` re-exports (``export { a, b } from "..."``)."""
    names: set[str] = set()
    for group in re.findall(r"export\s*\{([^}]*)\}\s*from", ENTRY.read_text("utf-8")):
        names.update(n.strip() for n in group.split(",") if n.strip())
    return names


def test_the_js_error_codes_are_pythons() -> None:
    js = frozen_table(sources(), "ErrorCode")
    assert js == {code.name: code.value for code in errors.ErrorCode}


def test_every_python_error_class_with_a_code_has_its_js_class_exported() -> None:
    files = sources()
    codes = frozen_table(files, "ErrorCode")
    coded = re.compile(
        r'^export (?:const (\w+) = |class (\w+) extends )coded\("(\w+)", ErrorCode\.(\w+)\)',
        re.M,
    )
    js: dict[str, int] = {}
    for match in coded.finditer(files["errors.js"]):
        variable, cls, name, code = match.groups()
        assert (variable or cls) == name, f"{variable or cls} is named {name!r} in JS"
        assert code in codes, f"{name}: ErrorCode.{code} does not exist"
        js[name] = int(codes[code])
    assert js == python_coded_errors()
    assert set(js) <= entry_exports(), "rpcstream.js must re-export every error class"


def test_the_js_frame_tags_are_the_python_structs_tags() -> None:
    files = sources()
    js = frozen_table(files, "FrameTag")
    assert js == python_frame_tags()
    # A misspelt name destructured from FrameTag would be undefined, silently.
    for file, text in files.items():
        for group in re.findall(r"const\s*\{([^}]*)\}\s*=\s*FrameTag\s*;", text):
            for tag in (t.strip() for t in group.split(",") if t.strip()):
                assert tag in js, f"{file}: FrameTag has no {tag}"


def test_the_js_run_event_types_are_pythons() -> None:
    files = sources()
    event_types = frozen_table(files, "EventType")
    assert event_types == {t.name: t.value for t in EventType}
    assert frozen_set(files, "TERMINAL_TYPES", {"EventType": event_types}) == TERMINAL_TYPES
    assert "TERMINAL_TYPES" in entry_exports()


def test_the_js_admission_constants_are_pythons() -> None:
    files = sources()
    defaults = inspect.signature(RpcPeer).parameters
    limit = constant(files, "DEFAULT_MAX_CONCURRENT_HANDLERS")
    assert limit == admission.DEFAULT_MAX_CONCURRENT_HANDLERS
    assert limit == defaults["max_concurrent_handlers"].default
    assert constant(files, "DEFAULT_MAX_WAITING_CALLS") == defaults["max_waiting_calls"].default
    assert constant(files, "SETTINGS_METHOD") == admission.SETTINGS
    assert constant(files, "HEARTBEAT_METHOD") == PING


def test_every_module_is_served_as_javascript_and_every_import_resolves() -> None:
    routes = builtin_routes()
    assert routes["/rpcstream.js"].content_type == JS
    for path in sorted(MODULES.glob("*.js")):
        route = routes[f"/rpcstream/{path.name}"]
        assert route.content_type == JS
        assert route.body == path.read_bytes()
    # What a page loads: the entry, then what it imports, relatively; that is all of them.
    reached, todo = {"/rpcstream.js"}, ["/rpcstream.js"]
    while todo:
        url = todo.pop()
        code = re.sub(r"/\*.*?\*/|//[^\n]*", "", routes[url].body.decode(), flags=re.S)
        for target in re.findall(r'(?:import|export)[^"]*?from\s+"([^"]+)"', code):
            assert target.startswith("./"), f"{url} imports {target!r}: relative imports only"
            resolved = str(Path(url).parent / target[2:])
            assert resolved in routes, f"{url} imports {target}, which is not served"
            if resolved not in reached:
                reached.add(resolved)
                todo.append(resolved)
    assert reached == {url for url in routes if url.endswith(".js")}


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("export const T = Object.freeze({\n  A: 1,\n});\n", None),
        ("const other = 1;\n", "declared exactly once"),
        ("export const T = Object.freeze({ A: 1 });\n", "not written as a frozen table"),
        ("export const T = Object.freeze({\n  A: 1, B: 2,\n});\n", "cannot read this entry"),
        ("export const T = Object.freeze({\n  ...Other,\n});\n", "cannot read this entry"),
        ("export const T = Object.freeze({\n  A: 1,\n  A: 2,\n});\n", "appears twice"),
        ("export const T = Object.freeze({\n  A: 1,\n", "never ends"),
        ("export const T = Object.freeze({\n});\n", "is empty"),
        ("export const T = Object.freeze({\n  A: 1,\n});\nconst T = 2;\n", "exactly once"),
    ],
)
def test_a_table_written_in_another_form_fails_instead_of_being_skipped(
    source: str, reason: str | None
) -> None:
    if reason is None:
        assert frozen_table({"m.js": source}, "T") == {"A": 1}
        return
    with pytest.raises(UnreadableJS, match=reason):
        frozen_table({"m.js": source}, "T")


def test_a_constant_written_in_another_form_fails() -> None:
    assert constant({"m.js": 'export const C = "a.b";\n'}, "C") == "a.b"
    assert constant({"m.js": "export const C = 256; // why\n"}, "C") == 256
    for bad in ["export const C = 2 ** 8;\n", "export const C = 100_000;\n", "let C = 1;\n"]:
        with pytest.raises(UnreadableJS):
            constant({"m.js": bad}, "C")


def test_a_set_member_that_cannot_be_resolved_fails() -> None:
    refs: dict[str, dict[str, int | str]] = {"E": {"A": "a"}}
    ok = 'export const S = Object.freeze(new Set([E.A, "b"]));\n'
    assert frozen_set({"m.js": ok}, "S", refs) == {"a", "b"}
    for bad in [
        'export const S = Object.freeze(new Set([E.B, "b"]));\n',
        "export const S = Object.freeze(new Set([...xs]));\n",
        "export const S = new Set(['a']);\n",
    ]:
        with pytest.raises(UnreadableJS):
            frozen_set({"m.js": bad}, "S", refs)
