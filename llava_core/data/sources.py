"""Annotation sources: stream any input file once into arrow blocks of raw rows that Ray Data spreads over workers.

A 1 GB JSON array (`llava_v1_5_mix665k.json`) is read in chunks of a few MB and parsed element by element with the C
JSON decoder, never held whole in any process; JSONL is read line by line; hub-style parquet is read batch by batch,
and its inline image bytes (a binary column, `{"bytes", "path"}` structs, or lists of them) travel beside the row.
Every staged row keeps its index in its source file, so a reject names its row, and sampling (`first:N`, `last:N`,
`random:N`, `25%`) is a choice of indices made in the driver.

One odd row never fails a file: a line or array element that is not a plain JSON object (invalid UTF-8, a stray
byte-order mark, NaN or Infinity, nesting too deep, a syntax error, a list or a number, a lone UTF-16 surrogate) is
staged with its `defect`, counted as a row, and rejected by the row stage as `malformed_row` with a detail naming the
line (JSONL, from 1) or the element (JSON arrays, from 0: its row index) and byte offset. Only a file that cannot be
read at all (an I/O error, an array never closed, garbage where the array should be) raises `SourceError`, naming the
file and the byte offset.
"""
from __future__ import annotations

import codecs
import io
import itertools
import json
import math
import re
from typing import Iterator, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llava_core import storage
from llava_core.schema import SourceSettings, parse_sampling

STAGED_SCHEMA = pa.schema([
    ("source", pa.string()),  # the annotation file the row came from
    ("image_folder", pa.string()),  # where its relative image paths resolve
    ("index", pa.int64()),  # position of the row in its source file
    ("raw", pa.string()),  # the row's JSON text as read (a defective one with invalid bytes replaced, cut short)
    ("image_bytes", pa.list_(pa.binary())),  # inline images (hub parquet), aligned with the row's images; else []
    ("defect", pa.string()),  # why the row is not a JSON object (a `malformed_row` reject); null when it is one
])
IMAGE_COLUMNS = ("image", "images")
ROWS_PER_BLOCK = 128  # small blocks: the actor pool shares the work evenly down to the last rows
BYTES_PER_BLOCK = 32 << 20  # inline images make rows large: cut blocks by size too
CHUNK_BYTES = 4 << 20  # JSON arrays are decoded this much at a time
MAX_ROW_BYTES = 64 << 20  # no LLaVA row comes near; beyond it a file is not rows (and would fill memory)
MAX_DEPTH = 64  # a LLaVA row nests 4 deep; deeper rows are hostile or broken
DEFECT_TEXT_CHARS = 4096  # what a defective row keeps of its text: nothing reads it past the reject
HEAD_BYTES = 65536  # what is read to tell a JSON array from JSON lines
HEAD_LINES = 20  # JSON lines none of whose first lines is a row are not JSON lines
JSON_WHITESPACE = " \t\n\r"
BOM = "\ufeff"


class SourceError(ValueError):
    """An annotation file that cannot be read as rows at all; the message names the file and the byte offset."""


class SourceRow(NamedTuple):
    raw: str  # the row's JSON text
    inline: list  # inline image bytes (hub parquet), aligned with the row's images; else []
    defect: str | None = None  # why it is not a row (see the module docstring); None when it is one


def iter_rows(path: str) -> Iterator[SourceRow]:
    """Every row of a JSON array, JSONL or parquet file, local or s3://, in file order, defective ones included."""
    if path.endswith(".parquet"):
        yield from _parquet_rows(path)
        return
    fs, inner = storage.filesystem(path)
    with fs.open_input_stream(inner) as stream:
        head = _read(stream, HEAD_BYTES, path, 0)
    is_array = head.removeprefix(codecs.BOM_UTF8).lstrip(b" \t\n\r").startswith(b"[")
    if not is_array:
        _check_looks_like_lines(head, path)
    with fs.open_input_stream(inner) as stream:
        yield from ArrayReader(stream, path).rows() if is_array else _jsonl_rows(stream, path)


