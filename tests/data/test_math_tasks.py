"""Built-in math tasks and load_task: row counts, golds, splits, field mapping and data errors."""

import hashlib
import json
import re
import sys
import types

import pandas as pd
import pytest

from r1kit.data.base import task_names
from r1kit.data.loading import load_task, task_verifier_kind
from r1kit.data.rows import DATA_DIR_ENV, data_dir
from r1kit.errors import ConfigError, DataError
from r1kit.rewards.math import parse_gold


@pytest.fixture(scope="module")
def gsm8k_train():
    return load_task("gsm8k", "train")


def test_registered_names():
    assert {"gsm8k", "gsm8k_easy", "math500", "aime24", "amc23", "svamp"} <= set(task_names())
    assert all(task_verifier_kind(t) == "math" for t in ("gsm8k", "math500", "svamp"))
    assert task_verifier_kind("some/file.jsonl") == "math"


def test_gsm8k_rows_and_golds(gsm8k_train):
    test = load_task("gsm8k", "test")
    assert (len(gsm8k_train), len(test)) == (7273, 1319)  # 7,473 in the file, less the 200 dev rows
    first = gsm8k_train[0]
    assert (first.id, first.gold, first.meta["calc_steps"]) == ("gsm8k/train/0", "72", 2)
    assert first.prompt.startswith("Natalia sold clips to 48 of her friends")
    assert test[0].gold == "18"
    for ex in gsm8k_train + test:
        assert re.fullmatch(r"-?\d+(\.\d+)?", ex.gold), ex.id
    # numbers take the loader's fast path; math-verify reads a spread of them to the same value
    for ex in gsm8k_train[::500]:
        assert parse_gold(ex.gold)[0] == pd.to_numeric(ex.gold)
    assert len({ex.id for ex in gsm8k_train}) == 7273


def test_gsm8k_dev_split_is_held_out_of_train(gsm8k_train):
    from r1kit.data.rows import read_rows
    from r1kit.data.sft_data import load_sft_rows

    dev = load_task("gsm8k", "dev")
    file_rows = read_rows(data_dir() / "gsm8k" / "train.jsonl")
    assert len(file_rows) == 7473 and len(dev) == 200
    # the last 200 rows of the train file, ids = their file positions, disjoint from train
    assert [ex.id for ex in dev] == [f"gsm8k/train/{i}" for i in range(7273, 7473)]
    assert dev[-1].prompt == file_rows[-1][1]["question"] and dev[0].prompt == file_rows[7273][1]["question"]
    assert not {ex.id for ex in dev} & {ex.id for ex in gsm8k_train}
    assert sorted(ex.id for ex in dev + gsm8k_train) == sorted(f"gsm8k/train/{i}" for i in range(7473))
    # what trains reads "train": the easy RL prompts and the SFT worked solutions exclude dev
    dev_questions = {ex.prompt for ex in dev}
    assert not dev_questions & {ex.prompt for ex in load_task("gsm8k_easy", "train")}
    assert not dev_questions & {r.prompt for r in load_sft_rows("gsm8k")}
    easy_dev = load_task("gsm8k_easy", "dev")
    assert [ex.id for ex in easy_dev] == [ex.id for ex in dev if ex.meta["calc_steps"] <= 2] and len(easy_dev) == 82


def test_gsm8k_thousands_separator_removed(gsm8k_train):
    with_comma = [ex for ex in gsm8k_train if "," in ex.meta["solution"].rsplit("####", 1)[1]]
    assert with_comma, "GSM8K train has golds written with thousands separators"
    assert all("," not in ex.gold for ex in with_comma)


