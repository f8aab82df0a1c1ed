"""Local data files: jsonl, json, csv / tsv, parquet, plain text and ``datasets`` folders, read into plain rows.

Why hand-written readers and not ``datasets.load_dataset``: ``datasets`` writes an Arrow cache of every file
it reads under ~/.cache (a copy of the data per file version, on a disk the user did not choose), imports a
large dependency tree for what is a few lines per format here, and its json/csv builders infer one schema
for all rows, so rows of different formats (messages in some rows, prompt/response in others) fail to load.
The readers below keep rows as plain dicts, read ``save_to_disk`` folders with pyarrow alone, and split
deterministically (``deltatune.data.rows``), so nothing is gained by the extra dependency.

A ``.txt`` file is a corpus for task ``text``: one document per paragraph (blocks separated by a blank
line, as ``datasets``' text builder with ``sample_by="paragraph"``), each a row ``{"text": ...}``. A folder
of ``.txt`` files (and no ``state.json``) gives one document per file, in name order.
"""

from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from pathlib import Path

from deltatune.data.sets import TextDataset
from deltatune.errors import DeltatuneError

FILE_TYPES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt")
_PYARROW = "pip install 'deltatune[parquet]' (pyarrow)"


@dataclass
class Records:
    """Rows read from a local file: one dict per row, in file order.

    class_labels holds, for a column stored as a ``datasets`` ClassLabel (integers with names), its names
    in index order, so a label column keeps the file's own names and order.
    """

    source: str
    rows: list[dict]
    fields: list[str]
    class_labels: dict[str, list[str]]

    def __len__(self) -> int:
        return len(self.rows)

    def has(self, field: str) -> bool:
        return field in self.fields

    def missing(self, field: str, key: str, what: str, row: int | None = None) -> DeltatuneError:
        """The error for a field the data lacks: names the field, the fields there are and the key to set."""
        where = self.source if row is None else f"row {row + 1} of {self.source}"
        fields = list(self.rows[row]) if row is not None else self.fields
        return DeltatuneError(
            f"{where} has no field {field!r} (its fields: {', '.join(map(str, fields)) or 'none'}); "
            f"set {key} to the field that holds {what}"
        )

    def column(self, field: str, key: str, what: str) -> list:
        """The values of one field in every row; a row without it, or with null there, is an error."""
        if not self.has(field):
            raise self.missing(field, key, what)
        values = []
        for i, row in enumerate(self.rows):
            if row.get(field) is None:
                if field not in row:
                    raise self.missing(field, key, what, row=i)
                raise DeltatuneError(
                    f"row {i + 1} of {self.source} has no value (null or empty cell) in field {field!r}; "
                    "fill it in or remove the row"
                )
            values.append(row[field])
        return values


def _fields(rows: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(row))
    return list(seen)


def _class_labels(features: object) -> dict[str, list[str]]:
    """ClassLabel names from a ``datasets`` features mapping (dataset_info.json or parquet metadata)."""
    if not isinstance(features, dict):
        return {}
    return {
        str(k): [str(n) for n in v["names"]]
        for k, v in features.items()
        if isinstance(v, dict) and v.get("_type") == "ClassLabel" and isinstance(v.get("names"), list)
    }


