"""Stream records out of a LLaVA JSON array or a JSONL file without loading the whole file.

LLaVA's mix665k is a ~1 GB JSON array; `json.load` would hold it all (several GB of
Python objects). `iter_records` instead decodes one array element at a time with
`json.JSONDecoder.raw_decode` over a sliding text buffer, so memory stays at about one
read block plus one record. JSONL is read line by line. Each item carries its 0-based
index and the 1-based line where it starts, for reject reports.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from vrwkv_core.errors import DataError
from vrwkv_core.textio import bad_utf8_in

_BLOCK = 1 << 20
_MAX_RECORD_CHARS = 1 << 26  # give up on a "record" this long: the file is malformed
_WS = " \t\r\n"


@dataclass
class SourceItem:
    index: int
    line: int
    record: Any = None
    error: str | None = None
    """Set (and `record` None) when a JSONL line does not parse."""


def detect_format(path: str | os.PathLike) -> str:
    """'json' for a top-level array, 'jsonl' for one object per line."""
    with open(path, encoding="utf-8-sig") as f:
        while True:
            try:
                ch = f.read(1)
            except UnicodeDecodeError:
                raise bad_utf8_in(path) from None
            if not ch:
                raise DataError(f"{path}: the file is empty")
            if ch not in _WS:
                break
    if ch == "[":
        return "json"
    if ch == "{":
        return "jsonl"
    raise DataError(f"{path}: neither a JSON array nor JSONL (starts with {ch!r})")


def iter_records(path: str | os.PathLike) -> Iterator[SourceItem]:
    """Yield every record of a JSON array or JSONL file, in file order."""
    try:
        if detect_format(path) == "json":
            yield from _iter_json_array(path)
        else:
            yield from _iter_jsonl(path)
    except UnicodeDecodeError:
        raise bad_utf8_in(path) from None


def _iter_jsonl(path: str | os.PathLike) -> Iterator[SourceItem]:
    index = 0
    with open(path, encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield SourceItem(index, line_no, json.loads(line))
            except json.JSONDecodeError as e:
                yield SourceItem(index, line_no, None, f"line {line_no}: {e.msg}")
            index += 1


def _iter_json_array(path: str | os.PathLike) -> Iterator[SourceItem]:
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8-sig") as f:
        buf = f.read(_BLOCK)
        eof = not buf
        pos = 0
        line = 1  # line number at buf[pos]
        index = 0

        def fill() -> None:
            nonlocal buf, pos, eof
            more = f.read(_BLOCK)
            eof = not more
            buf = buf[pos:] + more
            pos = 0

        def skip_ws() -> None:
            nonlocal pos, line
            while True:
                while pos < len(buf) and buf[pos] in _WS:
                    if buf[pos] == "\n":
                        line += 1
                    pos += 1
                if pos < len(buf) or eof:
                    return
                fill()

        def fail(what: str) -> DataError:
            return DataError(f"{path}:{line}: malformed JSON array ({what})")

        skip_ws()
        pos += 1  # the "[" that detect_format saw
        skip_ws()
        if pos < len(buf) and buf[pos] == "]":
            return
        while True:
            skip_ws()
            while True:
                try:
                    obj, end = decoder.raw_decode(buf, pos)
                    # a number at the buffer's end may continue in the next block
                    if end == len(buf) and not eof:
                        raise ValueError
                    break
                except (json.JSONDecodeError, ValueError) as e:
                    if eof or len(buf) - pos > _MAX_RECORD_CHARS:
                        raise fail(getattr(e, "msg", "truncated")) from None
                    fill()
            yield SourceItem(index, line, obj)
            index += 1
            line += buf.count("\n", pos, end)
            pos = end
            skip_ws()
            if pos >= len(buf):
                raise fail("missing closing ']'")
            if buf[pos] == "]":
                return
            if buf[pos] != ",":
                raise fail(f"expected ',' or ']', found {buf[pos]!r}")
            pos += 1
