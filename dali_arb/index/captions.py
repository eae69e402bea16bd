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
import secrets
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
    return os.path.splitext(os.path.basename(path))[0].replace("_", " ")


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
        if self.column is not None and (not isinstance(self.column, str) or not self.column):
            raise ConfigError(f"caption column must be a column name, got {self.column!r}")
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
        return (self.extension is not None or self.filename or self.file is not None or self.column is not None
                or self.first_line or self.none)  # fmt: skip


def apply_captions(manifest: str | os.PathLike, source: CaptionSource, *, metadata: list[str] = ()) -> int:
    """Write the captions of ``source`` into the ``caption`` column of the manifest file ``manifest`` (rewritten in
    place, atomically, one row group at a time: memory is one row group plus, for a captions file, its names and
    texts); returns how many rows have a caption. Rows whose image is not a whole local file (a member of a tar shard,
    an object in storage) have no sidecar by another extension; their file name is their key's. ``column`` without a
    ``file`` reads that column of the ``metadata`` files indexed (img2dataset's Parquet/CSV), matched by key."""
    path = Path(manifest)
    files = [Path(source.file)] if source.file is not None else [Path(m) for m in metadata] if source.column else []
    if source.column is not None and not files:
        raise ConfigError(f"caption column {source.column!r} is read from --captions FILE or from the Parquet/CSV "
                          "metadata being indexed; give one of them")  # fmt: skip
    lookup = _FileCaptions(files, source.column) if files else None
    parquet = pq.ParquetFile(path)
    schema = parquet.schema_arrow
    index = schema.get_field_index("caption")
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.captions.partial")
    captioned = 0
    try:
        with pq.ParquetWriter(tmp, schema) as writer:
            for batch in parquet.iter_batches(batch_size=ROWS_PER_GROUP):
                table = pa.Table.from_batches([batch], schema=schema)
                captions = _captions(table, source, lookup)
                captioned += sum(c is not None for c in captions)
                column = pa.array(captions, schema.field("caption").type)
                writer.write_table(table.set_column(index, schema.field("caption"), column))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return captioned


def _captions(table: pa.Table, source: CaptionSource, lookup: _FileCaptions | None) -> list[str | None]:
    """The captions of ``table``'s rows from ``source``."""
    captions = table.column("caption").to_pylist()
    keys = table.column("key").to_pylist()
    files = _whole_files(table)
    if source.suffix is not None:
        captions = [_sidecar(f, source.suffix) for f in files]
    elif source.filename:
        # a whole file's name; else the key's last part (a key has no extension: "a.b" of a.b.jpg stays "a.b")
        captions = [
            caption_from_filename(f) if f else os.path.basename(k).replace("_", " ") for f, k in zip(files, keys)
        ]
    elif lookup is not None:
        captions = [lookup.find(k, f) for k, f in zip(keys, files)]
    elif source.none:
        captions = [None] * len(keys)
    if source.first_line:
        captions = [None if c is None else (c.splitlines() or [""])[0].strip() or None for c in captions]
    return captions


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


class _FileCaptions:
    """The captions of a captions file, looked up by a row's image path, else its key, else its file name's stem."""

    def __init__(self, files: list[Path], column: str | None) -> None:
        self.names: list[str] = []
        self.texts: list[str | None] = []
        self.by_path: dict[str, int] = {}
        for file in files:
            names, texts = _read_caption_file(file, column)
            base = file.resolve().parent
            for name, text in zip(names, texts):
                self.by_path.setdefault(os.path.normpath(os.path.join(base, str(name))), len(self.names))
                self.names.append(str(name))
                self.texts.append(text)
        self._by_key: dict[str, int] | None = None  # built at the first row not found by path

    def find(self, key: str, file: str | None) -> str | None:
        at = self.by_path.get(os.path.normpath(file)) if file else None
        if at is None:
            if self._by_key is None:
                self._by_key = {}
                for i, name in enumerate(self.names):  # the name, the name without its extension, then its stem
                    for alias in (name, os.path.splitext(name)[0], os.path.splitext(os.path.basename(name))[0]):
                        self._by_key.setdefault(alias, i)
            at = self._by_key.get(key)
            if at is None:
                at = self._by_key.get(os.path.basename(key))
        return None if at is None else self.texts[at]


def _read_jsonl(file: Path) -> pa.Table:
    """A JSON Lines file as a table (pyarrow's reader); where it fails, the first bad line named, read line by line."""
    import pyarrow.json as pjson

    try:
        return pjson.read_json(file)
    except (pa.ArrowInvalid, OSError):
        pass
    records = []
    with open(file, encoding="utf-8", errors="replace") as fh:
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
    try:
        return pa.Table.from_pylist(records) if records else pa.table({})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise IndexingError(f"captions file {file}: its lines do not share one shape ({exc})") from None


def _read_caption_file(file: Path, column: str | None) -> tuple[list, list]:
    """``(names, texts)`` of a JSONL, Parquet or CSV captions file; an IndexingError naming the file and line for
    anything malformed."""
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".json"):
        table = _read_jsonl(file)
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