def _read_jsonl(path: Path) -> list[dict]:
    import json

    rows = []
    with path.open(encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DeltatuneError(f"line {n} of {path} is not valid JSON ({e}); write one JSON object per line") from e
            if not isinstance(row, dict):
                raise DeltatuneError(f"line {n} of {path} is a {type(row).__name__}, not a JSON object; write one object per line")
            rows.append(row)
    return rows


def _read_json(path: Path) -> list[dict]:
    import json

    try:
        value = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as e:
        if "Extra data" in str(e):  # JSON lines under a .json name
            return _read_jsonl(path)
        raise DeltatuneError(f"{path} is not valid JSON ({e}); write a list of objects, or use .jsonl") from e
    if not isinstance(value, list) or not all(isinstance(row, dict) for row in value):
        raise DeltatuneError(f"{path} must hold a JSON list of objects (one per row); or write one object a line as .jsonl")
    return value


def _read_csv(path: Path, delimiter: str) -> list[dict]:
    import sys

    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents in one cell
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        rows = [{k: v for k, v in row.items() if k is not None} for row in reader]  # None: extra cells
        if not reader.fieldnames:
            raise DeltatuneError(f"{path} is empty; the first line must name the columns")
    return rows


def _read_txt(path: Path) -> list[dict]:
    """One row per paragraph: blocks of lines separated by blank (or whitespace-only) lines."""
    text = path.read_text(encoding="utf-8-sig").replace("\r\n", "\n")
    return [{"text": block.strip()} for block in re.split(r"\n[ \t]*\n", text) if block.strip()]


def _read_txt_folder(path: Path) -> list[dict] | None:
    """One row per ``.txt`` file of a folder (name order), None when the folder holds none."""
    files = sorted(p for p in path.glob("*.txt") if p.is_file())
    if not files:
        return None
    texts = [f.read_text(encoding="utf-8-sig").strip() for f in files]
    return [{"text": text} for text in texts if text]


def _pyarrow(what: str):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:
        raise DeltatuneError(
            f"reading {what} needs the pyarrow package, which is not installed; install it with: {_PYARROW} "
            "(or convert the data to .jsonl or .csv)"
        ) from e
    return pyarrow


def _read_parquet(path: Path) -> tuple[list[dict], dict[str, list[str]]]:
    import json

    pa = _pyarrow("a .parquet file")
    try:
        table = pa.parquet.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise DeltatuneError(f"{path} is not a readable parquet file: {e}") from e
    meta = (table.schema.metadata or {}).get(b"huggingface")
    labels: dict[str, list[str]] = {}
    if meta:
        try:
            labels = _class_labels(json.loads(meta).get("info", {}).get("features"))
        except (ValueError, AttributeError):
            labels = {}
    return table.to_pylist(), labels


def _read_saved_dataset(path: Path) -> tuple[list[dict], dict[str, list[str]], str]:
    """A ``datasets`` save_to_disk folder, read with pyarrow alone (``datasets`` itself is not needed).

    A DatasetDict folder gives its "train" split (or its only split); the eval part is split off from it."""
    import json

    source = str(path)
    splits_file = path / "dataset_dict.json"
    if splits_file.is_file():
        splits = json.loads(splits_file.read_text()).get("splits", [])
        split = "train" if "train" in splits else (splits[0] if len(splits) == 1 else None)
        if split is None:
            raise DeltatuneError(
                f"{path} holds the splits {splits} and none is called 'train'; set data.path to one split's "
                f"folder, e.g. {path / str(splits[0]) if splits else path}"
            )
        path = path / split
        source = f"{source} (split {split!r})"
    state_file = path / "state.json"
    if not state_file.is_file():
        raise DeltatuneError(
            f"{path} is a folder but neither one written by datasets' save_to_disk (it has no state.json) nor a "
            f"folder of .txt files; set data.path to a file ({', '.join(FILE_TYPES)}) or such a folder"
        )
    pa = _pyarrow("a datasets save_to_disk folder")
    state = json.loads(state_file.read_text())
    files = [path / f["filename"] for f in state.get("_data_files", [])] or sorted(path.glob("*.arrow"))
    rows: list[dict] = []
    for file in files:
        try:
            with pa.memory_map(str(file)) as source_file:
                try:
                    table = pa.ipc.open_stream(source_file).read_all()
                except pa.ArrowInvalid:
                    source_file.seek(0)
                    table = pa.ipc.open_file(source_file).read_all()
        except (OSError, pa.ArrowException) as e:
            raise DeltatuneError(f"{file} is not a readable arrow file ({e}); save the data set again") from e
        rows += table.to_pylist()
    info_file = path / "dataset_info.json"
    labels = _class_labels(json.loads(info_file.read_text()).get("features")) if info_file.is_file() else {}
    return rows, labels, source


def read_records(path: str | os.PathLike[str]) -> Records:
    """Rows of a local .jsonl, .json (a list of objects), .csv, .tsv, .parquet or .txt file (one row
    ``{"text"}`` per paragraph), of a folder of .txt files (one row per file) or of a ``datasets``
    save_to_disk folder. Parquet and save_to_disk folders need pyarrow (``pip install pyarrow``)."""
    p = Path(path).expanduser()
    labels: dict[str, list[str]] = {}
    source = str(p)
    if p.is_dir():
        plain = None
        if not (p / "state.json").is_file() and not (p / "dataset_dict.json").is_file():
            plain = _read_txt_folder(p)
        rows, labels, source = (plain, {}, str(p)) if plain is not None else _read_saved_dataset(p)
    elif not p.exists():
        raise DeltatuneError(f"data file {p} does not exist; set data.path to an existing file or folder")
    else:
        suffix = p.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            rows = _read_jsonl(p)
        elif suffix == ".json":
            rows = _read_json(p)
        elif suffix in (".csv", ".tsv"):
            rows = _read_csv(p, "\t" if suffix == ".tsv" else ",")
        elif suffix == ".parquet":
            rows, labels = _read_parquet(p)
        elif suffix == ".txt":
            rows = _read_txt(p)
        else:
            raise DeltatuneError(
                f"unknown data file type {suffix or '(no suffix)'!r} for {p}; use one of {', '.join(FILE_TYPES)} "
                "or a folder written by datasets' save_to_disk"
            )
    if not rows:
        raise DeltatuneError(f"{source} has no rows; add some data")
    return Records(source, rows, _fields(rows), labels)


def label_name(value: object) -> str:
    """A label value from a file as a class name: 1, 1.0 and "1" are the same class "1"."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _is_int(name: str) -> bool:
    try:
        int(name)
    except ValueError:
        return False
    return True


def label_order(found: set[str]) -> list[str]:
    """Class names in the order their indices take: numeric when every name is an integer, else sorted."""
    return sorted(found, key=int) if all(_is_int(v) for v in found) else sorted(found)


def labelled(
    records: Records,
    *,
    text_field: str = "text",
    label_field: str = "label",
    labels: list[str] | None = None,
    name: str | None = None,
) -> TextDataset:
    """A TextDataset from rows with a text and a label field (labels may be strings or integers).

    Class order: ``labels`` if given (rows of other classes are dropped), else a ClassLabel column's own
    order, else numeric order when every label is an integer, else sorted names.
    """
    texts = [str(t) for t in records.column(text_field, "data.text_field", "the text")]
    raw = records.column(label_field, "data.label_field", "the class label")
    names = records.class_labels.get(label_field)
    if names is not None and all(isinstance(v, int) and 0 <= v < len(names) for v in raw):
        values = [names[v] for v in raw]
    else:
        values = [label_name(v) for v in raw]
        if "" in values:
            raise DeltatuneError(
                f"row {values.index('') + 1} of {records.source} has an empty label in field {label_field!r}; "
                "fill it in or remove the row"
            )
        found = set(values)
        names = label_order(found)
    index = {n: i for i, n in enumerate(names)}
    ds = TextDataset(name or records.source, texts, [index[v] for v in values], list(names))
    return ds.keep_labels(labels) if labels is not None else ds