def _check_looks_like_lines(head: bytes, path: str) -> None:
    """A file that is not an array must be JSON lines: one odd line is a reject, but a file none of whose first lines
    is a row (a PNG, a pretty-printed object, CSV) is the wrong file, and says so instead of rejecting every line."""
    body = head.removeprefix(codecs.BOM_UTF8)
    lines = body.splitlines(keepends=True)  # bytes.splitlines splits at \r and \n only
    complete = lines if len(head) < HEAD_BYTES else lines[:-1]  # the last line of a full head may be cut off
    starts = [len(head) - len(body)]
    for line in complete:
        starts.append(starts[-1] + len(line))
    head_rows = [_line_row(line, number, start) for number, (line, start) in enumerate(zip(complete, starts), 1)
                 if line.strip(b" \t\r\n")]
    defects = [row.defect for row in head_rows[:HEAD_LINES]]
    if defects and all(defects):
        raise SourceError(f"{path}: neither a JSON array nor JSON lines: none of its first {len(defects)} lines is a "
                          f"JSON object; {defects[0]}")


def _read(stream, size: int, path: str, offset: int) -> bytes:
    try:
        return stream.read(size)
    except OSError as error:
        raise SourceError(f"{path}: reading failed at byte {offset}: {error}") from error


# ---- one row's JSON text -> the reason it is not a row (None when it is one) ----

class NotFinite(ValueError):
    pass


def _refuse_constant(name: str):
    raise NotFinite(f"{name} is not JSON (it would be a NaN or infinite number in the training data)")


def _finite_float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise NotFinite(f"the number {literal[:40]} is out of range (it would be infinite in the training data)")
    return value


# Python's and pandas' JSON writers emit NaN and Infinity; the C decoder calls these hooks only for such values.
STRICT_JSON = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # \ud800-\udfff: fine in pairs (emoji), not alone
ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # what `surrogateescape` decodes an invalid UTF-8 byte to
JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
              bool: "a boolean", type(None): "null"}


def text_defect(text: str) -> str | None:
    """Why one row's JSON text (a JSONL line) is not a row; None when it is one."""
    try:
        value = STRICT_JSON.decode(text)
    except (ValueError, RecursionError) as error:
        return parse_error_defect(error, text)
    return value_defect(value, text)


def parse_error_defect(error: Exception, text: str, start: int = 0) -> str:
    """The defect a parse error means; `start` is where the row's text begins in what was parsed."""
    if text.lstrip(JSON_WHITESPACE).startswith(BOM):
        return "a byte-order mark (U+FEFF) inside the file, before the row"
    if isinstance(error, RecursionError):
        return "nested too deeply to parse"
    if isinstance(error, NotFinite):
        return str(error)
    if isinstance(error, json.JSONDecodeError):
        return f"not JSON: {error.msg} at character {error.pos - start} of the row"
    return f"unreadable JSON: {error}"  # e.g. an integer of more than 4300 digits


def value_defect(value, text: str) -> str | None:
    """Why a parsed row is not one; its text keeps the checks cheap (bracket and escape counts at C speed)."""
    if not isinstance(value, dict):
        return f"a row must be a JSON object, not {JSON_TYPES.get(type(value), type(value).__name__)}"
    if text.count("{") + text.count("[") > MAX_DEPTH and _depth(value) > MAX_DEPTH:
        return f"nested deeper than {MAX_DEPTH} levels"
    if ("\\ud" in text or "\\uD" in text) and SURROGATE_ESCAPE.search(text) and not _encodable(value):
        # arrow, the tokenizer and every UTF-8 writer refuse a lone surrogate; which character was meant is unknown
        return "a lone UTF-16 surrogate escape (such as \\ud800) in a string: not Unicode text"
    return None


