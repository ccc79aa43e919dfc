"""Local data files (``.json`` list of objects, ``.jsonl``, ``.csv``) read with exact error locations.

A user's own data is where most data mistakes happen, so these readers stay in plain Python: every
row carries its place in the file (``data/x.jsonl line 7``) and every problem becomes a one-line
:class:`UserError` that names the file, the line or item, the field and the fix. Parquet and
compressed files, which only hub-schema copies use, go through :mod:`booster.data.hub` instead.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from booster.data.records import Example
from booster.errors import UserError

SUPPORTED_SUFFIXES = (".json", ".jsonl", ".csv")
ALPACA_HINT = "each row needs instruction and output; input is optional"
#: words in a file name that say which split it holds (``sst2_validation.jsonl`` is a test file).
SPLIT_MARKERS = {
    "train": ("train", "training"),
    "test": ("test", "validation", "valid", "val", "eval", "dev"),
}


@dataclass(frozen=True)
class Row:
    """One record of a data file and where it is, for error messages."""

    #: "data/x.jsonl line 7", "data/x.json item 3", "data/x.csv line 12"
    where: str
    fields: dict[str, Any]
    #: the file, as shown to the user
    file: str = ""


def _display(path: Path) -> str:
    """The path as the user is likely to have typed it (relative to the working directory if possible)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_text(path: Path, shown: str | None = None) -> str:
    """A file's text decoded as UTF-8 (a leading BOM is dropped). Another encoding is a one-line
    :class:`UserError` with the line and byte offset of the first bad byte; ``OSError`` passes on."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        offset = err.start + (len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0)
        line = data[:offset].count(b"\n") + 1
        raise UserError(
            f"{shown or _display(path)} line {line}: not UTF-8 text (byte 0x{data[offset]:02x} at offset "
            f"{offset}: {err.reason}); save the file as UTF-8"
        ) from None


def data_files(path: str | Path, suffixes: Sequence[str] = SUPPORTED_SUFFIXES) -> list[Path]:
    """The data files at ``path``: the file itself, or every supported file under a folder, sorted.

    Hidden files (``.cache``, ``.DS_Store``) are skipped so that an editor's or a tool's leftovers
    in a data folder never become training rows.
    """
    path = Path(path).expanduser()
    if path.is_file():
        if not str(path).lower().endswith(tuple(suffixes)):
            raise UserError(
                f"{_display(path)}: unsupported file type; use one of {', '.join(suffixes)} (or a folder of them)"
            )
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and str(p).lower().endswith(tuple(suffixes))
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise UserError(
                f"{_display(path)}: folder has no {', '.join(suffixes)} files; put the data files in it"
            )
        return files
    raise UserError(f"{_display(path)}: no such file or folder; fix the path")


def _json_rows(path: Path, text: str) -> list[Row]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{_display(path)} line {err.lineno}: invalid JSON ({err.msg}); a .json file must hold one list of objects"
        ) from None
    if not isinstance(data, list):
        raise UserError(
            f"{_display(path)}: expected a JSON list of objects, found {type(data).__name__}; wrap the rows in [ ... ]"
        )
    rows = []
    for index, item in enumerate(data, start=1):
        if not isinstance(item, dict):
            raise UserError(
                f"{_display(path)} item {index}: expected an object with named fields, found {type(item).__name__}"
            )
        rows.append(Row(f"{_display(path)} item {index}", item, _display(path)))
    return rows


def _jsonl_rows(path: Path, text: str) -> list[Row]:
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{_display(path)} line {number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{where}: invalid JSON ({err.msg}); each line must be one JSON object") from None
        if not isinstance(item, dict):
            raise UserError(f"{where}: expected a JSON object with named fields, found {type(item).__name__}")
        rows.append(Row(where, item, _display(path)))
    return rows


def _csv_rows(path: Path, text: str) -> list[Row]:
    reader = csv.reader(text.splitlines(keepends=True))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        return []
    except csv.Error as err:
        raise UserError(f"{_display(path)} line 1: invalid CSV header ({err})") from None
    rows = []
    while True:
        start = reader.line_num + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise UserError(
                f"{_display(path)} line {start}: invalid CSV ({err}); check the quoting"
            ) from None
        if not any(cell.strip() for cell in record):
            continue
        where = f"{_display(path)} line {start}"
        if len(record) > len(header):
            raise UserError(
                f"{where}: {len(record)} values for {len(header)} columns; quote values that contain commas"
            )
        rows.append(Row(where, dict(zip(header, record, strict=False)), _display(path)))
    return rows


def read_rows(path: str | Path) -> list[Row]:
    """All records of one ``.json``, ``.jsonl`` or ``.csv`` file; an empty file is a UserError."""
    path = Path(path).expanduser()
    try:
        text = read_text(path)
    except OSError as err:
        raise UserError(f"{_display(path)}: cannot read it ({err.strerror}); check the path") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        rows = _json_rows(path, text) if text.strip() else []
    elif suffix == ".jsonl":
        rows = _jsonl_rows(path, text)
    elif suffix == ".csv":
        rows = _csv_rows(path, text)
    else:
        raise UserError(
            f"{_display(path)}: unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    if not rows:
        raise UserError(f"{_display(path)}: the file has no rows; add data or remove the file")
    return rows


def read_path(path: str | Path) -> list[Row]:
    """All records of a file, or of every supported file in a folder (in sorted file order)."""
    return [row for file in data_files(path) for row in read_rows(file)]


def text_field(row: Row, name: str, *, required: bool = True, hint: str = ALPACA_HINT) -> str:
    """A text field of a row; missing (when required) or non-text values are a UserError naming the row."""
    value = row.fields.get(name)
    if value is None:
        if required:
            raise UserError(f"{row.where}: missing field {name!r} ({hint})")
        return ""
    if not isinstance(value, str):
        raise UserError(
            f"{row.where}: field {name!r} is {type(value).__name__}, not text; quote it as a string ({hint})"
        )
    return value


def split_of(path: Path, root: Path | None = None) -> str | None:
    """Which split a file's name (or its folders under ``root``) says it holds: "train", "test" or None."""
    parts = path.relative_to(root).parts if root is not None and root != path else (path.name,)
    words = {w for part in parts for w in _name_words(part)}
    found = [split for split, markers in SPLIT_MARKERS.items() if words & set(markers)]
    return found[0] if len(found) == 1 else None


