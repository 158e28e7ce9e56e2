"""Reading documents into a table, and the checks on its columns.

:func:`read_table` turns what a user passes as data (a ``pandas.DataFrame``, a
``datasets.Dataset``, or a path to a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file)
into a :class:`Table` whose columns come out as Python lists. Files are read here, not by
``datasets``, so that every error names the file (and, for JSON, the line of the bad record)
and nothing is written to a cache:

* ``.jsonl``: one JSON object per line (blank lines skipped), read line by line;
* ``.json``: a list of objects, an object of equal-length column lists, or JSON lines;
* ``.csv``: a header row, then one record per row; every field is read as text exactly as
  written (an empty field is ``""``, so labels such as ``01`` and ``1`` stay distinct);
* ``.parquet``: read with ``pandas.read_parquet``.

:func:`task_labels` and :func:`text_values` check the task and text columns row by row and
name the column, the row and the value in their errors.

A column may also be a field of a column of mappings, written ``"<column>.<key>"``: with
``task_column="metadata.character"`` each row's task is ``row["metadata"]["character"]`` (a
per-conversation metadata dict, as chat data sets often carry; in a CSV file the field may hold
the dict as JSON text). A column whose own name contains the dot is taken first.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "DATA_FILE_SUFFIXES",
    "Table",
    "check_data_file",
    "read_table",
    "is_missing",
    "task_labels",
    "text_values",
]

#: File types :func:`read_table` reads (lower case).
DATA_FILE_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet")


@dataclass(frozen=True)
class Table:
    """Named columns of equal length, read from one source.

    Attributes
    ----------
    source : str
        What the rows came from, for messages (``"data"`` or ``"data file '<path>'"``).
    columns : tuple of str
        Column names, in order.
    num_rows : int
        Number of rows.
    """

    source: str
    columns: tuple[str, ...]
    num_rows: int
    _get: Callable[[str], list]

    def require(self, needed: Mapping[str, str]) -> dict[str, list]:
        """The columns ``needed`` (argument name -> column name) as lists.

        Raises
        ------
        ValueError
            For a missing column; the message names the argument that chose it and lists the
            available columns.
        """
        out = {}
        for argument, column in needed.items():
            if column in self.columns:
                out[argument] = self._get(column)
                continue
            head, dot, key = column.partition(".")
            if dot and key and head in self.columns:
                out[argument] = self._field(head, key, argument)
                continue
            raise ValueError(
                f"column {column!r} ({argument}) not found in {self.source}; available "
                f"columns: {list(self.columns)}. Pass {argument}=<the column's name> (or "
                f"'<column>.<key>' for a field of a column of dicts)."
            )
        return out

    def _field(self, column: str, key: str, argument: str) -> list:
        """``row[column][key]`` of every row (``None`` where the key is missing)."""
        out = []
        for i, value in enumerate(self._get(column)):
            if isinstance(value, str):
                try:
                    value = json.loads(value)
                except json.JSONDecodeError:
                    pass
            if is_missing(value):
                out.append(None)
            elif isinstance(value, Mapping):
                out.append(value.get(key))
            else:
                raise ValueError(
                    f"{argument}={column + '.' + key!r} reads the field {key!r} of column "
                    f"{column!r}, but row {i} of {self.source} holds the "
                    f"{type(value).__name__} {str(value)[:40]!r} there, not a mapping (dict)."
                )
        return out


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------


def check_data_file(path: str | Path) -> Path:
    """``path`` as a ``Path`` if it is an existing data file of a supported type.

    Cheap (no file is read), so that a command line can check its paths before it loads a
    model.

    Raises
    ------
    FileNotFoundError
        If nothing exists at ``path``.
    ValueError
        If ``path`` is a directory or its suffix is not one of :data:`DATA_FILE_SUFFIXES`.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data file {str(path)!r} does not exist; check the path.")
    if path.is_dir():
        raise ValueError(
            f"data path {str(path)!r} is a directory; pass one "
            f"{'/'.join(DATA_FILE_SUFFIXES)} file."
        )
    suffix = path.suffix.lower()
    if suffix not in DATA_FILE_SUFFIXES:
        raise ValueError(
            f"data path {str(path)!r} has suffix {suffix!r}; supported file types are "
            f"{list(DATA_FILE_SUFFIXES)}. Load other formats yourself and pass a DataFrame."
        )
    return path


