"""Text that came from files, made safe to show and to parse, and JSON values checked against
the types a config dataclass declares (json_fits) before anything is built from them.

File names on Linux may be any bytes: Python hands the ones that are not UTF-8 over as lone
surrogates (U+DC80-U+DCFF), which a UTF-8 stream refuses to encode. Names and metadata may also
hold control characters, terminal escape sequences included, that would move the cursor,
recolour or clear the user's terminal. `shown` spells all of these out as backslash escapes, so a
message or table shows which bytes a name holds and the terminal never acts on them (a literal
backslash is left as it is, for the paths of Windows: `\\xff` in a name reads like the byte).

Also durations as people type them (`parse_duration`: 90s, 10m) and memory as they read it
(`bytes_text`: 3.2 GiB).
"""

from __future__ import annotations

import json
import math
import re
import types
import typing
from enum import Enum

from ddpm_cli.errors import ConfigError

# Bidirectional overrides and isolates reorder what follows them on screen ("Trojan Source");
# the line and paragraph separators break a one-line message.
_LAYOUT = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A)) | {0x2028, 0x2029}
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(ch: str) -> str:
    o = ord(ch)
    if 0xDC80 <= o <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{o - 0xDC00:02x}"
    if ch in _NAMED:
        return _NAMED[ch]
    if o < 0x20 or 0x7F <= o < 0xA0:
        return f"\\x{o:02x}"
    if 0xD800 <= o <= 0xDFFF or o in _LAYOUT:
        return f"\\u{o:04x}"
    return ch


def shown(text: str) -> str:
    """`text` with non-UTF-8 bytes, control characters, bidi overrides and line separators as
    escapes; printable text (any script) unchanged."""
    if text.isprintable():
        return text
    return "".join(_escape(ch) if not ch.isprintable() or ord(ch) in _LAYOUT else ch for ch in text)



def parse_json(text: str | bytes):
    """json.loads for text from files: JSON nested deeper than Python's parser can recurse
    (100,000 brackets) raises the ValueError that any bad JSON does (json.JSONDecodeError is one),
    not RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def json_fits(value, hint) -> bool:
    """Whether a JSON value has the type a config field's annotation names (a float field
    takes an integer; an enum field its value as a string)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(json_fits(value, h) for h in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if hint is int:
        return isinstance(value, int)
    if hint is float:
        return isinstance(value, (int, float))
    if hint is str or (isinstance(hint, type) and issubclass(hint, Enum)):
        return isinstance(value, str)
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(json_fits(v, args[0]) for v in value)
        pairs = zip(value, args, strict=False)
        return len(value) == len(args) and all(json_fits(v, a) for v, a in pairs)
    return True


def type_words(hint) -> str:
    """'an integer', 'a list of integers or null': an annotation in the words of a message."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(type_words(h) for h in args)
    if typing.get_origin(hint) is tuple:
        return "a list of " + ("integers" if args[0] is int else "strings")
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number"}
    return names.get(hint, "a string")


DURATION_UNITS = {"h": 3600, "m": 60, "s": 1}


def parse_duration(value) -> float:
    """A wall-clock duration in seconds: "90s", "10m", "2h", "1h30m", "1.5h" or a bare number
    of seconds ("600")."""
    text = str(value).strip().lower()
    if re.fullmatch(r"\d+(\.\d*)?", text):
        seconds = float(text)
    else:
        parts = re.findall(r"(\d+(?:\.\d*)?)\s*([hms])", text)
        rebuilt = "".join(n + u for n, u in parts)
        if not parts or rebuilt != text.replace(" ", "") or len({u for _, u in parts}) < len(parts):
            raise ConfigError(
                f"duration {value!r}: use a number with s, m or h, e.g. 90s, 10m, 2h or 1h30m"
            )
        seconds = sum(float(n) * DURATION_UNITS[u] for n, u in parts)
    if not 0 < seconds < math.inf:
        raise ConfigError(f"duration {value!r} must be more than zero")
    return seconds


def duration_text(seconds: float) -> str:
    """600 -> "10m", 5400 -> "1h30m", 90 -> "1m30s", 12.5 -> "12.5s"."""
    if seconds != int(seconds) or seconds < 60:
        return f"{seconds:g}s"
    s, parts = int(seconds), []
    for unit, size in (("h", 3600), ("m", 60), ("s", 1)):
        if s >= size:
            parts.append(f"{s // size}{unit}")
            s %= size
    return "".join(parts)


def count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 image', '3 images', '2 processes': a number with its noun, its `plural` if given, else
    the noun with -s (-es after s, x or sh)."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {plural or noun + ('es' if noun.endswith(('s', 'x', 'sh')) else 's')}"


def option_text(key: str, value) -> str:
    """An option as it is typed: --flip, --no-flip, --variance small, --t 100,500."""
    flag = f"--{key.replace('_', '-')}"
    if isinstance(value, bool):
        return flag if value else f"--no-{flag[2:]}"
    return f"{flag} {value_text(value)}"


def value_text(value) -> str:
    """An option's value as it is typed: none for None, an enum's value, a sequence's values
    with commas."""
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, (list, tuple)):
        return ",".join(map(value_text, value))
    return "none" if value is None else str(value)


def bytes_text(n: int | None) -> str:
    """An amount of memory as a person reads it: '3.2 GiB', '512 MiB', '1.5 MiB', '48 KiB',
    '12 bytes'; '?' if unknown."""
    if n is None:
        return "?"
    if round(n / 2**30, 1) >= 1:
        return f"{n / 2**30:.1f} GiB"
    if round(n / 2**20, 1) >= 9.95:
        return f"{n / 2**20:.0f} MiB"
    if round(n / 2**20, 1) >= 1:  # (not "1024 KiB")
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.0f} KiB" if n >= 2**10 else count(n, "byte")
