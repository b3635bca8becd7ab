"""Reading raw corpora: text (documents separated by an end-of-document marker, or one per line) and JSON lines,
plain or compressed (.gz, .bz2, .xz), and Parquet (a text column), from files or directories.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import sys
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_moe.config import ConfigError
from megatron_moe.data.tokenizers import EOD_TEXT


TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


COMPRESSED = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}
LINES_WARNING = 100  # a text file of this many lines read as one document gets a warning


@dataclass
class Document:
    text: str
    where: str  # "file:line" for error messages


class ReadMeter:
    """How far reading has got through the input files, in bytes on disk (compressed bytes for compressed files),
    so that a progress display has a known total."""

    def __init__(self, files: list[Path]) -> None:
        self.total = sum(f.stat().st_size for f in files)
        self.done = 0
        self._raw: Any = None

    def position(self) -> int:
        try:
            return self.done + (self._raw.tell() if self._raw is not None else 0)
        except (OSError, ValueError):  # the file was closed under us
            return self.done


def _base_suffix(path: Path) -> str:
    """Suffix ignoring a compression suffix: corpus.jsonl.xz -> .jsonl."""
    name = path.name.lower()
    for comp in COMPRESSED:
        if name.endswith(comp):
            name = name[: -len(comp)]
    return Path(name).suffix


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Input files: files as given, directories expanded to their text/JSONL files (sorted, recursive)."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(
                f for f in p.rglob("*")
                if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)
                and _base_suffix(f) in TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES
            )
            if not found:
                raise ConfigError(f"input directory {str(p)!r} has no .txt or .jsonl files (optionally .xz/.gz/.bz2)")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"input {str(p)!r} does not exist")
    if not files:
        raise ConfigError("no input files given")
    return files


def _lines(path: Path, meter: ReadMeter | None = None) -> Iterator[tuple[int, str]]:
    """(1-based line number, decoded line) with strict UTF-8 and one-line errors."""
    try:
        with open(path, "rb") as disk:
            opener = COMPRESSED.get(path.suffix.lower())
            if meter is not None:
                meter._raw = disk
            with opener(disk) if opener else disk as f:
                for n, raw in enumerate(f, 1):
                    try:
                        yield n, raw.decode("utf-8")
                    except UnicodeDecodeError as exc:
                        raise ConfigError(f"{path}:{n}: not UTF-8 text (byte {exc.start} of the line)") from None
    except (lzma.LZMAError, zlib.error, OSError, EOFError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    finally:
        if meter is not None and meter._raw is not None:
            meter.done += path.stat().st_size
            meter._raw = None


def _parquet_documents(path: Path, text_key: str, meter: ReadMeter | None) -> Iterator[Document]:
    """Rows of a Parquet file's string column `text_key`, one document each (pyarrow, an optional package)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: reading Parquet needs pyarrow (pip install 'megatron-moe[parquet]')") from None
    try:
        f = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises its own error types for a file that is not Parquet
        raise ConfigError(f"{path}: cannot read as Parquet ({str(exc).splitlines()[0]})") from None
    if text_key not in f.schema_arrow.names:
        raise ConfigError(f"{path}: Parquet file has no column {text_key!r} (columns: {', '.join(f.schema_arrow.names)})")
    size, row = path.stat().st_size, 0
    for batch in f.iter_batches(columns=[text_key], batch_size=1024):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is not None and not isinstance(value, str):
                raise ConfigError(f"{path}: row {row}: column {text_key!r} is not text")
            yield Document(value or "", f"{path}:row {row}")
        if meter is not None:
            meter.done += size * len(batch) // max(f.metadata.num_rows, 1)


def iter_documents(path: Path, separator: str = EOD_TEXT, text_key: str = "text",
                   line_documents: bool = False, meter: ReadMeter | None = None) -> Iterator[Document]:
    """Documents of one file: Parquet (column `text_key`), JSON lines (field `text_key`), plain text with one
    document per line (`line_documents`), or plain text split on `separator`.

    Plain-text documents are stripped of surrounding whitespace; empty documents are yielded (as "") so that
    the caller can count them, and are not written. A text file of many lines without a separator is one
    document: that is said on stderr, since a file of one document per line is the likelier intent.
    """
    if _base_suffix(path) in PARQUET_SUFFIXES:
        yield from _parquet_documents(path, text_key, meter)
        return
    if _base_suffix(path) in JSONL_SUFFIXES:
        for n, line in _lines(path, meter):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{n}: not valid JSON ({exc.msg})") from None
            if not isinstance(obj, dict) or text_key not in obj:
                raise ConfigError(f"{path}:{n}: JSON line has no field {text_key!r}")
            if not isinstance(obj[text_key], str):
                raise ConfigError(f"{path}:{n}: field {text_key!r} is not a string")
            yield Document(obj[text_key], f"{path}:{n}")
        return
    if line_documents:
        for n, line in _lines(path, meter):
            if line.strip():
                yield Document(line.strip(), f"{path}:{n}")
        return
    parts: list[str] = []
    start = 1
    n = 0
    for n, line in _lines(path, meter):
        if separator and separator in line:
            pieces = line.split(separator)
            parts.append(pieces[0])
            for piece in pieces[1:]:
                yield Document("".join(parts).strip(), f"{path}:{start}")
                parts, start = [piece], n
        else:
            parts.append(line)
    last = "".join(parts).strip()
    if start == 1 and n >= LINES_WARNING and separator:
        print(f"warning: {path}: {n:,} lines and no {separator!r} separator, so one document; if each line is "
              "a document, pass --line-documents", file=sys.stderr)
    if last:  # text after the final separator is usually just a newline: not a document
        yield Document(last, f"{path}:{start}")
