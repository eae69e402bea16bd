"""Captions from anywhere, at index time: a :class:`CaptionSource` says where a manifest's captions come from instead
of (or beside) the sidecar ``name.txt`` / ``name.caption`` files the folder reader finds, and :func:`apply_captions`
writes them into the manifest's ``caption`` column (so the loader draws, shuffles and drops them seeded and
resumable, as any caption).

- ``extension``: kohya's ``caption_extension``: the file ``<image path without its extension><extension>``
  (``.txt``, ``.caption``, ``.tags``, any); an image without one has no caption (kohya then uses the class tokens).
- ``filename``: SimpleTuner's ``caption_strategy: filename``: the file name's stem, underscores to spaces.
- ``file``: a JSON Lines file (``{"file_name": "a.jpg", "text": "..."}`` lines, as Hugging Face's imagefolder
  ``metadata.jsonl``; ``key`` instead of ``file_name``, ``caption`` or ``prompt`` instead of ``text``), or a
  Parquet/CSV table with a ``key`` or ``file_name`` column; ``column`` names the text column (default the first of
  ``text``, ``caption``, ``prompt``). A ``file_name`` is relative to the file's folder; a row is matched by its
  image path, else by its manifest key, else by its file name's stem.
- ``none``: no captions at all (SimpleTuner's ``instanceprompt``: the loader's instance prompt is every caption).
- ``first_line``: keep only the first line of each caption (kohya without ``enable_wildcard``).

Imports the standard library and pyarrow; no DALI, no framework.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import ConfigError, IndexingError
from .folders import decode_caption
from .run import ROWS_PER_GROUP

__all__ = ["TEXT_COLUMNS", "CaptionSource", "apply_captions", "caption_from_filename"]

#: The text column of a caption file, by default: the first of these it has.
TEXT_COLUMNS = ("text", "caption", "prompt")
#: The columns naming a caption file's image: the first of these it has.
NAME_COLUMNS = ("file_name", "key", "path", "image")


def caption_from_filename(path: str) -> str:
    """SimpleTuner's caption of an image from its name: the stem, underscores to spaces (``a_red_car.jpg``:
    ``"a red car"``)."""
    return Path(path).stem.replace("_", " ")


@dataclass(frozen=True)
class CaptionSource:
    """Where a manifest's captions come from at index time (see the module). Give one of ``extension``,
    ``filename`` or ``file``; ``column`` only with ``file``; ``first_line`` with any of them or alone."""

    extension: str | None = None
    filename: bool = False
    file: str | os.PathLike | None = None
    column: str | None = None
    first_line: bool = False
    none: bool = False

    def __post_init__(self) -> None:
        chosen = [name for name, on in (("caption_extension", self.extension is not None),
                                        ("captions from file names", self.filename),
                                        ("a captions file", self.file is not None), ("no captions", self.none)) if on]  # fmt: skip
        if len(chosen) > 1:
            raise ConfigError(f"give one source of captions, not {' and '.join(chosen)}")
        if self.extension is not None and (not isinstance(self.extension, str) or not self.extension.strip(". ")
                                           or os.sep in self.extension):  # fmt: skip
            raise ConfigError(f"caption_extension must be a file extension such as '.txt', got {self.extension!r}")
        if self.column is not None and self.file is None:
            raise ConfigError(
                f"caption column {self.column!r} needs the file that holds it (--captions FILE.parquet|.csv|.jsonl)"
            )
        if self.file is not None and not Path(self.file).is_file():
            raise ConfigError(f"captions file {self.file} not found; give a .jsonl, .parquet or .csv file")

    @property
    def suffix(self) -> str | None:
        """``extension`` with its leading dot (kohya accepts ``txt`` and ``.txt`` alike)."""
        if self.extension is None:
            return None
        return self.extension if self.extension.startswith(".") else "." + self.extension

    @property
    def given(self) -> bool:
        return self.extension is not None or self.filename or self.file is not None or self.first_line or self.none


def apply_captions(manifest: str | os.PathLike, source: CaptionSource) -> int:
    """Write the captions of ``source`` into the ``caption`` column of the manifest file ``manifest`` (rewritten in
    place, atomically); returns how many rows have a caption. Rows whose image is not a whole local file (a member of a
    tar shard, an object in storage) have no sidecar by another extension; their file name is their key's."""
    path = Path(manifest)
    table = pq.read_table(path)
    captions = table.column("caption").to_pylist()
    keys = table.column("key").to_pylist()
    files = _whole_files(table)
    if source.suffix is not None:
        captions = [_sidecar(f, source.suffix) for f in files]
    elif source.filename:
        captions = [caption_from_filename(f) if f else Path(k).name.replace("_", " ") for f, k in zip(files, keys)]
    elif source.file is not None:
        captions = _from_file(Path(source.file), source.column, keys, files)
    elif source.none:
        captions = [None] * len(keys)
    if source.first_line:
        captions = [None if c is None else (c.splitlines() or [""])[0].strip() or None for c in captions]
    index = table.column_names.index("caption")
    table = table.set_column(index, table.schema.field("caption"), pa.array(captions, pa.string()))
    tmp = path.with_name(f".{path.name}.captions.partial")
    try:
        pq.write_table(table, tmp, row_group_size=ROWS_PER_GROUP)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return sum(c is not None for c in captions)