def read_table(data: Any) -> Table:
    """Read ``data`` into a :class:`Table`.

    Parameters
    ----------
    data : pandas.DataFrame, datasets.Dataset, str or pathlib.Path
        One row per document; a path must name a file of a type in :data:`DATA_FILE_SUFFIXES`.

    Raises
    ------
    FileNotFoundError
        If a path does not exist.
    TypeError
        If ``data`` is none of the accepted types (a ``datasets.DatasetDict`` gets a hint).
    ValueError
        If a file cannot be parsed (the message names the file and, for JSON, the line), or
        the data has no rows.
    """
    if isinstance(data, (str, Path)):
        return _read_file(check_data_file(data))
    if isinstance(data, pd.DataFrame):
        table = Table("data", tuple(data.columns), len(data), lambda c: data[c].tolist())
    else:
        import datasets

        if isinstance(data, datasets.Dataset):
            table = Table(
                "data", tuple(data.column_names), data.num_rows, lambda c: list(data[c])
            )
        elif isinstance(data, datasets.DatasetDict):
            raise TypeError(
                f"data is a datasets.DatasetDict with splits {list(data)}; pass one of them, "
                f"e.g. data['train'] (build_corpus makes its own per-task splits)."
            )
        else:
            raise TypeError(
                f"data must be a datasets.Dataset, a pandas.DataFrame, a path to a "
                f"{'/'.join(DATA_FILE_SUFFIXES)} file, or a TaskCorpus; got "
                f"{type(data).__name__}."
            )
    if table.num_rows == 0:
        raise ValueError(
            f"data has no rows (columns {list(table.columns)}); build_corpus needs at least one "
            f"document per task."
        )
    return table


def _read_file(path: Path) -> Table:
    source = f"data file {str(path)!r}"
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            table = _records_table(source, _read_json_lines(path, source))
        elif suffix == ".json":
            table = _read_json(path, source)
        elif suffix == ".csv":
            table = _frame_table(source, _read_csv(path, source))
        else:
            table = _frame_table(source, _read_parquet(path, source))
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{source} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8."
        ) from None
    if table.num_rows == 0:
        raise ValueError(
            f"{source} has no records; it needs one row per document with a task and a text "
            f"column."
        )
    return table


def _read_json_lines(path: Path, source: str) -> list[dict]:
    records = []
    with path.open(encoding="utf-8-sig") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{source}, line {number}: not valid JSON ({err.msg}, column {err.colno}): "
                    f"{line.strip()[:80]!r}. Each line of a .jsonl file holds one JSON object, "
                    f'e.g. {{"task": "a", "text": "..."}}.'
                ) from None
            if not isinstance(record, dict):
                raise ValueError(
                    f"{source}, line {number}: holds a JSON {type(record).__name__}, not an "
                    f"object: {line.strip()[:80]!r}. Each line of a .jsonl file holds one "
                    f'object, e.g. {{"task": "a", "text": "..."}}.'
                )
            records.append(record)
    return records


def _read_json(path: Path, source: str) -> Table:
    text = path.read_text(encoding="utf-8-sig")
    try:
        content = json.loads(text)
    except json.JSONDecodeError as err:
        if err.msg == "Extra data":  # one object per line: JSON lines in a .json file
            return _records_table(source, _read_json_lines(path, source))
        raise ValueError(
            f"{source}, line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})."
        ) from None
    if isinstance(content, list):
        bad = next((i for i, r in enumerate(content) if not isinstance(r, dict)), None)
        if bad is not None:
            raise ValueError(
                f"{source}: item {bad} of the top-level list is a JSON "
                f"{type(content[bad]).__name__}, not an object; write one object per document."
            )
        return _records_table(source, content)
    if isinstance(content, dict) and all(isinstance(v, list) for v in content.values()):
        lengths = {name: len(values) for name, values in content.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"{source}: its column lists differ in length: {lengths}.")
        rows = next(iter(lengths.values()), 0)
        return Table(source, tuple(content), rows, lambda c: list(content[c]))
    raise ValueError(
        f"{source} holds a JSON {type(content).__name__}; expected a list of objects (one per "
        f"document), an object of equal-length column lists, or one object per line."
    )


def _records_table(source: str, records: list[dict]) -> Table:
    columns = tuple(dict.fromkeys(key for record in records for key in record))
    return Table(source, columns, len(records), lambda c: [r.get(c) for r in records])


