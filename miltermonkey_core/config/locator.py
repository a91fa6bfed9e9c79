"""Line numbers for keys and tables in TOML text, which tomllib does not give.

A configuration error without a line makes the admin search the file; with
it, ``check-config`` points at the mistake.  The scanner only runs on text
that already passed tomllib, so it follows strings, comments and multi-line
values, and answers ``None`` (never a wrong line) for anything it cannot place.
"""

from __future__ import annotations

import tomllib
from bisect import bisect_right
from collections.abc import Sequence
from typing import Any

TablePath = tuple[str | int, ...]


def _key_segments(raw: str) -> tuple[str, ...]:
    """Split a (possibly dotted, quoted) TOML key the way tomllib does."""
    try:
        node: Any = tomllib.loads(f"{raw} = 0")
    except tomllib.TOMLDecodeError:
        return (raw.strip(),)
    out: list[str] = []
    while isinstance(node, dict) and len(node) == 1:
        (key, node), = node.items()
        out.append(key)
    return tuple(out)


class TomlLocator:
    """Line numbers of keys and table headers in a TOML document.

    Tables are addressed as paths in which an array of tables is followed by
    its index: ``("miltermonkey",)``, ``("brain", 2)``, ``("brain", 0, "sub")``.
    The text must already have passed tomllib, so the scanner only has to
    follow strings, comments, and brackets that continue a value on the next
    line; anything it cannot place gives ``None``, never a wrong line.
    """

    def __init__(self, text: str) -> None:
        self._text = text
        self._starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n"]
        self._keys: dict[tuple[TablePath, str], int] = {}
        self._tables: dict[TablePath, int] = {}
        self._counts: dict[TablePath, int] = {}
        self._scan()

    def key_line(self, table: TablePath, key: str) -> int | None:
        """Line of ``key = ...`` in ``table`` (or of a header creating it)."""
        return self._keys.get((tuple(table), key))

    def table_line(self, table: TablePath) -> int | None:
        """Line of the ``[table]`` / ``[[table]]`` header."""
        return self._tables.get(tuple(table))

    # --- the scanner -------------------------------------------------------------

    def _line(self, pos: int) -> int:
        return bisect_right(self._starts, pos)

    def _resolve(self, segments: Sequence[str], array: bool) -> TablePath:
        path: TablePath = ()
        for i, seg in enumerate(segments):
            path = (*path, seg)
            if array and i == len(segments) - 1:
                n = self._counts.get(path, 0)
                self._counts[path] = n + 1
                path = (*path, n)
            elif path in self._counts:
                path = (*path, self._counts[path] - 1)
        return path

    def _note(self, table: TablePath, segments: Sequence[str], line: int) -> None:
        """Record a key and the implicit tables a dotted key or header creates."""
        path = table
        for seg in segments:
            self._keys.setdefault((path, seg), line)
            path = (*path, seg)
            if path in self._counts:
                path = (*path, self._counts[path] - 1)

    def _skip_string(self, pos: int) -> int:
        """Position just after the string starting at ``pos``."""
        text = self._text
        for quote in ('"""', "'''"):
            if text.startswith(quote, pos):
                i = pos + 3
                while True:
                    j = text.find(quote, i)
                    if j < 0:
                        return len(text)
                    if quote == '"""' and _escaped(text, j):
                        i = j + 1
                        continue
                    j += 3
                    while j < len(text) and text[j] == quote[0]:  # """a"""" ends on the last
                        j += 1
                    return j
        quote = text[pos]
        i = pos + 1
        while i < len(text):
            c = text[i]
            if c == "\\" and quote == '"':
                i += 2
                continue
            if c in (quote, "\n"):
                return i + 1
            i += 1
        return i

    def _skip_comment(self, pos: int) -> int:
        end = self._text.find("\n", pos)
        return len(self._text) if end < 0 else end

    def _until(self, pos: int, stop: str) -> int:
        """Position of the first ``stop`` char outside strings, from ``pos``."""
        text = self._text
        while pos < len(text) and text[pos] not in stop:
            pos = self._skip_string(pos) if text[pos] in "\"'" else pos + 1
        return pos

    def _skip_value(self, pos: int) -> int:
        text = self._text
        depth = 0
        while pos < len(text):
            c = text[pos]
            if c in "\"'":
                pos = self._skip_string(pos)
                continue
            if c == "#":
                pos = self._skip_comment(pos)
                continue
            if c in "[{":
                depth += 1
            elif c in "]}":
                depth -= 1
            elif c == "\n" and depth <= 0:
                return pos
            pos += 1
        return pos

    def _scan(self) -> None:
        text = self._text
        table: TablePath = ()
        pos = 0
        while pos < len(text):
            c = text[pos]
            if c in " \t\r\n":
                pos += 1
            elif c == "#":
                pos = self._skip_comment(pos)
            elif c == "[":
                array = text.startswith("[[", pos)
                start = pos + (2 if array else 1)
                end = self._until(start, "]")
                segments = _key_segments(text[start:end])
                line = self._line(pos)
                parent = self._resolve(segments[:-1], array=False)
                table = self._resolve(segments, array=array)
                self._tables.setdefault(table, line)
                self._note(parent, segments[-1:], line)
                pos = self._skip_comment(end)  # rest of the header line is ]] and a comment
            else:
                end = self._until(pos, "=\n")
                if end >= len(text) or text[end] != "=":
                    pos = end + 1
                    continue
                self._note(table, _key_segments(text[pos:end]), self._line(pos))
                pos = self._skip_value(end + 1)


def _escaped(text: str, pos: int) -> bool:
    """True if the character at ``pos`` is escaped by an odd run of backslashes."""
    n = 0
    while pos - n - 1 >= 0 and text[pos - n - 1] == "\\":
        n += 1
    return n % 2 == 1