def _whole_files(table: pa.Table) -> list[str | None]:
    """Each row's image file: its local path where the row is a whole local file, else None (a member of a tar shard,
    an object in storage, metadata without a path)."""
    n = table.num_rows
    column = {name: table.column(name).to_pylist() if name in table.column_names else [None] * n
              for name in ("source", "offset", "length", "source_size")}  # fmt: skip
    return [
        src
        if src and "://" not in src and not offset and (size is None or length is None or length in (-1, size))
        else None
        for src, offset, length, size in zip(
            column["source"], column["offset"], column["length"], column["source_size"]
        )
    ]


def _sidecar(image: str | None, suffix: str) -> str | None:
    """The caption file ``image``'s stem + ``suffix``, or None (no file, or the image is not a local file)."""
    if not image:
        return None
    candidate = os.path.splitext(image)[0] + suffix
    try:
        with open(candidate, "rb") as fh:
            return decode_caption(fh.read()) or None
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IndexingError(
            f"caption file {candidate} cannot be read ({exc.strerror or exc}); fix or remove it"
        ) from None


def _from_file(file: Path, column: str | None, keys: list[str], files: list[str | None]) -> list[str | None]:
    """Each row's caption from the captions ``file`` (matched by path, key, then stem)."""
    names, texts = _read_caption_file(file, column)
    base = file.resolve().parent
    by_path, by_key, by_stem = {}, {}, {}
    for name, text in zip(names, texts):
        name = str(name)
        by_path[os.path.normpath(os.path.join(base, name))] = text
        by_key[name] = text
        by_key.setdefault(os.path.splitext(name)[0], text)
        by_stem.setdefault(Path(name).stem, text)
    out = []
    for key, src in zip(keys, files):
        text = by_path.get(os.path.normpath(src)) if src else None
        if text is None:
            text = by_key.get(key)
        if text is None:
            text = by_stem.get(Path(key).name)
        out.append(text)
    return out


def _read_caption_file(file: Path, column: str | None) -> tuple[list, list]:
    """``(names, texts)`` of a JSONL, Parquet or CSV captions file; an IndexingError naming the file and line for
    anything malformed."""
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".json"):
        records = []
        with open(file, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise IndexingError(f"captions file {file} line {number} is not JSON ({exc.msg})") from None
                if not isinstance(record, dict):
                    raise IndexingError(f"captions file {file} line {number} is not a JSON object")
                records.append(record)
        table = pa.Table.from_pylist(records) if records else pa.table({})
    elif suffix in (".parquet", ".csv"):
        try:
            if suffix == ".parquet":
                table = pq.read_table(file)
            else:
                import pyarrow.csv as pcsv

                table = pcsv.read_csv(file)
        except (pa.ArrowInvalid, OSError) as exc:
            raise IndexingError(f"captions file {file} cannot be read: {exc}") from None
    else:
        raise ConfigError(
            f"captions file {file}: give a .jsonl, .parquet or .csv file, not {file.suffix or 'no suffix'}"
        )
    name = next((c for c in NAME_COLUMNS if c in table.column_names), None)
    text = column or next((c for c in TEXT_COLUMNS if c in table.column_names), None)
    if name is None:
        raise IndexingError(f"captions file {file} has no {' or '.join(NAME_COLUMNS)} column naming each image")
    if text is None or text not in table.column_names:
        wanted = repr(column) if column else " or ".join(TEXT_COLUMNS)
        raise IndexingError(
            f"captions file {file} has no {wanted} column; its columns are {', '.join(table.column_names)} "
            "(choose one with --caption-column)"
        )
    texts = [None if t is None else str(t) for t in table.column(text).to_pylist()]
    return table.column(name).to_pylist(), texts
