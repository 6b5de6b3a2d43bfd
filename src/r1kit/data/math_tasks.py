"""Built-in math tasks read from the repository's own ``data/`` folder (sources and licenses in
``data/README.md``): GSM8K, an easy GSM8K subset, MATH-500, AIME 2024, AMC 2023 and SVAMP.

Every loader returns ``list[Example]`` with ids ``"<task>/<split>/<row>"`` (row = 0-based position
in the source file, so ids stay stable under filtering; SVAMP uses its own ``ID``). Gold answers are
checked with math-verify at load (``rows.check_gold``), so an unparseable gold fails here, naming
its file, row and field, not silently during training (GRPO_SPEC §5).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from r1kit.data.base import Example, register_task
from r1kit.data.rows import check_gold, data_dir, final_answer, format_number, get_field, read_rows
from r1kit.errors import ConfigError, DataError

GSM8K_EASY_MAX_CALC_STEPS = 2
GSM8K_DEV_SIZE = 200  # the last rows of GSM8K's train file form the dev split (held out from "train")
SVAMP_TEST_SIZE = 300
SVAMP_SPLIT_SALT = "r1kit-svamp-split-v1:"


def _split_file(task: str, split: str, files: dict[str, str]) -> Path:
    """``data/<task>/<file>`` for ``split``; raises DataError listing the task's splits."""
    if split not in files:
        raise DataError(f"task {task!r} has no split {split!r}; splits: {', '.join(files)}")
    return data_dir() / task / files[split]


def _read_task(
    task: str, split: str, path: Path, prompt_field: str, answer_field: str, meta_fields: tuple[str, ...]
) -> list[Example]:
    """One Example per row: prompt and gold from the named fields, ``meta_fields`` copied to meta."""
    examples = []
    for index, (row_no, row) in enumerate(read_rows(path)):
        prompt = str(get_field(row, prompt_field, path, row_no))
        gold = check_gold(format_number(get_field(row, answer_field, path, row_no)), path, row_no, answer_field)
        meta = {k: row[k] for k in meta_fields if k in row}
        examples.append(Example(f"{task}/{split}/{index}", prompt, gold, meta))
    return examples


@register_task("gsm8k", verifier="math")
def gsm8k(split: str = "train", max_calc_steps: int | None = None) -> list[Example]:
    """GSM8K (Cobbe et al. 2021): 7,473 train / 1,319 test grade-school word problems; r1kit holds
    the last ``GSM8K_DEV_SIZE`` (200) rows of the train file out as ``dev``, so ``train`` has 7,273.

    Args:
        split: ``"train"`` (train-file rows 0-7272), ``"dev"`` (rows 7273-7472: for choosing settings
            without touching test, never trained on by anything that reads ``train``) or ``"test"``.
        max_calc_steps: keep only problems whose reference solution has at most this many
            ``<<…>>`` calculator annotations (a proxy for the number of arithmetic steps); None keeps all.

    Ids are ``gsm8k/train/<row>`` for both train and dev (the row of the train file), ``gsm8k/test/<row>``
    for test. The gold is the number after ``####`` with thousands separators removed; ``meta`` holds
    the worked ``solution`` and its ``calc_steps``. Raises DataError for a bad split or row, ConfigError
    for a negative ``max_calc_steps``.
    """
    if max_calc_steps is not None and max_calc_steps < 0:
        raise ConfigError(f"max_calc_steps must be >= 0 or None, got {max_calc_steps}")
    path = _split_file("gsm8k", split, {"train": "train.jsonl", "dev": "train.jsonl", "test": "test.jsonl"})
    rows = list(enumerate(read_rows(path)))  # (0-based position, (row number, row))
    if split != "test":
        cut = len(rows) - GSM8K_DEV_SIZE
        if cut < 1:
            raise DataError(f"{path} has {len(rows)} rows; GSM8K's dev split holds out the last {GSM8K_DEV_SIZE}, "
                            f"so the train file needs more than {GSM8K_DEV_SIZE}")
        rows = rows[:cut] if split == "train" else rows[cut:]
    id_split = "test" if split == "test" else "train"
    examples = []
    for index, (row_no, row) in rows:
        question = get_field(row, "question", path, row_no)
        solution = get_field(row, "answer", path, row_no)
        if "####" not in solution:
            raise DataError(f"{path} row {row_no}: field 'answer' has no final '#### <number>' line")
        steps = solution.count("<<")
        if max_calc_steps is not None and steps > max_calc_steps:
            continue
        gold = check_gold(final_answer(solution).replace(",", ""), path, row_no, "answer")
        meta = {"solution": solution, "calc_steps": steps}
        examples.append(Example(f"gsm8k/{id_split}/{index}", question, gold, meta))
    return examples


