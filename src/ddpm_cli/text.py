"""Text that came from files, made safe to show and to parse.

File names on Linux may be any bytes: Python hands the ones that are not UTF-8 over as lone
surrogates (U+DC80-U+DCFF), which a UTF-8 stream refuses to encode. Names and metadata may also
hold control characters, terminal escape sequences included, that would move the cursor,
recolour or clear the user's terminal. `shown` spells all of these out as backslash escapes, so a
message or table shows which bytes a name holds and the terminal never acts on them (a literal
backslash is left as it is, for the paths of Windows: `\\xff` in a name reads like the byte).
"""

from __future__ import annotations

import json

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