def test_gsm8k_calc_steps_filter(gsm8k_train):
    easy = load_task("gsm8k_easy", "train")
    expected = [ex.id for ex in gsm8k_train if ex.meta["solution"].count("<<") <= 2]
    assert [ex.id for ex in easy] == expected
    assert len(easy) == 2592
    assert len(load_task("gsm8k", "test", max_calc_steps=2)) == len(load_task("gsm8k_easy", "test")) == 440
    no_calculator = load_task("gsm8k", "train", max_calc_steps=0)
    assert len(no_calculator) == 91 and all("<<" not in ex.meta["solution"] for ex in no_calculator)
    with pytest.raises(ConfigError, match="max_calc_steps must be >= 0"):
        load_task("gsm8k", max_calc_steps=-1)


def test_competition_sets_every_gold_parses():
    math500 = load_task("math500", "test")
    aime = load_task("aime24", "test")
    amc = load_task("amc23", "test")
    assert (len(math500), len(aime), len(amc)) == (500, 30, 40)
    for ex in math500 + aime + amc:
        assert parse_gold(ex.gold), ex.id
    assert math500[0].gold == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert math500[0].meta["subject"] == "Precalculus"
    assert (aime[0].gold, amc[0].gold, amc[15].gold) == ("204", "27", "-1")


def test_svamp_split_fixed_disjoint_deterministic():
    train, test = load_task("svamp", "train"), load_task("svamp", "test")
    assert (len(train), len(test)) == (700, 300)
    train_ids = {ex.id.rsplit("/", 1)[1] for ex in train}
    test_ids = {ex.id.rsplit("/", 1)[1] for ex in test}
    assert not train_ids & test_ids and len(train_ids | test_ids) == 1000
    # the rule documented in data/README.md, computed independently
    ranked = sorted(train_ids | test_ids, key=lambda i: hashlib.sha256(f"r1kit-svamp-split-v1:{i}".encode()).hexdigest())
    assert set(ranked[:300]) == test_ids
    assert [ex.id for ex in load_task("svamp", "test")] == [ex.id for ex in test]
    chal1 = next(ex for ex in train if ex.id == "svamp/train/chal-1")
    assert chal1.prompt == (
        "Each pack of dvds costs 76 dollars. If there is a discount of 25 dollars on each pack "
        "How much do you have to pay to buy each pack?"
    )
    assert chal1.gold == "51"
    assert test[0].id == "svamp/test/chal-2"
    assert all(not ex.gold.endswith(".0") for ex in train + test)


def test_unknown_split_task_and_option():
    with pytest.raises(DataError, match="task 'gsm8k' has no split 'validation'; splits: train, dev, test"):
        load_task("gsm8k", "validation")
    with pytest.raises(DataError, match="unknown task 'gsm9k'; known tasks: .*gsm8k"):
        load_task("gsm9k")
    with pytest.raises(ConfigError, match="task 'math500' does not take options \\['max_calc_steps'\\]"):
        load_task("math500", "test", max_calc_steps=2)
    with pytest.raises(ConfigError, match="prompt_field apply to local files"):
        load_task("gsm8k", prompt_field="question")
    with pytest.raises(ConfigError, match="limit must be >= 1"):
        load_task("gsm8k", limit=0)


