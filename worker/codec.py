"""JSON encoding and decoding: the only module that imports the JSON library.

orjson is strict where it matters for dead-lettering: it rejects invalid UTF-8,
``NaN``/``Infinity``, numbers beyond a double's range and nesting deeper than 1024
levels (and writes at most 254: ``too_deep`` says what may not be taken in).
Integers beyond 64 bits are read as floats, as JavaScript reads them. It also rejects
an escaped lone UTF-16 surrogate (``"\\ud83d"``), which JavaScript writes for a string
cut in the middle of an emoji, and a leading byte order mark: ``decode_repaired`` reads
those.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Final

import orjson

__all__ = [
    "MAX_DEPTH",
    "DecodeError",
    "decode",
    "decode_error",
    "decode_repaired",
    "decode_writable",
    "encode",
    "encode_lenient",
    "encode_sorted",
    "too_deep",
]

DecodeError = orjson.JSONDecodeError
# The deepest nesting taken in: orjson reads 1024 levels but writes 254, and the worker
# wraps a call's values a few levels deeper (the group snapshot, a warning's value).
MAX_DEPTH = 200


def decode(data: bytes | str) -> Any:
    """Parse one JSON document; raises ``DecodeError`` (a ``ValueError``) when invalid."""
    return orjson.loads(data)


def decode_error(data: bytes, error: DecodeError) -> str:
    """What is wrong with ``data``, which ``decode`` refused: of bytes that are not UTF-8
    the parser says only that, placed at the document's start; this names the first."""
    try:
        data.decode()
    except UnicodeDecodeError as e:
        return f"not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} ({e.reason})"
    return str(error)


def decode_writable(data: bytes, limit: int = MAX_DEPTH) -> Any:
    """``decode``, raising ``ValueError`` too when the document nests deeper than
    ``limit`` levels, so could not be written again: for records read back from
    topics anyone can write (a state record, a re-keyed call)."""
    value = orjson.loads(data)
    if too_deep(value, data, limit):
        raise ValueError(f"nested deeper than {limit} levels")
    return value


_BOM: Final = b"\xef\xbb\xbf"
# An escape in a JSON string, as one unit so that a run of backslashes is read in pairs:
# a surrogate pair, a lone surrogate (group 1), or any other escape.
_ESCAPE = re.compile(
    rb"\\(?:u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
    rb"|u([dD][89a-fA-F][0-9a-fA-F]{2})|.)",
    re.DOTALL,
)


def decode_repaired(data: bytes) -> Any:
    """``decode``, past a leading UTF-8 byte order mark (RFC 8259 lets a parser ignore
    one) and reading each escaped lone UTF-16 surrogate as U+FFFD, as a browser's
    ``TextEncoder`` writes one; raises ``DecodeError`` when the document is invalid
    otherwise. For documents ``decode`` refused: it reads them again."""
    return orjson.loads(_ESCAPE.sub(_replace_unpaired, data.removeprefix(_BOM)))


def _replace_unpaired(escape: re.Match[bytes]) -> bytes:
    return b"\\ufffd" if escape[1] else escape[0]


def too_deep(value: Any, text: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether ``value``, parsed from ``text``, nests deeper than ``limit`` levels (so
    could not be written again). Counts the text's opening brackets first, the most it
    could nest, and walks the containers only when there are more than ``limit``."""
    if text.count(b"[") + text.count(b"{") <= limit:
        return False
    pending = [(value, 1)]
    while pending:
        node, depth = pending.pop()
        if depth > limit:
            return True
        inner = node.values() if isinstance(node, dict) else node
        pending.extend((v, depth + 1) for v in inner if isinstance(v, dict | list))
    return False


# Serialise a value to compact JSON bytes; raises ``TypeError`` for non-JSON values.
# orjson's own function, not a wrapper: it runs several times per call (bench: a wrapper
# cost about 0.3 µs each).
encode: Callable[[Any], bytes] = orjson.dumps


def encode_sorted(value: Any) -> bytes:
    """Serialise with sorted keys: the same value always gives the same bytes."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def encode_lenient(value: Any, **_: Any) -> bytes:
    """Serialise for logs: anything that is not JSON becomes its ``str``."""
    return orjson.dumps(value, default=str)