def _depth(value) -> int:
    """Nesting depth, level by level: no recursion, so a deep row cannot exhaust the stack."""
    level, depth = [value], 0
    while level and depth <= MAX_DEPTH:
        depth += 1
        level = [c for v in level if isinstance(v, (dict, list)) for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def _encodable(value) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def readable(text: str) -> str:
    """A defective row's text as arrow takes it: bytes that are not UTF-8 (escaped on decoding) replaced, cut
    short."""
    return text[:DEFECT_TEXT_CHARS].encode("utf-8", "surrogateescape").decode("utf-8", "replace")


# ---- JSONL ----

def _jsonl_rows(stream, path: str) -> Iterator[SourceRow]:
    """One row per non-blank line; a line's defect stays with that line."""
    lines = io.BufferedReader(stream, buffer_size=1 << 20)
    offset = 0
    for number in itertools.count(1):
        start = offset
        line = _read_line(lines, path, offset)
        if not line:
            return
        offset += len(line)
        if len(line) > MAX_ROW_BYTES:
            offset += _skip_rest_of_line(lines, path, offset, line)
            yield SourceRow(readable(line[:DEFECT_TEXT_CHARS].decode("utf-8", "replace")), [],
                            f"line {number} (byte {start}): longer than {MAX_ROW_BYTES >> 20} MB")
            continue
        if number == 1 and line.startswith(codecs.BOM_UTF8):  # a BOM opens the file: not part of the row
            line, start = line[len(codecs.BOM_UTF8):], start + len(codecs.BOM_UTF8)
        if line.strip(b" \t\r\n"):
            yield _line_row(line, number, start)


def _read_line(lines, path: str, offset: int) -> bytes:
    try:
        return lines.readline(MAX_ROW_BYTES + 1)
    except OSError as error:
        raise SourceError(f"{path}: reading failed at byte {offset}: {error}") from error


def _skip_rest_of_line(lines, path: str, offset: int, line: bytes) -> int:
    skipped = 0
    while not line.endswith(b"\n"):
        line = _read_line(lines, path, offset + skipped)
        if not line:
            break
        skipped += len(line)
    return skipped


def _line_row(line: bytes, number: int, start: int) -> SourceRow:
    where = f"line {number} (byte {start})"
    try:
        text = line.decode("utf-8").strip(JSON_WHITESPACE)
    except UnicodeDecodeError as error:
        return SourceRow(readable(line.decode("utf-8", "replace").strip(JSON_WHITESPACE)), [],
                         f"{where}: invalid UTF-8 at byte {start + error.start}")
    defect = text_defect(text)
    if defect is None:
        return SourceRow(text, [])
    if not line.endswith(b"\n"):
        defect += " (the file ends inside this line: cut off?)"
    return SourceRow(readable(text), [], f"{where}: {defect}")


# ---- JSON arrays ----

WHITESPACE = re.compile(r"[ \t\n\r]*")
PLAIN = re.compile(r'[^"\[\]{},]*')  # what element_end can skip: no string, bracket or comma starts in it
STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)