def test_limit():
    assert [ex.id for ex in load_task("aime24", "test", limit=3)] == [f"aime24/test/{i}" for i in range(3)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_local_jsonl_default_fields(tmp_path):
    path = write_jsonl(
        tmp_path / "mine.jsonl",
        [
            {"question": "1+1?", "answer": "2"},
            {"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$.", "id": "h"},
            {"prompt": "Big?", "answer": "steps\n#### 1,000"},
            {"prompt": "Float?", "gold": 3.0},
        ],
    )
    examples = load_task(path)
    assert [(e.id, e.prompt, e.gold) for e in examples] == [
        ("mine/0", "1+1?", "2"),
        ("mine/h", "Half of one?", "\\frac{1}{2}"),
        ("mine/2", "Big?", "1,000"),
        ("mine/3", "Float?", "3"),
    ]
    assert examples[0].meta == {"source": path, "row": 1}


def test_local_parquet_field_mapping(tmp_path):
    path = tmp_path / "p.parquet"
    pd.DataFrame({"q": ["a?", "b?"], "final": ["7", "-2"], "key": ["x", "y"]}).to_parquet(path)
    examples = load_task(str(path), prompt_field="q", answer_field="final", id_field="key")
    assert [(e.id, e.prompt, e.gold) for e in examples] == [("p/x", "a?", "7"), ("p/y", "b?", "-2")]


def test_local_json_list(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps([{"question": "q", "answer": 4}]))
    assert [(e.id, e.gold) for e in load_task(str(path))] == [("l/0", "4")]


def test_bad_gold_names_file_row_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok", "answer": "1"}, {"question": "bad", "answer": ")("}])
    with pytest.raises(DataError, match=r"bad\.jsonl row 2, field 'answer': gold answer '\)\(' does not parse"):
        load_task(path)


def test_bad_gold_in_builtin_task_names_line(tmp_path, monkeypatch):
    (tmp_path / "math500").mkdir()
    rows = [{"problem": "p", "answer": "3"}, {"problem": "p", "answer": "4"}, {"problem": "p", "answer": "x^{"}]
    write_jsonl(tmp_path / "math500" / "test.jsonl", rows)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert data_dir() == tmp_path
    with pytest.raises(DataError, match=r"math500/test\.jsonl row 3, field 'answer': gold answer 'x\^\{'"):
        load_task("math500", "test")


def test_missing_fields(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "m.jsonl", [{"question": "q", "answer": "1"}, {"question": "q"}])
    with pytest.raises(DataError, match=r"m\.jsonl row 2: no answer field among \['answer', 'gold', 'solution'\]"):
        load_task(path)
    with pytest.raises(DataError, match=r"m\.jsonl row 1: no field 'text' for the prompt"):
        load_task(path, prompt_field="text")
    (tmp_path / "gsm8k").mkdir()
    write_jsonl(tmp_path / "gsm8k" / "test.jsonl", [{"question": "q", "answer": "#### 1"}, {"answer": "#### 2"}])
    write_jsonl(tmp_path / "gsm8k" / "train.jsonl", [{"question": "q", "answer": "#### 1"}] * 200)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    with pytest.raises(DataError, match=r"test\.jsonl row 2: field 'question' is missing or empty"):
        load_task("gsm8k", "test")
    with pytest.raises(DataError, match=r"train\.jsonl has 200 rows; GSM8K's dev split holds out the last 200"):
        load_task("gsm8k", "train")


def test_repeated_id(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"id": 1, "question": "a", "answer": "1"}, {"id": 1, "question": "b", "answer": "2"}])
    with pytest.raises(DataError, match=r"d\.jsonl row 2: id 'd/1' repeats row 1"):
        load_task(path)
    assert [e.id for e in load_task(path, id_field="question")] == ["d/a", "d/b"]


def test_file_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="does not exist"):
        load_task(str(tmp_path / "nope.jsonl"))
    (tmp_path / "broken.jsonl").write_text('{"question": "q", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match=r"broken\.jsonl line 2: not valid JSON"):
        load_task(str(tmp_path / "broken.jsonl"))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "absent"))
    with pytest.raises(DataError, match=f"{DATA_DIR_ENV}=.* is not a directory"):
        load_task("gsm8k")


def test_hub_dataset_unreachable(monkeypatch):
    def load_dataset(name, split):
        raise ConnectionError("Couldn't reach the Hugging Face Hub (offline)")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(DataError, match="could not load dataset 'someone/set' split 'train' from the hub .*offline"):
        load_task("someone/set")


def test_hub_dataset_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match="'someone/set' is not a registered task or local file.*pip install datasets"):
        load_task("someone/set")


def test_hub_rows_mapped(monkeypatch):
    rows = [{"question": "q1", "answer": "#### 5"}, {"question": "q2", "answer": "#### 6"}]
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=lambda name, split: rows))
    assert [(e.id, e.gold) for e in load_task("someone/set", "test")] == [("someone/set/0", "5"), ("someone/set/1", "6")]
