"""File names in what kdpipe writes for people and programs: one escaping for every TSV field and message.

A file name may hold any byte but '/' and NUL: a tab or a newline would split a TSV row or an error line, and
bytes that are not UTF-8 (Python hands them over as surrogate escapes) make a file that UTF-8 readers refuse.
`escape_name` writes each such character as a backslash escape: \\\\, \\t, \\n, \\r, \\xNN for another ASCII
control character or a byte that is not UTF-8, \\uXXXX for another unprintable code point (U+0085, U+2028...).
The result is one line of printable UTF-8 without tabs, and `unescape_name` gives the original name back exactly.

JSON needs no help: every JSON file kdpipe writes is ASCII (json.dumps' ensure_ascii): control characters are
escaped, and a byte that is not UTF-8 appears as its surrogate escape \\udcNN, which Python reads back as the
same name (and `os.fsencode` as the same bytes).
"""
from __future__ import annotations

import re
from typing import Iterable

from pipeline.core.errors import ShardFormatError

# What a name from a manifest (a shard, a split) may be: it reaches file systems, URLs and `pipe:` shell commands.
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
SAFE_NAME_RULE = "letters, digits, '.', '_' and '-', not first '.' or '-', at most 255"

_SHORT = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNSHORT = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.DOTALL)


def _escape_char(ch: str) -> str:
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    if code < 0x20 or code == 0x7F:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    if ch.isprintable() or ch == " ":
        return ch
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def escape_name(name: str) -> str:
    """`name` as one printable line of valid UTF-8 without tabs (see the module docstring); reversible."""
    if name.isprintable() and "\\" not in name and "\t" not in name:
        return name  # the common case, unchanged (isprintable is False for tabs, newlines and surrogates)
    return "".join(map(_escape_char, name))


def unescape_name(text: str) -> str:
    """The name `escape_name` was given (bytes that are not UTF-8 come back as surrogate escapes)."""
    if "\\" not in text:
        return text
    out = bytearray()
    pos = 0
    for m in _ESCAPE.finditer(text):
        out += text[pos:m.start()].encode("utf-8", "surrogatepass")
        code = m.group(1)
        if code[0] == "x":
            out.append(int(code[1:], 16))
        elif code[0] in "uU" and len(code) > 1:
            out += chr(int(code[1:], 16)).encode("utf-8", "surrogatepass")
        else:
            out += _UNSHORT.get(code, code).encode("utf-8")
        pos = m.end()
    out += text[pos:].encode("utf-8", "surrogatepass")
    return out.decode("utf-8", "surrogateescape")


def tsv_row(*fields: object) -> str:
    """One TSV row (with its newline): each field as str, escaped by `escape_name`."""
    return "\t".join(escape_name(str(f)) for f in fields) + "\n"


def tsv_text(header: Iterable[str], rows: Iterable[Iterable[object]]) -> str:
    """A whole TSV file: the header row, then one row per item."""
    return tsv_row(*header) + "".join(tsv_row(*row) for row in rows)


def read_tsv(text: str) -> list[list[str]]:
    """The rows of a TSV `tsv_text` wrote (header included), fields unescaped."""
    return [[unescape_name(f) for f in line.split("\t")] for line in text.split("\n") if line]


def check_shard_name(name: object, source: str) -> str:
    """A shard name from a manifest must be a plain file name in the shard directory, of letters, digits, '.',
    '_' and '-' only, not starting with '.' or '-'. A manifest is untrusted input (a bucket someone else
    writes): its names must neither make a reader open or hash files elsewhere (no '/', no '..') nor mean
    anything to a shell when put into a `pipe:` command (no '$', quotes, backticks, spaces...). Pure: every
    reader checks with it, local and remote (`check_manifest`, `remote.member_url`); `shard_file` adds the
    symlink check for local ones."""
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        raise ShardFormatError(f"{source}: shard name {name!r} is not a plain file name inside the shard "
                               f"directory ({SAFE_NAME_RULE} characters); refused")
    return name
