"""Reading dataset rows and turning them into validated ``Example``s.

Shared by the built-in math tasks and by local/hub datasets: rows keep their 1-based row number
(the line number in a JSONL file) so that every error names the file, the row and the field.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable

from r1kit.errors import DataError
from r1kit.rewards.math import last_boxed, parse_gold

DATA_DIR_ENV = "R1KIT_DATA_DIR"
FILE_SUFFIXES = (".jsonl", ".json", ".parquet")

# Golds that are plain decimal numbers always parse; skipping math-verify for them keeps loading
# all of GSM8K fast (about 1 ms per parse otherwise).
_PLAIN_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def data_dir() -> Path:
    """The folder holding r1kit's data sets: ``$R1KIT_DATA_DIR``, else the ``data/`` folder of the
    repository this package lives in (found by walking up to the folder with ``pyproject.toml``).

    Raises DataError when neither exists (an installed wheel without a checkout)."""
    override = os.environ.get(DATA_DIR_ENV)
    if override:
        if not Path(override).is_dir():
            raise DataError(f"{DATA_DIR_ENV}={override} is not a directory; point it at r1kit's data/ folder")
        return Path(override)
    for parent in Path(__file__).resolve().parents:
        if (parent / "pyproject.toml").is_file() and (parent / "data").is_dir():
            return parent / "data"
    raise DataError(
        f"r1kit's data/ folder was not found above {Path(__file__).parent}; "
        f"set {DATA_DIR_ENV} to the data/ folder of an r1kit checkout"
    )


def read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a ``.jsonl``, ``.json`` (a list of objects) or ``.parquet`` file with their 1-based
    row numbers (JSONL: line numbers; blank lines are skipped).

    Raises DataError naming the file (and line) when it is missing, unreadable or not rows."""
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.suffix == ".jsonl":
        return list(jsonl_rows(path))
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of objects, got {type(rows).__name__}")
        return _numbered(path, rows)
    if path.suffix == ".parquet":
        import pandas as pd

        return _numbered(path, pd.read_parquet(path).to_dict(orient="records"))
    raise DataError(f"{path}: unsupported file type; use one of {', '.join(FILE_SUFFIXES)}")


def jsonl_rows(path: Path) -> Iterable[tuple[int, dict[str, Any]]]:
    """``(line number, row)`` of a JSON Lines file (gzip-compressed if it ends in ``.gz``), skipping
    blank lines. Raises DataError naming the file and line for bytes that are not UTF-8, invalid JSON
    or a non-object row."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path} line {line_no}: not UTF-8 ({err.reason} at byte {err.start}); "
                                "re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path} line {line_no}: not valid JSON ({err})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path} line {line_no}: expected a JSON object")
            yield line_no, row


def _numbered(path: Path, rows: list) -> list[tuple[int, dict[str, Any]]]:
    for row_no, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {row_no}: expected an object with named fields")
    return list(enumerate(rows, start=1))


def get_field(row: dict[str, Any], field: str, source: Path | str, row_no: int) -> Any:
    """``row[field]``; raises DataError naming the source, row and field when it is missing/empty."""
    value = row.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"{source} row {row_no}: field {field!r} is missing or empty (fields: {sorted(row)})")
    return value


def format_number(value: Any) -> str:
    """A JSON answer as text; floats lose a trailing ``.0`` (``51.0`` → ``"51"``, ``0.5`` → ``"0.5"``)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def final_answer(text: str) -> str:
    """The final answer inside a worked solution: the last ``\\boxed{}`` content, else the text after
    GSM8K's ``####`` marker, else the whole text (already a bare answer)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    return text.strip()


def check_gold(gold: str, source: Path | str, row_no: int, field: str) -> str:
    """Return ``gold`` after checking that math-verify parses it, as a whole (``parse_gold``).

    Raises DataError naming the source file, row and field otherwise, also for a gold read only in
    part (``3x+`` as 3) (GRPO_SPEC §5)."""
    if not _PLAIN_NUMBER.fullmatch(gold):
        try:
            parse_gold(gold)
        except DataError as err:
            raise DataError(f"{source} row {row_no}, field {field!r}: {err}") from None
    return gold