def _name_words(name: str) -> list[str]:
    name = name.lower()
    for suffix in (".gz", ".bz2", ".xz", ".zst"):
        name = name.removesuffix(suffix)
    stem = name.rsplit(".", 1)[0] if "." in name else name
    return [w for w in re.split(r"[^a-z0-9]+", stem) if w]


def split_files(
    path: str | Path, split: str | None, suffixes: Sequence[str] = SUPPORTED_SUFFIXES
) -> tuple[list[Path], bool]:
    """The files of ``split`` ("train"/"test") at ``path``, and whether their names chose them.

    Files (or folders) named for splits (``train``, ``test``, ``validation``, ``30k_test``, ...) are
    picked by name; a file named for another split is an error rather than a silent leak of
    training rows into a test set. When no name says a split (or ``split`` is None) all files come
    back with ``False``, and a caller that needs two splits divides the rows itself (80/20 by hash).
    """
    path = Path(path).expanduser()
    files = data_files(path, suffixes)
    marked = {f: split_of(f, path if path.is_dir() else None) for f in files}
    if split is None or not any(marked.values()):
        return files, False
    chosen = [f for f in files if marked[f] == split]
    if not chosen:
        found = ", ".join(sorted({m for m in marked.values() if m}))
        raise UserError(
            f"{_display(path)}: holds {found} data, not {split} (looked for names with "
            f"{' / '.join(SPLIT_MARKERS[split])}); give the {split} file, a folder with both, "
            "or a file without a split in its name"
        )
    return chosen, True


def alpaca_examples(
    rows: Iterable[Row], *, kind: str = "", require_output: bool = True, source: str | None = None
) -> list[Example]:
    """Alpaca-format rows (instruction, optional input, output) as examples.

    Fields other than those three (a task's ``label`` or ``answer``) are kept in ``meta`` so a task
    file can carry its gold answer next to the training target.
    """
    examples = []
    for row in rows:
        instruction = text_field(row, "instruction")
        if not instruction.strip():
            raise UserError(f"{row.where}: field 'instruction' is empty ({ALPACA_HINT})")
        output = text_field(row, "output", required=require_output)
        meta = {k: v for k, v in row.fields.items() if k not in ("instruction", "input", "output")}
        examples.append(
            Example(
                instruction=instruction,
                output=output,
                input=text_field(row, "input", required=False),
                kind=kind,
                source=source or row.file,
                meta=meta,
            )
        )
    return examples


def load_alpaca_file(
    path: str | Path, *, kind: str = "", require_output: bool = True, source: str | None = None
) -> list[Example]:
    """Alpaca-format examples from a ``.json``/``.jsonl``/``.csv`` file, or every such file in a folder."""
    return alpaca_examples(read_path(path), kind=kind, require_output=require_output, source=source)