def _read_csv(path: Path, source: str) -> pd.DataFrame:
    try:
        return pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
    except pd.errors.EmptyDataError:
        raise ValueError(
            f"{source} has no records (the file is empty); it needs a header row and one row "
            f"per document."
        ) from None
    except pd.errors.ParserError as err:
        raise ValueError(f"{source} is not valid CSV: {err}") from None


def _read_parquet(path: Path, source: str) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise ValueError(f"{source} could not be read as Parquet: {err}") from None


def _frame_table(source: str, frame: pd.DataFrame) -> Table:
    return Table(source, tuple(frame.columns), len(frame), lambda c: frame[c].tolist())


# --------------------------------------------------------------------------------------------
# column checks
# --------------------------------------------------------------------------------------------


def is_missing(value: Any) -> bool:
    """True for ``None``, ``pd.NA``, ``pd.NaT`` and float NaN."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, (float, np.floating)) and math.isnan(value)


def task_labels(values: list, column: str) -> list[str]:
    """The task label of each row, normalised to ``str``.

    Parameters
    ----------
    values : list
        The task column, one value per row (strings, numbers, ...).
    column : str
        The column's name, for messages.

    Returns
    -------
    list of str
        ``value`` for strings, ``str(value)`` otherwise.

    Raises
    ------
    ValueError
        For a missing or blank label (naming the first such row), or for two different labels
        that read as the same text (e.g. the int ``1`` and the string ``"1"``), which would
        otherwise be merged into one task.
    """
    out = []
    bad = []
    seen: dict[str, tuple[int, Any]] = {}
    for i, value in enumerate(values):
        if is_missing(value) or (isinstance(value, str) and not value.strip()):
            bad.append(i)
            out.append("")
            continue
        label = value if isinstance(value, str) else str(value)
        first = seen.setdefault(label, (i, value))
        if first[1] is not value and _differ(first[1], value):
            raise ValueError(
                f"column {column!r} (task_column) holds the labels {first[1]!r} "
                f"({type(first[1]).__name__}, row {first[0]}) and {value!r} "
                f"({type(value).__name__}, row {i}), which both read as task {label!r}. Give "
                f"the column one type: convert it to text first if they are the same task "
                f"(df[{column!r}] = df[{column!r}].astype(str)), or rename one of them."
            )
        out.append(label)
    if bad:
        raise ValueError(
            f"column {column!r} (task_column) has {len(bad)} missing or empty task value(s), "
            f"first at row {bad[0]} (value {values[bad[0]]!r}); every row needs a task. Drop "
            f"or fill those rows first (e.g. df.dropna(subset=[{column!r}]))."
        )
    return out


def _differ(a: Any, b: Any) -> bool:
    """Whether two labels with the same text are different labels (a string vs a number)."""
    if isinstance(a, str) or isinstance(b, str):
        return not (isinstance(a, str) and isinstance(b, str))
    try:
        return bool(a != b)
    except (TypeError, ValueError):
        return True


def text_values(
    values: list,
    rows: np.ndarray,
    row_tasks: list[str],
    column: str,
    *,
    allow_empty: bool = False,
) -> list[str]:
    """The strings of ``values`` at ``rows``.

    Raises
    ------
    ValueError
        For a missing value, a value that is not a string, or (unless ``allow_empty``) empty or
        whitespace-only text; the message names the column, the row and its task.
    """
    out = []
    for i in rows.tolist():
        value = values[i]
        if is_missing(value):
            raise ValueError(
                f"column {column!r} is missing at row {i} (task {row_tasks[i]!r}, value "
                f"{value!r}); drop or fill rows without text first."
            )
        if not isinstance(value, str):
            raise ValueError(
                f"column {column!r} must hold strings, but row {i} (task {row_tasks[i]!r}) holds "
                f"a value of type {type(value).__name__}: {value!r:.80}. Convert the column to "
                f"text first, e.g. df[{column!r}] = df[{column!r}].astype(str)."
            )
        if not allow_empty and not value.strip():
            raise ValueError(
                f"column {column!r} is empty or whitespace-only at row {i} (task "
                f"{row_tasks[i]!r}, value {value!r}); drop such rows first, e.g. "
                f"df = df[df[{column!r}].str.strip() != '']."
            )
        out.append(value)
    return out
