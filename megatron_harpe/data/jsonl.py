"""Reading jsonl corpora (plain, gzip or zstd; one or many files) and accounting for bad lines.

Every stage of `tools/prepare_data.py` reads its input through here:

    files = expand_inputs(["data/train/", "extra.jsonl.zst"])     # directories, globs, files
    for chunk in read_line_chunks(files): ...                   # raw lines with file and line
    record = parse_line(raw, fields, location)                     # -> Document or a Problem

Bad input (malformed JSON, missing or non-string fields, empty documents, non-UTF-8 bytes) is a
`Problem` carrying the file and line; `ProblemLog` counts problems per kind, prints the first
few and, with `strict=True`, turns the first one into a `ValueError`. Outputs are written with
`atomic_output`, which renames a temporary file into place only when writing succeeded.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import glob
import gzip
import io
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Iterator

import zstandard

from megatron_harpe.files import atomic_path

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.zstd")
"""What a directory scan picks up (a `.json` file is read only when named explicitly)."""
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """Where the text and the source label live in a record; dotted paths reach nested keys
    (SlimPajama: `source_field="meta.redpajama_set_name"`). `source_field=None`: no sources."""

    text_field: str = "text"
    source_field: str | None = "source"
    source_optional: bool = False
    """A document without the source field is kept with no source (upsampling modes that
    ignore sources: global, none), instead of being skipped as bad input."""


@dataclasses.dataclass(frozen=True)
class Document:
    text: str
    source: str | None
    line_number: int


@dataclasses.dataclass(frozen=True)
class Problem:
    kind: str
    path: str
    line_number: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line_number}: {self.kind}: {self.message}"


PROBLEM_KINDS = (
    "malformed_json",
    "missing_field",
    "empty_document",
    "invalid_utf8",
    "token_out_of_vocabulary",
)


UNREADABLE_KINDS = ("malformed_json", "missing_field", "invalid_utf8")
"""Problems that say the file is not what the command expects (encoding, format, field names)."""


class ProblemLog:
    """Counts skipped lines per kind (and per file); prints the first `max_printed`; strict mode
    raises. `check_files` fails a file whose lines mostly could not be used (a UTF-16 file, a
    file that is not JSON lines): skipping nearly all of a file is never what was meant."""

    def __init__(self, strict: bool = False, max_printed: int = 20, stream: IO[str] | None = None) -> None:
        self.strict = strict
        self.max_printed = max_printed
        self.stream = stream if stream is not None else sys.stderr
        self.counts: dict[str, int] = {kind: 0 for kind in PROBLEM_KINDS}
        self.examples: list[str] = []
        self.good_lines: dict[str, int] = collections.Counter()
        self.bad_lines: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.first_problem: dict[str, Problem] = {}

    def add(self, problem: Problem) -> None:
        if self.strict:
            raise ValueError(
                f"{problem} (input rejected because of --strict; fix the line or drop --strict to skip it)"
            )
        self.counts[problem.kind] = self.counts.get(problem.kind, 0) + 1
        self.bad_lines[problem.path][problem.kind] += 1
        self.first_problem.setdefault(problem.path, problem)
        if len(self.examples) < self.max_printed:
            self.examples.append(str(problem))
            print(f"skipped {problem}", file=self.stream)

    def add_documents(self, path: str, count: int) -> None:
        """`count` lines of `path` gave documents."""
        self.good_lines[path] += count

    def merge(self, other: "ProblemLog") -> None:
        for kind, count in other.counts.items():
            self.counts[kind] = self.counts.get(kind, 0) + count
        self.examples.extend(other.examples[: max(0, self.max_printed - len(self.examples))])
        self.good_lines.update(other.good_lines)
        for path, kinds in other.bad_lines.items():
            self.bad_lines[path].update(kinds)
        for path, problem in other.first_problem.items():
            self.first_problem.setdefault(path, problem)

    def check_files(self) -> None:
        """Raise ValueError naming the first file more than half of whose lines could not be read
        as documents (UNREADABLE_KINDS; empty or out-of-vocabulary documents are the content's)."""
        for path, kinds in self.bad_lines.items():
            bad = sum(count for kind, count in kinds.items() if kind in UNREADABLE_KINDS)
            good = self.good_lines.get(path, 0) + sum(kinds.values()) - bad
            if bad > good:
                reasons = ", ".join(f"{kind} {count}" for kind, count in kinds.most_common())
                raise ValueError(
                    f"{path}: {bad} of {bad + good} lines could not be used ({reasons}; first: line "
                    f"{self.first_problem[path].line_number}: {self.first_problem[path].message}){_hint(path, kinds)}: "
                    "fix the file or leave it out (nothing was written)"
                )

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> dict[str, Any]:
        return {"skipped_total": self.total, "skipped_by_kind": dict(self.counts), "examples": list(self.examples)}


def _hint(path: str, kinds: collections.Counter) -> str:
    """Why a file's lines may all fail: a byte-order mark or NUL bytes at its start (UTF-16/32),
    or field names that are not the file's."""
    if kinds.most_common(1)[0][0] == "missing_field":
        return "; check --text-key / --source-key"
    try:
        with open_binary(Path(path)) as stream:
            head = stream.read(4096)
    except (OSError, EOFError, zstandard.ZstdError):
        return ""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head:
        return "; it looks like UTF-16 (or another wide encoding): convert it to UTF-8, e.g. iconv -f UTF-16 -t UTF-8"
    return ""


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files named by `inputs`: files as given, directories searched recursively for jsonl
    files (sorted), glob patterns expanded (sorted). Raises ValueError if nothing matches."""
    files: list[Path] = []
    for entry in inputs:
        entry_path = Path(entry)
        if entry_path.is_dir():
            found = sorted(p for p in entry_path.rglob("*") if p.is_file() and p.name.endswith(JSONL_SUFFIXES))
            if not found:
                raise ValueError(f"input directory {entry_path} holds no {'/'.join(JSONL_SUFFIXES)} files")
            files.extend(found)
        elif entry_path.is_file():
            files.append(entry_path)
        elif glob.has_magic(str(entry)):
            matched = sorted(Path(p) for p in glob.glob(str(entry), recursive=True) if Path(p).is_file())
            if not matched:
                raise ValueError(f"input pattern {entry} matches no files")
            files.extend(matched)
        else:
            raise ValueError(f"input {entry} does not exist")
    if not files:
        raise ValueError("no input files given")
    return files


def open_binary(path: Path) -> IO[bytes]:
    """Open a plain, gzip or zstd file for binary reading (format from its magic bytes)."""
    raw = open(path, "rb")
    magic = raw.read(4)
    raw.seek(0)
    if magic.startswith(_GZIP_MAGIC):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if magic.startswith(_ZSTD_MAGIC):
        return io.BufferedReader(_CheckedZstdReader(raw))
    return raw


class _CheckedZstdReader(io.RawIOBase):
    """Decompresses zstd frames one after another and, like gzip, raises EOFError when the
    input ends inside a frame (zstandard's stream_reader returns a short stream silently)."""

    def __init__(self, raw: IO[bytes], chunk_bytes: int = 1 << 20) -> None:
        self._raw = raw
        self._chunk_bytes = chunk_bytes
        self._decompressor = zstandard.ZstdDecompressor()
        self._frame = self._decompressor.decompressobj()
        self._in_frame = False
        self._pending = memoryview(b"")
        self._position = 0  # in _pending: slicing a view instead of the bytes copies nothing
        self._compressed_offset = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self._position == len(self._pending):
            compressed = self._raw.read(self._chunk_bytes)
            if not compressed:
                if self._in_frame:
                    raise EOFError(
                        f"the compressed stream ends inside a zstd frame after {self._compressed_offset} bytes "
                        "(truncated file)"
                    )
                return 0
            self._compressed_offset += len(compressed)
            self._pending, self._position = memoryview(self._decompress(compressed)), 0
        size = min(len(buffer), len(self._pending) - self._position)
        buffer[:size] = self._pending[self._position : self._position + size]
        self._position += size
        return size

    def _decompress(self, compressed: bytes) -> bytes:
        output = []
        while compressed:
            self._in_frame = True
            output.append(self._frame.decompress(compressed))
            if not self._frame.eof:
                break
            self._in_frame = False
            compressed = self._frame.unused_data
            self._frame = self._decompressor.decompressobj()
        return b"".join(output)

    def close(self) -> None:
        self._raw.close()
        super().close()


@dataclasses.dataclass
class LineChunk:
    """Consecutive raw lines of one file, the unit of work sent to tokenizer processes."""

    file_index: int
    path: str
    first_line_number: int
    lines: list[bytes]


def _file_position(stream: IO[bytes]) -> int:
    """How far into the file on disk a (possibly decompressing) stream from open_binary has read."""
    raw = getattr(stream, "fileobj", None) or getattr(getattr(stream, "raw", None), "_raw", None) or stream
    try:
        return raw.tell()
    except (OSError, ValueError):
        return 0


def read_line_chunks(
    files: list[Path], chunk_lines: int = 4096, chunk_bytes: int = 1 << 20, on_bytes: Callable[[int], Any] | None = None
) -> Iterator[LineChunk]:
    """Raw lines of `files` in order, grouped into chunks of at most `chunk_lines` lines or
    about `chunk_bytes` bytes (the bound that usually applies: short documents still make
    chunks of useful size, fewer hand-offs to the workers). Line numbers start at 1.
    `on_bytes(n)` hears of every n bytes of the files on disk read (compressed bytes for a
    compressed file), for a progress bar over their total size."""
    for file_index, path in enumerate(files):
        try:
            stream = open_binary(path)
        except OSError as error:
            raise ValueError(f"cannot open input {path}: {error}") from error
        with stream:
            lines: list[bytes] = []
            size = 0
            first = 1
            line_number = 0
            reported = 0
            try:
                for line_number, line in enumerate(stream, start=1):
                    if not lines:
                        first = line_number
                    lines.append(line)
                    size += len(line)
                    if len(lines) >= chunk_lines or size >= chunk_bytes:
                        if on_bytes is not None:
                            position = _file_position(stream)
                            on_bytes(position - reported)
                            reported = position
                        yield LineChunk(file_index, str(path), first, lines)
                        lines, size = [], 0
            except (OSError, EOFError, zstandard.ZstdError) as error:
                raise ValueError(
                    f"cannot read {path} after line {line_number} (corrupt or truncated compressed file: {error}); "
                    "re-create or re-download it"
                ) from error
            if on_bytes is not None:
                on_bytes(max(0, os.path.getsize(path) - reported))
            if lines:
                yield LineChunk(file_index, str(path), first, lines)


def _lookup(record: Any, dotted: str) -> Any:
    value = record
    for key in dotted.split("."):
        if not isinstance(value, dict) or key not in value:
            raise KeyError(dotted)
        value = value[key]
    return value


def parse_line(raw: bytes, fields: FieldSpec, path: str, line_number: int) -> Document | Problem | None:
    """One jsonl line -> Document, or Problem for bad input, or None for a blank line."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return Problem("invalid_utf8", path, line_number, f"bytes are not UTF-8 ({error.reason} at byte {error.start})")
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return Problem("malformed_json", path, line_number, f"{error.msg} at column {error.colno}")
    if not isinstance(record, dict):
        return Problem("malformed_json", path, line_number, f"expected a JSON object, got {type(record).__name__}")
    try:
        text = _lookup(record, fields.text_field)
    except KeyError:
        return Problem("missing_field", path, line_number, f"no text field {fields.text_field!r}")
    if not isinstance(text, str):
        return Problem("missing_field", path, line_number, f"text field {fields.text_field!r} is not a string")
    source: str | None = None
    if fields.source_field is not None:
        try:
            source = _lookup(record, fields.source_field)
        except KeyError:
            if not fields.source_optional:
                return Problem("missing_field", path, line_number, f"no source field {fields.source_field!r}")
        else:
            if not isinstance(source, str) or not source:
                return Problem(
                    "missing_field",
                    path,
                    line_number,
                    f"source field {fields.source_field!r} is not a non-empty string",
                )
    if not text.strip():
        return Problem("empty_document", path, line_number, "text is empty or whitespace only")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # json "\ud800"-style escapes decode to lone surrogates
        return Problem("invalid_utf8", path, line_number, "text holds unpaired surrogate escapes (not valid Unicode)")
    return Document(text, source, line_number)


@contextlib.contextmanager
def atomic_output(path: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to `path`; rename it to `path` if the block succeeds,
    delete it if the block raises. Refuses to replace an existing file unless `overwrite`."""
    with atomic_path(path, overwrite=overwrite) as temporary:
        yield temporary


def open_compressed_writer(path: Path, final_name: str) -> IO[bytes]:
    """A binary writer on `path`, compressing by the suffix of `final_name` (.gz, .zst/.zstd)."""
    name = final_name
    if name.endswith(".gz"):
        return gzip.open(path, "wb", compresslevel=6)  # type: ignore[return-value]
    if name.endswith((".zst", ".zstd")):
        return zstandard.ZstdCompressor(level=3).stream_writer(open(path, "wb"), closefd=True)  # type: ignore[return-value]
    return open(path, "wb")
