"""``load_task``: one entry point for registered tasks, local files and Hugging Face datasets.

A spec is resolved in this order: a registered task name (``gsm8k``, ``math500``, ...); a path
ending in ``.jsonl``/``.json``/``.parquet``; a hub name ``owner/name`` loaded with ``datasets``
(only when a hub is reachable). Rows of files and hub datasets are mapped through field names and
their gold answers validated like the built-in tasks'.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from r1kit.data.base import Example, get_task_loader, task_names, task_verifier
from r1kit.data.rows import FILE_SUFFIXES, check_gold, final_answer, format_number, get_field, read_rows
from r1kit.errors import ConfigError, DataError

PROMPT_FIELDS = ("prompt", "question", "problem")
ANSWER_FIELDS = ("answer", "gold", "solution")
ID_FIELDS = ("id", "unique_id", "ID")


def load_task(
    spec: str,
    split: str = "train",
    *,
    prompt_field: str | None = None,
    answer_field: str | None = None,
    id_field: str | None = None,
    limit: int | None = None,
    **options: Any,
) -> list[Example]:
    """Load the examples of a task.

    Args:
        spec: a registered task name, a local ``.jsonl``/``.json``/``.parquet`` file, or a Hugging
            Face dataset name (``owner/name``).
        split: the split of a registered task or hub dataset (a local file is one split; ignored).
        prompt_field: field holding the problem (files/hub; default: first of ``PROMPT_FIELDS``).
        answer_field: field holding the answer (default: first of ``ANSWER_FIELDS``); a worked
            solution is reduced to its last ``\\boxed{}`` (or GSM8K ``####``) answer.
        id_field: field used in Example ids (default: first of ``ID_FIELDS``, else the row index).
        limit: keep the first ``limit`` examples.
        **options: task options (e.g. ``max_calc_steps`` for ``gsm8k``).

    Raises:
        DataError: unknown task or split, missing file or field, unparseable gold, hub unreachable.
        ConfigError: options the task does not take, field names given for a registered task,
            a non-positive limit.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    fields = {"prompt_field": prompt_field, "answer_field": answer_field, "id_field": id_field}
    if spec.endswith(FILE_SUFFIXES) or (spec not in task_names() and "/" in spec):
        if options:
            raise ConfigError(f"options {sorted(options)} apply to registered tasks only, not to {spec!r}")
        if spec.endswith(FILE_SUFFIXES):
            path = Path(spec).expanduser()
            examples = _map_rows(path.stem, path, read_rows(path), **fields)
        else:
            examples = _map_rows(spec, spec, _hub_rows(spec, split), **fields)
    else:
        given = [name for name, value in fields.items() if value is not None]
        if given:
            raise ConfigError(
                f"{', '.join(given)} apply to local files and hub datasets, not to task {spec!r}"
            )
        examples = _load_registered(spec, split, options)
    return examples[:limit]


def task_verifier_kind(spec: str) -> str:
    """The verifier kind for a spec: the registered task's kind, ``"math"`` for files and hub data."""
    return task_verifier(spec) if spec in task_names() else "math"


def _load_registered(name: str, split: str, options: dict[str, Any]) -> list[Example]:
    loader = get_task_loader(name)
    try:
        inspect.signature(loader).bind(split, **options)
    except TypeError:
        params = [p for p in inspect.signature(loader).parameters if p != "split"]
        raise ConfigError(
            f"task {name!r} does not take options {sorted(options)}; its options: {params or 'none'}"
        ) from None
    return loader(split, **options)


def _pick_field(row: dict[str, Any], given: str | None, candidates: tuple[str, ...], role: str,
                source: str | Path, row_no: int) -> str:
    """The field to read ``role`` from: ``given`` if set, else the first candidate present."""
    if given is not None:
        if given not in row:
            raise DataError(
                f"{source} row {row_no}: no field {given!r} for the {role} (fields: {sorted(row)})"
            )
        return given
    for name in candidates:
        if row.get(name) is not None:
            return name
    raise DataError(
        f"{source} row {row_no}: no {role} field among {list(candidates)} (fields: {sorted(row)}); "
        f"name it with --{role}-field"
    )


def _map_rows(name: str, source: str | Path, rows: list[tuple[int, dict[str, Any]]],
              prompt_field: str | None, answer_field: str | None, id_field: str | None) -> list[Example]:
    """Examples from rows through the field mapping; ids ``"<name>/<id or row index>"``.

    Raises DataError naming the source and row for a missing/empty field, an unparseable gold or a
    repeated id."""
    examples = []
    first_row: dict[str, int] = {}
    for index, (row_no, row) in enumerate(rows):
        prompt_key = _pick_field(row, prompt_field, PROMPT_FIELDS, "prompt", source, row_no)
        answer_key = _pick_field(row, answer_field, ANSWER_FIELDS, "answer", source, row_no)
        prompt = str(get_field(row, prompt_key, source, row_no)).strip()
        answer = get_field(row, answer_key, source, row_no)
        gold = final_answer(answer) if isinstance(answer, str) else format_number(answer)
        id_key = id_field or next((f for f in ID_FIELDS if row.get(f) is not None), None)
        example_id = f"{name}/{get_field(row, id_key, source, row_no) if id_key else index}"
        if example_id in first_row:
            raise DataError(
                f"{source} row {row_no}: id {example_id!r} repeats row {first_row[example_id]}; "
                "ids must be unique (choose another --id-field)"
            )
        first_row[example_id] = row_no
        meta = {"source": str(source), "row": row_no}
        examples.append(Example(example_id, prompt, check_gold(gold, source, row_no, answer_key), meta))
    return examples


def _hub_rows(name: str, split: str) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a Hugging Face dataset split, numbered from 1. Raises DataError when ``datasets`` is
    missing or the dataset cannot be loaded (offline, unknown name or split)."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{name!r} is not a registered task or local file, and loading it from the hub needs "
            "`pip install datasets`"
        ) from None
    try:
        rows = datasets.load_dataset(name, split=split)
    except Exception as err:  # the hub client raises many unrelated types for offline/unknown
        raise DataError(
            f"could not load dataset {name!r} split {split!r} from the hub ({type(err).__name__}: {err}); "
            f"known tasks: {', '.join(task_names())}; or pass a local .jsonl/.parquet file"
        ) from None
    return list(enumerate(rows, start=1))
