"""Local row files: a line that is not UTF-8 is a DataError naming the file and line."""

import pytest

from r1kit.data.rows import jsonl_rows
from r1kit.errors import DataError


def test_jsonl_rows_reads_utf8_and_names_a_non_utf8_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes('{"q": "café", "answer": "1"}\n\n'.encode() + b'{"q": "caf\xe9", "answer": "2"}\n')
    rows = jsonl_rows(path)
    assert next(rows) == (1, {"q": "café", "answer": "1"})
    with pytest.raises(DataError, match=r"rows\.jsonl line 3: not UTF-8 \(invalid continuation byte at byte 10\)"):
        next(rows)