@register_task("gsm8k_easy", verifier="math")
def gsm8k_easy(split: str = "train", max_calc_steps: int = GSM8K_EASY_MAX_CALC_STEPS) -> list[Example]:
    """GSM8K problems solved in at most two calculator steps (ids as in ``gsm8k``): a real-data task
    a 135M model can learn on a CPU budget."""
    return gsm8k(split, max_calc_steps=max_calc_steps)


@register_task("math500", verifier="math")
def math500(split: str = "test") -> list[Example]:
    """MATH-500 (Lightman et al. 2023, the PRM800K split of MATH): 500 competition problems;
    ``meta`` holds subject, level, unique_id and the reference ``solution``."""
    path = _split_file("math500", split, {"test": "test.jsonl"})
    return _read_task("math500", split, path, "problem", "answer", ("subject", "level", "unique_id", "solution"))


@register_task("aime24", verifier="math")
def aime24(split: str = "test") -> list[Example]:
    """AIME 2024: 30 problems with integer answers 0-999 (given as written, e.g. ``"025"``); ``meta``
    holds id, url and the reference ``solution``."""
    path = _split_file("aime24", split, {"test": "test.jsonl"})
    return _read_task("aime24", split, path, "problem", "answer", ("id", "url", "solution"))


@register_task("amc23", verifier="math")
def amc23(split: str = "test") -> list[Example]:
    """AMC 2023: 40 problems with numeric answers (``27.0`` in the file becomes gold ``"27"``)."""
    path = _split_file("amc23", split, {"test": "test.jsonl"})
    return _read_task("amc23", split, path, "problem", "answer", ("id", "url"))


def _svamp_test_ids(ids: list[str]) -> frozenset[str]:
    """The test split among SVAMP ``ids``: the first ``SVAMP_TEST_SIZE`` ordered by
    sha256(``SVAMP_SPLIT_SALT`` + ID)."""
    ranked = sorted(ids, key=lambda i: hashlib.sha256((SVAMP_SPLIT_SALT + i).encode()).hexdigest())
    return frozenset(ranked[:SVAMP_TEST_SIZE])


@register_task("svamp", verifier="math")
def svamp(split: str = "train") -> list[Example]:
    """SVAMP (Patel et al. 2021): 1,000 one-unknown arithmetic word problems, which ship without a
    split. r1kit's fixed split: order rows by sha256(``SVAMP_SPLIT_SALT`` + ``ID``); the first 300
    are ``test``, the other 700 ``train`` (deterministic, disjoint, independent of file order).

    Prompt = ``Body + " " + Question``; gold = ``Answer`` without a trailing ``.0``; ids
    ``"svamp/<split>/<ID>"``; ``meta`` holds the ``Equation`` and ``Type``.
    """
    path = _split_file("svamp", split, {"train": "SVAMP.json", "test": "SVAMP.json"})
    rows = read_rows(path)
    ids = [str(get_field(row, "ID", path, row_no)) for row_no, row in rows]
    test_ids = _svamp_test_ids(ids)
    examples = []
    for problem_id, (row_no, row) in zip(ids, rows):
        if (problem_id in test_ids) != (split == "test"):
            continue
        prompt = f"{get_field(row, 'Body', path, row_no)} {get_field(row, 'Question', path, row_no)}"
        gold = check_gold(format_number(get_field(row, "Answer", path, row_no)), path, row_no, "Answer")
        meta: dict[str, Any] = {"equation": row.get("Equation"), "type": row.get("Type")}
        examples.append(Example(f"svamp/{split}/{problem_id}", prompt, gold, meta))
    return examples