class ArrayReader:
    """The elements of one JSON array, streamed from a byte stream a chunk at a time.

    Each element is parsed where it starts with the C decoder (`raw_decode`) and staged as its own text. One that
    does not parse is skipped to the next top-level `,` or `]` by `element_end` and staged with its defect; an
    element cut off by the end of the buffer is parsed again once the next chunk is in. Bytes that are not UTF-8
    decode to lone surrogates (`surrogateescape`), so the element that holds them, and only that one, is rejected.
    """

    def __init__(self, stream, path: str, chunk_bytes: int = CHUNK_BYTES):
        self.stream, self.path, self.chunk_bytes = stream, path, chunk_bytes
        self.pending = b""  # the start of a character cut by the end of the last chunk
        self.text = ""  # decoded text from byte `text_byte` of the file on
        self.text_byte = 0
        self.pos = 0  # the next character of `text` to read
        self.mark = (0, 0)  # a (character index in `text`, byte offset in the file) pair: offsets count on from it
        self.bytes_read = 0
        self.eof = False
        self.invalid_bytes = False  # whether `text` holds any bytes that are not UTF-8 (then each element is searched)

    def rows(self) -> Iterator[SourceRow]:
        self._open_array()
        number = 0
        while not self._at_closing_bracket():
            row, closed = self._element(number)
            yield row
            number += 1
            if closed:
                break
            self._drop_consumed()
        self._check_nothing_follows()

    def _open_array(self) -> None:
        self._skip_whitespace()
        if self.text.startswith(BOM):  # a BOM opens the file: not part of the data
            self.pos = 1
        if not self._skip_whitespace() or self.text[self.pos] != "[":
            raise self._fatal(self.pos, "expected the [ that opens a JSON array of rows")
        self.pos += 1

    def _at_closing_bracket(self) -> bool:
        """Consume a `]` that closes the array here (an empty array, or a trailing comma before it)."""
        if not self._skip_whitespace():
            raise self._fatal(self.pos, "the array is never closed: the file ends after a comma or the [")
        if self.text[self.pos] == "]":
            self.pos += 1
            return True
        return False

    def _element(self, number: int) -> tuple[SourceRow, bool]:
        """The element starting at `pos` as a row, and whether the array closes after it."""
        start = self.pos
        while True:
            value, end, delimiter, error = self._parse(start)
            if delimiter is not None:
                break
            if len(self.text) - start > MAX_ROW_BYTES:
                raise self._fatal(start, f"element {number} is longer than {MAX_ROW_BYTES >> 20} MB: not a row")
            if not self._read_more(len(self.text) - start):  # a long element: read as much again, not a chunk more
                raise self._fatal(start, f"the array is never closed: element {number} runs to the end of the file")
        text = self.text[start:end].rstrip(JSON_WHITESPACE)
        self.pos = delimiter + 1
        defect = self._defect(start, text, value, error)
        if defect is None:
            return SourceRow(text, []), self.text[delimiter] == "]"
        return SourceRow(readable(text), [], f"element {number} (byte {self._byte_at(start)}): {defect}"), \
            self.text[delimiter] == "]"

    def _parse(self, start: int):
        """(value, end of its text, index of the `,` or `]` after it, error); the index is None until the buffer
        holds the whole element."""
        try:
            value, end = STRICT_JSON.raw_decode(self.text, start)
        except (ValueError, RecursionError) as error:
            delimiter = element_end(self.text, start)
            return None, delimiter, delimiter, error
        delimiter = WHITESPACE.match(self.text, end).end()
        if delimiter == len(self.text):  # `12` may be the start of `123`: wait for what follows
            return value, end, None, None
        if self.text[delimiter] in ",]":
            return value, end, delimiter, None
        delimiter = element_end(self.text, end)  # a value and more (a missing comma): one defective element
        return None, delimiter, delimiter, json.JSONDecodeError("expected , or ] after the row", self.text, end)

    def _defect(self, start: int, text: str, value, error: Exception | None) -> str | None:
        invalid = self.invalid_bytes and ESCAPED_BYTE.search(text)
        if invalid:
            self._byte_at(start)  # offsets count forwards from the last one asked for
            return f"invalid UTF-8 at byte {self._byte_at(start + invalid.start())}"
        if error is not None:
            return parse_error_defect(error, text, start)
        return value_defect(value, text)

    def _skip_whitespace(self) -> bool:
        """Move past whitespace, reading on as needed; False at the end of the file."""
        while True:
            self.pos = WHITESPACE.match(self.text, self.pos).end()
            if self.pos < len(self.text) or not self._read_more():
                return self.pos < len(self.text)

    def _read_more(self, at_least: int = 0) -> bool:
        """Decode the next chunk (or `at_least` bytes, so an element spanning chunks is parsed O(log n) times)."""
        if self.eof:
            return False
        data = _read(self.stream, max(self.chunk_bytes, at_least), self.path, self.bytes_read)
        self.bytes_read += len(data)
        self.eof = not data
        added = self._decode(self.pending + data)
        self.text += added
        return bool(data or added)

    def _decode(self, data: bytes) -> str:
        """Strict UTF-8 first (C speed, and almost every chunk is clean); only a chunk with bad bytes is decoded again
        with them escaped, to be found element by element."""
        try:
            text, used = codecs.utf_8_decode(data, "strict", self.eof)
        except UnicodeDecodeError:
            text, used = codecs.utf_8_decode(data, "surrogateescape", self.eof)
            self.invalid_bytes = True
        self.pending = data[used:]
        return text

    def _drop_consumed(self) -> None:
        """Forget the text already read, a chunk at a time: memory stays a few chunks, whatever the file's size."""
        if self.pos > self.chunk_bytes:
            self.text_byte = self._byte_at(self.pos)
            self.text, self.pos, self.mark = self.text[self.pos:], 0, (0, self.text_byte)
            self.invalid_bytes = self.invalid_bytes and ESCAPED_BYTE.search(self.text) is not None

    def _byte_at(self, index: int) -> int:
        """The file's byte offset of `text[index]`, counted from the last one asked for (or the buffer's start)."""
        char, byte = self.mark if index >= self.mark[0] else (0, self.text_byte)
        piece = self.text[char:index]
        byte += len(piece) if piece.isascii() else len(piece.encode("utf-8", "surrogateescape"))
        self.mark = (index, byte)
        return byte

    def _check_nothing_follows(self) -> None:
        if self._skip_whitespace():
            raise self._fatal(self.pos, "data after the ] that closes the array")

    def _fatal(self, index: int, message: str) -> SourceError:
        return SourceError(f"{self.path}: {message} (byte {self._byte_at(index)})")


def element_end(text: str, pos: int) -> int | None:
    """The index of the top-level `,` or `]` that ends the array element starting at `pos`, past strings and
    brackets; None when `text` ends first. Runs of plain characters and whole strings are skipped by regex."""
    depth = 0
    while True:
        pos = PLAIN.match(text, pos).end()
        if pos == len(text):
            return None
        char = text[pos]
        if char == '"':
            string = STRING.match(text, pos)
            if string is None:
                return None
            pos = string.end()
            continue
        if char in "[{":
            depth += 1
        elif depth == 0 and char in ",]":
            return pos
        elif char in "]}":
            depth = max(depth - 1, 0)  # a stray closing bracket at the top level is part of the garbage
        pos += 1


def _parquet_rows(path: str) -> Iterator[SourceRow]:
    fs, inner = storage.filesystem(path)
    for batch in pq.ParquetFile(inner, filesystem=fs).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            yield SourceRow(*_split_inline_images(row))


def _split_inline_images(row: dict) -> tuple[str, list]:
    """Hub layout -> (row JSON naming its images, their bytes); an image given only by path keeps its path."""
    column = next((c for c in IMAGE_COLUMNS if row.get(c) is not None), None)
    if column is None:
        return json.dumps(row, ensure_ascii=False, default=str), []
    value = row.pop(column)
    entries = value if isinstance(value, list) else [value]
    names, inline = [], []
    for i, entry in enumerate(entries):
        data, name = entry, None
        if isinstance(entry, dict):
            data, name = entry.get("bytes"), entry.get("path")
        if isinstance(data, str):  # a plain path
            data, name = None, data
        names.append(name or f"inline-{i}")
        inline.append(data)
    row["image"] = names
    return json.dumps(row, ensure_ascii=False, default=str), inline if any(d is not None for d in inline) else []


def staged_blocks(source: SourceSettings, rows_per_block: int = ROWS_PER_BLOCK) -> Iterator[pa.Table]:
    """The source's rows as arrow blocks of STAGED_SCHEMA, streamed: one block in memory at a time."""
    buffer, size, count = [], 0, 0

    def block():
        return pa.table([[source.path] * len(buffer), [source.image_folder] * len(buffer), *zip(*buffer)],
                        schema=STAGED_SCHEMA)

    for raw, inline, defect in iter_rows(source.path):
        buffer.append((count, raw, inline, defect))
        size += len(raw) + sum(len(d or b"") for d in inline)
        count += 1
        if len(buffer) >= rows_per_block or size >= BYTES_PER_BLOCK:
            yield block()
            buffer, size = [], 0
    if buffer:
        yield block()


def select_indices(spec: str, total: int, seed: int) -> np.ndarray:
    """Sorted row indices a sampling strategy keeps out of `total` (file order is kept, as LLaVA-NeXT does for
    first/last; random picks are sorted back into file order)."""
    parsed = parse_sampling(spec)
    if parsed is None:
        return np.arange(total)
    kind, number, percent = parsed
    n = min(total, math.ceil(number * total / 100) if percent else number)
    if kind == "first":
        return np.arange(n)
    if kind == "last":
        return np.arange(total - n, total)
    return np.sort(np.random.default_rng(seed).choice(total, size=n, replace=False))


def keep_indices(block: pa.Table, selected: np.ndarray) -> pa.Table:
    """The rows of a staged block whose index the sampling chose."""
    return block.filter(pa.array(np.isin(block.column("index").to_numpy(), selected)))
